//! The masked-LM head of `BertForMaskedLM` (HF `BertLMPredictionHead`), forward and backward in
//! the llm.c style of [`crate::bert`]:
//!
//! ```text
//! x      = hidden[rows]                       gather the P selected rows of the encoder output [N, D]
//! h      = LayerNorm(gelu(x W_t^T + b_t))     the "transform" [P, D]
//! logits = h W_E^T + bias                     decoder tied to the word embeddings W_E [V, D] -> [P, V]
//! ```
//!
//! Only the selected rows (the masked positions) get logits: a vocabulary-wide row costs V * D
//! per token, and an MLM loss or MATE-KD's generator needs it nowhere else.

use kd_kernels::ops::{bias, embedding, gelu, gemm, layernorm};
use kd_kernels::{Device, IdTensor, Tensor};

use crate::bert::{Activations, Bert, OutputGrads};
use crate::optim::Params;
use crate::weights::{BertWeights, LayerNorm, Linear, MlmHead, MLM_BIAS, MLM_LAYER_NORM, MLM_TRANSFORM};
use crate::{Error, Result};

/// The head's forward buffers for `P` selected rows, kept for its backward.
pub struct MlmActivations {
    /// The selected rows of the encoder's `[N, D]` output, `[P]`.
    pub rows: IdTensor,
    x: Tensor,
    pre: Tensor,
    act: Tensor,
    mean: Tensor,
    rstd: Tensor,
    h: Tensor,
    /// `[P, V]` scores over the vocabulary.
    pub logits: Tensor,
    /// `[P, V]` gradient of the loss w.r.t. `logits`; losses accumulate into it before the backward.
    pub dlogits: Tensor,
    d_h: Tensor,
    d_act: Tensor,
    d_pre: Tensor,
    d_x: Tensor,
}

impl MlmActivations {
    /// Buffers for the rows `rows` of a `[N, hidden]` encoder output, over a vocabulary of `vocab`.
    pub fn new(rows: &[u32], hidden: usize, vocab: usize, device: &Device) -> Result<Self> {
        let p = rows.len();
        let z = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::zeros(shape, device)?) };
        Ok(MlmActivations {
            rows: IdTensor::from_vec(rows.to_vec(), &[p], device)?,
            x: z(&[p, hidden])?,
            pre: z(&[p, hidden])?,
            act: z(&[p, hidden])?,
            mean: z(&[p])?,
            rstd: z(&[p])?,
            h: z(&[p, hidden])?,
            logits: z(&[p, vocab])?,
            dlogits: z(&[p, vocab])?,
            d_h: z(&[p, hidden])?,
            d_act: z(&[p, hidden])?,
            d_pre: z(&[p, hidden])?,
            d_x: z(&[p, hidden])?,
        })
    }

    /// Number of selected rows (P).
    pub fn len(&self) -> usize {
        self.rows.numel()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MlmHead {
    /// Runs the head on the selected rows of `hidden` (`[N, D]`), writing `acts.logits`.
    pub fn forward(
        &self,
        acts: &mut MlmActivations,
        hidden: &Tensor,
        word_embeddings: &Tensor,
        eps: f32,
    ) -> Result<()> {
        embedding::embedding_forward(&mut acts.x, &acts.rows, hidden, false)?;
        gemm::linear_forward(&mut acts.pre, &acts.x, &self.transform.weight, None)?;
        gelu::bias_gelu_forward(&mut acts.act, &mut acts.pre, &self.transform.bias)?;
        let ln = &self.layer_norm;
        layernorm::layernorm_forward(
            &mut acts.h,
            &mut acts.mean,
            &mut acts.rstd,
            &acts.act,
            &ln.weight,
            &ln.bias,
            eps,
        )?;
        gemm::linear_forward(&mut acts.logits, &acts.h, word_embeddings, Some(&self.bias))?;
        Ok(())
    }

    /// Backpropagates `acts.dlogits`, accumulating into the head's gradients `grads`, into the
    /// tied decoder's gradient `d_word_embeddings` (skipped when `None`: a frozen embedding
    /// table, which also saves the `[V, P] x [P, D]` product) and into the selected rows of
    /// `d_hidden` (`[N, D]`; skipped when `None`: a frozen encoder).
    pub fn backward(
        &self,
        grads: &mut MlmHead,
        d_word_embeddings: Option<&mut Tensor>,
        d_hidden: Option<&mut Tensor>,
        acts: &mut MlmActivations,
        word_embeddings: &Tensor,
    ) -> Result<()> {
        let a = acts;
        a.d_h.fill(0.0)?;
        match d_word_embeddings {
            Some(dw) => {
                gemm::linear_backward(Some(&mut a.d_h), dw, Some(&mut grads.bias), &a.dlogits, &a.h, word_embeddings)?
            }
            None => {
                let spec = gemm::MatmulSpec::NN.accumulate();
                gemm::matmul(&mut a.d_h, &a.dlogits, word_embeddings, spec)?;
                bias::bias_backward(&mut grads.bias, &a.dlogits)?;
            }
        }
        a.d_act.fill(0.0)?;
        let g_ln = &mut grads.layer_norm;
        layernorm::layernorm_backward(
            &mut a.d_act,
            &mut g_ln.weight,
            &mut g_ln.bias,
            &a.d_h,
            &a.act,
            &a.mean,
            &a.rstd,
            &self.layer_norm.weight,
        )?;
        a.d_pre.fill(0.0)?;
        gelu::gelu_backward(&mut a.d_pre, &a.d_act, &a.pre)?;
        let g_t = &mut grads.transform;
        match d_hidden {
            Some(dh) => {
                a.d_x.fill(0.0)?;
                gemm::linear_backward(
                    Some(&mut a.d_x),
                    &mut g_t.weight,
                    Some(&mut g_t.bias),
                    &a.d_pre,
                    &a.x,
                    &self.transform.weight,
                )?;
                embedding::embedding_backward(dh, &a.d_x, &a.rows)?;
            }
            None => gemm::linear_backward(
                None,
                &mut g_t.weight,
                Some(&mut g_t.bias),
                &a.d_pre,
                &a.x,
                &self.transform.weight,
            )?,
        }
        Ok(())
    }
}

impl Params for MlmHead {
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        vec![
            (format!("{MLM_TRANSFORM}.weight"), &mut self.transform.weight),
            (format!("{MLM_TRANSFORM}.bias"), &mut self.transform.bias),
            (format!("{MLM_LAYER_NORM}.weight"), &mut self.layer_norm.weight),
            (format!("{MLM_LAYER_NORM}.bias"), &mut self.layer_norm.bias),
            (MLM_BIAS.to_string(), &mut self.bias),
        ]
    }

    fn zeros_like(&self) -> Result<Self> {
        let z = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::zeros(t.shape(), &t.device())?) };
        let pair = |w: &Tensor, b: &Tensor| -> Result<(Tensor, Tensor)> { Ok((z(w)?, z(b)?)) };
        let (tw, tb) = pair(&self.transform.weight, &self.transform.bias)?;
        let (lw, lb) = pair(&self.layer_norm.weight, &self.layer_norm.bias)?;
        Ok(MlmHead {
            transform: Linear { weight: tw, bias: tb },
            layer_norm: LayerNorm { weight: lw, bias: lb },
            bias: z(&self.bias)?,
        })
    }
}

fn head(weights: &BertWeights) -> Result<&MlmHead> {
    weights.mlm_head.as_ref().ok_or_else(|| Error::Invalid("the model has no MLM head (cls.predictions.*)".into()))
}

impl Bert {
    /// MLM buffers for the rows `rows` of this model's `[N, D]` hidden states.
    pub fn mlm_activations(&self, rows: &[u32]) -> Result<MlmActivations> {
        MlmActivations::new(rows, self.config.hidden_size, self.config.vocab_size, &self.device())
    }

    /// The MLM logits of the selected rows of the encoder output recorded in `acts`.
    pub fn mlm_forward(&self, mlm: &mut MlmActivations, acts: &Activations) -> Result<()> {
        let last = acts.hidden.last().expect("at least the embedding output");
        let eps = self.config.layer_norm_eps as f32;
        head(&self.weights)?.forward(mlm, last, &self.weights.embeddings.word_embeddings, eps)
    }

    /// Backpropagates `mlm.dlogits` into `grads` (the head, and the word embeddings through the
    /// tied decoder) and into the gradient of the last hidden state in `out_grads`, which
    /// [`Bert::backward`] then carries through the encoder.
    pub fn mlm_backward(
        &self,
        grads: &mut BertWeights,
        mlm: &mut MlmActivations,
        acts: &Activations,
        out_grads: &mut OutputGrads,
    ) -> Result<()> {
        let last = acts.hidden.last().expect("at least the embedding output");
        let g_head =
            grads.mlm_head.as_mut().ok_or_else(|| Error::Invalid("gradient buffers lack the MLM head".into()))?;
        let d_hidden = out_grads.hidden_mut(acts.hidden.len() - 1, last)?;
        let dw = &mut grads.embeddings.word_embeddings;
        head(&self.weights)?.backward(g_head, Some(dw), Some(d_hidden), mlm, &self.weights.embeddings.word_embeddings)
    }
}
