"""Likelihood benchmarks: scoring, ties, batching, the published layouts and the recipe.

A tiny Llama-Mimi is trained inline for a few AdamW steps on a repeating code pattern; positives
follow the pattern, negatives shuffle it, so a correct scorer must get every pair right.
Audio goes through ``FakeCodec``, which reads codes straight out of the samples, so the test
wav files encode exactly the codes we want and no Mimi is needed.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from llama_mimi_tt import llama_mimi_tiny, llama_mimi_tokenizer
from llama_mimi_tt.benchmarks import (
    LayoutError,
    Pair,
    read_salmon,
    read_sblimp,
    read_storycloze,
    read_suite,
    read_swuggy,
)
from llama_mimi_tt.evaluation import (
    encode_audio_files,
    format_table,
    pair_outcome,
    score_pairs,
    score_sequences,
    scored_positions,
    summarize,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
Q, P = 4, 5  # levels, pattern period in frames
SR, FRAME = 24000, 1920
PATTERN = torch.randint(0, 2048, (Q, P), generator=torch.Generator().manual_seed(0))


def pattern_codes(frames: int, phase: int = 0) -> torch.Tensor:
    return PATTERN[:, (torch.arange(frames) + phase) % P]


def shuffled(codes: torch.Tensor, seed: int) -> torch.Tensor:
    """Each level permuted on its own: breaks the frame-to-frame and within-frame structure."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in codes])


class FakeCodec:
    """Codes read from the samples: level q of frame f is ``round(wave[f * 1920 + q] * 2048)``.
    Same interface as ``MimiCodec`` for what evaluation uses."""

    sample_rate = SR
    num_quantizers = Q

    def __init__(self, *args, **kwargs):
        self.calls = 0

    def encode_batch(self, waves, sample_rate, batch_size=8, names=None):
        assert sample_rate == SR
        self.calls += 1
        out = []
        for w in waves:
            w = torch.as_tensor(w).flatten()
            f = w.numel() // FRAME
            idx = torch.arange(f)[None, :] * FRAME + torch.arange(Q)[:, None]
            out.append(torch.round(w[idx] * 2048).long().clamp(0, 2047))
        return out

    def encode(self, wave, sample_rate):
        return self.encode_batch([wave], sample_rate)[0]

    def decode(self, codes):
        codes = torch.as_tensor(codes)
        wave = torch.zeros(codes.shape[1] * FRAME)
        idx = torch.arange(codes.shape[1])[None, :] * FRAME + torch.arange(Q)[:, None]
        wave[idx.flatten()] = codes.flatten().float() / 2048
        return wave[None]


class FakeASR:
    def __init__(self, **kwargs):
        pass

    def __call__(self, wave, sample_rate):
        return f"{len(wave)} samples of words"


class FakeSpeaker:
    def __init__(self, **kwargs):
        pass

    def __call__(self, wave, sample_rate):
        return torch.tensor([1.0, float(wave.abs().mean())])


def write_codes_wav(path: Path, codes: torch.Tensor) -> Path:
    wave = np.zeros(codes.shape[1] * FRAME, dtype=np.float32)
    for f in range(codes.shape[1]):
        wave[f * FRAME : f * FRAME + Q] = codes[:, f].numpy() / 2048
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, SR, subtype="FLOAT")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return llama_mimi_tokenizer("builtin:byte", num_quantizers=Q)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """llama_mimi_tiny after 25 AdamW steps on the pattern (about 2 s on one core)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = llama_mimi_tiny(num_quantizers=Q, max_seq_len=512)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        phases = torch.randint(0, P, (4,), generator=g).tolist()
        batch = torch.tensor([tokenizer.tokenize(pattern_codes(10, ph))[0] for ph in phases])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def synthetic_pairs(n: int = 8):
    pairs, codes = [], {}
    for i in range(n):
        frames = 6 + i  # unequal lengths across pairs
        pos = pattern_codes(frames, phase=i)
        pairs.append(Pair("synthetic", "all", str(i), f"pos{i}", f"neg{i}"))
        codes[f"pos{i}"], codes[f"neg{i}"] = pos, shuffled(pos, seed=i)
    return pairs, codes


# ---- scoring ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mean", "sum", "semantic"])
def test_trained_model_gets_every_pair_right(trained, tokenizer, mode):
    pairs, codes = synthetic_pairs()
    records = score_pairs(trained, tokenizer, pairs, codes, batch_size=5, mode=mode, progress=False)
    summary = summarize(records)["synthetic"]
    assert summary["overall"] == {
        "pairs": 8, "accuracy": 1.0, "ties": 0, "accuracy_ties_as_wrong": 1.0, "skipped": 0
    }  # fmt: skip
    assert all(r["score_positive"] > r["score_negative"] for r in records)


def test_untrained_model_is_not_perfect(tokenizer):
    torch.manual_seed(0)
    pairs, codes = synthetic_pairs()
    records = score_pairs(llama_mimi_tiny(), tokenizer, pairs, codes, progress=False)
    assert summarize(records)["synthetic"]["overall"]["accuracy"] < 1.0


def test_batched_equals_one_at_a_time_and_full_logits(trained, tokenizer):
    g = torch.Generator().manual_seed(3)
    seqs, spans = [], []
    for frames in (3, 9, 1, 6):  # unequal lengths: right padding in every batch
        ids, a = tokenizer.tokenize(torch.randint(0, 2048, (Q, frames), generator=g))
        seqs.append(ids)
        spans.append((a + 1, a + 1 + frames * Q))
    vocab = tokenizer.vocab
    with torch.no_grad():  # plain full logits, one sequence at a time
        logprobs = [trained(torch.tensor(s)[None]).log_softmax(-1)[0].double() for s in seqs]
    for mode in ("mean", "sum", "semantic"):
        for markers in (False, True):
            kw = dict(mode=mode, include_markers=markers)
            batched = score_sequences(trained, seqs, spans, vocab, batch_size=3, **kw)
            single = torch.cat([
                score_sequences(trained, [s], [sp], vocab, batch_size=1, **kw)
                for s, sp in zip(seqs, spans)
            ])  # fmt: skip
            torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
            ref = []
            for s, span, lp in zip(seqs, spans, logprobs):
                pos = scored_positions(span, len(s), Q, mode, markers)
                v = lp[pos - 1, torch.tensor(s)[pos]]
                ref.append(v.sum() if mode == "sum" else v.mean())
            torch.testing.assert_close(batched, torch.stack(ref), rtol=1e-5, atol=1e-5)


def test_scored_positions_match_the_reference_label_strides():
    # <bos> <audio> 3 frames of Q=4 </audio>: span (2, 14), length 15
    assert scored_positions((2, 14), 15, 4, "mean").tolist() == list(range(2, 14))
    assert scored_positions((2, 14), 15, 4, "mean", True).tolist() == list(range(1, 15))
    assert scored_positions((2, 14), 15, 4, "semantic").tolist() == [2, 6, 10]
    # the reference's sLM21 / StoryCloze labels: positions 2::Q, which include </audio>
    assert scored_positions((2, 14), 15, 4, "semantic", True).tolist() == list(range(2, 15, 4))
    with pytest.raises(ValueError, match="whole number of frames"):
        scored_positions((2, 13), 15, 4)
    with pytest.raises(ValueError, match="mode"):
        scored_positions((2, 14), 15, 4, "median")


def test_ties_and_unequal_lengths_as_documented(trained, tokenizer):
    long = pattern_codes(16)
    pairs = [
        Pair("s", "ties", "same", "a", "a_copy"),  # identical audio: an exact tie
        Pair("s", "lengths", "prefix", "long", "short"),  # negative = first 2 frames of positive
    ]
    codes = {"a": long, "a_copy": long.clone(), "long": long, "short": long[:, :2]}
    mean = {r["pair_id"]: r for r in score_pairs(trained, tokenizer, pairs, codes, batch_size=1,
                                                 progress=False)}  # fmt: skip
    total = {r["pair_id"]: r for r in score_pairs(trained, tokenizer, pairs, codes, mode="sum",
                                                  progress=False)}  # fmt: skip
    # a tie counts 0.5 and is reported; it is a miss for the strict (llm-jp) accuracy
    assert mean["same"]["score_positive"] == mean["same"]["score_negative"]
    assert mean["same"]["outcome"] == 0.5
    stats = summarize(list(mean.values()))["s"]["subsets"]["ties"]
    assert stats == {"pairs": 1, "accuracy": 0.5, "ties": 1, "accuracy_ties_as_wrong": 0.0,
                     "skipped": 0}  # fmt: skip
    # unequal lengths: the token mean is length-normalised, the sum favours the shorter sample
    assert (mean["prefix"]["frames_positive"], mean["prefix"]["frames_negative"]) == (16, 2)
    assert mean["prefix"]["outcome"] == 1.0
    assert total["prefix"]["outcome"] == 0.0
    # a tolerance turns near-equal scores into ties
    assert pair_outcome(-1.0, -1.0 - 1e-9) == 1.0
    assert pair_outcome(-1.0, -1.0 - 1e-9, tie_tolerance=1e-6) == 0.5


def test_bad_spans_are_errors(tokenizer):
    model = llama_mimi_tiny()
    ids, a = tokenizer.tokenize(pattern_codes(3))
    with pytest.raises(ValueError, match="not the level"):
        score_sequences(model, [ids], [(a, a + 12)], tokenizer.vocab)  # span starts at <audio>
    with pytest.raises(ValueError, match="audio spans"):
        score_sequences(model, [ids], [], tokenizer.vocab)


# ---- layouts ---------------------------------------------------------------------------------
def _tiny_wav(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(str(path), (rng.standard_normal(2400) * 0.1).astype(np.float32), SR)
    return path


def test_salmon_layout(tmp_path):
    root = tmp_path / "download"
    for subset in ("speaker_consistency", "bg_alignment"):
        for i in (0, 1, 10):  # 10 sorts before 2 as a string: indices are parsed as numbers
            for opt in (0, 1):
                _tiny_wav(root / "salmon_benchmark" / subset / f"sample_{i}_{opt}.wav")
    pairs = read_salmon(root, subsets=["speaker_consistency", "bg_alignment"])
    assert [(p.subset, p.pair_id) for p in pairs][:3] == [
        ("speaker_consistency", "0"), ("speaker_consistency", "1"), ("speaker_consistency", "10")
    ]  # fmt: skip
    assert all(p.positive.endswith("_0.wav") and p.negative.endswith("_1.wav") for p in pairs)
    assert read_suite("SALMon", root, subsets=["bg_alignment"])[0].suite == "SALMon"
    with pytest.raises(
        LayoutError,
        match=r"folders bg_all_consistency, .*rir_consistency.* are missing.*sample_<index>_<option>",
    ):
        read_salmon(root)  # all eight subsets by default
    (root / "salmon_benchmark" / "bg_alignment" / "sample_10_1.wav").unlink()
    with pytest.raises(LayoutError, match="sample 10 has options"):
        read_salmon(root, subsets=["bg_alignment"])
    _tiny_wav(tmp_path / "flat" / "speaker_consistency" / "positive_0.wav")
    with pytest.raises(LayoutError, match="unexpected file name"):
        read_salmon(tmp_path / "flat", subsets=["speaker_consistency"])
    with pytest.raises(LayoutError, match="does not exist"):
        read_salmon(tmp_path / "nowhere")


def _slm21(root: Path, task: str, rows):
    folder = root / task / "dev"
    folder.mkdir(parents=True, exist_ok=True)
    if task == "lexical":  # the published column order
        header = "filename,id,voice,frequency,word,phones,length,correct"
        lines = [f"{f},{i},{v},3,{w},p h o,3,{c}" for f, i, v, w, c in rows]
    else:
        header = "filename,type,subtype,id,voice,transcription,correct"
        lines = [f"{f},{t},sub,{i},{v},some words,{c}" for f, t, i, v, c in rows]
    (folder / "gold.csv").write_text("\n".join([header] + lines) + "\n")
    for r in rows:
        _tiny_wav(folder / f"{r[0]}.wav")


def test_zerospeech_slm21_layouts(tmp_path):
    root = tmp_path / "zerospeech2021"
    _slm21(root, "lexical", [
        ("aBc", "1", "Alex", "brick", 1), ("xYz", "1", "Alex", "blick", 0),
        ("qQq", "1", "Bruce", "brick", 1), ("wWw", "1", "Bruce", "blick", 0),
        ("eEe", "2", "Alex", "dog", 0), ("rRr", "2", "Alex", "dog", 1),
    ])  # fmt: skip
    _slm21(root, "syntactic", [
        ("s1", "anaphor_agreement", "7", "Alex", 1), ("s2", "anaphor_agreement", "7", "Alex", 0),
        ("s3", "island_effects", "8", "Alex", 0), ("s4", "island_effects", "8", "Alex", 1),
    ])  # fmt: skip
    lex = read_swuggy(root)
    assert [(p.pair_id, Path(p.positive).stem, Path(p.negative).stem) for p in lex] == [
        ("1/Alex", "aBc", "xYz"), ("1/Bruce", "qQq", "wWw"), ("2/Alex", "rRr", "eEe")
    ]  # fmt: skip
    assert {p.suite for p in lex} == {"sWUGGY"}
    syn = read_sblimp(root / "syntactic")  # the task folder works too
    assert [(p.subset, Path(p.positive).stem) for p in syn] == [
        ("anaphor_agreement", "s1"), ("island_effects", "s4")
    ]  # fmt: skip
    assert read_suite("sblimp", root / "syntactic" / "dev") == syn  # and the split folder
    with pytest.raises(LayoutError, match=r"lexical/test/gold.csv.*not public"):
        read_swuggy(root, split="test")
    (root / "lexical" / "dev" / "qQq.wav").unlink()
    with pytest.raises(LayoutError, match=r"qQq.wav \(listed in"):
        read_swuggy(root)
    _slm21(tmp_path / "bad", "lexical", [("a", "1", "Alex", "w", 1), ("b", "1", "Alex", "w", 1)])
    with pytest.raises(LayoutError, match="2 correct and 0 incorrect"):
        read_swuggy(tmp_path / "bad")
    (tmp_path / "cols" / "lexical" / "dev").mkdir(parents=True)
    (tmp_path / "cols" / "lexical" / "dev" / "gold.csv").write_text("file,label\na,1\n")
    with pytest.raises(LayoutError, match=r"lacks the columns \['filename', 'id', 'voice'"):
        read_swuggy(tmp_path / "cols")


def test_storycloze_layout(tmp_path):
    story_ids = ["138d5bfb-05cc-41e3-bf2c-fa85ebad14e2", "b929f263-1dcd-4a0b-b267-5d5ff2fe65bb"]
    for k, sid in enumerate(story_ids):
        _tiny_wav(tmp_path / "tSC" / f"{2 * k}_{sid}_correct.wav")
        _tiny_wav(tmp_path / "tSC" / f"{2 * k + 1}_{sid}_incorrect.wav")
    pairs = read_storycloze(tmp_path, "tStoryCloze")  # the folder holding tSC works too
    assert [p.pair_id for p in pairs] == story_ids
    assert all("_correct" in p.positive and "_incorrect" in p.negative for p in pairs)
    assert read_suite("tstorycloze", tmp_path / "tSC") == pairs
    _tiny_wav(tmp_path / "sSC" / "0_abc_correct.wav")
    _tiny_wav(tmp_path / "sSC" / "1_other_incorrect.wav")
    with pytest.raises(LayoutError, match="has no negative 1_abc_incorrect.wav"):
        read_storycloze(tmp_path / "sSC")
    _tiny_wav(tmp_path / "wrong" / "story_positive.wav")
    with pytest.raises(LayoutError, match=r"unexpected file name.*<n>_<story id>_correct.wav"):
        read_suite("sstorycloze", tmp_path / "wrong")
    with pytest.raises(ValueError, match="unknown suite"):
        read_suite("hellaswag", tmp_path)


def test_a_kill_while_replacing_the_cache_never_reuses_old_codes(tmp_path, monkeypatch):
    paths = [tmp_path / f"{i}.wav" for i in range(3)]
    for i, p in enumerate(paths):
        write_codes_wav(p, pattern_codes(4 + i, phase=i))
    codec, cache = FakeCodec(), tmp_path / "codes"
    encode_audio_files(paths, codec, cache_dir=cache, save_every=1, progress=False)
    write_codes_wav(paths[0], pattern_codes(7, phase=2))  # changed: the cache must be replaced

    real_unlink, deleted = Path.unlink, []

    def unlink_then_die(self, missing_ok=False):  # kill -9 right after the first deletion
        real_unlink(self, missing_ok=missing_ok)
        deleted.append(self.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", unlink_then_die)
    with pytest.raises(KeyboardInterrupt):
        encode_audio_files(paths, codec, cache_dir=cache, save_every=1, progress=False)
    monkeypatch.undo()
    assert deleted and deleted[0] != "plan.json"  # the plan, which names the shards, goes last
    codes, _ = encode_audio_files(paths, codec, cache_dir=cache, save_every=1, progress=False)
    assert torch.equal(codes[str(paths[0])].long(), pattern_codes(7, phase=2))
    assert torch.equal(codes[str(paths[1])].long(), pattern_codes(5, phase=1))


# ---- audio -> codes -> accuracy, end to end ----------------------------------------------------
def test_salmon_folder_end_to_end_with_code_cache(trained, tokenizer, tmp_path):
    root = tmp_path / "salmon"
    subsets = ["sentiment_consistency", "speaker_consistency"]
    for s, subset in enumerate(subsets):
        for i in range(3):
            pos = pattern_codes(5 + 2 * i, phase=i + s)
            write_codes_wav(root / subset / f"sample_{i}_0.wav", pos)
            write_codes_wav(root / subset / f"sample_{i}_1.wav", shuffled(pos, 10 * s + i))
    (root / subsets[1] / "sample_3_0.wav").write_bytes(b"not audio")  # unreadable: skipped
    write_codes_wav(root / subsets[1] / "sample_3_1.wav", pattern_codes(4))
    pairs = read_salmon(root, subsets=subsets)
    paths = [p for pair in pairs for p in (pair.positive, pair.negative)]
    codec, cache = FakeCodec(), tmp_path / "codes"
    codes, errors = encode_audio_files(paths, codec, cache_dir=cache, progress=False)
    assert list(errors) == [str(root / subsets[1] / "sample_3_0.wav")]
    assert torch.equal(codes[pairs[0].positive].long(), pattern_codes(5, phase=0))
    calls = codec.calls
    again, _ = encode_audio_files(paths, codec, cache_dir=cache, progress=False)
    assert codec.calls == calls and again.keys() == codes.keys()  # second run: from the cache
    write_codes_wav(root / subsets[0] / "sample_0_0.wav", pattern_codes(6, phase=3))  # changed
    changed, _ = encode_audio_files(paths, codec, cache_dir=cache, progress=False)
    assert codec.calls > calls and changed.keys() == codes.keys()
    assert torch.equal(changed[pairs[0].positive].long(), pattern_codes(6, phase=3))

    records = score_pairs(trained, tokenizer, pairs, codes, batch_size=4, progress=False)
    summary = summarize(records)
    salmon = summary["SALMon"]
    assert salmon["subsets"]["sentiment_consistency"]["accuracy"] == 1.0
    assert salmon["subsets"]["speaker_consistency"] == {
        "pairs": 3, "accuracy": 1.0, "ties": 0, "accuracy_ties_as_wrong": 1.0, "skipped": 1
    }  # fmt: skip
    assert salmon["overall"]["pairs"] == 6 and salmon["macro_accuracy"] == 1.0
    table = format_table(summary)
    assert "speaker_consistency" in table and "(1 skipped)" in table and "100.0" in table
    res, lines = write_results(tmp_path / "out", summary, records, {"model": "tiny"})
    assert json.loads(res.read_text())["suites"]["SALMon"]["overall"]["accuracy"] == 1.0
    assert len(lines.read_text().splitlines()) == 7


# ---- the recipe ------------------------------------------------------------------------------
def _recipe():
    spec = importlib.util.spec_from_file_location(
        "llama_mimi_eval_under_test", ROOT / "recipes" / "llama_mimi_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_runs_a_suite_and_names_the_layout_on_error(tmp_path, monkeypatch, capsys):
    for k in range(3):
        pos = pattern_codes(4 + k, phase=k)
        write_codes_wav(tmp_path / "sSC" / f"{2 * k}_story{k}_correct.wav", pos)
        write_codes_wav(tmp_path / "sSC" / f"{2 * k + 1}_story{k}_incorrect.wav", shuffled(pos, k))
    out = tmp_path / "out"
    args = [
        "llama_mimi_eval", "--config", str(ROOT / "configs" / "eval.yaml"),
        f"output_dir={out}", f"suites.sstorycloze.path={tmp_path / 'sSC'}", "batch_size=4",
        "codec._component_=tests.test_eval.FakeCodec",
    ]  # fmt: skip
    recipe = _recipe()
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as done:  # torchtune's config.parse exits with the result
        recipe.recipe_main()
    assert not done.value.code
    printed = capsys.readouterr().out
    assert "sStoryCloze" in printed and "overall" in printed
    results = json.loads((out / "results.json").read_text())
    st = results["suites"]["sStoryCloze"]
    assert st["overall"]["pairs"] == 3 and st["mode"] == "semantic" and st["include_markers"]
    assert 0.0 <= st["overall"]["accuracy"] <= 1.0
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 3
    assert list((out / "codes").glob("sstorycloze-*/cache.json"))

    monkeypatch.setattr(sys, "argv", args[:4] + [f"suites.salmon.path={tmp_path / 'sSC'}"])
    with pytest.raises(LayoutError, match=r"Expected layout: SALMon.*sample_<index>_<option>.wav"):
        recipe.recipe_main()
    monkeypatch.setattr(sys, "argv", args[:4])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        recipe.recipe_main()


def test_recipe_generation_quality_with_a_local_judge(tmp_path, monkeypatch):
    from tests.test_judge import ChatServer

    for k in range(3):
        write_codes_wav(tmp_path / "prompts" / f"utt{k}.wav", pattern_codes(20, phase=k))
    out = tmp_path / "out"
    with ChatServer(default=("reply", '{"score": 6, "reason": "on topic"}')) as srv:
        args = [
            "llama_mimi_eval", "--config", str(ROOT / "configs" / "eval.yaml"),
            f"output_dir={out}", "codec._component_=tests.test_eval.FakeCodec",
            f"generation.prompts={tmp_path / 'prompts'}", "generation.prompt_seconds=1.0",
            "generation.max_new_seconds=0.8", "generation.min_new_frames=2",
            "generation.batch_size=2",
            "generation.asr._component_=tests.test_eval.FakeASR",
            "generation.speaker._component_=tests.test_eval.FakeSpeaker",
            "generation.judge._component_=llama_mimi_tt.judge.ChatJudge",
            f"generation.judge.base_url={srv.base_url}", "generation.judge.model=judge-model",
            "generation.judge.api_key_env=null",
        ]  # fmt: skip
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as done:
            _recipe().recipe_main()
        assert not done.value.code
    gen = json.loads((out / "results.json").read_text())["generation"]
    judged = gen["llm_judge"]["n"] + gen["llm_judge"]["failed"]
    assert judged + gen["no_continuation"] == 3 and gen["llm_judge"]["failed"] == 0
    assert gen["llm_judge"]["mean"] == 6.0 and gen["speaker_similarity"]["n"] == judged
    rows = [json.loads(x) for x in (out / "judgements.jsonl").read_text().splitlines()]
    assert len(rows) == judged and all(r["judge_score"] == 6 for r in rows)
    for r in rows:  # the prompt cut to 1 s, the continuation at most 0.8 s (10 frames)
        assert sf.info(r["prompt_audio"]).frames == SR
        assert 2 * FRAME <= sf.info(r["continuation_audio"]).frames <= 10 * FRAME


def test_recipe_scores_equal_the_reference_scripts_loss(tmp_path, monkeypatch):
    """With a Llama-Mimi checkpoint in HF format, a pair's scores are minus the loss the
    llm-jp/llama-mimi scripts compute with transformers: ``model(ids, labels).loss`` with every
    label (SALMon) or labels at ``2::Q`` (sWUGGY, sBLIMP, StoryCloze)."""
    from transformers import AutoModelForCausalLM

    from tests.hf_fixtures import make_tiny_hf_llama

    ckpt = make_tiny_hf_llama(tmp_path / "llama-mimi", extended_num_quantizers=Q, tokenizer="json")
    for k in range(2):
        pos = pattern_codes(3 + 2 * k, phase=k)
        write_codes_wav(tmp_path / "sSC" / f"{2 * k}_s{k}_correct.wav", pos)
        write_codes_wav(tmp_path / "sSC" / f"{2 * k + 1}_s{k}_incorrect.wav", shuffled(pos, k))
        write_codes_wav(tmp_path / "salmon" / "rir_consistency" / f"sample_{k}_0.wav", pos)
        write_codes_wav(tmp_path / "salmon" / "rir_consistency" / f"sample_{k}_1.wav", pos[:, :2])
    out = tmp_path / "out"
    args = [
        "llama_mimi_eval", "--config", str(ROOT / "configs" / "eval.yaml"),
        f"output_dir={out}", "codec._component_=tests.test_eval.FakeCodec", "batch_size=3",
        f"suites.sstorycloze.path={tmp_path / 'sSC'}",
        f"suites.salmon.path={tmp_path / 'salmon'}", "suites.salmon.subsets=[rir_consistency]",
        f"tokenizer.path={ckpt}",
        "checkpointer._component_=llama_mimi_tt.LlamaMimiCheckpointer",
        f"checkpointer.checkpoint_dir={ckpt}", "checkpointer.checkpoint_files=[model.safetensors]",
        "checkpointer.model_type=LLAMA3_2", f"checkpointer.output_dir={tmp_path / 'ckpt_out'}",
        f"checkpointer.num_quantizers={Q}", "checkpointer.text_vocab_size=512",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as done:
        _recipe().recipe_main()
    assert not done.value.code
    records = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(records) == 4

    hf = AutoModelForCausalLM.from_pretrained(ckpt).float().eval()
    tok = llama_mimi_tokenizer(str(ckpt), num_quantizers=Q)
    codec = FakeCodec()

    def reference_loss(path, every_label):
        wave = torch.from_numpy(sf.read(path, dtype="float32")[0])
        ids = torch.tensor([tok.tokenize(codec.encode(wave, SR))[0]])
        labels = ids.clone()
        if not every_label:  # eval/sLM21.py and eval/sStoryCloze.py
            keep = torch.zeros_like(labels)
            keep[:, 2::Q] = 1
            labels[keep == 0] = -100
        with torch.no_grad():
            return float(hf(input_ids=ids, labels=labels).loss)

    for r in records:
        every = r["suite"] == "SALMon"  # eval/salmon.py: labels are the whole sequence
        for side in ("positive", "negative"):
            ref = -reference_loss(r[side], every)
            assert r[f"score_{side}"] == pytest.approx(ref, abs=1e-4), (r["suite"], side)


# ---- setting and output edge cases (issue 14) ---------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=0", "batch_size=0 is out of range: it must be at least 1"),
        ("encode_batch_size=-1", "encode_batch_size=-1 is out of range"),
        ("tie_tolerance=-0.5", "tie_tolerance=-0.5 is out of range: it must be at least 0"),
        ("suites.salmon.max_pairs=0", "suites.salmon.max_pairs=0 is out of range"),
        ("generation.top_k=0", "generation.top_k=0 is out of range: it must be at least 1"),
        ("generation.max_new_seconds=abc", "generation.max_new_seconds='abc' is not a number"),
    ],
)
def test_recipe_numeric_settings_are_checked_first(tmp_path, monkeypatch, override, message):
    from llama_mimi_tt.errors import UserError

    recipe = _recipe()
    monkeypatch.setattr(recipe, "read_suites", lambda cfg: pytest.fail("read the suites"))
    args = ["llama_mimi_eval", "--config", str(ROOT / "configs" / "eval.yaml"), override]
    monkeypatch.setattr(sys, "argv", args + [f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=re.escape(message)):
        recipe.recipe_main()


def test_recipe_output_dir_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    from llama_mimi_tt.errors import UserError

    recipe = _recipe()
    monkeypatch.setattr(recipe, "load_model", lambda *a: pytest.fail("the model was loaded"))
    write_codes_wav(tmp_path / "sSC" / "0_s_correct.wav", pattern_codes(4))
    write_codes_wav(tmp_path / "sSC" / "1_s_incorrect.wav", pattern_codes(4, 1))
    (tmp_path / "taken").write_text("a file")
    args = ["llama_mimi_eval", "--config", str(ROOT / "configs" / "eval.yaml")]
    args += [f"suites.sstorycloze.path={tmp_path / 'sSC'}", f"output_dir={tmp_path / 'taken'}"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(UserError, match=f"output_dir {tmp_path / 'taken'} is a file, not a folder"):
        recipe.recipe_main()
