// common::check_grad takes eight arguments; the lint fires inside the shared helper module.
#![allow(clippy::too_many_arguments)]

mod common;

use common::{assert_close, randn, tensor, zeros};
use kd_kernels::ops::adamw::{adamw_step, AdamW};
use kd_kernels::rng::Rng;

const CFG: AdamW = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };

/// The textbook update in f64, from the f32 hyperparameters.
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Reference {
    fn step(&mut self, g: &[f32], cfg: AdamW, t: u64, decay: bool) {
        let (lr, b1, b2, eps, wd) =
            (cfg.lr as f64, cfg.beta1 as f64, cfg.beta2 as f64, cfg.eps as f64, cfg.weight_decay as f64);
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        for i in 0..self.p.len() {
            let g = g[i] as f64;
            if decay {
                self.p[i] -= lr * wd * self.p[i];
            }
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            self.p[i] -= lr * (self.m[i] / bc1) / ((self.v[i] / bc2).sqrt() + eps);
        }
    }
}

#[test]
fn several_steps_match_the_f64_reference() {
    let mut rng = Rng::new(11);
    for (shape, decay) in [(vec![7, 13], true), (vec![1], true), (vec![33], false), (vec![2, 3, 5], true)] {
        let n: usize = shape.iter().product();
        let p0 = randn(&mut rng, n, 1.0);
        let mut p = tensor(&p0, &shape);
        let (mut m, mut v) = (zeros(&shape), zeros(&shape));
        let mut r = Reference { p: p0.iter().map(|&x| x as f64).collect(), m: vec![0.0; n], v: vec![0.0; n] };
        for t in 1..=6 {
            // Gradients of varying scale, so the second moment is not a constant multiple.
            let g = randn(&mut rng, n, 0.1 * t as f64);
            adamw_step(&mut p, &tensor(&g, &shape), &mut m, &mut v, CFG, t, decay).unwrap();
            r.step(&g, CFG, t, decay);
            let what = format!("{shape:?} decay={decay} step {t}");
            assert_close(&format!("{what} m"), m.cpu().unwrap(), &r.m, 1e-5, 1e-8);
            assert_close(&format!("{what} v"), v.cpu().unwrap(), &r.v, 1e-5, 1e-10);
            assert_close(&format!("{what} p"), p.cpu().unwrap(), &r.p, 1e-6, 1e-6);
        }
    }
}

/// Hand-checked: at step 1 the bias-corrected moments are g and g^2, so each weight first
/// shrinks by lr*wd and then moves by lr * g / (|g| + eps).
#[test]
fn first_step_moves_each_weight_by_lr_against_the_gradient() {
    let cfg = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let mut p = tensor(&[1.0, -2.0, 0.5, 3.0], &[4]);
    let g = tensor(&[0.5, -3.0, 1e-3, 0.0], &[4]);
    let (mut m, mut v) = (zeros(&[4]), zeros(&[4]));
    adamw_step(&mut p, &g, &mut m, &mut v, cfg, 1, true).unwrap();
    let want = [0.99 - 0.1, -1.98 + 0.1, 0.495 - 0.1 * (1e-3 / (1e-3 + 1e-8)), 2.97];
    assert_close("p", p.cpu().unwrap(), &want, 1e-6, 1e-7);
    assert_close("m", m.cpu().unwrap(), &[0.05, -0.3, 1e-4, 0.0], 1e-6, 0.0);
    // 1 - 0.999f32 is 1e-3 only to about 1.3e-5 relative.
    assert_close("v", v.cpu().unwrap(), &[2.5e-4, 9e-3, 1e-9, 0.0], 2e-5, 0.0);
}

#[test]
fn without_decay_the_step_equals_one_with_zero_weight_decay() {
    let mut rng = Rng::new(3);
    let p0 = randn(&mut rng, 50, 1.0);
    let g = tensor(&randn(&mut rng, 50, 1.0), &[50]);
    let run = |cfg: AdamW, decay: bool| {
        let mut p = tensor(&p0, &[50]);
        let (mut m, mut v) = (zeros(&[50]), zeros(&[50]));
        for t in 1..=3 {
            adamw_step(&mut p, &g, &mut m, &mut v, cfg, t, decay).unwrap();
        }
        p.to_vec().unwrap()
    };
    let no_decay = run(CFG, false);
    assert_eq!(no_decay, run(AdamW { weight_decay: 0.0, ..CFG }, true));
    assert_ne!(no_decay, run(CFG, true), "decay must change the weights");
}

#[test]
fn bad_arguments_are_errors() {
    let g = zeros(&[4]);
    let (mut p, mut m, mut v) = (zeros(&[4]), zeros(&[4]), zeros(&[4]));
    let mut short = zeros(&[3]);
    let err = adamw_step(&mut p, &zeros(&[2, 2]), &mut m, &mut v, CFG, 1, true).unwrap_err().to_string();
    assert!(err.contains("adamw_step") && err.contains("grad"), "{err}");
    let err = adamw_step(&mut p, &g, &mut short, &mut v, CFG, 1, true).unwrap_err().to_string();
    assert!(err.contains("m is [3]"), "{err}");
    let err = adamw_step(&mut p, &g, &mut m, &mut short, CFG, 1, true).unwrap_err().to_string();
    assert!(err.contains("v is [3]"), "{err}");
    let err = adamw_step(&mut p, &g, &mut m, &mut v, CFG, 0, true).unwrap_err().to_string();
    assert!(err.contains("1-based"), "{err}");
    let err = adamw_step(&mut p, &g, &mut m, &mut v, AdamW { beta2: 1.0, ..CFG }, 1, true).unwrap_err().to_string();
    assert!(err.contains("betas"), "{err}");
    let err = adamw_step(&mut p, &g, &mut m, &mut v, AdamW { lr: f32::NAN, ..CFG }, 1, true).unwrap_err().to_string();
    assert!(err.contains("lr"), "{err}");
}
