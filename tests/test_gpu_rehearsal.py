"""The GPU rehearsal's dry run (bench/gpu_rehearsal.py --dry-run): every measurement of both
stages runs on CPU at tiny shapes, so the script cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def entries(run: dict) -> dict:
    return {(e["measurement"], e["metric"]): e for e in run["entries"]}


def test_dry_run_measures_every_stage(tmp_path):
    results, markdown = tmp_path / "results.json", tmp_path / "RESULTS.md"
    markdown.write_text("# Results\n\n## Another section\n\nkept\n")
    cmd = [sys.executable, str(REPO / "bench" / "gpu_rehearsal.py"), "--dry-run"]
    cmd += ["--workdir", str(tmp_path / "work"), "--results", str(results)]
    (tmp_path / "mirror").mkdir()
    cmd += ["--markdown", str(markdown), "--mirror", str(tmp_path / "mirror")]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    runs = json.loads(results.read_text())["runs"]
    assert [(r["stage"], r["dry_run"]) for r in runs] == [("A", True), ("B", True)]
    for run in runs:
        assert run["env"]["torch"] and run["env"]["versions"]["torchtune"] == "0.6.1"
        failed = [e for e in run["entries"] if e.get("error") or e.get("skipped")]
        assert not failed, failed
    a, b = entries(runs[0]), entries(runs[1])

    for name in ("1B_full", "1B_lora_single_device", "8B_qlora_single_device, batch 2",
                 "8B_qlora_single_device, batch 1"):  # fmt: skip
        assert a[(name, "tokens/s per GPU")]["value"] > 0, name
        assert 0.1 < a[(name, "peak memory (GiB)")]["value"] < 20, name
    full = a[("1B_full", "tokens/s per GPU")]
    assert sorted(full["log"]) == ["1", "2", "3"]  # log_every_n_steps=1, steps 1..3
    assert a[("1B_full", "MFU (%)")]["value"] is None  # no GPU peak on a CPU
    assert a[("1B_full", "MFU (%)")]["mfu_vs_matmul"] > 0
    resume = a[("1B_lora_single_device", "resume: max |loss difference|")]
    assert resume["value"] <= 1e-6 and resume["met"] is True
    assert list(resume["losses"]["resumed"]) == ["3"]  # step_2 resumed, step 3 trained again
    assert a[("8B_qlora_single_device, batch 2", "peak memory (GiB)")]["met"] is True

    encode = b[("Mimi encoding (llama_mimi_tokenize), batch 1", "x real time")]
    assert encode["value"] > 0 and encode["met"] is False  # a CPU is far from 2000x
    assert b[("Mimi encoding (MimiCodec.encode_batch alone), batch 1", "x real time")]["value"] > 0
    for batch in (1, 2):
        gen = b[(f"1B_generate, batch {batch}", "tokens/s")]
        assert gen["value"] > 0 and gen["rtf"] > 0
        assert gen["summary"]["tokens"] == batch * 3 * 4  # 0.24 s = 3 frames of Q = 4
    for mode in ("mean", "semantic"):
        assert b[(f"1B_eval, SALMon pairs, {mode} score", "pairs/s")]["value"] > 0
    assert b[("1B_lora_dpo_single_device", "tokens/s per GPU")]["value"] > 0

    # dry runs never fill the GPU section; the other sections stay; the mirror has both files
    text = markdown.read_text()
    assert "## Another section\n\nkept" in text
    assert "## GPU rehearsal (bench/gpu_rehearsal.py)" in text and "Not yet run on a GPU." in text
    assert (tmp_path / "mirror" / "results.json").read_text() == results.read_text()
    assert (tmp_path / "mirror" / "RESULTS.md").read_text() == text


def test_section_shows_the_latest_gpu_run_of_each_stage():
    from gpu_rehearsal import render_section

    env = dict(torch="2.11.0", cuda="13.0", python="3.12.3", gpu="NVIDIA H200",
               peak_bf16_tflops=989.4, matmul_tflops=790.0,
               versions=dict(torchtune="0.6.1", torchao="0.15.0", moshi="absent",
                             transformers="5.17.0"))  # fmt: skip
    run = dict(stage="A", dry_run=False, date="2026-12-01T10:00:00", env=env)
    old = dict(run, date="2026-11-30T10:00:00", entries=[])
    new = dict(run, entries=[
        dict(measurement="1B_full", metric="MFU (%)", value=41.5, goal=">= 40%", met=True,
             notes="6N"),
        dict(measurement="Mimi encoding", metric="-", value=None, goal=None, met=None, notes="",
             skipped="moshi is not installed on this machine"),
    ])  # fmt: skip
    dry = dict(run, dry_run=True, date="2026-12-02T10:00:00", entries=[])
    text = render_section({"runs": [old, new, dry]})
    assert "### Stage A, 2026-12-01, NVIDIA H200" in text
    assert "| 1B_full | MFU (%) | 41.5 | >= 40% | yes | 6N |" in text
    assert "| Mimi encoding | - | skipped |  |  | moshi is not installed on this machine |" in text
    assert "Not yet run" not in text and "2026-11-30" not in text


def test_a_stage_skips_what_cannot_run_and_keeps_each_figure_as_it_goes(tmp_path, monkeypatch):
    import gpu_rehearsal

    results = tmp_path / "results.json"
    seen, rehearsal = [], {}

    def fails():
        raise RuntimeError("CUDA out of memory")

    def measures():  # what the file holds while this measurement runs
        seen.extend(e["measurement"] for e in json.loads(results.read_text())["runs"][0]["entries"])
        rehearsal["r"].results.add("ok", "tokens/s", 5.0)

    def items(r, stage):
        rehearsal["r"] = r
        return [
            ("needs Mimi", 1, measures, "no_such_module_here"),
            ("too long", 10_000, measures, None),
            ("fails", 1, fails, None),
            ("ok", 1, measures, None),
        ]

    monkeypatch.setitem(gpu_rehearsal.REAL, "device", "cpu")  # the real path, on this CPU
    monkeypatch.setattr(gpu_rehearsal, "stage_items", items)
    args = gpu_rehearsal.argparse.Namespace(
        dry_run=False, workdir=str(tmp_path), results=results, markdown=tmp_path / "R.md",
        mirror=None, budget_s=100, only=None,
    )  # fmt: skip
    assert gpu_rehearsal.run_stage(args, "A") is False  # a failure is reported

    entries = json.loads(results.read_text())["runs"][0]["entries"]
    by_name = {e["measurement"]: e for e in entries}
    assert (
        by_name["needs Mimi"]["skipped"] == "no_such_module_here is not installed on this machine"
    )
    assert by_name["too long"]["skipped"].startswith("needs ~10000 s, ")
    assert by_name["fails"]["error"] == "RuntimeError: CUDA out of memory"
    assert by_name["ok"]["value"] == 5.0
    assert seen == ["needs Mimi", "too long", "fails"]  # written before the next one started
    text = (tmp_path / "R.md").read_text()
    assert "| fails | - | FAILED |  |  | RuntimeError: CUDA out of memory |" in text
