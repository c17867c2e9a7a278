#!/usr/bin/env bash
# Installs solo-megatron (scripts/setup.sh) and runs the whole test suite, distributed tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
