"""``report.html``: one or more evaluation runs on one static page.

Built from each run's ``results.json`` and ``judgements.jsonl``: suite accuracies with 95%
Wilson intervals, the generation metrics with their intervals (matplotlib PNGs beside the page),
and audio players for a sample of prompts with transcripts and judge rationales. Audio is linked
by relative paths and nothing comes from the network, so the page works opened from disk.

    write_report(["eval_out/run_a", "eval_out/run_b"], "eval_out/a_vs_b")
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence
from urllib.parse import quote

from llama_mimi_tt.errors import MissingFileError, UserError, writing
from llama_mimi_tt.statistics import wilson_interval

__all__ = ["GENERATION_METRICS", "load_run", "write_report"]

# (key in results.json's "generation", title, which way is better, the plot's y range: the
# metric's own range, so that a wide t interval of a few samples is cut at the axis)
GENERATION_METRICS = [
    ("llm_judge", "LLM judge (1-10)", "higher is better", (0, 10.5)),
    ("genppl", "GenPPL", "lower is better", None),
    ("auto_bleu", "Auto-BLEU", "lower is better", (0, 1.05)),
    ("speaker_similarity", "Speaker similarity", "higher is better", None),
]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
FILES = "report_files"


def load_run(run_dir: str | Path) -> dict:
    """``{"dir", "results", "samples"}`` of one evaluation output folder."""
    d = Path(str(run_dir)).expanduser()
    res = d / "results.json"
    if not res.is_file():
        raise MissingFileError(
            f"{res} not found: a run to report on is the output_dir of a finished "
            "`tune run llama_mimi_eval` (it writes results.json there)"
        )
    try:
        results = json.loads(res.read_text())
    except ValueError as e:
        raise UserError(f"{res} is not valid JSON ({e}); rerun the evaluation") from e
    samples = []
    jl = d / "judgements.jsonl"
    if jl.is_file():
        samples = [json.loads(line) for line in jl.read_text().splitlines() if line.strip()]
    return {"dir": d, "results": results, "samples": samples}


def _labels(runs: Sequence[dict]) -> List[str]:
    names = [r["dir"].resolve().name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r["dir"]) for r in runs]
    return names


def _suite_rows(results: dict) -> dict:
    """``{row label: (accuracy, low, high, pairs)}``: each suite overall, and its subsets when
    it has several."""
    rows = {}
    for suite, s in (results.get("suites") or {}).items():
        subsets = s.get("subsets") or {}
        items = [(suite, s["overall"])]
        if len(subsets) > 1:
            items += [(f"{suite} / {k}", v) for k, v in subsets.items()]
        for label, st in items:
            if st.get("accuracy") is None:
                continue
            lo, hi = wilson_interval(st["accuracy"], st["pairs"])
            rows[label] = (st["accuracy"], lo, hi, st["pairs"])
    return rows


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError as e:
        raise UserError(
            "the report's plots need matplotlib: pip install 'llama-mimi-tt[eval]'"
        ) from e

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_suites(runs: Sequence[dict], labels: Sequence[str], path: Path) -> Optional[Path]:
    """Horizontal bars: accuracy per suite (and subset) per run, 95% Wilson intervals."""
    per_run = [_suite_rows(r["results"]) for r in runs]
    names = list(dict.fromkeys(k for rows in per_run for k in rows))
    if not names:
        return None
    fig = _figure(8, 1.2 + 0.45 * len(names) * max(1, len(runs) * 0.7))
    ax = fig.add_subplot()
    height = 0.8 / len(runs)
    for j, (rows, label) in enumerate(zip(per_run, labels)):
        ys, acc, err = [], [], [[], []]
        for i, name in enumerate(names):
            if name in rows:
                a, lo, hi, _ = rows[name]
                ys.append(i - 0.4 + height * (j + 0.5))
                acc.append(100 * a)
                err[0].append(100 * (a - lo))
                err[1].append(100 * (hi - a))
        ax.barh(ys, acc, height=height * 0.9, xerr=err, capsize=3, label=label,
                color=COLORS[j % len(COLORS)])  # fmt: skip
    ax.axvline(50, color="0.4", linestyle="--", linewidth=1, label="chance (50%)")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy % (ties count 0.5), 95% Wilson interval")
    ax.set_title("Likelihood benchmarks")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=len(runs) + 1, fontsize="small")
    with writing(path):
        fig.savefig(path)
    return path


def plot_generation(runs: Sequence[dict], labels: Sequence[str], path: Path) -> Optional[Path]:
    """One panel per generation metric: each run's mean with its 95% interval."""
    gens = [r["results"].get("generation") or {} for r in runs]
    metrics = [m for m in GENERATION_METRICS if any((g.get(m[0]) or {}).get("mean") is not None
                                                    for g in gens)]  # fmt: skip
    if not metrics:
        return None
    fig = _figure(2.6 * len(metrics) + 0.6, 3.2)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (key, title, better, limits) in zip(axes, metrics):
        ticks = []
        for j, g in enumerate(gens):
            s = g.get(key) or {}
            if s.get("mean") is None:
                ticks.append(f"{labels[j]}\n-")
                continue
            err = None
            if s.get("ci_low") is not None:
                err = [[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]]
            ax.bar([j], [s["mean"]], yerr=err, capsize=4, color=COLORS[j % len(COLORS)])
            ticks.append(f"{labels[j]}\n{s['mean']:.3g}")
        ax.set_title(f"{title}\n({better})", fontsize="medium")
        ax.set_xticks(range(len(labels)), ticks, fontsize="small")
        if limits:
            ax.set_ylim(*limits)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Generation quality (mean, 95% interval)")
    with writing(path):
        fig.savefig(path)
    return path


# ---- HTML ------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
.sample h3 { margin: 0.2em 0 0.5em; font-size: 1em; }
.cont { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 1em; }
.cont > div { background: #fafafa; padding: 0.5em 0.7em; border-radius: 4px; }
.tx { font-style: italic; } .muted { color: #777; font-size: 0.88em; }
audio { width: 100%; height: 2.2em; }
"""


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(s: dict, digits: int = 3) -> str:
    if s.get("ci_low") is None:
        return "n < 2"
    return f"[{_fmt(s['ci_low'], digits)}, {_fmt(s['ci_high'], digits)}]"


def _audio(path: Optional[str], run_dir: Path, page_dir: Path) -> str:
    """An audio player for ``path`` (as written in judgements.jsonl), by a path relative to
    the page; a note when the file is not there."""
    if not path:
        return '<span class="muted">(no audio)</span>'
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, run_dir / p]
    candidates.append(run_dir / "generations" / p.name)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return f'<span class="muted">(missing: {_esc(path)})</span>'
    rel = Path(os.path.relpath(found.resolve(), page_dir.resolve())).as_posix()
    return f'<audio controls preload="none" src="{quote(rel)}"></audio>'


def _model_of(results: dict) -> str:
    cfg = results.get("config") or {}
    if not cfg:
        return "-"
    ck = cfg.get("checkpointer") or {}
    if ck.get("checkpoint_dir"):
        return str(ck["checkpoint_dir"])
    return f"{(cfg.get('model') or {}).get('_component_', '?')} (random weights)"


def _runs_table(runs, labels) -> str:
    rows = "".join(
        f"<tr><td>{_esc(label)}</td><td>{_esc(r['dir'])}</td><td>{_esc(_model_of(r['results']))}"
        f"</td><td>{_esc(r['results'].get('precision', '-'))}</td></tr>"
        for r, label in zip(runs, labels)
    )
    return (
        f"<table><tr><th>run</th><th>folder</th><th>model</th><th>precision</th></tr>{rows}</table>"
    )


def _suites_table(runs, labels) -> str:
    per_run = [_suite_rows(r["results"]) for r in runs]
    names = list(dict.fromkeys(k for rows in per_run for k in rows))
    head = "".join(f"<th>{_esc(label)}: acc % [95%]</th><th>pairs</th>" for label in labels)
    body = ""
    for name in names:
        cells = ""
        for rows in per_run:
            if name in rows:
                a, lo, hi, n = rows[name]
                cells += f'<td class="num">{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]</td>'
                cells += f'<td class="num">{n}</td>'
            else:
                cells += "<td>-</td><td>-</td>"
        body += f"<tr><td>{_esc(name)}</td>{cells}</tr>"
    return f"<table><tr><th>suite</th>{head}</tr>{body}</table>"


def _generation_table(runs, labels) -> str:
    gens = [r["results"].get("generation") or {} for r in runs]
    head = "".join(f"<th>{_esc(label)}: mean [95%]</th><th>n</th>" for label in labels)
    body = ""
    for key, title, better, _ in GENERATION_METRICS:
        if not any(key in g for g in gens):
            continue
        cells = ""
        for g in gens:
            s = g.get(key) or {}
            cells += f'<td class="num">{_fmt(s.get("mean"))} {_ci(s)}</td>'
            cells += f'<td class="num">{s.get("n", "-")}</td>'
        body += f"<tr><td>{_esc(title)} <span class='muted'>({better})</span></td>{cells}</tr>"
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>"


def _sample_metrics(row: dict) -> str:
    parts = []
    if row.get("judge_score") is not None:
        parts.append(f"judge <b>{row['judge_score']}</b>/10")
    elif row.get("judge_error"):
        parts.append(f"judge failed: {_esc(row['judge_error'])}")
    if row.get("genppl_nll") is not None:
        parts.append(f"PPL {math.exp(row['genppl_nll']):.1f}")
    if row.get("auto_bleu") is not None:
        parts.append(f"Auto-BLEU {row['auto_bleu']:.2f}")
    if row.get("speaker_similarity") is not None:
        parts.append(f"speaker sim. {row['speaker_similarity']:.3f}")
    return " · ".join(parts)


def _samples_html(runs, labels, page_dir: Path, max_samples: int) -> str:
    by_run = [{str(s["id"]): s for s in r["samples"]} for r in runs]
    ids = list(dict.fromkeys(i for rows in by_run for i in rows))[:max_samples]
    out = []
    for sid in ids:
        first = next(j for j, rows in enumerate(by_run) if sid in rows)
        row0 = by_run[first][sid]
        prompt = _audio(row0.get("prompt_audio"), runs[first]["dir"], page_dir)
        ptext = row0.get("prompt_text")
        conts = ""
        for j, rows in enumerate(by_run):
            row = rows.get(sid)
            if row is None:
                conts += f"<div><b>{_esc(labels[j])}</b><br><span class='muted'>(not in this run)</span></div>"
                continue
            reason = row.get("judge_reason")
            conts += (
                f"<div><b>{_esc(labels[j])}</b>"
                f"{_audio(row.get('continuation_audio'), runs[j]['dir'], page_dir)}"
                f"<div class='tx'>{_esc(row.get('continuation_text') or '(no transcript)')}</div>"
                f"<div>{_sample_metrics(row)}</div>"
                + (f"<div class='muted'>judge: {_esc(reason)}</div>" if reason else "")
                + "</div>"
            )
        out.append(
            f"<div class='sample'><h3>{_esc(sid)}</h3><div><b>prompt</b>{prompt}"
            + (f"<div class='tx'>{_esc(ptext)}</div>" if ptext else "")
            + f"</div><div class='cont'>{conts}</div></div>"
        )
    return "\n".join(out)


def write_report(
    run_dirs: Sequence[str | Path], output_dir: str | Path, max_samples: int = 8
) -> Path:
    """Writes ``report.html`` (and its plots in ``report_files/``) to ``output_dir`` for one
    evaluation run, or for several side by side; returns the page's path."""
    if not run_dirs:
        raise UserError("a report needs at least one run folder")
    runs = [load_run(d) for d in run_dirs]
    labels = _labels(runs)
    page_dir = Path(str(output_dir)).expanduser()
    files = page_dir / FILES
    with writing(files):
        files.mkdir(parents=True, exist_ok=True)
    title = "Evaluation report: " + " vs ".join(labels)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>",
        _runs_table(runs, labels),
    ]
    if plot_suites(runs, labels, files / "suites.png"):
        parts += [
            "<h2>Likelihood benchmarks</h2>",
            f"<img src='{FILES}/suites.png' alt='suite accuracies with 95% intervals'>",
            _suites_table(runs, labels),
            "<p class='muted'>Accuracy: the positive of a pair scored above its negative (ties "
            "count 0.5); interval: 95% Wilson score interval over the pairs.</p>",
        ]
    if plot_generation(runs, labels, files / "generation.png"):
        parts += [
            "<h2>Generation quality</h2>",
            f"<img src='{FILES}/generation.png' alt='generation metrics with 95% intervals'>",
            _generation_table(runs, labels),
            "<p class='muted'>Intervals: 95% Student t over the samples; GenPPL is exp of the "
            "mean transcript NLL under the text LM (its interval is the NLL's, through exp); "
            "Auto-BLEU is the share of repeated word bigrams in a transcript (SlamKit).</p>",
        ]
    samples = _samples_html(runs, labels, page_dir, max_samples)
    if samples:
        parts += ["<h2>Samples</h2>", samples]
    parts.append("</body></html>\n")
    page = page_dir / "report.html"
    with writing(page):
        page.write_text("\n".join(parts), encoding="utf-8")
    return page
