"""tune run llama_mimi_serve: the HTTP API (wav in, wav out; streamed frames), batching, the
bounded queue, every bad input's answer, the recipe, and the page in a real headless browser.

Servers run in this process (uvicorn in a thread, on a free port) with the tiny random model
and the random Mimi; one test starts the recipe itself with `tune run`."""

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
import uvicorn

from llama_mimi_tt import MimiCodec, llama_mimi_tiny, llama_mimi_tokenizer
from llama_mimi_tt.audio import synthetic_audio
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.generation import SamplingParams
from llama_mimi_tt.recipe_config import prepare_argv
from llama_mimi_tt.serve import ContinuationBatcher, Job, ServeLimits, create_app

Q = 4
FRAME = 1920  # samples per Mimi frame at 24 kHz
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = llama_mimi_tiny(num_quantizers=Q, max_seq_len=512).eval()
    codec = MimiCodec.random(Q, seed=0)
    tokenizer = llama_mimi_tokenizer(path="builtin:byte", num_quantizers=Q)
    return model, codec, tokenizer


@contextmanager
def running(parts, api_key=None, random_weights=True, **limits):
    """A server on a free port of 127.0.0.1: yields (base url, app)."""
    model, codec, tokenizer = parts
    limits = ServeLimits(**{"stop_at_end": False, **limits})
    batcher = ContinuationBatcher(model, codec, tokenizer, limits, random_weights=random_weights)
    app = create_app(batcher, api_key=api_key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not os.path.exists(app.state.upload_dir)  # the upload folder is removed at shutdown


def wav(seconds=1.0, seed=0, subtype="PCM_16", sample_rate=24000) -> bytes:
    buf = io.BytesIO()
    wave = synthetic_audio(seconds, sample_rate, seed=seed)[0].numpy()
    sf.write(buf, wave, sample_rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def read_wav(data: bytes) -> np.ndarray:
    wave, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == 24000
    return wave


def read_stream(lines) -> dict:
    """The NDJSON events of /v1/continue/stream: start, per-sample PCM, done."""
    out = {"audio": {}, "frames": {}}
    for line in lines:
        ev = json.loads(line)
        if ev["type"] == "audio":
            wave = np.frombuffer(base64.b64decode(ev["f32"]), "<f4")
            assert wave.shape == (FRAME,)  # one Mimi frame per line
            out["audio"].setdefault(ev["sample"], []).append(wave)
            out["frames"].setdefault(ev["sample"], []).append(ev["frame"])
        else:
            out[ev["type"]] = ev
    out["audio"] = {k: np.concatenate(v) for k, v in out["audio"].items()}
    return out


def post(url, body, timeout=120, **params):
    return httpx.post(url, params=params, content=body, timeout=timeout)


# ---- the API ----------------------------------------------------------------------------------
def test_continue_and_stream_give_the_same_audio(parts):
    prompt = wav(1.0, seed=1)
    with running(parts) as (url, app):
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["num_quantizers"] == Q
        r = post(f"{url}/v1/continue", prompt, seconds=0.8, seed=5)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        # 0.8 s = 10 frames of 1920 samples; the 1.0 s prompt is ceil(12.5) = 13 frames
        assert r.headers["x-frames"] == "10" and r.headers["x-prompt-frames"] == "13"
        assert sf.info(io.BytesIO(r.content)).subtype == "PCM_16"
        assert read_wav(r.content).shape == (10 * FRAME,)
        r = post(f"{url}/v1/continue", prompt, seconds=0.8, seed=5, format="float")
        whole = read_wav(r.content)  # Mimi's float output, unrounded
        assert sf.info(io.BytesIO(r.content)).subtype == "FLOAT" and whole.shape == (10 * FRAME,)

        with httpx.stream(
            "POST", f"{url}/v1/continue/stream", params=dict(seconds=0.8, seed=5, num_samples=2),
            content=prompt, timeout=120,
        ) as s:  # fmt: skip
            assert s.status_code == 200
            got = read_stream(s.iter_lines())
        assert got["start"]["seeds"] == [5, 6] and got["start"]["frames"] == 10
        assert got["done"]["frames"] == [10, 10] and got["frames"][0] == list(range(10))
        # sample 0 (seed 5), streamed frame by frame through Mimi's streaming decoder, is the
        # whole answer (decoded at once) up to float noise. The random Mimi's output barely
        # depends on the codes (other codes move it by ~5e-5), so the bound must be far below.
        same = np.abs(got["audio"][0] - whole).max()
        other = np.abs(got["audio"][1] - whole).max()  # seed 6: other codes
        print(f"streamed vs whole: max diff {same:.1e}; vs another seed {other:.1e}")
        assert got["audio"][0].shape == whole.shape and same < 2e-6 and other > 1e-5
        assert os.listdir(app.state.upload_dir) == []  # every upload deleted


def test_batches_take_jobs_that_fit_in_arrival_order(parts):
    model, codec, tokenizer = parts
    limits = ServeLimits(max_batch_size=3, max_samples=3, batch_wait_ms=0)
    batcher = ContinuationBatcher(model, codec, tokenizer, limits)
    loop = asyncio.new_event_loop()
    try:

        def job(samples, temperature=0.8):
            p = SamplingParams(temperature)
            return Job(torch.zeros(1920), 2, list(range(samples)), p, p, False, loop)

        a, b, c, d, e = job(1), job(3), job(2), job(1, temperature=0.5), job(1)
        for j in (a, b, c, d, e):
            batcher.submit(j)
        assert batcher._next_batch() == [a, c]  # b does not fit beside a; d samples otherwise
        assert batcher._next_batch() == [b]
        assert batcher._next_batch() == [d]
        assert batcher._next_batch() == [e]
    finally:
        loop.close()


class HeldWorker:
    """Holds the server's worker inside its next generation until :meth:`release`, and records
    the rows of every generation and the jobs queued: a test sets up the queue it needs while
    the worker is busy, whatever the speed of the machine."""

    def __init__(self, monkeypatch):
        from llama_mimi_tt import serve

        self.rows, self.submitted = [], []
        self.held, self.queued = threading.Event(), threading.Condition()
        self._go = threading.Event()
        real_generate, real_submit = serve.generate, ContinuationBatcher.submit

        def generate(model, prompts, *args, **kwargs):
            self.rows.append(len(prompts))
            self.held.set()
            assert self._go.wait(timeout=120), "the test never released the worker"
            return real_generate(model, prompts, *args, **kwargs)

        def submit(batcher, job):
            real_submit(batcher, job)  # a full queue raises here: not recorded
            with self.queued:
                self.submitted.append(job)
                self.queued.notify_all()

        monkeypatch.setattr(serve, "generate", generate)
        monkeypatch.setattr(ContinuationBatcher, "submit", submit)
        self.release()

    def hold(self):
        self._go.clear()
        self.held.clear()

    def release(self):
        self._go.set()

    def wait_queued(self, n):
        """Until ``n`` jobs in all have been queued."""
        with self.queued:
            assert self.queued.wait_for(lambda: len(self.submitted) >= n, timeout=120)


def test_batch_of_concurrent_requests_equals_each_alone(parts, monkeypatch):
    asks = [dict(seed=3, seconds=0.8), dict(seed=9, seconds=0.48), dict(seed=3, seconds=0.64)]
    asks = [dict(a, format="float") for a in asks]
    prompts = [wav(1.0, seed=1), wav(0.6, seed=2), wav(1.4, seed=3)]
    worker = HeldWorker(monkeypatch)
    with running(parts, batch_wait_ms=0) as (url, _):
        alone = [post(f"{url}/v1/continue", p, **a) for p, a in zip(prompts, asks)]
        assert worker.rows == [1, 1, 1]
        # the worker is held in a generation of other settings (never batched with the three)
        # until the three are queued: then they are one generation
        worker.hold()
        together = [None] * 4

        def ask(i):
            if i == 3:
                together[i] = post(f"{url}/v1/continue", wav(0.5), seconds=0.16,
                                   semantic_temperature=0.5)  # fmt: skip
            else:
                together[i] = post(f"{url}/v1/continue", prompts[i], **asks[i])

        threads = [threading.Thread(target=ask, args=(3,))]
        threads[0].start()
        worker.wait_queued(4)  # the holding request first
        threads += [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        [t.start() for t in threads[1:]]
        worker.wait_queued(7)
        worker.release()
        [t.join() for t in threads]
    assert worker.rows == [1, 1, 1, 1, 3]  # the three queued together: one generation
    assert together[3].status_code == 200
    for a, b, ask_ in zip(alone, together, asks):
        assert a.status_code == b.status_code == 200
        assert read_wav(b.content).shape == (round(ask_["seconds"] * 12.5) * FRAME,)
        assert np.array_equal(read_wav(a.content), read_wav(b.content))  # batched == alone


def test_full_queue_503_and_slow_client_stalls_nobody(parts, monkeypatch):
    prompt = wav(0.5)
    worker = HeldWorker(monkeypatch)
    worker.hold()  # the streaming request's generation waits until the queue has been full
    with running(parts, max_queue=1, batching=False) as (url, _):
        # a streaming client that reads nothing while the others are served
        slow = httpx.Client(timeout=120)
        with slow.stream(
            "POST", f"{url}/v1/continue/stream", params=dict(seconds=1.6), content=prompt
        ) as s:
            assert worker.held.wait(timeout=120)  # the worker is generating it, held
            results = {}

            def ask(name):
                results[name] = post(f"{url}/v1/continue", prompt, seconds=0.4)

            waiting = threading.Thread(target=ask, args=("queued",))
            waiting.start()
            worker.wait_queued(2)
            queue = httpx.get(f"{url}/health").json()["queue"]
            assert queue == {"waiting": 1, "generating": 1}
            full = post(f"{url}/v1/continue", prompt, seconds=0.4)
            assert full.status_code == 503
            assert int(full.headers["retry-after"]) >= 1
            assert "busy" in full.json()["error"] and "max_queue=1" in full.json()["error"]
            worker.release()
            waiting.join()
            assert results["queued"].status_code == 200  # answered before the slow one read
            got = read_stream(s.iter_lines())
        slow.close()
    assert worker.rows == [1, 1]  # the 503 never reached the model
    assert got["done"]["frames"] == [20] and got["audio"][0].shape == (20 * FRAME,)


def test_every_bad_input_is_a_clear_4xx(parts, tmp_path):
    nan = synthetic_audio(0.5)[0].numpy()
    nan[100] = np.nan
    buf = io.BytesIO()
    sf.write(buf, nan, 24000, subtype="FLOAT", format="WAV")
    good = wav(0.5)
    cases = [  # (params, body, status, words in the message)
        ({}, b"", 400, "empty upload"),
        ({}, b"this is not audio" * 10, 415, "not an audio file"),
        ({}, buf.getvalue(), 422, "1 NaN"),
        ({}, wav(3.0), 422, "max_prompt_seconds=2"),
        ({}, wav(4.0, subtype="FLOAT"), 413, "max_upload_mb=0.3"),
        ({"seconds": "abc"}, good, 422, "seconds: Input should be a valid number"),
        ({"seconds": 0}, good, 422, "seconds: Input should be greater than 0"),
        ({"seconds": 0.02}, good, 422, "shorter than one frame"),
        ({"seconds": 3}, good, 422, "more than max_seconds=2"),
        ({"seconds": "nan"}, good, 422, "seconds: Input should be a finite number"),
        ({"top_k": 0}, good, 422, "top_k: Input should be greater than or equal to 1"),
        ({"semantic_temperature": -1}, good, 422, "semantic_temperature: Input should be"),
        ({"seed": -1}, good, 422, "seed: Input should be greater than or equal to 0"),
        ({"num_samples": 5}, good, 422, "num_samples=5 is more than max_samples=4"),
        ({"num_samples": 2}, good, 422, "use num_samples=1, or /v1/continue/stream"),
    ]
    with running(parts, max_prompt_seconds=2, max_upload_mb=0.3, max_seconds=2) as (url, app):
        for params, body, status, words in cases:
            r = post(f"{url}/v1/continue", body, **params)
            assert (r.status_code, words) == (status, words) and words in r.json()["error"], (
                params,
                r.status_code,
                r.text,
            )
        r = post(f"{url}/v1/continue/stream", good, num_samples=9)
        assert r.status_code == 422 and "max_samples" in r.json()["error"]
        assert httpx.get(f"{url}/health").json()["served"] == 0  # nothing reached the model
        assert os.listdir(app.state.upload_dir) == []
        assert post(f"{url}/v1/continue", good, seconds=0.16).status_code == 200  # still serving


def test_context_limit_and_api_key(parts):
    # the test model's context is 512 tokens: a 2 s prompt (25 frames) + 10 s (125 frames)
    with running(parts, api_key="s3cret") as (url, _):
        assert httpx.get(f"{url}/health").json()["api_key_required"] is True
        r = post(f"{url}/v1/continue", wav(0.5), seconds=0.16)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        r = httpx.post(
            f"{url}/v1/continue", params=dict(seconds=10), content=wav(2.0),
            headers={"X-API-Key": "s3cret"}, timeout=60,
        )  # fmt: skip
        assert r.status_code == 422 and "the model's context is 512" in r.json()["error"]
        r = httpx.post(
            f"{url}/v1/continue", params=dict(seconds=0.16), content=wav(0.5),
            headers={"Authorization": "Bearer s3cret"}, timeout=60,
        )  # fmt: skip
        assert r.status_code == 200 and read_wav(r.content).shape == (2 * FRAME,)
        page = httpx.get(f"{url}/").text  # the page itself is open; it asks for the key
        assert "<canvas" in page and "/v1/continue/stream" in page
        assert "http://" not in page and "https://" not in page  # nothing from the internet


# ---- the recipe -------------------------------------------------------------------------------
def test_config_keys_are_checked():
    with pytest.raises(UserError, match="did you mean 'port'"):
        prepare_argv(["x", "--config", "serve", "prot=8123"], "llama_mimi_serve")
    prepare_argv(["x", "--config", "1B_serve", "port=8123", "batching=False"], "llama_mimi_serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tune_run_llama_mimi_serve(tmp_path):
    port = free_port()
    tune = shutil.which("tune", path=str(Path(sys.executable).parent)) or "tune"
    proc = subprocess.Popen(
        [tune, "run", "llama_mimi_serve", "--config", "serve", f"port={port}", "max_seconds=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path),
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                health = httpx.get(f"{url}/health").json()
                break
            except httpx.TransportError:
                assert time.time() < deadline
                time.sleep(0.3)
        assert health["random_weights"] is True and health["limits"]["max_seconds"] == 1.0
        r = post(f"{url}/v1/continue", wav(0.5), seconds=0.4, seed=1)
        assert r.status_code == 200 and read_wav(r.content).shape[0] <= 5 * FRAME
        assert r.headers["x-frames"] == str(read_wav(r.content).shape[0] // FRAME)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "open http://127.0.0.1:" in out and "batch of 1 request(s)" in out
    assert not list(tmp_path.glob("llama_mimi_serve_*"))  # its upload folder is gone


# ---- the page, in a real browser ------------------------------------------------------------------
def find_browser():
    chromium = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = (
        "headless chromium and chromedriver are not installed (scripts/setup.sh installs them "
        "with apt-get when run as root: apt-get install chromium chromium-driver)"
    )
    if os.environ.get("LLAMA_MIMI_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def test_page_in_headless_chromium(parts, tmp_path):
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(wav(1.5, seed=4))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
        "--window-size=1000,1100", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
    ):  # fmt: skip
        options.add_argument(arg)
    with running(parts) as (url, _):
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            browser.get(url)
            browser.find_element(By.ID, "file").send_keys(str(prompt))
            WebDriverWait(browser, 30).until(
                lambda b: not b.find_element(By.ID, "generate").get_property("disabled")
            )
            seconds = browser.find_element(By.ID, "seconds")
            seconds.clear()
            seconds.send_keys("1.6")
            samples = browser.find_element(By.ID, "num_samples")
            samples.clear()
            samples.send_keys("2")
            browser.find_element(By.ID, "generate").click()
            state = lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
            WebDriverWait(browser, 90).until(lambda b: state(b) in ("playing", "error"))
            assert state(browser) == "playing", browser.find_element(By.ID, "error").text
            WebDriverWait(browser, 90).until(lambda b: state(b) in ("finished", "error"))
            page = browser.execute_script("return window.llamaMimi")
            error = browser.find_element(By.ID, "error").text
            status = browser.find_element(By.ID, "status").text
            downloads = browser.find_elements(By.CSS_SELECTOR, "a.download[download]")
            shot = os.environ.get("LLAMA_MIMI_SCREENSHOT") or str(tmp_path / "page.png")
            browser.save_screenshot(shot)
        finally:
            browser.quit()
    print(f"page: {status}")
    assert error == "" and state is not None
    assert page["samples"] == [20, 20] and page["chunks"] == 40  # 1.6 s = 20 frames x 2
    # played to the end, and the gaps counted are the gaps reported (how many there are
    # depends on the machine's speed while it plays: none when generation keeps up)
    assert page["playedUntil"] > 1.6
    assert status.endswith(f", {page['underruns']} gap(s) in playback."), status
    assert len(downloads) == 2


# ---- hostile input ------------------------------------------------------------------------------
def flac_silence(seconds: float, sample_rate: int = 8000, claim_frames=None) -> bytes:
    """A FLAC of silence (a few kB per hour); ``claim_frames`` rewrites the frame count of its
    header (0: the header gives no length)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sample_rate, 1, subtype="PCM_16", format="FLAC") as f:
        block, left = np.zeros(sample_rate * 600, np.int16), int(seconds * sample_rate)
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    data = bytearray(buf.getvalue())
    if claim_frames is not None:  # STREAMINFO: 36 bits of total samples from byte 8 + 13
        data[21] = (data[21] & 0xF0) | (claim_frames >> 32)
        data[22:26] = (claim_frames & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def read_http_answer(sock: socket.socket) -> str:
    """One HTTP answer read whole from a socket: its head, then Content-Length bytes of body
    (which may come in other packets than the head)."""

    def more(data: bytes) -> bytes:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        return data + chunk

    data = b""
    while b"\r\n\r\n" not in data:
        data = more(data)
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", data).group(1))
    while len(data.split(b"\r\n\r\n", 1)[1]) < length:
        data = more(data)
    return data.decode()


def test_audio_bombs_lying_headers_unknown_parameters_and_slow_uploads(parts, monkeypatch):
    from llama_mimi_tt import serve

    opened = []
    real_open = serve.open_audio
    monkeypatch.setattr(
        serve, "open_audio", lambda *a, **k: opened.append(k["max_samples"]) or real_open(*a, **k)
    )
    worker = HeldWorker(monkeypatch)  # never held here: it counts the generations
    with running(parts, max_prompt_seconds=2) as (url, app):
        # one hour of silence in 85 kB: refused from its header, nothing decoded
        r = post(f"{url}/v1/continue", flac_silence(3600), seconds=0.16)
        assert r.status_code == 422 and "the prompt is 3600.00 s long" in r.json()["error"]
        assert "max_prompt_seconds=2" in r.json()["error"] and opened == []
        # a header without a length: decoding stops after max_prompt_seconds
        r = post(f"{url}/v1/continue", flac_silence(60, claim_frames=0), seconds=0.16)
        assert r.status_code == 422 and "runs past its header's length" in r.json()["error"]
        assert opened == [2 * 24000 + 1]
        # a header that claims 1 s of a 60 s file: libsndfile decodes the 1 s it claims
        r = post(f"{url}/v1/continue", flac_silence(60, claim_frames=8000), seconds=0.16)
        assert r.status_code == 200 and r.headers["x-prompt-frames"] == "13"  # 1 s

        r = post(f"{url}/v1/continue", wav(0.5), seconds=1, temprature=0.2)
        error = r.json()["error"]
        assert r.status_code == 422 and "unknown query parameter 'temprature'" in error
        assert "semantic_temperature or acoustic_temperature" in error
        r = post(f"{url}/v1/continue/stream", wav(0.5), seconds=1, format="float")
        assert r.status_code == 422 and "'format'" in r.json()["error"]  # /v1/continue's only
    assert worker.rows == [1]  # only the 1 s prompt reached the model

    # a body that stops arriving: 408 after upload_timeout_s, its temporary file deleted. (A
    # server of its own: the uploads above must never meet so short a limit.)
    with running(parts, upload_timeout_s=0.5) as (url, app):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(
                b"POST /v1/continue?seconds=0.16 HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 100000\r\n\r\n" + wav(0.5)[:1000]
            )
            answer = read_http_answer(s)
        assert answer.startswith("HTTP/1.1 408") and "upload_timeout_s=0.5" in answer
        assert os.listdir(app.state.upload_dir) == []
        assert httpx.get(f"{url}/health").json()["served"] == 0
    assert worker.rows == [1]


def test_finished_requests_are_freed_without_the_cycle_collector(parts, monkeypatch):
    """A finished job (streamed, whole, or failed in generation) and its prompt are freed by
    reference counting alone: nothing of a request waits for a full garbage collection."""
    import gc
    import weakref

    from llama_mimi_tt import serve

    jobs, real_submit = [], ContinuationBatcher.submit

    def submit(self, job):
        jobs.append((weakref.ref(job), weakref.ref(job.wave)))
        real_submit(self, job)

    monkeypatch.setattr(ContinuationBatcher, "submit", submit)
    with running(parts, max_prompt_seconds=2) as (url, _):
        gc.collect()
        gc.disable()
        try:
            assert post(f"{url}/v1/continue", wav(0.5), seconds=0.16).status_code == 200
            with httpx.stream(
                "POST", f"{url}/v1/continue/stream", content=wav(0.5),
                params=dict(seconds=0.16, num_samples=2), timeout=120,
            ) as r:  # fmt: skip
                assert len(list(r.iter_lines())) == 2 + 2 * 2
            assert post(f"{url}/v1/continue", wav(3.0), seconds=0.16).status_code == 422
            real_generate = serve.generate
            monkeypatch.setattr(serve, "generate", lambda *a, **k: 1 / 0)
            r = post(f"{url}/v1/continue", wav(0.5), seconds=0.16)
            assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]
            monkeypatch.setattr(serve, "generate", real_generate)  # the next batch: the
            assert post(f"{url}/v1/continue", wav(0.5), seconds=0.16).status_code == 200
            # worker has let go of the 500's batch
            alive = [(job() is not None, wave() is not None) for job, wave in jobs]
        finally:
            gc.enable()
    assert len(alive) == 4 and alive[:3] == [(False, False)] * 3
