"""Preference pairs for DPO: a chosen and a rejected continuation (Mimi codes) of one prompt.

``make_pairs`` (``tune run llama_mimi_pairs``) samples N continuations of each prompt with the
generate recipe's sampler, scores them (LLM judge on ASR transcripts, speaker similarity with
the prompt, and/or a score of the codes themselves: a weighted mix) and keeps, per prompt, the
best against the worst when their scores differ by at least ``min_margin``.

Pairs file: JSONL (or parquet), one pair a row; codes as ``[Q][F]`` integer lists, or audio
paths (relative to the file) that ``preference_dataset`` encodes with a codec::

    {"prompt_id": "clip01", "prompt_codes": [[...]], "chosen_codes": [[...]],
     "rejected_codes": [[...]], "chosen_score": 7.0, "rejected_score": 3.0}
    {"prompt_id": "x", "prompt_audio": "x.wav", "chosen_audio": "a.wav", "rejected_audio": "b.wav"}
"""

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset
from torchtune import utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE_INDEX

from llama_mimi_tt.atomic_files import replacing
from llama_mimi_tt.errors import MissingFileError, UserError

log = utils.get_logger("INFO")

PAIRS_FILE = "pairs.jsonl"
ROLES = ("prompt", "chosen", "rejected")


# ---- the pairs file -----------------------------------------------------------------------------
def read_pairs(path: str) -> List[Dict[str, Any]]:
    """Rows of a pairs file (.jsonl or .parquet); an error names the file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(
            f"pairs file {p} not found: make one with `tune run llama_mimi_pairs` or write "
            "JSONL rows with prompt/chosen/rejected codes or audio paths"
        )
    if p.suffix == ".parquet":
        rows = pq.read_table(p).to_pylist()
    else:
        rows = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise UserError(f"{p}, line {n}: not JSON ({e})") from None
    for n, row in enumerate(rows, start=1):
        for role in ROLES:
            if row.get(f"{role}_codes") is None and not row.get(f"{role}_audio"):
                raise UserError(f"{p}, row {n}: no {role}_codes and no {role}_audio")
    if not rows:
        raise UserError(f"{p} holds no pairs")
    return rows


def write_pairs(path: Path, pairs: Sequence[Mapping[str, Any]]) -> None:
    """Writes the pairs file whole (a temporary file renamed into place)."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")


def select_pairs(
    samples: Mapping[str, Sequence[Mapping[str, Any]]], min_margin: float
) -> List[Dict[str, Any]]:
    """Per prompt: the best-scored sample (chosen) against the worst (rejected), kept when the
    scores differ by at least ``min_margin``. ``samples[prompt_id]`` holds dicts with
    ``codes`` ([Q, F]), ``score`` and ``prompt_codes``."""
    pairs = []
    for prompt_id, group in samples.items():
        scored = [s for s in group if s.get("score") is not None]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda s: s["score"])
        worst = min(scored, key=lambda s: s["score"])
        if best["score"] - worst["score"] < min_margin:
            continue
        pairs.append(
            {
                "prompt_id": prompt_id,
                "prompt_codes": torch.as_tensor(best["prompt_codes"]).tolist(),
                "chosen_codes": torch.as_tensor(best["codes"]).tolist(),
                "rejected_codes": torch.as_tensor(worst["codes"]).tolist(),
                "chosen_score": float(best["score"]),
                "rejected_score": float(worst["score"]),
            }
        )
    return pairs


# ---- the dataset --------------------------------------------------------------------------------
class PreferenceDataset(Dataset):
    """Pairs as torchtune's DPO samples: ``chosen_input_ids`` / ``chosen_labels`` and the same for
    rejected; labels only on the continuation (the prompt is ``IGNORE_INDEX``)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer, codes_of: Callable):
        self.rows = rows
        self.tokenizer = tokenizer
        self.codes_of = codes_of

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        row = self.rows[index]
        prompt = self.codes_of(row, "prompt")
        out = {}
        for role in ("chosen", "rejected"):
            ids, start = self.tokenizer.continuation_ids(prompt, self.codes_of(row, role))
            out[f"{role}_input_ids"] = ids
            out[f"{role}_labels"] = [IGNORE_INDEX] * start + ids[start:]
        return out


def preference_dataset(tokenizer, source: str, codec=None) -> PreferenceDataset:
    """DPO data for ``config.instantiate(cfg.dataset, tokenizer)``: a pairs file (see the module
    docstring). Rows with audio paths need ``codec`` (a ``MimiCodec`` or its config)."""
    rows = read_pairs(source)
    root = Path(source).expanduser().parent
    q = tokenizer.vocab.num_quantizers
    if any(row.get(f"{r}_codes") is None for row in rows for r in ROLES) and codec is None:
        raise UserError(f"{source} names audio files: set dataset.codec to encode them")

    def codes_of(row, role):
        codes = row.get(f"{role}_codes")
        if codes is None:
            from llama_mimi_tt.audio import load_audio

            path = Path(row[f"{role}_audio"]).expanduser()
            path = path if path.is_absolute() else root / path
            codes = codec.encode(load_audio(path, codec.sample_rate), codec.sample_rate)
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() != 2 or codes.shape[0] < q:
            raise UserError(
                f"{source}, pair {row.get('prompt_id')!r}: {role} codes of shape "
                f"{tuple(codes.shape)}; expected [Q >= {q}, frames]"
            )
        return codes[:q]

    return PreferenceDataset(rows, tokenizer, codes_of)


# ---- making pairs -------------------------------------------------------------------------------
class SemanticDiversity:
    """A score of the codes alone (``scoring.codes``): the share of distinct level-0 (semantic)
    codes in a continuation. Speech LMs fall into loops that repeat a few semantic units; this
    prefers continuations that do not. A heuristic for runs without a judge, not a measure of
    quality."""

    def __call__(self, codes: torch.Tensor) -> float:
        semantic = torch.as_tensor(codes)[0]
        return semantic.unique().numel() / max(semantic.numel(), 1)


def combined_scores(
    judgements: Sequence[Mapping[str, Any]],
    codes: Sequence[torch.Tensor],
    weights: Mapping[str, float],
    codes_scorer: Optional[Callable] = None,
) -> List[Optional[float]]:
    """``sum(weight * score)`` per sample over ``judge`` (1-10), ``speaker`` (cosine) and
    ``codes`` (``codes_scorer(codes)``); None where a weighted score is missing (a failed
    judgement is never scored)."""
    fields = {"judge": "judge_score", "speaker": "speaker_similarity"}
    out = []
    for row, c in zip(judgements, codes):
        total = 0.0
        for name, w in weights.items():
            if not w:
                continue
            value = codes_scorer(c) if name == "codes" else row.get(fields[name])
            if value is None:
                total = None
                break
            total += float(w) * float(value)
        out.append(total)
    return out
