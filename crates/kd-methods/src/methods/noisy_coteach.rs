//! `noisy-coteach`: co-teaching (Han et al. 2018) under the logit-KD loss (METHODS.md A.1 and
//! B §1.4c: the project's own mitigation for noisy labels, not verified to be one of Bhardwaj
//! et al. 2021's).
//!
//! ```text
//! two students A and B (different seeds), one frozen teacher
//! r_est = the given noise rate, else the fraction of training labels != the teacher's argmax
//! T_k   = 10% of the total steps
//! per batch of B examples, at 0-based step t:
//!   R(t)   = r_est * min(t / T_k, 1)                             # forget rate
//!   l_A(i) = (1 - a) * CE(y_i, A_i) + a * T^2 * KL(t_i || A_i)    # likewise l_B
//!   k      = ceil((1 - R(t)) * B)
//!   keep_A = the k examples of smallest l_B                      # each is chosen by its peer
//!   keep_B = the k examples of smallest l_A
//!   update A on mean_{i in keep_A} l_A(i);  update B on mean_{i in keep_B} l_B(i)
//! return A (or, by the caller's choice, `keep_better`: the student with the better dev score)
//! ```
//!
//! Small-loss examples are likely clean, and two differently initialised students make
//! different mistakes, so each filters label noise the other would memorise. A is the trainer's
//! student; [`CoTeach`], A's objective, owns B and updates it inside [`Objective::loss`] on the
//! same batch (B's own dropout seed: co-teaching needs both students' losses on one batch, so
//! both see the same batch order) before the trainer updates A; B and its optimiser are saved
//! in the checkpoint beside A, so a resumed run ends bit for bit where an uninterrupted one does.
//! Classification only.

use kd_kernels::rng::mix64;
use kd_kernels::{IdTensor, Tensor};
use kd_model::bert::{Activations, Bert, ForwardMode, OutputGrads, Outputs};
use kd_model::optim::Optimizer;
use kd_model::BertWeights;

use crate::batching::{EncodedSet, Targets};
use crate::checkpoint::{OwnPart, PartMut};
use crate::losses;
use crate::methods::kd::TeacherLogits;
use crate::metrics::{MetricKind, Metrics};
use crate::trainer::{argmax, evaluate, of_model, LossLog, Objective, StepInput, TrainConfig};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CoTeachParams {
    /// Share of the soft (KD) term; the hard-label term gets `1 - alpha`.
    pub alpha: f32,
    pub temperature: f32,
    /// r_est, the forget rate reached after the ramp: the known noise rate or
    /// [`estimate_noise_rate`].
    pub noise_rate: f32,
    /// Seed of B's dropout masks (the caller draws B's fresh head with it too).
    pub peer_seed: u64,
}

impl CoTeachParams {
    /// a = 0.5 and T = 2, as `kd`.
    pub fn new(noise_rate: f32, peer_seed: u64) -> Self {
        CoTeachParams { alpha: 0.5, temperature: 2.0, noise_rate, peer_seed }
    }
}

/// r_est when the noise rate is not given: the fraction of training labels that differ from the
/// teacher's argmax (`teacher_rows` index-aligned with `targets`, e.g. [`super::teacher::CachedLogits::rows`]).
pub fn estimate_noise_rate(teacher_rows: &[Vec<f32>], targets: &Targets) -> Result<f32> {
    let Targets::Classes(labels) = targets else {
        return Err(Error::Config("noisy-coteach needs class labels; this task is a regression".into()));
    };
    if labels.is_empty() || teacher_rows.len() != labels.len() {
        return Err(Error::Invalid(format!(
            "{} teacher rows for {} training labels",
            teacher_rows.len(),
            labels.len()
        )));
    }
    let disagree = teacher_rows.iter().zip(labels).filter(|(row, &y)| argmax(row) != y as usize).count();
    Ok(disagree as f32 / labels.len() as f32)
}

/// T_k, the steps over which the forget rate ramps up: 10% of the run, at least one.
pub fn ramp_steps(total_steps: u64) -> u64 {
    total_steps.div_ceil(10).max(1)
}

/// R(t) = r_est * min(t / T_k, 1).
pub fn forget_rate(step: u64, r_est: f32, ramp_steps: u64) -> f32 {
    r_est * (step as f32 / ramp_steps as f32).min(1.0)
}

/// k = ceil((1 - R) * B), at least one example. The product is rounded within 1e-4 first, so
/// that a float error (0.7 * 10 = 7.0000001) does not add an example.
pub fn keep_count(batch: usize, forget_rate: f32) -> usize {
    let exact = (1.0 - forget_rate as f64) * batch as f64;
    ((exact - 1e-4).ceil().max(1.0) as usize).min(batch)
}

/// Positions of the `k` smallest losses, smallest first (ties by position).
pub fn smallest(losses: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..losses.len()).collect();
    order.sort_by(|&i, &j| losses[i].total_cmp(&losses[j]).then(i.cmp(&j)));
    order.truncate(k);
    order
}

/// What one step selected, positions being the batch's rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub step: u64,
    pub forget_rate: f32,
    pub loss_a: Vec<f32>,
    pub loss_b: Vec<f32>,
    /// The rows A trained on: the smallest under B.
    pub keep_a: Vec<usize>,
    /// The rows B trained on: the smallest under A.
    pub keep_b: Vec<usize>,
}

/// A's objective; owns the peer B and its optimiser.
pub struct CoTeach<'t> {
    teacher: &'t mut dyn TeacherLogits,
    params: CoTeachParams,
    ramp_steps: u64,
    peer: Bert,
    optimizer: Optimizer,
    grads: BertWeights,
    acts: Option<Activations>,
    /// The last step's selection (diagnostics: which rows each student dropped).
    pub last: Option<Selection>,
}

impl<'t> CoTeach<'t> {
    /// `cfg` and `train_examples` are those of the trainer's run, so that B follows the same
    /// learning-rate schedule as A and T_k is 10% of its steps.
    pub fn new(
        teacher: &'t mut dyn TeacherLogits,
        peer: Bert,
        params: CoTeachParams,
        cfg: &TrainConfig,
        train_examples: usize,
    ) -> Result<Self> {
        losses::check_kd_weights(params.alpha, params.temperature)?;
        if !(0.0..=1.0).contains(&params.noise_rate) {
            return Err(Error::Config(format!("noise rate {} is not in [0, 1]", params.noise_rate)));
        }
        let total = cfg.total_steps(train_examples);
        let optimizer = Optimizer::new(cfg.optimizer(total), &peer.weights)?;
        let grads = peer.weights.zeros_like()?;
        Ok(CoTeach { teacher, params, ramp_steps: ramp_steps(total), peer, optimizer, grads, acts: None, last: None })
    }

    pub fn peer(&self) -> &Bert {
        &self.peer
    }

    pub fn into_peer(self) -> Bert {
        self.peer
    }
}

/// The mean KD loss over the rows `keep`, its gradient accumulated into `grads`: 0/1 example
/// weights turn the batch mean of the losses into a mean over the kept rows once scaled by B / k.
fn kd_on_kept(
    grads: &mut OutputGrads,
    acts: &Activations,
    labels: &IdTensor,
    teacher: &Tensor,
    keep: &[usize],
    params: &CoTeachParams,
) -> Result<(f32, f32)> {
    let b = labels.numel();
    let mut w = vec![0.0f32; b];
    keep.iter().for_each(|&i| w[i] = 1.0);
    let w = Tensor::from_vec(w, &[b], &teacher.device())?;
    let scale = b as f32 / keep.len() as f32;
    let ce = losses::cross_entropy(grads, acts, labels, Some(&w), (1.0 - params.alpha) * scale)?;
    let kd = losses::logit_kd(grads, acts, teacher, params.temperature, Some(&w), params.alpha * scale)?;
    Ok((ce, kd))
}

impl Objective for CoTeach<'_> {
    fn student_outputs(&self) -> Outputs {
        Outputs::Logits
    }

    /// B and its AdamW state go into the checkpoint as `peer.`: a resumed run continues B
    /// where it stopped, bit for bit, rather than restarting it from its initial weights.
    fn checkpoint_parts(&mut self, _student: &Optimizer) -> Result<(Option<OwnPart<'_>>, Vec<PartMut<'_>>)> {
        Ok((None, vec![("peer.", &mut self.peer.weights, &mut self.optimizer)]))
    }

    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let labels = input
            .targets
            .classes()
            .ok_or_else(|| Error::Config("noisy-coteach needs class labels; this task is a regression".into()))?;
        let p = self.params;
        let teacher = self.teacher.logits(input)?;
        let batch = input.batch;

        // B's forward on the same batch.
        if self.acts.as_ref().is_none_or(|a| (a.batch, a.seq) != (batch.batch, batch.seq)) {
            self.acts = Some(self.peer.activations_for(batch.batch, batch.seq, Outputs::Logits)?);
        }
        let peer_acts = self.acts.as_mut().expect("made above");
        let mode = ForwardMode { train: true, seed: mix64(p.peer_seed.wrapping_add(input.step)), keep_scores: false };
        self.peer.forward(peer_acts, batch, None, mode)?;

        let rate = forget_rate(input.step, p.noise_rate, self.ramp_steps);
        let loss_a = losses::kd_loss_rows(student, labels, &teacher, p.alpha, p.temperature)?;
        let loss_b = losses::kd_loss_rows(peer_acts, labels, &teacher, p.alpha, p.temperature)?;
        let k = keep_count(labels.numel(), rate);
        let keep_a = smallest(&loss_b, k);
        let keep_b = smallest(&loss_a, k);

        // B's update on the rows A chose.
        let mut peer_grads = peer_acts.output_grads()?;
        let (ce_b, kd_b) = kd_on_kept(&mut peer_grads, peer_acts, labels, &teacher, &keep_b, &p)?;
        if !(ce_b + kd_b).is_finite() {
            return Err(Error::NonFinite(format!("the peer's loss is {} at step {}", ce_b + kd_b, input.step + 1)));
        }
        self.grads.zero()?;
        self.peer.backward(&mut self.grads, peer_acts, &peer_grads, batch, None)?;
        self.optimizer.update(&mut self.peer.weights, &mut self.grads).map_err(of_model("the peer's"))?;

        // A's loss on the rows B chose; the trainer does A's update.
        let (ce_a, kd_a) = kd_on_kept(grads, student, labels, &teacher, &keep_a, &p)?;
        self.last = Some(Selection { step: input.step, forget_rate: rate, loss_a, loss_b, keep_a, keep_b });
        let mut log = LossLog::default();
        log.push("ce", ce_a);
        log.push("kd", kd_a);
        Ok(log)
    }
}

/// Which of the two students was kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Student {
    A,
    B,
}

pub struct Kept {
    pub model: Bert,
    pub which: Student,
    pub dev_a: Metrics,
    pub dev_b: Metrics,
}

/// The student with the better main dev metric (A on a tie).
pub fn keep_better(a: Bert, b: Bert, dev: &EncodedSet, batch_size: usize, metric: MetricKind) -> Result<Kept> {
    let dev_a = evaluate(&a, dev, batch_size, metric)?;
    let dev_b = evaluate(&b, dev, batch_size, metric)?;
    let (model, which) = if dev_b.main() > dev_a.main() { (b, Student::B) } else { (a, Student::A) };
    Ok(Kept { model, which, dev_a, dev_b })
}
