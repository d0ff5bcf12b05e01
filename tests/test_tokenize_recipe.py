"""`tune run llama_mimi_tokenize` as a user runs it: killed with SIGKILL mid-run (between
shards, or inside a shard's write), run again, and the cache is complete, equal to encoding the
files directly, with no file encoded twice; two machines split the work by RANK/WORLD_SIZE."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import torch

from llama_mimi_tt import audio_token_dataset, llama_mimi_tokenizer
from llama_mimi_tt.audio import load_audio, synthetic_audio
from llama_mimi_tt.code_cache import MANIFEST_FILE
from llama_mimi_tt.codec import MimiCodec

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).with_name("tune"))
SECONDS = [0.5, 0.3, 0.6, 0.4]


class _LoggingCodec:
    """The random codec; appends a hash of every waveform to $LMTT_ENCODE_LOG. With
    $LMTT_HOLD_AFTER=n, once n files are encoded, the next batch prints "held after n files"
    and waits until the process is killed: a test stops a run at a known point, whatever the
    speed of the machine."""

    def __init__(self, codec):
        self.codec = codec
        self.num_quantizers, self.codebook_size = codec.num_quantizers, codec.codebook_size
        self.sample_rate, self.frame_rate = codec.sample_rate, codec.frame_rate
        self.encoded = 0

    def encode_batch(self, waves, sample_rate, batch_size=8):
        if waves and self.encoded == int(os.environ.get("LMTT_HOLD_AFTER", "-1")):
            print(f"held after {self.encoded} files", flush=True)
            threading.Event().wait()
        out = self.codec.encode_batch(waves, sample_rate, batch_size=batch_size)
        with open(os.environ["LMTT_ENCODE_LOG"], "a") as f:
            f.writelines(hashlib.sha1(w.numpy().tobytes()).hexdigest() + "\n" for w in waves)
        self.encoded += len(waves)
        return out


def quick_logging_codec(path="random", num_quantizers=4, device="cpu", seed=0):
    """The logging codec around a random Mimi that fits its codebooks on 2 s of audio (not
    20 s: quicker, and its codes are still diverse)."""
    torch.set_num_threads(1)  # small convolutions on a shared machine
    return _LoggingCodec(MimiCodec.random(num_quantizers=num_quantizers, seed=seed, fit_seconds=2))


def _tune(source, out, log, prefix=None, **env):
    """``tune run llama_mimi_tokenize`` (or ``prefix`` + its arguments) with a logging codec;
    ``env``: its hooks' variables, RANK and WORLD_SIZE."""
    cmd = (prefix or [TUNE, "run", "llama_mimi_tokenize"]) + ["--config", "tokenize"]
    cmd += [f"source={source}"]
    cmd += [f"output_dir={out}", "codec._component_=tests.test_tokenize_recipe.quick_logging_codec"]
    cmd += ["codec.path=random", "num_quantizers=4", "shard_size=1", "batch_size=1"]
    env = dict(os.environ, LMTT_ENCODE_LOG=str(log), OMP_NUM_THREADS="1", **env)
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_tune_run_killed_then_resumed(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, s in enumerate(SECONDS):
        sf.write(audio / f"u{i}.wav", synthetic_audio(s, 22050, seed=i)[0].numpy(), 22050)
    (audio / "broken.wav").write_bytes(b"RIFF....WAVE garbage")
    out, log = tmp_path / "cache", tmp_path / "encoded.log"

    # 1. killed (SIGKILL, no cleanup) while it encodes its second file: shard 0 is broken.wav
    # alone (no codes), shard 1 is u0.wav, written; shard 2 (u1.wav) is being encoded
    proc = _tune(audio, out, log, LMTT_HOLD_AFTER="1")
    watchdog = threading.Timer(240, proc.kill)  # a run that hangs fails the test
    watchdog.start()
    output = ""
    for line in proc.stdout:
        output += line
        if line.endswith("held after 1 files\n"):
            break
    watchdog.cancel()
    proc.send_signal(signal.SIGKILL)
    output += proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL and "held after 1 files" in output, output
    done_at_kill = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert done_at_kill == ["shard-00000-of-00005.parquet", "shard-00001-of-00005.parquet"]
    assert not (out / MANIFEST_FILE).exists()
    killed_log = log.read_text().split()
    assert len(killed_log) == 1
    log.unlink()

    # 2. the same command again finishes the job, and only the job that was left
    proc = _tune(audio, out, log)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert f"{len(done_at_kill)} already done, {5 - len(done_at_kill)} to encode" in output
    assert "code cache complete" in output and "skipped 1" in output
    resumed_log = log.read_text().split()
    # Shard 0 is broken.wav (skipped, never encoded); shard k >= 1 is u{k-1}.wav, and with
    # shard_size=1 and batch_size=1 the killed run logged them in shard order.
    finished = [killed_log[int(n[6:11]) - 1] for n in done_at_kill if n[6:11] != "00000"]
    assert len(resumed_log) == len(set(resumed_log)) == len(SECONDS) - len(finished)
    assert not set(finished) & set(resumed_log)  # finished work is never redone
    assert len(set(finished) | set(resumed_log)) == len(SECONDS)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    info = json.loads((out / MANIFEST_FILE).read_text())
    assert info["counts"]["encoded_items"] == len(SECONDS) and info["counts"]["skipped"] == 1
    assert info["skipped_by_reason"] == {"unreadable": 1}

    # 3. the cache holds exactly the codes of encoding each file directly
    codec = quick_logging_codec().codec
    files = sorted(audio.glob("u*.wav"))
    rows = {}
    for shard in sorted(out.glob("shard-*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            rows[r["id"]] = r
    assert sorted(rows) == [f.stem for f in files]
    for f in files:
        direct = codec.encode(load_audio(f, 24000), 24000)
        r = rows[f.stem]
        stored = np.asarray(r["codes"], dtype=np.int64).reshape(4, r["num_frames"])
        assert np.array_equal(stored, direct.numpy()), f
        assert r["path"] == str(f.resolve()) and abs(r["duration"] - sf.info(f).duration) < 1e-3
    assert len({c for r in rows.values() for c in r["codes"]}) > 50  # diverse codes

    # 4. and reads as a dataset
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4)
    ds = audio_token_dataset(tok, str(out), split="all", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(SECONDS)


# the recipe as `tune run` runs it, with os.replace killing the process (SIGKILL: no cleanup)
# when it is about to rename shard 2's finished temporary into place
KILLED_IN_A_WRITE = """
import os, runpy, signal, sys
real = os.replace
def replace(src, dst):
    if str(dst).endswith("shard-00002-of-00005.parquet"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
sys.argv = ["llama_mimi_tokenize"] + sys.argv[1:]
runpy.run_module("llama_mimi_tokenize", run_name="__main__")
"""


def _write_audio(folder: Path, seconds) -> None:
    folder.mkdir()
    for i, s in enumerate(seconds):
        sf.write(folder / f"u{i}.wav", synthetic_audio(s, 16000, seed=i)[0].numpy(), 16000)


def test_killed_inside_a_shard_write_then_rerun_finishes_every_shard(tmp_path):
    """SIGKILL with shard 2 whole under its temporary name, not yet renamed: the temporary
    stays, blocks nothing, and the rerun (its owner) removes it, encodes what is missing and
    exits 0 with a complete cache.json."""
    audio, out, log = tmp_path / "audio", tmp_path / "cache", tmp_path / "encoded.log"
    _write_audio(audio, [0.3] * 5)
    prefix = [sys.executable, "-c", KILLED_IN_A_WRITE]
    proc = _tune(audio, out, log, prefix=prefix)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, output
    left = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and left[0].startswith(".shard-00002-of-00005.parquet.tmp-"), left
    assert sorted(p.name for p in out.glob("shard-*")) == [
        f"shard-0000{k}-of-00005.parquet" for k in (0, 1)
    ]
    log.unlink()

    proc = _tune(audio, out, log)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "2 already done, 3 to encode" in output and "code cache complete" in output
    assert len(log.read_text().split()) == 3  # shards 2, 3, 4: one file each
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    info = json.loads((out / MANIFEST_FILE).read_text())
    assert info["complete"] and info["counts"]["encoded_items"] == 5
    assert info["shards"] == sorted(p.name for p in out.glob("shard-*.parquet"))


def test_two_machines_split_the_work_by_rank(tmp_path):
    """Two `tune run llama_mimi_tokenize` with RANK=0/1 WORLD_SIZE=2 (what two machines are
    given) on one output_dir: each encodes its own shards, no file is encoded twice, both exit
    0 and the cache is whole (written by the later of the two)."""
    audio, out = tmp_path / "audio", tmp_path / "cache"
    _write_audio(audio, [0.3] * 6)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_tune(audio, out, log, RANK=str(r), WORLD_SIZE="2") for r, log in enumerate(logs)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for r, o in enumerate(outputs):
        assert f"rank {r}: 3 of 6 shards are mine, 0 already done, 3 to encode" in o, o
    encoded = [log.read_text().split() for log in logs]
    assert [len(e) for e in encoded] == [3, 3] and len(set(encoded[0]) | set(encoded[1])) == 6
    info = json.loads((out / MANIFEST_FILE).read_text())
    assert info["complete"] and info["counts"]["encoded_items"] == 6
