# shellcheck shell=bash disable=SC2034 # globals set here are read by the scripts that source it
# Shared by launch/torchrun.sh and launch/deepspeed.sh: sourced, never run.
# Reads the environment variables documented at the top of those scripts.

# Check for the CONFIG argument (pass "$@"); set PYTHON, NPROC, LOG_RANK and TRAIN_MODULE from the
# environment or their defaults.
fope_launch_setup() {
	if (($# < 1)); then
		echo "usage: $0 CONFIG [key=value ...]" >&2
		exit 2
	fi
	local root gpus
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	if [[ -z ${PYTHON:-} ]]; then
		if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
	fi
	if [[ -z ${NPROC:-} ]]; then
		NPROC=1
		if [[ ${FOPE_CPU:-0} != 1 ]] && command -v nvidia-smi >/dev/null; then
			gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
			((gpus > 0)) && NPROC=$gpus
		fi
	fi
	LOG_RANK=${LOG_RANK:-0}
	TRAIN_MODULE=${TRAIN_MODULE:-fope_megatron.train}
}
