"""Start-up time and memory of the training data against the size of the corpus.

Code caches of 10^3 .. 10^6 random 10-second utterances (Q = 4, 1,000 rows a shard, written
with the library's own shard writer) are opened as ``1B_full`` opens its training data:
``audio_token_dataset(task=a2a, packed=True, split=train, val_fraction=0.005)``, max_seq_len
1024, then a ``PermutationSampler`` loader (batch 16, shuffled) gives its first batch. Each
measurement runs in a fresh process (start-up seconds; resident memory added from before the
dataset is built to after the first batch; peak):

- ours, first start: computes the pack index (once per cache and settings);
- ours, index present: what every rank of every later run pays;
- peer, in-memory packing: torchtune's ``PackedDataset`` over the same samples (the packing
  that ``packed: True`` did before the index: every pack built in memory at start-up), up to
  the sizes where it is affordable here;
- streaming: ``streaming: True``, time to the first batch.

It prints per-hour figures and their extrapolation to the paper's 240,000 hours next to the
goals (start-up <= 30 s and <= 1 GB added per rank with the index present; the index built in
<= 10 minutes on one core), and the packs/s a loader reads in shuffled order.

    python bench/bench_scale.py                      # 10^3 .. 10^6 (about 15 minutes, 2 GB disk)
    python bench/bench_scale.py --sizes 1000 10000   # a quick look
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAPER_HOURS = 240_000
SECONDS = 10.0
Q, L = 4, 1024
SHARD = 1000
GOALS = {"startup_s": 30.0, "added_mb": 1024.0, "build_s": 600.0}


def write_cache(root: Path, n: int) -> Path:
    """A finished code cache of ``n`` random utterances, shard by shard (bounded memory)."""
    from llama_mimi_tt.code_cache import (
        finalize_cache,
        shard_name,
        shard_summary,
        start_cache,
        write_shard,
    )
    from llama_mimi_tt.vocab import MIMI_FRAME_RATE

    frames = int(SECONDS * MIMI_FRAME_RATE)
    num_shards = -(-n // SHARD)
    start_cache(root, num_shards=num_shards, shard_size=SHARD, num_quantizers=Q, num_items=n)
    g = np.random.default_rng(0)
    for k in range(num_shards):
        m = min(SHARD, n - k * SHARD)
        codes = g.integers(0, 2048, (m, Q, frames), dtype=np.uint16)
        rows = [
            dict(
                id=f"utt{k * SHARD + i:09d}",
                segment=0,
                partial=False,
                codes=codes[i],
                num_frames=frames,
                text=None,
                path=f"/audio/{k * SHARD + i}.flac",
                start=0.0,
                duration=SECONDS,
                source_duration=SECONDS,
            )
            for i in range(m)
        ]
        write_shard(root / shard_name(k, num_shards), rows, shard_summary(m, rows))
    assert finalize_cache(root) is not None
    return root


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def anon_mb() -> float:
    """Private (anonymous) resident memory: what a rank adds to its host, unlike the pages of
    memory-mapped files, which the ranks of a node share and the kernel can drop."""
    from llama_mimi_tt.training import host_memory_gib

    return host_memory_gib().get("rss_anon", float("nan")) * 1024


def child(mode: str, cache: str) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchtune.data import padded_collate_packed
    from torchtune.datasets import PackedDataset

    from llama_mimi_tt import audio_token_dataset, llama_mimi_tokenizer
    from llama_mimi_tt.training import PermutationSampler

    torch.set_num_threads(1)
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=Q, max_seq_len=L)
    kw = dict(task="a2a", split="train", val_fraction=0.005)
    before, before_anon = rss_mb(), anon_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if mode == "streaming":
        ds = audio_token_dataset(tok, cache, packed=True, streaming=True, **kw)
        loader = StatefulDataLoader(ds, batch_size=16, collate_fn=padded_collate_packed)
    else:
        if mode == "peer":
            samples = audio_token_dataset(tok, cache, packed=False, **kw)
            ds = PackedDataset(samples, max_seq_len=L, padding_idx=tok.pad_id)
        else:
            ds = audio_token_dataset(tok, cache, packed=True, **kw)
        sampler = PermutationSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = StatefulDataLoader(
            ds, batch_size=16, sampler=sampler, collate_fn=padded_collate_packed, drop_last=True
        )
    if mode != "streaming":  # the permutation of this epoch, drawn and held
        order = iter(sampler)
        next(order)
    startup_mb, startup_anon_mb = rss_mb() - before, anon_mb() - before_anon
    if mode != "streaming":
        del order
    it = iter(loader)
    batch = next(it)
    startup, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = rss_mb()
    out = {
        "startup_s": startup,
        "cpu_s": cpu,
        "startup_mb": startup_mb,
        "startup_anon_mb": startup_anon_mb,
        "added_mb": after - before,
        "anon_added_mb": anon_mb() - before_anon,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "packs": len(ds) if mode != "streaming" else None,
    }
    assert batch["tokens"].shape == (16, L)
    if mode == "index":  # reading speed in shuffled order, as a training loop asks
        t0, cpu0 = time.perf_counter(), time.process_time()
        n = 0
        for _ in range(20):
            n += len(next(it)["tokens"])
        out["packs_per_s"] = n / (time.perf_counter() - t0)
        out["packs_per_cpu_s"] = n / (time.process_time() - cpu0)
        out["added_after_reading_mb"] = rss_mb() - before
        out["anon_added_after_reading_mb"] = anon_mb() - before_anon
        index = Path(cache) / "pack_index"
        out["index_bytes"] = sum(f.stat().st_size for f in index.rglob("*") if f.is_file())
    return out


def measure(mode: str, cache: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(cache)],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{mode} on {cache} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(sizes, peer_max: int, workdir: Path) -> list:
    rows = []
    for n in sizes:
        hours = n * SECONDS / 3600
        cache = workdir / f"cache_{n}"
        t0 = time.perf_counter()
        write_cache(cache, n)
        print(
            f"\n{n:,} utterances ({hours:,.1f} h): cache written in {time.perf_counter() - t0:.0f} s"
        )
        row = {"utterances": n, "hours": hours}
        row["first"] = measure("index", cache)  # computes the index
        row["present"] = measure("index", cache)
        row["streaming"] = measure("streaming", cache)
        row["peer"] = measure("peer", cache) if n <= peer_max else None
        for k in ("first", "present", "streaming", "peer"):
            if row[k]:
                print(
                    f"  {k:9s} start-up {row[k]['startup_s']:7.2f} s ({row[k]['cpu_s']:.2f} s CPU)  "
                    f"added {row[k]['added_mb']:7.1f} MB  peak {row[k]['peak_mb']:7.0f} MB"
                )
        print(
            f"  reading: {row['present']['packs_per_s']:.0f} packs/s, "
            f"{row['present']['packs_per_cpu_s']:.0f} per CPU second (shuffled, one process)"
        )
        rows.append(row)
        shutil.rmtree(cache)
    return rows


def report(rows) -> str:
    """Markdown: the table, growth per hour, the extrapolation next to the goals. Times are
    CPU seconds of the process (what one core spends; wall time in brackets: the machine may
    be shared)."""

    def t(m):
        return f"{m['cpu_s']:.2f} s ({m['startup_s']:.2f})"

    lines = [
        "| utterances | hours | first start (computes the index) | start-up, index present | "
        "memory added by start-up, index present: RSS (private) | ... and by the first batch | "
        "streaming, first batch | in-memory packing (peer) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peer = r["peer"]
        lines.append(
            f"| {r['utterances']:,} | {r['hours']:,.1f} | {t(r['first'])} | {t(r['present'])} | "
            f"{r['present']['startup_mb']:.1f} MB ({r['present']['startup_anon_mb']:.1f} MB) | "
            f"{r['present']['added_mb']:.0f} MB ({r['present']['anon_added_mb']:.0f} MB) | "
            f"{t(r['streaming'])} | "
            + (f"{t(peer)}, {peer['added_mb']:.0f} MB |" if peer else "not run |")
        )
    big = rows[-1]
    prev = rows[-2] if len(rows) > 1 else None

    def at_paper_scale(kind, key):
        """The largest size's figure plus its growth per hour (between the two largest sizes)
        times the hours still to go."""
        if prev is None:
            per_hour = big[kind][key] / big["hours"]
        else:
            per_hour = (big[kind][key] - prev[kind][key]) / (big["hours"] - prev["hours"])
        return per_hour, big[kind][key] + max(per_hour, 0.0) * (PAPER_HOURS - big["hours"])

    build_h, build = at_paper_scale("first", "cpu_s")
    start_h, start = at_paper_scale("present", "cpu_s")
    mem_h, mem = at_paper_scale("present", "startup_mb")
    anon_h, anon = at_paper_scale("present", "startup_anon_mb")
    index_gb = big["present"]["index_bytes"] / big["hours"] * PAPER_HOURS / 1e9
    lines += [
        "",
        f"Growth per hour of audio (from {prev['hours'] if prev else 0:,.0f} to "
        f"{big['hours']:,.0f} h): first start {build_h * 1000:.2f} ms/h; with the index present, "
        f"start-up {start_h * 1000:.3f} ms/h, memory at start-up {mem_h * 1024:.2f} KB/h, of it "
        f"private {anon_h * 1024:.2f} KB/h (the sampler's permutation: 4 bytes a pack, "
        f"{4 * big['present']['packs'] / big['hours'] / 1024:.2f} KB/h). The index takes "
        f"{big['present']['index_bytes'] / big['hours'] / 1024:.1f} KB/h on disk.",
        "",
        f"| at {PAPER_HOURS:,} h, extrapolated linearly | ours | goal |",
        "|---|---:|---:|",
        f"| computing the index, once, one core | {build / 60:.1f} min | "
        f"<= {GOALS['build_s'] / 60:.0f} min |",
        f"| start-up per rank, index present | {start:.1f} s | <= {GOALS['startup_s']:.0f} s |",
        f"| memory added per rank by start-up, index present: private | {anon:.0f} MB | "
        f"<= {GOALS['added_mb']:.0f} MB |",
        f"| ... resident, with mapped pages | {mem:.0f} MB | |",
        f"| ... and by reading (bounded: 16 open shards, 4 decoded row groups; measured at "
        f"{big['utterances']:,}) | {big['present']['anon_added_after_reading_mb'] - big['present']['startup_anon_mb']:.0f} MB | |",
        f"| the index on disk (mapped, shared by a node's ranks) | {index_gb:.1f} GB | |",
    ]
    peers = [r for r in rows if r["peer"]]
    if peers:
        p = peers[-1]
        s = PAPER_HOURS / p["hours"]
        lines.append(
            f"\nIn-memory packing (peer) at {p['utterances']:,} utterances: "
            f"{p['peer']['cpu_s']:.1f} s and {p['peer']['added_mb']:.0f} MB, "
            f"{p['peer']['cpu_s'] / p['present']['cpu_s']:.0f}x the indexed start-up; at "
            f"{PAPER_HOURS:,} h (x{s:.0f}): {p['peer']['cpu_s'] * s / 3600:.1f} h and "
            f"{p['peer']['added_mb'] * s / 1024:.0f} GB on every rank."
        )
    lines.append(
        f"Reading packs in shuffled order at {big['utterances']:,} utterances: "
        f"{big['present']['packs_per_cpu_s']:.0f} packs per CPU second "
        f"({big['present']['packs_per_cpu_s'] * L:,.0f} tokens; "
        f"{big['present']['packs_per_s']:.0f} packs/s of wall time here); memory added after 21 "
        f"batches {big['present']['added_after_reading_mb']:.0f} MB (private "
        f"{big['present']['anon_added_after_reading_mb']:.0f} MB: the reader keeps at most 16 "
        "open shards and 4 decoded row groups)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--peer-max", type=int, default=10_000, help="largest size for the peer")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        sys.exit(0)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        rows = main(args.sizes, args.peer_max, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print("\n" + report(rows))
