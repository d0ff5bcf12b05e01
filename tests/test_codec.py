"""MimiCodec on a random Mimi whose codebooks are fitted to its own latents (no real weights)."""

import math

import pytest
import torch
from moshi.models import loaders
from safetensors.torch import save_file

from llama_mimi_tt.audio import save_audio, synthetic_audio
from llama_mimi_tt.codec import MIMI_NAME, MimiCodec, num_frames
from llama_mimi_tt.vocab import MimiVocab

Q = 4


@pytest.fixture(scope="module")
def codec():
    return MimiCodec.random(num_quantizers=Q, seed=0)


@pytest.fixture(scope="module")
def fresh_codes(codec):
    """8 s of audio the codebooks were not fitted on (another seed, shorter segments)."""
    wave = synthetic_audio(8.0, 24000, seed=123, segment_seconds=0.16)[0]
    return wave, codec.encode(wave, 24000)


@pytest.fixture(scope="module")
def short_codes(codec):
    """2 s of fresh audio, for the tests that encode with several models."""
    wave = synthetic_audio(2.0, 24000, seed=321, segment_seconds=0.16)[0]
    return wave, codec.encode(wave, 24000)


@pytest.fixture(scope="module")
def weights_file(codec, tmp_path_factory):
    return codec.save_moshi(tmp_path_factory.mktemp("mimi") / MIMI_NAME)


def test_attributes(codec):
    assert (codec.sample_rate, codec.frame_rate, codec.frame_size) == (24000, 12.5, 1920)
    assert (codec.num_quantizers, codec.codebook_size) == (Q, 2048)
    assert codec.device == torch.device("cpu") and not codec.model.training


def test_codes_are_diverse(fresh_codes):
    _, codes = fresh_codes
    assert codes.shape == (Q, 100) and codes.dtype == torch.int64
    distinct = [codes[q].unique().numel() for q in range(Q)]
    print(f"distinct codes per level on 100 fresh frames: {distinct}")
    assert distinct[0] >= 50, distinct  # an unfitted Mimi gives 1 (all zeros)
    assert min(distinct) >= 40, distinct
    assert (codes >= 0).all() and (codes < 2048).all()


@pytest.mark.parametrize(
    "seconds,sample_rate,channels",
    [(0.05, 24000, 1), (1.0, 16000, 2), (2.5, 44100, 1), (0.7, 8000, 3), (3.21, 48000, 2)],
)
def test_encode_shape_any_rate_and_channels(codec, seconds, sample_rate, channels):
    n = round(seconds * sample_rate)
    wave = synthetic_audio(seconds, sample_rate, seed=5, num_items=channels)
    assert wave.shape == (channels, n)
    codes = codec.encode(wave if channels > 1 else wave[0], sample_rate)
    assert codes.shape == (Q, math.ceil(n / sample_rate * 12.5))
    assert codes.dtype == torch.int64 and codes.device.type == "cpu"


def test_num_frames_is_exact_at_frame_boundaries():
    assert [num_frames(n, 24000) for n in (1, 1919, 1920, 1921, 3840, 24000)] == [
        1,
        1,
        1,
        2,
        2,
        13,
    ]
    assert num_frames(16000 * 3, 16000) == 38  # 37.5 -> 38
    assert num_frames(1280, 16000) == 1 and num_frames(1281, 16000) == 2  # 1280 = one frame


def test_encode_input_forms_agree(codec):
    wave = synthetic_audio(1.0, 24000, seed=8)[0]
    codes = codec.encode(wave, 24000)
    assert torch.equal(codec.encode(wave.numpy(), 24000), codes)
    assert torch.equal(codec.encode(wave[None], 24000), codes)
    assert torch.equal(codec.encode(torch.stack([wave, wave]), 24000), codes)  # mix-down


def test_batched_equals_one_by_one(codec):
    lengths = [0.3, 1.7, 2.0, 2.04, 0.08, 2.5, 1.1, 0.5]
    waves = [
        synthetic_audio(s, 16000, seed=40 + i, segment_seconds=0.12)[0]
        for i, s in enumerate(lengths)
    ]
    single = [codec.encode(w, 16000) for w in waves]
    batched = codec.encode_batch(waves, 16000, batch_size=3)
    for i, (a, b) in enumerate(zip(single, batched)):
        assert a.shape == (Q, math.ceil(lengths[i] * 12.5)), i
        assert torch.equal(a, b), f"item {i}: {(a != b).sum()} codes differ"
    everything = torch.cat(single, dim=1)
    distinct = [everything[q].unique().numel() for q in range(Q)]
    print(f"batched == one-by-one on {everything.shape[1]} frames; distinct codes {distinct}")
    assert distinct[0] >= 0.3 * everything.shape[1]


def test_decode_length_and_range(codec, short_codes):
    _, codes = short_codes
    wave = codec.decode(codes)
    assert wave.shape == (1, codes.shape[1] * 1920) and wave.dtype == torch.float32
    assert torch.isfinite(wave).all()
    assert codec.decode(codes[:, :1].numpy()).shape == (1, 1920)


def test_streaming_decode_matches_offline(codec, fresh_codes):
    _, codes = fresh_codes
    codes = codes[:, :12]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-frame steps are tiny; spare the shared CPU
    try:
        offline = codec.decode(codes)
        with codec.streaming_decoder() as decoder:
            frames = [decoder.decode_frame(codes[:, i : i + 1]) for i in range(8)]
            frames.append(decoder.decode_frame(codes[:, 8:]))  # several frames at once
            with pytest.raises(RuntimeError, match="streaming"):
                codec.encode(torch.zeros(1920), 24000)
    finally:
        torch.set_num_threads(threads)
    streamed = torch.cat(frames, dim=-1)
    assert streamed.shape == offline.shape
    diff = (streamed - offline).abs().max().item()
    print(f"streaming vs offline decode: max abs diff {diff:.2e}")
    assert diff < 1e-5
    assert not codec.model.is_streaming  # left streaming mode


def test_batched_streaming_decode_matches_offline(codec, fresh_codes):
    _, codes = fresh_codes
    items = torch.stack([codes[:, :6], codes[:, 6:12]])  # two streams [2, Q, 6]
    offline = [codec.decode(c) for c in items]
    with codec.streaming_decoder(batch_size=2) as decoder:
        frames = [decoder.decode_frame(items[:, :, i : i + 1]) for i in range(6)]
        with pytest.raises(ValueError, match="batch_size=2"):
            decoder.decode_frame(items[0])
    streamed = torch.cat(frames, dim=-1)  # [2, 1, 6 * 1920]
    assert streamed.shape == (2, 1, 6 * 1920)
    for b in range(2):
        assert (streamed[b] - offline[b]).abs().max().item() < 1e-5


def test_streaming_decode_of_generated_ids_feeds_stopped_rows_code_zero(codec, fresh_codes):
    _, codes = fresh_codes
    vocab = MimiVocab(text_vocab_size=512, num_quantizers=Q)
    items = torch.stack([codes[:, :4], codes[:, 4:8]])  # two streams [2, Q, 4]
    ids = [vocab.encode(items[:, :, i : i + 1]) for i in range(4)]  # [2, Q] per frame
    for frame in ids[2:]:
        frame[1] = vocab.audio_end_id  # stream 1 stopped after two frames
    with codec.streaming_decoder(batch_size=2) as decoder:
        got = torch.cat([decoder.decode_frame_ids(frame, vocab) for frame in ids], dim=-1)
    fed = items.clone()
    fed[1, :, 2:] = 0
    with codec.streaming_decoder(batch_size=2) as decoder:
        want = torch.cat([decoder.decode_frame(fed[:, :, i : i + 1]) for i in range(4)], dim=-1)
    assert got.shape == (2, 1, 4 * 1920)
    assert torch.equal(got, want)
    assert (got[0] - codec.decode(items[0])).abs().max().item() < 1e-5  # the live row is exact


def test_save_moshi_then_from_pretrained(codec, short_codes, weights_file):
    wave, codes = short_codes
    loaded = MimiCodec.from_pretrained(weights_file, num_quantizers=Q)
    assert torch.equal(loaded.encode(wave, 24000), codes)
    from_dir = MimiCodec.from_pretrained(str(weights_file.parent), num_quantizers=Q)
    assert torch.equal(from_dir.decode(codes[:, :5]), codec.decode(codes[:, :5]))
    # moshi itself reads the file (same padding as encode: a multiple of 25 frames)
    model = loaders.get_mimi(weights_file, num_codebooks=Q)
    with torch.inference_mode():
        padded = torch.nn.functional.pad(wave, (0, 25 * 1920 - wave.numel()))
        assert torch.equal(model.encode(padded[None, None])[0], codes)


def test_random_is_deterministic_and_more_levels_extend_fewer(weights_file, short_codes):
    wave, codes = short_codes
    again = MimiCodec.random(num_quantizers=8, seed=0)  # same seed, more levels
    codes8 = again.encode(wave, 24000)
    assert codes8.shape == (8, codes.shape[1])
    assert torch.equal(codes8[:Q], codes)  # deterministic, and level q ignores levels > q
    distinct = [codes8[q].unique().numel() for q in range(8)]
    print(f"distinct codes at levels 0..7 on {codes.shape[1]} frames: {distinct}")
    assert min(distinct) >= 10
    # all 32 levels were fitted, so the saved Q=4 model serves Q=8 too
    loaded = MimiCodec.from_pretrained(weights_file, num_quantizers=8)
    assert torch.equal(loaded.encode(wave, 24000), codes8)


def test_encode_file(codec, tmp_path):
    wave = synthetic_audio(1.2, 16000, seed=11, num_items=2)
    path = save_audio(tmp_path / "clip.wav", wave, 16000)
    codes = codec.encode_file(path)
    assert codes.shape == (Q, 15)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        codec.encode_file(tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_text("not a wav")
    with pytest.raises(ValueError, match="bad.wav"):
        codec.encode_file(tmp_path / "bad.wav")


@pytest.mark.parametrize(
    "wave,match",
    [
        (torch.zeros(0), "utt9: empty audio"),
        (torch.tensor([0.0, float("nan"), 0.0]), "utt9: audio has 1 NaN"),
        (torch.tensor([0.0, 0.0, float("-inf")]), "utt9: audio has 0 NaN and 1 inf"),
    ],
)
def test_encode_bad_audio_names_the_input(codec, wave, match):
    with pytest.raises(ValueError, match=match):
        codec.encode(wave, 24000, name="utt9")
    with pytest.raises(ValueError, match=match.replace("utt9", "b2")):
        codec.encode_batch([torch.ones(100), wave], 24000, names=["b1", "b2"])


@pytest.mark.parametrize("num_quantizers", [0, 33, -1, 2.0])
def test_bad_num_quantizers(weights_file, num_quantizers):
    with pytest.raises(ValueError, match="num_quantizers.*1..32"):
        MimiCodec.from_pretrained(weights_file, num_quantizers=num_quantizers)
    with pytest.raises(ValueError, match="num_quantizers.*1..32"):
        MimiCodec.random(num_quantizers=num_quantizers)


def test_decode_rejects_bad_codes(codec):
    good = torch.zeros(Q, 6, dtype=torch.int64)
    bad = good.clone()
    bad[2, 5] = 2048
    with pytest.raises(ValueError, match=r"code 2048 at \[level 2, frame 5\].*0\.\.2047"):
        codec.decode(bad)
    bad = good.clone()
    bad[1, 3] = -1
    with pytest.raises(ValueError, match=r"code -1 at \[level 1, frame 3\]"):
        codec.decode(bad)
    with pytest.raises(ValueError, match="expected Q == num_quantizers == 4 levels, got 3"):
        codec.decode(good[:3])
    with pytest.raises(ValueError, match=r"expected shape \[Q, F\]"):
        codec.decode(good[None])
    with pytest.raises(ValueError, match="integer codes"):
        codec.decode(good.float())
    with codec.streaming_decoder() as decoder, pytest.raises(ValueError, match="level 2"):
        decoder.decode_frame(torch.tensor([[0], [0], [9999], [0]]))


def test_missing_weights_file_names_it_and_where_to_get_it(tmp_path):
    missing = tmp_path / "weights" / MIMI_NAME
    with pytest.raises(FileNotFoundError) as info:
        MimiCodec.from_pretrained(missing)
    assert str(missing) in str(info.value) and "kyutai/moshiko-pytorch-bf16" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no Mimi weights in directory"):
        MimiCodec.from_pretrained(tmp_path)


def test_hub_id_is_tried_only_when_no_local_path(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    asked = []

    def offline(repo_id, filename, **kwargs):  # no network here: fail at once, as offline does
        asked.append((repo_id, filename))
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="'someone/no-such-mimi' is not a local path"):
        MimiCodec.from_pretrained("someone/no-such-mimi")
    assert [repo for repo, _ in asked] == ["someone/no-such-mimi"] * 2  # both layouts tried
    # a relative path with a file suffix is never taken for a hub id
    with pytest.raises(FileNotFoundError, match="not found: weights/mimi.safetensors"):
        MimiCodec.from_pretrained("weights/mimi.safetensors")
    assert len(asked) == 2


def test_not_a_mimi_checkpoint(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors: not a Mimi checkpoint"):
        MimiCodec.from_pretrained(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors: cannot read"):
        MimiCodec.from_pretrained(junk)


def test_transformers_kyutai_mimi_format(tmp_path):
    """A `transformers` MimiModel checkpoint (the kyutai/mimi layout) loads and computes the same
    latents, codes and audio as transformers does."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.MimiModel(transformers.MimiConfig()).eval()
    x = synthetic_audio(1.6, 24000, seed=2)[:, None]  # 20 frames
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layer_scale.scale"):
                p.fill_(1.0)  # let attention matter, so that a wrong RoPE layout shows
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25.0)  # sharp attention
        emb = hf.encoder(x)
        emb = hf.encoder_transformer(emb.transpose(1, 2))[0].transpose(1, 2)
        emb = hf.downsample(emb)
        g = torch.Generator().manual_seed(0)
        for rvq in (
            hf.quantizer.semantic_residual_vector_quantizer,
            hf.quantizer.acoustic_residual_vector_quantizer,
        ):  # transformers' codebooks start empty: fill them from its latents
            z = rvq.input_proj(emb).transpose(1, 2).reshape(-1, 256)
            for layer in rvq.layers[:3]:
                pick = torch.randint(0, z.shape[0], (2048,), generator=g)
                entries = z[pick] + 0.3 * z.std(0) * torch.randn(2048, 256, generator=g)
                layer.codebook.embed_sum.copy_(entries)
                z = z - entries[torch.cdist(z, entries).argmin(-1)]
        hf_codes = hf.encode(x, num_quantizers=Q).audio_codes[0]
        hf_wave = hf.decode(hf_codes[None]).audio_values[0]
    hf.save_pretrained(tmp_path / "mimi")
    del hf
    codec = MimiCodec.from_pretrained(tmp_path / "mimi", num_quantizers=Q)
    with torch.inference_mode():
        latents = codec.model.encode_to_latent(x, quantize=False)
    assert (latents - emb).abs().max() < 1e-4 * emb.abs().max()
    codes = codec.encode(x[0, 0], 24000)
    assert min(codes[q].unique().numel() for q in range(Q)) > 5
    assert torch.equal(codes, hf_codes)
    wave = codec.decode(hf_codes)
    assert (wave - hf_wave).abs().max() < 1e-4 * hf_wave.abs().max()
    config = tmp_path / "mimi" / "config.json"
    config.write_text(
        config.read_text().replace('"num_hidden_layers": 8', '"num_hidden_layers": 4')
    )
    with pytest.raises(ValueError, match="config.json: num_hidden_layers=4.*standard Mimi"):
        MimiCodec.from_pretrained(tmp_path / "mimi")
