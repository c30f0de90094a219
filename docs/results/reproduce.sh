#!/usr/bin/env bash
# Issue 5's small reproduction: FoPE and RoPE twins trained at length 128 on the built-in corpus
# (CPU, 2 cores), evaluated from 1x to 16x the training length. Run from the repo root after
# `make install`. Writes runs/repro_{fope,rope}_128 and docs/results/{fope,rope,compare}.
set -euo pipefail
PY=${PY:-.venv/bin/python}
export FOPE_NO_PROGRESS=1
for kind in fope rope; do
  $PY -m fope_megatron.train --config configs/repro/${kind}_tiny_128.yaml train.resume=none
  $PY -m fope_megatron.eval --run runs/repro_${kind}_128 --lengths 128,256,512,1024,2048 \
    --passkey-trials 20 --ppl-chunks 4 --out docs/results/${kind} --no-progress
done
$PY -m fope_megatron.eval --compare docs/results/fope docs/results/rope --out docs/results/compare
