#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU: build, run the GPU-marked
# tests (cuda and triton backends against the reference), the static kernel
# report, and the benchmark at GPU sizes. Finishes in a few minutes.
# Without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi finds none); nothing to do."
  exit 0
fi
nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm --format=csv
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}"   # one arch: the build is the slow part
export PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}
out=${OUT:-/tmp/vqfast-gpu-check}; mkdir -p "$out"
start=$(date +%s)
make build || exit 1
rc=0
"$PY" -m vqfast kernels-report --json "$out/kernels.json" || rc=1
"$PY" -m pytest tests -q -ra -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
"$PY" -m vqfast bench --gpu-sizes 2>&1 | tee "$out/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "gpu-check: done in $(( $(date +%s) - start )) s, rc=$rc (logs in $out)"
exit $rc
