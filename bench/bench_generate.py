"""Batch-1 decoding speed: our interleaved sampler against transformers' ``generate``.

The reference generates with Hugging Face ``generate`` (full-vocabulary sampling, temperature
0.8, top_k 30, ``do_sample=True``) on a ``LlamaForCausalLM``. Here both run the same random
weights (copied from the torchtune model with ``tune_to_hf``) at a mid-size Llama shape that is
meaningful on a CPU: 12 layers, 768 wide, GQA 12/4 heads, tied embeddings and the full Llama-Mimi
vocabulary (128256 + 2048 * 4 + 2 = 136450 rows; the vocabulary projection is half the weights).
Same prompt length, same number of new tokens, warm-up first, runs interleaved, best of N.

The full run (not ``--quick``) also times our step compiled with ``torch.compile`` (its
compilation, a minute or two on a small CPU, is not timed). Also reported: the fraction of this machine's memory-bandwidth limit that our decoding reaches,
``(weight bytes read per token / seconds per token) / bandwidth``, the bandwidth measured in the
same run with a large ``torch`` copy (read + write bytes). Weight bytes per token for us: the
decoder layers, the final norm, one embedding row and one level's ``[2048, D]`` slice of the
output projection (KV-cache reads not counted).

With CUDA (a lent GPU), a ``gpu`` section adds the Llama-Mimi-1B shape at Q = 4 in bf16,
compiled: tokens/s and real-time factor (goals: >= 500 tokens/s, RTF <= 0.1).

    python bench/bench_generate.py [--quick]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_mimi_tt.generation import LevelHeads, SamplingParams, generate  # noqa: E402
from llama_mimi_tt.vocab import MIMI_FRAME_RATE, MimiVocab  # noqa: E402

Q = 4
CPU_SHAPE = dict(num_layers=12, num_heads=12, num_kv_heads=4, embed_dim=768, intermediate_dim=2048)
REFERENCE = SamplingParams(temperature=0.8, top_k=30, top_p=1.0)


def _tt_model(shape, vocab_size, max_seq_len=2048):
    from torchtune.models.llama3_2._component_builders import llama3_2

    return llama3_2(
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        rope_base=500_000,
        scale_factor=32,
        tie_word_embeddings=True,
        **shape,
    ).eval()


def _hf_copy(tt_model, shape, vocab_size):
    """transformers' LlamaForCausalLM with the same weights as the torchtune model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scripts.tiny_base import hf_llama_config, tied_hf_state_dict

    cfg = hf_llama_config(shape, vocab_size, tie=True)
    cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    sd = tied_hf_state_dict(tt_model.state_dict(), shape)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


def _prompt(vocab, frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, vocab.codebook_size, (Q, frames), generator=g)
    return torch.cat([torch.tensor([128000, vocab.audio_start_id]), vocab.encode(codes)])[None]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ours(model, prompt, vocab, new_tokens, compile=False, compile_mode=None):
    """``(seconds, output)`` of a whole ``generate`` call (its set-up included)."""
    _sync(prompt.device)
    t0 = time.perf_counter()
    out = generate(
        model, prompt, vocab, new_tokens // Q, semantic=REFERENCE, acoustic=REFERENCE,
        stop_at_end=False, compile=compile, compile_mode=compile_mode,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert out.num_new_tokens == [new_tokens]
    return seconds, out


def _time_hf(hf, prompt, new_tokens):
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        ids = hf.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
            temperature=REFERENCE.temperature, top_k=REFERENCE.top_k, top_p=1.0, pad_token_id=0,
        )  # fmt: skip
    _sync(device)
    assert ids.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - t0


def bandwidth_probe(device, nbytes=1024 * 2**20, repeats=5) -> dict:
    """Best bytes/s of a large copy (read + write counted) and of a read-only sum, each over
    ``nbytes`` (far beyond any cache); on a CPU in 4 KB pages and in 2 MB pages (where our
    kernels keep their weights), the better of the two. The goals use the copy figure."""
    from llama_mimi_tt.cpu_kernels import in_huge_pages

    src = torch.ones(nbytes // 4, device=device)
    buffers = [(src, torch.empty_like(src))]
    if device.type == "cpu":
        buffers.append((in_huge_pages(src), in_huge_pages(torch.zeros_like(src))))
    best = dict(copy=0.0, read=0.0)
    for _ in range(repeats):
        for a, b in buffers:
            for kind, work, args, moved in (("copy", b.copy_, (a,), 2), ("read", a.sum, (), 1)):
                _sync(device)
                t0 = time.perf_counter()
                work(*args)
                _sync(device)
                best[kind] = max(best[kind], moved * nbytes / (time.perf_counter() - t0))
    return best


def decode_weight_bytes(model, vocab) -> int:
    """Weight bytes our decoder reads per token (layers, final norm, one embedding row, one
    level head); the HF peer reads the layers plus the whole vocabulary projection."""
    layers = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    norm = sum(p.numel() * p.element_size() for p in model.norm.parameters())
    emb = model.tok_embeddings.weight
    head = LevelHeads(model, vocab).heads[1]
    return layers + norm + emb[0].numel() * emb.element_size() + head.numel() * head.element_size()


def cpu_threads() -> int:
    """``BENCH_THREADS``, else all cores, or 1 when the machine is busy: with other processes
    on the cores, every multi-threaded op waits at its barrier for a descheduled thread, which
    measures the neighbours rather than the code (both routes get the same setting)."""
    if os.environ.get("BENCH_THREADS"):
        return int(os.environ["BENCH_THREADS"])
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > 0.5 * cores else cores


def bare_gemv_seconds(model, vocab, repeats=3) -> float:
    """Seconds of the bare matrix-vector products over the weights one decode step reads
    (every linear of the layers and one level head), best of ``repeats``: the floor that the
    torchtune layers' other work (attention, RoPE, norms, KV-cache writes) adds to."""
    weights = [m.weight for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    weights.append(LevelHeads(model, vocab).heads[1])
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        best = min(best, time.perf_counter() - t0)
    return best


def run_cpu(quick: bool = False) -> list:
    load = os.getloadavg()[0]
    threads = cpu_threads()
    torch.set_num_threads(threads)
    vocab = MimiVocab(num_quantizers=Q)  # T = 128256: the full Llama 3 vocabulary
    torch.manual_seed(0)
    model = _tt_model(CPU_SHAPE, vocab.size)
    hf = _hf_copy(model, CPU_SHAPE, vocab.size)
    prompt = _prompt(vocab, frames=8)  # 34 tokens
    new_tokens, repeats = (32, 2) if quick else (128, 3)

    _time_ours(model, prompt, vocab, 8)  # warm-up
    _time_hf(hf, prompt, 8)
    variants = [False] if quick else [False, True]  # eager, and compiled (full run only)
    if not quick:
        _time_ours(model, prompt, vocab, 8, compile=True)  # compiles the step (~1-2 min)
    ours = {c: [] for c in variants}
    peer, peer_1, bw = [], [], []
    for _ in range(repeats):  # interleaved: a busy neighbour slows every route alike
        bw.append(bandwidth_probe(torch.device("cpu"))["copy"])
        for c in variants:
            ours[c].append(_time_ours(model, prompt, vocab, new_tokens, compile=c))
        peer.append(_time_hf(hf, prompt, new_tokens))
        peer_1.append(_time_hf(hf, prompt, 1))  # prefill + first token: subtracted below
    t_peer, bandwidth = min(peer), max(bw)
    t_gemv = bare_gemv_seconds(model, vocab)
    bytes_ours = decode_weight_bytes(model, vocab)
    bytes_peer = sum(p.numel() * p.element_size() for p in hf.parameters())  # tied: counted once
    s_token_peer = (t_peer - min(peer_1)) / (new_tokens - 1)
    frac_peer = bytes_peer / s_token_peer / bandwidth

    shape = (
        f"{CPU_SHAPE['num_layers']}L-{CPU_SHAPE['embed_dim']}d GQA "
        f"{CPU_SHAPE['num_heads']}/{CPU_SHAPE['num_kv_heads']}, V={vocab.size}, fp32"
    )
    common = (
        f"CPU, {threads} thread(s) (load average {load:.1f} at start), {shape}, "
        f"prompt {prompt.shape[1]} tokens; best of {repeats}, interleaved"
    )
    rows = []
    for c in variants:
        name = "compiled" if c else "eager"
        t_ours = min(t for t, _ in ours[c])
        s_token = min(o.decode_s / (new_tokens - 1) for _, o in ours[c])  # decode steps only
        frac = bytes_ours / s_token / bandwidth
        rows += [
            {
                "benchmark": f"generate ({name}): batch-1 decoding, {new_tokens} new tokens",
                "metric": "tokens/s",
                "ours": new_tokens / t_ours,
                "peer": new_tokens / t_peer,
                "peer_name": "transformers generate (full vocab, T 0.8, top_k 30, do_sample)",
                "ratio": t_peer / t_ours,
                "goal": ">= 1.5x",
                "met": t_peer / t_ours >= 1.5,
                "notes": f"{common}; same weights; whole calls timed, prefill included",
            },
            {
                "benchmark": f"generate ({name}): share of the memory-bandwidth limit",
                "metric": "% of bandwidth limit",
                "ours": 100 * frac,
                "peer": 100 * frac_peer,
                "peer_name": "transformers generate",
                "ratio": frac / frac_peer,
                "goal": ">= 50%",
                "met": frac >= 0.5,
                "notes": f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); weight bytes "
                f"per token ours {bytes_ours / 1e6:.0f} MB, peer {bytes_peer / 1e6:.0f} MB; per "
                f"decode step ours {1e3 * s_token:.1f} ms, peer {1e3 * s_token_peer:.1f} ms; "
                f"the bare GEMVs over our weights alone take {1e3 * t_gemv:.1f} ms "
                f"({100 * bytes_ours / t_gemv / bandwidth:.0f}% of the limit)",
            },
        ]
    return rows


def run_gpu(quick: bool = False) -> list:
    """Llama-Mimi-1B shape, Q = 4, bf16, compiled; a ~3 s prompt and 10 s of new audio. The
    HF peer runs its own random weights of the same shape (only speed is compared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_mimi_tt.models import SHAPES, llama_mimi_1b
    from scripts.tiny_base import hf_llama_config

    device = torch.device("cuda")
    vocab = MimiVocab(num_quantizers=Q)
    torch.manual_seed(0)
    with device:
        model = llama_mimi_1b(num_quantizers=Q, max_seq_len=2048).to(torch.bfloat16).eval()
    prompt = _prompt(vocab, frames=38).to(device)
    frames = 25 if quick else 125
    new_tokens = frames * Q
    timings = {}
    for mode in (None, "reduce-overhead"):  # plain inductor, then with CUDA graphs
        try:
            kw = dict(compile=True, compile_mode=mode)
            _time_ours(model, prompt, vocab, 2 * Q, **kw)  # compiles the step graphs
            timings[mode] = min(
                _time_ours(model, prompt, vocab, new_tokens, **kw)[0] for _ in range(2)
            )
        except Exception as e:  # report what works; say what did not
            print(f"bench_generate: compile mode {mode!r} failed: {e!r}", file=sys.stderr)
    mode, t_ours = min(timings.items(), key=lambda kv: kv[1])
    del model
    cfg = hf_llama_config(SHAPES["1b"], vocab.size, tie=True)
    cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with device:
        hf = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16).eval()
    _time_hf(hf, prompt, 8)
    t_peer = min(_time_hf(hf, prompt, new_tokens) for _ in range(2))
    audio_s = frames / MIMI_FRAME_RATE
    rtf, rtf_peer = t_ours / audio_s, t_peer / audio_s
    return [
        {
            "benchmark": f"generate (gpu): Llama-Mimi-1B shape, Q=4, bf16, {new_tokens} new tokens",
            "metric": "tokens/s",
            "ours": new_tokens / t_ours,
            "peer": new_tokens / t_peer,
            "peer_name": "transformers generate (full vocab, T 0.8, top_k 30), bf16",
            "ratio": t_peer / t_ours,
            "goal": ">= 500 tokens/s",
            "met": new_tokens / t_ours >= 500,
            "notes": f"{torch.cuda.get_device_name()}; ours compiled (mode {mode!r}, the faster "
            f"of {sorted(map(str, timings))}); prompt {prompt.shape[1]} tokens; whole calls timed",
        },
        {
            "benchmark": "generate (gpu): real-time factor, Llama-Mimi-1B shape, Q=4, bf16",
            "metric": "generation s / audio s",
            "ours": rtf,
            "peer": rtf_peer,
            "peer_name": "transformers generate, bf16",
            "ratio": rtf_peer / rtf,
            "goal": "<= 0.1",
            "met": rtf <= 0.1,
            "notes": "Mimi decoding not included",
        },
    ]


def run(quick: bool = False) -> list:
    rows = run_cpu(quick)
    if torch.cuda.is_available():
        rows += run_gpu(quick)
    else:
        rows.append(
            {
                "benchmark": "generate (gpu): Llama-Mimi-1B shape, Q=4, bf16",
                "metric": "tokens/s",
                "ours": None,
                "peer": None,
                "peer_name": "transformers generate",
                "ratio": None,
                "goal": ">= 500 tokens/s, RTF <= 0.1",
                "met": None,
                "notes": "no CUDA on this machine: run `python bench/bench_generate.py` on a GPU",
            }
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    for row in run(parser.parse_args().quick):
        print(row)
