#!/usr/bin/env bash
# The demo: sets up .venv if needed, then tokenizes the bundled clips, trains a tiny
# Llama-Mimi on them, generates a continuation, and prints where the results are.
# Real weights: bash scripts/demo.sh --mimi MIMI.safetensors [--llama-mimi DIR | --llama DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh demo
exec .venv/bin/python scripts/demo.py "$@"
