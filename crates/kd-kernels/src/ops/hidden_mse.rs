//! Masked hidden-state MSE between student and teacher layers (TinyBERT, MiniLM-style
//! intermediate-layer distillation), several layer pairs in one call so a method issues one op
//! per step however many layers it maps.
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::opt_rows_mut;
use crate::cuda::{self, Module};
use crate::device::CudaDevice;
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

/// `losses` `[P]` is overwritten: for pair p, the sum over real tokens (mask 1) and hidden dims
/// of `(s - t)^2`, divided by `n_real * D`. `dstudents[p]` += `grad_scale * 2 (s - t) / (n_real * D)`
/// at real tokens; pass an empty slice for the forward only. Every student and teacher is
/// `[N, D]` with one D, `token_mask` is `[N]` of 0.0 and 1.0. With no real token the losses are 0.
/// Another mask value is an error (on a GPU, where finding it would need a synchronising copy,
/// every loss is NaN and no gradient is written).
pub fn hidden_mse(
    losses: &mut Tensor,
    dstudents: &mut [&mut Tensor],
    students: &[&Tensor],
    teachers: &[&Tensor],
    token_mask: &Tensor,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "hidden_mse";
    let pairs = students.len();
    if teachers.len() != pairs || !(dstudents.is_empty() || dstudents.len() == pairs) {
        let detail = format!("{pairs} students, {} teachers, {} dstudents", teachers.len(), dstudents.len());
        return Err(Error::shape(OP, detail));
    }
    expect_shape(OP, "losses", losses, &[pairs])?;
    let [n] = *token_mask.shape() else {
        return Err(Error::shape(OP, format!("token_mask is {:?}, expected [N]", token_mask.shape())));
    };
    if !grad_scale.is_finite() {
        return Err(Error::invalid(OP, format!("grad_scale {grad_scale} is not finite")));
    }
    let d = match students.first() {
        Some(s) => match *s.shape() {
            [sn, d] if sn == n => d,
            _ => return Err(Error::shape(OP, format!("students[0] is {:?}, expected [{n}, D]", s.shape()))),
        },
        None => 0,
    };
    for (p, s) in students.iter().enumerate() {
        expect_shape(OP, &format!("students[{p}]"), s, &[n, d])?;
        expect_shape(OP, &format!("teachers[{p}]"), teachers[p], &[n, d])?;
    }
    for (p, g) in dstudents.iter().enumerate() {
        expect_shape(OP, &format!("dstudents[{p}]"), g, &[n, d])?;
    }
    let mut tensors: Vec<&Tensor> = vec![&*losses, token_mask];
    tensors.extend(students.iter().chain(teachers));
    tensors.extend(dstudents.iter().map(|g| &**g));
    match common_device(OP, &tensors)? {
        Device::Cpu => {
            let mask = token_mask.cpu()?;
            if let Some(i) = mask.iter().position(|&m| m != 0.0 && m != 1.0) {
                return Err(Error::invalid(OP, format!("token_mask[{i}] is {}, expected 0 or 1", mask[i])));
            }
            let losses = losses.cpu_mut()?;
            let mut grads = dstudents.iter_mut().map(|g| g.cpu_mut().map(Some)).collect::<Result<Vec<_>>>()?;
            grads.resize_with(pairs, || None);
            for (p, grad) in grads.into_iter().enumerate() {
                losses[p] = pair_mse_cpu(grad, students[p].cpu()?, teachers[p].cpu()?, mask, d, grad_scale);
            }
            Ok(())
        }
        Device::Cuda(dev) => hidden_mse_cuda(&dev, losses, dstudents, students, teachers, token_mask, d, grad_scale),
    }
}

/// Layer pairs per launch: the size of `MsePairs` in `kernels/hidden_mse.cu`.
const MAX_PAIRS: usize = 32;
/// Threads per block of `hidden_mse_f32` (`KD_MSE_THREADS`): 8 warps, each taking whole token
/// rows.
const MSE_BLOCK: u32 = 256;
/// Blocks per launch at most: the 6 blocks per SM that the kernel's launch bounds allow, on an
/// H100's 132 SMs, so that the grid is one wave with every warp's loads in flight from the
/// start (a second, partial wave would run with too few loads in flight to fill the bus), and
/// each block counts the mask once for several rows.
const MSE_GRID: usize = 6 * 132;

/// `kernels/hidden_mse.cu`: every pair's squared differences and gradients in one launch (per
/// 32 pairs), each block counting the real tokens itself and writing one partial sum, the last
/// block to finish summing the partials in a fixed order, so the losses do not depend on
/// scheduling. The block counter it finishes with is zeroed before each launch.
#[allow(clippy::too_many_arguments)]
fn hidden_mse_cuda(
    dev: &CudaDevice,
    losses: &mut Tensor,
    dstudents: &mut [&mut Tensor],
    students: &[&Tensor],
    teachers: &[&Tensor],
    token_mask: &Tensor,
    d: usize,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "hidden_mse";
    let (pairs, n) = (students.len(), token_mask.numel());
    if pairs == 0 {
        return Ok(());
    }
    let (n_i, d_i) = (cuda::int(OP, "N", n)?, cuda::int(OP, "D", d)?);
    // At least a row per warp; fewer blocks when there are many pairs.
    let warps = (MSE_BLOCK / 32) as usize;
    let blocks = n.div_ceil(warps).clamp(1, (MSE_GRID / pairs.min(MAX_PAIRS)).max(1));
    let f = dev.function(Module::HiddenMse, "hidden_mse_f32")?;
    let mask = cuda::slice(token_mask)?;
    let losses = cuda::slice_mut(losses)?;
    dev.with_scratch(1 + MAX_PAIRS * blocks, |scratch| {
        let (mut done, mut partials) = scratch.split_at_mut(1);
        for start in (0..pairs).step_by(MAX_PAIRS) {
            let end = (start + MAX_PAIRS).min(pairs);
            // MsePairs: student, teacher and gradient pointers (0 = no gradient).
            let mut ptrs = [[0u64; MAX_PAIRS]; 3];
            let mut reads = Vec::with_capacity(2 * MAX_PAIRS);
            for (k, p) in (start..end).enumerate() {
                for (row, t) in [(0, students[p]), (1, teachers[p])] {
                    let (ptr, read) = cuda::slice(t)?.device_ptr(&dev.stream);
                    ptrs[row][k] = ptr;
                    reads.push(read);
                }
            }
            let mut writes = Vec::with_capacity(MAX_PAIRS);
            for (k, g) in dstudents.iter_mut().skip(start).take(end - start).enumerate() {
                let (ptr, write) = cuda::slice_mut(g)?.device_ptr_mut(&dev.stream);
                ptrs[2][k] = ptr;
                writes.push(write);
            }
            dev.stream.memset_zeros(&mut done).map_err(cuda_err)?;
            let mut out = losses.slice_mut(start..end);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, (end - start) as u32, 1),
                block_dim: (MSE_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = dev.stream.launch_builder(&f);
            b.arg(&ptrs).arg(mask).arg(&n_i).arg(&d_i).arg(&grad_scale).arg(&mut partials).arg(&mut done).arg(&mut out);
            // SAFETY: hidden_mse_f32's parameters; every pointer in `ptrs` is a live [n, d]
            // buffer (its guard in `reads` / `writes` records the use after the launch),
            // partials holds MAX_PAIRS * blocks floats, `done` is the zeroed counter and `out`
            // holds this chunk's losses.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
            drop((reads, writes));
        }
        Ok(())
    })
}

/// One pair's loss, adding its gradient to `ds` when given.
fn pair_mse_cpu(ds: Option<&mut [f32]>, s: &[f32], t: &[f32], mask: &[f32], d: usize, grad_scale: f32) -> f32 {
    let real = mask.iter().filter(|&&m| m == 1.0).count();
    if real == 0 || d == 0 {
        return 0.0;
    }
    let norm = 1.0 / (real * d) as f32;
    let grad_coef = grad_scale * 2.0 * norm;
    let total: f64 = s
        .par_chunks(d)
        .zip(t.par_chunks(d))
        .zip(mask.par_iter())
        .zip(opt_rows_mut(ds, d, mask.len()))
        .filter(|(((_, _), &m), _)| m == 1.0)
        .map(|(((s, t), _), ds)| {
            let mut sum = 0.0f32;
            match ds {
                Some(ds) => s.iter().zip(t).zip(ds).for_each(|((s, t), g)| {
                    sum += (s - t) * (s - t);
                    *g += grad_coef * (s - t);
                }),
                None => sum = s.iter().zip(t).map(|(s, t)| (s - t) * (s - t)).sum(),
            }
            f64::from(sum)
        })
        .sum();
    (total * f64::from(norm)) as f32
}
