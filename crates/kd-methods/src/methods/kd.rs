//! `kd`: Hinton et al. 2015, logit distillation.
//!
//! loss = (1 - a) * CE(z_s, y) + a * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
//! Regression tasks (STS-B) use (1 - a) * MSE(z_s, y) + a * MSE(z_s, z_t) instead.

use kd_kernels::Tensor;
use kd_model::bert::{Activations, OutputGrads, Outputs};

use crate::batching::BatchTargets;
use crate::losses;
use crate::trainer::{LossLog, Objective, StepInput};
use crate::Result;

/// Where the teacher's logits for a batch come from (a live teacher or a cache).
pub trait TeacherLogits {
    fn logits(&mut self, input: &StepInput) -> Result<Tensor>;
}

pub struct Kd<'t> {
    pub teacher: &'t mut dyn TeacherLogits,
    pub alpha: f32,
    pub temperature: f32,
}

impl Objective for Kd<'_> {
    fn student_outputs(&self) -> Outputs {
        Outputs::Logits
    }

    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let teacher = self.teacher.logits(input)?;
        let mut log = LossLog::default();
        if self.alpha < 1.0 {
            log.push("ce", losses::label_loss(grads, student, input.targets, None, 1.0 - self.alpha)?);
        }
        let soft = match input.targets {
            BatchTargets::Classes(_) => losses::logit_kd(grads, student, &teacher, self.temperature, None, self.alpha)?,
            BatchTargets::Scores(_) => losses::logit_mse(grads, student, &teacher, self.alpha)?,
        };
        log.push("kd", soft);
        Ok(log)
    }
}
