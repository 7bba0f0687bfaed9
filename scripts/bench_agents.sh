#!/usr/bin/env bash
# The multi-turn agent benchmark (issue 21): weft's prefix cache off and on,
# one agent alone and several at once, beside llama.cpp on the lone agent's
# turns; writes bench/results/agents.{json,md}. Needs llama-cpp-python for
# the llama.cpp column (`pip install llama-cpp-python`); without it the
# column says so.
#   scripts/bench_agents.sh [THREADS] [AGENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
agents="${2:-4}"
out=bench/results
mkdir -p "$out"
cargo build --release -q -p weft-bench
bin="${CARGO_TARGET_DIR:-target}/release/weft-bench"
turns=$(mktemp)
"$bin" agents --threads "$threads" --agents "$agents" --single "$turns" > "$out/agents.json"
model=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"])' "$out/agents.json")
if python3 -c 'import llama_cpp' 2>/dev/null; then
    python3 bench/llamacpp_agents.py "$model" "$turns" "$threads" > "$out/agents-llamacpp.json"
else
    echo '{"engine": "llama.cpp", "missing": "llama-cpp-python is not installed"}' > "$out/agents-llamacpp.json"
fi
rm -f "$turns"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)
flags=$(grep -m1 '^flags' /proc/cpuinfo | grep -o 'avx512_vnni\|avx512f\|avx2' | sort -u | xargs)
python3 - "$out/agents.json" "$out/agents-llamacpp.json" "$cpu ($flags)" "$threads" "$agents" > "$out/agents.md" <<'PY'
import json, sys
w = json.load(open(sys.argv[1])); l = json.load(open(sys.argv[2]))
cpu, threads, agents = sys.argv[3], sys.argv[4], sys.argv[5]
p = print
p("# The multi-turn agent workload: prefix cache off and on\n")
p(f"`scripts/bench_agents.sh {threads} {agents}` on {cpu}, {threads} threads, the default model "
  f"(Gemma 3 270M Q4_K_M). Each agent's prompt starts with the same {w['context_tokens']}-token system "
  f"prompt and tool definitions; each turn appends the model's answer ({w['answer_tokens']} greedy tokens) "
  f"and a tool output of 100-300 tokens; {w['turns']} turns, each sent when the last one's answer is done. "
  "TTFT is from a request's submission to the engine step that gave its first token. Cache off and on "
  "run one after the other in the same process.\n")
single = next(r for r in w["runs"] if r["agents"] == 1)
p("## One agent\n")
lt = l.get("ttft_ms")
p("| turn | prompt tokens | cached (weft) | TTFT off (ms) | TTFT on (ms) | on / off | llama.cpp TTFT (ms) |")
p("|---|---|---|---|---|---|---|")
for t, (pt, cached) in enumerate(single["on"]["prompt_tokens"]):
    off = single["off"]["ttft_ms"][t][0]; on = single["on"]["ttft_ms"][t][0]
    lc = f"{lt[t]:.0f}" if lt else l.get("missing", "-")
    p(f"| {t+1} | {pt} | {cached} | {off:.0f} | {on:.0f} | {on/off:.2f} | {lc} |")
later = [single["on"]["ttft_ms"][t][0] / single["off"]["ttft_ms"][t][0] for t in range(1, len(single["on"]["ttft_ms"]))]
p(f"\nTurns 2-{len(later)+1}: TTFT with the cache is {min(later):.2f}-{max(later):.2f} of the same turn without (target: at most 0.2).")
if lt:
    r = [single["on"]["ttft_ms"][t][0] / lt[t] for t in range(1, len(lt))]
    p(f"Against llama.cpp (which reuses the longest common prefix with its previous prompt), weft's TTFT on turns 2-{len(r)+1} is {min(r):.2f}-{max(r):.2f} of llama.cpp's.")
p(f"Greedy answers identical with and without the cache: {single['answers_equal']}.\n")
many = next(r for r in w["runs"] if r["agents"] != 1) if len(w["runs"]) > 1 else None
if many:
    n = many["agents"]
    p(f"## {n} agents at once\n")
    p("| turn | TTFT p50 off | TTFT p95 off | TTFT p50 on | TTFT p95 on |")
    p("|---|---|---|---|---|")
    for t in range(len(many["on"]["ttft_ms"])):
        a, b = many["off"]["ttft_ms"][t], many["on"]["ttft_ms"][t]
        p(f"| {t+1} | {a[0]:.0f} | {a[1]:.0f} | {b[0]:.0f} | {b[1]:.0f} |")
    off, on = many["off"], many["on"]
    p(f"\n| | cache off | cache on | on / off |\n|---|---|---|---|")
    p(f"| wall time (s) | {off['seconds']:.1f} | {on['seconds']:.1f} | {on['seconds']/off['seconds']:.2f} |")
    p(f"| generated tokens/s | {off['generated_per_s']:.1f} | {on['generated_per_s']:.1f} | {on['generated_per_s']/off['generated_per_s']:.2f} |")
    p(f"| all tokens (prompt + generated) /s | {off['tokens_per_s']:.0f} | {on['tokens_per_s']:.0f} | {on['tokens_per_s']/off['tokens_per_s']:.2f} |")
    p(f"\nTarget: aggregate tokens/s on the agent workload at least 2x cache off. Greedy answers identical: {many['answers_equal']}.")
PY
cat "$out/agents.md"
