"""Audio I/O: reading any format/rate/channel count, resampling, writing, and clear errors."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_mimi_tt.audio import (
    load_audio,
    open_audio,
    prepare_waveform,
    save_audio,
    synthetic_audio,
)
from llama_mimi_tt.code_cache import cut_long_audio


def _sine(freq, seconds, sample_rate, amp=0.5):
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def test_save_then_load_roundtrip(tmp_path):
    wave = torch.from_numpy(_sine(440.0, 0.5, 24000))
    path = save_audio(tmp_path / "a" / "b" / "x.wav", wave, 24000)  # creates parent dirs
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (
        24000,
        1,
        "PCM_16",
        "WAV",
    )
    back = load_audio(path)
    assert back.dtype == torch.float32 and back.shape == wave.shape
    assert (back - wave).abs().max() <= 1.0 / 32768 + 1e-6


def test_save_clips_and_rejects_nan(tmp_path):
    path = save_audio(tmp_path / "loud.wav", torch.tensor([2.0, -3.0, 0.25]), 24000)
    back, _ = sf.read(str(path), dtype="float32")
    np.testing.assert_allclose(back, [32767 / 32768, -1.0, 0.25], atol=1e-4)
    with pytest.raises(ValueError, match="nan.wav"):
        save_audio(tmp_path / "nan.wav", torch.tensor([0.0, float("nan")]), 24000)


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
def test_stereo_16k_files_are_mixed_down_and_resampled(tmp_path, fmt, ext):
    left, right = _sine(300.0, 1.0, 16000, 0.4), _sine(300.0, 1.0, 16000, 0.2)
    path = tmp_path / f"stereo.{ext}"
    sf.write(str(path), np.stack([left, right], axis=1), 16000, format=fmt)
    wave = load_audio(path, 24000)
    assert wave.dim() == 1 and wave.dtype == torch.float32
    assert abs(wave.shape[0] - 24000) <= 1
    expected = _sine(300.0, 1.0, 24000, 0.3)[: wave.shape[0]]
    tol = 0.05 if fmt == "OGG" else 2e-3  # lossy codec
    mid = slice(2400, -2400)
    assert np.abs(wave.numpy()[mid] - expected[mid]).max() < tol


def test_resampling_is_high_quality():
    wave = prepare_waveform(_sine(1000.0, 1.0, 16000), 16000, 24000)
    expected = _sine(1000.0, 1.0, 24000)
    err = np.abs(wave.numpy()[1000:-1000] - expected[1000:-1000]).max()
    print(f"max resampling error 16k->24k on a 1 kHz sine: {err:.2e}")
    assert err < 1e-3


def test_prepare_waveform_shapes_and_inputs():
    mono = _sine(200.0, 0.1, 24000)
    out = prepare_waveform(mono, 24000)
    assert torch.equal(out, torch.from_numpy(mono))  # no resampling at the target rate
    stereo = torch.from_numpy(np.stack([mono, -mono]))
    assert prepare_waveform(stereo, 24000).abs().max() == 0  # mean of opposite channels
    assert torch.equal(prepare_waveform(torch.from_numpy(mono)[None], 24000), out)
    assert prepare_waveform(torch.from_numpy(mono).double(), 24000).dtype == torch.float32


@pytest.mark.parametrize(
    "wave,sample_rate,error,match",
    [
        (np.zeros(0, np.float32), 24000, ValueError, "clip7: empty audio"),
        (np.zeros((2, 0), np.float32), 24000, ValueError, "clip7: empty audio"),
        (np.array([0.0, np.nan, 0.1], np.float32), 24000, ValueError, "clip7: .*1 NaN"),
        (np.array([0.0, 0.1, np.inf], np.float32), 24000, ValueError, "clip7: .*1 inf"),
        (np.zeros(10, np.int16), 24000, TypeError, "clip7: expected float"),
        (np.zeros((1, 2, 10), np.float32), 24000, ValueError, "clip7: expected"),
        (np.zeros((100, 2), np.float32), 24000, ValueError, "clip7: .*transpose"),
        (np.zeros(10, np.float32), 0, ValueError, "clip7: sample_rate"),
        (np.zeros(10, np.float32), 22050.5, ValueError, "clip7: sample_rate"),
    ],
)
def test_prepare_waveform_errors_name_the_input(wave, sample_rate, error, match):
    with pytest.raises(error, match=match):
        prepare_waveform(wave, sample_rate, 24000, name="clip7")


def test_load_audio_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(missing)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(ValueError, match="garbage.wav.*cannot read"):
        load_audio(garbage)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav: empty audio"):
        load_audio(empty)
    for bad, name in [(np.nan, "nan.wav"), (np.inf, "inf.wav")]:
        data = _sine(100.0, 0.01, 16000)
        data[5] = bad
        sf.write(str(tmp_path / name), data, 16000, subtype="FLOAT")
        with pytest.raises(ValueError, match=f"{name}: audio has"):
            load_audio(tmp_path / name)


def test_synthetic_audio_is_deterministic_and_varied():
    a = synthetic_audio(1.5, 24000, seed=3, num_items=2)
    assert a.shape == (2, 36000) and a.dtype == torch.float32
    assert torch.equal(a, synthetic_audio(1.5, 24000, seed=3, num_items=2))
    assert not torch.equal(a, synthetic_audio(1.5, 24000, seed=4, num_items=2))
    assert torch.isfinite(a).all() and a.abs().max() <= 1.0
    # several levels: segment RMS spans well over 20 dB
    rms = a.reshape(2, -1, 1800).pow(2).mean(-1).sqrt()
    assert rms.max() / rms.min().clamp(min=1e-6) > 10


# ---- files read in blocks -------------------------------------------------------------------
def _multichannel(seconds, sample_rate, channels, seed, loud_at=None):
    """Tones and noise per channel, float32 [samples, channels]; a +-6 spike at ``loud_at`` s."""
    g = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    data = np.stack(
        [
            0.3 * np.sin(2 * math.pi * (150 + 70 * c) * t) + 0.05 * g.standard_normal(len(t))
            for c in range(channels)
        ],
        axis=1,
    ).astype(np.float32)
    if loud_at is not None:
        data[int(loud_at * sample_rate)] = 6.0
    return data


def _whole_file_pieces(path, max_seconds, long_files):
    """Today's reference: the whole file read, checked, resampled, then cut."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    report = {}
    wave = prepare_waveform(data.T, sr, 24000, str(path), report)
    return wave, cut_long_audio(wave, 24000, max_seconds, long_files), report


@pytest.mark.parametrize(
    "sample_rate,channels,fmt,loud_at",
    [(16000, 2, "FLAC", None), (44100, 3, "WAV", 7.3), (22050, 1, "WAV", None)],
)
def test_block_read_pieces_match_the_whole_file(tmp_path, sample_rate, channels, fmt, loud_at):
    path = tmp_path / f"x.{fmt.lower()}"
    subtype = "FLOAT" if loud_at else None  # a float file can hold +-6
    data = _multichannel(9.37, sample_rate, channels, seed=channels, loud_at=loud_at)
    sf.write(str(path), data, sample_rate, format=fmt, subtype=subtype)
    wave, ref, ref_report = _whole_file_pieces(path, 2.0, "split")
    report = {}
    audio = open_audio(path, 24000, report=report, block_seconds=0.7)  # 14 blocks, not aligned
    assert audio.num_samples == audio.length == wave.shape[-1]
    pieces = list(audio.pieces(48000))
    assert len(pieces) == 5 and [len(p) for p in pieces] == [48000] * 4 + [wave.shape[-1] - 192000]
    assert len(ref) == 5
    for (_, expected), got in zip(ref, pieces):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert report == ref_report  # the same peak normalises every piece: the file's
    if loud_at:
        assert report["peak"] == 6.0  # at 7.3 s, in the fourth piece
    # truncate: only the first 2 s (and the resampler's margin) are read, same samples
    # (the peak is the part's: the spike at 7.3 s is not read, so nothing is normalised)
    first = open_audio(path, 24000, max_samples=48000, block_seconds=0.7)
    assert first.num_samples == wave.shape[-1] and first.length == 48000
    expected = ref[0][1] * (6.0 if loud_at else 1.0)
    torch.testing.assert_close(first.read(), expected, atol=3e-6, rtol=0)
    torch.testing.assert_close(
        load_audio(path, 24000, max_seconds=2.0), expected, atol=3e-6, rtol=0
    )


def test_truncate_never_decodes_past_what_it_keeps(tmp_path):
    data = _multichannel(6.0, 16000, 1, seed=0)
    data[int(4.0 * 16000)] = np.nan  # after 2 s + the resampler's margin
    sf.write(str(tmp_path / "tail.wav"), data, 16000, subtype="FLOAT")
    wave = load_audio(tmp_path / "tail.wav", 24000, max_seconds=2.0)
    assert wave.shape == (48000,) and torch.isfinite(wave).all()
    with pytest.raises(
        ValueError,
        match=r"tail.wav: audio has 1 NaN and 0 inf samples \(first at index \(0, 64000\)\)",
    ):
        load_audio(tmp_path / "tail.wav", 24000)


def _flac_claiming(path, data, sample_rate, claimed_frames):
    """A FLAC whose STREAMINFO says it holds ``claimed_frames`` (a lying header)."""
    sf.write(str(path), data, sample_rate, format="FLAC")
    raw = bytearray(path.read_bytes())
    field = int.from_bytes(raw[18:26], "big")  # 'fLaC', block header, 10 bytes of STREAMINFO
    field = (field & ~((1 << 36) - 1)) | claimed_frames  # total samples: the low 36 bits
    raw[18:26] = field.to_bytes(8, "big")
    path.write_bytes(bytes(raw))


def test_a_header_that_claims_more_frames_reads_what_the_file_holds(tmp_path, caplog):
    data = _multichannel(3.0, 16000, 1, seed=1)[:, 0]
    path = tmp_path / "liar.flac"
    _flac_claiming(path, data, 16000, 10 * 3600 * 16000)  # says 10 hours
    assert sf.info(str(path)).duration == pytest.approx(36000)
    report = {}
    audio = open_audio(path, 24000, report=report, block_seconds=1.0)
    # decoded up to the error, then in steps of 1024 frames: at most 1024 frames lost
    assert 3 * 24000 - 1536 <= audio.num_samples <= 3 * 24000
    assert report["header_frames"] == 10 * 3600 * 16000
    assert "liar.flac: the header says 576000000 frames" in caplog.text
    wave = audio.read()
    assert wave.shape == (audio.num_samples,) and torch.isfinite(wave).all()
    whole = prepare_waveform(data, 16000, 24000)
    np.testing.assert_allclose(wave[:24000], whole[:24000], atol=1e-3)  # FLAC is 16-bit
    # truncate trusts the header for the file's length, reads only its first second
    first = open_audio(path, 24000, max_samples=24000)
    assert first.length == 24000 and first.num_samples == 10 * 3600 * 24000
