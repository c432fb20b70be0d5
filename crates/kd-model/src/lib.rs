//! kd-model: a BERT encoder built on kd-kernels.
//!
//! This layer reads and writes HF checkpoints: [`BertConfig`] from `config.json`,
//! [`BertWeights`] from `model.safetensors` (structs that mirror HF's module names), and
//! [`Tokenizer`] over the checkpoint's `tokenizer.json`.
pub mod bert;
pub mod config;
pub mod error;
pub mod family;
pub mod folder;
pub mod mlm;
pub mod optim;
pub mod testing;
pub mod tokenizer;
pub mod weights;
mod wordpiece;

pub use config::BertConfig;
pub use error::{Error, Result};
pub use tokenizer::{Batch, Tokenizer};
pub use weights::{save_pretrained, BertWeights, Embeddings, Layer, LayerNorm, Linear, MlmHead};
