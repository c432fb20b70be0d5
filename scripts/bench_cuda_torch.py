#!/usr/bin/env python3
"""The PyTorch peer of kd's CUDA kernel benchmarks (benches/kernels.rs), on the same shapes.

Cases (forward + backward unless named otherwise; random inputs, never zeros):
- gemm: benches/kernels.rs' MiniLM feed-forward shapes 2048x384x1536 and 2048x1536x384, and
  the BERT-base ones at 4096 tokens, 4096x768x3072 and 4096x3072x768 ([m x k] . [k x n]);
  fp32 (IEEE, no TF32), tf32 and bf16 cuBLAS.
- softmax_kl: T = 2, KL(softmax(t/T) || softmax(s/T)) * T^2 averaged over rows, the gradient
  w.r.t. s, at 4096x30522 and 8192x2, fp32 and bf16 inputs (the softmax in fp32, the gradient
  in the input's dtype); eager (log_softmax + kl_div(log_target=True) + autograd) and
  torch.compile of the same function. GB/s counts the minimum traffic: both inputs read, the
  gradient written.
- hidden_mse: the sum over six layer pairs of mse_loss(student, teacher) and the gradients
  w.r.t. the six students, at [32,128,384] (benches/kernels.rs' 4096x384x6) and [32,128,768];
  eager and torch.compile; GB/s as above.
- attention: B 32, H 12, L 128 (D 32 and 64) and L 512 (D 64), fp32 and bf16, Q/K/V in kd's
  [B, L, H*D] layout viewed as [B, H, L, D], an additive key mask (all keys kept), forward
  ("attention_fwd") and forward + backward ("attention_fwd_bwd"); materialised eager
  (softmax(QK^T/sqrt d + mask) V with the softmax in fp32, as HF's eager attention) and
  F.scaled_dot_product_attention pinned to one backend: flash (bf16; it takes no mask, so none
  is passed), efficient (mask passed) and math (fp32). TFLOP/s counts 4*B*H*L^2*D forward and
  3.5x that forward + backward, as the bench does.
- copy: device-to-device copy of a 1 GiB fp32 tensor (copy_ into a preallocated one, and
  clone); GB/s counts bytes read + written.

Timing on CUDA: CUDA events around each repetition, --warmup repetitions first, the median of
--reps (30 by default) reported. Between repetitions of the memory-bound cases (softmax_kl,
hidden_mse, attention at L 128, copy) a 256 MB buffer is written so that L2 holds none of the
inputs. `ms` is the kernels' own time: a GPU sleep (torch.cuda._sleep, calibrated, three times
the host's enqueue time) queued before each repetition lets the host enqueue all of it before the
GPU starts; `ms_with_launch` is the same without the sleep, where the GPU waits on PyTorch's
dispatch (on H100 eager cases with many small kernels, and every fwd_bwd through autograd at
small sizes, are host-bound: a few hundred microseconds whatever the size). GB/s and TFLOP/s
are from `ms`. On CPU (--device cpu, a smoke test) each repetition is timed with
perf_counter, no scrub, no `ms_with_launch`.

Usage: python3 scripts/bench_cuda_torch.py [--device cuda|cpu] [--scale 1.0] [--reps 30]
       [--warmup 5] [--only SUBSTRING] [--no-compile] [--seed 0]
--scale multiplies the leading dimension of every case (rows, tokens, batch, copy size) for a
quick run. Output: one JSON line per case {case, impl, ms, ms_with_launch, gbps?, tflops?} on
stdout (a case an implementation cannot run gets {case, impl, error}), then a markdown table.
Needs only torch.
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SCRUB_BYTES = 256 << 20
COPY_BYTES = 1 << 30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def significant(x, digits=4):
    return float(f"{x:.{digits}g}")


class Bench:
    def __init__(self, args):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.reps, self.warmup, self.scale = args.reps, args.warmup, args.scale
        self.only, self.compile = args.only, not args.no_compile
        self.gen = torch.Generator(device=self.device).manual_seed(args.seed)
        self.scrub_buf = torch.empty(SCRUB_BYTES // 4, dtype=torch.float32, device=self.device) if self.cuda else None
        self.rows = []
        self.cycles_per_ms = self.calibrate_sleep() if self.cuda else None

    def scaled(self, n):
        return max(1, round(n * self.scale))

    def randn(self, *shape, dtype=torch.float32, scale=1.0, grad=False):
        t = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn, scrub):
        """(device ms, ms with launch): the medians of --reps repetitions after --warmup ones.

        Device ms: a GPU sleep queued before each repetition lets the host enqueue all of its
        kernels before the GPU reaches them, so the events time the kernels alone. Ms with
        launch: the same without the sleep, where the GPU may wait on the host's dispatch (what
        a small eager case costs end to end). On CPU both are the wall time.
        """
        for _ in range(self.warmup):
            fn()
        self.sync()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times), None
        host_ms = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            host_ms = max(host_ms, (time.perf_counter() - t0) * 1e3)
            self.sync()
        # Margin for the host's hiccups (a slower repetition would show its gap in `ms`).
        sleep_cycles = int(self.cycles_per_ms * (3 * host_ms + 0.1))
        return self.events_ms(fn, scrub, sleep_cycles), self.events_ms(fn, scrub, 0)

    def events_ms(self, fn, scrub, sleep_cycles):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for i in range(self.reps):
            if scrub:
                self.scrub_buf.fill_(float(i))
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            starts[i].record()
            fn()
            ends[i].record()
        self.sync()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def calibrate_sleep(self):
        """GPU clock cycles per millisecond of torch.cuda._sleep."""
        cycles = 20_000_000
        torch.cuda._sleep(1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        self.sync()
        return cycles / start.elapsed_time(end)

    def run(self, case, impl, fn, scrub, bytes_moved=None, flop=None):
        """Times `fn` and prints its JSON line; a failure (an unsupported backend) is reported, not fatal."""
        if self.only and self.only not in f"{case} {impl}":
            return
        row = {"case": case, "impl": impl}
        try:
            ms, with_launch = self.time_ms(fn, scrub)
            row["ms"] = significant(ms)
            if with_launch is not None:
                row["ms_with_launch"] = significant(with_launch)
            if bytes_moved is not None:
                row["gbps"] = significant(bytes_moved / (ms * 1e-3) / 1e9)
            if flop is not None:
                row["tflops"] = significant(flop / (ms * 1e-3) / 1e12)
        except Exception as e:  # noqa: BLE001 - any backend refusal becomes a reported row
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(json.dumps(row), flush=True)
        self.rows.append(row)

    def compiled(self, fn):
        return torch.compile(fn, dynamic=False) if self.compile else None

    def table(self):
        name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        print(f"\n**{name}**, torch {torch.__version__}, median of {self.reps} (scale {self.scale})\n")
        print("| case | impl | ms | ms with launch | GB/s | TFLOP/s |")
        print("|---|---|---:|---:|---:|---:|")
        for r in self.rows:
            if "error" in r:
                print(f"| {r['case']} | {r['impl']} | error: {r['error'][:60]} | | | |")
            else:
                cells = [r["ms"], r.get("ms_with_launch", ""), r.get("gbps", ""), r.get("tflops", "")]
                print(f"| {r['case']} | {r['impl']} | " + " | ".join(str(c) for c in cells) + " |")


def bench_gemm(b):
    shapes = [(2048, 384, 1536), (2048, 1536, 384), (4096, 768, 3072), (4096, 3072, 768)]
    for m, k, n in shapes:
        m = b.scaled(m)
        for impl, dtype, precision in [("fp32", torch.float32, "highest"), ("tf32", torch.float32, "high"),
                                       ("bf16", torch.bfloat16, "highest")]:
            if impl == "tf32" and not b.cuda:
                continue
            x, w = b.randn(m, k, dtype=dtype), b.randn(k, n, dtype=dtype)
            out = torch.empty(m, n, dtype=dtype, device=b.device)
            torch.set_float32_matmul_precision(precision)
            b.run(f"gemm {m}x{k}x{n}", impl, lambda: torch.matmul(x, w, out=out), scrub=False, flop=2 * m * k * n)
        torch.set_float32_matmul_precision("highest")


def kl_loss(s, t, temperature=2.0):
    ls = F.log_softmax(s.float() / temperature, dim=-1)
    lt = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True) * temperature**2


def bench_softmax_kl(b):
    compiled = b.compiled(kl_loss)
    for rows, cols in [(4096, 30522), (8192, 2)]:
        rows = b.scaled(rows)
        for dname, dtype in DTYPES.items():
            s = b.randn(rows, cols, dtype=dtype, scale=2.0, grad=True)
            t = b.randn(rows, cols, dtype=dtype, scale=2.0)
            size = s.element_size()
            traffic = rows * cols * 3 * size
            case = f"softmax_kl_fwd_bwd {rows}x{cols} {dname}"
            for impl, fn in [("eager", kl_loss), ("compile", compiled)]:
                if fn is not None:
                    b.run(case, impl, lambda fn=fn: torch.autograd.grad(fn(s, t), s), scrub=True, bytes_moved=traffic)
            del s, t


def mse_sum(students, teachers):
    return sum(F.mse_loss(s, t) for s, t in zip(students, teachers))


def bench_hidden_mse(b):
    compiled = b.compiled(mse_sum)
    pairs = 6
    for width in (384, 768):
        shape = (b.scaled(32), 128, width)
        students = [b.randn(*shape, grad=True) for _ in range(pairs)]
        teachers = [b.randn(*shape) for _ in range(pairs)]
        traffic = pairs * math.prod(shape) * 12
        case = f"hidden_mse_fwd_bwd {pairs}x[{shape[0]},{shape[1]},{width}] fp32"
        for impl, fn in [("eager", mse_sum), ("compile", compiled)]:
            if fn is not None:
                b.run(case, impl, lambda fn=fn: torch.autograd.grad(fn(students, teachers), students),
                      scrub=True, bytes_moved=traffic)
        del students, teachers


def eager_attention(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def sdpa(backend, with_mask):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, mask):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if with_mask else None)

    return fn


def bench_attention(b):
    from torch.nn.attention import SDPBackend

    batch, heads = b.scaled(32), 12
    impls = {
        "bf16": [("eager", eager_attention), ("sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION, False)),
                 ("sdpa_efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION, True))],
        "fp32": [("eager", eager_attention), ("sdpa_efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION, True)),
                 ("sdpa_math", sdpa(SDPBackend.MATH, True))],
    }
    for seq, dh in [(128, 32), (128, 64), (512, 64)]:
        for dname, dtype in DTYPES.items():
            def heads_view(grad):
                x = b.randn(batch, seq, heads * dh, dtype=dtype, grad=grad)
                return x, x.view(batch, seq, heads, dh).transpose(1, 2)

            (q0, q), (k0, k), (v0, v) = heads_view(True), heads_view(True), heads_view(True)
            dout = b.randn(batch, heads, seq, dh, dtype=dtype)
            mask = torch.zeros(batch, 1, 1, seq, dtype=dtype, device=b.device)
            flop = 4 * batch * heads * seq * seq * dh
            shape = f"B{batch}-H{heads}-L{seq}-D{dh} {dname}"
            for impl, fn in impls[dname]:
                def fwd(fn=fn):
                    with torch.no_grad():
                        return fn(q, k, v, mask)

                def fwd_bwd(fn=fn):
                    return torch.autograd.grad(fn(q, k, v, mask), (q0, k0, v0), dout)

                b.run(f"attention_fwd {shape}", impl, fwd, scrub=seq <= 128, flop=flop)
                b.run(f"attention_fwd_bwd {shape}", impl, fwd_bwd, scrub=seq <= 128, flop=3.5 * flop)
            del q0, k0, v0, q, k, v, dout


def bench_copy(b):
    n = b.scaled(COPY_BYTES // 4)
    src = b.randn(n)
    dst = torch.empty_like(src)
    case = f"copy {n * 4 / (1 << 20):.0f} MiB fp32"
    b.run(case, "copy_", lambda: dst.copy_(src), scrub=True, bytes_moved=2 * n * 4)
    b.run(case, "clone", lambda: src.clone(), scrub=True, bytes_moved=2 * n * 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every case's leading dimension")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", help="run only the cases whose 'case impl' contains this")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a smoke test", file=sys.stderr)
        return 2
    b = Bench(args)
    for bench in (bench_copy, bench_gemm, bench_softmax_kl, bench_hidden_mse, bench_attention):
        bench(b)
    b.table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
