//! Exact (erf) GELU and tanh against float64, their backwards against finite differences; ReLU
//! exactly.
mod common;

use common::*;
use kd_kernels::ops::bias::add_bias_inplace;
use kd_kernels::ops::gelu::{
    bias_gelu_forward, gelu_backward, gelu_forward, relu_backward, relu_forward, tanh_backward, tanh_forward,
};
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
    // The atol covers the left tail, where the f32 Phi is only within about 6e-8 absolute (its erf
    // within 1.3e-7, measured on a dense grid of [-10, 10]; PyTorch's CPU erf: 1.5e-7); these inputs
    // need 5e-8.
    assert_close("gelu", out.cpu().unwrap(), &want, 1e-6, 1e-7);
}

#[test]
fn forward_matches_tabulated_left_tail() {
    // x * Phi(x) at x = -3, -5, -8 (Phi from its tabulated values), where 1 + erf cancels in f32.
    // Relative precision holds here because x * x is exact for these x; elsewhere in the tail the
    // rounding of x * x in the exponent costs up to a few 1e-6 of it (absolute error still < 1e-7).
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
fn bias_gelu_is_bias_then_gelu_bit_for_bit() {
    let mut rng = Rng::new(5);
    // More rows than one task takes, and a row width that is not a multiple of 8.
    for (rows, width) in [(3, 1), (40, 1536), (23, 37)] {
        let (product, bias) = (randn(&mut rng, rows * width, 2.0), randn(&mut rng, width, 1.0));
        let (shape, bias) = ([rows, width], tensor(&bias, &[width]));
        let mut pre = tensor(&product, &shape);
        let mut out = tensor(&vec![f32::NAN; rows * width], &shape);
        bias_gelu_forward(&mut out, &mut pre, &bias).unwrap();
        let mut want_pre = tensor(&product, &shape);
        add_bias_inplace(&mut want_pre, &bias).unwrap();
        let mut want = zeros(&shape);
        gelu_forward(&mut want, &want_pre).unwrap();
        assert_eq!(pre.cpu().unwrap(), want_pre.cpu().unwrap(), "pre-activation, {rows}x{width}");
        assert_eq!(out.cpu().unwrap(), want.cpu().unwrap(), "gelu, {rows}x{width}");
    }
    let r = bias_gelu_forward(&mut zeros(&[2, 4]), &mut zeros(&[2, 4]), &zeros(&[3]));
    assert!(matches!(r, Err(Error::Shape { op: "bias_gelu_forward", .. })), "{r:?}");
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
fn relu_matches_reference_and_passes_gradient_where_positive() {
    let mut rng = Rng::new(5);
    for n in [1, 9, 40_000] {
        let mut x = randn(&mut rng, n, 2.0);
        // x = 0 exactly: PyTorch's ReLU passes no gradient there.
        x[n / 2] = 0.0;
        let mut y = tensor(&vec![f32::NAN; n], &[n]);
        relu_forward(&mut y, &tensor(&x, &[n])).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| (v as f64).max(0.0)).collect();
        assert_close("relu", y.cpu().unwrap(), &want, 0.0, 0.0);

        let r = randn(&mut rng, n, 1.0);
        let dx0 = randn(&mut rng, n, 1.0);
        let mut dx = tensor(&dx0, &[n]);
        relu_backward(&mut dx, &tensor(&r, &[n]), &y).unwrap();
        // The same f32 sum the op makes, so the comparison is exact.
        let want: Vec<f64> =
            x.iter().zip(&r).zip(&dx0).map(|((&x, &r), &d)| (d + if x > 0.0 { r } else { 0.0 }) as f64).collect();
        assert_close("relu dx", dx.cpu().unwrap(), &want, 0.0, 0.0);
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
    let r = relu_forward(&mut zeros(&[3]), &zeros(&[4]));
    assert!(matches!(r, Err(Error::Shape { op: "relu_forward", .. })), "{r:?}");
    let r = relu_backward(&mut zeros(&[4]), &zeros(&[3]), &zeros(&[4]));
    assert!(matches!(r, Err(Error::Shape { op: "relu_backward", .. })), "{r:?}");
}

#[test]
fn forward_and_gradient_stay_within_measured_bounds_on_a_dense_grid() {
    // Max abs errors measured on this grid: GELU 3.8e-7 (the rounding of outputs up to 10; at most
    // 1e-7 below |x| = 1), its gradient 1.5e-7; PyTorch's CPU erf alone is within 1.5e-7.
    let n = 2_000_001;
    let x: Vec<f32> = (0..n).map(|i| (-10.0 + 20.0 * i as f64 / (n - 1) as f64) as f32).collect();
    let t = tensor(&x, &[n]);
    let mut out = zeros(&[n]);
    gelu_forward(&mut out, &t).unwrap();
    let mut dx = zeros(&[n]);
    gelu_backward(&mut dx, &tensor(&vec![1.0; n], &[n]), &t).unwrap();
    let (mut forward, mut backward) = (0f64, 0f64);
    for ((&v, &y), &g) in x.iter().zip(out.cpu().unwrap()).zip(dx.cpu().unwrap()) {
        let v = v as f64;
        let cdf = 0.5 * libm::erfc(-v / std::f64::consts::SQRT_2);
        let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
        forward = forward.max((y as f64 - v * cdf).abs());
        backward = backward.max((g as f64 - (cdf + v * pdf)).abs());
    }
    assert!(forward <= 4e-7 && backward <= 2e-7, "max abs errors: gelu {forward:e}, gelu' {backward:e}");
}

#[test]
fn extremes_map_to_limits_and_nan_propagates() {
    let x = [f32::NEG_INFINITY, -20.0, 20.0, f32::INFINITY, f32::NAN];
    let t = tensor(&x, &[5]);
    let mut out = zeros(&[5]);
    gelu_forward(&mut out, &t).unwrap();
    let mut dx = zeros(&[5]);
    gelu_backward(&mut dx, &tensor(&[1.0; 5], &[5]), &t).unwrap();
    let (y, g) = (out.cpu().unwrap(), dx.cpu().unwrap());
    assert_eq!(&y[..4], &[0.0, 0.0, 20.0, f32::INFINITY], "gelu");
    assert_eq!(&g[..4], &[0.0, 0.0, 1.0, 1.0], "gelu'");
    assert!(y[4].is_nan() && g[4].is_nan(), "NaN: gelu {}, gelu' {}", y[4], g[4]);
}
