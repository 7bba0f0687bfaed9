#!/usr/bin/env bash
# The serving-path benchmark: the same greedy workload through `weft up`'s
# HTTP API (streamed, sandboxed worker) and through the engine in-process, on
# the default model. Writes bench/results/api.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p weft-bench -p weft-node
mkdir -p bench/results
target/release/weft-bench api --threads "${THREADS:-2}" --tokens 64 --clients 64 --repeats 5 | tee bench/results/api.json
