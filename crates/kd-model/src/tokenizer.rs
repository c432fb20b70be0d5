//! Tokenization through the `tokenizers` crate and a checkpoint's `tokenizer.json`.
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tokenizers::{PostProcessor, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::{Error, Result};

/// A padded batch, row-major `[batch, seq]`, ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// 1.0 for a real token, 0.0 for padding.
    pub mask: Vec<f32>,
    pub batch: usize,
    pub seq: usize,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pad_id: u32,
    pad_type_id: u32,
}

impl Tokenizer {
    /// Loads `tokenizer.json`. The padding and truncation it may bake in (the MiniLM files pad
    /// every input to 128) are switched off: [`encode_batch`](Self::encode_batch) sets both per
    /// call. The pad id is the file's padding id, else the id of `[PAD]` (BERT) or `<pad>` (RoBERTa).
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::file(path, e))?;
        Self::wrap(inner, path)
    }

    /// The tokenizer of a model folder: its `tokenizer.json`, else a BERT WordPiece tokenizer
    /// built from its `vocab.txt` (and `tokenizer_config.json`).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json);
        }
        let vocab = dir.join("vocab.txt");
        if vocab.is_file() {
            return Self::wrap(crate::wordpiece::from_vocab(&vocab)?, &vocab);
        }
        Err(Error::file(dir, "no tokenizer: neither tokenizer.json nor vocab.txt"))
    }

    fn wrap(mut inner: tokenizers::Tokenizer, path: &Path) -> Result<Tokenizer> {
        let (pad_id, pad_type_id) = match inner.get_padding() {
            Some(p) => (p.pad_id, p.pad_type_id),
            None => {
                let id = ["[PAD]", "<pad>"].iter().find_map(|t| inner.token_to_id(t));
                (
                    id.ok_or_else(|| {
                        Error::file(path, "no padding token: neither padding settings nor [PAD] or <pad>")
                    })?,
                    0,
                )
            }
        };
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::file(path, e))?;
        Ok(Tokenizer { inner, path: path.to_path_buf(), pad_id, pad_type_id })
    }

    /// The file the tokenizer was read from (`tokenizer.json` or `vocab.txt`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ids of the special tokens (BERT: `[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`), in
    /// increasing order, for callers that draw token ids at random and must avoid them.
    pub fn special_ids(&self) -> Vec<u32> {
        let added = self.inner.get_added_tokens_decoder();
        let mut ids: Vec<u32> = added.iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        ids.sort_unstable();
        ids
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Every token and its id, added (special) tokens included.
    pub fn vocab(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    /// Encodes texts and optional pair texts with the special tokens, each truncated to at most
    /// `max_len` tokens (longest sequence first for pairs, as HF's default), and pads the batch
    /// on the right to its longest row.
    pub fn encode_batch(&self, inputs: &[(&str, Option<&str>)], max_len: usize) -> Result<Batch> {
        if inputs.is_empty() {
            return Err(Error::Invalid("encode_batch: empty batch".into()));
        }
        let rows: Vec<tokenizers::Encoding> =
            inputs.par_iter().map(|&(text, pair)| self.encode_one(text, pair, max_len)).collect::<Result<_>>()?;
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let n = inputs.len() * seq;
        let mut batch = Batch {
            ids: Vec::with_capacity(n),
            type_ids: Vec::with_capacity(n),
            mask: Vec::with_capacity(n),
            batch: inputs.len(),
            seq,
        };
        for row in &rows {
            let pad = seq - row.len();
            batch.ids.extend(row.get_ids().iter().copied().chain(std::iter::repeat_n(self.pad_id, pad)));
            batch.type_ids.extend(row.get_type_ids().iter().copied().chain(std::iter::repeat_n(self.pad_type_id, pad)));
            batch.mask.extend(std::iter::repeat_n(1.0, row.len()).chain(std::iter::repeat_n(0.0, pad)));
        }
        Ok(batch)
    }

    /// The pipeline of `tokenizers`' own `encode` with the truncation length given per call
    /// (its truncation is a setting of the tokenizer, which `&self` cannot change): encode each
    /// text bare, truncate leaving room for the special tokens, then add them.
    fn encode_one(&self, text: &str, pair: Option<&str>, max_len: usize) -> Result<tokenizers::Encoding> {
        let fail = |e: tokenizers::Error| Error::file(&self.path, format!("encoding {text:?}: {e}"));
        let special = self.inner.get_post_processor().map_or(0, |p| p.added_tokens(pair.is_some()));
        if max_len <= special {
            return Err(Error::Invalid(format!(
                "max_len {max_len} leaves no room for text beside the {special} special tokens"
            )));
        }
        let first = self.inner.encode(text, false).map_err(fail)?;
        let second = pair.map(|p| self.inner.encode(p, false)).transpose().map_err(fail)?;
        let params = TruncationParams {
            max_length: max_len - special,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        };
        let (first, second) = tokenizers::truncate_encodings(first, second, &params).map_err(fail)?;
        self.inner.post_process(first, second, true).map_err(fail)
    }
}
