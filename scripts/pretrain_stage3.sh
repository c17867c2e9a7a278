#!/usr/bin/env bash
# SOLO stage 3 on one 8-GPU node (TP=2 x DP=4, distributed optimizer); extra args are key=value overrides.
exec "$(dirname "$0")/pretrain.sh" configs/stage3.yaml "$@"
