"""The LLM judge of generated speech: a chat model scores each continuation's content from the
transcripts of the prompt and the continuation.

A judge behind any OpenAI-compatible chat endpoint (``ChatJudge``) scores the continuation on the
1-10 ``RUBRIC``. Replies are parsed leniently and transient HTTP errors retried; a sample that
still fails counts as failed, never as a score. ``evaluate_generations`` scores a set of
continuations: transcripts (``llama_mimi_tt.asr``), the judge, speaker similarity
(``llama_mimi_tt.speaker_similarity``), GenPPL and Auto-BLEU (``llama_mimi_tt.text_metrics``),
each mean with its 95% Student-t interval (``llama_mimi_tt.statistics``). Nothing is downloaded:
the only network traffic goes to the judge endpoint you configure.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torchtune import utils
from tqdm import tqdm

from llama_mimi_tt.audio import load_audio
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.speaker_similarity import cosine_similarity
from llama_mimi_tt.statistics import mean_ci
from llama_mimi_tt.text_metrics import transcript_metrics

log = utils.get_logger("INFO")

__all__ = [
    "RUBRIC",
    "ChatJudge",
    "JudgeError",
    "evaluate_generations",
    "format_generation_summary",
    "judge_messages",
    "parse_judge_reply",
]

# =============================================================================================
# The rubric and the judge
# =============================================================================================
RUBRIC = """\
Score the CONTINUATION's content on this 1-10 scale:
10: a natural, fluent and meaningful continuation that clearly follows from the prompt (same \
topic, people, situation and tense) and is grammatical throughout.
8-9: coherent with the prompt and grammatical, with at most minor slips or slightly generic \
content.
6-7: mostly on topic and understandable, with some grammatical errors or a loose connection to \
the prompt.
4-5: only partly related to the prompt, or with frequent grammatical errors; the meaning is hard \
to follow in places.
2-3: largely unrelated to the prompt or mostly ungrammatical; little coherent meaning.
1: empty, gibberish, or no recognisable words or meaning.
Judge the content only (coherence with the prompt, grammar, meaning), not audio quality. Both \
texts are automatic transcripts: ignore punctuation, capitalisation and spelling. The \
continuation may stop mid-sentence; do not penalise the cut itself."""

SYSTEM_PROMPT = (
    "You are a careful, strict evaluator of speech continuations produced by a spoken language "
    "model. You reply with JSON only."
)


def judge_messages(prompt_text: str, continuation_text: str) -> List[Dict[str, str]]:
    """The chat messages sent to the judge for one sample (rubric included)."""
    user = (
        "A speech language model heard the PROMPT (spoken) and continued speaking. Here are "
        "transcripts of both.\n\n"
        f"PROMPT: {json.dumps(prompt_text)}\n"
        f"CONTINUATION: {json.dumps(continuation_text)}\n\n"
        f"{RUBRIC}\n\n"
        'Reply with one JSON object and nothing else: {"score": <integer 1-10>, "reason": '
        '"<one short sentence>"}'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _as_score(value) -> Optional[int]:
    """An integer 1..10 from a JSON value (``7``, ``7.0``, ``"7"``, ``"7/10"``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if float(value).is_integer() and 1 <= value <= 10:
            return int(value)
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d{1,2})(?:\.0+)?\s*(?:/\s*10)?\s*", value)
        if m and 1 <= int(m.group(1)) <= 10:
            return int(m.group(1))
    return None


def parse_judge_reply(text: Optional[str]) -> Tuple[Optional[int], str]:
    """``(score, reason)`` from a judge reply; ``score`` is None when none can be found.

    Tried in order: the whole reply as JSON; each ``{...}`` object in it (code fences and prose
    around it allowed); the first integer 1..10 within a few characters after the word "score"
    (``Score: 7``, ``score of 8/10``; a range such as ``1-10`` or a decimal such as ``7.5`` is
    passed over). Scores outside 1..10 are not accepted.
    """
    if not text or not text.strip():
        return None, ""
    candidates = [text.strip()]
    candidates += re.findall(r"\{[^{}]*\}", text, flags=re.S)
    for c in candidates:
        c = re.sub(r"^```(?:json)?\s*|\s*```$", "", c.strip())
        try:
            obj = json.loads(c)
        except ValueError:
            continue
        if isinstance(obj, dict):
            lower = {str(k).lower(): v for k, v in obj.items()}
            score = _as_score(lower.get("score"))
            if score is not None:
                return score, str(lower.get("reason", "")).strip()
    for m in re.finditer(
        r"score[^0-9]{0,20}?(\d{1,2})(?!\d|\.\d|\s*(?:-|to)\s*\d)", text, flags=re.I
    ):
        n = int(m.group(1))
        if 1 <= n <= 10:
            return n, text.strip()
    return None, ""


class JudgeError(RuntimeError):
    """The judge endpoint rejects the configuration itself (bad key, model or URL)."""


class _Retry(Exception):
    """A transient failure: try again after a backoff."""

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fail(Exception):
    """A failure that retrying will not fix (HTTP 400 and the like): the sample fails."""


class ChatJudge:
    """An LLM judge behind an OpenAI-compatible chat completions endpoint.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``
            (vLLM, llama.cpp server, ...); ``/chat/completions`` is appended.
        model: the model name the endpoint serves.
        api_key_env: name of the environment variable holding the API key (sent as ``Bearer``).
            ``None`` for endpoints without authentication. Never put the key in the config.
        timeout: seconds to wait for one HTTP response.
        max_retries: retries after the first attempt, for connection errors, timeouts, HTTP 429
            and 5xx, and replies without a parseable score.
        backoff: first retry delay in seconds; doubled each retry (``backoff * 2**k``), capped at
            ``max_backoff``; a ``Retry-After`` header is honoured up to the same cap.
        max_backoff: the longest single wait.
        temperature: sampling temperature of the judge (0 for repeatability).
        max_tokens: the reply's length limit.
        sleep: the function that waits (tests pass a fake one).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float = 0.0,
        max_tokens: int = 200,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise JudgeError(
                    f"the judge's API key is read from the environment variable {api_key_env}, "
                    "which is not set. Export it, or set judge.api_key_env: null for an endpoint "
                    "without authentication."
                )
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.sleep = sleep

    def _post(self, messages: List[Dict[str, str]]) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code == 429 or e.code >= 500:
                after = e.headers.get("Retry-After") if e.headers else None
                try:
                    after = float(after) if after is not None else None
                except ValueError:
                    after = None
                raise _Retry(f"HTTP {e.code}: {detail}", after) from e
            if e.code in (401, 403, 404):
                raise JudgeError(
                    f"the judge endpoint {self.url} answered HTTP {e.code} ({detail}): check "
                    "judge.base_url, judge.model and the API key"
                ) from e
            raise _Fail(f"HTTP {e.code}: {detail}") from e
        except (
            urllib.error.URLError,
            TimeoutError,
            ConnectionError,
            http.client.HTTPException,
        ) as e:
            raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retry(f"not a chat completion response: {raw[:200]!r}") from e

    def judge(self, prompt_text: str, continuation_text: str) -> dict:
        """One judgement: ``{score, reason, attempts, error, reply}``; ``score`` is None when
        every attempt failed (``error`` says why)."""
        messages = judge_messages(prompt_text, continuation_text)
        error, reply, retry_after = None, None, None
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                if retry_after is not None:
                    delay = min(self.max_backoff, max(delay, retry_after))
                self.sleep(delay)
            retry_after = None
            try:
                reply = self._post(messages)
            except _Retry as e:
                error, retry_after = str(e), e.retry_after
                continue
            except _Fail as e:
                return dict(score=None, reason="", attempts=attempt + 1, error=str(e), reply=None)
            score, reason = parse_judge_reply(reply)
            if score is not None:
                return dict(
                    score=score, reason=reason, attempts=attempt + 1, error=None, reply=reply
                )
            error = f"no score in the reply: {reply[:200]!r}"
        return dict(score=None, reason="", attempts=self.max_retries + 1, error=error, reply=reply)


# =============================================================================================
# Scoring a set of continuations
# =============================================================================================
def evaluate_generations(
    items: Sequence[Mapping],
    output_dir: str | Path,
    asr: Optional[Callable] = None,
    judge: Optional[ChatJudge] = None,
    speaker: Optional[Callable] = None,
    max_concurrency: int = 4,
    progress: bool = True,
    transcripts: Optional[Mapping[str, Mapping]] = None,
    text_lm: Optional[Callable] = None,
    auto_bleu_n: Optional[int] = 2,
) -> dict:
    """Judges and compares speakers of generated continuations.

    Args:
        items: ``[{"id", "prompt_audio", "continuation_audio"}]`` (audio file paths).
        output_dir: ``judgements.jsonl`` is written here (one line per item: transcripts,
            score, reason, attempts, error, speaker similarity).
        asr: ``asr(wave, sample_rate) -> str``; required with ``judge``.
        judge: a ``ChatJudge``; None skips the LLM judge.
        speaker: ``embed(wave, sample_rate) -> 1-D tensor``; None skips speaker similarity.
        max_concurrency: judge requests in flight at once.
        progress: tqdm bars.
        transcripts: ``{id: {"continuation_text"[, "prompt_text"]}}`` used instead of the ASR
            (e.g. read from a previous run's ``judgements.jsonl``); every item must be there.
        text_lm: a ``text_metrics.TextLM`` for GenPPL of the continuations' transcripts.
        auto_bleu_n: n of Auto-BLEU on the continuations' transcripts (None: off).

    Returns:
        ``{"llm_judge": mean_ci(...) + {"failed", "rubric"}, "speaker_similarity": mean_ci(...),
        "genppl": text_metrics.genppl(...), "auto_bleu": mean_ci(...)}`` (keys only for what
        ran; GenPPL and Auto-BLEU need transcripts, from the ASR or ``transcripts``).
    """
    if judge is not None and asr is None and transcripts is None:
        raise UserError("the LLM judge needs an ASR model to transcribe the audio (set asr)")
    if text_lm is not None and asr is None and transcripts is None:
        raise UserError("GenPPL needs transcripts: set asr, or transcripts (a .jsonl file)")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        dict(
            id=str(it["id"]),
            prompt_audio=str(it["prompt_audio"]),
            continuation_audio=str(it["continuation_audio"]),
        )
        for it in items
    ]
    if transcripts is not None:
        asr = None  # the saved transcripts stand in for it
        for row in rows:
            t = transcripts.get(row["id"])
            if t is None or t.get("continuation_text") is None:
                raise UserError(
                    f"the transcripts have no continuation_text for id {row['id']!r}: add it, "
                    "or leave generation.transcripts empty to transcribe with the ASR"
                )
            if judge is not None and t.get("prompt_text") is None:
                raise UserError(f"the LLM judge needs prompt_text for id {row['id']!r}")
            row["prompt_text"] = t.get("prompt_text")
            row["continuation_text"] = t["continuation_text"]
    sr = 16000
    for row in tqdm(rows, desc="transcribing / embedding", disable=not progress or not rows):
        if asr is None and speaker is None:
            break
        prompt = load_audio(row["prompt_audio"], sr)
        cont = load_audio(row["continuation_audio"], sr)
        if asr is not None:
            row["prompt_text"] = asr(prompt, sr)
            row["continuation_text"] = asr(cont, sr)
        if speaker is not None:
            row["speaker_similarity"] = cosine_similarity(speaker(prompt, sr), speaker(cont, sr))
    summary = {}
    if judge is not None:

        def one(row):
            return judge.judge(row["prompt_text"], row["continuation_text"])

        with ThreadPoolExecutor(max_workers=max(1, max_concurrency)) as pool:
            verdicts = list(
                tqdm(pool.map(one, rows), total=len(rows), desc="LLM judge", disable=not progress)
            )
        for row, v in zip(rows, verdicts):
            row.update(
                judge_score=v["score"],
                judge_reason=v["reason"],
                judge_attempts=v["attempts"],
                judge_error=v["error"],
                judge_reply=v["reply"],
            )
        scores = [r["judge_score"] for r in rows if r["judge_score"] is not None]
        summary["llm_judge"] = {
            **mean_ci(scores),
            "failed": len(rows) - len(scores),
            "scale": "1-10",
            "judge_model": judge.model,
        }
        if len(rows) - len(scores):
            log.warning(
                f"LLM judge: {len(rows) - len(scores)} of {len(rows)} samples failed "
                "(not counted in the mean; see judge_error in judgements.jsonl)"
            )
    if speaker is not None:
        summary["speaker_similarity"] = mean_ci([r["speaker_similarity"] for r in rows])
    if rows and "continuation_text" in rows[0]:
        summary.update(transcript_metrics(rows, text_lm, auto_bleu_n))
    with open(out_dir / "judgements.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return summary


def format_generation_summary(summary: Mapping[str, Mapping]) -> str:
    """Readable lines for ``evaluate_generations``' summary."""
    lines = []
    for name, s in summary.items():
        if s.get("mean") is None:
            lines.append(f"{name:<20} no samples")
            continue
        ci = (
            f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s.get("ci_low") is not None else "[n < 2]"
        )
        extra = f"  failed {s['failed']}" if "failed" in s else ""
        lines.append(f"{name:<20} mean {s['mean']:.3f}  95% CI (t) {ci}  n {s['n']}{extra}")
    return "\n".join(lines)
