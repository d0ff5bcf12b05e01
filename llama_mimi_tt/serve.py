"""Listen to it: a page and an HTTP API that stream speech continuations as they are generated.

``GET /`` (the page), ``GET /health``, ``POST /v1/continue`` (a prompt audio file -> wav) and
``POST /v1/continue/stream`` (NDJSON: "start", an "audio" line per generated frame and sample,
"done"). Handlers check the upload and the parameters and queue a :class:`Job`; one worker thread
owns the model and the codec and generates the samples of jobs with the same settings in one
batch (a sample's tokens depend only on its seed, so batching changes nothing). Frames of
streaming requests go through Mimi's streaming decoder as they complete, and the worker never
waits for a client. Bad input is a 4xx ``{"error": ...}``; no client-given path is opened.
"""

import asyncio
import base64
import ctypes
import ctypes.util
import gc
import hmac
import io
import ipaddress
import json
import math
import os
import shutil
import tempfile
import threading
import time
import traceback
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Dict, List, Optional

import numpy as np
import soundfile as sf
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from torchtune import utils

from llama_mimi_tt.audio import load_audio
from llama_mimi_tt.codec import MimiCodec, num_frames
from llama_mimi_tt.generation import SamplingParams, generate
from llama_mimi_tt.vocab import MIMI_FRAME_RATE, MimiVocab

log = utils.get_logger("INFO")

__all__ = ["ServeLimits", "Job", "ContinuationBatcher", "ApiError", "create_app", "wav_bytes"]


def samples(wave: torch.Tensor) -> np.ndarray:
    """Mimi's output ``[1, n]`` as float32 samples in [-1, 1] (what is streamed: no rounding)."""
    return np.clip(wave.reshape(-1).numpy(), -1.0, 1.0).astype("<f4")


def wav_bytes(wave: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """A .wav file in memory: 16-bit PCM (``PCM_16``) or 32-bit float (``FLOAT``)."""
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, subtype=subtype, format="WAV")
    return buf.getvalue()


GC_EVERY_N_BATCHES = 8  # under load, a full garbage collection this often (release_free_memory)
try:  # glibc: malloc_trim returns freed heap pages to the OS
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None


def release_free_memory(collect: bool) -> None:
    """Hands the memory freed by finished requests back to the OS.

    Each request leaves some reference cycles (the HTTP side's request and connection objects)
    that only Python's full collection frees, and batches of every size leave the heap
    fragmented; together they made the server's resident memory creep up by ~0.4 MB per
    request although nothing is kept. ``collect`` runs that full collection (~0.2 s, so not
    after every batch); glibc's ``malloc_trim`` then returns the free pages (a no-op where the
    C library has none). Measured in process over 640 mixed requests: 1501, 1522, 1523 and
    1528 MB after 32, 208, 400 and 640 requests."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class ApiError(Exception):
    """A 4xx/5xx answer ``{"error": message}`` (with extra headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts and how it batches (the config's keys of the same names)."""

    max_upload_mb: float = 10.0  # request body size
    max_prompt_seconds: float = 10.0  # prompt audio length
    max_seconds: float = 10.0  # continuation length a request may ask for
    max_samples: int = 4  # samples per request
    max_queue: int = 32  # requests waiting for the worker; more: 503 + Retry-After
    batching: bool = True  # False: one request per generation
    max_batch_size: int = 16  # samples generated together
    batch_wait_ms: float = 20.0  # how long the worker waits for more requests to batch
    stop_at_end: bool = True  # a sample may end itself with </audio>
    min_new_frames: int = 0  # </audio> not allowed before this many frames
    compile: bool = False  # torch.compile the one-token step

    def __post_init__(self):
        for name in ("max_upload_mb", "max_prompt_seconds", "max_seconds", "max_samples"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_queue", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples > self.max_batch_size:
            raise ValueError(
                f"max_samples={self.max_samples} > max_batch_size={self.max_batch_size}: a "
                "request's samples are generated in one batch"
            )


# ---- one request ----------------------------------------------------------------------------
@dataclass(eq=False)  # a job is equal only to itself (the queue removes jobs by identity)
class Job:
    """One request: its prompt waveform (24 kHz, checked), its settings and where its events go.

    Events, in order: ``("start", info)``, then for streaming jobs ``("audio", sample, frame,
    float32 samples)`` per frame, then ``("done", result)``; or ``("error", status, message)`` at any point.
    """

    wave: torch.Tensor
    frames: int  # continuation frames asked for
    seeds: List[int]
    semantic: SamplingParams
    acoustic: SamplingParams
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, *event) -> None:
        try:  # called from the worker thread
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop is gone (shutdown)
            pass

    @property
    def key(self):
        """Jobs with equal keys can share a generation."""
        return (self.semantic, self.acoustic)


# ---- the worker -----------------------------------------------------------------------------
class ContinuationBatcher:
    """A bounded queue of :class:`Job` and the one thread that generates them, batched."""

    def __init__(
        self,
        model: torch.nn.Module,
        codec: MimiCodec,
        vocab: MimiVocab,
        bos_id: int,
        limits: ServeLimits = ServeLimits(),
        name: str = "llama-mimi",
        random_weights: bool = False,
    ):
        if codec.num_quantizers != vocab.num_quantizers:
            raise ValueError(
                f"the codec has num_quantizers={codec.num_quantizers} but the tokenizer "
                f"{vocab.num_quantizers}: set both from one num_quantizers"
            )
        self.model, self.codec, self.vocab, self.bos_id = model, codec, vocab, bos_id
        self.limits, self.name, self.random_weights = limits, name, random_weights
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.batch_seconds = 1.0  # wall time of the last batch, for Retry-After
        self.active = 0  # jobs in the batch being generated
        self.served = 0  # requests answered
        self.batches = 0  # generations run

    @property
    def max_seq_len(self) -> int:
        return int(self.model.max_seq_len)

    # -- queue
    def submit(self, job: Job) -> None:
        """Queues a job; ApiError 503 (with Retry-After) when the queue is full."""
        with self._cond:
            if len(self._pending) >= self.limits.max_queue:
                waits = math.ceil((len(self._pending) + 1) / self.limits.max_batch_size)
                retry = max(1, math.ceil(self.batch_seconds * waits))
                raise ApiError(
                    503,
                    f"the server is busy: {len(self._pending)} requests are waiting (max_queue="
                    f"{self.limits.max_queue}); retry in {retry} s",
                    {"Retry-After": str(retry)},
                )
            self._pending.append(job)
            self._cond.notify()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="llama-mimi-serve", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.emit("error", 503, "the server is shutting down")
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _next_batch(self) -> List[Job]:
        """The oldest job and, with batching, the jobs that arrive within ``batch_wait_ms`` and
        share its sampling settings, up to ``max_batch_size`` samples."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            first = self._pending.popleft()
            batch, rows = [first], len(first.seeds)
            if not self.limits.batching:
                return batch
            deadline = time.perf_counter() + self.limits.batch_wait_ms / 1000
            while rows < self.limits.max_batch_size:
                for job in list(self._pending):
                    if job.key == first.key and rows + len(job.seeds) <= self.limits.max_batch_size:
                        self._pending.remove(job)
                        batch.append(job)
                        rows += len(job.seeds)
                left = deadline - time.perf_counter()
                if left <= 0 or rows >= self.limits.max_batch_size or self._stopping:
                    break
                self._cond.wait(timeout=left)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self.active = len(batch)
            t0 = time.perf_counter()
            try:
                self._generate(batch)
            except Exception as e:  # a bug, not bad input: every job of the batch gets a 500
                log.error(f"generation failed:\n{traceback.format_exc()}")
                for job in batch:
                    job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.active = 0
            self.batch_seconds = time.perf_counter() - t0
            self.served += len(batch)
            self.batches += 1
            idle = self.pending == 0  # a full collection costs nothing while nobody waits
            release_free_memory(collect=idle or self.batches % GC_EVERY_N_BATCHES == 0)

    # -- one batch
    def _generate(self, batch: List[Job]) -> None:
        t0 = time.perf_counter()
        codec, vocab, q = self.codec, self.vocab, self.vocab.num_quantizers
        codes = codec.encode_batch([j.wave for j in batch], codec.sample_rate)
        prompts = [
            torch.cat([torch.tensor([self.bos_id, vocab.audio_start_id]), vocab.encode(c)])
            for c in codes
        ]
        rows = [(j, k) for j, job in enumerate(batch) for k in range(len(job.seeds))]
        max_frames = max(job.frames for job in batch)
        for job, c in zip(batch, codes):
            job.emit("start", dict(prompt_frames=int(c.shape[-1]), queued_s=t0 - job.submitted))

        # streaming rows: a batched streaming decoder; frames past a job's own length dropped
        stream_rows = [i for i, (j, _) in enumerate(rows) if batch[j].stream]
        sent = [0] * len(rows)  # frames streamed per row
        done = [False] * len(batch)
        first_code = vocab.audio_offset + torch.arange(q)  # code 0 of each level

        def finish_stream(j):
            job, mine = batch[j], [i for i, (jj, _) in enumerate(rows) if jj == j]
            done[j] = True
            frames = [sent[i] for i in mine]
            job.emit("done", dict(frames=frames, ended=[f < job.frames for f in frames]))

        def on_frame(index, frame_ids, active):
            ids = frame_ids[stream_rows].cpu()
            ids = torch.where(vocab.is_audio(ids), ids, first_code)  # rows that stopped
            wave = decoder.decode_frame(vocab.decode(ids))  # [S, 1, 1920]
            active = active.cpu().tolist()
            for s, i in enumerate(stream_rows):
                j, k = rows[i]
                if active[i] and index < batch[j].frames:
                    batch[j].emit("audio", k, index, samples(wave[s]))
                    sent[i] += 1
            for j, job in enumerate(batch):  # done: all its frames, or all its samples ended
                mine = [active[i] for i, (jj, _) in enumerate(rows) if jj == j]
                if job.stream and not done[j] and (index + 1 >= job.frames or not any(mine)):
                    finish_stream(j)

        decoder = codec.streaming_decoder(batch_size=len(stream_rows)) if stream_rows else None
        if decoder is not None:
            decoder.__enter__()
        try:
            out = generate(
                self.model,
                [prompts[j] for j, _ in rows],
                vocab,
                max_frames,
                semantic=batch[0].semantic,
                acoustic=batch[0].acoustic,
                seed=[batch[j].seeds[k] for j, k in rows],
                stop_at_end=self.limits.stop_at_end,
                min_new_frames=self.limits.min_new_frames,
                compile=self.limits.compile,
                on_frame=on_frame if decoder is not None else None,
            )
        finally:
            if decoder is not None:
                decoder.__exit__(None, None, None)
        for j, job in enumerate(batch):
            if job.stream and not done[j]:  # every sample stopped early (</audio>)
                finish_stream(j)

        # whole answers: each sample's own frames, decoded at once as the generate recipe does
        for j, job in enumerate(batch):
            if job.stream:
                continue
            waves, frames, ended = [], [], []
            for i, (jj, _) in enumerate(rows):
                if jj != j:
                    continue
                new = out.new_codes(i)[:, : job.frames]
                wave = codec.decode(new) if new.shape[-1] else torch.zeros(1, 0)
                waves.append(samples(wave))
                frames.append(int(new.shape[-1]))
                ended.append(int(new.shape[-1]) < job.frames)
            job.emit("done", dict(frames=frames, ended=ended, waves=waves))
        wall = time.perf_counter() - t0
        log.info(
            f"batch of {len(batch)} request(s), {len(rows)} sample(s): {sum(out.num_frames)} "
            f"frames ({out.audio_seconds:.1f} s of audio) in {wall:.2f} s "
            f"({out.tokens_per_s:.0f} tokens/s); {self.pending} waiting"
        )


# ---- the HTTP side --------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_html() -> str:
    return (resources.files("llama_mimi_tt") / "static" / "index.html").read_text()


def create_app(
    batcher: ContinuationBatcher,
    api_key: Optional[str] = None,
    upload_dir: Optional[str] = None,
) -> FastAPI:
    """The FastAPI app: the page, /health, /v1/continue and /v1/continue/stream.

    Args:
        batcher: the worker (started and stopped with the app).
        api_key: when set, /v1/* need ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``.
        upload_dir: where uploads are written while they are read (a fresh temporary folder,
            removed at shutdown, when None).
    """
    limits, codec = batcher.limits, batcher.codec
    own_dir = upload_dir is None
    uploads = upload_dir or tempfile.mkdtemp(prefix="llama_mimi_serve_")

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            if own_dir:
                shutil.rmtree(uploads, ignore_errors=True)

    app = FastAPI(title="Llama-Mimi", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.upload_dir = uploads

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send X-API-Key: <key>)")

    async def read_upload(request: Request) -> torch.Tensor:
        """The request body as a checked 24 kHz mono waveform, via a temporary file."""
        max_bytes = int(limits.max_upload_mb * 2**20)
        too_big = ApiError(
            413, f"the upload is larger than max_upload_mb={limits.max_upload_mb:g} MB"
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise too_big
        fd, path = tempfile.mkstemp(dir=uploads, suffix=".upload")
        try:
            size = 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_big
                    f.write(chunk)
            if size == 0:
                raise ApiError(400, "empty upload: send the prompt audio file as the request body")
            try:
                wave = await run_in_threadpool(load_audio, path, codec.sample_rate)
            except TypeError as e:
                raise ApiError(422, f"the uploaded audio: {e}") from None
            except ValueError as e:
                message = str(e).replace(path, "the uploaded audio")
                status = 415 if "cannot read audio" in message else 422
                if status == 415:
                    message = (
                        "the upload is not an audio file this server can read (wav, flac, ogg, mp3)"
                    )
                raise ApiError(status, message) from None
        finally:
            os.unlink(path)
        seconds = wave.shape[-1] / codec.sample_rate
        if seconds > limits.max_prompt_seconds:
            raise ApiError(
                422,
                f"the prompt is {seconds:.2f} s long; this server takes at most "
                f"max_prompt_seconds={limits.max_prompt_seconds:g} s",
            )
        return wave

    async def make_job(request: Request, stream: bool, params: dict) -> Job:
        check_key(request)
        seconds, num_samples = params["seconds"], params["num_samples"]
        if seconds > limits.max_seconds:
            raise ApiError(
                422, f"seconds={seconds:g} is more than max_seconds={limits.max_seconds:g}"
            )
        frames = round(seconds * MIMI_FRAME_RATE)
        if frames < 1:
            raise ApiError(422, f"seconds={seconds:g} is shorter than one frame (0.08 s)")
        if num_samples > limits.max_samples:
            raise ApiError(
                422, f"num_samples={num_samples} is more than max_samples={limits.max_samples}"
            )
        if not stream and num_samples != 1:
            raise ApiError(
                422, "/v1/continue returns one wav: use num_samples=1, or /v1/continue/stream"
            )
        try:
            semantic = SamplingParams(params["semantic_temperature"], params["top_k"])
            acoustic = SamplingParams(params["acoustic_temperature"], params["top_k"])
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        wave = await read_upload(request)
        q = batcher.vocab.num_quantizers
        prompt_frames = num_frames(wave.shape[-1], codec.sample_rate)
        tokens = 2 + prompt_frames * q + frames * q
        if tokens > batcher.max_seq_len:
            room = (batcher.max_seq_len - 2) // q - prompt_frames
            raise ApiError(
                422,
                f"prompt ({prompt_frames} frames) + continuation ({frames} frames) need "
                f"{tokens} tokens; the model's context is {batcher.max_seq_len}: ask for at "
                f"most {max(room, 0) / MIMI_FRAME_RATE:.2f} s or send a shorter prompt",
            )
        seed = params["seed"]
        return Job(
            wave=wave,
            frames=frames,
            seeds=[seed + k for k in range(num_samples)],
            semantic=semantic,
            acoustic=acoustic,
            stream=stream,
            loop=asyncio.get_running_loop(),
        )

    def query_params(
        seconds: float = Query(min(4.0, limits.max_seconds), gt=0, allow_inf_nan=False),
        semantic_temperature: float = Query(0.8, ge=0, allow_inf_nan=False),
        acoustic_temperature: float = Query(0.8, ge=0, allow_inf_nan=False),
        top_k: int = Query(30, ge=1),
        seed: int = Query(0, ge=0, lt=2**62),
        num_samples: int = Query(1, ge=1),
    ) -> dict:
        return dict(locals())

    async def first_event(job: Job):
        event = await job.events.get()
        if event[0] == "error":
            raise ApiError(event[1], event[2])
        return event

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": batcher.name,
            "random_weights": batcher.random_weights,
            "num_quantizers": batcher.vocab.num_quantizers,
            "sample_rate": codec.sample_rate,
            "frame_rate": MIMI_FRAME_RATE,
            "max_seq_len": batcher.max_seq_len,
            "api_key_required": bool(api_key),
            "limits": {k: getattr(limits, k) for k in ServeLimits.__dataclass_fields__},
            "queue": {"waiting": batcher.pending, "generating": batcher.active},
            "served": batcher.served,
            "batches": batcher.batches,
        }

    @app.post("/v1/continue")
    async def continue_prompt(
        request: Request,
        params: Annotated[dict, Depends(query_params)],
        format: Annotated[str, Query(pattern="^(pcm16|float)$")] = "pcm16",
    ):
        job = await make_job(request, False, params)
        batcher.submit(job)
        start = await first_event(job)
        done = await first_event(job)
        result = done[1]
        headers = {
            "X-Prompt-Frames": str(start[1]["prompt_frames"]),
            "X-Frames": str(result["frames"][0]),
            "X-Ended": str(result["ended"][0]).lower(),
            "X-Seed": str(job.seeds[0]),
        }
        subtype = "FLOAT" if format == "float" else "PCM_16"
        body = wav_bytes(result["waves"][0], codec.sample_rate, subtype)
        return Response(body, media_type="audio/wav", headers=headers)

    @app.post("/v1/continue/stream")
    async def continue_prompt_stream(
        request: Request, params: Annotated[dict, Depends(query_params)]
    ):
        job = await make_job(request, True, params)
        batcher.submit(job)
        start = (await first_event(job))[1]

        async def lines():
            yield _line(
                type="start",
                sample_rate=codec.sample_rate,
                frame_size=codec.frame_size,
                frames=job.frames,
                seeds=job.seeds,
                **start,
            )
            while True:
                event = await job.events.get()
                if event[0] == "audio":
                    _, k, index, wave = event
                    f32 = base64.b64encode(wave.tobytes()).decode()
                    yield _line(type="audio", sample=k, frame=index, f32=f32)
                elif event[0] == "done":
                    yield _line(type="done", **event[1])
                    return
                else:
                    yield _line(type="error", error=event[2])
                    return

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def _line(**fields) -> bytes:
    return (json.dumps(fields) + "\n").encode()


def serve(batcher: ContinuationBatcher, host: str, port: int, api_key: Optional[str]) -> None:
    """Runs the app with uvicorn until Ctrl-C."""
    import uvicorn

    if not _is_loopback(host) and not api_key:
        log.warning(
            f"!!! serving on {host} (beyond this machine) with no API key: anyone who can reach "
            "it can use it. Set the environment variable named by api_key_env. !!!"
        )
    app = create_app(batcher, api_key=api_key)
    log.info(f"Llama-Mimi is listening: open http://{host}:{port}/ (API: POST /v1/continue)")
    uvicorn.run(app, host=host, port=port, log_level="info")
