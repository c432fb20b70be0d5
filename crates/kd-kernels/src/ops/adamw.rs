//! AdamW (decoupled weight decay), the optimiser of every trainer in kd.
//!
//! The update follows `torch.optim.AdamW` (single-tensor path) operation for operation, so a
//! run here and a PyTorch run from the same state agree to float32 rounding: bias corrections
//! and the step size are formed in f64 from the Python-side scalars, then applied in f32.
use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use crate::cuda::{self, Module};
use crate::simd::with_avx2;
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// Elements per rayon task: large enough that scheduling is noise next to the arithmetic.
const CHUNK: usize = 1 << 14;

/// One AdamW step on `param` with gradient `grad`, updating the moment buffers `m` and `v`.
///
/// `step` is 1-based (the count of steps taken including this one). Weight decay applies only
/// when `decay`: the model passes false for biases and LayerNorm, as BERT fine-tuning does.
/// p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)
pub fn adamw_step(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    cfg: AdamW,
    step: u64,
    decay: bool,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let shape = param.shape().to_vec();
    expect_shape(OP, "grad", grad, &shape)?;
    expect_shape(OP, "m", m, &shape)?;
    expect_shape(OP, "v", v, &shape)?;
    if step == 0 {
        return Err(Error::invalid(OP, "step is 1-based, got 0"));
    }
    let beta_ok = |b: f32| (0.0..1.0).contains(&b);
    if !(beta_ok(cfg.beta1) && beta_ok(cfg.beta2)) {
        return Err(Error::invalid(OP, format!("betas must lie in [0, 1), got ({}, {})", cfg.beta1, cfg.beta2)));
    }
    if !(cfg.lr >= 0.0 && cfg.eps >= 0.0 && cfg.weight_decay >= 0.0) {
        return Err(Error::invalid(
            OP,
            format!("lr, eps and weight_decay must be >= 0, got {}, {}, {}", cfg.lr, cfg.eps, cfg.weight_decay),
        ));
    }
    let s = StepScalars::new(cfg, step, decay);
    match common_device(OP, &[param, grad, m, v])? {
        Device::Cpu => {
            adamw_step_cpu(param.cpu_mut()?, grad.cpu()?, m.cpu_mut()?, v.cpu_mut()?, &s);
            Ok(())
        }
        Device::Cuda(dev) => {
            let n = param.numel();
            if n == 0 {
                return Ok(());
            }
            let n_i = cuda::int(OP, "elements", n)?;
            // Multiplying by 1 is exact, so "no decay" needs no flag.
            let shrink = s.shrink.unwrap_or(1.0);
            let f = dev.function(Module::AdamW, "adamw_step_f32")?;
            let mut b = dev.stream.launch_builder(&f);
            b.arg(cuda::slice_mut(param)?).arg(cuda::slice(grad)?).arg(cuda::slice_mut(m)?).arg(cuda::slice_mut(v)?);
            b.arg(&n_i).arg(&shrink).arg(&s.w1).arg(&s.w2).arg(&s.beta2).arg(&s.step_size).arg(&s.bc2_sqrt).arg(&s.eps);
            // SAFETY: adamw_step_f32(p, g, m, v, n, shrink, w1, w2, beta2, step_size, bc2_sqrt,
            // eps); all four buffers hold n floats (shapes checked above).
            unsafe { b.launch(cuda::elementwise_launch(n)) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// The step's scalars, formed once on the host (in f64 where torch uses Python floats) for the
/// CPU loop and the kernel alike, so both apply the same f32 values.
struct StepScalars {
    /// `param.mul_(1 - lr * weight_decay)`, None without decay.
    shrink: Option<f32>,
    /// `exp_avg.lerp_(grad, 1 - beta1)`; `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)`.
    w1: f32,
    w2: f32,
    beta2: f32,
    /// `step_size = lr / (1 - beta1^t)`; `denom = sqrt(v) / sqrt(1 - beta2^t) + eps`.
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl StepScalars {
    fn new(cfg: AdamW, step: u64, decay: bool) -> StepScalars {
        let (lr, b1, b2) = (cfg.lr as f64, cfg.beta1 as f64, cfg.beta2 as f64);
        let t = step as f64;
        StepScalars {
            shrink: (decay && cfg.weight_decay != 0.0).then_some((1.0 - lr * cfg.weight_decay as f64) as f32),
            w1: (1.0 - b1) as f32,
            w2: (1.0 - b2) as f32,
            beta2: cfg.beta2,
            step_size: (lr / (1.0 - b1.powf(t))) as f32,
            bc2_sqrt: (1.0 - b2.powf(t)).sqrt() as f32,
            eps: cfg.eps,
        }
    }
}

fn adamw_step_cpu(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| adamw_chunk(p, g, m, v, s));
}

fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    with_avx2!(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars => {
        let &StepScalars { shrink, w1, w2, beta2, step_size, bc2_sqrt, eps } = s;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            if let Some(s) = shrink {
                *p *= s;
            }
            *m = lerp(*m, g, w1);
            *v = *v * beta2 + w2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p += -step_size * (*m / denom);
        }
    });
}

/// `torch.lerp`'s formula: it switches ends at weight 0.5 so that either end is hit exactly.
#[inline]
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}
