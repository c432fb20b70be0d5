// common::check_grad takes eight arguments; the lint fires inside the shared helper module.
#![allow(clippy::too_many_arguments)]

mod common;

use common::{randn, tensor};
use kd_kernels::ops::grad_norm::{clip_grad_norm, global_grad_norm};
use kd_kernels::rng::Rng;
use kd_kernels::Tensor;

/// Odd shapes, one of them larger than a partial-sum chunk.
fn grads(rng: &mut Rng, scale: f64) -> Vec<Tensor> {
    [vec![3, 5], vec![1], vec![40_001], vec![2, 3, 7]]
        .iter()
        .map(|s| tensor(&randn(rng, s.iter().product(), scale), s))
        .collect()
}

fn norm_f64(grads: &[Tensor]) -> f64 {
    grads.iter().flat_map(|g| g.to_vec().unwrap()).map(|x| x as f64 * x as f64).sum::<f64>().sqrt()
}

fn refs(grads: &[Tensor]) -> Vec<&Tensor> {
    grads.iter().collect()
}

#[test]
fn norm_matches_f64_reference() {
    let mut rng = Rng::new(5);
    let g = grads(&mut rng, 0.3);
    let got = global_grad_norm(&refs(&g)).unwrap() as f64;
    let want = norm_f64(&g);
    assert!((got - want).abs() <= 1e-7 * want, "got {got}, want {want}");
    assert_eq!(global_grad_norm(&[]).unwrap(), 0.0);
    assert_eq!(global_grad_norm(&[&tensor(&[3.0, -4.0], &[2])]).unwrap(), 5.0);
}

#[test]
fn norm_is_bitwise_deterministic_across_thread_counts() {
    let mut rng = Rng::new(6);
    let g = grads(&mut rng, 1.0);
    let default = global_grad_norm(&refs(&g)).unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let single = pool.install(|| global_grad_norm(&refs(&g)).unwrap());
    assert_eq!(default.to_bits(), single.to_bits());
    assert_eq!(default.to_bits(), global_grad_norm(&refs(&g)).unwrap().to_bits());
}

#[test]
fn clipping_scales_to_max_norm_and_returns_the_norm_before() {
    let mut rng = Rng::new(7);
    let mut g = grads(&mut rng, 1.0);
    let before: Vec<Vec<f32>> = g.iter().map(|t| t.to_vec().unwrap()).collect();
    let norm = norm_f64(&g);
    let max_norm = 2.5f32;
    let mut views: Vec<&mut Tensor> = g.iter_mut().collect();
    let returned = clip_grad_norm(&mut views, max_norm).unwrap() as f64;
    assert!((returned - norm).abs() <= 1e-7 * norm, "returned {returned}, norm {norm}");
    let coef = max_norm as f64 / (returned + 1e-6);
    for (t, b) in g.iter().zip(&before) {
        let want: Vec<f64> = b.iter().map(|&x| x as f64 * coef).collect();
        common::assert_close("clipped", t.cpu().unwrap(), &want, 1e-6, 1e-12);
    }
    let after = norm_f64(&g);
    assert!((after - max_norm as f64).abs() < 1e-5, "norm after clipping {after}");
}

#[test]
fn gradients_within_max_norm_are_untouched() {
    let mut rng = Rng::new(8);
    let mut g = grads(&mut rng, 1e-3);
    let before: Vec<Vec<f32>> = g.iter().map(|t| t.to_vec().unwrap()).collect();
    let norm = norm_f64(&g);
    let mut views: Vec<&mut Tensor> = g.iter_mut().collect();
    let returned = clip_grad_norm(&mut views, 1.0).unwrap() as f64;
    assert!((returned - norm).abs() <= 1e-7 * norm);
    assert!(g.iter().zip(&before).all(|(t, b)| t.cpu().unwrap() == &b[..]));
    assert_eq!(clip_grad_norm(&mut [], 1.0).unwrap(), 0.0);
}

#[test]
fn non_finite_norm_is_returned_without_scaling() {
    for bad in [f32::NAN, f32::INFINITY] {
        let mut a = tensor(&[1.0, bad, 3.0], &[3]);
        let mut b = tensor(&[100.0; 4], &[4]);
        let returned = clip_grad_norm(&mut [&mut a, &mut b], 1.0).unwrap();
        assert!(!returned.is_finite(), "{bad}: returned {returned}");
        assert_eq!(b.to_vec().unwrap(), vec![100.0; 4]);
        assert_eq!(a.cpu().unwrap()[2], 3.0);
    }
    // Finite elements whose norm overflows f32 give an infinite norm, also left unscaled.
    let mut huge = tensor(&[3e38; 4], &[4]);
    assert_eq!(clip_grad_norm(&mut [&mut huge], 1.0).unwrap(), f32::INFINITY);
    assert_eq!(huge.to_vec().unwrap(), vec![3e38; 4]);
}

#[test]
fn bad_max_norm_is_an_error() {
    let mut a = tensor(&[1.0, 2.0], &[2]);
    for bad in [0.0, -1.0, f32::NAN] {
        let err = clip_grad_norm(&mut [&mut a], bad).unwrap_err().to_string();
        assert!(err.contains("clip_grad_norm") && err.contains("max_norm"), "{err}");
    }
    assert_eq!(a.to_vec().unwrap(), vec![1.0, 2.0]);
}
