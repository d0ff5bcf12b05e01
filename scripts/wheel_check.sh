#!/usr/bin/env bash
# The wheel, installed (not editable) in a new venv and run from another folder, runs the demo's
# three recipes: tokenize the bundled clips, train the tiny model, generate a continuation.
# The core install brings no extra (no fastapi, uvicorn, matplotlib, transformers, nltk, whisper),
# every recipe module imports without them (the server's says which extra it needs), and
# `pip install 'llama-mimi-tt[serve]'` then makes the server importable.
#   bash scripts/wheel_check.sh [WORK_DIR]     # ~3 min with pip's cache warm (torch is large)
# Only the clips and the tiny random base (scripts/tiny_base.py) come from the repository.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/llama_mimi_wheel.XXXXXX)}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
mkdir -p "$WORK"
cd "$WORK"
echo "[wheel] building the wheel of $REPO (its tracked and untracked-but-not-ignored files)"
rm -rf src dist && mkdir src
git -C "$REPO" ls-files -z -co --exclude-standard | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C src
"$PY" -m pip wheel --no-deps -q -w dist ./src
if unzip -l dist/llama_mimi_tt-*.whl | grep -q -E "llama_mimi_tt/(demo|tiny)\.py"; then
  echo "[wheel] the wheel ships developer tools (demo.py / tiny.py)" >&2; exit 1
fi
wheel=$(ls dist/llama_mimi_tt-*.whl)
echo "[wheel] $wheel: a new venv in $WORK/venv, pip install (torch is a large download the first time)"
rm -rf venv && "$PY" -m venv venv
venv/bin/python -m pip install -q "$wheel" >pip.log 2>&1 || { tail -n 30 pip.log; exit 1; }
where=$(venv/bin/python -c "import llama_mimi_tt, llama_mimi_full; print(llama_mimi_tt.__file__, llama_mimi_full.__file__)")
case "$where" in
  "$WORK"/venv/*) echo "[wheel] imports from the install: $where" ;;
  *) echo "[wheel] llama_mimi_tt is not imported from the new venv: $where" >&2; exit 1 ;;
esac
venv/bin/python -m pip list --format=freeze >core.txt
echo "[wheel] the core install: $(wc -l <core.txt) distributions: $(cut -d= -f1 core.txt | tr '\n' ' ')"
extras=$(grep -i -E "^(fastapi|uvicorn|starlette|matplotlib|transformers|nltk|openai-whisper)==" core.txt || true)
if [ -n "$extras" ]; then echo "[wheel] the core install brought extras: $extras" >&2; exit 1; fi
venv/bin/python - <<'PYEOF'
import importlib

import llama_mimi_tt

for name in [
    "llama_mimi_tokenize", "llama_mimi_full", "llama_mimi_lora", "llama_mimi_generate",
    "llama_mimi_eval", "llama_mimi_pairs", "llama_mimi_dpo",
    "llama_mimi_tt.codec", "llama_mimi_tt.data", "llama_mimi_tt.training", "llama_mimi_tt.judge",
    "llama_mimi_tt.asr", "llama_mimi_tt.speaker_similarity", "llama_mimi_tt.statistics",
    "llama_mimi_tt.report", "llama_mimi_tt.text_metrics", "llama_mimi_tt.quantize",
]:
    importlib.import_module(name)
print(f"[wheel] import check: llama_mimi_tt {llama_mimi_tt.__file__} and the recipes import without extras")
try:
    importlib.import_module("llama_mimi_serve")
    raise SystemExit("[wheel] llama_mimi_serve imported without the [serve] extra")
except ImportError as e:
    print(f"[wheel] without [serve]: {e}")
PYEOF
tune=venv/bin/tune
set -x
$tune run llama_mimi_tokenize --config tokenize source="$REPO/demo/manifest.jsonl" \
  output_dir=codes codec.path=random num_quantizers=4
venv/bin/python "$REPO/scripts/tiny_base.py" tiny_base
$tune run llama_mimi_full --config tiny_full cache_dir=codes base_dir=tiny_base output_dir=train epochs=2
step=$(ls -d train/step_* | sort -t_ -k2 -n | tail -n 1)
$tune run llama_mimi_generate --config generate model_dir="$step" output_dir=gen \
  prompt_audio="[$REPO/demo/clips/clip01.flac]" max_seconds=1.0
set +x
ls gen/*.wav >/dev/null
echo "[wheel] pip install '$wheel[serve]'"
venv/bin/python -m pip install -q "$wheel[serve]" >>pip.log 2>&1 || { tail -n 30 pip.log; exit 1; }
venv/bin/python -m pip list --format=freeze >serve.txt
echo "[wheel] [serve] added: $(comm -13 <(sort core.txt) <(sort serve.txt) | tr '\n' ' ')"
venv/bin/python -c "import llama_mimi_serve, llama_mimi_tt.serve; print('[wheel] llama_mimi_serve imports')"
echo "[wheel] ok: the three recipes ran from the installed wheel in $WORK"
