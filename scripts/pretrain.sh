#!/usr/bin/env bash
# Launch one SOLO stage with torchrun: scripts/pretrain.sh CONFIG [key=value ...]
# Single node: 8 GPUs (TP=2 x DP=4 as in the paper). Multi-node: set NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT on every node (scripts/slurm_pretrain.sbatch does it for SLURM).
#
# Stopping ahead of a time limit: send SIGUSR1 to this script (SLURM: --signal=B:USR1@600). The
# ranks finish their step, save a checkpoint and exit 0; rerunning the same command resumes.
# SIGTERM (or SIGINT) to this script alone is handed to the ranks the same way; a SIGTERM to the
# whole job also reaches torchrun, which kills its ranks 30 s later, less than a 7B step plus its
# checkpoint. SIGUSR1 would kill torchrun itself, so torchrun inherits "ignore SIGUSR1" and this
# script hands the signal to the ranks (torchrun's children).
#
# Exit status, as a scheduler sees it: 0 when the stage finished, and 0 after a signal (TERM, INT,
# USR1) once the ranks saved and stopped cleanly (result.json says `preempted: true`), although
# torchrun exits 1 after a signal of its own; otherwise torchrun's status (2: bad input, 3: non-finite
# loss, see README). The ranks' result reaches this script through $SOLO_RESULT_FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: scripts/pretrain.sh CONFIG.yaml [key=value ...]}
shift
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron-core overlap assumes it
SOLO_RESULT_FILE=$(mktemp "${TMPDIR:-/tmp}/solo-result.XXXXXX")
export SOLO_RESULT_FILE
trap 'rm -f "$SOLO_RESULT_FILE"' EXIT
signalled=""
trap '' USR1
torchrun \
    --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --nnodes "${NNODES:-1}" \
    --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    -m solo.train "$CONFIG" "$@" &
launcher=$!
trap 'signalled=SIGUSR1; echo "pretrain.sh: SIGUSR1: asking the ranks to save and stop" >&2
      pkill -USR1 -P "$launcher" || true' USR1
# TERM and INT go to the ranks too, not to torchrun: when the scheduler signals the whole job,
# torchrun already has one, and a second one would cut its shutdown short and with it (the ranks
# die with their launcher) the ranks' save.
trap 'signalled=SIGTERM; pkill -TERM -P "$launcher" || true' TERM
trap 'signalled=SIGINT; pkill -TERM -P "$launcher" || true' INT

finish() {
    local status=$1 checkpoint
    if [ "$status" -ne 0 ] && [ -n "$signalled" ] && grep -q '"preempted": true' "$SOLO_RESULT_FILE"; then
        checkpoint=$(sed -n 's/.*"checkpoint": "\(.*\)".*/\1/p' "$SOLO_RESULT_FILE")
        echo "pretrain.sh: stopped by $signalled after saving step $((10#${checkpoint##*iter_})) ($checkpoint);" \
             "torchrun said $status, this script exits 0. Rerun the same command to resume." >&2
        exit 0
    fi
    exit "$status"
}

while true; do
    status=0
    wait "$launcher" || status=$?
    kill -0 "$launcher" 2>/dev/null || finish "$status"  # else a trapped signal interrupted the wait
done
