//! Supervised losses of the task heads: cross-entropy with hard labels or soft targets (label
//! smoothing, teacher pseudo-labels, LLM soft labels) and MSE for regression (STS-B), both with
//! per-example weights so a batch mean, a noisy-label reweighting or a padded example is just
//! a weight.
use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use super::opt_rows_mut;
use crate::cuda::{self, Module, OptionalArg};
use crate::device::CudaDevice;
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, IdTensor, Result, Tensor};

/// What the logits are scored against.
#[derive(Clone, Copy)]
pub enum Targets<'a> {
    /// One class id per row, `[N]`.
    Hard(&'a IdTensor),
    /// A distribution per row, `[N, C]`.
    Soft(&'a Tensor),
}

/// `loss_rows[i] = w_i * -sum_c y_ic log softmax(z_i)_c` (overwritten), logits `[N, C]`.
/// `dlogits` += `grad_scale * w_i * (sum_c y_ic * softmax(z_i) - y_i)`, which is the usual
/// `softmax - y` for targets that sum to one. A label `>= C` is an error naming its row (on a
/// GPU, where finding it would need a synchronising copy, that row's loss is NaN and it gets no
/// gradient); rows of weight 0 give 0 and no gradient.
pub fn cross_entropy(
    loss_rows: &mut Tensor,
    dlogits: Option<&mut Tensor>,
    logits: &Tensor,
    targets: Targets,
    weights: Option<&Tensor>,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "cross_entropy";
    let [n, c] = *logits.shape() else {
        return Err(Error::shape(OP, format!("logits is {:?}, expected [N, C]", logits.shape())));
    };
    if c == 0 {
        return Err(Error::shape(OP, "logits have no classes (C = 0)"));
    }
    check_common(OP, loss_rows, dlogits.as_deref(), logits.shape(), n, weights, grad_scale)?;
    let mut tensors = vec![&*loss_rows, logits];
    tensors.extend(dlogits.as_deref());
    tensors.extend(weights);
    if let Targets::Soft(y) = targets {
        expect_shape(OP, "soft targets", y, &[n, c])?;
        tensors.push(y);
    }
    let device = common_device(OP, &tensors)?;
    if let Targets::Hard(ids) = targets {
        if ids.shape() != [n] {
            return Err(Error::shape(OP, format!("labels are {:?}, expected [{n}]", ids.shape())));
        }
        if !ids.device().same(&device) {
            return Err(Error::DeviceMismatch { op: OP, a: device.to_string(), b: ids.device().to_string() });
        }
    }
    match device {
        Device::Cpu => {
            let targets = match targets {
                Targets::Hard(ids) => {
                    let ids = ids.cpu()?;
                    if let Some(i) = ids.iter().position(|&y| y as usize >= c) {
                        return Err(Error::invalid(
                            OP,
                            format!("label {} at row {i} is out of range for {c} classes", ids[i]),
                        ));
                    }
                    RowTargets::Hard(ids)
                }
                Targets::Soft(y) => RowTargets::Soft(y.cpu()?),
            };
            let dlogits = dlogits.map(Tensor::cpu_mut).transpose()?;
            let w = weights.map(Tensor::cpu).transpose()?;
            cross_entropy_cpu(loss_rows.cpu_mut()?, dlogits, logits.cpu()?, targets, w, c, grad_scale);
            Ok(())
        }
        Device::Cuda(dev) => cross_entropy_cuda(&dev, loss_rows, dlogits, logits, targets, weights, grad_scale),
    }
}

/// Checks shared by both losses: `loss_rows` and `weights` are `[n]`, the gradient has the
/// prediction's shape, `grad_scale` is finite.
fn check_common(
    op: &'static str,
    loss_rows: &Tensor,
    grad: Option<&Tensor>,
    pred_shape: &[usize],
    n: usize,
    weights: Option<&Tensor>,
    grad_scale: f32,
) -> Result<()> {
    expect_shape(op, "loss_rows", loss_rows, &[n])?;
    if let Some(g) = grad {
        expect_shape(op, "gradient", g, pred_shape)?;
    }
    if let Some(w) = weights {
        expect_shape(op, "weights", w, &[n])?;
    }
    if !grad_scale.is_finite() {
        return Err(Error::invalid(op, format!("grad_scale {grad_scale} is not finite")));
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum RowTargets<'a> {
    Hard(&'a [u32]),
    Soft(&'a [f32]),
}

fn cross_entropy_cpu(
    loss: &mut [f32],
    dlogits: Option<&mut [f32]>,
    logits: &[f32],
    targets: RowTargets,
    w: Option<&[f32]>,
    c: usize,
    grad_scale: f32,
) {
    let n = loss.len();
    loss.par_iter_mut().zip(opt_rows_mut(dlogits, c, n)).enumerate().for_each(|(i, (loss, dz))| {
        let w = w.map_or(1.0, |w| w[i]);
        if w == 0.0 {
            *loss = 0.0;
            return;
        }
        let z = &logits[i * c..][..c];
        let max = z.iter().copied().fold(f32::MIN, f32::max);
        let sum: f32 = z.iter().map(|&z| (z - max).exp()).sum();
        let lse = max + sum.ln();
        // -sum_c y_c (z_c - lse); a zero target skips its term so a masked -inf logit is no NaN.
        let (nll, mass) = match targets {
            RowTargets::Hard(ids) => (lse - z[ids[i] as usize], 1.0),
            RowTargets::Soft(y) => y[i * c..][..c]
                .iter()
                .zip(z)
                .filter(|(&y, _)| y != 0.0)
                .fold((0.0, 0.0), |(nll, mass), (&y, &z)| (nll + y * (lse - z), mass + y)),
        };
        *loss = w * nll;
        if let Some(dz) = dz {
            let scale = grad_scale * w;
            let inv_sum = 1.0 / sum;
            for (k, (g, &z)) in dz.iter_mut().zip(z).enumerate() {
                let y = match targets {
                    RowTargets::Hard(ids) => f32::from(ids[i] as usize == k),
                    RowTargets::Soft(y) => y[i * c + k],
                };
                *g += scale * (mass * (z - max).exp() * inv_sum - y);
            }
        }
    });
}

/// `kernels/cross_entropy.cu`: one team of threads per row (a few lanes of a warp for a few
/// classes, a block for a vocabulary), online max and sum, then the loss and the gradient.
fn cross_entropy_cuda(
    dev: &CudaDevice,
    loss: &mut Tensor,
    dlogits: Option<&mut Tensor>,
    logits: &Tensor,
    targets: Targets,
    w: Option<&Tensor>,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "cross_entropy";
    let (n, c) = (logits.rows(), logits.last_dim());
    if n == 0 {
        return Ok(());
    }
    let (n_i, c_i) = (cuda::int(OP, "N", n)?, cuda::int(OP, "C", c)?);
    let (labels, soft) = match targets {
        Targets::Hard(ids) => (Some(cuda::id_slice(ids)?), None),
        Targets::Soft(y) => (None, Some(cuda::slice(y)?)),
    };
    let (cfg, group) = cuda::row_launch(n, c);
    let name = if group.is_some() { "cross_entropy_f32_warp" } else { "cross_entropy_f32_block" };
    let f = dev.function(Module::CrossEntropy, name)?;
    let dlogits = dlogits.map(cuda::slice_mut).transpose()?;
    let w = w.map(cuda::slice).transpose()?;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(cuda::slice_mut(loss)?).opt_mut(dlogits).arg(cuda::slice(logits)?).opt(labels).opt(soft).opt(w);
    b.arg(&n_i).arg(&c_i).arg(&grad_scale);
    if let Some(group) = &group {
        b.arg(group);
    }
    // SAFETY: the arguments follow the kernel's parameter list (CE_PARAMS, then `group` for the
    // warp kernel); cross_entropy checked every buffer's shape.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// Regression loss: `loss_rows[i] = w_i * (pred_i - y_i)^2` (overwritten) and `dpred` +=
/// `grad_scale * w_i * 2 (pred_i - y_i)`; `pred` is `[N, 1]` (a regression head) or `[N]`,
/// `target` is `[N]`. Rows of weight 0 give 0 and no gradient, whatever their values.
pub fn mse_loss(
    loss_rows: &mut Tensor,
    dpred: Option<&mut Tensor>,
    pred: &Tensor,
    target: &Tensor,
    weights: Option<&Tensor>,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "mse_loss";
    let n = match *pred.shape() {
        [n] | [n, 1] => n,
        _ => return Err(Error::shape(OP, format!("pred is {:?}, expected [N, 1] or [N]", pred.shape()))),
    };
    expect_shape(OP, "target", target, &[n])?;
    check_common(OP, loss_rows, dpred.as_deref(), pred.shape(), n, weights, grad_scale)?;
    let mut tensors = vec![&*loss_rows, pred, target];
    tensors.extend(dpred.as_deref());
    tensors.extend(weights);
    match common_device(OP, &tensors)? {
        Device::Cpu => {
            let dpred = dpred.map(Tensor::cpu_mut).transpose()?;
            let w = weights.map(Tensor::cpu).transpose()?;
            mse_loss_cpu(loss_rows.cpu_mut()?, dpred, pred.cpu()?, target.cpu()?, w, grad_scale);
            Ok(())
        }
        Device::Cuda(dev) => mse_loss_cuda(&dev, loss_rows, dpred, pred, target, weights, grad_scale),
    }
}

fn mse_loss_cpu(
    loss: &mut [f32],
    dpred: Option<&mut [f32]>,
    pred: &[f32],
    target: &[f32],
    w: Option<&[f32]>,
    grad_scale: f32,
) {
    let n = loss.len();
    loss.par_iter_mut().zip(opt_rows_mut(dpred, 1, n)).enumerate().for_each(|(i, (loss, dp))| {
        let w = w.map_or(1.0, |w| w[i]);
        if w == 0.0 {
            *loss = 0.0;
            return;
        }
        let diff = pred[i] - target[i];
        *loss = w * diff * diff;
        if let Some(dp) = dp {
            dp[0] += grad_scale * w * 2.0 * diff;
        }
    });
}

/// `kernels/cross_entropy.cu`'s `mse_loss_f32`: one thread per example.
fn mse_loss_cuda(
    dev: &CudaDevice,
    loss: &mut Tensor,
    dpred: Option<&mut Tensor>,
    pred: &Tensor,
    target: &Tensor,
    w: Option<&Tensor>,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "mse_loss";
    let n = loss.numel();
    if n == 0 {
        return Ok(());
    }
    let n_i = cuda::int(OP, "N", n)?;
    let f = dev.function(Module::CrossEntropy, "mse_loss_f32")?;
    let dpred = dpred.map(cuda::slice_mut).transpose()?;
    let w = w.map(cuda::slice).transpose()?;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(cuda::slice_mut(loss)?).opt_mut(dpred).arg(cuda::slice(pred)?).arg(cuda::slice(target)?).opt(w);
    b.arg(&n_i).arg(&grad_scale);
    // SAFETY: the arguments follow mse_loss_f32's parameters; mse_loss checked the shapes.
    unsafe { b.launch(cuda::elementwise_launch(n)) }.map_err(cuda_err)?;
    Ok(())
}
