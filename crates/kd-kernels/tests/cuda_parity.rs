//! CUDA parity: each op family with a CUDA kernel runs on the same random inputs on the CPU and
//! on GPU 0, and every output is compared. Without a GPU each test prints
//! "skipped on CUDA: no CUDA device (<reason>)" and checks nothing; set KD_REQUIRE_CUDA=1 (on a
//! GPU machine) to turn that skip into a failure.
//!
//! Tolerance: `|gpu - cpu| <= rtol * (|cpu| + max |cpu|)`, i.e. relative to the element or to
//! the tensor's scale, with rtol 1e-5. The exception is a reduction over a vocabulary-wide row
//! (C = 30,522): the CPU's sequential f32 sums there are themselves off by up to 6e-5 against
//! float64 (measured), while the GPU sums in a tree, so those rows are compared at 1e-4.
mod common;

use common::randn;
use kd_kernels::ops::attention::{attention_backward, attention_forward, AttentionDropout};
use kd_kernels::ops::cross_entropy::{cross_entropy, mse_loss, Targets};
use kd_kernels::ops::embedding::{soft_embedding_backward, soft_embedding_forward};
use kd_kernels::ops::gemm::{linear_backward, linear_forward, matmul, MatmulSpec};
use kd_kernels::ops::hidden_mse::hidden_mse;
use kd_kernels::ops::softmax_kl::{softmax_kl, KlForm, SoftmaxKl};
use kd_kernels::rng::Rng;
use kd_kernels::testing::gpu;
use kd_kernels::{Device, IdTensor, Tensor};

const RTOL: f64 = 1e-5;
const WIDE_ROW_RTOL: f64 = 1e-4;

fn t(data: &[f32], shape: &[usize], dev: &Device) -> Tensor {
    Tensor::from_slice(data, shape, dev).unwrap()
}

fn host(x: &Tensor) -> Vec<f32> {
    x.to_vec().unwrap()
}

fn assert_parity(what: &str, gpu: &[f32], cpu: &[f32], rtol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    let scale = cpu.iter().filter(|c| c.is_finite()).fold(0.0f64, |m, &c| m.max((c as f64).abs()));
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        if c.is_nan() || !c.is_finite() {
            assert!(g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()), "{what}[{i}]: gpu {g}, cpu {c}");
            continue;
        }
        let err = (g as f64 - c as f64).abs();
        assert!(err <= rtol * ((c as f64).abs() + scale), "{what}[{i}]: gpu {g}, cpu {c} (err {err:e})");
    }
}

/// Runs `op` on the CPU and on `gpu` and compares the named outputs it returns.
fn parity(gpu: &Device, what: &str, rtol: f64, op: impl Fn(&Device) -> Vec<(&'static str, Vec<f32>)>) {
    let (cpu_out, gpu_out) = (op(&Device::Cpu), op(gpu));
    for ((name, c), (_, g)) in cpu_out.iter().zip(&gpu_out) {
        assert_parity(&format!("{what}: {name}"), g, c, rtol);
    }
}

#[test]
fn matmul_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(10);
    // (batch of a, batch of b, m, k, n): plain, a batch against a shared right operand, a shared
    // left operand against a batch, and a BERT-sized product.
    let cases = [
        (None, None, 7, 5, 3),
        (Some(4), None, 9, 33, 17),
        (None, Some(3), 6, 1, 65),
        (Some(2), Some(2), 128, 384, 96),
    ];
    for (ba, bb, m, k, n) in cases {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let a_shape: Vec<usize> = ba.into_iter().chain(if trans_a { [k, m] } else { [m, k] }).collect();
            let b_shape: Vec<usize> = bb.into_iter().chain(if trans_b { [n, k] } else { [k, n] }).collect();
            let out_shape: Vec<usize> = ba.or(bb).into_iter().chain([m, n]).collect();
            let a = randn(&mut rng, a_shape.iter().product(), 1.0);
            let b = randn(&mut rng, b_shape.iter().product(), 1.0);
            let init = randn(&mut rng, out_shape.iter().product(), 1.0);
            let spec = MatmulSpec { trans_a, trans_b, alpha: 0.7, beta: 0.4 };
            parity(&gpu, &format!("matmul {a_shape:?} x {b_shape:?} {spec:?}"), RTOL, |dev| {
                let mut out = t(&init, &out_shape, dev);
                matmul(&mut out, &t(&a, &a_shape, dev), &t(&b, &b_shape, dev), spec).unwrap();
                vec![("out", host(&out))]
            });
        }
    }
}

#[test]
fn linear_and_soft_embedding_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(18);
    for &(b, l, d_in, d_out) in &[(2, 9, 13, 5), (4, 64, 384, 1536)] {
        let (x, w, bias) =
            (randn(&mut rng, b * l * d_in, 1.0), randn(&mut rng, d_out * d_in, 0.1), randn(&mut rng, d_out, 1.0));
        let dout = randn(&mut rng, b * l * d_out, 1.0);
        let (init_x, init_w, init_b) =
            (randn(&mut rng, b * l * d_in, 1.0), randn(&mut rng, d_out * d_in, 1.0), randn(&mut rng, d_out, 1.0));
        for with_bias in [true, false] {
            parity(&gpu, &format!("linear [{b}, {l}, {d_in}] -> {d_out} bias={with_bias}"), RTOL, |dev| {
                let (xt, wt, bt) = (t(&x, &[b, l, d_in], dev), t(&w, &[d_out, d_in], dev), t(&bias, &[d_out], dev));
                let mut out = t(&init_x[..1].repeat(b * l * d_out), &[b * l, d_out], dev);
                linear_forward(&mut out, &xt, &wt, with_bias.then_some(&bt)).unwrap();
                let (mut dx, mut dw, mut db) =
                    (t(&init_x, &[b, l, d_in], dev), t(&init_w, &[d_out, d_in], dev), t(&init_b, &[d_out], dev));
                let db_arg = if with_bias { Some(&mut db) } else { None };
                linear_backward(Some(&mut dx), &mut dw, db_arg, &t(&dout, &[b * l, d_out], dev), &xt, &wt).unwrap();
                vec![("out", host(&out)), ("dx", host(&dx)), ("dw", host(&dw)), ("db", host(&db))]
            });
        }
    }
    // Soft embeddings: [B, L, V] distributions against a [V, D] table.
    let (b, l, v, d) = (2, 7, 301, 24);
    let (probs, table, dout) =
        (randn(&mut rng, b * l * v, 0.1), randn(&mut rng, v * d, 1.0), randn(&mut rng, b * l * d, 1.0));
    let (init_p, init_t, init_o) =
        (randn(&mut rng, b * l * v, 1.0), randn(&mut rng, v * d, 1.0), randn(&mut rng, b * l * d, 1.0));
    for accumulate in [true, false] {
        parity(&gpu, &format!("soft_embedding accumulate={accumulate}"), RTOL, |dev| {
            let (p, tab) = (t(&probs, &[b, l, v], dev), t(&table, &[v, d], dev));
            let mut out = t(&init_o, &[b, l, d], dev);
            soft_embedding_forward(&mut out, &p, &tab, accumulate).unwrap();
            let (mut dp, mut dt) = (t(&init_p, &[b, l, v], dev), t(&init_t, &[v, d], dev));
            soft_embedding_backward(Some(&mut dp), &mut dt, &t(&dout, &[b, l, d], dev), &p, &tab).unwrap();
            vec![("out", host(&out)), ("dprobs", host(&dp)), ("dtable", host(&dt))]
        });
    }
}

#[test]
fn softmax_kl_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(11);
    // Group sizes 4 and 32 (two lanes' worth per lane), a warp's maximum, C = 1, the block
    // kernel just past the warp limit, at its limit below the resident kernel and past the
    // resident kernel's limit, and the resident kernel at the BERT vocabulary (not a multiple of
    // 4), just past its lower limit and at its upper one; each kernel with and without dteacher.
    let cases = [
        (37, 3),
        (19, 33),
        (8, 1024),
        (5, 1),
        (2, 1025),
        (3, 30_522),
        (4, 30_522),
        (2, 8193),
        (3, 30_720),
        (2, 30_721),
        (2, 8192),
    ];
    for (case, &(rows, c)) in cases.iter().enumerate() {
        let (mut zs, mut zt) = (randn(&mut rng, rows * c, 3.0), randn(&mut rng, rows * c, 3.0));
        // Masked entries (f32::MIN in both rows), and a fully masked last row.
        for i in 0..rows * c {
            if (c > 1 && rng.uniform() < 0.2) || (rows > 1 && i >= (rows - 1) * c) {
                (zs[i], zt[i]) = (f32::MIN, f32::MIN);
            }
        }
        let w: Vec<f32> = (0..rows).map(|r| if r == 1 { 0.0 } else { rng.uniform() as f32 + 0.5 }).collect();
        let init = randn(&mut rng, rows * c, 1.0);
        let rtol = if c > 1024 { WIDE_ROW_RTOL } else { RTOL };
        // Even cases: both gradients and row weights; odd cases: dstudent only, no weights.
        let full = case % 2 == 0;
        for form in [KlForm::Kl, KlForm::CrossEntropy] {
            for temperature in [2.0, 0.5] {
                let spec = SoftmaxKl { temperature, form, grad_scale: 0.7 };
                parity(&gpu, &format!("softmax_kl [{rows}, {c}] {form:?} T={temperature}"), rtol, |dev| {
                    let shape = [rows, c];
                    let mut loss = Tensor::zeros(&[rows], dev).unwrap();
                    let (mut ds, mut dt) = (t(&init, &shape, dev), t(&init, &shape, dev));
                    let w = full.then(|| t(&w, &[rows], dev));
                    let (s, te) = (t(&zs, &shape, dev), t(&zt, &shape, dev));
                    softmax_kl(&mut loss, Some(&mut ds), full.then_some(&mut dt), &s, &te, w.as_ref(), spec).unwrap();
                    vec![("loss", host(&loss)), ("dstudent", host(&ds)), ("dteacher", host(&dt))]
                });
            }
        }
    }
}

#[test]
fn hidden_mse_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(12);
    // (pairs, N, D, share of real tokens): 33 pairs take two launches; 16-byte loads where D is a
    // multiple of 4 (fewer columns than lanes at D = 20), scalar loads at odd D; with 32 pairs
    // and 700 or 4 pairs and 7,000 tokens each warp takes several rows; the last case is all
    // padding.
    let cases = [
        (3, 37, 48, 0.7),
        (33, 5, 7, 0.6),
        (6, 512, 384, 0.8),
        (32, 700, 20, 0.5),
        (4, 7000, 129, 0.9),
        (2, 6, 16, 0.0),
    ];
    for &(pairs, n, d, real) in &cases {
        let mut mask: Vec<f32> = (0..n).map(|_| f32::from(rng.uniform() < real)).collect();
        if real > 0.0 {
            mask[0] = 1.0;
        }
        let students: Vec<Vec<f32>> = (0..pairs).map(|_| randn(&mut rng, n * d, 1.0)).collect();
        let teachers: Vec<Vec<f32>> = (0..pairs).map(|_| randn(&mut rng, n * d, 1.0)).collect();
        let init: Vec<Vec<f32>> = (0..pairs).map(|_| randn(&mut rng, n * d, 1.0)).collect();
        for with_grads in [true, false] {
            parity(&gpu, &format!("hidden_mse {pairs} x [{n}, {d}] grads={with_grads}"), RTOL, |dev| {
                let s: Vec<Tensor> = students.iter().map(|x| t(x, &[n, d], dev)).collect();
                let te: Vec<Tensor> = teachers.iter().map(|x| t(x, &[n, d], dev)).collect();
                let mut g: Vec<Tensor> = init.iter().map(|x| t(x, &[n, d], dev)).collect();
                let mut losses = Tensor::zeros(&[pairs], dev).unwrap();
                let mut grads: Vec<&mut Tensor> = if with_grads { g.iter_mut().collect() } else { Vec::new() };
                let (s, te): (Vec<&Tensor>, Vec<&Tensor>) = (s.iter().collect(), te.iter().collect());
                hidden_mse(&mut losses, &mut grads, &s, &te, &t(&mask, &[n], dev), 0.9).unwrap();
                let all_grads = g.iter().flat_map(host).collect();
                vec![("losses", host(&losses)), ("dstudents", all_grads)]
            });
        }
    }
}

/// Where the CPU rejects a mask value other than 0 or 1, the GPU (which would need a
/// synchronising copy to find it) returns NaN losses and leaves the gradients alone.
#[test]
fn hidden_mse_bad_mask_on_gpu_is_nan_without_gradient() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(13);
    let (n, d) = (9, 5);
    let (s, te, init) = (randn(&mut rng, n * d, 1.0), randn(&mut rng, n * d, 1.0), randn(&mut rng, n * d, 1.0));
    let mut mask = vec![1.0; n];
    mask[4] = 0.5;
    let mut losses = Tensor::zeros(&[1], &gpu).unwrap();
    let mut g = t(&init, &[n, d], &gpu);
    let (s, te) = (t(&s, &[n, d], &gpu), t(&te, &[n, d], &gpu));
    hidden_mse(&mut losses, &mut [&mut g], &[&s], &[&te], &t(&mask, &[n], &gpu), 1.0).unwrap();
    assert!(host(&losses)[0].is_nan());
    assert_eq!(host(&g), init);
}

#[test]
fn attention_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(14);
    // (B, L, H, Dh, real tokens per example): padding, an example with no real token (uniform
    // rows), a partial query tile (L = 37) and the longest supported sequence.
    let cases: [(usize, usize, usize, usize, &[usize]); 3] =
        [(3, 128, 4, 32, &[128, 77, 0]), (2, 37, 2, 64, &[37, 20]), (1, 512, 2, 64, &[400])];
    for (case, &(b, l, h, dh, real)) in cases.iter().enumerate() {
        let x = [b, l, h * dh];
        let maps = [b, h, l, l];
        let n = b * l * h * dh;
        let (q, k, v, dout) =
            (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        let mask: Vec<f32> = (0..b * l).map(|i| f32::from(i % l < real[i / l])).collect();
        let init = randn(&mut rng, n, 1.0);
        let extra = (case != 1).then(|| randn(&mut rng, b * h * l * l, 0.1));
        for dropout in [None, Some(AttentionDropout { p: 0.1, seed: 77 + case as u64 })] {
            parity(&gpu, &format!("attention B={b} L={l} H={h} Dh={dh} {dropout:?}"), RTOL, |dev| {
                let (q, k, v, mask) = (t(&q, &x, dev), t(&k, &x, dev), t(&v, &x, dev), t(&mask, &[b, l], dev));
                let mut out = Tensor::zeros(&x, dev).unwrap();
                let (mut probs, mut scores) = (Tensor::zeros(&maps, dev).unwrap(), Tensor::zeros(&maps, dev).unwrap());
                attention_forward(&mut out, &mut probs, Some(&mut scores), &q, &k, &v, &mask, dropout).unwrap();
                let (mut dq, mut dk, mut dv) = (t(&init, &x, dev), t(&init, &x, dev), t(&init, &x, dev));
                let extra = extra.as_ref().map(|e| t(e, &maps, dev));
                attention_backward(
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    &t(&dout, &x, dev),
                    &q,
                    &k,
                    &v,
                    &probs,
                    extra.as_ref(),
                    dropout,
                )
                .unwrap();
                vec![
                    ("out", host(&out)),
                    ("probs", host(&probs)),
                    ("scores", host(&scores)),
                    ("dq", host(&dq)),
                    ("dk", host(&dk)),
                    ("dv", host(&dv)),
                ]
            });
        }
    }
}

#[test]
fn cross_entropy_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(15);
    for &(n, c) in &[(41, 3), (9, 1), (17, 1024), (6, 30_522)] {
        let mut z = randn(&mut rng, n * c, 3.0);
        let labels: Vec<u32> = (0..n).map(|_| rng.below(c) as u32).collect();
        // Soft targets that need not sum to one, with zeros; some zero-target logits are -inf.
        let soft: Vec<f32> = (0..n * c).map(|_| if rng.uniform() < 0.3 { 0.0 } else { rng.uniform() as f32 }).collect();
        for (i, y) in soft.iter().enumerate() {
            if *y == 0.0 && rng.uniform() < 0.3 && labels[i / c] as usize != i % c {
                z[i] = f32::NEG_INFINITY;
            }
        }
        let w: Vec<f32> = (0..n).map(|i| if i == 2 { 0.0 } else { rng.uniform() as f32 }).collect();
        let init = randn(&mut rng, n * c, 1.0);
        let rtol = if c > 1024 { WIDE_ROW_RTOL } else { RTOL };
        for (hard, weighted) in [(true, true), (false, true), (true, false), (false, false)] {
            parity(&gpu, &format!("cross_entropy [{n}, {c}] hard={hard} weighted={weighted}"), rtol, |dev| {
                let mut loss = Tensor::zeros(&[n], dev).unwrap();
                let mut dz = t(&init, &[n, c], dev);
                let ids = IdTensor::from_vec(labels.clone(), &[n], dev).unwrap();
                let y = t(&soft, &[n, c], dev);
                let targets = if hard { Targets::Hard(&ids) } else { Targets::Soft(&y) };
                let w = weighted.then(|| t(&w, &[n], dev));
                cross_entropy(&mut loss, Some(&mut dz), &t(&z, &[n, c], dev), targets, w.as_ref(), 0.8).unwrap();
                vec![("loss", host(&loss)), ("dlogits", host(&dz))]
            });
        }
    }
}

/// Where the CPU rejects a label >= C, the GPU gives that row a NaN loss and no gradient.
#[test]
fn cross_entropy_bad_label_on_gpu_is_nan_without_gradient() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(16);
    let (n, c) = (4, 5);
    let (z, init) = (randn(&mut rng, n * c, 1.0), randn(&mut rng, n * c, 1.0));
    let mut loss = Tensor::zeros(&[n], &gpu).unwrap();
    let mut dz = t(&init, &[n, c], &gpu);
    let ids = IdTensor::from_vec(vec![0, 9, 2, 4], &[n], &gpu).unwrap();
    cross_entropy(&mut loss, Some(&mut dz), &t(&z, &[n, c], &gpu), Targets::Hard(&ids), None, 1.0).unwrap();
    let (loss, dz) = (host(&loss), host(&dz));
    assert!(loss[1].is_nan() && loss.iter().enumerate().all(|(i, l)| i == 1 || l.is_finite()));
    assert_eq!(&dz[c..2 * c], &init[c..2 * c]);
    assert_ne!(&dz[..c], &init[..c]);
}

#[test]
fn mse_loss_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(17);
    let n = 333;
    let (pred, target, init) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
    let w: Vec<f32> = (0..n).map(|i| if i % 7 == 0 { 0.0 } else { rng.uniform() as f32 }).collect();
    for weighted in [true, false] {
        parity(&gpu, &format!("mse_loss weighted={weighted}"), RTOL, |dev| {
            let mut loss = Tensor::zeros(&[n], dev).unwrap();
            let mut dp = t(&init, &[n, 1], dev);
            let w = weighted.then(|| t(&w, &[n], dev));
            mse_loss(&mut loss, Some(&mut dp), &t(&pred, &[n, 1], dev), &t(&target, &[n], dev), w.as_ref(), 1.5)
                .unwrap();
            vec![("loss", host(&loss)), ("dpred", host(&dp))]
        });
    }
}

/// `--device cuda` on a machine without a driver (or past its last GPU) is an error with a
/// one-line message, never a panic.
#[test]
fn cuda_device_without_driver_is_a_one_line_error() {
    match Device::parse("cuda") {
        Ok(d) => eprintln!("a GPU is present ({d}); checking only the missing-ordinal case"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains('\n'), "message: {msg:?}");
        }
    }
    let msg = Device::parse("cuda:4096").unwrap_err().to_string();
    assert!(msg.starts_with("CUDA unavailable") && !msg.contains('\n'), "message: {msg:?}");
}

// ---- layernorm, gelu, bias, dropout ----

use kd_kernels::ops::bias::{add, add_bias_inplace, add_inplace, bias_backward, scale_inplace};
use kd_kernels::ops::dropout::{dropout_backward, dropout_backward_rows, dropout_forward, dropout_forward_rows};
use kd_kernels::ops::gelu::{gelu_backward, gelu_forward, relu_backward, relu_forward, tanh_backward, tanh_forward};
use kd_kernels::ops::layernorm::{layernorm_backward, layernorm_forward};

#[test]
fn layernorm_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(21);
    // (rows, D): warp groups of 8 (D = 7), 1 and 32 lanes (D = 1, 33), BERT's widths, the
    // warp kernel's longest row and the block kernel past it; 300 rows give the column sums
    // ten chunks (the last partial), 9,000 rows chunks of more than 32 rows.
    for &(rows, d) in &[(37, 7), (5, 1), (19, 33), (300, 384), (33, 768), (6, 1024), (3, 1025), (2, 2000), (9000, 48)] {
        let n = rows * d;
        // Rows off centre, so the mean matters.
        let x: Vec<f32> = randn(&mut rng, n, 2.0).iter().enumerate().map(|(i, v)| v + (i / d % 5) as f32).collect();
        let (gamma, beta) = (randn(&mut rng, d, 1.0), randn(&mut rng, d, 1.0));
        let (dout, init_dx) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        let (init_dg, init_db) = (randn(&mut rng, d, 1.0), randn(&mut rng, d, 1.0));
        parity(&gpu, &format!("layernorm [{rows}, {d}]"), RTOL, |dev| {
            let shape = [rows, d];
            let (x, gamma, beta) = (t(&x, &shape, dev), t(&gamma, &[d], dev), t(&beta, &[d], dev));
            let mut out = Tensor::zeros(&shape, dev).unwrap();
            let (mut mean, mut rstd) = (Tensor::zeros(&[rows], dev).unwrap(), Tensor::zeros(&[rows], dev).unwrap());
            layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &gamma, &beta, 1e-12).unwrap();
            let mut dx = t(&init_dx, &shape, dev);
            let (mut dg, mut db) = (t(&init_dg, &[d], dev), t(&init_db, &[d], dev));
            layernorm_backward(&mut dx, &mut dg, &mut db, &t(&dout, &shape, dev), &x, &mean, &rstd, &gamma).unwrap();
            vec![
                ("out", host(&out)),
                ("mean", host(&mean)),
                ("rstd", host(&rstd)),
                ("dx", host(&dx)),
                ("dgamma", host(&dg)),
                ("dbeta", host(&db)),
            ]
        });
    }
}

#[test]
fn activations_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(22);
    // One element, a partial last block, and many blocks (and CPU chunks).
    for &shape in &[&[1][..], &[1000][..], &[7, 10_001][..]] {
        let n: usize = shape.iter().product();
        let (x, dout, init) = (randn(&mut rng, n, 3.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        parity(&gpu, &format!("gelu {shape:?}"), RTOL, |dev| {
            let x = t(&x, shape, dev);
            let mut out = Tensor::zeros(shape, dev).unwrap();
            gelu_forward(&mut out, &x).unwrap();
            let mut dx = t(&init, shape, dev);
            gelu_backward(&mut dx, &t(&dout, shape, dev), &x).unwrap();
            vec![("out", host(&out)), ("dx", host(&dx))]
        });
        parity(&gpu, &format!("tanh {shape:?}"), RTOL, |dev| {
            let mut y = Tensor::zeros(shape, dev).unwrap();
            tanh_forward(&mut y, &t(&x, shape, dev)).unwrap();
            let mut dx = t(&init, shape, dev);
            tanh_backward(&mut dx, &t(&dout, shape, dev), &y).unwrap();
            vec![("y", host(&y)), ("dx", host(&dx))]
        });
        parity(&gpu, &format!("relu {shape:?}"), RTOL, |dev| {
            let mut y = Tensor::zeros(shape, dev).unwrap();
            relu_forward(&mut y, &t(&x, shape, dev)).unwrap();
            let mut dx = t(&init, shape, dev);
            relu_backward(&mut dx, &t(&dout, shape, dev), &y).unwrap();
            vec![("y", host(&y)), ("dx", host(&dx))]
        });
    }
}

#[test]
fn bias_ops_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(23);
    // Column sums: one chunk (5 rows), two column blocks with a partial one (D = 300), ten
    // chunks at BERT's width, chunks of more than 32 rows (9,000), and a single value.
    for &(rows, d) in &[(5, 3), (40, 300), (300, 768), (9000, 7), (1, 1)] {
        let n = rows * d;
        let (x, bias, dout, init) =
            (randn(&mut rng, n, 1.0), randn(&mut rng, d, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, d, 1.0));
        parity(&gpu, &format!("bias [{rows}, {d}]"), RTOL, |dev| {
            let mut x = t(&x, &[rows, d], dev);
            add_bias_inplace(&mut x, &t(&bias, &[d], dev)).unwrap();
            let mut db = t(&init, &[d], dev);
            bias_backward(&mut db, &t(&dout, &[rows, d], dev)).unwrap();
            vec![("x + bias", host(&x)), ("dbias", host(&db))]
        });
    }
    // Residual arithmetic on two views of the same rows, [3, 37, 7] and [111, 7].
    let (view3, view2) = ([3, 37, 7], [111, 7]);
    let n = 3 * 37 * 7;
    let (a, b, c) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
    parity(&gpu, "add, add_inplace, scale_inplace", RTOL, |dev| {
        let mut out = Tensor::zeros(&view2, dev).unwrap();
        add(&mut out, &t(&a, &view3, dev), &t(&b, &view2, dev)).unwrap();
        let mut acc = t(&c, &view2, dev);
        add_inplace(&mut acc, &t(&a, &view3, dev)).unwrap();
        scale_inplace(&mut acc, 0.37).unwrap();
        vec![("add", host(&out)), ("add_inplace, scale_inplace", host(&acc))]
    });
}

/// Dropout draws its mask from (seed, element index) on both devices: outputs and gradients
/// must agree bit for bit, dropped zeros included.
#[test]
fn dropout_matches_cpu_bitwise() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(24);
    for &n in &[1, 1000, 70_001] {
        let (x, dout, init) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        for (p, seed) in [(0.0, 3), (0.1, 0xdead_beef_cafe_f00d), (0.5, u64::MAX), (0.9, 42)] {
            let run = |dev: &Device| {
                let mut out = Tensor::zeros(&[n], dev).unwrap();
                dropout_forward(&mut out, &t(&x, &[n], dev), p, seed).unwrap();
                let mut dx = t(&init, &[n], dev);
                dropout_backward(&mut dx, &t(&dout, &[n], dev), p, seed).unwrap();
                (host(&out), host(&dx))
            };
            let ((cpu_out, cpu_dx), (gpu_out, gpu_dx)) = (run(&Device::Cpu), run(&gpu));
            if n > 1 && p > 0.0 {
                let dropped = gpu_out.iter().filter(|v| **v == 0.0).count();
                assert!(dropped > 0 && dropped < n, "dropout n={n} p={p}: {dropped} dropped");
            }
            assert_same_bits(&format!("dropout_forward n={n} p={p} seed={seed}"), &gpu_out, &cpu_out);
            assert_same_bits(&format!("dropout_backward n={n} p={p} seed={seed}"), &gpu_dx, &cpu_dx);
        }
    }
    // Rows addressed `row_step` mask indices apart (the [CLS] rows of a logits-only layer).
    let (rows, d, row_step) = (5, 384, 64 * 384);
    let (x, init) = (randn(&mut rng, rows * d, 1.0), randn(&mut rng, rows * d, 1.0));
    let run = |dev: &Device| {
        let mut out = Tensor::zeros(&[rows, d], dev).unwrap();
        dropout_forward_rows(&mut out, &t(&x, &[rows, d], dev), 0.1, 9, row_step).unwrap();
        let mut dx = t(&init, &[rows, d], dev);
        dropout_backward_rows(&mut dx, &t(&x, &[rows, d], dev), 0.1, 9, row_step).unwrap();
        (host(&out), host(&dx))
    };
    let ((cpu_out, cpu_dx), (gpu_out, gpu_dx)) = (run(&Device::Cpu), run(&gpu));
    assert_same_bits("dropout_forward_rows", &gpu_out, &cpu_out);
    assert_same_bits("dropout_backward_rows", &gpu_dx, &cpu_dx);
}

fn assert_same_bits(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    if let Some(i) = gpu.iter().zip(cpu).position(|(g, c)| g.to_bits() != c.to_bits()) {
        panic!("{what}[{i}]: gpu {:e}, cpu {:e}", gpu[i], cpu[i]);
    }
}

// ---- embedding, adamw, grad_norm, gumbel ----

use kd_kernels::ops::adamw::{adamw_step, AdamW};
use kd_kernels::ops::embedding::{embedding_backward, embedding_forward};
use kd_kernels::ops::grad_norm::{clip_grad_norm, global_grad_norm};
use kd_kernels::ops::gumbel::{gumbel_softmax_st_backward, gumbel_softmax_st_forward};
use kd_kernels::Error;

/// The GPU's AdamW update is the CPU's bit for bit (kernels/adamw.cu); 1e-6 leaves room only
/// for a last-bit difference.
const ADAMW_RTOL: f64 = 1e-6;

#[test]
fn embedding_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(31);
    // (id shape, V, D): more ids than rows (every id repeats), 2-D ids, D = 1, BERT's width.
    let cases: [(&[usize], usize, usize); 4] = [(&[37], 11, 33), (&[3, 7], 50, 5), (&[9], 4, 1), (&[2, 64], 300, 768)];
    for (id_shape, vocab, d) in cases {
        let n: usize = id_shape.iter().product();
        let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        let rows_shape: Vec<usize> = id_shape.iter().copied().chain([d]).collect();
        let (table, init, dout) =
            (randn(&mut rng, vocab * d, 1.0), randn(&mut rng, n * d, 1.0), randn(&mut rng, n * d, 1.0));
        let dtable_init = randn(&mut rng, vocab * d, 1.0);
        for accumulate in [false, true] {
            parity(&gpu, &format!("embedding ids {id_shape:?} V={vocab} D={d} accumulate={accumulate}"), RTOL, |dev| {
                let ids = IdTensor::from_vec(ids.clone(), id_shape, dev).unwrap();
                let mut out = t(&init, &rows_shape, dev);
                embedding_forward(&mut out, &ids, &t(&table, &[vocab, d], dev), accumulate).unwrap();
                let mut dtable = t(&dtable_init, &[vocab, d], dev);
                embedding_backward(&mut dtable, &t(&dout, &rows_shape, dev), &ids).unwrap();
                vec![("out", host(&out)), ("dtable", host(&dtable))]
            });
        }
    }
}

/// Where the CPU rejects an id >= V, the GPU writes NaN into that row and adds no gradient.
#[test]
fn embedding_bad_id_on_gpu_is_nan_without_gradient() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(32);
    let (vocab, d) = (4, 3);
    let (table, dout, init) =
        (randn(&mut rng, vocab * d, 1.0), randn(&mut rng, 3 * d, 1.0), randn(&mut rng, vocab * d, 1.0));
    let ids = IdTensor::from_vec(vec![1, 7, 1], &[3], &gpu).unwrap();
    let mut out = Tensor::zeros(&[3, d], &gpu).unwrap();
    embedding_forward(&mut out, &ids, &t(&table, &[vocab, d], &gpu), false).unwrap();
    let out = host(&out);
    assert!(out[d..2 * d].iter().all(|v| v.is_nan()) && out[..d] == table[d..2 * d] && out[2 * d..] == table[d..2 * d]);
    let mut dtable = t(&init, &[vocab, d], &gpu);
    embedding_backward(&mut dtable, &t(&dout, &[3, d], &gpu), &ids).unwrap();
    let dtable = host(&dtable);
    for (j, &g) in dtable.iter().enumerate() {
        let want = if j / d == 1 { init[j] + dout[j % d] + dout[2 * d + j % d] } else { init[j] };
        assert!((g - want).abs() <= 1e-6 * (1.0 + want.abs()), "dtable[{j}]: {g}, want {want}");
    }
}

#[test]
fn adamw_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(33);
    let cfg = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    // beta1 above 0.5 takes lerp's other branch.
    let other_lerp = AdamW { lr: 5e-2, beta1: 0.3, beta2: 0.5, eps: 1e-6, weight_decay: 0.1 };
    for &n in &[1, 1000, 70_001] {
        let (p0, m0) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 0.1));
        let v0: Vec<f32> = randn(&mut rng, n, 0.1).iter().map(|x| x * x).collect();
        let grads: Vec<Vec<f32>> = (0..3).map(|_| randn(&mut rng, n, 1.0)).collect();
        for (spec, decay) in [(cfg, true), (cfg, false), (other_lerp, true)] {
            parity(&gpu, &format!("adamw n={n} {spec:?} decay={decay}"), ADAMW_RTOL, |dev| {
                let (mut p, mut m, mut v) = (t(&p0, &[n], dev), t(&m0, &[n], dev), t(&v0, &[n], dev));
                // Steps 1, 2 and 1000: the bias corrections change at each.
                for (g, step) in grads.iter().zip([1, 2, 1000]) {
                    adamw_step(&mut p, &t(g, &[n], dev), &mut m, &mut v, spec, step, decay).unwrap();
                }
                vec![("param", host(&p)), ("m", host(&m)), ("v", host(&v))]
            });
        }
    }
}

#[test]
fn grad_norm_and_clip_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(34);
    // A few tensors of odd sizes (one large enough for the most blocks per tensor), and 70
    // small ones (two launches of at most 64 tensors).
    let few: Vec<Vec<usize>> = vec![vec![5, 3], vec![1], vec![600_001], vec![300, 7]];
    let many: Vec<Vec<usize>> = (0..70).map(|i| vec![1 + i % 9, 3]).collect();
    for shapes in [few, many] {
        let data: Vec<Vec<f32>> = shapes.iter().map(|s| randn(&mut rng, s.iter().product(), 0.5)).collect();
        let norm = data.iter().flatten().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt() as f32;
        // Clipping to half the norm, and a max_norm above it (gradients untouched).
        for max_norm in [norm / 2.0, 2.0 * norm] {
            parity(&gpu, &format!("grad_norm {} tensors max_norm={max_norm}", shapes.len()), RTOL, |dev| {
                let mut grads: Vec<Tensor> = data.iter().zip(&shapes).map(|(x, s)| t(x, s, dev)).collect();
                let global = global_grad_norm(&grads.iter().collect::<Vec<_>>()).unwrap();
                let clipped = clip_grad_norm(&mut grads.iter_mut().collect::<Vec<_>>(), max_norm).unwrap();
                vec![("norm", vec![global, clipped]), ("grads", grads.iter().flat_map(host).collect())]
            });
        }
    }
    // A norm past f32::MAX is returned as inf with the gradients untouched, on both devices.
    parity(&gpu, "grad_norm overflow", RTOL, |dev| {
        let mut g = t(&[f32::MAX, f32::MAX, 1.0], &[3], dev);
        let norm = clip_grad_norm(&mut [&mut g], 1.0).unwrap();
        vec![("norm", vec![norm]), ("grads", host(&g))]
    });
    // A list spanning both devices is an error, as on the CPU.
    let (a, b) = (t(&[1.0], &[1], &Device::Cpu), t(&[1.0], &[1], &gpu));
    assert!(matches!(global_grad_norm(&[&b, &a]), Err(Error::DeviceMismatch { .. })));
}

#[test]
fn gumbel_softmax_st_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(35);
    // The warp kernel at 4 and 32 lanes per row and V = 1, the block kernel just past the warp
    // limit and at the BERT vocabulary.
    for &(rows, v) in &[(37, 3), (19, 33), (8, 1024), (5, 1), (2, 1025), (3, 30_522)] {
        let (logits, dout, init) =
            (randn(&mut rng, rows * v, 2.0), randn(&mut rng, rows * v, 1.0), randn(&mut rng, rows * v, 1.0));
        let rtol = if v > 1024 { WIDE_ROW_RTOL } else { RTOL };
        for (tau, seed) in [(1.0, 7), (0.5, 0xdead_beef_cafe_f00d)] {
            parity(&gpu, &format!("gumbel_softmax_st [{rows}, {v}] tau={tau} seed={seed}"), rtol, |dev| {
                let shape = [rows, v];
                let (mut hard, mut soft) = (Tensor::zeros(&shape, dev).unwrap(), Tensor::zeros(&shape, dev).unwrap());
                gumbel_softmax_st_forward(&mut hard, &mut soft, &t(&logits, &shape, dev), tau, seed).unwrap();
                let mut dlogits = t(&init, &shape, dev);
                gumbel_softmax_st_backward(&mut dlogits, &t(&dout, &shape, dev), &soft, tau).unwrap();
                vec![("hard", host(&hard)), ("soft", host(&soft)), ("dlogits", host(&dlogits))]
            });
        }
    }
}

// ---- bf16 softmax-KL ----

use half::bf16;
use kd_kernels::Bf16Tensor;

/// bf16 rounding on the GPU (kernels/convert.cu) gives half::bf16::from_f32's bits (ties to
/// even, overflow to infinity, NaN kept), and widening back is exact on both devices.
#[test]
fn bf16_conversion_matches_cpu_bitwise() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(40);
    let mut x = randn(&mut rng, 70_001, 3.0);
    let tie = 1.0 + 2f32.powi(-8);
    let specials = [tie, -tie, 1.0 + 3.0 * 2f32.powi(-8), f32::MIN, f32::MAX, f32::INFINITY, f32::NAN, -0.0, 1e-40];
    x[..specials.len()].copy_from_slice(&specials);
    x.push(bf16::MIN.to_f32());
    let run = |dev: &Device| {
        let b = Bf16Tensor::from_f32(&t(&x, &[x.len()], dev)).unwrap();
        host(&b.to_f32().unwrap())
    };
    assert_same_bits("Bf16Tensor::from_f32 then to_f32", &run(&gpu), &run(&Device::Cpu));
}

/// The bf16 kernels (softmax_kl_bf16_*) against the CPU on the same bf16 logits: both widen the
/// same values exactly, so the only differences are the order of the f32 sums, and the
/// tolerances are the f32 test's: 1e-5 for rows up to 1,024 classes, 1e-4 for the
/// vocabulary-wide ones (the CPU's sequential sums there, not bf16, set that).
#[test]
fn softmax_kl_bf16_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(41);
    // The warp kernel at 2 lanes a row and at 32 (1,000 classes), the block kernel, the resident
    // kernel at the BERT vocabulary; with dteacher on even cases.
    for (case, &(rows, c)) in [(37, 2), (8, 1000), (3, 4000), (4, 30_522)].iter().enumerate() {
        let (mut zs, mut zt) = (randn(&mut rng, rows * c, 3.0), randn(&mut rng, rows * c, 3.0));
        // Masked entries (f32::MIN, which bf16 rounds to -inf; never class 0, as a row of -inf
        // throughout has no distribution), and a last row of bf16::MIN throughout, which stays
        // finite and is uniform.
        for i in 0..rows * c {
            if i >= (rows - 1) * c {
                (zs[i], zt[i]) = (bf16::MIN.to_f32(), bf16::MIN.to_f32());
            } else if i % c != 0 && rng.uniform() < 0.2 {
                (zs[i], zt[i]) = (f32::MIN, f32::MIN);
            }
        }
        let w: Vec<f32> = (0..rows).map(|r| if r == 1 { 0.0 } else { rng.uniform() as f32 + 0.5 }).collect();
        let init = randn(&mut rng, rows * c, 1.0);
        let rtol = if c > 1024 { WIDE_ROW_RTOL } else { RTOL };
        let full = case % 2 == 0;
        for form in [KlForm::Kl, KlForm::CrossEntropy] {
            for temperature in [2.0, 0.5] {
                let spec = SoftmaxKl { temperature, form, grad_scale: 0.7 };
                parity(&gpu, &format!("softmax_kl bf16 [{rows}, {c}] {form:?} T={temperature}"), rtol, |dev| {
                    let shape = [rows, c];
                    let mut loss = Tensor::zeros(&[rows], dev).unwrap();
                    let (mut ds, mut dt) = (t(&init, &shape, dev), t(&init, &shape, dev));
                    let w = t(&w, &[rows], dev);
                    let s = Bf16Tensor::from_f32(&t(&zs, &shape, dev)).unwrap();
                    let te = Bf16Tensor::from_f32(&t(&zt, &shape, dev)).unwrap();
                    softmax_kl(&mut loss, Some(&mut ds), full.then_some(&mut dt), &s, &te, Some(&w), spec).unwrap();
                    vec![("loss", host(&loss)), ("dstudent", host(&ds)), ("dteacher", host(&dt))]
                });
            }
        }
    }
}

/// The flash path (attention_forward_stats without maps, attention_backward_stats) against the
/// CPU, which materialises the maps. 2e-5, not 1e-5: tests/flash_attention_algorithm.rs runs the
/// kernels' loops on the CPU within 1e-5 of the reference, but with Rust's `exp`; the GPU adds
/// `expf` (up to 2 ulp), contracted multiply-adds and the row dot taken as dout . out, so it gets
/// twice that. A wrong index, mask, tail or dropout factor is off by far more.
#[test]
fn flash_attention_matches_cpu() {
    use kd_kernels::ops::attention::{attention_backward_stats, attention_forward_stats, flash_path};
    const FLASH_RTOL: f64 = 2e-5;
    let Some(gpu) = gpu() else { return };
    assert!(flash_path(&gpu, 32) && flash_path(&gpu, 64), "this GPU cannot run the flash kernels");
    let mut rng = Rng::new(16);
    // (B, L, H, Dh, real tokens per example): a fully padded example, partial tiles (L = 37,
    // 300), a single token, and the longest supported sequence.
    let cases: [(usize, usize, usize, usize, &[usize]); 5] = [
        (3, 128, 4, 32, &[128, 77, 0]),
        (2, 37, 2, 64, &[37, 20]),
        (2, 300, 3, 32, &[300, 1]),
        (2, 1, 2, 64, &[1, 0]),
        (1, 512, 2, 64, &[400]),
    ];
    for (case, &(b, l, h, dh, real)) in cases.iter().enumerate() {
        let x = [b, l, h * dh];
        let n = b * l * h * dh;
        let (q, k, v, dout) =
            (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        let mask: Vec<f32> = (0..b * l).map(|i| f32::from(i % l < real[i / l])).collect();
        let init = randn(&mut rng, n, 1.0);
        // Rows of examples with a real token: a fully padded row's max is f32::MIN on both sides,
        // which would make the tensor's scale meaningless.
        let real_rows: Vec<usize> = (0..b * h * l).filter(|r| real[r / (h * l)] > 0).collect();
        for dropout in [None, Some(AttentionDropout { p: 0.1, seed: 91 + case as u64 })] {
            // maps: the materialised forward (its stats from attention_softmax_f32) before the
            // flash backward.
            for maps in [false, true] {
                let what = format!("flash attention B={b} L={l} H={h} Dh={dh} {dropout:?} maps={maps}");
                let run = |dev: &Device| {
                    let (q, k, v, mask) = (t(&q, &x, dev), t(&k, &x, dev), t(&v, &x, dev), t(&mask, &[b, l], dev));
                    let mut out = Tensor::zeros(&x, dev).unwrap();
                    let mut stats = Tensor::zeros(&[b, h, l, 2], dev).unwrap();
                    let mut probs = maps.then(|| Tensor::zeros(&[b, h, l, l], dev).unwrap());
                    attention_forward_stats(&mut out, &mut stats, probs.as_mut(), None, &q, &k, &v, &mask, dropout)
                        .unwrap();
                    let (mut dq, mut dk, mut dv) = (t(&init, &x, dev), t(&init, &x, dev), t(&init, &x, dev));
                    let dout = t(&dout, &x, dev);
                    attention_backward_stats(
                        &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &stats, &mask, dropout,
                    )
                    .unwrap();
                    let stats = host(&stats);
                    vec![
                        ("out", host(&out)),
                        ("row max", real_rows.iter().map(|&r| stats[2 * r]).collect()),
                        ("row sum", stats.iter().skip(1).step_by(2).copied().collect()),
                        ("dq", host(&dq)),
                        ("dk", host(&dk)),
                        ("dv", host(&dv)),
                    ]
                };
                parity(&gpu, &what, FLASH_RTOL, run);
                // Every gradient element is written by one thread in a fixed order.
                let (first, second) = (run(&gpu), run(&gpu));
                for ((name, a), (_, b)) in first.iter().zip(&second) {
                    assert!(
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{what}: {name} not deterministic"
                    );
                }
            }
        }
    }
}
