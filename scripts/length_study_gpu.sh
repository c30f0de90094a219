#!/usr/bin/env bash
# Issue 11's length-generalization study at paper model size on a GPU node: the 60M twins
# (configs/{fope,rope}_60m.yaml, trained at length 512, byte tokenizer so both corpora and the
# passkey prompts need no tokenizer download), 3 seeds, both corpora, every evaluation row
# (RoPE, RoPE+PI, RoPE+NTK, RoPE+dynamic-NTK, RoPE+YaRN, FoPE, FoPE+YaRN) at 512..8192.
#
#   scripts/length_study_gpu.sh                       # 1 GPU, defaults below
#   NPROC=8 STEPS=20000 scripts/length_study_gpu.sh   # a full node, the config's batch
#
# Environment (defaults in brackets): PY [.venv/bin/python], NPROC ranks per training [1],
# STEPS [4000], MBS micro batch [16], GBS global batch [64], OUT [docs/results/study_60m],
# RUNS [runs/study_60m]. Extra arguments go to `python -m fope_megatron.study` (e.g.
# --seeds 1 --corpora synthetic). A stopped study resumes where it was.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-4000}
exec "$PY" -m fope_megatron.study --scale paper --nproc "${NPROC:-1}" --steps "$STEPS" \
	--out "${OUT:-docs/results/study_60m}" --runs-dir "${RUNS:-runs/study_60m}" \
	--passkey-trials 50 --ppl-chunks 4 --batch-size 8 \
	--train-override "train.micro_batch_size=${MBS:-16}" "train.global_batch_size=${GBS:-64}" \
	"train.warmup_steps=$((STEPS / 10))" "$@"
