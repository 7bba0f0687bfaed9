#!/usr/bin/env bash
# Builds what bench/gpu/run.sh takes to a GPU machine into .gpu/ (ignored by
# git): the `weft` binary with `--features cuda`, and the kernels' GPU test
# binary, both stripped. cudarc loads the driver, NVRTC and cuBLAS at run
# time, so this builds on a machine without CUDA.
#
#   scripts/gpu_bundle.sh && GPU_TESTS=.gpu/gpu-tests bench/gpu/run.sh .gpu/weft
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p weft-node --features cuda --bin weft
tests=$(cargo test --release -p weft-kernels --features cuda --test gpu --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    j = json.loads(line)
    if j.get("executable"):
        print(j["executable"])' | tail -1)
mkdir -p .gpu
cp target/release/weft .gpu/weft
cp "$tests" .gpu/gpu-tests
strip .gpu/weft .gpu/gpu-tests
ls -la .gpu
