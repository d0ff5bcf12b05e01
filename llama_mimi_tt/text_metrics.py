"""Text metrics of generated speech on its ASR transcripts, as SlamKit reports them.

- GenPPL: ``exp`` of the mean over transcripts of each transcript's mean token NLL under a local
  Hugging Face causal LM (SlamKit uses Llama-3.2-1B; BOS prepended, every token after the first
  scored). An empty transcript is left out and counted as ``empty``.
- Auto-BLEU (n = 2): the share of a transcript's word n-grams (NLTK's word tokenizer) that occur
  elsewhere in it, averaged over transcripts: 0 never repeats, 1 is a loop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from llama_mimi_tt.errors import MissingFileError, UserError
from llama_mimi_tt.statistics import mean_ci

__all__ = [
    "TextLM",
    "auto_bleu",
    "genppl",
    "read_transcripts",
    "transcript_metrics",
    "word_tokenize",
]

EVAL_EXTRA = "pip install 'llama-mimi-tt[eval]'"


def word_tokenize(text: str) -> List[str]:
    """Words and punctuation of ``text`` as SlamKit splits them (NLTK's ``NLTKWordTokenizer``,
    which needs no downloaded data)."""
    try:
        from nltk.tokenize import NLTKWordTokenizer
    except ImportError as e:
        raise UserError(f"Auto-BLEU needs nltk (SlamKit's word tokenizer): {EVAL_EXTRA}") from e
    return NLTKWordTokenizer().tokenize(text)


def auto_bleu(text: str, n: int = 2, tokenize: Callable[[str], List[str]] = word_tokenize):
    """SlamKit's Auto-BLEU of one transcript: the fraction of its word n-grams that also occur
    elsewhere in it (0.0 when it has fewer than ``n`` words).

    >>> auto_bleu("the cat sat on the cat", tokenize=str.split)  # "the cat" twice of 5 bigrams
    0.4
    """
    if n < 1:
        raise UserError(f"auto_bleu_n must be at least 1, got {n}")
    words = tokenize(text)
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    return sum(counts[g] > 1 for g in grams) / len(grams)


def check_text_lm_folder(path: str) -> Path:
    """The GenPPL text LM folder, or a MissingFileError that says how to get one."""
    folder = Path(str(path)).expanduser()
    if not (folder / "config.json").is_file():
        raise MissingFileError(
            f"GenPPL text LM folder {folder} has no config.json: give a local Hugging Face "
            "causal-LM folder (e.g. `huggingface-cli download meta-llama/Llama-3.2-1B "
            "--local-dir DIR`), or set generation.genppl_model: null"
        )
    return folder


class TextLM:
    """A local Hugging Face causal LM that scores text: ``nll(texts)`` gives each text's mean
    token negative log-likelihood, in batches.

    Args:
        path: the model folder (saved with ``save_pretrained``: config.json, safetensors,
            tokenizer files), e.g. a local copy of meta-llama/Llama-3.2-1B.
        device: where the LM runs.
        dtype: ``"fp32"`` or ``"bf16"``.
        batch_size: texts per forward pass.
    """

    def __init__(self, path: str, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise UserError(f"GenPPL needs transformers to run its text LM: {EVAL_EXTRA}") from e
        folder = check_text_lm_folder(path)
        if dtype not in ("fp32", "bf16"):
            raise UserError(f"the text LM's dtype must be fp32 or bf16, got {dtype!r}")
        self.path = str(folder)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path,
            local_files_only=True,
            dtype=torch.float32 if dtype == "fp32" else torch.bfloat16,
        )
        self.model.eval().to(self.device)

    @torch.no_grad()
    def nll(self, texts: Sequence[str]) -> List[Optional[float]]:
        """Mean negative log-likelihood per token of each text (None for a text with no token
        to predict). Texts are batched longest first with right padding; padding is masked."""
        ids = [self.tokenizer(t)["input_ids"] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: List[Optional[float]] = [None] * len(ids)
        for b0 in range(0, len(order), self.batch_size):
            idx = [i for i in order[b0 : b0 + self.batch_size] if len(ids[i]) > 1]
            if not idx:
                continue
            width = len(ids[idx[0]])
            tokens = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                tokens[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            tokens, mask = tokens.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=tokens, attention_mask=mask).logits.float()
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none"
            )
            keep = mask[:, 1:].float()
            per_text = (losses * keep).sum(1) / keep.sum(1)
            for row, i in enumerate(idx):
                out[i] = float(per_text[row])
        return out


def genppl(nlls: Sequence[Optional[float]], confidence: float = 0.95) -> dict:
    """SlamKit's GenPPL from per-transcript mean NLLs: ``exp(mean)``, with the Student-t
    interval of the mean NLL mapped through ``exp``.

    Returns:
        ``{n, mean (the GenPPL), ci_low, ci_high, mean_nll, empty, confidence, method}``.
    """
    done = [v for v in nlls if v is not None]
    s = mean_ci(done, confidence)
    out = dict(
        n=s["n"],
        mean=None,
        ci_low=None,
        ci_high=None,
        mean_nll=s["mean"],
        empty=len(nlls) - len(done),
        confidence=confidence,
        method="exp(mean NLL), student-t on the NLL",
    )
    if s["mean"] is not None:
        out["mean"] = math.exp(s["mean"])
    if s["ci_low"] is not None:
        out.update(ci_low=math.exp(s["ci_low"]), ci_high=math.exp(s["ci_high"]))
    return out


def transcript_metrics(rows: List[dict], text_lm=None, auto_bleu_n: Optional[int] = 2) -> dict:
    """GenPPL (with ``text_lm``, a ``TextLM``) and Auto-BLEU (n = ``auto_bleu_n``, None: off) of
    the rows' ``continuation_text``, each with its interval; each row gets its ``genppl_nll``
    and ``auto_bleu``."""
    texts = [r["continuation_text"] or "" for r in rows]
    summary = {}
    if text_lm is not None:
        nlls = text_lm.nll(texts)
        for r, v in zip(rows, nlls):
            r["genppl_nll"] = v
        summary["genppl"] = {**genppl(nlls), "text_lm": str(getattr(text_lm, "path", text_lm))}
    if auto_bleu_n:
        for r, t in zip(rows, texts):
            r["auto_bleu"] = auto_bleu(t, auto_bleu_n)
        summary["auto_bleu"] = {**mean_ci([r["auto_bleu"] for r in rows]), "n_gram": auto_bleu_n}
    return summary


def read_transcripts(path: str) -> dict:
    """``{id: {"continuation_text", "prompt_text"}}`` from a ``.jsonl`` file with the columns
    ``id``, ``continuation_text`` and optionally ``prompt_text`` (a previous run's
    ``judgements.jsonl`` has them), so GenPPL, Auto-BLEU and the judge need no ASR."""
    import json

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise MissingFileError(
            f"generation.transcripts {p} not found: give a .jsonl file with id and "
            "continuation_text (and prompt_text for the judge), e.g. a run's judgements.jsonl"
        )
    out = {}
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{p}, line {n}: not JSON ({e})") from e
            if not isinstance(row, dict) or "id" not in row or "continuation_text" not in row:
                raise UserError(f"{p}, line {n}: needs the keys id and continuation_text")
            out[str(row["id"])] = {
                "continuation_text": row["continuation_text"],
                "prompt_text": row.get("prompt_text"),
            }
    if not out:
        raise UserError(f"generation.transcripts {p} has no rows")
    return out
