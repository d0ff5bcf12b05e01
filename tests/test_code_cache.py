"""The code cache: sources, bad files, long files, shards, resume, ranks, Q slicing.

The recipe's ``tokenize(cfg)`` runs in-process here with a counting wrapper around one shared
``MimiCodec.random`` (built once: ~3 s), so every encoded waveform is seen and counted.
"""

import functools
import hashlib
import json
from pathlib import Path

import datasets
import llama_mimi_tokenize
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from llama_mimi_tt import audio_token_dataset, llama_mimi_tokenizer
from llama_mimi_tt.audio import synthetic_audio
from llama_mimi_tt.code_cache import (
    MANIFEST_FILE,
    cut_long_audio,
    encode_items,
    open_audio_source,
    shard_name,
)
from llama_mimi_tt.codec import MimiCodec
from llama_mimi_tt.recipe_config import config_dir

# ---- a shared codec that counts what it encodes ---------------------------------------------


@functools.cache
def _random_codec(num_quantizers: int) -> MimiCodec:
    return MimiCodec.random(num_quantizers=num_quantizers, seed=0)


class CountingCodec:
    """The shared random codec; ``CountingCodec.encoded`` holds a hash of every waveform."""

    encoded: list = []

    def __init__(self, num_quantizers: int):
        self.inner = _random_codec(num_quantizers)
        self.num_quantizers = num_quantizers
        self.sample_rate, self.frame_rate = self.inner.sample_rate, self.inner.frame_rate
        self.codebook_size = self.inner.codebook_size

    def encode_batch(self, waves, sample_rate, batch_size=8):
        for w in waves:
            CountingCodec.encoded.append(hashlib.sha1(w.numpy().tobytes()).hexdigest())
        return self.inner.encode_batch(waves, sample_rate, batch_size=batch_size)


def counting_codec(path=None, num_quantizers=4, device="cpu", seed=0):
    """A ``_component_`` for the tokenize config."""
    return CountingCodec(num_quantizers)


@pytest.fixture(autouse=True)
def _reset_counter():
    CountingCodec.encoded = []


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP barriers across busy cores make
    the small convolutions of these tests several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- audio made here ------------------------------------------------------------------------
SECONDS = [0.4, 0.9, 0.25, 0.7, 0.5, 1.1, 0.3]


def write_audio(folder: Path, seconds=SECONDS, sr=16000) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(seconds):
        wave = synthetic_audio(s, sr, seed=i)[0].numpy()
        p = folder / ("sub" if i % 3 == 0 else "") / f"u{i}.{'flac' if i == 1 else 'wav'}"
        p.parent.mkdir(exist_ok=True)
        sf.write(p, wave, sr)
        paths.append(p)
    return paths


def write_bad_audio(folder: Path) -> dict:
    """One file for each kind of bad audio: name -> expected skip kind."""
    (folder / "garbage.wav").write_bytes(b"RIFF not really a wav")
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), 16000)
    nan = synthetic_audio(0.3, 16000, seed=9)[0].numpy()
    nan[100] = np.nan
    sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
    return {"garbage": "unreadable", "empty": "empty", "nan": "non-finite"}


def tokenize_cfg(source, output_dir, **overrides):
    cfg = OmegaConf.load(config_dir() / "tokenize.yaml")
    cfg.codec._component_ = "tests.test_code_cache.counting_codec"
    base = dict(source=str(source), output_dir=str(output_dir), num_quantizers=4, shard_size=2)
    base.update(batch_size=3, max_seconds=None)
    return OmegaConf.merge(cfg, base, overrides)


def run_tokenize(source, output_dir, **overrides):
    return llama_mimi_tokenize.tokenize(tokenize_cfg(source, output_dir, **overrides))


def shard_tables(cache: Path) -> dict:
    return {p.name: pq.read_table(p) for p in sorted(cache.glob("shard-*.parquet"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_audio(root / "audio")
    bad = write_bad_audio(root / "audio")
    return root / "audio", bad


@pytest.fixture(scope="module")
def reference_cache(corpus, tmp_path_factory):
    """An uninterrupted run: the result every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    CountingCodec.encoded = []
    summary = run_tokenize(corpus[0], out)
    return out, list(CountingCodec.encoded), summary


# ---- sources --------------------------------------------------------------------------------
def test_folder_source(corpus):
    folder, bad = corpus
    (folder / "notes.txt").write_text("not audio")
    src = open_audio_source(str(folder))
    assert src.kind == "folder"
    ids = [it.id for it in src.items]
    assert ids == sorted(ids) and len(ids) == len(SECONDS) + len(bad)
    assert "sub/u0" in ids and "u1" in ids and "notes" not in ids


def test_manifest_sources(tmp_path):
    paths = write_audio(tmp_path / "a", seconds=[0.3, 0.4])
    rows = [
        {"path": str(paths[0].relative_to(tmp_path)), "text": "first", "id": "A"},
        {"path": str(paths[1]), "text": "second", "id": "B"},  # absolute
        {"path": "a/missing.wav", "text": "gone", "id": "C"},
    ]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "m.csv"
    csv.write_text("path,text,id\n" + "".join(f"{r['path']},{r['text']},{r['id']}\n" for r in rows))
    codec = CountingCodec(4)
    for manifest in (jsonl, csv):
        src = open_audio_source(str(manifest))
        assert src.kind == "manifest" and [it.id for it in src.items] == ["A", "B", "C"]
        out, skipped = encode_items(src, src.items, codec)
        assert [r["id"] for r in out] == ["A", "B"] and [r["text"] for r in out] == [
            "first",
            "second",
        ]
        assert [(s["id"], s["kind"]) for s in skipped] == [("C", "missing")]
        assert "missing.wav" in skipped[0]["reason"]
    (tmp_path / "bad.jsonl").write_text('{"file": "x.wav"}\n')
    with pytest.raises(ValueError, match="no 'path' column"):
        open_audio_source(str(tmp_path / "bad.jsonl"))
    (tmp_path / "dup.jsonl").write_text('{"path": "x.wav", "id": 1}\n{"path": "y.wav", "id": 1}\n')
    with pytest.raises(ValueError, match="appears twice"):
        open_audio_source(str(tmp_path / "dup.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_audio_source(str(tmp_path / "nothing_here"))


def test_hf_dataset_sources(tmp_path):
    """save_to_disk datasets: an Audio column (encoded bytes) and an {array, sampling_rate}
    struct column; neither needs torchcodec."""
    paths = write_audio(tmp_path / "a", seconds=[0.3, 0.5, 0.4])
    ds = datasets.Dataset.from_dict(
        {
            "audio": [{"bytes": p.read_bytes(), "path": p.name} for p in paths],
            "sentence": ["one", "two", "three"],
            "key": ["k0", "k1", "k2"],
        }
    ).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "hf"))
    codec = CountingCodec(4)
    src = open_audio_source(str(tmp_path / "hf"), text_column="sentence", id_column="key")
    assert src.kind == "hf" and [it.id for it in src.items] == ["k0", "k1", "k2"]
    rows, skipped = encode_items(src, src.items, codec)
    assert not skipped and [r["text"] for r in rows] == ["one", "two", "three"]
    direct = [
        codec.inner.encode(torch.from_numpy(sf.read(p, dtype="float32")[0]), 16000) for p in paths
    ]
    for r, c in zip(rows, direct):
        assert np.array_equal(r["codes"], c.numpy())

    arrays = synthetic_audio(0.4, 22050, seed=3, num_items=2).numpy()
    arrays[1, 5] = np.nan
    ds2 = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {"audio": [{"array": a, "sampling_rate": 22050} for a in arrays]}
            )
        }
    )
    ds2.save_to_disk(str(tmp_path / "hf2"))
    src = open_audio_source(str(tmp_path / "hf2"), split="test")
    assert [it.id for it in src.items] == ["00000000", "00000001"]
    rows, skipped = encode_items(src, src.items, codec)
    assert len(rows) == 1 and [s["kind"] for s in skipped] == ["non-finite"]
    with pytest.raises(ValueError, match="no split 'train'"):
        open_audio_source(str(tmp_path / "hf2"))
    with pytest.raises(ValueError, match="no audio column 'speech'"):
        open_audio_source(str(tmp_path / "hf2"), split="test", audio_column="speech")


def test_cut_long_audio():
    wave = torch.zeros(int(2.5 * 24000))
    pieces = cut_long_audio(wave, 24000, 1.0, "split")
    assert [s for s, _ in pieces] == [0, 24000, 48000] and pieces[-1][1].shape[-1] == 12000
    assert [len(p) for _, p in cut_long_audio(wave, 24000, 1.0, "truncate")] == [24000]
    assert len(cut_long_audio(wave, 24000, 3.0, "split")) == 1
    assert len(cut_long_audio(torch.zeros(24000 + 100), 24000, 1.0, "split")) == 1  # < a frame
    with pytest.raises(ValueError, match="long_files"):
        cut_long_audio(wave, 24000, 1.0, "drop")


def test_long_files_split_and_truncate(tmp_path):
    write_audio(tmp_path / "a", seconds=[2.3])
    for rule, n in (("split", 3), ("truncate", 1)):
        run_tokenize(tmp_path / "a", tmp_path / rule, max_seconds=1.0, long_files=rule)
        table = pq.read_table(tmp_path / rule / shard_name(0, 1))
        assert table.column("segment").to_pylist() == list(range(n))
        assert table.column("partial").to_pylist() == [True] * n
        assert table.column("start").to_pylist() == [float(k) for k in range(n)]
        assert table.column("num_frames").to_pylist()[:1] == [13]  # ceil(1 s * 12.5)


# ---- the cache, bad files, resume -----------------------------------------------------------
def test_bad_files_are_skipped_and_counted(reference_cache, corpus):
    out, encoded, summary = reference_cache
    _, bad = corpus
    info = json.loads((out / MANIFEST_FILE).read_text())
    assert info["complete"] and info["num_quantizers"] == 4 and info["frame_rate"] == 12.5
    c = info["counts"]
    assert c["items"] == len(SECONDS) + len(bad) and c["encoded_items"] == len(SECONDS)
    assert c["skipped"] == len(bad) and info["skipped_by_reason"] == {k: 1 for k in bad.values()}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"]: s["kind"] for s in skipped} == bad
    assert len(encoded) == len(SECONDS)  # bad files never reach the codec
    assert summary["files_skipped"] == len(bad)
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name) == []


def test_resume_after_interruption_is_identical(reference_cache, corpus, tmp_path):
    ref, ref_encoded, _ = reference_cache
    out = tmp_path / "cache"
    first = run_tokenize(corpus[0], out, max_shards=2)  # "killed" after 2 of 5 shards
    assert first["manifest"] is None and not (out / MANIFEST_FILE).exists()
    assert len(list(out.glob("shard-*.parquet"))) == 2
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4)
    with pytest.raises(ValueError, match="unfinished: 3 of 5 shards"):
        audio_token_dataset(tok, str(out))
    done_first = list(CountingCodec.encoded)
    second = run_tokenize(corpus[0], out)
    assert second["shards_written"] == 3 and second["manifest"]["complete"]
    # no file was encoded twice, and together exactly what one uninterrupted run encodes
    assert len(set(CountingCodec.encoded)) == len(CountingCodec.encoded)
    assert sorted(CountingCodec.encoded) == sorted(ref_encoded)
    assert not set(done_first) & set(CountingCodec.encoded[len(done_first) :])
    a, b = shard_tables(ref), shard_tables(out)
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)
    manifests = [json.loads((d / MANIFEST_FILE).read_text()) for d in (ref, out)]
    for m in manifests:
        m.pop("finished_at")
    assert manifests[0] == manifests[1]
    # a third run has nothing left to do
    CountingCodec.encoded = []
    assert run_tokenize(corpus[0], out)["shards_written"] == 0 and CountingCodec.encoded == []


def test_half_written_shard_is_redone(reference_cache, corpus, tmp_path):
    ref, _, _ = reference_cache
    out = tmp_path / "cache"
    run_tokenize(corpus[0], out)
    victim = out / shard_name(3, 5)
    data = victim.read_bytes()
    victim.unlink()
    (out / MANIFEST_FILE).unlink()
    tmp = out / f"{victim.name}.tmp-somehost-12345"  # what a killed writer leaves behind
    tmp.write_bytes(data[: len(data) // 2])
    CountingCodec.encoded = []
    summary = run_tokenize(corpus[0], out)
    assert summary["shards_written"] == 1 and len(CountingCodec.encoded) == 2  # shard_size
    assert not tmp.exists()
    assert pq.read_table(victim).equals(pq.read_table(ref / victim.name))


def test_other_settings_cannot_resume(reference_cache, corpus, tmp_path):
    out = tmp_path / "cache"
    run_tokenize(corpus[0], out, max_shards=1)
    with pytest.raises(ValueError, match="num_quantizers: 4 in the cache, 8 now"):
        run_tokenize(corpus[0], out, num_quantizers=8)
    with pytest.raises(ValueError, match="shard_size"):
        run_tokenize(corpus[0], out, shard_size=3)


def test_ranks_encode_their_own_shards(reference_cache, corpus, tmp_path, monkeypatch):
    ref, ref_encoded, _ = reference_cache
    out = tmp_path / "cache"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    s1 = run_tokenize(corpus[0], out)
    assert s1["manifest"] is None
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(1, 5), shard_name(3, 5)]
    monkeypatch.setenv("RANK", "0")
    s0 = run_tokenize(corpus[0], out)
    assert s0["shards_written"] == 3 and s0["manifest"]["complete"]  # the last rank finishes it
    assert sorted(CountingCodec.encoded) == sorted(ref_encoded)
    a, b = shard_tables(ref), shard_tables(out)
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)


def test_q_slicing_from_q8_cache(corpus, tmp_path):
    """A Q=8 cache read with Q=4 gives the ids of a Q=4 encode (RVQ levels are sequential)."""
    q8 = run_tokenize(corpus[0], tmp_path / "q8", num_quantizers=8)["manifest"]
    assert q8["num_quantizers"] == 8
    q4_dir = tmp_path / "q4"
    run_tokenize(corpus[0], q4_dir, num_quantizers=4)
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4)
    kw = dict(split="all", cache_dir=str(tmp_path / "hf"))
    from_q8 = audio_token_dataset(tok, str(tmp_path / "q8"), **kw)
    from_q4 = audio_token_dataset(tok, str(q4_dir), **kw)
    assert len(from_q8) == len(from_q4) == len(SECONDS)
    for a, b in zip(from_q8, from_q4):
        assert a["tokens"] == b["tokens"]


def test_dataset_from_raw_audio_with_codec(corpus, tmp_path):
    """Small jobs: a folder + codec is encoded in memory; bad files are skipped."""
    ref = tmp_path / "cache"
    run_tokenize(corpus[0], ref)
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4)
    mem = audio_token_dataset(tok, str(corpus[0]), codec=CountingCodec(4), split="all")
    cached = audio_token_dataset(tok, str(ref), split="all", cache_dir=str(tmp_path / "hf"))
    assert [s["tokens"] for s in mem] == [s["tokens"] for s in cached]
    with pytest.raises(FileNotFoundError, match="not a code cache.*codec"):
        audio_token_dataset(tok, str(corpus[0]))
