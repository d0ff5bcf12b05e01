#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs llama-mimi-tt into it, once per kind of set-up:
#   bash scripts/setup.sh test   # (default) the package with its [test] extra, and chromium for
#                                # the browser test (root + apt-get only)
#   bash scripts/setup.sh demo   # the package and matplotlib (the demo's loss curve), nothing else
# Versions come from constraints.txt (the lock: scripts/lock.sh regenerates it), so every run
# and CI resolve the same ones. Sourced by demo.sh and test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kind=${1:-test}
case "$kind" in
  test) targets=(-e ".[test]") ;;
  demo) targets=(-e . matplotlib) ;;
  *) echo "[setup] unknown set-up '$kind': use 'test' or 'demo'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.llama_mimi_tt_installed_$kind
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "[setup] installing llama-mimi-tt ($kind) into .venv from constraints.txt (torch is a large download the first time)"
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --upgrade pip &&
    .venv/bin/python -m pip install -c constraints.txt "${targets[@]}"; } >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "[setup] pip install failed; full log: $log" >&2
    exit 1
  fi
  echo "[setup] installed (log: $log)"
  touch "$stamp"
fi
# tests/test_serve.py drives the page in headless chromium: install it where we may (root + apt).
if [ "$kind" = test ] && ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ] &&
  command -v apt-get >/dev/null; then
  echo "[setup] installing chromium and chromium-driver with apt-get (for the browser test)"
  if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      chromium chromium-driver; } >.venv/apt.log 2>&1; then
    tail -n 20 .venv/apt.log
    echo "[setup] could not install chromium (log: .venv/apt.log); the browser test will say so" >&2
  fi
fi
