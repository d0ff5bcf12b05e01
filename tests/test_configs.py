"""Every shipped config resolves by short name and points at components that exist; the
models of the real-size configs build (on the meta device) with the vocabulary their
tokenizer expects; a wheel ships the recipes as top-level modules and the configs."""

import re
import subprocess
import sys
import zipfile

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

from llama_mimi_tt import MimiVocab
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.recipe_config import (
    RECIPE_CONFIGS,
    available_configs,
    prepare_argv,
    resolve_config,
)

RECIPES = sorted(RECIPE_CONFIGS)  # every recipe module, and the configs each one owns
EXPECTED = {name for names in RECIPE_CONFIGS.values() for name in names}
assert len(RECIPES) == 8 and len(EXPECTED) == 18


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


def test_shipped_configs_spell_the_codec_by_its_public_name():
    spelled = set()
    for name in EXPECTED:
        cfg = OmegaConf.to_container(OmegaConf.load(resolve_config(name)))
        spelled |= {path for path in components(cfg) if path.endswith("mimi_codec")}
    assert spelled == {"llama_mimi_tt.mimi_codec"}
    # a config written with the module's path still builds the same codec
    import llama_mimi_tt
    import llama_mimi_tt.codec

    assert llama_mimi_tt.mimi_codec is llama_mimi_tt.codec.mimi_codec


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
    with pytest.raises(UserError, match="Shipped configs: .*tiny_full"):
        resolve_config("no_such_config")
    argv = prepare_argv(["x", "--config", "tiny_full", "epochs=1"], "llama_mimi_full")
    assert argv[2].endswith("tiny_full.yaml") and argv[3] == "epochs=1"


def test_every_shipped_config_belongs_to_one_recipe():
    owned = [name for names in RECIPE_CONFIGS.values() for name in names]
    assert sorted(owned) == available_configs()


@pytest.mark.parametrize(
    "recipe, config, override, message",
    [
        (
            "llama_mimi_full",
            "tiny_full",
            "epoch=1",
            "'epoch' (command line): did you mean 'epochs'",
        ),
        (
            "llama_mimi_lora",
            "tiny_lora",
            "validation.every_n_step=3",
            "did you mean 'every_n_steps'",
        ),
        (
            "llama_mimi_full",
            "tiny_full",
            "optimizer.lrr=0.1",
            "not an argument of torch.optim.AdamW",
        ),
        ("llama_mimi_generate", "generate", "max_secnds=0.4", "did you mean 'max_seconds'"),
        ("llama_mimi_eval", "eval", "batchsize=4", "did you mean 'batch_size'"),
        ("llama_mimi_tokenize", "tokenize", "num_quantizer=8", "did you mean 'num_quantizers'"),
        (
            "llama_mimi_full",
            "tiny_full",
            "model=llama_mimi_tt.no_such_builder",
            "cannot be imported",
        ),
    ],
)
def test_a_typo_in_an_override_is_an_error_naming_the_closest_key(
    recipe, config, override, message
):
    with pytest.raises(UserError, match=re.escape(message)):
        prepare_argv(["x", "--config", config, override], recipe)


def test_new_keys_on_purpose_and_config_variables(tmp_path):
    # +key=value adds a key on purpose; the + is dropped for torchtune
    argv = prepare_argv(["x", "--config", "tiny_full", "+my_note=hello"], "llama_mimi_full")
    assert argv[-1] == "my_note=hello"
    # a top-level key that the file interpolates is a variable; an unused one is a typo
    cfg = OmegaConf.load(resolve_config("tiny_full"))
    cfg.my_root = "/data"
    cfg.cache_dir = "${my_root}/codes"
    cfg.epoch = 3
    path = tmp_path / "mine.yaml"
    OmegaConf.save(cfg, path)
    with pytest.raises(UserError, match=f"'epoch' \\({re.escape(str(path))}\\)"):
        prepare_argv(["x", "--config", str(path)], "llama_mimi_full")
    del cfg["epoch"]
    OmegaConf.save(cfg, path)
    prepare_argv(["x", "--config", str(path)], "llama_mimi_full")


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
    assert "llama_mimi_tt/static/index.html" in names  # the page of llama_mimi_serve
    assert not any(n.startswith("recipes/") for n in names)  # never shadow torchtune's


@pytest.mark.parametrize("recipe, name", [(r, n) for r, ns in RECIPE_CONFIGS.items() for n in ns])
def test_every_shipped_config_passes_its_recipes_key_check(recipe, name):
    prepare_argv(["x", "--config", name], recipe)
