#!/usr/bin/env bash
# One-call GPU check: offline install, kernel + gpu tests on CUDA, the fused-vs-RoPE benchmark,
# and short bf16 trainings of a 1B-class Llama (fope-fused, fope-torch, rope-fused) side by side.
#
#   scripts/gpu_check.sh [--wheelhouse DIR] [--out DIR] [--steps N] [--layers N] [--seq N]
#                        [--micro-batch N] [--data PREFIX] [--only install,tests,bench,train]
#                        [--dry-run]
#
# Made for a node WITHOUT network whose Python already has a CUDA torch, triton and transformers:
# it makes .venv-gpu that also sees that Python's packages (the node's torch is kept, never
# replaced), installs the wheelhouse built by scripts/build_wheelhouse.sh with --no-index --no-deps, then
# this project (editable, no dependency resolution). Results go to OUT (default
# docs/results/gpu): pytest.log + pytest_variants.log, bench.json/.md, train_<name>/metrics.jsonl,
# gpu_check.json/.md.
# --dry-run does every step that needs no GPU (arguments, wheelhouse, offline install, imports)
# and stops before CUDA is required; the CPU test suite runs it that way.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

wheelhouse=wheelhouse
out=docs/results/gpu
steps=30
layers=8
seq=4096
micro=4
only=install,tests,bench,train
data=""  # a preprocessed prefix (PREFIX.bin/.idx) for the trainings; default: the built-in corpus
dry=0
allow_cpu=0  # tests only: run the pipeline without CUDA (tiny shapes via GPU_CHECK_TRAIN_EXTRA)
py=${PYTHON:-python3}
venv=${GPU_VENV:-.venv-gpu}
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
need() { [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "error: $1 must be a positive integer, got '$2'" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) need "$@"; wheelhouse=$2; shift 2 ;;
    --out) need "$@"; out=$2; shift 2 ;;
    --steps) need "$@"; posint "$1" "$2"; steps=$2; shift 2 ;;
    --layers) need "$@"; posint "$1" "$2"; layers=$2; shift 2 ;;
    --seq) need "$@"; posint "$1" "$2"; seq=$2; shift 2 ;;
    --micro-batch) need "$@"; posint "$1" "$2"; micro=$2; shift 2 ;;
    --only) need "$@"; only=$2; shift 2 ;;
    --data) need "$@"; data=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --allow-cpu) allow_cpu=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for part in ${only//,/ }; do
  case "$part" in install|tests|bench|train) ;; *)
    echo "error: --only part '$part' unknown; allowed: install,tests,bench,train" >&2; exit 2 ;;
  esac
done
has() { [[ ",$only," == *",$1,"* ]]; }
# The wheelhouse is needed only where the install step runs (asked for, or no venv yet).
if { has install || [ ! -x "$venv/bin/python" ]; } && ! ls "$wheelhouse"/megatron_core-*.whl >/dev/null 2>&1; then
  echo "error: wheelhouse '$wheelhouse' has no megatron_core wheel; build it with" \
       "scripts/build_wheelhouse.sh $wheelhouse (on a machine with network)" >&2
  exit 2
fi
mkdir -p "$out"
t0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

# ---------------------------------------------------------------- install (offline)
if has install || [ ! -x "$venv/bin/python" ]; then
  say "venv $venv on top of $py (it sees $py's packages: the node's CUDA torch is kept)"
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; "$py" -m venv --without-pip "$venv"; }
    # Everything $py sees (system or venv site-packages) stays visible, after the venv's own
    # packages, so the wheelhouse's megatron-core/deepspeed win and torch comes from the node.
    site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    "$py" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
      > "$site/_gpu_node_site.pth"
  fi
  pip_in() {
    if "$venv/bin/python" -m pip --version >/dev/null 2>&1; then "$venv/bin/python" -m pip "$@"
    else "$py" -m pip --python "$venv/bin/python" "$@"; fi
  }
  pip_in install -q --disable-pip-version-check --no-index --no-deps --ignore-installed \
    "$wheelhouse"/*.whl
  pip_in install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation -e .
fi
P="$venv/bin/python"
"$P" - <<'PY' | tee "$out/versions.txt"
import importlib, platform, warnings
warnings.simplefilter("ignore")
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no CUDA)")
for m in ("triton", "megatron.core", "deepspeed", "transformers", "liger_kernel"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), "from", mod.__file__.rsplit("/", 2)[0])
    except Exception as e:  # report, the steps below say what they need
        print(m, "NOT IMPORTABLE:", type(e).__name__, e)
import fope_megatron.model.builder, fope_megatron.train.trainer  # noqa: E401,F401  (imports work)
print("fope_megatron imports ok")
PY
if [ "$dry" = 1 ]; then
  say "dry run: install and imports done; stopping before the CUDA steps"
  exit 0
fi
if [ "$allow_cpu" = 0 ]; then
  "$P" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
    echo "error: torch.cuda.is_available() is False on this node" >&2; exit 3; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/nvidia_smi.txt" 2>/dev/null || true

# ---------------------------------------------------------------- tests on CUDA
status=0
if has tests; then
  # Two pytest processes side by side (each case compiles its own kernels, CPU-bound): the
  # kernel's variant tests in one, everything else in the other.
  say "pytest: kernel tests on CUDA + gpu-marked tests (two processes)"
  read -r -a sel <<< "${GPU_CHECK_PYTEST_ARGS:-tests/test_triton_apply.py tests/test_parallel_gpu.py}"
  run_pytest() {
    timeout "${GPU_CHECK_TEST_TIMEOUT:-150}" "$P" -m pytest -q \
      -p no:cacheprovider -m "not slurm and $1" "${sel[@]}" > "$2" 2>&1
  }
  run_pytest "not kernel_variant" "$out/pytest.log" &
  p1=$!
  run_pytest "kernel_variant" "$out/pytest_variants.log" &
  p2=$!
  for pid_log in "$p1:$out/pytest.log" "$p2:$out/pytest_variants.log"; do
    rc=0
    wait "${pid_log%%:*}" || rc=$?
    tail -5 "${pid_log#*:}"
    # exit 5: that half selected no test (e.g. GPU_CHECK_PYTEST_ARGS without variant tests)
    [ "$rc" = 0 ] || [ "$rc" = 5 ] || { echo "pytest (${pid_log#*:}) exited $rc"; status=1; }
  done
fi

# ---------------------------------------------------------------- benchmark
if has bench; then
  say "benchmark suite (bf16, q [s,1,32,128], k [s,1,8,128], s 4096/8192)"
  timeout "${GPU_CHECK_BENCH_TIMEOUT:-150}" "$P" -m fope_megatron.bench.apply --suite --device cuda --dtype bf16 --repeats 30 --warmup 5 \
    --json "$out/bench.json" || status=1
fi

# ---------------------------------------------------------------- trainings
if has train; then
  runs=${GPU_RUN_ROOT:-/dev/shm/fope_gpu_check}
  read -r -a extra <<< "${GPU_CHECK_TRAIN_EXTRA:-}"  # tests: tiny shapes on CPU
  if [ -n "$data" ]; then
    if [ ! -f "$data.bin" ] || [ ! -f "$data.idx" ]; then
      echo "error: --data $data: no $data.bin / $data.idx" >&2
      exit 2
    fi
    extra+=("data.path=[$(readlink -f "$data")]" data.synthetic=false)
  else
    extra+=("data.path=[]" data.synthetic=true)
  fi
  for name in fope_fused fope_torch rope_fused; do
    kind=${name%%_*}; fusion=${name#*_}; [ "$fusion" = fused ] && fusion=triton
    say "train $name: llama_1b_$kind, $layers layers, seq $seq, micro $micro, $steps steps, bf16"
    rm -rf "${runs:?}/$name"
    timeout "${GPU_CHECK_TRAIN_TIMEOUT:-90}" "$P" -m fope_megatron.train --config "configs/llama_1b_$kind.yaml" \
      run.dir="$runs/$name" run.tensorboard=false run.log_interval=5 \
      model.num_layers="$layers" train.seq_length="$seq" train.micro_batch_size="$micro" \
      train.global_batch_size="$micro" train.steps="$steps" train.warmup_steps=5 \
      train.eval_interval=0 train.eval_lengths=[] train.save_interval=100000 train.keep_last=1 \
      train.precision=bf16 data.tokenizer=byte data.num_workers=1 \
      position.fusion="$fusion" "${extra[@]}" > "$out/train_$name.log" 2>&1 || { status=1; tail -30 "$out/train_$name.log"; }
    mkdir -p "$out/train_$name"
    cp "$runs/$name/metrics.jsonl" "$runs/$name/config.yaml" "$out/train_$name/" 2>/dev/null || true
    rm -rf "${runs:?}/$name"
    tail -3 "$out/train_$name.log"
  done
  "$P" -m fope_megatron.bench.gpu_report --out "$out" || status=1
fi
say "done (status $status); results in $out"
exit $status
