#!/usr/bin/env bash
# The model-runtime benchmark: weft vs llama.cpp on each real model (SmolLM2
# 135M Instruct, the default, and Gemma 3 270M), same GGUF, same thread
# counts, same machine, one run. Writes bench/results/runtime-<model>.jsonl
# and bench/results/runtime.md (one table per model). weft runs once per CPU
# kernel path in PATHS (default: avx2 and the fastest this CPU has), side by
# side with llama.cpp. Needs `pip install llama-cpp-python numpy`.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${THREADS:-1 2}"
models="${MODELS:-smollm2 gemma-3-270m-q4_k_m}"
# This machine's speed drifts between runs (shared host): each engine runs
# REPEATS times, alternating, and the table takes the median of each figure.
repeats="${REPEATS:-3}"
prefills="${PREFILLS:-512,2048}"
# ROWS=1 (the default) also runs the fastest path with the row-by-row kernels
# the tiled ones replaced (WEFT_ROW_KERNELS=1), for the before-and-after.
rows="${ROWS:-1}"
cargo build --release -q -p weft-bench -p weft-node
bin="${CARGO_TARGET_DIR:-target}/release"
best="$("$bin"/weft-bench cpu-paths | tail -1)"
paths="${PATHS:-$(echo avx2 "$best" | xargs -n1 | sort -u | xargs)}"
out=bench/results
mkdir -p "$out"
: > "$out/runtime.md"
for m in $models; do
  model="$("$bin"/weft model pull "$m" | awk '{print $2}')"
  jsonl="$out/runtime-$m.jsonl"
  : > "$jsonl"
  for r in $(seq "$repeats"); do
    for t in $threads; do
      for p in $paths; do
        "$bin"/weft-bench runtime --model "$m" --threads "$t" --decode-tokens 32 \
          --prefill-tokens "$prefills" --cpu-path "$p" >> "$jsonl"
      done
      if [ "$rows" = 1 ]; then
        WEFT_ROW_KERNELS=1 "$bin"/weft-bench runtime --model "$m" --threads "$t" --decode-tokens 32 \
          --prefill-tokens "$prefills" --cpu-path "$best" >> "$jsonl"
      fi
      python3 bench/llamacpp_bench.py "$model" "$t" "$prefills" 32 >> "$jsonl"
    done
  done
  python3 bench/format_runtime.py "$jsonl" "$(stat -c %s "$model")" "$m" >> "$out/runtime.md"
done
cat "$out/runtime.md"
