#!/usr/bin/env bash
# The lower ends of pyproject.toml's ranges, tested: a new venv gets llama-mimi-tt[test] with every
# dependency we declare held at the lowest version its range allows (constraints written from
# pyproject.toml: ">=X" becomes "==X"; what they pull in themselves resolves as pip likes), then
# runs the tests that exercise each of them: vocab/tokenizer (tiktoken, tokenizers), the code
# cache and data (datasets, pyarrow, torchdata), a tiny full and LoRA training run (torch,
# torchtune, torchao, safetensors; transformers loads the output), the server (fastapi, uvicorn)
# and the report (matplotlib, nltk).
#   bash scripts/test_min_versions.sh [WORK_DIR]   # ~12 min (4-5 of them pip; 6.5 the tests)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/llama_mimi_min.XXXXXX)}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
mkdir -p "$WORK"
"$PY" - "$REPO/pyproject.toml" >"$WORK/min-constraints.txt" <<'PYEOF'
import re, sys, tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
requirements = list(project["dependencies"])
for extra in project["optional-dependencies"].values():
    requirements += extra
floors = {}
for req in requirements:
    m = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*(.*)", req)
    name, spec = m.group(1).lower(), m.group(3)
    low = re.search(r">=\s*([^,;\s]+)", spec)
    if name != "llama-mimi-tt" and low:
        floors[name] = low.group(1)
for name, version in sorted(floors.items()):
    print(f"{name}=={version}")
PYEOF
echo "[min] the lower bounds ($WORK/min-constraints.txt):"
tr '\n' ' ' <"$WORK/min-constraints.txt"; echo
rm -rf "$WORK/venv" && "$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
echo "[min] installing llama-mimi-tt[test] at those versions (log: $WORK/pip.log)"
if ! "$WORK/venv/bin/python" -m pip install -c "$WORK/min-constraints.txt" -e "$REPO[test]" \
  >"$WORK/pip.log" 2>&1; then
  tail -n 30 "$WORK/pip.log"; exit 1
fi
"$WORK/venv/bin/python" -m pip list --format=freeze >"$WORK/installed.txt"
echo "[min] installed:"
grep -i -E "^($(cut -d= -f1 "$WORK/min-constraints.txt" | paste -sd'|'))==" "$WORK/installed.txt" |
  tr '\n' ' '; echo
cd "$REPO"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_vocab.py tests/test_tokenizer.py tests/test_code_cache.py tests/test_data.py \
  tests/test_recipes.py::test_full_run_loss_falls_and_output_loads_in_transformers \
  tests/test_recipes.py::test_lora_changes_only_lora_weights_and_audio_rows \
  tests/test_serve.py tests/test_report.py -k "not chromium"
