//! A model folder as HF writes it: `config.json`, the weights (`model.safetensors` or shards),
//! and `tokenizer.json` or `vocab.txt`.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use kd_kernels::Device;
use kd_model::bert::Bert;
use kd_model::family::Family;
use kd_model::{BertConfig, BertWeights, Tokenizer};

pub struct ModelDir {
    pub dir: PathBuf,
    pub config: BertConfig,
    pub tokenizer: Tokenizer,
    /// The file the tokenizer was read from: `tokenizer.json`, or `vocab.txt` without one.
    pub tokenizer_file: PathBuf,
}

impl ModelDir {
    /// Reads the configuration and the tokenizer and checks that they belong together, before
    /// the weights (the large file) are read.
    pub fn open(dir: &Path) -> Result<ModelDir> {
        ensure!(dir.is_dir(), "model folder {} does not exist", dir.display());
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let tokenizer_file = tokenizer.path().to_path_buf();
        if tokenizer.vocab_size() > config.vocab_size {
            bail!(
                "{}: {} tokens, but config.json's vocab_size is {}: the tokenizer is not this model's",
                tokenizer_file.display(),
                tokenizer.vocab_size(),
                config.vocab_size
            );
        }
        if tokenizer.pad_id() != config.pad_token_id {
            bail!(
                "{}: pads with token {}, but config.json's pad_token_id is {}: the tokenizer is not this model's",
                tokenizer_file.display(),
                tokenizer.pad_id(),
                config.pad_token_id
            );
        }
        Ok(ModelDir { dir: dir.to_path_buf(), config, tokenizer, tokenizer_file })
    }

    pub fn weights(&self, device: &Device) -> Result<BertWeights> {
        Ok(BertWeights::load_dir(&self.dir, &self.config, device)?)
    }

    /// Rejects a `--max-len` the position embeddings cannot hold.
    pub fn check_max_len(&self, max_len: usize) -> Result<()> {
        let positions = self.config.max_position_embeddings;
        let tokens = Family::of(&self.config).max_tokens(&self.config);
        ensure!(
            max_len <= tokens,
            "--max-len {max_len} exceeds the {tokens} tokens the model's max_position_embeddings {positions} allows"
        );
        Ok(())
    }

    /// The model with its classification head, for evaluation and prediction.
    pub fn classifier(&self, device: &Device) -> Result<Bert> {
        let weights = self.weights(device)?;
        if weights.classifier.is_none() || weights.pooler.is_none() {
            bail!(
                "{}: no classification head (pooler and classifier); fine-tune the model first (kd-cli finetune)",
                self.dir.display()
            );
        }
        Ok(Bert::new(self.config.clone(), weights))
    }
}

/// Whether a model predicts a score (HF: `problem_type` "regression", or a single output).
pub fn is_regression(config: &BertConfig) -> bool {
    config.problem_type.as_deref() == Some("regression") || config.num_labels() == 1
}

/// The model's class names by id (`id2label`, HF's `LABEL_i` when unnamed).
pub fn label_names(config: &BertConfig) -> Vec<String> {
    match &config.id2label {
        Some(names) => names.values().cloned().collect(),
        None => (0..config.num_labels()).map(|i| format!("LABEL_{i}")).collect(),
    }
}

/// Errors unless the data asks for what the model predicts: classes or scores, and for GLUE as
/// many classes as the task has.
pub fn check_task(bert: &Bert, source: &kd_methods::task::DataSource) -> Result<()> {
    let regression = is_regression(&bert.config);
    let kind = |r: bool| if r { "regression (scores)" } else { "classification" };
    ensure!(
        regression == source.is_regression(),
        "the model does {} but the data is for {}",
        kind(regression),
        kind(source.is_regression())
    );
    if let kd_methods::task::DataSource::Glue { task, .. } = source {
        let (want, have) = (task.label_names().len(), bert.config.num_labels());
        ensure!(regression || want == have, "{} has {want} classes but the model has {have}", task.name());
    }
    Ok(())
}
