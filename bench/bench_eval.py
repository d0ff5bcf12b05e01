"""Likelihood evaluation throughput: batched scoring against one pair at a time.

The reference (llm-jp/llama-mimi ``eval/*.py``) scores a benchmark one utterance per forward
pass and reads ``model(input_ids, labels).loss``, i.e. full ``[length, vocab]`` logits then a
token mean. ``score_sequences`` sorts the sequences by length, right-pads ``batch_size`` of
them per forward pass and applies the output projection only where a token is scored. Both
run here on the same random pairs (audio lengths drawn like a benchmark's) with the same
weights and must give the same scores (allclose). Rows:

- batched vs the reference's route (one sequence per pass, full logits, token mean);
- batched vs our own scorer at ``batch_size=1`` (what batching alone buys).

On a CPU with the real vocabulary the work is the output projection's FLOPs (136k x width per
scored token): batching cannot beat the reference's route in ``mean`` mode there, while
``semantic`` mode projects only the level-0 positions (a quarter of them at Q = 4).

Shapes: ``llama_mimi_tiny`` (T = 512), and without ``--quick`` a mid-size model with the real
Llama 3 vocabulary (T = 128256: a 136k-row output projection, 4 layers of width 512). With a
CUDA device, also the 1B shape in bf16.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtune.models.llama3_2._component_builders import llama3_2  # noqa: E402

from llama_mimi_tt import MimiVocab, llama_mimi_1b, llama_mimi_tiny  # noqa: E402
from llama_mimi_tt.evaluation import score_sequences  # noqa: E402
from llama_mimi_tt.models import llama_mimi_vocab_size  # noqa: E402


def _pairs(n_pairs, seconds, vocab, seed=0):
    """2 * n_pairs sequences ``<bos> <audio> codes </audio>`` of random lengths in ``seconds``."""
    g = torch.Generator().manual_seed(seed)
    q = vocab.num_quantizers
    bos = vocab.text_vocab_size - 256  # <|begin_of_text|> follows the BPE ranks
    seqs, spans = [], []
    for _ in range(n_pairs):
        for _side in range(2):
            frames = int(torch.randint(int(seconds[0] * 12.5), int(seconds[1] * 12.5) + 1, (1,),
                                       generator=g))  # fmt: skip
            codes = torch.randint(0, vocab.codebook_size, (q, frames), generator=g)
            body = vocab.encode(codes)
            seqs.append([bos, vocab.audio_start_id, *body.tolist(), vocab.audio_end_id])
            spans.append((2, 2 + frames * q))
    return seqs, spans


@torch.no_grad()
def reference_route(model, seqs, spans, device, mode="mean", q=4):
    """One sequence per forward pass, full logits, mean log-likelihood of the audio tokens (of
    the level-0 tokens in ``semantic`` mode, as the reference's ``2::Q`` labels)."""
    out = []
    for s, (start, end) in zip(seqs, spans):
        x = torch.tensor(s, device=device)[None]
        logits = model(x)[0].float()
        pos = torch.arange(start, end, q if mode == "semantic" else 1, device=device)
        lp = logits[pos - 1].log_softmax(-1)
        out.append(lp.gather(1, x[0, pos, None]).mean().double().cpu())
    return torch.stack(out)


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _bench_shape(name, model, vocab, n_pairs, seconds, batch_size, device, dtype, tol,
                 modes=("mean",), single=True):  # fmt: skip
    model = model.to(device=device, dtype=dtype).eval()
    seqs, spans = _pairs(n_pairs, seconds, vocab)
    warm = slice(0, 2 * min(4, n_pairs))
    score_sequences(model, seqs[warm], spans[warm], vocab, batch_size=batch_size)  # warm-up
    reference_route(model, seqs[:2], spans[:2], device)
    tokens = sum(len(s) for s in seqs)
    rows = []
    for mode in modes:

        def ours_fn(bs=batch_size, mode=mode):
            return score_sequences(model, seqs, spans, vocab, batch_size=bs, mode=mode)

        t_ours, ours = _timed(ours_fn, device)
        t_ref, ref = _timed(lambda mode=mode: reference_route(model, seqs, spans, device, mode),
                            device)  # fmt: skip
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
        peers = [("reference route: one sequence per pass, full logits", t_ref)]
        if single:
            t_one, one = _timed(lambda: ours_fn(1), device)
            torch.testing.assert_close(ours, one, rtol=tol, atol=tol)
            peers.append(("same scorer, batch_size=1 (one sequence per pass)", t_one))
        label = (
            f"eval scoring, {name} on {device.type} ({n_pairs} pairs of {seconds[0]}-{seconds[1]}"
            f" s, {tokens} tokens, mode={mode}, batch_size={batch_size})"
        )
        notes = f"same scores asserted (allclose {tol:g}); {tokens / t_ours:,.0f} tokens/s batched"
        for peer_name, t_peer in peers:
            rows.append({
                "benchmark": label,
                "metric": "pairs/s",
                "ours": n_pairs / t_ours,
                "peer": n_pairs / t_peer,
                "peer_name": peer_name,
                "ratio": t_peer / t_ours,
                "goal": "> 1x",
                "met": t_peer / t_ours > 1,
                "notes": notes,
            })  # fmt: skip
    return rows


def run(quick: bool = False) -> list:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rows = []
    vocab = MimiVocab(text_vocab_size=512, num_quantizers=4)
    rows += _bench_shape(
        "llama_mimi_tiny", llama_mimi_tiny(), vocab, n_pairs=32 if quick else 96,
        seconds=(1, 4) if quick else (1, 8), batch_size=16, device=device,
        dtype=torch.float32, tol=1e-4,
    )  # fmt: skip
    if not quick:
        vocab = MimiVocab(text_vocab_size=128256, num_quantizers=4)
        mid = llama3_2(
            vocab_size=llama_mimi_vocab_size(4, 128256), num_layers=4, num_heads=8,
            num_kv_heads=2, embed_dim=512, intermediate_dim=1536, max_seq_len=2048,
            rope_base=500_000, norm_eps=1e-5, scale_factor=32, tie_word_embeddings=True,
        )  # fmt: skip
        rows += _bench_shape(
            "mid (4 x 512, Llama 3 vocabulary)", mid, vocab, n_pairs=6, seconds=(1, 3),
            batch_size=12, device=device, dtype=torch.float32, tol=1e-4,
            modes=("mean", "semantic"), single=False,
        )  # fmt: skip
    if device.type == "cuda":
        vocab = MimiVocab(text_vocab_size=128256, num_quantizers=4)
        rows += _bench_shape(
            "llama_mimi_1b bf16", llama_mimi_1b(), vocab, n_pairs=64, seconds=(2, 10),
            batch_size=32, device=device, dtype=torch.bfloat16, tol=5e-2,
            modes=("mean", "semantic"),
        )  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
