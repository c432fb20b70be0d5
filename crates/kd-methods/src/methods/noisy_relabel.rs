//! `noisy-relabel`: logit KD whose hard-label term trusts each label only as much as the teacher
//! does (METHODS.md A.1: the project's own mitigation for noisy labels, not verified to be one of
//! Bhardwaj et al. 2021's).
//!
//! ```text
//! per batch, t = teacher logits, s = student logits, y = the given (possibly corrupted) labels:
//!   w_i = softmax(t_i)[y_i]                                # the teacher's belief in y_i, at T = 1
//!   if trust_threshold: w_i = 0 where w_i < trust_threshold
//!   loss = mean_i [ a * T^2 * KL(softmax(t_i / T) || softmax(s_i / T)) + (1 - a) * w_i * CE(s_i, y_i) ]
//! ```
//!
//! A label the teacher disagrees with loses its hard-label weight while the soft term still
//! teaches. `w` is a constant (the teacher is frozen). Defaults a = 0.5, T = 2, as `kd`.
//! Classification only: a regression target has no class for the teacher to believe.

use kd_kernels::{IdTensor, Tensor};
use kd_model::bert::{Activations, OutputGrads, Outputs};

use crate::losses;
use crate::methods::kd::TeacherLogits;
use crate::trainer::{LossLog, Objective, StepInput};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RelabelParams {
    /// Share of the soft (KD) term; the hard-label term gets `1 - alpha`.
    pub alpha: f32,
    pub temperature: f32,
    /// Labels the teacher believes less than this get no hard-label weight at all.
    pub trust_threshold: Option<f32>,
}

impl Default for RelabelParams {
    fn default() -> Self {
        RelabelParams { alpha: 0.5, temperature: 2.0, trust_threshold: None }
    }
}

pub struct NoisyRelabel<'t> {
    teacher: &'t mut dyn TeacherLogits,
    params: RelabelParams,
}

impl<'t> NoisyRelabel<'t> {
    pub fn new(teacher: &'t mut dyn TeacherLogits, params: RelabelParams) -> Result<Self> {
        losses::check_kd_weights(params.alpha, params.temperature)?;
        if let Some(cut) = params.trust_threshold.filter(|c| !(0.0..=1.0).contains(c)) {
            return Err(Error::Config(format!("trust threshold {cut} is not a probability in [0, 1]")));
        }
        Ok(NoisyRelabel { teacher, params })
    }
}

/// `w_i = softmax(t_i)[y_i]`, set to 0 below `trust_threshold`, for teacher logits `[B, C]`.
pub fn trust_weights(teacher_logits: &Tensor, labels: &IdTensor, trust_threshold: Option<f32>) -> Result<Vec<f32>> {
    let c = teacher_logits.last_dim();
    let (rows, labels) = (teacher_logits.to_vec()?, labels.to_vec()?);
    if rows.len() != labels.len() * c {
        return Err(Error::Invalid(format!(
            "{} labels for teacher logits of shape {:?}",
            labels.len(),
            teacher_logits.shape()
        )));
    }
    rows.chunks(c)
        .zip(labels)
        .map(|(row, y)| {
            let y = y as usize;
            if y >= c {
                return Err(Error::Invalid(format!("label {y} is out of range for {c} classes")));
            }
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let p = ((row[y] as f64 - max).exp() / z) as f32;
            Ok(if trust_threshold.is_some_and(|cut| p < cut) { 0.0 } else { p })
        })
        .collect()
}

impl Objective for NoisyRelabel<'_> {
    fn student_outputs(&self) -> Outputs {
        Outputs::Logits
    }

    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let labels = input
            .targets
            .classes()
            .ok_or_else(|| Error::Config("noisy-relabel needs class labels; this task is a regression".into()))?;
        let RelabelParams { alpha, temperature, trust_threshold } = self.params;
        let teacher = self.teacher.logits(input)?;
        let w = trust_weights(&teacher, labels, trust_threshold)?;
        let w = Tensor::from_vec(w, &[labels.numel()], &teacher.device())?;
        let mut log = LossLog::default();
        log.push("kd", losses::logit_kd(grads, student, &teacher, temperature, None, alpha)?);
        log.push("trusted_ce", losses::cross_entropy(grads, student, labels, Some(&w), 1.0 - alpha)?);
        Ok(log)
    }
}
