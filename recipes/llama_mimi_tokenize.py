"""Audio corpora -> a Mimi code cache: ``tune run llama_mimi_tokenize --config tokenize``.

    tune run llama_mimi_tokenize --config tokenize \\
        source=/data/LibriSpeech/train-clean-100 output_dir=/data/mimi/ls100 \\
        codec.path=~/models/tokenizer-e351c8d8-checkpoint125.safetensors device=cuda

    # several GPUs or nodes: each rank encodes its share of the shards (only a shared
    # output_dir is needed, no process group)
    tune run --nproc_per_node 8 llama_mimi_tokenize --config tokenize ... device=cuda

``source`` is a folder of audio files, a .jsonl/.csv manifest, or a Hugging Face dataset (see
``llama_mimi_tt.code_cache``). Audio is read, checked, mixed down and resampled to 24 kHz,
cut by ``max_seconds`` (``long_files``: split or truncate), and encoded in batches of similar
length. Every ``shard_size`` source items make one parquet shard, written under a temporary
name and renamed when complete. Run the same command again after an interruption: finished
shards are kept and only the missing ones are encoded. Unreadable, empty or non-finite audio
and missing files are skipped with a logged reason; the summary at the end counts them and
``cache.json`` / ``skipped.jsonl`` record them.
"""

import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from llama_mimi_tt.code_cache import (
    CACHE_FORMAT_VERSION,
    LONG_FILE_RULES,
    check_or_write_plan,
    distributed_rank_and_world_size,
    encode_items,
    finalize_cache,
    open_audio_source,
    remove_stale_temporaries,
    shard_items,
    shard_name,
    shards_of_rank,
    write_shard,
)
from llama_mimi_tt.recipe_config import run_recipe

log = utils.get_logger("INFO")


def tokenize(cfg: DictConfig) -> Dict[str, Any]:
    """Encodes this rank's missing shards and, when every shard exists, writes ``cache.json``.

    Returns a summary of this run (``manifest`` is the cache manifest once complete)."""
    for key in ("source", "output_dir"):
        if cfg.get(key) in (None, ""):
            raise SystemExit(f"{key} is not set: add {key}=... to the command line")
    if cfg.long_files not in LONG_FILE_RULES:
        raise SystemExit(f"long_files must be one of {LONG_FILE_RULES}, got {cfg.long_files!r}")
    rank, world_size = distributed_rank_and_world_size()
    output_dir = Path(str(cfg.output_dir)).expanduser()

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
        raise SystemExit(f"{cfg.source}: no audio items found")
    log.info(f"{source.kind} source {source.location}: {len(source)} items")
    codec = config.instantiate(cfg.codec)
    q = int(getattr(codec, "num_quantizers", cfg.num_quantizers))
    if q != cfg.num_quantizers:
        raise SystemExit(f"the codec gives {q} levels but num_quantizers={cfg.num_quantizers}")
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

    mine = shards_of_rank(len(shards), rank, world_size)
    todo = [k for k in mine if not (output_dir / shard_name(k, len(shards))).is_file()]
    remove_stale_temporaries(output_dir, [shard_name(k, len(shards)) for k in todo])
    log.info(
        f"rank {rank}: {len(mine)} of {len(shards)} shards are mine, "
        f"{len(mine) - len(todo)} already done, {len(todo)} to encode"
    )
    if cfg.get("max_shards") is not None:
        todo = todo[: int(cfg.max_shards)]

    # ---- encode, one shard at a time --------------------------------------------------------
    total = sum(len(shards[k]) for k in todo)
    pbar = tqdm(total=total, unit="file", desc=f"Encoding (rank {rank})", disable=rank != 0)
    t0, seconds, num_skipped = time.perf_counter(), 0.0, 0

    def progress(n: int, audio_seconds: float) -> None:
        nonlocal seconds
        seconds += audio_seconds
        pbar.update(n)
        pbar.set_postfix(audio_s_per_s=f"{seconds / max(time.perf_counter() - t0, 1e-9):.1f}")

    with logging_redirect_tqdm(loggers=[log]):  # log lines above the bar
        for k in todo:
            items = shards[k]
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
            }
            write_shard(output_dir / shard_name(k, len(shards)), rows, meta)
            num_skipped += len(skipped)
            log.info(
                f"rank {rank}: wrote {shard_name(k, len(shards))} ({len(rows)} rows, "
                f"{meta['seconds']:.1f} s of audio, {len(skipped)} skipped)"
            )
    pbar.close()
    elapsed = time.perf_counter() - t0
    log.info(
        f"rank {rank}: encoded {len(todo)} shards, {seconds / 3600:.3f} h of audio in "
        f"{elapsed:.1f} s ({seconds / max(elapsed, 1e-9):.1f} audio s/s), "
        f"{num_skipped} files skipped"
    )

    # ---- finish: the manifest, once every shard exists --------------------------------------
    manifest = finalize_cache(output_dir)
    if manifest is None:
        left = sum(
            not (output_dir / shard_name(k, len(shards))).is_file() for k in range(len(shards))
        )
        log.info(
            f"{left} shards are not written yet: other ranks may still be encoding them; "
            "if every rank has finished (max_shards, an interruption), run the same command "
            "again to finish the cache"
        )
    else:
        c = manifest["counts"]
        log.info(
            f"code cache complete: {output_dir} -- {c['encoded_items']} of {c['items']} files, "
            f"{c['rows']} rows, {c['hours']:.3f} h, Q={q}; skipped {c['skipped']}"
            + (f" {manifest['skipped_by_reason']}" if c["skipped"] else "")
        )
    return {
        "rank": rank,
        "shards_written": len(todo),
        "files_skipped": num_skipped,
        "audio_seconds": seconds,
        "manifest": manifest,
    }


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    tokenize(cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_tokenize"))
