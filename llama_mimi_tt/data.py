"""Mimi codes (a code cache, or audio encoded at start-up) -> Llama-Mimi training samples.

The tokenizer builds every sequence as the released models were trained (``a2a``: ``<bos>
<audio> frames </audio>``; ``tts``: the text before ``<audio>``); labels are the tokens with
-100 on ``<bos>`` and the text prompt. An utterance longer than ``max_seq_len`` is cut on frame
boundaries into a first sample and continuations (``long_utterances="split"``: no audio lost) or
truncated (the reference's behaviour). Packing cuts a sample that does not fit a pack on a frame
boundary and continues it with its own ``<bos> <audio>`` header, so every document in a pack is
well formed. Train/validation splits go by a stable hash of the utterance id.

Which rows, samples and packs a run reads is the code cache's pack index (:mod:`pack_index`:
computed once, memory-mapped by every rank); a sample or a pack is built from its rows when it
is asked for. ``streaming=True`` iterates over the shards instead (data that is not a local
cache), divided among ranks, shuffled in a buffer.
"""

from __future__ import annotations

import hashlib
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.utils import get_logger

from llama_mimi_tt.audio_sources import AUDIO_EXTENSIONS, open_audio_source
from llama_mimi_tt.cache_reader import CacheRows
from llama_mimi_tt.code_cache import (
    MANIFEST_FILE,
    cache_shard_files,
    corrupt_shard_error,
    encode_items,
    is_code_cache,
    read_cache_manifest,
    rows_to_table,
)
from llama_mimi_tt.errors import MissingFileError, UserError
from llama_mimi_tt.pack_index import IndexSettings, PackIndex, compute_index, load_or_build_index
from llama_mimi_tt.vocab import check_codes

log = get_logger("INFO")

TASKS = ("a2a", "tts")
LONG_UTTERANCE_RULES = ("split", "truncate")
SPLITS = ("train", "validation", "all")


# ---- which utterances belong to which split -----------------------------------------------
def validation_mask(ids: Sequence[str], val_fraction: float) -> np.ndarray:
    """True for the ids held out for validation: ``blake2b(id) / 2**64 < val_fraction``.

    Stable across runs, machines and Python versions, and independent of the order or number
    of utterances (adding data never moves an utterance from one split to the other)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return np.zeros(len(ids), dtype=bool)
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(str(i).encode(), digest_size=8).digest() for i in ids])
    threshold = math.ceil(val_fraction * 2.0**64)  # h < t exactly, in integers
    if threshold >= 2**64:
        return np.ones(len(ids), dtype=bool)
    return np.frombuffer(digests, dtype="<u8") < np.uint64(threshold)


def _check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "validation" and val_fraction == 0.0:
        raise ValueError("split='validation' needs val_fraction > 0 (it is 0: no held-out data)")


# ---- utterance -> samples -----------------------------------------------------------------
class SequenceBuilder:
    """Builds the a2a / tts samples of one utterance with the tokenizer's ``sequence``, cut on
    frame boundaries to ``max_seq_len``.

    Args:
        tokenizer (LlamaMimiTokenizer): gives BOS, the text ids and the audio vocabulary.
        task (str): ``a2a`` or ``tts``.
        max_seq_len (Optional[int]): most tokens per sample (``None``: no limit).
        long_utterances (str): ``split`` or ``truncate`` (see the module docstring).
    """

    def __init__(self, tokenizer, task: str, max_seq_len: Optional[int], long_utterances: str):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if long_utterances not in LONG_UTTERANCE_RULES:
            raise ValueError(
                f"long_utterances must be one of {LONG_UTTERANCE_RULES}, got {long_utterances!r}"
            )
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab
        self.q = self.vocab.num_quantizers
        self.task = task
        self.max_seq_len = max_seq_len
        self.long_utterances = long_utterances
        if max_seq_len is not None and max_seq_len < 3 + self.q:
            raise ValueError(
                f"max_seq_len={max_seq_len} cannot hold <|begin_of_text|> <audio>, one frame of "
                f"{self.q} tokens and </audio>"
            )

    def text_ids(self, text: Optional[str]) -> List[int]:
        return self.tokenizer.text_ids(text) if text else []

    def plan(self, num_frames: np.ndarray, head_len: np.ndarray):
        """``(first_frames, num_samples)`` per utterance: frames in the first sample and the
        number of samples it gives (0 where even one frame does not fit after the text).

        The first sample holds as many frames as fit after the head (as ``tokenize`` cuts);
        each continuation holds up to ``(max_seq_len - 3) // Q`` frames, room for
        ``</audio>``, which closes the last one."""
        f = np.asarray(num_frames, dtype=np.int64)
        h = np.asarray(head_len, dtype=np.int64)
        L, q = self.max_seq_len, self.q
        if L is None:
            return f, np.ones_like(f)
        whole = h + 1 + f * q + 1 <= L
        first = np.maximum((L - h - 1) // q, 0)
        if self.long_utterances == "truncate":
            first = np.where(whole, f, np.minimum(first, f))
            n = np.ones_like(f)
        else:
            first = np.where(whole, f, np.minimum(first, f - 1))
            rest = f - first
            n = 1 + -(-rest // self.continuation_frames)
        return first, np.where(first > 0, n, 0)

    @property
    def continuation_frames(self) -> int:
        return (self.max_seq_len - 3) // self.q

    def sample_lengths(self, frames, head, first, counts):
        """``(length, audio_start)`` of every sample of utterances with ``counts`` samples
        each (``plan``), in order: what :meth:`sample` builds, counted instead of built."""
        rows = np.repeat(np.arange(len(counts)), counts)
        chunk = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        f, fi = frames[rows], first[rows]
        per = 0 if self.max_seq_len is None else self.continuation_frames
        lo = np.where(chunk == 0, 0, fi + (chunk - 1) * per)
        hi = np.where(chunk == 0, fi, np.minimum(f, lo + per))
        a = np.where(chunk == 0, head[rows], 1)
        n = (hi - lo) * self.q
        closing = hi == f
        if self.max_seq_len is not None:
            closing &= a + 2 + n <= self.max_seq_len
        return a + 1 + n + closing, a

    def sample(
        self, codes: np.ndarray, text_ids: List[int], chunk: int, first_frames: int
    ) -> Dict[str, Any]:
        """Sample ``chunk`` of an utterance with codes ``[Q, F]``: ``tokens``, ``labels`` (lists)
        and ``audio_start`` (index of ``<audio>``)."""
        n_frames = codes.shape[-1]
        if chunk == 0:
            lo, hi = 0, first_frames
        else:  # a continuation: audio only, the text belongs to the start
            per = self.continuation_frames
            lo = first_frames + (chunk - 1) * per
            hi = min(n_frames, lo + per)
            text_ids = []
        if not 0 <= lo < hi <= n_frames:
            raise IndexError(f"sample {chunk} of an utterance of {n_frames} frames does not exist")
        a = 1 + len(text_ids)  # index of <audio>
        closing = hi == n_frames and (
            self.max_seq_len is None or a + 2 + (hi - lo) * self.q <= self.max_seq_len
        )
        tokens = self.tokenizer.sequence(
            np.asarray(codes[:, lo:hi], dtype=np.int64), text_ids, close=closing
        )
        labels = [CROSS_ENTROPY_IGNORE_IDX] * a + tokens[a:]
        return {"tokens": tokens, "labels": labels, "audio_start": a}


class _CacheRowSamples:
    """What the datasets share: the sample builder, the levels used, and the checked read of a
    cache row's codes."""

    def _set_up_samples(
        self, tokenizer, cache_q: int, task: str, max_seq_len, long_utterances: str, name: str
    ) -> None:
        self.name = name
        self.builder = SequenceBuilder(tokenizer, task, max_seq_len, long_utterances)
        self.cache_q = cache_q
        self.q = _check_q(tokenizer, cache_q, name)
        self.codebook_size = tokenizer.vocab.codebook_size
        self.skipped: Dict[str, int] = {}

    def _codes(self, flat: np.ndarray, num_frames: int, uid) -> np.ndarray:
        """The first Q levels ``[Q, F]`` of a cache row's flat codes, checked."""
        where = f"{self.name}, utterance {uid}"
        if flat.size != self.cache_q * num_frames:
            raise ValueError(
                f"{where}: {flat.size} codes stored for {num_frames} frames of {self.cache_q} "
                "levels; the cache is corrupt. Rebuild it."
            )
        codes = flat[: self.q * num_frames].reshape(self.q, num_frames)
        try:
            check_codes(codes, self.codebook_size, where)
        except ValueError as e:
            raise ValueError(
                f"{e}; the cache is corrupt or was not made by llama_mimi_tokenize. Rebuild it."
            ) from None
        return codes


# ---- map-style, from the index --------------------------------------------------------------
class AudioTokenDataset(_CacheRowSamples, Dataset):
    """Map-style dataset of Llama-Mimi samples: sample i of a :class:`PackIndex`, built from
    its cache row when asked for (codes are read per item, never all at once).

    Args:
        index (PackIndex): which rows, how many samples each (``pack_index``).
        rows (CacheRows): the cache's rows by number.
        tokenizer (LlamaMimiTokenizer): its ``num_quantizers`` (Q) must be <= ``cache_q``.
        cache_q (int): levels stored per frame in the cache.
        task, max_seq_len, long_utterances: see :class:`SequenceBuilder` (as the index was
            computed with).
        name (str): how errors name the data (the cache path).
    """

    def __init__(
        self,
        index: PackIndex,
        rows: CacheRows,
        tokenizer,
        *,
        cache_q: int,
        task: str = "a2a",
        max_seq_len: Optional[int] = None,
        long_utterances: str = "split",
        name: str = "dataset",
    ):
        self._set_up_samples(tokenizer, cache_q, task, max_seq_len, long_utterances, name)
        self.index, self.rows = index, rows
        self.index_folder = index.folder
        self.skipped = dict(index.meta["skipped"])
        for reason, count in self.skipped.items():
            log.warning(f"{name}: skipped {count} utterances ({reason})")
        settings = index.meta["settings"]
        if index.num_samples == 0:
            raise ValueError(
                f"{name}: no samples for split={settings['split']!r} task={task!r} "
                f"(val_fraction={settings['val_fraction']}, {index.meta['cache_rows']} rows, "
                f"skipped: {self.skipped})"
            )

    def __len__(self) -> int:
        return self.index.num_samples

    def sample(self, s: int) -> Dict[str, Any]:
        """Sample ``s``: ``tokens``, ``labels`` (lists) and ``audio_start``."""
        a = self.index.arrays
        k = int(np.searchsorted(a["sample_start"], s, side="right")) - 1
        chunk = s - int(a["sample_start"][k])
        uid, flat, n_frames, text = self.rows.row(int(a["row"][k]))
        codes = self._codes(flat, n_frames, uid)
        text_ids = self.builder.text_ids(text) if self.builder.task == "tts" and chunk == 0 else []
        return self.builder.sample(codes, text_ids, chunk, int(a["first"][k]))

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.sample(index % len(self))


def _check_q(tokenizer, cache_q: int, name: str) -> int:
    q = tokenizer.vocab.num_quantizers
    if q > cache_q:
        raise UserError(
            f"the tokenizer uses num_quantizers={q}, but {name} holds only {cache_q} levels per "
            f"frame. Use num_quantizers <= {cache_q}, or re-encode the audio with "
            f"num_quantizers >= {q}."
        )
    return q


# ---- packing ------------------------------------------------------------------------------
def header_labels(header: Sequence[int]) -> List[int]:
    """Labels of a continuation header (``LlamaMimiTokenizer.header_ids``): no loss on its
    BOS."""
    return [CROSS_ENTROPY_IGNORE_IDX, *header[1:]]


def pack_frame_aligned(
    samples,
    max_seq_len: int,
    num_quantizers: int,
    header: Sequence[int],
) -> Iterator[Dict[str, list]]:
    """Greedy packing that splits a sample across packs only on a frame boundary.

    A sample that does not fit the rest of the current pack fills it with its head and as
    many whole frames as fit; what remains continues in the next pack after ``header``
    (``LlamaMimiTokenizer.header_ids``: ``<|begin_of_text|> <audio>``; labels -100 on the
    BOS). Yields unpadded packs: ``{"tokens", "labels", "input_pos", "seq_lens"}`` lists, as
    torchtune's PackedDataset builds them."""
    L, q = max_seq_len, num_quantizers
    header, labels_of_header = list(header), header_labels(header)

    def empty():
        return {"tokens": [], "labels": [], "input_pos": [], "seq_lens": []}

    def add(pack, tokens, labels):
        pack["tokens"] += tokens
        pack["labels"] += labels
        pack["input_pos"] += list(range(len(tokens)))
        pack["seq_lens"].append(len(tokens))

    pack = empty()
    for s in samples:
        tokens, labels, a = s["tokens"], s["labels"], s["audio_start"]
        if len(tokens) > L:
            raise ValueError(f"sample of {len(tokens)} tokens is longer than max_seq_len={L}")
        while tokens is not None:
            room = L - len(pack["tokens"])
            if len(tokens) <= room:
                add(pack, tokens, labels)
                tokens = None
            else:
                frames = (room - a - 1) // q
                if frames >= 1:
                    cut = a + 1 + frames * q
                    add(pack, tokens[:cut], labels[:cut])
                    tokens = header + tokens[cut:]
                    labels = labels_of_header + labels[cut:]
                    a = len(header) - 1  # <audio> ends the header
                yield pack
                pack = empty()
            if len(pack["tokens"]) == L:
                yield pack
                pack = empty()
    if pack["tokens"]:
        yield pack


def pad_pack(pack: Dict[str, list], max_seq_len: int, padding_idx: int) -> Dict[str, Any]:
    """A pack as torchtune's ``PackedDataset`` returns it: tensors of ``max_seq_len``, tokens
    padded with ``padding_idx``, labels with -100, the padding as a last ``seq_lens`` entry
    and ``input_pos`` going on from the last position (at most ``max_seq_len - 1``)."""
    n = len(pack["tokens"])
    pad = max_seq_len - n
    last = pack["input_pos"][-1]
    positions = [min(last + 1 + i, max_seq_len - 1) for i in range(pad)]
    return {
        "tokens": torch.tensor(pack["tokens"] + [padding_idx] * pad, dtype=torch.long),
        "labels": torch.tensor(pack["labels"] + [CROSS_ENTROPY_IGNORE_IDX] * pad, dtype=torch.long),
        "input_pos": torch.tensor(pack["input_pos"] + positions, dtype=torch.long),
        "seq_lens": torch.tensor(pack["seq_lens"] + ([pad] if pad else []), dtype=torch.long),
    }


class AudioPackedDataset(Dataset):
    """Packs of ``max_seq_len`` tokens, as torchtune's ``PackedDataset`` returns them (same
    keys and padding, for ``padded_collate_packed``), read from a :class:`PackIndex`: pack p
    is materialised from its samples when asked for.

    The packs are those of :func:`pack_frame_aligned` over the samples in order (a sample is
    split across packs on a frame boundary and continues with a ``<|begin_of_text|> <audio>``
    header), or whole samples only (``split_across_pack=False``, as torchtune packs).

    Args:
        samples (AudioTokenDataset): the samples, over an index computed with ``packed=True``.
        max_seq_len (int): tokens per pack.
        padding_idx (int): the tokenizer's pad id.
    """

    def __init__(self, samples: AudioTokenDataset, *, max_seq_len: int, padding_idx: int = 0):
        self.samples = samples
        self.max_seq_len = max_seq_len
        self.padding_idx = padding_idx
        self.header = samples.builder.tokenizer.header_ids()
        self.header_labels = header_labels(self.header)
        self.starts = samples.index.arrays["pack_sample"]
        self.offsets = samples.index.arrays["pack_offset"]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def pack(self, p: int) -> Dict[str, list]:
        """Pack ``p`` unpadded: ``tokens``, ``labels``, ``input_pos``, ``seq_lens`` lists."""
        s0, o0 = int(self.starts[p]), int(self.offsets[p])
        s1, o1 = int(self.starts[p + 1]), int(self.offsets[p + 1])
        pack = {"tokens": [], "labels": [], "input_pos": [], "seq_lens": []}
        for s in range(s0, s1 + (o1 > 0)):
            sample = self.samples.sample(s)
            lo = o0 if s == s0 else 0
            hi = o1 if s == s1 else len(sample["tokens"])
            tokens, labels = sample["tokens"][lo:hi], sample["labels"][lo:hi]
            if lo:  # the rest of a sample cut on a frame boundary
                tokens, labels = self.header + tokens, self.header_labels + labels
            pack["tokens"] += tokens
            pack["labels"] += labels
            pack["input_pos"] += range(len(tokens))
            pack["seq_lens"].append(len(tokens))
        return pack

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} packs")
        pack = self.pack(index % len(self))
        return pad_pack(pack, self.max_seq_len, self.padding_idx)


# ---- streaming ----------------------------------------------------------------------------
class AudioTokenIterableDataset(_CacheRowSamples, IterableDataset):
    """Streams samples (or packs) from the parquet shards of a code cache.

    Rows are read shard by shard (``datasets`` streaming), divided among nodes and ranks with
    ``split_dataset_by_node`` (whole shards when their number divides by the world size) and
    among DataLoader workers by ``datasets`` itself, shuffled in a buffer of
    ``shuffle_buffer`` rows (reseeded by :meth:`set_epoch`). Rows that do not belong to the
    split, or (tts) have no text or hold only part of a file, are skipped and counted in
    ``self.skipped`` (per process).
    """

    def __init__(
        self,
        shard_files: Sequence[str],
        tokenizer,
        *,
        cache_q: int,
        task: str = "a2a",
        max_seq_len: Optional[int] = None,
        long_utterances: str = "split",
        split: str = "train",
        val_fraction: float = 0.0,
        packed: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        name: str = "dataset",
    ):
        _check_split(split, val_fraction)
        if packed and max_seq_len is None:
            raise ValueError("packed=True needs max_seq_len (or tokenizer.max_seq_len)")
        self.files = list(shard_files)
        self.tokenizer = tokenizer
        self._set_up_samples(tokenizer, cache_q, task, max_seq_len, long_utterances, name)
        self.split, self.val_fraction = split, val_fraction
        self.packed = packed
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        if rank is None or world_size is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank = int(os.environ.get("RANK", 0))
                world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self):
        from datasets.distributed import split_dataset_by_node

        ds = datasets.load_dataset("parquet", data_files=self.files, split="train", streaming=True)
        ds = ds.select_columns(["id", "codes", "num_frames", "text", "partial"])
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(self.epoch)
        return ds

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def samples(self) -> Iterator[Dict[str, Any]]:
        """The unpacked samples of this rank (and DataLoader worker)."""
        b = self.builder
        for row in self._rows():
            uid = row["id"]
            if self.split != "all":
                val = bool(validation_mask([uid], self.val_fraction)[0])
                if val != (self.split == "validation"):
                    continue
            text_ids: List[int] = []
            if b.task == "tts":
                if row["partial"]:
                    self._skip("part of a long file")
                    continue
                if not (row["text"] and row["text"].strip()):
                    self._skip("empty text")
                    continue
                text_ids = b.text_ids(row["text"])
            n_frames = int(row["num_frames"])
            codes = self._codes(np.asarray(row["codes"]), n_frames, uid)
            first, n = b.plan(np.array([n_frames]), np.array([1 + len(text_ids)]))
            if n[0] == 0:
                self._skip("text too long for max_seq_len")
                continue
            for chunk in range(int(n[0])):
                yield b.sample(codes, text_ids if chunk == 0 else [], chunk, int(first[0]))

    def __iter__(self):
        if not self.packed:
            yield from self.samples()
            return
        L = self.builder.max_seq_len
        for pack in pack_frame_aligned(self.samples(), L, self.q, self.tokenizer.header_ids()):
            yield pad_pack(pack, L, self.tokenizer.pad_id)


# ---- the builder --------------------------------------------------------------------------
def _build_codec(codec, num_quantizers: int):
    if codec is None or hasattr(codec, "encode_batch"):
        return codec
    if isinstance(codec, (str, os.PathLike)):
        from llama_mimi_tt.codec import mimi_codec

        return mimi_codec(path=str(codec), num_quantizers=num_quantizers)
    if isinstance(codec, Mapping) and "_component_" in codec:
        from omegaconf import OmegaConf
        from torchtune import config

        return config.instantiate(OmegaConf.create(dict(codec)))
    raise TypeError(
        f"codec must be a MimiCodec, a weights path or a config with _component_, got {codec!r}"
    )


def _open_cache(tokenizer, source: str):
    """``(cache_q, rows)`` of a code cache, its levels checked against the tokenizer. Only
    ``cache.json`` is read (no shard): a shard that cannot be read is named when it is."""
    info = read_cache_manifest(source, check_shards=False)
    cache_q = int(info["num_quantizers"])
    _check_q(tokenizer, cache_q, str(source))
    used = [(s, n) for s, n in zip(info["shards"], info["shard_rows"]) if n > 0]
    if not used:
        cache_shard_files(source)  # says that every source file was skipped
    d = Path(str(source)).expanduser()
    rows = CacheRows(
        [str(d / s) for s, _ in used],
        [n for _, n in used],
        corrupt=partial(corrupt_shard_error, d),
    )
    return cache_q, rows


def _not_a_cache_error(source: str) -> MissingFileError:
    """What to do when ``source`` is not a code cache and no codec was given."""
    p = Path(str(source)).expanduser()
    if not p.exists():
        try:
            read_cache_manifest(p)  # says that the cache does not exist and how to build it
        except MissingFileError as e:
            return MissingFileError(f"{e} (or give raw audio and a codec to encode in memory)")
    has_audio = p.is_dir() and any(
        f.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS for f in p.rglob("*")
    )
    build = f"source={p} output_dir=<cache>" if has_audio else f"source=<audio> output_dir={p}"
    return MissingFileError(
        f"{p} is not a code cache (no {MANIFEST_FILE}). Build one with `tune run "
        f"llama_mimi_tokenize --config tokenize {build}`"
        + (", or set dataset.codec to encode this audio in memory." if has_audio else ".")
    )


def _encode_in_memory(source: str, codec, source_options: dict, encode_options: dict):
    """Raw audio -> code rows in memory (small jobs only)."""
    src = open_audio_source(source, **source_options)
    rows, skipped = encode_items(src, src.items, codec, logger=log, **encode_options)
    if skipped:
        log.warning(f"{source}: skipped {len(skipped)} of {len(src)} items (see warnings above)")
    if not rows:
        raise ValueError(f"{source}: no audio could be encoded ({len(skipped)} items skipped)")
    return CacheRows(table=rows_to_table(rows)), int(codec.num_quantizers)


def audio_token_dataset(
    tokenizer,
    source: str,
    *,
    task: str = "a2a",
    packed: bool = False,
    max_seq_len: Optional[int] = None,
    split: str = "train",
    val_fraction: float = 0.0,
    streaming: bool = False,
    codec=None,
    long_utterances: str = "split",
    split_across_pack: bool = True,
    drop_empty_text: bool = False,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    source_type: str = "auto",
    source_split: str = "train",
    audio_column: str = "audio",
    text_column: Optional[str] = "text",
    path_column: str = "path",
    id_column: Optional[str] = "id",
    max_seconds: Optional[float] = 60.0,
    long_files: str = "split",
    batch_size: int = 16,
):
    """Llama-Mimi training data, for ``config.instantiate(cfg.dataset, tokenizer)``.

    Args:
        tokenizer (LlamaMimiTokenizer): builds the ids; its ``num_quantizers`` is the Q used
            (the first Q levels of the cache).
        source (str): a code cache directory (``tune run llama_mimi_tokenize``), or, with
            ``codec``, raw audio (folder, manifest, Hugging Face dataset) encoded in memory
            at start-up (small jobs: demo, tests, a few hours of audio).
        task (str): ``a2a`` (audio only) or ``tts`` (text prompt then audio).
        packed (bool): pack samples into ``max_seq_len`` sequences (AudioPackedDataset). A code
            cache's samples and packs come from its pack index, computed once and
            memory-mapped (:mod:`llama_mimi_tt.pack_index`).
        max_seq_len (Optional[int]): defaults to ``tokenizer.max_seq_len``.
        split (str): ``train``, ``validation`` or ``all``; with ``val_fraction``.
        val_fraction (float): share of utterance ids held out for validation.
        streaming (bool): iterate over the shards instead of indexing them: for data that is
            not a local code cache; a shuffle buffer, not a permutation, and no length.
        codec: a ``MimiCodec``, a weights path, or a ``_component_`` config (e.g.
            ``llama_mimi_tt.mimi_codec``); needed only when ``source`` is raw audio.
        long_utterances (str): ``split`` (more samples, no audio lost) or ``truncate``.
        split_across_pack (bool): with ``packed``, split samples across packs on frame
            boundaries (default; near-full packs) or keep samples whole.
        drop_empty_text (bool): tts only; skip utterances without text instead of raising.
        shuffle_buffer (int), seed (int): streaming shuffle.
        cache_dir (Optional[str]): where the pack index goes when the code cache's folder
            cannot be written (default ``~/.cache/llama_mimi_tt``); see :mod:`pack_index`.
        source_type, source_split, audio_column, text_column, path_column, id_column,
        max_seconds, long_files, batch_size: for raw audio, as in llama_mimi_tokenize.

    Returns:
        AudioTokenDataset, AudioPackedDataset or AudioTokenIterableDataset.

    Raises:
        FileNotFoundError: ``source`` does not exist or is not a code cache (without codec).
        ValueError: Q larger than the cache holds, codes out of range (when read), empty text
            in tts mode, bad options.
    """
    max_seq_len = max_seq_len if max_seq_len is not None else tokenizer.max_seq_len
    if packed and max_seq_len is None:
        raise ValueError("packed=True needs max_seq_len (or the tokenizer's max_seq_len)")
    name = str(source)
    _check_split(split, val_fraction)
    if is_code_cache(source):
        cache_q, rows = _open_cache(tokenizer, source)
        if streaming:
            return AudioTokenIterableDataset(
                rows.files,
                tokenizer,
                cache_q=cache_q,
                task=task,
                max_seq_len=max_seq_len,
                long_utterances=long_utterances,
                split=split,
                val_fraction=val_fraction,
                packed=packed,
                shuffle_buffer=shuffle_buffer,
                seed=seed,
                name=name,
            )
    else:
        if codec is None:
            raise _not_a_cache_error(source)
        if streaming:
            raise ValueError(
                "streaming=True reads a code cache; build one with llama_mimi_tokenize"
            )
        rows, cache_q = _encode_in_memory(
            source,
            _build_codec(codec, tokenizer.vocab.num_quantizers),
            dict(
                source_type=source_type,
                split=source_split,
                audio_column=audio_column,
                text_column=text_column,
                path_column=path_column,
                id_column=id_column,
            ),
            dict(max_seconds=max_seconds, long_files=long_files, batch_size=batch_size),
        )
    builder = SequenceBuilder(tokenizer, task, max_seq_len, long_utterances)
    settings = IndexSettings(
        num_quantizers=builder.q,
        max_seq_len=max_seq_len,
        task=task,
        long_utterances=long_utterances,
        split=split,
        val_fraction=float(val_fraction),
        packed=bool(packed),
        split_across_pack=bool(split_across_pack),
        drop_empty_text=bool(drop_empty_text),
        text_tokenizer=str(tokenizer.path) if task == "tts" else None,
    )
    if rows.table is None:
        index = load_or_build_index(Path(name).expanduser(), rows, builder, settings, cache_dir)
    else:
        index = compute_index(rows, builder, settings, progress=False, name=name)
    ds = AudioTokenDataset(
        index,
        rows,
        tokenizer,
        cache_q=cache_q,
        task=task,
        max_seq_len=max_seq_len,
        long_utterances=long_utterances,
        name=name,
    )
    if not packed:
        return ds
    return AudioPackedDataset(ds, max_seq_len=max_seq_len, padding_idx=tokenizer.pad_id)
