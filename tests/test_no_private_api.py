"""The package and the recipes use torchtune's and moshi's public API only: no import of a
module or name that starts with ``_``, no ``_attribute`` of anything imported from torchtune, no
moshi private member we once used (``MOSHI_PRIVATE``, as an attribute or a ``getattr`` name), no
``unittest.mock`` and no loading of torchtune's own recipe files (our training recipe is our own)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "llama_mimi_tt").rglob("*.py")) + sorted((ROOT / "recipes").glob("*.py"))

# moshi members that are private (a moshi object's ``._name`` cannot be told apart from any other
# by the AST, so these names are rejected on anything; moshi's checkpoint keys, strings, are fine)
MOSHI_PRIVATE = frozenset(
    {
        "_encode_to_unquantized_latent",
        "_streaming_state",
        "_codebook",
        "_initialized",
        "_cached_initialized",
        "_check_not_streaming",
    }
)
ATTRIBUTE_FUNCTIONS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def violations(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    torchtune_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("unittest"):
                yield node.lineno, f"from {node.module} import ..."
            if node.module.split(".")[0] == "torchtune":
                if private(node.module):
                    yield node.lineno, f"from {node.module} import ..."
                for alias in node.names:
                    if private(alias.name):
                        yield node.lineno, f"from {node.module} import {alias.name}"
                    torchtune_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("unittest") or (
                    alias.name.split(".")[0] == "torchtune" and private(alias.name)
                ):
                    yield node.lineno, f"import {alias.name}"
                if alias.name.split(".")[0] == "torchtune":
                    torchtune_names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if "torchtune" in node.value and "recipes/" in node.value:
                yield node.lineno, f"torchtune recipe file {node.value!r}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in MOSHI_PRIVATE:
            yield node.lineno, f"moshi private {ast.unparse(node)}"
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ATTRIBUTE_FUNCTIONS
            and any(isinstance(a, ast.Constant) and a.value in MOSHI_PRIVATE for a in node.args)
        ):
            yield node.lineno, f"moshi private {ast.unparse(node)}"
        if isinstance(node, ast.Attribute) and private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in torchtune_names:
                yield node.lineno, f"{ast.unparse(node)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_torchtune_api(path):
    found = list(violations(path))
    assert not found, "\n".join(f"{path.name}:{line}: {what}" for line, what in found)


def test_the_check_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from unittest import mock\n"
        "from torchtune.config._utils import _get_component_from_path\n"
        "from torchtune import training\n"
        "x = training._distributed\n"
        "latents = model._encode_to_unquantized_latent(x)\n"
        "streaming = codec.model._streaming_state is not None\n"
        "layer._codebook._initialized.fill_(1)\n"
        "getattr(codebook, '_cached_initialized')\n"
        "keys = ['quantizer.rvq_first.vq.layers.0._codebook._initialized']\n"
    )
    assert len(list(violations(bad))) == 9
