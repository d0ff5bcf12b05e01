"""Peak memory of tokenizing a long file against a short one: blockwise reading bounds it.

``tune run llama_mimi_tokenize`` reads each file in blocks (``llama_mimi_tt.audio.open_audio``),
so encoding a file should cost the memory of ``max_seconds`` and the batch, never of the file.
Each case runs the recipe's ``tokenize(cfg)`` (``configs/tokenize.yaml``, ``codec.path=random``,
``max_seconds=60``, Q = 8, CPU) on a folder holding one 8 kHz mono FLAC (a -30 dBFS tone under
-50 dBFS noise), in its own process; its peak resident memory is ``ru_maxrss``:

- ``truncate``: a 2-hour file against a 2-minute one (both encode their first 60 s);
- ``split``: a 20-minute file (20 pieces) against a 2-minute one (2 pieces).

``--codec stub`` swaps Mimi for a stub that returns zero codes of the right shape (the
recipe's path is otherwise the same): the reading, cutting and batching are then all that is
measured, and the 20-minute case takes seconds instead of a quarter of an hour on 2 cores.

The peer is the same cases at another commit (``--before``, default the merge base with main,
exported with ``git archive`` into a temporary folder, so no worktree is touched), run in the
same session. The files are written to a temporary folder and removed.

    .venv/bin/python bench/bench_long_files.py            # print
    .venv/bin/python bench/bench_long_files.py --write    # and write bench/RESULTS.md's section
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 8000
MAX_SECONDS = 60
CASES = [  # (name, rule, seconds)
    ("2 min, truncate", "truncate", 120),
    ("2 h, truncate", "truncate", 7200),
    ("2 min, split", "split", 120),
    ("20 min, split", "split", 1200),
]


def write_long_flac(path: Path, seconds: int, seed: int = 0) -> None:
    """A tone under low noise, written a minute at a time (never whole in memory)."""
    g = np.random.default_rng(seed)
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1, format="FLAC") as f:
        for start in range(0, seconds * SAMPLE_RATE, 60 * SAMPLE_RATE):
            n = min(60 * SAMPLE_RATE, seconds * SAMPLE_RATE - start)
            t = (start + np.arange(n)) / SAMPLE_RATE
            tone = 0.03 * np.sin(2 * np.pi * 220.0 * t)
            f.write((tone + 0.003 * g.standard_normal(n)).astype(np.float32))


class StubCodec:
    """Zero codes ``[Q, ceil(seconds * 12.5)]`` for each waveform: no encoder is run."""

    sample_rate, frame_rate, codebook_size, device = 24000, 12.5, 2048, "cpu"

    def __init__(self, num_quantizers: int = 8, **_):
        self.num_quantizers = num_quantizers

    def encode_batch(self, waves, sample_rate, batch_size=1):
        import torch

        return [
            torch.zeros(self.num_quantizers, -(-len(w) // 1920), dtype=torch.long) for w in waves
        ]


def stub_codec(path=None, num_quantizers=8, device="cpu", seed=0):
    """A ``_component_`` for the tokenize config."""
    return StubCodec(num_quantizers)


def child(tree: str, source: str, output_dir: str, rule: str, codec: str) -> None:
    """One case in this process: tokenize ``source`` with the code of ``tree``."""
    sys.path[:0] = [tree, str(Path(tree) / "recipes")]
    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    import llama_mimi_tokenize

    import llama_mimi_tt

    cfg = OmegaConf.load(Path(tree) / "configs" / "tokenize.yaml")
    cfg = OmegaConf.merge(
        cfg,
        dict(source=source, output_dir=output_dir, num_quantizers=8),
        dict(max_seconds=MAX_SECONDS, long_files=rule),
        {"codec": {"path": "random"}},
    )
    if codec == "stub":
        sys.path.append(str(ROOT / "bench"))
        cfg.codec._component_ = "bench_long_files.stub_codec"
    assert Path(llama_mimi_tt.__file__).is_relative_to(tree), llama_mimi_tt.__file__
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    summary = llama_mimi_tokenize.tokenize(cfg)
    info = summary["manifest"]
    print(
        "RESULT "
        + json.dumps(
            dict(
                peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                before_mb=before / 1024,
                wall_s=time.perf_counter() - t0,
                rows=info["counts"]["rows"],
                seconds=info["counts"]["seconds"],
            )
        )
    )


def run_case(tree: Path, source: Path, out: Path, rule: str, codec: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(tree), str(source), str(out), rule, codec]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("BENCH_THREADS", "2"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def export_tree(commit: str, dest: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=None, help="peer commit (default: merge base)")
    parser.add_argument("--no-before", action="store_true", help="measure only this tree")
    parser.add_argument("--codec", choices=["random", "stub"], default="random")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    args = parser.parse_args()
    before = (
        args.before
        or subprocess.run(
            ["git", "-C", str(ROOT), "merge-base", "HEAD", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    short = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", before], capture_output=True, text=True
    ).stdout.strip()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    now = f"{head}{' + uncommitted changes' if dirty else ''}"
    load = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        trees = {"now": ROOT}
        if not args.no_before:
            trees["before"] = export_tree(before, d / "before")
        for name, rule, seconds in CASES:
            src = d / f"audio_{seconds}"
            if not src.exists():
                src.mkdir()
                write_long_flac(src / "long.flac", seconds)
                mb = (src / "long.flac").stat().st_size / 1e6
                print(f"wrote {seconds} s of 8 kHz FLAC ({mb:.1f} MB)", flush=True)
            for label, tree in trees.items():
                out = d / f"out_{label}_{rule}_{seconds}"
                r = run_case(tree, src, out, rule, args.codec)
                results[(name, label)] = r
                print(
                    f"{name:18s} {label:6s} peak {r['peak_mb']:7.0f} MB "
                    f"(before tokenize {r['before_mb']:5.0f} MB), {r['rows']} rows, "
                    f"{r['seconds']:.0f} s encoded, {r['wall_s']:.0f} s",
                    flush=True,
                )
    labels = [lb for lb in ("before", "now") if (CASES[0][0], lb) in results]
    header = "| case | " + " | ".join(f"peak RSS {lb} (MB)" for lb in labels) + " | rows |"
    lines = [header, "|---|" + "---:|" * (len(labels) + 1)]
    for name, _, _ in CASES:
        peaks = " | ".join(f"{results[(name, lb)]['peak_mb']:,.0f}" for lb in labels)
        lines.append(f"| {name} | {peaks} | {results[(name, 'now')]['rows']} |")
    diffs = []
    for long_case, short_case in ((CASES[1][0], CASES[0][0]), (CASES[3][0], CASES[2][0])):
        for lb in labels:
            dmb = results[(long_case, lb)]["peak_mb"] - results[(short_case, lb)]["peak_mb"]
            diffs.append(f"{long_case} minus {short_case}, {lb}: {dmb:+,.0f} MB")
    table = "\n".join(lines)
    print(table)
    print("\n".join(diffs))
    if args.write:
        section = f"## Long files read in blocks (bench_long_files.py --codec {args.codec})"
        text = (
            f"{section}\n\n"
            f"Written by `python bench/bench_long_files.py --codec {args.codec} --write` on "
            f"{time.strftime('%Y-%m-%d')}"
            f": now = {now}, before = {short} (the merge base with main, read whole). "
            f"`tokenize(cfg)` of `tune run llama_mimi_tokenize --config tokenize` with "
            f"codec {'path=random (Mimi, random weights)' if args.codec == 'random' else 'stub (zero codes, no encoder: reading alone)'}, Q = 8, max_seconds={MAX_SECONDS}, CPU, one 8 kHz mono FLAC "
            f"per case (tone + noise), each case in its own process; peak RSS is ru_maxrss "
            f"(torch and the recipe's imports are about 0.8 GB of it). Load average "
            f"{load:.1f} at start on 2 shared cores.\n\n"
            f"{table}\n\n" + "".join(f"- {x}\n" for x in diffs)
        )
        path = ROOT / "bench" / "RESULTS.md"
        old = path.read_text()
        if section in old:
            start = old.index(section)
            end = old.find("\n## ", start + len(section))
            old = old[:start] + old[end + 1 :] if end != -1 else old[:start]
        path.write_text(old.rstrip("\n") + "\n\n" + text)
        print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
    else:
        main()
