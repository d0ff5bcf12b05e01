"""Reading, checking, resampling and writing audio.

Every waveform that reaches the Mimi codec is checked the same way: it must be floating point,
non-empty and finite; several channels are mixed down to mono by their mean; any sample rate is
resampled to the codec's rate with soxr (high quality). Audio whose peak is above ``MAX_PEAK`` =
2.0 (float files can hold anything, e.g. +-50; a peak a little over 1.0 is common and harmless)
is normalised: scaled so that its peak is 1.0, with a logged warning (clipping would destroy it;
Mimi was trained on [-1, 1]). Errors name the file or the input so that a corpus job can log why
it skipped it.

Waveforms in memory go through :func:`prepare_waveform`. Files (and encoded bytes) are read in
blocks, never whole, by :func:`open_audio`, so that reading an hour-long file costs the memory
of a block and a piece, not of the file:

- a first pass decodes the file block by block (``soundfile.SoundFile.read``) and checks it:
  finite, not empty, its real frame count (a header that claims more frames than the file
  holds is logged, and the audio that can be decoded is used), and the peak of its mono mix.
  Normalisation thus uses the file's peak, as when it was read whole: every piece of a file is
  scaled alike, and a file gives the same samples as before. Decoding twice costs little next
  to encoding with Mimi;
- a second pass decodes it again, mixes each block down, scales it, resamples it with soxr's
  streaming resampler (``soxr.ResampleStream``, which gives the same samples as
  ``soxr.resample`` on the whole signal) and hands out pieces of a given length
  (:meth:`CheckedAudio.pieces`).

With ``max_samples`` (``long_files: truncate``, a prompt's first seconds) both passes stop
after the frames that make those samples plus ``RESAMPLER_MARGIN_SECONDS``, so the output is the
one of the whole file, and the peak (for normalisation) is the one of the part read. Every
format that libsndfile reads is read in blocks; a file's duration comes from its header
(``soundfile.info``) until the file has been read to its end.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import re
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

import numpy as np
import soundfile as sf
import soxr
import torch

from llama_mimi_tt.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

MAX_PEAK = 2.0  # louder float audio is normalised to peak 1.0
BLOCK_SECONDS = 10.0  # files are decoded in blocks of at most this many seconds
RESAMPLER_MARGIN_SECONDS = 0.25  # read past a cut so that soxr's filter sees what it needs
_RECOVERY_FRAMES = 1024  # after a decoding error, read on in steps of this many frames
UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's frame count of a file whose header gives no length

__all__ = [
    "CheckedAudio",
    "audio_header",
    "load_audio",
    "open_audio",
    "prepare_waveform",
    "resampled_length",
    "save_audio",
    "synthetic_audio",
]


def resampled_length(num_samples: int, sample_rate: int, target_sample_rate: int) -> int:
    """How many samples soxr makes of ``num_samples`` at ``sample_rate`` (rounded half up)."""
    if sample_rate == target_sample_rate:
        return int(num_samples)
    return int(num_samples * target_sample_rate / sample_rate + 0.5)


def _check_finite(array: np.ndarray, name: str) -> None:
    """Raises the error of NaN or inf samples in ``array`` ``[channels, samples]`` or ``[samples]``."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        _raise_non_finite(
            name, int(np.isnan(array).sum()), int(np.isinf(array).sum()), tuple(int(i) for i in bad)
        )


def _raise_non_finite(name: str, num_nan: int, num_inf: int, first: tuple) -> None:
    raise UserError(
        f"{name}: audio has {num_nan} NaN and {num_inf} inf samples (first at index {first})"
    )


def _mono(array: np.ndarray) -> np.ndarray:
    """The mean of the channels of float32 ``[channels, samples]``."""
    return array.mean(axis=0, dtype=np.float32) if array.shape[0] > 1 else array[0]


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
    _check_finite(array, name)
    if array.ndim == 2:
        array = _mono(array)
    peak = float(np.abs(array).max())
    if _normalises(peak, name, report):
        array = array / np.float32(peak)
    if sample_rate != target_sample_rate:
        array = soxr.resample(array, sample_rate, target_sample_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _normalises(peak: float, name: str, report: Optional[dict]) -> bool:
    """Whether audio of this peak is normalised (logged, and noted in ``report``)."""
    if peak <= MAX_PEAK:
        return False
    log.warning(f"{name}: samples reach {peak:.3g}, far outside [-1, 1]: normalised to peak 1")
    if report is not None:
        report["peak"] = peak
    return True


class CheckedAudio:
    """One input's audio, checked, at the target rate, handed out piece by piece.

    Args:
        num_samples (int): the length of the whole input at the target rate (of a file: from
            its header, or from the frames that could be decoded once it was read to its end).
        length (int): how many samples :meth:`pieces` gives in all (``num_samples``, or fewer
            when the input was opened with ``max_samples``).
        chunks (Callable): gives the samples at the target rate, float32, in chunks of any size.
        name (str): how messages call the input.
    """

    def __init__(self, num_samples: int, length: int, chunks: Callable, name: str):
        self.num_samples, self.length, self.name = int(num_samples), int(length), name
        self._chunks = chunks

    def pieces(self, size: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Consecutive float32 pieces of ``size`` samples (the last one shorter), ``length`` in
        all; ``None`` gives one piece. Only a piece and a block are held at a time."""
        size = int(size) if size else self.length
        left, held, buf = self.length, 0, []
        for chunk in itertools.chain(self._chunks(), [None]):
            if chunk is None:  # the input ended before ``length``: it changed while being read
                log.warning(f"{self.name}: {left - held} samples fewer than at the first pass")
                chunk = np.zeros(left - held, np.float32)
            buf.append(chunk[: left - held])
            held += len(buf[-1])
            while left > 0 and held >= min(size, left):
                joined = np.concatenate(buf) if len(buf) > 1 else buf[0]
                k = min(size, left)
                yield torch.from_numpy(joined[:k])
                buf, held, left = [joined[k:]], held - k, left - k
            if left == 0:
                return

    def read(self) -> torch.Tensor:
        """All ``length`` samples as one float32 tensor."""
        return next(self.pieces())


AudioFile = Union[str, Path, bytes]  # a path, or the bytes of an encoded file


def _sound_file(file: AudioFile, name: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(io.BytesIO(file) if isinstance(file, bytes) else str(file))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{name}: cannot read audio file ({e})") from e


def _decoded_blocks(
    file: AudioFile, block_frames: int, stop_frames: Optional[int], name: str
) -> Iterator[np.ndarray]:
    """float32 ``[frames, channels]`` blocks from the start of ``file``, until its end,
    ``stop_frames``, or the point where libsndfile cannot decode further (a file that holds
    fewer frames than its header says). libsndfile's decoder is stuck after such an error, so
    the file is opened again at the last good block and read on in steps of
    ``_RECOVERY_FRAMES``: at most that many decodable frames are lost."""
    f = _sound_file(file, name)
    try:
        done, step = 0, block_frames
        while stop_frames is None or done < stop_frames:
            n = step if stop_frames is None else min(step, stop_frames - done)
            try:
                data = f.read(n, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                if done == 0:
                    raise UserError(f"{name}: cannot read audio file ({e})") from e
                if step <= _RECOVERY_FRAMES:
                    return
                f.close()
                f, step = _sound_file(file, name), _RECOVERY_FRAMES
                try:
                    f.seek(done)
                except (sf.LibsndfileError, RuntimeError):
                    return
                continue
            if len(data) == 0:
                return
            done += len(data)
            yield data
    finally:
        f.close()


def _scan(
    file: AudioFile, block_frames: int, stop_frames: Optional[int], name: str
) -> Tuple[int, float]:
    """The first pass: ``(frames that can be decoded, peak of the mono mix)``; raises the
    errors of empty and non-finite audio."""
    frames, peak, num_nan, num_inf, first = 0, 0.0, 0, 0, None
    for data in _decoded_blocks(file, block_frames, stop_frames, name):
        block = data.T  # [channels, frames], as prepare_waveform sees a whole file
        finite = np.isfinite(block)
        if finite.all():
            peak = max(peak, float(np.abs(_mono(block)).max()))
        else:
            num_nan += int(np.isnan(block).sum())
            num_inf += int(np.isinf(block).sum())
            if first is None:
                channel, index = np.argwhere(~finite)[0]
                first = (int(channel), frames + int(index))
        frames += data.shape[0]
    if first is not None:
        _raise_non_finite(name, num_nan, num_inf, first)
    if frames == 0:
        raise UserError(f"{name}: empty audio (zero samples)")
    return frames, peak


def _resampled_chunks(
    file: AudioFile,
    frames: int,
    sample_rate: int,
    target_sample_rate: int,
    peak: Optional[float],
    block_frames: int,
    name: str,
) -> Iterator[np.ndarray]:
    """The second pass: the first ``frames`` of ``file``, mixed down, divided by ``peak`` when
    given, resampled in a stream."""
    stream = None
    if sample_rate != target_sample_rate:
        stream = soxr.ResampleStream(
            sample_rate, target_sample_rate, 1, dtype="float32", quality="HQ"
        )
    for data in _decoded_blocks(file, block_frames, frames, name):
        mono = np.ascontiguousarray(_mono(data.T))
        if peak is not None:
            mono = mono / np.float32(peak)
        yield mono if stream is None else stream.resample_chunk(mono, last=False)
    if stream is not None:
        yield stream.resample_chunk(np.zeros(0, np.float32), last=True)


def _claimed_frames(info, frames: int) -> int:
    """The frames a WAV-like header claims when libsndfile found fewer in the file.

    libsndfile sets ``frames`` from what the file holds and logs the header's own figure
    (``data : 72000 (should be 24000)``, in bytes) in ``extra_info``; other headers are
    checked when the file is decoded (:func:`open_audio`)."""
    found = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info.extra_info, re.M)
    match = re.search(r"Block Align\s*:\s*(\d+)", info.extra_info)
    if found is None or match is None or int(match.group(1)) < 1:
        return frames
    return max(frames, int(found.group(1)) // int(match.group(1)))


def audio_header(file: AudioFile, name: Optional[str] = None) -> Tuple[Optional[int], int]:
    """``(frames, sample_rate)`` from a file's header, decoding nothing; ``frames`` is None when
    the header gives no length (a FLAC or an Ogg stream written without one).

    Raises:
        MissingFileError: the file does not exist (or is a broken symbolic link).
        UserError: a folder, or a file that libsndfile cannot open.
    """
    info = _info(file, name)
    frames = None if info.frames >= UNKNOWN_FRAMES else int(info.frames)
    return frames, int(info.samplerate)


def _info(file: AudioFile, name: Optional[str]):
    """soundfile's ``info`` of a file, with the errors of a missing file or a folder."""
    if not isinstance(file, bytes):
        file = Path(file)
        name = name or str(file)
        if file.is_dir():
            raise UserError(f"{file} is a folder, not an audio file: name the audio files in it")
        if not file.is_file():
            if file.is_symlink():
                raise MissingFileError(
                    f"{file} is a broken symbolic link (to {file.readlink()}, which does not exist)"
                )
            raise MissingFileError(f"audio file not found: {file}")
    try:
        return sf.info(io.BytesIO(file) if isinstance(file, bytes) else str(file))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{name or 'audio bytes'}: cannot read audio file ({e})") from e


def open_audio(
    file: AudioFile,
    target_sample_rate: int = 24000,
    max_samples: Optional[int] = None,
    report: Optional[dict] = None,
    name: Optional[str] = None,
    block_seconds: float = BLOCK_SECONDS,
) -> CheckedAudio:
    """Checks an audio file (wav, flac, ogg, mp3: whatever libsndfile reads) in a first pass and
    returns its audio to read in pieces (see the module docstring); nothing is held whole.

    Args:
        file: the audio file, or the bytes of one (a dataset row).
        target_sample_rate: the rate of the pieces (Hz).
        max_samples: read only the first ``max_samples`` samples (at the target rate).
        report: see :func:`prepare_waveform`; also gets ``header_frames`` when the file holds
            fewer frames than its header says (the header's figure, and ``header_seconds``).
        name: how messages call it (default: the path).
        block_seconds: decode blocks of at most this many seconds (and ``BLOCK_SECONDS``).

    Raises:
        MissingFileError: the file does not exist (or is a broken symbolic link).
        UserError: a folder, or a file that cannot be decoded, is empty, or has NaN/inf samples.
    """
    if not isinstance(file, bytes):
        file = Path(file)
    name = name or (str(file) if isinstance(file, Path) else "audio bytes")
    info = _info(file, name)
    sr = int(info.samplerate)
    block_frames = max(1, math.ceil(min(block_seconds, BLOCK_SECONDS) * sr))
    stop_frames = None
    if max_samples is not None:
        stop_frames = math.ceil((max_samples / target_sample_rate + RESAMPLER_MARGIN_SECONDS) * sr)
    frames, peak = _scan(file, block_frames, stop_frames, name)
    read_to_end = stop_frames is None or frames < stop_frames
    # read to its end: the frames decoded; else at least those (a header may claim fewer)
    known = frames if read_to_end else max(frames, int(info.frames))
    header_frames = _claimed_frames(info, int(info.frames))
    if known < header_frames < UNKNOWN_FRAMES:
        log.warning(
            f"{name}: the header says {header_frames} frames ({header_frames / sr:.2f} s), the "
            f"file holds only {known} ({known / sr:.2f} s): using those"
        )
        if report is not None:
            report.update(header_frames=header_frames, header_seconds=header_frames / sr)
    num_samples = resampled_length(known, sr, target_sample_rate)
    length = num_samples if max_samples is None else min(num_samples, int(max_samples))
    scale = peak if _normalises(peak, name, report) else None

    def chunks():
        return _resampled_chunks(file, frames, sr, target_sample_rate, scale, block_frames, name)

    return CheckedAudio(num_samples, length, chunks, name)


def load_audio(
    path: str | Path,
    target_sample_rate: int = 24000,
    report: Optional[dict] = None,
    max_seconds: Optional[float] = None,
) -> torch.Tensor:
    """Read an audio file (wav, flac, ogg, mp3: whatever libsndfile reads) as mono float32,
    in blocks (:func:`open_audio`).

    Args:
        path: the audio file.
        target_sample_rate: resample to this rate (Hz).
        report: see :func:`prepare_waveform`.
        max_seconds: read only the first ``max_seconds`` (a prompt); the rest is never decoded.

    Returns:
        float32 tensor ``[samples]`` at ``target_sample_rate``.

    Raises:
        MissingFileError: the file does not exist (or is a broken symbolic link).
        UserError: a folder, or a file that cannot be decoded, is empty, or has NaN/inf samples.
    """
    max_samples = None if max_seconds is None else int(max_seconds * target_sample_rate)
    return open_audio(path, target_sample_rate, max_samples, report).read()


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
