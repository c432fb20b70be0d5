//! Cross-entropy (hard and soft targets) and regression MSE against float64 references and
//! finite differences.
mod common;

use common::*;
use kd_kernels::ops::cross_entropy::{cross_entropy, mse_loss, Targets};
use kd_kernels::rng::Rng;
use kd_kernels::{Device, Error, IdTensor, Tensor};

fn ids(labels: &[u32]) -> IdTensor {
    IdTensor::from_vec(labels.to_vec(), &[labels.len()], &Device::Cpu).unwrap()
}

/// Per-row `w * -sum_c y_c log softmax(z)_c` in float64; hard labels become one-hot rows.
fn reference(z: &[f32], y: &[f64], c: usize, w: Option<&[f32]>) -> Vec<f64> {
    z.chunks(c)
        .zip(y.chunks(c))
        .enumerate()
        .map(|(i, (z, y))| {
            let max = z.iter().map(|&z| z as f64).fold(f64::NEG_INFINITY, f64::max);
            let lse = max + z.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln();
            let nll: f64 = z.iter().zip(y).filter(|(_, &y)| y != 0.0).map(|(&z, &y)| y * (lse - z as f64)).sum();
            w.map_or(1.0, |w| w[i] as f64) * nll
        })
        .collect()
}

fn one_hot(labels: &[u32], c: usize) -> Vec<f64> {
    labels.iter().flat_map(|&y| (0..c).map(move |k| f64::from(k as u32 == y))).collect()
}

/// Soft targets: a random distribution per row.
fn soft(rng: &mut Rng, n: usize, c: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..n * c).map(|_| rng.uniform() as f32 + 0.01).collect();
    raw.chunks(c).flat_map(|r| r.iter().map(|x| x / r.iter().sum::<f32>()).collect::<Vec<_>>()).collect()
}

/// Runs cross_entropy with the gradient starting at `init`; returns the losses and the increment.
fn run(
    z: &[f32],
    n: usize,
    c: usize,
    targets: Targets,
    w: Option<&[f32]>,
    gs: f32,
    init: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut loss = tensor(&vec![f32::NAN; n], &[n]);
    let mut dz = tensor(init, &[n, c]);
    let w = w.map(|w| tensor(w, &[n]));
    cross_entropy(&mut loss, Some(&mut dz), &tensor(z, &[n, c]), targets, w.as_ref(), gs).unwrap();
    (loss.to_vec().unwrap(), dz.to_vec().unwrap().iter().zip(init).map(|(g, i)| g - i).collect())
}

#[test]
fn hard_and_soft_targets_match_reference() {
    let mut rng = Rng::new(1);
    for &(n, c) in &[(1, 1), (1, 3), (7, 2), (5, 11)] {
        let z = randn(&mut rng, n * c, 3.0);
        let labels: Vec<u32> = (0..n).map(|_| rng.below(c) as u32).collect();
        let w: Vec<f32> = (0..n).map(|i| if i == 3 { 0.0 } else { 1.0 / (i + 1) as f32 }).collect();
        let (loss, _) = run(&z, n, c, Targets::Hard(&ids(&labels)), Some(&w), 1.0, &vec![0.0; n * c]);
        assert_close(
            &format!("hard n={n} c={c}"),
            &loss,
            &reference(&z, &one_hot(&labels, c), c, Some(&w)),
            1e-5,
            1e-6,
        );
        let y = soft(&mut rng, n, c);
        let y64: Vec<f64> = y.iter().map(|&y| y as f64).collect();
        let (loss, _) = run(&z, n, c, Targets::Soft(&tensor(&y, &[n, c])), None, 1.0, &vec![0.0; n * c]);
        assert_close(&format!("soft n={n} c={c}"), &loss, &reference(&z, &y64, c, None), 1e-5, 1e-6);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(2);
    let (n, c) = (6, 5);
    let z = randn(&mut rng, n * c, 2.0);
    let w: Vec<f32> = (0..n).map(|i| 0.2 * (i + 1) as f32).collect();
    let init = randn(&mut rng, n * c, 1.0);
    let labels: Vec<u32> = (0..n).map(|_| rng.below(c) as u32).collect();
    // Soft targets that do not sum to one check the `sum(y) * softmax - y` gradient.
    let y: Vec<f32> = soft(&mut rng, n, c).iter().map(|y| y * 1.3).collect();
    let gs = 0.7;
    for (what, targets, y64) in [
        ("hard", Targets::Hard(&ids(&labels)), one_hot(&labels, c)),
        ("soft", Targets::Soft(&tensor(&y, &[n, c])), y.iter().map(|&y| y as f64).collect()),
    ] {
        let (_, dz) = run(&z, n, c, targets, Some(&w), gs, &init);
        check_grad(what, &z, &dz, 1e-3, 1e-3, 1e-5, None, |z| {
            gs as f64 * reference(z, &y64, c, Some(&w)).iter().sum::<f64>()
        });
    }
}

#[test]
fn masked_logits_and_extreme_values_stay_finite() {
    let z = [f32::MIN, 2.0, 1e4, -1e4, f32::NEG_INFINITY, 0.5];
    let (loss, dz) = run(&z, 2, 3, Targets::Hard(&ids(&[2, 2])), None, 1.0, &[0.0; 6]);
    assert!(loss.iter().chain(&dz).all(|x| x.is_finite()), "{loss:?} {dz:?}");
    assert_close("loss", &loss, &reference(&z, &one_hot(&[2, 2], 3), 3, None), 1e-5, 1e-5);
    assert_eq!((dz[0], dz[4]), (0.0, 0.0));
    // Zero target mass on the masked logits: their terms are skipped, not 0 * inf.
    let y = [0.0, 0.3, 0.7, 0.9, 0.0, 0.1];
    let (loss, dz) = run(&z, 2, 3, Targets::Soft(&tensor(&y, &[2, 3])), None, 1.0, &[0.0; 6]);
    assert!(loss.iter().chain(&dz).all(|x| x.is_finite()), "{loss:?} {dz:?}");
    let y64: Vec<f64> = y.iter().map(|&y| y as f64).collect();
    assert_close("soft loss", &loss, &reference(&z, &y64, 3, None), 1e-5, 1e-5);
    assert_eq!((dz[0], dz[4]), (0.0, 0.0));
}

#[test]
fn forward_only_and_batch_of_one() {
    let mut loss = zeros(&[1]);
    cross_entropy(&mut loss, None, &tensor(&[0.0, 0.0], &[1, 2]), Targets::Hard(&ids(&[1])), None, 1.0).unwrap();
    assert!((loss.to_vec().unwrap()[0] - 2f32.ln()).abs() < 1e-7);
}

#[test]
fn out_of_range_label_names_its_row() {
    let mut loss = zeros(&[3]);
    let err = cross_entropy(&mut loss, None, &zeros(&[3, 4]), Targets::Hard(&ids(&[0, 3, 4])), None, 1.0).unwrap_err();
    assert!(matches!(err, Error::Invalid { op: "cross_entropy", .. }), "{err}");
    assert!(err.to_string().contains("row 2"), "{err}");
}

#[test]
fn bad_shapes_are_errors() {
    let z = zeros(&[3, 4]);
    let y = ids(&[0, 1, 2]);
    let ce = |loss: &[usize], grad: Option<&[usize]>, z: &Tensor, t: Targets, w: Option<&[usize]>| {
        let mut g = grad.map(zeros);
        let w = w.map(zeros);
        cross_entropy(&mut zeros(loss), g.as_mut(), z, t, w.as_ref(), 1.0)
    };
    assert!(ce(&[3], Some(&[3, 4]), &z, Targets::Hard(&y), Some(&[3])).is_ok());
    for r in [
        ce(&[4], None, &z, Targets::Hard(&y), None),
        ce(&[3], Some(&[4, 3]), &z, Targets::Hard(&y), None),
        ce(&[3], None, &z, Targets::Hard(&y), Some(&[2])),
        ce(&[3], None, &z, Targets::Hard(&ids(&[0, 1])), None),
        ce(&[3], None, &z, Targets::Soft(&zeros(&[3, 5])), None),
        ce(&[3], None, &zeros(&[12]), Targets::Hard(&y), None),
        ce(&[3], None, &zeros(&[3, 0]), Targets::Hard(&y), None),
    ] {
        let err = r.unwrap_err();
        assert!(matches!(err, Error::Shape { op: "cross_entropy", .. }), "{err}");
    }
}

#[test]
fn mse_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(3);
    let n = 7;
    let (pred, target, init) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
    let w: Vec<f32> = (0..n).map(|i| i as f32 / 3.0).collect();
    let reference =
        |p: &[f32]| -> Vec<f64> { (0..n).map(|i| w[i] as f64 * (p[i] as f64 - target[i] as f64).powi(2)).collect() };
    for shape in [vec![n, 1], vec![n]] {
        let mut loss = zeros(&[n]);
        let mut dp = tensor(&init, &shape);
        let w_t = tensor(&w, &[n]);
        mse_loss(&mut loss, Some(&mut dp), &tensor(&pred, &shape), &tensor(&target, &[n]), Some(&w_t), 0.5).unwrap();
        assert_close("mse", &loss.to_vec().unwrap(), &reference(&pred), 1e-6, 1e-7);
        let dp: Vec<f32> = dp.to_vec().unwrap().iter().zip(&init).map(|(g, i)| g - i).collect();
        check_grad("dpred", &pred, &dp, 1e-2, 1e-4, 1e-6, None, |p| 0.5 * reference(p).iter().sum::<f64>());
    }
    let mut one = zeros(&[1]);
    mse_loss(&mut one, None, &tensor(&[2.0], &[1, 1]), &tensor(&[0.5], &[1]), None, 1.0).unwrap();
    assert_eq!(one.to_vec().unwrap(), vec![2.25]);
}

#[test]
fn mse_bad_shapes_are_errors() {
    let mse = |loss: &[usize], grad: Option<&[usize]>, pred: &[usize], target: &[usize]| {
        let mut g = grad.map(zeros);
        mse_loss(&mut zeros(loss), g.as_mut(), &zeros(pred), &zeros(target), None, 1.0)
    };
    assert!(mse(&[3], Some(&[3, 1]), &[3, 1], &[3]).is_ok());
    for r in [
        mse(&[3], None, &[3, 2], &[3]),
        mse(&[3], None, &[3], &[4]),
        mse(&[2], None, &[3], &[3]),
        mse(&[3], Some(&[3]), &[3, 1], &[3]),
    ] {
        let err = r.unwrap_err();
        assert!(matches!(err, Error::Shape { op: "mse_loss", .. }), "{err}");
    }
}
