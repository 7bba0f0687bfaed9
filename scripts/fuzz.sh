#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each (default 120)
# with cargo-fuzz on nightly, from the committed corpus; new inputs that
# add coverage go into fuzz/corpus/<target>, crashes into
# fuzz/artifacts/<target> (not committed: fix the bug, then move the
# crash into the corpus as regression-NAME). The normal tests replay both
# (node/fuzz/tests/corpus.rs). Afterwards each corpus is minimized.
#
#   scripts/fuzz.sh [-t SECONDS] [TARGET...]
#
# Needs: rustup's nightly toolchain and cargo-fuzz (installed here if
# missing). Each input may allocate at most the libFuzzer limit below.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=120
if [ "${1:-}" = "-t" ]; then secs=$2; shift 2; fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^weft-fuzz-targets$')
fi
cargo run -q -p weft-fuzz --bin fuzz-seeds
# the fuzz build (nightly, sanitizers) keeps to fuzz/target
unset CARGO_TARGET_DIR
for t in "${targets[@]}"; do
    echo "== $t: ${secs}s"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    # a crash is kept in fuzz/artifacts and the run goes on to the next target
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=256 \
        -timeout=10 -max_len=65536 -print_final_stats=1 || echo "!! $t found a crash: fuzz/artifacts/$t"
    cargo +nightly fuzz cmin "$t" "fuzz/corpus/$t" >/dev/null 2>&1 || true
done
