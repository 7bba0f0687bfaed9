#!/usr/bin/env bash
# The constrained-decoding benchmark: decode tokens/s under a JSON Schema
# (bench/long_schema.json) against the same sequences free, at 1 and 16
# sequences, and the compile time of the 20 test schemas
# (node/tests/fixtures/json_schemas.json); llama.cpp (llama-cpp-python's
# GBNF from the same schemas) side by side where it runs, one sequence.
# Writes bench/results/grammar.jsonl and bench/results/grammar.md.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${THREADS:-2}"
tokens="${TOKENS:-64}"
models="${MODELS:-smollm2 gemma-3-270m-q4_k_m}"
cargo build --release -q -p weft-bench -p weft-node
out=bench/results
mkdir -p "$out"
jsonl="$out/grammar.jsonl"
: > "$jsonl"
for m in $models; do
  path="$(target/release/weft model pull "$m" | awk '{print $2}')"
  target/release/weft-bench grammar --model "$m" --threads "$threads" --tokens "$tokens" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); r["model"]=sys.argv[1]; print(json.dumps(r))' "$m" >> "$jsonl"
  if python3 -c "import llama_cpp" 2>/dev/null; then
    python3 bench/llamacpp_grammar.py "$path" "$threads" "$tokens" node/tests/fixtures/json_schemas.json bench/long_schema.json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); r["model"]=sys.argv[1]; print(json.dumps(r))' "$m" >> "$jsonl"
  fi
done
python3 - "$jsonl" "$threads" "$tokens" > "$out/grammar.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"# Constrained decoding\n\n`scripts/bench_grammar.sh` on {cpu}, {sys.argv[2]} threads, {sys.argv[3]} tokens per sequence, greedy.")
print("Decode: bench/long_schema.json (at least 100 records: no answer closes within the tokens), end-of-text banned, so free and constrained runs generate the same count; median of 3 rounds, alternating.\n")
print("| model | engine | sequences | free tok/s | constrained tok/s | constrained / free |")
print("|---|---|---|---|---|---|")
for r in rows:
    for d in r["decode"]:
        print(f"| {r['model']} | {r['engine']} | {d['sequences']} | {d['free_tokens_per_s']:.1f} | {d['constrained_tokens_per_s']:.1f} | {d['ratio']:.3f} |")
print("\nCompile time of the 20 test schemas (node/tests/fixtures/json_schemas.json), each compiled once (a cache miss):\n")
print("| model | engine | p50 ms | max ms | cache hit ms | vocabulary index s | refused |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    c = r["compile_ms"]
    fmt = lambda v: "—" if v is None else f"{v:.3f}"
    print(f"| {r['model']} | {r['engine']} | {fmt(c['p50'])} | {fmt(c['max'])} | {fmt(c.get('cached'))} | {fmt(r.get('vocabulary_index_s'))} | {len(c.get('refused', []))} |")
print("\nllama.cpp's compile is its JSON-Schema-to-GBNF conversion and grammar parse; its per-token cost is paid while sampling. weft's compile builds llguidance's parser and its first mask; the vocabulary index is built once per model, at the first constrained request.")
PY
cat "$out/grammar.md"
