//! The flash attention algorithm of `kernels/attention.cu`, emulated on the CPU and checked
//! against the materialised CPU reference (`attention_forward` / `attention_backward`).
//!
//! This does NOT test the CUDA code: nothing here runs a kernel. It checks the algorithm the
//! kernels implement, with their tile size (64 queries x 64 keys), their loop order, the
//! online-softmax update (running max, per-lane partial sums rescaled by exp(m_old - m_new),
//! the half-warp butterfly sum at the end), the backward recurrence (D = rowsum(dO * O), the dk/dv
//! pass over query tiles, the separate dq pass over key tiles), the tails (rows past L zero-filled,
//! keys past L at -inf, their statistics zero), the padding mask (fully padded examples included)
//! and the dropout counter. Summation orders follow the kernels (f32 FMA chains over the head
//! dim, over keys and over queries in tile order); whether the CUDA compiler contracts the
//! remaining multiply-adds, and CUDA's `expf` against Rust's `exp`, are not modelled. The kernels
//! themselves are checked against the CPU on a GPU by `tests/cuda_parity.rs`.
//!
//! It also checks the CPU side of the statistics API: `attention_forward_stats` without maps and
//! `attention_backward_stats` give the materialised path's results bit for bit.
mod common;

use common::randn;
use kd_kernels::ops::attention::{
    attention_backward, attention_backward_stats, attention_forward, attention_forward_stats, flash_path,
    AttentionDropout,
};
use kd_kernels::rng::{uniform, Rng};
use kd_kernels::{Device, Error, Tensor};

/// `FA_TILE` of the kernels: queries per block and keys per streamed tile (and the reverse for
/// the dk/dv blocks).
const TILE: usize = 64;
/// Lanes sharing a query row (a half warp): lane `tc` holds keys `tc + 16 y` of each tile.
const LANES: usize = 16;

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
    fn n(&self) -> usize {
        self.b * self.l * self.h * self.dh
    }
    /// Element d of head h at token (b, i) of a `[B, L, H * Dh]` tensor.
    fn at(&self, b: usize, i: usize, h: usize, d: usize) -> usize {
        ((b * self.l + i) * self.h + h) * self.dh + d
    }
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    mask: Vec<f32>,
    /// What dq, dk, dv hold before the backward adds to them.
    init: Vec<f32>,
}

/// Random inputs; example b has `real[b]` real tokens, then padding (0: fully padded).
fn inputs(cfg: Cfg, real: &[usize], seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    let n = cfg.n();
    let mask = (0..cfg.b * cfg.l).map(|t| f32::from(t % cfg.l < real[t / cfg.l])).collect();
    Inputs {
        q: randn(&mut rng, n, 1.0),
        k: randn(&mut rng, n, 1.0),
        v: randn(&mut rng, n, 1.0),
        dout: randn(&mut rng, n, 1.0),
        mask,
        init: randn(&mut rng, n, 1.0),
    }
}

/// The attention dropout factor of map element `index` (`att_keep` / `keep_factor`).
fn keep(dropout: Option<AttentionDropout>, index: usize) -> f32 {
    match dropout {
        Some(d) if uniform(d.seed, index as u64) < d.p => 0.0,
        Some(d) => 1.0 / (1.0 - d.p),
        None => 1.0,
    }
}

/// `fa_row_reduce` / `GroupTeam::reduce` with a sum: xor butterfly, offsets halving.
fn butterfly_sum(mut v: Vec<f32>) -> f32 {
    let mut off = v.len() / 2;
    while off > 0 {
        v = (0..v.len()).map(|i| v[i] + v[i ^ off]).collect();
        off /= 2;
    }
    v[0]
}

/// One head (b, h): its rows of q, k, v and dout as the kernels' shared-memory tiles see them,
/// L rounded up to whole tiles with zero rows (`fa_load_tile`).
struct Head<'a> {
    cfg: Cfg,
    b: usize,
    h: usize,
    x: &'a Inputs,
    scale: f32,
    dropout: Option<AttentionDropout>,
    q: Vec<Vec<f32>>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    dout: Vec<Vec<f32>>,
}

impl<'a> Head<'a> {
    fn new(cfg: Cfg, (b, h): (usize, usize), x: &'a Inputs, dropout: Option<AttentionDropout>) -> Self {
        let rows = |t: &[f32]| -> Vec<Vec<f32>> {
            (0..cfg.l.next_multiple_of(TILE))
                .map(|r| if r < cfg.l { t[cfg.at(b, r, h, 0)..][..cfg.dh].to_vec() } else { vec![0.0; cfg.dh] })
                .collect()
        };
        let scale = 1.0 / (cfg.dh as f32).sqrt();
        let (q, k, v, dout) = (rows(&x.q), rows(&x.k), rows(&x.v), rows(&x.dout));
        Head { cfg, b, h, x, scale, dropout, q, k, v, dout }
    }

    /// `fa_load_bias`: the mask's offset, -inf past L.
    fn bias(&self, j: usize) -> f32 {
        if j < self.cfg.l {
            (1.0 - self.x.mask[self.b * self.cfg.l + j]) * f32::MIN
        } else {
            f32::NEG_INFINITY
        }
    }

    /// `fa_dots`: an FMA chain over the head dim, in order.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0.0f32, |acc, (&x, &y)| x.mul_add(y, acc))
    }

    /// The score of (i, j) as the kernels form it.
    fn score(&self, qi: &[f32], kj: &[f32], j: usize) -> f32 {
        Self::dot(qi, kj) * self.scale + self.bias(j)
    }

    fn map_index(&self, i: usize, j: usize) -> usize {
        ((self.b * self.cfg.h + self.h) * self.cfg.l + i) * self.cfg.l + j
    }

    /// `fa_forward` for every query tile of the head: writes the head's rows of `out` and its
    /// statistics (`stats` rows of this head).
    fn forward(&self, out: &mut [f32], stats: &mut [f32]) {
        let (l, dh) = (self.cfg.l, self.cfg.dh);
        for i0 in (0..l).step_by(TILE) {
            let qs = &self.q[i0..i0 + TILE];
            let mut m = vec![f32::NEG_INFINITY; TILE];
            let mut lsum = vec![vec![0.0f32; LANES]; TILE];
            let mut acc = vec![vec![0.0f32; dh]; TILE];
            for j0 in (0..l).step_by(TILE) {
                let (ks, vs) = (&self.k[j0..j0 + TILE], &self.v[j0..j0 + TILE]);
                for il in 0..TILE {
                    let s: Vec<f32> = (0..TILE).map(|jl| self.score(&qs[il], &ks[jl], j0 + jl)).collect();
                    let mx = s.iter().copied().fold(m[il], f32::max);
                    assert!(mx.is_finite(), "key {j0} < L is in the tile, so the max is finite");
                    let rescale = (m[il] - mx).exp();
                    m[il] = mx;
                    let mut ps = vec![0.0f32; TILE];
                    for (tc, part) in lsum[il].iter_mut().enumerate() {
                        *part *= rescale;
                        for jl in (tc..TILE).step_by(LANES) {
                            let p = (s[jl] - mx).exp();
                            *part += p;
                            ps[jl] = p * keep(self.dropout, self.map_index(i0 + il, j0 + jl));
                        }
                    }
                    // fa_rows_times: keys in order.
                    for (c, a) in acc[il].iter_mut().enumerate() {
                        *a *= rescale;
                        for jl in 0..TILE {
                            *a = ps[jl].mul_add(vs[jl][c], *a);
                        }
                    }
                }
            }
            for il in 0..TILE.min(l - i0) {
                let i = i0 + il;
                let sum = butterfly_sum(lsum[il].clone());
                let inv = 1.0 / sum;
                for (c, a) in acc[il].iter().enumerate() {
                    out[self.cfg.at(self.b, i, self.h, c)] = a * inv;
                }
                stats[2 * i] = m[il];
                stats[2 * i + 1] = sum;
            }
        }
    }

    /// `fa_rowdot`: D for row i, Dh / 4 lanes of 4-term FMA chains, butterfly-summed.
    fn rowdot(&self, out: &[f32], i: usize) -> f32 {
        let (g, o) = (&self.dout[i], &out[self.cfg.at(self.b, i, self.h, 0)..][..self.cfg.dh]);
        let lanes = (0..self.cfg.dh / 4)
            .map(|lane| {
                let (g, o) = (&g[4 * lane..][..4], &o[4 * lane..][..4]);
                let d = g[0] * o[0];
                g[1..].iter().zip(&o[1..]).fold(d, |d, (&x, &y)| x.mul_add(y, d))
            })
            .collect();
        butterfly_sum(lanes)
    }

    /// `fa_row_stats`: (m, 1 / l, D) of query row i; zeros past L.
    fn row_stats(&self, stats: &[f32], drow: &[f32], i: usize) -> (f32, f32, f32) {
        if i < self.cfg.l {
            (stats[2 * i], 1.0 / stats[2 * i + 1], drow[i])
        } else {
            (0.0, 0.0, 0.0)
        }
    }

    /// `FaGrad::tile`: (Z P, dS) of one (query, key) pair.
    fn grad(&self, i: usize, j: usize, (m, inv, d): (f32, f32, f32)) -> (f32, f32) {
        let p = (self.score(&self.q[i], &self.k[j], j) - m).exp() * inv;
        let dp = Self::dot(&self.dout[i], &self.v[j]);
        let z = keep(self.dropout, self.map_index(i, j));
        (p * z, p * (dp * z - d))
    }

    /// `fa_dkv` and `fa_dq` for the head, adding into its rows of dq, dk, dv.
    fn backward(&self, (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]), stats: &[f32], drow: &[f32]) {
        let (l, dh) = (self.cfg.l, self.cfg.dh);
        // dk, dv: a block per key tile, query tiles streamed, queries in order.
        for j0 in (0..l).step_by(TILE) {
            let (mut gk, mut gv) = (vec![vec![0.0f32; dh]; TILE], vec![vec![0.0f32; dh]; TILE]);
            for i0 in (0..l).step_by(TILE) {
                let (qs, dos) = (&self.q[i0..i0 + TILE], &self.dout[i0..i0 + TILE]);
                let tile: Vec<Vec<(f32, f32)>> = (0..TILE)
                    .map(|il| {
                        let rs = self.row_stats(stats, drow, i0 + il);
                        (0..TILE).map(|jl| self.grad(i0 + il, j0 + jl, rs)).collect()
                    })
                    .collect();
                for jl in 0..TILE {
                    for c in 0..dh {
                        for il in 0..TILE {
                            let (pz, ds) = tile[il][jl];
                            gv[jl][c] = pz.mul_add(dos[il][c], gv[jl][c]);
                            gk[jl][c] = ds.mul_add(qs[il][c], gk[jl][c]);
                        }
                    }
                }
            }
            for jl in 0..TILE.min(l - j0) {
                for c in 0..dh {
                    let at = self.cfg.at(self.b, j0 + jl, self.h, c);
                    dk[at] += self.scale * gk[jl][c];
                    dv[at] += gv[jl][c];
                }
            }
        }
        // dq: a block per query tile, key tiles streamed, keys in order.
        for i0 in (0..l).step_by(TILE) {
            let mut gq = vec![vec![0.0f32; dh]; TILE];
            for j0 in (0..l).step_by(TILE) {
                let ks = &self.k[j0..j0 + TILE];
                for (il, g) in gq.iter_mut().enumerate() {
                    let rs = self.row_stats(stats, drow, i0 + il);
                    let ds: Vec<f32> = (0..TILE).map(|jl| self.grad(i0 + il, j0 + jl, rs).1).collect();
                    for (c, g) in g.iter_mut().enumerate() {
                        for jl in 0..TILE {
                            *g = ds[jl].mul_add(ks[jl][c], *g);
                        }
                    }
                }
            }
            for (il, g) in gq.iter().enumerate().take(l - i0) {
                for (c, g) in g.iter().enumerate() {
                    dq[self.cfg.at(self.b, i0 + il, self.h, c)] += self.scale * g;
                }
            }
        }
    }
}

/// The emulated flash forward and backward: (out, stats, dq, dk, dv), the gradients including
/// `init`.
fn flash(cfg: Cfg, x: &Inputs, dropout: Option<AttentionDropout>) -> [Vec<f32>; 5] {
    let mut out = vec![0.0f32; cfg.n()];
    let mut stats = vec![0.0f32; cfg.b * cfg.h * cfg.l * 2];
    let (mut dq, mut dk, mut dv) = (x.init.clone(), x.init.clone(), x.init.clone());
    let heads = || (0..cfg.b).flat_map(|b| (0..cfg.h).map(move |h| (b, h)));
    for (b, h) in heads() {
        let head = Head::new(cfg, (b, h), x, dropout);
        head.forward(&mut out, &mut stats[(b * cfg.h + h) * 2 * cfg.l..][..2 * cfg.l]);
    }
    for (b, h) in heads() {
        let head = Head::new(cfg, (b, h), x, dropout);
        let drow: Vec<f32> = (0..cfg.l).map(|i| head.rowdot(&out, i)).collect();
        let stats = &stats[(b * cfg.h + h) * 2 * cfg.l..][..2 * cfg.l];
        head.backward((&mut dq, &mut dk, &mut dv), stats, &drow);
    }
    [out, stats, dq, dk, dv]
}

fn t(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
}

fn host(x: &Tensor) -> Vec<f32> {
    x.to_vec().unwrap()
}

/// The materialised reference: (out, stats, dq, dk, dv) from `attention_forward_stats` with the
/// maps kept and `attention_backward` on them.
fn reference(cfg: Cfg, x: &Inputs, dropout: Option<AttentionDropout>) -> [Vec<f32>; 5] {
    let [b, l, h] = [cfg.b, cfg.l, cfg.h];
    let (q, k, v, mask) = (t(&x.q, &cfg.x()), t(&x.k, &cfg.x()), t(&x.v, &cfg.x()), t(&x.mask, &[b, l]));
    let mut out = Tensor::zeros(&cfg.x(), &Device::Cpu).unwrap();
    let mut stats = Tensor::zeros(&[b, h, l, 2], &Device::Cpu).unwrap();
    let mut probs = Tensor::zeros(&[b, h, l, l], &Device::Cpu).unwrap();
    attention_forward_stats(&mut out, &mut stats, Some(&mut probs), None, &q, &k, &v, &mask, dropout).unwrap();
    let (mut dq, mut dk, mut dv) = (t(&x.init, &cfg.x()), t(&x.init, &cfg.x()), t(&x.init, &cfg.x()));
    let dout = t(&x.dout, &cfg.x());
    attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, None, dropout).unwrap();
    [host(&out), host(&stats), host(&dq), host(&dk), host(&dv)]
}

/// `|got - want| <= rtol * (|want| + max |want|)`, as tests/cuda_parity.rs compares.
fn assert_near(what: &str, got: &[f32], want: &[f32], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        assert!(err <= rtol * ((w as f64).abs() + scale), "{what}[{i}]: flash {g}, reference {w} (err {err:e})");
    }
}

/// Relative tolerance against the reference: both are f32 with different summation orders
/// (cuda_parity.rs's 1e-5 rule).
const RTOL: f64 = 1e-5;

fn check(cfg: Cfg, real: &[usize], seed: u64, dropout: Option<AttentionDropout>) {
    let x = inputs(cfg, real, seed);
    let got = flash(cfg, &x, dropout);
    let want = reference(cfg, &x, dropout);
    let what = format!("{cfg:?} real {real:?} {dropout:?}");
    for (name, (g, w)) in ["out", "stats", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
        if *name == "stats" {
            // Maxima are exact up to the dot products' rounding; sums compare like any value.
            let (gm, wm): (Vec<f32>, Vec<f32>) =
                (g.iter().step_by(2).copied().collect(), w.iter().step_by(2).copied().collect());
            let (gs, ws): (Vec<f32>, Vec<f32>) =
                (g.iter().skip(1).step_by(2).copied().collect(), w.iter().skip(1).step_by(2).copied().collect());
            assert_near(&format!("row max {what}"), &gm, &wm, RTOL);
            assert_near(&format!("row sum {what}"), &gs, &ws, RTOL);
        } else {
            assert_near(&format!("{name} {what}"), g, w, RTOL);
        }
    }
}

/// Real tokens per example for length l: full, partly padded, fully padded.
fn padding(l: usize) -> [usize; 3] {
    [l, l.div_ceil(2), 0]
}

#[test]
fn flash_algorithm_matches_reference_for_every_tail() {
    for l in [1, 7, 64, 127, 128] {
        for dh in [32, 64] {
            let cfg = Cfg { b: 3, l, h: 2, dh };
            check(cfg, &padding(l), 100 + l as u64 + dh as u64, None);
        }
    }
}

#[test]
fn flash_algorithm_matches_reference_at_long_sequences() {
    for (l, dh) in [(300, 32), (300, 64), (512, 32), (512, 64)] {
        let cfg = Cfg { b: 3, l, h: 1, dh };
        check(cfg, &padding(l), 200 + l as u64 + dh as u64, None);
    }
}

/// The flash path draws the materialised path's mask: the same counter per map element.
#[test]
fn flash_algorithm_matches_reference_with_dropout() {
    for (l, dh, p) in [(7, 32, 0.5f32), (127, 64, 0.1), (300, 32, 0.3)] {
        let cfg = Cfg { b: 3, l, h: 2, dh };
        check(cfg, &padding(l), 300 + l as u64, Some(AttentionDropout { p, seed: 17 + l as u64 }));
    }
}

/// On the CPU the statistics API materialises the maps in scratch and recomputes them in the
/// backward from the statistics: the same bits as the materialised path.
#[test]
fn stats_api_on_cpu_is_the_materialised_path_bit_for_bit() {
    for dropout in [None, Some(AttentionDropout { p: 0.2, seed: 5 })] {
        let cfg = Cfg { b: 3, l: 37, h: 3, dh: 8 };
        let x = inputs(cfg, &padding(cfg.l), 9);
        let [b, l, h] = [cfg.b, cfg.l, cfg.h];
        let (q, k, v, mask) = (t(&x.q, &cfg.x()), t(&x.k, &cfg.x()), t(&x.v, &cfg.x()), t(&x.mask, &[b, l]));
        let dout = t(&x.dout, &cfg.x());

        let mut out = Tensor::zeros(&cfg.x(), &Device::Cpu).unwrap();
        let mut probs = Tensor::zeros(&[b, h, l, l], &Device::Cpu).unwrap();
        attention_forward(&mut out, &mut probs, None, &q, &k, &v, &mask, dropout).unwrap();
        let mut grads = [0; 3].map(|_| t(&x.init, &cfg.x()));
        let [dq, dk, dv] = &mut grads;
        attention_backward(dq, dk, dv, &dout, &q, &k, &v, &probs, None, dropout).unwrap();

        let mut out_s = Tensor::zeros(&cfg.x(), &Device::Cpu).unwrap();
        let mut stats = Tensor::zeros(&[b, h, l, 2], &Device::Cpu).unwrap();
        attention_forward_stats(&mut out_s, &mut stats, None, None, &q, &k, &v, &mask, dropout).unwrap();
        assert_eq!(host(&out_s), host(&out));
        let mut grads_s = [0; 3].map(|_| t(&x.init, &cfg.x()));
        let [dq_s, dk_s, dv_s] = &mut grads_s;
        attention_backward_stats(dq_s, dk_s, dv_s, &dout, &q, &k, &v, &out_s, &stats, &mask, dropout).unwrap();
        for (g, want) in grads_s.iter().zip(&grads) {
            assert_eq!(host(g), host(want));
        }

        // A fully padded row's statistics keep its uniform 1 / L: max f32::MIN, sum L.
        let row = host(&stats)[2 * 2 * h * l..][..2].to_vec();
        assert_eq!(row, [f32::MIN, l as f32]);
    }
}

#[test]
fn stats_api_rejects_scores_without_maps_and_the_cpu_has_no_flash_path() {
    let cfg = Cfg { b: 1, l: 3, h: 2, dh: 4 };
    let x = Tensor::zeros(&cfg.x(), &Device::Cpu).unwrap();
    let (mut out, mut stats) = (x.try_clone().unwrap(), Tensor::zeros(&[1, 2, 3, 2], &Device::Cpu).unwrap());
    let mut scores = Tensor::zeros(&[1, 2, 3, 3], &Device::Cpu).unwrap();
    let mask = Tensor::zeros(&[1, 3], &Device::Cpu).unwrap();
    let err =
        attention_forward_stats(&mut out, &mut stats, None, Some(&mut scores), &x, &x, &x, &mask, None).unwrap_err();
    assert!(matches!(err, Error::Invalid { op: "attention_forward_stats", .. }), "{err}");
    let mut bad = Tensor::zeros(&[1, 2, 3, 3], &Device::Cpu).unwrap();
    let err = attention_forward_stats(&mut out, &mut bad, None, None, &x, &x, &x, &mask, None).unwrap_err();
    assert!(matches!(err, Error::Shape { op: "attention_forward_stats", .. }), "{err}");
    assert!(!flash_path(&Device::Cpu, 64));
}
