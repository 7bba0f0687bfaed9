#!/usr/bin/env bash
# Runs every test of the workspace: installs what the tests need (once),
# then `cargo test --workspace --features cuda`. Extra arguments go to cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_test_deps.sh
cargo test --workspace --features cuda "$@"
# the kernel paths that need a CPU feature run where the CPU has it
flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { for f in "$@"; do grep -qw "$f" <<<"$flags" || return 1; done; }
if has avx_vnni; then
  cargo test -p weft-kernels --features cuda --lib "$@" -- --ignored the_avx_vnni_kernels
fi
if has avx512f avx512bw avx512vl avx512_vnni; then
  cargo test -p weft-kernels --features cuda --lib "$@" -- --ignored the_avx512_vnni_kernels
fi
