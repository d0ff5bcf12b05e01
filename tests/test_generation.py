"""Generation: interleaved sampling, KV cache, seeds, batching, streaming, the recipe end to end.

CPU, the tiny model with random weights, one thread (the machine is shared).
"""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from llama_mimi_tt.generation import (
    LevelHeads,
    SamplingParams,
    _hash32,
    generate,
    gumbel_noise,
    sample_gumbel,
    seed_keys,
)
from llama_mimi_tt.models import llama_mimi_tiny
from llama_mimi_tt.tokenizer import LlamaMimiTokenizer
from llama_mimi_tt.vocab import MimiVocab

torch.set_num_threads(1)

Q = 4
VOCAB = MimiVocab(text_vocab_size=512, num_quantizers=Q)
BOS = 256  # <|begin_of_text|> of the builtin byte tokenizer
HOT = SamplingParams(temperature=2.0, top_k=None)
FRAME = 1920  # samples per Mimi frame at 24 kHz
REPO = Path(__file__).resolve().parents[1]
TUNE = Path(sys.executable).parent / "tune"  # the venv's torchtune CLI


def prompt(frames: int = 0, partial: int = 0, seed: int = 0) -> torch.Tensor:
    """``<bos> <audio>`` + random frames (+ a partial frame of ``partial`` levels)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, VOCAB.codebook_size, (Q, frames + 1), generator=g)
    ids = VOCAB.encode(codes)[: frames * Q + partial]
    return torch.cat([torch.tensor([BOS, VOCAB.audio_start_id]), ids])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return llama_mimi_tiny(num_quantizers=Q).eval()


@pytest.fixture(scope="module")
def codec():
    from llama_mimi_tt.codec import MimiCodec

    return MimiCodec.random(num_quantizers=Q, seed=0)


# ---- sampling ----------------------------------------------------------------------------------
def test_every_frame_well_formed_over_500_steps_at_temperature_2(model):
    # two prompts: a frame boundary and (batched apart) a partial frame of 2 levels
    out = generate(
        model, prompt(3)[None], VOCAB, 125, semantic=HOT, acoustic=HOT, stop_at_end=False
    )
    assert out.generated.shape == (1, 500) and out.num_frames == [125]
    codes = VOCAB.decode(out.generated[0])  # raises on any malformed frame
    assert codes.shape == (Q, 125)
    assert all(len(set(codes[q].tolist())) > 60 for q in range(Q))  # really sampling
    VOCAB.decode(out.ids[0][2:])  # prompt + continuation: one well-formed span

    out = generate(model, prompt(2, partial=2)[None], VOCAB, 10, semantic=HOT, acoustic=HOT)
    assert VOCAB.level_of(out.generated[0, :2]).tolist() == [2, 3]  # completes the frame
    ids = out.ids[0]
    span = ids[2 : len(ids) - int(out.ended[0])]
    assert VOCAB.decode(span).shape[-1] == 2 + out.num_frames[0]
    assert out.new_codes(0).shape == (Q, out.num_frames[0])


def test_audio_end_only_at_frame_boundaries(model):
    # with a 16-entry codebook (the model just has unused rows) </audio> is drawn often: it may
    # only appear at level-0 steps, and the sample is finished after it
    small = MimiVocab(text_vocab_size=512, num_quantizers=Q, codebook_size=16)
    p = torch.cat([torch.tensor([BOS, small.audio_start_id]), small.encode(torch.zeros(Q, 1))])
    flat = SamplingParams(temperature=20.0, top_k=None)  # near uniform over 17 choices
    out = generate(model, [p] * 8, small, 30, semantic=flat, acoustic=HOT, seed=list(range(8)))
    assert sum(out.ended) >= 4
    for b in range(8):
        row = out.generated[b]
        ends = (row == small.audio_end_id).nonzero().flatten()
        if len(ends):
            assert int(ends[0]) % Q == 0 and (row[ends[0] :] == small.audio_end_id).all()
            assert out.num_frames[b] == int(ends[0]) // Q
            assert out.ids[b][-1] == small.audio_end_id
        small.decode(row[: out.num_frames[b] * Q])


def test_min_new_frames_and_no_stop(model):
    out = generate(model, [prompt(1)] * 4, VOCAB, 6, semantic=SamplingParams(5.0, None),
                   seed=[0, 1, 2, 3], min_new_frames=6)  # fmt: skip
    assert out.num_frames == [6] * 4 and not any(out.ended)


def test_level_heads_match_the_full_projection():
    from llama_mimi_tt.models import lora_llama_mimi_tiny

    torch.manual_seed(1)
    lora = lora_llama_mimi_tiny(["q_proj"], apply_lora_to_output=True, tie_word_embeddings=False)
    torch.nn.init.normal_(lora.output.lora_b.weight)  # a trained (non-zero) adapter
    for m in (llama_mimi_tiny(num_quantizers=Q), llama_mimi_tiny(tie_word_embeddings=False), lora):
        m.eval()
        heads = LevelHeads(m, VOCAB)
        h = torch.randn(3, 128)
        full = m.output(h)
        for q in range(Q):
            start, stop, step = VOCAB.level_ids(q)
            want = full[:, start:stop:step]
            if q == 0:
                want = torch.cat([want, full[:, VOCAB.audio_end_id, None]], 1)
            torch.testing.assert_close(h @ heads.heads[q].T, want)


def test_greedy_matches_full_forward_without_cache(model):
    """KV cache, masks, positions and level slicing against a plain full-sequence forward."""
    p = prompt(2)
    greedy = SamplingParams(temperature=0.0)
    out = generate(model, p[None], VOCAB, 3, semantic=greedy, acoustic=greedy, stop_at_end=False)
    ids = p.clone()
    with torch.no_grad():
        for n in range(3 * Q):
            logits = model(ids[None])[0, -1]
            start, stop, step = VOCAB.level_ids(n % Q)
            ids = torch.cat(
                [ids, torch.arange(start, stop, step)[logits[start:stop:step].argmax()][None]]
            )
    assert torch.equal(out.ids[0], ids)


def test_sampler_follows_softmax_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(4000, -1)
    keys = seed_keys(torch.arange(4000))
    noise = gumbel_noise(keys, torch.tensor(3), _hash32(torch.arange(5)))
    draws = sample_gumbel(logits, SamplingParams(1.0, None), noise)
    freq = torch.bincount(draws, minlength=5).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)
    assert draws.unique().numel() == 5
    assert set(sample_gumbel(logits, SamplingParams(1.0, 2), noise).tolist()) == {0, 1}
    # top_p 0.8: the first three (0.59, 0.22, 0.13 of the mass) reach it, the rest never drawn
    assert set(sample_gumbel(logits, SamplingParams(1.0, None, 0.8), noise).tolist()) == {0, 1, 2}


# ---- seeds and batches ------------------------------------------------------------------------
def test_same_seed_same_tokens_other_seed_differs(model):
    a = generate(model, prompt(2)[None], VOCAB, 20, seed=5, stop_at_end=False)
    b = generate(model, prompt(2)[None], VOCAB, 20, seed=5, stop_at_end=False)
    c = generate(model, prompt(2)[None], VOCAB, 20, seed=6, stop_at_end=False)
    assert torch.equal(a.generated, b.generated)
    assert not torch.equal(a.generated, c.generated)


def test_batch_equals_single(model):
    # prompts of different lengths (left padding) and samples that stop at different times
    prompts = [prompt(0), prompt(3, seed=1), prompt(1, seed=2)]
    seeds = [11, 12, 13]
    kw = dict(semantic=SamplingParams(1.5, 100), acoustic=SamplingParams(1.0, 50, 0.95))
    batch = generate(model, prompts, VOCAB, 40, seed=seeds, **kw)
    for b in range(3):
        single = generate(model, [prompts[b]], VOCAB, 40, seed=[seeds[b]], **kw)
        assert torch.equal(single.ids[0], batch.ids[b])
        assert single.num_frames[0] == batch.num_frames[b]


def test_generate_errors(model):
    with pytest.raises(ValueError, match="no <audio>"):
        generate(model, torch.tensor([[BOS, 5, 6]]), VOCAB, 2)
    with pytest.raises(ValueError, match="closed by </audio>"):
        generate(model, torch.cat([prompt(1), torch.tensor([VOCAB.audio_end_id])])[None], VOCAB, 2)
    with pytest.raises(ValueError, match="different levels"):
        generate(model, [prompt(1), prompt(1, partial=1)], VOCAB, 2)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        generate(model, prompt(10)[None], VOCAB, (model.max_seq_len - 40) // Q)
    with pytest.raises(ValueError, match="needs"):
        generate(model, prompt(1)[None], MimiVocab(text_vocab_size=512, num_quantizers=8), 2)


# ---- recipe pieces: bad inputs ----------------------------------------------------------------
def _cfg(**kw):
    base = dict(prompt_audio=[], prompt_codes=[], prompt_text=None, model_has_text=False)
    return OmegaConf.create({**base, **kw})


def test_recipe_bad_inputs(tmp_path, codec):
    import llama_mimi_generate as recipe

    tok = LlamaMimiTokenizer("builtin:byte", num_quantizers=Q)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav.*empty audio"):
        recipe.build_prompts(_cfg(prompt_audio=[str(empty)]), tok, codec)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="junk.wav: cannot read"):
        recipe.build_prompts(_cfg(prompt_audio=[str(junk)]), tok, codec)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        recipe.build_prompts(_cfg(prompt_audio=[str(tmp_path / "missing.wav")]), tok, codec)
    torch.save(torch.zeros(Q, 0, dtype=torch.long), tmp_path / "none.pt")
    with pytest.raises(ValueError, match="none.pt: the prompt codes have no frames"):
        recipe.build_prompts(_cfg(prompt_codes=[str(tmp_path / "none.pt")]), tok, codec)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pt is not a codes file"):
        recipe.build_prompts(_cfg(prompt_codes=[str(tmp_path / "bad.pt")]), tok, codec)
    with pytest.raises(ValueError, match="has no text side"):
        recipe.build_prompts(_cfg(prompt_text="hello"), tok, codec)

    # text prompts build <bos> text <audio> for a tts model; codes files keep the first Q levels
    np.save(tmp_path / "c.npy", np.random.default_rng(0).integers(0, 2048, (8, 5)))
    p = recipe.build_prompts(
        _cfg(prompt_codes=[str(tmp_path / "c.npy")], prompt_text="hi", model_has_text=True),
        tok,
        codec,
    )[0]
    assert p.ids.tolist()[:4] == [BOS, ord("h"), ord("i"), VOCAB.audio_start_id]
    assert p.codes.shape == (Q, 5) and len(p.ids) == 4 + 5 * Q

    with pytest.raises(ValueError, match="too long.*max_seq_len=60.*Lower max_seconds"):
        recipe.check_context([p], max_new_frames=10, max_seq_len=60, q=Q)


# ---- streaming --------------------------------------------------------------------------------
def test_streaming_equals_non_streaming(tmp_path, model, codec):
    import llama_mimi_generate as recipe

    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    writer = recipe.StreamingWriter(codec, VOCAB, paths)
    try:
        out = generate(model, [prompt(1)] * 2, VOCAB, 12, seed=[0, 1], on_frame=writer,
                       semantic=SamplingParams(3.0, None))  # fmt: skip
    finally:
        writer.close()
    for b, path in enumerate(paths):
        streamed, sr = sf.read(str(path), dtype="float32")
        whole = codec.decode(out.new_codes(b))[0].numpy()
        assert sr == 24000 and len(streamed) == out.num_frames[b] * FRAME == whole.shape[-1]
        # the float decodes agree to ~1e-7; the 16-bit file to within one LSB
        assert np.abs(streamed - whole).max() <= 1.5 / 32768


# ---- the recipe end to end --------------------------------------------------------------------
def test_recipe_end_to_end(tmp_path, codec, monkeypatch):
    import llama_mimi_generate as recipe

    from llama_mimi_tt.audio import synthetic_audio

    # a stereo 16 kHz prompt of 1 s (13 frames) and prompt codes of 5 frames, given twice;
    # 6 samples in batches of 4 and 2, streamed to the .wav files frame by frame
    sf.write(str(tmp_path / "voice.wav"), synthetic_audio(1.0, 16000, 1, 2).numpy().T, 16000)
    torch.save(torch.randint(0, 2048, (Q, 5)), tmp_path / "codes.pt")
    codes_pt, out = tmp_path / "codes.pt", tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(
        [str(TUNE), "run", "llama_mimi_generate", "--config", "generate", f"output_dir={out}",
         f"prompt_audio=[{tmp_path / 'voice.wav'}]", f"prompt_codes=[{codes_pt},{codes_pt}]",
         "num_samples=2", "batch_size=4", "max_seconds=1.2", "streaming=True"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RANDOM weights" in run.stderr + run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_weights"] and summary["tokens_per_s"] > 0 and summary["rtf"] > 0
    names = ["voice"] * 2 + ["codes"] * 2 + ["codes_1"] * 2
    assert [s["name"] for s in summary["samples"]] == names
    for s in summary["samples"]:
        frames, prompt_frames = s["frames"], s["prompt_frames"]
        assert prompt_frames == (13 if s["name"] == "voice" else 5)
        cont, sr = sf.read(str(out / s["continuation"]), dtype="float32")
        full, _ = sf.read(str(out / s["full"]), dtype="float32")
        codes = torch.load(out / s["codes"])
        # .wav length == frames / 12.5 s
        assert sr == 24000 and len(cont) == frames * FRAME and codes.shape == (Q, frames)
        assert len(full) == (prompt_frames + frames) * FRAME
        assert frames == 15 or s["ended_with_audio_end"]
    # same prompt and seed in another batch -> the same codes and audio
    for k in range(2):
        assert torch.equal(
            torch.load(out / f"codes_s{k}_codes.pt"), torch.load(out / f"codes_1_s{k}_codes.pt")
        )
        a, _ = sf.read(str(out / f"codes_s{k}_full.wav"))
        b, _ = sf.read(str(out / f"codes_1_s{k}_full.wav"))
        assert np.array_equal(a, b)

    # in process, not streaming, that prompt alone: the same codes, and the streamed
    # continuation equals this non-streaming decode within one 16-bit LSB
    cfg = str(REPO / "configs" / "generate.yaml")
    monkeypatch.setattr(sys, "argv", ["llama_mimi_generate", "--config", cfg,
                        f"output_dir={tmp_path / 'alone'}", f"prompt_codes=[{codes_pt}]",
                        "num_samples=2", "max_seconds=1.2"])  # fmt: skip
    with pytest.raises(SystemExit) as done:
        recipe.recipe_main()
    assert not done.value.code
    for k in range(2):
        assert torch.equal(
            torch.load(out / f"codes_s{k}_codes.pt"),
            torch.load(tmp_path / "alone" / f"codes_s{k}_codes.pt"),
        )
        streamed, _ = sf.read(str(out / f"codes_s{k}_continuation.wav"))
        whole, _ = sf.read(str(tmp_path / "alone" / f"codes_s{k}_continuation.wav"))
        assert len(streamed) == len(whole) and np.abs(streamed - whole).max() <= 1.5 / 32768

    # a text prompt to a model without a text side: a clear error before anything loads
    monkeypatch.setattr(sys, "argv", ["llama_mimi_generate", "--config", cfg, "prompt_text=hi"])
    with pytest.raises(ValueError, match="has no text side"):
        recipe.recipe_main()


# ---- prompt and setting edge cases (issue 14) ---------------------------------------------------
GENERATE_CFG = str(REPO / "configs" / "generate.yaml")


def shared_codec(path=None, num_quantizers=Q, device="cpu", seed=0):
    """A ``codec._component_`` that reuses one random codec (building one takes seconds)."""
    from llama_mimi_tt.codec import MimiCodec

    if not hasattr(shared_codec, "codec"):
        shared_codec.codec = MimiCodec.random(num_quantizers=Q, seed=0)
    return shared_codec.codec


def _run_generate(monkeypatch, *overrides):
    import llama_mimi_generate as recipe

    argv = ["llama_mimi_generate", "--config", GENERATE_CFG, "num_samples=1", "max_seconds=0.16"]
    argv += ["codec._component_=tests.test_generation.shared_codec", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        recipe.recipe_main()
    return done.value.code


def test_transposed_prompt_codes_are_an_error(tmp_path, codec):
    import llama_mimi_generate as recipe

    from llama_mimi_tt.errors import UserError

    tok = LlamaMimiTokenizer("builtin:byte", num_quantizers=Q)
    for frames in (50, 20):
        torch.save(torch.randint(0, 2048, (frames, Q)), tmp_path / "t.pt")  # [F, Q]
        with pytest.raises(UserError, match=rf"t.pt: expected codes of shape \[4, frames\] for "
                           rf"num_quantizers=4 .* got \[{frames}, 4\]: that looks like "
                           r"\[frames, levels\]; save codes.T instead"):  # fmt: skip
            recipe.build_prompts(_cfg(prompt_codes=[str(tmp_path / "t.pt")]), tok, codec)
    torch.save(torch.randint(0, 2048, (Q, 50)), tmp_path / "ok.pt")
    p = recipe.build_prompts(_cfg(prompt_codes=[str(tmp_path / "ok.pt")]), tok, codec)[0]
    assert p.codes.shape == (Q, 50)


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_samples=0", "num_samples=0 is out of range: it must be at least 1"),
        ("num_samples=-2", "num_samples=-2 is out of range: it must be at least 1"),
        ("num_samples=two", "num_samples='two' is not a whole number"),
        ("batch_size=0", "batch_size=0 is out of range: it must be at least 1"),
        ("max_seconds=0", "max_seconds=0 is out of range: it must be at least 0.08"),
        ("min_new_frames=-1", "min_new_frames=-1 is out of range"),
        ("semantic.top_k=0", "semantic.top_k=0 is out of range: it must be at least 1"),
        ("acoustic.top_p=1.5", "acoustic.top_p=1.5 is out of range: it must be between 0 and 1"),
        ("acoustic.top_p=0", "acoustic: top_p must be in (0, 1], got 0"),
        ("semantic.temperature=-1", "semantic.temperature=-1 is out of range"),
        ("seed=1.5", "seed=1.5 is not a whole number"),
    ],
)
def test_numeric_settings_are_checked_before_loading(monkeypatch, override, message):
    import llama_mimi_generate as recipe

    from llama_mimi_tt.errors import UserError

    monkeypatch.setattr(recipe, "load_model", lambda *a: pytest.fail("the model was loaded"))
    monkeypatch.setattr(recipe.config, "instantiate", lambda *a: pytest.fail("built something"))
    with pytest.raises(UserError, match=re.escape(message)):
        _run_generate(monkeypatch, override)


def test_output_dir_problems_are_checked_before_loading(tmp_path, monkeypatch):
    import llama_mimi_generate as recipe

    from llama_mimi_tt.errors import UserError

    monkeypatch.setattr(recipe.config, "instantiate", lambda *a: pytest.fail("built something"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=f"output_dir {tmp_path / 'f'} is a file, not a folder"):
        _run_generate(monkeypatch, f"output_dir={tmp_path / 'f'}")
    with pytest.raises(UserError, match=r"output_dir .*f/out is not writable \(Not a directory"):
        _run_generate(monkeypatch, f"output_dir={tmp_path / 'f' / 'out'}")


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    from llama_mimi_tt.errors import UserError

    def full(obj, where, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=rf"cannot write {out}/uncond_s0_codes.pt: No space left"):
        _run_generate(monkeypatch, f"output_dir={out}")


def test_prompt_path_that_is_a_folder(tmp_path, codec):
    import llama_mimi_generate as recipe

    from llama_mimi_tt.errors import UserError

    tok = LlamaMimiTokenizer("builtin:byte", num_quantizers=Q)
    with pytest.raises(UserError, match=f"{tmp_path} is a folder, not an audio file"):
        recipe.build_prompts(_cfg(prompt_audio=[str(tmp_path)]), tok, codec)
    with pytest.raises(UserError, match=f"prompt codes {tmp_path} is a folder, not a codes file"):
        recipe.build_prompts(_cfg(prompt_codes=[str(tmp_path)]), tok, codec)


def test_garbage_codes_file_says_what_it_is_not(tmp_path, codec):
    import llama_mimi_generate as recipe

    from llama_mimi_tt.errors import UserError

    tok = LlamaMimiTokenizer("builtin:byte", num_quantizers=Q)
    torch.save({"not": "codes", "obj": object.__new__(SamplingParams)}, tmp_path / "g.pt")
    (tmp_path / "h.pt").write_bytes(b"garbage")
    for name in ("g.pt", "h.pt"):
        with pytest.raises(UserError) as e:
            recipe.build_prompts(_cfg(prompt_codes=[str(tmp_path / name)]), tok, codec)
        assert f"{tmp_path / name} is not a codes file: expected a tensor [Q, frames]" in str(
            e.value
        )
        assert "weights_only" not in str(e.value)
