//! Fused attention against a naive float64 HF-style reference and finite differences.
mod common;

use common::*;
use kd_kernels::ops::attention::{attention_backward, attention_forward, AttentionDropout};
use kd_kernels::rng::{uniform, Rng};
use kd_kernels::Error;
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
struct Cfg {
    b: usize,
    l: usize,
    h: usize,
    dh: usize,
}

impl Cfg {
    fn x(&self) -> [usize; 3] {
        [self.b, self.l, self.h * self.dh]
    }
    fn maps(&self) -> [usize; 4] {
        [self.b, self.h, self.l, self.l]
    }
    fn at(&self, b: usize, i: usize, h: usize, d: usize) -> usize {
        (b * self.l + i) * self.h * self.dh + h * self.dh + d
    }
    fn map_at(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        ((b * self.h + h) * self.l + i) * self.l + j
    }
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<f32>,
}

/// Random q, k, v and a mask whose example b has `real[b]` real tokens followed by padding.
fn inputs(cfg: Cfg, real: &[usize], seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    let n = cfg.b * cfg.l * cfg.h * cfg.dh;
    let mask = (0..cfg.b * cfg.l).map(|t| f32::from(t % cfg.l < real[t / cfg.l])).collect();
    Inputs { q: randn(&mut rng, n, 1.0), k: randn(&mut rng, n, 1.0), v: randn(&mut rng, n, 1.0), mask }
}

/// The dropout factor of map entry `idx`, straight from the documented rule.
fn keep(dropout: Option<AttentionDropout>, idx: usize) -> f64 {
    match dropout {
        Some(d) if uniform(d.seed, idx as u64) < d.p => 0.0,
        Some(d) => 1.0 / (1.0 - d.p as f64),
        None => 1.0,
    }
}

/// HF eager attention in float64: (out, undropped probs, masked scaled scores).
fn reference(cfg: Cfg, x: &Inputs, dropout: Option<AttentionDropout>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (cfg.dh as f64).sqrt();
    let mut out = vec![0.0; cfg.b * cfg.l * cfg.h * cfg.dh];
    let mut probs = vec![0.0; cfg.b * cfg.h * cfg.l * cfg.l];
    let mut scores = probs.clone();
    for b in 0..cfg.b {
        for h in 0..cfg.h {
            for i in 0..cfg.l {
                let row: Vec<f64> = (0..cfg.l)
                    .map(|j| {
                        let s: f64 =
                            (0..cfg.dh).map(|d| x.q[cfg.at(b, i, h, d)] as f64 * x.k[cfg.at(b, j, h, d)] as f64).sum();
                        s * scale + (1.0 - x.mask[b * cfg.l + j] as f64) * f32::MIN as f64
                    })
                    .collect();
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|s| (s - max).exp()).sum();
                for j in 0..cfg.l {
                    let p = (row[j] - max).exp() / sum;
                    scores[cfg.map_at(b, h, i, j)] = row[j];
                    probs[cfg.map_at(b, h, i, j)] = p;
                    let dropped = p * keep(dropout, cfg.map_at(b, h, i, j));
                    for d in 0..cfg.dh {
                        out[cfg.at(b, i, h, d)] += dropped * x.v[cfg.at(b, j, h, d)] as f64;
                    }
                }
            }
        }
    }
    (out, probs, scores)
}

/// The f32 op's (out, probs, scores).
fn run_forward(cfg: Cfg, x: &Inputs, dropout: Option<AttentionDropout>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut out, mut probs, mut scores) = (zeros(&cfg.x()), zeros(&cfg.maps()), zeros(&cfg.maps()));
    let t = |d: &[f32]| tensor(d, &cfg.x());
    attention_forward(
        &mut out,
        &mut probs,
        Some(&mut scores),
        &t(&x.q),
        &t(&x.k),
        &t(&x.v),
        &tensor(&x.mask, &[cfg.b, cfg.l]),
        dropout,
    )
    .unwrap();
    (out.to_vec().unwrap(), probs.to_vec().unwrap(), scores.to_vec().unwrap())
}

fn check_forward(cfg: Cfg, real: &[usize], seed: u64, dropout: Option<AttentionDropout>) {
    let x = inputs(cfg, real, seed);
    let (out, probs, scores) = run_forward(cfg, &x, dropout);
    let (want_out, want_probs, want_scores) = reference(cfg, &x, dropout);
    assert_close(&format!("out {cfg:?}"), &out, &want_out, 1e-4, 1e-5);
    assert_close(&format!("probs {cfg:?}"), &probs, &want_probs, 1e-4, 1e-6);
    assert_close(&format!("scores {cfg:?}"), &scores, &want_scores, 1e-5, 1e-5);
}

#[test]
fn forward_matches_reference() {
    check_forward(Cfg { b: 2, l: 7, h: 3, dh: 5 }, &[7, 4], 1, None);
    check_forward(Cfg { b: 1, l: 1, h: 1, dh: 1 }, &[1], 2, None);
    check_forward(Cfg { b: 3, l: 5, h: 2, dh: 8 }, &[1, 5, 3], 3, None);
    check_forward(Cfg { b: 1, l: 16, h: 4, dh: 16 }, &[13], 4, None);
}

#[test]
fn forward_with_dropout_matches_reference() {
    check_forward(Cfg { b: 2, l: 7, h: 3, dh: 5 }, &[7, 4], 1, Some(AttentionDropout { p: 0.1, seed: 5 }));
    check_forward(Cfg { b: 1, l: 1, h: 1, dh: 1 }, &[1], 2, Some(AttentionDropout { p: 0.5, seed: 6 }));
    check_forward(Cfg { b: 3, l: 5, h: 2, dh: 8 }, &[1, 5, 3], 3, Some(AttentionDropout { p: 0.3, seed: 7 }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn forward_matches_reference_on_random_shapes(
        b in 1usize..4, l in 1usize..9, h in 1usize..4, dh in 1usize..7, seed in 0u64..1000,
    ) {
        let real: Vec<usize> = (0..b).map(|i| 1 + (seed as usize + i) % l).collect();
        let dropout = (seed % 2 == 1).then_some(AttentionDropout { p: 0.25, seed });
        check_forward(Cfg { b, l, h, dh }, &real, seed, dropout);
    }
}

#[test]
fn padded_keys_get_zero_probability_and_scores_near_f32_min() {
    let cfg = Cfg { b: 1, l: 6, h: 2, dh: 4 };
    let x = inputs(cfg, &[4], 5);
    let (_, probs, scores) = run_forward(cfg, &x, None);
    for h in 0..cfg.h {
        for i in 0..cfg.l {
            let row = &probs[cfg.map_at(0, h, i, 0)..][..cfg.l];
            assert!(row[4..].iter().all(|&p| p == 0.0), "padded keys of row {i}: {row:?}");
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            let s = &scores[cfg.map_at(0, h, i, 0)..][..cfg.l];
            assert!(s[4..].iter().all(|&s| s.is_finite() && s < f32::MIN / 2.0), "{s:?}");
        }
    }
}

#[test]
fn fully_padded_example_is_uniform_like_hf() {
    let cfg = Cfg { b: 2, l: 5, h: 2, dh: 3 };
    let x = inputs(cfg, &[3, 0], 6);
    let (out, probs, _) = run_forward(cfg, &x, None);
    let second = cfg.map_at(1, 0, 0, 0);
    assert!(probs[second..].iter().all(|&p| (p - 0.2).abs() < 1e-7), "{:?}", &probs[second..]);
    for (i, h, d) in (0..cfg.l).flat_map(|i| (0..cfg.h).flat_map(move |h| (0..cfg.dh).map(move |d| (i, h, d)))) {
        let mean = (0..cfg.l).map(|j| x.v[cfg.at(1, j, h, d)] as f64).sum::<f64>() / cfg.l as f64;
        assert!((out[cfg.at(1, i, h, d)] as f64 - mean).abs() < 1e-5);
    }
}

/// `sum G * out + sum E * (q . k / sqrt(Dh))` in float64: the scalar whose gradient the
/// backward computes for dout = G and dscores_extra = E (the mask offset is a constant).
fn objective(cfg: Cfg, x: &Inputs, g: &[f32], e: &[f32], dropout: Option<AttentionDropout>) -> f64 {
    let (out, _, _) = reference(cfg, x, dropout);
    let through_out: f64 = out.iter().zip(g).map(|(o, &g)| o * g as f64).sum();
    through_out + e.iter().enumerate().map(|(idx, &e)| e as f64 * unmasked_score(cfg, x, idx)).sum::<f64>()
}

/// `q_i . k_j / sqrt(Dh)` for the map entry `idx` of `[B, H, L, L]`.
fn unmasked_score(cfg: Cfg, x: &Inputs, idx: usize) -> f64 {
    let (j, i, h, b) = (idx % cfg.l, idx / cfg.l % cfg.l, idx / (cfg.l * cfg.l) % cfg.h, idx / (cfg.h * cfg.l * cfg.l));
    let s: f64 = (0..cfg.dh).map(|d| x.q[cfg.at(b, i, h, d)] as f64 * x.k[cfg.at(b, j, h, d)] as f64).sum();
    s / (cfg.dh as f64).sqrt()
}

/// Runs the backward with dout = G, dscores_extra = E, into gradients that start at `init`
/// (to check accumulation), and returns (dq, dk, dv) minus `init`.
fn run_backward(
    cfg: Cfg,
    x: &Inputs,
    g: &[f32],
    e: Option<&[f32]>,
    init: &[f32],
    dropout: Option<AttentionDropout>,
) -> [Vec<f32>; 3] {
    let (_, probs, _) = run_forward(cfg, x, dropout);
    let t = |d: &[f32]| tensor(d, &cfg.x());
    let (mut dq, mut dk, mut dv) = (t(init), t(init), t(init));
    let extra = e.map(|e| tensor(e, &cfg.maps()));
    attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &t(g),
        &t(&x.q),
        &t(&x.k),
        &t(&x.v),
        &tensor(&probs, &cfg.maps()),
        extra.as_ref(),
        dropout,
    )
    .unwrap();
    [dq, dk, dv].map(|d| d.to_vec().unwrap().iter().zip(init).map(|(d, i)| d - i).collect())
}

fn check_backward(cfg: Cfg, real: &[usize], with_extra: bool, seed: u64, dropout: Option<AttentionDropout>) {
    let mut rng = Rng::new(seed + 100);
    let x = inputs(cfg, real, seed);
    let g = randn(&mut rng, x.q.len(), 1.0);
    let e = if with_extra {
        randn(&mut rng, cfg.b * cfg.h * cfg.l * cfg.l, 1.0)
    } else {
        vec![0.0; cfg.maps().iter().product()]
    };
    let init = randn(&mut rng, x.q.len(), 1.0);
    let [dq, dk, dv] = run_backward(cfg, &x, &g, with_extra.then_some(&e[..]), &init, dropout);
    let at = probe_indices(&mut rng, x.q.len(), 24);
    let what = format!("{cfg:?} extra={with_extra} {dropout:?}");
    let (rtol, atol, h) = (2e-3, 2e-4, 1e-3);
    check_grad(&format!("dq {what}"), &x.q, &dq, h, rtol, atol, Some(&at), |q| {
        objective(cfg, &Inputs { q: q.to_vec(), k: x.k.clone(), v: x.v.clone(), mask: x.mask.clone() }, &g, &e, dropout)
    });
    check_grad(&format!("dk {what}"), &x.k, &dk, h, rtol, atol, Some(&at), |k| {
        objective(cfg, &Inputs { q: x.q.clone(), k: k.to_vec(), v: x.v.clone(), mask: x.mask.clone() }, &g, &e, dropout)
    });
    check_grad(&format!("dv {what}"), &x.v, &dv, h, rtol, atol, Some(&at), |v| {
        objective(cfg, &Inputs { q: x.q.clone(), k: x.k.clone(), v: v.to_vec(), mask: x.mask.clone() }, &g, &e, dropout)
    });
}

#[test]
fn backward_matches_finite_differences() {
    check_backward(Cfg { b: 2, l: 6, h: 3, dh: 4 }, &[6, 3], false, 10, None);
    check_backward(Cfg { b: 2, l: 6, h: 3, dh: 4 }, &[6, 3], true, 11, None);
    check_backward(Cfg { b: 1, l: 1, h: 2, dh: 3 }, &[1], true, 12, None);
    check_backward(Cfg { b: 1, l: 9, h: 1, dh: 7 }, &[5], true, 13, None);
}

/// The mask is a constant of (seed, index), so the dropped attention is as smooth as the plain
/// one and finite differences of the float64 reference with the same mask apply.
#[test]
fn backward_with_dropout_matches_finite_differences() {
    let dropout = |p, seed| Some(AttentionDropout { p, seed });
    check_backward(Cfg { b: 2, l: 6, h: 3, dh: 4 }, &[6, 3], false, 30, dropout(0.3, 1));
    check_backward(Cfg { b: 2, l: 6, h: 3, dh: 4 }, &[6, 3], true, 31, dropout(0.1, 2));
    check_backward(Cfg { b: 1, l: 9, h: 2, dh: 5 }, &[5], true, 32, dropout(0.5, 3));
}

/// `p = 0` must take the no-dropout path exactly, whatever the seed.
#[test]
fn zero_dropout_is_bit_identical_to_none() {
    let cfg = Cfg { b: 2, l: 7, h: 3, dh: 5 };
    let x = inputs(cfg, &[7, 4], 40);
    let zero = Some(AttentionDropout { p: 0.0, seed: 99 });
    assert_eq!(run_forward(cfg, &x, zero), run_forward(cfg, &x, None));
    let mut rng = Rng::new(41);
    let g = randn(&mut rng, x.q.len(), 1.0);
    let e = randn(&mut rng, cfg.maps().iter().product(), 1.0);
    let init = randn(&mut rng, x.q.len(), 1.0);
    assert_eq!(run_backward(cfg, &x, &g, Some(&e), &init, zero), run_backward(cfg, &x, &g, Some(&e), &init, None));
}

/// With v_j = e_j (Dh = L, one head's values the identity) the output row i is the dropped
/// probability row i itself, which exposes the mask: about a fraction p of the entries is zero,
/// exactly those the counter rng picks, and the rest are scaled by 1 / (1 - p).
#[test]
fn dropout_drops_a_fraction_p_of_the_map_and_rescales_the_rest() {
    let cfg = Cfg { b: 2, l: 32, h: 4, dh: 32 };
    let mut x = inputs(cfg, &[32, 32], 50);
    for (b, j, h, d) in (0..cfg.b).flat_map(|b| {
        (0..cfg.l).flat_map(move |j| (0..cfg.h).flat_map(move |h| (0..cfg.dh).map(move |d| (b, j, h, d))))
    }) {
        x.v[cfg.at(b, j, h, d)] = f32::from(j == d);
    }
    for (p, seed) in [(0.1f32, 7u64), (0.5, 8)] {
        let dropout = Some(AttentionDropout { p, seed });
        let (out, probs, _) = run_forward(cfg, &x, dropout);
        let mut dropped = 0;
        for (b, h, i, j) in (0..cfg.b).flat_map(|b| {
            (0..cfg.h).flat_map(move |h| (0..cfg.l).flat_map(move |i| (0..cfg.l).map(move |j| (b, h, i, j))))
        }) {
            let (got, prob) = (out[cfg.at(b, i, h, j)], probs[cfg.map_at(b, h, i, j)]);
            assert!(prob > 0.0, "no padding here, every probability is positive");
            if uniform(seed, cfg.map_at(b, h, i, j) as u64) < p {
                assert_eq!(got, 0.0, "({b}, {h}, {i}, {j}) should be dropped");
                dropped += 1;
            } else {
                let want = prob / (1.0 - p);
                assert!((got - want).abs() <= 1e-6 * want, "({b}, {h}, {i}, {j}): {got} vs {want}");
            }
        }
        let fraction = dropped as f64 / probs.len() as f64;
        assert!((fraction - p as f64).abs() < 0.02, "p = {p}: dropped fraction {fraction}");
    }
}

#[test]
fn dropout_p_outside_unit_interval_is_an_error() {
    let cfg = Cfg { b: 1, l: 3, h: 2, dh: 2 };
    let x = zeros(&cfg.x());
    for p in [-0.1, 1.0, 1.5, f32::NAN] {
        let dropout = Some(AttentionDropout { p, seed: 1 });
        let (mut out, mut probs) = (zeros(&cfg.x()), zeros(&cfg.maps()));
        let err = attention_forward(&mut out, &mut probs, None, &x, &x, &x, &zeros(&[1, 3]), dropout).unwrap_err();
        assert!(matches!(err, Error::Invalid { op: "attention_forward", .. }), "{err}");
        let (mut dq, mut dk, mut dv) = (zeros(&cfg.x()), zeros(&cfg.x()), zeros(&cfg.x()));
        let err = attention_backward(&mut dq, &mut dk, &mut dv, &x, &x, &x, &x, &probs, None, dropout).unwrap_err();
        assert!(matches!(err, Error::Invalid { op: "attention_backward", .. }), "{err}");
    }
}

/// For a query whose keys are all padded the f32 forward is constant (uniform), but, as autograd
/// on HF's graph does, the backward still runs the softmax backward at the saved uniform row:
/// dv follows from out = mean(v); dq and dk come from `ds = p (dp - p . dp) + E`.
#[test]
fn fully_padded_example_backward_follows_the_saved_probabilities() {
    let cfg = Cfg { b: 1, l: 4, h: 2, dh: 3 };
    let x = inputs(cfg, &[0], 20);
    let mut rng = Rng::new(21);
    let g = randn(&mut rng, x.q.len(), 1.0);
    let e = randn(&mut rng, cfg.h * cfg.l * cfg.l, 1.0);
    let [dq, dk, dv] = run_backward(cfg, &x, &g, Some(&e), &vec![0.0; x.q.len()], None);
    let (mut want_dq, mut want_dk, mut want_dv) = (vec![0.0f64; x.q.len()], vec![0.0; x.q.len()], vec![0.0; x.q.len()]);
    let (p, scale) = (1.0 / cfg.l as f64, 1.0 / (cfg.dh as f64).sqrt());
    for h in 0..cfg.h {
        for i in 0..cfg.l {
            let dp: Vec<f64> = (0..cfg.l)
                .map(|j| (0..cfg.dh).map(|d| g[cfg.at(0, i, h, d)] as f64 * x.v[cfg.at(0, j, h, d)] as f64).sum())
                .collect();
            let mean_dp = dp.iter().sum::<f64>() * p;
            for j in 0..cfg.l {
                let ds = p * (dp[j] - mean_dp) + e[cfg.map_at(0, h, i, j)] as f64;
                for d in 0..cfg.dh {
                    want_dq[cfg.at(0, i, h, d)] += scale * ds * x.k[cfg.at(0, j, h, d)] as f64;
                    want_dk[cfg.at(0, j, h, d)] += scale * ds * x.q[cfg.at(0, i, h, d)] as f64;
                    want_dv[cfg.at(0, j, h, d)] += p * g[cfg.at(0, i, h, d)] as f64;
                }
            }
        }
    }
    assert_close("dq", &dq, &want_dq, 1e-4, 1e-5);
    assert_close("dk", &dk, &want_dk, 1e-4, 1e-5);
    assert_close("dv", &dv, &want_dv, 1e-4, 1e-5);
}

#[test]
fn bad_shapes_are_errors() {
    let cfg = Cfg { b: 2, l: 3, h: 2, dh: 2 };
    let x = zeros(&cfg.x());
    let mask = zeros(&[2, 3]);
    let fwd = |q: &[usize], probs: &[usize], mask_shape: &[usize], scores: Option<&[usize]>| {
        let (mut out, mut p) = (zeros(q), zeros(probs));
        let mut s = scores.map(zeros);
        attention_forward(&mut out, &mut p, s.as_mut(), &zeros(q), &zeros(q), &zeros(q), &zeros(mask_shape), None)
    };
    assert!(fwd(&cfg.x(), &cfg.maps(), &[2, 3], Some(&cfg.maps())).is_ok());
    for (q, probs, m, s) in [
        (&[2, 3][..], &cfg.maps()[..], &[2, 3][..], None),
        (&cfg.x()[..], &[2, 2, 3][..], &[2, 3], None),
        (&[2, 3, 5], &cfg.maps(), &[2, 3], None),
        (&cfg.x(), &[2, 2, 3, 4], &[2, 3], None),
        (&cfg.x(), &cfg.maps(), &[2, 4], None),
        (&cfg.x(), &cfg.maps(), &[2, 3], Some(&[2, 2, 3, 2][..])),
    ] {
        let err = fwd(q, probs, m, s).unwrap_err();
        assert!(matches!(err, Error::Shape { op: "attention_forward", .. }), "{err}");
    }
    let (mut out, mut probs) = (zeros(&cfg.x()), zeros(&cfg.maps()));
    let err = attention_forward(&mut out, &mut probs, None, &x, &zeros(&[2, 3, 3]), &x, &mask, None).unwrap_err();
    assert!(err.to_string().contains("k is [2, 3, 3]"), "{err}");

    let bwd = |dq: &[usize], extra: Option<&[usize]>| {
        let (mut a, mut b, mut c) = (zeros(dq), zeros(&cfg.x()), zeros(&cfg.x()));
        let e = extra.map(zeros);
        attention_backward(&mut a, &mut b, &mut c, &x, &x, &x, &x, &zeros(&cfg.maps()), e.as_ref(), None)
    };
    assert!(bwd(&cfg.x(), Some(&cfg.maps())).is_ok());
    assert!(bwd(&[2, 3, 5], None).unwrap_err().to_string().contains("dq"));
    assert!(bwd(&cfg.x(), Some(&[2, 2, 3])).unwrap_err().to_string().contains("dscores_extra"));
}
