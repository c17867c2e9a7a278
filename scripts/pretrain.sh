#!/usr/bin/env bash
# Launch one SOLO stage with torchrun: scripts/pretrain.sh CONFIG [key=value ...]
# Single node: 8 GPUs (TP=2 x DP=4 as in the paper). Multi-node: set NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT on every node (scripts/slurm_pretrain.sbatch does it for SLURM).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: scripts/pretrain.sh CONFIG.yaml [key=value ...]}
shift
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron-core overlap assumes it
exec torchrun \
    --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --nnodes "${NNODES:-1}" \
    --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    -m solo.train "$CONFIG" "$@"
