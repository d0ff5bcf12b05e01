"""Audio -> a Mimi code cache on disk: encoding, shards and the cache's metadata.

Encoding Mimi inside the training loop costs more than the language model step, so audio is
encoded once, in length-sorted batches, into a cache that later runs read (the tokenize recipe
builds it, ``audio_token_dataset`` and the eval recipe read it). Layout of ``output_dir``::

    plan.json                            settings and items (:func:`start_cache` owns its keys)
    shard-00000-of-00012.parquet         rows of ``shard_size`` source items (``SHARD_SCHEMA``;
                                         codes flat uint16, level-major [Q, num_frames])
    cache.json                           plan + summed shard counts, once every shard exists
    skipped.jsonl                        every skipped source item with its reason
    pack_index/<key>/                    what training reads, per settings (``pack_index``)

A shard is written whole under a temporary name and renamed (``llama_mimi_tt.atomic_files``),
so it is whole or absent; a rerun (with any number of ranks; shard k is rank
``k % world_size``'s) encodes only missing or corrupt shards, and the rank that owns a shard
removes its leftover temporaries. There are no claim files: two writers of one shard can only
waste work, never corrupt it, while claims on a shared filesystem need the clocks of two
machines and PIDs across hosts to be right, and a failed write left a claim that blocked every
rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llama_mimi_tt import atomic_files
from llama_mimi_tt.audio import BLOCK_SECONDS
from llama_mimi_tt.audio_sources import AudioItem, AudioSource
from llama_mimi_tt.errors import MissingFileError, UserError, writing
from llama_mimi_tt.vocab import (
    MIMI_CODEBOOK_SIZE,
    MIMI_FRAME_RATE,
    MIMI_SAMPLE_RATE,
    check_codes,
)

CACHE_FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
MANIFEST_FILE = "cache.json"
SKIPPED_FILE = "skipped.jsonl"
SHARD_METADATA_KEY = b"llama_mimi_tt"
PACK_INDEX_FOLDER = "pack_index"  # llama_mimi_tt.pack_index writes its indexes there
# Training reads rows in shuffled order, a parquet row group at a time: 64 rows of 10 s at
# Q = 8 decode in about 1 ms, a group of 1,000 in about 28 (for 13% more bytes on disk).
ROWS_PER_GROUP = 64

LONG_FILE_RULES = ("split", "truncate")

SHARD_SCHEMA = pa.schema(  # one row per utterance, or per piece of a long file
    [
        ("id", pa.string()),  # the source item's id (pieces of one file share it)
        ("segment", pa.int32()),  # 0, 1, ... for the pieces of a file split by max_seconds
        ("partial", pa.bool_()),  # only part of its file (split or truncated)
        ("codes", pa.list_(pa.uint16())),  # [Q, num_frames] flattened level-major
        ("num_frames", pa.int32()),  # 12.5 per second
        ("text", pa.string()),  # transcript, when the source has one
        ("path", pa.string()),  # the source file (or the dataset row's audio path)
        ("start", pa.float32()),  # offset of the piece in its file, seconds
        ("duration", pa.float32()),  # seconds of audio in this row
        ("source_duration", pa.float32()),  # seconds of the whole file
    ]
)


# ---- encoding ----------------------------------------------------------------------------
def is_code_cache(path) -> bool:
    """Whether ``path`` is a code cache folder (its cache.json, or a run's plan.json)."""
    p = Path(str(path)).expanduser()
    return p.is_dir() and ((p / MANIFEST_FILE).is_file() or (p / PLAN_FILE).is_file())


def piece_spans(
    num_samples: int, sample_rate: int, max_seconds: Optional[float], long_files: str
) -> List[Tuple[int, int]]:
    """``[(start_sample, num_samples), ...]`` of the pieces of a waveform of ``num_samples``.

    Longer than ``max_seconds``: ``split`` gives consecutive pieces of ``max_seconds`` (the
    last one shorter, kept if it holds at least one Mimi frame, 80 ms); ``truncate`` only the
    first ``max_seconds``. A waveform that fits is one piece."""
    if long_files not in LONG_FILE_RULES:
        raise UserError(f"long_files must be one of {LONG_FILE_RULES}, got {long_files!r}")
    n = int(num_samples)
    if not max_seconds or n <= max_seconds * sample_rate:
        return [(0, n)]
    step = int(round(max_seconds * sample_rate))
    if long_files == "truncate":
        return [(0, step)]
    min_piece = math.ceil(sample_rate / MIMI_FRAME_RATE)
    return [(s, min(step, n - s)) for s in range(0, n, step) if n - s >= min_piece or s == 0]


def cut_long_audio(
    wave: torch.Tensor, sample_rate: int, max_seconds: Optional[float], long_files: str
) -> List[Tuple[int, torch.Tensor]]:
    """``[(start_sample, piece), ...]`` of a waveform in memory, cut by :func:`piece_spans`."""
    spans = piece_spans(wave.shape[-1], sample_rate, max_seconds, long_files)
    return [(s, wave[s : s + k]) for s, k in spans]


@dataclass
class _ItemCount:
    pieces_left: int
    rows: int = 0
    samples: int = 0


@dataclass
class _Piece:
    item: AudioItem
    segment: int
    start: int
    wave: torch.Tensor
    source_samples: int
    partial: bool


def _batches(
    pieces: Iterator[_Piece], batch_size: int, max_batch_samples: Optional[int]
) -> Iterator[List[_Piece]]:
    """Groups consecutive pieces: at most ``batch_size`` of them, and at most
    ``max_batch_samples`` samples once padded to the longest."""
    batch: List[_Piece] = []
    longest = 0
    for piece in pieces:
        n = piece.wave.shape[-1]
        new_longest = max(longest, n)
        if batch and (
            len(batch) >= batch_size
            or (max_batch_samples and new_longest * (len(batch) + 1) > max_batch_samples)
        ):
            yield batch
            batch, new_longest = [], n
        batch.append(piece)
        longest = new_longest
    if batch:
        yield batch


def skip_kind(error: Exception) -> str:
    """A short class for the summary: missing, unreadable, empty, non-finite or invalid."""
    msg = str(error)
    if isinstance(error, FileNotFoundError):
        return "missing"
    if "empty audio" in msg:
        return "empty"
    if "NaN" in msg or " inf " in msg:
        return "non-finite"
    if "cannot read" in msg or "cannot decode" in msg or isinstance(error, OSError):
        return "unreadable"
    return "invalid"


class _EncodeRun:
    """What one :func:`encode_items` call has made so far: rows, skipped items, and for each item
    whose pieces are still being encoded, how many are left, rows made and samples encoded."""

    def __init__(
        self, source, codec, max_seconds, long_files, progress, logger, normalised, short_files
    ):
        self.source, self.codec, self.progress, self.logger = source, codec, progress, logger
        self.max_seconds, self.long_files, self.normalised = max_seconds, long_files, normalised
        self.short_files = short_files
        self.sample_rate = int(codec.sample_rate)
        frame_rate = float(getattr(codec, "frame_rate", MIMI_FRAME_RATE))
        self.frame_samples = math.ceil(self.sample_rate / frame_rate)
        self.num_quantizers = getattr(codec, "num_quantizers", None)
        self.rows: List[Dict[str, Any]] = []
        self.skipped: List[Dict[str, str]] = []
        self.in_flight: Dict[int, _ItemCount] = {}

    def skip(self, item: AudioItem, kind: str, reason: str) -> None:
        self.skipped.append(
            {"id": item.id, "path": item.path or "", "kind": kind, "reason": reason}
        )
        if self.logger is not None:
            self.logger.warning(f"skipping {item.id} ({kind}): {reason}")
        if self.progress is not None:
            self.progress(1, 0.0)

    def pieces(self, order: Sequence[AudioItem]) -> Iterator[_Piece]:
        """Reads, checks and cuts each item; yields its pieces, skipping what cannot be encoded."""
        sr = self.sample_rate
        for item in order:
            if self.source.kind == "manifest" and not item.path:
                where = f"line {item.line}" if item.line else f"the row of {item.id}"
                self.skip(item, "missing", f"{self.source.location}, {where}: no audio path")
                continue
            report: Dict[str, float] = {}
            step = int(round(self.max_seconds * sr)) if self.max_seconds else None
            try:  # checks the whole file (or what truncate keeps) block by block
                audio = self.source.open(
                    item,
                    sr,
                    max_samples=step if self.long_files == "truncate" else None,
                    report=report,
                    block_seconds=self.max_seconds or BLOCK_SECONDS,
                )
            except (OSError, ValueError, TypeError, RuntimeError) as e:
                self.skip(item, skip_kind(e), str(e))
                continue
            n = audio.num_samples
            if "header_frames" in report:  # the file holds less than its header says
                reason = (
                    f"its header says {report['header_seconds']:.2f} s, it holds {n / sr:.2f} s"
                )
                if self.short_files is None:
                    self.skip(item, "short file", reason)
                    continue
                self.short_files.append({"id": item.id, "path": item.path or "", "reason": reason})
            if n < self.frame_samples:
                ms = 1000 * n / sr
                self.skip(item, "too short", f"{ms:.0f} ms: shorter than one Mimi frame (80 ms)")
                continue
            if "peak" in report and self.normalised is not None:
                self.normalised.append(
                    {"id": item.id, "path": item.path or "", "peak": report["peak"]}
                )
            spans = piece_spans(n, sr, self.max_seconds, self.long_files)
            self.in_flight[item.index] = _ItemCount(pieces_left=len(spans))
            partial = len(spans) > 1 or spans[0][1] < n
            # the pieces are read one at a time: at most a piece and a block are held per item
            for k, ((start, _), piece) in enumerate(zip(spans, audio.pieces(step))):
                yield _Piece(item, k, start, piece, n, partial)

    def add(self, piece: _Piece, codes) -> None:
        """Keeps the codes of one piece as a row; the item is done when its last piece is."""
        c = torch.as_tensor(codes).detach().cpu()
        item, sr, q = piece.item, self.sample_rate, self.num_quantizers
        count = self.in_flight[item.index]
        count.pieces_left -= 1
        count.samples += piece.wave.shape[-1]
        if c.dim() != 2 or (q is not None and c.shape[0] != q):
            raise ValueError(f"the codec gave codes of shape {tuple(c.shape)}, not [{q}, F]")
        if c.shape[-1] > 0:
            check_codes(c, MIMI_CODEBOOK_SIZE, where=f"the codec's codes for {item.id}")
            count.rows += 1
            self.rows.append(
                {
                    "id": item.id,
                    "segment": piece.segment,
                    "partial": piece.partial,
                    "codes": c.numpy().astype(np.uint16),
                    "num_frames": int(c.shape[-1]),
                    "text": item.text,
                    "path": item.path or "",
                    "start": piece.start / sr,
                    "duration": piece.wave.shape[-1] / sr,
                    "source_duration": piece.source_samples / sr,
                    "_index": item.index,
                }
            )
        if count.pieces_left == 0:
            del self.in_flight[item.index]
            if count.rows == 0:
                self.skip(item, "too short", "shorter than one Mimi frame (80 ms)")
            elif self.progress is not None:
                self.progress(1, count.samples / sr)

    def result(self) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]]]:
        """``(rows, skipped)``, rows in source order (item index, then segment)."""
        rows = sorted(self.rows, key=lambda r: (r["_index"], r["segment"]))
        for r in rows:
            del r["_index"]
        return rows, self.skipped


def encode_items(
    source: AudioSource,
    items: Sequence[AudioItem],
    codec,
    *,
    max_seconds: Optional[float] = 60.0,
    long_files: str = "split",
    batch_size: int = 16,
    max_batch_seconds: Optional[float] = 320.0,
    progress: Optional[Callable[[int, float], None]] = None,
    logger=None,
    normalised: Optional[List[Dict[str, Any]]] = None,
    short_files: Optional[List[Dict[str, Any]]] = None,
) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]]]:
    """Encodes ``items`` in batches of similar length; returns ``(rows, skipped)``.

    Items are sorted by their header duration so that a batch wastes little on padding; each
    is checked, mixed down and resampled (``llama_mimi_tt.audio``), cut by the ``max_seconds``
    rule (:func:`piece_spans`), and encoded with ``codec.encode_batch``. A file is read in
    blocks and its pieces made one at a time (``AudioSource.open``), so memory is bounded by
    ``max_seconds`` and the batch, not by the file's length; ``truncate`` decodes only what it
    keeps. Rows come back in source order (item index, then segment), whatever the batch
    order was.

    Args:
        source (AudioSource): where the items come from.
        items (Sequence[AudioItem]): the items to encode.
        codec: a ``MimiCodec`` (``encode_batch(waves, sample_rate, batch_size)``).
        max_seconds (Optional[float]): longer files are split or truncated (``long_files``).
        long_files (str): ``split`` or ``truncate``.
        batch_size (int): most pieces per encoder call.
        max_batch_seconds (Optional[float]): most seconds of audio per encoder call, counted
            after padding to the longest piece of the batch (bounds memory).
        progress (Callable): called as ``progress(num_items_done, audio_seconds)``, with the
            seconds of audio encoded (after ``max_seconds``).
        logger: where skip reasons are logged (``logger.warning``).
        normalised (Optional[List[dict]]): if given, gets ``{"id", "path", "peak"}`` of every
            item whose audio was normalised (peak above 2.0).
        short_files (Optional[List[dict]]): an item that holds less audio than its header says
            (a cut-off WAV) is skipped (kind ``short file``) when None; else what it holds is
            encoded, with a logged warning, and ``{"id", "path", "reason"}`` goes here.

    Returns:
        rows (List[dict]): one per piece, with the columns of ``SHARD_SCHEMA`` (``codes`` as
            a uint16 array ``[Q, F]``).
        skipped (List[dict]): ``{"id", "path", "kind", "reason"}`` of each item that could not
            be read or is shorter than one Mimi frame, 80 ms (kind: missing, unreadable, empty,
            non-finite, too short, invalid).
    """
    run = _EncodeRun(
        source, codec, max_seconds, long_files, progress, logger, normalised, short_files
    )
    sr = run.sample_rate
    order = sorted(items, key=lambda it: (source.seconds_hint(it), it.index))
    max_batch_samples = int(max_batch_seconds * sr) if max_batch_seconds else None
    for batch in _batches(run.pieces(order), batch_size, max_batch_samples):
        codes = codec.encode_batch([p.wave for p in batch], sr, batch_size=len(batch))
        for piece, c in zip(batch, codes):
            run.add(piece, c)
    return run.result()


# ---- shards ------------------------------------------------------------------------------
def shard_name(k: int, num_shards: int) -> str:
    return f"shard-{k:05d}-of-{num_shards:05d}.parquet"


def shard_items(items: Sequence[AudioItem], shard_size: int) -> List[Sequence[AudioItem]]:
    """Consecutive groups of ``shard_size`` source items (the last one smaller)."""
    if shard_size < 1:
        raise UserError(f"shard_size must be at least 1, got {shard_size}")
    return [items[i : i + shard_size] for i in range(0, len(items), shard_size)]


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> List[int]:
    """Shard k is rank ``k % world_size``'s: a deterministic split that needs no process group."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(range(rank, num_shards, world_size))


def rows_to_table(rows: Sequence[Dict[str, Any]], metadata: Optional[dict] = None) -> pa.Table:
    """Rows of :func:`encode_items` -> an Arrow table with ``SHARD_SCHEMA``."""
    flat = [np.ascontiguousarray(r["codes"], dtype=np.uint16).reshape(-1) for r in rows]
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in flat], out=offsets[1:])
    values = np.concatenate(flat) if flat else np.zeros(0, dtype=np.uint16)
    columns = {name: [r[name] for r in rows] for name in SHARD_SCHEMA.names if name != "codes"}
    arrays = []
    for field in SHARD_SCHEMA:
        if field.name == "codes":
            arrays.append(pa.LargeListArray.from_arrays(offsets, values).cast(field.type))
        else:
            arrays.append(pa.array(columns[field.name], type=field.type))
    schema = SHARD_SCHEMA
    if metadata is not None:
        schema = schema.with_metadata({SHARD_METADATA_KEY: json.dumps(metadata).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard(path: Path, rows: Sequence[Dict[str, Any]], metadata: dict) -> None:
    """Writes a shard whole (:func:`llama_mimi_tt.atomic_files.replacing`): a shard file that
    exists is complete."""
    table = rows_to_table(rows, metadata)
    with atomic_files.replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROWS_PER_GROUP)


def shard_metadata(path: Path) -> dict:
    """The counts and skipped items a shard carries in its parquet metadata."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(SHARD_METADATA_KEY, b"{}"))


def shard_problem(path: Path, read_rows: bool = False) -> Optional[str]:
    """None for a whole shard; else what is wrong with it: missing, or corrupt (its parquet
    footer or our metadata cannot be read; with ``read_rows``, also its data pages)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        meta = pq.read_metadata(path).schema.to_arrow_schema().metadata or {}
        json.loads(meta[SHARD_METADATA_KEY])
        if read_rows:
            pq.read_table(path)
    except KeyError:
        return "corrupt: no llama_mimi_tt metadata in its parquet footer"
    except (OSError, ValueError, pa.ArrowException) as e:
        return "corrupt: " + " ".join(str(e).split()).rstrip(".")
    return None


def encode_shard(
    path: Path,
    source: AudioSource,
    items: Sequence[AudioItem],
    codec,
    *,
    progress: Optional[Callable[[int, float], None]] = None,
    logger=None,
    writer: Optional[dict] = None,
    skip_short_files: bool = False,
    **encode_options: Any,
) -> Optional[dict]:
    """Encodes shard ``path``'s ``items`` (:func:`encode_items`) and writes it whole.

    Returns its metadata, or None when the shard was already whole (written meanwhile by
    another process). ``writer``: extra metadata (rank, host). ``skip_short_files``: skip
    files that hold less than their header says (else they are encoded and listed in the
    shard's ``short_files``; see :func:`encode_items`).
    """
    path = Path(path)
    if shard_problem(path, read_rows=True) is None:
        return None
    normalised: List[dict] = []
    short_files: Optional[List[dict]] = None if skip_short_files else []
    rows, skipped = encode_items(
        source,
        items,
        codec,
        progress=progress,
        logger=logger,
        normalised=normalised,
        short_files=short_files,
        **encode_options,
    )
    meta = shard_summary(len(items), rows, skipped, normalised, **(writer or {}))
    meta["short_files"] = short_files or []
    write_shard(path, rows, meta)
    return meta


def shard_codes(path: Path) -> Iterator[Tuple[str, int, np.ndarray]]:
    """``(id, segment, codes [Q, F] uint16)`` of every row of a shard."""
    table = pq.read_table(path, columns=["id", "segment", "codes", "num_frames"])
    columns = table.to_pydict()
    for uid, segment, flat, frames in zip(
        columns["id"], columns["segment"], columns["codes"], columns["num_frames"]
    ):
        yield uid, segment, np.asarray(flat, dtype=np.uint16).reshape(-1, frames)


def codec_fingerprint(codec) -> str:
    """A short hash that changes when the codec's weights or settings change, so that a code
    cache is never reused across codecs (a random codec's seed, another Mimi checkpoint, Q)."""
    h = hashlib.sha1()
    h.update(type(codec).__name__.encode())
    for attr in ("num_quantizers", "sample_rate", "frame_rate"):
        h.update(f"{attr}={getattr(codec, attr, None)}".encode())
    module = codec if isinstance(codec, torch.nn.Module) else getattr(codec, "model", None)
    if isinstance(module, torch.nn.Module):
        with torch.no_grad():
            for name, t in sorted(module.state_dict().items()):
                t = t.detach()
                # name, shape, the first 16k values and the sum: cheap, and any other
                # checkpoint or seed differs in them
                head = t.flatten()[:16384].to("cpu", torch.float64).numpy().tobytes()
                total = float(t.double().sum()) if t.is_floating_point() else float(t.sum())
                h.update(f"{name}{tuple(t.shape)}{total!r}".encode() + head)
    elif hasattr(codec, "fingerprint"):
        h.update(str(codec.fingerprint).encode())
    return h.hexdigest()[:16]


def remove_cache(output_dir: Path) -> None:
    """Deletes the files of a code cache (and only those, with its pack indexes and
    temporaries) from ``output_dir``, ``plan.json`` last: killed half-way, the folder still
    names the old plan, so no old shard is ever taken for a shard of the next cache. Only the
    owner of the cache may call it."""
    output_dir = Path(output_dir)
    shards = sorted(output_dir.glob("shard-*.parquet*"))
    with writing(output_dir):
        shutil.rmtree(output_dir / PACK_INDEX_FOLDER, ignore_errors=True)
        for name in ("shard-*", MANIFEST_FILE, SKIPPED_FILE):
            atomic_files.remove_temporaries(output_dir / name)
        for f in shards + [output_dir / n for n in (MANIFEST_FILE, SKIPPED_FILE, PLAN_FILE)]:
            f.unlink(missing_ok=True)


# ---- plan and manifest -------------------------------------------------------------------
class CacheMismatchError(UserError):
    """A folder holds a code cache built with other settings or other items."""


def start_cache(
    output_dir: Path,
    *,
    num_shards: int,
    shard_size: int,
    num_quantizers: int,
    num_items: int,
    source: Optional[str] = None,
    source_kind: Optional[str] = None,
    items_fingerprint: Optional[str] = None,
    codec: Any = None,
    max_seconds: Optional[float] = None,
    long_files: Optional[str] = None,
    codebook_size: int = MIMI_CODEBOOK_SIZE,
    sample_rate: int = MIMI_SAMPLE_RATE,
    frame_rate: float = MIMI_FRAME_RATE,
) -> dict:
    """Writes ``plan.json`` of a new cache, or checks that a resumed run builds the same one.

    The one place that names the cache's settings: :func:`finalize_cache` copies them into
    ``cache.json`` beside the counts, and readers find them there.

    Args:
        codec: what identifies the codec (its config, or :func:`codec_fingerprint`).
        others: what the cache holds and how it was cut (see the module docstring).

    Raises:
        CacheMismatchError: ``output_dir`` holds a cache built with other settings or items.
    """
    plan = {
        "format_version": CACHE_FORMAT_VERSION,
        "source": source,
        "source_kind": source_kind,
        "num_items": int(num_items),
        "items_fingerprint": items_fingerprint,
        "shard_size": int(shard_size),
        "num_shards": int(num_shards),
        "num_quantizers": int(num_quantizers),
        "codebook_size": int(codebook_size),
        "sample_rate": int(sample_rate),
        "frame_rate": float(frame_rate),
        "codec": codec,
        "max_seconds": max_seconds,
        "long_files": long_files,
        "codes_layout": "flat uint16, level-major [Q, num_frames]",
    }
    output_dir = Path(output_dir)
    with writing(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / PLAN_FILE
    if not path.is_file():
        atomic_files.write_json(path, plan)
    existing = json.loads(path.read_text())
    diffs = [
        f"{k}: {existing.get(k)!r} in the cache, {plan.get(k)!r} now"
        for k in sorted(set(plan) | set(existing))
        if existing.get(k) != plan.get(k)
    ]
    if diffs:
        raise CacheMismatchError(
            f"{output_dir} holds a code cache built with other settings or items, so it "
            "cannot be resumed: " + "; ".join(diffs) + ". Use a new output_dir, or the same "
            "settings to finish the existing cache."
        )
    return existing


def shard_summary(
    items: int,
    rows: Sequence[Dict[str, Any]],
    skipped: Sequence[dict] = (),
    normalised: Sequence[dict] = (),
    **extra: Any,
) -> dict:
    """The metadata a shard carries (summed by :func:`finalize_cache`): counts of its source
    ``items``, encoded items, ``rows``, frames and seconds, its skipped and normalised items, and
    ``extra`` (who wrote it)."""
    meta = dict(extra)
    meta.update(
        items=items,
        encoded_items=items - len(skipped),
        rows=len(rows),
        frames=sum(int(r["num_frames"]) for r in rows),
        seconds=sum(float(r["duration"]) for r in rows),
        skipped=list(skipped),
        normalised=list(normalised),
    )
    return meta


def cache_status(output_dir: Path) -> Tuple[dict, List[int]]:
    """``(plan, indices of the shards still to do)`` of a cache directory: missing or corrupt."""
    output_dir = Path(output_dir)
    plan = json.loads((output_dir / PLAN_FILE).read_text())
    n = plan["num_shards"]
    missing = [k for k in range(n) if shard_problem(output_dir / shard_name(k, n))]
    return plan, missing


def finalize_cache(output_dir: Path) -> Optional[dict]:
    """Writes ``cache.json`` and ``skipped.jsonl`` once every shard exists; returns the manifest
    (``None`` while shards are missing). Idempotent, so racing ranks are harmless."""
    output_dir = Path(output_dir)
    plan, missing = cache_status(output_dir)
    if missing:
        return None
    n = plan["num_shards"]
    counts = {"items": 0, "encoded_items": 0, "rows": 0, "frames": 0, "seconds": 0.0}
    skipped: List[dict] = []
    normalised: List[dict] = []
    short_files: List[dict] = []
    for k in range(n):
        meta = shard_metadata(output_dir / shard_name(k, n))
        for key in counts:
            counts[key] += meta.get(key, 0)
        skipped += meta.get("skipped", [])
        normalised += meta.get("normalised", [])
        short_files += meta.get("short_files", [])
    reasons: Dict[str, int] = {}
    for s in skipped:
        reasons[s["kind"]] = reasons.get(s["kind"], 0) + 1
    counts["skipped"] = len(skipped)
    counts["normalised"] = len(normalised)
    counts["short_files"] = len(short_files)
    counts["hours"] = round(counts["seconds"] / 3600, 4)
    manifest = dict(plan)
    manifest.update(
        complete=True,
        counts=counts,
        skipped_by_reason=reasons,
        skipped_examples=skipped[:100],
        normalised_examples=normalised[:100],
        short_files_examples=short_files[:100],
        shards=[shard_name(k, n) for k in range(n)],
        shard_rows=[pq.read_metadata(output_dir / shard_name(k, n)).num_rows for k in range(n)],
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    atomic_files.write_bytes(
        output_dir / SKIPPED_FILE, "".join(json.dumps(s) + "\n" for s in skipped).encode()
    )
    atomic_files.write_json(output_dir / MANIFEST_FILE, manifest)
    return manifest


def read_cache_manifest(cache_dir: str, check_shards: bool = True) -> dict:
    """``cache.json`` of a finished cache, with clear errors for a missing or unfinished one;
    ``check_shards`` also reads every shard's footer (a cost that grows with the cache)."""
    d = Path(str(cache_dir)).expanduser()
    if not d.exists():
        raise MissingFileError(
            f"code cache {d} does not exist: build it with "
            f"`tune run llama_mimi_tokenize --config tokenize source=... output_dir={d}`"
        )
    manifest = d / MANIFEST_FILE
    if not manifest.is_file():
        if (d / PLAN_FILE).is_file():
            plan, missing = cache_status(d)
            raise UserError(
                f"code cache {d} is unfinished: {len(missing)} of {plan['num_shards']} shards "
                "are missing. Run the same `tune run llama_mimi_tokenize` command again to "
                "finish it (finished shards are kept)."
            )
        raise MissingFileError(
            f"{d} is not a code cache (no {MANIFEST_FILE}): build one with "
            f"`tune run llama_mimi_tokenize --config tokenize source=<your audio> output_dir={d}`"
        )
    info = json.loads(manifest.read_text())
    version = info.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise UserError(
            f"code cache {d} has format_version {version}; this llama_mimi_tt reads "
            f"{CACHE_FORMAT_VERSION}. Rebuild it with tune run llama_mimi_tokenize."
        )
    for name in info["shards"] if check_shards else ():
        problem = shard_problem(d / name)
        if problem:
            raise corrupt_shard_error(d, d / name, problem)
    return info


def corrupt_shard_error(cache_dir: Path, shard: Path, problem: str) -> UserError:
    """The error for a shard that is missing or cannot be read, with how to repair it."""
    plan_file = Path(cache_dir) / PLAN_FILE
    source = json.loads(plan_file.read_text()).get("source") if plan_file.is_file() else None
    return UserError(
        f"code cache {cache_dir}: shard {shard} is {problem}. Run `tune run llama_mimi_tokenize` "
        f"again with the settings that built it (source={source or '...'} "
        f"output_dir={cache_dir}): it encodes that shard again and keeps the others."
    )


def cache_shard_files(cache_dir: str) -> List[str]:
    """The shard files of a finished cache that hold rows (a shard of bad files has none)."""
    info = read_cache_manifest(cache_dir)
    d = Path(str(cache_dir)).expanduser()
    files = [str(d / s) for s, n in zip(info["shards"], info["shard_rows"]) if n > 0]
    if not files:
        raise UserError(
            f"code cache {d} holds no utterances: every source file was skipped (reasons in "
            f"{d / SKIPPED_FILE})"
        )
    return files


def distributed_rank_and_world_size() -> Tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from torchrun's environment ((0, 1) when not launched by it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def write_code_cache(
    output_dir: Path,
    utterances: Sequence[Dict[str, Any]],
    num_quantizers: int,
    shard_size: int = 1000,
) -> Path:
    """Writes a finished code cache from codes you already have (no codec): each utterance a dict
    with ``id``, ``codes`` ``[num_quantizers, frames]`` and optional ``text``, ``segment``,
    ``partial``. Tests, benchmarks, and codes made by another pipeline use it."""
    output_dir = Path(output_dir)
    rows = []
    for u in utterances:
        frames = u["codes"].shape[1]
        rows.append(
            dict(
                id=u["id"],
                segment=u.get("segment", 0),
                partial=u.get("partial", False),
                codes=u["codes"],
                num_frames=frames,
                text=u.get("text"),
                path=u.get("path", f"/audio/{u['id']}.wav"),
                start=0.0,
                duration=frames / MIMI_FRAME_RATE,
                source_duration=frames / MIMI_FRAME_RATE,
            )
        )
    shards = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    start_cache(
        output_dir,
        num_shards=len(shards),
        shard_size=shard_size,
        num_quantizers=num_quantizers,
        num_items=len(rows),
        source_kind="codes",
    )
    for k, shard in enumerate(shards):
        write_shard(
            output_dir / shard_name(k, len(shards)), shard, shard_summary(len(shard), shard)
        )
    if finalize_cache(output_dir) is None:
        raise RuntimeError(f"{output_dir}: the cache did not finalize")
    return output_dir
