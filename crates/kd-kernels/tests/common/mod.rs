//! Shared helpers for the op tests: seeded random inputs, float64 comparison, finite differences.
#![allow(dead_code)]

use kd_kernels::rng::Rng;
use kd_kernels::{Device, Tensor};

/// `n` values from N(0, scale^2), seeded.
pub fn randn(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

pub fn tensor(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
}

pub fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, &Device::Cpu).unwrap()
}

/// Asserts `|got - want| <= atol + rtol * |want|` element-wise, naming the first bad index.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, want {w} (err {err:e})");
    }
}

/// Relative error of a whole vector, ||got - want|| / max(||want||, tiny).
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum::<f64>().sqrt();
    let den: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Central finite differences of a scalar function `f` of `x`, in float64 around the f32 point:
/// d f / d x_i ~ (f(x + h e_i) - f(x - h e_i)) / 2h, for the indices in `at` (all when None).
pub fn finite_diff(x: &[f32], h: f32, at: Option<&[usize]>, mut f: impl FnMut(&[f32]) -> f64) -> Vec<(usize, f64)> {
    let idx: Vec<usize> = match at {
        Some(a) => a.to_vec(),
        None => (0..x.len()).collect(),
    };
    let mut xp = x.to_vec();
    idx.into_iter()
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = f(&xp);
            xp[i] = orig - h;
            let down = f(&xp);
            xp[i] = orig;
            let step = ((orig + h) as f64) - ((orig - h) as f64);
            (i, (up - down) / step)
        })
        .collect()
}

/// Checks an analytic gradient against finite differences of `f` at the given indices.
#[allow(clippy::too_many_arguments)]
pub fn check_grad(
    what: &str,
    x: &[f32],
    grad: &[f32],
    h: f32,
    rtol: f64,
    atol: f64,
    at: Option<&[usize]>,
    f: impl FnMut(&[f32]) -> f64,
) {
    for (i, numeric) in finite_diff(x, h, at, f) {
        let g = grad[i] as f64;
        assert!(
            (g - numeric).abs() <= atol + rtol * numeric.abs(),
            "{what}: d/dx[{i}] analytic {g}, numeric {numeric}"
        );
    }
}

/// A spread of indices to probe in a long vector (first, last and seeded picks).
pub fn probe_indices(rng: &mut Rng, n: usize, count: usize) -> Vec<usize> {
    let mut v = vec![0, n - 1];
    v.extend((0..count.saturating_sub(2)).map(|_| rng.below(n)));
    v
}
