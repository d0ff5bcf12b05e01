"""Every shipped config resolves by short name and points at components that exist; the
models of the real-size configs build (on the meta device) with the vocabulary their
tokenizer expects; a wheel ships the recipes as top-level modules and the configs."""

import subprocess
import sys
import zipfile

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

from llama_mimi_tt import MimiVocab
from llama_mimi_tt._config import available_configs, resolve_config, resolve_config_argv

RECIPES = ["llama_mimi_tokenize", "llama_mimi_full", "llama_mimi_lora"]
RECIPES += ["llama_mimi_generate", "llama_mimi_eval"]
EXPECTED = {
    "tokenize",
    "tiny_full",
    "tiny_lora",
    "1B_full",
    "1B_lora_single_device",
    "8B_full",
    "8B_lora_single_device",
    "8B_qlora_single_device",
    "generate",
    "1B_generate",
    "eval",
    "1B_eval",
}


def components(node):
    if isinstance(node, dict):
        if "_component_" in node:
            yield node["_component_"]
        for v in node.values():
            yield from components(v)
    elif isinstance(node, list):
        for v in node:
            yield from components(v)


def test_all_expected_configs_ship():
    assert EXPECTED <= set(available_configs())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_components_exist(name):
    cfg = OmegaConf.load(resolve_config(name))
    OmegaConf.resolve(cfg)
    for path in components(OmegaConf.to_container(cfg)):
        _get_component_from_path(path)


@pytest.mark.parametrize(
    "name", ["1B_full", "1B_lora_single_device", "8B_full", "8B_qlora_single_device"]
)
def test_real_size_models_build_with_the_tokenizer_vocab(name):
    cfg = OmegaConf.load(resolve_config(name))
    OmegaConf.resolve(cfg)
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    vocab = MimiVocab(num_quantizers=cfg.num_quantizers)
    assert model.tok_embeddings.num_embeddings == vocab.size == 136450
    assert cfg.loss.num_quantizers == cfg.tokenizer.num_quantizers == cfg.num_quantizers


def test_unknown_config_name_is_a_clear_error():
    with pytest.raises(SystemExit, match="Shipped configs: .*tiny_full"):
        resolve_config("no_such_config")
    argv = resolve_config_argv(["x", "--config", "tiny_full", "epochs=1"])
    assert argv[2].endswith("tiny_full.yaml") and argv[3] == "epochs=1"


def test_wheel_ships_recipes_and_configs(tmp_path):
    """A non-editable install gets the recipe modules at top level and the YAML configs."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path, "."],
        capture_output=True,
        text=True,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("llama_mimi_tt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in RECIPES:
        assert f"{recipe}.py" in names
    for name in EXPECTED:
        assert f"llama_mimi_tt/configs/{name}.yaml" in names
    assert "llama_mimi_tt/assets/byte_bpe.tiktoken" in names
    assert not any(n.startswith("recipes/") for n in names)  # never shadow torchtune's
