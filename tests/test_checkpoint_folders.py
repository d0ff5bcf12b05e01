"""A folder is enough: generate from a sharded Hugging Face folder (3 shards + index) and from
our own training output (``model_dir=<output_dir>/step_N``), and every bad folder is one line
that names the file or field. Shipped configs run too early stop at once with the command that
makes their input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_mimi_tt.code_cache import write_code_cache
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.loading import load_model
from llama_mimi_tt.recipe_config import RECIPE_CONFIGS, check_argv_inputs, prepare_argv
from scripts.tiny_base import write_tiny_base_llama
from tests.test_recipes import learnable_utts, load_cfg, overrides

TUNE = str(Path(sys.executable).parent / "tune")


def reshard(src: Path, dst: Path, num_shards: int) -> Path:
    """``src``'s weights as ``num_shards`` files with an index, and its config.json only (no
    tokenizer: loading weights needs none)."""
    dst.mkdir(parents=True)
    weights = {}
    for f in sorted(src.glob("model*.safetensors")):
        weights.update(load_file(f))
    keys = sorted(weights)
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[i::num_shards]}
        save_file(part, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(our training output step_N, the same weights as 3 shards with an index)."""
    import llama_mimi_full

    d = tmp_path_factory.mktemp("folders")
    write_code_cache(d / "codes", learnable_utts(n=4), num_quantizers=4, shard_size=4)
    write_tiny_base_llama(d / "base")
    cfg = load_cfg("tiny_full", overrides(d, d / "train", epochs=1, batch_size=2))
    llama_mimi_full.train(cfg)
    step = max((d / "train").glob("step_*"), key=lambda p: int(p.name[5:]))
    return step, reshard(step, d / "sharded", 3)


def tune_generate(model_dir: Path, out: Path) -> dict:
    args = ["run", "llama_mimi_generate", "--config", "generate", f"model_dir={model_dir}"]
    args += [f"output_dir={out}", "num_samples=1", "max_seconds=0.24", "seed=3"]
    r = subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_generate_from_a_sharded_folder_and_from_our_training_output(folders, tmp_path):
    step, sharded = folders
    assert len(list(sharded.glob("*.safetensors"))) == 3
    assert not list(sharded.glob("tokenizer*")) and not (sharded / "original").exists()
    summary = tune_generate(sharded, tmp_path / "gen")  # the CLI, with model_dir only
    assert summary["random_weights"] is False and summary["frames"] > 0
    # our training output loads the same way, to the same weights (one CLI run is enough)
    cpu = torch.device("cpu")
    a = load_model(load_cfg("generate", [f"model_dir={step}"]), cpu, torch.float32)
    b = load_model(load_cfg("generate", [f"model_dir={sharded}"]), cpu, torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def bad(folders, tmp_path, name, change) -> Path:
    """A copy of the sharded folder, changed by ``change(folder)``."""
    folder = tmp_path / name
    shutil.copytree(folders[1], folder)
    change(folder)
    return folder


def edit_config(**fields):
    def change(folder):
        c = json.loads((folder / "config.json").read_text())
        c.update(fields)
        (folder / "config.json").write_text(json.dumps(c))

    return change


def truncate(folder):
    f = folder / "model-00002-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def garbage(folder):
    (folder / "model-00001-of-00003.safetensors").write_bytes(b"\x00not a safetensors file" * 9)


BAD = {
    # name: (change, what the one line must say)
    "missing": (lambda f: shutil.rmtree(f), r"missing.* does not exist"),
    "no_config": (lambda f: (f / "config.json").unlink(), r"no_config/config.json is missing"),
    "no_shard": (
        lambda f: (f / "model-00003-of-00003.safetensors").unlink(),
        r"model-00003-of-00003.safetensors: weight file missing \(listed by model.safetensors",
    ),
    "truncated": (truncate, r"model-00002-of-00003.safetensors: cannot read this safetensors"),
    "corrupt": (garbage, r"model-00001-of-00003.safetensors: cannot read this safetensors"),
    "bad_index": (
        lambda f: (f / "model.safetensors.index.json").write_text("{"),
        r"model.safetensors.index.json: not a safetensors index",
    ),
    "layers": (edit_config(num_hidden_layers=2), r"num_hidden_layers=2 but .* model has 4"),
    "heads": (edit_config(num_key_value_heads=4), r"num_key_value_heads=4 but .* model has"),
    "untied": (edit_config(tie_word_embeddings=False), r"tie_word_embeddings=False but .* True"),
    "q8": (edit_config(num_quantizers=8), r"num_quantizers=8 but the config says num_quant"),
    "vocab": (edit_config(vocab_size=9000), r"vocabulary of 9000 rows; neither"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_folders_are_one_line_naming_the_file_or_field(folders, tmp_path, name):
    change, message = BAD[name]
    folder = bad(folders, tmp_path, name, change)
    cfg = load_cfg("generate", [f"model_dir={folder}"])
    with pytest.raises(UserError, match=message) as e:
        load_model(cfg, torch.device("cpu"), torch.float32)
    assert "\n" not in str(e.value)


def test_model_and_checkpointer_must_agree_on_the_vocabulary(folders):
    cfg = load_cfg("generate", [f"model_dir={folders[0]}", "checkpointer.num_quantizers=8"])
    cfg.checkpointer.num_quantizers = 8  # model Q=4, checkpointer Q=8 (config.json says 4)
    with pytest.raises(UserError, match=r"num_quantizers=4 but the config says"):
        load_model(cfg, torch.device("cpu"), torch.float32)


SHIPPED = [(recipe, name) for recipe, names in RECIPE_CONFIGS.items() for name in names]
RUN_WITHOUT_INPUTS = {"tokenize", "generate", "eval", "serve"}  # nothing to make first


@pytest.mark.parametrize("recipe,name", SHIPPED)
def test_shipped_configs_without_their_inputs_name_the_command_to_run_first(
    recipe, name, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # no demo_out here
    argv = [recipe, "--config", name]
    if name in RUN_WITHOUT_INPUTS:
        check_argv_inputs(prepare_argv(argv, recipe))  # random weights; tokenize: source=...
        return
    with pytest.raises(
        UserError, match=r"does not exist: make it first: `(tune|python|huggingface-cli|bash) "
    ):
        check_argv_inputs(prepare_argv(argv, recipe))


def test_tiny_full_before_the_demo_is_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run(
        [TUNE, "run", "llama_mimi_full", "--config", "tiny_full"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "llama_mimi_full: error: checkpointer.checkpoint_dir=demo_out/tiny_base: this checkpoint "
        "folder does not exist: make it first: `python scripts/tiny_base.py demo_out/tiny_base`"
    )
    assert not (tmp_path / "demo_out").exists()
