"""Configs of the recipes: short names, typo-proof keys, and the recipes' ``__main__``.

``tune run <recipe> --config <name>`` passes ``--config`` through unchanged, so each recipe
resolves a short name (``tiny_full``, ``1B_lora_single_device`` ...) to the YAML shipped in this
package (which also works from a non-editable install).

torchtune merges command-line overrides into the config without asking whether anything reads
them, so ``epoch=1`` (for ``epochs``) would train with the default. Before any heavy work, every
key of the merged config is checked: a key of a plain section must be one the recipe knows (those
of its shipped configs, plus the optional ones it names); a key of a ``_component_`` section must
be an argument of that component. A top-level key that the config interpolates (``${base_dir}``)
is a user variable and allowed. A new key on purpose: ``+key=value`` on the command line. A key
that older versions read (``REMOVED_KEYS``) fails with why it went.
"""

import difflib
import importlib
import inspect
import math
import os
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Set

from omegaconf import DictConfig, OmegaConf

from llama_mimi_tt.errors import UserError

# the shipped configs of each recipe: their keys are the keys that recipe knows
RECIPE_CONFIGS: Dict[str, List[str]] = {
    "llama_mimi_tokenize": ["tokenize"],
    "llama_mimi_full": ["tiny_full", "1B_full", "8B_full"],
    "llama_mimi_lora": [
        "tiny_lora",
        "1B_lora_single_device",
        "8B_lora_single_device",
        "8B_qlora_single_device",
    ],
    "llama_mimi_pairs": ["tiny_pairs", "1B_pairs"],
    "llama_mimi_dpo": ["tiny_dpo", "1B_lora_dpo_single_device"],
    "llama_mimi_generate": ["generate", "1B_generate"],
    "llama_mimi_eval": ["eval", "1B_eval"],
    "llama_mimi_serve": ["serve", "1B_serve"],
}

# keys of older configs that nothing reads any more: an old config fails saying why
REMOVED_KEYS: Dict[str, str] = {
    "claim_timeout_s": "llama_mimi_tokenize has no claim files any more: ranks split the "
    'shards (k % WORLD_SIZE) and a rerun encodes what is missing (README.md, "Using it")',
}

DEBUG_ENV = "LLAMA_MIMI_DEBUG"  # set to 1 to see the traceback of an expected error


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
    raise UserError(
        f"--config {name!r} is neither a file nor a config shipped with llama_mimi_tt. "
        f"Shipped configs: {', '.join(available_configs())}. "
        "Copy one with `python -m llama_mimi_tt.configs <name> <dest.yaml>` to edit it."
    )


# ---- which keys a recipe knows ------------------------------------------------------------------
def _dotted_keys(node, prefix: str = "") -> Iterable[str]:
    for k, v in node.items():
        path = f"{prefix}{k}"
        yield path
        if OmegaConf.is_dict(v) and "_component_" not in v:
            yield from _dotted_keys(v, path + ".")


def known_keys(recipe: str, optional: Iterable[str] = ()) -> Set[str]:
    """Dotted keys of the plain (non-component) sections of the recipe's shipped configs."""
    keys = set(optional)
    for name in RECIPE_CONFIGS[recipe]:
        keys.update(_dotted_keys(OmegaConf.load(config_dir() / f"{name}.yaml")))
    return keys


def component(path: str):
    """The object a ``_component_`` path names; a UserError when it cannot be imported."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"_component_ {path!r} cannot be imported ({e})") from None


def component_arguments(obj) -> Set[str] | None:
    """Keyword arguments a component accepts; None when it takes any (``**kwargs`` all the way)."""
    names: Set[str] = set()
    targets = (
        [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c)]
        if (inspect.isclass(obj))
        else [obj]
    )
    for target in targets:
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def _unknown(key: str, candidates: Iterable[str], where: str) -> UserError:
    leaf = key.rpartition(".")[2]
    close = difflib.get_close_matches(leaf, sorted(candidates), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UserError(
        f"unknown config key {key!r} ({where}): {hint}no part of this recipe reads it. "
        f"To add a key on purpose, write +{key}=VALUE on the command line."
    )


def check_keys(
    cfg: DictConfig,
    known: Set[str],
    cli_keys: Set[str] = frozenset(),
    added: Set[str] = frozenset(),
    config_file: str = "the config file",
) -> None:
    """Raises UserError naming the first key that nothing reads (see the module docstring)."""
    raw = OmegaConf.to_yaml(cfg)  # interpolations kept: ${name} marks a user variable
    variables = set(re.findall(r"\$\{([A-Za-z_][\w]*)", raw))

    def where(key):
        return "command line" if key in cli_keys else config_file

    def walk(node, prefix):
        if "_component_" in node:
            target = node["_component_"]
            accepted = component_arguments(component(target))
            for k, v in node.items():
                path = f"{prefix}{k}"
                if k == "_component_" or path in added:
                    continue
                if accepted is not None and k not in accepted:
                    raise _unknown(path, accepted, f"{where(path)}; not an argument of {target}")
                if OmegaConf.is_dict(v) and "_component_" in v:
                    walk(v, path + ".")
            return
        siblings = {k.rpartition(".")[2] for k in known if k.startswith(prefix)}
        if prefix and not siblings:  # a section the recipe reads as a whole (e.g. profiler)
            return
        for k, v in node.items():
            path = f"{prefix}{k}"
            if path in added:
                continue
            if path not in known and not (not prefix and k in variables):
                if path in REMOVED_KEYS:
                    raise UserError(
                        f"config key {path!r} ({where(path)}) was removed: "
                        f"{REMOVED_KEYS[path]}. Delete it."
                    )
                raise _unknown(path, siblings, where(path))
            if OmegaConf.is_dict(v):
                walk(v, path + ".")

    walk(cfg, "")


# ---- numbers and folders, checked before any heavy work ---------------------------------------
def check_number(
    cfg: DictConfig,
    key: str,
    kind: type = int,
    low: float | None = None,
    high: float | None = None,
    optional: bool = False,
    default=None,
):
    """``cfg[key]`` (a dotted key) as an ``int`` or ``float`` in ``[low, high]``, or None when
    ``optional`` and unset; a UserError naming the key and the allowed range otherwise."""
    value = OmegaConf.select(cfg, key, default=default)
    if value is None:
        if optional:
            return None
        raise UserError(f"{key} is not set: give {key}=... on the command line")
    what = "a whole number" if kind is int else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (kind is int and not float(value).is_integer())
    ):
        raise UserError(f"{key}={value!r} is not {what}" + (" (or null)" if optional else ""))
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            allowed = f"at least {low}"
        elif low is None:
            allowed = f"at most {high}"
        else:
            allowed = f"between {low} and {high}"
        raise UserError(f"{key}={value} is out of range: it must be {allowed}")
    return kind(value)


def check_output_dir(path, key: str = "output_dir") -> Path:
    """Creates the output folder and checks that a file can be written in it, so that a bad
    ``output_dir`` fails before the codec or the model is loaded."""
    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{key} {p} is a file, not a folder: choose another {key}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p, prefix=".write-check-") as f:
            f.write(b"x")
            f.flush()
    except OSError as e:
        raise UserError(
            f"{key} {p} is not writable ({e.strerror or e}): choose another {key} "
            "or fix its permissions"
        ) from e
    return p


# ---- inputs that must exist before anything is loaded ------------------------------------------
# (dotted key, what it is); null, ``random`` and ``builtin:...`` values are not files
INPUT_KEYS = (
    ("checkpointer.checkpoint_dir", "checkpoint folder"),
    ("tokenizer.path", "tokenizer"),
    ("dataset.source", "dataset"),
    ("validation.dataset.source", "validation dataset"),
    ("prompts", "prompts"),
    ("codec.path", "Mimi weights file"),
)
FIRST_STEP_PREFIXES = ("tune ", "python ", "huggingface-cli ", "bash ")


def first_steps(config_file: str) -> List[tuple]:
    """``(command, its comment line)`` for each command in a config's header comment (the
    steps that make its inputs), in order."""
    steps = []
    for line in Path(config_file).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        for part in re.split(r"\(|\)|;", text):
            part = part.strip().rstrip(".").rstrip("\\ ").strip()
            if part.startswith(FIRST_STEP_PREFIXES):
                steps.append((part, text))
    return steps


def _step_for(cfg: DictConfig, steps: List[tuple], path: str, config_file: str) -> str:
    """The header command whose line names ``path`` (or its ``${variable}``); else the first
    header command that is not this config's own run. ``${name}`` filled in from ``cfg``."""
    own = f"--config {Path(config_file).stem}"
    steps = [(step, line) for step, line in steps if own not in step]
    names = {path, Path(path).name}
    top = {k: v for k, v in cfg.items() if isinstance(v, str)}
    names.update("${" + k + "}" for k, v in top.items() if v == path)
    chosen = next((step for step, line in steps if any(n in line for n in names)), None)
    if chosen is None and steps:
        chosen = steps[0][0]
    if chosen is None:
        return f"make it first (see the header of {config_file})"
    for k, v in top.items():
        chosen = chosen.replace("${" + k + "}", v)
    return f"make it first: `{chosen}`"


def check_inputs(cfg: DictConfig, config_file: str) -> None:
    """A missing input file or folder, or a CUDA device on a machine without one: one line that
    names it and the command (from the config's header) that makes it. Runs before any heavy
    work, so that a shipped config run too early stops at once."""
    steps = first_steps(config_file) if Path(config_file).is_file() else []
    for key, what in INPUT_KEYS:
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception:  # an interpolation the recipe resolves itself
            continue
        if not isinstance(value, str) or value in ("", "random") or value.startswith("builtin:"):
            continue
        if key == "codec.path" and not value.endswith(".safetensors"):
            continue  # a hub name, or a format the codec checks itself
        path = Path(value).expanduser()
        if key == "dataset.source" and cfg.get("source_type", "auto") == "hf":
            continue
        if not path.exists():
            raise UserError(
                f"{key}={value}: this {what} does not exist: "
                + _step_for(cfg, steps, value, config_file)
            )
    device = str(cfg.get("device", "cpu") or "cpu")
    if device.startswith("cuda"):
        import torch  # only here: the key check above stays light

        if not torch.cuda.is_available():
            dtype = " (and dtype=fp32 or bf16)" if "dtype" in cfg else ""  # only where read
            raise UserError(
                f"device={device} but this machine has no CUDA GPU: run on a GPU, or set "
                f"device=cpu{dtype}"
            )


# ---- the recipes' __main__ ---------------------------------------------------------------------
def prepare_argv(argv: List[str], recipe: str, optional_keys: Iterable[str] = ()) -> List[str]:
    """``--config`` resolved and every override checked; ``+key=value`` becomes ``key=value``."""
    argv = list(argv)
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        raise UserError(f"usage: tune run {recipe} --config NAME_OR_PATH [key=value ...]")
    i = argv.index("--config") + 1
    argv[i] = resolve_config(argv[i])
    cfg = OmegaConf.load(argv[i])
    cli_keys, added, dotlist = set(), set(), []
    for j, arg in enumerate(argv[1:], start=1):
        if j in (i - 1, i) or arg.startswith("~"):
            continue
        if "=" not in arg:
            raise UserError(f"command-line overrides are key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        if key.startswith("+"):
            key = key[1:]
            added.add(key)
            argv[j] = arg[1:]
        head = key.split(".")[0]
        if head == key and OmegaConf.is_dict(cfg.get(head)) and "_component_" in cfg[head]:
            key += "._component_"  # model=llama_mimi_tt.x sets model._component_ (torchtune)
        cli_keys.add(key)
        dotlist.append(f"{key}={value}")
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    check_keys(merged, known_keys(recipe, optional_keys), cli_keys, added, argv[i])
    return argv


def check_argv_inputs(argv: List[str]) -> None:
    """``check_inputs`` on the config of an argv that ``prepare_argv`` has checked."""
    i = argv.index("--config") + 1
    cfg = OmegaConf.load(argv[i])
    dotlist = []
    for j, arg in enumerate(argv[1:], start=1):
        if j in (i - 1, i) or arg.startswith("~") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if OmegaConf.is_dict(cfg.get(key)) and "_component_" in cfg[key]:
            key += "._component_"
        dotlist.append(f"{key}={value}")
    check_inputs(OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist)), argv[i])


def run_recipe(recipe_main: Callable[[], object], recipe: str, optional_keys=()) -> int:
    """The ``__main__`` of a recipe: checks the config, runs it, and prints an expected error
    (UserError) as one line with exit status 1 (``LLAMA_MIMI_DEBUG=1``: with its traceback)."""
    try:
        sys.argv = prepare_argv(sys.argv, recipe, optional_keys)
        check_argv_inputs(sys.argv)  # a missing input: the command that makes it
        recipe_main()
    except UserError as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"{recipe}: error: {e}", file=sys.stderr)
        return 1
    return 0
