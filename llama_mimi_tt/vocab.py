"""The Llama-Mimi token layout, and the checks on Mimi codes.

Audio code ``c`` of quantizer level ``q`` gets id ``T + c * Q + q``: the order in which the
reference adds the strings ``<c_q>`` (c outer, q inner) to the Llama 3 tokenizer, so our ids
agree with the released llm-jp/Llama-Mimi checkpoints. ``<audio>`` and ``</audio>`` follow the
code block. Everything here is array arithmetic: no strings, no Python loop over tokens.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

MIMI_CODEBOOK_SIZE = 2048
MIMI_FRAME_RATE = 12.5  # frames per second
MIMI_SAMPLE_RATE = 24000  # Hz
LLAMA3_TEXT_VOCAB_SIZE = 128256  # 128000 BPE tokens + 256 reserved special tokens
MAX_QUANTIZERS = 32  # Mimi has 32 levels


def _as_tensor(x) -> Tuple[torch.Tensor, bool]:
    """Returns ``(tensor, was_numpy)`` so callers can give back what they were given."""
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.as_tensor(np.asarray(x)), True


@dataclass(frozen=True)
class MimiVocab:
    """Ids of Mimi codes in a Llama 3 vocabulary extended by ``codebook_size * num_quantizers + 2``.

    Args:
        text_vocab_size (int): T, the size of the base text vocabulary including its special
            tokens (128256 for Llama 3.x).
        num_quantizers (int): Q, the number of Mimi levels per frame (1..32; 4 in the paper).
        codebook_size (int): C, entries per Mimi codebook (2048).
    """

    text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE
    num_quantizers: int = 4
    codebook_size: int = MIMI_CODEBOOK_SIZE

    def __post_init__(self):
        if not 1 <= self.num_quantizers <= MAX_QUANTIZERS:
            raise ValueError(
                f"num_quantizers must be in 1..{MAX_QUANTIZERS} (Mimi has {MAX_QUANTIZERS} levels), "
                f"got {self.num_quantizers}"
            )
        if self.codebook_size < 1 or self.text_vocab_size < 1:
            raise ValueError(
                f"codebook_size and text_vocab_size must be positive, got "
                f"{self.codebook_size} and {self.text_vocab_size}"
            )

    # ---- layout -------------------------------------------------------------------------
    @property
    def audio_offset(self) -> int:
        """Id of code 0 at level 0: the first audio id."""
        return self.text_vocab_size

    @property
    def num_audio_codes(self) -> int:
        return self.codebook_size * self.num_quantizers

    @property
    def audio_start_id(self) -> int:
        """Id of ``<audio>``."""
        return self.text_vocab_size + self.num_audio_codes

    @property
    def audio_end_id(self) -> int:
        """Id of ``</audio>``."""
        return self.audio_start_id + 1

    @property
    def size(self) -> int:
        """Vocabulary size before any padding: T + C * Q + 2."""
        return self.audio_start_id + 2

    def num_quantizers_of(self, size: int) -> Optional[int]:
        """The Q whose vocabulary (this T and C, unpadded) has ``size`` ids, or None when no
        Q >= 1 gives ``size``: the inverse of ``size``, to name the Q a checkpoint was made
        with."""
        audio = size - self.text_vocab_size - 2
        if audio > 0 and audio % self.codebook_size == 0:
            return audio // self.codebook_size
        return None

    def padded_size(self, multiple_of: int = 1) -> int:
        """``size`` rounded up to a multiple (for GPU-friendly embedding shapes)."""
        return -(-self.size // multiple_of) * multiple_of

    def token_strings(self) -> List[str]:
        """The strings the reference adds to the HF tokenizer, in id order."""
        q = self.num_quantizers
        codes = [f"<{c}_{j}>" for c in range(self.codebook_size) for j in range(q)]
        return codes + ["<audio>", "</audio>"]

    def is_audio(self, ids):
        """Boolean mask of audio-code ids (markers excluded)."""
        return (ids >= self.audio_offset) & (ids < self.audio_start_id)

    def level_of(self, ids):
        """Quantizer level of each audio id (meaningless for other ids)."""
        return (ids - self.audio_offset) % self.num_quantizers

    def level_ids(self, level: int) -> Tuple[int, int, int]:
        """``(start, stop, step)`` of the ids of one level: ``range(start, stop, step)``."""
        if not 0 <= level < self.num_quantizers:
            raise ValueError(f"level must be in 0..{self.num_quantizers - 1}, got {level}")
        return (self.code_ids(0, level), self.audio_start_id, self.num_quantizers)

    # ---- codes <-> ids ------------------------------------------------------------------
    def code_ids(self, codes, level):
        """Ids of codes at quantizer ``level``: ``T + c * Q + level``, the one place the
        layout is computed (ints or tensors, broadcast together; no range check)."""
        return self.audio_offset + codes * self.num_quantizers + level

    def codes_of(self, ids):
        """Codes of audio ids (the inverse of ``code_ids``; meaningless for other ids)."""
        return torch.div(ids - self.audio_offset, self.num_quantizers, rounding_mode="floor")

    def encode(self, codes):
        """Codes ``[..., Q, F]`` -> ids ``[..., F * Q]``, frame-major (f1q0 f1q1 .. f2q0 ..).

        Accepts a torch tensor or anything numpy takes; returns the same kind (int64).
        Raises ValueError if the level axis is not Q or a code is outside ``0..C-1``.
        """
        t, was_numpy = _as_tensor(codes)
        if t.dim() < 2 or t.shape[-2] != self.num_quantizers:
            raise ValueError(
                f"codes must have shape [..., Q={self.num_quantizers}, frames], got {tuple(t.shape)}"
            )
        t = t.long()
        check_codes(t, self.codebook_size)
        levels = torch.arange(self.num_quantizers, device=t.device)
        ids = self.code_ids(t.transpose(-1, -2), levels).flatten(-2)
        return ids.numpy() if was_numpy else ids

    def decode(self, ids):
        """Ids ``[..., F * Q]`` -> codes ``[..., Q, F]``: the exact inverse of ``encode``.

        Raises ValueError naming the first bad position when the ids are not a whole number of
        frames of audio codes with levels in order 0..Q-1.
        """
        t, was_numpy = _as_tensor(ids)
        t = t.long()
        q = self.num_quantizers
        if t.dim() < 1 or t.shape[-1] % q != 0:
            raise ValueError(
                f"{t.shape[-1] if t.dim() else 0} ids are not a whole number of frames "
                f"of Q={q} levels"
            )
        pos = torch.arange(t.shape[-1], device=t.device)
        bad = ~self.is_audio(t) | (self.level_of(t) != pos % q)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            v = int(t[first])
            if self.is_audio(torch.tensor(v)):
                why = f"is level {self.level_of(v)}, expected level {first[-1] % q}"
            else:
                why = (
                    f"is not an audio-code id (audio ids are {self.audio_offset}.."
                    f"{self.audio_start_id - 1})"
                )
            raise ValueError(f"id {v} at position {first} {why}")
        codes = self.codes_of(t).unflatten(-1, (-1, q)).transpose(-1, -2)
        return codes.numpy() if was_numpy else codes

    # ---- mixed text/audio sequences -----------------------------------------------------
    def audio_spans(self, ids) -> List[Tuple[int, int]]:
        """``[(start, end), ...]`` of the audio codes between each ``<audio>`` and ``</audio>``
        of a 1-D sequence: ``ids[start:end]`` are the codes. A span still open at the end of the
        sequence (generation not finished) runs to its end."""
        t, _ = _as_tensor(ids)
        if t.dim() != 1:
            raise ValueError(f"audio_spans takes a 1-D sequence, got shape {tuple(t.shape)}")
        starts = (t == self.audio_start_id).nonzero().flatten().tolist()
        ends = (t == self.audio_end_id).nonzero().flatten().tolist()
        spans = []
        for s in starts:
            e = next((e for e in ends if e > s), len(t))
            spans.append((s + 1, e))
        return spans

    def split(self, ids) -> Tuple[List[int], List[torch.Tensor]]:
        """Cuts a mixed sequence into its text ids (outside audio spans, markers dropped) and
        the codes ``[Q, F]`` of each audio span. A trailing partial frame is dropped."""
        t, _ = _as_tensor(ids)
        t = t.long()
        spans = self.audio_spans(t)
        keep = torch.ones(len(t), dtype=torch.bool)
        audio = []
        for s, e in spans:
            keep[s - 1 : e + 1] = False
            span = t[s:e]
            audio.append(self.decode(span[: len(span) - len(span) % self.num_quantizers]))
        keep &= (t != self.audio_start_id) & (t != self.audio_end_id)
        return t[keep].tolist(), audio


def check_codes(codes, codebook_size: int = MIMI_CODEBOOK_SIZE, where: str = "") -> None:
    """Raises ValueError, naming ``where``, the first bad code and its ``[level, frame]`` (codes
    ``[..., Q, F]``, numpy array or torch tensor), when a code is outside ``0..codebook_size-1``.

    One min/max pass; the position is looked for only on failure."""
    if isinstance(codes, torch.Tensor):
        if not codes.numel():
            return
        lo, hi = (int(x) for x in torch.aminmax(codes.long()))
        if 0 <= lo and hi < codebook_size:
            return
        first = ((codes < 0) | (codes >= codebook_size)).nonzero()[0]
    else:
        codes = np.asarray(codes)
        if not codes.size:
            return
        if 0 <= int(codes.min()) and int(codes.max()) < codebook_size:
            return
        first = np.argwhere((codes < 0) | (codes >= codebook_size))[0]
    pos = tuple(int(i) for i in first)
    at = f"index {pos}"
    if len(pos) >= 2:  # codes [..., Q, F]
        at = "[" + "".join(f"{i}, " for i in pos[:-2]) + f"level {pos[-2]}, frame {pos[-1]}]"
    prefix = f"{where}: " if where else ""
    raise ValueError(
        f"{prefix}code {int(codes[pos])} at {at} is outside the codebook range "
        f"0..{codebook_size - 1}"
    )
