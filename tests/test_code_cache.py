"""The code cache: sources, bad files, long files, shards, resume, ranks, Q slicing.

The recipe's ``tokenize(cfg)`` runs in-process here with a counting wrapper around one shared
``MimiCodec.random`` (built once: ~3 s), so every encoded waveform is seen and counted.
"""

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import llama_mimi_tokenize
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from llama_mimi_tt import atomic_files, audio_token_dataset, llama_mimi_tokenizer
from llama_mimi_tt.atomic_files import temporary_path
from llama_mimi_tt.audio import prepare_waveform, synthetic_audio
from llama_mimi_tt.audio_sources import open_audio_source
from llama_mimi_tt.code_cache import (
    MANIFEST_FILE,
    cut_long_audio,
    encode_items,
    encode_shard,
    shard_items,
    shard_metadata,
    shard_name,
    shard_problem,
)
from llama_mimi_tt.codec import MimiCodec
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.recipe_config import config_dir

# ---- a shared codec that counts what it encodes ---------------------------------------------


@functools.cache
def _random_codec(num_quantizers: int) -> MimiCodec:
    return MimiCodec.random(num_quantizers=num_quantizers, seed=0)


class CountingCodec:
    """The shared random codec; ``CountingCodec.encoded`` holds a hash of every waveform."""

    encoded: list = []
    built = 0  # codecs built, to check that bad settings fail before the codec loads

    def __init__(self, num_quantizers: int):
        CountingCodec.built += 1
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
    CountingCodec.built = 0


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
    tmp = temporary_path(victim, writer="other-host-1-dead")  # a killed writer's
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
    """Each rank encodes its shards, and first removes the temporaries that killed runs left
    of them (it owns them), never those of another rank's shards."""
    ref, ref_encoded, _ = reference_cache
    out = tmp_path / "cache"
    out.mkdir()
    left = {k: temporary_path(out / shard_name(k, 5), writer="node7-12-dead") for k in (0, 1)}
    for tmp in left.values():
        tmp.write_bytes(b"PAR1 half a shard")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    s1 = run_tokenize(corpus[0], out)
    assert s1["manifest"] is None
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(1, 5), shard_name(3, 5)]
    assert not left[1].exists() and left[0].exists()  # rank 0's shard: not rank 1's to touch
    monkeypatch.setenv("RANK", "0")
    s0 = run_tokenize(corpus[0], out)
    assert not left[0].exists()
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
    # the other way round is a user's mistake: a UserError (one line from the recipes)
    tok8 = llama_mimi_tokenizer("builtin:byte", num_quantizers=8)
    with pytest.raises(UserError, match="num_quantizers=8, but .* holds only 4 levels per frame"):
        audio_token_dataset(tok8, str(q4_dir), **kw)


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


# ---- corpus edge cases (issue 14) -----------------------------------------------------------
def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_item_skipped_fails_and_points_at_the_skip_list(tmp_path):
    (tmp_path / "bad").mkdir()
    for name in ("a.wav", "b.wav"):
        (tmp_path / "bad" / name).write_bytes(b"RIFF not audio")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"every one of the 2 source items was skipped "
                       r"\(\{'unreadable': 2\}\).*skipped.jsonl"):  # fmt: skip
        run_tokenize(tmp_path / "bad", out)
    assert len(read_jsonl(out / "skipped.jsonl")) == 2
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "gone1.wav"}\n{"path": "gone2.wav"}\n')
    with pytest.raises(UserError, match=r"2 source items was skipped \(\{'missing': 2\}\)"):
        run_tokenize(manifest, tmp_path / "out2")


def test_broken_symlinks_are_counted_and_a_folder_stays_a_folder(tmp_path):
    write_audio(tmp_path / "a", seconds=[0.3, 0.4])
    (tmp_path / "a" / "link.wav").symlink_to(tmp_path / "gone.wav")
    info = run_tokenize(tmp_path / "a", tmp_path / "out")["manifest"]
    assert info["counts"]["items"] == 3 and info["counts"]["encoded_items"] == 2
    assert info["skipped_by_reason"] == {"missing": 1}
    assert "link.wav is a broken symbolic link" in info["skipped_examples"][0]["reason"]
    # a folder of only broken links: a folder source (not a Hugging Face dataset), all skipped
    (tmp_path / "links").mkdir()
    for k in range(2):
        (tmp_path / "links" / f"l{k}.flac").symlink_to(tmp_path / f"gone{k}.flac")
    assert open_audio_source(str(tmp_path / "links")).kind == "folder"
    with pytest.raises(UserError, match=r"2 source items was skipped \(\{'missing': 2\}\)"):
        run_tokenize(tmp_path / "links", tmp_path / "out2")


def test_loud_audio_is_normalised_warned_and_counted(tmp_path, caplog):
    wave = synthetic_audio(0.5, 16000, seed=1)[0].numpy().astype(np.float64)
    loud = wave / np.abs(wave).max() * 50.0  # a float64 wav at +-50
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "loud.wav", loud, 16000, subtype="DOUBLE")
    sf.write(tmp_path / "a" / "quiet.wav", wave * 0.5, 16000)
    summary = run_tokenize(tmp_path / "a", tmp_path / "out")
    info = summary["manifest"]
    assert summary["files_normalised"] == 1 and info["counts"]["normalised"] == 1
    assert info["normalised_examples"][0]["id"] == "loud"
    assert info["normalised_examples"][0]["peak"] == pytest.approx(50.0)
    assert "loud.wav: samples reach 50, far outside [-1, 1]: normalised" in caplog.text
    row = pq.read_table(tmp_path / "out" / shard_name(0, 1)).to_pylist()[0]
    stored = np.asarray(row["codes"]).reshape(4, row["num_frames"])
    peak_one = torch.from_numpy((loud / 50.0).astype(np.float32))  # scaled, not clipped
    assert np.array_equal(stored, _random_codec(4).encode(peak_one, 16000).numpy())


def test_corrupt_shard_is_named_by_training_and_redone_by_tokenize(
    reference_cache, corpus, tmp_path
):
    ref, _, _ = reference_cache
    out = tmp_path / "cache"
    run_tokenize(corpus[0], out)
    victim = out / shard_name(2, 5)
    data = victim.read_bytes()
    codes = pq.ParquetFile(victim).metadata.row_group(0).column(3)
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4)

    def load():
        return audio_token_dataset(tok, str(out), split="all", cache_dir=str(tmp_path / "hf"))

    victim.write_bytes(data[: len(data) // 2])  # truncated: no parquet footer
    with pytest.raises(UserError, match=rf"shard {victim} is corrupt.*Run `tune run "
                       rf"llama_mimi_tokenize` again.*source={corpus[0]}"):  # fmt: skip
        load()
    # footer whole, the codes' pages overwritten: found when the rows are read
    start = codes.dictionary_page_offset or codes.data_page_offset
    garbage = bytearray(data)
    garbage[start + 40 : start + codes.total_compressed_size - 10] = b"\xab" * (
        codes.total_compressed_size - 50
    )
    victim.write_bytes(bytes(garbage))
    ds = load()  # the index reads only the small columns; the codes are read per item
    with pytest.raises(UserError, match=rf"shard {victim} is corrupt: ZSTD decompression"):
        [ds[i] for i in range(len(ds))]
    CountingCodec.encoded = []
    summary = run_tokenize(corpus[0], out)  # the rerun reads finished shards' rows too
    assert summary["shards_written"] == 1 and len(CountingCodec.encoded) == 2  # shard_size
    assert summary["manifest"]["complete"]
    assert pq.read_table(victim).equals(pq.read_table(ref / victim.name))
    assert len(load()) == len(SECONDS)


def test_manifest_rows_without_a_path_are_skipped_with_their_line(tmp_path):
    paths = write_audio(tmp_path / "a", seconds=[0.3, 0.4])
    lines = [{"text": "no path at all"}, {"path": str(paths[0])}, {"path": None, "id": "N"}]
    lines.append({"path": str(paths[1])})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n"
                        + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")  # fmt: skip
    info = run_tokenize(manifest, tmp_path / "out")["manifest"]
    assert info["counts"]["encoded_items"] == 2 and info["skipped_by_reason"] == {"missing": 2}
    reasons = sorted(s["reason"] for s in read_jsonl(tmp_path / "out" / "skipped.jsonl"))
    assert reasons == [f"{manifest}, line 1: no audio path", f"{manifest}, line 4: no audio path"]
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text(f"path,text\n,empty\n{paths[0]},ok\n")
    src = open_audio_source(str(csv_manifest))
    _, skipped = encode_items(src, src.items, CountingCodec(4))
    assert [s["reason"] for s in skipped] == [f"{csv_manifest}, line 2: no audio path"]


@pytest.mark.parametrize("problem", ["a file", "under a file", "read-only"])
def test_output_dir_problems_fail_before_the_codec_loads(corpus, tmp_path, problem):
    (tmp_path / "file").write_text("x")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "cache"}.get(problem)
    if problem == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out = tmp_path / "ro"
        out.mkdir(mode=0o500)
    want = {"a file": "is a file, not a folder", "under a file": "is not writable \\(Not a dir"}
    with pytest.raises(UserError, match=rf"output_dir {out} " + want.get(problem, "is not writ")):
        run_tokenize(corpus[0], out)
    assert CountingCodec.built == 0


def test_disk_full_names_the_shard_and_keeps_finished_work(corpus, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    run_tokenize(corpus[0], out, max_shards=2)
    real_write = pq.write_table

    def full(table, where, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(UserError, match=rf"cannot write {out / shard_name(2, 5)}: No space left"):
        run_tokenize(corpus[0], out)
    assert sorted(p.name for p in out.iterdir() if "shard-" in p.name) == [
        shard_name(0, 5),
        shard_name(1, 5),
    ]  # no temporary left behind
    monkeypatch.setattr(pq, "write_table", real_write)
    CountingCodec.encoded = []
    assert run_tokenize(corpus[0], out)["shards_written"] == 3


def test_truncate_summary_counts_what_was_encoded(tmp_path):
    write_audio(tmp_path / "a", seconds=[2.3])
    summary = run_tokenize(tmp_path / "a", tmp_path / "t", max_seconds=1.0, long_files="truncate")
    assert summary["audio_seconds"] == pytest.approx(1.0, abs=1e-3)
    assert summary["manifest"]["counts"]["seconds"] == pytest.approx(1.0, abs=1e-3)


def test_shorter_than_a_frame_is_skipped(tmp_path):
    write_audio(tmp_path / "a", seconds=[0.01, 0.1])
    info = run_tokenize(tmp_path / "a", tmp_path / "out")["manifest"]
    assert info["counts"]["encoded_items"] == 1 and info["skipped_by_reason"] == {"too short": 1}
    assert info["skipped_examples"][0]["reason"] == "10 ms: shorter than one Mimi frame (80 ms)"


def test_long_files_read_in_blocks_give_the_codes_of_the_whole_file(tmp_path):
    """Block-read pieces (1 s; blocks of 1 s that do not line up with them) against today's
    route: the whole file read, checked, mixed down, resampled, then cut. Same rows, same
    codes, with split and truncate."""
    g = np.random.default_rng(5)
    stereo = (0.2 * g.standard_normal((round(2.3 * 16000), 2))).astype(np.float32)
    loud = (0.1 * g.standard_normal((round(1.6 * 44100), 3))).astype(np.float32)
    loud[round(1.4 * 44100)] = 5.0  # the file's peak, in its second piece: normalises both
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        sf.write(tmp_path / folder / "stereo16k.flac", stereo, 16000)
    sf.write(tmp_path / "a" / "loud44k.wav", loud, 44100, subtype="FLOAT")
    run_tokenize(tmp_path / "a", tmp_path / "split", max_seconds=1.0, long_files="split")
    run_tokenize(tmp_path / "b", tmp_path / "trunc", max_seconds=1.0, long_files="truncate")
    rows = pq.read_table(tmp_path / "split" / shard_name(0, 1)).to_pylist()
    rows += pq.read_table(tmp_path / "trunc" / shard_name(0, 1)).to_pylist()
    expected = []
    for name, rule in (
        ("loud44k.wav", "split"),
        ("stereo16k.flac", "split"),
        ("stereo16k.flac", "truncate"),
    ):
        data, sr = sf.read(tmp_path / "a" / name, dtype="float32", always_2d=True)
        wave = prepare_waveform(data.T, sr, 24000)
        for k, (start, piece) in enumerate(cut_long_audio(wave, 24000, 1.0, rule)):
            expected.append((Path(name).stem, k, start, piece, wave.shape[-1]))
    assert [(r["id"], r["segment"]) for r in rows] == [e[:2] for e in expected]
    assert len(rows) == 2 + 3 + 1
    codec, codes = _random_codec(4), {}
    for row, (uid, k, start, piece, n) in zip(rows, expected):
        assert row["partial"] is True
        assert row["start"] == pytest.approx(start / 24000)
        assert row["duration"] == pytest.approx(piece.shape[-1] / 24000)
        assert row["source_duration"] == pytest.approx(n / 24000)
        if (uid, k) not in codes:
            codes[uid, k] = codec.encode(piece, 24000).numpy()
        stored = np.asarray(row["codes"]).reshape(4, row["num_frames"])
        assert np.array_equal(stored, codes[uid, k]), (uid, k)


def test_truncate_keeps_a_file_whose_tail_it_never_reads(tmp_path):
    wave = synthetic_audio(5.0, 16000, seed=2)[0].numpy()
    wave[4 * 16000] = np.nan  # past 2 s and the resampler's margin
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "tail.wav", wave, 16000, subtype="FLOAT")
    info = run_tokenize(tmp_path / "a", tmp_path / "t", max_seconds=2.0, long_files="truncate")
    assert info["manifest"]["counts"]["rows"] == 1
    with pytest.raises(UserError, match=r"every|all"):
        run_tokenize(tmp_path / "a", tmp_path / "s", max_seconds=2.0, long_files="split")


def cut_off_wav(path: Path, header_seconds: float, seconds: float, sample_rate=16000) -> Path:
    """A WAV whose header claims ``header_seconds`` but that holds ``seconds`` (cut off)."""
    sf.write(path, synthetic_audio(seconds, sample_rate, seed=3)[0].numpy(), sample_rate)
    data = bytearray(path.read_bytes())
    i = data.find(b"data")
    data[i + 4 : i + 8] = int(header_seconds * sample_rate * 2).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def test_cut_off_wav_is_encoded_warned_and_counted_by_tokenize_and_skipped_by_eval(
    tmp_path, caplog
):
    write_audio(tmp_path / "a", seconds=[0.5])
    cut_off_wav(tmp_path / "a" / "cut.wav", 1.5, 0.5)
    info = run_tokenize(tmp_path / "a", tmp_path / "out")["manifest"]
    assert info["counts"]["encoded_items"] == 2 and info["counts"]["short_files"] == 1
    assert info["short_files_examples"][0]["id"] == "cut"
    assert info["short_files_examples"][0]["reason"] == "its header says 1.50 s, it holds 0.50 s"
    assert "cut.wav: the header says 24000 frames (1.50 s), the file holds only 8000" in caplog.text
    # eval scores nothing of a damaged file: skipped with its reason, counted
    source = open_audio_source(str(tmp_path / "a"))
    rows, skipped = encode_items(source, source.items, _random_codec(4), max_seconds=None)
    assert [r["id"] for r in rows] == ["sub/u0"]
    assert [(s["id"], s["kind"]) for s in skipped] == [("cut", "short file")]


def test_shards_left_unencoded_fail_the_run(corpus, tmp_path, monkeypatch):
    """A shard this run was to encode that is still missing at the end (here: encode_shard
    found it whole, then it was deleted): the run names it and fails, instead of looking
    complete; the rerun it advises finishes the cache."""
    out = tmp_path / "cache"
    real = llama_mimi_tokenize.encode_shard

    def gone(path, *args, **kwargs):
        return None if path.name == shard_name(3, 5) else real(path, *args, **kwargs)

    monkeypatch.setattr(llama_mimi_tokenize, "encode_shard", gone)
    with pytest.raises(UserError, match=r"1 shards of .* were not encoded \(shard-00003-of-00005"
                       r"\.parquet\)\. Run the same command again"):  # fmt: skip
        run_tokenize(corpus[0], out)
    monkeypatch.setattr(llama_mimi_tokenize, "encode_shard", real)
    assert run_tokenize(corpus[0], out)["manifest"]["complete"]  # as the message advises


def test_two_writers_of_one_shard_both_finish_and_the_shard_is_whole(
    reference_cache, corpus, tmp_path, monkeypatch
):
    """A second encoder of a shard that starts while the first one's temporary is on disk
    (a hook in the first write, no timing): both succeed, and the shard is whole and equal to
    the reference; only work is wasted, nothing is left behind."""
    ref = reference_cache[0]
    want = shard_metadata(ref / shard_name(1, 5))  # 2 items, one of them bad audio
    source = open_audio_source(str(corpus[0]))
    items = shard_items(source.items, 2)[1]
    path = tmp_path / shard_name(1, 5)
    codec = CountingCodec(4)
    real_replacing, seen = atomic_files.replacing, []

    @contextlib.contextmanager
    def with_a_second_writer(where):
        with real_replacing(where) as tmp:
            yield tmp
            if not seen:  # the first writer's temporary is written, not yet renamed
                seen.append(tmp)
                assert tmp.is_file() and not path.exists()
                second = encode_shard(path, source, items, codec, batch_size=3, max_seconds=None)
                assert second["encoded_items"] == want["encoded_items"] == 1
                assert tmp.is_file() and shard_problem(path, read_rows=True) is None

    monkeypatch.setattr(atomic_files, "replacing", with_a_second_writer)
    first = encode_shard(path, source, items, codec, batch_size=3, max_seconds=None)
    assert seen and first["encoded_items"] == 1 and first["skipped"] == want["skipped"]
    encoded = CountingCodec.encoded
    assert len(encoded) == 2 and encoded[0] == encoded[1]  # each writer encoded the good item
    assert shard_problem(path, read_rows=True) is None
    assert pq.read_table(path).equals(pq.read_table(ref / path.name))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    # a third call finds it whole and encodes nothing
    assert encode_shard(path, source, items, codec) is None and len(CountingCodec.encoded) == 2


def test_a_code_cache_given_as_tokenize_source_says_how_to_train_on_it(reference_cache, tmp_path):
    """A code cache is not audio: tokenize's source names it and the config key to use; that
    advice works; a column of a dataset that holds no audio is a one-line error."""
    cache = reference_cache[0]
    with pytest.raises(UserError, match=r"is a code cache \(cache.json.*cache_dir=<it>"):
        run_tokenize(cache, tmp_path / "again")
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4)
    ds = audio_token_dataset(tok, str(cache), split="all")  # what cache_dir=<cache> does
    assert len(ds) == reference_cache[2]["manifest"]["counts"]["rows"] == 7
    shards = tmp_path / "shards"  # a shard of the cache without its cache.json
    shards.mkdir()
    shutil.copy(cache / "shard-00002-of-00005.parquet", shards)
    with pytest.raises(UserError, match="column 'codes' holds no audio .*set audio_column"):
        open_audio_source(str(shards), audio_column="codes")
