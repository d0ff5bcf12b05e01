"""audio_token_dataset over code caches written here with random codes (no codec needed)."""

import json
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_packed, padded_collate_sft

from llama_mimi_tt import audio_token_dataset, llama_mimi_tokenizer
from llama_mimi_tt.code_cache import (
    MANIFEST_FILE,
    shard_name,
    write_code_cache,
)
from llama_mimi_tt.data import (
    AudioPackedDataset,
    AudioTokenIterableDataset,
    pack_frame_aligned,
    validation_mask,
)

TEXTS = ["hello there", "a b c", "speech", "one more line", "x", "mimi codes", "llama", "end"]


def make_cache(root: Path, utts, q: int = 8, shard_size: int = 3) -> Path:
    """A finished code cache of ``utts`` (dicts: id, codes [q, F], text, partial)."""
    return write_code_cache(root, utts, num_quantizers=q, shard_size=shard_size)


def random_utts(n=8, q=8, frames=(3, 40), seed=0, text=True):
    g = np.random.default_rng(seed)
    return [
        {
            "id": f"utt{i:03d}",
            "codes": g.integers(0, 2048, (q, int(g.integers(*frames)))).astype(np.uint16),
            "text": TEXTS[i % len(TEXTS)] if text else None,
        }
        for i in range(n)
    ]


@pytest.fixture
def tok():
    return llama_mimi_tokenizer("builtin:byte", num_quantizers=4, max_seq_len=None)


def build(tok, source, tmp_path, **kw):
    return audio_token_dataset(tok, str(source), cache_dir=str(tmp_path / "hf"), **kw)


@pytest.mark.parametrize("task", ["a2a", "tts"])
def test_ids_match_tokenizer_layout_and_labels(tmp_path, tok, task):
    utts = random_utts()
    cache = make_cache(tmp_path / "cache", utts)
    ds = build(tok, cache, tmp_path, task=task, split="all")
    assert len(ds) == len(utts)
    v = tok.vocab
    for u, s in zip(utts, ds):
        text = u["text"] if task == "tts" else None
        ids, audio_start = tok.tokenize(u["codes"][:4].astype(np.int64), text)  # Q=8 -> Q=4
        assert s["tokens"] == ids
        assert s["tokens"][s["audio_start"]] == v.audio_start_id and s["audio_start"] == audio_start
        assert s["tokens"][-1] == v.audio_end_id
        # labels: -100 exactly on BOS (and the text prompt in tts), the tokens elsewhere
        expect = [CROSS_ENTROPY_IGNORE_IDX] * audio_start + ids[audio_start:]
        assert s["labels"] == expect
        assert audio_start == (1 if task == "a2a" else 1 + len(tok.encode(text, add_bos=False)))
        # the audio span decodes to the cache's first 4 levels
        body = torch.tensor(s["tokens"][audio_start + 1 : -1])
        assert torch.equal(v.decode(body), torch.as_tensor(u["codes"][:4].astype(np.int64)))


def test_q_larger_than_cache_is_an_error(tmp_path):
    cache = make_cache(tmp_path / "cache", random_utts(n=2, q=4), q=4)
    tok8 = llama_mimi_tokenizer("builtin:byte", num_quantizers=8)
    with pytest.raises(ValueError, match=r"num_quantizers=8.*only 4 levels"):
        build(tok8, cache, tmp_path)


def audio_codes(tok, sample):
    """The codes [Q, F] between ``<audio>`` and ``</audio>`` (or the end) of a sample."""
    body = sample["tokens"][sample["audio_start"] + 1 :]
    if body and body[-1] == tok.vocab.audio_end_id:
        body = body[:-1]
    return tok.vocab.decode(torch.tensor(body))


@pytest.mark.parametrize("rule", ["split", "truncate"])
def test_long_utterances_cut_on_frame_boundaries(tmp_path, rule):
    L, q = 64, 4
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=q, max_seq_len=L)
    utts = random_utts(n=5, frames=(10, 60), seed=1)
    cache = make_cache(tmp_path / "cache", utts)
    for task in ("a2a", "tts"):
        ds = build(tok, cache, tmp_path, task=task, split="all", long_utterances=rule)
        samples = list(ds)
        assert all(len(s["tokens"]) <= L for s in samples)
        # regroup: each utterance starts with its text prompt (tts) or BOS <audio> (a2a)
        got, i = [], 0
        for u in utts:
            first = samples[i]
            ids, a = tok.tokenize(
                u["codes"][:q].astype(np.int64), u["text"] if task == "tts" else None
            )
            assert first["tokens"] == ids  # the first sample is exactly tokenize()'s cut
            parts = [first]
            i += 1
            while rule == "split" and parts[-1]["tokens"][-1] != tok.vocab.audio_end_id:
                parts.append(samples[i])
                i += 1
            codes = [audio_codes(tok, p) for p in parts]
            for p in parts[1:]:  # continuations are a2a-style, BOS masked
                assert p["tokens"][:2] == [tok.bos_id, tok.vocab.audio_start_id]
                assert p["labels"][0] == CROSS_ENTROPY_IGNORE_IDX and p["audio_start"] == 1
            got.append(torch.cat(codes, dim=1))
        assert i == len(samples)
        for u, c in zip(utts, got):
            full = torch.as_tensor(u["codes"][:q].astype(np.int64))
            if rule == "split":
                assert torch.equal(c, full)  # no audio lost
            else:
                assert torch.equal(c, full[:, : c.shape[1]])


def test_padded_batches(tmp_path, tok):
    cache = make_cache(tmp_path / "cache", random_utts())
    ds = build(tok, cache, tmp_path, split="all")
    batch = padded_collate_sft([ds[i] for i in range(4)], padding_idx=tok.pad_id)
    lengths = [len(ds[i]["tokens"]) for i in range(4)]
    for row, n in enumerate(lengths):
        assert (batch["labels"][row, n:] == CROSS_ENTROPY_IGNORE_IDX).all()
        assert (batch["tokens"][row, n:] == tok.pad_id).all()
        assert batch["labels"][row, 0] == CROSS_ENTROPY_IGNORE_IDX  # BOS


def test_packed_dataset_frame_aligned(tmp_path):
    L, q = 128, 4
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=q, max_seq_len=L)
    v = tok.vocab
    utts = random_utts(n=12, frames=(5, 45), seed=2)
    cache = make_cache(tmp_path / "cache", utts)
    ds = build(tok, cache, tmp_path, split="all", packed=True)
    assert isinstance(ds, AudioPackedDataset)
    unpacked = list(build(tok, cache, tmp_path, split="all"))
    raw = list(pack_frame_aligned(unpacked, L, q, tok.header_ids()))
    assert len(raw) == len(ds)
    for p, r in zip(ds, raw):
        n = len(r["tokens"])
        assert p["tokens"].shape == (L,) and int(p["seq_lens"].sum()) == L
        assert p["tokens"][:n].tolist() == r["tokens"] and p["labels"][:n].tolist() == r["labels"]
        assert (p["labels"][n:] == CROSS_ENTROPY_IGNORE_IDX).all()  # never a loss on padding
        start = 0
        for m in r["seq_lens"]:  # every document is well formed
            toks = torch.tensor(r["tokens"][start : start + m])
            labels = r["labels"][start : start + m]
            start += m
            assert toks[0] == tok.bos_id and labels[0] == CROSS_ENTROPY_IGNORE_IDX
            a = int((toks == v.audio_start_id).nonzero()[0])
            body = toks[a + 1 :]
            body = body[:-1] if body[-1] == v.audio_end_id else body
            v.decode(body)  # whole frames, levels in order (raises otherwise)
    for r in raw[:-1]:
        assert L - len(r["tokens"]) < q + 2  # full but for less than a frame and a header
    # every audio token of the dataset is in exactly one pack, in order
    all_audio = torch.cat([p["tokens"][v.is_audio(p["tokens"])] for p in ds])
    ref = torch.cat([torch.tensor(s["tokens"]) for s in unpacked])
    assert torch.equal(all_audio, ref[v.is_audio(ref)])
    batch = padded_collate_packed([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, L)
    # split_across_pack=False: whole samples only, as torchtune packs
    whole = build(tok, cache, tmp_path, split="all", packed=True, split_across_pack=False)
    assert sum(len(s["seq_lens"]) for s in whole) >= len(unpacked)


def test_pack_frame_aligned_leaves_less_than_a_frame():
    q, L = 4, 50
    samples = []
    for n in (7, 9, 3, 11, 2):
        tokens = [1, 9] + [100 + i % q for i in range(q * n)] + [8]
        samples.append({"tokens": tokens, "labels": [-100] + tokens[1:], "audio_start": 1})
    packs = list(pack_frame_aligned(samples, L, q, header=[1, 9]))
    for p in packs[:-1]:
        assert L - len(p["tokens"]) < q + 2  # full but for less than a frame and a header
    for p in packs:
        assert sum(p["seq_lens"]) == len(p["tokens"]) <= L
    audio = [t for p in packs for t in p["tokens"] if t >= 100]
    assert audio == [t for s in samples for t in s["tokens"] if t >= 100]
    assert sum(t == 8 for p in packs for t in p["tokens"]) == len(samples)  # </audio> kept


def test_train_validation_split(tmp_path, tok):
    utts = random_utts(n=40, frames=(2, 5))
    cache = make_cache(tmp_path / "cache", utts, shard_size=7)
    train = build(tok, cache, tmp_path, split="train", val_fraction=0.25)
    val = build(tok, cache, tmp_path, split="validation", val_fraction=0.25)
    assert len(train) + len(val) == 40 and 3 <= len(val) <= 20
    in_val = validation_mask([u["id"] for u in utts], 0.25)
    val_tokens = [s["tokens"] for s in val]
    assert val_tokens == [
        build(tok, cache, tmp_path, split="all")[i]["tokens"] for i in np.flatnonzero(in_val)
    ]
    with pytest.raises(ValueError, match="val_fraction"):
        build(tok, cache, tmp_path, split="validation")


def test_streaming_matches_map_style_and_splits_by_rank(tmp_path, tok):
    utts = random_utts(n=10)
    cache = make_cache(tmp_path / "cache", utts, shard_size=2)  # 5 shards
    ref = [s["tokens"] for s in build(tok, cache, tmp_path, split="all")]
    stream = build(tok, cache, tmp_path, split="all", streaming=True, shuffle_buffer=0)
    assert isinstance(stream, AudioTokenIterableDataset)
    assert [s["tokens"] for s in stream] == ref
    parts = []
    for rank in range(2):
        it = AudioTokenIterableDataset(
            [str(p) for p in sorted(cache.glob("shard-*.parquet"))],
            tok,
            cache_q=8,
            split="all",
            shuffle_buffer=0,
            rank=rank,
            world_size=2,
        )
        parts.append([tuple(s["tokens"]) for s in it])
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(map(tuple, ref))
    # packed streaming gives the same packs as the map-style packed dataset
    tok_l = llama_mimi_tokenizer("builtin:byte", num_quantizers=4, max_seq_len=96)
    packed = build(tok_l, cache, tmp_path, split="all", packed=True)
    streamed = list(
        build(tok_l, cache, tmp_path, split="all", packed=True, streaming=True, shuffle_buffer=0)
    )
    assert len(streamed) == len(packed)
    for a, b in zip(streamed, packed):
        for k in ("tokens", "labels", "input_pos", "seq_lens"):
            assert torch.equal(a[k], b[k]), k


def test_missing_and_unfinished_cache(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist.*llama_mimi_tokenize"):
        build(tok, tmp_path / "nope", tmp_path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a code cache"):
        build(tok, tmp_path / "plain", tmp_path)
    cache = make_cache(tmp_path / "cache", random_utts(n=4), shard_size=2)
    (cache / MANIFEST_FILE).unlink()
    (cache / shard_name(1, 2)).unlink()
    with pytest.raises(ValueError, match="unfinished: 1 of 2 shards"):
        build(tok, cache, tmp_path)


def test_codes_out_of_range_in_cache(tmp_path, tok):
    utts = random_utts(n=3)
    utts[1]["codes"][2, 5] = 4000  # level 2 < Q=4: read
    cache = make_cache(tmp_path / "cache", utts)
    ds = build(tok, cache, tmp_path, split="all")
    ds[0]
    with pytest.raises(ValueError, match=r"utt001: code 4000 at \[level 2, frame 5\]"):
        ds[1]
    stream = build(tok, cache, tmp_path, split="all", streaming=True, shuffle_buffer=0)
    with pytest.raises(ValueError, match="utt001: code 4000"):
        list(stream)


def test_corrupt_code_count(tmp_path, tok):
    cache = make_cache(tmp_path / "cache", random_utts(n=2), shard_size=2)
    shard = cache / shard_name(0, 1)
    table = pq.read_table(shard)
    frames = table.column("num_frames").to_pylist()
    frames[0] += 1
    table = table.set_column(
        table.schema.get_field_index("num_frames"), "num_frames", pa.array(frames, pa.int32())
    )
    pq.write_table(table, shard)
    ds = build(tok, cache, tmp_path, split="all")
    with pytest.raises(ValueError, match="corrupt"):
        ds[0]


def test_tts_empty_text_and_partial_rows(tmp_path, tok):
    utts = random_utts(n=6)
    utts[2]["text"] = "  "
    utts[4]["text"] = None
    utts[5]["partial"] = True
    cache = make_cache(tmp_path / "cache", utts)
    with pytest.raises(ValueError, match=r"2 utterances have no text.*utt002.*utt004"):
        build(tok, cache, tmp_path, task="tts", split="all")
    ds = build(tok, cache, tmp_path, task="tts", split="all", drop_empty_text=True)
    assert len(ds) == 3 and ds.skipped["empty text"] == 2 and len(ds.skipped) == 2
    assert len(build(tok, cache, tmp_path, task="a2a", split="all")) == 6


def test_map_style_reads_codes_lazily(tmp_path, tok):
    cache = make_cache(tmp_path / "cache", random_utts(n=6))
    ds = build(tok, cache, tmp_path, split="all")
    assert all(isinstance(a, np.memmap) for a in ds.index.arrays.values() if len(a))
    assert not ds.rows._groups, "no codes are read before an item is asked for"
    ds[4]
    assert list(ds.rows._groups) == [(1, 0)]  # shard 1 (rows 3-5), its only row group
    info = json.loads((cache / MANIFEST_FILE).read_text())
    assert info["complete"] and info["counts"]["rows"] == 6


def test_recipe_collate_roundtrip(tmp_path):
    """A torchtune DataLoader over the packed dataset, as the recipes build it."""
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4, max_seq_len=64)
    cache = make_cache(tmp_path / "cache", random_utts(n=6, frames=(3, 20)))
    ds = build(tok, cache, tmp_path, split="all", packed=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=padded_collate_packed)
    b = next(iter(dl))
    assert b["tokens"].shape == (2, 64) and b["labels"].shape == (2, 64)
    ds2 = build(tok, cache, tmp_path, split="all")
    dl = torch.utils.data.DataLoader(
        ds2, batch_size=3, collate_fn=partial(padded_collate_sft, padding_idx=tok.pad_id)
    )
    b = next(iter(dl))
    assert b["tokens"].shape[0] == 3
