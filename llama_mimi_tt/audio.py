"""Reading, checking, resampling and writing audio.

Every waveform that reaches the Mimi codec goes through :func:`prepare_waveform`: it must be
floating point, non-empty and finite; several channels are mixed down to mono by their mean;
any sample rate is resampled to the codec's rate with soxr (high quality). Audio whose peak
is above ``MAX_PEAK`` = 2.0 (float files can hold anything, e.g. +-50; a peak a little over 1.0
is common and harmless) is normalised: scaled so that its peak is 1.0, with a logged warning
(clipping would destroy it; Mimi was trained on [-1, 1]). Errors
name the file or the input so that a corpus job can log why it skipped it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf
import soxr
import torch

from llama_mimi_tt.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

MAX_PEAK = 2.0  # louder float audio is normalised to peak 1.0

__all__ = ["load_audio", "prepare_waveform", "save_audio", "synthetic_audio"]


def prepare_waveform(
    wave: torch.Tensor | np.ndarray,
    sample_rate: int,
    target_sample_rate: int = 24000,
    name: str = "waveform",
    report: Optional[dict] = None,
) -> torch.Tensor:
    """Check a waveform, mix it down to mono, normalise a peak above ``MAX_PEAK``, resample.

    Args:
        wave: float samples, ``[samples]`` or ``[channels, samples]`` (tensor or numpy array).
        sample_rate: the sample rate of ``wave`` in Hz.
        target_sample_rate: the sample rate to return, in Hz.
        name: how error messages call this input (a file path, a dataset row id, ...).
        report: if given, ``report["peak"]`` is set to the original peak when the audio was
            normalised (its peak was above ``MAX_PEAK``).

    Returns:
        float32 CPU tensor ``[samples]`` at ``target_sample_rate``.

    Raises:
        ValueError: empty input, NaN or inf samples, a bad shape or sample rate.
        TypeError: integer (PCM) samples; convert them to float in [-1, 1] first.
    """
    if isinstance(sample_rate, bool) or not float(sample_rate).is_integer() or sample_rate <= 0:
        raise UserError(f"{name}: sample_rate must be a positive integer, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    if isinstance(wave, torch.Tensor):
        array = wave.detach().cpu()
        if not array.dtype.is_floating_point:
            raise TypeError(f"{name}: expected float samples, got {array.dtype}")
        array = array.to(torch.float32).numpy()
    else:
        array = np.asarray(wave)
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{name}: expected float samples, got {array.dtype}")
        array = array.astype(np.float32, copy=False)
    if array.ndim == 2:
        if array.shape[0] > array.shape[1] and array.shape[1] > 0:
            raise UserError(
                f"{name}: expected [channels, samples], got shape {tuple(array.shape)} "
                "(more channels than samples; transpose it?)"
            )
        if array.shape[0] == 0:
            raise UserError(f"{name}: empty audio (no channels), shape {tuple(array.shape)}")
    elif array.ndim != 1:
        raise UserError(
            f"{name}: expected [samples] or [channels, samples], got shape {tuple(array.shape)}"
        )
    if array.shape[-1] == 0:
        raise UserError(f"{name}: empty audio (zero samples)")
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        num_nan = int(np.isnan(array).sum())
        num_inf = int(np.isinf(array).sum())
        raise UserError(
            f"{name}: audio has {num_nan} NaN and {num_inf} inf samples "
            f"(first at index {tuple(int(i) for i in bad)})"
        )
    if array.ndim == 2:
        array = array.mean(axis=0, dtype=np.float32) if array.shape[0] > 1 else array[0]
    peak = float(np.abs(array).max())
    if peak > MAX_PEAK:
        log.warning(f"{name}: samples reach {peak:.3g}, far outside [-1, 1]: normalised to peak 1")
        array = array / np.float32(peak)
        if report is not None:
            report["peak"] = peak
    if sample_rate != target_sample_rate:
        array = soxr.resample(array, sample_rate, target_sample_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_audio(
    path: str | Path, target_sample_rate: int = 24000, report: Optional[dict] = None
) -> torch.Tensor:
    """Read an audio file (wav, flac, ogg, mp3: whatever libsndfile reads) as mono float32.

    Args:
        path: the audio file.
        target_sample_rate: resample to this rate (Hz).
        report: see :func:`prepare_waveform`.

    Returns:
        float32 tensor ``[samples]`` at ``target_sample_rate``.

    Raises:
        MissingFileError: the file does not exist (or is a broken symbolic link).
        UserError: a folder, or a file that cannot be decoded, is empty, or has NaN/inf samples.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an audio file: name the audio files in it")
    if not path.is_file():
        if path.is_symlink():
            raise MissingFileError(
                f"{path} is a broken symbolic link (to {path.readlink()}, which does not exist)"
            )
        raise MissingFileError(f"audio file not found: {path}")
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: cannot read audio file ({e})") from e
    # soundfile gives [samples, channels].
    return prepare_waveform(data.T, sample_rate, target_sample_rate, str(path), report)


def save_audio(path: str | Path, wave: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write a waveform as a 16-bit PCM wav file, creating parent directories.

    Args:
        path: where to write.
        wave: float samples ``[samples]`` or ``[channels, samples]``; clipped to [-1, 1].
        sample_rate: sample rate in Hz.

    Returns:
        The path written.
    """
    path = Path(path)
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().to(torch.float32).numpy()
    array = np.asarray(wave, dtype=np.float32)
    if array.ndim not in (1, 2):
        raise ValueError(
            f"{path}: expected [samples] or [channels, samples], got shape {tuple(array.shape)}"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: refusing to write audio with NaN or inf samples")
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(
        str(path), np.clip(array.T, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format="WAV"
    )
    return path


def synthetic_audio(
    seconds: float,
    sample_rate: int = 24000,
    seed: int = 0,
    num_items: int = 1,
    segment_seconds: float = 0.32,
) -> torch.Tensor:
    """Varied, deterministic test audio: a chain of short tones, chirps, buzzes and noise bursts.

    Each segment draws its kind, amplitude (-40 to -1 dBFS) and pitch (60 Hz to 4 kHz, gliding
    for chirps and buzzes) from a generator seeded with ``seed``, so the same arguments give
    the same samples on every machine. Segments have 10 ms fades. Used to fit the codebooks
    of :meth:`llama_mimi_tt.MimiCodec.random` and by tests and the demo.

    Returns:
        float32 tensor ``[num_items, round(seconds * sample_rate)]``.
    """
    g = torch.Generator().manual_seed(seed)
    seg_len = max(1, int(segment_seconds * sample_rate))
    num_samples = round(seconds * sample_rate)
    num_segments = num_items * max(1, math.ceil(num_samples / seg_len))
    t = torch.arange(seg_len, dtype=torch.float64) / sample_rate
    seg_dur = seg_len / sample_rate
    f0, f1 = (
        torch.empty(2, num_segments, 1, dtype=torch.float64)
        .uniform_(math.log(60.0), math.log(4000.0), generator=g)
        .exp()
    )
    amp = (
        torch.empty(num_segments, 1, dtype=torch.float64)
        .uniform_(math.log(0.01), math.log(0.9), generator=g)
        .exp()
    )
    kind = torch.randint(0, 4, (1, num_segments, 1), generator=g)
    chirp_phase = 2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seg_dur))
    harmonics = torch.arange(1, 6, dtype=torch.float64)[:, None, None]
    buzz = (torch.sin(harmonics * chirp_phase) / harmonics).sum(0)
    buzz = buzz * (0.6 + 0.4 * torch.sin(2 * math.pi * 4.0 * t))  # syllable-rate tremolo
    kinds = torch.stack(
        [
            torch.sin(2 * math.pi * f0 * t),  # steady tone
            torch.sin(chirp_phase),  # chirp
            buzz / 2.3,  # harmonic, voice-like buzz
            torch.randn(num_segments, seg_len, generator=g, dtype=torch.float64) / 3,  # noise
        ]
    )
    wave = kinds.gather(0, kind.expand(1, num_segments, seg_len))[0] * amp
    fade = torch.clamp(torch.minimum(t, seg_dur - t) / 0.01, max=1.0)
    wave = (wave * fade).reshape(num_items, -1)[:, :num_samples]
    return wave.to(torch.float32)
