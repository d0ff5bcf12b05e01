"""The Mimi neural audio codec (Kyutai), as Llama-Mimi uses it.

Mimi turns 24 kHz audio into 12.5 frames per second; each frame is a stack of Q residual
vector quantizer (RVQ) codes from 2048-entry codebooks, level 0 "semantic" (distilled from
WavLM) and levels 1.. "acoustic". :class:`MimiCodec` wraps moshi's ``MimiModel`` with the
small API the package needs: ``encode`` any waveform to codes ``[Q, F]`` with
``F = ceil(seconds * 12.5)``, ``decode`` codes back to 24 kHz audio, a batched encoder that
gives every item exactly the codes it gets alone, and a frame-by-frame streaming decoder.

Weights come from a local file in moshi's format (``tokenizer-e351c8d8-checkpoint125.safetensors``
from the Hugging Face repo ``kyutai/moshiko-pytorch-bf16``) or in the ``transformers`` format of
``kyutai/mimi`` (``model.safetensors`` + ``config.json``, converted on load). Nothing is
downloaded unless the argument is a hub id that does not exist as a local path.

:meth:`MimiCodec.random` builds an untrained Mimi whose codebooks are fitted to its own latents,
so that tests and the demo see diverse codes without any weights.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from moshi.models import loaders
from moshi.models.compression import MimiModel
from safetensors.torch import load_file, save_file

from llama_mimi_tt.audio import load_audio, prepare_waveform, synthetic_audio
from llama_mimi_tt.errors import MissingFileError, UserError
from llama_mimi_tt.vocab import (
    MAX_QUANTIZERS,
    MIMI_CODEBOOK_SIZE,
    MIMI_FRAME_RATE,
    MIMI_SAMPLE_RATE,
    MimiVocab,
    check_codes,
)

__all__ = [
    "MimiCodec",
    "MimiStreamingDecoder",
    "mimi_codec",
    "num_frames",
    "MIMI_NAME",
    "MIMI_REPO",
]

MIMI_NAME = loaders.MIMI_NAME  # tokenizer-e351c8d8-checkpoint125.safetensors
MIMI_REPO = loaders.DEFAULT_REPO  # kyutai/moshiko-pytorch-bf16

_GET_WEIGHTS = (
    f"Get Mimi's weights with `huggingface-cli download {MIMI_REPO} {MIMI_NAME}` "
    "(or pass the hub id of that repo, or of kyutai/mimi, when online)."
)


def num_frames(num_samples: int, sample_rate: int, frame_rate: float = MIMI_FRAME_RATE) -> int:
    """Mimi frames for ``num_samples`` at ``sample_rate``: exactly ``ceil(seconds * frame_rate)``."""
    rate = Fraction(frame_rate).limit_denominator(1000) / int(sample_rate)  # rational: no rounding
    return -(-int(num_samples) * rate.numerator // rate.denominator)


class MimiCodec:
    """Mimi encode/decode on top of moshi's ``MimiModel``.

    Build it with :meth:`from_pretrained` (real weights) or :meth:`random` (tests, demo).

    Attributes:
        model: the moshi ``MimiModel`` (in eval mode, ``num_quantizers`` levels active).
        num_quantizers: Q, the RVQ levels produced by ``encode`` and expected by ``decode``.
        sample_rate: 24000 Hz. frame_rate: 12.5 Hz. frame_size: 1920 samples per frame.
        codebook_size: 2048. device, dtype: where and in which precision the model runs.
    """

    pad_frames: int = 25
    """Inputs are zero-padded to a multiple of this many frames (2 s) before encoding, so that
    an item has the same tensor shape alone and in a batch (see :meth:`encode_batch`)."""

    def __init__(
        self,
        model: MimiModel,
        num_quantizers: int = 4,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        _check_num_quantizers(num_quantizers, model.total_codebooks)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.model.set_num_codebooks(num_quantizers)
        self.num_quantizers = num_quantizers
        self.sample_rate = int(model.sample_rate)
        self.frame_rate = float(model.frame_rate)
        self.frame_size = int(model.frame_size)
        self.codebook_size = int(model.cardinality)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        num_quantizers: int = 4,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> MimiCodec:
        """Load Mimi from a local weights file or directory, or from a hub id.

        Args:
            path_or_hub_id: a moshi-format safetensors file
                (``tokenizer-e351c8d8-checkpoint125.safetensors``), a ``transformers``
                ``kyutai/mimi`` checkpoint (``model.safetensors``, with ``config.json`` beside it),
                a directory holding either, or, only when no such local path exists, a Hugging
                Face hub id (``kyutai/moshiko-pytorch-bf16`` or ``kyutai/mimi``).
            num_quantizers: Q in 1..32.
            device, dtype: where and in which precision to run the model. Keep float32 to
                build a code cache: lower precision moves latents across codebook borders
                and changes some codes.

        Raises:
            FileNotFoundError: the local file is missing (the message says where to get it).
            ValueError: bad ``num_quantizers`` or a file that is not a Mimi checkpoint.
        """
        _check_num_quantizers(num_quantizers, MAX_QUANTIZERS)
        path = _resolve_weights(path_or_hub_id)  # fails fast on a missing file
        model = loaders.get_mimi(None, device="cpu", num_codebooks=MAX_QUANTIZERS)
        state = _read_state_dict(path, set(model.state_dict()))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{path_or_hub_id}: not a Mimi checkpoint ({e})") from e
        return cls(model, num_quantizers=num_quantizers, device=device, dtype=dtype)

    @classmethod
    def random(
        cls,
        num_quantizers: int = 4,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        fit_seconds: float = 20.0,
    ) -> MimiCodec:
        """An untrained Mimi (seeded) with codebooks fitted to its own latents.

        For tests and the demo: there are no real weights, but the codes are diverse and
        deterministic for a ``seed``. moshi's Mimi built without weights has empty codebooks
        (every frame encodes to code 0). moshi's own remedy, k-means on the first training
        batch, needs more frames than the 2048 entries (> 160 s of audio through the encoder)
        and starves the later levels (one k-means per batch; with fewer frames than entries
        the residuals it leaves are exactly 0, so levels 2.. collapse to a single code).
        Instead, the latents of ``fit_seconds`` of varied synthetic audio (tones, chirps,
        buzzes, noise bursts at several levels) are used as a kernel density estimate: each
        codebook entry is a latent frame plus Gaussian jitter with the latents' own
        covariance at 0.1 x their spread, level by level on the residuals. All 32 levels are
        fitted, so a saved model serves any Q. About 3 s on 2 CPU cores.
        """
        _check_num_quantizers(num_quantizers, MAX_QUANTIZERS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = loaders.get_mimi(None, device="cpu", num_codebooks=MAX_QUANTIZERS)
        num_items = 4
        wave = synthetic_audio(fit_seconds / num_items, model.sample_rate, seed, num_items)
        with torch.inference_mode():
            latents = model.encode_to_latent(wave[:, None], quantize=False)
        _fit_codebooks(model, latents, torch.Generator().manual_seed(seed))
        return cls(model, num_quantizers=num_quantizers, device=device, dtype=dtype)

    def save_moshi(self, path: str | Path) -> Path:
        """Write the weights as a moshi-format safetensors file (float32) that
        :meth:`from_pretrained` (and moshi's ``get_mimi``) reload exactly."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in self.model.state_dict().items()
        }
        save_file(state, str(path))
        return path

    # ------------------------------------------------------------------ encode

    def encode(
        self, waveform: torch.Tensor | np.ndarray, sample_rate: int, name: str = "waveform"
    ) -> torch.Tensor:
        """Encode one waveform to codes.

        Args:
            waveform: float ``[samples]`` or ``[channels, samples]`` (mixed down to mono).
            sample_rate: its sample rate (resampled to 24 kHz).
            name: how error messages call this input.

        Returns:
            int64 CPU tensor ``[Q, ceil(seconds * 12.5)]``.
        """
        return self.encode_batch([waveform], sample_rate, batch_size=1, names=[name])[0]

    def encode_file(self, path: str | Path) -> torch.Tensor:
        """Read an audio file (any rate, any channels) and encode it to codes ``[Q, F]``."""
        wave = load_audio(path, self.sample_rate)
        return self.encode(wave, self.sample_rate, name=str(path))

    def encode_batch(
        self,
        waveforms: Sequence[torch.Tensor | np.ndarray],
        sample_rate: int,
        batch_size: int = 8,
        names: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        """Encode waveforms of unequal lengths, ``batch_size`` at a time, each item exactly as
        :meth:`encode` encodes it alone.

        Mimi is causal (left-padded convolutions, causal attention), so zeros after an item
        never change its frames in exact arithmetic. In float arithmetic they can: CPU kernels
        pick their blocking by sequence length, so the same frame computed inside a longer
        tensor may differ in the last bit and flip a near-tie code (measured: ~6 codes in
        10^4 when items were simply padded to the longest of their batch). So every item,
        alone or batched, is zero-padded to the same canonical length, its frame count
        rounded up to a multiple of :attr:`pad_frames`, and batches only group items of equal
        padded length; the encoder's results do not depend on the batch size, and the RVQ runs
        per item (see :meth:`_encode_padded`). Codes are cropped back to each item's own
        ``ceil(seconds * 12.5)`` frames.

        Returns:
            one int64 CPU tensor ``[Q, F_i]`` per input, in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = (
            list(names) if names is not None else [f"waveform {i}" for i in range(len(waveforms))]
        )
        if len(names) != len(waveforms):
            raise ValueError(f"got {len(names)} names for {len(waveforms)} waveforms")
        _refuse_if_streaming(self.model)
        waves, frames = [], []
        for wave, name in zip(waveforms, names):
            waves.append(prepare_waveform(wave, sample_rate, self.sample_rate, name=name))
            # F = ceil(seconds * 12.5) from the input's own length, whatever the resampler gives.
            frames.append(num_frames(np.shape(wave)[-1], int(sample_rate), self.frame_rate))
        padded = [-(-f // self.pad_frames) * self.pad_frames for f in frames]
        order = sorted(range(len(waves)), key=lambda i: (padded[i], i))
        out: list[torch.Tensor | None] = [None] * len(waves)
        for _, same_length in itertools.groupby(order, key=lambda i: padded[i]):
            same_length = list(same_length)
            for start in range(0, len(same_length), batch_size):
                idx = same_length[start : start + batch_size]
                length = padded[idx[0]] * self.frame_size
                batch = torch.stack(
                    [_fit_length(waves[i], frames[i] * self.frame_size, length) for i in idx]
                )
                codes = self._encode_padded(batch)
                for row, i in enumerate(idx):
                    out[i] = codes[row, :, : frames[i]].clone()
        return out  # type: ignore[return-value]

    def _encode_padded(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, samples] at 24 kHz, samples a multiple of frame_size -> int64 CPU [B, Q, F].

        The encoder runs on the whole batch; the RVQ runs item by item, because its distance
        matrix is a matrix product over all B * F rows, whose rounding depends on the row
        count (measured: 1 code in ~10^4 flips between B = 1 and B = 3).
        """
        with torch.inference_mode():
            x = batch.to(device=self.device, dtype=self.dtype)[:, None]
            latents = self.model.encode_to_latent(x, quantize=False)
            codes = torch.cat([self.model.quantizer.encode(z[None]) for z in latents])
        return codes.to("cpu", torch.int64)

    # ------------------------------------------------------------------ decode

    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Decode codes ``[Q, F]`` (Q == ``num_quantizers``) to float32 CPU audio ``[1, F * 1920]``
        at 24 kHz.

        Raises:
            ValueError: wrong shape, wrong Q, non-integer codes or a code outside 0..2047
                (the message names the first bad ``[level, frame]``).
        """
        codes = self.check_codes(codes)
        _refuse_if_streaming(self.model)
        if codes.shape[1] == 0:
            return torch.zeros(1, 0)
        with torch.inference_mode():
            wave = self.model.decode(codes.to(self.device)[None])
        return wave[0].to("cpu", torch.float32)

    def check_codes(self, codes: torch.Tensor | np.ndarray, name: str = "codes") -> torch.Tensor:
        """Validate codes ``[Q, F]`` for this codec and return them as an int64 tensor."""
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise UserError(f"{name}: expected integer codes, got {codes.dtype}")
        if codes.dim() != 2:
            raise UserError(f"{name}: expected shape [Q, F], got {tuple(codes.shape)}")
        if codes.shape[0] != self.num_quantizers:
            raise UserError(
                f"{name}: expected Q == num_quantizers == {self.num_quantizers} levels, "
                f"got {codes.shape[0]} (shape {tuple(codes.shape)})"
            )
        codes = codes.to(torch.int64)
        try:
            check_codes(codes, self.codebook_size, where=name)
        except ValueError as e:
            raise UserError(str(e)) from None
        return codes

    def streaming_decoder(self, batch_size: int = 1) -> MimiStreamingDecoder:
        """A frame-by-frame decoder (moshi's streaming mode), for generation::

            with codec.streaming_decoder() as decoder:
                for frame in frames:  # codes [Q, 1] (or [Q, k])
                    chunk = decoder.decode_frame(frame)  # float32 [1, k * 1920]

        With ``batch_size=B`` it decodes B streams side by side: codes ``[B, Q, k]`` ->
        audio ``[B, 1, k * 1920]``.

        Only one streaming decoder per codec at a time; ``encode``/``decode`` refuse to run
        while it is open (moshi keeps the streaming state in the model).
        """
        return MimiStreamingDecoder(self, batch_size)

    def __repr__(self) -> str:
        return (
            f"MimiCodec(num_quantizers={self.num_quantizers}, sample_rate={self.sample_rate}, "
            f"frame_rate={self.frame_rate}, device={self.device}, dtype={self.dtype})"
        )


class MimiStreamingDecoder:
    """Decode codes a frame at a time with moshi's streaming state (a context manager).

    The concatenated chunks equal :meth:`MimiCodec.decode` of all frames at once up to float
    noise: max abs difference 6e-8 (peak 0.17) measured on CPU over 100 frames, 1 and 5
    frames per call; tests/test_codec.py asserts < 1e-5. Each call costs about one frame of
    decoder compute (~90 ms per 80 ms frame on one loaded CPU core).
    """

    def __init__(self, codec: MimiCodec, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.codec = codec
        self.batch_size = batch_size
        self._stack = None

    def __enter__(self) -> MimiStreamingDecoder:
        _refuse_if_streaming(self.codec.model)
        self._stack = self.codec.model.streaming(batch_size=self.batch_size)
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def decode_frame(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """codes ``[Q, k]`` (k >= 1 new frames) -> float32 CPU audio ``[1, k * 1920]``; with
        ``batch_size=B``: codes ``[B, Q, k]`` -> audio ``[B, 1, k * 1920]``."""
        if self._stack is None:
            raise RuntimeError("MimiStreamingDecoder: use it inside a `with` block")
        codes = torch.as_tensor(codes)
        batched = codes.dim() == 3
        if not batched:
            codes = codes[None]
        if codes.shape[0] != self.batch_size:
            raise ValueError(
                f"codes for {codes.shape[0]} streams, but this decoder has batch_size="
                f"{self.batch_size} (codes are [Q, k], or [B, Q, k] when batched)"
            )
        codes = torch.stack([self.codec.check_codes(c) for c in codes]).to(self.codec.device)
        chunks = [torch.zeros(self.batch_size, 1, 0)]
        with torch.inference_mode():
            # One frame per step: on CUDA, moshi replays a CUDA graph captured for one shape.
            for frame in codes.split(1, dim=-1):
                chunks.append(self.codec.model.decode(frame).to("cpu", torch.float32))
        wave = torch.cat(chunks, dim=-1)
        return wave if batched else wave[0]

    def decode_frame_ids(self, frame_ids: torch.Tensor, vocab: MimiVocab) -> torch.Tensor:
        """One generated frame per stream, ids ``[B, Q]`` (as ``generate``'s ``on_frame`` gives
        them) -> audio ``[B, 1, 1920]``. A row that has stopped holds ``</audio>`` instead of
        codes: it is fed code 0 of every level, so that the batch stays in step; its audio
        means nothing and the caller drops it."""
        ids = frame_ids.cpu()
        code_zero = vocab.code_ids(0, torch.arange(ids.shape[-1]))
        ids = torch.where(vocab.is_audio(ids), ids, code_zero)
        return self.decode_frame(vocab.decode(ids))  # codes [B, Q, 1]

    def reset(self) -> None:
        """Forget the past frames (start a new utterance)."""
        self.codec.model.reset_streaming()


def mimi_codec(
    path: str | None = None,
    num_quantizers: int = 8,
    device: str = "cpu",
    seed: int = 0,
) -> MimiCodec:
    """Builder for YAML configs (``_component_: llama_mimi_tt.mimi_codec``).

    Args:
        path (str | None): Mimi weights in the moshi format
            (``tokenizer-e351c8d8-checkpoint125.safetensors``) or the Hugging Face format
            (see ``MimiCodec.from_pretrained``), or ``random`` for ``MimiCodec.random``, an
            untrained codec with diverse codes for tests and the demo.
        num_quantizers (int): Mimi levels to keep per frame (a cache made with Q levels serves
            any later run with Q or fewer).
        device (str): ``cpu``, ``cuda`` (under torchrun: ``cuda:$LOCAL_RANK``), ``cuda:1`` ...
        seed (int): seed of the random codec (ignored otherwise).

    Raises:
        UserError: ``path`` not given.
        MissingFileError: the weights file does not exist (the message says how to get it).
    """
    device = str(device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if path is None or str(path).strip() == "":
        raise UserError(
            f"codec.path is not set: give Mimi's weights ({MIMI_NAME}, from "
            f"`huggingface-cli download {MIMI_REPO} {MIMI_NAME}`), or codec.path=random for an "
            "untrained codec (tests and the demo only: its codes mean nothing)"
        )
    if str(path) == "random":
        return MimiCodec.random(num_quantizers=num_quantizers, seed=seed, device=device)
    return MimiCodec.from_pretrained(
        os.path.expanduser(str(path)), num_quantizers=num_quantizers, device=device
    )


# ---------------------------------------------------------------------- helpers


def _check_num_quantizers(num_quantizers: int, max_quantizers: int) -> None:
    if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int):
        raise ValueError(
            f"num_quantizers must be an int in 1..{max_quantizers}, got {num_quantizers!r}"
        )
    if not 1 <= num_quantizers <= max_quantizers:
        raise ValueError(
            f"num_quantizers={num_quantizers} is out of range: Mimi has {max_quantizers} "
            f"quantizer levels, so num_quantizers must be in 1..{max_quantizers}"
        )


def _refuse_if_streaming(model: MimiModel) -> None:
    if model.is_streaming:
        raise RuntimeError(
            "MimiCodec: the model is in streaming mode; close the streaming_decoder() "
            "before calling encode/decode"
        )


def _fit_length(wave: torch.Tensor, length: int, padded: int) -> torch.Tensor:
    """Crop or zero-pad ``wave`` to ``length`` samples, then zero-pad it to ``padded``."""
    wave = wave[:length]
    return F.pad(wave, (0, padded - wave.shape[-1]))


def _fit_codebooks(
    model: MimiModel, latents: torch.Tensor, generator: torch.Generator, spread: float = 0.1
) -> None:
    """Fill every RVQ codebook of ``model`` from a kernel density estimate of its latents.

    ``latents`` [B, D, T] are the encoder's outputs. For each quantizer (semantic, acoustic)
    and each level, the codebook entries are random latent (residual) frames plus Gaussian
    jitter with the frames' own covariance times ``spread``; the residual left by the nearest
    entry feeds the next level. Each level is loaded through its state dict, as a checkpoint
    would be (entries as ``embedding_sum``, usage 1, marked initialized), so ``save_moshi``
    keeps them. ``model`` must be fresh: moshi caches the entries on first use.
    """
    with torch.inference_mode():
        for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
            residual = rvq.input_proj(latents).transpose(1, 2).reshape(-1, rvq.dimension)
            residual = residual.double()
            for layer in rvq.vq.layers:
                n, size = residual.shape[0], layer.codebook_size
                pick = torch.randint(0, n, (size,), generator=generator)
                mix = torch.randn(size, n, generator=generator, dtype=torch.float64)
                jitter = mix @ (residual - residual.mean(0)) / math.sqrt(max(n - 1, 1))
                entries = residual[pick] + spread * jitter
                layer.load_state_dict(
                    {
                        key: _fitted_buffer(key, value, entries)
                        for key, value in layer.state_dict().items()
                    }
                )
                nearest = torch.cdist(residual, entries).argmin(-1)
                residual = residual - entries[nearest]


def _fitted_buffer(key: str, value: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """A codebook buffer of moshi's checkpoint format, filled with fitted ``entries``."""
    if key.endswith("embedding_sum"):
        return entries.to(value.dtype)
    if key.endswith(("cluster_usage", "initialized")):
        return torch.ones_like(value)
    return value


# ---------------------------------------------------------------------- checkpoint formats


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.endswith(
        (".safetensors", ".sft", ".pt", ".pth", ".bin")
    )


def _resolve_weights(path_or_hub_id: str | Path) -> Path:
    """The local weights file for a path, a directory or (only if no such path exists) a hub id."""
    path = Path(path_or_hub_id)
    if not path.exists():
        name = str(path_or_hub_id)
        if isinstance(path_or_hub_id, Path) or not _looks_like_hub_id(name):
            raise MissingFileError(f"Mimi weights file not found: {path}. {_GET_WEIGHTS}")
        path = _download(name)
    if path.is_dir():
        if (path / MIMI_NAME).is_file():
            path = path / MIMI_NAME
        elif (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            raise MissingFileError(
                f"no Mimi weights in directory {path}: expected {MIMI_NAME} (moshi format) or "
                f"model.safetensors + config.json (kyutai/mimi format). {_GET_WEIGHTS}"
            )
    return path


def _read_state_dict(path: Path, moshi_keys: set[str]) -> dict[str, torch.Tensor]:
    """Read a Mimi checkpoint (moshi or transformers format) as a moshi state dict."""
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise UserError(f"{path}: cannot read as a safetensors file ({e})") from e
    if any(k.startswith("encoder.model.") for k in state):
        return state
    if any(k.startswith(("encoder.layers.", "model.encoder.layers.")) for k in state):
        return _convert_hf_state_dict(state, path, moshi_keys)
    raise UserError(f"{path}: not a Mimi checkpoint (neither moshi's nor transformers' key names)")


def _download(hub_id: str) -> Path:
    """Fetch Mimi weights for a hub id (only called when the user passed one)."""
    from huggingface_hub import hf_hub_download

    errors = []
    for filenames in ([MIMI_NAME], ["model.safetensors", "config.json"]):
        try:
            paths = [Path(hf_hub_download(hub_id, f)) for f in filenames]
            return paths[0]
        except Exception as e:  # offline, missing repo or file
            errors.append(f"{'+'.join(filenames)}: {type(e).__name__}: {e}")
    raise MissingFileError(
        f"Mimi weights: {hub_id!r} is not a local path and could not be fetched from the "
        f"Hugging Face hub ({'; '.join(errors)}). {_GET_WEIGHTS}"
    )


def _convert_hf_state_dict(
    state: dict[str, torch.Tensor], path: Path, moshi_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Convert a ``transformers`` MimiModel state dict (kyutai/mimi) to moshi's key names."""
    config_path = path.parent / "config.json"
    num_heads = 8
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        expected = {
            "hidden_size": 512,
            "codebook_size": MIMI_CODEBOOK_SIZE,
            "num_quantizers": MAX_QUANTIZERS,
            "num_semantic_quantizers": 1,
            "sampling_rate": MIMI_SAMPLE_RATE,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "upsampling_ratios": [8, 6, 5, 4],
        }
        for key, value in expected.items():
            if key in config and config[key] != value:
                raise ValueError(
                    f"{config_path}: {key}={config[key]!r}, but only the standard Mimi "
                    f"architecture ({key}={value!r}) is supported"
                )
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        m = re.fullmatch(r"(encoder|decoder)\.layers\.(.+)\.conv\.(weight|bias)", key)
        if m:
            stem, rest, kind = m.groups()
            for new in (
                f"{stem}.model.{rest}.conv.conv.{kind}",
                f"{stem}.model.{rest}.convtr.convtr.{kind}",
            ):
                if new in moshi_keys:
                    out[new] = value
                    break
            else:
                raise ValueError(f"{path}: unexpected key {key!r}")
            continue
        m = re.fullmatch(r"(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)", key)
        if m:
            stem, layer, rest = m.groups()
            prefix = f"{stem}_transformer.transformer.layers.{layer}."
            qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.weight", rest)
            if qkv:
                pending_qkv.setdefault(prefix, {})[qkv.group(1)] = value
                continue
            names = {
                "self_attn.o_proj.weight": "self_attn.out_projs.0.weight",
                "mlp.fc1.weight": "linear1.weight",
                "mlp.fc2.weight": "linear2.weight",
                "input_layernorm.weight": "norm1.weight",
                "input_layernorm.bias": "norm1.bias",
                "post_attention_layernorm.weight": "norm2.weight",
                "post_attention_layernorm.bias": "norm2.bias",
                "self_attn_layer_scale.scale": "layer_scale_1.scale",
                "mlp_layer_scale.scale": "layer_scale_2.scale",
            }
            if rest not in names:
                raise ValueError(f"{path}: unexpected key {key!r}")
            out[prefix + names[rest]] = value
            continue
        m = re.fullmatch(r"quantizer\.(semantic|acoustic)_residual_vector_quantizer\.(.+)", key)
        if m:
            which, rest = m.groups()
            rvq = "rvq_first" if which == "semantic" else "rvq_rest"
            rest = re.sub(r"^layers\.(\d+)\.codebook\.", r"vq.layers.\1._codebook.", rest)
            rest = rest.replace("._codebook.initialized", "._codebook._initialized")
            rest = rest.replace("._codebook.embed_sum", "._codebook.embedding_sum")
            out[f"quantizer.{rvq}.{rest}"] = value
            continue
        simple = {
            "downsample.conv.weight": "downsample.conv.conv.conv.weight",
            "upsample.conv.weight": "upsample.convtr.convtr.convtr.weight",
        }
        if key in simple:
            out[simple[key]] = value
            continue
        raise ValueError(f"{path}: unexpected key {key!r}")
    for prefix, parts in pending_qkv.items():
        q, k = (_unpermute_rope(parts[n], num_heads) for n in "qk")
        out[prefix + "self_attn.in_projs.0.weight"] = torch.cat([q, k, parts["v"]])
    # transformers keeps some buffers moshi does not have, and vice versa (none persistent).
    missing = sorted(moshi_keys - set(out))
    if missing:
        raise ValueError(f"{path}: converted checkpoint misses {missing[:5]} ...")
    return out


def _unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo transformers' q/k row permutation (rotate-half RoPE) back to moshi's interleaved
    RoPE layout."""
    dim_out, dim_in = weight.shape
    return (
        weight.view(num_heads, 2, dim_out // num_heads // 2, dim_in)
        .transpose(1, 2)
        .reshape(dim_out, dim_in)
    )
