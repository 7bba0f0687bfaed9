#!/usr/bin/env bash
# Placement and routing: the three simulations (paper, edge, scale) and the
# criterion benchmarks of the router and the solver. Writes the tables and
# plots to bench/results/ and the targets, as ratios, to
# bench/results/placement.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED="${SEED:-1}"
cargo build --release -q -p weft-bench
bin=target/release/weft-bench
mkdir -p bench/results
{ time "$bin" sim paper --seed "$SEED"; } 2>&1 | tee /tmp/weft-sim-paper.log
{ time "$bin" sim edge --seed "$SEED"; } 2>&1 | tee /tmp/weft-sim-edge.log
{ time "$bin" sim scale --seed "$SEED"; } 2>&1 | tee /tmp/weft-sim-scale.log
cargo bench -q -p weft-bench --bench placement 2>&1 | tee /tmp/weft-bench-placement.log
python3 bench/format_placement.py /tmp/weft-bench-placement.log "$SEED" > bench/results/placement.md
cat bench/results/placement.md
