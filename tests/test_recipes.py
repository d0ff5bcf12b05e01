"""llama_mimi_full and llama_mimi_lora on CPU: the loss falls, FSDP2 over gloo agrees with one
process, LoRA changes only what it should, and resuming continues exactly."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from llama_mimi_tt import LlamaMimiCheckpointer, llama_mimi_tiny
from llama_mimi_tt.code_cache import write_code_cache
from llama_mimi_tt.recipe_config import resolve_config
from llama_mimi_tt.tiny import write_tiny_base_llama

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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipes")
    write_code_cache(d / "codes", learnable_utts(), num_quantizers=4, shard_size=4)
    write_tiny_base_llama(d / "base")
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
    """(step, loss) pairs from torchtune's DiskLogger file."""
    text = "".join(p.read_text() for p in sorted((out / "logs").glob("log_*.txt")))
    return [(int(s), float(v)) for s, v in re.findall(r"Step (\d+) \| loss:([0-9.eE+-]+)", text)]


def tune_run(args, cwd, nproc=None):
    cmd = [TUNE, "run"] + (["--nproc_per_node", str(nproc)] if nproc else []) + args
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if nproc else os.environ.get("OMP_NUM_THREADS", "2"),
    }
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
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
        + overrides(workdir, out, epochs=10, batch_size=2, **{"dataset.packed": True}),
        cwd=workdir,
    )
    losses = [loss for _, loss in losses_from_log(out)]
    assert len(losses) >= 30, losses
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    print(f"tiny full run: {len(losses)} steps, loss {first:.3f} -> {last:.3f}")
    assert last < first - 2.0  # ln(8706) = 9.07 at the start; the motifs are learnable

    # the last epoch loads in transformers and gives our model's logits
    from transformers import AutoModelForCausalLM

    epoch_dir = sorted(out.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    hf = AutoModelForCausalLM.from_pretrained(epoch_dir, torch_dtype=torch.float32).eval()
    ckpt = LlamaMimiCheckpointer(
        checkpoint_dir=str(epoch_dir),
        checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(workdir / "reload"),
        num_quantizers=4,
        text_vocab_size=512,
    )
    ours = llama_mimi_tiny(num_quantizers=4)
    ours.load_state_dict(ckpt.load_checkpoint()["model"])
    ids = torch.tensor([[256, 8704, *range(600, 640), 8705]])
    with torch.no_grad():
        diff = (hf(ids).logits - ours.eval()(ids)).abs().max().item()
    print(f"trained checkpoint: max |logit diff| transformers vs ours = {diff:.2e}")
    assert diff < 1e-4


def test_fsdp2_on_two_cpu_processes_matches_one_process(workdir):
    args = dict(epochs=2, batch_size=2, **{"dataset.packed": True})
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


def _run_in_process(module, cls_name, cfg):
    import importlib

    mod = importlib.import_module(module)
    recipe = getattr(mod, cls_name)(cfg=cfg)
    recipe.setup(cfg=cfg)
    return recipe


def test_lora_changes_only_lora_weights_and_audio_rows(workdir):
    cfg = load_cfg("tiny_lora", overrides(workdir, workdir / "lora", epochs=2, batch_size=2))
    recipe = _run_in_process("llama_mimi_lora", "LlamaMimiLoRASingleDevice", cfg)
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
    sd = recipe._model.state_dict()
    emb = sd["tok_embeddings.weight"]
    base = LlamaMimiCheckpointer(
        checkpoint_dir=str(workdir / "base"),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(workdir / "unused"),
        num_quantizers=4,
        text_vocab_size=512,
    ).load_checkpoint()["model"]["tok_embeddings.weight"]
    assert torch.equal(emb[:t], base[:t])
    assert not torch.equal(emb[t:], base[t:])
    print(f"LoRA run: {len(changed)} tensors trained, {len(frozen)} frozen and unchanged")
    epoch = workdir / "lora" / "epoch_1"
    assert (epoch / "adapter_model.safetensors").is_file() or (epoch / "adapter_model.pt").is_file()


def test_resume_continues_exactly(workdir):
    def cfg_for(out, **kw):
        return load_cfg(
            "tiny_full",
            overrides(workdir, out, epochs=3, batch_size=2, shuffle=True, **kw),
        )

    full = _run_in_process("llama_mimi_full", "LlamaMimiFullSingleDevice", cfg_for(workdir / "a"))
    full.train()
    full.cleanup()

    # the same run, killed right after its first epoch's checkpoint was written
    cut = _run_in_process("llama_mimi_full", "LlamaMimiFullSingleDevice", cfg_for(workdir / "b"))
    real_save = cut.save_checkpoint

    def save_then_die(epoch):
        real_save(epoch)
        raise KeyboardInterrupt

    cut.save_checkpoint = save_then_die
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    cut.cleanup()

    resumed = _run_in_process(
        "llama_mimi_full",
        "LlamaMimiFullSingleDevice",
        cfg_for(workdir / "b", resume_from_checkpoint=True),
    )
    resumed.train()
    resumed.cleanup()
    stitched = cut.loss_history + resumed.loss_history
    assert [s for s, _ in stitched] == [s for s, _ in full.loss_history]
    np.testing.assert_allclose(
        [v for _, v in stitched], [v for _, v in full.loss_history], rtol=0, atol=1e-6
    )
    print(
        f"resume: {len(resumed.loss_history)} steps after the restart match the uninterrupted run"
    )


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
    import llama_mimi_full

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        llama_mimi_full.LlamaMimiFullSingleDevice(cfg=cfg).setup(cfg=cfg)


def test_checkpoint_of_another_q_is_refused(workdir):
    """A Llama-Mimi checkpoint made for Q = 4 given to a Q = 2 config."""
    from tests.hf_fixtures import make_tiny_hf_llama

    released = make_tiny_hf_llama(workdir / "mimi_q4", extended_num_quantizers=4)
    cfg = load_cfg(
        "tiny_full",
        overrides(workdir, workdir / "badq", base_dir=str(released), num_quantizers=2),
    )
    import llama_mimi_full

    with pytest.raises(ValueError, match=r"num_quantizers=4 but the config says num_quantizers=2"):
        llama_mimi_full.LlamaMimiFullSingleDevice(cfg=cfg).setup(cfg=cfg)


def test_streaming_dataset_trains(workdir):
    """dataset.streaming=True: no sampler, the epoch is max_steps_per_epoch batches."""
    args = overrides(workdir, workdir / "stream", epochs=2, batch_size=2, max_steps_per_epoch=3)
    cfg = load_cfg("tiny_full", args + ["dataset.streaming=True"])
    recipe = _run_in_process("llama_mimi_full", "LlamaMimiFullSingleDevice", cfg)
    recipe.save_checkpoint = lambda epoch: None
    recipe.train()
    recipe.cleanup()
    assert [s for s, _ in recipe.loss_history] == list(range(1, 7))
    cfg = load_cfg("tiny_full", args[:-1] + ["dataset.streaming=True", "max_steps_per_epoch=null"])
    with pytest.raises(ValueError, match="set max_steps_per_epoch"):
        _run_in_process("llama_mimi_full", "LlamaMimiFullSingleDevice", cfg)
