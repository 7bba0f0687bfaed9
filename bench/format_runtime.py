#!/usr/bin/env python3
"""Turns the JSON lines of scripts/bench_runtime.sh for one model into
markdown tables: each weft kernel path measured, llama.cpp, the ratio of
weft's default path (the fastest the CPU has) to llama.cpp, and the targets
of issue 24.

Usage: format_runtime.py RUNTIME.jsonl MODEL_BYTES MODEL_NAME"""
import json
import platform
import statistics
import subprocess
import sys

ORDER = ["portable", "avx2", "avx-vnni", "avx512-vnni"]

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
model_bytes = int(sys.argv[2])
name = sys.argv[3] if len(sys.argv) > 3 else "default"
smollm = "smollm" in name


def rows_kernels(r):
    """A weft run with WEFT_ROW_KERNELS=1: the row-by-row kernels the tiled
    ones replaced, measured for comparison."""
    return r["engine"] == "weft" and r.get("kernels") == "rows"


def engine(r):
    if r["engine"] != "weft":
        return r["engine"]
    return f"weft {r['cpu_path']}" + (" rows" if rows_kernels(r) else "")


runs = {}
for r in rows:
    runs.setdefault((engine(r), r["threads"]), []).append(r)


def med_pairs(rs, key):
    ns = [n for n, _ in rs[0][key]]
    return [[n, statistics.median(dict(map(tuple, r[key]))[n] for r in rs)] for n in ns]


def median_run(rs):
    """One report whose every figure is the median over the repeats."""
    out = dict(rs[0])
    for key in ("load_s", "verify_s", "decode_tokens_per_s", "peak_rss_bytes"):
        if key in out:
            out[key] = statistics.median(r[key] for r in rs)
    for key in ("prefill_tokens_per_s", "aggregate_decode_tokens_per_s"):
        out[key] = med_pairs(rs, key)
    out["repeats"] = len(rs)
    return out


by = {k: median_run(v) for k, v in runs.items()}
threads = sorted({r["threads"] for r in rows})
paths = sorted({r["cpu_path"] for r in rows if r["engine"] == "weft" and not rows_kernels(r)}, key=ORDER.index)
row_paths = sorted({r["cpu_path"] for r in rows if rows_kernels(r)}, key=ORDER.index)
default = paths[-1]
cols = [f"weft {p} rows" for p in row_paths] + [f"weft {p}" for p in paths] + ["llama.cpp"]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
flags = subprocess.run(["sh", "-c", "grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\\n' | grep -E '^(avx2|fma|avx512f|avx512bw|avx512vl|avx512_vnni|avx_vnni|amx_int8)$' | sort -u | xargs"], capture_output=True, text=True).stdout.strip()
label = "SmolLM2 135M Instruct Q4_1 (Llama architecture)" if smollm else "Gemma 3 270M Q4_K_M"
print(f"# Model runtime: weft vs llama.cpp, {label}\n")
print(f"`{name}` ({label}, {model_bytes / 2**20:.1f} MiB), {cpu} ({flags}), {platform.machine()}, "
      f"`scripts/bench_runtime.sh`, median of {min(len(v) for v in runs.values())} alternating runs per engine and path, each after the same 512-token warm-up prompt; "
      f"llama.cpp through llama-cpp-python {next((r.get('llama_cpp_python') for r in rows if r.get('llama_cpp_python')), '?')} "
      f"(built on this machine). weft's kernel paths measured: {', '.join(paths)}; `{default}` is the one it picks here"
      + (f"; `rows` columns are the row-by-row kernels the tiled ones replaced (`WEFT_ROW_KERNELS=1`), on {', '.join(row_paths)}" if row_paths else "")
      + ".\n")
print("| threads | metric | " + " | ".join(cols) + f" | weft {default} / llama.cpp |")
print("|---|---|" + "---|" * (len(cols) + 1))


def fig(r, metric):
    kind, n = metric
    if kind == "prefill":
        return dict(map(tuple, r["prefill_tokens_per_s"])).get(n)
    if kind == "decode":
        return r["decode_tokens_per_s"]
    if kind == "agg":
        return dict(map(tuple, r["aggregate_decode_tokens_per_s"])).get(n)
    if kind == "load":
        return r["load_s"]
    if kind == "rss":
        return r["peak_rss_bytes"] / 2**20


for t in threads:
    base = by.get((f"weft {default}", t))
    if not base:
        continue
    metrics = [(f"prefill tokens/s ({n}-token prompt)", ("prefill", n)) for n, _ in base["prefill_tokens_per_s"]]
    metrics.append(("decode tokens/s, 1 sequence", ("decode", 0)))
    metrics += [(f"aggregate decode tokens/s, {n} sequences", ("agg", n)) for n, _ in base["aggregate_decode_tokens_per_s"]]
    metrics += [("load s (warm page cache)", ("load", 0)), ("peak RSS MiB", ("rss", 0))]
    for label_, m in metrics:
        vals = [fig(by[(c, t)], m) if (c, t) in by else None for c in cols]
        fmt = "{:.2f}" if m[0] == "load" else ("{:.0f}" if m[0] == "rss" else "{:.1f}")
        cells = [fmt.format(v) if v is not None else "—" for v in vals]
        w, l = vals[cols.index(f"weft {default}")], vals[-1]
        ratio = f"{w / l:.2f}x" if w and l else "—"
        print(f"| {t} | {label_} | " + " | ".join(cells) + f" | {ratio} |")
print()
print(f"| threads | target (weft {default}) | measured | met |")
print("|---|---|---|---|")
for t in threads:
    w, l = by.get((f"weft {default}", t)), by.get(("llama.cpp", t))
    if not w or not l:
        continue

    def target(what, got, want):
        print(f"| {t} | {what} | {got:.2f}x | {'yes' if got >= want else 'no'} |")

    for n, v in w["prefill_tokens_per_s"]:
        lv = dict(map(tuple, l["prefill_tokens_per_s"])).get(n)
        if lv:
            target(f"prefill of {n} tokens ≥ 1.2x llama.cpp", v / lv, 1.2)
    target("single-sequence decode ≥ 1.1x llama.cpp", w["decode_tokens_per_s"] / l["decode_tokens_per_s"], 1.1)
    agg, lagg = dict(map(tuple, w["aggregate_decode_tokens_per_s"])), dict(map(tuple, l["aggregate_decode_tokens_per_s"]))
    if 16 in agg:
        target("aggregate at 16 ≥ 4x weft's single sequence", agg[16] / w["decode_tokens_per_s"], 4.0)
        if 16 in lagg:
            target("aggregate at 16 ≥ 1.5x llama.cpp's aggregate at 16", agg[16] / lagg[16], 1.5)
print()
