"""The package and the recipes use torchtune's and moshi's public API only: no import of a
module or name that starts with ``_``, no ``_attribute`` of anything imported from torchtune, no
moshi private member we once used (``MOSHI_PRIVATE``, as an attribute or a ``getattr`` name), no
``unittest.mock`` and no loading of torchtune's own recipe files (our training recipe is our own).

Private members reached through an instance (``self._add_pack()`` in a subclass of torchtune's
``PackedDataset``, ``dataset._indices`` on a ``datasets.Dataset``) cannot be traced to their
library by the AST, so the check turns it round: a ``._name`` (or ``getattr(x, "_name")``) is
allowed only if our own sources define ``_name`` (a def, a class or module name, an attribute
they assign), or it is one of the reviewed exceptions in ``LIBRARY_PRIVATE_ALLOWED``."""

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

# Underscore names of libraries that we use on purpose, each with its reason.
LIBRARY_PRIVATE_ALLOWED = {
    # torchtune's config key for the class to build (``model._component_=...``): its public syntax
    "_component_": "torchtune config syntax",
    # torch's documented memory-snapshot recorder (docs: "Understanding CUDA Memory Usage")
    "_record_memory_history": "documented in torch's CUDA memory guide",
}


def private_names_we_define(paths) -> set[str]:
    """``_names`` our sources define: functions, classes, names bound, attributes assigned."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[-1])
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if private(n)}


def instance_privates(path: Path, ours: set[str]):
    """``x._name`` / ``getattr(x, "_name")`` whose ``_name`` is neither ours nor allowed."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ATTRIBUTE_FUNCTIONS
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            name = node.args[1].value
        if (
            name
            and private(name)
            and name not in ours
            and name not in LIBRARY_PRIVATE_ALLOWED
            and name not in MOSHI_PRIVATE  # reported by violations()
        ):
            yield node.lineno, f"library private {ast.unparse(node)}"


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


@pytest.fixture(scope="module")
def ours():
    return private_names_we_define(SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_torchtune_api(path, ours):
    found = list(violations(path)) + list(instance_privates(path, ours))
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


def test_the_check_catches_private_members_of_instances(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from torchtune.datasets import PackedDataset\n"
        "class Packs(PackedDataset):\n"
        "    def _pack_one(self, x):\n"
        "        self._seen = x\n"
        "        if self._should_stop_packing():\n"  # torchtune's, called on self
        "            self._add_pack(self._seen)\n"  # torchtune's, called on self
        "        return self._pack_one(x), getattr(self, '_seen')\n"  # ours: fine
        "rows = dataset._indices\n"  # datasets.Dataset's
        "has = hasattr(dataset, '_indices')\n"
        "torch.cuda.memory._record_memory_history()\n"  # reviewed exception
    )
    ours = private_names_we_define([bad])
    found = [what for _, what in sorted(instance_privates(bad, ours))]
    assert found == [
        "library private self._should_stop_packing",
        "library private self._add_pack",
        "library private dataset._indices",
        "library private hasattr(dataset, '_indices')",
    ]
