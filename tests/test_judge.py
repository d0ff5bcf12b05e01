"""LLM-as-a-judge against a local server speaking the OpenAI chat API, reply parsing and the
generation-quality pipeline (``evaluate_generations``)."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_mimi_tt.judge import (
    RUBRIC,
    ChatJudge,
    JudgeError,
    evaluate_generations,
    format_generation_summary,
    parse_judge_reply,
)
from llama_mimi_tt.statistics import mean_ci


# ---- a scripted OpenAI-compatible server -------------------------------------------------------
class ChatServer:
    """``POST /v1/chat/completions`` on 127.0.0.1. Each request takes the next scripted action:
    ``("reply", text)``, ``("status", code[, headers])`` or ``("raw", body)``, or a function of
    the request body that returns one (and may wait first); when the script runs out,
    ``default`` is used. Requests are recorded."""

    def __init__(self, script=(), default=("reply", '{"score": 5, "reason": "ok"}')):
        self.script, self.default, self.requests = list(script), default, []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers),
                                            "body": body})  # fmt: skip
                    action = server.script.pop(0) if server.script else server.default
                if callable(action):
                    action = action(body)
                kind = action[0]
                if kind == "status":
                    self.send_response(action[1])
                    for k, v in (action[2] if len(action) > 2 else {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted failure"}}')
                    return
                if kind == "raw":
                    payload = action[1].encode()
                else:
                    payload = json.dumps({
                        "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": action[1]}}],
                    }).encode()  # fmt: skip
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class Sleeps(list):
    """A fake ``sleep`` that records the backoff delays instead of waiting."""

    def __call__(self, seconds):
        self.append(seconds)


def make_judge(server, **kw):
    kw.setdefault("api_key_env", None)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("backoff", 0.5)
    kw.setdefault("sleep", Sleeps())
    return ChatJudge(base_url=server.base_url, model="judge-model", **kw)


# ---- the judge over HTTP ---------------------------------------------------------------------
def test_good_reply_and_what_is_sent(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    with ChatServer([("reply", '{"score": 8, "reason": "coherent and grammatical"}')]) as srv:
        judge = make_judge(srv, api_key_env="TEST_JUDGE_KEY")
        v = judge.judge("the cat sat on", "the mat and purred")
    assert v == {"score": 8, "reason": "coherent and grammatical", "attempts": 1, "error": None,
                 "reply": '{"score": 8, "reason": "coherent and grammatical"}'}  # fmt: skip
    (req,) = srv.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test-123"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    user = body["messages"][-1]["content"]
    assert RUBRIC in user and '"the cat sat on"' in user and '"the mat and purred"' in user
    assert '{"score": <integer 1-10>' in user


def test_malformed_replies_are_retried_then_counted_failed():
    script = [("reply", "I think it is quite good!"), ("raw", "<html>oops</html>"),
              ("reply", '{"score": 42}'), ("raw", '{"choices": []}')]  # fmt: skip
    with ChatServer(script, default=("reply", "no number here")) as srv:
        judge = make_judge(srv, max_retries=4, backoff=0.5, max_backoff=3.0)
        v = judge.judge("a", "b")
    assert v["score"] is None and v["attempts"] == 5 and len(srv.requests) == 5
    assert "no score in the reply" in v["error"]
    assert judge.sleep == [0.5, 1.0, 2.0, 3.0]  # exponential, capped at max_backoff


def test_timeout_is_retried_then_counted_failed():
    answer = threading.Event()  # the server answers no request before the judge has given up

    def held(body):
        answer.wait(timeout=60)  # only so that a client without a timeout cannot hang the test
        return ("reply", '{"score": 9}')

    with ChatServer(default=held) as srv:
        judge = make_judge(srv, timeout=0.2, max_retries=1)
        v = judge.judge("a", "b")
        answer.set()
    # no reply ever came before the judge returned: it gave up on each request by its timeout
    assert v["score"] is None and v["attempts"] == 2 and len(srv.requests) == 2
    assert "timed out" in v["error"].lower() or "timeout" in v["error"].lower()
    assert judge.sleep == [0.5]  # one backoff between the two attempts


def test_server_error_then_success_and_retry_after():
    script = [("status", 500), ("status", 503), ("status", 429, {"Retry-After": "2"}),
              ("reply", "Score: 6/10. Mostly on topic.")]  # fmt: skip
    with ChatServer(script) as srv:
        judge = make_judge(srv, backoff=0.25, max_backoff=10)
        v = judge.judge("a", "b")
    assert v["score"] == 6 and v["attempts"] == 4 and v["error"] is None
    assert judge.sleep == [0.25, 0.5, 2.0]  # the third wait honours Retry-After: 2


def test_configuration_errors_stop_at_once(monkeypatch):
    with ChatServer([("status", 401)]) as srv:
        with pytest.raises(JudgeError, match="HTTP 401.*API key"):
            make_judge(srv).judge("a", "b")
    with ChatServer([("status", 400)]) as srv:  # a bad request fails the sample, no retry
        v = make_judge(srv).judge("a", "b")
    assert v["score"] is None and v["attempts"] == 1 and "HTTP 400" in v["error"]
    monkeypatch.delenv("SOME_MISSING_KEY", raising=False)
    with pytest.raises(JudgeError, match="SOME_MISSING_KEY, which is not set"):
        ChatJudge("http://127.0.0.1:9/v1", "m", api_key_env="SOME_MISSING_KEY")


def test_connection_refused_is_retried_then_failed():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = ChatJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, timeout=1,
                      max_retries=2, sleep=Sleeps())  # fmt: skip
    v = judge.judge("a", "b")
    assert v["score"] is None and v["attempts"] == 3 and "refused" in v["error"].lower()
    assert judge.sleep == [1.0, 2.0]


@pytest.mark.parametrize(
    "reply, score",
    [
        ('{"score": 7, "reason": "fine"}', 7),
        ('```json\n{"score": "8", "reason": "x"}\n```', 8),
        ('Here you go: {"reason": "ok", "score": 9.0} Thanks', 9),
        ('{"Score": "10/10"}', 10),
        ("Score: 6/10 because ...", 6),
        ("The score of this sample is 3.", 3),
        ("Scores range 1-10. score: 4", 4),
        ('{"score": 0}', None),
        ('{"score": 11, "reason": "x"}', None),
        ("score 7.5", None),
        ("I would rate it 7", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_judge_reply(reply, score):
    assert parse_judge_reply(reply)[0] == score


# ---- the whole generation-quality pipeline ---------------------------------------------------
def _wav(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(str(path), (rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
    return str(path)


def test_evaluate_generations_mean_ci_failures_and_jsonl(tmp_path):
    items = [
        {"id": f"s{i}", "prompt_audio": _wav(tmp_path / f"p{i}.wav", i),
         "continuation_audio": _wav(tmp_path / f"c{i}.wav", 100 + i)}
        for i in range(5)
    ]  # fmt: skip
    transcripts = {}

    def asr(wave, sr):  # a fake ASR: names the clip by its first sample
        key = round(float(wave[0]), 6)
        return transcripts.setdefault(key, f"words {len(transcripts)}")

    def speaker(wave, sr):  # a fake speaker model
        return torch.tensor([1.0, float(wave.abs().mean()) * 10])

    scores = {"words 1": 7, "words 3": 9, "words 5": 6, "words 7": 8}

    def reply(body):  # the judge scores by continuation; "words 9" always gets garbage
        text = body["messages"][-1]["content"]
        cont = text.split("CONTINUATION: ")[1].split("\n")[0].strip('"')
        if cont in scores:
            return ("reply", json.dumps({"score": scores[cont], "reason": "ok"}))
        return ("reply", "cannot decide")

    with ChatServer(default=reply) as srv:
        judge = make_judge(srv, max_retries=1)
        summary = evaluate_generations(items, tmp_path / "out", asr=asr, judge=judge,
                                       speaker=speaker, max_concurrency=3, progress=False)  # fmt: skip
    j = summary["llm_judge"]
    assert j["n"] == 4 and j["failed"] == 1 and j["mean"] == pytest.approx(7.5)
    expected = mean_ci([7, 9, 6, 8])
    assert (j["ci_low"], j["ci_high"]) == pytest.approx((expected["ci_low"], expected["ci_high"]))
    assert summary["speaker_similarity"]["n"] == 5
    rows = [json.loads(x) for x in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(5)]
    failed = [r for r in rows if r["judge_score"] is None]
    assert len(failed) == 1 and failed[0]["judge_attempts"] == 2 and failed[0]["judge_error"]
    assert all(-1 <= r["speaker_similarity"] <= 1 for r in rows)
    text = format_generation_summary(summary)
    assert "llm_judge" in text and "95% CI (t)" in text and "failed 1" in text
    with pytest.raises(ValueError, match="needs an ASR"):
        evaluate_generations(items, tmp_path / "o2", judge=judge, progress=False)
