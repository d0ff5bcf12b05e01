"""GenPPL and Auto-BLEU (SlamKit's definitions) and report.html (plots, audio players, compare)."""

import json
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_mimi_tt.errors import MissingFileError, UserError
from llama_mimi_tt.evaluation import summarize
from llama_mimi_tt.judge import evaluate_generations
from llama_mimi_tt.report import write_report
from llama_mimi_tt.text_metrics import TextLM, auto_bleu, genppl, read_transcripts
from tests.hf_fixtures import make_tiny_hf_llama

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "the cat sat on the mat",
    "I like it, I like it, I like it.",
    "yes yes yes no",
]
# Hand-computed Auto-BLEU (bigrams of NLTK's word tokens):
#   1: the cat | cat sat | sat on | on the | the mat: nothing repeats            -> 0
#   2: I like it , I like it , I like it . -> 11 bigrams; "I like" x3, "like it" x3,
#      "it ," x2, ", I" x2 repeat, "it ." does not                               -> 10/11
#   3: yes yes | yes yes | yes no                                                -> 2/3
AUTO_BLEU = [0.0, 10 / 11, 2 / 3]


@pytest.fixture(scope="module")
def text_lm_dir(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("text_lm"), tokenizer="json", seed=3)


def test_auto_bleu_equals_hand_computed_values():
    assert [auto_bleu(t) for t in TEXTS] == pytest.approx(AUTO_BLEU, abs=1e-12)
    assert auto_bleu("hello") == 0.0 and auto_bleu("") == 0.0  # no bigram: 0, as SlamKit
    assert auto_bleu("a b a b", n=1) == 1.0 and auto_bleu("a b c a", n=1) == 0.5
    with pytest.raises(UserError, match="auto_bleu_n"):
        auto_bleu("a b", n=0)


def test_genppl_equals_a_direct_transformers_computation(text_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = TEXTS + ["a much longer transcript, so that the batch needs padding on the right", ""]
    nlls = TextLM(str(text_lm_dir), batch_size=2).nll(texts)

    tok = AutoTokenizer.from_pretrained(text_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(text_lm_dir, dtype=torch.float32).eval()
    direct = []
    for t in texts[:-1]:  # one text at a time, no padding: mean NLL of every token after BOS
        ids = tok(t, return_tensors="pt").input_ids
        assert ids[0, 0] == tok.bos_token_id and ids.shape[1] > 2
        with torch.no_grad():
            logits = model(ids).logits[0]
        direct.append(float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])))
    assert nlls[-1] is None  # the empty transcript: BOS only, nothing to predict
    assert nlls[:-1] == pytest.approx(direct, abs=1e-4)
    g = genppl(nlls)
    assert g["n"] == 4 and g["empty"] == 1
    assert g["mean"] == pytest.approx(float(np.exp(np.mean(direct))), rel=1e-4)
    assert g["ci_low"] < g["mean"] < g["ci_high"]
    with pytest.raises(MissingFileError, match="config.json"):
        TextLM(str(text_lm_dir / "nowhere"))


def _wav(path: Path, seed: int, seconds: float = 0.5) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(str(path), (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000)
    return str(path)


def _fake_run(run: Path, text_lm, texts, accuracy_shift=0) -> None:
    """An eval output folder as the recipe leaves it: audio under generations/, judgements.jsonl
    (from evaluate_generations with saved transcripts) and results.json."""
    items = [
        {"id": f"utt{i}", "prompt_audio": _wav(run / "generations" / f"utt{i}_prompt.wav", i),
         "continuation_audio": _wav(run / "generations" / f"utt{i}_continuation.wav", 10 + i)}
        for i in range(len(texts))
    ]  # fmt: skip
    transcripts = {f"utt{i}": {"continuation_text": t, "prompt_text": "once upon a time"}
                   for i, t in enumerate(texts)}  # fmt: skip
    gen = evaluate_generations(
        items, run, speaker=lambda w, sr: w[:100] + 1.0, transcripts=transcripts,
        text_lm=text_lm, progress=False,
    )  # fmt: skip
    records = [
        {"suite": suite, "subset": sub, "outcome": float((k + accuracy_shift) % 3 != 0)}
        for suite, subs in [("SALMon", ["gender", "speaker"]), ("sWUGGY", ["dev"])]
        for sub in subs
        for k in range(20)
    ]
    (run / "results.json").write_text(
        json.dumps({"precision": "fp32", "suites": summarize(records), "generation": gen})
    )


def _audio_sources(page: Path) -> list:
    return [unquote(s) for s in re.findall(r'<audio[^>]* src="([^"]+)"', page.read_text())]


def test_saved_transcripts_give_both_metrics_offline(tmp_path, text_lm_dir):
    lm = TextLM(str(text_lm_dir))
    _fake_run(tmp_path / "run", lm, TEXTS)
    gen = json.loads((tmp_path / "run" / "results.json").read_text())["generation"]
    assert gen["auto_bleu"]["mean"] == pytest.approx(sum(AUTO_BLEU) / 3)
    assert gen["auto_bleu"]["n_gram"] == 2 and gen["genppl"]["n"] == 3
    assert gen["genppl"]["mean"] == pytest.approx(genppl(lm.nll(TEXTS))["mean"], rel=1e-6)
    rows = read_transcripts(tmp_path / "run" / "judgements.jsonl")  # a run's output reads back
    assert rows["utt1"]["continuation_text"] == TEXTS[1]
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(UserError, match="line 1: needs the keys id and continuation_text"):
        read_transcripts(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="no continuation_text for id 'utt0'"):
        evaluate_generations([{"id": "utt0", "prompt_audio": "p", "continuation_audio": "c"}],
                             tmp_path / "o", transcripts={}, progress=False)  # fmt: skip


def _check_page(page: Path, runs: int) -> str:
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # works from disk, offline
    for png in ("suites.png", "generation.png"):
        assert f"src='report_files/{png}'" in html
        assert (page.parent / "report_files" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sources = _audio_sources(page)
    assert len(sources) == 3 * (1 + runs)  # a prompt and each run's continuation per sample
    for src in sources:
        assert not Path(src).is_absolute() and (page.parent / src).is_file(), src
    return html


def test_report_of_one_run(tmp_path, text_lm_dir):
    run = tmp_path / "run_a"
    _fake_run(run, TextLM(str(text_lm_dir)), TEXTS)
    page = write_report([run], run)
    html = _check_page(page, runs=1)
    for text in ["SALMon / gender", "sWUGGY", "GenPPL", "Auto-BLEU", "Speaker similarity",
                 "I like it, I like it, I like it.", "once upon a time", "Auto-BLEU 0.91"]:  # fmt: skip
        assert text in html, text


def test_recipe_writes_the_report_and_compares_two_runs(tmp_path, monkeypatch, text_lm_dir):
    from tests.test_eval import _recipe, pattern_codes, shuffled, write_codes_wav

    for k in range(3):
        write_codes_wav(tmp_path / "prompts" / f"utt{k}.wav", pattern_codes(20, phase=k))
        pos = pattern_codes(4 + k, phase=k)
        write_codes_wav(tmp_path / "sSC" / f"{2 * k}_story{k}_correct.wav", pos)
        write_codes_wav(tmp_path / "sSC" / f"{2 * k + 1}_story{k}_incorrect.wav", shuffled(pos, k))
    transcripts = tmp_path / "transcripts.jsonl"
    transcripts.write_text("".join(json.dumps({"id": f"utt{i}", "continuation_text": t}) + "\n"
                                   for i, t in enumerate(TEXTS)))  # fmt: skip
    config = ["llama_mimi_eval", "--config", str(ROOT / "configs" / "eval.yaml")]
    out = tmp_path / "run_a"
    monkeypatch.setattr(sys, "argv", config + [
        f"output_dir={out}", "codec._component_=tests.test_eval.FakeCodec",
        f"suites.sstorycloze.path={tmp_path / 'sSC'}", f"generation.prompts={tmp_path / 'prompts'}", "generation.prompt_seconds=1.0",
        "generation.max_new_seconds=0.4", "generation.min_new_frames=2",
        f"generation.transcripts={transcripts}", f"generation.genppl_model={text_lm_dir}",
        "generation.speaker._component_=tests.test_eval.FakeSpeaker",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as done:
        _recipe().recipe_main()
    assert not done.value.code
    gen = json.loads((out / "results.json").read_text())["generation"]
    assert gen["auto_bleu"]["mean"] == pytest.approx(sum(AUTO_BLEU) / 3)
    assert gen["genppl"]["n"] == 3 and gen["genppl"]["mean"] > 1
    assert "<audio" in (out / "report.html").read_text()

    # a second run to compare: the same folder, another transcript for utt1
    run_b = tmp_path / "run_b"
    shutil.copytree(out, run_b)
    rows = [json.loads(x) for x in (run_b / "judgements.jsonl").read_text().splitlines()]
    rows[1]["continuation_text"] = "a different continuation of run b"
    rows = [{**r, "continuation_audio": str(run_b / "generations" / Path(r["continuation_audio"]).name)}
            for r in rows]  # fmt: skip
    (run_b / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    both = tmp_path / "a_vs_b"
    monkeypatch.setattr(sys, "argv", config + [f"output_dir={both}", f"compare=[{out},{run_b}]"])
    with pytest.raises(SystemExit) as done:
        _recipe().recipe_main()
    assert not done.value.code
    html = _check_page(both / "report.html", runs=2)
    assert "run_a vs run_b" in html and TEXTS[1] in html and "of run b" in html
    srcs = _audio_sources(both / "report.html")
    assert {s.split("/")[1] for s in srcs} == {"run_a", "run_b"}  # ../run_x/generations/...

    monkeypatch.setattr(sys, "argv", config + [f"output_dir={both}", f"compare=[{out}]"])
    with pytest.raises(UserError, match="two or more"):
        _recipe().recipe_main()
