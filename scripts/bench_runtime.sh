#!/usr/bin/env bash
# The model-runtime benchmark: weft vs llama.cpp on the default model, same
# GGUF, same thread counts, same machine, one run. Writes
# bench/results/runtime.{json,md}. Needs `pip install llama-cpp-python numpy`.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${THREADS:-1 2}"
# This machine's speed drifts between runs (shared host): each engine runs
# REPEATS times, alternating, and the table takes the median of each figure.
repeats="${REPEATS:-3}"
cargo build --release -q -p weft-bench -p weft-node
model="$(target/release/weft model pull default | awk '{print $2}')"
out=bench/results
mkdir -p "$out"
: > "$out/runtime.jsonl"
for r in $(seq "$repeats"); do
  for t in $threads; do
    target/release/weft-bench runtime --threads "$t" --decode-tokens 32 >> "$out/runtime.jsonl"
    python3 bench/llamacpp_bench.py "$model" "$t" 512 32 >> "$out/runtime.jsonl"
  done
done
python3 bench/format_runtime.py "$out/runtime.jsonl" "$(stat -c %s "$model")" > "$out/runtime.md"
cat "$out/runtime.md"
