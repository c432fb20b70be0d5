//! `kd`: Hinton et al. 2015, logit distillation.
//!
//! loss = (1 - a) * CE(z_s, y) + a * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
//! Regression tasks (STS-B) use (1 - a) * MSE(z_s, y) + a * MSE(z_s, z_t) instead.
//!
//! Transfer rows (text the teacher labels, `--unlabeled`/`--augment`) have no gold label: their
//! loss is the soft term alone at full weight, T^2 * KL (or MSE to the teacher's score), as
//! TinyBERT's distillation on augmented data.

use kd_kernels::{Device, Tensor};
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
    /// Training-set rows from this index on are transfer rows (no gold label);
    /// `usize::MAX` when there are none.
    pub first_transfer_row: usize,
}

impl<'t> Kd<'t> {
    /// Logit KD on a labelled training set.
    pub fn new(teacher: &'t mut dyn TeacherLogits, alpha: f32, temperature: f32) -> Self {
        Kd { teacher, alpha, temperature, first_transfer_row: usize::MAX }
    }

    /// Per-example weights of the label and soft terms when the batch holds transfer rows:
    /// labelled rows `(1 - a, a)`, transfer rows `(0, 1)`.
    fn transfer_weights(&self, indices: &[usize], device: &Device) -> Result<Option<(Tensor, Tensor)>> {
        if indices.iter().all(|&i| i < self.first_transfer_row) {
            return Ok(None);
        }
        let gold: Vec<bool> = indices.iter().map(|&i| i < self.first_transfer_row).collect();
        let label = gold.iter().map(|&g| if g { 1.0 } else { 0.0 }).collect();
        let soft = gold.iter().map(|&g| if g { self.alpha } else { 1.0 }).collect();
        let b = indices.len();
        Ok(Some((Tensor::from_vec(label, &[b], device)?, Tensor::from_vec(soft, &[b], device)?)))
    }
}

impl Objective for Kd<'_> {
    fn student_outputs(&self) -> Outputs {
        Outputs::Logits
    }

    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let teacher = self.teacher.logits(input)?;
        let mut log = LossLog::default();
        let weights = self.transfer_weights(input.indices, &teacher.device())?;
        // Without transfer rows the weights are the scalars (1 - a, a); with them, per row.
        let (label_w, soft_w, label_scale, soft_scale) = match &weights {
            None => (None, None, 1.0 - self.alpha, self.alpha),
            Some((label, soft)) => (Some(label), Some(soft), 1.0 - self.alpha, 1.0),
        };
        if self.alpha < 1.0 {
            log.push("ce", losses::label_loss(grads, student, input.targets, label_w, label_scale)?);
        }
        let soft = match input.targets {
            BatchTargets::Classes(_) => {
                losses::logit_kd(grads, student, &teacher, self.temperature, soft_w, soft_scale)?
            }
            BatchTargets::Scores(_) => losses::logit_mse(grads, student, &teacher, soft_w, soft_scale)?,
        };
        log.push("kd", soft);
        Ok(log)
    }
}

#[cfg(test)]
mod tests {
    use kd_kernels::Device;
    use kd_model::bert::{Bert, ForwardMode};

    use super::*;
    use crate::batching::{collate, gather_targets, Encoded, EncodedSet, Targets};
    use crate::methods::teacher::CachedLogits;

    fn model(seed: u64) -> Bert {
        kd_model::testing::tiny_bert(30, 8, 3, seed)
    }

    fn softmax(z: &[f32], t: f32) -> Vec<f64> {
        let m = z.iter().fold(f32::MIN, |a, &b| a.max(b));
        let e: Vec<f64> = z.iter().map(|&v| (((v - m) / t) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// Rows 0 and 1 are labelled, rows 2 and 3 transfer rows: the label term reaches only the
    /// first two, and the transfer rows carry the soft term at full weight.
    #[test]
    fn transfer_rows_carry_the_soft_term_alone_at_full_weight() {
        let (student, teacher) = (model(1), model(2));
        let items: Vec<Encoded> =
            (0..4u32).map(|i| Encoded { ids: vec![1, 5 + i, 9 + 2 * i, 2], type_ids: vec![0; 4] }).collect();
        let labels = vec![2, 0, 1, 1];
        let set = EncodedSet { items, targets: Targets::Classes(labels.clone()) };
        let mut cache = CachedLogits::build(&teacher, &set, 4).unwrap();
        let teacher_rows = cache.rows().to_vec();
        let (alpha, t) = (0.3, 2.0);
        let mut kd = Kd { first_transfer_row: 2, ..Kd::new(&mut cache, alpha, t) };

        let indices = [0, 1, 2, 3];
        let batch = collate(&set.items, 0, &Device::Cpu).unwrap();
        let targets = gather_targets(&set.targets, &indices, &Device::Cpu).unwrap();
        let mut acts = student.activations(batch.batch, batch.seq).unwrap();
        student.forward(&mut acts, &batch, None, ForwardMode { train: false, seed: 0, keep_scores: false }).unwrap();
        let mut grads = acts.output_grads().unwrap();
        let input =
            StepInput { batch: &batch, indices: &indices, targets: &targets, epoch: 0, step: 0, steps_per_epoch: 1 };
        let log = kd.loss(&input, &acts, &mut grads).unwrap();

        let z = acts.logits.as_ref().unwrap().to_vec().unwrap();
        let got = grads.logits.as_ref().unwrap().to_vec().unwrap();
        let (mut ce, mut soft) = (0.0f64, 0.0f64);
        for i in 0..4 {
            let zi = &z[3 * i..3 * i + 3];
            let (p, ps, pt) = (softmax(zi, 1.0), softmax(zi, t), softmax(&teacher_rows[i], t));
            let labelled = i < 2;
            let (w_label, w_soft) = if labelled { (1.0 - alpha as f64, alpha as f64) } else { (0.0, 1.0) };
            if labelled {
                ce += -(p[labels[i] as usize].ln()) / 4.0;
            }
            soft += w_soft * (t * t) as f64 * (0..3).map(|c| pt[c] * (pt[c] / ps[c]).ln()).sum::<f64>() / 4.0;
            for c in 0..3 {
                let y = if c == labels[i] as usize { 1.0 } else { 0.0 };
                let want = (w_label * (p[c] - y) + w_soft * t as f64 * (ps[c] - pt[c])) / 4.0;
                assert!((got[3 * i + c] as f64 - want).abs() < 1e-6, "row {i} class {c}: {} vs {want}", got[3 * i + c]);
            }
        }
        let term = |name: &str| log.terms.iter().find(|(n, _)| *n == name).unwrap().1 as f64;
        assert!((term("ce") - (1.0 - alpha as f64) * ce).abs() < 1e-6, "ce {} vs {}", term("ce"), ce);
        assert!((term("kd") - soft).abs() < 1e-6, "kd {} vs {soft}", term("kd"));
    }
}
