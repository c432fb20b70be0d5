//! AdamW with HF's linear warm-up and decay, global-norm clipping, and decoupled weight decay
//! that skips biases and LayerNorm parameters (as HF's `Trainer` groups them).

use kd_kernels::ops::adamw::{adamw_step, AdamW};
use kd_kernels::ops::grad_norm::clip_grad_norm;
use kd_kernels::Tensor;

use crate::weights::BertWeights;
use crate::{Error, Result};

/// A set of parameters the optimiser can step: a whole model, or a part trained alone (the
/// MLM head on a frozen encoder). Walks are in a fixed order, so parameters, gradients and
/// moments of equal structure line up; the HF names decide weight decay.
pub trait Params: Sized {
    /// Every parameter with its HF name, in the walk order.
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)>;
    /// Zero tensors of the same structure and device (gradients, moments).
    fn zeros_like(&self) -> Result<Self>;

    /// Sets every tensor to zero (gradient buffers, once per step).
    fn zero(&mut self) -> Result<()> {
        for (_, t) in self.params_mut() {
            t.fill(0.0)?;
        }
        Ok(())
    }
}

impl Params for BertWeights {
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        BertWeights::params_mut(self)
    }

    fn zeros_like(&self) -> Result<Self> {
        BertWeights::zeros_like(self)
    }
}

/// `get_linear_schedule_with_warmup`: the multiplier of the base learning rate at 0-based step
/// `step` rises linearly over `warmup` steps, then falls linearly to 0 at `total`.
#[derive(Clone, Copy, Debug)]
pub struct LinearSchedule {
    pub warmup: u64,
    pub total: u64,
}

impl LinearSchedule {
    pub fn factor(&self, step: u64) -> f32 {
        if step < self.warmup {
            step as f32 / self.warmup.max(1) as f32
        } else {
            (self.total.saturating_sub(step) as f32 / self.total.saturating_sub(self.warmup).max(1) as f32).max(0.0)
        }
    }
}

/// Training hyper-parameters of the optimiser.
#[derive(Clone, Copy, Debug)]
pub struct OptimizerConfig {
    pub lr: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the global gradient norm to this (HF's default 1.0); `None` for no clipping.
    pub max_grad_norm: Option<f32>,
    pub schedule: LinearSchedule,
}

/// AdamW moments for every parameter of a model (or of another [`Params`] set), and the step count.
pub struct Optimizer<P = BertWeights> {
    pub config: OptimizerConfig,
    pub m: P,
    pub v: P,
    /// Number of updates done so far.
    pub step: u64,
}

impl<P: Params> Optimizer<P> {
    pub fn new(config: OptimizerConfig, weights: &P) -> Result<Self> {
        Ok(Optimizer { config, m: weights.zeros_like()?, v: weights.zeros_like()?, step: 0 })
    }

    /// The learning rate the next update uses.
    pub fn lr(&self) -> f32 {
        self.config.lr * self.config.schedule.factor(self.step)
    }

    /// Clips `grads`, applies one AdamW update to `weights` and returns the pre-clip gradient
    /// norm. A non-finite norm is an error and leaves the weights untouched.
    pub fn update(&mut self, weights: &mut P, grads: &mut P) -> Result<f32> {
        let mut g: Vec<(String, &mut Tensor)> = grads.params_mut();
        let norm = {
            let mut refs: Vec<&mut Tensor> = g.iter_mut().map(|(_, t)| &mut **t).collect();
            clip_grad_norm(&mut refs, self.config.max_grad_norm.unwrap_or(f32::INFINITY))?
        };
        if !norm.is_finite() {
            return Err(Error::NonFinite(format!("gradient norm is {norm} at update {}", self.step + 1)));
        }
        let cfg = AdamW {
            lr: self.lr(),
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
        };
        self.step += 1;
        let params = weights.params_mut();
        let (m, v) = (self.m.params_mut(), self.v.params_mut());
        for (((name, p), (_, gr)), ((_, mm), (_, vv))) in params.into_iter().zip(g).zip(m.into_iter().zip(v)) {
            adamw_step(p, gr, mm, vv, cfg, self.step, BertWeights::decays(&name))?;
        }
        Ok(norm)
    }
}
