//! A model folder as HF writes it: `config.json`, the weights (`model.safetensors` or shards),
//! and `tokenizer.json` or `vocab.txt`.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use kd_kernels::Device;
use kd_methods::task::fixed_names;
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
        // The data's class ids are the task's: a model that numbers the classes otherwise would
        // be scored against the wrong labels. (Unnamed LABEL_i classes stand for the ids.)
        let model = fixed_names(&label_names(&bert.config));
        let same = model.iter().zip(task.label_names()).all(|(m, t)| m.trim().eq_ignore_ascii_case(t));
        if !regression && !same {
            let show = |names: &[&str]| names.iter().enumerate().map(|(i, n)| format!("{i} {n}")).collect::<Vec<_>>();
            let model: Vec<&str> = model.iter().map(String::as_str).collect();
            bail!(
                "the model's classes (id2label: {}) are not {}'s ({}): its predictions would be scored against \
                 other labels",
                show(&model).join(", "),
                task.name(),
                show(task.label_names()).join(", ")
            );
        }
    }
    Ok(())
}

/// Errors unless two model folders' tokenizers give every token the same id: a student (or
/// generator) with another vocabulary, even one of the same size, would read the teacher's
/// token ids as other words.
pub fn same_vocabulary(teacher: &ModelDir, other: &ModelDir, role: &str) -> Result<()> {
    let (t, o) = (teacher.tokenizer.vocab(), other.tokenizer.vocab());
    if t == o {
        return Ok(());
    }
    let mut differences: Vec<(u32, &String)> =
        t.iter().filter(|(token, id)| o.get(*token) != Some(id)).map(|(token, &id)| (id, token)).collect();
    differences.sort();
    let first = match differences.first() {
        Some(&(id, token)) => match o.get(token) {
            Some(other_id) => format!("'{token}' is token {id} of the teacher's but {other_id} of the {role}'s"),
            None => format!("the teacher's token {id} '{token}' is not in the {role}'s"),
        },
        None => format!("the {role}'s has {} tokens the teacher's lacks", o.len() - t.len()),
    };
    bail!(
        "the {role} {} does not share the teacher's vocabulary ({} tokens, {} differ; {first}): it would read the \
         teacher's token ids as other tokens",
        other.tokenizer_file.display(),
        t.len(),
        differences.len().max(o.len().saturating_sub(t.len()))
    )
}
