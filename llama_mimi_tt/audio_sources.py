"""Audio sources: the utterances of a folder, a manifest or a Hugging Face dataset, and how to
read each one as mono float audio. The tokenize recipe, ``audio_token_dataset`` on raw audio,
the pairs recipe and the eval recipe's prompts all list audio through :func:`open_audio_source`.

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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import torch

from llama_mimi_tt.audio import BLOCK_SECONDS, CheckedAudio, open_audio, prepare_waveform
from llama_mimi_tt.errors import MissingFileError, UserError

AUDIO_EXTENSIONS = frozenset(
    "wav wave flac ogg oga opus mp3 aiff aif aifc au snd caf w64 rf64 sph nist voc".split()
)
DATA_EXTENSIONS = frozenset("parquet arrow csv json jsonl".split())  # a local HF dataset


@dataclass
class AudioItem:
    """One source utterance: ``index`` is its position in the source order."""

    index: int
    id: str
    path: Optional[str] = None
    text: Optional[str] = None
    row: Optional[int] = None  # row of a Hugging Face dataset
    line: Optional[int] = None  # line of a manifest
    fields: Optional[Dict[str, Any]] = None  # the manifest's row, other columns included


class AudioSource:
    """The items of a source and how to read each one as mono float audio.

    Args:
        kind (str): ``folder``, ``manifest``, ``hf`` or ``files`` (a list of files).
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

    def open(
        self,
        item: AudioItem,
        sample_rate: int,
        max_samples: Optional[int] = None,
        report: Optional[dict] = None,
        block_seconds: float = BLOCK_SECONDS,
    ) -> CheckedAudio:
        """The item's audio, checked, to read in pieces at ``sample_rate``: files and encoded
        bytes are read in blocks (``llama_mimi_tt.audio.open_audio``), arrays already in memory
        go through ``prepare_waveform``. ``max_samples``: only the first ones are read.

        Raises:
            FileNotFoundError, ValueError, TypeError: missing, unreadable, empty or
                non-finite audio (the message names the file or row).
        """
        if self.kind != "hf":
            return open_audio(item.path, sample_rate, max_samples, report, None, block_seconds)
        name = f"{self.location} row {item.row} (id {item.id})"
        value = self._audio_value(item)
        if value is None:
            raise ValueError(f"{name}: no audio (the {self.audio_column!r} field is empty)")
        if isinstance(value, str):
            path = self._resolve(value)
            return open_audio(path, sample_rate, max_samples, report, None, block_seconds)
        if value.get("array") is not None:
            sr = value.get("sampling_rate")
            if sr is None:
                raise ValueError(f"{name}: audio array without a sampling_rate")
            array = np.asarray(value["array"])
            if np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"{name}: integer PCM samples; store float samples in [-1, 1]")
            wave = prepare_waveform(array.astype(np.float32), sr, sample_rate, name, report)
            n = wave.shape[-1]
            length = n if max_samples is None else min(n, int(max_samples))
            return CheckedAudio(n, length, lambda: iter([wave.numpy()]), name)
        if value.get("bytes"):
            name = f"{name}: the audio bytes"
            return open_audio(value["bytes"], sample_rate, max_samples, report, name, block_seconds)
        if value.get("path"):
            path = self._resolve(value["path"])
            return open_audio(path, sample_rate, max_samples, report, None, block_seconds)
        raise ValueError(f"{name}: the audio field has neither bytes, a path nor an array")

    def read(
        self,
        item: AudioItem,
        sample_rate: int,
        report: Optional[dict] = None,
        max_seconds: Optional[float] = None,
    ) -> torch.Tensor:
        """Mono float32 ``[samples]`` at ``sample_rate`` (``report``: see ``prepare_waveform``);
        ``max_seconds``: only the first seconds are read (see :meth:`open`)."""
        max_samples = None if max_seconds is None else int(max_seconds * sample_rate)
        return self.open(item, sample_rate, max_samples, report).read()


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
        path = str(p) if rel else ""
        items.append(AudioItem(index=i, id=uid, path=path, text=text, line=n, fields=rec))
    _check_unique_ids(items, str(manifest))
    return items


def _is_saved_hf_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def _holds_audio(feature) -> bool:
    """An ``Audio`` feature, a path string, or a struct with bytes, a path or an array."""
    import datasets

    if isinstance(feature, datasets.Audio):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    return isinstance(feature, dict) and bool({"bytes", "path", "array"} & set(feature))


def _feature_name(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{type(feature).__name__} of {dtype}" if dtype else type(feature).__name__


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
    feature = ds.features[audio_column]
    if not _holds_audio(feature):
        raise UserError(
            f"{source}: column {audio_column!r} holds no audio ({_feature_name(feature)}); set "
            "audio_column to an Audio column, a path column or a bytes/path/array struct"
        )
    if isinstance(feature, datasets.Audio):
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


def open_audio_files(paths: Sequence[str], location: str = "audio files") -> AudioSource:
    """A source of the given files, in the given order; each file's id is its path."""
    items = [AudioItem(index=i, id=str(p), path=str(p)) for i, p in enumerate(paths)]
    _check_unique_ids(items, location)
    return AudioSource("files", location, items)


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
    from llama_mimi_tt.code_cache import MANIFEST_FILE, is_code_cache  # it imports this module

    p = Path(str(source)).expanduser()
    if p.exists():
        p = p.resolve()
    if is_code_cache(p):
        raise UserError(
            f"{source} is a code cache ({MANIFEST_FILE}: Mimi codes, not audio): train on it "
            "with cache_dir=<it> in a training config, or give the audio it was made from"
        )
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
