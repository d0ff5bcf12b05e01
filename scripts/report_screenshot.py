"""docs/report.png: ``report.html`` comparing two evaluation runs, in headless chromium.

Every number and word on that page is made up here to show the layout; none is a result of any
model. The two runs are ``fixture-A`` and ``fixture-B`` (model ``fixture/random-model-A`` and
``-B``); their audio is noise,
their transcripts are fixed sentences, their judge scores come from a stand-in judge (no LLM),
GenPPL from a tiny random text LM and the benchmark outcomes from a formula. Redraw it with

    .venv/bin/python -m scripts.report_screenshot docs/report.png

(needs the ``[eval]`` and ``[test]`` extras and chromium with chromedriver, as
tests/test_serve.py's page test does).
"""

import argparse
import base64
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from llama_mimi_tt.evaluation import summarize
from llama_mimi_tt.judge import evaluate_generations
from llama_mimi_tt.report import write_report
from llama_mimi_tt.text_metrics import TextLM
from tests.hf_fixtures import make_tiny_hf_llama

PROMPT_TEXT = "(made up) once upon a time"
TRANSCRIPTS = {  # run -> made-up continuation transcripts, one per sample
    "A": [
        "and then she walked down to the river to see the boats come in",
        "I like it, I like it, I like it.",
        "the weather was cold but the people in the market were friendly",
    ],
    "B": [
        "and then she walked down to the river and the river and the river",
        "I think that we should go home now before it gets dark",
        "yes yes yes no",
    ],
}


class StandInJudge:
    """Gives each continuation a made-up score (from its length), in place of an LLM."""

    model = "fixture stand-in judge (no LLM)"

    def judge(self, prompt_text: str, continuation_text: str) -> dict:
        score = 3 + len(continuation_text.split()) % 6
        return dict(score=score, reason="made-up score of the stand-in judge", attempts=1,
                    error=None, reply=None)  # fmt: skip


def noise_wav(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(str(path), (rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
    return str(path)


def made_up_run(folder: Path, name: str, text_lm: TextLM) -> Path:
    """An evaluation output folder as llama_mimi_eval leaves one, with made-up contents."""
    run = folder / f"fixture-{name}"
    texts = TRANSCRIPTS[name]
    items = [
        {"id": f"utt{i}", "prompt_audio": noise_wav(run / "generations" / f"utt{i}_prompt.wav", i),
         "continuation_audio": noise_wav(run / "generations" / f"utt{i}_cont.wav", 10 + i)}
        for i in range(len(texts))
    ]  # fmt: skip
    transcripts = {f"utt{i}": {"continuation_text": t, "prompt_text": PROMPT_TEXT}
                   for i, t in enumerate(texts)}  # fmt: skip
    generation = evaluate_generations(
        items, run, judge=StandInJudge(), speaker=lambda w, sr: w[:100] + 1.0,
        transcripts=transcripts, text_lm=text_lm, progress=False,
    )  # fmt: skip
    shift = "AB".index(name)  # B "wins" a few more made-up pairs than A
    records = [
        {"suite": suite, "subset": sub, "outcome": float((k + shift) % 3 != 0)}
        for suite, subs in [("SALMon", ["gender", "speaker"]), ("sWUGGY", ["dev"])]
        for sub in subs
        for k in range(20)
    ]
    results = {
        "precision": "fp32",
        "config": {"checkpointer": {"checkpoint_dir": f"fixture/random-model-{name}"}},
        "suites": summarize(records),
        "generation": generation,
    }
    (run / "results.json").write_text(json.dumps(results))
    return run


def screenshot(page: Path, png: Path, width: int = 1200) -> None:
    """The whole page, as headless chromium draws it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        raise SystemExit(
            "needs chromium and chromedriver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},1000"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(page.resolve().as_uri())
        size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = dict(x=0, y=0, width=size["width"], height=size["height"], scale=1)
        shot = browser.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        png.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text_lm = TextLM(str(make_tiny_hf_llama(tmp / "text_lm", tokenizer="json", seed=3)))
        runs = [made_up_run(tmp, name, text_lm) for name in "AB"]
        page = write_report(runs, tmp / "a_vs_b")
        screenshot(page, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
