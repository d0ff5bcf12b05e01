"""The whole journey on a built-in default: ``bash scripts/demo.sh`` (or ``python
scripts/demo.py``).

1. the bundled clips (demo/) -> Mimi code cache    ``tune run llama_mimi_tokenize``
2. a tiny Llama-Mimi trained on them               ``tune run llama_mimi_full``
3. a continuation of one clip                      ``tune run llama_mimi_generate``
4. the loss curve (PNG) and a summary

Each step is the real recipe, run as the command it prints. Without real weights the codec and
the model start random: the loss falls (the model learns the clips' codes) but the audio is not
speech. With ``--mimi FILE`` the clips are encoded by the real Mimi, and with ``--llama-mimi DIR``
the continuation comes from a released Llama-Mimi (no training), or with ``--llama DIR`` a
Llama 3.2 1B base is trained as the paper does (slow on a CPU: use ``--device cuda``).
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tune() -> str:
    return str(Path(sys.executable).parent / "tune")


def run_step(title: str, args, log_path: Path) -> float:
    """Runs ``tune run ...`` printing the command; full output goes to ``log_path``."""
    cmd = [_tune(), "run", *args]
    print(f"\n== {title}\n$ tune run {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = log_path.read_text().splitlines()[-25:]
        print("\n".join(tail))
        raise SystemExit(f"step failed: {title} (exit {proc.returncode}); full log: {log_path}")
    print(f"   done in {seconds:.0f} s (log: {log_path})", flush=True)
    return seconds


def read_losses(train_dir: Path):
    """(step, loss) and (step, val_loss) from torchtune's DiskLogger file of the last run."""
    logs = sorted((train_dir / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    text = logs[-1].read_text() if logs else ""
    train, val, tps = [], [], []
    for step, rest in re.findall(r"Step (\d+) \| (.*)", text):
        fields = dict(re.findall(r"(\w+):([0-9.eE+-]+)", rest))
        if "loss" in fields:
            train.append((int(step), float(fields["loss"])))
        if "val_loss" in fields:
            val.append((int(step), float(fields["val_loss"])))
        if "tokens_per_second_per_gpu" in fields:
            tps.append(float(fields["tokens_per_second_per_gpu"]))
    return train, val, tps


def plot_losses(train, val, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (held-out clips)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tiny Llama-Mimi on the demo clips")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="llama-mimi-tt demo: tokenize, train, generate")
    p.add_argument("--out", default=str(REPO / "demo_out"), help="where everything is written")
    p.add_argument("--mimi", help="Mimi weights (tokenizer-e351c8d8-checkpoint125.safetensors)")
    p.add_argument("--llama", help="a Llama 3.2 1B HF checkpoint dir: train 1B as the paper does")
    p.add_argument("--llama-mimi", help="a released Llama-Mimi-1.3B dir: generate with it")
    p.add_argument("--epochs", type=int, default=12, help="training epochs over the clips")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", default=str(REPO / "demo" / "clips" / "clip01.flac"))
    p.add_argument("--prompt-seconds", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds of audio to generate")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    real = bool(args.mimi or args.llama or args.llama_mimi)
    t_start = time.perf_counter()
    print(f"llama-mimi-tt demo -> {out}")
    if not args.mimi:
        print(
            "!! No Mimi weights given: the codec is random (seeded), so codes and the generated "
            "audio are not speech. Pass --mimi tokenizer-e351c8d8-checkpoint125.safetensors for "
            "real ones."
        )
    if not (args.llama or args.llama_mimi):
        print("!! No Llama weights given: a tiny random Llama-Mimi is trained from scratch.")
    codec_path = str(Path(args.mimi).resolve()) if args.mimi else "random"
    q = 4
    times = {}

    # 1. clips -> code cache
    codes = out / "codes"
    times["tokenize"] = run_step(
        "1/3 encode the bundled clips with Mimi into a code cache",
        [
            "llama_mimi_tokenize",
            "--config",
            "tokenize",
            f"source={REPO / 'demo' / 'manifest.jsonl'}",
            f"output_dir={codes}",
            f"codec.path={codec_path}",
            f"num_quantizers={q}",
            f"device={args.device}",
        ],
        logs / "tokenize.log",
    )

    # 2. train (skipped for a released Llama-Mimi: it is trained already)
    train_dir = out / "train"
    train, val, tps = [], [], []
    model_dir = Path(args.llama_mimi).resolve() if args.llama_mimi else None
    if model_dir is None:
        if args.llama:
            base, config = Path(args.llama).resolve(), "1B_full"
            extra = [f"device={args.device}", "epochs=1", "max_steps_per_epoch=20"]
            extra += ["dtype=bf16" if args.device != "cpu" else "dtype=fp32", "compile=False"]
            extra += ["validation.every_n_steps=10", "batch_size=2", "max_seq_len=256"]
        else:
            from scripts.tiny_base import write_tiny_base_llama

            base, config = write_tiny_base_llama(out / "tiny_base"), "tiny_full"
            extra = [f"epochs={args.epochs}", f"device={args.device}"]
        times["train"] = run_step(
            f"2/3 train Llama-Mimi on the codes ({config})",
            ["llama_mimi_full", "--config", config, f"cache_dir={codes}", f"base_dir={base}"]
            + [f"output_dir={train_dir}"]
            + extra,
            logs / "train.log",
        )
        train, val, tps = read_losses(train_dir)
        steps = sorted(train_dir.glob("step_*"), key=lambda d: int(d.name.split("_")[1]))
        model_dir = steps[-1]
        plot_losses(train, val, out / "loss.png")

    # 3. generate a continuation of the prompt clip
    gen_dir = out / "generate"
    from llama_mimi_tt.audio import load_audio, save_audio

    prompt = load_audio(args.prompt, 24000, max_seconds=args.prompt_seconds)
    prompt_path = save_audio(out / "prompt.wav", prompt, 24000)
    tiny = not (args.llama or args.llama_mimi)
    gen_args = [
        "llama_mimi_generate",
        "--config",
        "generate" if tiny else "1B_generate",
        f"model_dir={model_dir}",  # the checkpoint folder, as README teaches
        f"num_quantizers={q}",
        f"output_dir={gen_dir}",
        f"prompt_audio=[{prompt_path}]",
        "num_samples=1",
        f"max_seconds={args.seconds}",
        f"device={args.device}",
        f"codec.path={codec_path}",
    ]
    if not tiny:
        gen_args += ["dtype=bf16" if args.device != "cpu" else "dtype=fp32"]
    times["generate"] = run_step("3/3 continue the prompt clip", gen_args, logs / "generate.log")

    # 4. summary
    gen_summary = {}
    if (gen_dir / "summary.json").is_file():
        gen_summary = json.loads((gen_dir / "summary.json").read_text())
    wavs = sorted(str(p) for p in gen_dir.glob("*.wav"))
    summary = {
        "real_weights": real,
        "codec": codec_path,
        "model": str(model_dir),
        "train_steps": len(train),
        "first_loss": train[0][1] if train else None,
        "last_loss": train[-1][1] if train else None,
        "val_loss": [v for _, v in val],
        "train_tokens_per_second": sum(tps[1:]) / max(len(tps) - 1, 1) if tps else None,
        "prompt": str(prompt_path),
        "wavs": wavs,
        "generation": gen_summary,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\n== done")
    if train:
        print(
            f"training: {len(train)} steps, loss {train[0][1]:.3f} -> {train[-1][1]:.3f}"
            + (f", validation loss {val[0][1]:.3f} -> {val[-1][1]:.3f}" if len(val) > 1 else "")
        )
        if len(val) > 1 and val[-1][1] > val[0][1]:
            print(
                "  (the held-out clips' loss rises: five training clips teach the codes of those"
                " clips, not speech; real data and weights are another matter)"
            )
        print(f"loss curve:   {out / 'loss.png'}")
    for w in wavs:
        print(f"audio:        {w}")
    print(f"summary:      {out / 'summary.json'}")
    if not args.mimi:
        print("(random codec and model: the audio is not speech; see README for real weights)")
    print(f"total {summary['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
