"""The benchmarks' published layouts read into pairs (positive audio, negative audio).

Layouts (checked against the benchmarks' own readers; see each ``read_*``):

- SALMon (slp-rl/salmon ``salmon.py``, ``data_generation/*.py``):
  ``<root>/<subset>/sample_<index>_<option>.wav``, option 0 = positive, 1 = negative.
- sWUGGY / sBLIMP (ZeroSpeech 2021 sLM21, zerospeech/zerospeech2021 ``lexical.py``,
  ``syntactic.py``, ``cli/evaluate.py``): ``<root>/lexical/<split>/<file>.wav`` and
  ``<root>/lexical/<split>/gold.csv`` (``syntactic`` for sBLIMP); gold rows sharing ``id`` and
  ``voice`` form a pair, ``correct`` = 1 marks the positive.
- Spoken / topic StoryCloze (slp-rl/SpokenStoryCloze zips ``sSC`` and ``tSC``):
  ``<root>/<n>_<story id>_correct.wav`` with its negative ``<n+1>_<story id>_incorrect.wav``.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from llama_mimi_tt.errors import UserError


class LayoutError(UserError):
    """A benchmark folder is missing or is not laid out as the benchmark publishes it."""


@dataclass(frozen=True)
class Pair:
    """One benchmark item: the model should score ``positive`` above ``negative``."""

    suite: str
    subset: str
    pair_id: str
    positive: str
    negative: str


SALMON_SUBSETS = (
    "bg_alignment",
    "bg_all_consistency",
    "bg_domain_consistency",
    "gender_consistency",
    "rir_consistency",
    "sentiment_alignment",
    "sentiment_consistency",
    "speaker_consistency",
)

SALMON_LAYOUT = (
    "SALMon, as published (slp-rl/salmon, salmon_benchmark.zip): <root>/<subset>/"
    "sample_<index>_<option>.wav for each subset in " + ", ".join(SALMON_SUBSETS) + "; option 0 "
    "is the positive (consistent) sample and option 1 the negative one"
)
SLM21_LAYOUT = (
    "ZeroSpeech 2021 sLM21, as published (zerospeech2021 dataset): <root>/{task}/{split}/"
    "<filename>.wav and <root>/{task}/{split}/gold.csv with the columns {columns} (filename "
    "without .wav; rows sharing id and voice form a pair; correct = 1 is the positive). The test "
    "split's gold.csv is not public: use split=dev, or give the file yourself"
)
STORYCLOZE_LAYOUT = (
    "{name}, as published (slp-rl/SpokenStoryCloze, the {folder}.zip download): "
    "<root>/<n>_<story id>_correct.wav and its negative <root>/<n+1>_<story id>_incorrect.wav "
    "(<root> is the {folder} folder or the folder that holds it)"
)


def _layout_error(what: str, layout: str) -> LayoutError:
    return LayoutError(f"{what}. Expected layout: {layout}")


def _single_child_with(root: Path, names: Iterable[str]) -> Path:
    """``root``, or its only sub-folder when the wanted entries live one level down (a zip that
    unpacks into its own folder)."""
    names = list(names)
    if any((root / n).exists() for n in names):
        return root
    children = [c for c in root.iterdir() if c.is_dir()] if root.is_dir() else []
    holding = [c for c in children if any((c / n).exists() for n in names)]
    return holding[0] if len(holding) == 1 else root


def read_salmon(root: str | Path, subsets: Optional[Sequence[str]] = None) -> List[Pair]:
    """SALMon pairs from a local copy of the published benchmark.

    Layout (read as slp-rl/salmon's ``SalmonDataset`` does; the files are written by its
    ``data_generation/*.py`` as ``sample_{index}_{option}.wav``, option 0 the true one):
    ``<root>/<subset>/sample_<index>_<option>.wav``.

    Args:
        root: the unzipped benchmark folder (``salmon_benchmark`` or the folder holding it).
        subsets: which subsets; all eight by default.
    """
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(f"SALMon folder {root} does not exist", SALMON_LAYOUT)
    subsets = list(subsets) if subsets else list(SALMON_SUBSETS)
    unknown = [s for s in subsets if s not in SALMON_SUBSETS]
    if unknown:
        raise ValueError(f"unknown SALMon subsets {unknown}; the subsets are {SALMON_SUBSETS}")
    root = _single_child_with(root, subsets)
    pattern = re.compile(r"^sample_(\d+)_(\d+)$")
    missing = [s for s in subsets if not (root / s).is_dir()]
    if missing:
        raise _layout_error(
            f"SALMon subset folders {', '.join(missing)} are missing in {root}", SALMON_LAYOUT
        )
    pairs = []
    for subset in subsets:
        folder = root / subset
        samples: Dict[int, Dict[int, Path]] = defaultdict(dict)
        for p in folder.glob("*.wav"):
            m = pattern.match(p.stem)
            if not m:
                raise _layout_error(f"unexpected file name {p}", SALMON_LAYOUT)
            samples[int(m.group(1))][int(m.group(2))] = p
        if not samples:
            raise _layout_error(f"no sample_<index>_<option>.wav files in {folder}", SALMON_LAYOUT)
        for index in sorted(samples):
            options = samples[index]
            if sorted(options) != [0, 1]:
                raise _layout_error(
                    f"{folder}: sample {index} has options {sorted(options)}, expected 0 and 1",
                    SALMON_LAYOUT,
                )
            pairs.append(Pair("SALMon", subset, str(index), str(options[0]), str(options[1])))
    return pairs


_SLM21_COLUMNS = {
    "lexical": ("filename", "id", "voice", "correct"),
    "syntactic": ("filename", "type", "id", "voice", "correct"),
}


def _read_slm21(root: str | Path, task: str, suite: str, split: str) -> List[Pair]:
    columns = _SLM21_COLUMNS[task]
    layout = SLM21_LAYOUT.format(task=task, split=split, columns=", ".join(columns))
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(f"{suite} folder {root} does not exist", layout)
    # the dataset root, its <task> folder or its <task>/<split> folder
    candidates = [root / task / split, root / split, root]
    folder = next((c for c in candidates if (c / "gold.csv").is_file()), None)
    if folder is None:
        nested = _single_child_with(root, [task])
        if (nested / task / split / "gold.csv").is_file():
            folder = nested / task / split
    if folder is None:
        raise _layout_error(
            f"no {task}/{split}/gold.csv under {root} (looked for "
            + ", ".join(str(c / "gold.csv") for c in candidates)
            + ")",
            layout,
        )
    gold = folder / "gold.csv"
    with open(gold, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise _layout_error(f"{gold} lacks the columns {missing}", layout)
        rows = list(reader)
    if not rows:
        raise _layout_error(f"{gold} has no rows", layout)
    groups: Dict[Tuple[str, str], Dict[int, List[dict]]] = defaultdict(lambda: {0: [], 1: []})
    for n, row in enumerate(rows, start=2):
        try:
            correct = int(float(row["correct"]))
        except ValueError:
            correct = -1
        if correct not in (0, 1):
            raise _layout_error(f"{gold} line {n}: correct is {row['correct']!r}, not 0/1", layout)
        groups[(row["id"], row["voice"])][correct].append(row)
    pairs = []
    for (pid, voice), g in groups.items():
        if len(g[1]) != len(g[0]):
            raise _layout_error(
                f"{gold}: id {pid} voice {voice} has {len(g[1])} correct and {len(g[0])} "
                "incorrect rows; a pair needs one of each",
                layout,
            )
        for k, (pos, neg) in enumerate(zip(g[1], g[0])):
            subset = pos["type"] if task == "syntactic" else "all"
            pair_id = f"{pid}/{voice}" + (f"/{k}" if k else "")
            paths = [folder / f"{r['filename']}.wav" for r in (pos, neg)]
            for p in paths:
                if not p.is_file():
                    raise _layout_error(f"{p} (listed in {gold}) does not exist", layout)
            pairs.append(Pair(suite, subset, pair_id, str(paths[0]), str(paths[1])))
    return pairs


def read_swuggy(root: str | Path, split: str = "dev") -> List[Pair]:
    """sWUGGY (word vs non-word) pairs from a local ZeroSpeech 2021 dataset.

    Layout (zerospeech/zerospeech2021 ``cli/evaluate.py`` and ``lexical.py``):
    ``<root>/lexical/<split>/<filename>.wav`` and ``<root>/lexical/<split>/gold.csv`` with at
    least ``filename, id, voice, correct`` (the published file also has ``frequency, word,
    phones, length``). ``root`` may also be the ``lexical`` or the ``lexical/<split>`` folder.
    """
    return _read_slm21(root, "lexical", "sWUGGY", split)


def read_sblimp(root: str | Path, split: str = "dev") -> List[Pair]:
    """sBLIMP (grammatical vs ungrammatical sentence) pairs from a local ZeroSpeech 2021 dataset,
    grouped into subsets by the gold ``type`` column.

    Layout (zerospeech/zerospeech2021 ``syntactic.py``): ``<root>/syntactic/<split>/*.wav`` and
    ``gold.csv`` with at least ``filename, type, id, voice, correct`` (also ``subtype,
    transcription`` in the published file).
    """
    return _read_slm21(root, "syntactic", "sBLIMP", split)


def read_storycloze(root: str | Path, suite: str = "sStoryCloze") -> List[Pair]:
    """Spoken (``sStoryCloze``) or topic (``tStoryCloze``) StoryCloze pairs.

    Layout of the slp-rl/SpokenStoryCloze downloads (folders ``sSC`` and ``tSC``): flat wav files
    ``<n>_<story id>_correct.wav``, whose negative is ``<n+1>_<story id>_incorrect.wav`` (the
    pairing the public evaluation scripts use: SlamKit sorts by ``n`` and takes consecutive
    files; other scripts look up ``f"{n + 1}_{id}_incorrect"``).
    """
    folders = {"sStoryCloze": "sSC", "tStoryCloze": "tSC"}
    if suite not in folders:
        raise ValueError(f"suite must be one of {sorted(folders)}, got {suite!r}")
    layout = STORYCLOZE_LAYOUT.format(name=suite, folder=folders[suite])
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(f"{suite} folder {root} does not exist", layout)
    if not any(root.glob("*.wav")) and (root / folders[suite]).is_dir():
        root = root / folders[suite]
    pattern = re.compile(r"^(\d+)_(.+)_(correct|incorrect)$")
    correct: Dict[int, Tuple[str, Path]] = {}
    incorrect: Dict[int, Tuple[str, Path]] = {}
    for p in root.glob("*.wav"):
        m = pattern.match(p.stem)
        if not m:
            raise _layout_error(f"unexpected file name {p}", layout)
        n, story, kind = int(m.group(1)), m.group(2), m.group(3)
        (correct if kind == "correct" else incorrect)[n] = (story, p)
    if not correct:
        raise _layout_error(f"no <n>_<story id>_correct.wav files in {root}", layout)
    pairs = []
    for n in sorted(correct):
        story, pos = correct[n]
        if n + 1 not in incorrect or incorrect[n + 1][0] != story:
            raise _layout_error(
                f"{pos.name} has no negative {n + 1}_{story}_incorrect.wav in {root}", layout
            )
        pairs.append(Pair(suite, "all", story, str(pos), str(incorrect[n + 1][1])))
    if len(pairs) != len(incorrect):
        raise _layout_error(
            f"{root}: {len(incorrect)} incorrect files but {len(pairs)} pairs", layout
        )
    return pairs


@dataclass(frozen=True)
class SuiteSpec:
    """A benchmark: its printed name, its reader and the reference's scoring choice."""

    name: str
    reader: Callable[..., List[Pair]]
    reference_mode: str
    reference_include_markers: bool = True


SUITES: Dict[str, SuiteSpec] = {
    "salmon": SuiteSpec("SALMon", read_salmon, "mean"),
    "swuggy": SuiteSpec("sWUGGY", read_swuggy, "semantic"),
    "sblimp": SuiteSpec("sBLIMP", read_sblimp, "semantic"),
    "sstorycloze": SuiteSpec(
        "sStoryCloze", lambda root: read_storycloze(root, "sStoryCloze"), "semantic"
    ),
    "tstorycloze": SuiteSpec(
        "tStoryCloze", lambda root: read_storycloze(root, "tStoryCloze"), "semantic"
    ),
}


def read_suite(name: str, path: str | Path, **options) -> List[Pair]:
    """Pairs of the suite ``name`` (a key of ``SUITES``: salmon, swuggy, sblimp, sstorycloze,
    tstorycloze) from its local folder; ``options`` go to the reader (``subsets`` for SALMon,
    ``split`` for sWUGGY / sBLIMP)."""
    key = name.lower()
    if key not in SUITES:
        raise ValueError(f"unknown suite {name!r}; the suites are {sorted(SUITES)}")
    options = {k: v for k, v in options.items() if v is not None}
    return SUITES[key].reader(path, **options)
