#!/usr/bin/env bash
# Runs every test of the workspace: installs what the tests need (once),
# then `cargo test --workspace --features cuda`. Extra arguments go to cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_test_deps.sh
cargo test --workspace --features cuda "$@"
# kernels that need a CPU feature run where the CPU has it
if grep -qw avx_vnni /proc/cpuinfo; then
  cargo test -p weft-kernels --features cuda --lib "$@" -- --ignored vnni
fi
