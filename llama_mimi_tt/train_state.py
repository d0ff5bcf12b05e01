"""A training run's resumable state: ``output_dir/step_N`` folders, written whole or not at all.

A checkpoint is built in ``output_dir/.step_N.tmp-ranks`` and renamed to ``step_N`` only when
every part is on disk (``llama_mimi_tt.atomic_files``), so a kill at any moment leaves the
previous checkpoint as it was; rank 0 removes such leftovers when a run starts. One holds:

    dcp/                 trainable parameters and optimizer state (torch.distributed.checkpoint:
                         each rank writes its own shards, fast, and resharding on load)
    rank_<r>.pt          per rank: data-loader position and RNG states
    recipe_state.json    step, epochs done, what must match to resume (written last)
    model-*.safetensors  with config.json and tokenizer: the Hugging Face checkpoint, at the end
    ...                  of each epoch and of the run, or when asked (``save_hf``)

A LoRA run saves only what trains (adapters, audio rows); the frozen base comes from
``base_dir`` again on resume.
"""

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torchtune.utils import get_logger

from llama_mimi_tt import atomic_files
from llama_mimi_tt.errors import UserError

log = get_logger("INFO")

STATE_FILE = "recipe_state.json"
DCP_DIR = "dcp"
FORMAT_VERSION = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"step_{step}"


def is_complete(path: Path) -> bool:
    """A checkpoint folder with its state file (written last) and its DCP metadata."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    ranks = [path / f"rank_{r}.pt" for r in range(int(state.get("world_size", 1)))]
    return (path / DCP_DIR / ".metadata").is_file() and all(p.is_file() for p in ranks)


def complete_checkpoints(output_dir: Path) -> List[Tuple[int, Path]]:
    """``(step, folder)`` of the complete ``step_N`` checkpoints, oldest first; incomplete
    folders (a crash inside a save, or a half-copied one) are skipped with a warning."""
    found = []
    for path in Path(output_dir).glob("step_*"):
        suffix = path.name[len("step_") :]
        if not suffix.isdigit():
            continue
        if is_complete(path):
            found.append((int(suffix), path))
        else:
            log.warning(f"{path} is incomplete (no {STATE_FILE} or missing parts): skipped")
    return sorted(found)


def read_state(path: Path) -> Dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What a step checkpoint keeps of the model: the parameters that train (all of them in a
    full fine-tune), detached views that DCP writes from and loads into in place."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe_state: Dict[str, Any],
    rank_state: Dict[str, Any],
    write_hf: Optional[Callable[[Path], None]] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Writes ``output_dir/step_{step}`` atomically (every rank calls this). ``write_hf(tmp)``
    runs on every rank (it gathers the full weights) and writes the HF files on rank 0."""
    output_dir = Path(output_dir)
    final = step_dir(output_dir, step)
    tmp = atomic_files.temporary_path(final, writer="ranks")  # every rank writes into it
    if _rank() == 0:
        atomic_files.remove_temporaries(final)  # left by a crash inside an earlier save
        tmp.mkdir(parents=True)
    _barrier()
    state = {
        "model": trainable_state(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{_rank()}.pt")
    if write_hf is not None:
        write_hf(tmp)
    _barrier()
    if _rank() == 0:
        full = {**recipe_state, "format": FORMAT_VERSION, "hf": write_hf is not None}
        atomic_files.write_json(tmp / STATE_FILE, full)
        # a folder already at step_N is an incomplete one of an older run: replaced
        atomic_files.place_folder(tmp, final, keep_existing=False)
        log.info(
            f"checkpoint saved: {final}" + (" (with Hugging Face weights)" if write_hf else "")
        )
        if keep_last:
            for _, old in complete_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
                log.info(f"removed {old} (keep_last_n_checkpoints={keep_last})")
    _barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Loads a checkpoint into ``model`` and ``optimizer`` in place; returns this rank's state
    (data-loader position) after restoring its RNG states."""
    path = Path(path)
    state = {
        "model": trainable_state(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rank_file = path / f"rank_{_rank()}.pt"
    if not rank_file.is_file():
        raise UserError(f"{rank_file} is missing: this checkpoint was written by fewer ranks")
    rank_state = torch.load(rank_file, weights_only=True)
    set_rng_state(rank_state.pop("rng"))
    return rank_state


def remove_stale_temporaries(output_dir: Path) -> None:
    """The checkpoint folders of saves that a crash interrupted: rank 0, which owns the run's
    checkpoints, removes them when the run starts."""
    if _rank() == 0 and atomic_files.remove_temporaries(Path(output_dir) / "step_*"):
        log.info(f"removed the checkpoint folders of {output_dir} that a save left unfinished")
