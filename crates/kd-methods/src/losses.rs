//! The distillation losses of DESIGN.md ("Loss conventions"), written over model activations.
//! Each returns its value and accumulates its gradient, times `weight`, into the student's
//! [`OutputGrads`], so a method's objective is a weighted sum of calls.

use kd_kernels::ops::cross_entropy::{self as ce_ops, Targets};
use kd_kernels::ops::gemm::{linear_backward, linear_forward};
use kd_kernels::ops::hidden_mse as mse_ops;
use kd_kernels::ops::softmax_kl::{softmax_kl, KlForm, SoftmaxKl};
use kd_kernels::rng::{mix64, Rng};
use kd_kernels::{Device, IdTensor, Tensor};
use kd_model::bert::{Activations, OutputGrads};
use kd_model::optim::{Optimizer, Params};
use kd_model::{BertConfig, Linear};

use crate::batching::BatchTargets;
use crate::checkpoint::OwnPart;
use crate::{Error, Result};

fn sum(t: &Tensor) -> Result<f32> {
    Ok(t.to_vec()?.iter().map(|&v| v as f64).sum::<f64>() as f32)
}

fn logits_of<'a>(acts: &'a Activations, who: &str) -> Result<&'a Tensor> {
    acts.logits.as_ref().ok_or_else(|| Error::Config(format!("the {who} has no classifier head")))
}

fn dlogits(grads: &mut OutputGrads) -> Result<&mut Tensor> {
    grads.logits.as_mut().ok_or_else(|| Error::Config("the student has no classifier head".into()))
}

/// `weight * mean_i w_i * CE(z_i, y_i)` with hard labels and optional per-example weights `w`.
pub fn cross_entropy(
    grads: &mut OutputGrads,
    student: &Activations,
    labels: &IdTensor,
    example_weights: Option<&Tensor>,
    weight: f32,
) -> Result<f32> {
    let logits = logits_of(student, "student")?;
    let b = logits.shape()[0];
    let mut rows = Tensor::zeros(&[b], &logits.device())?;
    let scale = weight / b as f32;
    ce_ops::cross_entropy(&mut rows, Some(dlogits(grads)?), logits, Targets::Hard(labels), example_weights, scale)?;
    Ok(sum(&rows)? * scale)
}

/// `weight * T^2 * mean_i w_i * KL(softmax(t_i / T) || softmax(s_i / T))` on the logits.
pub fn logit_kd(
    grads: &mut OutputGrads,
    student: &Activations,
    teacher_logits: &Tensor,
    temperature: f32,
    example_weights: Option<&Tensor>,
    weight: f32,
) -> Result<f32> {
    let logits = logits_of(student, "student")?;
    let b = logits.shape()[0];
    let mut rows = Tensor::zeros(&[b], &logits.device())?;
    let spec = SoftmaxKl { temperature, form: KlForm::Kl, grad_scale: weight / b as f32 };
    softmax_kl(&mut rows, Some(dlogits(grads)?), None, logits, teacher_logits, example_weights, spec)?;
    Ok(sum(&rows)? * spec.grad_scale)
}

/// Errors unless `alpha` (the soft term's share) is in [0, 1] and `temperature` is positive.
pub fn check_kd_weights(alpha: f32, temperature: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::Config(format!("alpha {alpha} is not in [0, 1]")));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Config(format!("temperature {temperature} is not a positive number")));
    }
    Ok(())
}

/// Per example, `(1 - alpha) * CE(z_i, y_i) + alpha * T^2 * KL(softmax(t_i / T) || softmax(z_i / T))`:
/// the logit-KD loss of each example on its own, with no gradient (for ranking examples).
pub fn kd_loss_rows(
    student: &Activations,
    labels: &IdTensor,
    teacher_logits: &Tensor,
    alpha: f32,
    temperature: f32,
) -> Result<Vec<f32>> {
    let logits = logits_of(student, "student")?;
    let b = logits.shape()[0];
    let mut ce_rows = Tensor::zeros(&[b], &logits.device())?;
    ce_ops::cross_entropy(&mut ce_rows, None, logits, Targets::Hard(labels), None, 1.0)?;
    let mut kl_rows = Tensor::zeros(&[b], &logits.device())?;
    let spec = SoftmaxKl { temperature, form: KlForm::Kl, grad_scale: 1.0 };
    softmax_kl(&mut kl_rows, None, None, logits, teacher_logits, None, spec)?;
    Ok(ce_rows.to_vec()?.iter().zip(kl_rows.to_vec()?).map(|(&ce, kl)| (1.0 - alpha) * ce + alpha * kl).collect())
}

/// `weight * sum over (student state, teacher state) pairs` of the masked hidden-state MSE.
/// Indices count hidden states: 0 is the embedding output, `l + 1` the output of layer `l`.
pub fn hidden_mse(
    grads: &mut OutputGrads,
    student: &Activations,
    teacher: &Activations,
    pairs: &[(usize, usize)],
    mask: &Tensor,
    weight: f32,
) -> Result<f32> {
    let mut total = 0.0;
    for &(s, t) in pairs {
        total += hidden_mse_to(grads, student, s, &teacher.hidden[t], mask, weight)?;
    }
    Ok(total)
}

/// `weight *` the masked MSE between the student's hidden state `index` and `target` `[N, D]`.
pub fn hidden_mse_to(
    grads: &mut OutputGrads,
    student: &Activations,
    index: usize,
    target: &Tensor,
    mask: &Tensor,
    weight: f32,
) -> Result<f32> {
    let token_mask = mask.try_clone()?.reshape(&[mask.numel()])?;
    let hs = &student.hidden[index];
    let mut loss = Tensor::zeros(&[1], &mask.device())?;
    let dh = grads.hidden_mut(index, hs)?;
    mse_ops::hidden_mse(&mut loss, &mut [dh], &[hs], &[target], &token_mask, weight)?;
    Ok(sum(&loss)? * weight)
}

/// Learned maps of student hidden states to the teacher's width, one per matched layer pair
/// (TinyBERT's `fit_dense`): `h_s W_pᵀ + b_p`, `W_p` `[d_t, d_s]`, initialised N(0, the
/// student's `initializer_range`) with zero bias. They train with the student, by an AdamW of
/// the student's settings on the same schedule (clipped on their own), and are dropped with the
/// objective: the saved student stays a plain BERT.
pub struct HiddenProjection {
    pub weights: ProjectionParams,
    /// Gradients of the current step, zeroed by [`HiddenProjection::update`].
    pub grads: ProjectionParams,
    optimizer: Option<Optimizer<ProjectionParams>>,
}

/// The projections' parameters, named `fit_dense.{p}.weight` / `.bias` (names decide weight decay).
pub struct ProjectionParams(pub Vec<Linear>);

impl Params for ProjectionParams {
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::with_capacity(2 * self.0.len());
        for (p, l) in self.0.iter_mut().enumerate() {
            out.push((format!("fit_dense.{p}.weight"), &mut l.weight));
            out.push((format!("fit_dense.{p}.bias"), &mut l.bias));
        }
        out
    }

    fn zeros_like(&self) -> kd_model::Result<Self> {
        let z = |t: &Tensor| Tensor::zeros(t.shape(), &t.device());
        let layers = self.0.iter().map(|l| Ok(Linear { weight: z(&l.weight)?, bias: z(&l.bias)? }));
        Ok(ProjectionParams(layers.collect::<kd_model::Result<_>>()?))
    }
}

impl HiddenProjection {
    /// `pairs` projections from the student's width to the teacher's, or `None` when the widths
    /// match (states are then compared directly, with no parameters).
    pub fn between(
        teacher: &BertConfig,
        student: &BertConfig,
        pairs: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Option<Self>> {
        let (d_t, d_s) = (teacher.hidden_size, student.hidden_size);
        if d_t == d_s {
            return Ok(None);
        }
        let layers = (0..pairs).map(|p| {
            let mut rng = Rng::new(mix64(seed ^ mix64(p as u64 + 1)));
            let w: Vec<f32> = (0..d_t * d_s).map(|_| (rng.normal() * student.initializer_range) as f32).collect();
            Ok(Linear { weight: Tensor::from_vec(w, &[d_t, d_s], device)?, bias: Tensor::zeros(&[d_t], device)? })
        });
        let weights = ProjectionParams(layers.collect::<Result<_>>()?);
        Ok(Some(HiddenProjection { grads: weights.zeros_like()?, weights, optimizer: None }))
    }

    /// [`hidden_mse`] through the projections, projection `p` serving pair `p`: the MSE between
    /// `h_s W_pᵀ + b_p` and the teacher state; the gradient accumulates into the projections
    /// and the student's hidden states.
    pub fn hidden_mse(
        &mut self,
        grads: &mut OutputGrads,
        student: &Activations,
        teacher: &Activations,
        pairs: &[(usize, usize)],
        mask: &Tensor,
        weight: f32,
    ) -> Result<f32> {
        if pairs.len() != self.weights.0.len() {
            let have = self.weights.0.len();
            return Err(Error::Config(format!("{} hidden pairs for {have} width projections", pairs.len())));
        }
        let device = mask.device();
        let token_mask = mask.try_clone()?.reshape(&[mask.numel()])?;
        let mut total = 0.0;
        for (p, &(s, t)) in pairs.iter().enumerate() {
            let (hs, proj, dproj) = (&student.hidden[s], &self.weights.0[p], &mut self.grads.0[p]);
            let mut y = Tensor::zeros(&[hs.shape()[0], proj.weight.shape()[0]], &device)?;
            linear_forward(&mut y, hs, &proj.weight, Some(&proj.bias))?;
            let mut dy = Tensor::zeros(y.shape(), &device)?;
            let mut loss = Tensor::zeros(&[1], &device)?;
            mse_ops::hidden_mse(&mut loss, &mut [&mut dy], &[&y], &[&teacher.hidden[t]], &token_mask, weight)?;
            let dh = grads.hidden_mut(s, hs)?;
            linear_backward(Some(dh), &mut dproj.weight, Some(&mut dproj.bias), &dy, hs, &proj.weight)?;
            total += sum(&loss)? * weight;
        }
        Ok(total)
    }

    /// One AdamW step on the step's gradients, at the learning rate of `student`'s next update
    /// (call it before that update), then zeroes the gradients.
    pub fn update(&mut self, student: &Optimizer) -> Result<()> {
        let optimizer = Self::optimizer(&mut self.optimizer, &self.weights, student)?;
        optimizer
            .update(&mut self.weights, &mut self.grads)
            .map_err(crate::trainer::of_model("the width projections'"))?;
        self.grads.zero()?;
        Ok(())
    }

    /// The projections and their optimiser as the checkpoint's part `projection.`.
    pub fn part(&mut self, student: &Optimizer) -> Result<OwnPart<'_>> {
        let optimizer = Self::optimizer(&mut self.optimizer, &self.weights, student)?;
        Ok(("projection.", &mut self.weights, optimizer))
    }

    /// [`HiddenProjection::update`] for an objective whose projection exists only when the
    /// widths differ.
    pub fn update_any(projection: &mut Option<Self>, student: &Optimizer) -> Result<()> {
        projection.as_mut().map_or(Ok(()), |p| p.update(student))
    }

    /// [`HiddenProjection::part`], `None` without a projection.
    pub fn part_of_any<'p>(projection: &'p mut Option<Self>, student: &Optimizer) -> Result<Option<OwnPart<'p>>> {
        projection.as_mut().map(|p| p.part(student)).transpose()
    }

    /// The projections' optimiser, made on first use at `student`'s place on the schedule.
    fn optimizer<'o>(
        slot: &'o mut Option<Optimizer<ProjectionParams>>,
        weights: &ProjectionParams,
        student: &Optimizer,
    ) -> Result<&'o mut Optimizer<ProjectionParams>> {
        if slot.is_none() {
            let mut opt = Optimizer::new(student.config, weights)?;
            opt.step = student.step;
            *slot = Some(opt);
        }
        Ok(slot.as_mut().expect("made above"))
    }
}

/// Row weights that average attention-map rows over (example, head, real query token).
fn query_row_weights(mask: &Tensor, heads: usize, device: &Device) -> Result<Tensor> {
    let m = mask.to_vec()?;
    let (b, l) = (mask.shape()[0], mask.shape()[1]);
    let real = m.iter().filter(|&&v| v > 0.5).count() * heads;
    let scale = if real == 0 { 0.0 } else { 1.0 / real as f32 };
    let rows: Vec<f32> = (0..b * heads * l).map(|r| m[(r / (heads * l)) * l + r % l] * scale).collect();
    Ok(Tensor::from_vec(rows, &[b * heads * l], device)?)
}

/// `weight * sum over (student layer, teacher layer) pairs` of KL(teacher row || student row)
/// of the attention maps, masked keys excluded, averaged over (example, head, real query row).
/// Both forwards must have kept their scores (`ForwardMode::keep_scores`).
pub fn attention_kl(
    grads: &mut OutputGrads,
    student: &Activations,
    teacher: &Activations,
    pairs: &[(usize, usize)],
    mask: &Tensor,
    weight: f32,
) -> Result<f32> {
    let mut total = 0.0;
    for &(s, t) in pairs {
        let ss = student.layers[s]
            .scores
            .as_ref()
            .ok_or_else(|| Error::Config("student forward kept no attention scores".into()))?;
        let ts = teacher.layers[t]
            .scores
            .as_ref()
            .ok_or_else(|| Error::Config("teacher forward kept no attention scores".into()))?;
        total += score_kl(grads.scores_mut(s, ss)?, ss, ts, mask, weight)?;
    }
    Ok(total)
}

/// `weight * KL(teacher row || student row)` of score rows `[B, H, L, L]` (attention maps or
/// Q/K/V relations; `f32::MIN` entries, masked keys, excluded), averaged over (example, head,
/// query row real in `mask`); the student gradient accumulates into `dstudent`.
pub fn score_kl(dstudent: &mut Tensor, student: &Tensor, teacher: &Tensor, mask: &Tensor, weight: f32) -> Result<f32> {
    let device = mask.device();
    let row_weights = query_row_weights(mask, student.shape()[1], &device)?;
    let mut loss_rows = Tensor::zeros(&[student.rows()], &device)?;
    let spec = SoftmaxKl { temperature: 1.0, form: KlForm::Kl, grad_scale: weight };
    softmax_kl(&mut loss_rows, Some(dstudent), None, student, teacher, Some(&row_weights), spec)?;
    Ok(sum(&loss_rows)? * weight)
}

/// The supervised loss on the batch's targets: CE for classes, MSE for regression scores.
pub fn label_loss(
    grads: &mut OutputGrads,
    student: &Activations,
    targets: &BatchTargets,
    example_weights: Option<&Tensor>,
    weight: f32,
) -> Result<f32> {
    match targets {
        BatchTargets::Classes(labels) => cross_entropy(grads, student, labels, example_weights, weight),
        BatchTargets::Scores(scores) => {
            let pred = logits_of(student, "student")?;
            let b = pred.shape()[0];
            let mut rows = Tensor::zeros(&[b], &pred.device())?;
            let scale = weight / b as f32;
            ce_ops::mse_loss(&mut rows, Some(dlogits(grads)?), pred, scores, example_weights, scale)?;
            Ok(sum(&rows)? * scale)
        }
    }
}

/// Regression distillation: `weight * mean_i w_i (z_s,i - z_t,i)^2`.
pub fn logit_mse(
    grads: &mut OutputGrads,
    student: &Activations,
    teacher_logits: &Tensor,
    example_weights: Option<&Tensor>,
    weight: f32,
) -> Result<f32> {
    let pred = logits_of(student, "student")?;
    let b = pred.shape()[0];
    let target = teacher_logits.try_clone()?.reshape(&[b])?;
    let mut rows = Tensor::zeros(&[b], &pred.device())?;
    let scale = weight / b as f32;
    ce_ops::mse_loss(&mut rows, Some(dlogits(grads)?), pred, &target, example_weights, scale)?;
    Ok(sum(&rows)? * scale)
}
