"""Two "nodes" on one machine: two separate ``tune run --nnodes 2 --node_rank R`` launches
(torchrun, c10d rendezvous on a free local port, gloo), as two hosts of a cluster would run them.

- llama_mimi_full: the two nodes' losses equal one process's (the same global batches); one node
  killed with SIGKILL while it is held after a known step's checkpoint ends the other node's
  launch too (torchrun's agent notices; no process is left behind), and both launches resumed
  give the uninterrupted run's losses, step by step.
- llama_mimi_tokenize: the cache the two nodes write equals one process's.

Run: ``.venv/bin/python -m pytest tests/test_multinode.py -q`` (slow: see the markers).
"""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from llama_mimi_tt.audio import synthetic_audio
from llama_mimi_tt.code_cache import MANIFEST_FILE, write_code_cache
from scripts.tiny_base import write_tiny_base_llama
from tests.test_recipes import (
    TUNE,
    kill_tree,
    learnable_utts,
    losses_from_log,
    overrides,
    process_tree,
    tune_run,
)

REPO = Path(__file__).resolve().parents[1]
# 4 epochs of 2 steps per rank (12 utterances, batch 2 on each of 2 ranks); a checkpoint at
# step 3 (mid-epoch) and at each epoch's end
TRAIN = dict(epochs=4, batch_size=2, save_every_n_steps=3, **{"dataset.packed": True})
HOLD_AT_STEP = 3
NODE_TIMEOUT_S = 300  # a launch that takes longer has hung

# A recipe module (run by `tune run` from the work folder) that holds its process after the
# checkpoint of step $HOLD_AT_STEP is complete, until it is killed: the "node" fails at a known
# step, whatever the speed of the machine.
HELD_RECIPE = """
import os, sys, threading
from pathlib import Path

from torchtune import config

import llama_mimi_full
from llama_mimi_tt.recipe_config import run_recipe


class HeldAfterCheckpoint(llama_mimi_full.LlamaMimiFinetuneRecipe):
    def save_checkpoint(self, hf):
        super().save_checkpoint(hf)
        if self.global_step == int(os.environ.get("HOLD_AT_STEP", "-1")):
            Path(os.environ["HOLD_MARKER"]).write_text(str(os.getpid()))
            threading.Event().wait()


@config.parse
def recipe_main(cfg):
    llama_mimi_full.train(cfg, HeldAfterCheckpoint)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_full", llama_mimi_full.OPTIONAL_KEYS))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(args, node_rank: int, port: int):
    """``tune run`` of one node of two (one process each), c10d rendezvous on ``port``. Node 0
    hosts the rendezvous store, as the endpoint's host does on a cluster (on one machine both
    nodes match 127.0.0.1, and the first to start would host it)."""
    rdzv = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
    rdzv += ["--rdzv_id", f"test{port}", "--node_rank", str(node_rank)]
    rdzv += ["--rdzv_conf", f"is_host={int(node_rank == 0)}"]
    return [TUNE, "run", "--nnodes", "2", "--nproc_per_node", "1", *rdzv, *args]


def start_nodes(args, cwd, log_prefix: Path, env=None):
    """Both nodes' launches, each in a session of its own, on a fresh port."""
    port = free_port()
    procs = []
    for r in range(2):
        log = open(f"{log_prefix}.node{r}.log", "w")
        procs.append(
            subprocess.Popen(
                node_cmd(args, r, port),
                cwd=cwd,
                env={**os.environ, "OMP_NUM_THREADS": "1", **((env or [{}, {}])[r])},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
    return procs


def wait_nodes(procs, log_prefix: Path):
    for r, p in enumerate(procs):
        try:
            p.wait(timeout=NODE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)
            raise
        log = Path(f"{log_prefix}.node{r}.log").read_text()
        assert p.returncode == 0, f"node {r} failed:\n{log[-4000:]}"


def run_nodes(args, cwd, log_prefix: Path, env=None):
    procs = start_nodes(args, cwd, log_prefix, env)
    try:
        wait_nodes(procs, log_prefix)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    return [Path(f"{log_prefix}.node{r}.log").read_text() for r in range(2)]


# ---- training -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("multinode")
    write_code_cache(d / "codes", learnable_utts(), num_quantizers=4, shard_size=4)
    write_tiny_base_llama(d / "base")
    (d / "held_llama_mimi_full.py").write_text(HELD_RECIPE)
    return d


def train_args(workdir, out, recipe="llama_mimi_full", **extra):
    return [recipe, "--config", "tiny_full"] + overrides(workdir, out, **{**TRAIN, **extra})


@pytest.fixture(scope="module")
def two_nodes(workdir):
    """The uninterrupted two-node run."""
    out = workdir / "two_nodes"
    logs = run_nodes(train_args(workdir, out), workdir, workdir / "two_nodes")
    return out, logs


@pytest.mark.slow
def test_two_nodes_train_as_one_process(workdir, two_nodes):
    out, logs = two_nodes
    single = workdir / "single"
    # one process, batch 4 == two nodes of one process, batch 2 each: the same global batches
    tune_run(train_args(workdir, single, batch_size=4), cwd=workdir)
    a, b = losses_from_log(single), losses_from_log(out)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    diffs = [abs(x - y) for (_, x), (_, y) in zip(a, b)]
    print(
        f"two nodes vs one process: final loss {b[-1][1]:.6f} vs {a[-1][1]:.6f}, max diff "
        f"{max(diffs):.1e}"
    )
    assert max(diffs) < 1e-4, (a, b)
    state = json.loads((out / "step_8" / "recipe_state.json").read_text())
    assert state["must_match"]["world_size"] == 2
    # rank 0 alone read the base checkpoint (and sent it to the other rank)
    assert sum("Base checkpoint: added 8194 audio rows" in log for log in logs) == 1


@pytest.mark.slow
def test_a_killed_node_stops_the_other_and_both_resume_exactly(workdir, two_nodes):
    reference, _ = two_nodes
    out = workdir / "killed"
    marker = workdir / "held.pid"
    held = train_args(workdir, out, recipe="held_llama_mimi_full")
    env = [{}, {"HOLD_AT_STEP": str(HOLD_AT_STEP), "HOLD_MARKER": str(marker)}]
    procs = start_nodes(held, workdir, workdir / "killed", env)
    try:
        deadline = time.time() + NODE_TIMEOUT_S
        while not marker.exists():  # node 1 holds after step 3's checkpoint, until killed
            assert all(p.poll() is None for p in procs), "a node ended before step 3"
            assert time.time() < deadline, "node 1 never reached step 3"
            time.sleep(0.05)
        assert (out / f"step_{HOLD_AT_STEP}" / "recipe_state.json").is_file()
        survivors = process_tree(procs[0].pid)  # node 0's agent and worker
        killed = process_tree(procs[1].pid)
        kill_tree(procs[1].pid)
        # node 0's worker loses its peer in the next collective; its agent ends the launch
        procs[0].wait(timeout=NODE_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    assert procs[0].returncode != 0
    gone, alive = psutil.wait_procs(survivors + killed, timeout=30)
    assert not alive, f"left behind: {alive}"
    node0 = (workdir / "killed.node0.log").read_text()
    assert max(s for s, _ in losses_from_log(out)) <= HOLD_AT_STEP + 1
    print(
        f"node 0's launch ended with status {procs[0].returncode}: "
        + next((ln for ln in node0.splitlines() if "Error" in ln), "?")
    )

    # both nodes again, resumed: the uninterrupted run's losses, step by step
    logs = run_nodes(
        train_args(workdir, out, resume_from_checkpoint=True), workdir, workdir / "resumed"
    )
    assert any(f"resuming from {out}/step_{HOLD_AT_STEP}" in log for log in logs)
    ref, got = losses_from_log(reference), losses_from_log(out)
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=0, atol=1e-6)


# ---- tokenizing ---------------------------------------------------------------------------------
def tokenize_args(audio: Path, out: Path):
    args = ["llama_mimi_tokenize", "--config", "tokenize", f"source={audio}", f"output_dir={out}"]
    args += ["codec._component_=tests.test_tokenize_recipe.quick_logging_codec"]
    return args + ["codec.path=random", "num_quantizers=4", "shard_size=2", "batch_size=1"]


def cache_rows(out: Path):
    rows = {}
    for shard in sorted(out.glob("shard-*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            rows[r["id"]] = (shard.name, r["num_frames"], r["codes"])
    return rows


@pytest.mark.slow
def test_two_nodes_tokenize_the_cache_of_one_process(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(8):
        sf.write(audio / f"u{i}.wav", synthetic_audio(0.3, 16000, seed=i)[0].numpy(), 16000)
    (audio / "broken.wav").write_bytes(b"RIFF....WAVE garbage")
    one, two = tmp_path / "one", tmp_path / "two"
    env = {"LMTT_ENCODE_LOG": str(tmp_path / "one.log")}
    r = subprocess.run(
        [TUNE, "run", *tokenize_args(audio, one)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    logs = [{"LMTT_ENCODE_LOG": str(tmp_path / f"node{n}.log")} for n in range(2)]
    outputs = run_nodes(tokenize_args(audio, two), REPO, tmp_path / "two", env=logs)
    # each node encoded its half of the shards (5 shards: 3 and 2), no file twice
    encoded = [(tmp_path / f"node{n}.log").read_text().split() for n in range(2)]
    assert sorted(len(e) for e in encoded) == [4, 4]
    assert not set(encoded[0]) & set(encoded[1])
    assert sum("code cache complete" in o for o in outputs) >= 1

    a, b = cache_rows(one), cache_rows(two)
    assert sorted(a) == sorted(b) == [f"u{i}" for i in range(8)]
    assert a == b  # same shard, frames and codes for every file
    assert len({c for _, _, codes in a.values() for c in codes}) > 50  # diverse codes
    ma, mb = (json.loads((o / MANIFEST_FILE).read_text()) for o in (one, two))
    assert ma["counts"] == mb["counts"] and ma["counts"]["skipped"] == 1
    assert ma["skipped_by_reason"] == mb["skipped_by_reason"] == {"unreadable": 1}
