"""`tune run` as a user runs it: an expected error (bad input, bad config) is one line on stderr
and exit status 1, without a traceback (LLAMA_MIMI_DEBUG=1 shows it); an unexpected error keeps
its traceback. All the runs start together: each spends its few seconds importing torch."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).with_name("tune"))


def broken_codec(path=None, num_quantizers=4, device="cpu", seed=0):
    """A ``codec._component_`` with a bug."""
    raise RuntimeError("a bug in the codec")


def shared_codec(path=None, num_quantizers=4, device="cpu", seed=0):
    from llama_mimi_tt.codec import MimiCodec

    torch.set_num_threads(1)
    return MimiCodec.random(num_quantizers=num_quantizers, seed=seed, fit_seconds=2.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    torch.save(torch.randint(0, 2048, (50, 4)), tmp / "transposed.pt")
    cases = {
        "tokenize_number": ["llama_mimi_tokenize", "tokenize", f"source={tmp}", "shard_size=0",
                            f"output_dir={tmp / 'c'}"],
        "generate_transposed": ["llama_mimi_generate", "generate", f"output_dir={tmp / 'g'}",
                                f"prompt_codes=[{tmp / 'transposed.pt'}]",
                                "codec._component_=tests.test_cli_errors.shared_codec"],
        "bug": ["llama_mimi_tokenize", "tokenize", f"source={REPO / 'demo'}",
                f"output_dir={tmp / 'b'}", "codec._component_=tests.test_cli_errors.broken_codec"],
    }  # fmt: skip
    procs = {}
    for name, (recipe, config, *overrides) in cases.items():
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("LLAMA_MIMI_DEBUG", None)
        cmd = [TUNE, "run", recipe, "--config", config, *overrides]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize(
    "case, message",
    [
        ("tokenize_number", "shard_size=0 is out of range: it must be at least 1"),
        ("generate_transposed", "got [50, 4]: that looks like [frames, levels]; save codes.T"),
    ],
)
def test_expected_errors_are_one_line_without_traceback(runs, case, message):
    code, out, err = runs[case]
    recipe = f"llama_mimi_{case.split('_')[0]}"
    assert code == 1, err
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.startswith(f"{recipe}: error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]


@pytest.mark.parametrize(
    "recipe, override, message",
    [
        ("llama_mimi_generate", "num_samples=0", "num_samples=0 is out of range"),
        ("llama_mimi_eval", "batch_size=0", "batch_size=0 is out of range"),
    ],
)
def test_debug_switch_shows_the_traceback(monkeypatch, capsys, recipe, override, message):
    """In process, the recipes' ``__main__`` (``run_recipe``): one line and status 1; with
    LLAMA_MIMI_DEBUG=1 the error propagates (Python prints its traceback)."""
    from llama_mimi_tt.errors import UserError
    from llama_mimi_tt.recipe_config import DEBUG_ENV, run_recipe

    spec = importlib.util.spec_from_file_location(
        f"{recipe}_cli", REPO / "recipes" / f"{recipe}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", [recipe, "--config", recipe[11:], override])
    assert run_recipe(module.recipe_main, recipe) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{recipe}: error: {message}")
    monkeypatch.setenv(DEBUG_ENV, "1")
    monkeypatch.setattr(sys, "argv", [recipe, "--config", recipe[11:], override])
    with pytest.raises(UserError, match=message):
        run_recipe(module.recipe_main, recipe)


def test_unexpected_errors_keep_their_traceback(runs):
    code, _, err = runs["bug"]
    assert code != 0 and "Traceback" in err and "RuntimeError: a bug in the codec" in err


@pytest.mark.parametrize("recipe", ["llama_mimi_tokenize", "llama_mimi_generate"])
def test_the_no_cuda_advice_works_when_followed(monkeypatch, tmp_path, recipe):
    import re

    from llama_mimi_tt.errors import UserError
    from llama_mimi_tt.recipe_config import check_argv_inputs, prepare_argv

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = [recipe, "--config", recipe[11:], f"output_dir={tmp_path / 'out'}"]
    if recipe == "llama_mimi_tokenize":
        base.append(f"source={REPO / 'demo'}")
    with pytest.raises(UserError, match="no CUDA GPU") as e:
        check_argv_inputs(prepare_argv(base + ["device=cuda"], recipe))
    advice = re.findall(r"(\w+=\w+)", str(e.value).split("or set ", 1)[1])
    assert advice[0] == "device=cpu" and ("dtype=fp32" in advice) == (
        recipe != "llama_mimi_tokenize"
    )
    check_argv_inputs(prepare_argv(base + ["device=cuda"] + advice, recipe))  # no error


def test_a_removed_key_of_an_old_config_says_why_and_to_delete_it(tmp_path):
    """``claim_timeout_s`` (tokenize's claim files, removed): an old config that still sets it,
    or an override, stops before anything runs, saying why and what to do."""
    from llama_mimi_tt.errors import UserError
    from llama_mimi_tt.recipe_config import config_dir, prepare_argv

    old = tmp_path / "old_tokenize.yaml"
    old.write_text((config_dir() / "tokenize.yaml").read_text() + "claim_timeout_s: 3600\n")
    with pytest.raises(UserError, match=rf"config key 'claim_timeout_s' \({old}\) was removed: "
                       r"llama_mimi_tokenize has no claim files any more.*Delete it\."):  # fmt: skip
        prepare_argv(["llama_mimi_tokenize", "--config", str(old)], "llama_mimi_tokenize")
    argv = ["llama_mimi_tokenize", "--config", "tokenize", "claim_timeout_s=60"]
    with pytest.raises(UserError, match=r"'claim_timeout_s' \(command line\) was removed"):
        prepare_argv(argv, "llama_mimi_tokenize")
    assert prepare_argv(argv[:3], "llama_mimi_tokenize")[2].endswith("tokenize.yaml")
