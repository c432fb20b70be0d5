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
//!
//! On a GPU the maps are materialised as in HF's eager attention: the matrix products of every
//! head run in one cuBLAS pointer-array batched call each (plain fp32), reading the heads in
//! place, and a row kernel fuses the mask, softmax and dropout (forward) or the dropout factors
//! and softmax backward (backward) between them; `kernels/attention.cu` lists the launches.
//!
//! Two pairs of entry points:
//! - [`attention_forward`] / [`attention_backward`]: the maps are materialised and the backward
//!   reads them (and takes `dscores_extra`). For callers that read the maps or the scores:
//!   attention-map KL and relation losses.
//! - [`attention_forward_stats`] / [`attention_backward_stats`]: the forward also writes each
//!   map row's softmax statistics `stats` `[B, H, L, 2]` (the max score and the sum of
//!   `exp(score - max)`), and the backward needs only them, the forward's output and the mask.
//!   Without `probs`, on CUDA with head dims 32 and 64 ([`flash_path`]) this is the flash path:
//!   tiled kernels that never hold an `[L, L]` map in memory (`kernels/attention.cu`). On the
//!   CPU, the reference, the forward materialises each head's map in scratch and the backward
//!   recomputes it from q, k, the mask and `stats` (`p = exp(s - max) / sum`, bit for bit the
//!   forward's softmax), so both devices compute the same function. Why two numbers per row
//!   rather than a logsumexp: a fully padded row's scores are all `f32::MIN`, and
//!   `f32::MIN + ln L` rounds to `f32::MIN`, which would turn the uniform `1 / L` into 1.
//!
//! The flash path applies the same dropout mask (the same counter per map element) in its
//! forward and backward, so it matches the materialised path with dropout too.
use std::marker::PhantomData;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use gemm::Parallelism;
use rayon::prelude::*;

use super::dropout::check_p;
use super::gemm::{gemm_batched_cuda, gemm_cpu, gemm_cpu_strided, GemmDims, Mat, PointerOperand};
use super::opt_rows_mut;
use crate::cuda::{self, Module};
use crate::device::CudaDevice;
use crate::rng::Uniforms;
use crate::simd::{exp, with_avx2};
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
        let dims = Dims::with_heads(op, x, maps, "probs", "[B, H, L, L]")?;
        expect_shape(op, "probs", maps, &dims.maps())?;
        Ok(dims)
    }

    /// As [`Dims::of`], with H from `stats` (`[B, H, L, 2]`).
    fn of_stats(op: &'static str, x: &Tensor, stats: &Tensor) -> Result<Dims> {
        let dims = Dims::with_heads(op, x, stats, "stats", "[B, H, L, 2]")?;
        expect_shape(op, "stats", stats, &dims.stats())?;
        Ok(dims)
    }

    /// B, L, H * Dh from `x`; H from the second axis of the 4-d `per_head`.
    fn with_heads(op: &'static str, x: &Tensor, per_head: &Tensor, what: &str, layout: &str) -> Result<Dims> {
        let [b, l, hd] = *x.shape() else {
            return Err(Error::shape(op, format!("q is {:?}, expected [B, L, H * Dh]", x.shape())));
        };
        let heads = match per_head.shape() {
            [_, h, _, _] => *h,
            s => return Err(Error::shape(op, format!("{what} is {s:?}, expected {layout}"))),
        };
        if heads == 0 || hd == 0 || hd % heads != 0 {
            return Err(Error::shape(op, format!("q's last dim {hd} does not split into {heads} heads")));
        }
        Ok(Dims { b, l, heads, dh: hd / heads })
    }

    fn maps(&self) -> [usize; 4] {
        [self.b, self.heads, self.l, self.l]
    }

    fn stats(&self) -> [usize; 4] {
        [self.b, self.heads, self.l, 2]
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
pub(super) fn active_dropout(op: &'static str, dropout: Option<AttentionDropout>) -> Result<Option<AttentionDropout>> {
    if let Some(d) = dropout {
        check_p(op, d.p)?;
    }
    Ok(dropout.filter(|d| d.p > 0.0))
}

/// `x[j] *= keep(first + j)` along a map row, `keep(i)` being the factor map element `i` is
/// multiplied by: 0 when dropped (`uniform(seed, i) < p`), `1 / (1 - p)` when kept, exactly 1
/// without dropout. The draws are made as runs of [`Uniforms`].
pub(super) fn scale_by_keep(x: &mut [f32], dropout: Option<AttentionDropout>, first: usize) {
    const SEGMENT: usize = 256;
    let Some(d) = dropout else { return };
    let (uniforms, scale) = (Uniforms::new(d.seed), 1.0 / (1.0 - d.p));
    let mut u = [0.0f32; SEGMENT];
    for (s, x) in x.chunks_mut(SEGMENT).enumerate() {
        let u = &mut u[..x.len()];
        uniforms.fill((first + s * SEGMENT) as u64, u);
        x.iter_mut().zip(&*u).for_each(|(x, &u)| *x *= if u < d.p { 0.0 } else { scale });
    }
}

/// `dropped[j] = p[j] * keep(row + j)` for the map row starting at flat index `row`.
fn drop_row(dropped: &mut [f32], p: &[f32], dropout: Option<AttentionDropout>, row: usize) {
    dropped.copy_from_slice(p);
    scale_by_keep(dropped, dropout, row);
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    let dims = Dims::of(OP, q, probs)?;
    forward(OP, dims, out, None, Some(probs), scores, (q, k, v, mask), dropout)
}

/// Forward that also writes `stats` `[B, H, L, 2]`, each map row's (max score, sum of
/// `exp(score - max)`), for [`attention_backward_stats`]. `probs` and `scores` are as in
/// [`attention_forward`] and optional; `scores` needs `probs`. Without `probs` the maps are not
/// kept: on CUDA this is the flash path, which needs [`flash_path`] (head dims 32 and 64).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_stats(
    out: &mut Tensor,
    stats: &mut Tensor,
    probs: Option<&mut Tensor>,
    scores: Option<&mut Tensor>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "attention_forward_stats";
    let dims = Dims::of_stats(OP, q, stats)?;
    if let Some(p) = &probs {
        expect_shape(OP, "probs", p, &dims.maps())?;
    } else if scores.is_some() {
        return Err(Error::invalid(OP, "scores are kept only with the maps: pass probs too"));
    }
    forward(OP, dims, out, Some(stats), probs, scores, (q, k, v, mask), dropout)
}

/// Both forwards after their own checks of `probs` / `stats`; at least one of them is given.
#[allow(clippy::too_many_arguments)]
fn forward(
    op: &'static str,
    dims: Dims,
    out: &mut Tensor,
    stats: Option<&mut Tensor>,
    probs: Option<&mut Tensor>,
    scores: Option<&mut Tensor>,
    (q, k, v, mask): (&Tensor, &Tensor, &Tensor, &Tensor),
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    let dropout = active_dropout(op, dropout)?;
    for (what, t) in [("k", k), ("v", v), ("out", &*out)] {
        expect_shape(op, what, t, q.shape())?;
    }
    expect_shape(op, "mask", mask, &[dims.b, dims.l])?;
    let mut tensors = vec![&*out, q, k, v, mask];
    tensors.extend(stats.as_deref());
    tensors.extend(probs.as_deref());
    if let Some(s) = &scores {
        expect_shape(op, "scores", s, &dims.maps())?;
        tensors.push(s);
    }
    match common_device(op, &tensors)? {
        Device::Cpu => {
            let maps = CpuMaps {
                probs: probs.map(Tensor::cpu_mut).transpose()?,
                scores: scores.map(Tensor::cpu_mut).transpose()?,
                stats: stats.map(Tensor::cpu_mut).transpose()?,
            };
            attention_forward_cpu(dims, out.cpu_mut()?, maps, q.cpu()?, k.cpu()?, v.cpu()?, mask.cpu()?, dropout);
            Ok(())
        }
        Device::Cuda(dev) => match (probs, stats) {
            (Some(probs), stats) => {
                attention_forward_cuda(&dev, dims, out, probs, scores, stats, (q, k, v, mask), dropout)
            }
            (None, Some(stats)) => flash_forward_cuda(&dev, op, dims, out, stats, (q, k, v, mask), dropout),
            (None, None) => Err(Error::invalid(op, "neither probs nor stats to write")),
        },
    }
}

/// The CPU forward's optional outputs besides `out`.
struct CpuMaps<'a> {
    probs: Option<&'a mut [f32]>,
    scores: Option<&'a mut [f32]>,
    stats: Option<&'a mut [f32]>,
}

/// `probs = scale * q . k^T + (1 - mask) * f32::MIN` for one head: the masked scores.
fn head_scores(probs: &mut [f32], q: Mat, k: Mat, mask: &[f32], scale: f32) {
    gemm_cpu(probs, q, k.t(), scale, 0.0, Parallelism::None);
    for p in probs.chunks_exact_mut(mask.len()) {
        p.iter_mut().zip(mask).for_each(|(p, &m)| *p += (1.0 - m) * f32::MIN);
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_forward_cpu(
    dims: Dims,
    out: &mut [f32],
    maps: CpuMaps,
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
    let n = dims.b * heads;
    // Per-task scratch: the map when the caller keeps none, the dropped probabilities with
    // dropout (without, `out` reads the probabilities themselves).
    let own_map = if maps.probs.is_none() { l * l } else { 0 };
    let dropped_len = if dropout.is_some() { l * l } else { 0 };
    let per_head = opt_rows_mut(maps.probs, l * l, n).zip(opt_rows_mut(maps.scores, l * l, n));
    per_head.zip(opt_rows_mut(maps.stats, 2 * l, n)).enumerate().for_each_init(
        || (vec![0.0f32; own_map], vec![0.0f32; dropped_len]),
        |(own, dropped), (bh, ((probs, scores), stats))| {
            let probs = probs.unwrap_or(&mut own[..]);
            let (b, h) = (bh / heads, bh % heads);
            let (qh, kh, vh) = (dims.head(q, b, h), dims.head(k, b, h), dims.head(v, b, h));
            head_scores(probs, qh, kh, &mask[b * l..][..l], scale);
            if let Some(s) = scores {
                s.copy_from_slice(probs);
            }
            match stats {
                Some(stats) => {
                    for (p, st) in probs.chunks_exact_mut(l).zip(stats.chunks_exact_mut(2)) {
                        let (max, sum) = softmax_in_place(p);
                        st.copy_from_slice(&[max, sum]);
                    }
                }
                None => probs.chunks_exact_mut(l).for_each(|p| {
                    softmax_in_place(p);
                }),
            }
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

/// The most operands one CUDA call's products read: the backward's q, k, v, dout, dq, dk, dv, the
/// score gradient and the weights of dv (`kernels/attention.cu`'s ATT_OPERANDS).
const ATT_OPERANDS: usize = 9;

/// `attention_pointers_f32`'s operand table: device addresses, then batch and head strides in
/// floats; the slots past a call's operands stay 0.
type Operands = [[u64; ATT_OPERANDS]; 3];

impl Dims {
    /// `[B * H * L, L, H * L]`: the map rows, their length and the rows per example, as the row
    /// kernels take them (`gemm_batched_cuda` checks the products' sizes).
    fn cuda_ints(&self, op: &'static str) -> Result<[i32; 3]> {
        let rows = self.b * self.heads * self.l;
        Ok([
            cuda::int(op, "B * H * L", rows)?,
            cuda::int(op, "L", self.l)?,
            cuda::int(op, "H * L", self.heads * self.l)?,
        ])
    }

    /// The row kernels' launch: one warp per map row.
    fn row_launch(&self) -> LaunchConfig {
        let rows = self.b * self.heads * self.l;
        let per_block = (cuda::ROW_BLOCK / 32) as usize;
        LaunchConfig {
            grid_dim: (rows.div_ceil(per_block) as u32, 1, 1),
            block_dim: (cuda::ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// One CUDA call's scratch, in floats: the operands' pointer arrays (`ATT_OPERANDS * B * H`
/// addresses, two floats each), then `maps` `[B, H, L, L]` buffers, each region on a 256-byte
/// boundary, as cuBLAS's vector loads like.
struct Scratch {
    pointers: usize,
    map: usize,
    maps: usize,
}

impl Scratch {
    fn new(dims: Dims, maps: usize) -> Self {
        let aligned = |floats: usize| floats.next_multiple_of(64);
        let heads = dims.b * dims.heads;
        Scratch { pointers: aligned(2 * ATT_OPERANDS * heads), map: aligned(heads * dims.l * dims.l), maps }
    }

    fn len(&self) -> usize {
        self.pointers + self.maps * self.map
    }

    /// The device address of map buffer `i` of a scratch buffer at `base`.
    fn map_at(&self, base: u64, i: usize) -> u64 {
        assert!(i < self.maps, "attention scratch: map {i} of {}", self.maps);
        base + 4 * (self.pointers + i * self.map) as u64
    }
}

/// The operands of one call's batched products: each gets an array of B * H head addresses at the
/// front of the scratch, which `write` fills on the device.
struct HeadArrays {
    dims: Dims,
    table: Operands,
    count: usize,
    /// The device address of the first array (the scratch's).
    at: u64,
}

impl HeadArrays {
    fn new(dims: Dims, at: u64) -> Self {
        HeadArrays { dims, table: [[0; ATT_OPERANDS]; 3], count: 0, at }
    }

    /// The operand whose head (b, h) is at `ptr + b * batch_stride + h * head_stride` floats, with
    /// rows `ld` floats apart.
    fn add(&mut self, ptr: u64, batch_stride: usize, head_stride: usize, ld: usize) -> PointerOperand {
        let t = self.count;
        assert!(t < ATT_OPERANDS, "attention: more than {ATT_OPERANDS} operands");
        self.count += 1;
        self.table[0][t] = ptr;
        self.table[1][t] = batch_stride as u64;
        self.table[2][t] = head_stride as u64;
        let heads = self.dims.b * self.dims.heads;
        PointerOperand { ptrs: self.at + (8 * t * heads) as u64, ld, transpose: false }
    }

    /// A `[B, L, H * Dh]` activation: head (b, h) is `[L, Dh]`, its rows H * Dh apart.
    fn activation(&mut self, ptr: u64) -> PointerOperand {
        let d = self.dims;
        self.add(ptr, d.l * d.hd(), d.dh, d.hd())
    }

    /// A `[B, H, L, L]` map: head (b, h) is a packed `[L, L]`.
    fn map(&mut self, ptr: u64) -> PointerOperand {
        let d = self.dims;
        self.add(ptr, d.heads * d.l * d.l, d.l * d.l, d.l)
    }

    /// Writes the arrays of the operands added so far (`attention_pointers_f32`).
    fn write(&self, dev: &CudaDevice, op: &'static str) -> Result<()> {
        let heads = self.dims.b * self.dims.heads;
        let n = cuda::int(op, "pointer count", self.count * heads)?;
        let (count, heads_total, h) = (self.count as i32, cuda::int(op, "B * H", heads)?, self.dims.heads as i32);
        let f = dev.function(Module::Attention, "attention_pointers_f32")?;
        let mut b = dev.stream.launch_builder(&f);
        b.arg(&self.at).arg(&self.table).arg(&count).arg(&heads_total).arg(&h);
        // SAFETY: attention_pointers_f32(ptrs, ops, operands, heads_total, H) writes `n` addresses
        // at `at`, the front of a scratch of at least ATT_OPERANDS * B * H of them
        // (`Scratch::new`), which the caller holds; it reads no operand's memory.
        unsafe { b.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `c = alpha * op(a) . op(b) + beta * c` for every head, op(a) `[m, k]` and op(b) `[k, n]`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        dev: &CudaDevice,
        (m, n, k): (usize, usize, usize),
        a: PointerOperand,
        b: PointerOperand,
        c: PointerOperand,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let dims = GemmDims { batch: self.dims.b * self.dims.heads, m, n, k };
        // SAFETY: `write` filled the arrays earlier on the stream; every operand was added from a
        // buffer of the call whose guard the caller holds across the products, with the strides
        // and leading dimension of its shape (checked by attention_forward / _backward), and no
        // product writes a buffer it reads.
        unsafe { gemm_batched_cuda(dev, dims, a, b, c, alpha, beta) }
    }
}

/// The CUDA forward, four launches: the pointer arrays; `probs = scale * q . k^T` per head
/// (cuBLAS); `attention_softmax_f32` adds the mask, keeps `scores`, takes the softmax (keeping
/// `stats`) and, with dropout, writes the dropped probabilities into scratch; `out = weights . v`
/// per head (cuBLAS), the weights being the dropped probabilities or `probs`.
#[allow(clippy::too_many_arguments)]
fn attention_forward_cuda(
    dev: &CudaDevice,
    dims: Dims,
    out: &mut Tensor,
    probs: &mut Tensor,
    scores: Option<&mut Tensor>,
    stats: Option<&mut Tensor>,
    (q, k, v, mask): (&Tensor, &Tensor, &Tensor, &Tensor),
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "attention_forward";
    if dims.is_empty() {
        return Ok(());
    }
    let [rows, l_int, hl] = dims.cuda_ints(OP)?;
    let scale = 1.0 / (dims.dh as f32).sqrt();
    let (drop_p, seed) = dropout.map_or((0.0f32, 0u64), |d| (d.p, d.seed));
    let softmax = dev.function(Module::Attention, "attention_softmax_f32")?;
    // cuBLAS and the kernels get raw addresses; each buffer's guard, held to the end, orders its
    // use against other streams, as cudarc's own launches do.
    let s = &dev.stream;
    let (q, _q) = cuda::slice(q)?.device_ptr(s);
    let (k, _k) = cuda::slice(k)?.device_ptr(s);
    let (v, _v) = cuda::slice(v)?.device_ptr(s);
    let (mask, _mask) = cuda::slice(mask)?.device_ptr(s);
    let (out, _out) = cuda::slice_mut(out)?.device_ptr_mut(s);
    let (probs, _probs) = cuda::slice_mut(probs)?.device_ptr_mut(s);
    let scores = scores.map(|t| cuda::slice_mut(t).map(|x| x.device_ptr_mut(s))).transpose()?;
    let scores_ptr = scores.as_ref().map_or(0, |(p, _)| *p);
    let stats = stats.map(|t| cuda::slice_mut(t).map(|x| x.device_ptr_mut(s))).transpose()?;
    let stats_ptr = stats.as_ref().map_or(0, |(p, _)| *p);
    let layout = Scratch::new(dims, usize::from(dropout.is_some()));
    dev.with_scratch(layout.len(), |scratch| {
        let (base, _scratch) = scratch.device_ptr_mut(s);
        let dropped = dropout.map(|_| layout.map_at(base, 0));
        let mut heads = HeadArrays::new(dims, base);
        let [qh, kh, vh, out_h] = [q, k, v, out].map(|p| heads.activation(p));
        let (probs_h, weights) = (heads.map(probs), heads.map(dropped.unwrap_or(probs)));
        heads.write(dev, OP)?;
        let (l, dh) = (dims.l, dims.dh);
        heads.gemm(dev, (l, l, dh), qh, kh.t(), probs_h, scale, 0.0)?;
        {
            let dropped = dropped.unwrap_or(0);
            let mut b = s.launch_builder(&softmax);
            b.arg(&probs).arg(&scores_ptr).arg(&stats_ptr).arg(&dropped).arg(&mask);
            b.arg(&rows).arg(&l_int).arg(&hl).arg(&drop_p).arg(&seed);
            // SAFETY: attention_softmax_f32(probs, scores, stats, dropped, mask, rows, L, hl,
            // drop_p, seed): probs, scores (0: none) and dropped (a scratch map, 0: none) hold
            // B * H * L rows of L floats, stats (0: none) B * H * L pairs, mask B rows of L; all
            // are held.
            unsafe { b.launch(dims.row_launch()) }.map_err(cuda_err)?;
        }
        heads.gemm(dev, (l, dh, l), weights, vh, out_h, 1.0, 0.0)
    })
}

/// The CUDA backward, six launches: the pointer arrays; `ds = dout . v^T` per head (cuBLAS) into
/// scratch; `attention_softmax_backward_f32` applies the dropout factors and the softmax
/// backward (+ dscores_extra) in place and, with dropout, writes the dropped probabilities into
/// scratch; then per head (cuBLAS, beta = 1) `dv += weights^T . dout`, `dq += scale ds . k` and
/// `dk += scale ds^T . q`, the weights being the dropped probabilities or `probs`.
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
    let [rows, l_int, _] = dims.cuda_ints(OP)?;
    let scale = 1.0 / (dims.dh as f32).sqrt();
    let (drop_p, seed) = dropout.map_or((0.0f32, 0u64), |d| (d.p, d.seed));
    let softmax_backward = dev.function(Module::Attention, "attention_softmax_backward_f32")?;
    // Raw addresses under held guards, as in the forward.
    let s = &dev.stream;
    let (dout, _dout) = cuda::slice(dout)?.device_ptr(s);
    let (q, _q) = cuda::slice(q)?.device_ptr(s);
    let (k, _k) = cuda::slice(k)?.device_ptr(s);
    let (v, _v) = cuda::slice(v)?.device_ptr(s);
    let (probs, _probs) = cuda::slice(probs)?.device_ptr(s);
    let extra = extra.map(|t| cuda::slice(t).map(|x| x.device_ptr(s))).transpose()?;
    let extra_ptr = extra.as_ref().map_or(0, |(p, _)| *p);
    let (dq, _dq) = cuda::slice_mut(dq)?.device_ptr_mut(s);
    let (dk, _dk) = cuda::slice_mut(dk)?.device_ptr_mut(s);
    let (dv, _dv) = cuda::slice_mut(dv)?.device_ptr_mut(s);
    let layout = Scratch::new(dims, 1 + usize::from(dropout.is_some()));
    dev.with_scratch(layout.len(), |scratch| {
        let (base, _scratch) = scratch.device_ptr_mut(s);
        let ds = layout.map_at(base, 0);
        let dropped = dropout.map(|_| layout.map_at(base, 1));
        let mut heads = HeadArrays::new(dims, base);
        let [qh, kh, vh, dout_h, dq_h, dk_h, dv_h] = [q, k, v, dout, dq, dk, dv].map(|p| heads.activation(p));
        let (ds_h, weights) = (heads.map(ds), heads.map(dropped.unwrap_or(probs)));
        heads.write(dev, OP)?;
        let (l, dh) = (dims.l, dims.dh);
        heads.gemm(dev, (l, l, dh), dout_h, vh.t(), ds_h, 1.0, 0.0)?;
        {
            let dropped = dropped.unwrap_or(0);
            let mut b = s.launch_builder(&softmax_backward);
            b.arg(&ds).arg(&dropped).arg(&probs).arg(&extra_ptr);
            b.arg(&rows).arg(&l_int).arg(&drop_p).arg(&seed);
            // SAFETY: attention_softmax_backward_f32(ds, dropped, probs, extra, rows, L, drop_p,
            // seed): ds and dropped (0: none) are scratch maps, probs and extra (0: none) the
            // caller's; each holds B * H * L rows of L floats, and all are held.
            unsafe { b.launch(dims.row_launch()) }.map_err(cuda_err)?;
        }
        heads.gemm(dev, (l, dh, l), weights.t(), dout_h, dv_h, 1.0, 1.0)?;
        heads.gemm(dev, (l, dh, l), ds_h, kh, dq_h, scale, 1.0)?;
        heads.gemm(dev, (l, dh, l), ds_h.t(), qh, dk_h, scale, 1.0)
    })
}

/// The flash kernels' tile (`FA_TILE`: queries or keys per block and per streamed tile), row
/// padding in shared memory (`FA_PAD`) and threads per block (`FA_THREADS`), as in
/// `kernels/attention.cu`.
const FLASH_TILE: usize = 64;
const FLASH_PAD: usize = 4;
const FLASH_THREADS: u32 = 256;

/// The flash kernels of one head dim: forward, rowdot, dk/dv, dq.
fn flash_kernels(op: &'static str, dh: usize) -> Result<[&'static str; 4]> {
    match dh {
        32 => Ok([
            "attention_flash_forward_d32_f32",
            "attention_flash_rowdot_d32_f32",
            "attention_flash_dkv_d32_f32",
            "attention_flash_dq_d32_f32",
        ]),
        64 => Ok([
            "attention_flash_forward_d64_f32",
            "attention_flash_rowdot_d64_f32",
            "attention_flash_dkv_d64_f32",
            "attention_flash_dq_d64_f32",
        ]),
        _ => Err(Error::invalid(op, format!("the flash kernels take head dims 32 and 64, not {dh}: keep the maps"))),
    }
}

/// Dynamic shared memory in bytes of the forward, dk/dv and dq kernels at head dim `dh`:
/// `FA_FORWARD_FLOATS`, `FA_DKV_FLOATS` and `FA_DQ_FLOATS` of `kernels/attention.cu`.
fn flash_shared_bytes(dh: usize) -> [usize; 3] {
    let (t, row, score) = (FLASH_TILE, FLASH_TILE * (dh + FLASH_PAD), FLASH_TILE * (FLASH_TILE + FLASH_PAD));
    [3 * row + score + t, 4 * row + 2 * score + 4 * t, 4 * row + score + t].map(|floats| 4 * floats)
}

/// Whether [`attention_forward_stats`] without `probs` takes the flash path on `device`: a GPU,
/// head dim 32 or 64, and room on the GPU for the kernels' shared memory (up to 103 KiB a block).
/// Elsewhere callers keep the maps: on the CPU leaving them out works but only makes the
/// backward recompute them, and on CUDA it is an error.
pub fn flash_path(device: &Device, head_dim: usize) -> bool {
    let Device::Cuda(dev) = device else { return false };
    let need = flash_shared_bytes(head_dim).into_iter().max().unwrap_or(0);
    let max = dev.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
    matches!(head_dim, 32 | 64) && max.is_ok_and(|m| m as usize >= need)
}

/// A flash kernel with its dynamic shared memory allowed (past the default 48 KiB), and its
/// launch: `(ceil(L / FLASH_TILE), B * H)` blocks.
fn flash_kernel(
    dev: &CudaDevice,
    op: &'static str,
    name: &'static str,
    dims: Dims,
    bytes: usize,
) -> Result<(CudaFunction, LaunchConfig)> {
    let f = dev.function(Module::Attention, name)?;
    dev.ctx.bind_to_thread().map_err(cuda_err)?;
    let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    f.set_attribute(attr, bytes as i32).map_err(|e| {
        Error::Cuda(format!("{op}: {name} cannot have {bytes} bytes of shared memory on this GPU: {e}"))
    })?;
    let heads = u32::try_from(dims.b * dims.heads).ok().filter(|&n| n <= 65_535);
    let heads = heads
        .ok_or_else(|| Error::invalid(op, format!("B * H = {} is over 65,535 (the grid's y)", dims.b * dims.heads)))?;
    let cfg = LaunchConfig {
        grid_dim: (dims.l.div_ceil(FLASH_TILE) as u32, heads, 1),
        block_dim: (FLASH_THREADS, 1, 1),
        shared_mem_bytes: bytes as u32,
    };
    Ok((f, cfg))
}

/// The flash forward, one launch (`attention_flash_forward_*`): `out` and `stats`, no maps.
fn flash_forward_cuda(
    dev: &CudaDevice,
    op: &'static str,
    dims: Dims,
    out: &mut Tensor,
    stats: &mut Tensor,
    (q, k, v, mask): (&Tensor, &Tensor, &Tensor, &Tensor),
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    let [forward, ..] = flash_kernels(op, dims.dh)?;
    if dims.is_empty() {
        return Ok(());
    }
    let (l, h) = (cuda::int(op, "L", dims.l)?, cuda::int(op, "H", dims.heads)?);
    cuda::int(op, "B * H * L", dims.b * dims.heads * dims.l)?;
    let scale = 1.0 / (dims.dh as f32).sqrt();
    let (drop_p, seed) = dropout.map_or((0.0f32, 0u64), |d| (d.p, d.seed));
    let (f, cfg) = flash_kernel(dev, op, forward, dims, flash_shared_bytes(dims.dh)[0])?;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(cuda::slice_mut(out)?).arg(cuda::slice_mut(stats)?);
    b.arg(cuda::slice(q)?).arg(cuda::slice(k)?).arg(cuda::slice(v)?).arg(cuda::slice(mask)?);
    b.arg(&l).arg(&h).arg(&scale).arg(&drop_p).arg(&seed);
    // SAFETY: attention_flash_forward_*(out, stats, q, k, v, mask, L, H, scale, drop_p, seed):
    // out, q, k, v are [B, L, H * Dh] with Dh the kernel's, stats [B, H, L, 2] and mask [B, L]
    // (checked by the caller); each tensor owns its allocation, which the driver aligns for any
    // type, and Dh and H * Dh are multiples of 4, so the kernel's float4 accesses are aligned;
    // the grid and shared memory are the kernel's (flash_kernel).
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// The flash backward, three launches: `attention_flash_rowdot_*` writes D = rowsum(dout * out)
/// into scratch; `attention_flash_dq_*` adds dq and `attention_flash_dkv_*` dk and dv.
#[allow(clippy::too_many_arguments)]
fn flash_backward_cuda(
    dev: &CudaDevice,
    op: &'static str,
    dims: Dims,
    (dq, dk, dv): (&mut Tensor, &mut Tensor, &mut Tensor),
    dout: &Tensor,
    (q, k, v, mask): (&Tensor, &Tensor, &Tensor, &Tensor),
    out: &Tensor,
    stats: &Tensor,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    let [_, rowdot, dkv, dq_kernel] = flash_kernels(op, dims.dh)?;
    if dims.is_empty() {
        return Ok(());
    }
    let (l, h) = (cuda::int(op, "L", dims.l)?, cuda::int(op, "H", dims.heads)?);
    let rows_n = dims.b * dims.heads * dims.l;
    let rows = cuda::int(op, "B * H * L", rows_n)?;
    let scale = 1.0 / (dims.dh as f32).sqrt();
    let (drop_p, seed) = dropout.map_or((0.0f32, 0u64), |d| (d.p, d.seed));
    let [_, dkv_bytes, dq_bytes] = flash_shared_bytes(dims.dh);
    let (dkv_f, dkv_cfg) = flash_kernel(dev, op, dkv, dims, dkv_bytes)?;
    let (dq_f, dq_cfg) = flash_kernel(dev, op, dq_kernel, dims, dq_bytes)?;
    let rowdot_f = dev.function(Module::Attention, rowdot)?;
    let (dout, q, k, v, mask) =
        (cuda::slice(dout)?, cuda::slice(q)?, cuda::slice(k)?, cuda::slice(v)?, cuda::slice(mask)?);
    let (out, stats) = (cuda::slice(out)?, cuda::slice(stats)?);
    dev.with_scratch(rows_n, |drow| {
        let s = &dev.stream;
        {
            // One group of Dh / 4 lanes per query row.
            let per_block = (cuda::ROW_BLOCK as usize) / (dims.dh / 4);
            let cfg = LaunchConfig {
                grid_dim: (rows_n.div_ceil(per_block) as u32, 1, 1),
                block_dim: (cuda::ROW_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = s.launch_builder(&rowdot_f);
            b.arg(&mut *drow).arg(dout).arg(out).arg(&rows).arg(&l).arg(&h);
            // SAFETY: attention_flash_rowdot_*(drow, dout, out, rows, L, H): dout and out are
            // [B, L, H * Dh] (rows = B * L * H rows of Dh, aligned as in the forward), drow the
            // scratch of at least B * H * L floats.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        }
        let drow = &*drow;
        {
            let mut b = s.launch_builder(&dq_f);
            b.arg(cuda::slice_mut(dq)?).arg(q).arg(k).arg(v).arg(dout).arg(stats).arg(drow).arg(mask);
            b.arg(&l).arg(&h).arg(&scale).arg(&drop_p).arg(&seed);
            // SAFETY: attention_flash_dq_*(dq, q, k, v, dout, stats, drow, mask, L, H, scale,
            // drop_p, seed): shapes checked by the caller, drow written above; grid and shared
            // memory from flash_kernel.
            unsafe { b.launch(dq_cfg) }.map_err(cuda_err)?;
        }
        let mut b = s.launch_builder(&dkv_f);
        b.arg(cuda::slice_mut(dk)?).arg(cuda::slice_mut(dv)?).arg(q).arg(k).arg(v).arg(dout).arg(stats).arg(drow);
        b.arg(mask).arg(&l).arg(&h).arg(&scale).arg(&drop_p).arg(&seed);
        // SAFETY: attention_flash_dkv_*(dk, dv, q, k, v, dout, stats, drow, mask, L, H, scale,
        // drop_p, seed): as for dq.
        unsafe { b.launch(dkv_cfg) }.map_err(cuda_err)?;
        Ok(())
    })
}

/// Softmax of a row of scores in place; returns the row's (max, sum of `exp(x - max)`), the
/// statistics from which [`probs_from_stats`] recomputes the same bits.
pub(super) fn softmax_in_place(x: &mut [f32]) -> (f32, f32) {
    with_avx2!(-> (f32, f32); x: &mut [f32] => {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        // Eight running sums, added up in a fixed order at the end: vector lanes, same bits.
        let mut lanes = [0.0f32; 8];
        for chunk in x.chunks_mut(8) {
            for (lane, x) in lanes.iter_mut().zip(chunk) {
                *x = exp(*x - max);
                *lane += *x;
            }
        }
        let sum = lanes.iter().sum::<f32>();
        let inv = 1.0 / sum;
        x.iter_mut().for_each(|x| *x *= inv);
        (max, sum)
    })
}

/// The second half of [`softmax_in_place`] from its statistics: a row of scores becomes the
/// probabilities, `exp(x - max) * (1 / sum)`.
fn probs_from_stats(x: &mut [f32], max: f32, sum: f32) {
    with_avx2!(x: &mut [f32], max: f32, sum: f32 => {
        let inv = 1.0 / sum;
        x.iter_mut().for_each(|x| *x = exp(*x - max) * inv);
    })
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
            attention_backward_cpu(dims, grads, dout, q, k, v, CpuProbs::Kept(probs.cpu()?), extra, dropout);
            Ok(())
        }
        Device::Cuda(dev) => {
            attention_backward_cuda(&dev, dims, (dq, dk, dv), dout, q, k, v, probs, dscores_extra, dropout)
        }
    }
}

/// Backward from the forward's softmax statistics instead of its maps: dq, dk, dv
/// (`[B, L, H * Dh]`) accumulate. `out` is the forward's output and `stats` its statistics
/// ([`attention_forward_stats`]); q, k, v, `mask` and `dropout` must be the forward's. The
/// gradients are [`attention_backward`]'s at the forward's probabilities. There is no
/// `dscores_extra`: losses on the scores keep the maps and use [`attention_backward`].
///
/// On CUDA this is the flash backward (head dims 32 and 64, [`flash_path`]), which takes the
/// softmax backward's row dot `p . dp` as `dout . out`; the CPU recomputes each head's map from
/// `stats` (bit for bit the forward's) and runs the reference backward, which does not read `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_stats(
    dq: &mut Tensor,
    dk: &mut Tensor,
    dv: &mut Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    stats: &Tensor,
    mask: &Tensor,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "attention_backward_stats";
    let dropout = active_dropout(OP, dropout)?;
    let dims = Dims::of_stats(OP, q, stats)?;
    let named = [("k", k), ("v", v), ("dout", dout), ("out", out), ("dq", &*dq), ("dk", &*dk), ("dv", &*dv)];
    for (what, t) in named {
        expect_shape(OP, what, t, q.shape())?;
    }
    expect_shape(OP, "mask", mask, &[dims.b, dims.l])?;
    match common_device(OP, &[&*dq, &*dk, &*dv, dout, q, k, v, out, stats, mask])? {
        Device::Cpu => {
            let grads = (dq.cpu_mut()?, dk.cpu_mut()?, dv.cpu_mut()?);
            let probs = CpuProbs::FromStats { mask: mask.cpu()?, stats: stats.cpu()? };
            attention_backward_cpu(dims, grads, dout.cpu()?, q.cpu()?, k.cpu()?, v.cpu()?, probs, None, dropout);
            Ok(())
        }
        Device::Cuda(dev) => {
            flash_backward_cuda(&dev, OP, dims, (dq, dk, dv), dout, (q, k, v, mask), out, stats, dropout)
        }
    }
}

/// Where the CPU backward gets each head's probabilities.
#[derive(Clone, Copy)]
enum CpuProbs<'a> {
    /// The forward's maps, `[B, H, L, L]`.
    Kept(&'a [f32]),
    /// Recomputed from q, k, the mask `[B, L]` and the statistics `[B, H, L, 2]`.
    FromStats { mask: &'a [f32], stats: &'a [f32] },
}

#[allow(clippy::too_many_arguments)]
fn attention_backward_cpu(
    dims: Dims,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: CpuProbs,
    extra: Option<&[f32]>,
    dropout: Option<AttentionDropout>,
) {
    if dims.is_empty() {
        return;
    }
    let Dims { l, heads, .. } = dims;
    let scale = 1.0 / (dims.dh as f32).sqrt();
    let (dq, dk, dv) = (HeadColumns::new(dq, dims), HeadColumns::new(dk, dims), HeadColumns::new(dv, dims));
    let own_map = if matches!(probs, CpuProbs::Kept(_)) { 0 } else { l * l };
    // Per rayon job: one [L, L] block of scratch, first the dropped probabilities (with dropout),
    // then the score gradient of the head; and the recomputed map when the maps were not kept.
    (0..dims.b * heads).into_par_iter().for_each_init(
        || (vec![0.0f32; l * l], vec![0.0f32; own_map]),
        |(ds, own), bh| {
            let (b, h) = (bh / heads, bh % heads);
            let probs: &[f32] = match probs {
                CpuProbs::Kept(p) => &p[bh * l * l..][..l * l],
                CpuProbs::FromStats { mask, stats } => {
                    head_scores(own, dims.head(q, b, h), dims.head(k, b, h), &mask[b * l..][..l], scale);
                    let stats = &stats[bh * 2 * l..][..2 * l];
                    for (row, st) in own.chunks_exact_mut(l).zip(stats.chunks_exact(2)) {
                        probs_from_stats(row, st[0], st[1]);
                    }
                    &own[..]
                }
            };
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
                // d(probs) = mask * (dout . v^T) / (1 - p): the same factors as the forward.
                scale_by_keep(ds, dropout, rows(i));
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
