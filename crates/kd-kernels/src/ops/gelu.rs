//! Activations: exact GELU, HF's `"gelu"`: `0.5 * x * (1 + erf(x / sqrt 2))`, and tanh (the
//! pooler's).
//!
//! For GELU, `1 + erf(z)` is written `erfc(-z)`, which keeps full relative precision in the left tail
//! where `1 + erf(z)` cancels to nothing. It is evaluated in f64: in f32 the rounding of
//! `x / sqrt 2` alone costs a few 1e-6 of relative precision in the tails, and `erfcf` is only
//! about 30% faster than `erfc`.
use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use crate::cuda::{self, Module};
use crate::ops::bias::elements;
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Result, Tensor};

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// `out = gelu(x)`.
pub fn gelu_forward(out: &mut Tensor, x: &Tensor) -> Result<()> {
    map_forward("gelu_forward", "gelu_forward_f32", out, x, gelu)
}

/// `dx += dout * gelu'(x)`.
pub fn gelu_backward(dx: &mut Tensor, dout: &Tensor, x: &Tensor) -> Result<()> {
    map_backward("gelu_backward", "gelu_backward_f32", dx, dout, x, gelu_grad)
}

/// `out = tanh(x)` (BERT's pooler activation).
pub fn tanh_forward(out: &mut Tensor, x: &Tensor) -> Result<()> {
    map_forward("tanh_forward", "tanh_forward_f32", out, x, f32::tanh)
}

/// `dx += dout * (1 - y^2)`, from the forward's output `y = tanh(x)`.
pub fn tanh_backward(dx: &mut Tensor, dout: &Tensor, y: &Tensor) -> Result<()> {
    map_backward("tanh_backward", "tanh_backward_f32", dx, dout, y, |y| 1.0 - y * y)
}

/// `out = f(x)` element-wise; on a GPU, `kernel` of `kernels/gelu.cu` is that map.
fn map_forward(
    op: &'static str,
    kernel: &'static str,
    out: &mut Tensor,
    x: &Tensor,
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<()> {
    expect_shape(op, "out", out, x.shape())?;
    match common_device(op, &[out, x])? {
        Device::Cpu => {
            let x = x.cpu()?;
            out.cpu_mut()?.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(out, x)| {
                out.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v));
            });
            Ok(())
        }
        Device::Cuda(dev) => {
            let n = elements(op, out)?;
            if n == 0 {
                return Ok(());
            }
            let f = dev.function(Module::Gelu, kernel)?;
            let mut args = dev.stream.launch_builder(&f);
            args.arg(cuda::slice_mut(out)?).arg(cuda::slice(x)?).arg(&n);
            // SAFETY: the *_forward_f32 kernels take (out, x, n); both buffers hold n floats.
            unsafe { args.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// `dx += dout * grad(saved)` element-wise, `saved` being what the forward kept (input or output);
/// on a GPU, `kernel` of `kernels/gelu.cu` does it.
fn map_backward(
    op: &'static str,
    kernel: &'static str,
    dx: &mut Tensor,
    dout: &Tensor,
    saved: &Tensor,
    grad: impl Fn(f32) -> f32 + Sync,
) -> Result<()> {
    expect_shape(op, "dx", dx, saved.shape())?;
    expect_shape(op, "dout", dout, saved.shape())?;
    match common_device(op, &[dx, dout, saved])? {
        Device::Cpu => {
            let (dout, saved) = (dout.cpu()?, saved.cpu()?);
            dx.cpu_mut()?.par_chunks_mut(CHUNK).zip(dout.par_chunks(CHUNK)).zip(saved.par_chunks(CHUNK)).for_each(
                |((dx, dout), saved)| {
                    dx.iter_mut().zip(dout).zip(saved).for_each(|((d, &g), &s)| *d += g * grad(s));
                },
            );
            Ok(())
        }
        Device::Cuda(dev) => {
            let n = elements(op, dx)?;
            if n == 0 {
                return Ok(());
            }
            let f = dev.function(Module::Gelu, kernel)?;
            let mut args = dev.stream.launch_builder(&f);
            args.arg(cuda::slice_mut(dx)?).arg(cuda::slice(dout)?).arg(cuda::slice(saved)?).arg(&n);
            // SAFETY: the *_backward_f32 kernels take (dx, dout, saved, n); all hold n floats.
            unsafe { args.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// `Phi(x)`, the standard normal CDF.
#[inline]
fn cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

#[inline]
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (x * cdf(x)) as f32
}

/// `d/dx [x * Phi(x)] = Phi(x) + x * phi(x)`.
#[inline]
fn gelu_grad(x: f32) -> f32 {
    let x = x as f64;
    let pdf = (-0.5 * x * x).exp() * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    (cdf(x) + x * pdf) as f32
}
