#!/usr/bin/env bash
# The test command: sets up .venv if needed, checks lint, format and the declared dependencies
# (deptry: every imported module declared, every declared one imported), runs the tests on CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/deptry .
exec .venv/bin/python -m pytest "$@"
