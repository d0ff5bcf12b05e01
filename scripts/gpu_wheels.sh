#!/usr/bin/env bash
# Wheels for a GPU machine whose image has torch (and numpy, safetensors, tokenizers, pyarrow,
# transformers ...) but not our other dependencies: downloads them for Python 3.12 on x86-64,
# with this repository built as a wheel, into .whl/ (git-ignored; about 11 MB).
#
#   bash scripts/gpu_wheels.sh
#
# Then, on the GPU machine, from a copy of this repository with .whl/ beside it:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 bench/gpu_rehearsal.py --stage A
# (bench/README.md: "On a GPU"). The versions are the ones the project is tested with; --no-deps
# ignores moshi's cap on torch (< 2.10), which a newer image's torch exceeds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  torchtune==0.6.1 torchao==0.15.0 torchdata==0.11.0 omegaconf==2.4.0 \
  datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 \
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 moshi==0.2.13
# llama_mimi_tt + the recipes, from the tracked and untracked-but-not-ignored files (as
# scripts/wheel_check.sh: a stale build/ never gets in)
src=$(mktemp -d /tmp/llama_mimi_src.XXXXXX)
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$src"
"$PY" -m pip wheel -q --no-deps -w .whl "$src" >"$src.log" 2>&1 || { cat "$src.log"; exit 1; }
rm -f "$src.log"
rm -rf "$src"
ls -1 .whl
du -sh .whl
