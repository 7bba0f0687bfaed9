#!/usr/bin/env bash
# The control plane on loopback: commit latency (one client, one proposal at
# a time) and throughput (128 clients) with three coordinator members, and the
# time to replace a stopped leader. Three runs; writes
# bench/results/control.jsonl and bench/results/control.md (medians).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p weft-bench
mkdir -p bench/results
: > bench/results/control.jsonl
for i in 1 2 3; do
  target/release/weft-bench control --proposals 500 --clients 128 --seconds 5 | tee -a bench/results/control.jsonl
done
python3 - <<'PY'
import json, statistics as st
rows = [json.loads(l) for l in open("bench/results/control.jsonl")]
med = lambda k: st.median(r[k] for r in rows)
p50, p99, mean, rate, fo = med("commit_p50_ms"), med("commit_p99_ms"), med("commit_mean_ms"), med("commits_per_s"), med("failover_ms")
out = f"""# Control plane: commit latency, throughput, failover

`scripts/bench_control.sh`: three coordinator members in one process on loopback (real QUIC
with mutual TLS, logs fsync'd on this machine's ext4 disk), medians of {len(rows)} runs of
`weft-bench control --proposals 500 --clients 128 --seconds 5`.

| figure | measured | target / anchor | ratio |
|---|---|---|---|
| commit latency p50, one client | {p50:.2f} ms | | |
| commit latency p99, one client | {p99:.2f} ms | <= 5 ms | {p99/5:.2f}x of target |
| commit latency mean, one client | {mean:.2f} ms | etcd: 1.6 ms average, 1 client, 3 members (published) | {mean/1.6:.2f}x of etcd's figure (not measured here) |
| commits/s, 128 clients | {rate:.0f} | >= 5,000 | {rate/5000:.2f}x of target |
| leader stopped -> a survivor leads | {fo:.0f} ms | new leader within 3 s | {fo/3000:.2f}x of limit |

A proposal here is one `PutMember` command (a member's record, about 200 bytes) through the leader (client -> leader over QUIC,
leader and followers append and fsync, commit, reply). Followers persist the log with one
fsync per batch; term and vote are fsync'd when they change; the commit index is re-learned
from the leader after a restart. etcd's figure is from its documentation, not a run on this
machine.
"""
open("bench/results/control.md", "w").write(out)
print(out)
PY
