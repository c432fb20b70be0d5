// common::check_grad takes eight arguments; the lint fires inside the shared helper module.
#![allow(clippy::too_many_arguments)]

mod common;

use common::{assert_close, check_grad, randn, tensor, zeros};
use kd_kernels::ops::gumbel::{gumbel_noise, gumbel_softmax_st_backward, gumbel_softmax_st_forward};
use kd_kernels::rng::Rng;

/// softmax((logits + g) / tau) per row in f64, with the op's own noise for element i.
fn soft_ref(logits: &[f32], v: usize, tau: f32, seed: u64) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for (r, row) in logits.chunks(v).enumerate() {
        let z: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(j, &l)| (l as f64 + gumbel_noise(seed, (r * v + j) as u64) as f64) / tau as f64)
            .collect();
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|x| (x - max).exp()).sum();
        out.extend(z.iter().map(|x| (x - max).exp() / sum));
    }
    out
}

fn forward(logits: &[f32], shape: &[usize], tau: f32, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (mut hard, mut soft) = (zeros(shape), zeros(shape));
    gumbel_softmax_st_forward(&mut hard, &mut soft, &tensor(logits, shape), tau, seed).unwrap();
    (hard.to_vec().unwrap(), soft.to_vec().unwrap())
}

#[test]
fn forward_matches_reference_and_hard_is_one_hot_at_argmax_of_soft() {
    let mut rng = Rng::new(21);
    for (n, v) in [(1, 1), (3, 7), (5, 129), (1, 2)] {
        for tau in [1.0, 0.5, 2.0] {
            let logits = randn(&mut rng, n * v, 2.0);
            let (hard, soft) = forward(&logits, &[n, v], tau, 99);
            assert_close(&format!("soft [{n},{v}] tau {tau}"), &soft, &soft_ref(&logits, v, tau, 99), 1e-5, 1e-7);
            for (h, s) in hard.chunks(v).zip(soft.chunks(v)) {
                let arg = (0..v).fold(0, |a, j| if s[j] > s[a] { j } else { a });
                let want: Vec<f32> = (0..v).map(|j| if j == arg { 1.0 } else { 0.0 }).collect();
                assert_eq!(h, &want[..], "hard row for soft {s:?}");
                assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn samples_are_seeded_and_rows_draw_independent_noise() {
    let logits = vec![0.0; 8 * 50];
    let (a, _) = forward(&logits, &[8, 50], 1.0, 1);
    let (b, _) = forward(&logits, &[8, 50], 1.0, 1);
    let (c, _) = forward(&logits, &[8, 50], 1.0, 2);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let picks: Vec<usize> = a.chunks(50).map(|r| r.iter().position(|&h| h == 1.0).unwrap()).collect();
    assert!(picks.iter().any(|&p| p != picks[0]), "equal rows drew the same sample: {picks:?}");
}

/// Gumbel-max: the argmax is distributed as softmax(logits), whatever tau.
#[test]
fn sampling_frequencies_follow_softmax_of_logits() {
    let row = [1.0f32, 0.0, -1.0, 0.5];
    let n = 20_000;
    let logits: Vec<f32> = row.iter().cycle().take(n * 4).cloned().collect();
    let z: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
    for (tau, seed) in [(1.0, 5), (0.7, 6)] {
        let (hard, _) = forward(&logits, &[n, 4], tau, seed);
        for (j, &l) in row.iter().enumerate() {
            let freq = hard.chunks(4).filter(|h| h[j] == 1.0).count() as f64 / n as f64;
            let p = (l as f64).exp() / z;
            // About four standard errors of a proportion from 20k draws.
            assert!((freq - p).abs() < 0.015, "tau {tau} class {j}: frequency {freq}, softmax {p}");
        }
    }
}

#[test]
fn noise_is_finite_standard_gumbel() {
    let draws: Vec<f64> = (0..100_000).map(|i| gumbel_noise(17, i) as f64).collect();
    assert!(draws.iter().all(|g| g.is_finite()));
    let mean = draws.iter().sum::<f64>() / draws.len() as f64;
    assert!((mean - 0.5772).abs() < 0.02, "mean {mean}, Euler-Mascheroni 0.5772");
}

#[test]
fn backward_matches_finite_differences_of_soft_with_fixed_noise() {
    let mut rng = Rng::new(23);
    for (n, v, tau) in [(3, 9, 0.5), (2, 5, 1.0), (1, 1, 2.0)] {
        let shape = [n, v];
        let logits = randn(&mut rng, n * v, 1.0);
        let dout = randn(&mut rng, n * v, 1.0);
        let (_, soft) = forward(&logits, &shape, tau, 42);
        let start = randn(&mut rng, n * v, 1.0);
        let mut dlogits = tensor(&start, &shape);
        gumbel_softmax_st_backward(&mut dlogits, &tensor(&dout, &shape), &tensor(&soft, &shape), tau).unwrap();
        let added: Vec<f32> = dlogits.to_vec().unwrap().iter().zip(&start).map(|(d, s)| d - s).collect();
        let loss = |x: &[f32]| soft_ref(x, v, tau, 42).iter().zip(&dout).map(|(s, &d)| s * d as f64).sum::<f64>();
        check_grad(&format!("dlogits [{n},{v}] tau {tau}"), &logits, &added, 1e-3, 1e-3, 1e-5, None, loss);
    }
}

#[test]
fn bad_arguments_are_errors() {
    let logits = tensor(&[0.0; 6], &[2, 3]);
    let (mut hard, mut soft) = (zeros(&[2, 3]), zeros(&[2, 3]));
    let err = gumbel_softmax_st_forward(&mut zeros(&[3, 2]), &mut soft, &logits, 1.0, 0).unwrap_err().to_string();
    assert!(err.contains("gumbel_softmax_st_forward") && err.contains("hard"), "{err}");
    let err = gumbel_softmax_st_forward(&mut hard, &mut zeros(&[6]), &logits, 1.0, 0).unwrap_err().to_string();
    assert!(err.contains("soft"), "{err}");
    for tau in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let err = gumbel_softmax_st_forward(&mut hard, &mut soft, &logits, tau, 0).unwrap_err().to_string();
        assert!(err.contains("tau"), "{err}");
        let err = gumbel_softmax_st_backward(&mut zeros(&[2, 3]), &logits, &soft, tau).unwrap_err().to_string();
        assert!(err.contains("tau"), "{err}");
    }
    let err = gumbel_softmax_st_backward(&mut zeros(&[2, 3]), &zeros(&[2, 2]), &soft, 1.0).unwrap_err().to_string();
    assert!(err.contains("gumbel_softmax_st_backward") && err.contains("dout"), "{err}");
    let err = gumbel_softmax_st_backward(&mut zeros(&[3]), &logits, &soft, 1.0).unwrap_err().to_string();
    assert!(err.contains("dlogits"), "{err}");
}
