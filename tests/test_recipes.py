"""llama_mimi_full and llama_mimi_lora on CPU: the loss falls, FSDP2 over gloo agrees with one
process, LoRA changes only what it should, and a run killed with SIGKILL (at a random step, or
inside a save) and resumed continues exactly as the uninterrupted run."""

import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from omegaconf import OmegaConf

from llama_mimi_tt import LlamaMimiCheckpointer, llama_mimi_tiny
from llama_mimi_tt.code_cache import write_code_cache
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.recipe_config import resolve_config
from scripts.tiny_base import write_tiny_base_llama

TUNE = str(Path(sys.executable).parent / "tune")


def learnable_utts(n=12, q=4, seed=0):
    """Codes with structure a tiny model picks up in a few dozen steps: each utterance repeats a
    short random motif of frames, so the next frame is predictable from the ones before."""
    g = np.random.default_rng(seed)
    utts = []
    for i in range(n):
        motif = g.integers(0, 2048, (q, int(g.integers(3, 6))))
        reps = int(g.integers(6, 12))
        utts.append({"id": f"utt{i:03d}", "codes": np.tile(motif, reps).astype(np.uint16)})
    return utts


def training_inputs(d: Path) -> Path:
    """``d/codes`` (the learnable cache) and ``d/base`` (a random tiny base Llama 3)."""
    write_code_cache(d / "codes", learnable_utts(), num_quantizers=4, shard_size=4)
    write_tiny_base_llama(d / "base")
    return d


# A recipe module, run by `tune run held_recipe` from the work folder: $HOLD_RECIPE
# (llama_mimi_full or llama_mimi_lora) that holds its process when step $HOLD_AT_STEP is over
# (logged, and its checkpoint written if it has one), until it is killed: a test kills the run
# at a known step, whatever the speed of the machine.
HELD_RECIPE = """
import os, sys, threading

from torchtune import config

import llama_mimi_full
from llama_mimi_tt.recipe_config import run_recipe


class Held(llama_mimi_full.LlamaMimiFinetuneRecipe):
    def train_step(self, batch):
        if self.global_step == int(os.environ["HOLD_AT_STEP"]):
            print(f"held after step {self.global_step}", flush=True)
            threading.Event().wait()
        return super().train_step(batch)


@config.parse
def recipe_main(cfg):
    llama_mimi_full.train(cfg, Held)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, os.environ["HOLD_RECIPE"], llama_mimi_full.OPTIONAL_KEYS))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = training_inputs(tmp_path_factory.mktemp("recipes"))
    (d / "held_recipe.py").write_text(HELD_RECIPE)
    return d


def overrides(workdir, out, **extra):
    args = {
        "cache_dir": str(workdir / "codes"),
        "base_dir": str(workdir / "base"),
        "output_dir": str(out),
        "dataset.val_fraction": 0.0,
        "validation.every_n_steps": 0,
        "shuffle": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def losses_from_log(out: Path):
    """(step, loss) pairs from torchtune's DiskLogger files, oldest run first; a step logged
    by several runs (killed, then resumed) keeps the latest value."""
    losses = {}
    for log in sorted((out / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime_ns):
        for s, v in re.findall(r"Step (\d+) \| loss:([0-9.eE+-]+)", log.read_text()):
            losses[int(s)] = float(v)
    return sorted(losses.items())


def last_step_dir(out: Path) -> Path:
    return max(out.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))


def tune_env(nproc=None):
    return {**os.environ, "OMP_NUM_THREADS": "1" if nproc else "2"}


def tune_cmd(args, nproc=None):
    return [TUNE, "run"] + (["--nproc_per_node", str(nproc)] if nproc else []) + args


def tune_run(args, cwd, nproc=None):
    r = subprocess.run(
        tune_cmd(args, nproc),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=tune_env(nproc),
    )
    if r.returncode:
        errors = [ln for ln in r.stderr.splitlines() if "Error" in ln or "error:" in ln]
        raise AssertionError("\n".join(errors[-20:]) + "\n" + r.stderr[-4000:])
    return r


def load_cfg(name, args):
    cfg = OmegaConf.merge(OmegaConf.load(resolve_config(name)), OmegaConf.from_dotlist(args))
    OmegaConf.resolve(cfg)
    return cfg


def test_full_run_loss_falls_and_output_loads_in_transformers(workdir):
    out = workdir / "full"
    tune_run(
        ["llama_mimi_full", "--config", "tiny_full"]
        + overrides(workdir, out, **FULL, **{"dataset.packed": True}),
        cwd=workdir,
    )
    losses = [loss for _, loss in losses_from_log(out)]
    assert len(losses) >= 30, losses
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    print(f"tiny full run: {len(losses)} steps, loss {first:.3f} -> {last:.3f}")
    assert last < first - 2.0  # ln(8706) = 9.07 at the start; the motifs are learnable

    # the last epoch loads in transformers and gives our model's logits
    from transformers import AutoModelForCausalLM

    final = last_step_dir(out)
    hf = AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32).eval()
    ckpt = LlamaMimiCheckpointer(checkpoint_dir=str(final), num_quantizers=4, text_vocab_size=512)
    ours = llama_mimi_tiny(num_quantizers=4)
    ours.load_state_dict(ckpt.load_checkpoint()["model"])
    ids = torch.tensor([[256, 8704, *range(600, 640), 8705]])
    with torch.no_grad():
        diff = (hf(ids).logits - ours.eval()(ids)).abs().max().item()
    print(f"trained checkpoint: max |logit diff| transformers vs ours = {diff:.2e}")
    assert diff < 1e-4


def test_fsdp2_on_two_cpu_processes_matches_one_process(workdir):
    args = FSDP
    single, dist = workdir / "single", workdir / "fsdp"
    # one process, batch 4 == two processes, batch 2 each: the same global batches
    tune_run(
        ["llama_mimi_full", "--config", "tiny_full"]
        + overrides(workdir, single, **{**args, "batch_size": 4}),
        cwd=workdir,
    )
    tune_run(
        ["llama_mimi_full", "--config", "tiny_full"] + overrides(workdir, dist, **args),
        cwd=workdir,
        nproc=2,
    )
    a, b = losses_from_log(single), losses_from_log(dist)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 4
    diffs = [abs(x - y) for (_, x), (_, y) in zip(a, b)]
    print(f"FSDP2 (2 x gloo) vs one process: final loss {b[-1][1]:.6f} vs {a[-1][1]:.6f}")
    assert max(diffs) < 1e-4, (a, b)


def process_tree(pid: int):
    p = psutil.Process(pid)
    return [p] + p.children(recursive=True)


def kill_tree(pid: int) -> None:
    """SIGKILL to a launch and everything it started (torchrun's workers have sessions of
    their own)."""
    try:
        procs = process_tree(pid)
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run_and_kill(args, cwd, out, at_step, nproc=None):
    """Runs ``tune run`` of the recipe ``args[0]`` held after step ``at_step`` (see
    HELD_RECIPE) and SIGKILLs all its processes there; returns the last step logged."""
    env = {**tune_env(nproc), "HOLD_AT_STEP": str(at_step), "HOLD_RECIPE": args[0]}
    log_path = out.parent / f"{out.name}.killed.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen(
            tune_cmd(["held_recipe", *args[1:]], nproc),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        watchdog = threading.Timer(300, kill_tree, [p.pid])  # a hung run fails the test
        watchdog.start()
        try:
            for line in p.stdout:  # until the run is held (or its output ends: it failed)
                log.write(line)
                if line.endswith(f"held after step {at_step}\n"):  # after tqdm's bar
                    break
            else:
                raise AssertionError(f"the run ended before step {at_step}: see {log_path}")
        finally:
            watchdog.cancel()
            kill_tree(p.pid)
            log.write(p.communicate()[0])
    return max(s for s, _ in losses_from_log(out))


def resumed_equals_uninterrupted(reference, out, args, cwd, nproc=None):
    r = tune_run(args + ["resume_from_checkpoint=True"], cwd=cwd, nproc=nproc)
    resumed_from = int(re.search(r"resuming from \S*step_(\d+)", r.stderr).group(1))
    ref, got = losses_from_log(reference), losses_from_log(out)
    assert [s for s, _ in got] == [s for s, _ in ref]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=0, atol=1e-6)
    return resumed_from, len(ref) - resumed_from


def random_step(low, high):
    step = int(os.environ.get("KILL_AT_STEP", random.randint(low, high)))
    print(f"killing at step {step} (rerun with KILL_AT_STEP={step} to repeat)")
    return step


FULL = dict(epochs=10, batch_size=2)
FSDP = dict(epochs=4, batch_size=2, save_every_n_steps=2, **{"dataset.packed": True})
# 4 epochs of 4 steps, a checkpoint every 3 steps (mid-epoch) and at each epoch's end
RESUME = dict(epochs=4, batch_size=2, shuffle=True, save_every_n_steps=3, keep_last_n_checkpoints=2)


def last_checkpoint_of_resume(step: int) -> int:
    """The last checkpoint of a RESUME run at or before ``step``: every 3 steps, and at the end
    of each epoch of 4 steps."""
    return max(s for s in range(1, step + 1) if s % 3 == 0 or s % 4 == 0)


def full_args(workdir, out, **settings):
    return ["llama_mimi_full", "--config", "tiny_full"] + overrides(workdir, out, **settings)


@pytest.fixture(scope="module")
def reference(workdir):
    """The uninterrupted run that killed and resumed runs must reproduce."""
    out = workdir / "reference"
    tune_run(full_args(workdir, out, **RESUME), workdir)
    return out


def test_full_killed_at_a_random_step_resumes_exactly(workdir, reference):
    out = workdir / "full_killed"
    args = full_args(workdir, out, **RESUME)
    step = random_step(4, 15)
    killed = run_and_kill(args, workdir, out, step)
    resumed_from, rest = resumed_equals_uninterrupted(reference, out, args, workdir)
    print(f"full: killed after step {killed}, resumed from step_{resumed_from}, {rest} steps equal")
    assert killed == step and resumed_from == last_checkpoint_of_resume(killed)
    # keep_last_n_checkpoints=2: only the newest two folders stay
    assert sorted(int(p.name[5:]) for p in out.glob("step_*")) == [15, 16]


@pytest.mark.slow
def test_loader_workers_read_the_same_batches_and_resume_exactly(workdir, reference):
    """num_workers=2 (the 1B/8B configs' setting): the uninterrupted run's losses, killed and
    resumed as well."""
    out = workdir / "workers_killed"
    args = full_args(workdir, out, num_workers=2, **RESUME)
    step = random_step(4, 15)
    killed = run_and_kill(args, workdir, out, step)
    resumed_from, rest = resumed_equals_uninterrupted(reference, out, args, workdir)
    print(f"workers: killed after step {killed}, resumed from step_{resumed_from}, {rest} equal")
    assert killed == step and resumed_from == last_checkpoint_of_resume(killed)


def test_killed_inside_a_save_resumes_from_the_previous_checkpoint(workdir, reference):
    """SIGKILL when step 6's checkpoint (mid-epoch) is written whole but not yet renamed."""
    out = workdir / "killed_in_save"
    args = full_args(workdir, out, **RESUME)
    script = (
        "import os, runpy, signal, sys\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if str(src).endswith('.step_6.tmp-ranks'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "os.replace = replace\n"
        f"sys.argv = {args!r}\n"
        "runpy.run_module('llama_mimi_full', run_name='__main__')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=tune_env(), capture_output=True
    )
    assert r.returncode == -signal.SIGKILL
    assert (out / ".step_6.tmp-ranks" / "recipe_state.json").is_file() and not (
        out / "step_6"
    ).exists()
    resumed_from, _ = resumed_equals_uninterrupted(reference, out, args, workdir)
    assert resumed_from == 4 and not (out / ".step_6.tmp-ranks").exists()


def test_a_finished_run_trains_nothing_and_a_changed_config_is_refused(workdir, reference):
    import shutil

    cfg = load_cfg(
        "tiny_full", full_args(workdir, reference, **RESUME, resume_from_checkpoint=True)[3:]
    )
    recipe = _recipe(cfg)
    assert recipe.finished and recipe.global_step == 16
    recipe.train()
    assert recipe.loss_history == []  # nothing trained
    changed = load_cfg(
        "tiny_full",
        full_args(
            workdir,
            reference,
            **{**RESUME, "batch_size": 4, "epochs": 5},
            resume_from_checkpoint=True,
        )[3:],
    )
    with pytest.raises(UserError, match="trained with batch_size=2 and the config says 4"):
        _recipe(changed)
    # a checkpoint whose state file is missing (a half-copied folder) is skipped: the one before
    copy = workdir / "half_copied"
    shutil.copytree(reference, copy)
    (copy / "step_16" / "recipe_state.json").unlink()
    cfg = load_cfg(
        "tiny_full",
        full_args(workdir, copy, **{**RESUME, "epochs": 5}, resume_from_checkpoint=True)[3:],
    )
    recipe = _recipe(cfg)
    assert recipe.global_step == 15 and not recipe.finished


def test_a_typo_in_an_override_stops_the_run_naming_the_key(workdir):
    r = subprocess.run(
        tune_cmd(["llama_mimi_full", "--config", "tiny_full", "epoch=1"]),
        cwd=workdir,
        env=tune_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unknown config key 'epoch' (command line): did you mean 'epochs'?" in r.stderr


def test_fsdp2_killed_at_a_random_step_resumes_exactly(workdir):
    reference = workdir / "fsdp"  # test_fsdp2_on_two_cpu_processes_... ran it uninterrupted
    args = FSDP
    if not (reference / "logs").is_dir():
        tune_run(
            ["llama_mimi_full", "--config", "tiny_full"] + overrides(workdir, reference, **args),
            workdir,
            nproc=2,
        )
    out = workdir / "fsdp_killed"
    cmd = ["llama_mimi_full", "--config", "tiny_full"] + overrides(workdir, out, **args)
    last = len(losses_from_log(reference))  # 2 steps an epoch: each rank has half the data
    step = random_step(3, last - 1)
    killed = run_and_kill(cmd, workdir, out, step, nproc=2)
    resumed_from, rest = resumed_equals_uninterrupted(reference, out, cmd, workdir, nproc=2)
    print(
        f"FSDP2: killed after step {killed}, resumed from step_{resumed_from}, {rest} steps equal"
    )
    assert killed == step and resumed_from == killed - killed % 2  # a checkpoint every 2 steps


def test_lora_killed_at_a_random_step_resumes_exactly(workdir):
    args = dict(epochs=2, batch_size=2, save_every_n_steps=2)
    reference, out = workdir / "lora_ref", workdir / "lora_killed"
    tune_run(
        ["llama_mimi_lora", "--config", "tiny_lora"] + overrides(workdir, reference, **args),
        workdir,
    )
    cmd = ["llama_mimi_lora", "--config", "tiny_lora"] + overrides(workdir, out, **args)
    step = random_step(3, 7)
    killed = run_and_kill(cmd, workdir, out, step)
    resumed_from, rest = resumed_equals_uninterrupted(reference, out, cmd, workdir)
    print(f"LoRA: killed after step {killed}, resumed from step_{resumed_from}, {rest} steps equal")
    assert killed == step and resumed_from == killed - killed % 2  # a checkpoint every 2 steps
    # a LoRA checkpoint keeps what trains (adapters, audio rows), not the frozen base
    final = last_step_dir(out)
    assert (final / "adapter_model.pt").is_file() and (final / "adapter_config.json").is_file()
    adapter = torch.load(final / "adapter_model.pt", weights_only=True)
    assert {"tok_embeddings.audio_weight"} <= set(adapter)  # the audio rows' one home
    assert any("lora_a" in k for k in adapter) and not (final / "audio_rows.safetensors").exists()


def _recipe(cfg):
    import llama_mimi_full

    recipe = llama_mimi_full.LlamaMimiFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    return recipe


def test_lora_changes_only_lora_weights_and_audio_rows(workdir):
    cfg = load_cfg("tiny_lora", overrides(workdir, workdir / "lora", epochs=2, batch_size=2))
    recipe = _recipe(cfg)
    before = {k: v.detach().clone() for k, v in recipe._model.named_parameters()}
    recipe.train()
    recipe.cleanup()
    after = dict(recipe._model.named_parameters())
    t = 512  # text rows of the tiny model
    changed, frozen = [], []
    for name, old in before.items():
        new = after[name].detach()
        if "lora_" in name or "audio" in name:
            assert not torch.equal(old, new), f"{name} did not train"
            changed.append(name)
        else:
            assert torch.equal(old, new), f"{name} changed but should be frozen"
            frozen.append(name)
    assert any("audio" in n for n in changed) and any("lora_a" in n for n in changed)
    # the merged embedding: text rows bit-identical to the base, audio rows trained
    emb = recipe._model.state_dict()["tok_embeddings.weight"]
    base = LlamaMimiCheckpointer(
        checkpoint_dir=str(workdir / "base"), num_quantizers=4, text_vocab_size=512
    ).load_checkpoint()["model"]["tok_embeddings.weight"]
    assert torch.equal(emb[:t], base[:t])
    assert not torch.equal(emb[t:], base[t:])
    print(f"LoRA run: {len(changed)} tensors trained, {len(frozen)} frozen and unchanged")
    # the step checkpoint holds only the trainable tensors
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(last_step_dir(workdir / "lora") / "dcp")).read_metadata()
    model_keys = {k[len("model.") :] for k in saved.state_dict_metadata if k.startswith("model.")}
    assert model_keys == set(changed)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"num_quantizers": 8}, r"num_quantizers=8.*only 4 levels"),  # config Q > cache Q
        ({"max_seq_len": 5}, r"max_seq_len=5 is too short for one frame"),
        ({"base_dir": "/nonexistent/llama"}, r"/nonexistent/llama"),
        ({"loss.num_quantizers": 2}, r"loss is set up for num_quantizers=2"),
    ],
)
def test_mismatches_fail_before_training(workdir, args, message):
    cfg = load_cfg("tiny_full", overrides(workdir, workdir / "bad", **args))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _recipe(cfg)


def test_checkpoint_of_another_architecture_is_refused(workdir):
    import json
    import shutil

    other = workdir / "base_2_layers"
    shutil.copytree(workdir / "base", other, dirs_exist_ok=True)
    hf_config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**hf_config, "num_hidden_layers": 2}))
    cfg = load_cfg("tiny_full", overrides(workdir, workdir / "bad2", base_dir=str(other)))
    with pytest.raises(ValueError, match="has num_hidden_layers=2 but the config's model has 4"):
        _recipe(cfg)


def test_checkpoint_of_another_q_is_refused(workdir):
    """A Llama-Mimi checkpoint made for Q = 4 given to a Q = 2 config."""
    from tests.hf_fixtures import make_tiny_hf_llama

    released = make_tiny_hf_llama(workdir / "mimi_q4", extended_num_quantizers=4)
    cfg = load_cfg(
        "tiny_full",
        overrides(workdir, workdir / "badq", base_dir=str(released), num_quantizers=2),
    )
    with pytest.raises(ValueError, match=r"num_quantizers=4 but the config says num_quantizers=2"):
        _recipe(cfg)


def test_streaming_dataset_trains(workdir):
    """dataset.streaming=True: no sampler, the epoch is max_steps_per_epoch batches."""
    args = overrides(workdir, workdir / "stream", epochs=2, batch_size=2, max_steps_per_epoch=3)
    cfg = load_cfg("tiny_full", args + ["dataset.streaming=True"])
    recipe = _recipe(cfg)
    recipe.save_checkpoint = lambda hf: None
    recipe.train()
    recipe.cleanup()
    assert [s for s, _ in recipe.loss_history] == list(range(1, 7))
    cfg = load_cfg("tiny_full", args[:-1] + ["dataset.streaming=True", "max_steps_per_epoch=null"])
    with pytest.raises(ValueError, match="set max_steps_per_epoch"):
        _recipe(cfg)


def test_profiler_and_peak_memory_as_in_torchtune(workdir, tmp_path):
    out = workdir / "profiled"
    profiler = {
        "profiler._component_": "torchtune.training.setup_torch_profiler",
        "profiler.enabled": True,
        "profiler.cpu": True,
        "profiler.cuda": False,
        "profiler.output_dir": str(tmp_path / "traces"),
        "profiler.wait_steps": 0,
        "profiler.warmup_steps": 1,
        "profiler.active_steps": 1,
        "profiler.num_cycles": 1,
    }
    args = overrides(workdir, out, epochs=1, max_steps_per_epoch=3)
    args += [f"{k}={v}" for k, v in profiler.items()]
    import llama_mimi_full

    from llama_mimi_tt.recipe_config import prepare_argv

    argv = ["llama_mimi_full", "--config", "tiny_full", *args]  # the key check accepts it
    argv = prepare_argv(argv, "llama_mimi_full", llama_mimi_full.OPTIONAL_KEYS)
    cfg = load_cfg("tiny_full", argv[3:])
    recipe = _recipe(cfg)
    recipe.train()
    recipe.cleanup()
    assert list((tmp_path / "traces").rglob("*.trace.json.gz")), "no profiler trace written"
    logged = "".join(p.read_text() for p in (out / "logs").glob("log_*.txt"))
    assert "peak_memory_rss_gib" in logged and "semantic_loss" in logged
