#!/usr/bin/env python3
"""The peer for benches/kernels.rs: the same ops, forward + backward, in numpy (OpenBLAS), 2 threads.

Usage: python3 scripts/peer_kernels.py      (needs numpy; scripts/bench_kernels.sh runs it)
Prints one line per case: name, best-of-N milliseconds, and the same throughput unit as the
criterion bench (GFLOP/s for gemm and attention, GB/s of minimum traffic for the losses).
"""
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
import numpy as np  # noqa: E402

rng = np.random.default_rng(0)


def best(fn, reps):
    fn()
    t = float("inf")
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - s)
    return t


def log_softmax(z):
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def softmax_kl(s, t, temp):
    ls, lt = log_softmax(s / temp), log_softmax(t / temp)
    pt = np.exp(lt)
    loss = temp * temp * (pt * (lt - ls)).sum(axis=-1)
    grad = temp * (np.exp(ls) - pt) / s.shape[0]
    return loss, grad


def attention(q, k, v, dout):
    # q, k, v, dout: [B, H, L, D]; forward and backward of softmax(q k^T / sqrt D) v
    scale = 1.0 / np.sqrt(q.shape[-1])
    p = q @ k.transpose(0, 1, 3, 2) * scale
    p = np.exp(p - p.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ v
    dv = p.transpose(0, 1, 3, 2) @ dout
    dp = dout @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale
    return out, ds @ k, ds.transpose(0, 1, 3, 2) @ q, dv


print(f"numpy {np.__version__}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
for m, k, n in [(2048, 384, 1536), (2048, 1536, 384)]:
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    sec = best(lambda: np.matmul(a, b, out=out), 20)
    print(f"gemm {m}x{k}x{n}: {sec * 1e3:.2f} ms, {2 * m * k * n / sec / 1e9:.1f} GFLOP/s")
for rows, cols in [(4096, 30522), (8192, 2)]:
    s, t = (rng.standard_normal((rows, cols), dtype=np.float32) * 2 for _ in range(2))
    sec = best(lambda: softmax_kl(s, t, 2.0), 3 if cols > 2 else 20)
    print(f"softmax_kl {rows}x{cols}: {sec * 1e3:.2f} ms, {rows * cols * 12 / sec / 1e9:.2f} GB/s")
tokens, width, pairs = 4096, 384, 6
hs = [rng.standard_normal((tokens, width), dtype=np.float32) for _ in range(pairs)]
ht = [rng.standard_normal((tokens, width), dtype=np.float32) for _ in range(pairs)]
sec = best(lambda: [(((a - b) ** 2).mean(), 2 * (a - b) / a.size) for a, b in zip(hs, ht)], 20)
print(f"hidden_mse {tokens}x{width}x{pairs}pairs: {sec * 1e3:.2f} ms, {pairs * tokens * width * 12 / sec / 1e9:.2f} GB/s")
for d in (32, 64):
    q, k, v, g = (rng.standard_normal((32, 12, 128, d), dtype=np.float32) for _ in range(4))
    sec = best(lambda: attention(q, k, v, g), 3)
    flop = 3.5 * 4 * 32 * 12 * 128 * 128 * d
    print(f"attention B32-H12-L128-D{d}: {sec * 1e3:.2f} ms, {flop / sec / 1e9:.1f} GFLOP/s")
