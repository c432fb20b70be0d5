#!/usr/bin/env bash
# The compute layer's benchmarks and their numpy peer, in one run on the same machine:
# criterion (benches/kernels.rs, CPU and, when a GPU is present, CUDA), then scripts/peer_kernels.py.
# Usage: scripts/bench_kernels.sh [criterion args, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench --bench kernels -- "$@" 2>&1 | grep -E "^(gemm|softmax_kl|hidden_mse|attention)|time:|thrpt:"
echo "== peer (numpy)"
if python3 -c "import numpy" 2>/dev/null; then
  python3 scripts/peer_kernels.py
else
  echo "numpy not installed (pip install numpy): the peer was not run"
fi
