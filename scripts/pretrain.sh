#!/usr/bin/env bash
# Launch one SOLO stage with torchrun: scripts/pretrain.sh CONFIG [key=value ...]
# Single node: 8 GPUs (TP=2 x DP=4 as in the paper). Multi-node: set NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT on every node (scripts/slurm_pretrain.sbatch does it for SLURM).
#
# Stopping ahead of a time limit: send SIGUSR1 to this script (SLURM: --signal=B:USR1@600). The
# ranks finish their step, save a checkpoint and exit 0; rerunning the same command resumes.
# SIGTERM works too, but torchrun kills its ranks 30 s after forwarding a SIGTERM, which is less
# than a 7B step plus its checkpoint. SIGUSR1 would kill torchrun itself, so torchrun inherits
# "ignore SIGUSR1" and this script hands the signal to the ranks (torchrun's children).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: scripts/pretrain.sh CONFIG.yaml [key=value ...]}
shift
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron-core overlap assumes it
trap '' USR1
torchrun \
    --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --nnodes "${NNODES:-1}" \
    --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    -m solo.train "$CONFIG" "$@" &
launcher=$!
trap 'echo "pretrain.sh: SIGUSR1: asking the ranks to save and stop" >&2; pkill -USR1 -P "$launcher" || true' USR1
trap 'kill -TERM "$launcher" 2>/dev/null || true' TERM INT
while true; do
    status=0
    wait "$launcher" || status=$?
    kill -0 "$launcher" 2>/dev/null || exit "$status"  # else a trapped signal interrupted the wait
done
