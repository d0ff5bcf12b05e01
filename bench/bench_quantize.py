"""Batch-1 decoding at the Llama-Mimi-1.3B shape per weight precision (``quantize``), against
transformers ``generate`` in fp32 and bf16 on the same weights, in the same run.

Shape: 16 layers x 2048, GQA 32/8, MLP 8192, tied embeddings, vocabulary 136,450 (Q = 4),
random N(0, 0.02) weights (no download). Prompt: ``<bos> <audio>`` + 25 frames (2 s, 102
tokens); reference sampling (temperature 0.8, top-k 30). For every precision:

- tokens/s of whole ``generate`` calls (prefill included) for ours and the peer, best of N,
  ours and the peer interleaved; the prefill time and the decode-only time per token.
- bytes read per token: the weights a decode step reads (ours: the decoder layers, one
  embedding row, one 2048-row level head; transformers: the layers and the full vocabulary
  projection), and the share of the bandwidth limit ``bandwidth / bytes per token`` reached.
  Bandwidth: a large copy (read + write counted; 4 KB and 2 MB pages, best of several),
  probed just before each timed call, since this VM's bandwidth moves by up to 2x from minute
  to minute; the share is the median call's, and the share of the run's best probe is given
  beside it.
- quality against fp32 on a fixed 200-token sequence: max |logit difference| and mean
  KL(fp32 || precision) over all 200 positions and the full vocabulary; top-1 agreement; and
  the agreement of greedy continuations over 128 tokens (share of equal tokens, first
  divergence). Random weights are not trained ones: check a real checkpoint before relying on
  int4.

    python bench/bench_quantize.py [--quick] [--write]   # --write: its section of RESULTS.md

On a CPU each precision runs eager and compiled (``--compile default``). Memory: the fp32 model
(5 GB) plus one other copy at a time (the transformers model, then each precision built from
the fp32 state dict in its activation dtype).
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torchtune import training
from torchtune.models.llama3_2 import llama3_2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_generate import (  # noqa: E402
    REFERENCE,
    _hf_copy,
    _prompt,
    _sync,
    _time_hf,
    bandwidth_probe,
    cpu_threads,
)

from llama_mimi_tt.generation import LevelHeads, SamplingParams, generate  # noqa: E402
from llama_mimi_tt.models import SHAPES, llama_mimi_1b  # noqa: E402
from llama_mimi_tt.quantize import (  # noqa: E402
    parse_quantize,
    quantize_model,
    weight_bytes_per_token,
)
from llama_mimi_tt.vocab import MimiVocab  # noqa: E402

Q = 4
SHAPE = SHAPES["1b"]
GREEDY = SamplingParams(temperature=0.0, top_k=None)
PRECISIONS = ["none", "bf16", "int8", "int4"]
GOAL_TOKENS_PER_S = {"bf16": 7.0, "int4": 25.0}
GOAL_VS_HF_BF16 = {"bf16": 1.2, "int4": 3.0}
SECTION = "## Quantized decoding at the Llama-Mimi-1.3B shape (bench_quantize.py)"
GPU_SECTION = (
    "## Quantized decoding on a GPU, Llama-Mimi-1.3B shape (bench_quantize.py --device cuda)"
)
REAL_TIME_TOKENS_PER_S = 12.5 * Q  # Mimi frames per second x levels


def build_fp32(device, num_layers=None, max_seq_len=512):
    """The 1.3B shape (``num_layers`` of its 16 layers for a smoke run), random N(0, 0.02)."""
    torch.manual_seed(0)
    with device:
        model = _builder(num_layers, max_seq_len)().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model


def _builder(num_layers, max_seq_len):
    if num_layers is None:
        return lambda: llama_mimi_1b(num_quantizers=Q, max_seq_len=max_seq_len)
    vocab_size = MimiVocab(num_quantizers=Q).size
    shape = dict(SHAPE, num_layers=num_layers)
    return lambda: llama3_2(
        vocab_size=vocab_size, max_seq_len=max_seq_len, rope_base=500_000, scale_factor=32,
        tie_word_embeddings=True, **shape,
    )  # fmt: skip


def build_precision(fp32_model, precision, device, num_layers=None):
    """A copy of the fp32 model in the precision's activation dtype (bf16, or fp32 on our CPU
    kernels; none: fp32), then ``quantize_model``."""
    spec = parse_quantize(precision)
    dtype = spec.activation_dtype(device) or torch.float32
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = _builder(num_layers, fp32_model.max_seq_len)()
    model.to_empty(device=device)
    model.load_state_dict(fp32_model.state_dict())  # copies into the bf16 parameters
    for m in model.modules():  # buffers (the RoPE cache) were made on meta: compute them
        if hasattr(m, "rope_init"):
            m.rope_init()
    return quantize_model(model.eval(), spec, device)


def decode_bytes(model, vocab) -> int:
    """Weight bytes one decode step of ours reads."""
    emb = next(model.tok_embeddings.parameters())
    head = LevelHeads(model, vocab).heads[1]
    norm = sum(p.numel() * p.element_size() for p in model.norm.parameters())
    return (
        weight_bytes_per_token(model)
        + norm
        + emb[0].numel() * emb.element_size()
        + head.numel() * head.element_size()
    )


def time_ours(model, prompt, vocab, new_tokens, params=REFERENCE, compile_mode=False):
    """``(seconds, output)`` of one ``generate`` call; ``compile_mode`` False: eager, else the
    ``torch.compile`` mode (None: inductor's default)."""
    _sync(prompt.device)
    t0 = time.perf_counter()
    out = generate(
        model, prompt, vocab, new_tokens // Q, semantic=params, acoustic=params,
        stop_at_end=False, compile=compile_mode is not False,
        compile_mode=compile_mode or None,
    )  # fmt: skip
    return time.perf_counter() - t0, out


@torch.no_grad()
def logits_of(model, ids) -> torch.Tensor:
    return model(ids)[0].float()


def quality(logits, ref_logits, greedy, ref_greedy) -> dict:
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    same = greedy == ref_greedy
    diverge = int((~same).nonzero()[0]) if (~same).any() else len(same)
    return dict(
        max_logit_diff=float((logits - ref_logits).abs().max()),
        mean_kl=float(kl.mean()),
        top1=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        greedy_agree=float(same.float().mean()),
        first_divergence=diverge,
    )


def time_probed(device, bw: list, *args, **kwargs):
    """``time_ours(*args, **kwargs)`` after a short bandwidth probe, whose copy figure is kept
    with it (and appended to ``bw``): a call's share of the limit is then taken against the
    bandwidth of its own moment, as this VM's moves by up to 2x from minute to minute."""
    probe = bandwidth_probe(device, repeats=2)
    bw.append(probe)
    return probe["copy"], time_ours(*args, **kwargs)


def _timed_rows(runs, new_tokens) -> dict:
    """``runs``: ``(copy bandwidth just before, (seconds, output))`` per timed call."""
    return dict(
        s=min(t for _, (t, _) in runs),
        s_token=min(o.decode_s / (new_tokens - 1) for _, (_, o) in runs),
        prefill_s=min(o.prefill_s for _, (_, o) in runs),
        probed=[(copy, o.decode_s / (new_tokens - 1)) for copy, (_, o) in runs],
    )


def run(
    quick: bool = False,
    new_tokens=None,
    repeats=None,
    greedy_tokens=None,
    device: str = "cpu",
    num_layers=None,
    compile_modes=(),
    budget_s: float = float("inf"),
    precisions=PRECISIONS,
) -> list:
    """Every precision, eager (and compiled with each of ``compile_modes``), against
    transformers in fp32 and bf16. Compiled runs are skipped once ``budget_s`` has passed."""
    started = time.monotonic()
    device = torch.device(device)
    load = os.getloadavg()
    threads = cpu_threads()
    torch.set_num_threads(threads)
    vocab = MimiVocab(num_quantizers=Q)
    defaults = (16, 1, 16) if quick else (48, 3, 128)
    new_tokens = new_tokens or defaults[0]
    repeats = repeats or defaults[1]
    greedy_tokens = greedy_tokens or defaults[2]
    prompt = _prompt(vocab, frames=25).to(device)  # 102 tokens, 2 s of audio
    seq = _prompt(vocab, frames=50, seed=1)[:, :200].to(device)  # the fixed quality sequence
    bw = [bandwidth_probe(device)]

    fp32 = build_fp32(device, num_layers)
    ref_logits = logits_of(fp32, seq)
    _, ref_out = time_ours(fp32, prompt, vocab, greedy_tokens, GREEDY)
    ref_greedy = ref_out.generated[0]

    # the peers: transformers in fp32, then (converted in place) in bf16
    shape = SHAPE if num_layers is None else dict(SHAPE, num_layers=num_layers)
    with device:
        hf = _hf_copy(fp32, shape, vocab.size)
    peer, peer_bytes = {}, {}
    results = {}
    for hf_dtype in ("fp32", "bf16"):
        if hf_dtype == "bf16":
            hf.to(torch.bfloat16)
        _time_hf(hf, prompt, 2)  # warm-up
        peer_bytes[hf_dtype] = sum(p.numel() * p.element_size() for p in hf.parameters())
        t_full, t_one = [], []
        for _ in range(repeats):
            t_full.append(_time_hf(hf, prompt, new_tokens))
            t_one.append(_time_hf(hf, prompt, 1))
        peer[hf_dtype] = dict(s=min(t_full), s_token=(min(t_full) - min(t_one)) / (new_tokens - 1))
        bw.append(bandwidth_probe(device))
        print(f"bench_quantize: transformers {hf_dtype}: {1 / peer[hf_dtype]['s_token']:.1f} "
              "tokens/s", flush=True)  # fmt: skip
    del hf
    gc.collect()

    rows_q = {}
    for precision in precisions:
        try:
            model = build_precision(fp32, precision, device, num_layers)
            time_ours(model, prompt, vocab, 2 * Q)  # warm-up
            results[precision] = [
                time_probed(device, bw, model, prompt, vocab, new_tokens) for _ in range(repeats)
            ]
            _, g = time_ours(model, prompt, vocab, greedy_tokens, GREEDY)
            qual = quality(logits_of(model, seq), ref_logits, g.generated[0], ref_greedy)
        except Exception as e:  # report the precisions that run; say which did not
            print(f"bench_quantize: {precision} failed on {device}: {e!r}", flush=True)
            model = None
            gc.collect()
            continue
        bytes_ = decode_bytes(model, vocab)
        rows_q[precision] = dict(
            **_timed_rows(results[precision], new_tokens), bytes=bytes_, **qual
        )
        print(f"bench_quantize: ours {precision}: {1 / rows_q[precision]['s_token']:.1f} "
              "tokens/s", flush=True)  # fmt: skip
        for mode in compile_modes:
            if time.monotonic() - started > budget_s:
                print(f"bench_quantize: {precision} compiled ({mode}) skipped: over the time "
                      "budget", flush=True)  # fmt: skip
                continue
            name = f"{precision}, compiled ({mode or 'default'})"
            try:
                torch.compiler.reset()
                t0 = time.perf_counter()
                time_ours(model, prompt, vocab, 2 * Q, compile_mode=mode)  # compiles
                warm = time.perf_counter() - t0
                runs = [
                    time_probed(device, bw, model, prompt, vocab, new_tokens, compile_mode=mode)
                    for _ in range(repeats)
                ]
            except Exception as e:  # report what works; say what did not
                print(f"bench_quantize: {name} failed: {e!r}", flush=True)
                continue
            rows_q[name] = dict(
                **_timed_rows(runs, new_tokens), bytes=bytes_, **qual, compile_s=warm
            )
            print(f"bench_quantize: ours {name}: {1 / rows_q[name]['s_token']:.1f} tokens/s "
                  f"(first call {warm:.0f} s)", flush=True)  # fmt: skip
        del model
        gc.collect()
        bw.append(bandwidth_probe(device))
    return _rows(
        rows_q, peer, peer_bytes, bw, new_tokens, repeats, greedy_tokens, threads, load, device
    )


def _rows(rows_q, peer, peer_bytes, bw, new_tokens, repeats, greedy, threads, load, device):
    copy = max(b["copy"] for b in bw)
    read = max(b["read"] for b in bw)
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        where = (
            f"CPU, {threads} thread(s), {os.cpu_count()} cores, load average "
            f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at start"
            f"{' (the machine was shared)' if load[0] > 1.0 else ''}"
        )
    common = (
        f"{where}; {new_tokens} new tokens after a 102-token prompt, best of {repeats}; "
        "tokens/s and ratios are decode steps (prefill apart; transformers: a 1-token call "
        "subtracted); bandwidth limit = copy bandwidth / bytes per token, the copy bandwidth "
        "(1 GiB, read + write counted, 4 KB and 2 MB pages, best of several) probed just before "
        "each timed call; the share is the median call's. The run's best probe: copy "
        f"{copy / 1e9:.1f} GB/s, read-only sum {read / 1e9:.1f} GB/s ({len(bw)} probes, from "
        f"{min(b['copy'] for b in bw) / 1e9:.1f} GB/s copy); real time is "
        f"{REAL_TIME_TOKENS_PER_S:g} tokens/s (12.5 frames/s x Q = {Q})"
    )
    rows = []
    for hf_dtype in ("fp32", "bf16"):
        p = peer[hf_dtype]
        rows.append(
            dict(
                benchmark=f"quantize: transformers generate, {hf_dtype} (the peer)",
                metric="tokens/s",
                ours=None,
                peer=1 / p["s_token"],
                peer_name=f"transformers {hf_dtype}",
                ratio=None,
                goal="",
                met=None,
                notes=f"{1e3 * p['s_token']:.1f} ms per decode step, whole call "
                f"{new_tokens / p['s']:.2f} tokens/s, "
                f"{peer_bytes[hf_dtype] / 1e9:.2f} GB read per token, "
                f"{100 * peer_bytes[hf_dtype] / p['s_token'] / copy:.0f}% of its bandwidth "
                f"limit; real-time factor {REAL_TIME_TOKENS_PER_S * p['s_token']:.2f}",
            )
        )
    for precision, r in rows_q.items():
        tps = 1 / r["s_token"]
        vs_bf16 = peer["bf16"]["s_token"] / r["s_token"]
        share = r["bytes"] / r["s_token"] / copy  # against the run's best probe
        # each timed call against the copy bandwidth probed just before it; the median call
        local = statistics.median(r["bytes"] / s_tok / c for c, s_tok in r["probed"])
        base, _, mode = precision.partition(", ")  # e.g. "int4", "compiled (default)"
        goals, met = ["share >= 50%"], [local >= 0.5]
        if device.type == "cpu":  # the speed goals are for the 2-core CPU
            if base in GOAL_TOKENS_PER_S:
                goals.append(f">= {GOAL_TOKENS_PER_S[base]:g} tokens/s")
                met.append(tps >= GOAL_TOKENS_PER_S[base])
                goals.append(f">= {GOAL_VS_HF_BF16[base]:g}x HF bf16")
                met.append(vs_bf16 >= GOAL_VS_HF_BF16[base])
            if base == "int8":  # against bf16 run the same way (eager or compiled)
                bf16 = rows_q.get(", ".join(filter(None, ["bf16", mode])))
                goals.append("faster than bf16")
                met.append(bf16 is not None and r["s_token"] < bf16["s_token"])
        name = "fp32 (none)" + precision[4:] if base == "none" else precision
        compiled = f"; first (compiling) call {r['compile_s']:.0f} s" if "compile_s" in r else ""
        rows.append(
            dict(
                benchmark=f"quantize: ours {name}",
                metric="tokens/s (vs HF bf16)",
                ours=tps,
                peer=1 / peer["bf16"]["s_token"],
                peer_name="transformers bf16, same run",
                ratio=vs_bf16,
                goal="; ".join(goals),
                met=all(met),
                notes=f"vs HF fp32 {peer['fp32']['s_token'] / r['s_token']:.2f}x; whole call "
                f"{new_tokens / r['s']:.2f} tokens/s ({peer['bf16']['s'] / r['s']:.2f}x HF bf16); "
                f"{1e3 * r['s_token']:.1f} ms per decode step, prefill {r['prefill_s']:.2f} s"
                f"{compiled}; real-time factor {REAL_TIME_TOKENS_PER_S * r['s_token']:.2f}; "
                f"{r['bytes'] / 1e9:.3f} GB per token, {100 * local:.0f}% of its bandwidth limit "
                f"at the time (median call; {100 * share:.0f}% of the run's best probe, "
                f"{copy / r['bytes']:.1f} tokens/s; {100 * r['bytes'] / r['s_token'] / read:.0f}%"
                " of the best read-only probe); goals met: "
                + ", ".join(f"{g}: {'yes' if m else 'no'}" for g, m in zip(goals, met))
                + f"; quality vs fp32: max |logit diff| {r['max_logit_diff']:.3g}, mean KL "
                f"{r['mean_kl']:.2e}, top-1 {100 * r['top1']:.0f}%, greedy {greedy}-token agreement "
                f"{100 * r['greedy_agree']:.0f}% (first divergence at {r['first_divergence']})",
            )
        )
    rows[0]["notes"] = common + "; " + rows[0]["notes"]
    for r in rows:
        r["setup"] = common
        r["device"] = device.type
    return rows


def markdown(rows) -> str:
    """The section for bench/RESULTS.md: a table per precision, then the notes."""
    head = rows[0]["setup"]
    cuda = rows[0]["device"] == "cuda"
    lines = [
        GPU_SECTION if cuda else SECTION,
        "",
        f"Written by `python bench/bench_quantize.py {'--device cuda ' if cuda else ''}--write`. "
        f"{head}.",
        "",
        "| route | tokens/s | vs HF bf16 | notes |",
        "|---|---|---|---|",
    ]
    for r in rows:
        tps = r["ours"] if r["ours"] is not None else r["peer"]
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        note = r["notes"][len(head) + 2 :] if r["notes"].startswith(head) else r["notes"]
        lines.append(f"| {r['benchmark'].split(': ', 1)[1]} | {tps:.2f} | {ratio} | {note} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = HERE / "RESULTS.md") -> None:
    """Replaces this benchmark's section of RESULTS.md (or appends it), leaving the rest."""
    section = text.split("\n", 1)[0]
    old = path.read_text() if path.exists() else ""
    if section in old:
        before, rest = old.split(section, 1)
        after = rest[rest.find("\n## ") :] if "\n## " in rest else ""
        new = before + text + after
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write", action="store_true", help="write its section of RESULTS.md")
    parser.add_argument("--new-tokens", type=int, help="timed tokens per call (default 48)")
    parser.add_argument("--repeats", type=int, help="timed calls per route (default 3)")
    parser.add_argument("--greedy-tokens", type=int, help="greedy agreement length (default 128)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--layers", type=int, help="of the 16 layers, build only this many (smoke)")
    parser.add_argument(
        "--compile", nargs="*", default=None, metavar="MODE",
        help="also time compiled decoding in these torch.compile modes ('default', "
        "'reduce-overhead'; none: eager only); default: reduce-overhead on cuda, default on cpu",
    )  # fmt: skip
    parser.add_argument(
        "--budget-s", type=float, default=float("inf"), help="skip compiled runs after"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS)
    args = parser.parse_args()
    modes = args.compile
    if modes is None:
        modes = ["reduce-overhead"] if args.device.startswith("cuda") else ["default"]
    modes = [None if m == "default" else m for m in modes]
    rows = run(
        args.quick, args.new_tokens, args.repeats, args.greedy_tokens, args.device, args.layers,
        modes, args.budget_s, args.precisions,
    )  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(row)
    text = markdown(rows)
    print(text)
    if args.write:
        write_section(text)
