"""Load test of `tune run llama_mimi_serve` on 127.0.0.1: 16 concurrent streaming clients, with
batching on and off (its peer), the server's memory after 200 requests against after 20, and
its peak memory while it refuses audio bombs (10 and 100 hours of FLAC silence) against idle.

    python bench/bench_serve.py            # prints the table
    python bench/bench_serve.py --write    # and puts it in bench/RESULTS.md (its own section)
    python bench/bench_serve.py --bombs-only   # the audio bomb table alone

The server runs as its own process (the serve config: tiny random model, random Mimi, CPU), so
the clients' threads do not share its interpreter. Each client streams a continuation of its
own prompt with its own seed; "first audio" is the arrival of its first audio line.
"""

import argparse
import base64
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

import httpx
import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from llama_mimi_tt.audio import synthetic_audio  # noqa: E402

CLIENTS = 16
SECTION = "## Serving load test (bench/bench_serve.py)"


def prompt_wav(seconds: float, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synthetic_audio(seconds, seed=seed)[0].numpy(), 24000, format="WAV")
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, *overrides):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        tune = Path(sys.executable).parent / "tune"
        cmd = [str(tune), "run", "llama_mimi_serve", "--config", "serve", f"port={self.port}"]
        self.log = open(HERE / f".serve_{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd + list(overrides), stdout=self.log, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                httpx.get(f"{self.url}/health")
                return
            except httpx.TransportError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)

    def close(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self.log.close()
        os.unlink(self.log.name)


def stream_client(url, body, params, out):
    t0 = time.perf_counter()
    first, frames = None, 0
    with httpx.stream(
        "POST", f"{url}/v1/continue/stream", params=params, content=body, timeout=600
    ) as r:
        status = r.status_code
        for line in r.iter_lines():
            ev = json.loads(line)
            if ev["type"] == "audio":
                if first is None:
                    first = time.perf_counter() - t0
                frames += 1
                assert len(base64.b64decode(ev["f32"])) == 1920 * 4
    out.append(dict(status=status, first=first, total=time.perf_counter() - t0, frames=frames))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def load_test(batching: bool, seconds: float, prompt_seconds: float) -> dict:
    server = Server(f"batching={batching}", "max_queue=64", "batch_wait_ms=50")
    try:
        bodies = [prompt_wav(prompt_seconds, seed=i) for i in range(CLIENTS)]
        stream_client(server.url, bodies[0], dict(seconds=0.16), [])  # warm-up
        out = []
        threads = [
            threading.Thread(
                target=stream_client,
                args=(server.url, bodies[i], dict(seconds=seconds, seed=i), out),
            )
            for i in range(CLIENTS)
        ]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - t0
        batches = httpx.get(f"{server.url}/health").json()["batches"] - 1
    finally:
        server.close()
    frames = round(seconds * 12.5)
    assert len(out) == CLIENTS and all(o["status"] == 200 for o in out), out
    assert all(o["frames"] == frames for o in out), [o["frames"] for o in out]
    firsts, totals = [o["first"] for o in out], [o["total"] for o in out]
    return dict(
        batching="on" if batching else "off",
        answered=f"{len(out)}/{CLIENTS}",
        batches=batches,
        first_p50=statistics.median(firsts),
        first_p95=pct(firsts, 95),
        total_p50=statistics.median(totals),
        total_p95=pct(totals, 95),
        wall=wall,
        audio_s_per_s=CLIENTS * seconds / wall,
    )


def memory_test(n_first=20, n_total=200, n_more=400) -> dict:
    """RSS of the server after 20, 200 and 400 requests (streamed, whole and rejected ones):
    growth that stops after warm-up is the allocator; growth that goes on is a leak."""
    server = Server("max_queue=256", "batch_wait_ms=50", "max_prompt_seconds=2")
    try:
        good, too_long = prompt_wav(0.5, seed=1), prompt_wav(3.0, seed=2)

        def one(i):
            if i % 10 == 9:  # a bad request: 422, must leave nothing behind
                r = httpx.post(f"{server.url}/v1/continue", content=too_long, timeout=600)
                assert r.status_code == 422
            elif i % 2:
                r = httpx.post(
                    f"{server.url}/v1/continue", params=dict(seconds=0.16, seed=i),
                    content=good, timeout=600,
                )  # fmt: skip
                assert r.status_code == 200
            else:
                stream_client(server.url, good, dict(seconds=0.16, seed=i, num_samples=2), [])

        def run(start, stop):
            for chunk in range(start, stop, CLIENTS):
                ts = [
                    threading.Thread(target=one, args=(i,))
                    for i in range(chunk, min(chunk + CLIENTS, stop))
                ]
                [t.start() for t in ts]
                [t.join() for t in ts]

        run(0, n_first)
        after_first = rss_mb(server.proc.pid)
        run(n_first, n_total)
        after_total = rss_mb(server.proc.pid)
        run(n_total, n_more)
        after_more = rss_mb(server.proc.pid)
        served = httpx.get(f"{server.url}/health").json()["served"]
    finally:
        server.close()
    return dict(
        after_first=after_first, after_total=after_total, after_more=after_more, served=served
    )


def flac_silence(path: Path, hours: float, sample_rate: int = 8000) -> Path:
    """Hours of 16-bit silence as FLAC (about 0.09 MB an hour): an audio bomb."""
    block, left = np.zeros(sample_rate * 600, np.int16), int(hours * 3600 * sample_rate)
    with sf.SoundFile(path, "w", sample_rate, 1, subtype="PCM_16", format="FLAC") as f:
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    return path


def bomb_test(hours=(10, 100)) -> List[dict]:
    """The server's resident memory while it refuses FLAC bombs (hours of silence under
    max_upload_mb), sampled every 5 ms from before the upload until the answer, against its
    idle memory just before."""
    server = Server()
    rows = []
    try:
        httpx.post(f"{server.url}/v1/continue", content=prompt_wav(0.5, 1), timeout=600)
        for h in hours:
            with tempfile.TemporaryDirectory() as tmp:
                body = flac_silence(Path(tmp) / "bomb.flac", h).read_bytes()
            idle = rss_mb(server.proc.pid)
            peak, done = [idle], threading.Event()

            def sample(peak, done):
                while not done.is_set():
                    peak.append(rss_mb(server.proc.pid))
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample, args=(peak, done))
            sampler.start()
            t0 = time.perf_counter()
            r = httpx.post(f"{server.url}/v1/continue", content=body, timeout=600)
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
            rows.append(
                dict(hours=h, mb=len(body) / 2**20, status=r.status_code, error=r.json()["error"],
                     idle=idle, peak=max(peak), wall=wall)
            )  # fmt: skip
        rows.append(dict(health=httpx.get(f"{server.url}/health").json()["status"]))
    finally:
        server.close()
    return rows


def bomb_table(rows) -> str:
    lines = [
        "Audio bombs (FLAC of 8 kHz silence, under max_upload_mb=10) against the server of "
        "the serve config; RSS sampled every 5 ms during the request:",
        "",
        "| audio | upload | answer | idle RSS | peak RSS | peak - idle | answer in |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows[:-1]:
        lines.append(
            f"| {r['hours']} h | {r['mb']:.2f} MB | {r['status']} {r['error'][:40]}... | "
            f"{r['idle']:.0f} MB | {r['peak']:.0f} MB | {r['peak'] - r['idle']:+.1f} MB | "
            f"{r['wall']:.2f} s |"
        )
    lines += ["", f"/health afterwards: {rows[-1]['health']}.", ""]
    return "\n".join(lines)


def table(rows, mem, seconds, prompt_seconds, load) -> str:
    lines = [
        SECTION,
        "",
        f"{CLIENTS} clients at once on 127.0.0.1, each streaming {seconds:g} s "
        f"({round(seconds * 12.5)} frames) of continuation of its own {prompt_seconds:g} s "
        "prompt and seed; `tune run llama_mimi_serve --config serve` (tiny random model, random "
        f"Mimi, fp32, CPU) in its own process; load average {load:.1f} at start on "
        f"{os.cpu_count()} cores shared with other work. Times in seconds from the request.",
        "",
        "| batching | answered | generations | first audio p50 | first audio p95 | "
        "complete p50 | complete p95 | wall | audio s per s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batching']} | {r['answered']} | {r['batches']} | {r['first_p50']:.2f} | "
            f"{r['first_p95']:.2f} | {r['total_p50']:.2f} | {r['total_p95']:.2f} | "
            f"{r['wall']:.1f} | {r['audio_s_per_s']:.2f} |"
        )
    lines += [
        "",
        f"Memory (server RSS): {mem['after_first']:.0f} MB after 20 requests, "
        f"{mem['after_total']:.0f} MB after 200, {mem['after_more']:.0f} MB after 400 "
        f"({mem['served']} answered 200, the others rejected with 422: prompt too long); "
        "streamed (2 samples) and whole requests, 16 at a time.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = HERE / "RESULTS.md") -> None:
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    new = pattern.sub(lambda m: text.rstrip("\n") + "\n", old) if SECTION in old else None
    if new is None:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--prompt-seconds", type=float, default=1.0)
    parser.add_argument("--memory-only", action="store_true", help="print the memory figures")
    parser.add_argument("--bombs-only", action="store_true", help="print the audio bomb table")
    args = parser.parse_args()
    if args.memory_only:
        print(memory_test())
        return
    if args.bombs_only:
        print(bomb_table(bomb_test()))
        return
    load = os.getloadavg()[0]
    rows = [load_test(b, args.seconds, args.prompt_seconds) for b in (True, False)]
    mem = memory_test()
    text = table(rows, mem, args.seconds, args.prompt_seconds, load) + bomb_table(bomb_test())
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the section to {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
