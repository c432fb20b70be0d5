//! The "standard step" that kd's training speed is quoted in (`kd-cli bench step`, the criterion
//! bench `step`, and `scripts/bench_step_torch.py` for the same step in PyTorch): a frozen
//! teacher's forward in evaluation mode, the student's forward and backward in training mode
//! (its configuration's dropout), the logit-KD loss `0.5 * CE + 0.5 * T^2 * KL` at `T = 2` on a
//! 2-class head, and one AdamW update; on one fixed batch of random token ids with no padding,
//! so that only the model's work is measured, not data loading.

use std::time::{Duration, Instant};

use kd_kernels::rng::{mix64, Rng};
use kd_kernels::{IdTensor, Tensor};
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode, OutputGrads, Outputs};
use kd_model::optim::{LinearSchedule, Optimizer, OptimizerConfig};
use kd_model::BertWeights;

use crate::losses;
use crate::methods::teacher::check_compatible;
use crate::{Error, Result};

/// Classes of the head the step trains (a fresh one where a checkpoint has none).
pub const NUM_LABELS: usize = 2;
/// The soft term's share of the loss.
pub const ALPHA: f32 = 0.5;
pub const TEMPERATURE: f32 = 2.0;

/// Where one step's wall time went. On a GPU each phase ends by reading a few values back, so
/// the work it queued is counted in it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    pub teacher_forward: Duration,
    pub student_forward: Duration,
    /// Both loss terms and their gradient w.r.t. the student's logits.
    pub loss: Duration,
    /// Zeroing the parameter gradients and the student's backward.
    pub backward: Duration,
    /// Gradient clipping and the AdamW update.
    pub optimizer: Duration,
}

impl PhaseTimes {
    pub fn total(&self) -> Duration {
        self.teacher_forward + self.student_forward + self.loss + self.backward + self.optimizer
    }

    /// The phase names and times, in step order.
    pub fn named(&self) -> [(&'static str, Duration); 5] {
        [
            ("teacher_forward", self.teacher_forward),
            ("student_forward", self.student_forward),
            ("loss", self.loss),
            ("backward", self.backward),
            ("optimizer", self.optimizer),
        ]
    }
}

impl std::ops::AddAssign for PhaseTimes {
    fn add_assign(&mut self, other: PhaseTimes) {
        self.teacher_forward += other.teacher_forward;
        self.student_forward += other.student_forward;
        self.loss += other.loss;
        self.backward += other.backward;
        self.optimizer += other.optimizer;
    }
}

/// The outcome of one [`StandardStep::run_step`].
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    pub loss: f32,
    pub phases: PhaseTimes,
}

/// Teacher, student, batch and every buffer of the step, allocated once for its `(batch, seq)`
/// and reused by each [`run_step`](StandardStep::run_step).
pub struct StandardStep {
    teacher: Bert,
    student: Bert,
    batch: EncoderBatch,
    labels: IdTensor,
    teacher_acts: Activations,
    student_acts: Activations,
    out_grads: OutputGrads,
    grads: BertWeights,
    optimizer: Optimizer,
    seed: u64,
}

/// Gives `model` a fresh [`NUM_LABELS`]-class head unless it has one (and a pooler), as
/// `BertForSequenceClassification.from_pretrained(dir, num_labels=2)` does.
fn with_head(model: &mut Bert, seed: u64) -> Result<()> {
    let fits = model.num_labels() == Some(NUM_LABELS) && model.weights.pooler.is_some();
    if !fits {
        model.weights.init_classifier(&model.config, NUM_LABELS, seed)?;
    }
    model.config.set_num_labels(NUM_LABELS);
    Ok(())
}

fn logits(acts: &Activations) -> Result<&Tensor> {
    acts.logits.as_ref().ok_or_else(|| Error::Config("the model has no classifier head".into()))
}

impl StandardStep {
    /// Sets up the step on the student's device: `batch` rows of `seq` token ids drawn with
    /// `seed` from the vocabulary less `special_ids` (no padding, one segment), random labels,
    /// and AdamW (HF `Trainer` defaults: lr 5e-5, weight decay 0.01, clipping at norm 1) at a
    /// constant learning rate.
    pub fn new(
        mut teacher: Bert,
        mut student: Bert,
        batch: usize,
        seq: usize,
        seed: u64,
        special_ids: &[u32],
    ) -> Result<StandardStep> {
        if batch == 0 || seq == 0 {
            return Err(Error::Config(format!(
                "the step needs at least one token per row and one row, got {batch}x{seq}"
            )));
        }
        let device = student.device();
        if !teacher.device().same(&device) {
            return Err(Error::Config(format!("teacher is on {}, student on {device}", teacher.device())));
        }
        with_head(&mut teacher, mix64(seed ^ 1))?;
        with_head(&mut student, mix64(seed ^ 2))?;
        check_compatible(&teacher, &student)?;

        let allowed: Vec<u32> = (0..student.config.vocab_size as u32).filter(|id| !special_ids.contains(id)).collect();
        if allowed.is_empty() {
            return Err(Error::Config("every token id of the vocabulary is a special token".into()));
        }
        let mut rng = Rng::new(seed);
        let n = batch * seq;
        let ids: Vec<u32> = (0..n).map(|_| allowed[rng.below(allowed.len())]).collect();
        let labels: Vec<u32> = (0..batch).map(|_| rng.below(NUM_LABELS) as u32).collect();
        let encoder_batch = EncoderBatch::new(&ids, &vec![0; n], &vec![1.0; n], batch, seq, &device)?;

        let teacher_acts = teacher.activations_for(batch, seq, Outputs::LogitsInference)?;
        let student_acts = student.activations_for(batch, seq, Outputs::Logits)?;
        let out_grads = student_acts.output_grads()?;
        let config = OptimizerConfig {
            lr: 5e-5,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: Some(1.0),
            // No warm-up and no decay within any run one could time.
            schedule: LinearSchedule { warmup: 0, total: u64::MAX },
        };
        Ok(StandardStep {
            optimizer: Optimizer::new(config, &student.weights)?,
            grads: student.weights.zeros_like()?,
            labels: IdTensor::from_vec(labels, &[batch], &device)?,
            batch: encoder_batch,
            teacher,
            student,
            teacher_acts,
            student_acts,
            out_grads,
            seed,
        })
    }

    pub fn teacher(&self) -> &Bert {
        &self.teacher
    }

    pub fn student(&self) -> &Bert {
        &self.student
    }

    /// Waits for all the work queued on the device (kd issues everything on one stream) by
    /// reading back a few values.
    fn fence(&self) -> Result<()> {
        logits(&self.student_acts)?.to_vec()?;
        Ok(())
    }

    /// Runs one step, timing its phases; each step draws fresh dropout masks.
    pub fn run_step(&mut self) -> Result<StepReport> {
        let mut phases = PhaseTimes::default();
        let mut clock = Instant::now();
        let mut lap = |slot: &mut Duration| {
            let now = Instant::now();
            *slot = now - clock;
            clock = now;
        };

        let eval = ForwardMode { train: false, seed: 0, keep_scores: false };
        self.teacher.forward(&mut self.teacher_acts, &self.batch, None, eval)?;
        let teacher_logits = logits(&self.teacher_acts)?;
        self.fence()?;
        lap(&mut phases.teacher_forward);

        let train =
            ForwardMode { train: true, seed: mix64(self.seed.wrapping_add(self.optimizer.step)), keep_scores: false };
        self.student.forward(&mut self.student_acts, &self.batch, None, train)?;
        self.fence()?;
        lap(&mut phases.student_forward);

        self.out_grads.zero()?;
        let (acts, grads) = (&self.student_acts, &mut self.out_grads);
        let loss = losses::cross_entropy(grads, acts, &self.labels, None, 1.0 - ALPHA)?
            + losses::logit_kd(grads, acts, teacher_logits, TEMPERATURE, None, ALPHA)?;
        if !loss.is_finite() {
            return Err(Error::NonFinite(format!("loss is {loss} at step {}", self.optimizer.step + 1)));
        }
        lap(&mut phases.loss);

        self.grads.zero()?;
        self.student.backward(&mut self.grads, &mut self.student_acts, &self.out_grads, &self.batch, None)?;
        self.fence()?;
        lap(&mut phases.backward);

        self.optimizer.update(&mut self.student.weights, &mut self.grads)?;
        self.fence()?;
        lap(&mut phases.optimizer);
        Ok(StepReport { loss, phases })
    }
}

#[cfg(test)]
mod tests {
    use kd_kernels::Device;
    use kd_model::BertConfig;

    use super::*;

    fn model(layers: usize, seed: u64) -> Bert {
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": layers, "num_attention_heads": 2,
            "intermediate_size": 24, "max_position_embeddings": 16,
        }))
        .unwrap();
        let mut weights = BertWeights::init(&config, NUM_LABELS, seed, &Device::Cpu).unwrap();
        // Encoder-only, like the MiniLM checkpoints: the step adds the head.
        (weights.pooler, weights.classifier) = (None, None);
        Bert::new(config, weights)
    }

    fn values(w: &BertWeights) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        w.visit(&mut |name, t| out.push((name.to_string(), t.to_vec().unwrap())));
        out
    }

    #[test]
    fn trains_the_student_and_leaves_the_teacher_alone() {
        let mut step = StandardStep::new(model(2, 1), model(1, 2), 3, 5, 7, &[0, 1]).unwrap();
        assert_eq!((step.teacher().num_labels(), step.student().num_labels()), (Some(2), Some(2)));
        let teacher = values(&step.teacher().weights);
        let mut student = values(&step.student().weights);
        for _ in 0..2 {
            let report = step.run_step().unwrap();
            assert!(report.loss.is_finite() && report.loss > 0.0, "loss {}", report.loss);
            assert!(report.phases.total() > Duration::ZERO);
            let now = values(&step.student().weights);
            for ((name, before), (_, after)) in student.iter().zip(&now) {
                assert_ne!(before, after, "student {name} did not change");
            }
            student = now;
        }
        assert_eq!(values(&step.teacher().weights), teacher, "the teacher changed");
        let ids = step.batch.ids.to_vec().unwrap();
        assert!(ids.iter().all(|&id| (2..50).contains(&id)), "special or out-of-range id in {ids:?}");
    }

    #[test]
    fn rejects_an_empty_batch_and_an_all_special_vocabulary() {
        let err = |r: Result<StandardStep>| r.err().expect("set-up succeeded").to_string();
        assert!(err(StandardStep::new(model(1, 1), model(1, 2), 0, 4, 7, &[])).contains("0x4"));
        let all: Vec<u32> = (0..50).collect();
        assert!(err(StandardStep::new(model(1, 1), model(1, 2), 2, 4, 7, &all)).contains("special"));
    }
}
