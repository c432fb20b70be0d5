//! Global gradient norm and norm clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! The sum of squares is accumulated in f64 over fixed-size chunks whose partial sums are added
//! in chunk order, so the norm is bit-identical run to run whatever rayon's scheduling: a
//! training run with a seed must reproduce, and clipping decisions feed straight into it.
use rayon::prelude::*;

use crate::{common_device, Device, Error, Result, Tensor};

/// Elements per partial sum; fixed, so the summation order never depends on the thread count.
const CHUNK: usize = 1 << 14;

/// The L2 norm of all gradients taken together, as if concatenated into one vector.
/// An empty list has norm 0.
pub fn global_grad_norm(grads: &[&Tensor]) -> Result<f32> {
    const OP: &str = "global_grad_norm";
    Ok(sum_of_squares(OP, grads)?.sqrt() as f32)
}

/// Scales every gradient by `max_norm / (norm + 1e-6)` when that factor is below 1, like
/// `clip_grad_norm_`, and returns the norm before clipping. A non-finite norm is returned
/// with the gradients untouched: scaling by NaN would only destroy them, and the trainer
/// decides whether to skip the step.
pub fn clip_grad_norm(grads: &mut [&mut Tensor], max_norm: f32) -> Result<f32> {
    const OP: &str = "clip_grad_norm";
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::invalid(OP, format!("max_norm must be positive, got {max_norm}")));
    }
    let views: Vec<&Tensor> = grads.iter().map(|g| &**g).collect();
    let norm = sum_of_squares(OP, &views)?.sqrt() as f32;
    // torch forms the factor in the gradients' dtype.
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        for g in grads.iter_mut() {
            match g.device() {
                Device::Cpu => scale_cpu(g.cpu_mut()?, coef),
                Device::Cuda(_) => return Err(Error::CudaUnsupported { op: OP }),
            }
        }
    }
    Ok(norm)
}

fn sum_of_squares(op: &'static str, grads: &[&Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    match common_device(op, grads)? {
        Device::Cpu => grads.iter().try_fold(0.0, |acc, g| Ok(acc + sum_of_squares_cpu(g.cpu()?))),
        Device::Cuda(_) => Err(Error::CudaUnsupported { op }),
    }
}

fn sum_of_squares_cpu(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>()).collect();
    partials.iter().sum()
}

fn scale_cpu(x: &mut [f32], coef: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= coef));
}
