"""Likelihood scoring of benchmark pairs: a pair is right when the positive audio scores higher.

A sequence is built as in training (``<bos> <audio> frames </audio>``) and scored by the
log-likelihood of its audio tokens: ``mode`` "mean" (every level; the reference's SALMon script),
"sum", or "semantic" (level 0 only; its sWUGGY, sBLIMP and StoryCloze scripts). A tie counts 0.5,
as in the official scorers, and ``accuracy_ties_as_wrong`` (the reference scripts' count) is
reported beside it. Sequences are scored in length-sorted batches, and the output projection runs
only at the scored positions, so ``[batch, length, vocab]`` logits are never built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchtune import utils
from tqdm import tqdm

from llama_mimi_tt.atomic_files import remove_temporaries
from llama_mimi_tt.benchmarks import Pair
from llama_mimi_tt.errors import writing
from llama_mimi_tt.generation import decoder_hidden
from llama_mimi_tt.vocab import MIMI_FRAME_RATE, MimiVocab

log = utils.get_logger("INFO")

SCORE_MODES = ("mean", "sum", "semantic")

__all__ = [
    "SCORE_MODES",
    "encode_audio_files",
    "format_table",
    "pair_outcome",
    "score_pairs",
    "score_sequences",
    "scored_positions",
    "summarize",
]


# =============================================================================================
# Scoring
# =============================================================================================
def scored_positions(
    span: Tuple[int, int],
    length: int,
    num_quantizers: int,
    mode: str = "mean",
    include_markers: bool = False,
) -> torch.Tensor:
    """Positions ``t`` whose token is scored (predicted from tokens ``0..t-1``).

    Args:
        span: ``(start, end)``: ``ids[start:end]`` are the audio codes, ``ids[start - 1]`` is
            ``<audio>`` and ``ids[end]`` (when ``end < length``) is ``</audio>``.
        length: the sequence length.
        num_quantizers: Q.
        mode: ``"mean"``, ``"sum"`` (every level) or ``"semantic"`` (level 0 only).
        include_markers: also score ``<audio>`` and ``</audio>`` (``</audio>`` only in
            ``"semantic"`` mode, matching the reference's ``2::Q`` label stride).

    Returns:
        int64 tensor of positions, ascending, all ``>= 1``.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    start, end = int(span[0]), int(span[1])
    if not 1 <= start <= end <= length:
        raise ValueError(
            f"audio span {span} does not fit a sequence of {length} tokens (need "
            "1 <= start <= end <= length; ids[start - 1] is <audio>)"
        )
    if (end - start) % num_quantizers:
        raise ValueError(
            f"audio span {span} holds {end - start} tokens, not a whole number of frames of "
            f"Q={num_quantizers} levels"
        )
    lo = start - 1 if include_markers else start
    hi = end + 1 if include_markers and end < length else end
    pos = torch.arange(max(lo, 1), hi)
    if mode == "semantic":
        pos = pos[(pos - start) % num_quantizers == 0]
    return pos


def _final_hidden(model: torch.nn.Module, tokens: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """The normalised last hidden states of a torchtune ``TransformerDecoder`` (output projection
    left out), or the logits of any other model: ``(tensor, is_logits)``."""
    if all(hasattr(model, a) for a in ("tok_embeddings", "layers", "norm", "output")):
        return decoder_hidden(model, tokens, last_only=False), False
    out = model(tokens)
    if isinstance(out, list):  # chunked output
        out = torch.cat(out, dim=1)
    return getattr(out, "logits", out), True


def _target_logprobs(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    is_logits: bool,
    rows: torch.Tensor,
    cols: torch.Tensor,
    targets: torch.Tensor,
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """``log p(targets | prefix)`` read at ``hidden[rows, cols]``, float32 ``[N]``.

    The logits are made ``chunk_elements`` at a time (default: 4M on CPU, where cache-sized
    chunks are fastest; 256M on GPU, about 1 GiB of float32)."""
    sel = hidden[rows, cols]
    if chunk_elements is None:
        chunk_elements = 2**28 if sel.device.type == "cuda" else 2**22
    if is_logits:
        vocab_size = sel.shape[-1]
    else:
        vocab_size = getattr(model, "_llama_mimi_vocab_rows", None)
        if vocab_size is None:
            vocab_size = model.output(sel[:1]).shape[-1]
            with contextlib.suppress(AttributeError):
                model._llama_mimi_vocab_rows = vocab_size
    step = max(1, chunk_elements // vocab_size)
    out = []
    for i in range(0, sel.shape[0], step):
        part = sel[i : i + step]
        logits = (part if is_logits else model.output(part)).float()
        out.append(logits.log_softmax(-1).gather(1, targets[i : i + step, None])[:, 0])
    return torch.cat(out) if out else sel.new_zeros(0, dtype=torch.float32)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """``model.eval()`` and KV caches off for the duration; both restored after."""
    was_training = model.training
    model.eval()
    caches = getattr(model, "caches_are_enabled", None)
    if callable(caches) and caches():
        from torchtune.modules.common_utils import disable_kv_cache

        ctx = disable_kv_cache(model)
    else:
        ctx = contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        model.train(was_training)


def _check_audio_ids(ids: torch.Tensor, span: Tuple[int, int], vocab: MimiVocab, i: int) -> None:
    start, end = span
    body = ids[start:end]
    pos = torch.arange(len(body))
    bad = ~vocab.is_audio(body) | (vocab.level_of(body) != pos % vocab.num_quantizers)
    if bad.any():
        j = int(bad.nonzero()[0])
        raise ValueError(
            f"sequence {i}: id {int(body[j])} at position {start + j} is not the level "
            f"{j % vocab.num_quantizers} audio code the span {span} expects "
            f"(audio ids are {vocab.audio_offset}..{vocab.audio_start_id - 1})"
        )


def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence,
    audio_spans: Sequence[Tuple[int, int]],
    vocab: MimiVocab,
    batch_size: int = 16,
    mode: str = "mean",
    include_markers: bool = False,
    device: Optional[torch.device] = None,
    progress: bool = False,
    desc: str = "scoring",
) -> torch.Tensor:
    """Log-likelihood scores of token sequences over their audio spans, many per forward pass.

    Args:
        model: a torchtune ``TransformerDecoder`` (or any model mapping ``[b, s]`` ids to
            ``[b, s, vocab]`` logits).
        sequences: 1-D id sequences (lists or tensors), e.g. from ``LlamaMimiTokenizer.tokenize``.
        audio_spans: ``(start, end)`` per sequence: ``seq[start:end]`` are whole frames of audio
            codes (``vocab.audio_spans`` gives them).
        vocab: the ``MimiVocab`` the ids were made with.
        batch_size: sequences per forward pass (a pair is two sequences).
        mode: ``"mean"``, ``"sum"`` or ``"semantic"`` (see the module docstring).
        include_markers: also score the ``<audio>`` / ``</audio>`` predictions.
        device: where to run; the model's device by default.
        progress: show a tqdm bar (counts sequences).
        desc: the bar's label.

    Returns:
        float64 tensor ``[len(sequences)]`` of scores (higher = more likely), on CPU.
    """
    if len(sequences) != len(audio_spans):
        raise ValueError(f"{len(sequences)} sequences but {len(audio_spans)} audio spans")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs = [torch.as_tensor(s, dtype=torch.long).flatten().cpu() for s in sequences]
    if not seqs:
        return torch.zeros(0, dtype=torch.float64)
    positions = []
    for i, (s, span) in enumerate(zip(seqs, audio_spans)):
        _check_audio_ids(s, span, vocab, i)
        pos = scored_positions(span, len(s), vocab.num_quantizers, mode, include_markers)
        if len(pos) == 0:
            raise ValueError(f"sequence {i} has no token to score in mode {mode!r} (span {span})")
        positions.append(pos)

    # identical sequences are scored once: their scores are then exactly equal
    first: Dict[Tuple, int] = {}
    owner = []
    for i, (s, span) in enumerate(zip(seqs, audio_spans)):
        owner.append(first.setdefault((tuple(s.tolist()), tuple(span)), i))
    unique = sorted(set(owner), key=lambda i: (-len(seqs[i]), i))

    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    scores = torch.full((len(seqs),), float("nan"), dtype=torch.float64)
    pbar = tqdm(total=len(unique), desc=desc, disable=not progress, unit="seq")
    with _eval_mode(model), torch.inference_mode():
        for b0 in range(0, len(unique), batch_size):
            batch = unique[b0 : b0 + batch_size]
            width = max(len(seqs[i]) for i in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)  # right padding, id 0
            for r, i in enumerate(batch):
                tokens[r, : len(seqs[i])] = seqs[i]
            rows = torch.cat([torch.full((len(positions[i]),), r) for r, i in enumerate(batch)])
            cols = torch.cat([positions[i] for i in batch])
            targets = tokens[rows, cols]
            hidden, is_logits = _final_hidden(model, tokens.to(device))
            lp = _target_logprobs(
                model, hidden, is_logits, rows.to(device), (cols - 1).to(device), targets.to(device)
            )
            lp = lp.double().cpu()
            total = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, lp)
            count = torch.bincount(rows, minlength=len(batch)).double()
            out = total if mode == "sum" else total / count
            scores[torch.tensor(batch)] = out
            pbar.update(len(batch))
    pbar.close()
    scores = scores[torch.tensor(owner)]
    if torch.isnan(scores).any():
        raise FloatingPointError(
            f"the model gave NaN log-likelihoods for {int(torch.isnan(scores).sum())} of "
            f"{len(scores)} sequences (check the weights and dtype)"
        )
    return scores


def pair_outcome(positive: float, negative: float, tie_tolerance: float = 0.0) -> float:
    """1.0 when the positive scores higher, 0.0 when lower, 0.5 for a tie
    (``|positive - negative| <= tie_tolerance``)."""
    if math.isnan(positive) or math.isnan(negative):
        raise ValueError(f"NaN score in a pair ({positive}, {negative})")
    if abs(positive - negative) <= tie_tolerance:
        return 0.5
    return 1.0 if positive > negative else 0.0


# =============================================================================================
# Audio -> codes, once, through a cache
# =============================================================================================
def encode_audio_files(
    paths: Sequence[str | Path],
    codec,
    cache_dir: Optional[str | Path] = None,
    batch_size: int = 8,
    progress: bool = True,
    save_every: int = 256,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Mimi codes of audio files, each encoded once and kept in a code cache.

    Encoding is the tokenize recipe's (``code_cache.encode_items``: files read, checked, mixed
    down and resampled, batched by length, unreadable ones skipped with their reason), and so is
    the cache: ``cache_dir`` is a code cache of whole files, ``save_every`` files a shard, whose
    plan records the codec's fingerprint and each file's path, size and modification time. A
    later run reads it, an interrupted one finishes it, and a changed file or codec makes it
    encode everything again. ``None``: no cache.

    Args:
        paths: audio files.
        codec: a ``MimiCodec`` (``sample_rate``, ``encode_batch(waves, sr, batch_size=...)``).
        cache_dir: the code cache folder (one per set of files), or ``None``.
        batch_size: files per encoder call.
        progress: tqdm bar.
        save_every: files per shard (work kept when interrupted).

    Returns:
        ``(codes, errors)``: ``{path: int16 codes [Q, F]}`` of every file that could be encoded,
        and ``{path: reason}`` of those that could not (missing, empty, NaN, undecodable).
    """
    from llama_mimi_tt.audio_sources import open_audio_files
    from llama_mimi_tt.code_cache import encode_items

    files, errors = [], {}
    stats = hashlib.sha256()  # what the cache is for: each file's path, size and mtime
    for p in dict.fromkeys(str(p) for p in paths):
        try:
            st = Path(p).stat()
        except OSError as e:
            errors[p] = f"FileNotFoundError: {e}"
            log.warning(f"skipping {p}: {e}")
            continue
        files.append(p)
        stats.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    source = open_audio_files(files, "benchmark audio")
    pbar = tqdm(total=len(files), desc="encoding audio", disable=not progress or not files)
    options = dict(max_seconds=None, batch_size=batch_size, logger=log)  # whole files
    options["progress"] = lambda n, seconds: pbar.update(n)
    if cache_dir is None:
        rows, skipped = encode_items(source, source.items, codec, **options)
        codes = {r["id"]: r["codes"] for r in rows}
    else:
        fingerprint = stats.hexdigest()[:16]
        codes, skipped = _cached_codes(
            Path(cache_dir), source, codec, fingerprint, save_every, pbar, options
        )
    pbar.close()
    errors.update({s["path"]: s["reason"] for s in skipped})
    return {p: torch.from_numpy(codes[p].astype("int16")) for p in files if p in codes}, errors


def _cached_codes(cache_dir, source, codec, files_fingerprint, shard_size, pbar, options):
    """``(codes by id, skipped)`` of a source through the code cache ``cache_dir``: shards that
    exist are read, the others encoded; a cache of other files or another codec is replaced."""
    from llama_mimi_tt import code_cache as cc

    shards = cc.shard_items(source.items, shard_size)
    settings = dict(
        num_shards=len(shards),
        shard_size=shard_size,
        num_quantizers=int(codec.num_quantizers),
        num_items=len(source),
        source=source.location,
        source_kind=source.kind,
        items_fingerprint=files_fingerprint,
        codec=cc.codec_fingerprint(codec),
        sample_rate=int(codec.sample_rate),
        frame_rate=float(getattr(codec, "frame_rate", MIMI_FRAME_RATE)),
    )
    try:
        cc.start_cache(cache_dir, **settings)
    except cc.CacheMismatchError:
        log.info(f"{cache_dir} holds the codes of other files or another codec: encoding again")
        cc.remove_cache(cache_dir)
        cc.start_cache(cache_dir, **settings)
    codes, skipped = {}, []
    for k, items in enumerate(shards):
        path = cache_dir / cc.shard_name(k, len(shards))
        if cc.shard_problem(path) is None:
            pbar.update(len(items))
        else:
            remove_temporaries(path)  # left by a killed run: this one owns the cache
            cc.encode_shard(path, source, items, codec, skip_short_files=True, **options)
        skipped += cc.shard_metadata(path)["skipped"]
        codes.update({uid: c for uid, _, c in cc.shard_codes(path)})
    cc.finalize_cache(cache_dir)
    return codes, skipped


# =============================================================================================
# Pairs -> records -> summary
# =============================================================================================
def _sequence(tokenizer, codes: torch.Tensor, max_frames: Optional[int]) -> Tuple[List[int], Tuple]:
    """``<|begin_of_text|> <audio> codes </audio>`` and its audio span."""
    q = tokenizer.vocab.num_quantizers
    codes = torch.as_tensor(codes).long()[:q]
    if max_frames is not None:
        codes = codes[:, :max_frames]
    ids, audio_start = tokenizer.tokenize(codes)
    start = audio_start + 1
    end = start + ((len(ids) - start) // q) * q
    return ids, (start, end)


def score_pairs(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[Pair],
    codes: Mapping[str, torch.Tensor],
    batch_size: int = 16,
    mode: str = "mean",
    include_markers: bool = False,
    max_seconds: Optional[float] = None,
    tie_tolerance: float = 0.0,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> List[dict]:
    """Scores every pair; one record per pair (JSON-ready).

    Args:
        model: the Llama-Mimi model.
        tokenizer: a ``LlamaMimiTokenizer`` (builds ``<|begin_of_text|> <audio> .. </audio>``).
        pairs: from ``read_suite``.
        codes: ``{path: [Q', F]}`` with ``Q' >= Q`` (``encode_audio_files``).
        batch_size: sequences per forward pass.
        mode, include_markers: see ``score_sequences``.
        max_seconds: cut the audio to this length before scoring (the reference cuts at 20 s,
            its training length; Mimi's encoder is causal, so cutting codes equals cutting audio).
        tie_tolerance: ``|pos - neg|`` at or below this is a tie (0.5).
        device: where to run.
        progress: tqdm bar.

    Returns:
        ``[{suite, subset, pair_id, positive, negative, score_positive, score_negative,
        frames_positive, frames_negative, outcome}]``; pairs whose audio is missing from
        ``codes`` get ``outcome = None`` and ``skipped`` with the reason.
    """
    max_frames = round(max_seconds * MIMI_FRAME_RATE) if max_seconds else None
    seq_of: Dict[str, int] = {}
    sequences, spans = [], []
    for path in dict.fromkeys(p for pair in pairs for p in (pair.positive, pair.negative)):
        if path in codes and torch.as_tensor(codes[path]).shape[-1] > 0:
            ids, span = _sequence(tokenizer, codes[path], max_frames)
            seq_of[path] = len(sequences)
            sequences.append(ids)
            spans.append(span)
    scores = score_sequences(
        model,
        sequences,
        spans,
        tokenizer.vocab,
        batch_size=batch_size,
        mode=mode,
        include_markers=include_markers,
        device=device,
        progress=progress,
        desc=pairs[0].suite if pairs else "scoring",
    ).tolist()
    q = tokenizer.vocab.num_quantizers
    records = []
    for pair in pairs:
        rec = asdict(pair)
        missing = [p for p in (pair.positive, pair.negative) if p not in seq_of]
        if missing:
            rec.update(outcome=None, skipped=f"no codes for {', '.join(missing)}")
        else:
            i, j = seq_of[pair.positive], seq_of[pair.negative]
            rec.update(
                score_positive=scores[i],
                score_negative=scores[j],
                frames_positive=(spans[i][1] - spans[i][0]) // q,
                frames_negative=(spans[j][1] - spans[j][0]) // q,
                outcome=pair_outcome(scores[i], scores[j], tie_tolerance),
            )
        records.append(rec)
    return records


def _stats(outcomes: List[Optional[float]]) -> dict:
    done = [o for o in outcomes if o is not None]
    n = len(done)
    return {
        "pairs": n,
        "accuracy": sum(done) / n if n else None,
        "ties": sum(o == 0.5 for o in done),
        "accuracy_ties_as_wrong": sum(o == 1.0 for o in done) / n if n else None,
        "skipped": len(outcomes) - n,
    }


def summarize(records: Sequence[Mapping]) -> Dict[str, dict]:
    """Per suite: ``{"subsets": {subset: stats}, "overall": stats, "macro_accuracy": float}``.

    ``stats`` = ``{pairs, accuracy (ties 0.5), ties, accuracy_ties_as_wrong, skipped}``;
    ``overall`` pools every pair of the suite, ``macro_accuracy`` is the mean over subsets (the
    way SALMon's per-subset table averages).
    """
    by_suite: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_suite[r["suite"]][r["subset"]].append(r["outcome"])
    out = {}
    for suite, subsets in by_suite.items():
        stats = {s: _stats(o) for s, o in sorted(subsets.items())}
        accs = [s["accuracy"] for s in stats.values() if s["accuracy"] is not None]
        out[suite] = {
            "subsets": stats,
            "overall": _stats([o for v in subsets.values() for o in v]),
            "macro_accuracy": sum(accs) / len(accs) if accs else None,
        }
    return out


def format_table(summary: Mapping[str, Mapping]) -> str:
    """A plain-text table of ``summarize``'s output: one row per subset and one per suite."""

    def pct(x):
        return "    -" if x is None else f"{100 * x:5.1f}"

    head = f"{'suite':<12} {'subset':<24} {'pairs':>6} {'acc %':>6} {'ties':>5} {'strict %':>8}"
    lines = [head, "-" * len(head)]
    for suite, s in summary.items():
        rows = list(s["subsets"].items()) if len(s["subsets"]) > 1 else []
        rows.append(("overall", s["overall"]))
        for name, st in rows:
            skipped = f"  ({st['skipped']} skipped)" if st["skipped"] else ""
            lines.append(
                f"{suite:<12} {name:<24} {st['pairs']:>6} {pct(st['accuracy']):>6} "
                f"{st['ties']:>5} {pct(st['accuracy_ties_as_wrong']):>8}{skipped}"
            )
        if len(s["subsets"]) > 1:
            lines.append(
                f"{suite:<12} {'macro (mean of subsets)':<24} {'':>6} {pct(s['macro_accuracy']):>6}"
            )
    lines.append("acc: ties count 0.5 (official scorers); strict: ties count 0 (llm-jp scripts)")
    return "\n".join(lines)


def write_results(
    output_dir: str | Path, summary: Mapping, records: Sequence[Mapping], extra: Mapping = None
) -> Tuple[Path, Path]:
    """``results.json`` (summary plus ``extra``) and ``pairs.jsonl`` (one line per pair)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    with writing(results):
        results.write_text(json.dumps({**(extra or {}), "suites": summary}, indent=2))
    pairs = out / "pairs.jsonl"
    with writing(pairs), open(pairs, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return results, pairs
