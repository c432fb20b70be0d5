//! MATE-KD's generator: a BERT with a masked-LM head (`BertForMaskedLM`). No MLM checkpoint of
//! the test models exists offline, so `kd-cli train-generator` makes one: it puts an MLM head
//! (dense + GELU + LayerNorm, decoder tied to the word embeddings) on a frozen encoder of the
//! teacher's vocabulary and trains the head alone on unlabelled text with BERT's masking:
//!
//! ```text
//! for each batch of text:
//!     rows = 15% of the real, non-special tokens
//!     ids' = ids with 80% of rows -> [MASK], 10% -> a random word, 10% kept
//!     h    = Encoder(ids')                  frozen, dropout off
//!     loss = mean over rows of CE(Head(h[rows]), ids[rows])
//!     update the head only (the tied decoder table is the encoder's word embeddings: frozen too)
//! ```
//!
//! With [`GeneratorConfig::unfreeze`] the whole model learns instead (encoder, embeddings and
//! head: BERT's own pre-training step, dropout on), which a generator worth the name needs when
//! the encoder never had an MLM objective (MiniLM sentence encoders):
//!
//! ```text
//!     h    = Encoder(ids')                  dropout on
//!     loss = mean over rows of CE(Head(h[rows]), ids[rows])
//!     update every parameter (the decoder's gradient flows into the tied word embeddings)
//! ```
//!
//! The masking is shared with MATE-KD ([`Masking::mate_kd`]: 30% of tokens, all to [MASK]).

use std::time::Instant;

use kd_kernels::ops::cross_entropy::{self, Targets};
use kd_kernels::rng::{mix64, Rng};
use kd_kernels::{IdTensor, Tensor};
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode};
use kd_model::mlm::MlmActivations;
use kd_model::optim::{LinearSchedule, Optimizer, OptimizerConfig, Params};
use kd_model::{BertWeights, MlmHead};

use crate::batching::{collate, epoch_batches, Encoded};
use crate::trainer::{argmax, of_model, Event, LossLog};
use crate::{Error, Result};

/// Which tokens a masked-LM objective hides and what it puts in their place.
#[derive(Clone, Debug, PartialEq)]
pub struct Masking {
    /// Probability that a real, non-special token is selected.
    pub prob: f64,
    /// Fractions of the selected tokens replaced by `mask_id` and by a uniformly random word;
    /// the rest keep their token.
    pub to_mask: f64,
    pub to_random: f64,
    /// The tokenizer's [MASK] id.
    pub mask_id: u32,
    /// Ids never selected: the tokenizer's special tokens ([CLS], [SEP], [PAD], [UNK], [MASK]),
    /// as HF's `get_special_tokens_mask`. Padding is excluded by the attention mask as well.
    pub special_ids: Vec<u32>,
}

impl Masking {
    /// BERT's pre-training masking: 15% of tokens, of which 80% [MASK], 10% random, 10% kept.
    pub fn bert(mask_id: u32, special_ids: Vec<u32>) -> Masking {
        Masking { prob: 0.15, to_mask: 0.8, to_random: 0.1, mask_id, special_ids }
    }

    /// MATE-KD's (`mask_tokens` of the official code): 30% of tokens, every one to [MASK].
    pub fn mate_kd(mask_id: u32, special_ids: Vec<u32>) -> Masking {
        Masking { prob: 0.3, to_mask: 1.0, to_random: 0.0, mask_id, special_ids }
    }

    /// Masks a padded batch of ids (`attention` 1.0 for real tokens): the new ids and the
    /// selected positions, in increasing order.
    pub fn apply(&self, ids: &[u32], attention: &[f32], vocab: usize, rng: &mut Rng) -> (Vec<u32>, Vec<u32>) {
        let mut out = ids.to_vec();
        let mut rows = Vec::new();
        for (i, (&id, &real)) in ids.iter().zip(attention).enumerate() {
            if real < 0.5 || self.special_ids.contains(&id) || rng.uniform() >= self.prob {
                continue;
            }
            rows.push(i as u32);
            let r = rng.uniform();
            if r < self.to_mask {
                out[i] = self.mask_id;
            } else if r < self.to_mask + self.to_random {
                out[i] = rng.below(vocab) as u32;
            }
        }
        (out, rows)
    }

    pub(crate) fn check(&self, vocab: usize) -> Result<()> {
        let fractions_ok = (0.0..=1.0).contains(&self.to_mask)
            && (0.0..=1.0).contains(&self.to_random)
            && self.to_mask + self.to_random <= 1.0 + 1e-9;
        if !(0.0..=1.0).contains(&self.prob) || !fractions_ok {
            return Err(Error::Config(format!(
                "masking: probability {} and fractions {} / {} must lie in [0, 1] (fractions summing to at most 1)",
                self.prob, self.to_mask, self.to_random
            )));
        }
        if self.mask_id as usize >= vocab {
            return Err(Error::Config(format!(
                "masking: [MASK] id {} is outside the vocabulary of {vocab}",
                self.mask_id
            )));
        }
        Ok(())
    }
}

/// An encoder batch with some tokens masked.
pub struct MaskedBatch {
    /// The masked ids, with the original token types and padding mask.
    pub batch: EncoderBatch,
    /// Positions of the selected tokens among the batch's `B * L` rows, increasing.
    pub rows: Vec<u32>,
    /// The original token at each selected position (the MLM labels).
    pub labels: Vec<u32>,
}

/// Masks `batch` with `masking`, drawing from `rng`.
pub fn mask_batch(batch: &EncoderBatch, masking: &Masking, vocab: usize, rng: &mut Rng) -> Result<MaskedBatch> {
    let (ids, attention) = (batch.ids.to_vec()?, batch.mask.to_vec()?);
    let (masked, rows) = masking.apply(&ids, &attention, vocab, rng);
    let labels = rows.iter().map(|&r| ids[r as usize]).collect();
    let device = batch.mask.device();
    let batch = EncoderBatch::new(&masked, &batch.type_ids.to_vec()?, &attention, batch.batch, batch.seq, &device)?;
    Ok(MaskedBatch { batch, rows, labels })
}

/// A `BertForMaskedLM` made from `encoder`: its embeddings and layers, its MLM head when it has
/// one, else a fresh head (HF initialisation, seeded). The pooler and classifier are left out,
/// as `BertForMaskedLM` has neither.
pub fn generator_from_encoder(encoder: &Bert, seed: u64) -> Result<Bert> {
    let mut weights = encoder.weights.try_clone()?;
    (weights.pooler, weights.classifier) = (None, None);
    if weights.mlm_head.is_none() {
        weights.init_mlm_head(&encoder.config, seed)?;
    }
    let mut config = encoder.config.clone();
    (config.id2label, config.label2id, config.problem_type) = (None, None, None);
    Ok(Bert::new(config, weights))
}

/// Hyper-parameters of [`train_generator`].
#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub warmup_ratio: f32,
    pub weight_decay: f32,
    pub max_grad_norm: Option<f32>,
    pub seed: u64,
    pub masking: Masking,
    /// Train the encoder and embeddings with the head (dropout on), not the head alone.
    pub unfreeze: bool,
    /// Batch texts of similar length together (`batching::epoch_batches`).
    pub group_by_length: bool,
}

impl GeneratorConfig {
    /// Defaults for a fresh head on a frozen encoder: few parameters and a fixed input, so a
    /// larger learning rate than full fine-tuning.
    pub fn new(masking: Masking) -> GeneratorConfig {
        GeneratorConfig {
            epochs: 3,
            batch_size: 32,
            lr: 1e-3,
            warmup_ratio: 0.06,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            seed: 42,
            masking,
            unfreeze: false,
            group_by_length: false,
        }
    }

    /// Defaults for training the whole model: BERT's pre-training learning rate.
    pub fn unfrozen(masking: Masking) -> GeneratorConfig {
        GeneratorConfig { lr: 1e-4, unfreeze: true, ..GeneratorConfig::new(masking) }
    }
}

/// The outcome of [`train_generator`].
#[derive(Clone, Debug)]
pub struct GeneratorReport {
    pub steps: u64,
    pub seconds: f64,
    /// Mean MLM loss over the masked tokens of the last epoch.
    pub last_epoch_loss: f64,
}

/// The masked tokens' MLM loss and accuracy over a set of texts.
#[derive(Clone, Debug)]
pub struct MlmScore {
    pub loss: f64,
    pub accuracy: f64,
    pub tokens: usize,
}

/// The generator's forward on one masked batch: the encoder's activations, MLM logits at the
/// masked rows, the summed cross-entropy (and its gradient, scaled by `grad_scale`, in
/// `mlm.dlogits` when asked).
fn mlm_pass(
    generator: &Bert,
    masked: &MaskedBatch,
    mode: ForwardMode,
    grad_scale: Option<f32>,
) -> Result<(Activations, MlmActivations, Vec<f32>)> {
    let mut acts = generator.activations(masked.batch.batch, masked.batch.seq)?;
    generator.forward(&mut acts, &masked.batch, None, mode)?;
    let mut mlm = generator.mlm_activations(&masked.rows)?;
    generator.mlm_forward(&mut mlm, &acts)?;
    let device = generator.device();
    let p = masked.rows.len();
    let labels = IdTensor::from_vec(masked.labels.clone(), &[p], &device)?;
    let mut rows = Tensor::zeros(&[p], &device)?;
    let (logits, dlogits) = (&mlm.logits, &mut mlm.dlogits);
    let scale = grad_scale.unwrap_or(0.0);
    cross_entropy::cross_entropy(&mut rows, grad_scale.map(|_| dlogits), logits, Targets::Hard(&labels), None, scale)?;
    Ok((acts, mlm, rows.to_vec()?))
}

/// What [`train_generator`] updates, with its optimiser and gradient buffers.
enum Learner {
    /// The MLM head alone; the encoder and the tied word embeddings stay as they are.
    Head { optimizer: Optimizer<MlmHead>, grads: MlmHead },
    /// Every parameter of the generator (the moments boxed: two whole models' tensor handles).
    Whole { optimizer: Box<Optimizer>, grads: BertWeights },
}

impl Learner {
    fn new(generator: &Bert, unfreeze: bool, config: OptimizerConfig) -> Result<Learner> {
        let head =
            generator.weights.mlm_head.as_ref().ok_or_else(|| Error::Config("the generator has no MLM head".into()))?;
        Ok(if unfreeze {
            let weights = &generator.weights;
            Learner::Whole { optimizer: Box::new(Optimizer::new(config, weights)?), grads: weights.zeros_like()? }
        } else {
            Learner::Head { optimizer: Optimizer::new(config, head)?, grads: head.zeros_like()? }
        })
    }

    /// Dropout trains with the encoder; a frozen encoder gives the head fixed features.
    fn forward_mode(&self, seed: u64) -> ForwardMode {
        ForwardMode { train: matches!(self, Learner::Whole { .. }), seed, keep_scores: false }
    }

    fn lr(&self) -> f32 {
        match self {
            Learner::Head { optimizer, .. } => optimizer.lr(),
            Learner::Whole { optimizer, .. } => optimizer.lr(),
        }
    }

    /// Backpropagates `mlm.dlogits` and takes one optimiser step.
    fn update(
        &mut self,
        generator: &mut Bert,
        acts: &mut Activations,
        mlm: &mut MlmActivations,
        batch: &EncoderBatch,
    ) -> Result<()> {
        match self {
            Learner::Head { optimizer, grads } => {
                grads.zero()?;
                let w = &mut generator.weights;
                let head = w.mlm_head.as_mut().expect("checked in Learner::new");
                head.backward(grads, None, None, mlm, &w.embeddings.word_embeddings)?;
                optimizer.update(head, grads).map_err(of_model("the generator's MLM head's"))?;
            }
            Learner::Whole { optimizer, grads } => {
                grads.zero()?;
                let mut out = acts.output_grads()?;
                generator.mlm_backward(grads, mlm, acts, &mut out)?;
                generator.backward(grads, acts, &out, batch, None)?;
                optimizer.update(&mut generator.weights, grads).map_err(of_model("the generator's"))?;
            }
        }
        Ok(())
    }
}

fn step_seed(seed: u64, epoch: usize, index: u64) -> u64 {
    mix64(seed ^ mix64((epoch as u64) << 32 ^ index))
}

/// Trains `generator` on `text` with BERT's masked-LM objective: its MLM head alone, on the
/// frozen encoder and word embeddings, or (with `cfg.unfreeze`) every parameter.
pub fn train_generator(
    generator: &mut Bert,
    text: &[Encoded],
    cfg: &GeneratorConfig,
    observer: &mut dyn FnMut(Event),
) -> Result<GeneratorReport> {
    if text.is_empty() {
        return Err(Error::Config("train-generator: no text to train on".into()));
    }
    if cfg.batch_size == 0 {
        return Err(Error::Config("train-generator: batch size is 0".into()));
    }
    let vocab = generator.config.vocab_size;
    cfg.masking.check(vocab)?;
    let steps_per_epoch = text.len().div_ceil(cfg.batch_size) as u64;
    let total_steps = steps_per_epoch * cfg.epochs as u64;
    let opt_cfg = OptimizerConfig {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm: cfg.max_grad_norm,
        schedule: LinearSchedule { warmup: (cfg.warmup_ratio * total_steps as f32).ceil() as u64, total: total_steps },
    };
    let mut learner = Learner::new(generator, cfg.unfreeze, opt_cfg)?;
    let device = generator.device();
    let pad = generator.config.pad_token_id;
    let started = Instant::now();
    let (mut step, mut last_epoch_loss) = (0u64, 0.0);

    for epoch in 0..cfg.epochs {
        let mut rng = Rng::new(mix64(cfg.seed ^ (epoch as u64 + 1)));
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        for (index, chunk) in epoch_batches(text, cfg.batch_size, cfg.group_by_length, &mut rng).iter().enumerate() {
            let t0 = Instant::now();
            let batch = collate(chunk.iter().map(|&i| &text[i]), pad, &device)?;
            let seed = step_seed(cfg.seed, epoch, index as u64);
            let masked = mask_batch(&batch, &cfg.masking, vocab, &mut Rng::new(seed))?;
            let p = masked.rows.len();
            let mut log = LossLog::default();
            if p > 0 {
                let mode = learner.forward_mode(seed);
                let (mut acts, mut mlm, rows) = mlm_pass(generator, &masked, mode, Some(1.0 / p as f32))?;
                let loss: f64 = rows.iter().map(|&v| v as f64).sum();
                if !loss.is_finite() {
                    return Err(Error::NonFinite(format!("the generator's MLM loss is {loss} at step {}", step + 1)));
                }
                (loss_sum, tokens) = (loss_sum + loss, tokens + p);
                log.push("mlm", (loss / p as f64) as f32);
                learner.update(generator, &mut acts, &mut mlm, &masked.batch)?;
            }
            step += 1;
            let lr = learner.lr();
            let examples_per_s = chunk.len() as f64 / t0.elapsed().as_secs_f64();
            observer(Event::Step { step, total_steps, loss: &log, lr, examples_per_s });
        }
        last_epoch_loss = loss_sum / tokens.max(1) as f64;
    }
    Ok(GeneratorReport { steps: step, seconds: started.elapsed().as_secs_f64(), last_epoch_loss })
}

/// The MLM loss and accuracy of `generator` on `text`, masked with `masking` from a fixed
/// `seed` (the same masks for every model evaluated with that seed).
pub fn evaluate_mlm(
    generator: &Bert,
    text: &[Encoded],
    masking: &Masking,
    batch_size: usize,
    seed: u64,
) -> Result<MlmScore> {
    let vocab = generator.config.vocab_size;
    masking.check(vocab)?;
    let device = generator.device();
    let (mut loss, mut correct, mut tokens) = (0.0f64, 0usize, 0usize);
    for (index, chunk) in text.chunks(batch_size.max(1)).enumerate() {
        let batch = collate(chunk, generator.config.pad_token_id, &device)?;
        let masked = mask_batch(&batch, masking, vocab, &mut Rng::new(step_seed(seed, 0, index as u64)))?;
        if masked.rows.is_empty() {
            continue;
        }
        let (_, mlm, rows) = mlm_pass(generator, &masked, ForwardMode::default(), None)?;
        loss += rows.iter().map(|&v| v as f64).sum::<f64>();
        let logits = mlm.logits.to_vec()?;
        correct += logits.chunks(vocab).zip(&masked.labels).filter(|(row, &y)| argmax(row) == y as usize).count();
        tokens += masked.rows.len();
    }
    if tokens == 0 {
        return Err(Error::Config("evaluate_mlm: the masking selected no token".into()));
    }
    Ok(MlmScore { loss: loss / tokens as f64, accuracy: correct as f64 / tokens as f64, tokens })
}
