"""GPU rehearsal: what our users run on a GPU, measured in one prepared command per stage.

    python bench/gpu_rehearsal.py --stage A     # training: 1B_full, 8B QLoRA, 1B_lora + resume
    python bench/gpu_rehearsal.py --stage B     # Mimi encoding, generate, eval, one DPO step
    python bench/gpu_rehearsal.py --dry-run     # both stages on CPU at tiny shapes (~1 min)

Each stage fits in 8 minutes on one H100/H200 (``--budget-s``, compile time included), makes
its own inputs in ``--workdir`` (random weights of the real shapes written as Hugging Face
folders, random code caches, a random full-size Mimi saved as a moshi file, 10-second clips)
and runs the shipped 1B/8B configs through the recipes' own functions, in this process
(``train`` of llama_mimi_full / llama_mimi_dpo, ``tokenize`` of llama_mimi_tokenize, the
``recipe_main`` of llama_mimi_generate and llama_mimi_eval, under ``config.parse``:
its ``__wrapped__``): the recipe's setup, compile and
loop run as in ``tune run``, the config checked as ``tune run`` checks it, and only the
overrides a user would give (paths, steps, batch size, ``log_every_n_steps=1``). In-process
rather than ``tune run`` subprocesses because compile caches then carry over from one
measurement to the next (each subprocess would pay torch's import and inductor's warm-up again)
and the dry run fits in the default test run. What differs from a user's run is said in each
figure's notes: the end-of-epoch save is skipped where it is not what is measured, and the 8B
weights are made on the GPU and handed to the recipe through its checkpointer
(``random_checkpoints.RandomWeightsCheckpointer``) instead of a 16 GB folder written and read back.

Each figure is appended to ``--results`` (bench/results_gpu_rehearsal.json) and the stage's
part of bench/RESULTS.md is rewritten as soon as it is measured, so a stage cut off by a time
limit keeps what it measured; ``--mirror DIR`` copies both files there after every figure
(``--mirror $OUT`` on the device machine). A measurement that would not fit in what is left of
the stage's budget is skipped with that reason, one that fails is recorded with its error, and
the stage goes on. What cannot run on the machine is skipped with the reason (moshi absent: no
Mimi encoding, generate or eval); without torchtune, torchao or the package itself nothing can
start, and the script exits naming what is missing (scripts/gpu_wheels.sh). The first lines
record torch, CUDA, the GPU and the versions of our dependencies.
"""

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # scripts.tiny_base; llama_mimi_tt and the recipes come installed

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = REPO / "bench" / "results_gpu_rehearsal.json"
MARKDOWN = REPO / "bench" / "RESULTS.md"
SECTION = "## GPU rehearsal (bench/gpu_rehearsal.py)"
STAGE_BUDGET_S = 480
Q = 4
# dense bf16 peak of the GPUs we expect (TFLOP/s, without sparsity), by a part of their name
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}
DEPENDENCIES = (
    "torch", "torchtune", "torchao", "moshi", "torchdata", "transformers", "datasets",
    "safetensors", "tokenizers", "omegaconf", "soundfile", "soxr", "numpy", "bitsandbytes",
)  # fmt: skip

# Sizes of the real run (GPU) and of the dry run (CPU, tiny model). None: the config's value.
REAL = dict(
    device="cuda", seq=None, batch=None, steps=40, from_step=10, lora_save_at=30,
    qlora_steps=12, qlora_from=4, qlora_batches=(2, 1), utterances=4000, frames=(62, 250),
    clips=512, clip_s=10.0, encode_batches=(16, 64), gen_seconds=10.0, gen_batches=(1, 16),
    gen_runs=2, salmon_pairs=64, dpo_pairs=64, dpo_steps=2, dpo_batch=None, dpo_accum=None,
)  # fmt: skip
DRY = dict(
    device="cpu", seq=64, batch=2, steps=3, from_step=2, lora_save_at=2,
    qlora_steps=3, qlora_from=2, qlora_batches=(2, 1), utterances=400, frames=(20, 60),
    clips=1, clip_s=0.5, encode_batches=(1,), gen_seconds=0.24, gen_batches=(1, 2),
    gen_runs=1, salmon_pairs=1, dpo_pairs=4, dpo_steps=2, dpo_batch=2, dpo_accum=1,
)  # fmt: skip
# the dry run's model: llama_mimi_tiny with the built-in byte tokenizer (T = 512)
TINY_T = 512
TINY = [f"tokenizer.text_vocab_size={TINY_T}", f"checkpointer.text_vocab_size={TINY_T}"]


# ---- where it runs ------------------------------------------------------------------------------
def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def environment(device: str) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "versions": {name: version(name) for name in DEPENDENCIES},
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        env["peak_bf16_tflops"] = next(
            (v for k, v in PEAK_BF16_TFLOPS.items() if k in props.name), None
        )
    else:
        env.update(gpu=None, peak_bf16_tflops=None)
    env["matmul_tflops"] = matmul_tflops(torch.device(device))
    return env


def matmul_tflops(device: torch.device) -> float:
    """Best TFLOP/s of a large matrix product (8192^3 in bf16 on a GPU; 512^3 in fp32 on a
    CPU): the peer that MFU is also given against, measured in the same run."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(8):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Between measurements: compiled graphs, cached blocks and peak statistics go."""
    gc.collect()
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- results ------------------------------------------------------------------------------------
class Results:
    """This run's figures, appended to the results JSON (and the RESULTS.md section) one by
    one; earlier runs in the file are kept."""

    def __init__(self, path: Path, markdown, mirror, stage: str, dry_run: bool, env: dict):
        self.path, self.markdown, self.mirror = Path(path), markdown, mirror
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"runs": []}
        self.run = {
            "stage": stage,
            "dry_run": dry_run,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "env": env,
            "entries": [],
        }
        self.data["runs"].append(self.run)
        self.save()

    def add(self, measurement, metric, value=None, goal=None, met=None, notes="", **extra):
        entry = dict(measurement=measurement, metric=metric, value=value, goal=goal, met=met)
        entry.update(notes=notes, **extra)
        self.run["entries"].append(entry)
        self.save()
        shown = "skipped: " + entry["skipped"] if entry.get("skipped") else fmt(value)
        if entry.get("error"):
            shown = "FAILED: " + entry["error"]
        print(f"   {measurement}: {metric} = {shown}" + (f" (goal {goal})" if goal else ""))

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1) + "\n")
        if self.markdown is not None:
            write_section(Path(self.markdown), self.data)
        if self.mirror:
            for p in (self.path, self.markdown):
                if p is None or not Path(p).is_file():
                    continue
                copy = Path(self.mirror) / Path(p).name
                if not (copy.exists() and copy.samefile(p)):
                    shutil.copy(p, copy)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    return str(x)


def render_section(data: dict) -> str:
    """The RESULTS.md section: the latest GPU run of each stage (never a dry run)."""
    lines = [
        SECTION,
        "",
        "`python bench/gpu_rehearsal.py --stage A` (training) and `--stage B` (data and "
        "inference) on one GPU; each stage's figures are appended to "
        "bench/results_gpu_rehearsal.json as they are measured (see bench/README.md).",
        "",
    ]
    latest = {}
    for run in data["runs"]:
        if not run["dry_run"]:
            latest[run["stage"]] = run
    if not latest:
        lines.append("Not yet run on a GPU.")
    for stage in sorted(latest):
        run, env = latest[stage], latest[stage]["env"]
        v = env["versions"]
        lines += [
            f"### Stage {stage}, {run['date'][:10]}, {env.get('gpu') or 'no GPU'}",
            "",
            f"torch {env['torch']} (CUDA {env['cuda']}), torchtune {v['torchtune']}, torchao "
            f"{v['torchao']}, moshi {v['moshi']}, transformers {v['transformers']}, Python "
            f"{env['python']}; dense bf16 peak {fmt(env.get('peak_bf16_tflops'))} TFLOP/s, "
            f"measured 8192^3 bf16 matmul {fmt(env.get('matmul_tflops'))} TFLOP/s.",
            "",
            "| measurement | metric | figure | goal | met | notes |",
            "|---|---|---:|---|---|---|",
        ]
        for e in run["entries"]:
            figure = fmt(e["value"])
            if e.get("skipped"):
                figure = "skipped"
            if e.get("error"):
                figure = "FAILED"
            notes = e.get("skipped") or e.get("error") or e.get("notes", "")
            met = "" if e["met"] is None else fmt(e["met"])
            lines.append(
                f"| {e['measurement']} | {e['metric']} | {figure} | {e['goal'] or ''} | {met} "
                f"| {notes.replace('|', '/')} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, data: dict) -> None:
    text = path.read_text() if path.is_file() else ""
    body = render_section(data)
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[nxt:] if nxt != -1 else "")
    else:
        text = text.rstrip() + ("\n\n" if text else "") + body
    write_atomic(path, text)


# ---- the recipes, in this process ---------------------------------------------------------------
def recipe_config(recipe: str, config_name: str, overrides, optional=()):
    """The merged config of ``tune run RECIPE --config NAME overrides``, checked as the recipe's
    ``__main__`` checks it (unknown keys, missing inputs)."""
    from omegaconf import OmegaConf

    from llama_mimi_tt.recipe_config import check_argv_inputs, prepare_argv

    argv = prepare_argv([recipe, "--config", config_name, *overrides], recipe, optional)
    check_argv_inputs(argv)
    i = argv.index("--config") + 1
    return OmegaConf.merge(OmegaConf.load(argv[i]), OmegaConf.from_dotlist(argv[i + 1 :]))


@contextlib.contextmanager
def captured_logs():
    """Log lines of the recipes (torchtune's logger propagates to the root)."""
    lines = []

    class Catch(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Catch(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


def logged_number(lines, pattern: str):
    for line in reversed(lines):
        m = re.search(pattern, line)
        if m:
            return float(m.group(1))
    return None


def read_step_log(log_dir: Path, newest_only: bool = True) -> dict:
    """``{step: {metric: value}}`` from torchtune's DiskLogger files (``Step N | k:v k:v``)."""
    files = sorted(Path(log_dir).glob("log_*.txt"), key=lambda p: p.stat().st_mtime_ns)
    steps = {}
    for f in files[-1:] if newest_only else files:
        for line in f.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line)
            if m:
                steps[int(m.group(1))] = {
                    k: float(v)
                    for k, v in re.findall(r"(\S+?):([-0-9.eE+]+|nan|inf)\s", m.group(2) + " ")
                }
    return steps


def without_end_save(recipe_cls):
    """The recipe with its checkpoint saves skipped: they are not what is measured (a 1B save
    writes ~10 GB of weights and optimizer state, an 8B HF save 16 GB)."""

    class Measured(recipe_cls):
        def save_checkpoint(self, hf: bool) -> None:
            print(f"   (step {self.global_step}: checkpoint save skipped in this measurement)")

    return Measured


def train_run(recipe: str, config_name: str, overrides, save=False):
    """Runs a training recipe in this process; ``(recipe object, step log, seconds)``."""
    from llama_mimi_full import OPTIONAL_KEYS, LlamaMimiFinetuneRecipe, train

    cls = LlamaMimiFinetuneRecipe
    if recipe == "llama_mimi_dpo":
        from llama_mimi_dpo import LlamaMimiDPORecipe as cls
    cfg = recipe_config(recipe, config_name, overrides, OPTIONAL_KEYS)
    free_memory()
    t0 = time.perf_counter()
    done = train(cfg, cls if save else without_end_save(cls))
    seconds = time.perf_counter() - t0
    return done, read_step_log(Path(cfg.output_dir) / "logs"), seconds, cfg


def num_params(cfg) -> int:
    """Parameters of the config's model (built on the meta device)."""
    from torchtune import config

    with torch.device("meta"):
        return sum(p.numel() for p in config.instantiate(cfg.model).parameters())


def harmonic_mean(xs):
    return len(xs) / sum(1 / x for x in xs) if xs and all(x > 0 for x in xs) else None


def step_figures(log: dict, first: int, last: int) -> dict:
    """tokens/s per GPU over steps first..last (harmonic mean: total tokens / total time for
    equal steps) and the peak memory of all logged steps (GiB)."""
    rates = [m["tokens_per_second_per_gpu"] for s, m in log.items() if first <= s <= last]
    peaks = {}
    for key in ("peak_memory_alloc", "peak_memory_reserved", "peak_memory_rss_gib"):
        values = [m[key] for m in log.values() if key in m]
        if values:
            peaks[key] = max(values)
    return dict(tokens_per_s=harmonic_mean(rates), steps=len(rates), **peaks)


def peak_gib(fig: dict):
    return fig.get("peak_memory_alloc", fig.get("peak_memory_rss_gib"))


def flops_per_token(size: str, params: int, seq: int, tied: bool) -> float:
    """6 x parameters in matrix products (the output projection counted once, the input
    embedding of an untied model not at all) + attention 12 x layers x width x seq (PaLM)."""
    from llama_mimi_tt.models import SHAPES
    from llama_mimi_tt.vocab import MimiVocab

    s = SHAPES[size]
    t = TINY_T if size == "tiny" else 128256
    n = params if tied else params - MimiVocab(t, Q).size * s["embed_dim"]
    return 6 * n + 12 * s["num_layers"] * s["embed_dim"] * seq


# ---- inputs -------------------------------------------------------------------------------------
class Inputs:
    """Makes the stage's inputs in the work folder (once; kept between runs)."""

    def __init__(self, w: Path, sizes: dict, dry_run: bool):
        self.w, self.sizes, self.dry_run = w, sizes, dry_run

    def base_1b(self) -> Path:
        if self.dry_run:
            from scripts.tiny_base import write_tiny_base_llama

            out = self.w / "tiny_base"
            if not (out / "model.safetensors").is_file():
                write_tiny_base_llama(str(out))
            return out
        out = self.w / "Llama-3.2-1B"
        if not (out / "model.safetensors.index.json").is_file():
            from random_checkpoints import write_base

            write_base(out, "1b")
        return out

    def base_8b(self) -> Path:
        """config.json and tokenizer only: the weights come from RandomWeightsCheckpointer."""
        if self.dry_run:
            return self.base_1b()
        out = self.w / "Llama-3.1-8B"
        if not (out / "tokenizer.json").is_file():
            from random_checkpoints import write_base

            write_base(out, "8b", weights=False)
        return out

    def codes(self) -> Path:
        out = self.w / "codes"
        if not (out / "cache.json").is_file():
            from random_checkpoints import write_random_codes

            shutil.rmtree(out, ignore_errors=True)
            write_random_codes(out, self.sizes["utterances"], 8, self.sizes["frames"])
        return out

    def mimi(self) -> Path:
        """A random full-size Mimi in moshi's format (codebooks fitted, diverse codes)."""
        from llama_mimi_tt.codec import MimiCodec

        out = self.w / "mimi_random.safetensors"
        if not out.is_file():
            fit_seconds = 4.0 if self.dry_run else 20.0  # the codebooks' fit: 10 s on a small CPU
            MimiCodec.random(num_quantizers=8, fit_seconds=fit_seconds).save_moshi(out)
        return out

    def clips(self) -> Path:
        """``clips`` wav files of ``clip_s`` seconds at 24 kHz (noise shaped as speech-like
        bursts; their content does not matter for speed)."""
        import soundfile as sf

        out = self.w / "clips"
        n, seconds = self.sizes["clips"], self.sizes["clip_s"]
        if len(list(out.glob("*.wav"))) != n:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            g = np.random.default_rng(0)
            t = np.arange(int(seconds * 24000)) / 24000
            for i in range(n):
                envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (2 + i % 3) * t)
                wave = 0.1 * envelope * g.standard_normal(t.size)
                sf.write(out / f"clip{i:04d}.wav", wave.astype(np.float32), 24000)
        return out

    def salmon(self) -> Path:
        """One SALMon subset (``salmon_pairs`` pairs) in the published layout, from the clips."""
        root = self.w / "salmon"
        subset = root / "speaker_consistency"
        clips = sorted(self.clips().glob("*.wav"))
        if len(list(subset.glob("*.wav"))) != 2 * self.sizes["salmon_pairs"]:
            shutil.rmtree(root, ignore_errors=True)
            subset.mkdir(parents=True)
            for i in range(self.sizes["salmon_pairs"]):
                for option in (0, 1):
                    clip = clips[(2 * i + option) % len(clips)]
                    shutil.copy(clip, subset / f"sample_{i}_{option}.wav")
        return root

    def pairs(self) -> Path:
        """A DPO pairs file of random codes: 3 s prompts, 10 s continuations (dry run: less)."""
        out = self.w / "pairs.jsonl"
        g = np.random.default_rng(2)
        frames = (38, 125) if not self.dry_run else (5, 10)
        with open(out, "w") as f:
            for i in range(self.sizes["dpo_pairs"]):
                row = {"prompt_id": f"p{i}"}
                for role, n in (
                    ("prompt", frames[0]),
                    ("chosen", frames[1]),
                    ("rejected", frames[1]),
                ):
                    row[f"{role}_codes"] = g.integers(0, 2048, (Q, n)).tolist()
                f.write(json.dumps(row) + "\n")
        return out


# ---- the measurements ---------------------------------------------------------------------------
class Rehearsal:
    def __init__(self, args, results: Results):
        self.args, self.results = args, results
        self.dry_run = args.dry_run
        self.sizes = DRY if args.dry_run else REAL
        self.device = self.sizes["device"]
        self.w = Path(args.workdir).resolve()
        self.inputs = Inputs(self.w, self.sizes, args.dry_run)
        self.env = results.run["env"]

    # overrides shared by the runs
    def common(self, out: str) -> list:
        o = [f"output_dir={self.w / 'out' / out}"]
        if self.dry_run:
            o += ["device=cpu", "dtype=fp32", "compile=False"]  # bf16 matmuls crawl on CPU
        return o

    def train_overrides(self, out, base, steps, batch=None, model=None, accum=None) -> list:
        o = self.common(out) + [
            f"base_dir={base}",
            f"cache_dir={self.inputs.codes()}",
            "epochs=1",
            f"max_steps_per_epoch={steps}",
            "log_every_n_steps=1",
        ]
        if self.sizes["seq"]:
            o.append(f"max_seq_len={self.sizes['seq']}")
        batch = batch or self.sizes["batch"]
        if batch:
            o.append(f"batch_size={batch}")
        if self.dry_run:
            o += TINY + [f"loss.text_vocab_size={TINY_T}", "validation.max_batches=1"]
            accum = 1
        if accum:
            o.append(f"gradient_accumulation_steps={accum}")
            o += [f"model._component_=llama_mimi_tt.{model}", f"model.text_vocab_size={TINY_T}"]
        return o

    def seq_len(self) -> int:
        return self.sizes["seq"] or 1024

    def mfu(self, tokens_per_s, size, params, tied):
        """(MFU against the GPU's dense bf16 peak, against the measured matmul) in %."""
        if not tokens_per_s:
            return None, None
        flops = tokens_per_s * flops_per_token(size, params, self.seq_len(), tied)
        peak = self.env.get("peak_bf16_tflops")
        spec = 100 * flops / (peak * 1e12) if peak else None
        return spec, 100 * flops / (self.env["matmul_tflops"] * 1e12)

    # -- stage A
    def full_1b(self):
        s = self.sizes
        o = self.train_overrides(
            "1B_full", self.inputs.base_1b(), s["steps"], model="llama_mimi_tiny"
        )
        _, log, seconds, cfg = train_run("llama_mimi_full", "1B_full", o)
        fig = step_figures(log, s["from_step"], s["steps"])
        size, params = "tiny" if self.dry_run else "1b", num_params(cfg)
        spec, measured = self.mfu(fig["tokens_per_s"], size, params, tied=True)
        where = f"steps {s['from_step']}-{s['steps']}, seq {self.seq_len()}, packed"
        self.results.add(
            "1B_full", "tokens/s per GPU", fig["tokens_per_s"], notes=f"{where}; {seconds:.0f} s "
            "for the whole run (setup and compile included)", seconds=seconds, log=log,
        )  # fmt: skip
        self.results.add(
            "1B_full", "MFU (%)", spec, goal=">= 40%", met=None if spec is None else spec >= 40,
            notes=f"6 x {params:,} params x tokens + attention, against the dense bf16 peak; "
            f"against the measured matmul: {fmt(measured)}%",
            mfu_vs_matmul=measured,
        )  # fmt: skip
        self.results.add("1B_full", "peak memory (GiB)", peak_gib(fig), notes=peak_notes(fig))

    def qlora_8b(self, batch):
        s = self.sizes
        o = self.train_overrides(
            f"8B_qlora_b{batch}", self.inputs.base_8b(), s["qlora_steps"], batch,
            model="lora_llama_mimi_tiny",
        )  # fmt: skip
        o += [
            "gradient_accumulation_steps=1",
            "checkpointer._component_=random_checkpoints.RandomWeightsCheckpointer",
        ]
        if self.dry_run:
            o.append("checkpointer.model_type=LLAMA3_2")
        _, log, seconds, _ = train_run("llama_mimi_lora", "8B_qlora_single_device", o)
        fig = step_figures(log, s["qlora_from"], s["qlora_steps"])
        name = f"8B_qlora_single_device, batch {batch}"
        peak = peak_gib(fig)
        goal = met = None
        if batch == 2:
            goal, met = "<= 20 GiB (fits a 24 GB GPU)", None if peak is None else peak <= 20
        how = (
            "random weights made on the GPU and loaded through the recipe's checkpointer "
            "(RandomWeightsCheckpointer), gradient_accumulation_steps=1"
        )
        if self.dry_run:
            how += "; dry run: tiny LoRA, not NF4 (NF4 needs the real shapes)"
        self.results.add(
            name, "peak memory (GiB)", peak, goal=goal, met=met, notes=f"{peak_notes(fig)}; {how}"
        )
        self.results.add(
            name, "tokens/s per GPU", fig["tokens_per_s"],
            notes=f"steps {s['qlora_from']}-{s['qlora_steps']}, seq {self.seq_len()}; {seconds:.0f} s in all",
            seconds=seconds, log=log,
        )  # fmt: skip

    def lora_1b_and_resume(self):
        """1B_lora_single_device: throughput, then the step checkpoint written at
        ``lora_save_at`` resumed (the later checkpoint removed, as a kill would leave it) and
        its losses compared with the uninterrupted run's."""
        s = self.sizes
        out = self.w / "out" / "1B_lora"
        shutil.rmtree(out, ignore_errors=True)
        o = self.train_overrides(
            "1B_lora", self.inputs.base_1b(), s["steps"], model="lora_llama_mimi_tiny"
        )
        o.append(f"save_every_n_steps={s['lora_save_at']}")
        first, log, seconds, cfg = train_run(
            "llama_mimi_lora", "1B_lora_single_device", o, save=True
        )
        fig = step_figures(log, s["from_step"], s["steps"])
        size = "tiny" if self.dry_run else "1b"
        spec, measured = self.mfu(fig["tokens_per_s"], size, num_params(cfg), tied=True)
        self.results.add(
            "1B_lora_single_device", "tokens/s per GPU", fig["tokens_per_s"],
            notes=f"steps {s['from_step']}-{s['steps']}, seq {self.seq_len()}, packed; "
            f"{seconds:.0f} s in all, two checkpoint saves included", seconds=seconds, log=log,
        )  # fmt: skip
        self.results.add(
            "1B_lora_single_device", "MFU (%)", spec,
            notes="6N convention as 1B_full (LoRA skips the frozen weights' gradients: ~4N "
            f"of work); against the measured matmul: {fmt(measured)}%",
        )  # fmt: skip
        self.results.add(
            "1B_lora_single_device", "peak memory (GiB)", peak_gib(fig), notes=peak_notes(fig)
        )
        losses = dict(first.loss_history)
        del first
        last = max(int(p.name.split("_")[1]) for p in out.glob("step_*"))
        shutil.rmtree(out / f"step_{last}")  # as if killed after step_<lora_save_at>
        resumed, _, seconds, _ = train_run(
            "llama_mimi_lora",
            "1B_lora_single_device",
            o + ["resume_from_checkpoint=True"],
            save=True,
        )
        again = dict(resumed.loss_history)
        diffs = [abs(again[k] - losses[k]) for k in again]
        worst = max(diffs) if diffs else None
        tol = 1e-3
        self.results.add(
            "1B_lora_single_device", "resume: max |loss difference|", worst, goal=f"<= {tol:g}",
            met=None if worst is None else worst <= tol,
            notes=f"step_{s['lora_save_at']} written and resumed ({seconds:.0f} s): steps "
            f"{min(again, default=0)}-{max(again, default=0)} against the uninterrupted run "
            f"({len(diffs)} steps compared)",
            losses={"uninterrupted": losses, "resumed": again},
        )  # fmt: skip

    # -- stage B
    def mimi_encoding(self):
        """llama_mimi_tokenize on the clips (reading, encoding, shards), then the codec alone."""
        from llama_mimi_tokenize import tokenize

        from llama_mimi_tt.codec import MimiCodec

        s = self.sizes
        clips, mimi = self.inputs.clips(), self.inputs.mimi()
        hours = s["clips"] * s["clip_s"] / 3600
        for batch in s["encode_batches"]:
            out = self.w / "out" / f"tokenize_b{batch}"
            shutil.rmtree(out, ignore_errors=True)
            o = [f"source={clips}", f"output_dir={out}", f"codec.path={mimi}"]
            o += [
                f"device={self.device}",
                f"batch_size={batch}",
                f"shard_size={max(1, s['clips'] // 4)}",
                f"max_batch_seconds={batch * s['clip_s']}",  # else 320 s caps the batch
            ]
            cfg = recipe_config("llama_mimi_tokenize", "tokenize", o)
            free_memory()
            with captured_logs() as lines:
                t0 = time.perf_counter()
                tokenize(cfg)
                seconds = time.perf_counter() - t0
            speed = logged_number(lines, r"\(([\d.]+) audio s/s\)")
            goal = ">= 2000x real time" if batch == s["encode_batches"][0] else None
            self.results.add(
                f"Mimi encoding (llama_mimi_tokenize), batch {batch}", "x real time", speed,
                goal=goal, met=None if (goal is None or speed is None) else speed >= 2000,
                notes=f"{s['clips']} clips of {s['clip_s']:g} s ({hours:.2f} h), Q=8, fp32, read "
                f"+ encode + write shards; x real time = hours of audio per GPU-hour; "
                f"{seconds:.0f} s in all with the codec's load",
            )  # fmt: skip
        codec = MimiCodec.from_pretrained(mimi, num_quantizers=8, device=self.device)
        import soundfile as sf

        waves = [sf.read(p, dtype="float32")[0] for p in sorted(clips.glob("*.wav"))]
        for batch in s["encode_batches"]:
            if not self.dry_run:
                codec.encode_batch(waves[:batch], 24000, batch_size=batch)  # warm-up
            sync(self.device)
            t0 = time.perf_counter()
            codec.encode_batch(waves, 24000, batch_size=batch)
            sync(self.device)
            speed = len(waves) * s["clip_s"] / (time.perf_counter() - t0)
            self.results.add(
                f"Mimi encoding (MimiCodec.encode_batch alone), batch {batch}", "x real time",
                speed, notes="the same clips already in memory: the codec's own ceiling",
            )  # fmt: skip

    def generate(self):
        """tune run llama_mimi_generate --config 1B_generate, batch 1 and batch 16 (one prompt,
        num_samples samples), each run twice (the first compiles; the second is reported)."""
        import llama_mimi_generate

        s = self.sizes
        for batch in s["gen_batches"]:
            out = self.w / "out" / f"generate_b{batch}"
            o = self.common(f"generate_b{batch}") + [
                f"model_dir={self.inputs.base_1b()}", f"codec.path={self.inputs.mimi()}",
                f"num_samples={batch}", f"max_seconds={s['gen_seconds']}", "stop_at_end=False",
            ]  # fmt: skip
            if self.dry_run:
                o += TINY + ["model._component_=llama_mimi_tt.llama_mimi_tiny"]
                o += [f"model.text_vocab_size={TINY_T}", "compile_mode=null"]
            cfg = recipe_config("llama_mimi_generate", "1B_generate", o)
            free_memory()
            walls = []
            for _ in range(s["gen_runs"]):
                t0 = time.perf_counter()
                llama_mimi_generate.recipe_main.__wrapped__(cfg)
                walls.append(time.perf_counter() - t0)
            summary = json.loads((out / "summary.json").read_text())
            runs = " and ".join(f"{w:.0f} s" for w in walls)
            tps = summary["tokens_per_s"]
            if batch == 1:
                goal, met = ">= 1000 tokens/s", tps >= 1000
            else:
                goal, met = ">= 10,000 tokens/s (all samples)", tps >= 10000
            self.results.add(
                f"1B_generate, batch {batch}", "tokens/s", tps, goal=goal, met=met,
                notes=f"the recipe's summary.json of its last run ({summary['tokens']} tokens, "
                f"{summary['audio_seconds']:.0f} s of audio per sample x {batch}); real-time "
                f"factor {summary['rtf']:.3f}; compile {summary['compile_mode']}; whole recipe "
                f"runs {runs} (the first compiles; load, Mimi decode and files included); "
                "random weights, stop_at_end=False",
                rtf=summary["rtf"], summary=summary,
            )  # fmt: skip

    def eval_scoring(self):
        """tune run llama_mimi_eval --config 1B_eval on one SALMon subset, scored with the mean
        over all levels (SALMon's) and with level 0 only (the other suites'); the second run
        finds the suite's codes in the eval's code cache."""
        import llama_mimi_eval

        s = self.sizes
        o = self.common("1B_eval")[:1] + [
            f"model_dir={self.inputs.base_1b()}", f"codec.path={self.inputs.mimi()}",
            f"suites.salmon.path={self.inputs.salmon()}", "suites.salmon.subsets=[speaker_consistency]",
            f"code_cache_dir={self.w / 'out' / '1B_eval_codes'}", "report=False",
        ] + [f"suites.{k}.path=null" for k in ("swuggy", "sblimp", "sstorycloze", "tstorycloze")]  # fmt: skip
        if self.dry_run:
            o += ["device=cpu", "dtype=fp32", "batch_size=2"] + TINY
            o += [
                "model._component_=llama_mimi_tt.llama_mimi_tiny",
                f"model.text_vocab_size={TINY_T}",
            ]
        for mode in ("mean", "semantic"):
            cfg = recipe_config("llama_mimi_eval", "1B_eval", o + [f"suites.salmon.mode={mode}"])
            free_memory()
            with captured_logs() as lines:
                t0 = time.perf_counter()
                llama_mimi_eval.recipe_main.__wrapped__(cfg)
                seconds = time.perf_counter() - t0
            rate = logged_number(lines, r"\(([\d.]+) pairs/s\)")
            self.results.add(
                f"1B_eval, SALMon pairs, {mode} score", "pairs/s", rate,
                notes=f"{s['salmon_pairs']} pairs of {s['clip_s']:g} s clips, batch_size "
                f"{cfg.batch_size} sequences; scoring only (the recipe's log); {seconds:.0f} s "
                "in all" + (" with Mimi encoding" if mode == "mean" else " (codes cached)"),
            )  # fmt: skip

    def dpo_step(self):
        """llama_mimi_dpo with 1B_lora_dpo_single_device: its steps' time and peak memory."""
        s = self.sizes
        o = self.common("1B_lora_dpo") + [
            f"base_dir={self.inputs.base_1b()}", f"pairs={self.inputs.pairs()}",
            f"cache_dir={self.inputs.codes()}", "epochs=1", f"max_steps_per_epoch={s['dpo_steps']}",
            "log_every_n_steps=1",
        ]  # fmt: skip
        if s["dpo_batch"]:
            o += [f"batch_size={s['dpo_batch']}", f"gradient_accumulation_steps={s['dpo_accum']}"]
        if self.dry_run:
            o += TINY + ["model._component_=llama_mimi_tt.lora_llama_mimi_tiny"]
            o += [f"model.text_vocab_size={TINY_T}", "validation.batch_size=1"]
        _, log, seconds, _ = train_run("llama_mimi_dpo", "1B_lora_dpo_single_device", o)
        fig = step_figures(log, 2, s["dpo_steps"])
        last = log.get(s["dpo_steps"], {})
        self.results.add(
            "1B_lora_dpo_single_device", "tokens/s per GPU", fig["tokens_per_s"],
            notes=f"step 2 of {s['dpo_steps']} (the first warms up); as shipped: compile False, "
            f"batch 4 pairs x 8 accumulation; {seconds:.0f} s in all; rewards/accuracies "
            f"{fmt(last.get('rewards/accuracies'))}, loss {fmt(last.get('loss'))}",
            seconds=seconds, log=log,
        )  # fmt: skip
        self.results.add(
            "1B_lora_dpo_single_device", "peak memory (GiB)", peak_gib(fig), notes=peak_notes(fig)
        )


def peak_notes(fig: dict) -> str:
    if "peak_memory_alloc" in fig:
        return (
            f"torch's peak allocated over the training steps; reserved "
            f"{fmt(fig.get('peak_memory_reserved'))} GiB"
        )
    return "peak resident memory of the process (CPU)"


# what each stage runs, in order of value: (name, seconds it needs on an H100/H200, function,
# module it needs or None)
def stage_items(r: Rehearsal, stage: str):
    if stage == "A":
        return [
            ("1B_full", 150, r.full_1b, None),
            ("8B_qlora batch 2", 110, lambda: r.qlora_8b(2), "torchao"),
            ("1B_lora + resume", 150, r.lora_1b_and_resume, None),
            ("8B_qlora batch 1", 70, lambda: r.qlora_8b(1), "torchao"),
        ]
    return [
        ("Mimi encoding", 90, r.mimi_encoding, "moshi"),
        ("1B_generate", 150, r.generate, "moshi"),
        ("1B_eval", 60, r.eval_scoring, "moshi"),
        ("1B_lora_dpo", 60, r.dpo_step, None),
    ]


def run_stage(args, stage: str) -> bool:
    sizes = DRY if args.dry_run else REAL
    print(f"== stage {stage}{' (dry run: CPU, tiny model)' if args.dry_run else ''}", flush=True)
    env = environment(sizes["device"])
    print(f"   {env.get('gpu') or 'CPU'}, torch {env['torch']} (CUDA {env['cuda']}), "
          f"matmul {env['matmul_tflops']:.1f} TFLOP/s", flush=True)  # fmt: skip
    print("   " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), flush=True)
    markdown = args.markdown if args.markdown is not None else (None if args.dry_run else MARKDOWN)
    results = Results(args.results, markdown, args.mirror, stage, args.dry_run, env)
    r = Rehearsal(args, results)
    deadline = time.monotonic() + args.budget_s
    ok = True
    for name, need_s, fn, module in stage_items(r, stage):
        if args.only and name not in args.only:
            continue
        left = deadline - time.monotonic()
        if module and not has_module(module):
            results.add(name, "-", skipped=f"{module} is not installed on this machine")
            continue
        if not args.dry_run and left < need_s:
            results.add(name, "-", skipped=f"needs ~{need_s} s, {left:.0f} s of the budget left")
            continue
        print(f"-- {name} ({left:.0f} s of the budget left)", flush=True)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a failure is a finding: record it and go on
            traceback.print_exc()
            results.add(name, "-", error=f"{type(e).__name__}: {str(e)[:300]}")
            ok = False
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    return ok


# what the script cannot start without (a GPU image may lack them: scripts/gpu_wheels.sh)
REQUIRED = ("torchtune", "torchao", "omegaconf", "torchdata", "datasets", "llama_mimi_tt.configs",
            "llama_mimi_full")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["A", "B"], help="default: both, A then B")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, < 1 minute")
    ap.add_argument("--workdir", default=None, help="inputs and outputs (made if missing)")
    ap.add_argument("--results", default=None, help=f"results JSON (default {RESULTS})")
    ap.add_argument("--markdown", default=None, help="RESULTS.md to update (dry run: none)")
    ap.add_argument("--mirror", default=None, help="copy the results files here after each figure")
    ap.add_argument("--budget-s", type=float, default=STAGE_BUDGET_S, help="seconds per stage")
    ap.add_argument("--only", nargs="*", help="measurement names (see stage_items)")
    args = ap.parse_args(argv)
    default_dir = "/tmp/llama_mimi_gpu_rehearsal" + ("_dry" if args.dry_run else "")
    args.workdir = args.workdir or default_dir
    if args.results is None:
        args.results = Path(args.workdir) / "results.json" if args.dry_run else RESULTS
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --dry-run, or on a GPU", file=sys.stderr)
        return 2
    missing = [m for m in REQUIRED if not has_module(m)]
    if missing:
        print(
            f"missing here: {', '.join(missing)}. Install the package and its dependencies "
            "(`pip install -e .`), or on a GPU image carry them as wheels: bash "
            "scripts/gpu_wheels.sh, then the command in bench/README.md",
            file=sys.stderr,
        )
        return 2
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    ok = True
    for stage in [args.stage] if args.stage else ["A", "B"]:
        ok &= run_stage(args, stage)
    print(f"results: {args.results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
