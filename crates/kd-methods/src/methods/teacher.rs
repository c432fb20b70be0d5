//! The teacher side of distillation: a frozen model run on the student's batch, or its logits
//! computed once for a whole training set and reused across epochs (the teacher cache).

use kd_kernels::Tensor;
use kd_model::bert::{Activations, Bert, ForwardMode};

use crate::batching::EncodedSet;
use crate::methods::kd::TeacherLogits;
use crate::trainer::{predict, StepInput};
use crate::{Error, Result};

/// Errors unless teacher and student read the same token ids the same way.
pub fn check_compatible(teacher: &Bert, student: &Bert) -> Result<()> {
    let (t, s) = (&teacher.config, &student.config);
    if t.vocab_size != s.vocab_size || t.pad_token_id != s.pad_token_id {
        return Err(Error::Config(format!(
            "teacher and student vocabularies differ (teacher vocab_size {} pad {}, student vocab_size {} pad {})",
            t.vocab_size, t.pad_token_id, s.vocab_size, s.pad_token_id
        )));
    }
    if teacher.num_labels() != student.num_labels() {
        return Err(Error::Config(format!(
            "teacher has {:?} labels, student {:?}",
            teacher.num_labels(),
            student.num_labels()
        )));
    }
    Ok(())
}

/// A frozen teacher evaluated on each batch (dropout off), for methods that need more than
/// its logits (hidden states, attention maps) or whose inputs change every step.
pub struct LiveTeacher<'t> {
    pub model: &'t Bert,
    pub keep_scores: bool,
    acts: Option<Activations>,
}

impl<'t> LiveTeacher<'t> {
    pub fn new(model: &'t Bert, keep_scores: bool) -> Self {
        LiveTeacher { model, keep_scores, acts: None }
    }

    /// Runs the teacher on the step's batch and returns its activations.
    pub fn forward(&mut self, input: &StepInput) -> Result<&Activations> {
        let b = input.batch;
        let reuse = self.acts.as_ref().is_some_and(|a| (a.batch, a.seq) == (b.batch, b.seq));
        if !reuse {
            self.acts = Some(self.model.activations(b.batch, b.seq)?);
        }
        let acts = self.acts.as_mut().expect("made above");
        let mode = ForwardMode { train: false, seed: 0, keep_scores: self.keep_scores };
        self.model.forward(acts, b, None, mode)?;
        Ok(acts)
    }
}

impl TeacherLogits for LiveTeacher<'_> {
    fn logits(&mut self, input: &StepInput) -> Result<Tensor> {
        let acts = self.forward(input)?;
        let logits = acts.logits.as_ref().ok_or_else(|| Error::Config("the teacher has no classifier head".into()))?;
        Ok(logits.try_clone()?)
    }
}

/// The teacher's logits for every example of a training set, computed once.
pub struct CachedLogits {
    rows: Vec<Vec<f32>>,
}

impl CachedLogits {
    pub fn build(teacher: &Bert, set: &EncodedSet, batch_size: usize) -> Result<Self> {
        Ok(CachedLogits { rows: predict(teacher, set, batch_size)? })
    }

    pub fn rows(&self) -> &[Vec<f32>] {
        &self.rows
    }

    /// Logits from elsewhere (a file of soft labels: log-probabilities serve as logits).
    pub fn from_rows(rows: Vec<Vec<f32>>) -> Self {
        CachedLogits { rows }
    }
}

impl TeacherLogits for CachedLogits {
    fn logits(&mut self, input: &StepInput) -> Result<Tensor> {
        let c = self.rows.first().map_or(0, Vec::len);
        let data: Vec<f32> = input.indices.iter().flat_map(|&i| self.rows[i].iter().copied()).collect();
        Ok(Tensor::from_vec(data, &[input.indices.len(), c], &input.batch.mask.device())?)
    }
}
