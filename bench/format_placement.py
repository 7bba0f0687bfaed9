"""Summarises the placement benchmarks against their targets, as ratios.

Reads bench/results/{paper,edge}.csv, bench/results/scale.json and the
criterion log given as the first argument; prints markdown.
"""
import csv
import json
import re
import sys

log = open(sys.argv[1]).read()
seed = sys.argv[2]
paper = list(csv.DictReader(open("bench/results/paper.csv")))
edge = {r["policy"]: r for r in csv.DictReader(open("bench/results/edge.csv"))}
scale = json.load(open("bench/results/scale.json"))


def cell(policy, agents, cls, col):
    for r in paper:
        if r["policy"] == policy and int(r["agents"]) == agents and r["class"] == cls:
            return float(r[col])
    raise KeyError((policy, agents, cls))


top = max(int(r["agents"]) for r in paper)
weft = cell("weft", top, "all", "mean_ms")
ia = cell("paper-intent-aware", top, "all", "mean_ms")
rr = cell("round-robin", top, "all", "mean_ms")
crit_p99 = cell("weft", top, "critical", "p99_ms")
route = re.search(r"route/100\s+time:\s+\[[\d.]+ \S+ ([\d.]+) (\S+)", log)
tail = re.search(r"p50 ([\d.]+) µs, p99 ([\d.]+) µs, p99.9 ([\d.]+) µs", log)
solve = re.search(r"solve/10000x100\s+time:\s+\[[\d.]+ \S+ ([\d.]+) (\S+)", log)
solve_s = float(solve.group(1)) / (1000.0 if solve.group(2) == "ms" else 1.0)
c, w = edge["cloud-only"], edge["weft"]
core_ratio = float(w["core_bytes"]) / float(c["core_bytes"])

print(f"""# Placement and routing: targets

Produced by `scripts/bench_placement.sh` (seed {seed}) on this machine (2 cores); every ratio
compares two numbers from the same run. Tables and plots: `paper.md`/`paper.png`,
`learning.md`/`learning.png`, `edge.md`/`edge.png`, `scale.md`.

| target | measured | ratio | met |
|---|---|---|---|
| `sim paper`: weft mean latency at {top} agents <= 0.5x the paper's intent-aware scheduler | weft {weft:.1f} ms, paper-intent-aware {ia:.1f} ms (round-robin {rr:.1f} ms) | {weft / ia:.2}x | {"yes" if weft <= 0.5 * ia else "no"} |
| `sim paper`: weft critical p99 within its deadline (250 ms) | {crit_p99:.1f} ms | {crit_p99 / 250:.2}x of deadline | {"yes" if crit_p99 <= 250 else "no"} |
| `sim edge`: >= 90% fewer edge-core bytes than cloud-only | weft {float(w["core_bytes"]):.3e} B, cloud-only {float(c["core_bytes"]):.3e} B | {core_ratio:.3f}x ({(1 - core_ratio) * 100:.1f}% fewer) | {"yes" if core_ratio <= 0.1 else "no"} |
| `sim edge`: p95 equal or better for every class | critical {w["p95_ms_critical"]} vs {c["p95_ms_critical"]}, standard {w["p95_ms_standard"]} vs {c["p95_ms_standard"]}, sheddable {w["p95_ms_sheddable"]} vs {c["p95_ms_sheddable"]} ms | {float(w["p95_ms_critical"]) / float(c["p95_ms_critical"]):.2}x / {float(w["p95_ms_standard"]) / float(c["p95_ms_standard"]):.2}x / {float(w["p95_ms_sheddable"]) / float(c["p95_ms_sheddable"]):.2}x | {"yes" if all(float(w[k]) <= float(c[k]) for k in ("p95_ms_critical", "p95_ms_standard", "p95_ms_sheddable")) else "no"} |
| router: <= 10 us at p99, 100 candidates (criterion) | mean {route.group(1)} {route.group(2)}; single calls p50 {tail.group(1)} us, p99 {tail.group(2)} us, p99.9 {tail.group(3)} us | {float(tail.group(2)) / 10:.2}x of target | {"yes" if float(tail.group(2)) <= 10 else "no"} |
| solver: 10,000 nodes x 100 models <= 1 s (criterion) | {solve_s:.3f} s | {solve_s:.2f}x of target | {"yes" if solve_s <= 1 else "no"} |
| `sim scale`: 1,000,000 agents over 10,000 nodes <= 60 s | {scale["wall_s"]:.1f} s ({scale["requests"]} requests simulated, solver {scale["solve_s"]:.3f} s) | {scale["wall_s"] / 60:.3f}x of target | {"yes" if scale["wall_s"] <= 60 else "no"} |

Commands:

```
cargo run --release -p weft-bench -- sim paper --seed {seed}
cargo run --release -p weft-bench -- sim edge --seed {seed}
cargo run --release -p weft-bench -- sim scale --seed {seed}
cargo bench -p weft-bench --bench placement
```
""")
