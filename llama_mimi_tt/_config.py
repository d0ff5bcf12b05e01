"""Short config names for ``tune run <recipe> --config <name>``.

torchtune passes ``--config`` through unchanged for recipes that are not its own, so each of our
recipes resolves a short name (``tiny_full``, ``1B_lora_single_device`` ...) to the YAML shipped
inside this package before torchtune's ``config.parse`` reads it. This also works from a
non-editable install, where the configs live in site-packages.
"""

import sys
from importlib import resources
from pathlib import Path
from typing import List


def config_dir() -> Path:
    return Path(str(resources.files("llama_mimi_tt.configs")))


def available_configs() -> List[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config(name: str) -> str:
    """A path if it exists, else the shipped config of that name; a clear error otherwise."""
    if Path(name).is_file():
        return name
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    shipped = config_dir() / f"{stem}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise SystemExit(
        f"--config {name!r} is neither a file nor a config shipped with llama_mimi_tt. "
        f"Shipped configs: {', '.join(available_configs())}. "
        "Copy one with `python -m llama_mimi_tt.configs <name> <dest.yaml>` to edit it."
    )


def resolve_config_argv(argv: List[str] = None) -> List[str]:
    """Returns argv with the value after ``--config`` resolved (``sys.argv`` by default)."""
    argv = list(sys.argv if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        if i < len(argv):
            argv[i] = resolve_config(argv[i])
    return argv
