#!/usr/bin/env bash
# The main job: installs everything, then runs the SOLO recipe end to end on CPU (3-4 min on 2
# cores once installed): shard preprocessing, stages 1 -> 2 -> 3 and the SFT stage under torchrun
# (TP=2 on 2 gloo ranks), export to HuggingFace, and generations from the exported models.
# Output: demo_out/ (summary.json, loss_curves.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m solo.demo --out "${DEMO_OUT:-demo_out}" "$@"
