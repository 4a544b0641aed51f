#!/usr/bin/env bash
# Regenerate every accuracy figure in README.md: OUT/results.md (the tables) and OUT/accuracy_vs_bits.png.
# Usage: bash scripts/reproduce_results.sh [--budget quick|full] OUT [--tasks sst2 squad ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" scripts/reproduce_results.py "$@"
