#!/usr/bin/env bash
# Finds the syscalls a sandboxed worker makes that its seccomp allow-list
# (node/worker/src/sandbox/seccomp.rs) lacks: runs the `weft up` tests with
# the filter in log mode (each call outside the list is allowed and logged
# by the kernel) and prints the logged syscalls by name, with counts. An
# empty list means the filter covers everything the tests exercise.
# Needs root (dmesg) and a Linux kernel that logs seccomp (audit type 1326).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weft/target}"
dmesg -C
WEFT_SANDBOX=relaxed WEFT_SANDBOX_SECCOMP=log cargo test -p weft-node --test server "$@" >/dev/null 2>&1 || true
dmesg | grep 'type=1326' | sed -E 's/.*syscall=([0-9]+).*/\1/' | sort -n | uniq -c |
    while read -r count nr; do
        name=$(python3 -c "import sys; import re
for l in open('/usr/include/x86_64-linux-gnu/asm/unistd_64.h'):
    m = re.match(r'#define __NR_(\w+) (\d+)', l)
    if m and int(m.group(2)) == $nr: print(m.group(1)); break" 2>/dev/null || echo "$nr")
        echo "$count $name ($nr)"
    done
