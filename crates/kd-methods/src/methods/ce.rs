//! `ce`: fine-tune on the labels alone (the no-KD baseline, and how a teacher is trained).
//!
//! loss = mean_i CE(z_i, y_i)  (classification)   |   mean_i (z_i - y_i)^2  (regression)

use kd_model::bert::{Activations, OutputGrads, Outputs};

use crate::losses;
use crate::trainer::{LossLog, Objective, StepInput};
use crate::Result;

pub struct Ce;

impl Objective for Ce {
    fn student_outputs(&self) -> Outputs {
        Outputs::Logits
    }

    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let mut log = LossLog::default();
        log.push("ce", losses::label_loss(grads, student, input.targets, None, 1.0)?);
        Ok(log)
    }
}
