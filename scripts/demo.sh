#!/usr/bin/env bash
# The main job: installs everything, then runs the SOLO recipe end to end on CPU.
# (Until the end-to-end demo lands this checks the install and runs a tiny training sanity check.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -c "import solo, megatron.core, solo_preprocess; from solo.model import SOLOModel; print('solo-megatron imports ok')"
python3 -m pytest -q -p no:cacheprovider tests/test_model.py
