//! Masked multi-pair hidden-state MSE against a float64 reference and finite differences.
mod common;

use common::*;
use kd_kernels::ops::hidden_mse::hidden_mse;
use kd_kernels::rng::Rng;
use kd_kernels::{Error, Tensor};

/// One pair's loss in float64: sum over real tokens and dims of (s - t)^2 / (n_real * D).
fn reference(s: &[f32], t: &[f32], mask: &[f32], d: usize) -> f64 {
    let real = mask.iter().filter(|&&m| m == 1.0).count();
    if real == 0 {
        return 0.0;
    }
    let sum: f64 = s
        .chunks(d)
        .zip(t.chunks(d))
        .zip(mask)
        .filter(|(_, &m)| m == 1.0)
        .flat_map(|((s, t), _)| s.iter().zip(t).map(|(&s, &t)| (s as f64 - t as f64).powi(2)))
        .sum();
    sum / (real * d) as f64
}

struct Case {
    n: usize,
    d: usize,
    students: Vec<Vec<f32>>,
    teachers: Vec<Vec<f32>>,
    mask: Vec<f32>,
}

fn case(pairs: usize, n: usize, d: usize, real: impl Fn(usize) -> bool, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let students = (0..pairs).map(|_| randn(&mut rng, n * d, 1.0)).collect();
    let teachers = (0..pairs).map(|_| randn(&mut rng, n * d, 1.5)).collect();
    Case { n, d, students, teachers, mask: (0..n).map(|i| f32::from(real(i))).collect() }
}

/// Runs the op with gradients starting at `init`; returns the losses and the gradient increments.
fn run(c: &Case, init: &[f32], grad_scale: f32) -> (Vec<f32>, Vec<Vec<f32>>) {
    let shape = [c.n, c.d];
    let (s, t): (Vec<Tensor>, Vec<Tensor>) =
        c.students.iter().zip(&c.teachers).map(|(s, t)| (tensor(s, &shape), tensor(t, &shape))).unzip();
    let mut grads: Vec<Tensor> = s.iter().map(|_| tensor(init, &shape)).collect();
    let mut losses = tensor(&vec![f32::NAN; s.len()], &[s.len()]);
    let mut grad_refs: Vec<&mut Tensor> = grads.iter_mut().collect();
    let (s, t): (Vec<&Tensor>, Vec<&Tensor>) = (s.iter().collect(), t.iter().collect());
    hidden_mse(&mut losses, &mut grad_refs, &s, &t, &tensor(&c.mask, &[c.n]), grad_scale).unwrap();
    let incs = grads.iter().map(|g| g.to_vec().unwrap().iter().zip(init).map(|(g, i)| g - i).collect()).collect();
    (losses.to_vec().unwrap(), incs)
}

#[test]
fn forward_matches_reference() {
    for (pairs, n, d, seed) in [(3, 11, 7, 1), (1, 1, 1, 2), (2, 32, 64, 3)] {
        let c = case(pairs, n, d, |i| i % 4 != 3, seed);
        let (losses, _) = run(&c, &vec![0.0; n * d], 1.0);
        let want: Vec<f64> = (0..pairs).map(|p| reference(&c.students[p], &c.teachers[p], &c.mask, d)).collect();
        assert_close(&format!("losses p={pairs} n={n} d={d}"), &losses, &want, 1e-5, 1e-7);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let c = case(3, 9, 5, |i| i != 2 && i != 7, 4);
    let mut rng = Rng::new(5);
    let init = randn(&mut rng, c.n * c.d, 1.0);
    let grad_scale = 0.6;
    let (_, grads) = run(&c, &init, grad_scale);
    for (p, (grad, (s, t))) in grads.iter().zip(c.students.iter().zip(&c.teachers)).enumerate() {
        check_grad(&format!("dstudents[{p}]"), s, grad, 1e-2, 1e-3, 1e-6, None, |s| {
            grad_scale as f64 * reference(s, t, &c.mask, c.d)
        });
        // Padded tokens get no gradient at all.
        for i in [2, 7] {
            assert!(grad[i * c.d..][..c.d].iter().all(|&g| g == 0.0));
        }
    }
}

#[test]
fn no_real_token_gives_zero_loss_and_gradient() {
    let c = case(2, 4, 3, |_| false, 6);
    let (losses, grads) = run(&c, &[0.0; 12], 1.0);
    assert_eq!(losses, vec![0.0, 0.0]);
    assert!(grads.iter().flatten().all(|&g| g == 0.0));
}

#[test]
fn forward_only_and_zero_pairs() {
    let c = case(2, 5, 3, |i| i < 3, 7);
    let shape = [5, 3];
    let s: Vec<Tensor> = c.students.iter().map(|s| tensor(s, &shape)).collect();
    let t: Vec<Tensor> = c.teachers.iter().map(|t| tensor(t, &shape)).collect();
    let mut losses = zeros(&[2]);
    hidden_mse(&mut losses, &mut [], &[&s[0], &s[1]], &[&t[0], &t[1]], &tensor(&c.mask, &[5]), 1.0).unwrap();
    let want: Vec<f64> = (0..2).map(|p| reference(&c.students[p], &c.teachers[p], &c.mask, 3)).collect();
    assert_close("forward only", &losses.to_vec().unwrap(), &want, 1e-5, 1e-7);
    let mut none = zeros(&[0]);
    hidden_mse(&mut none, &mut [], &[], &[], &tensor(&c.mask, &[5]), 1.0).unwrap();
}

#[test]
fn bad_arguments_are_errors() {
    let (a, b, mask) = (zeros(&[4, 3]), zeros(&[4, 2]), tensor(&[1.0, 1.0, 0.0, 1.0], &[4]));
    let mut losses = zeros(&[2]);
    let mut g = zeros(&[4, 3]);
    let shape_err = |r: kd_kernels::Result<()>| {
        let err = r.unwrap_err();
        assert!(matches!(err, Error::Shape { op: "hidden_mse", .. }), "{err}");
        err.to_string()
    };
    // Pair counts.
    shape_err(hidden_mse(&mut losses, &mut [], &[&a, &a], &[&a], &mask, 1.0));
    shape_err(hidden_mse(&mut losses, &mut [&mut g], &[&a, &a], &[&a, &a], &mask, 1.0));
    shape_err(hidden_mse(&mut zeros(&[3]), &mut [], &[&a, &a], &[&a, &a], &mask, 1.0));
    // Per-tensor shapes.
    assert!(shape_err(hidden_mse(&mut losses, &mut [], &[&a, &b], &[&a, &a], &mask, 1.0)).contains("students[1]"));
    assert!(shape_err(hidden_mse(&mut losses, &mut [], &[&a, &a], &[&a, &b], &mask, 1.0)).contains("teachers[1]"));
    let mut bad_g = zeros(&[4, 2]);
    let msg = shape_err(hidden_mse(&mut losses, &mut [&mut g, &mut bad_g], &[&a, &a], &[&a, &a], &mask, 1.0));
    assert!(msg.contains("dstudents[1]"), "{msg}");
    shape_err(hidden_mse(&mut losses, &mut [], &[&a, &a], &[&a, &a], &zeros(&[5]), 1.0));
    shape_err(hidden_mse(&mut losses, &mut [], &[&a, &a], &[&a, &a], &zeros(&[4, 1]), 1.0));
    // Mask values and scale.
    let half = tensor(&[1.0, 0.5, 0.0, 1.0], &[4]);
    let err = hidden_mse(&mut losses, &mut [], &[&a, &a], &[&a, &a], &half, 1.0).unwrap_err();
    assert!(err.to_string().contains("token_mask[1]"), "{err}");
    assert!(hidden_mse(&mut losses, &mut [], &[&a, &a], &[&a, &a], &mask, f32::NAN).is_err());
}
