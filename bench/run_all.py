"""Runs every benchmark of the project and writes bench/RESULTS.md.

    python bench/run_all.py            # full settings (about 15-25 minutes on a 2-core CPU)
    python bench/run_all.py --quick    # smaller settings, a smoke run
    python bench/run_all.py --only vocab,packing

Each figure sits beside its peer measured in the same run, as a ratio. GPU rows appear when a
CUDA device is present and are marked as such.
"""

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BENCHMARKS = ["vocab", "encode", "packing", "train", "generate", "eval"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )


def fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 1e5:
            return f"{x:,.0f}"
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.1f}"
    return str(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or BENCHMARKS
    rows, failures = [], []
    for name in names:
        t0 = time.perf_counter()
        print(f"== bench_{name}", flush=True)
        try:
            mod = importlib.import_module(f"bench_{name}")
            got = mod.run(quick=args.quick)
        except Exception:
            failures.append((name, traceback.format_exc()))
            print(failures[-1][1], flush=True)
            continue
        for r in got:
            print("  ", {k: fmt(v) for k, v in r.items()}, flush=True)
        rows += got
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
    except OSError:
        commit = "?"
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python bench/run_all.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today()} at commit {commit}.",
        "",
        f"Machine: {machine()}.",
        "",
        "Ratio > 1 means ours is better (faster, or a larger share of real tokens).",
        "",
        "| benchmark | metric | ours | peer | peer measured | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
        lines.append(
            f"| {r['benchmark']} | {r['metric']} | {fmt(r['ours'])} | {fmt(r['peer'])} | "
            f"{r['peer_name']} | {fmt(r['ratio'])}{'x' if r['ratio'] is not None else ''} | {r['goal']} | {met} |"
        )
    notes = [f"- {r['benchmark']}: {r['notes']}" for r in rows if r.get("notes")]
    if notes:
        lines += ["", "Notes:", ""] + notes
    if failures:
        lines += ["", "Benchmarks that failed in this run:", ""]
        lines += [f"- bench_{n}: `{tb.strip().splitlines()[-1]}`" for n, tb in failures]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
