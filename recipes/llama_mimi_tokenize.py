"""Audio corpora -> a Mimi code cache: ``tune run llama_mimi_tokenize --config tokenize``.

    tune run llama_mimi_tokenize --config tokenize \\
        source=/data/LibriSpeech/train-clean-100 output_dir=/data/mimi/ls100 \\
        codec.path=~/models/tokenizer-e351c8d8-checkpoint125.safetensors device=cuda

    # several GPUs or nodes: each rank encodes its share of the shards (only a shared
    # output_dir is needed, no process group)
    tune run --nproc_per_node 8 llama_mimi_tokenize --config tokenize ... device=cuda

``source`` is a folder of audio files, a .jsonl/.csv manifest, or a Hugging Face dataset (see
``llama_mimi_tt.audio_sources``). Audio is read, checked, mixed down and resampled to 24 kHz,
cut by ``max_seconds`` (``long_files``: split or truncate), and encoded in batches of similar
length. Every ``shard_size`` source items make one parquet shard, written under a temporary
name and renamed when complete. Run the same command again after an interruption: finished
shards are kept and only the missing or corrupt ones are encoded. Several processes (or
machines) started on one ``output_dir`` share the work: each claims a shard before encoding
it (``<shard>.claim``; a claim whose process is gone is taken over, see
``llama_mimi_tt.code_cache``). Unreadable, empty, non-finite or too short (< 80 ms) audio and
missing files are skipped with a logged reason; the summary at the end counts them and
``cache.json`` / ``skipped.jsonl`` record them. A run in which every item was skipped fails.
Audio with samples far beyond [-1, 1] (peak above 2.0) is normalised to peak 1.0, logged and
counted.
"""

import socket
import sys
import time
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from llama_mimi_tt.audio_sources import AUDIO_EXTENSIONS, open_audio_source
from llama_mimi_tt.code_cache import (
    CACHE_FORMAT_VERSION,
    LONG_FILE_RULES,
    SKIPPED_FILE,
    check_or_write_plan,
    claim_shard,
    distributed_rank_and_world_size,
    encode_items,
    finalize_cache,
    refresh_claim,
    release_claim,
    remove_stale_temporaries,
    shard_items,
    shard_name,
    shard_problem,
    shards_of_rank,
    write_shard,
)
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.recipe_config import check_number, check_output_dir, run_recipe

log = utils.get_logger("INFO")


def check_settings(cfg: DictConfig) -> None:
    """Every setting that needs no file, checked before anything is read or loaded."""
    for key in ("source", "output_dir"):
        if cfg.get(key) in (None, ""):
            raise UserError(f"{key} is not set: add {key}=... to the command line")
    if cfg.long_files not in LONG_FILE_RULES:
        raise UserError(f"long_files must be one of {LONG_FILE_RULES}, got {cfg.long_files!r}")
    check_number(cfg, "shard_size", int, low=1)
    check_number(cfg, "max_shards", int, low=1, optional=True)
    check_number(cfg, "num_quantizers", int, low=1, high=32)
    if cfg.get("batch_size", "auto") not in (None, "auto"):
        check_number(cfg, "batch_size", int, low=1)
    check_number(cfg, "max_batch_seconds", float, low=0.08, optional=True)
    check_number(cfg, "max_seconds", float, low=0.08, optional=True)
    check_number(cfg, "claim_timeout_s", float, low=1, default=3600)


def tokenize(cfg: DictConfig) -> Dict[str, Any]:
    """Encodes this rank's missing shards and, when every shard exists, writes ``cache.json``.

    Returns a summary of this run (``manifest`` is the cache manifest once complete)."""
    check_settings(cfg)
    rank, world_size = distributed_rank_and_world_size()
    output_dir = check_output_dir(cfg.output_dir)
    claim_timeout_s = float(cfg.get("claim_timeout_s", 3600))

    # ---- setup: source, codec, plan -----------------------------------------------------
    source = open_audio_source(
        str(cfg.source),
        source_type=cfg.get("source_type", "auto"),
        split=cfg.get("split", "train"),
        audio_column=cfg.get("audio_column", "audio"),
        text_column=cfg.get("text_column", "text"),
        path_column=cfg.get("path_column", "path"),
        id_column=cfg.get("id_column", "id"),
    )
    if len(source) == 0:
        raise UserError(
            f"{source.kind} source {source.location}: no audio items found"
            + (
                f" (audio files end in .{', .'.join(sorted(AUDIO_EXTENSIONS))})"
                if source.kind == "folder"
                else ""
            )
        )
    log.info(f"{source.kind} source {source.location}: {len(source)} items")
    codec = config.instantiate(cfg.codec)
    q = int(getattr(codec, "num_quantizers", cfg.num_quantizers))
    if q != cfg.num_quantizers:
        raise UserError(f"the codec gives {q} levels but num_quantizers={cfg.num_quantizers}")
    log.info(f"rank {rank}/{world_size}: codec {codec}")
    batch_size = cfg.get("batch_size", "auto")
    if batch_size in (None, "auto"):
        # Batches pay on GPUs; on CPU Mimi is memory-bound and a batch is slower per second
        # of audio than single items (bench/bench_encode.py).
        batch_size = 16 if str(getattr(codec, "device", cfg.device)).startswith("cuda") else 1

    shards = shard_items(source.items, int(cfg.shard_size))
    codec_cfg = OmegaConf.to_container(cfg.codec, resolve=True)
    codec_cfg.pop("device", None)  # where it runs does not change what is built
    plan = {
        "format_version": CACHE_FORMAT_VERSION,
        "source": source.location,
        "source_kind": source.kind,
        "num_items": len(source),
        "items_fingerprint": source.fingerprint(),
        "shard_size": int(cfg.shard_size),
        "num_shards": len(shards),
        "num_quantizers": q,
        "codebook_size": int(getattr(codec, "codebook_size", 2048)),
        "sample_rate": int(codec.sample_rate),
        "frame_rate": float(codec.frame_rate),
        "codec": codec_cfg,
        "max_seconds": cfg.max_seconds,
        "long_files": cfg.long_files,
        "codes_layout": "flat uint16, level-major [Q, num_frames]",
    }
    check_or_write_plan(output_dir, plan)

    remove_stale_temporaries(output_dir, claim_timeout_s)
    mine = shards_of_rank(len(shards), rank, world_size)
    todo = []
    for k in mine:
        path = output_dir / shard_name(k, len(shards))
        problem = shard_problem(path, read_rows=True)
        if problem not in (None, "missing"):
            log.warning(f"{path} is {problem}: encoding it again")
        if problem:
            todo.append(k)
    log.info(
        f"rank {rank}: {len(mine)} of {len(shards)} shards are mine, "
        f"{len(mine) - len(todo)} already done, {len(todo)} to encode"
    )
    max_shards = cfg.get("max_shards")

    # ---- encode, one shard at a time --------------------------------------------------------
    total = sum(len(shards[k]) for k in todo)
    pbar = tqdm(total=total, unit="file", desc=f"Encoding (rank {rank})", disable=rank != 0)
    t0, seconds, num_skipped, num_normalised, written = time.perf_counter(), 0.0, 0, 0, 0
    shard_path = None

    def progress(n: int, audio_seconds: float) -> None:
        nonlocal seconds
        seconds += audio_seconds
        refresh_claim(shard_path)
        pbar.update(n)
        pbar.set_postfix(audio_s_per_s=f"{seconds / max(time.perf_counter() - t0, 1e-9):.1f}")

    with logging_redirect_tqdm(loggers=[log]):  # log lines above the bar
        for k in todo:
            if max_shards is not None and written >= int(max_shards):
                break
            items = shards[k]
            shard_path = output_dir / shard_name(k, len(shards))
            holder = claim_shard(shard_path, claim_timeout_s)
            if holder is not None:
                log.info(f"{shard_path.name}: another process ({holder}) is encoding it")
                pbar.update(len(items))
                continue
            try:
                if shard_problem(shard_path, read_rows=True) is None:  # written meanwhile
                    pbar.update(len(items))
                    continue
                normalised = []
                rows, skipped = encode_items(
                    source,
                    items,
                    codec,
                    max_seconds=cfg.max_seconds,
                    long_files=cfg.long_files,
                    batch_size=int(batch_size),
                    max_batch_seconds=cfg.get("max_batch_seconds"),
                    progress=progress,
                    logger=log,
                    normalised=normalised,
                )
                meta = {
                    "shard": k,
                    "rank": rank,
                    "host": socket.gethostname(),
                    "items": len(items),
                    "encoded_items": len(items) - len(skipped),
                    "rows": len(rows),
                    "frames": sum(r["num_frames"] for r in rows),
                    "seconds": sum(r["duration"] for r in rows),
                    "skipped": skipped,
                    "normalised": normalised,
                }
                write_shard(shard_path, rows, meta)
            finally:
                release_claim(shard_path)
            written += 1
            num_skipped += len(skipped)
            num_normalised += len(normalised)
            log.info(
                f"rank {rank}: wrote {shard_path.name} ({len(rows)} rows, "
                f"{meta['seconds']:.1f} s of audio, {len(skipped)} skipped)"
            )
    pbar.close()
    elapsed = time.perf_counter() - t0
    log.info(
        f"rank {rank}: encoded {written} shards, {seconds / 3600:.3f} h of audio in "
        f"{elapsed:.1f} s ({seconds / max(elapsed, 1e-9):.1f} audio s/s), "
        f"{num_skipped} files skipped, {num_normalised} normalised (peak above 2.0)"
    )

    # ---- finish: the manifest, once every shard exists --------------------------------------
    manifest = finalize_cache(output_dir)
    if manifest is None:
        left = sum(
            shard_problem(output_dir / shard_name(k, len(shards))) is not None
            for k in range(len(shards))
        )
        log.info(
            f"{left} shards are not written yet: other ranks or processes may still be "
            "encoding them; if every one has finished (max_shards, an interruption), run the "
            "same command again to finish the cache"
        )
    else:
        c = manifest["counts"]
        if c["encoded_items"] == 0:
            raise UserError(
                f"every one of the {c['items']} source items was skipped "
                f"({manifest['skipped_by_reason']}), so the code cache {output_dir} is empty. "
                f"Each item's reason is in {output_dir / SKIPPED_FILE}; fix the audio or the "
                "source, and tokenize into a new output_dir (or delete this one)."
            )
        log.info(
            f"code cache complete: {output_dir} -- {c['encoded_items']} of {c['items']} files, "
            f"{c['rows']} rows, {c['hours']:.3f} h, Q={q}; skipped {c['skipped']}"
            + (f" {manifest['skipped_by_reason']}" if c["skipped"] else "")
            + f"; normalised {c['normalised']}"
        )
    return {
        "rank": rank,
        "shards_written": written,
        "files_skipped": num_skipped,
        "files_normalised": num_normalised,
        "audio_seconds": seconds,
        "manifest": manifest,
    }


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    tokenize(cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_tokenize"))
