//! Exact (erf) GELU and tanh against float64, their backwards against finite differences.
mod common;

use common::*;
use kd_kernels::ops::gelu::{gelu_backward, gelu_forward, tanh_backward, tanh_forward};
use kd_kernels::rng::Rng;
use kd_kernels::Error;

/// HF's `gelu` in float64, written as the textbook `1 + erf`.
fn ref_gelu(x: f32) -> f64 {
    let x = x as f64;
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

#[test]
fn forward_matches_reference() {
    let mut rng = Rng::new(1);
    // Typical activations, a wide spread, and a sweep through both tails; more than one task's chunk.
    let mut x = randn(&mut rng, 20_000, 1.0);
    x.extend(randn(&mut rng, 20_000, 4.0));
    x.extend((0..=400).map(|i| i as f32 * 0.05 - 10.0));
    let mut out = tensor(&vec![f32::NAN; x.len()], &[x.len()]);
    gelu_forward(&mut out, &tensor(&x, &[x.len()])).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| ref_gelu(v)).collect();
    // The atol only covers the far left tail, where the float64 `1 + erf` itself cancels.
    assert_close("gelu", out.cpu().unwrap(), &want, 1e-6, 1e-12);
}

#[test]
fn forward_keeps_relative_precision_in_the_left_tail() {
    // x * Phi(x) at x = -3, -5, -8 (Phi from its tabulated values), where 1 + erf cancels in f32.
    let cases = [
        (-3.0f32, -3.0 * 1.349_898_031_630_094_6e-3),
        (-5.0, -5.0 * 2.866_515_718_791_939e-7),
        (-8.0, -8.0 * 6.220_960_574_271_785e-16),
    ];
    let x: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let mut out = zeros(&[3]);
    gelu_forward(&mut out, &tensor(&x, &[3])).unwrap();
    let want: Vec<f64> = cases.iter().map(|c| c.1).collect();
    assert_close("gelu tail", out.cpu().unwrap(), &want, 1e-6, 0.0);
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = Rng::new(2);
    for n in [1, 7, 301] {
        let x = randn(&mut rng, n, 2.0);
        let r = randn(&mut rng, n, 1.0);
        let dx0 = randn(&mut rng, n, 1.0);
        let mut dx = tensor(&dx0, &[n]);
        gelu_backward(&mut dx, &tensor(&r, &[n]), &tensor(&x, &[n])).unwrap();
        let grad: Vec<f32> = dx.cpu().unwrap().iter().zip(&dx0).map(|(a, b)| a - b).collect();
        let loss = |x: &[f32]| x.iter().zip(&r).map(|(&x, &r)| ref_gelu(x) * r as f64).sum::<f64>();
        check_grad("dx", &x, &grad, 1e-3, 1e-4, 1e-5, None, loss);
    }
}

#[test]
fn backward_takes_any_shape_and_accumulates() {
    let mut rng = Rng::new(3);
    let shape = [2, 3, 5];
    let x = randn(&mut rng, 30, 1.5);
    let r = randn(&mut rng, 30, 1.0);
    let mut once = zeros(&shape);
    gelu_backward(&mut once, &tensor(&r, &shape), &tensor(&x, &shape)).unwrap();
    let mut twice = zeros(&shape);
    for _ in 0..2 {
        gelu_backward(&mut twice, &tensor(&r, &shape), &tensor(&x, &shape)).unwrap();
    }
    let doubled: Vec<f64> = once.cpu().unwrap().iter().map(|&g| 2.0 * g as f64).collect();
    assert_close("accumulated", twice.cpu().unwrap(), &doubled, 1e-6, 0.0);
}

#[test]
fn tanh_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(4);
    for n in [1, 9, 40_000] {
        let x = randn(&mut rng, n, 2.0);
        let mut y = tensor(&vec![f32::NAN; n], &[n]);
        tanh_forward(&mut y, &tensor(&x, &[n])).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| (v as f64).tanh()).collect();
        assert_close("tanh", y.cpu().unwrap(), &want, 1e-6, 1e-7);

        let r = randn(&mut rng, n, 1.0);
        let dx0 = randn(&mut rng, n, 1.0);
        let mut dx = tensor(&dx0, &[n]);
        tanh_backward(&mut dx, &tensor(&r, &[n]), &y).unwrap();
        let grad: Vec<f32> = dx.cpu().unwrap().iter().zip(&dx0).map(|(a, b)| a - b).collect();
        let loss = |x: &[f32]| x.iter().zip(&r).map(|(&x, &r)| (x as f64).tanh() * r as f64).sum::<f64>();
        let at = probe_indices(&mut rng, n, 30);
        check_grad("tanh dx", &x, &grad, 1e-3, 1e-4, 1e-5, Some(&at), loss);
    }
}

#[test]
fn rejects_bad_shapes() {
    let r = gelu_forward(&mut zeros(&[3, 4]), &zeros(&[4, 3]));
    assert!(matches!(r, Err(Error::Shape { op: "gelu_forward", .. })), "{r:?}");
    let r = gelu_backward(&mut zeros(&[3, 4]), &zeros(&[3, 4]), &zeros(&[12]));
    assert!(matches!(r, Err(Error::Shape { op: "gelu_backward", .. })), "{r:?}");
    let r = gelu_backward(&mut zeros(&[3, 4]), &zeros(&[3, 5]), &zeros(&[3, 4]));
    assert!(matches!(r, Err(Error::Shape { op: "gelu_backward", .. })), "{r:?}");
    let r = tanh_forward(&mut zeros(&[3]), &zeros(&[4]));
    assert!(matches!(r, Err(Error::Shape { op: "tanh_forward", .. })), "{r:?}");
    let r = tanh_backward(&mut zeros(&[4]), &zeros(&[4]), &zeros(&[3]));
    assert!(matches!(r, Err(Error::Shape { op: "tanh_backward", .. })), "{r:?}");
}
