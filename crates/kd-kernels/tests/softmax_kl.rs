//! Fused softmax-KL against a float64 two-pass reference and finite differences.
mod common;

use common::*;
use half::bf16;
use kd_kernels::ops::softmax_kl::{softmax_kl, KlForm, KlLogits, SoftmaxKl};
use kd_kernels::rng::Rng;
use kd_kernels::{Bf16Tensor, Error, Tensor};
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
    run_as(zs, zt, shape, w, spec, init, |t| t)
}

/// `run` on the logits in bf16, rounded from `zs` and `zt`.
fn run_bf16(zs: &[f32], zt: &[f32], shape: &[usize], w: Option<&[f32]>, spec: SoftmaxKl, init: &[f32]) -> Out {
    run_as(zs, zt, shape, w, spec, init, |t| Bf16Tensor::from_f32(&t).unwrap())
}

/// `run` with the logits turned into the type `logits` makes of them.
fn run_as<L: KlLogits>(
    zs: &[f32],
    zt: &[f32],
    shape: &[usize],
    w: Option<&[f32]>,
    spec: SoftmaxKl,
    init: &[f32],
    logits: impl Fn(Tensor) -> L,
) -> Out {
    let rows = zs.len() / shape.last().unwrap();
    let mut loss = tensor(&vec![f32::NAN; rows], &[rows]);
    let (mut ds, mut dt) = (tensor(init, shape), tensor(init, shape));
    let w = w.map(|w| tensor(w, &[rows]));
    let (s, t) = (logits(tensor(zs, shape)), logits(tensor(zt, shape)));
    softmax_kl(&mut loss, Some(&mut ds), Some(&mut dt), &s, &t, w.as_ref(), spec).unwrap();
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

/// The values bf16 holds of `x`, as f32.
fn bf16_rounded(x: &[f32]) -> Vec<f32> {
    Bf16Tensor::from_f32(&tensor(x, &[x.len()])).unwrap().to_f32().unwrap().to_vec().unwrap()
}

#[test]
fn bf16_tensor_rounds_to_nearest_even_and_widens_exactly() {
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1; 1 + 3 * 2^-8 is halfway
    // between 1 + 2^-7 and 1 + 2^-6 and goes up to the even one; just past a tie rounds up.
    let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-8) + 2f32.powi(-20), -2.5, 0.0];
    let want = [1.0, 1.0 + 2f32.powi(-6), 1.0 + 2f32.powi(-7), -2.5, 0.0];
    assert_eq!(bf16_rounded(&x), want);
    let specials = bf16_rounded(&[f32::MIN, f32::MAX, f32::INFINITY, f32::NAN, bf16::MIN.to_f32(), -0.0]);
    assert_eq!(specials[..3], [f32::NEG_INFINITY, f32::INFINITY, f32::INFINITY]);
    assert!(specials[3].is_nan());
    assert_eq!(specials[4], bf16::MIN.to_f32());
    assert!(specials[5] == 0.0 && specials[5].is_sign_negative());
    let b = Bf16Tensor::from_f32(&tensor(&[0.5, 1.5, -3.0, 7.0, 0.25, 9.0], &[2, 3])).unwrap();
    assert_eq!(b.shape(), &[2, 3]);
    assert!(b.device().is_cpu());
    assert_eq!(b.cpu().unwrap()[2], bf16::from_f32(-3.0));
    assert_eq!(b.to_f32().unwrap().to_vec().unwrap(), [0.5, 1.5, -3.0, 7.0, 0.25, 9.0]);
}

/// Random rows with masked entries (f32::MIN, which bf16 rounds to -inf) and row weights.
fn bf16_case(rng: &mut Rng, r: usize, c: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (zs, zt) = rows(rng, r, c, 2.0, |r, c| r % 2 == 1 && c % 3 == 1, f32::MIN);
    let w: Vec<f32> = (0..r).map(|i| if i == 2 { 0.0 } else { 0.5 + i as f32 }).collect();
    (zs, zt, w, randn(rng, r * c, 1.0))
}

/// The bf16 path is the f32 path on the rounded values: the same scan, each value widened
/// exactly, so every output is equal bit for bit.
#[test]
fn bf16_logits_match_f32_on_the_rounded_values() {
    let mut rng = Rng::new(40);
    for &(r, c) in &[(5, 1), (4, 2), (6, 7), (3, 30_522)] {
        let (zs, zt, w, init) = bf16_case(&mut rng, r, c);
        for form in [KlForm::Kl, KlForm::CrossEntropy] {
            for t in [0.5, 2.0] {
                let spec = SoftmaxKl { temperature: t, form, grad_scale: 0.7 };
                let got = run_bf16(&zs, &zt, &[r, c], Some(&w), spec, &init);
                let want = run(&bf16_rounded(&zs), &bf16_rounded(&zt), &[r, c], Some(&w), spec, &init);
                let what = format!("r={r} c={c} {form:?} T={t}");
                assert_eq!(got.loss, want.loss, "loss {what}");
                assert_eq!(got.ds, want.ds, "dstudent {what}");
                assert_eq!(got.dt, want.dt, "dteacher {what}");
            }
        }
    }
}

/// Against f32 logits the only difference is bf16's rounding of the logits (8 significant
/// bits): `|bf16 - f32| <= 1e-2 (|f32| + max |f32|)` for the loss at any of these temperatures
/// (measured: up to 2.1e-3) and for both gradients at T >= 2 (up to 8.1e-3). At T = 1 the
/// gradients get 2e-2 (measured: up to 1.4e-2 on the 30,522-wide rows): a logit near 9 (the
/// largest of 30,522 draws at scale 2) is rounded by up to 9 * 2^-9, which moves its
/// probability, the gradient's largest entry, by up to 1.8% / T.
#[test]
fn bf16_logits_are_within_1e_2_of_f32() {
    let mut rng = Rng::new(41);
    for &(r, c) in &[(5, 1), (4, 2), (6, 7), (3, 30_522)] {
        let (zs, zt, w, init) = bf16_case(&mut rng, r, c);
        for form in [KlForm::Kl, KlForm::CrossEntropy] {
            for t in [1.0, 2.0, 4.0] {
                let spec = SoftmaxKl { temperature: t, form, grad_scale: 0.7 };
                let got = run_bf16(&zs, &zt, &[r, c], Some(&w), spec, &init);
                let want = run(&zs, &zt, &[r, c], Some(&w), spec, &init);
                for (name, g, f) in
                    [("loss", &got.loss, &want.loss), ("dstudent", &got.ds, &want.ds), ("dteacher", &got.dt, &want.dt)]
                {
                    let scale = f.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    let tol = if name == "loss" || t >= 2.0 { 1e-2 } else { 2e-2 };
                    for (i, (g, f)) in g.iter().zip(f.iter()).enumerate() {
                        let what = format!("{name}[{i}] r={r} c={c} {form:?} T={t}");
                        assert!((g - f).abs() <= tol * (f.abs() + scale), "{what}: bf16 {g}, f32 {f}");
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_teacher_of_another_shape_is_an_error() {
    let (a, b) = (zeros(&[2, 3]), zeros(&[3, 2]));
    let (a, b) = (Bf16Tensor::from_f32(&a).unwrap(), Bf16Tensor::from_f32(&b).unwrap());
    let mut loss = zeros(&[2]);
    let err = softmax_kl(&mut loss, None, None, &a, &b, None, spec(1.0, KlForm::Kl)).unwrap_err();
    assert!(matches!(err, Error::Shape { op: "softmax_kl", .. }), "{err}");
    assert!(softmax_kl(&mut loss, None, None, &a, &a, None, spec(1.0, KlForm::Kl)).is_ok());
}
