#!/bin/bash
# One-node training through torchrun (c10d rendezvous on this machine).
#
#   launch/torchrun.sh CONFIG [key=value ...]
#   NPROC=4 LOG_RANK=0,1 launch/torchrun.sh configs/fope_60m.yaml train.steps=100
#
# Environment (defaults in brackets):
#   NPROC         ranks on this node [number of visible GPUs, else 1]
#   MASTER_PORT   rendezvous port [0: any free port]
#   LOG_RANK      local ranks shown on the console: 0, 0,1,... or "all" [0]
#   LOG_DIR       where torchrun keeps every rank's stdout/stderr [a temporary directory]
#   PYTHON        interpreter [this repository's .venv/bin/python, else python3]
#   TRAIN_MODULE  module to run [fope_megatron.train]
#   TORCHRUN_EXTRA_ARGS  extra torchrun arguments, split on spaces
#   FOPE_CPU=1    CPU mode: CUDA hidden, so the trainer uses gloo; NPROC defaults to 1
# Arguments after CONFIG go to the trainer unchanged.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
fope_launch_setup "$@"
config=$1
shift
if [[ ${FOPE_CPU:-0} == 1 ]]; then export CUDA_VISIBLE_DEVICES=""; fi
MASTER_PORT=${MASTER_PORT:-0}
read -r -a extra <<<"${TORCHRUN_EXTRA_ARGS:-}"

args=(--nnodes=1 --nproc-per-node="$NPROC" --rdzv-backend=c10d --rdzv-endpoint="localhost:$MASTER_PORT")
args+=(--role=rank --tee=3)
[[ $LOG_RANK == all ]] || args+=(--local-ranks-filter="$LOG_RANK")
[[ -z ${LOG_DIR:-} ]] || args+=(--log-dir="$LOG_DIR")

set -x
exec "$PYTHON" -m torch.distributed.run "${args[@]}" "${extra[@]}" -m "$TRAIN_MODULE" --config "$config" "$@"
