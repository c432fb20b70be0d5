//! Fused softmax-KL against a float64 two-pass reference and finite differences.
mod common;

use common::*;
use kd_kernels::ops::softmax_kl::{softmax_kl, KlForm, SoftmaxKl};
use kd_kernels::rng::Rng;
use kd_kernels::{Error, Tensor};
use proptest::prelude::*;

/// `log softmax(z / T)` in float64, through log-sum-exp.
fn log_softmax(z: &[f32], t: f64) -> Vec<f64> {
    let a: Vec<f64> = z.iter().map(|&z| z as f64 / t).collect();
    let max = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + a.iter().map(|a| (a - max).exp()).sum::<f64>().ln();
    a.iter().map(|a| a - lse).collect()
}

/// Per-row `w * T^2 * D(p_t || p_s)` in float64 (`0 log 0 = 0`).
fn reference(zs: &[f32], zt: &[f32], c: usize, w: Option<&[f32]>, t: f32, form: KlForm) -> Vec<f64> {
    let t64 = t as f64;
    zs.chunks(c)
        .zip(zt.chunks(c))
        .enumerate()
        .map(|(r, (s, tt))| {
            let w = w.map_or(1.0, |w| w[r] as f64);
            if w == 0.0 {
                return 0.0;
            }
            let (ls, lt) = (log_softmax(s, t64), log_softmax(tt, t64));
            let d: f64 = ls
                .iter()
                .zip(&lt)
                .filter(|(_, &lt)| lt.exp() > 0.0)
                .map(|(&ls, &lt)| match form {
                    KlForm::Kl => lt.exp() * (lt - ls),
                    KlForm::CrossEntropy => -lt.exp() * ls,
                })
                .sum();
            w * t64 * t64 * d
        })
        .collect()
}

struct Out {
    loss: Vec<f32>,
    ds: Vec<f32>,
    dt: Vec<f32>,
}

/// Runs the op with gradients that start at `init` and returns the increments.
fn run(zs: &[f32], zt: &[f32], shape: &[usize], w: Option<&[f32]>, spec: SoftmaxKl, init: &[f32]) -> Out {
    let rows = zs.len() / shape.last().unwrap();
    let mut loss = tensor(&vec![f32::NAN; rows], &[rows]);
    let (mut ds, mut dt) = (tensor(init, shape), tensor(init, shape));
    let w = w.map(|w| tensor(w, &[rows]));
    softmax_kl(&mut loss, Some(&mut ds), Some(&mut dt), &tensor(zs, shape), &tensor(zt, shape), w.as_ref(), spec)
        .unwrap();
    let minus_init = |g: Tensor| g.to_vec().unwrap().iter().zip(init).map(|(g, i)| g - i).collect();
    Out { loss: loss.to_vec().unwrap(), ds: minus_init(ds), dt: minus_init(dt) }
}

fn spec(temperature: f32, form: KlForm) -> SoftmaxKl {
    SoftmaxKl { temperature, form, grad_scale: 1.0 }
}

/// Random student and teacher rows; entries where `masked(r, c)` are `fill` in both.
fn rows(
    rng: &mut Rng,
    r: usize,
    c: usize,
    scale: f64,
    masked: impl Fn(usize, usize) -> bool,
    fill: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut zs = randn(rng, r * c, scale);
    let mut zt = randn(rng, r * c, scale);
    for i in 0..r * c {
        if masked(i / c, i % c) {
            zs[i] = fill;
            zt[i] = fill;
        }
    }
    (zs, zt)
}

#[test]
fn forward_matches_reference() {
    let mut rng = Rng::new(1);
    for &(r, c) in &[(5, 1), (4, 2), (6, 7), (3, 30_522)] {
        let (zs, zt) = rows(&mut rng, r, c, 3.0, |r, c| r % 2 == 1 && c % 3 == 1, f32::MIN);
        let w: Vec<f32> = (0..r).map(|i| if i == 2 { 0.0 } else { 0.5 + i as f32 }).collect();
        for form in [KlForm::Kl, KlForm::CrossEntropy] {
            for t in [0.5, 1.0, 2.0, 4.0] {
                let got = run(&zs, &zt, &[r, c], Some(&w), spec(t, form), &vec![0.0; r * c]);
                let want = reference(&zs, &zt, c, Some(&w), t, form);
                assert_close(&format!("loss r={r} c={c} {form:?} T={t}"), &got.loss, &want, 1e-4, 1e-5);
            }
        }
    }
}

#[test]
fn rows_may_have_any_leading_shape() {
    let mut rng = Rng::new(2);
    let (zs, zt) = rows(&mut rng, 2 * 3 * 4, 4, 1.0, |_, _| false, 0.0);
    let got = run(&zs, &zt, &[2, 3, 4, 4], None, spec(1.0, KlForm::Kl), &vec![0.0; zs.len()]);
    assert_close("loss", &got.loss, &reference(&zs, &zt, 4, None, 1.0, KlForm::Kl), 1e-4, 1e-6);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn forward_matches_reference_on_random_rows(
        r in 1usize..5, c in 1usize..40, t in 0.25f32..5.0, ce in any::<bool>(), scale in 0.1f64..20.0, seed in 0u64..1000,
    ) {
        let mut rng = Rng::new(seed);
        let (zs, zt) = rows(&mut rng, r, c, scale, |_, _| false, 0.0);
        let form = if ce { KlForm::CrossEntropy } else { KlForm::Kl };
        let got = run(&zs, &zt, &[r, c], None, spec(t, form), &vec![0.0; r * c]);
        assert_close("loss", &got.loss, &reference(&zs, &zt, c, None, t, form), 1e-4, 1e-5);
    }
}

/// Checks dstudent and dteacher (accumulated onto a random start) against finite differences
/// of the float64 loss sum, for both forms.
fn check_grads(r: usize, c: usize, t: f32, masked: impl Fn(usize, usize) -> bool + Copy, seed: u64) {
    let mut rng = Rng::new(seed);
    let (zs, zt) = rows(&mut rng, r, c, 2.0, masked, f32::MIN);
    let w: Vec<f32> = (0..r).map(|i| 0.25 + 0.5 * i as f32).collect();
    let init = randn(&mut rng, r * c, 1.0);
    // Finite differences cannot move f32::MIN; masked entries are checked to be exactly 0 below.
    let at: Vec<usize> = probe_indices(&mut rng, r * c, 16).into_iter().filter(|&i| !masked(i / c, i % c)).collect();
    for form in [KlForm::Kl, KlForm::CrossEntropy] {
        let grad_scale = 0.7;
        let got = run(&zs, &zt, &[r, c], Some(&w), SoftmaxKl { temperature: t, form, grad_scale }, &init);
        let what = format!("r={r} c={c} T={t} {form:?}");
        let max_grad = got.ds.iter().chain(&got.dt).fold(0.0f32, |m, g| m.max(g.abs())) as f64;
        let (h, rtol, atol) = (1e-3, 2e-3, 1e-4 * max_grad.max(1e-3));
        let total =
            |zs: &[f32], zt: &[f32]| grad_scale as f64 * reference(zs, zt, c, Some(&w), t, form).iter().sum::<f64>();
        check_grad(&format!("dstudent {what}"), &zs, &got.ds, h, rtol, atol, Some(&at), |zs| total(zs, &zt));
        check_grad(&format!("dteacher {what}"), &zt, &got.dt, h, rtol, atol, Some(&at), |zt| total(&zs, zt));
        for i in (0..r * c).filter(|&i| masked(i / c, i % c)) {
            assert_eq!((got.ds[i], got.dt[i]), (0.0, 0.0), "{what}: masked entry {i}");
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    check_grads(1, 1, 1.0, |_, _| false, 10);
    check_grads(3, 2, 2.0, |_, _| false, 11);
    check_grads(4, 7, 0.5, |r, c| r == 1 && c < 3, 12);
    check_grads(3, 7, 3.0, |r, c| r != 0 && c % 2 == 0, 13);
    check_grads(2, 30_522, 2.0, |r, c| r == 1 && c > 30_000, 14);
}

/// Masked entries (f32::MIN or -inf in both rows, in any position, at any temperature) leave
/// the loss of the remaining entries unchanged and get exactly zero gradient.
#[test]
fn masked_entries_contribute_nothing() {
    let mut rng = Rng::new(20);
    let c = 9;
    let (zs, zt) = rows(&mut rng, 1, c, 2.0, |_, _| false, 0.0);
    let real = [1usize, 4, 5, 7];
    for fill in [f32::MIN, f32::NEG_INFINITY] {
        let (ms, mt): (Vec<f32>, Vec<f32>) =
            (0..c).map(|i| if real.contains(&i) { (zs[i], zt[i]) } else { (fill, fill) }).unzip();
        let (rs, rt): (Vec<f32>, Vec<f32>) = real.iter().map(|&i| (zs[i], zt[i])).unzip();
        for form in [KlForm::Kl, KlForm::CrossEntropy] {
            for t in [0.3, 1.0, 2.5] {
                let masked = run(&ms, &mt, &[1, c], None, spec(t, form), &vec![0.0; c]);
                let compact = run(&rs, &rt, &[1, real.len()], None, spec(t, form), &vec![0.0; real.len()]);
                let what = format!("fill={fill} {form:?} T={t}");
                assert!((masked.loss[0] - compact.loss[0]).abs() <= 1e-5 * compact.loss[0].abs().max(1.0), "{what}");
                for i in 0..c {
                    match real.iter().position(|&k| k == i) {
                        Some(k) => {
                            assert!((masked.ds[i] - compact.ds[k]).abs() < 1e-6, "{what}: ds[{i}]");
                            assert!((masked.dt[i] - compact.dt[k]).abs() < 1e-6, "{what}: dt[{i}]");
                        }
                        None => assert_eq!((masked.ds[i], masked.dt[i]), (0.0, 0.0), "{what}: masked {i}"),
                    }
                }
            }
        }
    }
}

/// A row whose every entry is f32::MIN (a padded query's attention row) is uniform in both
/// rows, as HF's masked softmax is: KL 0, cross-entropy T^2 ln C, zero gradients.
#[test]
fn fully_masked_row_is_uniform() {
    let c = 6;
    let zs = vec![f32::MIN; c];
    for t in [0.5, 1.0, 2.0] {
        let kl = run(&zs, &zs, &[1, c], None, spec(t, KlForm::Kl), &vec![0.0; c]);
        assert_eq!(kl.loss[0], 0.0);
        let ce = run(&zs, &zs, &[1, c], None, spec(t, KlForm::CrossEntropy), &vec![0.0; c]);
        assert!((ce.loss[0] - t * t * (c as f32).ln()).abs() < 1e-5, "T={t}: {}", ce.loss[0]);
        for g in kl.ds.iter().chain(&kl.dt).chain(&ce.ds).chain(&ce.dt) {
            assert!(g.abs() < 1e-7, "T={t}: {g}");
        }
    }
}

#[test]
fn extreme_logits_stay_finite_and_match_reference() {
    let zs = [1e4, -1e4, 80.0, -80.0, 0.0, 3e4, -3e4];
    let zt = [-1e4, 1e4, 85.0, -90.0, 1.0, 3e4, 2e4];
    for form in [KlForm::Kl, KlForm::CrossEntropy] {
        for t in [1.0, 4.0] {
            let got = run(&zs, &zt, &[1, 7], None, spec(t, form), &[0.0; 7]);
            assert!(got.loss[0].is_finite() && got.ds.iter().chain(&got.dt).all(|g| g.is_finite()));
            assert_close(&format!("{form:?} T={t}"), &got.loss, &reference(&zs, &zt, 7, None, t, form), 1e-5, 1e-3);
        }
    }
    let same = run(&zs, &zs, &[1, 7], None, spec(1.0, KlForm::Kl), &[0.0; 7]);
    assert!(same.loss[0].abs() < 1e-6 && same.ds.iter().chain(&same.dt).all(|g| g.abs() < 1e-6));
}

#[test]
fn zero_weight_rows_give_zero_and_no_gradient() {
    // The second row is degenerate (all -inf student): a weight of 0 must still give 0.
    let zs = [0.5, -1.0, 2.0, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY];
    let zt = [1.0, 0.0, -1.0, 0.3, 0.2, 0.1];
    let got = run(&zs, &zt, &[2, 3], Some(&[1.0, 0.0]), spec(2.0, KlForm::Kl), &[0.0; 6]);
    assert_eq!(got.loss[1], 0.0);
    assert!(got.loss[0] > 0.0);
    assert_eq!(&got.ds[3..], &[0.0; 3]);
    assert_eq!(&got.dt[3..], &[0.0; 3]);
}

#[test]
fn forward_only_overwrites_the_loss() {
    let mut loss = tensor(&[7.0, 7.0], &[2]);
    let z = tensor(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    softmax_kl(&mut loss, None, None, &z, &z, None, spec(1.0, KlForm::Kl)).unwrap();
    assert!(loss.to_vec().unwrap().iter().all(|l| l.abs() < 1e-7));
}

#[test]
fn bad_arguments_are_errors() {
    let z = zeros(&[3, 4]);
    let call =
        |loss: &[usize], s: &[usize], t: &[usize], ds: Option<&[usize]>, w: Option<&[usize]>, spec: SoftmaxKl| {
            let mut loss = zeros(loss);
            let mut ds = ds.map(zeros);
            let w = w.map(zeros);
            softmax_kl(&mut loss, ds.as_mut(), None, &zeros(s), &zeros(t), w.as_ref(), spec)
        };
    let ok = spec(1.0, KlForm::Kl);
    assert!(call(&[3], &[3, 4], &[3, 4], Some(&[3, 4]), Some(&[3]), ok).is_ok());
    let shape_errors = [
        call(&[3], &[3, 4], &[3, 5], None, None, ok),
        call(&[4], &[3, 4], &[3, 4], None, None, ok),
        call(&[3], &[3, 4], &[3, 4], Some(&[4, 3]), None, ok),
        call(&[3], &[3, 4], &[3, 4], None, Some(&[4]), ok),
        call(&[3], &[3, 0], &[3, 0], None, None, ok),
        call(&[1], &[], &[], None, None, ok),
    ];
    for err in shape_errors {
        let err = err.unwrap_err();
        assert!(matches!(err, Error::Shape { op: "softmax_kl", .. }), "{err}");
    }
    for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let err = call(&[3], &[3, 4], &[3, 4], None, None, spec(t, KlForm::Kl)).unwrap_err();
        assert!(err.to_string().contains("temperature"), "{err}");
    }
    let mut loss = zeros(&[3]);
    let bad_scale = SoftmaxKl { grad_scale: f32::NAN, ..ok };
    assert!(softmax_kl(&mut loss, None, None, &z, &z, None, bad_scale).is_err());
}
