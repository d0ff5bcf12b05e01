"""Preference alignment: pairs made by sampling and scoring (a local LLM judge over HTTP), and
DPO that measurably moves a tiny Llama-Mimi towards what the pairs prefer, at a bounded cost in
held-out audio loss; its output loads like any checkpoint."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_mimi_tt import LlamaMimiCheckpointer, MimiVocab, generate, llama_mimi_tiny
from llama_mimi_tt.code_cache import write_code_cache
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.generation import SamplingParams
from llama_mimi_tt.preference import read_pairs, select_pairs, write_pairs
from llama_mimi_tt.training import validate
from scripts.tiny_base import write_tiny_base_llama
from tests.test_judge import ChatServer
from tests.test_recipes import learnable_utts, load_cfg, overrides

VOCAB = MimiVocab(text_vocab_size=512, num_quantizers=4)
CLIPS = Path(__file__).resolve().parents[1] / "demo" / "clips"


def preferred_codes(model) -> torch.Tensor:
    """The learnable preference: level-0 codes on one side of a fixed random hyperplane through
    the model's (frozen, tied) level-0 embeddings, about half of them. An arbitrary half of 2048
    random embeddings is not linearly separable in 128 dimensions, so no LoRA could learn to
    prefer it; this half is, by adding a constant direction to the final hidden state."""
    rows = model.tok_embeddings.weight.detach()[VOCAB.audio_offset : VOCAB.audio_start_id : 4]
    w = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0))
    return (rows - rows.mean(0)) @ w > 0


def in_subset(codes: torch.Tensor, preferred: torch.Tensor) -> float:
    """The share of a continuation's level-0 (semantic) codes that are preferred."""
    return preferred[codes[0]].float().mean().item() if codes.shape[1] else 0.0


class FakeASR:
    """A stand-in ASR: a 'transcript' that depends on the audio, so samples differ."""

    def __call__(self, wave, sample_rate):
        return f"sample {int(wave.abs().sum().item() * 1000) % 97}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama-Mimi trained on the learnable codes (its audio rows are trained)."""
    import llama_mimi_full

    d = tmp_path_factory.mktemp("dpo")
    write_code_cache(d / "codes", learnable_utts(), num_quantizers=4, shard_size=4)
    write_tiny_base_llama(d / "base")
    cfg = load_cfg("tiny_full", overrides(d, d / "sft", epochs=3, batch_size=2))
    llama_mimi_full.train(cfg)
    steps = sorted((d / "sft").glob("step_*"), key=lambda p: int(p.name[5:]))
    return d, steps[-1]


def load_tiny(folder: Path) -> torch.nn.Module:
    model = llama_mimi_tiny(num_quantizers=4)
    ckpt = LlamaMimiCheckpointer(str(folder), num_quantizers=4, text_vocab_size=512)
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    return model.eval()


def sample(model, prompts, n, seed, frames=12):
    """``n`` continuations of each prompt (codes [Q, F]), seeds ``seed + i * n + k``, all in one
    batch (the sampler gives batch == single)."""
    params = SamplingParams(temperature=1.0, top_k=None)
    ids = [torch.tensor([256, VOCAB.audio_start_id, *VOCAB.encode(p).tolist()]) for p in prompts]
    r = generate(model, [x for x in ids for _ in range(n)], VOCAB, max_new_frames=frames,
                 semantic=params, acoustic=params, seed=list(range(seed, seed + n * len(ids))),
                 min_new_frames=frames)  # fmt: skip
    return [[r.new_codes(i * n + k) for k in range(n)] for i in range(len(ids))]


def dpo_args(d: Path, out: Path, **extra):
    """Command-line overrides of tiny_dpo for this test's folders."""
    args = {"cache_dir": str(d / "codes"), "output_dir": str(out), "shuffle": False, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def test_dpo_moves_the_model_towards_the_preferred_codes(trained, tmp_path):
    import llama_mimi_dpo
    import llama_mimi_full

    d, sft = trained
    # prompts: 4 frames from several places of each training utterance
    utts = learnable_utts()
    prompts = [torch.as_tensor(u["codes"][:, o : o + 4].astype(np.int64)) for u in utts
               for o in range(0, 18, 3)]  # fmt: skip
    base = load_tiny(sft)
    preferred = preferred_codes(base)
    samples = {
        f"p{i}": [{"codes": c, "prompt_codes": prompts[i], "score": in_subset(c, preferred)}
                  for c in group]
        for i, group in enumerate(sample(base, prompts, n=8, seed=0))
    }  # fmt: skip
    pairs = select_pairs(samples, min_margin=0.1)
    assert len(pairs) >= 60
    write_pairs(tmp_path / "pairs.jsonl", pairs)

    cfg = load_cfg(
        "tiny_dpo",
        dpo_args(d, tmp_path / "dpo", base_dir=sft, pairs=tmp_path / "pairs.jsonl", epochs=3,
                 batch_size=4, **{"optimizer.lr": 1e-3, "validation.every_n_steps": 1000}),
    )  # fmt: skip
    recipe = llama_mimi_dpo.LlamaMimiDPORecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    val = (recipe._model, recipe._val_dataloader, recipe._loss_fn, recipe._device)
    val_before = validate(*val)["val_loss"]
    recipe.train()
    val_after = validate(*val)["val_loss"]
    recipe.cleanup()
    log = "".join(p.read_text() for p in (tmp_path / "dpo" / "logs").glob("log_*.txt"))
    accuracies = [float(a) for a in re.findall(r"rewards/accuracies:([0-9.]+)", log)]
    assert "rewards/margins" in log and "semantic_loss" in log and len(accuracies) >= 40

    # the final checkpoint is a plain Llama-Mimi (LoRA merged): sample from it, new seeds
    final = max((tmp_path / "dpo").glob("step_*"), key=lambda p: int(p.name[5:]))
    aligned = load_tiny(final)
    shares = [
        np.mean([in_subset(c, preferred) for g in sample(m, prompts, 4, seed=1000) for c in g])
        for m in (base, aligned)
    ]
    print(
        f"\nDPO ({len(pairs)} pairs): level-0 codes on the preferred side {shares[0]:.3f} -> "
        f"{shares[1]:.3f} ({4 * len(prompts)} samples, new seeds); reward accuracy "
        f"{np.mean(accuracies[:5]):.2f} -> {np.mean(accuracies[-5:]):.2f}; held-out audio loss "
        f"{val_before:.3f} -> {val_after:.3f}"
    )
    assert shares[1] > shares[0] + 0.03  # measured: 0.445 -> 0.503
    assert (
        val_after < val_before + 1.0
    )  # the stated margin: at most 1 nat per token (measured 0.59)
    assert llama_mimi_full  # the DPO recipe is the training recipe with another step


def test_pairs_from_the_bundled_clips_with_a_local_judge_then_dpo(trained, tmp_path, monkeypatch):
    import llama_mimi_dpo
    import llama_mimi_pairs

    d, sft = trained

    def score_by_transcript(body):
        cont = re.search(r'CONTINUATION: "sample (\d+)"', body["messages"][1]["content"])
        return ("reply", json.dumps({"score": 1 + int(cont.group(1)) % 10, "reason": "fake"}))

    out = tmp_path / "pairs"
    with ChatServer(default=score_by_transcript) as judge:
        argv = [
            "llama_mimi_pairs", "--config", "tiny_pairs", f"output_dir={out}",
            f"model_dir={sft}", f"prompts={CLIPS}", "num_samples=4", "prompt_seconds=1.0",
            "max_new_seconds=0.8", "min_margin=1.0",
            "scoring.weights.judge=1.0", "scoring.weights.codes=0.0",
            "scoring.asr._component_=tests.test_dpo.FakeASR",
            "scoring.judge._component_=llama_mimi_tt.judge.ChatJudge",
            f"scoring.judge.base_url={judge.base_url}", "scoring.judge.model=fake-judge",
            "scoring.judge.api_key_env=null",
        ]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        from llama_mimi_tt.recipe_config import run_recipe

        with pytest.raises(SystemExit) as done:
            run_recipe(llama_mimi_pairs.recipe_main, "llama_mimi_pairs")
        assert done.value.code in (0, None)
        assert len(judge.requests) == 8 * 4  # every sample of the 8 clips judged once
    pairs = read_pairs(out / "pairs.jsonl")
    judgements = [json.loads(line) for line in open(out / "judgements.jsonl")]
    assert len(judgements) == 32 and all(j["judge_score"] for j in judgements)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == len(pairs) >= 4 and summary["samples"] == 32
    for p in pairs:
        assert p["chosen_score"] - p["rejected_score"] >= 1.0
        assert (
            np.array(p["chosen_codes"]).shape[0] == 4 and np.array(p["prompt_codes"]).shape[0] == 4
        )
    print(f"\npairs: {len(pairs)} of 8 prompts over the margin, from 32 judged samples")

    # the DPO recipe reads that file; its output loads as the generate recipe loads a model
    cfg = load_cfg(
        "tiny_dpo",
        dpo_args(d, tmp_path / "dpo", base_dir=sft, pairs=out / "pairs.jsonl", epochs=1,
                 batch_size=2, **{"validation.every_n_steps": 0}),
    )  # fmt: skip
    llama_mimi_dpo.train(cfg, llama_mimi_dpo.LlamaMimiDPORecipe)
    final = max((tmp_path / "dpo").glob("step_*"), key=lambda p: int(p.name[5:]))
    assert (final / "adapter_model.safetensors").is_file() and (final / "config.json").is_file()
    from llama_mimi_tt.loading import load_model

    gen_cfg = load_cfg("generate", [])
    gen_cfg.checkpointer = {"_component_": "llama_mimi_tt.LlamaMimiCheckpointer",
                            "checkpoint_dir": str(final), "num_quantizers": 4,
                            "text_vocab_size": 512}  # fmt: skip
    assert load_model(gen_cfg, torch.device("cpu"), torch.float32) is not None


def test_semantic_diversity_scores_loops_low():
    from llama_mimi_tt.preference import SemanticDiversity

    loop = torch.tensor([[5, 6, 5, 6, 5, 6, 5, 6]] * 4)
    varied = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 7]] * 4)
    assert SemanticDiversity()(loop) == 0.25 and SemanticDiversity()(varied) == 7 / 8


def test_bad_pairs_and_settings_are_clear_errors(trained, tmp_path):
    import llama_mimi_dpo

    d, sft = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_codes": [[1]] * 4, "chosen_codes": [[2]] * 4}) + "\n")
    with pytest.raises(
        UserError, match=r"bad.jsonl, row 1: no rejected_codes and no rejected_audio"
    ):
        read_pairs(bad)
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl, line 1: not JSON"):
        read_pairs(bad)
    good = tmp_path / "good.jsonl"
    write_pairs(good, [{"prompt_codes": [[1, 2]] * 4, "chosen_codes": [[3]] * 4,
                        "rejected_codes": [[4]] * 4}])  # fmt: skip
    cfg = load_cfg(
        "tiny_dpo",
        dpo_args(d, tmp_path / "x", base_dir=sft, pairs=good, **{"model.train_audio_rows": True}),
    )
    with pytest.raises(UserError, match="set model.train_audio_rows=False for DPO"):
        llama_mimi_dpo.LlamaMimiDPORecipe(cfg=cfg).setup(cfg=cfg)
