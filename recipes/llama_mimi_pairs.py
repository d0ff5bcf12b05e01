"""Preference pairs for DPO: ``tune run llama_mimi_pairs --config tiny_pairs``.

For every prompt (a folder of audio files, or a manifest), ``num_samples`` continuations are
sampled with the generate recipe's sampler and scored by the generation-quality pipeline of
llama_mimi_eval (LLM judge on ASR transcripts, speaker similarity with the prompt) and/or a score
of the codes themselves, mixed with ``scoring.weights``. Per prompt the best and the worst sample
make a pair when their scores differ by at least ``min_margin``.

Outputs in ``output_dir``: ``pairs.jsonl`` (codes, scores; ``tune run llama_mimi_dpo`` reads it),
``judgements.jsonl`` (per sample: transcripts, judge score and reason, speaker similarity),
``samples/`` (the prompt and every continuation as .wav) and ``summary.json``.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils
from tqdm import tqdm

from llama_mimi_tt.audio import save_audio
from llama_mimi_tt.audio_sources import open_audio_source
from llama_mimi_tt.errors import UserError, writing
from llama_mimi_tt.generation import SamplingParams, generate
from llama_mimi_tt.judge import evaluate_generations
from llama_mimi_tt.loading import load_model
from llama_mimi_tt.preference import PAIRS_FILE, combined_scores, select_pairs, write_pairs
from llama_mimi_tt.recipe_config import check_number, run_recipe
from llama_mimi_tt.vocab import MIMI_FRAME_RATE

log = utils.get_logger("INFO")


def check_settings(cfg: DictConfig) -> dict:
    """Numbers and weights, checked before anything is loaded; returns the weights."""
    check_number(cfg, "num_samples", int, low=2)
    check_number(cfg, "prompt_seconds", float, low=0.08)
    check_number(cfg, "max_new_seconds", float, low=0.08)
    check_number(cfg, "min_margin", float, low=0)
    check_number(cfg, "seed", int, low=0)
    weights = dict(cfg.scoring.weights)
    unknown = set(weights) - {"judge", "speaker", "codes"}
    if unknown or not any(weights.values()):
        raise UserError(
            f"scoring.weights {weights}: give a weight to at least one of judge, speaker, codes"
        )
    for name in ("judge", "speaker", "codes"):
        if weights.get(name) and not cfg.scoring.get(name):
            raise UserError(f"scoring.weights.{name} is set but scoring.{name} is null")
    if weights.get("judge") and not cfg.scoring.get("asr"):
        raise UserError("the LLM judge scores transcripts: set scoring.asr as well")
    return weights


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    weights = check_settings(cfg)
    out = Path(cfg.output_dir)
    with writing(out):
        (out / "samples").mkdir(parents=True, exist_ok=True)
    device = utils.get_device(cfg.device)
    dtype = training.get_dtype(cfg.dtype, device=device)
    source = open_audio_source(cfg.prompts)
    codec = config.instantiate(cfg.codec)
    tokenizer = config.instantiate(cfg.tokenizer)
    model = load_model(cfg, device, dtype)
    sr, n = codec.sample_rate, cfg.num_samples
    params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k)
    items, codes, samples = [], [], defaultdict(list)
    for i, item in enumerate(tqdm(source.items, desc="sampling")):
        wave = source.read(item, sr, max_seconds=cfg.prompt_seconds)  # reads only those
        prompt_codes = codec.encode(wave, sr)
        prompt_wav = save_audio(out / "samples" / f"{item.id}_prompt.wav", wave, sr)
        ids, _ = tokenizer.continuation_ids(prompt_codes)
        result = generate(
            model,
            [torch.tensor(ids)] * n,
            tokenizer.vocab,
            max_new_frames=round(cfg.max_new_seconds * MIMI_FRAME_RATE),
            semantic=params,
            acoustic=params,
            seed=[cfg.seed + i * n + k for k in range(n)],
            min_new_frames=1,
        )
        for k in range(n):
            new = result.new_codes(k)
            path = out / "samples" / f"{item.id}_s{k}.wav"
            with writing(path):
                save_audio(path, codec.decode(new), sr)
            items.append(
                {"id": f"{item.id}_s{k}", "prompt_audio": prompt_wav, "continuation_audio": path}
            )
            codes.append(new)
            samples[item.id].append({"codes": new, "prompt_codes": prompt_codes})
    scoring = cfg.scoring
    evaluate_generations(
        items,
        out,
        asr=config.instantiate(scoring.asr) if scoring.get("asr") else None,
        judge=config.instantiate(scoring.judge) if scoring.get("judge") else None,
        speaker=config.instantiate(scoring.speaker) if scoring.get("speaker") else None,
        max_concurrency=scoring.get("max_concurrency", 4),
    )
    with open(out / "judgements.jsonl") as f:
        judgements = [json.loads(line) for line in f]
    codes_scorer = config.instantiate(scoring.codes) if scoring.get("codes") else None
    scores = combined_scores(judgements, codes, weights, codes_scorer)
    flat = [s for group in samples.values() for s in group]
    for sample, score in zip(flat, scores):
        sample["score"] = score
    pairs = select_pairs(samples, cfg.min_margin)
    summary = {
        "prompts": len(samples),
        "samples": len(flat),
        "unscored": sum(s is None for s in scores),
        "pairs": len(pairs),
        "below_margin": len(samples) - len(pairs),
        "min_margin": cfg.min_margin,
        "weights": weights,
    }
    with writing(out / "summary.json"):
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not pairs:
        raise UserError(
            f"no prompt gave a pair with a score margin >= {cfg.min_margin} "
            f"({summary['unscored']} of {len(flat)} samples unscored; see "
            f"{out / 'judgements.jsonl'}): lower min_margin or raise num_samples"
        )
    write_pairs(out / PAIRS_FILE, pairs)
    log.info(
        f"{len(pairs)} pairs from {len(samples)} prompts x {n} samples "
        f"({summary['below_margin']} prompts below the margin): {out / PAIRS_FILE}"
    )


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_pairs"))
