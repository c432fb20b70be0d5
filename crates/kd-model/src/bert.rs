//! The BERT encoder and its sequence-classification head, forward and backward, llm.c style:
//! every sub-layer is an explicit forward/backward pair over buffers owned by [`Activations`]
//! (sized per batch shape and reused), and no general autograd.
//!
//! Shapes: `B` examples of `L` tokens, `N = B * L` token rows, hidden width `D`, `H` heads,
//! intermediate width `I`, `C` labels. Hidden states are `[N, D]`; attention maps `[B, H, L, L]`.
//! Dropout masks are not stored: each dropout site draws from `rng::uniform(seed, element)`
//! with its own seed, so backward recomputes the same mask.

use kd_kernels::ops::attention::{self, AttentionDropout};
use kd_kernels::ops::{bias, dropout, embedding, gelu, gemm, layernorm};
use kd_kernels::rng::mix64;
use kd_kernels::{Device, IdTensor, Tensor};

use crate::config::BertConfig;
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
}

/// Everything a forward pass writes and its backward reads, for one `(B, L)`.
pub struct Activations {
    pub batch: usize,
    pub seq: usize,
    mode: ForwardMode,
    emb_sum: Tensor,
    emb_ln: Tensor,
    emb_mean: Tensor,
    emb_rstd: Tensor,
    /// `hidden[0]` is the embedding output, `hidden[l + 1]` the output of layer `l`.
    pub hidden: Vec<Tensor>,
    pub layers: Vec<LayerActivations>,
    cls: Tensor,
    pooled_pre: Tensor,
    pooled: Tensor,
    pooled_dropped: Tensor,
    /// `[B, C]` classifier outputs (absent without a classifier head).
    pub logits: Option<Tensor>,
    used_inputs_embeds: bool,
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

/// Scratch gradients of the activations, reused across steps.
struct Scratch {
    dh: Tensor,
    dh_prev: Tensor,
    d_a: Tensor,
    d_res: Tensor,
    d_tmp: Tensor,
    d_inter: Tensor,
    d_inter_pre: Tensor,
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
    fn new(config: &BertConfig, batch: usize, seq: usize, device: &Device) -> Result<Self> {
        let (n, d, i) = (batch * seq, config.hidden_size, config.intermediate_size);
        Ok(Scratch {
            dh: zeros(&[n, d], device)?,
            dh_prev: zeros(&[n, d], device)?,
            d_a: zeros(&[n, d], device)?,
            d_res: zeros(&[n, d], device)?,
            d_tmp: zeros(&[n, d], device)?,
            d_inter: zeros(&[n, i], device)?,
            d_inter_pre: zeros(&[n, i], device)?,
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
        device: &Device,
    ) -> Result<Self> {
        let (n, d, h, i) = (batch * seq, config.hidden_size, config.num_attention_heads, config.intermediate_size);
        let layer = || -> Result<LayerActivations> {
            Ok(LayerActivations {
                q: zeros(&[batch, seq, d], device)?,
                k: zeros(&[batch, seq, d], device)?,
                v: zeros(&[batch, seq, d], device)?,
                probs: zeros(&[batch, h, seq, seq], device)?,
                scores: None,
                context: zeros(&[batch, seq, d], device)?,
                stats: zeros(&[batch, h, seq, 2], device)?,
                maps: true,
                attn_residual: zeros(&[n, d], device)?,
                ln1_mean: zeros(&[n], device)?,
                ln1_rstd: zeros(&[n], device)?,
                attention_output: zeros(&[n, d], device)?,
                intermediate_pre: zeros(&[n, i], device)?,
                intermediate: zeros(&[n, i], device)?,
                ffn_residual: zeros(&[n, d], device)?,
                ln2_mean: zeros(&[n], device)?,
                ln2_rstd: zeros(&[n], device)?,
            })
        };
        Ok(Activations {
            batch,
            seq,
            mode: ForwardMode::default(),
            emb_sum: zeros(&[n, d], device)?,
            emb_ln: zeros(&[n, d], device)?,
            emb_mean: zeros(&[n], device)?,
            emb_rstd: zeros(&[n], device)?,
            hidden: (0..=config.num_hidden_layers).map(|_| zeros(&[n, d], device)).collect::<Result<_>>()?,
            layers: (0..config.num_hidden_layers).map(|_| layer()).collect::<Result<_>>()?,
            cls: zeros(&[batch, d], device)?,
            pooled_pre: zeros(&[batch, d], device)?,
            pooled: zeros(&[batch, d], device)?,
            pooled_dropped: zeros(&[batch, d], device)?,
            logits: num_labels.map(|c| zeros(&[batch, c], device)).transpose()?,
            used_inputs_embeds: false,
            scratch: None,
        })
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

    /// Buffers for a batch of `batch` examples of `seq` tokens.
    pub fn activations(&self, batch: usize, seq: usize) -> Result<Activations> {
        if seq > self.config.max_position_embeddings {
            return Err(Error::Shape(format!(
                "sequence length {seq} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        Activations::new(&self.config, self.num_labels(), batch, seq, &self.device())
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

        // Embeddings: word (or given) + position + token type, LayerNorm, dropout.
        let e = &w.embeddings;
        match inputs_embeds {
            Some(x) => {
                kd_kernels::expect_shape("bert.embeddings", "inputs_embeds", x, acts.emb_sum.shape())?;
                acts.emb_sum.fill(0.0)?;
                bias::add_inplace(&mut acts.emb_sum, x)?;
            }
            None => embedding::embedding_forward(&mut acts.emb_sum, &batch.ids, &e.word_embeddings, false)?,
        }
        embedding::embedding_forward(&mut acts.emb_sum, &batch.positions, &e.position_embeddings, true)?;
        embedding::embedding_forward(&mut acts.emb_sum, &batch.type_ids, &e.token_type_embeddings, true)?;
        layer_norm(&mut acts.emb_ln, &mut acts.emb_mean, &mut acts.emb_rstd, &acts.emb_sum, &e.layer_norm, eps)?;
        dropout::dropout_forward(&mut acts.hidden[0], &acts.emb_ln, p_hidden, site_seed(mode.seed, SITE_EMBEDDINGS))?;
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
        // The flash kernels keep no maps: they run unless a loss reads the maps.
        let flash = attention::flash_path(&self.device(), cfg.hidden_size / cfg.num_attention_heads);
        for (l, lw) in w.layers.iter().enumerate() {
            let (before, after) = acts.hidden.split_at_mut(l + 1);
            let (x, out) = (&before[l], &mut after[0]);
            let a = &mut acts.layers[l];
            // self-attention; q, k, v and the context are [B, L, D] views of [N, D] rows
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
                attention_dropout(cfg, mode, l),
            )?;
            // attention output: dense, dropout, residual, LayerNorm (attention_output is scratch until the LN)
            linear(&mut a.attention_output, &a.context, &lw.attention_output)?;
            let seed = site_seed(mode.seed, site_attention_output(l));
            dropout::dropout_forward(&mut a.attn_residual, &a.attention_output, p_hidden, seed)?;
            bias::add_inplace(&mut a.attn_residual, x)?;
            let ln1 = &lw.attention_layer_norm;
            layer_norm(&mut a.attention_output, &mut a.ln1_mean, &mut a.ln1_rstd, &a.attn_residual, ln1, eps)?;
            // feed-forward: dense, GELU, dense, dropout, residual, LayerNorm (out is scratch until the LN)
            linear(&mut a.intermediate_pre, &a.attention_output, &lw.intermediate)?;
            gelu::gelu_forward(&mut a.intermediate, &a.intermediate_pre)?;
            linear(out, &a.intermediate, &lw.output)?;
            dropout::dropout_forward(&mut a.ffn_residual, out, p_hidden, site_seed(mode.seed, site_ffn_output(l)))?;
            bias::add_inplace(&mut a.ffn_residual, &a.attention_output)?;
            layer_norm(out, &mut a.ln2_mean, &mut a.ln2_rstd, &a.ffn_residual, &lw.output_layer_norm, eps)?;
        }

        if let (Some(pooler), Some(classifier), Some(logits)) = (&w.pooler, &w.classifier, &mut acts.logits) {
            let last = acts.hidden.last().expect("at least the embedding output");
            embedding::embedding_forward(&mut acts.cls, &batch.cls_rows, last, false)?;
            linear(&mut acts.pooled_pre, &acts.cls, pooler)?;
            gelu::tanh_forward(&mut acts.pooled, &acts.pooled_pre)?;
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
        let cfg = &self.config;
        let w = &self.weights;
        let mode = acts.mode;
        let p_hidden = if mode.train { cfg.hidden_dropout_prob as f32 } else { 0.0 };
        if acts.scratch.is_none() {
            acts.scratch = Some(Scratch::new(cfg, acts.batch, acts.seq, &self.device())?);
        }
        let s = acts.scratch.as_mut().expect("made above");
        let n_layers = w.layers.len();

        // d(last hidden state): from the losses, and through the pooler and classifier.
        s.dh.fill(0.0)?;
        if let Some(extra) = &out_grads.hidden[n_layers] {
            bias::add_inplace(&mut s.dh, extra)?;
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
            gelu::tanh_backward(&mut s.d_pooled_pre, &s.d_pooled, &acts.pooled)?;
            linear_back(Some(&mut s.d_cls), g_pooler, &s.d_pooled_pre, &acts.cls, pooler)?;
            embedding::embedding_backward(&mut s.dh, &s.d_cls, &batch.cls_rows)?;
        }

        for l in (0..n_layers).rev() {
            let (lw, g, a, x) = (&w.layers[l], &mut grads.layers[l], &acts.layers[l], &acts.hidden[l]);
            // s.dh is d(hidden[l + 1]); out = LN2(dropout(ffn_out) + attention_output)
            s.d_res.fill(0.0)?;
            let ln2 = &mut g.output_layer_norm;
            layernorm::layernorm_backward(
                &mut s.d_res,
                &mut ln2.weight,
                &mut ln2.bias,
                &s.dh,
                &a.ffn_residual,
                &a.ln2_mean,
                &a.ln2_rstd,
                &lw.output_layer_norm.weight,
            )?;
            s.d_a.fill(0.0)?;
            bias::add_inplace(&mut s.d_a, &s.d_res)?;
            s.d_tmp.fill(0.0)?;
            dropout::dropout_backward(&mut s.d_tmp, &s.d_res, p_hidden, site_seed(mode.seed, site_ffn_output(l)))?;
            s.d_inter.fill(0.0)?;
            linear_back(Some(&mut s.d_inter), &mut g.output, &s.d_tmp, &a.intermediate, &lw.output)?;
            s.d_inter_pre.fill(0.0)?;
            gelu::gelu_backward(&mut s.d_inter_pre, &s.d_inter, &a.intermediate_pre)?;
            linear_back(Some(&mut s.d_a), &mut g.intermediate, &s.d_inter_pre, &a.attention_output, &lw.intermediate)?;
            // attention_output = LN1(dropout(attn_out) + x)
            s.d_res.fill(0.0)?;
            let ln1 = &mut g.attention_layer_norm;
            layernorm::layernorm_backward(
                &mut s.d_res,
                &mut ln1.weight,
                &mut ln1.bias,
                &s.d_a,
                &a.attn_residual,
                &a.ln1_mean,
                &a.ln1_rstd,
                &lw.attention_layer_norm.weight,
            )?;
            s.dh_prev.fill(0.0)?;
            bias::add_inplace(&mut s.dh_prev, &s.d_res)?;
            if let Some(extra) = &out_grads.hidden[l] {
                bias::add_inplace(&mut s.dh_prev, extra)?;
            }
            s.d_tmp.fill(0.0)?;
            dropout::dropout_backward(
                &mut s.d_tmp,
                &s.d_res,
                p_hidden,
                site_seed(mode.seed, site_attention_output(l)),
            )?;
            s.d_context.fill(0.0)?;
            linear_back(Some(&mut s.d_context), &mut g.attention_output, &s.d_tmp, &a.context, &lw.attention_output)?;
            for t in [&mut s.dq, &mut s.dk, &mut s.dv] {
                t.fill(0.0)?;
            }
            let (d_scores, dropout) = (out_grads.scores[l].as_ref(), attention_dropout(cfg, mode, l));
            if a.maps {
                let (dq, dk, dv, d_context) = (&mut s.dq, &mut s.dk, &mut s.dv, &s.d_context);
                attention::attention_backward(dq, dk, dv, d_context, &a.q, &a.k, &a.v, &a.probs, d_scores, dropout)?;
            } else if d_scores.is_some() {
                return Err(Error::Shape("a gradient on the attention scores needs keep_scores in the forward".into()));
            } else {
                let (dq, dk, dv, d_context) = (&mut s.dq, &mut s.dk, &mut s.dv, &s.d_context);
                let (q, k, v, out, mask) = (&a.q, &a.k, &a.v, &a.context, &batch.mask);
                attention::attention_backward_stats(dq, dk, dv, d_context, q, k, v, out, &a.stats, mask, dropout)?;
            }
            if let Some(extra) = &out_grads.qkv[l] {
                for (d, e) in [&mut s.dq, &mut s.dk, &mut s.dv].into_iter().zip(extra) {
                    bias::add_inplace(d, e)?;
                }
            }
            linear_back(Some(&mut s.dh_prev), &mut g.query, &s.dq, x, &lw.query)?;
            linear_back(Some(&mut s.dh_prev), &mut g.key, &s.dk, x, &lw.key)?;
            linear_back(Some(&mut s.dh_prev), &mut g.value, &s.dv, x, &lw.value)?;
            std::mem::swap(&mut s.dh, &mut s.dh_prev);
        }
        Ok(&mut s.dh)
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
        // s.dh is d(hidden[0]); hidden[0] = dropout(LN(word + position + token type))
        s.d_res.fill(0.0)?;
        dropout::dropout_backward(&mut s.d_res, &s.dh, p_hidden, site_seed(mode.seed, SITE_EMBEDDINGS))?;
        s.d_a.fill(0.0)?;
        let (ge, e) = (&mut grads.embeddings, &w.embeddings);
        layernorm::layernorm_backward(
            &mut s.d_a,
            &mut ge.layer_norm.weight,
            &mut ge.layer_norm.bias,
            &s.d_res,
            &acts.emb_sum,
            &acts.emb_mean,
            &acts.emb_rstd,
            &e.layer_norm.weight,
        )?;
        embedding::embedding_backward(&mut ge.position_embeddings, &s.d_a, &batch.positions)?;
        embedding::embedding_backward(&mut ge.token_type_embeddings, &s.d_a, &batch.type_ids)?;
        match (acts.used_inputs_embeds, d_inputs_embeds) {
            (true, Some(dx)) => bias::add_inplace(dx, &s.d_a)?,
            (true, None) => {}
            (false, _) => embedding::embedding_backward(&mut ge.word_embeddings, &s.d_a, &batch.ids)?,
        }
        Ok(())
    }
}
