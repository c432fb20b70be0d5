//! `mate-kd`: Masked Adversarial TExt, a companion to knowledge distillation (Rashid, Lioutas
//! and Rezagholizadeh, ACL 2021), as the official code (`huawei-noah/Efficient-NLP`, `MATE-KD/`)
//! runs it; METHODS.md B §3.4-3.5.
//!
//! ```text
//! for each batch (ids, y), idx counting batches over all epochs:
//!     M, ids_m = mask(ids, p = 0.3, special tokens and padding excluded)   every selected token -> [MASK]
//!     y_G   = gumbel_st(G(ids_m).logits[M], tau = 1)                        one-hot forward, soft backward
//!     e_T   = M * (y_G . W_E^T) + (1 - M) * W_E^T[ids]                      the teacher's own word embeddings
//!     e_S   = M * (y_G . W_E^S) + (1 - M) * W_E^S[ids]                      the student's own word embeddings
//!     d_adv = D(T(e_T), S(e_S))
//!     if idx % (n_G + n_S) < n_G:                                           n_G = 10 generator batches
//!         minimise -d_adv over G only; the gradient flows through the outputs, encoders and
//!         input embeddings of both T and S into y_G, then through the Gumbel softmax into G
//!     else:                                                                 n_S = 100 student batches
//!         minimise (1/3) CE(y, S(ids)) + (1/3) D(T(ids), S(ids)) + (1/3) d_adv over S only
//!
//! D(z_t, z_s) = mean_b -sum_c softmax(z_t)_c log softmax(z_s)_c    CE form at T = 1 (the default)
//!             = mean_b KL(softmax(z_t) || softmax(z_s))            `--divergence kl`
//!             = mean_b (z_s - z_t)^2                               regression (STS-B)
//! ```
//!
//! Choices, and where the official code is followed over the paper's text:
//! - D is the code's CE form by default (METHODS.md A.2). It differs from KL by the teacher's
//!   entropy, so the generator is also rewarded for making the teacher uncertain; `Kl` removes
//!   that. Both give the student the same gradient.
//! - Masking, the 10/100 schedule, tau = 1, T = 1 and the generator's optimiser (AdamW, lr 5e-7,
//!   no weight decay, gradients clipped at norm 5, linear decay over all batches, stepped on
//!   generator batches only) are the code's hard-coded values. The generator gets no MLM loss.
//! - Dropout as in the code: the generator and the student run in training mode in both steps,
//!   the teacher in evaluation mode. Every forward of a batch draws its own dropout masks.
//! - The student's learning-rate schedule warms up over `warmup_ratio` of the student steps and
//!   decays to 0 at the last one (the code hard-codes 2138 warm-up steps, an MNLI artefact, and
//!   decays over all batches, so its rate never reaches 0). Gradient clipping is the run's
//!   `max_grad_norm` (the code clips at 5).
//! - y_G is exactly one-hot in the forward, so `y_G . W_E` is the row of the sampled word: the
//!   forward is a lookup of the perturbed ids, bit-identical to the product. The dense
//!   `[P, V] x [V, D]` product appears only in the generator's backward and only over the P
//!   masked rows; in the student step the perturbed input is the sampled ids, whose lookup
//!   backward is the same `y_G^T . dout` gradient into the student's word embeddings.
//! - A temperature T != 1 scales D by T^2 (the project's KD convention); the code has T = 1.

use std::time::Instant;

use kd_kernels::ops::softmax_kl::{softmax_kl, KlForm, SoftmaxKl};
use kd_kernels::ops::{bias, cross_entropy as ce_ops, embedding, gemm, gumbel};
use kd_kernels::rng::{mix64, Rng};
use kd_kernels::{IdTensor, Tensor};
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode, OutputGrads};
use kd_model::mlm::MlmActivations;
use kd_model::optim::{LinearSchedule, Optimizer, OptimizerConfig};
use kd_model::BertWeights;

use crate::batching::{collate, gather_targets, BatchTargets, EncodedSet};
use crate::checkpoint;
use crate::losses;
use crate::methods::generator::{mask_batch, MaskedBatch, Masking};
use crate::methods::teacher::check_compatible;
use crate::trainer::{argmax, batches, of_model, DevScores, Event, LossLog, TrainConfig, TrainReport};
use crate::{Error, Result};

/// MATE-KD's own settings; the student's optimiser comes from the run's [`TrainConfig`].
#[derive(Clone, Debug)]
pub struct MateKdConfig {
    pub masking: Masking,
    /// The softmax divergence for classification (regression always uses MSE).
    pub divergence: KlForm,
    pub temperature: f32,
    /// Temperature of the Gumbel softmax.
    pub gumbel_tau: f32,
    /// Generator batches, then student batches, repeated.
    pub generator_steps: u64,
    pub student_steps: u64,
    pub generator_lr: f32,
    pub generator_max_grad_norm: Option<f32>,
}

impl MateKdConfig {
    /// The official code's settings, with the tokenizer's [MASK] id and special-token ids.
    pub fn new(mask_id: u32, special_ids: Vec<u32>) -> MateKdConfig {
        MateKdConfig {
            masking: Masking::mate_kd(mask_id, special_ids),
            divergence: KlForm::CrossEntropy,
            temperature: 1.0,
            gumbel_tau: 1.0,
            generator_steps: 10,
            student_steps: 100,
            generator_lr: 5e-7,
            generator_max_grad_norm: Some(5.0),
        }
    }

    /// What batch `batch_index` (0-based, counted over all epochs) is used for.
    pub fn phase(&self, batch_index: u64) -> Phase {
        match batch_index % (self.generator_steps + self.student_steps).max(1) < self.generator_steps {
            true => Phase::Generator,
            false => Phase::Student,
        }
    }
}

/// Each batch trains either the generator or the student.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Generator,
    Student,
}

/// The seeds of one batch's random draws, derived from the run's seed and the batch index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSeeds {
    pub mask: u64,
    pub gumbel: u64,
    pub generator_dropout: u64,
    /// Dropout of the student on the perturbed input (both steps).
    pub student_dropout: u64,
    /// Dropout of the student on the clean input (student step).
    pub student_dropout_clean: u64,
}

impl BatchSeeds {
    pub fn new(run_seed: u64, batch_index: u64) -> BatchSeeds {
        let base = mix64(run_seed ^ mix64(batch_index.wrapping_add(1)));
        let at = |k: u64| mix64(base ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        BatchSeeds {
            mask: at(1),
            gumbel: at(2),
            generator_dropout: at(3),
            student_dropout: at(4),
            student_dropout_clean: at(5),
        }
    }
}

fn train_mode(seed: u64) -> ForwardMode {
    ForwardMode { train: true, seed, keep_scores: false }
}

fn dlogits(grads: &mut OutputGrads) -> Result<&mut Tensor> {
    grads.logits.as_mut().ok_or_else(|| Error::Config("the student has no classifier head".into()))
}

fn logits<'a>(acts: &'a Activations, who: &str) -> Result<&'a Tensor> {
    acts.logits.as_ref().ok_or_else(|| Error::Config(format!("the {who} has no classifier head")))
}

/// How teacher and student outputs are compared.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    Softmax { form: KlForm, temperature: f32 },
    Mse,
}

impl Divergence {
    pub fn for_targets(targets: &BatchTargets, cfg: &MateKdConfig) -> Divergence {
        match targets {
            BatchTargets::Classes(_) => Divergence::Softmax { form: cfg.divergence, temperature: cfg.temperature },
            BatchTargets::Scores(_) => Divergence::Mse,
        }
    }

    /// `weight * mean_b D(z_t,b, z_s,b)` for logits `[B, C]`; the gradients, times `weight`,
    /// accumulate into `ds` (w.r.t. the student's logits) and `dt` (the teacher's) when given.
    pub fn apply(
        self,
        zs: &Tensor,
        zt: &Tensor,
        ds: Option<&mut Tensor>,
        dt: Option<&mut Tensor>,
        weight: f32,
    ) -> Result<f32> {
        let b = zs.rows();
        let device = zs.device();
        let mut rows = Tensor::zeros(&[b], &device)?;
        let scale = weight / b as f32;
        match self {
            Divergence::Softmax { form, temperature } => {
                softmax_kl(&mut rows, ds, dt, zs, zt, None, SoftmaxKl { temperature, form, grad_scale: scale })?
            }
            Divergence::Mse => {
                let target = zt.try_clone()?.reshape(&[b])?;
                let mut d = Tensor::zeros(zs.shape(), &device)?;
                ce_ops::mse_loss(&mut rows, Some(&mut d), zs, &target, None, scale)?;
                if let Some(ds) = ds {
                    bias::add_inplace(ds, &d)?;
                }
                if let Some(dt) = dt {
                    bias::scale_inplace(&mut d, -1.0)?;
                    bias::add_inplace(dt, &d)?;
                }
            }
        }
        Ok(rows.to_vec()?.iter().map(|&v| v as f64).sum::<f64>() as f32 * scale)
    }
}

/// The generator's perturbation of one batch.
pub struct Perturbation {
    /// The batch with 30% of its tokens masked: the generator's input.
    pub masked: MaskedBatch,
    pub generator: Activations,
    /// The generator's logits at the masked rows, `[P, V]`.
    pub mlm: MlmActivations,
    /// The Gumbel-softmax sample (kept for the backward) and its one-hot argmax (the forward value).
    pub soft: Tensor,
    pub hard: Tensor,
    /// The sampled word at each masked row.
    pub sampled: Vec<u32>,
    /// The original ids with each masked row replaced by its sampled word.
    pub perturbed: EncoderBatch,
}

/// Masks `batch`, runs the generator and draws one straight-through Gumbel sample per masked row.
pub fn perturb(generator: &Bert, batch: &EncoderBatch, cfg: &MateKdConfig, seeds: &BatchSeeds) -> Result<Perturbation> {
    let vocab = generator.config.vocab_size;
    let device = generator.device();
    let masked = mask_batch(batch, &cfg.masking, vocab, &mut Rng::new(seeds.mask))?;
    let mut acts = generator.activations(batch.batch, batch.seq)?;
    generator.forward(&mut acts, &masked.batch, None, train_mode(seeds.generator_dropout))?;
    let mut mlm = generator.mlm_activations(&masked.rows)?;
    generator.mlm_forward(&mut mlm, &acts)?;
    let p = masked.rows.len();
    let (mut hard, mut soft) = (Tensor::zeros(&[p, vocab], &device)?, Tensor::zeros(&[p, vocab], &device)?);
    gumbel::gumbel_softmax_st_forward(&mut hard, &mut soft, &mlm.logits, cfg.gumbel_tau, seeds.gumbel)?;
    let sampled: Vec<u32> = hard.to_vec()?.chunks(vocab.max(1)).map(|row| argmax(row) as u32).collect();
    let mut ids = batch.ids.to_vec()?;
    for (&row, &word) in masked.rows.iter().zip(&sampled) {
        ids[row as usize] = word;
    }
    let perturbed =
        EncoderBatch::new(&ids, &batch.type_ids.to_vec()?, &batch.mask.to_vec()?, batch.batch, batch.seq, &device)?;
    Ok(Perturbation { masked, generator: acts, mlm, soft, hard, sampled, perturbed })
}

/// `M * (y_G . W_E) + (1 - M) * W_E[ids]`, `[N, D]`, with `model`'s own word embeddings. y_G is
/// one-hot in the forward, so this is the lookup of the perturbed ids (see the module notes).
pub fn perturbed_embeddings(model: &Bert, p: &Perturbation) -> Result<Tensor> {
    let table = &model.weights.embeddings.word_embeddings;
    let mut out = Tensor::zeros(&[p.perturbed.rows(), table.last_dim()], &table.device())?;
    embedding::embedding_forward(&mut out, &p.perturbed.ids, table, false)?;
    Ok(out)
}

/// Backward of [`perturbed_embeddings`] w.r.t. y_G: `dy += d_embeds[rows] . W_E^T`, `[P, V]`.
/// Rows outside the mask are `(1 - M) * W_E[ids]`, which does not depend on y_G.
pub fn soft_token_backward(dy: &mut Tensor, d_embeds: &Tensor, table: &Tensor, rows: &IdTensor) -> Result<()> {
    let mut at_rows = Tensor::zeros(&[rows.numel(), table.last_dim()], &table.device())?;
    embedding::embedding_forward(&mut at_rows, rows, d_embeds, false)?;
    gemm::matmul(dy, &at_rows, table, gemm::MatmulSpec::NT.accumulate())?;
    Ok(())
}

/// The teacher and student on one batch's perturbed input: d_adv and what its gradient needs.
pub struct AdversarialPass {
    pub perturbation: Perturbation,
    pub divergence: Divergence,
    pub teacher_embeds: Tensor,
    pub student_embeds: Tensor,
    pub teacher: Activations,
    pub student: Activations,
    /// d_adv.
    pub value: f32,
}

impl AdversarialPass {
    /// Perturbs `batch` with the generator and runs the teacher (evaluation mode) and the
    /// student (training mode) on their perturbed input embeddings.
    pub fn forward(
        teacher: &Bert,
        student: &Bert,
        generator: &Bert,
        batch: &EncoderBatch,
        targets: &BatchTargets,
        cfg: &MateKdConfig,
        seeds: &BatchSeeds,
    ) -> Result<AdversarialPass> {
        let perturbation = perturb(generator, batch, cfg, seeds)?;
        let (input, (b, l)) = (&perturbation.perturbed, (batch.batch, batch.seq));
        let teacher_embeds = perturbed_embeddings(teacher, &perturbation)?;
        let student_embeds = perturbed_embeddings(student, &perturbation)?;
        let mut t_acts = teacher.activations(b, l)?;
        teacher.forward(&mut t_acts, input, Some(&teacher_embeds), ForwardMode::default())?;
        let mut s_acts = student.activations(b, l)?;
        student.forward(&mut s_acts, input, Some(&student_embeds), train_mode(seeds.student_dropout))?;
        let divergence = Divergence::for_targets(targets, cfg);
        let value = divergence.apply(logits(&s_acts, "student")?, logits(&t_acts, "teacher")?, None, None, 1.0)?;
        Ok(AdversarialPass {
            perturbation,
            divergence,
            teacher_embeds,
            student_embeds,
            teacher: t_acts,
            student: s_acts,
            value,
        })
    }

    /// The gradient of `scale * d_adv` w.r.t. the one-hot samples, `[P, V]`: from both models'
    /// logits (the teacher's too) back through their encoders and input embeddings. The models'
    /// parameter gradients land in `teacher_grads` and `student_grads`, which the generator
    /// step does not apply.
    pub fn d_samples(
        &mut self,
        teacher: &Bert,
        student: &Bert,
        teacher_grads: &mut BertWeights,
        student_grads: &mut BertWeights,
        scale: f32,
    ) -> Result<Tensor> {
        let (mut t_out, mut s_out) = (self.teacher.output_grads()?, self.student.output_grads()?);
        let (zs, zt) = (logits(&self.student, "student")?, logits(&self.teacher, "teacher")?);
        self.divergence.apply(zs, zt, s_out.logits.as_mut(), t_out.logits.as_mut(), scale)?;
        let input = &self.perturbation.perturbed;
        let device = self.teacher_embeds.device();
        let mut d_teacher = Tensor::zeros(self.teacher_embeds.shape(), &device)?;
        teacher.backward(teacher_grads, &mut self.teacher, &t_out, input, Some(&mut d_teacher))?;
        let mut d_student = Tensor::zeros(self.student_embeds.shape(), &device)?;
        student.backward(student_grads, &mut self.student, &s_out, input, Some(&mut d_student))?;
        let rows = &self.perturbation.mlm.rows;
        let mut dy = Tensor::zeros(self.perturbation.hard.shape(), &device)?;
        soft_token_backward(&mut dy, &d_teacher, &teacher.weights.embeddings.word_embeddings, rows)?;
        soft_token_backward(&mut dy, &d_student, &student.weights.embeddings.word_embeddings, rows)?;
        Ok(dy)
    }
}

/// Carries `dy` (the gradient w.r.t. the one-hot samples) through the straight-through
/// Gumbel softmax, the MLM head and the generator's encoder into `grads`. Returns the
/// generator's output gradients: its last hidden state's is non-zero only at masked rows.
pub fn generator_backward(
    generator: &Bert,
    p: &mut Perturbation,
    dy: &Tensor,
    tau: f32,
    grads: &mut BertWeights,
) -> Result<OutputGrads> {
    p.mlm.dlogits.fill(0.0)?;
    gumbel::gumbel_softmax_st_backward(&mut p.mlm.dlogits, dy, &p.soft, tau)?;
    let mut out = p.generator.output_grads()?;
    generator.mlm_backward(grads, &mut p.mlm, &p.generator, &mut out)?;
    generator.backward(grads, &mut p.generator, &out, &p.masked.batch, None)?;
    Ok(out)
}

/// `(1/3) CE(y, z_s) + (1/3) D(z_t, z_s) + (1/3) D(z_t', z_s')` from the student's forwards on
/// the clean and the perturbed input (`clean`, `perturbed`) and the teacher's logits on both;
/// the gradients go into the matching output gradients. Regression uses MSE for CE and D.
#[allow(clippy::too_many_arguments)]
pub fn student_loss(
    clean: &Activations,
    perturbed: &Activations,
    teacher_clean: &Tensor,
    teacher_perturbed: &Tensor,
    targets: &BatchTargets,
    divergence: Divergence,
    clean_grads: &mut OutputGrads,
    perturbed_grads: &mut OutputGrads,
) -> Result<LossLog> {
    const THIRD: f32 = 1.0 / 3.0;
    let mut log = LossLog::default();
    log.push("ce", losses::label_loss(clean_grads, clean, targets, None, THIRD)?);
    log.push(
        "kd",
        divergence.apply(logits(clean, "student")?, teacher_clean, Some(dlogits(clean_grads)?), None, THIRD)?,
    );
    let zs = logits(perturbed, "student")?;
    log.push("adv", divergence.apply(zs, teacher_perturbed, Some(dlogits(perturbed_grads)?), None, THIRD)?);
    Ok(log)
}

fn teacher_logits(teacher: &Bert, batch: &EncoderBatch) -> Result<Tensor> {
    let mut acts = teacher.activations(batch.batch, batch.seq)?;
    teacher.forward(&mut acts, batch, None, ForwardMode::default())?;
    Ok(logits(&acts, "teacher")?.try_clone()?)
}

/// Errors unless the three models can play their parts together.
fn check_models(teacher: &Bert, student: &Bert, generator: &Bert, cfg: &MateKdConfig) -> Result<()> {
    check_compatible(teacher, student)?;
    let (vt, vg) = (teacher.config.vocab_size, generator.config.vocab_size);
    if vg != vt {
        return Err(Error::Config(format!(
            "the generator's vocabulary ({vg} words) differs from the teacher's ({vt}): its samples index both models' word embeddings"
        )));
    }
    if generator.weights.mlm_head.is_none() {
        return Err(Error::Config(
            "the generator has no MLM head (cls.predictions.*): make one with train-generator".into(),
        ));
    }
    if teacher.num_labels().is_none() {
        return Err(Error::Config("the teacher has no classifier head".into()));
    }
    if cfg.student_steps == 0 {
        return Err(Error::Config("mate-kd: student_steps is 0, the student would never train".into()));
    }
    cfg.masking.check(vt)
}

/// One MATE-KD run's optimisers and gradient buffers; the models are lent to each step.
pub struct MateKd<'t> {
    pub teacher: &'t Bert,
    pub config: MateKdConfig,
    pub generator_optimizer: Optimizer,
    pub student_optimizer: Optimizer,
    generator_grads: BertWeights,
    student_grads: BertWeights,
    /// The frozen teacher's parameter gradients: computed by its backward, never applied.
    teacher_grads: BertWeights,
}

impl<'t> MateKd<'t> {
    /// Checks that the models fit together (one vocabulary, a generator with an MLM head, a
    /// teacher with the student's labels) and sets up both optimisers.
    pub fn new(
        teacher: &'t Bert,
        student: &Bert,
        generator: &Bert,
        config: MateKdConfig,
        student_optimizer: OptimizerConfig,
        generator_optimizer: OptimizerConfig,
    ) -> Result<Self> {
        check_models(teacher, student, generator, &config)?;
        Ok(MateKd {
            teacher,
            config,
            generator_optimizer: Optimizer::new(generator_optimizer, &generator.weights)?,
            student_optimizer: Optimizer::new(student_optimizer, &student.weights)?,
            generator_grads: generator.weights.zeros_like()?,
            student_grads: student.weights.zeros_like()?,
            teacher_grads: teacher.weights.zeros_like()?,
        })
    }

    /// One generator batch: gradient ascent on d_adv over the generator's parameters. Returns
    /// d_adv before the update. A batch with nothing to mask leaves the generator as it is.
    pub fn generator_step(
        &mut self,
        generator: &mut Bert,
        student: &Bert,
        batch: &EncoderBatch,
        targets: &BatchTargets,
        seeds: &BatchSeeds,
    ) -> Result<f32> {
        let mut pass = AdversarialPass::forward(self.teacher, student, generator, batch, targets, &self.config, seeds)?;
        if !pass.value.is_finite() {
            return Err(Error::NonFinite(format!("the generator's adversarial divergence is {}", pass.value)));
        }
        if pass.perturbation.sampled.is_empty() {
            return Ok(pass.value);
        }
        self.teacher_grads.zero()?;
        self.student_grads.zero()?;
        let dy = pass.d_samples(self.teacher, student, &mut self.teacher_grads, &mut self.student_grads, -1.0)?;
        self.generator_grads.zero()?;
        generator_backward(generator, &mut pass.perturbation, &dy, self.config.gumbel_tau, &mut self.generator_grads)?;
        self.generator_optimizer
            .update(&mut generator.weights, &mut self.generator_grads)
            .map_err(of_model("the generator's"))?;
        Ok(pass.value)
    }

    /// One student batch: the three-term loss on the clean input and the current generator's
    /// perturbation of it, one update of the student.
    pub fn student_step(
        &mut self,
        student: &mut Bert,
        generator: &Bert,
        batch: &EncoderBatch,
        targets: &BatchTargets,
        seeds: &BatchSeeds,
    ) -> Result<LossLog> {
        let p = perturb(generator, batch, &self.config, seeds)?;
        let (zt_clean, zt_perturbed) =
            (teacher_logits(self.teacher, batch)?, teacher_logits(self.teacher, &p.perturbed)?);
        let mut clean = student.activations(batch.batch, batch.seq)?;
        student.forward(&mut clean, batch, None, train_mode(seeds.student_dropout_clean))?;
        let mut perturbed = student.activations(batch.batch, batch.seq)?;
        student.forward(&mut perturbed, &p.perturbed, None, train_mode(seeds.student_dropout))?;
        let (mut g_clean, mut g_perturbed) = (clean.output_grads()?, perturbed.output_grads()?);
        let divergence = Divergence::for_targets(targets, &self.config);
        let log = student_loss(
            &clean,
            &perturbed,
            &zt_clean,
            &zt_perturbed,
            targets,
            divergence,
            &mut g_clean,
            &mut g_perturbed,
        )?;
        if !log.total.is_finite() {
            return Err(Error::NonFinite(format!("the student's loss is {}", log.total)));
        }
        self.student_grads.zero()?;
        student.backward(&mut self.student_grads, &mut clean, &g_clean, batch, None)?;
        student.backward(&mut self.student_grads, &mut perturbed, &g_perturbed, &p.perturbed, None)?;
        self.student_optimizer
            .update(&mut student.weights, &mut self.student_grads)
            .map_err(of_model("the student's"))?;
        Ok(log)
    }
}

/// d_adv on one batch with the given seeds, without any update (for monitoring and tests).
pub fn adversarial_divergence(
    teacher: &Bert,
    student: &Bert,
    generator: &Bert,
    batch: &EncoderBatch,
    targets: &BatchTargets,
    cfg: &MateKdConfig,
    seeds: &BatchSeeds,
) -> Result<f32> {
    Ok(AdversarialPass::forward(teacher, student, generator, batch, targets, cfg, seeds)?.value)
}

/// Says at which (1-based) batch a non-finite value appeared.
fn at_step(index: u64) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::NonFinite(what) => Error::NonFinite(format!("{what} at step {}", index + 1)),
        other => other,
    }
}

/// Trains `student` with MATE-KD against `teacher`, adapting `generator` along the way.
/// `cfg.epochs` passes over `train`, each batch a generator or a student step (see [`Phase`]);
/// evaluation on `dev` every `cfg.eval_every` batches and at the end. Each batch reports an
/// [`Event::Step`]: terms `ce`, `kd`, `adv` (already weighted 1/3) for a student step, and
/// `generator` = -d_adv (what the generator minimises) for a generator step.
///
/// With `cfg.checkpoint`, the student, the generator and both optimisers are saved every
/// `every` batches and at the end; a resumed run skips the batches done before (their orders
/// and seeds derive from the seed and the batch index) and ends where an uninterrupted one does.
#[allow(clippy::too_many_arguments)]
pub fn train(
    student: &mut Bert,
    teacher: &Bert,
    generator: &mut Bert,
    train: &EncodedSet,
    dev: Option<&EncodedSet>,
    cfg: &TrainConfig,
    mate: &MateKdConfig,
    observer: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    if train.items.is_empty() {
        return Err(Error::Config("the training set is empty".into()));
    }
    if cfg.batch_size == 0 {
        return Err(Error::Config("batch size is 0".into()));
    }
    let steps_per_epoch = train.items.len().div_ceil(cfg.batch_size) as u64;
    let total_batches = steps_per_epoch * cfg.epochs as u64;
    let student_total = (0..total_batches).filter(|&i| mate.phase(i) == Phase::Student).count() as u64;
    if student_total == 0 {
        return Err(Error::Config(format!(
            "mate-kd: all {total_batches} batches of this run are generator batches (the first {} of each cycle), so the student would never train: give it more rows or epochs, or fewer --generator-steps",
            mate.generator_steps
        )));
    }
    let adam = |lr, weight_decay, max_grad_norm, schedule| OptimizerConfig {
        lr,
        weight_decay,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm,
        schedule,
    };
    let student_warmup = (cfg.warmup_ratio * student_total as f32).ceil() as u64;
    let student_opt = adam(
        cfg.lr,
        cfg.weight_decay,
        cfg.max_grad_norm,
        LinearSchedule { warmup: student_warmup, total: student_total },
    );
    let generator_opt =
        adam(mate.generator_lr, 0.0, mate.generator_max_grad_norm, LinearSchedule { warmup: 0, total: total_batches });
    let mut run = MateKd::new(teacher, student, generator, mate.clone(), student_opt, generator_opt)?;
    let device = student.device();
    let pad = student.config.pad_token_id;
    let started = Instant::now();
    let mut scores = DevScores::default();
    let mut index = 0u64;
    let mut parts = [
        ("student.", &mut student.weights, &mut run.student_optimizer),
        ("generator.", &mut generator.weights, &mut run.generator_optimizer),
    ];
    if let Some(resumed) = checkpoint::resume(cfg.checkpoint.as_ref(), &mut parts, None, observer)? {
        index = resumed.step;
        scores.best = resumed.best;
    }

    for (_, indices) in batches(&train.items, cfg, index) {
        let indices = &indices[..];
        let t0 = Instant::now();
        let batch = collate(indices.iter().map(|&i| &train.items[i]), pad, &device)?;
        let targets = gather_targets(&train.targets, indices, &device)?;
        let seeds = BatchSeeds::new(cfg.seed, index);
        let (log, lr) = match mate.phase(index) {
            Phase::Generator => {
                let lr = run.generator_optimizer.lr();
                let d_adv = run.generator_step(generator, student, &batch, &targets, &seeds).map_err(at_step(index))?;
                let mut log = LossLog::default();
                log.push("generator", -d_adv);
                (log, lr)
            }
            Phase::Student => {
                let lr = run.student_optimizer.lr();
                (run.student_step(student, generator, &batch, &targets, &seeds).map_err(at_step(index))?, lr)
            }
        };
        index += 1;
        let examples_per_s = indices.len() as f64 / t0.elapsed().as_secs_f64();
        observer(Event::Step { step: index, total_steps: total_batches, loss: &log, lr, examples_per_s });

        scores.after_step((index, total_batches), cfg, dev, student, observer)?;
        let parts = [
            ("student.", &student.weights, &run.student_optimizer),
            ("generator.", &generator.weights, &run.generator_optimizer),
        ];
        checkpoint::save_if_due(cfg.checkpoint.as_ref(), &parts, None, index, total_batches, scores.best.as_ref())?;
    }
    let DevScores { best, last } = scores;
    Ok(TrainReport { steps: index, seconds: started.elapsed().as_secs_f64(), final_metrics: last, best_metrics: best })
}
