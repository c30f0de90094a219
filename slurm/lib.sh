# shellcheck shell=bash disable=SC2034 # globals set here are read by the scripts that source it
# Shared by slurm/pretrain.sbatch and slurm/pretrain_deepspeed.sbatch: sourced, never run.
# Everything here reads the environment variables documented at the top of those scripts.

REQUEUE_EXIT_CODE=99 # fope_megatron.train exits with this after saving on SIGUSR1/SIGTERM

fope_log() { echo "[fope $(date -u +%H:%M:%S)] $*"; }
fope_die() {
	echo "[fope] error: $*" >&2
	exit 1
}

# Resolve paths, interpreter, node/GPU counts, run dir and rendezvous address. Exports what the
# launchers on every node need (srun passes the environment through).
fope_setup() {
	[[ -n ${SLURM_JOB_ID:-} ]] || fope_die "submit with sbatch (SLURM_JOB_ID is not set)"
	[[ -n ${CONFIG:-} ]] || fope_die "set CONFIG=path/to/config.yaml (CONFIG=... sbatch slurm/pretrain.sbatch)"
	[[ -f $CONFIG ]] || fope_die "CONFIG=$CONFIG does not exist (relative paths are relative to $PWD)"
	CONFIG=$(realpath "$CONFIG")

	if [[ -z ${PYTHON:-} ]]; then
		if [[ -n ${VENV:-} ]]; then
			PYTHON=$VENV/bin/python
		elif [[ -x $FOPE_ROOT/.venv/bin/python ]]; then
			PYTHON=$FOPE_ROOT/.venv/bin/python
		else
			PYTHON=$(command -v python3) || fope_die "no python3 on PATH; set PYTHON or VENV"
		fi
	fi
	[[ -x $PYTHON ]] || fope_die "PYTHON=$PYTHON is not executable"

	FOPE_CPU=${FOPE_CPU:-0}
	if [[ $FOPE_CPU == 1 ]]; then
		# CPU mode (tests, debugging): gloo ranks (one per node unless GPUS_PER_NODE says), no GPUs.
		GPUS_PER_NODE=${GPUS_PER_NODE:-1}
		export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
	else
		local gpus=${SLURM_GPUS_ON_NODE:-0}
		[[ $gpus =~ ^[0-9]+$ ]] || gpus=0
		((gpus > 0)) || gpus=8
		GPUS_PER_NODE=${GPUS_PER_NODE:-$gpus}
	fi

	RUN_ROOT=${RUN_ROOT:-$FOPE_ROOT/runs}
	# The job id survives a requeue, so a requeued job finds its own run dir and resumes there.
	RUN_DIR=${RUN_DIR:-$RUN_ROOT/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
	RUN_DIR=$(realpath -m "$RUN_DIR")
	mkdir -p "$RUN_DIR/slurm"

	mapfile -t FOPE_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
	((${#FOPE_HOSTS[@]} == SLURM_NNODES)) ||
		fope_die "scontrol show hostnames gave ${#FOPE_HOSTS[@]} hosts for $SLURM_NNODES nodes"
	# Never inherited: sbatch exports the submitting shell's environment, where a MASTER_ADDR left
	# over from a local run would point every node at the login node.
	MASTER_ADDR=$(fope_resolve_node "${FOPE_HOSTS[0]}")
	# Derived from the job id: concurrent jobs sharing a node do not collide, a requeue reuses it.
	MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
	TRAIN_MODULE=${TRAIN_MODULE:-fope_megatron.train}
	MAX_REQUEUES=${MAX_REQUEUES:-50}
	FAILURE_REQUEUES=${FAILURE_REQUEUES:-3}
	read -r -a FOPE_SRUN_EXTRA <<<"${SRUN_EXTRA_ARGS:-}"
	export FOPE_ROOT PYTHON CONFIG FOPE_CPU GPUS_PER_NODE RUN_DIR MASTER_ADDR MASTER_PORT TRAIN_MODULE
	fope_nccl_env
}

# A node name -> an address every node can reach: Slurm's NodeAddr for it (what slurmctld itself
# connects to), then the first IPv4 address the resolver gives for that.
fope_resolve_node() {
	local host=$1 info addr ip
	info=$(scontrol show node -o "$host" 2>/dev/null || true)
	addr=$host
	if [[ $info =~ NodeAddr=([^[:space:]]+) ]]; then addr=${BASH_REMATCH[1]}; fi
	ip=$(getent ahostsv4 "$addr" 2>/dev/null | awk 'NR == 1 { print $1 }')
	echo "${ip:-$addr}"
}

# ---- NCCL and runtime template: the one place to adapt to a cluster's network -------------------
# Values already in the environment win, so `NCCL_DEBUG=INFO sbatch ...` works without edits.
fope_nccl_env() {
	export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
	# Fail fast with a stack dump instead of hanging when a peer dies.
	export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
	export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
	# megatron-core orders tensor-parallel communication before compute with a single queue.
	export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
	# Fabric-specific, set per cluster (examples):
	#   export NCCL_SOCKET_IFNAME=ib0            # bootstrap/socket interface (or ^lo,docker0)
	#   export NCCL_IB_HCA=mlx5_0,mlx5_1          # InfiniBand adapters
	#   export NCCL_IB_GID_INDEX=3                # RoCE
	#   export NCCL_NET_GDR_LEVEL=PHB             # GPUDirect RDMA distance
	#   export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1   # AWS EFA
	local cpus=${SLURM_CPUS_ON_NODE:-1}
	export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1))}
	export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
}

# Versions and environment, printed and kept in RUN_DIR/slurm/ for every (re)start of the job.
fope_log_env() {
	local out="$RUN_DIR/slurm/job${SLURM_JOB_ID}-restart${SLURM_RESTART_COUNT:-0}.txt" rev dirty=""
	rev=$(git -C "$FOPE_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
	git -C "$FOPE_ROOT" diff --quiet HEAD 2>/dev/null || dirty=" (uncommitted changes)"
	{
		echo "===== fope job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) restart ${SLURM_RESTART_COUNT:-0} $(date -u +%FT%TZ)"
		echo "nodes: ${SLURM_NNODES} x ${GPUS_PER_NODE} ranks  [${FOPE_HOSTS[*]}]  batch host $(hostname)"
		echo "rendezvous: ${MASTER_ADDR}:${MASTER_PORT}  (first node ${FOPE_HOSTS[0]})"
		echo "run dir: ${RUN_DIR}"
		echo "config: ${CONFIG}  module: ${TRAIN_MODULE}  cpu mode: ${FOPE_CPU}"
		echo "repo: ${FOPE_ROOT} @ ${rev}${dirty}"
		echo "slurm: $(sinfo --version 2>/dev/null || echo unknown)"
		"$PYTHON" - <<'PY' 2>&1 || echo "python: version probe failed"
import os
import sys
from importlib import metadata

print(f"python: {sys.version.split()[0]} ({sys.executable})")
for dist in ("torch", "deepspeed", "megatron-core", "transformer-engine", "fope-megatron"):
    try:
        print(f"{dist}: {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        pass
if os.environ.get("FOPE_CPU") != "1":  # importing torch costs seconds; CPU mode has nothing to report
    import torch

    cuda = torch.cuda.is_available()
    print(f"cuda: {torch.version.cuda} available={cuda} devices={torch.cuda.device_count()}")
    if cuda:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        print(f"nccl: {nccl}  gpu0: {torch.cuda.get_device_name(0)}")
PY
		if command -v nvidia-smi >/dev/null; then
			nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
		fi
		echo "----- environment"
		env | grep -E '^(SLURM_|SBATCH_|NCCL_|TORCH_|CUDA_|FI_|DS_|FOPE_|OMP_|MASTER_|PYTHON|RUN_|CONFIG=|GPUS_PER_NODE=)' | sort || true
		echo "====="
	} | tee "$out"
}

# ---- preemption and time limits -------------------------------------------------------------------
# Slurm sends SIGUSR1 to this batch shell ahead of the time limit (#SBATCH --signal=B:USR1@T) or
# by hand (scancel --signal=USR1 --batch JOBID). The trap passes it to the srun step: srun forwards
# it to every process of the step on every node. The launchers (torchrun, deepspeed) ignore it (see
# FOPE_STEP_WRAPPER) so they neither die nor tear the workers down; the trainer ranks save a
# checkpoint at the end of the step and exit 99. The job then requeues itself: same job id, same
# RUN_DIR, and train.resume=auto continues from that checkpoint.
FOPE_SIGNALLED=0
FOPE_STEP_PID=""
fope_on_signal() {
	FOPE_SIGNALLED=1
	fope_log "got SIG$1: the trainer will checkpoint at the end of its step, then the job requeues"
	if [[ -n $FOPE_STEP_PID ]]; then kill -s "$1" "$FOPE_STEP_PID" 2>/dev/null || true; fi
}
fope_trap_signals() { trap 'fope_on_signal USR1' USR1; }

# `bash -c "$FOPE_STEP_WRAPPER" NAME cmd...` runs cmd with SIGUSR1 ignored. Ignored signals stay
# ignored across exec, so torchrun/deepspeed do not die of it (its default action), while the trainer
# installs its own handler. Only the trainer decides when to stop.
# shellcheck disable=SC2016 # expanded by the per-node bash, not here
FOPE_STEP_WRAPPER='trap "" USR1; exec "$@"'

# Run the srun command line "$@" and wait for it; requeue the job if the trainer stopped to save.
# Returns the step's exit status (0 after a successful requeue).
fope_run_step() {
	local rc=0 latest_before started
	latest_before=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || true)
	started=$(date +%s)
	"$@" &
	FOPE_STEP_PID=$!
	# A signal that came while the job was still starting up.
	if ((FOPE_SIGNALLED)); then kill -s USR1 "$FOPE_STEP_PID" 2>/dev/null || true; fi
	wait "$FOPE_STEP_PID" || rc=$?
	# A trapped signal interrupts `wait` with a status > 128 while the step still runs: wait on.
	while ((rc > 128)) && kill -0 "$FOPE_STEP_PID" 2>/dev/null; do
		rc=0
		wait "$FOPE_STEP_PID" || rc=$?
	done
	# The step may have ended just as a signal came; bash keeps its real status for another wait.
	if ((rc > 128)); then
		rc=0
		wait "$FOPE_STEP_PID" || rc=$?
	fi
	fope_log "training step exited with status $rc"
	# torchrun turns the trainer's 99 into its own 1; deepspeed passes 99 through. Either way a
	# non-zero exit after our signal means "stopped to save".
	if ((rc == REQUEUE_EXIT_CODE)) || { ((FOPE_SIGNALLED)) && ((rc != 0)); }; then
		if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
			fope_log "not requeueing: restart ${SLURM_RESTART_COUNT} reached MAX_REQUEUES=${MAX_REQUEUES}"
			return "$rc"
		fi
		fope_log "requeueing job ${SLURM_JOB_ID}; it resumes from the checkpoint in ${RUN_DIR}"
		scontrol requeue "$SLURM_JOB_ID" || return "$rc"
		return 0
	fi
	if ((rc != 0)) && fope_failure_requeue "$latest_before" "$started"; then
		scontrol requeue "$SLURM_JOB_ID" || return "$rc"
		return 0
	fi
	return "$rc"
}

# After a failed step without our signal (a rank or node died, a collective timed out): requeue
# only when this attempt completed a newer checkpoint, so the requeued job resumes past where this
# one started; never after the trainer stopped a diverged run (exit_status.json "nonfinite"),
# never for failures that would repeat from the same checkpoint (config errors, crashes before
# the first save), at most FAILURE_REQUEUES times per job (0 turns it off).
fope_failure_requeue() {
	local before=$1 started=$2 now count_file="$RUN_DIR/slurm/failure_requeues" count=0
	now=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || true)
	[[ -f $count_file ]] && count=$(<"$count_file")
	local status="$RUN_DIR/exit_status.json"
	if [[ -f $status ]] && (($(stat -c %Y "$status") >= started)) && grep -q '"nonfinite"' "$status"; then
		fope_log "no requeue: the trainer stopped a diverged run (see $status)"
		return 1
	fi
	if [[ -z $now || $now == "$before" ]]; then
		fope_log "no requeue after the failed step: no new checkpoint since this attempt began"
		return 1
	fi
	if ((count >= FAILURE_REQUEUES)); then
		fope_log "no requeue: ${count} failure requeues reached FAILURE_REQUEUES=${FAILURE_REQUEUES}"
		return 1
	fi
	echo $((count + 1)) >"$count_file"
	fope_log "step failed after checkpoint ${now}: requeueing job ${SLURM_JOB_ID} ($((count + 1))/${FAILURE_REQUEUES}); it resumes there"
	return 0
}
