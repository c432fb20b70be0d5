//! Criterion benchmarks of the compute layer's hot ops, forward + backward, on every device
//! this machine has (the CPU always; CUDA when a GPU is present). Throughput is reported in the
//! unit that bounds each op: bytes for the memory-bound losses, FLOP for GEMM and attention.
//!
//! `cargo bench --bench kernels` (add `-- --quick` for a fast pass). A GPU's launches are timed
//! back to back, the clock stopped once the stream has drained; scripts/bench_cuda.sh runs the
//! PyTorch peer on the same shapes.

use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use kd_kernels::ops::attention::{
    attention_backward, attention_backward_stats, attention_forward, attention_forward_stats, flash_path,
};
use kd_kernels::ops::gelu::{gelu_backward, gelu_forward};
use kd_kernels::ops::gemm::{matmul, MatmulSpec};
use kd_kernels::ops::hidden_mse::hidden_mse;
use kd_kernels::ops::layernorm::{layernorm_backward, layernorm_forward};
use kd_kernels::ops::softmax_kl::{softmax_kl, KlForm, KlLogits, SoftmaxKl};
use kd_kernels::rng::Rng;
use kd_kernels::{Bf16Tensor, Device, Tensor};

fn devices() -> Vec<Device> {
    let mut v = vec![Device::Cpu];
    match Device::cuda(0) {
        Ok(d) => v.push(d),
        Err(e) => eprintln!("CUDA benchmarks not run: {e}"),
    }
    v
}

fn randn(shape: &[usize], scale: f32, seed: u64, device: &Device) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * scale).collect();
    Tensor::from_vec(data, shape, device).unwrap()
}

/// The time of `iters` runs of `f` on `device`, including the GPU's work (launches return
/// before it is done).
fn timed(device: &Device, iters: u64, mut f: impl FnMut()) -> Duration {
    device.synchronize().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    device.synchronize().unwrap();
    start.elapsed()
}

fn zeros(shape: &[usize], device: &Device) -> Tensor {
    Tensor::zeros(shape, device).unwrap()
}

fn bench_softmax_kl(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax_kl_fwd_bwd");
    group.sample_size(10);
    for device in devices() {
        for (rows, cols) in [(4096usize, 30522usize), (8192, 2)] {
            let (s, t) = (randn(&[rows, cols], 2.0, 1, &device), randn(&[rows, cols], 2.0, 2, &device));
            // Minimum traffic: read both rows, read and write the gradient (backward ops
            // accumulate), 16 bytes per element in fp32.
            bench_softmax_kl_case(&mut group, &device, &s, &t, [rows, cols], 16, "");
        }
        // bf16 logits, f32 gradient: 2 + 2 bytes read for the rows and 4 + 4 read and written
        // for the gradient, 12 bytes per element.
        let (rows, cols) = (4096, 30522);
        let s = Bf16Tensor::from_f32(&randn(&[rows, cols], 2.0, 1, &device)).unwrap();
        let t = Bf16Tensor::from_f32(&randn(&[rows, cols], 2.0, 2, &device)).unwrap();
        bench_softmax_kl_case(&mut group, &device, &s, &t, [rows, cols], 12, " bf16");
    }
    group.finish();
}

/// softmax_kl forward + student gradient on `[rows, cols]` logits of either type.
fn bench_softmax_kl_case<L: KlLogits>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    device: &Device,
    s: &L,
    t: &L,
    [rows, cols]: [usize; 2],
    bytes_per_element: usize,
    label: &str,
) {
    let mut loss = zeros(&[rows], device);
    let mut ds = zeros(&[rows, cols], device);
    group.throughput(Throughput::Bytes((rows * cols * bytes_per_element) as u64));
    let spec = SoftmaxKl { temperature: 2.0, form: KlForm::Kl, grad_scale: 1.0 / rows as f32 };
    group.bench_function(BenchmarkId::new(format!("{device}"), format!("{rows}x{cols}{label}")), |b| {
        b.iter_custom(|n| timed(device, n, || softmax_kl(&mut loss, Some(&mut ds), None, s, t, None, spec).unwrap()))
    });
}

fn bench_hidden_mse(c: &mut Criterion) {
    let mut group = c.benchmark_group("hidden_mse_fwd_bwd");
    group.sample_size(20);
    let (tokens, width, pairs) = (4096usize, 384usize, 6usize);
    for device in devices() {
        let students: Vec<Tensor> = (0..pairs).map(|p| randn(&[tokens, width], 1.0, 10 + p as u64, &device)).collect();
        let teachers: Vec<Tensor> = (0..pairs).map(|p| randn(&[tokens, width], 1.0, 20 + p as u64, &device)).collect();
        let mut grads: Vec<Tensor> = (0..pairs).map(|_| zeros(&[tokens, width], &device)).collect();
        let mask = Tensor::from_vec(vec![1.0; tokens], &[tokens], &device).unwrap();
        let mut losses = zeros(&[pairs], &device);
        // Read both states, read and write the accumulated gradient: 16 bytes per element.
        group.throughput(Throughput::Bytes((pairs * tokens * width * 16) as u64));
        group.bench_function(BenchmarkId::new(format!("{device}"), format!("{tokens}x{width}x{pairs}pairs")), |b| {
            let s: Vec<&Tensor> = students.iter().collect();
            let t: Vec<&Tensor> = teachers.iter().collect();
            b.iter_custom(|n| {
                timed(&device, n, || {
                    let mut g: Vec<&mut Tensor> = grads.iter_mut().collect();
                    hidden_mse(&mut losses, &mut g, &s, &t, &mask, 1.0).unwrap()
                })
            })
        });
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_fwd_bwd");
    group.sample_size(10);
    let (batch, heads) = (32usize, 12usize);
    for device in devices() {
        // L 512 only on a GPU: on 2 CPU cores one pass takes about a second.
        let shapes: &[(usize, usize)] =
            if device.is_cpu() { &[(128, 32), (128, 64)] } else { &[(128, 32), (128, 64), (512, 64)] };
        for &(seq, head_dim) in shapes {
            let width = heads * head_dim;
            let q = randn(&[batch, seq, width], 1.0, 31, &device);
            let k = randn(&[batch, seq, width], 1.0, 32, &device);
            let v = randn(&[batch, seq, width], 1.0, 33, &device);
            let dout = randn(&[batch, seq, width], 1.0, 34, &device);
            let mask = Tensor::from_vec(vec![1.0; batch * seq], &[batch, seq], &device).unwrap();
            let mut out = zeros(&[batch, seq, width], &device);
            let mut probs = zeros(&[batch, heads, seq, seq], &device);
            let (mut dq, mut dk, mut dv) = (
                zeros(&[batch, seq, width], &device),
                zeros(&[batch, seq, width], &device),
                zeros(&[batch, seq, width], &device),
            );
            // Forward 4*B*H*L^2*Dh FLOP; backward about 2.5x that (the flash backward does more,
            // recomputing the scores, but is credited the same work).
            group.throughput(Throughput::Elements((3.5 * 4.0 * (batch * heads * seq * seq * head_dim) as f64) as u64));
            let id = format!("B{batch}-H{heads}-L{seq}-D{head_dim}");
            // The maps materialised (attention-map KD's path; the id of earlier runs).
            group.bench_function(BenchmarkId::new(format!("{device}"), &id), |b| {
                b.iter_custom(|n| {
                    timed(&device, n, || {
                        attention_forward(&mut out, &mut probs, None, &q, &k, &v, &mask, None).unwrap();
                        attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, None, None).unwrap();
                    })
                })
            });
            // The flash kernels: no maps, the softmax statistics kept instead.
            if flash_path(&device, head_dim) {
                let mut stats = zeros(&[batch, heads, seq, 2], &device);
                group.bench_function(BenchmarkId::new(format!("{device}"), format!("{id}-flash")), |b| {
                    b.iter_custom(|n| {
                        timed(&device, n, || {
                            attention_forward_stats(&mut out, &mut stats, None, None, &q, &k, &v, &mask, None).unwrap();
                            attention_backward_stats(
                                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &stats, &mask, None,
                            )
                            .unwrap();
                        })
                    })
                });
            }
        }
    }
    group.finish();
}

/// The element-wise and row ops around the GEMMs at MiniLM's shapes (2048 tokens): GELU over the
/// feed-forward width, LayerNorm over the hidden width; throughput in elements.
fn bench_rowwise(c: &mut Criterion) {
    let mut group = c.benchmark_group("rowwise_fwd_bwd");
    group.sample_size(20);
    for device in devices() {
        let (n, i, d) = (2048usize, 1536usize, 384usize);
        let x = randn(&[n, i], 1.0, 3, &device);
        let (mut y, mut dx) = (zeros(&[n, i], &device), zeros(&[n, i], &device));
        group.throughput(Throughput::Elements((n * i) as u64));
        group.bench_function(BenchmarkId::new(format!("{device}"), format!("gelu {n}x{i}")), |b| {
            b.iter_custom(|iters| {
                timed(&device, iters, || {
                    gelu_forward(&mut y, &x).unwrap();
                    gelu_backward(&mut dx, &y, &x).unwrap();
                })
            })
        });
        let (x, g) = (randn(&[n, d], 1.0, 4, &device), randn(&[n, d], 1.0, 5, &device));
        let (gamma, beta) = (randn(&[d], 1.0, 6, &device), randn(&[d], 1.0, 7, &device));
        let (mut y, mut dx) = (zeros(&[n, d], &device), zeros(&[n, d], &device));
        let (mut mean, mut rstd) = (zeros(&[n], &device), zeros(&[n], &device));
        let (mut dgamma, mut dbeta) = (zeros(&[d], &device), zeros(&[d], &device));
        group.throughput(Throughput::Elements((n * d) as u64));
        group.bench_function(BenchmarkId::new(format!("{device}"), format!("layernorm {n}x{d}")), |b| {
            b.iter_custom(|iters| {
                timed(&device, iters, || {
                    layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &gamma, &beta, 1e-12).unwrap();
                    layernorm_backward(&mut dx, &mut dgamma, &mut dbeta, &g, &x, &mean, &rstd, &gamma).unwrap();
                })
            })
        });
    }
    group.finish();
}

fn bench_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    group.sample_size(20);
    for device in devices() {
        // BERT-MiniLM feed-forward shapes at 2048 tokens: [m x k] . [k x n]
        for (m, k, n) in [(2048usize, 384usize, 1536usize), (2048, 1536, 384)] {
            let a = randn(&[m, k], 1.0, 41, &device);
            let b_mat = randn(&[k, n], 1.0, 42, &device);
            let mut out = zeros(&[m, n], &device);
            group.throughput(Throughput::Elements((2 * m * k * n) as u64));
            group.bench_function(BenchmarkId::new(format!("{device}"), format!("{m}x{k}x{n}")), |b| {
                b.iter_custom(|n| timed(&device, n, || matmul(&mut out, &a, &b_mat, MatmulSpec::NN).unwrap()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_gemm, bench_rowwise, bench_softmax_kl, bench_hidden_mse, bench_attention);
criterion_main!(benches);
