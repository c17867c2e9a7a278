#!/usr/bin/env bash
# The whole SOLO pre-training curriculum: stage 1 -> 2 -> 3, each starting from the previous
# stage's weights (init_from in configs/stage*.yaml) with a fresh optimizer and schedule.
# Re-running resumes: a stage with a finished checkpoint in its save_dir continues from it.
set -euo pipefail
cd "$(dirname "$0")"
./pretrain_stage1.sh "$@"
./pretrain_stage2.sh "$@"
./pretrain_stage3.sh "$@"
