#!/bin/bash
# One-node training through the DeepSpeed launcher.
#
#   launch/deepspeed.sh CONFIG [key=value ...]
#   NPROC=8 launch/deepspeed.sh configs/llama_1b_fope.yaml
#
# Environment (defaults in brackets):
#   NPROC         ranks on this node [number of visible GPUs, else 1]
#   MASTER_PORT   torch.distributed port [29500]
#   LOG_RANK      ranks shown on the console: 0, 0,1,... or "all" [0]; with a filter every rank's
#                 output goes to LOG_DIR/<time>_rank<R>.log and the chosen ones are followed there
#   LOG_DIR       per-rank logs [a new temporary directory]
#   PYTHON        interpreter [this repository's .venv/bin/python, else python3]
#   TRAIN_MODULE  module to run [fope_megatron.train]
#   DEEPSPEED_EXTRA_ARGS  extra launcher arguments, split on spaces
#   FOPE_CPU=1    CPU mode: DeepSpeed's CPU accelerator, gloo; NPROC defaults to 1
# Arguments after CONFIG go to the trainer unchanged. Ranks read LOCAL_RANK from the environment
# (--no_local_rank), so the trainer's command line stays `--config CONFIG key=value ...`.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
fope_launch_setup "$@"
config=$1
shift
if [[ ${FOPE_CPU:-0} == 1 ]]; then export DS_ACCELERATOR=cpu; fi
MASTER_PORT=${MASTER_PORT:-29500}
read -r -a extra <<<"${DEEPSPEED_EXTRA_ARGS:-}"

cmd=("$PYTHON" -u -m deepspeed.launcher.runner --num_gpus="$NPROC" --master_port="$MASTER_PORT")
cmd+=(--no_local_rank "${extra[@]}")
if [[ $LOG_RANK == all ]]; then
	set -x
	exec "${cmd[@]}" --module "$TRAIN_MODULE" --config "$config" "$@"
fi

# The deepspeed launcher has no console rank filter: send every rank to its own file and follow
# the chosen ones.
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fope-deepspeed.XXXXXX")}
mkdir -p "$LOG_DIR"
echo "[launch] every rank's output: $LOG_DIR/*_rank<R>.log; following rank(s) $LOG_RANK" >&2
set -x
"${cmd[@]}" --enable_each_rank_log="$LOG_DIR" --module "$TRAIN_MODULE" --config "$config" "$@" &
{ set +x; } 2>/dev/null
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM

IFS=, read -r -a ranks <<<"$LOG_RANK"
files=()
for r in "${ranks[@]}"; do
	# The launcher names the files when it spawns the ranks; wait for them (or for its exit).
	while kill -0 "$pid" 2>/dev/null; do
		f=$(compgen -G "$LOG_DIR/*_rank${r}.log" | tail -n 1 || true)
		if [[ -n $f ]]; then
			files+=("$f")
			break
		fi
		sleep 0.2
	done
done
if ((${#files[@]})); then tail -q -n +1 -s 0.5 -F --pid="$pid" "${files[@]}" || true; fi
rc=0
wait "$pid" || rc=$?
exit "$rc"
