//! `ild`: intermediate-layer distillation (TinyBERT / PKD style), stage 1 of a two-stage run
//! whose stage 2 is logit KD ([`crate::methods::kd`]).
//!
//! With a teacher of N layers and a student of M, student layer m is matched to teacher layer
//! g(m) = m * N / M (uniform mapping):
//!   loss = sum_m MSE(h_s[m], h_t[g(m)])  +  sum_m KL(A_t[g(m)] || A_s[m])
//! over hidden states (masked MSE, DESIGN.md) and attention maps (row KL, masked keys excluded).
//! `last_layer` keeps only the last pair of each (L-ILD).

use kd_model::bert::{Activations, Bert, OutputGrads};

use crate::losses;
use crate::methods::teacher::LiveTeacher;
use crate::trainer::{LossLog, Objective, StepInput};
use crate::{Error, Result};

/// Which layers are matched.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerMap {
    /// (student hidden-state index, teacher hidden-state index); 0 is the embedding output.
    pub hidden: Vec<(usize, usize)>,
    /// (student layer, teacher layer) attention maps, 0-based.
    pub attention: Vec<(usize, usize)>,
}

impl LayerMap {
    /// Uniform mapping of every student layer, or of the last one only.
    pub fn uniform(student_layers: usize, teacher_layers: usize, last_layer: bool) -> Result<LayerMap> {
        if student_layers == 0 || !teacher_layers.is_multiple_of(student_layers) {
            return Err(Error::Config(format!(
                "cannot map {student_layers} student layers uniformly onto {teacher_layers} teacher layers"
            )));
        }
        let per = teacher_layers / student_layers;
        let first = if last_layer { student_layers } else { 1 };
        Ok(LayerMap {
            hidden: (first..=student_layers).map(|m| (m, m * per)).collect(),
            attention: (first..=student_layers).map(|m| (m - 1, m * per - 1)).collect(),
        })
    }
}

pub struct Ild<'t> {
    pub teacher: LiveTeacher<'t>,
    pub map: LayerMap,
}

impl<'t> Ild<'t> {
    pub fn new(teacher: &'t Bert, student: &Bert, last_layer: bool) -> Result<Self> {
        if teacher.config.hidden_size != student.config.hidden_size {
            return Err(Error::Config(format!(
                "ild matches hidden states directly: teacher width {} differs from student width {}",
                teacher.config.hidden_size, student.config.hidden_size
            )));
        }
        let map = LayerMap::uniform(student.config.num_hidden_layers, teacher.config.num_hidden_layers, last_layer)?;
        Ok(Ild { teacher: LiveTeacher::new(teacher, true), map })
    }
}

impl Objective for Ild<'_> {
    fn keep_scores(&self) -> bool {
        true
    }

    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let teacher = self.teacher.forward(input)?;
        let mask = &input.batch.mask;
        let mut log = LossLog::default();
        log.push("hidden_mse", losses::hidden_mse(grads, student, teacher, &self.map.hidden, mask, 1.0)?);
        log.push("attn_kl", losses::attention_kl(grads, student, teacher, &self.map.attention, mask, 1.0)?);
        Ok(log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_map_follows_tinybert() {
        let m = LayerMap::uniform(3, 6, false).unwrap();
        assert_eq!(m.hidden, vec![(1, 2), (2, 4), (3, 6)]);
        assert_eq!(m.attention, vec![(0, 1), (1, 3), (2, 5)]);
        let last = LayerMap::uniform(3, 6, true).unwrap();
        assert_eq!(last.hidden, vec![(3, 6)]);
        assert_eq!(last.attention, vec![(2, 5)]);
        assert!(LayerMap::uniform(4, 6, false).is_err());
    }
}
