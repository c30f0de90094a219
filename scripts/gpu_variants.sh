#!/usr/bin/env bash
# Time the fused kernel along its paths beside the RoPEs, test them on CUDA and profile them, in
# ONE call of a lent GPU, inside a time budget:
#
#   scripts/gpu_variants.sh OUT [--budget SECONDS] [--device cuda|cpu] [--seq N] [--jobs N]
#                          [--fope M1,M2..] [--rope M1,..] [--test-env "VAR=v VAR2=v"]
#
# 1. offline install: the wheelhouse unpacked into .gpu-site (pip --target, no venv: seconds)
#    for the node's python3, which keeps its CUDA torch and triton; this tree on PYTHONPATH;
# 2. every method's Triton kernels compiled in parallel processes (`--jobs`, one per method and
#    FoPE floor L), which fills Triton's on-disk cache, while the kernel and fused-model tests
#    run on CUDA with --test-env (e.g. TRITON_PRINT_AUTOTUNING=1): the timed run after it then
#    only autotunes (no compile in the timing process);
# 3. the benchmark suite at L=4096 for every method, one process, nothing else on the GPU;
# 4. as time allows: the suite at 2*seq and at L=512 (the floor of the earlier GPU numbers) for
#    the default, the fastest FoPE variant and the RoPEs; profile_apply of the same.
# Every step gets min(its own limit, what is left of --budget); whatever ran is in OUT (log.txt,
# and results.tgz with every file). --device cpu runs the same steps under TRITON_INTERPRET=1 at
# tiny shapes with the CPU venv (a check of the script, no timing).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

[ $# -ge 1 ] || { echo "usage: $0 OUT [--budget S] [--device cuda|cpu] [--seq N] [--jobs N]" >&2; exit 2; }
out=$1
shift
budget=420
device=cuda
seq=4096
jobs=16
fope=fope_fused,fope_fused_dot,fope_fused_tile,fope_fused_narrow_tf32x3
rope=rope_fused,rope_fused_each,rope_liger
test_env=""  # e.g. "TRITON_PRINT_AUTOTUNING=1"
while [ $# -gt 0 ]; do
  [[ "$1" == --* && $# -lt 2 ]] && { echo "error: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --budget) budget=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --seq) seq=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --fope) fope=$2; shift 2 ;;
    --rope) rope=$2; shift 2 ;;
    --test-env) test_env=$2; shift 2 ;;
    *) echo "error: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
for v in "$budget" "$seq" "$jobs"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "error: '$v' is not a positive integer" >&2; exit 2; }
done
case "$device" in cuda|cpu) ;; *) echo "error: --device $device: allowed cuda, cpu" >&2; exit 2 ;; esac

long_l=4096
short_l=512
repeats=(--repeats 30 --warmup 5)
# three pytest processes side by side (each compiles its own cases; the kernel tests one
# autotune config per case)
tests_a=(tests/test_triton_apply.py -m "not slurm and not kernel_variant")
tests_b=(tests/test_triton_apply.py -m "not slurm and kernel_variant")
tests_c=(tests/test_fused_model.py -m "not slurm")
if [ "$device" = cpu ]; then
  export TRITON_INTERPRET=1
  P=${GPU_PY:-.venv/bin/python}
  long_l=16
  short_l=8
  repeats=(--repeats 1 --warmup 0)
  tests_a=(tests/test_triton_apply.py -k "fused_equals_torch_float32 and mha")
  tests_b=(tests/test_triton_apply.py -k "forced_paths_equal_torch and gqa")
  tests_c=(tests/test_triton_apply.py -k "rope_forced_paths")
else
  P=${GPU_PY:-python3}
fi

work=$out/work
mkdir -p "$work"
log=$out/log.txt
t0=$(date +%s)
deadline=$((t0 + budget))
say() { echo "[gpu_variants +$(( $(date +%s) - t0 ))s] $*" | tee -a "$log"; }
left() { echo $(( deadline - $(date +%s) )); }
# the table rows and ratios of a suite's output, into the log
show() { grep -E "^\| |best fused|variants /" "$1" | tee -a "$log"; }
# step NAME MAX_SECONDS CMD...: run with min(MAX, budget left), output to work/NAME.txt
step() {
  local name=$1 max=$2 l rc=0
  shift 2
  l=$(left)
  if [ "$l" -lt 15 ]; then say "skip $name: budget spent"; return 1; fi
  [ "$max" -gt "$l" ] && max=$l
  say "start $name (limit ${max}s)"
  timeout "$max" "$@" > "$work/$name.txt" 2>&1 || rc=$?
  say "end $name: exit $rc"
  return $rc
}
# shellcheck disable=SC2317  # called by the EXIT trap
finish() {
  tar czf "$out/results.tgz" -C "$work" . 2>/dev/null
  say "done; results.tgz has: $(find "$work" -maxdepth 1 -type f -printf '%f\n' | sort | tr '\n' ' ')"
}
trap finish EXIT

if [ "$device" = cuda ]; then
  site=$PWD/.gpu-site
  # a wheel is a zip of its import tree: unpacking needs no pip (the node's python may have none)
  wheels=()
  for w in wheelhouse/*.whl; do [[ "$w" == *setuptools* ]] || wheels+=("$w"); done
  step install 60 "$P" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
    "$site" "${wheels[@]}" || exit 1
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$P" - > "$work/versions.txt" 2>&1 <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0))
for m in ("triton", "megatron.core", "deepspeed", "liger_kernel", "fope_megatron.fope.triton_apply"):
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", ""), mod.__file__)
PY
  tee -a "$log" < "$work/versions.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$work/nvidia_smi.txt" 2>&1
fi

# 2. compile in parallel (cache fill), kernel tests beside it
say "warm: Triton cache for every method (jobs $jobs) + kernel tests"
warm=()
for m in ${fope//,/ }; do warm+=("$m $long_l"); done
for m in ${rope//,/ }; do warm+=("$m $long_l"); done
for m in ${fope//,/ }; do warm+=("$m $short_l"); done
wl=$(( $(left) > 150 ? 150 : $(left) ))
tpids=()
for part in a b c; do
  (
    case "$part" in
      a) sel=("${tests_a[@]}") ;;
      b) sel=("${tests_b[@]}") ;;
      *) sel=("${tests_c[@]}") ;;
    esac
    env ${test_env:+$test_env} timeout "$wl" "$P" -m pytest -q -p no:cacheprovider \
      "${sel[@]}" > "$work/pytest_cuda_$part.txt" 2>&1
    echo "pytest exit $? (env: $test_env)" >> "$work/pytest_cuda_$part.txt"
  ) &
  tpids+=($!)
done
printf '%s\n' "${warm[@]}" | xargs -P "$jobs" -L 1 sh -c \
  "timeout $wl '$P' -m fope_megatron.bench.profile_apply --device $device --seq $seq --iters 1 \
   --methods \$0 --train-seq-len \$1 > '$work'/warm_\$0_L\$1.txt 2>&1 || echo \"warm \$0 L\$1: exit \$?\" >> '$log'"
say "warm compiles done"
wait "${tpids[@]}"
for part in a b c; do say "tests $part: $(tail -2 "$work/pytest_cuda_$part.txt" | tr '\n' ' ')"; done

# 3. the timed suite, every variant, realistic floor
step suite_L$long_l 120 env TRITON_PRINT_AUTOTUNING=1 "$P" -m fope_megatron.bench.apply --suite \
  --device "$device" --seqs "$seq" --train-seq-len "$long_l" --methods "$fope,$rope" "${repeats[@]}" \
  --json "$work/suite_L$long_l.json"
show "$work/suite_L$long_l.txt"
best=$("$P" - "$work/suite_L$long_l.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["results"][0]
    v = {n: m["fwd_bwd_ms"] for n, m in r.items()
         if n.startswith("fope_fused") and isinstance(m, dict) and "fwd_bwd_ms" in m}
    print(min(v, key=v.get))
except Exception:
    print("fope_fused")
PY
)
say "fastest FoPE variant at L=$long_l: $best"

# 4. twice the length, the earlier floor, the kernel-level profile
pick="fope_fused,$best,${rope%%,*},rope_liger"
pick=$(echo "$pick" | tr ',' '\n' | awk '!seen[$0]++' | paste -sd,)
step suite_2s 70 "$P" -m fope_megatron.bench.apply --suite --device "$device" --seqs "$((2 * seq))" \
  --train-seq-len "$long_l" --methods "$pick" "${repeats[@]}" --json "$work/suite_2s.json"
show "$work/suite_2s.txt"
step suite_L$short_l 70 "$P" -m fope_megatron.bench.apply --suite --device "$device" --seqs "$seq" \
  --train-seq-len "$short_l" --methods "$fope,$rope" "${repeats[@]}" --json "$work/suite_L$short_l.json"
show "$work/suite_L$short_l.txt"
step profile 60 "$P" -m fope_megatron.bench.profile_apply --device "$device" --seq "$seq" \
  --train-seq-len "$long_l" --methods "$pick"
exit 0
