#!/usr/bin/env bash
# Installs solo-megatron (scripts/setup.sh), lints with ruff and runs the whole test suite, distributed
# tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .   # lint first: E, F, B, I, UP at 120 columns (pyproject.toml)
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
