//! Inverted dropout with a counter-based mask: element `i` is dropped iff
//! `rng::uniform(seed, i) < p`, and kept elements are scaled by `1 / (1 - p)`. The mask is a
//! function of (seed, index), so the backward recomputes it instead of storing it, and a CUDA
//! kernel draws the same one.
use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use crate::cuda::{self, Module};
use crate::device::CudaDevice;
use crate::ops::bias::elements;
use crate::rng::uniform;
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// `out = x * mask / (1 - p)`; `p = 0` copies `x`.
pub fn dropout_forward(out: &mut Tensor, x: &Tensor, p: f32, seed: u64) -> Result<()> {
    const OP: &str = "dropout_forward";
    check_p(OP, p)?;
    expect_shape(OP, "out", out, x.shape())?;
    match common_device(OP, &[out, x])? {
        Device::Cpu => {
            let x = x.cpu()?;
            dropout_cpu(out.cpu_mut()?, x, p, seed, |o, v| *o = v);
            Ok(())
        }
        Device::Cuda(dev) => dropout_cuda(OP, &dev, out, x, p, seed, false),
    }
}

/// Backward of [`dropout_forward`] with the same `p` and `seed`: `dx += dout * mask / (1 - p)`.
pub fn dropout_backward(dx: &mut Tensor, dout: &Tensor, p: f32, seed: u64) -> Result<()> {
    const OP: &str = "dropout_backward";
    check_p(OP, p)?;
    expect_shape(OP, "dx", dx, dout.shape())?;
    match common_device(OP, &[dx, dout])? {
        Device::Cpu => {
            let dout = dout.cpu()?;
            dropout_cpu(dx.cpu_mut()?, dout, p, seed, |d, g| *d += g);
            Ok(())
        }
        Device::Cuda(dev) => dropout_cuda(OP, &dev, dx, dout, p, seed, true),
    }
}

pub(crate) fn check_p(op: &'static str, p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(op, format!("p = {p}, expected 0 <= p < 1")));
    }
    Ok(())
}

/// Applies `write(dst[i], src[i] * mask_i / (1 - p))` to every element; forward and backward
/// differ only in `write` (overwrite or accumulate).
fn dropout_cpu(dst: &mut [f32], src: &[f32], p: f32, seed: u64, write: impl Fn(&mut f32, f32) + Sync) {
    let scale = 1.0 / (1.0 - p);
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(c, (dst, src))| {
        let base = (c * CHUNK) as u64;
        for (i, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
            let kept = p == 0.0 || uniform(seed, base + i as u64) >= p;
            write(d, if kept { s * scale } else { 0.0 });
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
    p: f32,
    seed: u64,
    accumulate: bool,
) -> Result<()> {
    let n = elements(op, dst)?;
    if n == 0 {
        return Ok(());
    }
    // Computed here as the CPU does, so kept elements get bit-identical values.
    let scale = 1.0 / (1.0 - p);
    let accumulate = i32::from(accumulate);
    let f = dev.function(Module::Dropout, "dropout_f32")?;
    let mut args = dev.stream.launch_builder(&f);
    args.arg(cuda::slice_mut(dst)?).arg(cuda::slice(src)?).arg(&n).arg(&p).arg(&scale).arg(&seed).arg(&accumulate);
    // SAFETY: dropout_f32(dst, src, n, p, scale, seed, accumulate); both buffers hold n floats.
    unsafe { args.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
    Ok(())
}
