"""Codes -> ids: MimiVocab's array arithmetic against the reference's string route.

The reference (llm-jp/llama-mimi) formats every code as ``<c_q>``, joins an utterance into one
string and runs the Hugging Face tokenizer with the audio tokens added. Both routes are timed
here on the same 64 utterances of 20 s at Q = 4 (250 frames, 1000 audio tokens each) and must
give the same ids.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_mimi_tt import MimiVocab  # noqa: E402
from tests.reference_tokenizer import reference_string, reference_tokenizer  # noqa: E402


def _best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(quick: bool = False) -> list:
    n_utts, seconds, q = (16 if quick else 64), 20, 4
    frames = int(seconds * 12.5)
    vocab = MimiVocab(text_vocab_size=128256, num_quantizers=q)
    tok = reference_tokenizer(128256, q)
    g = torch.Generator().manual_seed(0)
    utts = [torch.randint(0, 2048, (q, frames), generator=g) for _ in range(n_utts)]
    start, end = torch.tensor([vocab.audio_start_id]), torch.tensor([vocab.audio_end_id])

    def ours():
        return [torch.cat([start, vocab.encode(c), end]) for c in utts]

    def reference():
        return [tok.encode(reference_string(c)).ids for c in utts]

    stacked = torch.stack(utts)  # [64, Q, F]: equal lengths, so one call does the whole set

    def ours_batched():
        body = vocab.encode(stacked)
        n = body.shape[0]
        return torch.cat([start.expand(n, 1), body, end.expand(n, 1)], dim=1)

    t_ours, ids_ours = _best_of(ours, 5)
    t_batched, ids_batched = _best_of(ours_batched, 5)
    assert torch.equal(ids_batched, torch.stack(ids_ours))
    t_ref, ids_ref = _best_of(reference, 1 if quick else 2)
    assert all(a.tolist() == b for a, b in zip(ids_ours, ids_ref)), "routes disagree"
    n_tokens = n_utts * (frames * q + 2)
    name = f"codes -> ids ({n_utts} x {seconds} s, Q={q})"
    peer = "reference: <c_q> strings + HF tokenizer, per utterance"
    return [
        {
            "benchmark": name + ", one call for all",
            "metric": "tokens/s",
            "ours": n_tokens / t_batched,
            "peer": n_tokens / t_ref,
            "peer_name": peer,
            "ratio": t_ref / t_batched,
            "goal": ">= 100x",
            "met": t_ref / t_batched >= 100,
            "notes": "identical ids asserted",
        },
        {
            "benchmark": name + ", one call per utterance",
            "metric": "tokens/s",
            "ours": n_tokens / t_ours,
            "peer": n_tokens / t_ref,
            "peer_name": peer,
            "ratio": t_ref / t_ours,
            "goal": "(per-call overhead: ~10 us of torch dispatch per utterance)",
            "met": None,
            "notes": "identical ids asserted",
        },
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
