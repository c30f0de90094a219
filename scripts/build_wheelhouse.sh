#!/usr/bin/env bash
# Build the offline wheelhouse that scripts/gpu_check.sh installs on a GPU node without network.
#
#   scripts/build_wheelhouse.sh [DIR]          # default DIR=wheelhouse (git-ignored)
#
# Environment (defaults fit the lent H100 node: Python 3.12, manylinux x86_64, its own CUDA torch,
# triton, transformers, numpy and pytest already installed):
#   WHEEL_PYTHON_VERSION=3.12   target interpreter of the binary wheels
#   WHEEL_PLATFORM=manylinux_2_28_x86_64 (manylinux2014/_2_17 are accepted too)
#   BUILD_PYTHON=.venv/bin/python   an interpreter with torch, used to build deepspeed's sdist
# What goes in: megatron-core, deepspeed (built from its sdist with DS_BUILD_OPS=0: pure Python,
# ops JIT-compiled on use), their dependencies that the node lacks, setuptools (to install this
# project), liger-kernel (a fused RoPE to compare against). torch/triton/numpy stay the node's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dir=${1:-wheelhouse}
pyver=${WHEEL_PYTHON_VERSION:-3.12}
build_py=${BUILD_PYTHON:-.venv/bin/python}
mkdir -p "$dir"
pin() { grep -i "^$1==" constraints.txt | head -1; }

platforms=(--platform "${WHEEL_PLATFORM:-manylinux_2_28_x86_64}" --platform manylinux2014_x86_64
           --platform manylinux_2_17_x86_64)
binary() {
  "$build_py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$pyver" "${platforms[@]}" -d "$dir" "$@"
}
binary "$(pin megatron-core)"
binary einops hjson msgpack ninja psutil py-cpuinfo "pydantic>=2,<3" "pydantic-core" \
  annotated-types typing-inspection "typing-extensions>=4.12" tqdm pyyaml "packaging>=24.2" \
  "setuptools>=64" liger-kernel==0.8.5
# pydantic pins its pydantic-core exactly: fetch the matching one
core=$(unzip -p "$dir"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
[ -n "$core" ] && { rm -f "$dir"/pydantic_core-*.whl; binary "pydantic-core==$core"; }

if ! ls "$dir"/deepspeed-*.whl >/dev/null 2>&1; then
  ds=$(pin deepspeed)
  tmp=$(mktemp -d)
  "$build_py" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: \
    -d "$tmp" "$ds"
  DS_BUILD_OPS=0 "$build_py" -m pip wheel -q --disable-pip-version-check --no-deps \
    --no-build-isolation -w "$dir" "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
du -sh "$dir"
ls "$dir"
