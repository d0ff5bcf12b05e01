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
import difflib
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
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Dict, List, Optional, Sequence

import numpy as np
import soundfile as sf
import torch
from torchtune import utils

try:
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
except ImportError as e:
    raise ImportError(
        f"the server needs the [serve] extra ({e}): pip install 'llama-mimi-tt[serve]'"
    ) from e

from llama_mimi_tt.audio import audio_header, open_audio
from llama_mimi_tt.codec import MimiCodec, num_frames
from llama_mimi_tt.generation import DEFAULT_SAMPLING, SamplingParams, generate
from llama_mimi_tt.tokenizer import LlamaMimiTokenizer
from llama_mimi_tt.vocab import MIMI_FRAME_RATE

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


class ApiError(Exception):
    """A 4xx/5xx answer ``{"error": message}`` (with extra headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts and how it batches (the config's keys of the same names)."""

    max_upload_mb: float = 10.0  # request body size
    upload_timeout_s: float = 30.0  # the whole request body must arrive within this; else 408
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
    upload_readers: int = 2  # threads that decode uploads (more requests wait for one)

    def __post_init__(self):
        for name in (
            "max_upload_mb", "upload_timeout_s", "max_prompt_seconds", "max_seconds", "max_samples",
        ):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_queue", "max_batch_size", "upload_readers"):
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
        tokenizer: LlamaMimiTokenizer,
        limits: ServeLimits = ServeLimits(),
        name: str = "llama-mimi",
        random_weights: bool = False,
    ):
        vocab = tokenizer.vocab
        if codec.num_quantizers != vocab.num_quantizers:
            raise ValueError(
                f"the codec has num_quantizers={codec.num_quantizers} but the tokenizer "
                f"{vocab.num_quantizers}: set both from one num_quantizers"
            )
        self.model, self.codec, self.tokenizer, self.vocab = model, codec, tokenizer, vocab
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
        # one batch per call: its jobs and prompts are let go when the call returns, not kept
        # by the loop's variables while the worker waits for the next batch
        while self._answer(self._next_batch()):
            pass

    def _answer(self, batch: List[Job]) -> bool:
        """Generates a batch and answers its jobs; False (stop) for the empty batch."""
        if not batch:
            return False
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
        return True

    # -- one batch
    def _generate(self, batch: List[Job]) -> None:
        t0 = time.perf_counter()
        codec, vocab = self.codec, self.vocab
        codes = codec.encode_batch([j.wave for j in batch], codec.sample_rate)
        prompts = [self.tokenizer.prompt_ids(c) for c in codes]
        rows = [(j, k) for j, job in enumerate(batch) for k in range(len(job.seeds))]
        max_frames = max(job.frames for job in batch)
        for job, c in zip(batch, codes):
            job.emit("start", dict(prompt_frames=int(c.shape[-1]), queued_s=t0 - job.submitted))

        # streaming rows: a batched streaming decoder; frames past a job's own length dropped
        stream_rows = [i for i, (j, _) in enumerate(rows) if batch[j].stream]
        sent = [0] * len(rows)  # frames streamed per row
        done = [False] * len(batch)

        def finish_stream(j):
            job, mine = batch[j], [i for i, (jj, _) in enumerate(rows) if jj == j]
            done[j] = True
            frames = [sent[i] for i in mine]
            job.emit("done", dict(frames=frames, ended=[f < job.frames for f in frames]))

        def on_frame(index, frame_ids, active):
            wave = decoder.decode_frame_ids(frame_ids[stream_rows], vocab)  # [S, 1, 1920]
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

        streaming = codec.streaming_decoder(len(stream_rows)) if stream_rows else nullcontext()
        with streaming as decoder:
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


QUERY_PARAMETERS = (
    "seconds", "semantic_temperature", "acoustic_temperature", "top_k", "seed", "num_samples",
)  # fmt: skip
UPLOAD_NAME = "the uploaded audio"  # how messages call the upload (never its temporary path)


def check_api_key(request: Request, api_key: Optional[str]) -> None:
    """401 unless the request carries ``api_key`` (``X-API-Key`` or ``Authorization: Bearer``)."""
    if not api_key:
        return
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = given or auth[7:].strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send X-API-Key: <key>)")


def check_query(request: Request, known: Sequence[str]) -> None:
    """422 for a query parameter no route reads, naming the closest known one (a typo such as
    ``temprature`` would otherwise sample at the default)."""
    for name in request.query_params:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=2, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ApiError(
                422, f"unknown query parameter {name!r}: {hint}known: {', '.join(known)}"
            )


async def receive_upload(request: Request, path: str, limits: ServeLimits) -> None:
    """Writes the request body to ``path``: 413 past ``max_upload_mb``, 408 when it has not all
    arrived within ``upload_timeout_s``, 400 when it is empty."""
    max_bytes = int(limits.max_upload_mb * 2**20)
    too_big = ApiError(413, f"the upload is larger than max_upload_mb={limits.max_upload_mb:g} MB")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_big
    size = 0
    try:
        async with asyncio.timeout(limits.upload_timeout_s):
            with open(path, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_big
                    f.write(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            f"the upload did not arrive within upload_timeout_s={limits.upload_timeout_s:g} s "
            f"({size} bytes came)",
        ) from None
    if size == 0:
        raise ApiError(400, "empty upload: send the prompt audio file as the request body")


def read_prompt(path: str, sample_rate: int, max_seconds: float) -> torch.Tensor:
    """The prompt audio in ``path``, checked, mono, at ``sample_rate``. Its length is read from
    its header and refused (422) before anything is decoded; decoding stops after
    ``max_seconds`` even when the header claims less, so no upload costs more than that."""
    too_long = f"this server takes at most max_prompt_seconds={max_seconds:g} s"
    limit = int(max_seconds * sample_rate)
    try:
        frames, rate = audio_header(path, UPLOAD_NAME)
        if frames is not None and frames / rate > max_seconds:
            raise ApiError(422, f"the prompt is {frames / rate:.2f} s long; {too_long}")
        audio = open_audio(path, sample_rate, max_samples=limit + 1, name=UPLOAD_NAME)
    except ValueError as e:  # UserError: what is wrong with the audio
        if "cannot read audio" in str(e):
            raise ApiError(
                415, "the upload is not an audio file this server can read (wav, flac, ogg, mp3)"
            ) from None
        raise ApiError(422, str(e).replace(path, UPLOAD_NAME)) from None
    if audio.num_samples > limit:  # a header that gave no length, or too few frames
        raise ApiError(422, f"the prompt runs past its header's length; {too_long}")
    return audio.read()


async def read_upload(
    request: Request, limits: ServeLimits, uploads: str, sample_rate: int, readers: Executor
):
    """The request body as a checked prompt waveform, via a temporary file deleted at once.
    It is decoded by one of the ``readers`` threads (``upload_readers`` of them), not by
    Starlette's pool of 40: decoding takes CPU and memory that generation needs, so a flood of
    uploads waits for a reader instead of decoding 40 at once."""
    fd, path = tempfile.mkstemp(dir=uploads, suffix=".upload")
    os.close(fd)
    try:
        await receive_upload(request, path, limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            readers, read_prompt, path, sample_rate, limits.max_prompt_seconds
        )
    finally:
        os.unlink(path)


def check_request(limits: ServeLimits, stream: bool, params: dict) -> int:
    """The continuation frames a request asks for; 422 when its parameters exceed the limits."""
    seconds, num_samples = params["seconds"], params["num_samples"]
    if seconds > limits.max_seconds:
        raise ApiError(422, f"seconds={seconds:g} is more than max_seconds={limits.max_seconds:g}")
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
    return frames


def build_job(batcher: ContinuationBatcher, wave: torch.Tensor, frames: int, stream: bool, params):
    """The :class:`Job` of a checked request; 422 when prompt and continuation exceed the
    model's context or the sampling settings are invalid."""
    q, context = batcher.vocab.num_quantizers, batcher.max_seq_len
    prompt_frames = num_frames(wave.shape[-1], batcher.codec.sample_rate)
    tokens = 2 + prompt_frames * q + frames * q
    if tokens > context:
        room = (context - 2) // q - prompt_frames
        raise ApiError(
            422,
            f"prompt ({prompt_frames} frames) + continuation ({frames} frames) need {tokens} "
            f"tokens; the model's context is {context}: ask for at most "
            f"{max(room, 0) / MIMI_FRAME_RATE:.2f} s or send a shorter prompt",
        )
    try:
        semantic = SamplingParams(params["semantic_temperature"], params["top_k"])
        acoustic = SamplingParams(params["acoustic_temperature"], params["top_k"])
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    seed = params["seed"]
    return Job(
        wave=wave,
        frames=frames,
        seeds=[seed + k for k in range(params["num_samples"])],
        semantic=semantic,
        acoustic=acoustic,
        stream=stream,
        loop=asyncio.get_running_loop(),
    )


async def next_event(job: Job):
    """The job's next event; an ``error`` event raises its ApiError."""
    event = await job.events.get()
    if event[0] == "error":
        raise ApiError(event[1], event[2])
    return event


def wav_answer(job: Job, start: dict, done: dict, sample_rate: int, format: str) -> Response:
    """The /v1/continue answer: the sample as a wav, its frame counts in headers."""
    headers = {
        "X-Prompt-Frames": str(start["prompt_frames"]),
        "X-Frames": str(done["frames"][0]),
        "X-Ended": str(done["ended"][0]).lower(),
        "X-Seed": str(job.seeds[0]),
    }
    body = wav_bytes(done["waves"][0], sample_rate, "FLOAT" if format == "float" else "PCM_16")
    return Response(body, media_type="audio/wav", headers=headers)


async def stream_lines(job: Job, start: dict, codec: MimiCodec):
    """The /v1/continue/stream answer: NDJSON "start", "audio" per frame and sample, "done"."""
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


def health(batcher: ContinuationBatcher, api_key: Optional[str]) -> dict:
    """What /health answers: the model, the limits, the queue and the requests served."""
    return {
        "status": "ok",
        "model": batcher.name,
        "random_weights": batcher.random_weights,
        "num_quantizers": batcher.vocab.num_quantizers,
        "sample_rate": batcher.codec.sample_rate,
        "frame_rate": MIMI_FRAME_RATE,
        "max_seq_len": batcher.max_seq_len,
        "api_key_required": bool(api_key),
        "limits": {k: getattr(batcher.limits, k) for k in ServeLimits.__dataclass_fields__},
        "queue": {"waiting": batcher.pending, "generating": batcher.active},
        "served": batcher.served,
        "batches": batcher.batches,
    }


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


async def bad_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
    return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)


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

    readers = ThreadPoolExecutor(limits.upload_readers, thread_name_prefix="llama-mimi-upload")

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            readers.shutdown(cancel_futures=True)
            if own_dir:
                shutil.rmtree(uploads, ignore_errors=True)

    app = FastAPI(title="Llama-Mimi", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.upload_dir = uploads
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, bad_parameter)

    d = DEFAULT_SAMPLING

    def query_params(
        seconds: float = Query(min(4.0, limits.max_seconds), gt=0, allow_inf_nan=False),
        semantic_temperature: float = Query(d.temperature, ge=0, allow_inf_nan=False),
        acoustic_temperature: float = Query(d.temperature, ge=0, allow_inf_nan=False),
        top_k: int = Query(d.top_k, ge=1),
        seed: int = Query(0, ge=0, lt=2**62),
        num_samples: int = Query(1, ge=1),
    ) -> dict:
        return dict(locals())

    async def submit(request: Request, stream: bool, params: dict, known=QUERY_PARAMETERS):
        """Checks a request, reads its upload, queues its job: ``(job, start event info)``."""
        check_api_key(request, api_key)
        check_query(request, known)
        frames = check_request(limits, stream, params)
        wave = await read_upload(request, limits, uploads, codec.sample_rate, readers)
        job = build_job(batcher, wave, frames, stream, params)
        batcher.submit(job)
        return job, (await next_event(job))[1]

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health_route():
        return health(batcher, api_key)

    @app.post("/v1/continue")
    async def continue_prompt(
        request: Request,
        params: Annotated[dict, Depends(query_params)],
        format: Annotated[str, Query(pattern="^(pcm16|float)$")] = "pcm16",
    ):
        job, start = await submit(request, False, params, QUERY_PARAMETERS + ("format",))
        done = (await next_event(job))[1]
        return wav_answer(job, start, done, codec.sample_rate, format)

    @app.post("/v1/continue/stream")
    async def continue_prompt_stream(
        request: Request, params: Annotated[dict, Depends(query_params)]
    ):
        job, start = await submit(request, True, params)
        return StreamingResponse(stream_lines(job, start, codec), media_type="application/x-ndjson")

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
