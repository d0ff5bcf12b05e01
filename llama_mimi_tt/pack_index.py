"""The sample and pack index of a code cache: what a training run reads, computed once.

Which utterances a run uses (split, tts text), how each is cut into samples of at most
``max_seq_len`` tokens and how samples are packed depend only on the small columns of the cache
(``num_frames``, ``id``, ``partial``, ``text``) and on the settings, so they are computed once,
vectorised over ``num_frames`` a shard at a time, and written as flat arrays beside the cache
(``<cache>/pack_index/<key>/``, ``key`` a hash of the settings and of ``cache.json``). Every rank
memory-maps them: start-up and private memory do not grow with the corpus, and a pack is read
from the parquet rows only when the sampler asks for it. The pages a run reads stay in the page
cache, shared by the ranks of a node and given back under memory pressure (16 bytes an
utterance and 12 a pack: about 2 GB at the paper's 240,000 hours). A changed cache or setting
gives another key.

Arrays (``meta.json`` names their dtypes and lengths)::

    row [R]            global cache row of each used utterance, in cache order (int32 when
                       the cache has fewer than 2**31 rows)
    first [R]          frames in its first sample
    sample_start [R+1] its samples are sample_start[r] .. sample_start[r+1] - 1
    pack_sample [P+1]  pack p starts in sample pack_sample[p] at token pack_offset[p]
    pack_offset [P+1]  (0: the sample's start; > 0: a continuation after a frame boundary)

Packing is greedy in cache order, exactly as :func:`llama_mimi_tt.data.pack_frame_aligned`
(and torchtune's ``PackedDataset`` for ``split_across_pack=False``); packs are contiguous, so
pack p is everything from its start to pack p + 1's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch.distributed as dist
from torchtune.utils import get_logger
from tqdm import tqdm

from llama_mimi_tt.atomic_files import new_folder, remove_temporaries
from llama_mimi_tt.cache_reader import INDEX_COLUMNS, CacheRows
from llama_mimi_tt.code_cache import MANIFEST_FILE, PACK_INDEX_FOLDER

log = get_logger("INFO")

INDEX_VERSION = 1
BUILD_TIMEOUT = timedelta(hours=2)  # how long the other ranks wait for rank 0 to compute it
INDEX_FOLDER = PACK_INDEX_FOLDER
META_FILE = "meta.json"
PARTIAL_REASON = (
    "part of a long file (split or truncated by max_seconds), so the text does not match the audio"
)


@dataclass(frozen=True)
class IndexSettings:
    """Everything the index depends on besides the cache itself."""

    num_quantizers: int
    max_seq_len: Optional[int]
    task: str
    long_utterances: str
    split: str
    val_fraction: float
    packed: bool
    split_across_pack: bool
    drop_empty_text: bool
    text_tokenizer: Optional[str]  # tts: what counts the text's tokens (its path)

    def key(self, cache_fingerprint: str) -> str:
        blob = json.dumps([INDEX_VERSION, asdict(self), cache_fingerprint], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass
class PackIndex:
    """The arrays of an index (memory-mapped from disk, or in memory) and its ``meta``."""

    arrays: Dict[str, np.ndarray]
    meta: dict
    folder: Optional[Path] = None  # where it lives (None: in memory)

    @property
    def num_samples(self) -> int:
        return int(self.arrays["sample_start"][-1])

    @property
    def num_packs(self) -> int:
        return max(len(self.arrays.get("pack_sample", ())) - 1, 0)


# ---- which rows, how many samples (vectorised) --------------------------------------------
def _tts_heads(block, keep, builder, skipped: Dict[str, int], empty_ids: List[str]):
    """tts: index of ``<audio>`` per row (1 + text tokens) and the rows usable (``keep`` less
    parts of long files and rows without text, which are counted in ``skipped``)."""
    partial = block.column("partial").to_numpy(zero_copy_only=False)
    if (keep & partial).any():
        skipped[PARTIAL_REASON] = skipped.get(PARTIAL_REASON, 0) + int((keep & partial).sum())
    keep = keep & ~partial
    texts = block.column("text").to_pylist()
    head = np.ones(block.num_rows, dtype=np.int64)
    for i in np.flatnonzero(keep):
        t = texts[i]
        if t and t.strip():
            head[i] = 1 + len(builder.text_ids(t))
        else:
            keep[i] = False
            skipped["empty text"] = skipped.get("empty text", 0) + 1
            if len(empty_ids) < 5:
                empty_ids.append(block.column("id")[int(i)].as_py())
    return head, keep


# ---- greedy packing, carried across blocks ------------------------------------------------
class _Packer:
    """Pack boundaries ``(sample, token offset)`` in order, one block of samples at a time.

    The same greedy rule as ``pack_frame_aligned``: a sample that does not fit the rest of the
    pack fills it with its head and the whole frames that fit, and continues in the next pack
    after a ``<bos> <audio>`` header; with less room than its head and one frame, the pack
    closes and the sample starts the next one. ``split=False`` moves whole samples only."""

    def __init__(self, max_seq_len: int, q: int, split: bool):
        self.L, self.q, self.split = max_seq_len, q, split
        self.fill = 0
        self.samples = 0

    def add(self, lengths: np.ndarray, heads: np.ndarray):
        L, q, split = self.L, self.q, self.split
        fill, base = self.fill, self.samples
        out_s: List[int] = []
        out_o: List[int] = []
        for i, (ln, a) in enumerate(zip(lengths.tolist(), heads.tolist())):
            if fill + ln < L:  # the common case: it fits
                fill += ln
                continue
            if fill + ln == L:
                out_s.append(base + i + 1)
                out_o.append(0)
                fill = 0
                continue
            if not split:
                out_s.append(base + i)
                out_o.append(0)
                fill = ln
                continue
            o, rem = 0, ln
            while rem > L - fill:
                frames = (L - fill - a - 1) // q
                if frames >= 1:
                    cut = a + 1 + frames * q
                    o = cut if o == 0 else o + cut - 2
                    rem, a = 2 + ln - o, 1
                out_s.append(base + i)
                out_o.append(o)
                fill = 0
            fill += rem
            if fill == L:
                out_s.append(base + i + 1)
                out_o.append(0)
                fill = 0
        self.fill, self.samples = fill, base + len(lengths)
        return np.array(out_s, dtype=np.int64), np.array(out_o, dtype=np.int64)

    def finish(self):
        if self.fill:
            self.fill = 0
            return np.array([self.samples], dtype=np.int64), np.zeros(1, dtype=np.int64)
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)


# ---- computing -----------------------------------------------------------------------------
class _Sink:
    """Arrays appended block by block, to files (``folder``) or to memory."""

    def __init__(self, folder: Optional[Path], dtypes: Dict[str, type]):
        self.folder, self.dtypes = folder, dtypes
        self.lengths = {k: 0 for k in dtypes}
        self.parts: Dict[str, list] = {k: [] for k in dtypes}
        self.files = {k: open(folder / f"{k}.bin", "wb") for k in dtypes} if folder else None

    def add(self, name: str, values) -> None:
        a = np.ascontiguousarray(values, dtype=self.dtypes[name])
        self.lengths[name] += len(a)
        if self.files:
            self.files[name].write(a.tobytes())
        else:
            self.parts[name].append(a)

    def close(self) -> Dict[str, np.ndarray]:
        if self.files:
            for f in self.files.values():
                f.close()  # new_folder syncs them
            return {}
        return {
            k: np.concatenate(p) if p else np.zeros(0, self.dtypes[k])
            for k, p in self.parts.items()
        }


def compute_index(
    rows: CacheRows,
    builder,
    settings: IndexSettings,
    folder: Optional[Path] = None,
    progress: bool = True,
    name: str = "dataset",
) -> PackIndex:
    """Computes the index of ``rows`` (see the module docstring), into ``folder`` or memory;
    ``name`` is how errors call the data."""
    from llama_mimi_tt.data import validation_mask  # the split rule's owner

    start = time.perf_counter()
    row_dtype = np.int32 if len(rows) < 2**31 else np.int64
    dtypes = {"row": row_dtype, "first": np.int32, "sample_start": np.int64}
    if settings.packed:
        dtypes.update(pack_sample=np.int64, pack_offset=np.int32)
    sink = _Sink(folder, dtypes)
    packer = _Packer(settings.max_seq_len, settings.num_quantizers, settings.split_across_pack)
    if settings.packed:
        sink.add("pack_sample", [0])
        sink.add("pack_offset", [0])
    sink.add("sample_start", [0])
    skipped: Dict[str, int] = {}
    empty_ids: List[str] = []
    columns = [c for c in INDEX_COLUMNS if settings.task == "tts" or c != "text"]
    base, samples = 0, 0
    blocks = rows.column_blocks(columns)
    bar = tqdm(
        blocks,
        total=len(rows.files) or 1,
        desc="Indexing the code cache",
        unit="shard",
        disable=not progress,
        dynamic_ncols=True,
    )
    for block in bar:
        n = block.num_rows
        keep = np.ones(n, dtype=bool)
        if settings.split != "all" and settings.val_fraction > 0:
            val = validation_mask(block.column("id").to_pylist(), settings.val_fraction)
            keep = val if settings.split == "validation" else ~val
        head = np.ones(n, dtype=np.int64)
        if settings.task == "tts":
            head, keep = _tts_heads(block, keep, builder, skipped, empty_ids)
        frames = block.column("num_frames").to_numpy().astype(np.int64)
        first, counts = builder.plan(frames, head)
        too_long = keep & (counts == 0)
        if too_long.any():
            reason = "text too long for max_seq_len"
            skipped[reason] = skipped.get(reason, 0) + int(too_long.sum())
        keep &= counts > 0
        used = np.flatnonzero(keep)
        sink.add("row", base + used)
        sink.add("first", first[used])
        counts = counts[used]
        sink.add("sample_start", samples + np.cumsum(counts))
        samples += int(counts.sum())
        if settings.packed:
            lengths, heads = builder.sample_lengths(frames[used], head[used], first[used], counts)
            s, o = packer.add(lengths, heads)
            sink.add("pack_sample", s)
            sink.add("pack_offset", o)
        base += n
    if settings.packed:
        s, o = packer.finish()
        sink.add("pack_sample", s)
        sink.add("pack_offset", o)
    if settings.task == "tts" and skipped.get("empty text") and not settings.drop_empty_text:
        raise ValueError(
            f"{name}: {skipped['empty text']} utterances have no text, which task=tts needs (first ids: "
            f"{empty_ids[:5]}). Fix the transcripts, use task=a2a, or set drop_empty_text=True "
            "to skip them."
        )
    arrays = sink.close()
    meta = {
        "version": INDEX_VERSION,
        "settings": asdict(settings),
        "cache_rows": base,
        "dtypes": {k: np.dtype(v).name for k, v in dtypes.items()},
        "lengths": sink.lengths,
        "rows": sink.lengths["row"],
        "samples": samples,
        "packs": max(sink.lengths.get("pack_sample", 0) - 1, 0),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return PackIndex(arrays, meta)


# ---- on disk -------------------------------------------------------------------------------
def cache_fingerprint(cache_dir: Path) -> str:
    """Changes whenever the cache is rebuilt or repaired (``cache.json`` is rewritten)."""
    return hashlib.sha1((Path(cache_dir) / MANIFEST_FILE).read_bytes()).hexdigest()


def open_index(folder: Path) -> PackIndex:
    """Memory-maps the arrays of an index folder (read-only)."""
    meta = json.loads((folder / META_FILE).read_text())
    arrays = {}
    for name, dtype in meta["dtypes"].items():
        n = meta["lengths"][name]
        if n == 0:
            arrays[name] = np.zeros(0, dtype=dtype)
        else:
            arrays[name] = np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=(n,))
    return PackIndex(arrays, meta, folder)


def index_folder(cache_dir: Path, settings: IndexSettings, fallback: Optional[str]) -> Path:
    """``<cache>/pack_index/<key>``, or under ``fallback`` (or ``~/.cache/llama_mimi_tt``) when
    the cache's folder cannot be written."""
    key = settings.key(cache_fingerprint(cache_dir))
    home = Path(cache_dir) / INDEX_FOLDER
    if (home / key / META_FILE).is_file() or os.access(cache_dir, os.W_OK):
        return home / key
    root = fallback or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llama_mimi_tt"
    )
    return Path(root).expanduser() / INDEX_FOLDER / key


def _build(
    folder: Path, rows: CacheRows, builder, settings: IndexSettings, name: str, owner: bool
) -> None:
    """Computes the index into a temporary folder beside ``folder`` and renames it into place
    (``llama_mimi_tt.atomic_files.new_folder``): an index folder that exists is complete.
    Racing builders write the same arrays; the first rename wins. The ``owner`` of the key
    (rank 0, or a process outside a process group) first removes the temporaries that killed
    builds left; ranks that build their own copy (see :func:`load_or_build_index`) may race
    each other, so they leave them."""
    if owner:
        remove_temporaries(folder)
    with new_folder(folder) as tmp:
        index = compute_index(rows, builder, settings, tmp, progress=True, name=name)
        (tmp / META_FILE).write_text(json.dumps(index.meta, indent=2) + "\n")
    log.info(
        f"pack index: {index.meta['rows']} utterances, {index.meta['samples']} samples, "
        f"{index.meta['packs']} packs, computed in {index.meta['seconds']:.1f} s -> {folder}"
    )


def load_or_build_index(
    cache_dir: Path, rows: CacheRows, builder, settings: IndexSettings, fallback=None
) -> PackIndex:
    """The index of a code cache for ``settings``: opened when it exists, else computed once
    and written. Under a process group rank 0 computes it while the others wait on a gloo
    group of ours whose timeout outlasts the computation (minutes on the paper's corpus;
    NCCL's default timeout is 10 minutes); a rank that then does not see it (a cache copied to
    each node's disk rather than shared) computes its own."""
    folder = index_folder(Path(cache_dir), settings, fallback)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        group = dist.new_group(backend="gloo", timeout=BUILD_TIMEOUT)
        if dist.get_rank() == 0 and not (folder / META_FILE).is_file():
            _build(folder, rows, builder, settings, str(cache_dir), owner=True)
        dist.barrier(group=group)
        dist.destroy_process_group(group)
    if not (folder / META_FILE).is_file():
        _build(folder, rows, builder, settings, str(cache_dir), owner=not distributed)
    return open_index(folder)
