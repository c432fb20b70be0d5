//! The BERT encoder and its sequence-classification head, forward and backward, llm.c style:
//! every sub-layer is an explicit forward/backward pair over buffers owned by [`Activations`]
//! (sized per batch shape and reused), and no general autograd.
//!
//! Shapes: `B` examples of `L` tokens, `N = B * L` token rows, hidden width `D`, `H` heads,
//! intermediate width `I`, `C` labels. Hidden states are `[N, D]`; attention maps `[B, H, L, L]`.
//! Dropout masks are not stored: each dropout site draws from `rng::uniform(seed, element)`
//! with its own seed, so backward recomputes the same mask.
//!
//! A pass that only needs the logits ([`Outputs::Logits`]) runs the last layer past its
//! attention on the `B` [CLS] rows alone: the pooler reads nothing else, and every op after the
//! attention is row-wise, so the logits are those of the full pass while the last layer's
//! output projection and feed-forward (about 70% of its FLOPs, forward and backward) are not
//! computed for the other `N - B` rows. Its dropout masks are addressed by the rows' places in
//! the full `[N, D]` tensor, so training draws the full pass's masks too.

use kd_kernels::ops::attention::{self, AttentionDropout};
use kd_kernels::ops::{bias, cls_attention, dropout, embedding, gelu, gemm, layernorm};
use kd_kernels::rng::mix64;
use kd_kernels::{Device, IdTensor, Tensor};

use crate::config::BertConfig;
use crate::family::{Family, HeadActivation};
use crate::weights::{BertWeights, LayerNorm, Linear};
use crate::{Error, Result};

/// One tokenized batch on a device: ids (or none when dense input embeddings are given),
/// token-type ids, position ids and the padding mask.
pub struct EncoderBatch {
    pub batch: usize,
    pub seq: usize,
    pub ids: IdTensor,
    pub type_ids: IdTensor,
    pub positions: IdTensor,
    pub mask: Tensor,
    /// Row index of each example's first token ([CLS]) in the `[N, D]` hidden states.
    pub cls_rows: IdTensor,
}

impl EncoderBatch {
    /// Builds the device tensors from host arrays of `batch * seq` entries.
    pub fn new(ids: &[u32], type_ids: &[u32], mask: &[f32], batch: usize, seq: usize, device: &Device) -> Result<Self> {
        let n = batch * seq;
        if ids.len() != n || type_ids.len() != n || mask.len() != n {
            return Err(Error::Shape(format!(
                "batch of {batch}x{seq} needs {n} ids, type ids and mask values; got {}, {}, {}",
                ids.len(),
                type_ids.len(),
                mask.len()
            )));
        }
        let positions: Vec<u32> = (0..n).map(|i| (i % seq) as u32).collect();
        let cls: Vec<u32> = (0..batch).map(|b| (b * seq) as u32).collect();
        Ok(EncoderBatch {
            batch,
            seq,
            ids: IdTensor::from_vec(ids.to_vec(), &[n], device)?,
            type_ids: IdTensor::from_vec(type_ids.to_vec(), &[n], device)?,
            positions: IdTensor::from_vec(positions, &[n], device)?,
            mask: Tensor::from_slice(mask, &[batch, seq], device)?,
            cls_rows: IdTensor::from_vec(cls, &[batch], device)?,
        })
    }

    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// How a forward pass runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardMode {
    /// Dropout on (training) or off (evaluation, teachers).
    pub train: bool,
    /// Seed of this step's dropout masks.
    pub seed: u64,
    /// Keep every layer's masked pre-softmax attention scores (attention-map KL needs them).
    pub keep_scores: bool,
}

/// What a forward pass keeps, chosen when its [`Activations`] are made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outputs {
    /// Every hidden state and attention map, and the buffers of a backward pass: for losses on
    /// intermediate representations.
    #[default]
    All,
    /// Only the logits and their backward: the last layer's output projection, feed-forward and
    /// LayerNorms run on the [CLS] rows (see the module docs); `hidden.last()` is `[B, D]`.
    Logits,
    /// [`Outputs::Logits`] without a backward (frozen teachers, evaluation): the layers before
    /// the last share one set of buffers, and `hidden` is only three states (the embedding output
    /// and the layers' outputs alternating in the first two, the last layer's `[B, D]`).
    LogitsInference,
}

/// The forward buffers of one transformer layer, kept for its backward.
pub struct LayerActivations {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// The attention maps, written only by a forward that keeps them (`keep_scores`, or where
    /// the flash kernels cannot run: the CPU, head dims other than 32 and 64).
    pub probs: Tensor,
    pub scores: Option<Tensor>,
    pub context: Tensor,
    /// `[B, H, L, 2]`: the attention softmax statistics, what the backward reads without maps.
    stats: Tensor,
    /// Whether the last forward kept `probs`.
    maps: bool,
    attn_residual: Tensor,
    ln1_mean: Tensor,
    ln1_rstd: Tensor,
    /// LayerNorm output after attention: the feed-forward input.
    pub attention_output: Tensor,
    intermediate_pre: Tensor,
    intermediate: Tensor,
    ffn_residual: Tensor,
    ln2_mean: Tensor,
    ln2_rstd: Tensor,
    /// For a logits-only last layer, the [CLS] rows its post-attention half runs on.
    cls: Option<ClsRows>,
}

/// The `[B, D]` [CLS] rows of a logits-only last layer's attention context and input.
struct ClsRows {
    context: Tensor,
    input: Tensor,
    /// On the CPU only the [CLS] rows' queries are computed and attend
    /// (`ops::cls_attention`): `q` is `[B, D]` and `probs` `[B, H, L]`. On a GPU the full
    /// attention runs and its [CLS] rows are gathered.
    query_only: bool,
}

/// Everything a forward pass writes and its backward reads, for one `(B, L)`.
pub struct Activations {
    pub batch: usize,
    pub seq: usize,
    pub outputs: Outputs,
    num_layers: usize,
    mode: ForwardMode,
    emb_sum: Tensor,
    emb_ln: Tensor,
    emb_mean: Tensor,
    emb_rstd: Tensor,
    /// The embeddings' dropout output `[N, E]` when `embeddings_project` maps it to `hidden[0]`.
    emb_out: Option<Tensor>,
    /// `hidden[0]` is the embedding output, `hidden[l + 1]` the output of layer `l` (but see
    /// [`Outputs::LogitsInference`]).
    pub hidden: Vec<Tensor>,
    pub layers: Vec<LayerActivations>,
    cls: Tensor,
    pooled_pre: Tensor,
    pooled: Tensor,
    pooled_dropped: Tensor,
    /// `[B, C]` classifier outputs (absent without a classifier head).
    pub logits: Option<Tensor>,
    used_inputs_embeds: bool,
    /// The position ids of the last [`Bert::embed`] when the family numbers them from the
    /// padding mask (RoBERTa); `None` when they are the batch's own 0, 1, 2, ...
    positions: Option<IdTensor>,
    scratch: Option<Scratch>,
}

/// Gradients a loss writes into (accumulating) before [`Bert::backward`] runs.
pub struct OutputGrads {
    pub logits: Option<Tensor>,
    /// Per hidden state (index as in [`Activations::hidden`]), made on first use.
    pub hidden: Vec<Option<Tensor>>,
    /// Per layer, the gradient w.r.t. the masked attention scores, made on first use.
    pub scores: Vec<Option<Tensor>>,
    /// Per layer, the gradients w.r.t. its query, key and value projections (`[B, L, D]` each),
    /// for losses on Q/K/V relations; made on first use.
    pub qkv: Vec<Option<[Tensor; 3]>>,
}

/// Gradients of a layer's post-attention half (LayerNorms, feed-forward, attention output
/// dense) over its rows: all `N` token rows, or the `B` [CLS] rows of a logits-only last layer.
struct RowScratch {
    /// d(layer output), the input of the layer's backward.
    dh: Tensor,
    d_res: Tensor,
    d_a: Tensor,
    d_tmp: Tensor,
    d_inter: Tensor,
    d_inter_pre: Tensor,
}

impl RowScratch {
    fn new(config: &BertConfig, rows: usize, device: &Device) -> Result<Self> {
        let (d, i) = (config.hidden_size, config.intermediate_size);
        Ok(RowScratch {
            dh: zeros(&[rows, d], device)?,
            d_res: zeros(&[rows, d], device)?,
            d_a: zeros(&[rows, d], device)?,
            d_tmp: zeros(&[rows, d], device)?,
            d_inter: zeros(&[rows, i], device)?,
            d_inter_pre: zeros(&[rows, i], device)?,
        })
    }
}

/// The embeddings' gradients `[N, E]` when `embeddings_project` changes the width: d(its
/// input), then as [`RowScratch`]'s `d_res` and `d_a`.
struct EmbScratch {
    dh: Tensor,
    d_res: Tensor,
    d_a: Tensor,
}

impl EmbScratch {
    fn new(rows: usize, e: usize, device: &Device) -> Result<Self> {
        Ok(EmbScratch {
            dh: zeros(&[rows, e], device)?,
            d_res: zeros(&[rows, e], device)?,
            d_a: zeros(&[rows, e], device)?,
        })
    }
}

/// The [CLS]-row gradients of a logits-only last layer: its post-attention half and
/// d(context) of those rows before they are scattered into the full `d_context`.
struct ClsScratch {
    rows: RowScratch,
    d_context: Tensor,
    /// d(query) of the [CLS] rows, and its d(input), of a query-only layer.
    dq: Tensor,
    dx: Tensor,
}

/// Scratch gradients of the activations, reused across steps.
struct Scratch {
    rows: RowScratch,
    emb: Option<EmbScratch>,
    cls: Option<ClsScratch>,
    dh_prev: Tensor,
    d_context: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    d_cls: Tensor,
    d_pooled_dropped: Tensor,
    d_pooled: Tensor,
    d_pooled_pre: Tensor,
}

impl Scratch {
    fn new(config: &BertConfig, batch: usize, seq: usize, cls_tail: bool, device: &Device) -> Result<Self> {
        let (n, d, e) = (batch * seq, config.hidden_size, config.embedding_size());
        let cls = || -> Result<ClsScratch> {
            Ok(ClsScratch {
                rows: RowScratch::new(config, batch, device)?,
                d_context: zeros(&[batch, d], device)?,
                dq: zeros(&[batch, d], device)?,
                dx: zeros(&[batch, d], device)?,
            })
        };
        Ok(Scratch {
            rows: RowScratch::new(config, n, device)?,
            emb: (e != d).then(|| EmbScratch::new(n, e, device)).transpose()?,
            cls: cls_tail.then(cls).transpose()?,
            dh_prev: zeros(&[n, d], device)?,
            d_context: zeros(&[batch, seq, d], device)?,
            dq: zeros(&[batch, seq, d], device)?,
            dk: zeros(&[batch, seq, d], device)?,
            dv: zeros(&[batch, seq, d], device)?,
            d_cls: zeros(&[batch, d], device)?,
            d_pooled_dropped: zeros(&[batch, d], device)?,
            d_pooled: zeros(&[batch, d], device)?,
            d_pooled_pre: zeros(&[batch, d], device)?,
        })
    }
}

/// A BERT encoder with its optional heads.
pub struct Bert {
    pub config: BertConfig,
    pub weights: BertWeights,
}

fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros(shape, device)?)
}

fn check_batch(acts: &Activations, batch: &EncoderBatch) -> Result<()> {
    if (acts.batch, acts.seq) != (batch.batch, batch.seq) {
        return Err(Error::Shape(format!(
            "activations are for {}x{}, batch is {}x{}",
            acts.batch, acts.seq, batch.batch, batch.seq
        )));
    }
    Ok(())
}

/// Seeds of the dropout sites: one per (site, layer), derived from the step's seed.
/// RoBERTa's position ids (HF `create_position_ids_from_input_ids`): a row's real tokens count
/// up from `pad_token_id + 1`, its padding takes `pad_token_id`. `None` for BERT's 0, 1, 2, ...
fn family_positions(config: &BertConfig, batch: &EncoderBatch) -> Result<Option<IdTensor>> {
    let Some(first) = Family::of(config).first_position(config) else { return Ok(None) };
    let mask = batch.mask.to_vec()?;
    let mut positions = Vec::with_capacity(mask.len());
    for row in mask.chunks(batch.seq.max(1)) {
        let mut next = first;
        for &m in row {
            positions.push(if m > 0.0 { next } else { config.pad_token_id });
            next += u32::from(m > 0.0);
        }
    }
    Ok(Some(IdTensor::from_vec(positions, &[mask.len()], &batch.mask.device())?))
}

fn site_seed(step_seed: u64, site: u64) -> u64 {
    mix64(step_seed ^ mix64(site.wrapping_add(1)))
}
const SITE_EMBEDDINGS: u64 = 0;
const SITE_POOLER: u64 = 1;
fn site_attention_probs(layer: usize) -> u64 {
    16 + 3 * layer as u64
}
fn site_attention_output(layer: usize) -> u64 {
    17 + 3 * layer as u64
}
fn site_ffn_output(layer: usize) -> u64 {
    18 + 3 * layer as u64
}

/// Layer `layer`'s dropout on the attention probabilities, on only in training.
fn attention_dropout(cfg: &BertConfig, mode: ForwardMode, layer: usize) -> Option<AttentionDropout> {
    mode.train.then(|| AttentionDropout {
        p: cfg.attention_probs_dropout_prob as f32,
        seed: site_seed(mode.seed, site_attention_probs(layer)),
    })
}

impl Activations {
    pub fn new(
        config: &BertConfig,
        num_labels: Option<usize>,
        batch: usize,
        seq: usize,
        outputs: Outputs,
        device: &Device,
    ) -> Result<Self> {
        let (n, d, h, i) = (batch * seq, config.hidden_size, config.num_attention_heads, config.intermediate_size);
        let e = config.embedding_size();
        let num_layers = config.num_hidden_layers;
        let cls_tail = outputs != Outputs::All && num_layers > 0;
        // `rows`: the token rows of the post-attention half, N or the B [CLS] rows.
        let query_only = cls_attention::cls_attention_runs_on(device);
        let layer = |cls_only: bool| -> Result<LayerActivations> {
            let r = if cls_only { batch } else { n };
            let cls = || -> Result<ClsRows> {
                Ok(ClsRows { context: zeros(&[batch, d], device)?, input: zeros(&[batch, d], device)?, query_only })
            };
            let (q_shape, probs_shape) = if cls_only && query_only {
                (vec![batch, d], vec![batch, h, seq])
            } else {
                (vec![batch, seq, d], vec![batch, h, seq, seq])
            };
            Ok(LayerActivations {
                q: zeros(&q_shape, device)?,
                k: zeros(&[batch, seq, d], device)?,
                v: zeros(&[batch, seq, d], device)?,
                probs: zeros(&probs_shape, device)?,
                scores: None,
                context: zeros(&[batch, seq, d], device)?,
                stats: zeros(&[batch, h, seq, 2], device)?,
                maps: true,
                attn_residual: zeros(&[r, d], device)?,
                ln1_mean: zeros(&[r], device)?,
                ln1_rstd: zeros(&[r], device)?,
                attention_output: zeros(&[r, d], device)?,
                intermediate_pre: zeros(&[r, i], device)?,
                intermediate: zeros(&[r, i], device)?,
                ffn_residual: zeros(&[r, d], device)?,
                ln2_mean: zeros(&[r], device)?,
                ln2_rstd: zeros(&[r], device)?,
                cls: cls_only.then(cls).transpose()?,
            })
        };
        // Inference keeps one full layer's buffers for all but the last (if there are any).
        let full_layers = match outputs {
            Outputs::LogitsInference => num_layers.saturating_sub(1).min(1),
            _ => num_layers - usize::from(cls_tail),
        };
        let mut layers = (0..full_layers).map(|_| layer(false)).collect::<Result<Vec<_>>>()?;
        if cls_tail {
            layers.push(layer(true)?);
        }
        let full_hidden = match outputs {
            Outputs::LogitsInference => num_layers.min(2),
            _ => num_layers + 1 - usize::from(cls_tail),
        };
        let mut hidden = (0..full_hidden).map(|_| zeros(&[n, d], device)).collect::<Result<Vec<_>>>()?;
        if cls_tail {
            hidden.push(zeros(&[batch, d], device)?);
        }
        Ok(Activations {
            batch,
            seq,
            outputs,
            num_layers,
            mode: ForwardMode::default(),
            emb_sum: zeros(&[n, e], device)?,
            emb_ln: zeros(&[n, e], device)?,
            emb_mean: zeros(&[n], device)?,
            emb_rstd: zeros(&[n], device)?,
            emb_out: (e != d).then(|| zeros(&[n, e], device)).transpose()?,
            hidden,
            layers,
            cls: zeros(&[batch, d], device)?,
            pooled_pre: zeros(&[batch, d], device)?,
            pooled: zeros(&[batch, d], device)?,
            pooled_dropped: zeros(&[batch, d], device)?,
            logits: num_labels.map(|c| zeros(&[batch, c], device)).transpose()?,
            used_inputs_embeds: false,
            positions: None,
            scratch: None,
        })
    }

    /// Where layer `l` reads its input and writes its output in `hidden`, and which `layers`
    /// entry holds its buffers.
    fn slots(&self, l: usize) -> (usize, usize, usize) {
        match self.outputs {
            Outputs::LogitsInference if l + 1 == self.num_layers => {
                (l % 2, self.hidden.len() - 1, self.layers.len() - 1)
            }
            Outputs::LogitsInference => (l % 2, (l + 1) % 2, 0),
            Outputs::All | Outputs::Logits => (l, l + 1, l),
        }
    }

    /// The output gradients matching these activations, all zero.
    pub fn output_grads(&self) -> Result<OutputGrads> {
        let device = self.emb_sum.device();
        Ok(OutputGrads {
            logits: self.logits.as_ref().map(|l| zeros(l.shape(), &device)).transpose()?,
            hidden: self.hidden.iter().map(|_| None).collect(),
            scores: self.layers.iter().map(|_| None).collect(),
            qkv: self.layers.iter().map(|_| None).collect(),
        })
    }
}

impl OutputGrads {
    /// Zeroes every buffer (keeping the allocations) for the next step.
    pub fn zero(&mut self) -> Result<()> {
        let all = self
            .logits
            .iter_mut()
            .chain(self.hidden.iter_mut().flatten())
            .chain(self.scores.iter_mut().flatten())
            .chain(self.qkv.iter_mut().flatten().flatten());
        for t in all {
            t.fill(0.0)?;
        }
        Ok(())
    }

    /// The gradient buffer of hidden state `index`, made zero on first use.
    pub fn hidden_mut(&mut self, index: usize, like: &Tensor) -> Result<&mut Tensor> {
        let slot = &mut self.hidden[index];
        if slot.is_none() {
            *slot = Some(zeros(like.shape(), &like.device())?);
        }
        Ok(slot.as_mut().expect("made above"))
    }

    /// The gradient buffer of layer `index`'s attention scores, made zero on first use.
    pub fn scores_mut(&mut self, index: usize, like: &Tensor) -> Result<&mut Tensor> {
        let slot = &mut self.scores[index];
        if slot.is_none() {
            *slot = Some(zeros(like.shape(), &like.device())?);
        }
        Ok(slot.as_mut().expect("made above"))
    }

    /// The gradient buffers of layer `index`'s query, key and value, made zero on first use.
    pub fn qkv_mut(&mut self, index: usize, like: &Tensor) -> Result<&mut [Tensor; 3]> {
        let slot = &mut self.qkv[index];
        if slot.is_none() {
            let make = || zeros(like.shape(), &like.device());
            *slot = Some([make()?, make()?, make()?]);
        }
        Ok(slot.as_mut().expect("made above"))
    }
}

/// `KD_FLASH_ATTENTION=1`, read once per process rather than on every forward.
fn flash_asked_for() -> bool {
    static ASKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ASKED.get_or_init(|| std::env::var_os("KD_FLASH_ATTENTION").is_some_and(|v| v == "1"))
}

/// How far apart a layer's post-attention rows lie in its dropout masks' index space: `D` for
/// all `N` rows, `L * D` for the [CLS] rows (the first of each example's `L`).
fn mask_row_step(layer: &LayerActivations, seq: usize, d: usize) -> usize {
    if layer.cls.is_some() {
        seq * d
    } else {
        d
    }
}

/// `(&hidden[input], &mut hidden[output])`, two distinct entries.
fn input_and_output(hidden: &mut [Tensor], input: usize, output: usize) -> (&Tensor, &mut Tensor) {
    if input < output {
        let (before, after) = hidden.split_at_mut(output);
        (&before[input], &mut after[0])
    } else {
        let (before, after) = hidden.split_at_mut(input);
        (&after[0], &mut before[output])
    }
}

fn linear(out: &mut Tensor, x: &Tensor, l: &Linear) -> Result<()> {
    Ok(gemm::linear_forward(out, x, &l.weight, Some(&l.bias))?)
}

fn linear_back(dx: Option<&mut Tensor>, grad: &mut Linear, dout: &Tensor, x: &Tensor, l: &Linear) -> Result<()> {
    Ok(gemm::linear_backward(dx, &mut grad.weight, Some(&mut grad.bias), dout, x, &l.weight)?)
}

fn layer_norm(
    out: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
    x: &Tensor,
    w: &LayerNorm,
    eps: f32,
) -> Result<()> {
    Ok(layernorm::layernorm_forward(out, mean, rstd, x, &w.weight, &w.bias, eps)?)
}

impl Bert {
    pub fn new(config: BertConfig, weights: BertWeights) -> Self {
        Bert { config, weights }
    }

    pub fn device(&self) -> Device {
        self.weights.embeddings.word_embeddings.device()
    }

    pub fn num_labels(&self) -> Option<usize> {
        self.weights.classifier.as_ref().map(|c| c.weight.shape()[0])
    }

    /// Buffers for a batch of `batch` examples of `seq` tokens, keeping everything.
    pub fn activations(&self, batch: usize, seq: usize) -> Result<Activations> {
        self.activations_for(batch, seq, Outputs::All)
    }

    /// Buffers for a batch of `batch` examples of `seq` tokens, keeping `outputs`.
    pub fn activations_for(&self, batch: usize, seq: usize, outputs: Outputs) -> Result<Activations> {
        let max_tokens = Family::of(&self.config).max_tokens(&self.config);
        if seq > max_tokens {
            return Err(Error::Shape(format!(
                "sequence length {seq} exceeds the {max_tokens} tokens that max_position_embeddings {} allows",
                self.config.max_position_embeddings
            )));
        }
        Activations::new(&self.config, self.num_labels(), batch, seq, outputs, &self.device())
    }

    /// Runs the encoder (and the classifier head when present). `inputs_embeds` `[N, D]`
    /// replaces the word-embedding lookup (MATE-KD's soft tokens, gradient checks).
    pub fn forward(
        &self,
        acts: &mut Activations,
        batch: &EncoderBatch,
        inputs_embeds: Option<&Tensor>,
        mode: ForwardMode,
    ) -> Result<()> {
        self.embed(acts, batch, inputs_embeds, mode)?;
        self.encode(acts, batch)
    }

    /// The first half of [`Bert::forward`]: the embedding output, `acts.hidden[0]`. A method may
    /// rewrite it before [`Bert::encode`] (CR-ILD mixes two examples' embedding outputs), and
    /// then splits the backward the same way ([`Bert::backward_encoder`]).
    pub fn embed(
        &self,
        acts: &mut Activations,
        batch: &EncoderBatch,
        inputs_embeds: Option<&Tensor>,
        mode: ForwardMode,
    ) -> Result<()> {
        check_batch(acts, batch)?;
        acts.mode = mode;
        acts.used_inputs_embeds = inputs_embeds.is_some();
        let w = &self.weights;
        let cfg = &self.config;
        let eps = cfg.layer_norm_eps as f32;
        let p_hidden = if mode.train { cfg.hidden_dropout_prob as f32 } else { 0.0 };

        // Embeddings: word (or given) + position + token type (if the family has them), LayerNorm, dropout.
        let e = &w.embeddings;
        match inputs_embeds {
            Some(x) => {
                kd_kernels::expect_shape("bert.embeddings", "inputs_embeds", x, acts.emb_sum.shape())?;
                acts.emb_sum.fill(0.0)?;
                bias::add_inplace(&mut acts.emb_sum, x)?;
            }
            None => embedding::embedding_forward(&mut acts.emb_sum, &batch.ids, &e.word_embeddings, false)?,
        }
        acts.positions = family_positions(cfg, batch)?;
        let positions = acts.positions.as_ref().unwrap_or(&batch.positions);
        embedding::embedding_forward(&mut acts.emb_sum, positions, &e.position_embeddings, true)?;
        if let Some(types) = &e.token_type_embeddings {
            embedding::embedding_forward(&mut acts.emb_sum, &batch.type_ids, types, true)?;
        }
        layer_norm(&mut acts.emb_ln, &mut acts.emb_mean, &mut acts.emb_rstd, &acts.emb_sum, &e.layer_norm, eps)?;
        let dropped = acts.emb_out.as_mut().unwrap_or(&mut acts.hidden[0]);
        dropout::dropout_forward(dropped, &acts.emb_ln, p_hidden, site_seed(mode.seed, SITE_EMBEDDINGS))?;
        if let (Some(project), Some(out)) = (&e.project, &acts.emb_out) {
            linear(&mut acts.hidden[0], out, project)?;
        }
        Ok(())
    }

    /// The second half of [`Bert::forward`]: the layers and heads on `acts.hidden[0]`, in the
    /// mode [`Bert::embed`] recorded. `batch` gives the attention mask (it may differ from the
    /// one the embeddings were computed with).
    pub fn encode(&self, acts: &mut Activations, batch: &EncoderBatch) -> Result<()> {
        check_batch(acts, batch)?;
        let mode = acts.mode;
        let w = &self.weights;
        let cfg = &self.config;
        let eps = cfg.layer_norm_eps as f32;
        let p_hidden = if mode.train { cfg.hidden_dropout_prob as f32 } else { 0.0 };
        if mode.keep_scores && acts.outputs != Outputs::All {
            return Err(Error::Shape("attention scores are kept only with Outputs::All".into()));
        }
        // The flash kernels keep no maps: they run unless a loss reads the maps, and only when
        // asked for, until they have passed their parity tests on a GPU (docs/GPU.md).
        let flash =
            flash_asked_for() && attention::flash_path(&self.device(), cfg.hidden_size / cfg.num_attention_heads);
        for (l, lw) in w.layers.iter().enumerate() {
            let (input, output, buffers) = acts.slots(l);
            let row_step = mask_row_step(&acts.layers[buffers], acts.seq, cfg.hidden_size);
            let (x, out) = input_and_output(&mut acts.hidden, input, output);
            let a = &mut acts.layers[buffers];
            let dropout = attention_dropout(cfg, mode, l);
            // self-attention; q, k, v and the context are [B, L, D] views of [N, D] rows, and
            // the rest of the layer is row-wise: a logits-only last layer runs it on [CLS] rows.
            let (context, x) = match &mut a.cls {
                Some(rows) if rows.query_only => {
                    embedding::embedding_forward(&mut rows.input, &batch.cls_rows, x, false)?;
                    linear(&mut a.q, &rows.input, &lw.query)?;
                    linear(&mut a.k, x, &lw.key)?;
                    linear(&mut a.v, x, &lw.value)?;
                    let (q, k, v, mask) = (&a.q, &a.k, &a.v, &batch.mask);
                    cls_attention::cls_attention_forward(&mut rows.context, &mut a.probs, q, k, v, mask, dropout)?;
                    (&rows.context, &rows.input)
                }
                cls => {
                    linear(&mut a.q, x, &lw.query)?;
                    linear(&mut a.k, x, &lw.key)?;
                    linear(&mut a.v, x, &lw.value)?;
                    if mode.keep_scores && a.scores.is_none() {
                        a.scores = Some(zeros(a.probs.shape(), &x.device())?);
                    }
                    let scores = a.scores.as_mut().filter(|_| mode.keep_scores);
                    a.maps = mode.keep_scores || !flash;
                    attention::attention_forward_stats(
                        &mut a.context,
                        &mut a.stats,
                        a.maps.then_some(&mut a.probs),
                        scores,
                        &a.q,
                        &a.k,
                        &a.v,
                        &batch.mask,
                        dropout,
                    )?;
                    match cls {
                        Some(rows) => {
                            embedding::embedding_forward(&mut rows.context, &batch.cls_rows, &a.context, false)?;
                            embedding::embedding_forward(&mut rows.input, &batch.cls_rows, x, false)?;
                            (&rows.context, &rows.input)
                        }
                        None => (&a.context, x),
                    }
                }
            };
            // attention output: dense, dropout, residual, LayerNorm (attention_output is scratch until the LN)
            linear(&mut a.attention_output, context, &lw.attention_output)?;
            let seed = site_seed(mode.seed, site_attention_output(l));
            let (attn_out, res) = (&a.attention_output, &mut a.attn_residual);
            dropout::dropout_residual_forward_rows(res, attn_out, x, p_hidden, seed, row_step)?;
            let ln1 = &lw.attention_layer_norm;
            layer_norm(&mut a.attention_output, &mut a.ln1_mean, &mut a.ln1_rstd, &a.attn_residual, ln1, eps)?;
            // feed-forward: dense, GELU, dense, dropout, residual, LayerNorm (out is scratch until the LN)
            let ffn_in = &lw.intermediate;
            gemm::linear_forward(&mut a.intermediate_pre, &a.attention_output, &ffn_in.weight, None)?;
            gelu::bias_gelu_forward(&mut a.intermediate, &mut a.intermediate_pre, &ffn_in.bias)?;
            linear(out, &a.intermediate, &lw.output)?;
            let seed = site_seed(mode.seed, site_ffn_output(l));
            dropout::dropout_residual_forward_rows(
                &mut a.ffn_residual,
                out,
                &a.attention_output,
                p_hidden,
                seed,
                row_step,
            )?;
            layer_norm(out, &mut a.ln2_mean, &mut a.ln2_rstd, &a.ffn_residual, &lw.output_layer_norm, eps)?;
        }

        if let (Some(pooler), Some(classifier), Some(logits)) = (&w.pooler, &w.classifier, &mut acts.logits) {
            let last = acts.hidden.last().expect("at least the embedding output");
            let cls = if acts.layers.last().is_some_and(|a| a.cls.is_some()) {
                last
            } else {
                embedding::embedding_forward(&mut acts.cls, &batch.cls_rows, last, false)?;
                &acts.cls
            };
            linear(&mut acts.pooled_pre, cls, pooler)?;
            match Family::of(cfg).head_activation() {
                HeadActivation::Tanh => gelu::tanh_forward(&mut acts.pooled, &acts.pooled_pre)?,
                HeadActivation::Gelu => gelu::gelu_forward(&mut acts.pooled, &acts.pooled_pre)?,
                HeadActivation::Relu => gelu::relu_forward(&mut acts.pooled, &acts.pooled_pre)?,
            }
            let p_cls = if mode.train { cfg.classifier_dropout() as f32 } else { 0.0 };
            dropout::dropout_forward(&mut acts.pooled_dropped, &acts.pooled, p_cls, site_seed(mode.seed, SITE_POOLER))?;
            linear(logits, &acts.pooled_dropped, classifier)?;
        }
        Ok(())
    }

    /// Backpropagates `out_grads` (filled by the losses) through the forward pass recorded in
    /// `acts`, accumulating every parameter gradient into `grads` and, when the forward took
    /// `inputs_embeds`, their gradient into `d_inputs_embeds`.
    pub fn backward(
        &self,
        grads: &mut BertWeights,
        acts: &mut Activations,
        out_grads: &OutputGrads,
        batch: &EncoderBatch,
        d_inputs_embeds: Option<&mut Tensor>,
    ) -> Result<()> {
        self.backward_encoder(grads, acts, out_grads, batch)?;
        self.backward_embeddings(grads, acts, batch, d_inputs_embeds)
    }

    /// The first half of [`Bert::backward`], mirroring [`Bert::encode`]: returns the gradient
    /// w.r.t. the embedding output `hidden[0]`, which the caller may rewrite (by the adjoint of
    /// its rewrite of `hidden[0]`) before [`Bert::backward_embeddings`] finishes.
    pub fn backward_encoder<'a>(
        &self,
        grads: &mut BertWeights,
        acts: &'a mut Activations,
        out_grads: &OutputGrads,
        batch: &EncoderBatch,
    ) -> Result<&'a mut Tensor> {
        check_batch(acts, batch)?;
        if acts.outputs == Outputs::LogitsInference {
            return Err(Error::Shape("these activations were made for inference (Outputs::LogitsInference)".into()));
        }
        let cfg = &self.config;
        let w = &self.weights;
        let mode = acts.mode;
        let p_hidden = if mode.train { cfg.hidden_dropout_prob as f32 } else { 0.0 };
        let cls_tail = acts.layers.last().is_some_and(|a| a.cls.is_some());
        if acts.scratch.is_none() {
            acts.scratch = Some(Scratch::new(cfg, acts.batch, acts.seq, cls_tail, &self.device())?);
        }
        let s = acts.scratch.as_mut().expect("made above");
        let n_layers = w.layers.len();

        // d(last hidden state): from the losses, and through the pooler and classifier.
        let dh_last = match &mut s.cls {
            Some(cls) => &mut cls.rows.dh,
            None => &mut s.rows.dh,
        };
        dh_last.fill(0.0)?;
        if let Some(extra) = &out_grads.hidden[n_layers] {
            bias::add_inplace(dh_last, extra)?;
        }
        if let (Some(pooler), Some(classifier), Some(dlogits)) = (&w.pooler, &w.classifier, &out_grads.logits) {
            let (g_pooler, g_classifier) = match (&mut grads.pooler, &mut grads.classifier) {
                (Some(p), Some(c)) => (p, c),
                _ => return Err(Error::Shape("gradient buffers lack the pooler or classifier".into())),
            };
            let p_cls = if mode.train { cfg.classifier_dropout() as f32 } else { 0.0 };
            for t in [&mut s.d_pooled_dropped, &mut s.d_pooled, &mut s.d_pooled_pre, &mut s.d_cls] {
                t.fill(0.0)?;
            }
            linear_back(Some(&mut s.d_pooled_dropped), g_classifier, dlogits, &acts.pooled_dropped, classifier)?;
            dropout::dropout_backward(&mut s.d_pooled, &s.d_pooled_dropped, p_cls, site_seed(mode.seed, SITE_POOLER))?;
            match Family::of(cfg).head_activation() {
                HeadActivation::Tanh => gelu::tanh_backward(&mut s.d_pooled_pre, &s.d_pooled, &acts.pooled)?,
                HeadActivation::Gelu => gelu::gelu_backward(&mut s.d_pooled_pre, &s.d_pooled, &acts.pooled_pre)?,
                HeadActivation::Relu => gelu::relu_backward(&mut s.d_pooled_pre, &s.d_pooled, &acts.pooled)?,
            }
            let last = acts.hidden.last().expect("at least the embedding output");
            if cls_tail {
                // The pooler's input is the last hidden state itself.
                linear_back(Some(dh_last), g_pooler, &s.d_pooled_pre, last, pooler)?;
            } else {
                linear_back(Some(&mut s.d_cls), g_pooler, &s.d_pooled_pre, &acts.cls, pooler)?;
                embedding::embedding_backward(dh_last, &s.d_cls, &batch.cls_rows)?;
            }
        }

        for l in (0..n_layers).rev() {
            let (lw, g, a, x) = (&w.layers[l], &mut grads.layers[l], &acts.layers[l], &acts.hidden[l]);
            let row_step = mask_row_step(a, acts.seq, cfg.hidden_size);
            let Scratch { rows, cls, dh_prev, d_context, dq, dk, dv, .. } = &mut *s;
            // The post-attention half's rows, and for a [CLS]-only layer its own buffers.
            let (r, cls_rows) = match (&a.cls, cls) {
                (Some(rows), Some(ClsScratch { rows: r, d_context, dq, dx })) => (r, Some((rows, d_context, dq, dx))),
                _ => (rows, None),
            };
            // r.dh is d(hidden[l + 1]); out = LN2(dropout(ffn_out) + attention_output)
            r.d_res.fill(0.0)?;
            let ln2 = &mut g.output_layer_norm;
            layernorm::layernorm_backward(
                &mut r.d_res,
                &mut ln2.weight,
                &mut ln2.bias,
                &r.dh,
                &a.ffn_residual,
                &a.ln2_mean,
                &a.ln2_rstd,
                &lw.output_layer_norm.weight,
            )?;
            r.d_a.fill(0.0)?;
            bias::add_inplace(&mut r.d_a, &r.d_res)?;
            // Dropout's backward into a fresh buffer is its forward: the same mask and scale.
            let seed = site_seed(mode.seed, site_ffn_output(l));
            dropout::dropout_forward_rows(&mut r.d_tmp, &r.d_res, p_hidden, seed, row_step)?;
            r.d_inter.fill(0.0)?;
            linear_back(Some(&mut r.d_inter), &mut g.output, &r.d_tmp, &a.intermediate, &lw.output)?;
            r.d_inter_pre.fill(0.0)?;
            gelu::gelu_backward(&mut r.d_inter_pre, &r.d_inter, &a.intermediate_pre)?;
            linear_back(Some(&mut r.d_a), &mut g.intermediate, &r.d_inter_pre, &a.attention_output, &lw.intermediate)?;
            // attention_output = LN1(dropout(attn_out) + x)
            r.d_res.fill(0.0)?;
            let ln1 = &mut g.attention_layer_norm;
            layernorm::layernorm_backward(
                &mut r.d_res,
                &mut ln1.weight,
                &mut ln1.bias,
                &r.d_a,
                &a.attn_residual,
                &a.ln1_mean,
                &a.ln1_rstd,
                &lw.attention_layer_norm.weight,
            )?;
            let seed = site_seed(mode.seed, site_attention_output(l));
            dropout::dropout_forward_rows(&mut r.d_tmp, &r.d_res, p_hidden, seed, row_step)?;
            dh_prev.fill(0.0)?;
            if let Some(extra) = &out_grads.hidden[l] {
                bias::add_inplace(dh_prev, extra)?;
            }
            let (d_scores, d_qkv) = (out_grads.scores[l].as_ref(), out_grads.qkv[l].as_ref());
            let dropout = attention_dropout(cfg, mode, l);
            let g_out = &mut g.attention_output;
            let query_only = match cls_rows {
                Some((rows, cls_dc, cls_dq, cls_dx)) => {
                    // Back from the [CLS] rows to all N: the other rows had no post-attention half.
                    embedding::embedding_backward(dh_prev, &r.d_res, &batch.cls_rows)?;
                    cls_dc.fill(0.0)?;
                    linear_back(Some(cls_dc), g_out, &r.d_tmp, &rows.context, &lw.attention_output)?;
                    if rows.query_only {
                        if d_scores.is_some() || d_qkv.is_some() {
                            return Err(Error::Shape(
                                "a logits-only layer takes no attention-score or Q/K/V gradients".into(),
                            ));
                        }
                        // Only the [CLS] queries attended: their gradient, and every key's and value's.
                        for t in [&mut *cls_dq, &mut *dk, &mut *dv] {
                            t.fill(0.0)?;
                        }
                        let (q, k, v, probs) = (&a.q, &a.k, &a.v, &a.probs);
                        cls_attention::cls_attention_backward(cls_dq, dk, dv, cls_dc, q, k, v, probs, dropout)?;
                        cls_dx.fill(0.0)?;
                        linear_back(Some(cls_dx), &mut g.query, cls_dq, &rows.input, &lw.query)?;
                        embedding::embedding_backward(dh_prev, cls_dx, &batch.cls_rows)?;
                    } else {
                        d_context.fill(0.0)?;
                        embedding::embedding_backward(d_context, cls_dc, &batch.cls_rows)?;
                    }
                    rows.query_only
                }
                None => {
                    bias::add_inplace(dh_prev, &r.d_res)?;
                    d_context.fill(0.0)?;
                    linear_back(Some(d_context), g_out, &r.d_tmp, &a.context, &lw.attention_output)?;
                    false
                }
            };
            if !query_only {
                for t in [&mut *dq, &mut *dk, &mut *dv] {
                    t.fill(0.0)?;
                }
                if a.maps {
                    attention::attention_backward(
                        dq, dk, dv, d_context, &a.q, &a.k, &a.v, &a.probs, d_scores, dropout,
                    )?;
                } else if d_scores.is_some() {
                    return Err(Error::Shape(
                        "a gradient on the attention scores needs keep_scores in the forward".into(),
                    ));
                } else {
                    let (q, k, v, out, mask) = (&a.q, &a.k, &a.v, &a.context, &batch.mask);
                    attention::attention_backward_stats(dq, dk, dv, d_context, q, k, v, out, &a.stats, mask, dropout)?;
                }
                if let Some(extra) = d_qkv {
                    for (d, e) in [&mut *dq, &mut *dk, &mut *dv].into_iter().zip(extra) {
                        bias::add_inplace(d, e)?;
                    }
                }
                linear_back(Some(dh_prev), &mut g.query, dq, x, &lw.query)?;
            }
            linear_back(Some(dh_prev), &mut g.key, dk, x, &lw.key)?;
            linear_back(Some(dh_prev), &mut g.value, dv, x, &lw.value)?;
            std::mem::swap(&mut s.rows.dh, &mut s.dh_prev);
        }
        Ok(&mut s.rows.dh)
    }

    /// The second half of [`Bert::backward`], mirroring [`Bert::embed`]: from the gradient
    /// w.r.t. `hidden[0]` that [`Bert::backward_encoder`] left, into the embedding tables (or
    /// `d_inputs_embeds`, when the forward took `inputs_embeds`).
    pub fn backward_embeddings(
        &self,
        grads: &mut BertWeights,
        acts: &mut Activations,
        batch: &EncoderBatch,
        d_inputs_embeds: Option<&mut Tensor>,
    ) -> Result<()> {
        check_batch(acts, batch)?;
        let w = &self.weights;
        let mode = acts.mode;
        let p_hidden = if mode.train { self.config.hidden_dropout_prob as f32 } else { 0.0 };
        let s =
            acts.scratch.as_mut().ok_or_else(|| Error::Shape("backward_embeddings before backward_encoder".into()))?;
        // s.rows.dh is d(hidden[0]); hidden[0] = [project](dropout(LN(word + position + token type)))
        let (ge, e) = (&mut grads.embeddings, &w.embeddings);
        let Scratch { rows, emb, .. } = s;
        let (dh, d_res, d_a) = match (emb, &e.project, &mut ge.project, &acts.emb_out) {
            (Some(s), Some(project), Some(g_project), Some(out)) => {
                s.dh.fill(0.0)?;
                linear_back(Some(&mut s.dh), g_project, &rows.dh, out, project)?;
                (&s.dh, &mut s.d_res, &mut s.d_a)
            }
            (None, None, _, _) => (&rows.dh, &mut rows.d_res, &mut rows.d_a),
            _ => return Err(Error::Shape("embeddings_project without its buffers or gradient".into())),
        };
        d_res.fill(0.0)?;
        dropout::dropout_backward(d_res, dh, p_hidden, site_seed(mode.seed, SITE_EMBEDDINGS))?;
        d_a.fill(0.0)?;
        layernorm::layernorm_backward(
            d_a,
            &mut ge.layer_norm.weight,
            &mut ge.layer_norm.bias,
            d_res,
            &acts.emb_sum,
            &acts.emb_mean,
            &acts.emb_rstd,
            &e.layer_norm.weight,
        )?;
        let positions = acts.positions.as_ref().unwrap_or(&batch.positions);
        embedding::embedding_backward(&mut ge.position_embeddings, d_a, positions)?;
        if let Some(types) = &mut ge.token_type_embeddings {
            embedding::embedding_backward(types, d_a, &batch.type_ids)?;
        }
        match (acts.used_inputs_embeds, d_inputs_embeds) {
            (true, Some(dx)) => bias::add_inplace(dx, d_a)?,
            (true, None) => {}
            (false, _) => embedding::embedding_backward(&mut ge.word_embeddings, d_a, &batch.ids)?,
        }
        Ok(())
    }
}
