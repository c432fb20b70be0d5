#!/usr/bin/env python3
"""The peer for benches/kernels.rs' GEMM group: numpy (OpenBLAS) on the same shapes, 2 threads.

Usage: OPENBLAS_NUM_THREADS=2 python3 scripts/peer_gemm.py   (needs numpy)
Prints one line per shape: m x k x n, best-of-20 seconds, GFLOP/s.
"""
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
import numpy as np  # noqa: E402

rng = np.random.default_rng(0)
for m, k, n in [(2048, 384, 1536), (2048, 1536, 384)]:
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    for _ in range(3):
        np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    print(f"numpy {np.__version__} gemm {m}x{k}x{n}: {best * 1e3:.2f} ms, {2 * m * k * n / best / 1e9:.1f} GFLOP/s")
