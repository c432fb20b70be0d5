//! Straight-through Gumbel-softmax, `torch.nn.functional.gumbel_softmax(hard=True)`, as
//! MATE-KD's generator samples replacement tokens: the forward value is a one-hot sample, the
//! backward pretends it was the tempered soft sample so the generator receives a gradient.
//!
//! The noise for element `i` (row-major index) is a pure function of `(seed, i)`, so a CUDA
//! kernel draws exactly the same sample and a test can rebuild the noise with [`gumbel_noise`].
use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use crate::cuda::{self, Module};
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, rng, Device, Error, Result, Tensor};

/// Half the smallest non-zero draw of `rng::uniform`: keeps `ln(u)` finite when the draw is 0.
const U_MIN: f32 = 1.0 / (1u64 << 25) as f32;
/// The largest draw of `rng::uniform`: `-ln(u)` stays positive, so the outer log is finite.
const U_MAX: f32 = 1.0 - 1.0 / (1u64 << 24) as f32;

/// Standard Gumbel noise `-ln(-ln(u))` for element `index`, `u = rng::uniform(seed, index)`
/// clamped away from 0 and 1 (always finite).
#[inline]
pub fn gumbel_noise(seed: u64, index: u64) -> f32 {
    let u = rng::uniform(seed, index).clamp(U_MIN, U_MAX);
    -(-u.ln()).ln()
}

/// Rows over the last axis of `logits` (`[N, V]`): `soft = softmax((logits + g) / tau)` and
/// `hard = one_hot(argmax soft)` (the first maximum on ties). `hard` is the forward value;
/// `soft` is kept for the backward.
pub fn gumbel_softmax_st_forward(
    hard: &mut Tensor,
    soft: &mut Tensor,
    logits: &Tensor,
    tau: f32,
    seed: u64,
) -> Result<()> {
    const OP: &str = "gumbel_softmax_st_forward";
    expect_shape(OP, "hard", hard, logits.shape())?;
    expect_shape(OP, "soft", soft, logits.shape())?;
    check_tau(OP, tau)?;
    let v = logits.last_dim();
    match common_device(OP, &[hard, soft, logits])? {
        Device::Cpu => {
            gumbel_softmax_st_forward_cpu(hard.cpu_mut()?, soft.cpu_mut()?, logits.cpu()?, v, tau, seed);
            Ok(())
        }
        Device::Cuda(dev) => {
            let Some(l) = row_launch(OP, logits.rows(), v)? else { return Ok(()) };
            let name = if l.group.is_some() { "gumbel_forward_f32_warp" } else { "gumbel_forward_f32_block" };
            let f = dev.function(Module::Gumbel, name)?;
            let mut b = dev.stream.launch_builder(&f);
            b.arg(cuda::slice_mut(hard)?).arg(cuda::slice_mut(soft)?).arg(cuda::slice(logits)?);
            b.arg(&l.rows).arg(&l.v).arg(&tau).arg(&seed);
            if let Some(group) = &l.group {
                b.arg(group);
            }
            // SAFETY: gumbel_forward_f32_{warp,block}(hard, soft, logits, rows, v, tau, seed
            // [, group]); the three buffers hold rows x v floats (shapes checked above).
            unsafe { b.launch(l.cfg) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// Straight-through: the gradient w.r.t. `hard` flows as if through `soft`:
/// dlogits += (1/tau) * soft * (dout - sum(dout*soft)), per row.
pub fn gumbel_softmax_st_backward(dlogits: &mut Tensor, dout: &Tensor, soft: &Tensor, tau: f32) -> Result<()> {
    const OP: &str = "gumbel_softmax_st_backward";
    expect_shape(OP, "dlogits", dlogits, soft.shape())?;
    expect_shape(OP, "dout", dout, soft.shape())?;
    check_tau(OP, tau)?;
    let v = soft.last_dim();
    match common_device(OP, &[dlogits, dout, soft])? {
        Device::Cpu => {
            gumbel_softmax_st_backward_cpu(dlogits.cpu_mut()?, dout.cpu()?, soft.cpu()?, v, tau);
            Ok(())
        }
        Device::Cuda(dev) => {
            let Some(l) = row_launch(OP, soft.rows(), v)? else { return Ok(()) };
            let name = if l.group.is_some() { "gumbel_backward_f32_warp" } else { "gumbel_backward_f32_block" };
            let inv_tau = 1.0 / tau;
            let f = dev.function(Module::Gumbel, name)?;
            let mut b = dev.stream.launch_builder(&f);
            b.arg(cuda::slice_mut(dlogits)?).arg(cuda::slice(dout)?).arg(cuda::slice(soft)?);
            b.arg(&l.rows).arg(&l.v).arg(&inv_tau);
            if let Some(group) = &l.group {
                b.arg(group);
            }
            // SAFETY: gumbel_backward_f32_{warp,block}(dlogits, dout, soft, rows, v, inv_tau
            // [, group]); the three buffers hold rows x v floats (shapes checked above).
            unsafe { b.launch(l.cfg) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// A launch of `kernels/gumbel.cu` over `rows` rows of `v`.
struct RowLaunch {
    rows: i32,
    v: i32,
    cfg: LaunchConfig,
    /// Lanes per row of the `*_warp` kernel; None: the `*_block` kernel, a block per row.
    group: Option<i32>,
}

/// None when there is no element.
fn row_launch(op: &'static str, rows: usize, v: usize) -> Result<Option<RowLaunch>> {
    if rows * v == 0 {
        return Ok(None);
    }
    let (cfg, group) = cuda::row_launch(rows, v);
    Ok(Some(RowLaunch { rows: cuda::int(op, "rows", rows)?, v: cuda::int(op, "V", v)?, cfg, group }))
}

fn check_tau(op: &'static str, tau: f32) -> Result<()> {
    if tau > 0.0 && tau.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("tau must be positive and finite, got {tau}")))
    }
}

fn gumbel_softmax_st_forward_cpu(hard: &mut [f32], soft: &mut [f32], logits: &[f32], v: usize, tau: f32, seed: u64) {
    if v == 0 {
        return;
    }
    hard.par_chunks_mut(v).zip(soft.par_chunks_mut(v)).zip(logits.par_chunks(v)).enumerate().for_each(
        |(row, ((hard, soft), logits))| {
            let base = (row * v) as u64;
            let mut max = f32::NEG_INFINITY;
            for (j, (s, &l)) in soft.iter_mut().zip(logits).enumerate() {
                *s = (l + gumbel_noise(seed, base + j as u64)) / tau;
                max = max.max(*s);
            }
            let mut sum = 0.0f32;
            for s in soft.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            soft.iter_mut().for_each(|s| *s *= inv);
            // Taken on the rounded soft row, as torch does, so `hard` is exactly its one-hot.
            let mut arg = 0;
            for (j, &s) in soft.iter().enumerate() {
                if s > soft[arg] {
                    arg = j;
                }
            }
            hard.fill(0.0);
            hard[arg] = 1.0;
        },
    );
}

fn gumbel_softmax_st_backward_cpu(dlogits: &mut [f32], dout: &[f32], soft: &[f32], v: usize, tau: f32) {
    if v == 0 {
        return;
    }
    let inv_tau = 1.0 / tau;
    dlogits.par_chunks_mut(v).zip(dout.par_chunks(v)).zip(soft.par_chunks(v)).for_each(|((dl, dout), soft)| {
        let dot: f32 = dout.iter().zip(soft).map(|(&d, &s)| d * s).sum();
        for ((dl, &d), &s) in dl.iter_mut().zip(dout).zip(soft) {
            *dl += inv_tau * s * (d - dot);
        }
    });
}
