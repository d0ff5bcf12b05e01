"""Evaluate Llama-Mimi: ``tune run llama_mimi_eval --config eval`` (or ``1B_eval``).

1. Likelihood benchmarks: each suite with a ``path`` (SALMon, sWUGGY, sBLIMP, spoken and topic
   StoryCloze, in their published layouts) is encoded once through the code cache and scored
   pair by pair (``results.json``, ``pairs.jsonl``).
2. Generation quality, when ``generation.prompts`` is set: continuations judged by an LLM from
   ASR transcripts, speaker similarity to the prompt, GenPPL and Auto-BLEU
   (``judgements.jsonl``, audio in ``generations/``).

``report.html`` is written beside ``results.json``; ``compare=[dir_a,dir_b]`` only writes a page
comparing finished runs.
"""

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from llama_mimi_tt.benchmarks import SUITES, read_suite
from llama_mimi_tt.code_cache import codec_fingerprint
from llama_mimi_tt.errors import MissingFileError, UserError, writing
from llama_mimi_tt.evaluation import (
    encode_audio_files,
    format_table,
    score_pairs,
    summarize,
    write_results,
)
from llama_mimi_tt.generation import (
    DEFAULT_MAX_NEW_SECONDS,
    DEFAULT_PROMPT_SECONDS,
    DEFAULT_SAMPLING,
    SamplingParams,
    generate,
)
from llama_mimi_tt.loading import load_model
from llama_mimi_tt.quantize import parse_quantize, quantize_model
from llama_mimi_tt.recipe_config import check_number, check_output_dir, run_recipe
from llama_mimi_tt.report import write_report
from llama_mimi_tt.text_metrics import TextLM, check_text_lm_folder, read_transcripts

log = utils.get_logger("INFO")


def read_suites(cfg: DictConfig) -> dict:
    """``{key: (spec, pairs, suite_cfg)}`` for every suite with a path, read before any model is
    built, so that a missing or differently laid out folder fails at once."""
    out = {}
    for key, scfg in (cfg.get("suites") or {}).items():
        if key not in SUITES:
            raise UserError(f"unknown suite {key!r} in suites; the suites are {sorted(SUITES)}")
        if not scfg or not scfg.get("path"):
            continue
        options = {k: scfg.get(k) for k in ("subsets", "split") if scfg.get(k) is not None}
        if "subsets" in options:
            options["subsets"] = list(options["subsets"])
        pairs = read_suite(key, scfg.path, **options)
        if scfg.get("max_pairs"):
            pairs = pairs[: int(scfg.max_pairs)]
        out[key] = (SUITES[key], pairs, scfg)
    return out


def run_suites(cfg: DictConfig, suites: dict, model, tokenizer, codec, device) -> dict:
    """Encode each suite's audio (cached), score its pairs, summarize."""
    summary, records, skipped_files = {}, [], {}
    cache_dir = Path(cfg.get("code_cache_dir") or Path(cfg.output_dir) / "codes")
    fingerprint = codec_fingerprint(codec)
    for key, (spec, pairs, scfg) in suites.items():
        mode = scfg.get("mode", spec.reference_mode)
        markers = scfg.get("include_markers", spec.reference_include_markers)
        log.info(
            f"{spec.name}: {len(pairs)} pairs from {scfg.path} (score: {mode}, markers: {markers})"
        )
        paths = [p for pair in pairs for p in (pair.positive, pair.negative)]
        codes, errors = encode_audio_files(
            paths,
            codec,
            cache_dir=cache_dir / f"{key}-{fingerprint}",
            batch_size=cfg.get("encode_batch_size", 8),
        )
        skipped_files.update(errors)
        t0 = time.perf_counter()
        recs = score_pairs(
            model,
            tokenizer,
            pairs,
            codes,
            batch_size=cfg.batch_size,
            mode=mode,
            include_markers=markers,
            max_seconds=cfg.get("max_seconds"),
            tie_tolerance=cfg.get("tie_tolerance", 0.0),
            device=device,
        )
        dt = max(time.perf_counter() - t0, 1e-9)
        log.info(
            f"{spec.name}: scored {len(pairs)} pairs in {dt:.1f} s ({len(pairs) / dt:.1f} pairs/s)"
        )
        records += recs
        suite_summary = summarize(recs)[spec.name]
        suite_summary.update(mode=mode, include_markers=markers, path=str(scfg.path))
        summary[spec.name] = suite_summary
    return {"summary": summary, "records": records, "skipped_files": skipped_files}


def read_prompts(source: str, max_prompts=None) -> list:
    """Prompts for generation: a folder of audio files, or a ``.jsonl`` / ``.csv`` manifest with
    a ``path`` column (relative to the manifest), optional ``id``, and optional ``continuation``
    (an existing continuation file: generation is then skipped for that row)."""
    from llama_mimi_tt.audio_sources import open_audio_source

    p = Path(str(source)).expanduser()
    if p.is_dir():
        kind = "folder"
    elif p.is_file() and p.suffix.lower() in (".jsonl", ".csv"):
        kind = "manifest"
    else:
        raise MissingFileError(
            f"generation.prompts {p} is neither a folder of audio files nor a .jsonl/.csv "
            "manifest (columns: path, optional id and continuation)"
        )
    items = []
    for it in open_audio_source(str(p), source_type=kind, text_column=None).items:
        if not it.path:
            raise UserError(f"{p}, line {it.line}: no 'path' (the prompt audio file)")
        item = {"id": it.id, "path": it.path}
        continuation = (it.fields or {}).get("continuation")
        if continuation:
            q = Path(str(continuation)).expanduser()
            item["continuation"] = str(q if q.is_absolute() else p.parent / q)
        items.append(item)
    if not items:
        raise UserError(f"generation.prompts {p}: no audio files found")
    return items[:max_prompts] if max_prompts else items


def run_generation(cfg: DictConfig, model, tokenizer, codec, output_dir: Path) -> dict:
    """Continuations of the prompts, then the LLM judge and speaker similarity."""
    from llama_mimi_tt.audio import load_audio, save_audio
    from llama_mimi_tt.judge import evaluate_generations, format_generation_summary
    from llama_mimi_tt.vocab import MIMI_FRAME_RATE

    gcfg = cfg.generation
    prompts = read_prompts(gcfg.prompts, gcfg.get("max_prompts"))
    gen_dir = output_dir / "generations"
    sr = codec.sample_rate
    todo = [p for p in prompts if "continuation" not in p]
    d = DEFAULT_SAMPLING
    params = SamplingParams(
        temperature=gcfg.get("temperature", d.temperature), top_k=gcfg.get("top_k", d.top_k)
    )
    max_frames = round(gcfg.get("max_new_seconds", DEFAULT_MAX_NEW_SECONDS) * MIMI_FRAME_RATE)
    batch = int(gcfg.get("batch_size", 4))
    failed = []
    for b0 in range(0, len(todo), batch):
        group = todo[b0 : b0 + batch]
        ids = []
        for item in group:
            wave = load_audio(
                item["path"], sr, max_seconds=gcfg.get("prompt_seconds", DEFAULT_PROMPT_SECONDS)
            )
            with writing(gen_dir / f"{item['id']}_prompt.wav"):
                item["prompt_cut"] = str(save_audio(gen_dir / f"{item['id']}_prompt.wav", wave, sr))
            prompt, _ = tokenizer.continuation_ids(codec.encode(wave, sr))  # audio left open
            ids.append(torch.tensor(prompt))
        out = generate(
            model,
            ids,
            tokenizer.vocab,
            max_new_frames=max_frames,
            semantic=params,
            acoustic=params,
            seed=[int(gcfg.get("seed", 0)) + b0 + i for i in range(len(group))],
            min_new_frames=int(gcfg.get("min_new_frames", 0)),
        )
        for b, item in enumerate(group):
            new = out.new_codes(b)
            if new.shape[-1] == 0:
                failed.append(item["id"])
                continue
            cont = codec.decode(new)
            with writing(gen_dir / f"{item['id']}_continuation.wav"):
                item["continuation"] = str(
                    save_audio(gen_dir / f"{item['id']}_continuation.wav", cont, sr)
                )
        log.info(f"generated {b0 + len(group)} of {len(todo)} continuations")
    if failed:
        log.warning(f"{len(failed)} prompts got no continuation (</audio> at once): {failed[:5]}")
    items = [
        {
            "id": p["id"],
            "prompt_audio": p.get("prompt_cut", p["path"]),
            "continuation_audio": p["continuation"],
        }
        for p in prompts
        if "continuation" in p
    ]
    transcripts = read_transcripts(gcfg.transcripts) if gcfg.get("transcripts") else None
    asr = config.instantiate(gcfg.asr) if gcfg.get("asr") and transcripts is None else None
    judge = config.instantiate(gcfg.judge) if gcfg.get("judge") else None
    speaker = config.instantiate(gcfg.speaker) if gcfg.get("speaker") else None
    text_lm = None
    if gcfg.get("genppl_model"):
        text_lm = TextLM(
            gcfg.genppl_model,
            device=cfg.get("device", "cpu"),
            dtype=gcfg.get("genppl_dtype", "fp32"),
            batch_size=gcfg.get("genppl_batch_size", 8),
        )
    summary = evaluate_generations(
        items, output_dir, asr=asr, judge=judge, speaker=speaker,
        max_concurrency=int(gcfg.get("max_concurrency", 4)),
        transcripts=transcripts, text_lm=text_lm, auto_bleu_n=gcfg.get("auto_bleu_n", 2),
    )  # fmt: skip
    summary["no_continuation"] = len(failed)
    print(format_generation_summary({k: v for k, v in summary.items() if isinstance(v, dict)}))
    return summary


def check_settings(cfg: DictConfig) -> None:
    """Every number of the config, checked before anything is read or loaded."""
    check_number(cfg, "num_quantizers", int, low=1, high=32)
    check_number(cfg, "seed", int, low=0, default=0)
    check_number(cfg, "batch_size", int, low=1)
    check_number(cfg, "encode_batch_size", int, low=1, default=8)
    check_number(cfg, "max_seconds", float, low=0.08, optional=True)
    check_number(cfg, "tie_tolerance", float, low=0, default=0.0)
    for key in cfg.get("suites") or {}:
        check_number(cfg, f"suites.{key}.max_pairs", int, low=1, optional=True)
    if cfg.get("generation"):
        g = "generation."
        check_number(cfg, g + "max_prompts", int, low=1, optional=True)
        check_number(cfg, g + "prompt_seconds", float, low=0.08, default=DEFAULT_PROMPT_SECONDS)
        check_number(cfg, g + "max_new_seconds", float, low=0.08, default=DEFAULT_MAX_NEW_SECONDS)
        check_number(cfg, g + "min_new_frames", int, low=0, default=0)
        check_number(cfg, g + "temperature", float, low=0, default=DEFAULT_SAMPLING.temperature)
        check_number(cfg, g + "top_k", int, low=1, optional=True, default=DEFAULT_SAMPLING.top_k)
        check_number(cfg, g + "seed", int, low=0, default=0)
        check_number(cfg, g + "batch_size", int, low=1, default=4)
        check_number(cfg, g + "max_concurrency", int, low=1, default=4)
        check_number(cfg, g + "genppl_batch_size", int, low=1, default=8)
        check_number(cfg, g + "auto_bleu_n", int, low=1, optional=True, default=2)
    check_number(cfg, "report_samples", int, low=0, default=8)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    check_settings(cfg)
    if cfg.get("compare"):
        runs = list(cfg.compare) if OmegaConf.is_list(cfg.compare) else None
        if not runs or len(runs) < 2:
            raise UserError(
                "compare takes a list of two or more evaluation output folders, e.g. "
                "compare=[eval_out/run_a,eval_out/run_b]; it writes report.html to output_dir"
            )
        page = write_report(runs, check_output_dir(cfg.output_dir), cfg.get("report_samples", 8))
        log.info(f"comparison of {len(runs)} runs (nothing evaluated): {page}")
        return
    training.set_seed(seed=cfg.get("seed", 0))
    device = utils.get_device(cfg.get("device", "cpu"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device)
    quant = parse_quantize(cfg.get("quantize"), cfg.get("quantize_group_size", 128))
    suites = read_suites(cfg)  # layout errors before anything heavy is built
    gen_on = bool(cfg.get("generation") and cfg.generation.get("prompts"))
    if not suites and not gen_on:
        raise UserError(
            "nothing to evaluate: set the path of at least one suite (suites.salmon.path, "
            "suites.swuggy.path, suites.sblimp.path, suites.sstorycloze.path, "
            "suites.tstorycloze.path) or generation.prompts"
        )
    if gen_on and cfg.generation.get("genppl_model"):
        check_text_lm_folder(cfg.generation.genppl_model)  # before hours of generation
    if gen_on and cfg.generation.get("transcripts"):
        read_transcripts(cfg.generation.transcripts)
    output_dir = check_output_dir(cfg.output_dir)
    if suites and cfg.get("code_cache_dir"):
        check_output_dir(cfg.code_cache_dir, "code_cache_dir")
    tokenizer = config.instantiate(cfg.tokenizer)
    model = quantize_model(load_model(cfg, device, dtype), quant, device)
    log.info(f"precision: {quant.describe(device)}")
    codec = config.instantiate(cfg.codec)
    if codec.num_quantizers < tokenizer.vocab.num_quantizers:
        raise UserError(
            f"the codec gives {codec.num_quantizers} levels but the tokenizer expects "
            f"num_quantizers={tokenizer.vocab.num_quantizers}"
        )
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "precision": quant.describe(device),
    }
    if suites:
        out = run_suites(cfg, suites, model, tokenizer, codec, device)
        results["skipped_files"] = out["skipped_files"]
        res_path, pairs_path = write_results(
            output_dir, out["summary"], out["records"], {k: v for k, v in results.items()}
        )
        print(format_table(out["summary"]))
        log.info(f"results: {res_path}; every pair: {pairs_path}")
        results["suites"] = out["summary"]
    if gen_on:
        results["generation"] = run_generation(cfg, model, tokenizer, codec, output_dir)
    with writing(output_dir / "results.json"):
        (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if cfg.get("report", True):
        page = write_report([output_dir], output_dir, cfg.get("report_samples", 8))
        log.info(f"report: {page}")
    metric_cfg = cfg.get("metric_logger")
    if metric_cfg is not None:
        metric_logger = config.instantiate(metric_cfg)
        scalars = {}
        for name, s in results.get("suites", {}).items():
            scalars[f"{name}/accuracy"] = s["overall"]["accuracy"]
            for sub, st in s["subsets"].items():
                if len(s["subsets"]) > 1 and st["accuracy"] is not None:
                    scalars[f"{name}/{sub}/accuracy"] = st["accuracy"]
        for name in ("llm_judge", "speaker_similarity", "genppl", "auto_bleu"):
            g = results.get("generation", {}).get(name)
            if g and g.get("mean") is not None:
                scalars[f"{name}/mean"] = g["mean"]
        if scalars:
            metric_logger.log_dict({k: v for k, v in scalars.items() if v is not None}, step=0)
        metric_logger.close()


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_eval"))
