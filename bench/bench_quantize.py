"""Batch-1 decoding at the Llama-Mimi-1.3B shape per precision (``quantize``): our CPU kernels
against the library route that computes the same precision, whole decode steps, in one run.

Shape: 16 layers x 2048, GQA 32/8, MLP 8192, tied embeddings, vocabulary 136,450 (Q = 4),
random N(0, 0.02) weights (no download). Prompt: ``<bos> <audio>`` + 25 frames (2 s, 102
tokens); reference sampling (temperature 0.8, top-k 30). Every precision is built from the same
fp32 weights twice:

- ours (``LLAMA_MIMI_CPU_KERNELS=1``): our kernels (cpu_kernels.py) in the fused layers
  (fused_layers.py), where this CPU has them;
- library (``LLAMA_MIMI_CPU_KERNELS=0``, what a machine without them runs): torchtune's layers
  and bf16: PyTorch's ``F.linear`` in bf16; int8: a bf16 matmul on the int8 weight cast to
  bf16 times bf16 scales (which inductor compiles to PyTorch's int8 weight-only matmul); int4:
  torchao's ``Int4WeightOnlyConfig(layout=Int4CPULayout())`` over aten's int4 CPU matmul (the
  only route: our int4 kernel was deleted); w8a8 and w4a8: the same integer arithmetic in plain
  PyTorch (no PyPI library has int8 activations per 128 columns on a CPU); and for int8 also
  torchao's ``Int8WeightOnlyConfig`` ("torchao").
  ``none`` is the fp32 model on PyTorch's code, on every machine (one route).

Each route runs eager and compiled (``torch.compile``, inductor's default mode). The timed calls
are interleaved over the routes (ours eager, library eager, ours compiled, ...), ``--repeats``
rounds, and each figure is the best round's (a busy machine slows some rounds, never speeds one
up); tokens/s are decode steps (prefill apart). Ratio: ours / library tokens/s, eager / eager,
compiled / compiled and best / best; our kernel for a precision stays where best / best is at
least ``KEEP_RATIO``. Quality against fp32 (eager): max |logit difference|, mean KL(fp32 ||
route) and top-1 agreement over a fixed 200-token sequence and the full vocabulary, and the
agreement of greedy continuations. Random weights are not trained ones.

    python bench/bench_quantize.py [--repeats N] [--write]   # --write: its section of RESULTS.md
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torchtune import training
from torchtune.models.llama3_2 import llama3_2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_generate import REFERENCE, _prompt, _sync, cpu_threads  # noqa: E402

from llama_mimi_tt import cpu_kernels  # noqa: E402
from llama_mimi_tt.generation import LevelHeads, SamplingParams, generate  # noqa: E402
from llama_mimi_tt.models import SHAPES, llama_mimi_1b  # noqa: E402
from llama_mimi_tt.quantize import (  # noqa: E402
    InBf16,
    parse_quantize,
    quantize_model,
    weight_bytes_per_token,
)
from llama_mimi_tt.vocab import MimiVocab  # noqa: E402

Q = 4
SHAPE = SHAPES["1b"]
GREEDY = SamplingParams(temperature=0.0, top_k=None)
PRECISIONS = ["none", "bf16", "int8", "int4", "w8a8", "w4a8"]
KEEP_RATIO = 1.3  # our kernel for a precision stays where it is this much faster (best / best)
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


@contextmanager
def kernels(on: bool):
    """``LLAMA_MIMI_CPU_KERNELS`` set to 1 or 0 for the models built inside."""
    old = os.environ.get(cpu_kernels.SWITCH)
    os.environ[cpu_kernels.SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[cpu_kernels.SWITCH]
        else:
            os.environ[cpu_kernels.SWITCH] = old


def build_precision(fp32_model, precision, device, route, num_layers=None):
    """A copy of the fp32 model in the precision's activation dtype, then ``quantize_model``
    with our kernels on (route ``ours``) or off (``library``, ``torchao``: torchao's int8
    weight-only on the decoder linears in bf16, each run on its input rounded to bf16)."""
    spec = parse_quantize("none" if route == "torchao" else precision)
    dtype = spec.activation_dtype(device) or torch.float32
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = _builder(num_layers, fp32_model.max_seq_len)()
    model.to_empty(device=device)
    model.load_state_dict(fp32_model.state_dict())  # copies into the model's dtype
    for m in model.modules():  # buffers (the RoPE cache) were made on meta: compute them
        if hasattr(m, "rope_init"):
            m.rope_init()
    with kernels(route == "ours"):
        if route == "ours" and not spec.uses_cpu_kernel(device):
            return None
        model = quantize_model(model.eval(), spec, device)
    if route == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        linears = [(n, m) for n, m in model.layers.named_modules() if type(m) is nn.Linear]
        for _, m in linears:
            m.to(torch.bfloat16)
        quantize_(model.layers, Int8WeightOnlyConfig())
        for name, m in linears:
            parent, _, child = name.rpartition(".")
            setattr(model.layers.get_submodule(parent), child, InBf16(m))
    return model


def decode_bytes(model, vocab) -> int:
    """Weight bytes one decode step reads: the decoder layers, the final norm, one embedding
    row and one 2048-row level head."""
    emb = next(model.tok_embeddings.parameters())
    head = LevelHeads(model, vocab).heads[1]
    norm = sum(p.numel() * p.element_size() for p in model.norm.parameters())
    return (
        weight_bytes_per_token(model)
        + norm
        + emb[0].numel() * emb.element_size()
        + head.numel() * head.element_size()
    )


def generate_once(model, prompt, vocab, new_tokens, params=REFERENCE, compiled=False):
    """The output of one ``generate`` call of ``new_tokens`` tokens."""
    _sync(prompt.device)
    return generate(
        model, prompt, vocab, new_tokens // Q, semantic=params, acoustic=params,
        stop_at_end=False, compile=compiled,
    )  # fmt: skip


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


def run(
    new_tokens=16,
    repeats=3,
    greedy_tokens=32,
    device: str = "cpu",
    num_layers=None,
    compiled=True,
    precisions=PRECISIONS,
) -> dict:
    """Every precision on each of its routes, eager and compiled: ``{"setup": ..., "rows":
    [...]}``, a row per precision and route."""
    device = torch.device(device)
    load = os.getloadavg()
    threads = cpu_threads()
    torch.set_num_threads(threads)
    vocab = MimiVocab(num_quantizers=Q)
    prompt = _prompt(vocab, frames=25).to(device)  # 102 tokens, 2 s of audio
    seq = _prompt(vocab, frames=50, seed=1)[:, :200].to(device)  # the fixed quality sequence
    started = time.monotonic()

    fp32 = build_fp32(device, num_layers)
    ref_logits = logits_of(fp32, seq)
    ref_greedy = generate_once(fp32, prompt, vocab, greedy_tokens, GREEDY).generated[0]

    rows = []
    for precision in precisions:
        routes = ["library"] if precision == "none" or device.type != "cpu" else ["ours", "library"]
        if precision == "int8" and device.type == "cpu":
            routes.append("torchao")
        models = {}
        for route in routes:
            model = fp32 if precision == "none" else build_precision(
                fp32, precision, device, route, num_layers
            )  # fmt: skip
            if model is None:
                print(f"bench_quantize: {precision}: our kernel cannot run here", flush=True)
                continue
            g = generate_once(model, prompt, vocab, greedy_tokens, GREEDY).generated[0]
            qual = quality(logits_of(model, seq), ref_logits, g, ref_greedy)
            models[route] = model
            rows.append(
                dict(precision=precision, route=route, bytes=decode_bytes(model, vocab), **qual)
            )
        modes = [False, True] if compiled else [False]
        timed = {(route, mode): [] for route in models for mode in modes}
        compile_s = {}
        for route, mode in timed:  # warm-up; compiles (a graph per route, kept side by side)
            t0 = time.perf_counter()
            try:
                generate_once(models[route], prompt, vocab, 2 * Q, compiled=mode)
            except Exception as e:  # report what runs; say what did not
                print(f"bench_quantize: {precision} {route} compiled={mode}: {e!r}", flush=True)
                timed[route, mode] = None
            compile_s[route, mode] = time.perf_counter() - t0
        for _ in range(repeats):  # interleaved, so that every route sees the same moments
            for (route, mode), runs in timed.items():
                if runs is not None:
                    out = generate_once(models[route], prompt, vocab, new_tokens, compiled=mode)
                    runs.append(out.decode_s / (new_tokens - 1))
        for row in rows[-len(models) :]:
            for mode in modes:
                runs = timed[row["route"], mode]
                key = "compiled" if mode else "eager"
                row[key] = None if not runs else 1 / min(runs)
                row[f"{key}_median"] = None if not runs else 1 / statistics.median(runs)
                row[f"{key}_compile_s"] = compile_s[row["route"], mode] if mode else None
            print(f"bench_quantize: {row}", flush=True)
        del models, timed
        torch.compiler.reset()
        gc.collect()
    where = (
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
        if device.type == "cuda"
        else f"CPU ({_cpu_name()}), {threads} thread(s) of {os.cpu_count()} cores, load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at the end (other work shared the cores)"
    )
    setup = (
        f"{time.strftime('%Y-%m-%d')}, {where}; torch {torch.__version__}; {new_tokens} new "
        f"tokens after a 102-token prompt, best of {repeats} interleaved rounds (median in "
        f"brackets); {(time.monotonic() - started) / 60:.0f} min"
    )
    return dict(setup=setup, device=device.type, rows=_with_ratios(rows))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _with_ratios(rows) -> list:
    """Adds to each ``ours`` row its ratios to the best library route of its precision (per
    mode: the faster of ``library`` and ``torchao``), and whether the kernel stays."""
    for row in rows:
        if row["route"] != "ours":
            continue
        libs = [r for r in rows if r["precision"] == row["precision"] and r["route"] != "ours"]
        best = {"ours": max(filter(None, (row.get("eager"), row.get("compiled"))), default=0)}
        for key in ("eager", "compiled"):
            lib = max((r[key] for r in libs if r.get(key)), default=None)
            if row.get(key) and lib:
                row[f"ratio_{key}"] = row[key] / lib
            best[key] = lib or 0
        lib_best = max(best["eager"], best["compiled"])
        row["ratio_best"] = best["ours"] / lib_best if lib_best else None
        row["kept"] = row["ratio_best"] is not None and row["ratio_best"] >= KEEP_RATIO
    return rows


def _tps(row, key) -> str:
    if row.get(key) is None:
        return "-"
    return f"{row[key]:.1f} ({row[f'{key}_median']:.1f})"


def markdown(result) -> str:
    """The section for bench/RESULTS.md: one row per precision and route."""
    cuda = result["device"] == "cuda"
    lines = [
        GPU_SECTION if cuda else SECTION,
        "",
        f"Written by `python bench/bench_quantize.py {'--device cuda ' if cuda else ''}--write`"
        f": {result['setup']}. Ours: our kernels in the fused layers; library: the route "
        "without them (torchtune's layers; bf16 `F.linear` in bf16, int8 a bf16 matmul on the "
        "int8 weight then bf16 scales, int4 torchao `Int4CPULayout` on every machine, w8a8/w4a8 "
        "the same integer arithmetic in PyTorch; torchao: its `Int8WeightOnlyConfig`). Tokens/s of decode steps; ratio = ours / the faster library "
        "route of the precision (eager, compiled; best: the faster mode of each); quality "
        "against fp32 (eager); random weights, so int4's and w4a8's quality says little.",
        "",
        "| precision | route | eager tokens/s | compiled tokens/s | ours / library (eager, "
        "compiled, best) | GB per token | max abs logit diff | mean KL | top-1 | greedy "
        "agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = ""
        if r["route"] == "ours":
            parts = [r.get(f"ratio_{k}") for k in ("eager", "compiled", "best")]
            ratio = ", ".join("-" if p is None else f"{p:.2f}x" for p in parts)
            ratio += " (kept)" if r.get("kept") else " (below 1.3x)"
        lines.append(
            f"| {r['precision']} | {r['route']} | {_tps(r, 'eager')} | {_tps(r, 'compiled')} | "
            f"{ratio} | {r['bytes'] / 1e9:.3f} | {r['max_logit_diff']:.3g} | "
            f"{r['mean_kl']:.2e} | {100 * r['top1']:.0f}% | {100 * r['greedy_agree']:.0f}% |"
        )
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
    parser.add_argument("--write", action="store_true", help="write its section of RESULTS.md")
    parser.add_argument("--new-tokens", type=int, default=16, help="timed tokens per call")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument("--greedy-tokens", type=int, default=32, help="greedy agreement length")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--layers", type=int, help="of the 16 layers, build only this many (smoke)")
    parser.add_argument("--eager-only", action="store_true", help="no compiled runs")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS)
    args = parser.parse_args()
    result = run(
        args.new_tokens, args.repeats, args.greedy_tokens, args.device, args.layers,
        not args.eager_only, args.precisions,
    )  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    text = markdown(result)
    print(text)
    if args.write:
        write_section(text)
