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

And ``1B_full_2_ranks``: 1B_full on 2 processes (FSDP2 over gloo), the recipe's loading of the
base checkpoint before (bench/every_rank_loads.py: every rank reads it) and ours (rank 0 reads
it and broadcasts), each rank's host memory after setup and at the end, from its log.

Prints a table (config, what ran, time, peak RSS of its process); ``--write`` replaces the
rehearsal sections of bench/RESULTS.md.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # scripts.tiny_base
sys.path.insert(0, str(REPO / "bench"))
from random_checkpoints import write_base, write_random_codes  # noqa: E402

TUNE = str(Path(sys.executable).parent / "tune")
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
def write_inputs(w: Path) -> None:
    import numpy as np
    import soundfile as sf

    if not (w / "Llama-3.2-1B" / "model.safetensors.index.json").is_file():
        write_base(w / "Llama-3.2-1B", "1b")
    if not (w / "Llama-3.1-8B" / "tokenizer.json").is_file():
        write_base(w / "Llama-3.1-8B", "8b", weights=False)
    if not (w / "codes").is_dir():
        write_random_codes(w / "codes", 400, num_quantizers=8)
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


# ---- host memory per rank of loading the base under FSDP2 ---------------------------------------
FSDP_NAME = "1B_full_2_ranks"
MEMORY_LINE = re.compile(r"rank (\d+): host memory (after setup|at the end): (.*)")


def fsdp_commands(w: Path):
    """(label, argv): 1B_full on 2 processes (FSDP2, gloo), the loading before and ours."""
    args = ["--config", "1B_full", f"base_dir={w / 'Llama-3.2-1B'}", f"cache_dir={w / 'codes'}"]
    args += TRAIN + ["log_peak_memory_stats=True"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone"]
    torchrun += ["--nproc_per_node", "2"]
    peer = str(REPO / "bench" / "every_rank_loads.py")
    yield (
        "every rank reads the checkpoint (before)",
        torchrun + [peer, *args, f"output_dir={w / 'out' / 'fsdp_peer'}"],
    )
    yield (
        "rank 0 reads, broadcasts a tensor at a time (ours)",
        [TUNE, "run", "--nproc_per_node", "2", "llama_mimi_full"]
        + [*args, f"output_dir={w / 'out' / 'fsdp_ours'}"],
    )


def host_memory(log: str):
    """{(rank, when): {field: GiB}} from the recipe's ``host memory`` lines."""
    found = {}
    for rank, when, fields in MEMORY_LINE.findall(log):
        found[int(rank), when] = {
            k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) GiB", fields)
        }
    return found


def fsdp_memory(w: Path):
    """Runs both loadings; returns the markdown table and ratio lines."""
    rows, measured = [], {}
    for label, argv in fsdp_commands(w):
        cwd = w / "logs" / FSDP_NAME / label.split()[0]
        cwd.mkdir(parents=True, exist_ok=True)
        print(f"== {FSDP_NAME}: {label}: {' '.join(argv[1:])}", flush=True)
        rc, seconds, _, tail = run_one(argv, cwd)
        memory = host_memory((cwd / "log.txt").read_text(errors="replace"))
        status = "ok" if rc == 0 and len(memory) == 4 else f"FAILED (exit {rc}): {tail[-1:]}"
        print(f"   {status}, {seconds:.0f} s", flush=True)
        measured[label] = memory
        for rank in (0, 1):
            setup = memory.get((rank, "after setup"), {})
            end = memory.get((rank, "at the end"), {})
            rows.append(
                f"| {label} | {rank} | {setup.get('rss', float('nan')):.2f} "
                f"({setup.get('rss_anon', float('nan')):.2f} + "
                f"{setup.get('rss_file', float('nan')):.2f}) | "
                f"{setup.get('peak_rss', float('nan')):.2f} | "
                f"{end.get('peak_rss', float('nan')):.2f} | {seconds:.0f} | {status} |"
            )
    table = [
        "| loading | rank | RSS after setup, GiB (private + mapped files) | peak RSS by then | "
        "peak RSS of the run (2 steps, save) | time (s) | result |",
        "|---|---:|---|---:|---:|---:|---|",
        *rows,
    ]
    peer, ours = (measured[label] for label, _ in fsdp_commands(w))
    ratios = []
    for rank in (0, 1):
        for when, key, what in (
            ("after setup", "peak_rss", "peak RSS of loading"),
            ("at the end", "peak_rss", "peak RSS of the run"),
        ):
            a, b = peer.get((rank, when), {}).get(key), ours.get((rank, when), {}).get(key)
            if a and b:
                ratios.append(
                    f"rank {rank}, {what}: {a:.2f} -> {b:.2f} GiB (before / ours = {a / b:.2f})"
                )
    return "\n".join(table), ratios


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
    if not args.only or FSDP_NAME in args.only:
        fsdp_table, ratios = fsdp_memory(w)
        print("\n" + fsdp_table + "\n" + "\n".join(ratios) + "\n", flush=True)
        if args.write:
            write_fsdp_results(fsdp_table, ratios)
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
    if args.write and rows:
        write_results("\n".join(table))
    return 0 if all(r[2] == "ok" for r in rows) else 1


def write_fsdp_results(table: str, ratios) -> None:
    head = (
        f"## Host memory per rank, 1B_full on 2 processes (bench/rehearsal.py --only {FSDP_NAME})"
    )
    body = (
        f"{head}\n\nCPU (2 cores, 24 GB), FSDP2 over gloo, `tune run --nproc_per_node 2 "
        "llama_mimi_full --config 1B_full` with the rehearsal's overrides (bf16, seq 64, batch 1 "
        "a rank, 2 steps, one validation batch, the end-of-epoch save with the Hugging Face "
        "weights), from the random Llama-3.2-1B-shaped base (2.5 GB of bf16 safetensors). Each "
        "rank logs `/proc/self/status` (`log_peak_memory_stats=True`): the peer is "
        "bench/every_rank_loads.py, the recipe's loading before (every rank reads the whole "
        "checkpoint, torchtune's `load_from_full_model_state_dict` shards it); ours: rank 0 "
        "reads it, torch's `set_model_state_dict(..., broadcast_from_rank0=True)` sends a tensor "
        "at a time. Same run, one after the other. `.venv/bin/python bench/rehearsal.py --only "
        f"{FSDP_NAME} --write`.\n\n" + table + "\n\n" + "\n".join(f"- {r}" for r in ratios) + "\n"
    )
    replace_section(head, body)


def write_results(table: str) -> None:
    head = "## Rehearsal of the shipped configs (bench/rehearsal.py)"
    body = (
        f"{head}\n\nCPU (2 cores, 24 GB), bf16, seq 64, batch 1; 1B from a random "
        "Llama-3.2-1B-shaped base (3 shards + index, tokenizer.json with T = 128256); 8B on the "
        "meta device. `.venv/bin/python bench/rehearsal.py`.\n\n" + table + "\n"
    )
    replace_section(head, body)


def replace_section(head: str, body: str) -> None:
    """Puts ``body`` in place of bench/RESULTS.md's section ``head`` (or at the end)."""
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.is_file() else ""
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + body + (text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + body
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
