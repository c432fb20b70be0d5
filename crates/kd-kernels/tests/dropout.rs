//! Inverted dropout: mask statistics, the counter-based mask, backward by the same mask, errors.
mod common;

use common::*;
use kd_kernels::ops::bias::add_inplace;
use kd_kernels::ops::dropout::{
    dropout_backward, dropout_backward_rows, dropout_forward, dropout_forward_rows, dropout_residual_forward_rows,
};
use kd_kernels::rng::{uniform, Rng};
use kd_kernels::Error;

/// Dropout in float64 from the documented rule: element i dropped iff uniform(seed, i) < p.
fn ref_dropout(x: &[f32], p: f32, seed: u64) -> Vec<f64> {
    let scale = 1.0 / (1.0 - p as f64);
    x.iter().enumerate().map(|(i, &v)| if uniform(seed, i as u64) < p { 0.0 } else { v as f64 * scale }).collect()
}

fn forward(x: &[f32], shape: &[usize], p: f32, seed: u64) -> Vec<f32> {
    let mut out = tensor(&vec![f32::NAN; x.len()], shape);
    dropout_forward(&mut out, &tensor(x, shape), p, seed).unwrap();
    out.to_vec().unwrap()
}

#[test]
fn forward_follows_the_counter_based_mask() {
    let mut rng = Rng::new(1);
    // Spans several tasks' chunks so each element's global index matters.
    for (shape, p) in [(vec![1], 0.5), (vec![3, 7], 0.1), (vec![4, 10_001], 0.3)] {
        let x = randn(&mut rng, shape.iter().product(), 1.0);
        let out = forward(&x, &shape, p, 42);
        assert_close("dropout", &out, &ref_dropout(&x, p, 42), 1e-6, 0.0);
    }
}

/// Every L-th row of an `[N, D]` tensor (the [CLS] rows), dropped with `row_step = L * D`, gets
/// the masks those rows have in the full tensor, forward and backward.
#[test]
fn row_addressed_masks_match_the_full_tensor_rows() {
    let mut rng = Rng::new(6);
    // D spans several draw segments; the full tensor spans several tasks' chunks.
    for (b, l, d) in [(3, 5, 7), (4, 9, 2500)] {
        let (p, seed) = (0.3, 17);
        let full_x = randn(&mut rng, b * l * d, 1.0);
        let full = forward(&full_x, &[b * l, d], p, seed);
        let rows_x: Vec<f32> = (0..b).flat_map(|i| full_x[i * l * d..][..d].to_vec()).collect();
        let mut rows = tensor(&vec![f32::NAN; b * d], &[b, d]);
        dropout_forward_rows(&mut rows, &tensor(&rows_x, &[b, d]), p, seed, l * d).unwrap();
        let want: Vec<f32> = (0..b).flat_map(|i| full[i * l * d..][..d].to_vec()).collect();
        assert_eq!(rows.to_vec().unwrap(), want, "forward, {b}x{l}x{d}");

        let init = randn(&mut rng, b * d, 1.0);
        let mut dx = tensor(&init, &[b, d]);
        dropout_backward_rows(&mut dx, &tensor(&rows_x, &[b, d]), p, seed, l * d).unwrap();
        let got = dx.to_vec().unwrap();
        for (i, (&g, (&w, &s))) in got.iter().zip(want.iter().zip(&init)).enumerate() {
            assert_eq!(g, s + w, "backward [{i}]");
        }
    }
    let err =
        dropout_forward_rows(&mut tensor(&[0.0; 6], &[2, 3]), &tensor(&[1.0; 6], &[2, 3]), 0.1, 1, 2).unwrap_err();
    assert!(err.to_string().contains("apart"), "{err}");
}

/// The fused residual form is dropout then the residual add, bit for bit, across task chunks
/// and row-addressed masks.
#[test]
fn residual_form_is_dropout_then_add() {
    let mut rng = Rng::new(9);
    for (rows, d, row_step, p) in [(3, 7, 7, 0.0), (40, 1000, 1000, 0.1), (5, 384, 64 * 384, 0.3)] {
        let (x, r) = (randn(&mut rng, rows * d, 1.0), randn(&mut rng, rows * d, 1.0));
        let (x, r) = (tensor(&x, &[rows, d]), tensor(&r, &[rows, d]));
        let mut want = zeros(&[rows, d]);
        dropout_forward_rows(&mut want, &x, p, 5, row_step).unwrap();
        add_inplace(&mut want, &r).unwrap();
        let mut got = tensor(&vec![f32::NAN; rows * d], &[rows, d]);
        dropout_residual_forward_rows(&mut got, &x, &r, p, 5, row_step).unwrap();
        assert_eq!(got.to_vec().unwrap(), want.to_vec().unwrap(), "{rows}x{d} step {row_step} p {p}");
    }
    let (x, bad) = (zeros(&[2, 3]), zeros(&[3, 2]));
    let err = dropout_residual_forward_rows(&mut zeros(&[2, 3]), &x, &bad, 0.1, 1, 3).unwrap_err();
    assert!(err.to_string().contains("residual"), "{err}");
}

#[test]
fn mask_statistics_and_seeds() {
    let n = 200_000;
    let x = vec![1.0f32; n];
    for p in [0.1f32, 0.5, 0.9] {
        let out = forward(&x, &[n], p, 7);
        let dropped = out.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        // Binomial standard deviation is at most 0.0012 here; allow about 4 of them.
        assert!((dropped - p as f64).abs() < 5e-3, "p {p}: dropped fraction {dropped}");
        let mean = out.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.05, "p {p}: mean {mean}");
        assert_eq!(out, forward(&x, &[n], p, 7), "same seed, same mask");
        assert_ne!(out, forward(&x, &[n], p, 8), "another seed, another mask");
    }
}

#[test]
fn zero_p_is_identity() {
    let mut rng = Rng::new(2);
    let x = randn(&mut rng, 1000, 1.0);
    assert_eq!(forward(&x, &[10, 100], 0.0, 3), x);
}

#[test]
fn backward_uses_the_forward_mask() {
    let mut rng = Rng::new(3);
    for (n, p, seed) in [(1, 0.5, 1), (13, 0.25, 2), (40_000, 0.6, 3)] {
        let x = randn(&mut rng, n, 1.0);
        let r = randn(&mut rng, n, 1.0);
        let dx0 = randn(&mut rng, n, 1.0);
        let mut dx = tensor(&dx0, &[n]);
        dropout_backward(&mut dx, &tensor(&r, &[n]), p, seed).unwrap();
        let grad: Vec<f32> = dx.cpu().unwrap().iter().zip(&dx0).map(|(a, b)| a - b).collect();
        // Dropped exactly where the forward dropped.
        let out = forward(&x, &[n], p, seed);
        assert!(out.iter().zip(&grad).all(|(&o, &g)| (o == 0.0) == (g == 0.0)));
        let loss = |x: &[f32]| ref_dropout(x, p, seed).iter().zip(&r).map(|(o, &r)| o * r as f64).sum::<f64>();
        let at = probe_indices(&mut rng, n, 40);
        check_grad("dx", &x, &grad, 1e-2, 1e-4, 1e-5, Some(&at), loss);
    }
}

#[test]
fn rejects_bad_p_and_shapes() {
    for p in [-0.1f32, 1.0, 1.5, f32::NAN] {
        let r = dropout_forward(&mut zeros(&[4]), &zeros(&[4]), p, 0);
        assert!(matches!(r, Err(Error::Invalid { op: "dropout_forward", .. })), "p {p}: {r:?}");
        let r = dropout_backward(&mut zeros(&[4]), &zeros(&[4]), p, 0);
        assert!(matches!(r, Err(Error::Invalid { op: "dropout_backward", .. })), "p {p}: {r:?}");
    }
    let r = dropout_forward(&mut zeros(&[4]), &zeros(&[2, 2]), 0.1, 0);
    assert!(matches!(r, Err(Error::Shape { op: "dropout_forward", .. })), "{r:?}");
    let r = dropout_backward(&mut zeros(&[5]), &zeros(&[4]), 0.1, 0);
    assert!(matches!(r, Err(Error::Shape { op: "dropout_backward", .. })), "{r:?}");
}
