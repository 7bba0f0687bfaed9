#!/usr/bin/env bash
# Forwarding overhead on loopback: one coordinator and two gateways at one
# site; gw-1 holds the default model, gw-2 holds nothing and forwards to
# gw-1 over the data plane. Streams the same greedy requests, in turn, to
# gw-1 raw (x-weft-hops: 1: straight to its worker), to gw-1 (through the
# forwarder that lets a local stream fail over) and to gw-2 (forwarded), and
# compares time to first token and the gaps between tokens.
# Usage: scripts/bench_forward.sh [requests per side, default 40]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-40}"
cargo build --release -p weft-node >/dev/null
W="$PWD/target/release/weft"
D="$(mktemp -d /tmp/weft-fwd.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$D"' EXIT
port() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, getattr(socket, sys.argv[1])); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"; }
C=$(port SOCK_DGRAM); O=$(port SOCK_DGRAM)
"$W" cluster init --data-dir "$D/c1" --name coord-1 >/dev/null
cat > "$D/c1.toml" <<TOML
[node]
name = "coord-1"
data_dir = "$D/c1"
listen = "127.0.0.1:$C"
site = "edge-a"
memory_bytes = 1
tokens_per_s = 1000.0
[coordinator]
id = 1
ca_dir = "$D/c1/ca"
peers = [{ id = 1, name = "coord-1", addr = "127.0.0.1:$C" }]
[overlay]
listen = "/ip4/127.0.0.1/udp/$O/quic-v1"
mdns = false
TOML
"$W" node --config "$D/c1.toml" >"$D/c1.log" 2>&1 &
TOKEN=$("$W" cluster join-token --ca-dir "$D/c1/ca" | tail -1)
for g in 1 2; do
  mem=$([ $g = 1 ] && echo 4294967296 || echo 1)
  api=$(port SOCK_STREAM); eval "API$g=$api"
  cat > "$D/gw-$g.toml" <<TOML
[node]
name = "gw-$g"
data_dir = "$D/gw-$g"
listen = "127.0.0.1:$(port SOCK_DGRAM)"
site = "edge-b"
memory_bytes = $mem
tokens_per_s = 1000.0
[join]
token = "$TOKEN"
coordinators = [{ id = 1, name = "coord-1", addr = "127.0.0.1:$C" }]
[overlay]
listen = "/ip4/127.0.0.1/udp/0/quic-v1"
bootstrap = ["/ip4/127.0.0.1/udp/$O/quic-v1"]
mdns = false
[serve]
addr = "127.0.0.1:$api"
threads = 1
TOML
done
sleep 1
"$W" node --config "$D/gw-1.toml" >"$D/gw-1.log" 2>&1 &
"$W" node --config "$D/gw-2.toml" >"$D/gw-2.log" 2>&1 &
"$W" cluster model-add --config "$D/c1.toml" --source gemma-3-270m-q4_k_m --name gemma >/dev/null
"$W" cluster replan --config "$D/c1.toml" --demand edge-b:gemma:50:200:64 >/dev/null
python3 - "$API1" "$API2" "$N" <<'PY'
import json, sys, time, urllib.request, statistics
direct, front, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def stream(port, prompt, raw=False):
    body = json.dumps({"model": "gemma", "prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    if raw:
        # served as a request another node routed: straight to the worker,
        # without the forwarder that lets a local stream fail over
        headers["x-weft-hops"] = "1"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, headers)
    t0 = time.perf_counter(); times = []; text = ""
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter()); text += json.loads(line[6:])["choices"][0].get("text", "")
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], text
deadline = time.time() + 180
while True:
    try:
        stream(front, "warm up"); break
    except Exception:
        if time.time() > deadline: sys.exit("the front never forwarded")
        time.sleep(0.5)
res = {"raw": ([], []), "direct": ([], []), "forwarded": ([], [])}
for i in range(n):
    p = f"Request {i}: the quick brown fox"
    for name, port, raw in (("raw", direct, True), ("direct", direct, False), ("forwarded", front, False)):
        ttft, gaps, text = stream(port, p, raw)
        res[name][0].append(ttft); res[name][1].extend(gaps)
def q(v, p): v = sorted(v); return v[min(len(v) - 1, int(p * len(v)))] * 1e3
out = {}
for name, (ttft, gaps) in res.items():
    out[name] = {"ttft_p50_ms": q(ttft, .5), "ttft_p99_ms": q(ttft, .99), "gap_p50_ms": q(gaps, .5), "gap_p99_ms": q(gaps, .99), "gaps": len(gaps)}
keys = ("ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms")
# forwarded over the data plane vs served where it lands (both with failover)
out["overhead"] = {k: out["forwarded"][k] - out["direct"][k] for k in keys}
# forwarded vs the raw local path (no failover), and what failover costs locally
out["overhead_vs_raw"] = {k: out["forwarded"][k] - out["raw"][k] for k in keys}
out["local_failover_cost"] = {k: out["direct"][k] - out["raw"][k] for k in keys}
print(json.dumps(out, indent=1))
PY
