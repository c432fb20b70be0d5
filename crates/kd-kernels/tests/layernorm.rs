//! LayerNorm forward against float64, backward against finite differences, determinism of the
//! parameter gradients, and shape errors.
mod common;

use common::*;
use kd_kernels::ops::layernorm::{layernorm_backward, layernorm_forward};
use kd_kernels::rng::Rng;
use kd_kernels::{Error, Tensor};

const EPS: f32 = 1e-12;

/// (out, mean, rstd) in float64: biased variance, eps inside the square root.
fn ref_layernorm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = gamma.len();
    let (mut out, mut means, mut rstds) = (vec![], vec![], vec![]);
    for row in x.chunks(d) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for ((&v, &g), &b) in row.iter().zip(gamma).zip(beta) {
            out.push((v as f64 - mean) * rstd * g as f64 + b as f64);
        }
        means.push(mean);
        rstds.push(rstd);
    }
    (out, means, rstds)
}

struct Case {
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rows: usize,
    d: usize,
}

fn case(rng: &mut Rng, rows: usize, d: usize) -> Case {
    // An offset and a spread per row, as real activations have.
    let x = randn(rng, rows * d, 2.0).iter().enumerate().map(|(i, v)| v + (i / d) as f32 * 0.7 - 1.0).collect();
    let gamma = randn(rng, d, 0.5).iter().map(|g| g + 1.0).collect();
    Case { x, gamma, beta: randn(rng, d, 0.5), rows, d }
}

fn forward(c: &Case, eps: f32) -> (Tensor, Tensor, Tensor) {
    let (mut out, mut mean, mut rstd) = (zeros(&[c.rows, c.d]), zeros(&[c.rows]), zeros(&[c.rows]));
    let (x, g, b) = (tensor(&c.x, &[c.rows, c.d]), tensor(&c.gamma, &[c.d]), tensor(&c.beta, &[c.d]));
    layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &g, &b, eps).unwrap();
    (out, mean, rstd)
}

#[test]
fn forward_matches_reference() {
    let mut rng = Rng::new(1);
    for (rows, d) in [(1, 1), (1, 7), (5, 3), (13, 130), (4, 384)] {
        let c = case(&mut rng, rows, d);
        for eps in [EPS, 1e-5, 0.5] {
            let (out, mean, rstd) = forward(&c, eps);
            let (want, want_mean, want_rstd) = ref_layernorm(&c.x, &c.gamma, &c.beta, eps);
            assert_close("out", out.cpu().unwrap(), &want, 1e-4, 1e-5);
            assert_close("mean", mean.cpu().unwrap(), &want_mean, 1e-5, 1e-5);
            // D = 1 has zero variance and rstd = 1 / sqrt(eps); every other row is O(1).
            assert_close("rstd", rstd.cpu().unwrap(), &want_rstd, 1e-4, 0.0);
        }
    }
}

#[test]
fn forward_takes_batched_rows() {
    let mut rng = Rng::new(2);
    let c = case(&mut rng, 6, 5);
    let (mut out, mut mean, mut rstd) = (zeros(&[2, 3, 5]), zeros(&[2, 3]), zeros(&[2, 3]));
    let (g, b) = (tensor(&c.gamma, &[5]), tensor(&c.beta, &[5]));
    layernorm_forward(&mut out, &mut mean, &mut rstd, &tensor(&c.x, &[2, 3, 5]), &g, &b, EPS).unwrap();
    let (want, _, _) = ref_layernorm(&c.x, &c.gamma, &c.beta, EPS);
    assert_close("out", out.cpu().unwrap(), &want, 1e-4, 1e-5);
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = Rng::new(3);
    for (rows, d) in [(1, 1), (1, 6), (4, 5), (3, 70)] {
        let c = case(&mut rng, rows, d);
        let eps = 1e-5;
        let r = randn(&mut rng, rows * d, 1.0);
        let (_, mean, rstd) = forward(&c, eps);
        let (dx0, dg0, db0) = (randn(&mut rng, rows * d, 1.0), randn(&mut rng, d, 1.0), randn(&mut rng, d, 1.0));
        let (mut dx, mut dg, mut db) = (tensor(&dx0, &[rows, d]), tensor(&dg0, &[d]), tensor(&db0, &[d]));
        layernorm_backward(
            &mut dx,
            &mut dg,
            &mut db,
            &tensor(&r, &[rows, d]),
            &tensor(&c.x, &[rows, d]),
            &mean,
            &rstd,
            &tensor(&c.gamma, &[d]),
        )
        .unwrap();
        let loss = |x: &[f32], g: &[f32], b: &[f32]| -> f64 {
            ref_layernorm(x, g, b, eps).0.iter().zip(&r).map(|(o, &r)| o * r as f64).sum()
        };
        let minus =
            |t: &Tensor, t0: &[f32]| -> Vec<f32> { t.cpu().unwrap().iter().zip(t0).map(|(a, b)| a - b).collect() };
        let at = probe_indices(&mut rng, rows * d, 24);
        check_grad("dx", &c.x, &minus(&dx, &dx0), 1e-3, 2e-4, 1e-4, Some(&at), |x| loss(x, &c.gamma, &c.beta));
        check_grad("dgamma", &c.gamma, &minus(&dg, &dg0), 1e-3, 2e-4, 1e-4, None, |g| loss(&c.x, g, &c.beta));
        check_grad("dbeta", &c.beta, &minus(&db, &db0), 1e-3, 2e-4, 1e-4, None, |b| loss(&c.x, &c.gamma, b));
    }
}

#[test]
fn parameter_gradients_are_deterministic_across_thread_counts() {
    let mut rng = Rng::new(4);
    let (rows, d) = (200, 150);
    let c = case(&mut rng, rows, d);
    let (_, mean, rstd) = forward(&c, EPS);
    let dout = tensor(&randn(&mut rng, rows * d, 1.0), &[rows, d]);
    let (x, gamma) = (tensor(&c.x, &[rows, d]), tensor(&c.gamma, &[d]));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let (mut dx, mut dg, mut db) = (zeros(&[rows, d]), zeros(&[d]), zeros(&[d]));
        pool.install(|| layernorm_backward(&mut dx, &mut dg, &mut db, &dout, &x, &mean, &rstd, &gamma)).unwrap();
        (dx.to_vec().unwrap(), dg.to_vec().unwrap(), db.to_vec().unwrap())
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn rejects_bad_shapes_and_eps() {
    let fwd = |x: &[usize], g: usize, stats: usize, out: &[usize], eps: f32| {
        let (mut o, mut m, mut r) = (zeros(out), zeros(&[stats]), zeros(&[stats]));
        layernorm_forward(&mut o, &mut m, &mut r, &zeros(x), &zeros(&[g]), &zeros(&[g]), eps)
    };
    assert!(fwd(&[3, 4], 4, 3, &[3, 4], 1e-5).is_ok());
    for r in [fwd(&[3, 4], 5, 3, &[3, 4], 1e-5), fwd(&[3, 4], 4, 4, &[3, 4], 1e-5), fwd(&[3, 4], 4, 3, &[4, 3], 1e-5)] {
        assert!(matches!(r, Err(Error::Shape { op: "layernorm_forward", .. })), "{r:?}");
    }
    assert!(matches!(fwd(&[3, 0], 0, 3, &[3, 0], 1e-5), Err(Error::Shape { .. })));
    for eps in [-1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(fwd(&[3, 4], 4, 3, &[3, 4], eps), Err(Error::Invalid { op: "layernorm_forward", .. })));
    }
    let (x, s, g) = (zeros(&[3, 4]), zeros(&[3]), zeros(&[4]));
    let r = layernorm_backward(&mut zeros(&[3, 4]), &mut zeros(&[4]), &mut zeros(&[5]), &x, &x, &s, &s, &g);
    assert!(matches!(r, Err(Error::Shape { op: "layernorm_backward", .. })), "{r:?}");
    let r =
        layernorm_backward(&mut zeros(&[3, 4]), &mut zeros(&[4]), &mut zeros(&[4]), &zeros(&[4, 3]), &x, &s, &s, &g);
    assert!(matches!(r, Err(Error::Shape { op: "layernorm_backward", .. })), "{r:?}");
}
