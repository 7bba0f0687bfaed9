#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, skipping
# whatever is already there:
#   runsc     gVisor, for the sandbox tier `gvisor` (Debian package runsc)
#   promtool  checks that /metrics is valid exposition text (Debian package
#             prometheus)
# Needs root for apt-get (CI runs as root).
set -euo pipefail
need=()
command -v runsc >/dev/null 2>&1 || need+=(runsc)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
