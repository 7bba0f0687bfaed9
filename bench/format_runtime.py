#!/usr/bin/env python3
"""Turns the JSON lines of scripts/bench_runtime.sh for one model into a
markdown table with weft / llama.cpp ratios per thread count.

Usage: format_runtime.py RUNTIME.jsonl MODEL_BYTES MODEL_NAME"""
import json
import platform
import subprocess
import sys

import statistics

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
model_bytes = int(sys.argv[2])
name = sys.argv[3] if len(sys.argv) > 3 else "default"
smollm = "smollm" in name
runs = {}
for r in rows:
    runs.setdefault((r["engine"], r["threads"]), []).append(r)


def median_run(rs):
    """One report whose every figure is the median over the repeats."""
    out = dict(rs[0])
    for key in ("load_s", "verify_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"):
        if key in out:
            out[key] = statistics.median(r[key] for r in rs)
    ns = [n for n, _ in rs[0]["aggregate_decode_tokens_per_s"]]
    out["aggregate_decode_tokens_per_s"] = [
        [n, statistics.median(dict((a, b) for a, b in r["aggregate_decode_tokens_per_s"])[n] for r in rs)] for n in ns
    ]
    out["repeats"] = len(rs)
    return out


by = {k: median_run(v) for k, v in runs.items()}
threads = sorted({r["threads"] for r in rows})
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
label = "SmolLM2 135M Instruct Q4_1 (Llama architecture)" if smollm else "Gemma 3 270M Q4_K_M"
print(f"# Model runtime: weft vs llama.cpp, {label}\n")
print(f"`{name}` ({label}, {model_bytes / 2**20:.1f} MiB), {cpu}, {platform.machine()}, "
      f"`scripts/bench_runtime.sh`, median of {min(len(v) for v in runs.values())} alternating runs per engine; llama.cpp through llama-cpp-python {next((r.get('llama_cpp_python') for r in rows if r.get('llama_cpp_python')), '?')}.\n")
print("| threads | metric | weft | llama.cpp | weft / llama.cpp |")
print("|---|---|---|---|---|")
for t in threads:
    w, l = by.get(("weft", t)), by.get(("llama.cpp", t))
    if not w or not l:
        continue
    def line(name, a, b, fmt="{:.1f}", higher=True):
        ratio = a / b if b else float("nan")
        print(f"| {t} | {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f}x |")
    line("prefill tokens/s (512-token prompt)", w["prefill_tokens_per_s"], l["prefill_tokens_per_s"])
    line("decode tokens/s, 1 sequence", w["decode_tokens_per_s"], l["decode_tokens_per_s"])
    la = dict((n, v) for n, v in l["aggregate_decode_tokens_per_s"])
    for n, v in w["aggregate_decode_tokens_per_s"]:
        line(f"aggregate decode tokens/s, {n} sequences", v, la.get(n, float("nan")))
    line("load s (warm page cache)", w["load_s"], l["load_s"], "{:.2f}")
    line("peak RSS MiB", w["peak_rss_bytes"] / 2**20, l["peak_rss_bytes"] / 2**20, "{:.0f}")
print()
print("| threads | weft target | measured |")
print("|---|---|---|")
for t in threads:
    w = by.get(("weft", t))
    if not w:
        continue
    if smollm and ("llama.cpp", t) in by:
        l = by[("llama.cpp", t)]
        ratio = w["decode_tokens_per_s"] / l["decode_tokens_per_s"]
        print(f"| {t} | single-sequence decode ≥ 1.0x llama.cpp | {ratio:.2f}x |")
    agg = dict((n, v) for n, v in w["aggregate_decode_tokens_per_s"])
    if 16 in agg:
        print(f"| {t} | aggregate at 16 ≥ 3x single | {agg[16] / w['decode_tokens_per_s']:.2f}x |")
    print(f"| {t} | load ≤ 2 s (warm) | {w['load_s']:.2f} s load + {w['verify_s']:.2f} s sha256 check |")
    lim = 1.5 * model_bytes + w["kv_budget_bytes"]
    print(f"| {t} | peak RSS ≤ 1.5x file + KV budget ({lim / 2**20:.0f} MiB) | {w['peak_rss_bytes'] / 2**20:.0f} MiB |")
print()
