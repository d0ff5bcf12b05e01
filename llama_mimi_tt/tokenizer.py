"""Llama 3 text tokenizer plus the Mimi audio vocabulary, as a torchtune tokenizer component.

Text goes through torchtune's own tokenizers (``Llama3Tokenizer`` for Meta's tiktoken
``tokenizer.model``, ``HuggingFaceBaseTokenizer`` for ``tokenizer.json``); audio codes become ids
by array arithmetic (``MimiVocab``). This class is the one place where sequences are built,
exactly as the released models were trained (so the ids match their checkpoints):

    a2a: <|begin_of_text|> <audio> f1q0 .. f1q(Q-1) f2q0 .. </audio>
    tts: <|begin_of_text|> text tokens <audio> frames .. </audio>

Training data, packing, generation prompts and evaluation all call it.
"""

import os
from importlib import resources
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from torchtune.models.llama3 import Llama3Tokenizer
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

from llama_mimi_tt.errors import MissingFileError
from llama_mimi_tt.vocab import MimiVocab

BUILTIN_BYTE_TOKENIZER = "builtin:byte"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


def byte_tokenizer_path() -> str:
    """A byte-level tiktoken file shipped with the package (256 ranks, no merges).

    With Llama 3's 256 special tokens placed after it, its text vocabulary is 512 ids: the tiny
    demo model uses it so that the embedding stays small. Never used for real models."""
    return str(resources.files("llama_mimi_tt") / "assets" / "byte_bpe.tiktoken")


def llama3_special_tokens() -> List[str]:
    """The 256 special tokens that follow the BPE ranks, named as in the Hugging Face
    Llama 3.1 / 3.2 ``tokenizer.json`` (ids ``num_ranks + i``)."""
    named = {
        0: BOS,
        1: EOS,
        2: "<|reserved_special_token_0|>",
        3: "<|reserved_special_token_1|>",
        4: "<|finetune_right_pad_id|>",
        5: "<|reserved_special_token_2|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    return [named.get(i, f"<|reserved_special_token_{i - 8}|>") for i in range(256)]


def _special_tokens_after(num_ranks: int) -> dict:
    """Llama 3's special tokens placed after ``num_ranks`` BPE ranks (the real file has 128000
    ranks, which gives Llama 3's own ids), plus the two names torchtune's ``Llama3Tokenizer``
    requires beyond them (``<|step_id|>``, ``<|image|>``), at the ids torchtune gives them."""
    tokens = {name: num_ranks + i for i, name in enumerate(llama3_special_tokens())}
    tokens["<|step_id|>"] = num_ranks + 5
    tokens["<|image|>"] = num_ranks + 256
    return tokens


# In a checkpoint directory the first of these that exists is the text tokenizer: a Hugging
# Face tokenizer.json first (its tokenizer_config.json beside it is what the export keeps; a
# released Llama-Mimi one already holds the audio tokens, whose layout is then checked).
TEXT_TOKENIZER_FILES = ("tokenizer.json", "original/tokenizer.model", "tokenizer.model")


def find_text_tokenizer(path: str) -> Path:
    """The text tokenizer file of ``path``: the file itself, the first of ``TEXT_TOKENIZER_FILES``
    in a checkpoint directory, or the built-in byte tokenizer for ``builtin:byte``. Used by
    the tokenizer and by the Hugging Face export, so both read the same file."""
    if path == BUILTIN_BYTE_TOKENIZER:
        return Path(byte_tokenizer_path())
    p = Path(path)
    if p.is_dir():
        for name in TEXT_TOKENIZER_FILES:
            if (p / name).is_file():
                return p / name
        raise MissingFileError(
            f"no tokenizer in {p}: expected {', '.join(TEXT_TOKENIZER_FILES[:-1])} or "
            f"{TEXT_TOKENIZER_FILES[-1]} (they come with the Llama 3 checkpoints on the Hugging Face "
            "hub; download the whole repository, e.g. `tune download meta-llama/Llama-3.2-1B "
            "--output-dir ...`)"
        )
    if not p.is_file():
        raise MissingFileError(
            f"tokenizer file {p} does not exist. Give Meta's tokenizer.model, a "
            "tokenizer.json, the checkpoint directory, or builtin:byte for the tiny demo."
        )
    return p


class LlamaMimiTokenizer:
    """Text tokenizer (torchtune) + Mimi audio ids (``MimiVocab``).

    Args:
        path (str): Meta's ``tokenizer.model`` (tiktoken), a ``tokenizer.json``, a checkpoint
            directory holding either (see :func:`find_text_tokenizer`), or ``builtin:byte``
            for the tiny byte-level tokenizer of the demo and tests.
        num_quantizers (int): Q, Mimi levels per frame.
        text_vocab_size (Optional[int]): T. Derived from the tokenizer file when not given;
            when given it must agree with the file.
        max_seq_len (Optional[int]): sequences are cut to this many tokens on frame boundaries.
    """

    def __init__(
        self,
        path: str,
        num_quantizers: int = 4,
        text_vocab_size: Optional[int] = None,
        max_seq_len: Optional[int] = None,
    ):
        self.path = path
        self.max_seq_len = max_seq_len
        file = self._find_file(path)
        if file.suffix == ".json":
            self.text = self._load_hf(file)
            t = self._hf_text_vocab_size(self.text.tokenizer)
            self.pad_id = self.text.tokenizer.token_to_id("<|finetune_right_pad_id|>")
            if self.pad_id is None:
                self.pad_id = self.text.eos_id
        else:
            from tiktoken.load import load_tiktoken_bpe

            num_ranks = len(load_tiktoken_bpe(str(file)))
            self.text = Llama3Tokenizer(str(file), special_tokens=_special_tokens_after(num_ranks))
            t = num_ranks + 256
            self.pad_id = self.text.pad_id
        if text_vocab_size is not None and text_vocab_size != t:
            raise ValueError(
                f"text_vocab_size={text_vocab_size} in the config, but the tokenizer {file} has "
                f"{t} text ids. Set text_vocab_size to {t} (or leave it out)."
            )
        self.vocab = MimiVocab(text_vocab_size=t, num_quantizers=num_quantizers)
        self.bos_id = self.text.bos_id
        self.eos_id = self.text.eos_id
        self.special_tokens = getattr(self.text, "special_tokens", {})

    # ---- loading ------------------------------------------------------------------------
    @staticmethod
    def _find_file(path: str) -> Path:
        return find_text_tokenizer(path)

    @staticmethod
    def _load_hf(file: Path) -> HuggingFaceBaseTokenizer:
        d = file.parent
        cfg = d / "tokenizer_config.json"
        gen = d / "generation_config.json"
        if not cfg.is_file() and not gen.is_file():
            raise MissingFileError(
                f"{file} needs tokenizer_config.json or generation_config.json beside it "
                "(to know the BOS and EOS tokens)"
            )
        return HuggingFaceBaseTokenizer(
            str(file),
            tokenizer_config_json_path=str(cfg) if cfg.is_file() else None,
            generation_config_path=str(gen) if gen.is_file() else None,
        )

    @staticmethod
    def _hf_text_vocab_size(tok) -> int:
        """T of a tokenizer.json: its size, less the audio tokens if it already has them (a
        released Llama-Mimi tokenizer), checked to sit where our layout puts them."""
        first_audio = tok.token_to_id("<0_0>")
        if first_audio is None:
            return tok.get_vocab_size(with_added_tokens=True)
        return first_audio

    # ---- text ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> List[int]:
        return self.text.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: List[int]) -> str:
        """Text of the text ids in ``ids`` (audio ids and markers are left out)."""
        ids = [int(i) for i in ids if int(i) < self.vocab.text_vocab_size]
        return self.text.decode(ids)

    # ---- sequences ----------------------------------------------------------------------
    def text_ids(self, text: str) -> List[int]:
        """Ids of a text prompt, without BOS or EOS (what goes between BOS and ``<audio>``)."""
        return self.encode(text, add_bos=False, add_eos=False)

    def sequence(self, codes, text_ids: Sequence[int] = (), close: bool = True) -> List[int]:
        """``<bos> text_ids <audio> frames [</audio>]`` for codes ``[Q, F]`` (numpy or torch,
        Q = num_quantizers; F may be 0). ``close=False`` leaves the audio open (it goes on: a
        generation prompt, or an utterance continued in the next sample)."""
        v = self.vocab
        ids = [self.bos_id, *text_ids, v.audio_start_id] + v.encode(codes).tolist()
        if close:
            ids.append(v.audio_end_id)
        return ids

    def header_ids(self) -> List[int]:
        """``<bos> <audio>``: how an audio-only sequence begins, and how the rest of an
        utterance begins again in the next pack when packing cuts it on a frame boundary."""
        return [self.bos_id, self.vocab.audio_start_id]

    def prompt_ids(self, codes=None, text: Optional[str] = None) -> torch.Tensor:
        """A generation prompt ``<bos> [text] <audio> [frames]`` (open audio, never cut), for
        codes ``[Q', F]`` with Q' >= Q (the first Q levels are used; None: no frames)."""
        q = self.vocab.num_quantizers
        codes = torch.zeros(q, 0, dtype=torch.long) if codes is None else torch.as_tensor(codes)
        text_ids = [] if text is None else self.text_ids(text)
        return torch.tensor(self.sequence(codes[:q], text_ids, close=False))

    def tokenize(self, codes, text: Optional[str] = None) -> Tuple[List[int], int]:
        """The a2a (``text is None``) or tts sequence of one utterance.

        Returns ``(ids, audio_start)`` where ``ids[audio_start]`` is ``<audio>``. With
        ``max_seq_len`` set, the audio is cut on a frame boundary so the sequence fits (the
        closing ``</audio>`` is then left out, as the utterance continues).
        """
        codes = torch.as_tensor(codes)
        q, n_frames = codes.shape
        if q < self.vocab.num_quantizers:
            raise ValueError(
                f"codes have {q} levels but the tokenizer is set up for num_quantizers="
                f"{self.vocab.num_quantizers}"
            )
        codes = codes[: self.vocab.num_quantizers]
        text_ids = []
        if text is not None:
            if not text.strip():
                raise ValueError("empty text for a tts sequence")
            text_ids = self.text_ids(text)
        audio_start = 1 + len(text_ids)
        ids = self.sequence(codes, text_ids)
        if self.max_seq_len is not None and len(ids) > self.max_seq_len:
            room = self.max_seq_len - audio_start - 1
            frames = room // self.vocab.num_quantizers
            if frames < 1:
                raise ValueError(
                    f"max_seq_len={self.max_seq_len} leaves no room for one frame of "
                    f"{self.vocab.num_quantizers} tokens after {audio_start} text tokens"
                )
            ids = ids[: audio_start + 1 + frames * self.vocab.num_quantizers]
        return ids, audio_start

    def continuation_ids(
        self, prompt_codes, continuation_codes=None, text: Optional[str] = None
    ) -> Tuple[List[int], int]:
        """``<bos> [text] <audio> prompt frames continuation frames`` (no ``</audio>``: the audio
        goes on), and the index of the first continuation id. With ``max_seq_len`` set, the
        continuation is cut on a frame boundary to fit."""
        q = self.vocab.num_quantizers
        prompt = torch.as_tensor(prompt_codes)[:q]
        ids, _ = self.tokenize(prompt, text)
        if ids[-1] == self.vocab.audio_end_id:
            ids = ids[:-1]
        start = len(ids)
        if continuation_codes is not None:
            cont = self.vocab.encode(torch.as_tensor(continuation_codes)[:q]).tolist()
            if self.max_seq_len is not None:
                room = (self.max_seq_len - start) // q * q
                if room < q:
                    raise ValueError(
                        f"max_seq_len={self.max_seq_len} leaves no room for a continuation "
                        f"after a prompt of {start} tokens: raise max_seq_len or cut the prompt"
                    )
                cont = cont[:room]
            ids = ids + cont
        return ids, start

    def split(self, ids) -> Tuple[str, List[torch.Tensor]]:
        """A generated sequence back to ``(text, [codes [Q, F] of each audio span])``."""
        text_ids, audio = self.vocab.split(ids)
        return self.decode(text_ids), audio

    # ---- torchtune Transform: sample dict -> tokens and labels --------------------------
    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """``{"codes": [Q, F], "text": optional}`` -> adds ``tokens`` and ``mask`` (True where
        no loss belongs: BOS and the text prompt)."""
        ids, audio_start = self.tokenize(sample["codes"], sample.get("text"))
        sample = dict(sample)
        sample["tokens"] = ids
        sample["mask"] = [True] * audio_start + [False] * (len(ids) - audio_start)
        return sample

    def tokenize_messages(self, messages, **kwargs):
        raise NotImplementedError(
            "Llama-Mimi sequences are audio (and optional text), not chat messages: use "
            "llama_mimi_tt.audio_token_dataset"
        )


def llama_mimi_tokenizer(
    path: str,
    num_quantizers: int = 4,
    text_vocab_size: Optional[int] = None,
    max_seq_len: Optional[int] = None,
) -> LlamaMimiTokenizer:
    """Builder for YAML configs (``_component_: llama_mimi_tt.llama_mimi_tokenizer``)."""
    return LlamaMimiTokenizer(
        path=os.path.expanduser(path) if path != BUILTIN_BYTE_TOKENIZER else path,
        num_quantizers=num_quantizers,
        text_vocab_size=text_vocab_size,
        max_seq_len=max_seq_len,
    )
