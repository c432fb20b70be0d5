//! `cr-ild`: Consistency-Regularized Intermediate Layer Distillation (Ko et al., Findings of
//! EACL 2023, arXiv 2302.01530; code `jongwooko/CR-ILD`), METHODS.md B §2. Two stages.
//!
//! Stage 1 ([`stage1`]), one step, `--objective ah` (the default; B §2.5, §2.8):
//! ```text
//! u ~ U(0,1); λ = max(u, 1-u); rev(i) = B-1-i        one λ per batch; partner = the batch reversed
//! m̃ = m OR m[rev]                                    union of the two attention masks
//! Ẽ_T = λ·E_T(x) + (1-λ)·E_T(x)[rev]                 each model mixes its own embedding output
//! (A_T, H_T) = T.encode(Ẽ_T, m̃).last_layer()         teacher: eval mode, no gradient
//! Ẽ_S = λ·E_S(x) + (1-λ)·E_S(x)[rev]
//! (A_S, H_S) = S.encode(Ẽ_S, m̃).last_layer()         A = pre-softmax scores QKᵀ/√d_h
//! loss  = KL(A_T ‖ A_S; m) + MSE(H_S, H_T; m̃)        last-layer ILD
//! (A_c, H_c) = stop_grad(S(x, m).last_layer())       the student's own clean view, dropout on
//! ramp  = w_ic · epoch / epochs                      epoch 0-based: 0 in the first, w_ic = 0.1
//! loss += ramp·(λ·KL(A_c ‖ A_S; m) + (1-λ)·KL(A_c[rev] ‖ A_S; m[rev]))
//! loss += ramp·(λ·MSE(H_S, H_c; m̃) + (1-λ)·MSE(H_S, H_c[rev]; m̃))
//! ```
//! `KL(P ‖ Q; m)`: row softmax KL with keys outside `m` excluded, averaged over (example, head,
//! query row real in `m`); `MSE(·; m)`: over the tokens real in `m` (DESIGN.md's conventions).
//!
//! `--objective qkv`, the released script (`--mode TinyBERT-QKV`): the ILD line becomes the
//! MiniLMv2-style self-relations of the last layer,
//! ```text
//! loss = Σ_{X ∈ {Q, K, V}} KL(softmax(X_T X_Tᵀ/√d_h) ‖ softmax(X_S X_Sᵀ/√d_h); m̃)
//! ```
//! with no consistency term: the script's `--use_ic_att --use_ic_rep` live in the A and H
//! branches, which "QKV" never enters (B §2.5, "paper/code discrepancy").
//!
//! Stage 2 is ild's, which is `kd` (`--alpha`, `--temperature`) on clean input, so that ild - kd
//! and cr-ild - kd measure stage 1 alone. The official code's stage 2 is logit KD at T = 2 with
//! no hard-label term: `--alpha 1` (give it to ild and kd too when comparing).
//!
//! Where this follows the official code rather than the paper text: the mixup sits on the embedding
//! output (after LayerNorm and dropout), λ = max(u, 1-u) with u ~ Beta(1,1), partners are the
//! reversed batch, masks are united, the attention terms mask keys with the example's own mask m
//! (`m[rev]` for the partner term) rather than m̃, the consistency weight ramps by 0-based epoch,
//! and the consistency target is the student's own no-grad clean pass in train mode. Where it
//! departs from the code: the losses average over real tokens (the code pads every batch to 128 and
//! averages over all of them, padding included; with dynamic padding that average would depend on
//! the batch); the hidden terms use the union mask m̃ and the relation terms mask by m̃ (the code
//! uses no mask); the attention divergence is the KL, not its CE form (same gradient); a student of
//! another width than the teacher's meets it through a learned projection of its last hidden state
//! (the code's `fit_dense`, here trained by the student's AdamW settings,
//! [`losses::HiddenProjection`]; the consistency terms compare the student with itself,
//! unprojected); no EMA target; the trainer keeps the last, smaller batch of an epoch, which the
//! code skips (in an odd batch the middle example is its own partner, so it is seen unmixed).

use std::str::FromStr;

use kd_kernels::ops::{attention, bias, embedding};
use kd_kernels::rng::{mix64, Rng};
use kd_kernels::{IdTensor, Tensor};
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode, OutputGrads};
use kd_model::optim::Optimizer;
use kd_model::BertWeights;

use crate::batching::{EncodedSet, Targets};
use crate::checkpoint::OwnPart;
use crate::data::GlueTask;
use crate::losses::{self, HiddenProjection};
use crate::methods::teacher::check_compatible;
use crate::trainer::{LossLog, Objective, StepInput};
use crate::{Error, Result};

/// The consistency weight of the official scripts (`--w_ic 0.1`).
pub const W_IC: f32 = 0.1;

/// What stage 1 aligns on the last layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage1Objective {
    /// Attention-map KL + hidden-state MSE, with the consistency term (`ah`).
    #[default]
    AttentionHidden,
    /// Q-Q, K-K and V-V self-relation KL, the released script's mode (`qkv`).
    Qkv,
}

impl FromStr for Stage1Objective {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ah" => Ok(Stage1Objective::AttentionHidden),
            "qkv" => Ok(Stage1Objective::Qkv),
            _ => Err(Error::Config(format!("unknown cr-ild objective '{s}' (expected ah or qkv)"))),
        }
    }
}

/// Stage 1's settings.
#[derive(Clone, Debug)]
pub struct CrIldConfig {
    pub objective: Stage1Objective,
    /// Peak consistency weight (0 turns the term off).
    pub w_ic: f32,
    /// Stage 1's epoch count, the denominator of the ramp.
    pub epochs: usize,
    /// Seeds λ (one draw per step).
    pub seed: u64,
}

impl CrIldConfig {
    /// The official defaults: objective `ah`, w_ic = 0.1.
    pub fn new(epochs: usize, seed: u64) -> Self {
        CrIldConfig { objective: Stage1Objective::default(), w_ic: W_IC, epochs, seed }
    }

    /// True when a consistency term is asked for (`ah`, w_ic > 0) but the ramp, 0 in the first
    /// epoch, never leaves 0 because stage 1 has a single epoch.
    pub fn consistency_never_acts(&self) -> bool {
        self.objective == Stage1Objective::AttentionHidden && self.w_ic > 0.0 && self.epochs < 2
    }
}

/// Stage 1's epochs in the official code (`default_params`, forced for every TinyBERT-type
/// mode); `None` for tasks it does not list (WNLI).
pub fn stage1_epochs(task: GlueTask) -> Option<usize> {
    match task {
        GlueTask::Cola | GlueTask::Mrpc | GlueTask::Rte | GlueTask::Stsb => Some(20),
        GlueTask::Sst2 | GlueTask::Qnli => Some(10),
        GlueTask::Mnli | GlueTask::Qqp => Some(5),
        GlueTask::Wnli => None,
    }
}

/// The mixing weight of step `step`: `max(u, 1 - u)`, u ~ U(0, 1), so always in [0.5, 1].
pub fn sample_lambda(seed: u64, step: u64) -> f32 {
    let u = Rng::new(mix64(seed ^ mix64(step.wrapping_add(1)))).uniform() as f32;
    u.max(1.0 - u)
}

/// The consistency term's weight in `epoch` (0-based) of `epochs`: a linear ramp from 0.
pub fn consistency_weight(w_ic: f32, epoch: usize, epochs: usize) -> f32 {
    if epochs == 0 {
        return 0.0;
    }
    w_ic * epoch as f32 / epochs as f32
}

/// Each example's mixup partner: the batch reversed.
pub fn partners(batch: usize) -> Vec<usize> {
    (0..batch).rev().collect()
}

/// Which mask an attention term keeps, and from which example its rows come.
#[derive(Clone, Copy)]
enum Side {
    Own,
    Partner,
}

/// One step's mixup: λ, the pairing, and the batch the mixed encoders run on.
pub struct Mixup {
    pub lambda: f32,
    /// Partner example of each example.
    pub partners: Vec<usize>,
    /// The step's ids and positions with the union mask `m̃ = m OR m[partner]`.
    pub batch: EncoderBatch,
    /// Each example's own mask m, and its partner's `m[partner]`, both `[B, L]`.
    pub own_mask: Tensor,
    pub partner_mask: Tensor,
    own_mask_host: Vec<f32>,
    partner_mask_host: Vec<f32>,
    /// The partner of every token row (same position in the partner example).
    partner_rows: IdTensor,
}

impl Mixup {
    pub fn new(batch: &EncoderBatch, lambda: f32) -> Result<Mixup> {
        let (b, l) = (batch.batch, batch.seq);
        let device = batch.mask.device();
        let partners = partners(b);
        let own = batch.mask.to_vec()?;
        let partner_mask_host: Vec<f32> = (0..b * l).map(|r| own[partners[r / l] * l + r % l]).collect();
        let union: Vec<f32> = own.iter().zip(&partner_mask_host).map(|(&a, &p)| a.max(p)).collect();
        let rows: Vec<u32> = (0..b * l).map(|r| (partners[r / l] * l + r % l) as u32).collect();
        let mixed = EncoderBatch::new(&batch.ids.to_vec()?, &batch.type_ids.to_vec()?, &union, b, l, &device)?;
        Ok(Mixup {
            lambda,
            partners,
            batch: mixed,
            own_mask: Tensor::from_slice(&own, &[b, l], &device)?,
            partner_mask: Tensor::from_slice(&partner_mask_host, &[b, l], &device)?,
            own_mask_host: own,
            partner_mask_host,
            partner_rows: IdTensor::from_vec(rows, &[b * l], &device)?,
        })
    }

    /// The partners' token rows of `x` `[N, D]`.
    fn partner_rows_of(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = Tensor::zeros(x.shape(), &x.device())?;
        embedding::embedding_forward(&mut out, &self.partner_rows, x, false)?;
        Ok(out)
    }

    /// `x <- λ·x + (1-λ)·x[partner]` over token rows `[N, D]`. The pairing is an involution, so
    /// this linear map is symmetric: the same call takes d(mixed) back to d(clean).
    pub fn blend(&self, x: &mut Tensor) -> Result<()> {
        let mut partner = self.partner_rows_of(x)?;
        bias::scale_inplace(x, self.lambda)?;
        bias::scale_inplace(&mut partner, 1.0 - self.lambda)?;
        bias::add_inplace(x, &partner)?;
        Ok(())
    }

    /// Runs `model` on the mixed embedding outputs: embed, blend, encode.
    pub fn forward(&self, model: &Bert, acts: &mut Activations, mode: ForwardMode) -> Result<()> {
        model.embed(acts, &self.batch, None, mode)?;
        self.blend(&mut acts.hidden[0])?;
        model.encode(acts, &self.batch)?;
        Ok(())
    }

    /// Backward of [`Mixup::forward`], into the parameters of both partners' embeddings.
    pub fn backward(
        &self,
        model: &Bert,
        grads: &mut BertWeights,
        acts: &mut Activations,
        out_grads: &OutputGrads,
    ) -> Result<()> {
        let d_mixed = model.backward_encoder(grads, acts, out_grads, &self.batch)?;
        self.blend(d_mixed)?;
        model.backward_embeddings(grads, acts, &self.batch, None)?;
        Ok(())
    }

    fn mask(&self, side: Side) -> (&Tensor, &[f32]) {
        match side {
            Side::Own => (&self.own_mask, &self.own_mask_host),
            Side::Partner => (&self.partner_mask, &self.partner_mask_host),
        }
    }

    /// `scores` `[B, H, L, L]` with example b's block taken from example b (`Own`) or its
    /// partner, and the keys outside the side's mask set to `f32::MIN` (excluded from the KL).
    fn masked_scores(&self, scores: &Tensor, from: Side, keys: Side) -> Result<Tensor> {
        let [b, h, l, _] = *scores.shape() else {
            return Err(Error::Config(format!("scores are {:?}, expected [B, H, L, L]", scores.shape())));
        };
        let (_, mask) = self.mask(keys);
        let src = scores.to_vec()?;
        let block = h * l * l;
        let mut out = Vec::with_capacity(src.len());
        for ex in 0..b {
            let from_ex = match from {
                Side::Own => ex,
                Side::Partner => self.partners[ex],
            };
            let keep = &mask[ex * l..][..l];
            for row in src[from_ex * block..][..block].chunks_exact(l) {
                out.extend(row.iter().zip(keep).map(|(&v, &m)| if m > 0.5 { v } else { f32::MIN }));
            }
        }
        Ok(Tensor::from_vec(out, scores.shape(), &scores.device())?)
    }
}

/// Stage 1: last-layer ILD on mixed inputs (see the module docs). The student's forward and
/// backward run through the mixup, so this objective overrides the trainer's plain pass.
pub struct CrIld<'t> {
    teacher: &'t Bert,
    cfg: CrIldConfig,
    teacher_acts: Option<Activations>,
    clean_acts: Option<Activations>,
    mixup: Option<Mixup>,
    /// The last hidden state's projection to the teacher's width, when the widths differ (`ah`).
    projection: Option<HiddenProjection>,
}

/// Salt of the projection's initialisation seed, so it draws apart from λ.
const PROJECTION_SEED: u64 = 0x6669_745f_6465_6e73;

/// Stage 1's objective, after checking that `teacher` and `student` can be aligned.
pub fn stage1<'t>(teacher: &'t Bert, student: &Bert, cfg: CrIldConfig) -> Result<CrIld<'t>> {
    check_compatible(teacher, student)?;
    let (t, s) = (&teacher.config, &student.config);
    if t.num_attention_heads != s.num_attention_heads {
        return Err(Error::Config(format!(
            "cr-ild aligns attention rows head by head: teacher has {} heads, student {}",
            t.num_attention_heads, s.num_attention_heads
        )));
    }
    if cfg.epochs == 0 || !(cfg.w_ic.is_finite() && cfg.w_ic >= 0.0) {
        return Err(Error::Config(format!(
            "cr-ild needs epochs > 0 and w_ic >= 0 (got {} and {})",
            cfg.epochs, cfg.w_ic
        )));
    }
    // The Q/K/V relations are [B, H, L, L] whatever the head size: only `ah` needs a projection.
    let projection = match cfg.objective {
        Stage1Objective::AttentionHidden => {
            HiddenProjection::between(t, s, 1, mix64(cfg.seed ^ PROJECTION_SEED), &student.device())?
        }
        Stage1Objective::Qkv => None,
    };
    Ok(CrIld { teacher, cfg, teacher_acts: None, clean_acts: None, mixup: None, projection })
}

/// Stage 1's training set: the task's examples, then the supplementary unlabelled ones. Stage
/// 1 reads no targets, so the supplementary examples carry placeholders (class 0 or score 0)
/// that only keep the set index-aligned; never train on this set with a labelled objective.
pub fn stage1_set(task: &EncodedSet, supplementary: Option<&EncodedSet>) -> EncodedSet {
    let extra = supplementary.map_or(&[][..], |s| &s.items[..]);
    let mut items = task.items.clone();
    items.extend_from_slice(extra);
    let targets = match &task.targets {
        Targets::Classes(v) => Targets::Classes(v.iter().copied().chain(extra.iter().map(|_| 0)).collect()),
        Targets::Scores(v) => Targets::Scores(v.iter().copied().chain(extra.iter().map(|_| 0.0)).collect()),
    };
    EncodedSet { items, targets }
}

/// Activations for `batch` in `slot`, reused while the batch shape stays the same.
fn acts_for<'a>(slot: &'a mut Option<Activations>, model: &Bert, batch: &EncoderBatch) -> Result<&'a mut Activations> {
    if slot.as_ref().is_none_or(|a| (a.batch, a.seq) != (batch.batch, batch.seq)) {
        *slot = Some(model.activations(batch.batch, batch.seq)?);
    }
    Ok(slot.as_mut().expect("made above"))
}

fn scores_of<'a>(acts: &'a Activations, layer: usize, who: &str) -> Result<&'a Tensor> {
    acts.layers[layer].scores.as_ref().ok_or_else(|| Error::Config(format!("the {who} kept no attention scores")))
}

/// The self-relation `x xᵀ / √d_h` of `x` `[B, L, H * d_h]` per head, keys outside `mask`
/// masked, as (scores, softmax probabilities) `[B, H, L, L]`: attention with q = k = v = x.
fn relation(x: &Tensor, heads: usize, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let [b, l, _] = *x.shape() else {
        return Err(Error::Config(format!("q/k/v are {:?}, expected [B, L, D]", x.shape())));
    };
    let device = x.device();
    let mut context = Tensor::zeros(x.shape(), &device)?;
    let mut probs = Tensor::zeros(&[b, heads, l, l], &device)?;
    let mut scores = Tensor::zeros(&[b, heads, l, l], &device)?;
    attention::attention_forward(&mut context, &mut probs, Some(&mut scores), x, x, x, mask, None)?;
    Ok((scores, probs))
}

/// `dx += d(relation scores) . d(scores)/dx`: x is both factors of its relation.
fn relation_backward(dx: &mut Tensor, dscores: &Tensor, x: &Tensor, probs: &Tensor) -> Result<()> {
    let device = x.device();
    let mut dk = Tensor::zeros(x.shape(), &device)?;
    let mut dv = Tensor::zeros(x.shape(), &device)?;
    let dout = Tensor::zeros(x.shape(), &device)?;
    attention::attention_backward(dx, &mut dk, &mut dv, &dout, x, x, x, probs, Some(dscores), None)?;
    bias::add_inplace(dx, &dk)?;
    Ok(())
}

impl CrIld<'_> {
    fn ramp(&self, epoch: usize) -> f32 {
        match self.cfg.objective {
            Stage1Objective::AttentionHidden => consistency_weight(self.cfg.w_ic, epoch, self.cfg.epochs),
            Stage1Objective::Qkv => 0.0,
        }
    }

    /// `weight * KL(target ‖ student)` of the student's last-layer scores, on `side`'s mask.
    fn attention_term(
        mix: &Mixup,
        grads: &mut OutputGrads,
        layer: usize,
        student: &Tensor,
        target: &Tensor,
        side: Side,
        weight: f32,
    ) -> Result<f32> {
        let s = mix.masked_scores(student, Side::Own, side)?;
        let d = grads.scores_mut(layer, student)?;
        losses::score_kl(d, &s, target, mix.mask(side).0, weight)
    }

    fn ah_loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let mix = self.mixup.as_ref().ok_or_else(|| Error::Config("cr-ild: loss before the mixed forward".into()))?;
        let teacher = self.teacher_acts.as_ref().expect("teacher ran in loss()");
        let (sl, tl) = (student.layers.len() - 1, teacher.layers.len() - 1);
        let ss = scores_of(student, sl, "student")?;
        let mut log = LossLog::default();
        let target = mix.masked_scores(scores_of(teacher, tl, "teacher")?, Side::Own, Side::Own)?;
        log.push("attn_kl", Self::attention_term(mix, grads, sl, ss, &target, Side::Own, 1.0)?);
        let union = &mix.batch.mask;
        let last = [(sl + 1, tl + 1)];
        let hidden = match &mut self.projection {
            None => losses::hidden_mse(grads, student, teacher, &last, union, 1.0)?,
            Some(p) => p.hidden_mse(grads, student, teacher, &last, union, 1.0)?,
        };
        log.push("hidden_mse", hidden);

        let ramp = self.ramp(input.epoch);
        if ramp > 0.0 {
            let clean = self.clean_acts.as_ref().expect("the clean pass ran in student_forward()");
            let cs = scores_of(clean, sl, "student's clean pass")?;
            let lambda = mix.lambda;
            let own = mix.masked_scores(cs, Side::Own, Side::Own)?;
            let partner = mix.masked_scores(cs, Side::Partner, Side::Partner)?;
            let ic_attn = Self::attention_term(mix, grads, sl, ss, &own, Side::Own, ramp * lambda)?
                + Self::attention_term(mix, grads, sl, ss, &partner, Side::Partner, ramp * (1.0 - lambda))?;
            log.push("ic_attn", ic_attn);
            let ch = &clean.hidden[sl + 1];
            let ic_hidden = losses::hidden_mse_to(grads, student, sl + 1, ch, union, ramp * lambda)?
                + losses::hidden_mse_to(
                    grads,
                    student,
                    sl + 1,
                    &mix.partner_rows_of(ch)?,
                    union,
                    ramp * (1.0 - lambda),
                )?;
            log.push("ic_hidden", ic_hidden);
        }
        Ok(log)
    }

    fn qkv_loss(&self, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let mix = self.mixup.as_ref().ok_or_else(|| Error::Config("cr-ild: loss before the mixed forward".into()))?;
        let teacher = self.teacher_acts.as_ref().expect("teacher ran in loss()");
        let (s_last, t_last) = (student.layers.last().expect("a layer"), teacher.layers.last().expect("a layer"));
        let heads = self.teacher.config.num_attention_heads;
        let union = &mix.batch.mask;
        let dqkv = grads.qkv_mut(student.layers.len() - 1, &s_last.q)?;
        let mut log = LossLog::default();
        let terms = [("q_rel", &s_last.q, &t_last.q), ("k_rel", &s_last.k, &t_last.k), ("v_rel", &s_last.v, &t_last.v)];
        for ((name, xs, xt), dx) in terms.into_iter().zip(dqkv.iter_mut()) {
            let (rs, ps) = relation(xs, heads, union)?;
            let (rt, _) = relation(xt, heads, union)?;
            let mut drs = Tensor::zeros(rs.shape(), &rs.device())?;
            log.push(name, losses::score_kl(&mut drs, &rs, &rt, union, 1.0)?);
            relation_backward(dx, &drs, xs, &ps)?;
        }
        Ok(log)
    }
}

/// Salt of the clean pass's dropout seed, so its masks differ from the mixed pass's.
const CLEAN_VIEW: u64 = 0x00c1_ea17_1ee0;

impl Objective for CrIld<'_> {
    fn keep_scores(&self) -> bool {
        self.cfg.objective == Stage1Objective::AttentionHidden
    }

    fn student_forward(
        &mut self,
        student: &Bert,
        acts: &mut Activations,
        input: &StepInput,
        mode: ForwardMode,
    ) -> Result<()> {
        let mix = Mixup::new(input.batch, sample_lambda(self.cfg.seed, input.step))?;
        if self.ramp(input.epoch) > 0.0 {
            let clean = acts_for(&mut self.clean_acts, student, input.batch)?;
            let clean_mode = ForwardMode { seed: mix64(mode.seed ^ CLEAN_VIEW), keep_scores: true, ..mode };
            student.forward(clean, input.batch, None, clean_mode)?;
        }
        mix.forward(student, acts, mode)?;
        self.mixup = Some(mix);
        Ok(())
    }

    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let mix = self.mixup.as_ref().ok_or_else(|| Error::Config("cr-ild: loss before the mixed forward".into()))?;
        let mode = ForwardMode { train: false, seed: 0, keep_scores: self.keep_scores() };
        let teacher_acts = acts_for(&mut self.teacher_acts, self.teacher, &mix.batch)?;
        mix.forward(self.teacher, teacher_acts, mode)?;
        match self.cfg.objective {
            Stage1Objective::AttentionHidden => self.ah_loss(input, student, grads),
            Stage1Objective::Qkv => self.qkv_loss(student, grads),
        }
    }

    fn student_backward(
        &mut self,
        student: &Bert,
        grads: &mut BertWeights,
        acts: &mut Activations,
        out_grads: &OutputGrads,
        _input: &StepInput,
    ) -> Result<()> {
        let mix =
            self.mixup.as_ref().ok_or_else(|| Error::Config("cr-ild: backward before the mixed forward".into()))?;
        mix.backward(student, grads, acts, out_grads)
    }

    fn update_own(&mut self, student: &Optimizer) -> Result<()> {
        HiddenProjection::update_any(&mut self.projection, student)
    }

    fn own_part(&mut self, student: &Optimizer) -> Result<Option<OwnPart<'_>>> {
        HiddenProjection::part_of_any(&mut self.projection, student)
    }
}

#[cfg(test)]
#[path = "cr_ild_tests.rs"]
mod tests;
