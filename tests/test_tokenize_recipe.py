"""`tune run llama_mimi_tokenize` as a user runs it: killed with SIGKILL mid-run, run again,
and the cache is complete, equal to encoding the files directly, with no file encoded twice."""

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
    """The random codec; appends a hash of every waveform to $LMTT_ENCODE_LOG. Two hooks let
    a test stop a run at a known point, whatever the speed of the machine:

    - $LMTT_HOLD_AFTER=n: once n files are encoded, the next batch prints "held after n files"
      and waits until the process is killed;
    - $LMTT_MEET=fifo:r (or :w): the first batch waits until another process opens the named
      pipe from the other end (its own first batch): two runs meet with their first shard
      each claimed and unfinished.
    """

    def __init__(self, codec):
        self.codec = codec
        self.num_quantizers, self.codebook_size = codec.num_quantizers, codec.codebook_size
        self.sample_rate, self.frame_rate = codec.sample_rate, codec.frame_rate
        self.encoded = 0

    def encode_batch(self, waves, sample_rate, batch_size=8):
        if waves and self.encoded == 0 and os.environ.get("LMTT_MEET"):
            fifo, end = os.environ["LMTT_MEET"].rsplit(":", 1)
            open(fifo, end).close()  # blocks until the other end is opened
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


def _tune(source, out, log, **env):
    """``tune run llama_mimi_tokenize`` with a logging codec; ``env``: its hooks' variables."""
    cmd = [TUNE, "run", "llama_mimi_tokenize", "--config", "tokenize", f"source={source}"]
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
    # alone (no codes), shard 1 is u0.wav, written; shard 2 (u1.wav) is claimed, unwritten
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


def test_two_processes_on_one_output_dir_split_the_work(tmp_path):
    """Two `tune run llama_mimi_tokenize` started together on one output_dir: through the
    shards' claim files each encodes a part, no file is encoded twice, the cache is whole."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(6):
        sf.write(audio / f"u{i}.wav", synthetic_audio(0.3, 16000, seed=i)[0].numpy(), 16000)
    out = tmp_path / "cache"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # the two meet in their first batches: neither finishes a file before the other has
    # claimed one, so each encodes at least one, and the one that claimed shard 0 first still
    # holds it when the other comes to it
    meet = tmp_path / "meet.fifo"
    os.mkfifo(meet)
    procs = [_tune(audio, out, log, LMTT_MEET=f"{meet}:{end}") for log, end in zip(logs, "rw")]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()  # after a timeout; a process that has ended is left as it is
    assert [p.returncode for p in procs] == [0, 0], outputs
    encoded = [log.read_text().split() if log.exists() else [] for log in logs]
    assert all(len(e) >= 1 for e in encoded), outputs  # both worked
    assert len(encoded[0]) + len(encoded[1]) == len(set(encoded[0]) | set(encoded[1])) == 6
    assert any("another process" in o and "is encoding it" in o for o in outputs)
    info = json.loads((out / MANIFEST_FILE).read_text())
    assert info["counts"]["encoded_items"] == 6 and not list(out.glob("*.claim"))
