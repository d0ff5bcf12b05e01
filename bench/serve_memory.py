"""Does the server keep what its requests leave behind? Memory of llama_mimi_serve's app under
16 concurrent clients, with what is alive counted at each point, not only the RSS.

    python bench/serve_memory.py                 # 20 / 200 / 400 / 800 / 1200 mixed requests
    python bench/serve_memory.py --phases 20 100 # shorter

The app (tiny random model, random Mimi, CPU, the limits of bench_serve's memory row) runs in
this process under uvicorn, so that tracemalloc and the garbage collector can see its objects;
the clients are threads of the same process (httpx). After each phase, with no request in
flight, it records: RSS; Python memory that tracemalloc sees as allocated (server-side modules
apart from the clients'); live torch tensors and their bytes; objects the garbage collector
tracks, and how many of them a full collection frees (cyclic garbage still waiting for Python's
own collector). Live counts that stay flat while RSS grows mean the allocator keeps freed pages
(not a leak); live counts that grow with the requests mean a leak.
"""

import argparse
import collections
import gc
import os
import socket
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import torch
import uvicorn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_serve import CLIENTS, prompt_wav, rss_mb  # noqa: E402

from llama_mimi_tt import MimiCodec, llama_mimi_tiny, llama_mimi_tokenizer  # noqa: E402
from llama_mimi_tt.serve import ContinuationBatcher, ServeLimits, create_app  # noqa: E402

SERVER_SIDE = ("llama_mimi_tt", "starlette", "fastapi", "uvicorn", "anyio", "h11", "torch")


def start_server():
    torch.manual_seed(0)
    model = llama_mimi_tiny(num_quantizers=4, max_seq_len=512).eval()
    codec = MimiCodec.random(4, seed=0)
    tokenizer = llama_mimi_tokenizer(path="builtin:byte", num_quantizers=4)
    limits = ServeLimits(max_queue=256, batch_wait_ms=50, max_prompt_seconds=2)
    batcher = ContinuationBatcher(model, codec, tokenizer, limits)
    app = create_app(batcher)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def one_request(url: str, i: int, good: bytes, too_long: bytes) -> None:
    """Every tenth a 422 (prompt too long), then streamed (2 samples) and whole answers."""
    if i % 10 == 9:
        r = httpx.post(f"{url}/v1/continue", content=too_long, timeout=600)
        assert r.status_code == 422, r.text
    elif i % 2:
        params = dict(seconds=0.16, seed=i)
        r = httpx.post(f"{url}/v1/continue", params=params, content=good, timeout=600)
        assert r.status_code == 200, r.text
    else:
        params = dict(seconds=0.16, seed=i, num_samples=2)
        with httpx.stream(
            "POST", f"{url}/v1/continue/stream", params=params, content=good, timeout=600
        ) as s:
            assert s.status_code == 200
            for _ in s.iter_lines():
                pass


def run_requests(url: str, start: int, stop: int, good: bytes, too_long: bytes) -> None:
    for chunk in range(start, stop, CLIENTS):
        ts = [
            threading.Thread(target=one_request, args=(url, i, good, too_long))
            for i in range(chunk, min(chunk + CLIENTS, stop))
        ]
        [t.start() for t in ts]
        [t.join() for t in ts]


def live_tensors():
    n = nbytes = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            n += 1
            nbytes += obj.untyped_storage().nbytes() if obj.device.type == "cpu" else 0
    return n, nbytes


def measure(served: int) -> dict:
    rss = rss_mb(os.getpid())
    snapshot = tracemalloc.take_snapshot()
    server_side = sum(
        s.size
        for s in snapshot.statistics("filename")
        if any(f"/{name}/" in s.traceback[0].filename for name in SERVER_SIDE)
    )
    tracked_before = len(gc.get_objects())
    tensors, tensor_bytes = live_tensors()
    freed = gc.collect()  # the bench's own collection, after the counts above
    types = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return dict(
        types=types,
        requests=served,
        rss_mb=rss,
        traced_mb=tracemalloc.get_traced_memory()[0] / 2**20,
        server_side_mb=server_side / 2**20,
        tensors=tensors,
        tensor_mb=tensor_bytes / 2**20,
        gc_tracked=tracked_before,
        gc_freed=freed,
    )


def table(rows) -> str:
    head = (
        "| requests | RSS MB | traced Python MB (server side) | live tensors (MB) "
        "| objects tracked by gc | freed by a full collection |\n|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['requests']} | {r['rss_mb']:.0f} | {r['traced_mb']:.1f} ({r['server_side_mb']:.1f})"
        f" | {r['tensors']} ({r['tensor_mb']:.1f}) | {r['gc_tracked']} | {r['gc_freed']} |\n"
        for r in rows
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, nargs="+", default=[20, 200, 400, 800, 1200])
    args = parser.parse_args()
    tracemalloc.start()
    server, url = start_server()
    good, too_long = prompt_wav(0.5, seed=1), prompt_wav(3.0, seed=2)
    rows, done, grown = [], 0, []
    t0 = time.perf_counter()
    for stop in args.phases:
        run_requests(url, done, stop, good, too_long)
        done = stop
        rows.append(measure(done))
        r = rows[-1]
        if len(rows) > 1:  # live objects (after a collection) by type: what this phase added
            delta = r["types"] - rows[-2]["types"]
            added = ", ".join(f"{name} +{n}" for name, n in delta.most_common(8))
            grown.append(f"{rows[-2]['requests']} -> {done}: {added or 'nothing'}")
        print(
            f"{done} requests ({time.perf_counter() - t0:.0f} s): RSS {r['rss_mb']:.0f} MB, "
            f"traced {r['traced_mb']:.1f} MB, {r['tensors']} tensors, gc freed {r['gc_freed']}",
            flush=True,
        )
    server.should_exit = True
    print(f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}")
    print(table(rows))
    print("Live objects (after a full collection) added by each phase, by type:")
    print("\n".join(f"- {line}" for line in grown))


if __name__ == "__main__":
    main()
