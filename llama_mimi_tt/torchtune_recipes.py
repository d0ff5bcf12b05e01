"""torchtune's own recipe classes, loaded by file path.

The torchtune wheel installs its recipes as a top-level package ``recipes`` whose
``__init__.py`` raises on import on purpose; the recipe files themselves import fine. This is the
one place where we reach into them: our recipes subclass what is returned here.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torchtune


def load_torchtune_recipe(name: str) -> ModuleType:
    """The module of torchtune's recipe ``name`` (e.g. ``"full_finetune_single_device"``)."""
    module_name = f"_torchtune_recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = Path(torchtune.__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"torchtune's recipe file {path} is missing: llama-mimi-tt needs torchtune==0.6.1 "
            "installed from its wheel (it ships the recipes)"
        )
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
