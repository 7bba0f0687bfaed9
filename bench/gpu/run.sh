#!/usr/bin/env bash
# The CUDA backend's benchmark (issue 7), for a machine with an NVIDIA GPU and
# a driver but no Rust toolchain. It takes a `weft` binary built elsewhere with
# `--features cuda` (scripts/gpu_bundle.sh builds one) and a model, runs in
# under 5 minutes, and prints one table:
#   correctness against the CPU backend (same greedy tokens for 5 prompts,
#   logits relative error), decode tokens/s at batch 1, 8, 64 and 256 with
#   512-token contexts, prefill tokens/s, a 4-tenant fairness run, and the
#   fraction of the memory-bandwidth floor each decode step reaches.
#
#   bench/gpu/run.sh WEFT [MODEL.gguf | synthetic] [OUT.md]
#
# MODEL defaults to `synthetic`: random weights in the default model's shapes
# and quantizations, written on the spot, for a machine the real file cannot
# reach (speed is the real model's; the text is not). If GPU_TESTS names the
# kernels' GPU test binary (also from scripts/gpu_bundle.sh), the device
# kernels and forward are first tested against the CPU.
set -euo pipefail
weft=${1:?usage: bench/gpu/run.sh WEFT [MODEL.gguf|synthetic] [OUT.md]}
model=${2:-synthetic}
out=${3:-gpu-bench.md}
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
fi
# a failing part does not stop the next: one run on a GPU should tell all
# it can; the exit status says whether everything passed
status=0
if [ -n "${GPU_TESTS:-}" ]; then
    echo "== the device kernels and forward against the CPU"
    timeout 120 "$GPU_TESTS" --include-ignored --nocapture --test-threads 1 || status=1
fi
echo "== weft gpu-bench --model $model"
timeout 280 "$weft" gpu-bench --model "$model" --out "$out" || status=1
exit $status
