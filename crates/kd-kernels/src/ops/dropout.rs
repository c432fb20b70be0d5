//! Inverted dropout with a counter-based mask: element `i` is dropped iff
//! `rng::uniform(seed, i) < p`, and kept elements are scaled by `1 / (1 - p)`. The mask is a
//! function of (seed, index), so the backward recomputes it instead of storing it, and a CUDA
//! kernel draws the same one.
//!
//! The `_rows` variants address the mask by row: row `r`'s element `j` draws index
//! `r * row_step + j`. A gather of every L-th row of an `[N, D]` tensor (the [CLS] rows) passes
//! `row_step = L * D` and so gets exactly the masks those rows have in the full tensor.
use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use crate::cuda::{self, Module};
use crate::device::CudaDevice;
use crate::ops::bias::{add_inplace, elements};
use crate::rng::Uniforms;
use crate::simd::with_avx2;
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;
/// Mask draws made at once, on the stack, before they are applied.
const SEGMENT: usize = 1024;

/// `out = x * mask / (1 - p)`; `p = 0` copies `x`.
pub fn dropout_forward(out: &mut Tensor, x: &Tensor, p: f32, seed: u64) -> Result<()> {
    dropout_forward_rows(out, x, p, seed, x.last_dim())
}

/// Backward of [`dropout_forward`] with the same `p` and `seed`: `dx += dout * mask / (1 - p)`.
pub fn dropout_backward(dx: &mut Tensor, dout: &Tensor, p: f32, seed: u64) -> Result<()> {
    dropout_backward_rows(dx, dout, p, seed, dout.last_dim())
}

/// [`dropout_forward`] with rows `row_step` mask indices apart (see the module docs).
pub fn dropout_forward_rows(out: &mut Tensor, x: &Tensor, p: f32, seed: u64, row_step: usize) -> Result<()> {
    const OP: &str = "dropout_forward";
    check(OP, x, p, row_step)?;
    expect_shape(OP, "out", out, x.shape())?;
    let mask = Mask { p, seed, row_len: x.last_dim(), row_step };
    match common_device(OP, &[out, x])? {
        Device::Cpu => {
            let x = x.cpu()?;
            dropout_cpu(out.cpu_mut()?, x, mask, Write::Overwrite);
            Ok(())
        }
        Device::Cuda(dev) => dropout_cuda(OP, &dev, out, x, mask, false),
    }
}

/// `out = dropout(x) + residual` in one pass (a transformer layer's residual branches), with
/// rows `row_step` mask indices apart as in [`dropout_forward_rows`]; the same bits as
/// [`dropout_forward_rows`] followed by `bias::add_inplace(out, residual)`, which is what it
/// launches on a GPU.
pub fn dropout_residual_forward_rows(
    out: &mut Tensor,
    x: &Tensor,
    residual: &Tensor,
    p: f32,
    seed: u64,
    row_step: usize,
) -> Result<()> {
    const OP: &str = "dropout_residual_forward";
    check(OP, x, p, row_step)?;
    expect_shape(OP, "out", out, x.shape())?;
    expect_shape(OP, "residual", residual, x.shape())?;
    let mask = Mask { p, seed, row_len: x.last_dim(), row_step };
    match common_device(OP, &[out, x, residual])? {
        Device::Cpu => {
            let (x, residual) = (x.cpu()?, residual.cpu()?);
            dropout_cpu(out.cpu_mut()?, x, mask, Write::PlusResidual(residual));
            Ok(())
        }
        Device::Cuda(dev) => {
            dropout_cuda(OP, &dev, out, x, mask, false)?;
            add_inplace(out, residual)
        }
    }
}

/// [`dropout_backward`] with rows `row_step` mask indices apart (see the module docs).
pub fn dropout_backward_rows(dx: &mut Tensor, dout: &Tensor, p: f32, seed: u64, row_step: usize) -> Result<()> {
    const OP: &str = "dropout_backward";
    check(OP, dout, p, row_step)?;
    expect_shape(OP, "dx", dx, dout.shape())?;
    let mask = Mask { p, seed, row_len: dout.last_dim(), row_step };
    match common_device(OP, &[dx, dout])? {
        Device::Cpu => {
            let dout = dout.cpu()?;
            dropout_cpu(dx.cpu_mut()?, dout, mask, Write::Accumulate);
            Ok(())
        }
        Device::Cuda(dev) => dropout_cuda(OP, &dev, dx, dout, mask, true),
    }
}

/// One dropout site: its probability, seed and the mask layout of its rows.
#[derive(Clone, Copy)]
struct Mask {
    p: f32,
    seed: u64,
    row_len: usize,
    row_step: usize,
}

fn check(op: &'static str, x: &Tensor, p: f32, row_step: usize) -> Result<()> {
    check_p(op, p)?;
    if row_step < x.last_dim() {
        return Err(Error::invalid(op, format!("rows of {} lie {row_step} mask indices apart", x.last_dim())));
    }
    Ok(())
}

pub(crate) fn check_p(op: &'static str, p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(op, format!("p = {p}, expected 0 <= p < 1")));
    }
    Ok(())
}

/// How [`dropout_cpu`] writes the dropped values.
#[derive(Clone, Copy)]
enum Write<'a> {
    Overwrite,
    /// `+=`: the backward.
    Accumulate,
    /// `= dropped + residual[i]`.
    PlusResidual(&'a [f32]),
}

/// `dst[i] = src[i] * mask_i / (1 - p)`, written as `write` says, in segments that stay within
/// one row, so each draws its mask indices as one contiguous run.
fn dropout_cpu(dst: &mut [f32], src: &[f32], mask: Mask, write: Write) {
    let Mask { p, seed, row_len, row_step } = mask;
    let scale = 1.0 / (1.0 - p);
    let uniforms = Uniforms::new(seed);
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(c, (mut dst, mut src))| {
        let mut u = [0.0f32; SEGMENT];
        let mut i = c * CHUNK;
        while !dst.is_empty() {
            let (row, col) = (i / row_len, i % row_len);
            let len = (row_len - col).min(SEGMENT).min(dst.len());
            let u = &mut u[..len];
            if p > 0.0 {
                uniforms.fill((row * row_step + col) as u64, u);
            }
            let (d, rest) = std::mem::take(&mut dst).split_at_mut(len);
            let write = match write {
                Write::PlusResidual(r) => Write::PlusResidual(&r[i..][..len]),
                other => other,
            };
            apply(d, &src[..len], u, p, scale, write);
            (dst, src, i) = (rest, &src[len..], i + len);
        }
    });
}

/// `dst = src * scale where u >= p, else 0`, written as `write` says; `p = 0` keeps all, `u`
/// unread.
fn apply(dst: &mut [f32], src: &[f32], u: &[f32], p: f32, scale: f32, write: Write) {
    with_avx2!(dst: &mut [f32], src: &[f32], u: &[f32], p: f32, scale: f32, write: Write => {
        let kept = |s: f32, u: f32| if p == 0.0 || u >= p { s * scale } else { 0.0 };
        let values = dst.iter_mut().zip(src).zip(u);
        match write {
            Write::Overwrite => values.for_each(|((d, &s), &u)| *d = kept(s, u)),
            Write::Accumulate => values.for_each(|((d, &s), &u)| *d += kept(s, u)),
            Write::PlusResidual(r) => values.zip(r).for_each(|(((d, &s), &u), &r)| *d = kept(s, u) + r),
        }
    });
}

/// `kernels/dropout.cu`: [`dropout_cpu`] with one thread per element, drawing the same mask;
/// `accumulate` picks the backward's `+=` over the forward's `=`.
fn dropout_cuda(
    op: &'static str,
    dev: &CudaDevice,
    dst: &mut Tensor,
    src: &Tensor,
    mask: Mask,
    accumulate: bool,
) -> Result<()> {
    let n = elements(op, dst)?;
    if n == 0 {
        return Ok(());
    }
    let Mask { p, seed, row_len, row_step } = mask;
    // Computed here as the CPU does, so kept elements get bit-identical values.
    let scale = 1.0 / (1.0 - p);
    let accumulate = i32::from(accumulate);
    let (row_len, row_step) = (cuda::int(op, "row length", row_len)?, row_step as u64);
    let f = dev.function(Module::Dropout, "dropout_f32")?;
    let mut args = dev.stream.launch_builder(&f);
    args.arg(cuda::slice_mut(dst)?).arg(cuda::slice(src)?).arg(&n).arg(&row_len).arg(&row_step);
    args.arg(&p).arg(&scale).arg(&seed).arg(&accumulate);
    // SAFETY: dropout_f32(dst, src, n, row_len, row_step, p, scale, seed, accumulate); both
    // buffers hold n floats.
    unsafe { args.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
    Ok(())
}
