#!/usr/bin/env bash
# Runs every test of the workspace: installs what the tests need (once),
# then `cargo test --workspace --features cuda`. Extra arguments go to cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_test_deps.sh
cargo test --workspace --features cuda "$@"
