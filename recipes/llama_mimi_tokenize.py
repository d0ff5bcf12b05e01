"""Audio corpora -> a Mimi code cache: ``tune run llama_mimi_tokenize --config tokenize``.

    tune run llama_mimi_tokenize --config tokenize \\
        source=/data/LibriSpeech/train-clean-100 output_dir=/data/mimi/ls100 \\
        codec.path=~/models/tokenizer-e351c8d8-checkpoint125.safetensors device=cuda

    # several GPUs or nodes: each rank encodes the shards k with k % WORLD_SIZE == RANK
    # (only a shared output_dir is needed, no process group)
    tune run --nproc_per_node 8 llama_mimi_tokenize --config tokenize ... device=cuda
    # 8 machines without a rendezvous: on machine i = 0..7
    RANK=$i WORLD_SIZE=8 tune run llama_mimi_tokenize --config tokenize ... device=cuda

``source`` is a folder of audio files, a .jsonl/.csv manifest, or a Hugging Face dataset (see
``llama_mimi_tt.audio_sources``). Audio is read, checked, mixed down and resampled to 24 kHz,
cut by ``max_seconds`` (``long_files``: split or truncate), and encoded in batches of similar
length. Every ``shard_size`` source items make one parquet shard, written under a temporary
name and renamed when complete. Run the same command again after an interruption, with any
number of ranks: finished shards are kept and only the missing or corrupt ones are encoded; a
run that ends with shards of its own still missing fails. There are no claim files
(``llama_mimi_tt.code_cache`` says why): ranks split the work, a rerun fills the gaps.
Unreadable, empty, non-finite or too short (< 80 ms) audio and missing files are skipped with
a logged reason; the summary at the end counts them and ``cache.json`` / ``skipped.jsonl``
record them. A run in which every item was skipped fails. Audio with samples far beyond
[-1, 1] (peak above 2.0) is normalised to peak 1.0, logged and counted.
"""

import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from llama_mimi_tt.atomic_files import remove_temporaries
from llama_mimi_tt.audio_sources import AUDIO_EXTENSIONS, AudioSource, open_audio_source
from llama_mimi_tt.code_cache import (
    LONG_FILE_RULES,
    SKIPPED_FILE,
    distributed_rank_and_world_size,
    encode_shard,
    finalize_cache,
    shard_items,
    shard_name,
    shard_problem,
    shards_of_rank,
    start_cache,
)
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.recipe_config import check_number, check_output_dir, run_recipe
from llama_mimi_tt.vocab import MIMI_CODEBOOK_SIZE

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


def open_source(cfg: DictConfig) -> AudioSource:
    """The source's items, failing when it holds none."""
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
    return source


def load_codec(cfg: DictConfig):
    """``(codec, batch_size)``: the codec of the config, checked against num_quantizers."""
    codec = config.instantiate(cfg.codec)
    q = int(getattr(codec, "num_quantizers", cfg.num_quantizers))
    if q != cfg.num_quantizers:
        raise UserError(f"the codec gives {q} levels but num_quantizers={cfg.num_quantizers}")
    batch_size = cfg.get("batch_size", "auto")
    if batch_size in (None, "auto"):
        # Batches pay on GPUs; on CPU Mimi is memory-bound and a batch is slower per second
        # of audio than single items (bench/bench_encode.py).
        batch_size = 16 if str(getattr(codec, "device", cfg.device)).startswith("cuda") else 1
    return codec, int(batch_size)


def plan_cache(cfg: DictConfig, output_dir: Path, source: AudioSource, codec) -> List[Sequence]:
    """Cuts the source into shards and writes (or checks, when resuming) the cache's plan."""
    shards = shard_items(source.items, int(cfg.shard_size))
    codec_cfg = OmegaConf.to_container(cfg.codec, resolve=True)
    codec_cfg.pop("device", None)  # where it runs does not change what is built
    start_cache(
        output_dir,
        num_shards=len(shards),
        shard_size=int(cfg.shard_size),
        num_quantizers=int(cfg.num_quantizers),
        num_items=len(source),
        source=source.location,
        source_kind=source.kind,
        items_fingerprint=source.fingerprint(),
        codec=codec_cfg,
        max_seconds=cfg.max_seconds,
        long_files=cfg.long_files,
        codebook_size=int(getattr(codec, "codebook_size", MIMI_CODEBOOK_SIZE)),
        sample_rate=int(codec.sample_rate),
        frame_rate=float(codec.frame_rate),
    )
    return shards


def shards_to_encode(output_dir: Path, num_shards: int, rank: int, world_size: int) -> List[int]:
    """This rank's shards that are missing or corrupt. The temporaries that killed runs left of
    them are removed first: this rank owns them (``llama_mimi_tt.atomic_files``)."""
    mine = shards_of_rank(num_shards, rank, world_size)
    todo = []
    for k in mine:
        path = output_dir / shard_name(k, num_shards)
        if remove_temporaries(path):
            log.info(f"removed the temporaries of {path.name} that an interrupted run left")
        problem = shard_problem(path, read_rows=True)
        if problem not in (None, "missing"):
            log.warning(f"{path} is {problem}: encoding it again")
        if problem:
            todo.append(k)
    log.info(
        f"rank {rank}: {len(mine)} of {num_shards} shards are mine, "
        f"{len(mine) - len(todo)} already done, {len(todo)} to encode"
    )
    return todo


def encode_shards(cfg, output_dir, source, codec, batch_size, shards, todo, rank) -> Dict[str, Any]:
    """Encodes the ``todo`` shards one at a time; returns this run's counts."""
    run = {"shards_written": 0, "files_skipped": 0, "files_normalised": 0, "files_short": 0}
    run["audio_seconds"] = 0.0
    total = sum(len(shards[k]) for k in todo)
    pbar = tqdm(total=total, unit="file", desc=f"Encoding (rank {rank})", disable=rank != 0)
    t0 = time.perf_counter()

    def progress(n: int, audio_seconds: float) -> None:
        run["audio_seconds"] += audio_seconds
        pbar.update(n)
        speed = run["audio_seconds"] / max(time.perf_counter() - t0, 1e-9)
        pbar.set_postfix(audio_s_per_s=f"{speed:.1f}")

    max_shards = cfg.get("max_shards")
    with logging_redirect_tqdm(loggers=[log]):  # log lines above the bar
        for k in todo:
            if max_shards is not None and run["shards_written"] >= int(max_shards):
                break
            path = output_dir / shard_name(k, len(shards))
            meta = encode_shard(
                path,
                source,
                shards[k],
                codec,
                progress=progress,
                logger=log,
                writer={"shard": k, "rank": rank, "host": socket.gethostname()},
                max_seconds=cfg.max_seconds,
                long_files=cfg.long_files,
                batch_size=batch_size,
                max_batch_seconds=cfg.get("max_batch_seconds"),
            )
            if meta is None:
                log.info(f"{path.name}: already written by another process")
                pbar.update(len(shards[k]))
                continue
            run["shards_written"] += 1
            run["files_skipped"] += len(meta["skipped"])
            run["files_normalised"] += len(meta["normalised"])
            run["files_short"] += len(meta["short_files"])
            log.info(
                f"rank {rank}: wrote {path.name} ({meta['rows']} rows, "
                f"{meta['seconds']:.1f} s of audio, {len(meta['skipped'])} skipped)"
            )
    pbar.close()
    elapsed, seconds = time.perf_counter() - t0, run["audio_seconds"]
    log.info(
        f"rank {rank}: encoded {run['shards_written']} shards, {seconds / 3600:.3f} h of audio "
        f"in {elapsed:.1f} s ({seconds / max(elapsed, 1e-9):.1f} audio s/s), "
        f"{run['files_skipped']} files skipped, {run['files_normalised']} normalised "
        f"(peak above 2.0), {run['files_short']} shorter than their header says (encoded as "
        "they are)"
    )
    return run


def check_encoded(output_dir: Path, num_shards: int, todo: Sequence[int]) -> None:
    """Fails when shards this run was to encode are still missing or corrupt: the run must not
    look successful."""
    left = [
        shard_name(k, num_shards)
        for k in todo
        if shard_problem(output_dir / shard_name(k, num_shards)) is not None
    ]
    if left:
        raise UserError(
            f"{len(left)} shards of {output_dir} were not encoded ({', '.join(left[:5])}"
            f"{', ...' if len(left) > 5 else ''}). Run the same command again to encode them."
        )


def finish(output_dir: Path, num_shards: int, num_quantizers: int):
    """Writes ``cache.json`` once every shard exists (None before); fails on an empty cache."""
    manifest = finalize_cache(output_dir)
    if manifest is None:
        left = sum(
            shard_problem(output_dir / shard_name(k, num_shards)) is not None
            for k in range(num_shards)
        )
        log.info(
            f"{left} shards are not written yet: other ranks or processes may still be "
            "encoding them; if every one has finished (max_shards, an interruption), run the "
            "same command again to finish the cache"
        )
        return None
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
        f"{c['rows']} rows, {c['hours']:.3f} h, Q={num_quantizers}; skipped {c['skipped']}"
        + (f" {manifest['skipped_by_reason']}" if c["skipped"] else "")
        + f"; normalised {c['normalised']}; shorter than their header {c['short_files']}"
    )
    return manifest


def tokenize(cfg: DictConfig) -> Dict[str, Any]:
    """Encodes this rank's missing shards and, when every shard exists, writes ``cache.json``.

    Returns a summary of this run (``manifest`` is the cache manifest once complete)."""
    check_settings(cfg)
    rank, world_size = distributed_rank_and_world_size()
    output_dir = check_output_dir(cfg.output_dir)
    source = open_source(cfg)
    codec, batch_size = load_codec(cfg)
    log.info(f"rank {rank}/{world_size}: codec {codec}")
    shards = plan_cache(cfg, output_dir, source, codec)
    todo = shards_to_encode(output_dir, len(shards), rank, world_size)
    run = encode_shards(cfg, output_dir, source, codec, batch_size, shards, todo, rank)
    if cfg.get("max_shards") is None:
        check_encoded(output_dir, len(shards), todo)
    manifest = finish(output_dir, len(shards), int(cfg.num_quantizers))
    return {"rank": rank, **run, "manifest": manifest}


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    tokenize(cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_tokenize"))
