//! Fused scaled, masked multi-head attention, forward and backward, exactly as HF BERT's eager
//! attention computes it: `scores = q . k / sqrt(Dh) + (1 - mask) * f32::MIN`, softmax over the
//! keys, then the probability-weighted sum of the values. In training HF also drops attention
//! probabilities (`attention_probs_dropout_prob`); [`AttentionDropout`] does that inside the op.
//!
//! q, k, v and the output stay `[B, L, H * Dh]` (heads interleaved along the last axis, as the
//! QKV projections produce them) so no permute copies are made; the probabilities `[B, H, L, L]`
//! are kept for backward and for attention-map distillation. HF adds `finfo.min` instead of
//! `-inf`, so a query whose keys are all padded gets a uniform row rather than NaN; kd does the
//! same, so its maps (and the losses distilled from them) match HF's.
use std::marker::PhantomData;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use gemm::Parallelism;
use rayon::prelude::*;

use super::dropout::check_p;
use super::gemm::{gemm_cpu, gemm_cpu_strided, Mat};
use super::opt_rows_mut;
use crate::cuda::{self, Module, OptionalArg};
use crate::device::CudaDevice;
use crate::rng::uniform;
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

/// The sizes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    l: usize,
    heads: usize,
    dh: usize,
}

impl Dims {
    /// Reads B, L and H * Dh from `x` (`[B, L, H * Dh]`) and H from `maps` (`[B, H, L, L]`).
    fn of(op: &'static str, x: &Tensor, maps: &Tensor) -> Result<Dims> {
        let [b, l, hd] = *x.shape() else {
            return Err(Error::shape(op, format!("q is {:?}, expected [B, L, H * Dh]", x.shape())));
        };
        let heads = match maps.shape() {
            [_, h, _, _] => *h,
            s => return Err(Error::shape(op, format!("probs is {s:?}, expected [B, H, L, L]"))),
        };
        if heads == 0 || hd == 0 || hd % heads != 0 {
            return Err(Error::shape(op, format!("q's last dim {hd} does not split into {heads} heads")));
        }
        expect_shape(op, "probs", maps, &[b, heads, l, l])?;
        Ok(Dims { b, l, heads, dh: hd / heads })
    }

    fn hd(&self) -> usize {
        self.heads * self.dh
    }

    fn is_empty(&self) -> bool {
        self.b == 0 || self.l == 0
    }

    /// Head `h` of batch `b` in a `[B, L, H * Dh]` slice, as an `[L, Dh]` matrix read in place.
    fn head<'a>(&self, x: &'a [f32], b: usize, h: usize) -> Mat<'a> {
        Mat::strided(&x[b * self.l * self.hd() + h * self.dh..], self.l, self.dh, self.hd())
    }
}

/// A `[B, L, H * Dh]` buffer written by parallel (b, h) tasks. Each task owns the columns
/// `h * Dh .. (h + 1) * Dh` of batch b's L rows: disjoint memory, but interleaved with the other
/// heads, so no safe slice split can hand them out without a permute copy.
struct HeadColumns<'a> {
    ptr: *mut f32,
    dims: Dims,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: HeadColumns hands out access only through `claim`, whose contract keeps the regions
// touched by different threads disjoint.
unsafe impl Send for HeadColumns<'_> {}
unsafe impl Sync for HeadColumns<'_> {}

impl<'a> HeadColumns<'a> {
    fn new(buf: &'a mut [f32], dims: Dims) -> Self {
        assert_eq!(buf.len(), dims.b * dims.l * dims.hd());
        HeadColumns { ptr: buf.as_mut_ptr(), dims, _buf: PhantomData }
    }

    /// The columns of head `h` in batch `b`.
    ///
    /// # Safety
    /// No two live `HeadMut`s may have the same `(b, h)`.
    unsafe fn claim(&self, b: usize, h: usize) -> HeadMut<'_> {
        assert!(b < self.dims.b && h < self.dims.heads);
        // SAFETY: in bounds by the assert and the length checked in `new`.
        let base = unsafe { self.ptr.add(b * self.dims.l * self.dims.hd() + h * self.dims.dh) };
        HeadMut { base, dims: self.dims, _cols: PhantomData }
    }
}

/// One (b, h) block of a [`HeadColumns`]: L rows of Dh values, `H * Dh` apart.
struct HeadMut<'a> {
    base: *mut f32,
    dims: Dims,
    _cols: PhantomData<&'a mut f32>,
}

impl HeadMut<'_> {
    /// `head = alpha * a . b + beta * head`, single-threaded (the heads run in parallel).
    fn gemm(&mut self, a: Mat, b: Mat, alpha: f32, beta: f32) {
        assert!(a.rows() == self.dims.l && b.cols() == self.dims.dh, "HeadMut::gemm: [L, Dh] product");
        // SAFETY: the claimed head is L rows of Dh floats, H * Dh apart, inside the buffer, and
        // the claim is exclusive (see `HeadColumns::claim`).
        unsafe { gemm_cpu_strided(self.base, self.dims.hd(), a, b, alpha, beta, Parallelism::None) }
    }
}

/// Inverted dropout on the attention probabilities: `context = dropped(probs) . v`. Element
/// `(b, h, i, j)` of the `[B, H, L, L]` map, at flat index `((b * H + h) * L + i) * L + j`, is
/// dropped iff `rng::uniform(seed, index) < p`, and kept ones are scaled by `1 / (1 - p)`, as
/// in `ops::dropout`. The mask is never stored: the backward redraws it from the same seed, and
/// `probs` stays the undropped softmax (the attention-map losses and the softmax backward need
/// it). `p` must lie in `[0, 1)`; `p = 0` is the same as no dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDropout {
    pub p: f32,
    pub seed: u64,
}

/// Validates `dropout` and drops it when it would keep everything, so that `p = 0` takes
/// exactly the no-dropout path.
fn active_dropout(op: &'static str, dropout: Option<AttentionDropout>) -> Result<Option<AttentionDropout>> {
    if let Some(d) = dropout {
        check_p(op, d.p)?;
    }
    Ok(dropout.filter(|d| d.p > 0.0))
}

/// The factor map element `index` is multiplied by: 0 when dropped, `1 / (1 - p)` when kept,
/// exactly 1 without dropout.
fn keep_factor(dropout: Option<AttentionDropout>, index: usize) -> f32 {
    match dropout {
        Some(d) if uniform(d.seed, index as u64) < d.p => 0.0,
        Some(d) => 1.0 / (1.0 - d.p),
        None => 1.0,
    }
}

/// `dropped[j] = p[j] * keep_factor(j)` for the map row starting at flat index `row`.
fn drop_row(dropped: &mut [f32], p: &[f32], dropout: Option<AttentionDropout>, row: usize) {
    for (j, (d, &pj)) in dropped.iter_mut().zip(p).enumerate() {
        *d = pj * keep_factor(dropout, row + j);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Forward: `out` `[B, L, H * Dh]` and `probs` `[B, H, L, L]` are overwritten; `scores`, when
/// given, receives the masked scaled pre-softmax scores (the logits of attention-map KL).
/// H is read from `probs`; `mask` is `[B, L]`. With `dropout`, `out` is computed from the dropped
/// probabilities while `probs` keeps the undropped ones.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut Tensor,
    probs: &mut Tensor,
    scores: Option<&mut Tensor>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "attention_forward";
    let dropout = active_dropout(OP, dropout)?;
    let dims = Dims::of(OP, q, probs)?;
    for (what, t) in [("k", k), ("v", v), ("out", &*out)] {
        expect_shape(OP, what, t, q.shape())?;
    }
    expect_shape(OP, "mask", mask, &[dims.b, dims.l])?;
    let mut tensors = vec![&*out, &*probs, q, k, v, mask];
    if let Some(s) = &scores {
        expect_shape(OP, "scores", s, probs.shape())?;
        tensors.push(s);
    }
    match common_device(OP, &tensors)? {
        Device::Cpu => {
            let scores = scores.map(Tensor::cpu_mut).transpose()?;
            attention_forward_cpu(
                dims,
                out.cpu_mut()?,
                probs.cpu_mut()?,
                scores,
                q.cpu()?,
                k.cpu()?,
                v.cpu()?,
                mask.cpu()?,
                dropout,
            );
            Ok(())
        }
        Device::Cuda(dev) => attention_forward_cuda(&dev, dims, out, probs, scores, q, k, v, mask, dropout),
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_forward_cpu(
    dims: Dims,
    out: &mut [f32],
    probs: &mut [f32],
    scores: Option<&mut [f32]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dropout: Option<AttentionDropout>,
) {
    if dims.is_empty() {
        return;
    }
    let Dims { l, heads, dh, .. } = dims;
    let scale = 1.0 / (dh as f32).sqrt();
    let out = HeadColumns::new(out, dims);
    // Per-task scratch for the dropped probabilities; without dropout `out` reads `probs` itself.
    let scratch = if dropout.is_some() { l * l } else { 0 };
    probs.par_chunks_mut(l * l).zip(opt_rows_mut(scores, l * l, dims.b * heads)).enumerate().for_each_init(
        || vec![0.0f32; scratch],
        |dropped, (bh, (probs, scores))| {
            let (b, h) = (bh / heads, bh % heads);
            let mask = &mask[b * l..][..l];
            let (qh, kh, vh) = (dims.head(q, b, h), dims.head(k, b, h), dims.head(v, b, h));
            gemm_cpu(probs, qh, kh.t(), scale, 0.0, Parallelism::None);
            for p in probs.chunks_exact_mut(l) {
                p.iter_mut().zip(mask).for_each(|(p, &m)| *p += (1.0 - m) * f32::MIN);
            }
            if let Some(s) = scores {
                s.copy_from_slice(probs);
            }
            probs.chunks_exact_mut(l).for_each(softmax_in_place);
            let weights = if dropout.is_some() {
                for (i, (d, p)) in dropped.chunks_exact_mut(l).zip(probs.chunks_exact(l)).enumerate() {
                    drop_row(d, p, dropout, (bh * l + i) * l);
                }
                &dropped[..]
            } else {
                &probs[..]
            };
            // SAFETY: this task is the only one given (b, h).
            let mut out = unsafe { out.claim(b, h) };
            out.gemm(Mat::new(weights, l, l, false), vh, 1.0, 0.0);
        },
    );
}

/// Tile sizes of `kernels/attention.cu` (ATT_BQ, ATT_BK, ATT_BI, ATT_MAX_DH, ATT_THREADS).
const ATT_BQ: usize = 16;
const ATT_BK: usize = 32;
const ATT_BI: usize = 32;
const ATT_MAX_DH: usize = 128;
const ATT_THREADS: u32 = 256;

impl Dims {
    /// The kernels' `L, H, Dh` after checking the sizes they take.
    fn cuda_ints(&self, op: &'static str) -> Result<[i32; 3]> {
        if self.dh > ATT_MAX_DH {
            return Err(Error::invalid(op, format!("head dim {} > {ATT_MAX_DH} has no CUDA kernel yet", self.dh)));
        }
        if self.b > 65_535 || self.heads > 65_535 {
            return Err(Error::invalid(
                op,
                format!("{} x {} (batch x heads) exceeds the CUDA grid", self.b, self.heads),
            ));
        }
        Ok([cuda::int(op, "L", self.l)?, cuda::int(op, "H", self.heads)?, cuda::int(op, "Dh", self.dh)?])
    }

    /// Blocks of `rows` queries (or keys) per (head, batch), 256 threads, `floats` of shared memory.
    fn launch(&self, rows: usize, floats: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.l.div_ceil(rows) as u32, self.heads as u32, self.b as u32),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: (floats * 4) as u32,
        }
    }

    /// The forward and dq kernels: a query tile, a key chunk and the tile's score rows.
    fn query_blocks(&self) -> LaunchConfig {
        self.launch(ATT_BQ, ATT_BQ * self.dh + ATT_BK * (self.dh + 1) + ATT_BQ * self.l)
    }

    /// The dk / dv kernel: the block's values, a query and a dout chunk, P and dS tiles.
    fn key_blocks(&self) -> LaunchConfig {
        self.launch(ATT_BK, ATT_BK * (self.dh + 1) + 2 * ATT_BI * self.dh + 2 * ATT_BI * (ATT_BK + 1))
    }
}

/// `kernels/attention.cu`'s forward: one block per 16 queries of a (batch, head), the score rows
/// in shared memory.
#[allow(clippy::too_many_arguments)]
fn attention_forward_cuda(
    dev: &CudaDevice,
    dims: Dims,
    out: &mut Tensor,
    probs: &mut Tensor,
    scores: Option<&mut Tensor>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "attention_forward";
    if dims.is_empty() {
        return Ok(());
    }
    let [l, h, dh] = dims.cuda_ints(OP)?;
    let scale = 1.0 / (dims.dh as f32).sqrt();
    let cfg = dims.query_blocks();
    let f = dev.function(Module::Attention, "attention_forward_f32")?;
    dev.allow_shared_memory(OP, &f, cfg.shared_mem_bytes as usize)?;
    let scores = scores.map(cuda::slice_mut).transpose()?;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(cuda::slice_mut(out)?).arg(cuda::slice_mut(probs)?).opt_mut(scores);
    b.arg(cuda::slice(q)?).arg(cuda::slice(k)?).arg(cuda::slice(v)?).arg(cuda::slice(mask)?);
    let (drop_p, seed) = dropout.map_or((0.0f32, 0u64), |d| (d.p, d.seed));
    b.arg(&l).arg(&h).arg(&dh).arg(&scale).arg(&drop_p).arg(&seed);
    // SAFETY: attention_forward_f32's parameters; attention_forward checked every shape against
    // `dims`, and the shared memory matches the kernel's layout.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// `kernels/attention.cu`'s backward: dq per query block (keeping each query's `P . dP`), then
/// dk and dv per key block, which recompute their columns of the score gradient.
#[allow(clippy::too_many_arguments)]
fn attention_backward_cuda(
    dev: &CudaDevice,
    dims: Dims,
    (dq, dk, dv): (&mut Tensor, &mut Tensor, &mut Tensor),
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    extra: Option<&Tensor>,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "attention_backward";
    if dims.is_empty() {
        return Ok(());
    }
    let [l, h, dh] = dims.cuda_ints(OP)?;
    let scale = 1.0 / (dims.dh as f32).sqrt();
    let (dq_cfg, dkv_cfg) = (dims.query_blocks(), dims.key_blocks());
    let dq_f = dev.function(Module::Attention, "attention_backward_dq_f32")?;
    let dkv_f = dev.function(Module::Attention, "attention_backward_dkv_f32")?;
    dev.allow_shared_memory(OP, &dq_f, dq_cfg.shared_mem_bytes as usize)?;
    dev.allow_shared_memory(OP, &dkv_f, dkv_cfg.shared_mem_bytes as usize)?;
    let (dout, q, k, v, probs) =
        (cuda::slice(dout)?, cuda::slice(q)?, cuda::slice(k)?, cuda::slice(v)?, cuda::slice(probs)?);
    let extra = extra.map(cuda::slice).transpose()?;
    let (drop_p, seed) = dropout.map_or((0.0f32, 0u64), |d| (d.p, d.seed));
    dev.with_scratch(dims.b * dims.heads * dims.l, |rowdot| {
        {
            let mut b = dev.stream.launch_builder(&dq_f);
            b.arg(cuda::slice_mut(dq)?).arg(&mut *rowdot).arg(dout).arg(k).arg(v).arg(probs).opt(extra);
            b.arg(&l).arg(&h).arg(&dh).arg(&scale).arg(&drop_p).arg(&seed);
            // SAFETY: attention_backward_dq_f32's parameters; rowdot holds B * H * L floats.
            unsafe { b.launch(dq_cfg) }.map_err(cuda_err)?;
        }
        let mut b = dev.stream.launch_builder(&dkv_f);
        b.arg(cuda::slice_mut(dk)?).arg(cuda::slice_mut(dv)?).arg(&*rowdot).arg(dout).arg(q).arg(v).arg(probs);
        b.opt(extra).arg(&l).arg(&h).arg(&dh).arg(&scale).arg(&drop_p).arg(&seed);
        // SAFETY: attention_backward_dkv_f32's parameters; rowdot was written by the dq kernel.
        unsafe { b.launch(dkv_cfg) }.map_err(cuda_err)?;
        Ok(())
    })
}

fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in x.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|x| *x *= inv);
}

/// Backward: dq, dk, dv (`[B, L, H * Dh]`) accumulate. `dscores_extra` (`[B, H, L, L]`) is a
/// further gradient w.r.t. the masked scores, added after the softmax backward: attention-map KL
/// and relation losses differentiate with respect to the scores and feed it here.
///
/// Like autograd on HF's graph, the gradient flows through the softmax as the saved `probs`
/// give it, also for a query whose keys are all padded (its uniform row).
///
/// `dropout` must be the forward's: the mask is redrawn from its seed, so that
/// `dv += dropped(probs)^T . dout` and `d(probs) = mask * (dout . v^T) / (1 - p)` before the
/// softmax backward at the undropped `probs`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut Tensor,
    dk: &mut Tensor,
    dv: &mut Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    dscores_extra: Option<&Tensor>,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "attention_backward";
    let dropout = active_dropout(OP, dropout)?;
    let dims = Dims::of(OP, q, probs)?;
    for (what, t) in [("k", k), ("v", v), ("dout", dout), ("dq", &*dq), ("dk", &*dk), ("dv", &*dv)] {
        expect_shape(OP, what, t, q.shape())?;
    }
    let mut tensors = vec![&*dq, &*dk, &*dv, dout, q, k, v, probs];
    if let Some(e) = dscores_extra {
        expect_shape(OP, "dscores_extra", e, probs.shape())?;
        tensors.push(e);
    }
    match common_device(OP, &tensors)? {
        Device::Cpu => {
            let extra = dscores_extra.map(Tensor::cpu).transpose()?;
            let grads = (dq.cpu_mut()?, dk.cpu_mut()?, dv.cpu_mut()?);
            let (dout, q, k, v) = (dout.cpu()?, q.cpu()?, k.cpu()?, v.cpu()?);
            attention_backward_cpu(dims, grads, dout, q, k, v, probs.cpu()?, extra, dropout);
            Ok(())
        }
        Device::Cuda(dev) => {
            attention_backward_cuda(&dev, dims, (dq, dk, dv), dout, q, k, v, probs, dscores_extra, dropout)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_backward_cpu(
    dims: Dims,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    extra: Option<&[f32]>,
    dropout: Option<AttentionDropout>,
) {
    if dims.is_empty() {
        return;
    }
    let Dims { l, heads, .. } = dims;
    let scale = 1.0 / (dims.dh as f32).sqrt();
    let (dq, dk, dv) = (HeadColumns::new(dq, dims), HeadColumns::new(dk, dims), HeadColumns::new(dv, dims));
    // One [L, L] block of scratch per rayon job: first the dropped probabilities (with dropout),
    // then the score gradient of the head.
    probs.par_chunks(l * l).enumerate().for_each_init(
        || vec![0.0f32; l * l],
        |ds, (bh, probs)| {
            let (b, h) = (bh / heads, bh % heads);
            let (qh, kh, vh, doh) = (dims.head(q, b, h), dims.head(k, b, h), dims.head(v, b, h), dims.head(dout, b, h));
            // SAFETY: this task is the only one given (b, h).
            let (mut dq, mut dk, mut dv) = unsafe { (dq.claim(b, h), dk.claim(b, h), dv.claim(b, h)) };
            let rows = |i: usize| (bh * l + i) * l;
            if dropout.is_some() {
                for (i, (d, p)) in ds.chunks_exact_mut(l).zip(probs.chunks_exact(l)).enumerate() {
                    drop_row(d, p, dropout, rows(i));
                }
                dv.gemm(Mat::new(ds, l, l, true), doh, 1.0, 1.0);
            } else {
                dv.gemm(Mat::new(probs, l, l, true), doh, 1.0, 1.0);
            }
            gemm_cpu(ds, doh, vh.t(), 1.0, 0.0, Parallelism::None);
            for (i, (ds, p)) in ds.chunks_exact_mut(l).zip(probs.chunks_exact(l)).enumerate() {
                if dropout.is_some() {
                    // d(probs) = mask * (dout . v^T) / (1 - p): the same factors as the forward.
                    for (j, ds) in ds.iter_mut().enumerate() {
                        *ds *= keep_factor(dropout, rows(i) + j);
                    }
                }
                let rowdot = dot(p, ds);
                ds.iter_mut().zip(p).for_each(|(ds, &pj)| *ds = pj * (*ds - rowdot));
                if let Some(e) = extra {
                    ds.iter_mut().zip(&e[rows(i)..][..l]).for_each(|(ds, &e)| *ds += e);
                }
            }
            let ds = Mat::new(ds, l, l, false);
            dq.gemm(ds, kh, scale, 1.0);
            dk.gemm(ds.t(), qh, scale, 1.0);
        },
    );
}
