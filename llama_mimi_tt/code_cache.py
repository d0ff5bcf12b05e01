"""Audio corpora -> a Mimi code cache on disk, and the pieces that read it back.

Training reads tens of thousands of hours of audio. Encoding every utterance with Mimi inside
the training loop, one at a time (the reference's way), costs more than the language model
step; here audio is encoded once, in length-sorted batches, into a cache any later run reads.
``tune run llama_mimi_tokenize`` (recipes/llama_mimi_tokenize.py) drives the functions below;
:func:`llama_mimi_tt.audio_token_dataset` reads the result.

Sources (:func:`open_audio_source`):

- a folder of audio files (searched recursively; every extension in ``AUDIO_EXTENSIONS``,
  i.e. what libsndfile reads: wav, flac, ogg/opus, mp3, aiff, ...); id = path relative to
  the folder without its extension; a broken symbolic link is an item that is skipped
  (missing). A folder is read as a Hugging Face dataset only when it was written by
  ``save_to_disk`` or holds data files (parquet, arrow, csv, json) and no audio;
- a manifest, ``.jsonl`` (one JSON object per line) or ``.csv``, with a path column and
  optional text and id columns; relative paths are relative to the manifest's folder; a row
  without a path is skipped (missing) with its line number;
- a Hugging Face dataset with an audio column and an optional text column: a folder written
  by ``save_to_disk``, a local dataset folder (parquet/arrow/csv ... files), or a hub name
  (only when online). The audio column may be an ``Audio`` feature (read as bytes/path, no
  torchcodec needed), a ``{"array", "sampling_rate"}`` struct, or a path string.

Cache layout (``output_dir``)::

    plan.json                          what is being built (settings, item count, codec)
    shard-00000-of-00012.parquet      one per ``shard_size`` source items, any rank may write it
    shard-00000-of-00012.parquet.claim  while a process encodes that shard (see "Claims")
    ...
    cache.json                         written once every shard exists: plan + counts + skips
    skipped.jsonl                      every skipped source item with its reason

Rows of a shard (one per utterance, or per piece of a long file):

    id (str)              utterance id (the source item's id; pieces of one file share it)
    segment (int32)       0, 1, ... for the pieces of a file split by ``max_seconds``
    partial (bool)        the row holds only part of its file (split or truncated)
    codes (list<uint16>)  the [Q, num_frames] codes, flattened level-major (row-major), so the
                          first q levels are ``codes[: q * num_frames]``
    num_frames (int32)    frames (12.5 per second)
    text (str, null)      transcript, when the source has one
    path (str)            the source file (or the dataset row's audio path)
    start (float32)       offset of the piece in its file, seconds
    duration (float32)    seconds of audio in this row
    source_duration (float32)  seconds of the whole file

Work is cut into shards of ``shard_size`` consecutive source items (source order: sorted paths
for a folder, file order for a manifest, row order for a dataset). Shard k belongs to rank
``k % world_size``; it is written under a temporary name and renamed when complete, so a shard
file either is whole or does not exist. A rerun skips every shard that exists and does only
the missing ones, so work finished before an interruption is never redone, also with a
different number of ranks. A finished shard whose parquet footer cannot be read (a truncated
or overwritten file) is corrupt: a rerun logs it and encodes it again, and readers name it.
Each shard's parquet metadata holds its counts, skipped items and the items whose audio was
normalised (peak above 2.0, see ``llama_mimi_tt.audio``); whichever process finishes the last
shard writes ``cache.json``.

Claims: before encoding a shard a process creates ``<shard>.claim`` (exclusively) holding its
host and PID, refreshes its modification time after every batch, and deletes it when the
shard is written. Another process that finds the claim leaves that shard alone, so several
processes (or machines) started on one ``output_dir`` share the work without torchrun. A claim
is stale, and taken over, when its PID is no longer running on this host, or when it has not
been refreshed for ``claim_timeout_s`` (the only test for claims of other hosts). Two
processes taking over the same stale claim at the same instant may both encode that shard:
the result is the same, written atomically. Temporary files follow the same rule.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch

from llama_mimi_tt.audio import load_audio, prepare_waveform
from llama_mimi_tt.errors import MissingFileError, UserError, writing
from llama_mimi_tt.vocab import MIMI_CODEBOOK_SIZE

CACHE_FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
MANIFEST_FILE = "cache.json"
SKIPPED_FILE = "skipped.jsonl"
SHARD_METADATA_KEY = b"llama_mimi_tt"
CLAIM_SUFFIX = ".claim"

AUDIO_EXTENSIONS = frozenset(
    "wav wave flac ogg oga opus mp3 aiff aif aifc au snd caf w64 rf64 sph nist voc".split()
)
DATA_EXTENSIONS = frozenset("parquet arrow csv json jsonl".split())  # a local HF dataset
LONG_FILE_RULES = ("split", "truncate")

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("segment", pa.int32()),
        ("partial", pa.bool_()),
        ("codes", pa.list_(pa.uint16())),
        ("num_frames", pa.int32()),
        ("text", pa.string()),
        ("path", pa.string()),
        ("start", pa.float32()),
        ("duration", pa.float32()),
        ("source_duration", pa.float32()),
    ]
)


# ---- the codec ---------------------------------------------------------------------------
def mimi_codec(
    path: Optional[str] = None,
    num_quantizers: int = 8,
    device: str = "cpu",
    seed: int = 0,
):
    """Builder for YAML configs (``_component_: llama_mimi_tt.mimi_codec``).

    Args:
        path (Optional[str]): Mimi weights in the moshi format
            (``tokenizer-e351c8d8-checkpoint125.safetensors``) or the Hugging Face format
            (see ``MimiCodec.from_pretrained``), or ``random`` for ``MimiCodec.random``, an
            untrained codec with diverse codes for tests and the demo.
        num_quantizers (int): Mimi levels to keep per frame (a cache made with Q levels serves
            any later run with Q or fewer).
        device (str): ``cpu``, ``cuda`` (under torchrun: ``cuda:$LOCAL_RANK``), ``cuda:1`` ...
        seed (int): seed of the random codec (ignored otherwise).

    Raises:
        UserError: ``path`` not given.
        MissingFileError: the weights file does not exist (the message says how to get it).
    """
    from llama_mimi_tt.codec import MIMI_NAME, MIMI_REPO, MimiCodec

    device = str(device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if path is None or str(path).strip() == "":
        raise UserError(
            f"codec.path is not set: give Mimi's weights ({MIMI_NAME}, from "
            f"`huggingface-cli download {MIMI_REPO} {MIMI_NAME}`), or codec.path=random for an "
            "untrained codec (tests and the demo only: its codes mean nothing)"
        )
    if str(path) == "random":
        return MimiCodec.random(num_quantizers=num_quantizers, seed=seed, device=device)
    return MimiCodec.from_pretrained(
        os.path.expanduser(str(path)), num_quantizers=num_quantizers, device=device
    )


# ---- sources -----------------------------------------------------------------------------
@dataclass
class AudioItem:
    """One source utterance: ``index`` is its position in the source order."""

    index: int
    id: str
    path: Optional[str] = None
    text: Optional[str] = None
    row: Optional[int] = None  # row of a Hugging Face dataset
    line: Optional[int] = None  # line of a manifest


class AudioSource:
    """The items of a source and how to read each one as mono float audio.

    Args:
        kind (str): ``folder``, ``manifest`` or ``hf``.
        location (str): what the user gave as ``source``.
        items (List[AudioItem]): in source order.
        dataset: the Hugging Face dataset (``kind == "hf"``), audio column not decoded.
        audio_column (str): the dataset's audio column.
    """

    def __init__(self, kind, location, items, dataset=None, audio_column="audio"):
        self.kind = kind
        self.location = location
        self.items = items
        self.dataset = dataset
        self.audio_column = audio_column
        self._root = Path(location) if kind == "hf" and Path(location).is_dir() else None

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A hash of the item ids and paths: a rerun must see the same items in the same order."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.id}\0{it.path}\0{it.row}\n".encode())
        return h.hexdigest()[:16]

    def _audio_value(self, item: AudioItem):
        return self.dataset[item.row][self.audio_column]

    def _resolve(self, path: str) -> str:
        p = Path(path)
        if not p.is_absolute() and not p.exists() and self._root is not None:
            p = self._root / p
        return str(p)

    def seconds_hint(self, item: AudioItem) -> float:
        """Duration from the file header (cheap), used only to sort items into batches.

        Unknown or unreadable gives 0: the item is then read (and skipped) early."""
        try:
            if self.kind != "hf":
                return float(sf.info(item.path).duration)
            value = self._audio_value(item)
            if isinstance(value, dict) and value.get("array") is not None:
                return len(value["array"]) / float(value["sampling_rate"])
            if isinstance(value, dict) and value.get("bytes"):
                return float(sf.info(io.BytesIO(value["bytes"])).duration)
            path = value.get("path") if isinstance(value, dict) else value
            return float(sf.info(self._resolve(path)).duration)
        except Exception:
            return 0.0

    def read(
        self, item: AudioItem, sample_rate: int, report: Optional[dict] = None
    ) -> torch.Tensor:
        """Mono float32 ``[samples]`` at ``sample_rate`` (``report``: see ``prepare_waveform``).

        Raises:
            FileNotFoundError, ValueError, TypeError: missing, unreadable, empty or
                non-finite audio (the message names the file or row).
        """
        if self.kind != "hf":
            return load_audio(item.path, sample_rate, report)
        name = f"{self.location} row {item.row} (id {item.id})"
        value = self._audio_value(item)
        if value is None:
            raise ValueError(f"{name}: no audio (the {self.audio_column!r} field is empty)")
        if isinstance(value, str):
            return load_audio(self._resolve(value), sample_rate, report)
        if value.get("array") is not None:
            sr = value.get("sampling_rate")
            if sr is None:
                raise ValueError(f"{name}: audio array without a sampling_rate")
            array = np.asarray(value["array"])
            if np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"{name}: integer PCM samples; store float samples in [-1, 1]")
            return prepare_waveform(array.astype(np.float32), sr, sample_rate, name, report)
        if value.get("bytes"):
            try:
                data, sr = sf.read(io.BytesIO(value["bytes"]), dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
                raise ValueError(f"{name}: cannot decode the audio bytes ({e})") from e
            return prepare_waveform(data.T, sr, sample_rate, name, report)
        if value.get("path"):
            return load_audio(self._resolve(value["path"]), sample_rate, report)
        raise ValueError(f"{name}: the audio field has neither bytes, a path nor an array")


def _check_unique_ids(items: Sequence[AudioItem], where: str) -> None:
    seen: Dict[str, int] = {}
    for it in items:
        if it.id in seen:
            raise UserError(
                f"{where}: id {it.id!r} appears twice (items {seen[it.id]} and {it.index}); "
                "ids must be unique (give an id column, or rename the files)"
            )
        seen[it.id] = it.index


def _text_or_none(value) -> Optional[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _is_audio_entry(p: Path) -> bool:
    """An audio file, or a broken symbolic link named like one (an item to skip and count)."""
    return p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS and (
        p.is_file() or (p.is_symlink() and not p.exists())
    )


def _folder_items(root: Path) -> List[AudioItem]:
    files = sorted(p for p in root.rglob("*") if _is_audio_entry(p))
    items = [
        AudioItem(index=i, id=p.relative_to(root).with_suffix("").as_posix(), path=str(p))
        for i, p in enumerate(files)
    ]
    _check_unique_ids(items, str(root))
    return items


def _manifest_items(
    manifest: Path, path_column: str, text_column: Optional[str], id_column: Optional[str]
) -> List[AudioItem]:
    suffix = manifest.suffix.lower()
    records = []  # (line number, record)
    if suffix == ".jsonl":
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{manifest}, line {n}: not valid JSON ({e})") from e
                if not isinstance(rec, dict):
                    raise UserError(f"{manifest}, line {n}: expected a JSON object, got {rec!r}")
                records.append((n, rec))
    elif suffix == ".csv":
        with open(manifest, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            records = [(reader.line_num, rec) for rec in reader]
    else:
        raise UserError(f"manifest {manifest}: expected a .jsonl or .csv file")
    if records and not any(path_column in rec for _, rec in records):
        raise UserError(
            f"manifest {manifest} has no {path_column!r} column (columns: "
            f"{', '.join(records[0][1])}); set path_column"
        )
    items = []
    for i, (n, rec) in enumerate(records):
        rel = rec.get(path_column)
        rel = "" if rel is None else str(rel).strip()
        p = Path(rel).expanduser()
        if rel and not p.is_absolute():
            p = manifest.parent / p
        uid = rec.get(id_column) if id_column else None
        if uid not in (None, ""):
            uid = str(uid)
        else:  # a row without a path gets its line as id (and is skipped when encoding)
            uid = Path(rel).with_suffix("").as_posix() if rel else f"line-{n}"
        text = _text_or_none(rec.get(text_column)) if text_column else None
        items.append(AudioItem(index=i, id=uid, path=str(p) if rel else "", text=text, line=n))
    _check_unique_ids(items, str(manifest))
    return items


def _is_saved_hf_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def _hf_items(
    source: str,
    split: str,
    audio_column: str,
    text_column: Optional[str],
    id_column: Optional[str],
) -> Tuple[Any, List[AudioItem]]:
    import datasets

    p = Path(source).expanduser()
    if p.is_dir() and _is_saved_hf_dataset(p):
        ds = datasets.load_from_disk(str(p))
    else:
        ds = datasets.load_dataset(str(p) if p.exists() else source, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{source} has no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    if audio_column not in ds.column_names:
        raise UserError(
            f"{source} has no audio column {audio_column!r} (columns: "
            f"{', '.join(ds.column_names)}); set audio_column"
        )
    if isinstance(ds.features[audio_column], datasets.Audio):
        # Read the encoded bytes / path ourselves (soundfile + soxr): no torchcodec needed.
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    texts = ds[text_column] if text_column and text_column in ds.column_names else [None] * len(ds)
    ids = ds[id_column] if id_column and id_column in ds.column_names else None
    width = max(8, len(str(len(ds))))
    items = [
        AudioItem(
            index=i,
            id=str(ids[i]) if ids is not None else f"{i:0{width}d}",
            text=_text_or_none(texts[i]),
            row=i,
        )
        for i in range(len(ds))
    ]
    _check_unique_ids(items, source)
    return ds, items


def open_audio_source(
    source: str,
    *,
    source_type: str = "auto",
    split: str = "train",
    audio_column: str = "audio",
    text_column: Optional[str] = "text",
    path_column: str = "path",
    id_column: Optional[str] = "id",
) -> AudioSource:
    """Lists the items of a folder, manifest or Hugging Face dataset (see the module docstring).

    Args:
        source (str): the folder, manifest file, dataset folder or hub name.
        source_type (str): ``auto`` (decide from what ``source`` is), ``folder``, ``manifest``
            or ``hf``.
        split (str): split of a Hugging Face dataset.
        audio_column, text_column, path_column, id_column (str): column names; text and id
            columns are optional (``text`` missing -> no transcript, ``id`` missing -> ids
            from file paths or row numbers).

    Raises:
        MissingFileError: ``source`` does not exist (and is not a hub name).
        UserError: an unknown kind, a missing column, or duplicate ids.
    """
    if source is None or str(source).strip() == "":
        raise UserError("source is not set: give a folder, a .jsonl/.csv manifest or a dataset")
    p = Path(str(source)).expanduser()
    if p.exists():
        p = p.resolve()
    kind = source_type
    if kind == "auto":
        if p.is_file():
            kind = "manifest"
        elif p.is_dir():
            entries = list(p.rglob("*"))
            if _is_saved_hf_dataset(p) or (
                not any(_is_audio_entry(q) for q in entries)
                and any(q.suffix.lower().lstrip(".") in DATA_EXTENSIONS for q in entries)
            ):
                kind = "hf"  # save_to_disk, or a local dataset folder: parquet / arrow / csv
            else:
                kind = "folder"
        elif "/" in str(source) and not str(source).startswith((".", "/", "~")):
            kind = "hf"  # a hub name
        else:
            raise MissingFileError(
                f"source {source} does not exist: give a folder of audio files, a .jsonl/.csv "
                "manifest, a dataset saved with save_to_disk, or a hub name (online only)"
            )
    if kind == "folder":
        if not p.is_dir():
            raise MissingFileError(f"audio folder {p} does not exist")
        return AudioSource("folder", str(p), _folder_items(p))
    if kind == "manifest":
        if not p.is_file():
            raise MissingFileError(f"manifest {p} does not exist")
        return AudioSource(
            "manifest", str(p), _manifest_items(p, path_column, text_column, id_column)
        )
    if kind == "hf":
        ds, items = _hf_items(str(source), split, audio_column, text_column, id_column)
        return AudioSource("hf", str(source), items, dataset=ds, audio_column=audio_column)
    raise UserError(f"source_type must be auto, folder, manifest or hf; got {source_type!r}")


# ---- encoding ----------------------------------------------------------------------------
def cut_long_audio(
    wave: torch.Tensor, sample_rate: int, max_seconds: Optional[float], long_files: str
) -> List[Tuple[int, torch.Tensor]]:
    """``[(start_sample, piece), ...]`` of a waveform longer than ``max_seconds``.

    ``split``: consecutive pieces of ``max_seconds`` (the last one shorter, kept if it holds
    at least one Mimi frame, 80 ms); ``truncate``: only the first ``max_seconds``. A waveform
    that fits is returned whole."""
    if long_files not in LONG_FILE_RULES:
        raise UserError(f"long_files must be one of {LONG_FILE_RULES}, got {long_files!r}")
    n = wave.shape[-1]
    if not max_seconds or n <= max_seconds * sample_rate:
        return [(0, wave)]
    step = int(round(max_seconds * sample_rate))
    if long_files == "truncate":
        return [(0, wave[:step])]
    min_piece = math.ceil(sample_rate / 12.5)
    return [(s, wave[s : s + step]) for s in range(0, n, step) if n - s >= min_piece or s == 0]


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
) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]]]:
    """Encodes ``items`` in batches of similar length; returns ``(rows, skipped)``.

    Items are sorted by their header duration so that a batch wastes little on padding; each
    is read, checked, mixed down and resampled (``llama_mimi_tt.audio``), cut by the
    ``max_seconds`` rule, and encoded with ``codec.encode_batch``. Rows come back in source
    order (item index, then segment), whatever the batch order was.

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

    Returns:
        rows (List[dict]): one per piece, with the columns of ``SHARD_SCHEMA`` (``codes`` as
            a uint16 array ``[Q, F]``).
        skipped (List[dict]): ``{"id", "path", "kind", "reason"}`` of each item that could not
            be read or is shorter than one Mimi frame, 80 ms (kind: missing, unreadable, empty,
            non-finite, too short, invalid).
    """
    sr = int(codec.sample_rate)
    frame_samples = math.ceil(sr / float(getattr(codec, "frame_rate", 12.5)))
    q = getattr(codec, "num_quantizers", None)
    order = sorted(items, key=lambda it: (source.seconds_hint(it), it.index))
    skipped: List[Dict[str, str]] = []
    rows: List[Dict[str, Any]] = []

    def skip(item: AudioItem, kind: str, reason: str) -> None:
        skipped.append({"id": item.id, "path": item.path or "", "kind": kind, "reason": reason})
        if logger is not None:
            logger.warning(f"skipping {item.id} ({kind}): {reason}")
        if progress is not None:
            progress(1, 0.0)

    def pieces() -> Iterator[_Piece]:
        for item in order:
            if source.kind == "manifest" and not item.path:
                where = f"line {item.line}" if item.line else f"the row of {item.id}"
                skip(item, "missing", f"{source.location}, {where}: no audio path")
                continue
            report: Dict[str, float] = {}
            try:
                wave = source.read(item, sr, report)
            except (OSError, ValueError, TypeError, RuntimeError) as e:
                skip(item, skip_kind(e), str(e))
                continue
            if wave.shape[-1] < frame_samples:
                ms = 1000 * wave.shape[-1] / sr
                skip(item, "too short", f"{ms:.0f} ms: shorter than one Mimi frame (80 ms)")
                continue
            if "peak" in report and normalised is not None:
                normalised.append({"id": item.id, "path": item.path or "", "peak": report["peak"]})
            cut = cut_long_audio(wave, sr, max_seconds, long_files)
            pending[item.index] = [len(cut), 0, 0]  # pieces left, rows made, samples encoded
            partial = len(cut) > 1 or cut[0][1].shape[-1] < wave.shape[-1]
            for k, (start, piece) in enumerate(cut):
                yield _Piece(item, k, start, piece, wave.shape[-1], partial)

    pending: Dict[int, List[int]] = {}
    max_batch_samples = int(max_batch_seconds * sr) if max_batch_seconds else None
    for batch in _batches(pieces(), batch_size, max_batch_samples):
        codes = codec.encode_batch([p.wave for p in batch], sr, batch_size=len(batch))
        for piece, c in zip(batch, codes):
            c = torch.as_tensor(c).detach().cpu()
            item, state = piece.item, pending[piece.item.index]
            state[0] -= 1
            state[2] += piece.wave.shape[-1]
            if c.dim() != 2 or (q is not None and c.shape[0] != q):
                raise ValueError(f"the codec gave codes of shape {tuple(c.shape)}, not [{q}, F]")
            if c.shape[-1] > 0:
                if int(c.min()) < 0 or int(c.max()) >= MIMI_CODEBOOK_SIZE:
                    raise ValueError(
                        f"the codec gave codes outside 0..{MIMI_CODEBOOK_SIZE - 1} for {item.id}"
                    )
                state[1] += 1
                rows.append(
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
            if state[0] == 0:
                if state[1] == 0:
                    skip(item, "too short", "shorter than one Mimi frame (80 ms)")
                elif progress is not None:
                    progress(1, state[2] / sr)
    rows.sort(key=lambda r: (r["_index"], r["segment"]))
    for r in rows:
        del r["_index"]
    return rows, skipped


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


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _temporary(path)
    try:
        with writing(path):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_shard(path: Path, rows: Sequence[Dict[str, Any]], metadata: dict) -> None:
    """Writes a shard under a temporary name, syncs it, and renames it into place: a shard file
    that exists is complete."""
    path = Path(path)
    tmp = _temporary(path)
    table = rows_to_table(rows, metadata)
    try:
        with writing(path):
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


# ---- claims (see the module docstring) ------------------------------------------------------
def _holder_is_gone(host: str, pid: int, age_s: float, timeout_s: float) -> bool:
    """The stale rule of claims and temporary files."""
    if host == socket.gethostname():
        if pid == os.getpid():
            return True  # ours, left by an earlier call in this process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    return age_s > timeout_s


def claim_holder(claim: Path, timeout_s: float) -> Optional[str]:
    """``host:pid`` of the live process that holds a claim file; None if it is stale or gone."""
    try:
        info = json.loads(Path(claim).read_text())
        age = time.time() - Path(claim).stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unknown"  # being written right now
    if _holder_is_gone(str(info.get("host")), int(info.get("pid", -1)), age, timeout_s):
        return None
    return f"{info.get('host')}:{info.get('pid')}"


def claim_shard(path: Path, timeout_s: float) -> Optional[str]:
    """Claims a shard for this process. None when claimed; else ``host:pid`` of the process
    that holds it. A stale claim is taken over (see the module docstring)."""
    claim = Path(f"{path}{CLAIM_SUFFIX}")
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    for _ in range(3):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = claim_holder(claim, timeout_s)
            if holder is not None:
                return holder
            claim.unlink(missing_ok=True)  # stale: take it over
            continue
        except OSError:
            with writing(claim):
                raise
        with writing(claim), os.fdopen(fd, "w") as f:
            f.write(body)
        return None
    return claim_holder(claim, timeout_s) or "unknown"


def refresh_claim(path: Path) -> None:
    """Marks this process's claim on a shard as alive (its modification time)."""
    try:
        os.utime(f"{path}{CLAIM_SUFFIX}")
    except OSError:
        pass


def release_claim(path: Path) -> None:
    Path(f"{path}{CLAIM_SUFFIX}").unlink(missing_ok=True)


def remove_stale_temporaries(output_dir: Path, timeout_s: float) -> int:
    """Deletes the temporary files that killed or finished runs left (``<file>.tmp-HOST-PID``),
    keeping those of live writers (the rule of claims)."""
    n = 0
    for tmp in Path(output_dir).glob("*.tmp-*"):
        host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        if pid.isdigit() and _holder_is_gone(host, int(pid), age, timeout_s):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


# ---- plan and manifest -------------------------------------------------------------------
def check_or_write_plan(output_dir: Path, plan: dict) -> dict:
    """Writes ``plan.json`` for a new cache, or checks that a resumed run builds the same one.

    Raises:
        UserError: ``output_dir`` holds a cache built with other settings or other items.
    """
    output_dir = Path(output_dir)
    with writing(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / PLAN_FILE
    if not path.is_file():
        atomic_write_json(path, plan)
    existing = json.loads(path.read_text())
    diffs = [
        f"{k}: {existing.get(k)!r} in the cache, {plan.get(k)!r} now"
        for k in sorted(set(plan) | set(existing))
        if existing.get(k) != plan.get(k)
    ]
    if diffs:
        raise UserError(
            f"{output_dir} holds a code cache built with other settings or items, so it "
            "cannot be resumed: " + "; ".join(diffs) + ". Use a new output_dir, or the same "
            "settings to finish the existing cache."
        )
    return existing


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
    for k in range(n):
        meta = shard_metadata(output_dir / shard_name(k, n))
        for key in counts:
            counts[key] += meta.get(key, 0)
        skipped += meta.get("skipped", [])
        normalised += meta.get("normalised", [])
    reasons: Dict[str, int] = {}
    for s in skipped:
        reasons[s["kind"]] = reasons.get(s["kind"], 0) + 1
    counts["skipped"] = len(skipped)
    counts["normalised"] = len(normalised)
    counts["hours"] = round(counts["seconds"] / 3600, 4)
    manifest = dict(plan)
    manifest.update(
        complete=True,
        counts=counts,
        skipped_by_reason=reasons,
        skipped_examples=skipped[:100],
        normalised_examples=normalised[:100],
        shards=[shard_name(k, n) for k in range(n)],
        shard_rows=[pq.read_metadata(output_dir / shard_name(k, n)).num_rows for k in range(n)],
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    _atomic_write_bytes(
        output_dir / SKIPPED_FILE, "".join(json.dumps(s) + "\n" for s in skipped).encode()
    )
    atomic_write_json(output_dir / MANIFEST_FILE, manifest)
    return manifest


def read_cache_manifest(cache_dir: str) -> dict:
    """``cache.json`` of a finished cache, with clear errors for a missing or unfinished one."""
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
    for name in info["shards"]:
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
                duration=frames / 12.5,
                source_duration=frames / 12.5,
            )
        )
    shards = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    plan = {"format_version": CACHE_FORMAT_VERSION, "num_quantizers": num_quantizers}
    plan.update(num_shards=len(shards), codebook_size=2048, sample_rate=24000, frame_rate=12.5)
    check_or_write_plan(output_dir, plan)
    for k, shard in enumerate(shards):
        meta = {"items": len(shard), "encoded_items": len(shard), "rows": len(shard)}
        write_shard(output_dir / shard_name(k, len(shards)), shard, meta)
    if finalize_cache(output_dir) is None:
        raise RuntimeError(f"{output_dir}: the cache did not finalize")
    return output_dir
