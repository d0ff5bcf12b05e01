"""Rehearsal: every shipped 1B / 8B config (and tokenize) through its own recipe, at its real
shape, on this machine, before anyone with a GPU and real weights runs it.

    .venv/bin/python bench/rehearsal.py [--workdir /tmp/llama_mimi_rehearsal] [--only NAME ...]

Inputs it makes first (random, nothing downloaded), in ``workdir``:

- ``Llama-3.2-1B/``: a random Llama-3.2-1B-shaped base in Hugging Face format: config.json,
  3 bf16 safetensors shards + ``model.safetensors.index.json``, and a ``tokenizer.json`` of the
  real size (T = 128256: 128000 byte-level BPE entries built by random merges, then Llama 3's
  256 special tokens; a bad tokenizer, but the real size and layout);
- ``Llama-3.1-8B/``: config.json and the same tokenizer (no weights: the 8B configs run on the
  meta device);
- ``codes/``: a code cache of 400 random utterances (Q = 8), ``clips/`` and a one-subset SALMon.

Then each config in its own subprocess (freed before the next), with only paths, device (cpu),
dtype (bf16), sequence length (64), batch size (1), step counts and ``compile=False`` (no
compiler on a CPU rehearsal) overridden:

- tokenize, 1B_full, 1B_lora_single_device, 1B_generate, 1B_eval: ``tune run`` as a user would
  (1B_full from the random base; the others from 1B_full's ``step_N``: a Llama-Mimi-1.3B folder
  written by our training);
- 8B_full, 8B_lora_single_device, 8B_qlora_single_device: the recipe's own pieces as far as the
  meta device allows: checkpointer (config.json vs model), tokenizer, dataset and loader, model
  (LoRA / QLoRA wrapping), trainable parameters, optimizer; parameter counts against README's
  size table (``python -m llama_mimi_tt.models``).

Prints a table (config, what ran, time, peak RSS of its process); ``--write`` replaces the
rehearsal section of bench/RESULTS.md.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # scripts.tiny_base
TUNE = str(Path(sys.executable).parent / "tune")
T = 128256
COMMON = ["device=cpu", "dtype=bf16", "compile=False"]
TRAIN = COMMON + [
    "max_seq_len=64",
    "batch_size=1",
    "epochs=1",
    "max_steps_per_epoch=2",
    "gradient_accumulation_steps=1",
    "validation.max_batches=1",
    "log_every_n_steps=1",
]


# ---- inputs ------------------------------------------------------------------------------------
def write_tokenizer_json(out_dir: Path) -> None:
    """A byte-level BPE of 128000 entries (random merges) + Llama 3's 256 special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    from llama_mimi_tt.hf_export import bytes_to_unicode
    from llama_mimi_tt.tokenizer import llama3_special_tokens

    tokens = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(tokens)}
    merges, rng = [], random.Random(0)
    while len(tokens) < T - 256:
        pool = min(len(tokens), 4096)
        a, b = tokens[rng.randrange(pool)], tokens[rng.randrange(pool)]
        if a + b in vocab:
            continue
        vocab[a + b] = len(tokens)
        tokens.append(a + b)
        merges.append((a, b))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in llama3_special_tokens()]
    )
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    assert tok.get_vocab_size() == T and tok.token_to_id(bos) == 128000
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": "<|end_of_text|>", "model_max_length": 131072}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))


def write_base(out_dir: Path, size: str, num_shards: int = 3, weights: bool = True) -> None:
    """A random Llama 3 base of ``size``'s shape in HF format (bf16 shards + index)."""
    import torch
    from safetensors.torch import save_file

    from llama_mimi_tt.models import SHAPES
    from scripts.tiny_base import hf_llama_config

    s = SHAPES[size]
    tie = size == "1b"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = hf_llama_config(s, T, tie=tie)
    config.update(bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_json(out_dir)
    if not weights:
        return
    d, kv = s["embed_dim"], s["num_kv_heads"] * s["embed_dim"] // s["num_heads"]
    shapes = {"model.embed_tokens.weight": (T, d), "model.norm.weight": (d,)}
    for i in range(s["num_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (s["intermediate_dim"], d),
                p + "mlp.up_proj.weight": (s["intermediate_dim"], d),
                p + "mlp.down_proj.weight": (d, s["intermediate_dim"]),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    if not tie:
        shapes["lm_head.weight"] = (T, d)
    gen = torch.Generator().manual_seed(0)
    keys, weight_map, total = list(shapes), {}, 0
    per = -(-len(keys) // num_shards)
    for n in range(num_shards):
        name = f"model-{n + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {}
        for k in keys[n * per : (n + 1) * per]:
            shape = shapes[k]
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            part[k] = t.to(torch.bfloat16)
            total += part[k].numel() * 2
        save_file(part, out_dir / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_inputs(w: Path) -> None:
    import numpy as np
    import soundfile as sf

    from llama_mimi_tt.code_cache import write_code_cache

    if not (w / "Llama-3.2-1B" / "model.safetensors.index.json").is_file():
        write_base(w / "Llama-3.2-1B", "1b")
    if not (w / "Llama-3.1-8B" / "tokenizer.json").is_file():
        write_base(w / "Llama-3.1-8B", "8b", weights=False)
    if not (w / "codes").is_dir():
        g = np.random.default_rng(0)
        utts = [
            {"id": f"utt{i:04d}", "codes": g.integers(0, 2048, (8, 40)).astype(np.uint16)}
            for i in range(400)
        ]
        write_code_cache(w / "codes", utts, num_quantizers=8, shard_size=200)
    g = np.random.default_rng(1)
    (w / "clips").mkdir(exist_ok=True)
    salmon = w / "salmon" / "speaker_consistency"
    salmon.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        sf.write(w / "clips" / f"clip{i}.wav", 0.1 * g.standard_normal(24000), 24000)
        for option in (0, 1):
            sf.write(salmon / f"sample_{i}_{option}.wav", 0.1 * g.standard_normal(12000), 24000)


# ---- the runs ----------------------------------------------------------------------------------
def latest_step(folder: Path) -> Path:
    steps = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    if not steps:
        raise SystemExit(f"no step_N in {folder}: run 1B_full first (--only 1B_full)")
    return steps[-1]


def tune_commands(w: Path):
    """(config, what runs, argv) for the configs run through `tune run`."""
    base, codes = w / "Llama-3.2-1B", w / "codes"
    out = w / "out"
    yield (
        "tokenize",
        "tune run: 3 clips -> code cache (random Mimi), Q=8",
        ["llama_mimi_tokenize", "--config", "tokenize", f"source={w / 'clips'}"]
        + [f"output_dir={out / 'tokenize'}", "codec.path=random", "device=cpu"],
    )
    yield (
        "1B_full",
        "tune run: random Llama-3.2-1B base (3 shards) + audio rows, 2 AdamW steps, "
        "validation, HF save",
        ["llama_mimi_full", "--config", "1B_full", f"base_dir={base}", f"cache_dir={codes}"]
        + [f"output_dir={out / '1B_full'}"]
        + TRAIN,
    )
    mimi = lambda: latest_step(out / "1B_full")  # noqa: E731 (made by 1B_full)
    yield (
        "1B_lora_single_device",
        "tune run: 1B_full's step_N (a Llama-Mimi folder), LoRA r64 + audio rows, 2 steps, save",
        lambda: (
            ["llama_mimi_lora", "--config", "1B_lora_single_device"]
            + [f"base_dir={mimi()}", f"cache_dir={codes}", f"output_dir={out / '1B_lora'}"]
            + TRAIN
        ),
    )
    yield (
        "1B_generate",
        "tune run: model_dir=1B_full's step_N, 1 sample of 0.4 s, random Mimi",
        lambda: (
            ["llama_mimi_generate", "--config", "1B_generate", f"model_dir={mimi()}"]
            + [f"output_dir={out / '1B_generate'}", "codec.path=random", "num_samples=1"]
            + ["max_seconds=0.4"]
            + COMMON
        ),
    )
    yield (
        "1B_eval",
        "tune run: model_dir=1B_full's step_N, SALMon (1 subset, 3 pairs), random Mimi",
        lambda: (
            ["llama_mimi_eval", "--config", "1B_eval", f"model_dir={mimi()}"]
            + [f"output_dir={out / '1B_eval'}", "codec.path=random", "batch_size=2"]
            + [f"suites.salmon.path={w / 'salmon'}", "suites.salmon.subsets=[speaker_consistency]"]
            + [f"suites.{s}.path=null" for s in ("swuggy", "sblimp", "sstorycloze", "tstorycloze")]
            + [f"code_cache_dir={out / '1B_eval_codes'}", "max_seconds=1"]
            + COMMON[:2]  # eval has no compile key
        ),
    )


META_8B = {
    "8B_full": "llama_mimi_full",
    "8B_lora_single_device": "llama_mimi_lora",
    "8B_qlora_single_device": "llama_mimi_lora",
}


def meta_8b(name: str, w: Path) -> None:
    """The 8B config's own pieces on the meta device (run in a subprocess: --meta NAME)."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config, training
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from llama_mimi_tt.models import model_sizes
    from llama_mimi_tt.recipe_config import prepare_argv, resolve_config

    args = [f"base_dir={w / 'Llama-3.1-8B'}", f"cache_dir={w / 'codes'}"]
    args += [f"output_dir={w / 'out' / name}", "device=cpu", "dtype=bf16", "max_seq_len=64"]
    args += ["batch_size=1"]
    prepare_argv([META_8B[name], "--config", name, *args], META_8B[name])  # keys + inputs
    cfg = OmegaConf.merge(OmegaConf.load(resolve_config(name)), OmegaConf.from_dotlist(args))
    OmegaConf.resolve(cfg)
    done = []
    tokenizer = config.instantiate(cfg.tokenizer)
    done.append(f"tokenizer ({tokenizer.vocab.size:,} ids)")
    checkpointer = config.instantiate(cfg.checkpointer)
    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = config.instantiate(cfg.model)
    checkpointer.check_model(model)
    done.append("config.json == model")
    adapter = get_adapter_params(model)
    if adapter:
        set_trainable_params(model, adapter)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    variant = "qlora" if "qlora" in name else ("lora" if adapter else "full")
    lora = {}
    if adapter:
        keys = ("lora_attn_modules", "apply_lora_to_mlp", "lora_rank", "lora_alpha")
        lora = {k: cfg.model[k] for k in keys}
        lora["train_audio_rows"] = cfg.model.train_audio_rows
    want = model_sizes("8b", variant, cfg.num_quantizers, **lora)
    assert (params, trainable) == (want["params"], want["trainable"]), (params, trainable, want)
    readme = (REPO / "README.md").read_text()
    row = re.search(rf"\| Llama-Mimi-8B \| {variant} \| ([\d,]+) \| ([\d,]+) ", readme)
    assert row and row.group(1) == f"{params:,}", (row and row.group(0), params)
    if variant != "full" or trainable == params:
        assert row.group(2) == f"{trainable:,}", (row.group(0), trainable)
    done.append(f"{params:,} params, {trainable:,} trainable (= README)")
    try:
        optimizer = config.instantiate(
            cfg.optimizer, [p for p in model.parameters() if p.requires_grad]
        )
        done.append(f"{type(optimizer).__name__}")
    except Exception as e:  # fused AdamW refuses meta tensors
        optimizer = config.instantiate(
            cfg.optimizer, [p for p in model.parameters() if p.requires_grad], fused=False
        )
        done.append(f"{type(optimizer).__name__} (fused=False on meta: {str(e)[:40]}...)")
    from llama_mimi_tt.training import build_dataloader

    loader = build_dataloader(cfg.dataset, tokenizer, batch_size=1, shuffle=True)
    batch = next(iter(loader))
    done.append(f"dataset ({len(loader)} batches, tokens {list(batch['tokens'].shape)})")
    print("RESULT: " + "; ".join(done))


def run_one(argv, cwd: Path):
    """Runs ``argv``; returns (exit status, seconds, peak RSS in GiB, last lines)."""
    t0 = time.perf_counter()
    log = cwd / "log.txt"
    with open(log, "w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return p.returncode, seconds, usage.ru_maxrss / 2**20, tail


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/llama_mimi_rehearsal")
    ap.add_argument("--only", nargs="*", help="config names (default: all)")
    ap.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
    ap.add_argument("--meta", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    w = Path(args.workdir).resolve()
    if args.meta:
        return meta_8b(args.meta, w)
    if args.inputs:
        return write_inputs(w)
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # in a subprocess: a child forked from a big parent would report the parent's RSS as its peak
    subprocess.run([sys.executable, __file__, "--workdir", str(w), "--inputs"], check=True)
    print(f"inputs in {w} ({time.perf_counter() - t0:.0f} s)", flush=True)
    runs = [(n, what, argv, True) for n, what, argv in tune_commands(w)]
    runs += [
        (n, "meta device: ", [sys.executable, __file__, "--workdir", str(w), "--meta", n], False)
        for n in META_8B
    ]
    rows = []
    for name, what, argv, is_tune in runs:
        if args.only and name not in args.only:
            continue
        argv = argv() if callable(argv) else argv
        argv = [TUNE, "run", *argv] if is_tune else argv
        cwd = w / "logs" / name
        cwd.mkdir(parents=True, exist_ok=True)
        print(f"== {name}: {' '.join(argv[1:] if is_tune else argv[2:])}", flush=True)
        rc, seconds, rss, tail = run_one(argv, cwd)
        if not is_tune and rc == 0:
            what += next(
                (x[len("RESULT: ") :] for x in reversed(tail) if x.startswith("RESULT: ")), ""
            )
        status = "ok" if rc == 0 else f"FAILED (exit {rc}): {tail[-1] if tail else ''}"
        rows.append((name, what, status, seconds, rss))
        print(f"   {status}, {seconds:.0f} s, peak RSS {rss:.1f} GiB", flush=True)
    table = [
        "| config | what ran | result | time (s) | peak RSS (GiB) |",
        "|---|---|---|---:|---:|",
    ]
    table += [f"| {n} | {what} | {st} | {s:.0f} | {r:.1f} |" for n, what, st, s, r in rows]
    print("\n" + "\n".join(table))
    if args.write:
        write_results("\n".join(table))
    return 0 if all(r[2] == "ok" for r in rows) else 1


def write_results(table: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    head = "## Rehearsal of the shipped configs (bench/rehearsal.py)"
    text = path.read_text() if path.is_file() else ""
    body = (
        f"{head}\n\nCPU (2 cores, 24 GB), bf16, seq 64, batch 1; 1B from a random "
        "Llama-3.2-1B-shaped base (3 shards + index, tokenizer.json with T = 128256); 8B on the "
        "meta device. `.venv/bin/python bench/rehearsal.py`.\n\n" + table + "\n"
    )
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + body + (text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + body
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
