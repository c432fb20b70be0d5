//! The training loop every method shares: seeded shuffling, dynamic-padding batches, one
//! forward/backward/AdamW update per batch, periodic evaluation on dev. A method supplies only
//! its [`Objective`]: the loss of one batch, written into the student's output gradients.

use std::time::Instant;

use kd_kernels::rng::{mix64, Rng};
use kd_kernels::Device;
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode, OutputGrads, Outputs};
use kd_model::optim::{LinearSchedule, Optimizer, OptimizerConfig};
use kd_model::BertWeights;

use crate::batching::{collate, epoch_batches, gather_targets, BatchTargets, Encoded, EncodedSet, Targets};
use crate::checkpoint::{self, CheckpointConfig, OwnPart, Part, PartMut};
use crate::data::Label;
use crate::metrics::{task_metrics, MetricKind, Metrics};
use crate::{Error, Result};

/// One batch as an objective sees it.
pub struct StepInput<'a> {
    pub batch: &'a EncoderBatch,
    /// Positions of the batch's examples in the training set (teacher caches key on them).
    pub indices: &'a [usize],
    pub targets: &'a BatchTargets,
    pub epoch: usize,
    /// 0-based optimiser step.
    pub step: u64,
    pub steps_per_epoch: u64,
}

/// The named terms of one batch's loss, for logging; `total` is what was differentiated.
#[derive(Clone, Debug, Default)]
pub struct LossLog {
    pub total: f32,
    pub terms: Vec<(&'static str, f32)>,
}

impl LossLog {
    pub fn push(&mut self, name: &'static str, value: f32) {
        self.total += value;
        self.terms.push((name, value));
    }
}

/// What a method trains the student to minimise on one batch.
pub trait Objective {
    /// What the student's forward keeps: losses on logits alone say [`Outputs::Logits`], which
    /// skips most of the last layer for the non-[CLS] rows.
    fn student_outputs(&self) -> Outputs {
        Outputs::All
    }

    /// Whether the student's forward must keep its attention scores (attention-map losses).
    fn keep_scores(&self) -> bool {
        false
    }

    /// Runs the student on the step's batch. A method that feeds the student something other
    /// than the batch (CR-ILD's mixed embeddings) overrides this with
    /// [`Objective::student_backward`].
    fn student_forward(
        &mut self,
        student: &Bert,
        acts: &mut Activations,
        input: &StepInput,
        mode: ForwardMode,
    ) -> Result<()> {
        Ok(student.forward(acts, input.batch, None, mode)?)
    }

    /// Computes the loss of `student` on `input` and accumulates its gradient into `grads`.
    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog>;

    /// Backpropagates `out_grads` through the pass [`Objective::student_forward`] ran.
    fn student_backward(
        &mut self,
        student: &Bert,
        grads: &mut BertWeights,
        acts: &mut Activations,
        out_grads: &OutputGrads,
        input: &StepInput,
    ) -> Result<()> {
        Ok(student.backward(grads, acts, out_grads, input.batch, None)?)
    }

    /// Steps parameters the objective trains alongside the student (a learned width
    /// projection), once per step after [`Objective::loss`], just before `student`'s update.
    fn update_own(&mut self, _student: &Optimizer) -> Result<()> {
        Ok(())
    }

    /// The parameters [`Objective::update_own`] steps, with their optimiser (made from
    /// `student`'s settings if none is yet), for the checkpoint to save and restore: a resumed
    /// run must continue them, not restart them.
    fn own_part(&mut self, _student: &Optimizer) -> Result<Option<OwnPart<'_>>> {
        Ok(None)
    }

    /// What the checkpoint saves and restores beside the student: [`Objective::own_part`], and
    /// whole models the objective trains with optimisers of their own (a co-teaching peer), each
    /// under its prefix. A resumed run must continue them all, not restart them.
    fn checkpoint_parts(&mut self, student: &Optimizer) -> Result<(Option<OwnPart<'_>>, Vec<PartMut<'_>>)> {
        Ok((self.own_part(student)?, Vec::new()))
    }
}

/// Hyper-parameters of one training run (HF `TrainingArguments` names where they exist).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub warmup_ratio: f32,
    pub weight_decay: f32,
    pub max_grad_norm: Option<f32>,
    pub seed: u64,
    /// Batch examples of similar length together ([`epoch_batches`]): less padding, same epoch.
    pub group_by_length: bool,
    /// Evaluate on dev every this many steps (and always at the end).
    pub eval_every: Option<u64>,
    pub metric: MetricKind,
    /// Periodic resumable state (None: nothing is written).
    pub checkpoint: Option<CheckpointConfig>,
}

impl TrainConfig {
    /// Optimiser steps of a run over `examples` training examples.
    pub fn total_steps(&self, examples: usize) -> u64 {
        examples.div_ceil(self.batch_size) as u64 * self.epochs as u64
    }

    /// The AdamW set-up of a run of `total_steps`; a model trained alongside the student (a
    /// co-teaching peer) uses the same one.
    pub fn optimizer(&self, total_steps: u64) -> OptimizerConfig {
        OptimizerConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: self.max_grad_norm,
            schedule: LinearSchedule {
                warmup: (self.warmup_ratio * total_steps as f32).ceil() as u64,
                total: total_steps,
            },
        }
    }
}

/// What the loop reports as it goes (the CLI draws progress bars and writes JSON lines).
pub enum Event<'a> {
    Step {
        step: u64,
        total_steps: u64,
        loss: &'a LossLog,
        lr: f32,
        examples_per_s: f64,
    },
    Eval {
        step: u64,
        metrics: &'a Metrics,
    },
    /// A dev evaluation beat every earlier one: the observer may save `model`.
    Best {
        step: u64,
        metrics: &'a Metrics,
        model: &'a Bert,
    },
    /// Training resumed from a saved state after `step` updates.
    Resumed {
        step: u64,
    },
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub steps: u64,
    pub seconds: f64,
    pub final_metrics: Option<Metrics>,
    pub best_metrics: Option<Metrics>,
}

/// The batches of a run from batch `resume_at` on, as (epoch, example positions): each epoch's
/// order is a shuffle seeded by (seed, epoch), so a resumed run replays exactly what an
/// uninterrupted one does after the interruption.
pub(crate) fn batches<'a>(
    items: &'a [Encoded],
    cfg: &TrainConfig,
    resume_at: u64,
) -> impl Iterator<Item = (usize, Vec<usize>)> + 'a {
    let (batch_size, seed, grouped) = (cfg.batch_size, cfg.seed, cfg.group_by_length);
    (0..cfg.epochs)
        .flat_map(move |epoch| {
            let mut rng = Rng::new(mix64(seed ^ (epoch as u64 + 1)));
            epoch_batches(items, batch_size, grouped, &mut rng).into_iter().map(move |chunk| (epoch, chunk))
        })
        .skip(resume_at as usize)
}

/// A run's dev scores: evaluated every `eval_every` steps and after the last, the best kept.
#[derive(Default)]
pub(crate) struct DevScores {
    pub best: Option<Metrics>,
    pub last: Option<Metrics>,
}

impl DevScores {
    /// Evaluates `student` on `dev` when step `step` of `total` is due, telling `observer`.
    pub(crate) fn after_step(
        &mut self,
        (step, total): (u64, u64),
        cfg: &TrainConfig,
        dev: Option<&EncodedSet>,
        student: &Bert,
        observer: &mut dyn FnMut(Event),
    ) -> Result<()> {
        let due = cfg.eval_every.is_some_and(|n| step.is_multiple_of(n)) || step == total;
        let Some(dev) = dev.filter(|_| due) else { return Ok(()) };
        let metrics = evaluate(student, dev, cfg.batch_size, cfg.metric)?;
        observer(Event::Eval { step, metrics: &metrics });
        if self.best.as_ref().is_none_or(|b| metrics.main() > b.main()) {
            self.best = Some(metrics.clone());
            observer(Event::Best { step, metrics: &metrics, model: student });
        }
        self.last = Some(metrics);
        Ok(())
    }
}

/// Trains `student` on `train` with `objective`; evaluates on `dev` when given.
pub fn train(
    student: &mut Bert,
    train: &EncodedSet,
    dev: Option<&EncodedSet>,
    objective: &mut dyn Objective,
    cfg: &TrainConfig,
    observer: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    if train.items.is_empty() {
        return Err(Error::Config("the training set is empty".into()));
    }
    let device = student.device();
    let pad = student.config.pad_token_id;
    let steps_per_epoch = train.items.len().div_ceil(cfg.batch_size) as u64;
    let total_steps = cfg.total_steps(train.items.len());
    let mut optimizer = Optimizer::new(cfg.optimizer(total_steps), &student.weights)?;
    let mut grads = student.weights.zeros_like()?;
    let started = Instant::now();
    let mut scores = DevScores::default();
    let mut step = 0u64;
    let (own, models) = objective.checkpoint_parts(&optimizer)?;
    let mut parts = vec![("", &mut student.weights, &mut optimizer)];
    parts.extend(models);
    if let Some(resumed) = checkpoint::resume(cfg.checkpoint.as_ref(), &mut parts, own, observer)? {
        step = resumed.step;
        scores.best = resumed.best;
    }

    for (epoch, indices) in batches(&train.items, cfg, step) {
        let indices = &indices[..];
        let t0 = Instant::now();
        let batch = collate(indices.iter().map(|&i| &train.items[i]), pad, &device)?;
        let targets = gather_targets(&train.targets, indices, &device)?;
        let mut acts = student.activations_for(batch.batch, batch.seq, objective.student_outputs())?;
        let mode =
            ForwardMode { train: true, seed: mix64(cfg.seed.wrapping_add(step)), keep_scores: objective.keep_scores() };
        let input = StepInput { batch: &batch, indices, targets: &targets, epoch, step, steps_per_epoch };
        objective.student_forward(student, &mut acts, &input, mode)?;
        let mut out_grads = acts.output_grads()?;
        let loss = objective.loss(&input, &acts, &mut out_grads)?;
        if !loss.total.is_finite() {
            let at = format!("step {} (epoch {})", step + 1, epoch + 1);
            return Err(Error::NonFinite(format!("the student's loss is {} at {at}", loss.total)));
        }
        grads.zero()?;
        objective.student_backward(student, &mut grads, &mut acts, &out_grads, &input)?;
        let lr = optimizer.lr();
        objective.update_own(&optimizer)?;
        optimizer.update(&mut student.weights, &mut grads).map_err(of_model("the student's"))?;
        step += 1;
        let examples_per_s = indices.len() as f64 / t0.elapsed().as_secs_f64();
        observer(Event::Step { step, total_steps, loss: &loss, lr, examples_per_s });

        scores.after_step((step, total_steps), cfg, dev, student, observer)?;
        let (own, models) = objective.checkpoint_parts(&optimizer)?;
        let mut parts: Vec<Part> = vec![("", &student.weights, &optimizer)];
        parts.extend(models.into_iter().map(|(prefix, weights, optimizer)| (prefix, &*weights, &*optimizer)));
        checkpoint::save_if_due(cfg.checkpoint.as_ref(), &parts, own, step, total_steps, scores.best.as_ref())?;
    }
    let DevScores { best, last } = scores;
    Ok(TrainReport { steps: step, seconds: started.elapsed().as_secs_f64(), final_metrics: last, best_metrics: best })
}

/// Names the model in a non-finite value's error ("the peer's gradient norm is NaN at ...").
pub fn of_model(model: &'static str) -> impl Fn(kd_model::Error) -> Error {
    move |e| match e {
        kd_model::Error::NonFinite(what) => Error::NonFinite(format!("{model} {what}")),
        other => other.into(),
    }
}

/// The model's outputs on every example of `items`, in order: `[C]` logits per example.
/// Batches are cut from the examples sorted by length, so each pads to nearly its own length.
pub fn predict(model: &Bert, items: &[Encoded], batch_size: usize) -> Result<Vec<Vec<f32>>> {
    let device: Device = model.device();
    let pad = model.config.pad_token_id;
    let mut by_length: Vec<usize> = (0..items.len()).collect();
    by_length.sort_by_key(|&i| items[i].ids.len());
    let mut out = vec![Vec::new(); items.len()];
    for chunk in by_length.chunks(batch_size) {
        let batch = collate(chunk.iter().map(|&i| &items[i]), pad, &device)?;
        let mut acts = model.activations_for(batch.batch, batch.seq, Outputs::LogitsInference)?;
        model.forward(&mut acts, &batch, None, ForwardMode::default())?;
        let logits = acts.logits.as_ref().ok_or_else(|| Error::Config("the model has no classifier head".into()))?;
        let c = logits.last_dim();
        for (&i, row) in chunk.iter().zip(logits.to_vec()?.chunks(c)) {
            out[i] = row.to_vec();
        }
    }
    Ok(out)
}

/// The task's metrics of `model` on `set`.
pub fn evaluate(model: &Bert, set: &EncodedSet, batch_size: usize, metric: MetricKind) -> Result<Metrics> {
    let outputs = predict(model, &set.items, batch_size)?;
    let (preds, gold): (Vec<Label>, Vec<Label>) = match &set.targets {
        Targets::Classes(labels) => (
            outputs.iter().map(|r| Label::Class(argmax(r))).collect(),
            labels.iter().map(|&l| Label::Class(l as usize)).collect(),
        ),
        Targets::Scores(scores) => {
            (outputs.iter().map(|r| Label::Score(r[0])).collect(), scores.iter().map(|&s| Label::Score(s)).collect())
        }
    };
    task_metrics(metric, &preds, &gold)
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predict_batches_by_length_and_answers_in_the_callers_order() {
        let model = kd_model::testing::tiny_bert(16, 8, 3, 1);
        // Lengths 7, 2, 5, 3, 6, 2, 4: sorted batches of 3 mix rows from all over the list.
        let items: Vec<Encoded> = [7usize, 2, 5, 3, 6, 2, 4]
            .iter()
            .enumerate()
            .map(|(i, &len)| Encoded {
                ids: (0..len as u32).map(|t| 1 + (t + i as u32) % 15).collect(),
                type_ids: vec![0; len],
            })
            .collect();
        let batched = predict(&model, &items, 3).unwrap();
        for (item, row) in items.iter().zip(&batched) {
            let alone = predict(&model, std::slice::from_ref(item), 1).unwrap();
            for (a, b) in alone[0].iter().zip(row) {
                assert!((a - b).abs() < 1e-5, "{:?} alone gives {:?}, batched {row:?}", item.ids, alone[0]);
            }
        }
    }
}
