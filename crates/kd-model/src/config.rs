//! The model configuration, read from and written to HF `config.json`.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::family::Family;
use crate::{Error, Result};

/// A BERT configuration as HF `BertConfig` writes it. Keys kd does not use are kept in `extra`
/// and written back on save, so a round trip through kd loses nothing `transformers` needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Label names by class id; HF writes the ids as strings, parsed here (serde's flatten
    /// buffering defeats serde_json's own integer-key support).
    #[serde(default, deserialize_with = "id_keyed", skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<usize, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem_type: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

// HF BertConfig's defaults, for the keys a hand-written config.json may leave out.
fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}

fn id_keyed<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<BTreeMap<usize, String>>, D::Error> {
    let Some(raw) = Option::<BTreeMap<String, String>>::deserialize(d)? else { return Ok(None) };
    raw.into_iter()
        .map(|(k, v)| match k.parse() {
            Ok(id) => Ok((id, v)),
            Err(_) => Err(serde::de::Error::custom(format!("id2label key '{k}' is not a class id"))),
        })
        .collect::<std::result::Result<_, _>>()
        .map(Some)
}

/// The `model_type`s kd runs; a config without one is taken as BERT.
pub const MODEL_TYPES: [&str; 4] = ["bert", "roberta", "electra", "distilbert"];

fn check_model_type(model_type: Option<&Value>) -> Result<()> {
    match model_type {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if MODEL_TYPES.contains(&s.as_str()) => Ok(()),
        Some(v) => Err(Error::Config(format!("model_type {v} is not supported (kd runs {})", MODEL_TYPES.join(", ")))),
    }
}

const PROBLEM_TYPES: [&str; 3] = ["regression", "single_label_classification", "multi_label_classification"];

impl BertConfig {
    /// Reads and validates `config.json`; a `num_labels` key (hand-written configs) becomes
    /// default label names when none are given, as in HF.
    pub fn from_file(path: &Path) -> Result<BertConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let mut value: Value = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not JSON: {e}")))?;
        // Another family's config lacks BERT's keys: its model type is the useful complaint.
        check_model_type(value.get("model_type")).map_err(|e| Error::file(path, e))?;
        if let Value::Object(map) = &mut value {
            Family::config_to_bert(map).map_err(|e| Error::file(path, e))?;
        }
        let mut config: BertConfig =
            serde_json::from_value(value).map_err(|e| Error::file(path, format!("not a BERT config.json: {e}")))?;
        if let Some(n) = config.extra.remove("num_labels") {
            let n = n.as_u64().ok_or_else(|| Error::file(path, format!("num_labels {n} is not a count")))? as usize;
            let named = config.id2label.as_ref().map(BTreeMap::len).or(config.label2id.as_ref().map(BTreeMap::len));
            match named {
                None => config.set_num_labels(n),
                Some(len) if len != n => {
                    return Err(Error::file(path, format!("num_labels {n} disagrees with the {len} labels named")))
                }
                Some(_) => {}
            }
        }
        config.complete_labels().and_then(|()| config.validate()).map_err(|e| Error::file(path, e))?;
        Ok(config)
    }

    /// Writes `config.json` (keys sorted, as HF does) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        kd_kernels::io::write_atomic(path, self.to_json(path)?.as_bytes())?;
        Ok(())
    }

    /// The text of `config.json` (keys sorted); `path` names the file in errors.
    pub fn to_json(&self, path: &Path) -> Result<String> {
        self.validate()?;
        let mut value = serde_json::to_value(self).map_err(|e| Error::file(path, e))?;
        if let Value::Object(map) = &mut value {
            Family::of(self).config_from_bert(map);
        }
        let mut text = serde_json::to_string_pretty(&value).map_err(|e| Error::file(path, e))?;
        text.push('\n');
        Ok(text)
    }

    /// HF's `classifier_dropout`, falling back to the hidden dropout when unset or null.
    pub fn classifier_dropout(&self) -> f64 {
        self.extra.get("classifier_dropout").and_then(|v| v.as_f64()).unwrap_or(self.hidden_dropout_prob)
    }

    /// ELECTRA's `embedding_size`: the width of the embedding tables, projected to
    /// `hidden_size` by `embeddings_project` when it differs; `hidden_size` for other models.
    pub fn embedding_size(&self) -> usize {
        self.extra.get("embedding_size").and_then(Value::as_u64).map_or(self.hidden_size, |e| e as usize)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The number of classifier outputs: the size of `id2label`, else HF's default of 2.
    pub fn num_labels(&self) -> usize {
        self.id2label.as_ref().map_or(2, BTreeMap::len)
    }

    /// Sets `n` classes, keeping the label names when the count is unchanged and naming them
    /// `LABEL_i` (HF's convention) otherwise.
    pub fn set_num_labels(&mut self, n: usize) {
        if self.id2label.as_ref().is_none_or(|m| m.len() != n) {
            self.set_labels((0..n).map(|i| format!("LABEL_{i}")).collect());
        }
    }

    /// Names the classes, id `i` being `names[i]`.
    pub fn set_labels(&mut self, names: Vec<String>) {
        self.label2id = Some(names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect());
        self.id2label = Some(names.into_iter().enumerate().collect());
    }

    /// Fills whichever of `id2label` and `label2id` is absent from the other.
    fn complete_labels(&mut self) -> Result<()> {
        match (&self.id2label, &self.label2id) {
            (Some(ids), None) => self.label2id = Some(ids.iter().map(|(&i, n)| (n.clone(), i)).collect()),
            (None, Some(names)) => self.id2label = Some(names.iter().map(|(n, &i)| (i, n.clone())).collect()),
            _ => {}
        }
        self.validate_labels()
    }

    fn validate_labels(&self) -> Result<()> {
        let (Some(ids), Some(names)) = (&self.id2label, &self.label2id) else {
            return Ok(());
        };
        if ids.is_empty() {
            return Err(Error::Config("id2label is empty".into()));
        }
        if let Some((&last, _)) = ids.last_key_value().filter(|(&last, _)| last + 1 != ids.len()) {
            return Err(Error::Config(format!("id2label has {} labels but ids up to {last}", ids.len())));
        }
        let inverse = names.len() == ids.len() && ids.iter().all(|(i, n)| names.get(n) == Some(i));
        if !inverse {
            return Err(Error::Config(format!("label2id {names:?} does not match id2label {ids:?}")));
        }
        Ok(())
    }

    /// Rejects configurations that kd would run wrongly rather than refuse.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(msg));
        // Errors name the keys of the config.json the user has (DistilBERT's `dim`, not `hidden_size`).
        let key = |bert: &'static str| Family::of(self).config_key(bert);
        if self.hidden_act != "gelu" {
            return fail(format!(
                "{} '{}' is not supported (only 'gelu', the exact erf GELU)",
                key("hidden_act"),
                self.hidden_act
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return fail(format!("{} is 0", key(name)));
            }
        }
        match (Family::of(self).has_token_types(), self.type_vocab_size) {
            (true, 0) => return fail("type_vocab_size is 0".into()),
            (false, n) if n != 0 => {
                return fail(format!("type_vocab_size is {n}, but this model_type has no token type embeddings"))
            }
            _ => {}
        }
        if self.head_dim() * self.num_attention_heads != self.hidden_size {
            return fail(format!(
                "{} {} is not divisible by {} {}",
                key("hidden_size"),
                self.hidden_size,
                key("num_attention_heads"),
                self.num_attention_heads
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return fail(format!("{} {p} is outside [0, 1)", key(name)));
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return fail(format!("layer_norm_eps {} is not a positive number", self.layer_norm_eps));
        }
        if !(self.initializer_range >= 0.0 && self.initializer_range.is_finite()) {
            return fail(format!("initializer_range {} is not a non-negative number", self.initializer_range));
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return fail(format!(
                "pad_token_id {} is outside the vocabulary of {}",
                self.pad_token_id, self.vocab_size
            ));
        }
        if let Some(p) = self.problem_type.as_deref().filter(|p| !PROBLEM_TYPES.contains(p)) {
            return fail(format!("problem_type '{p}' is not one of {PROBLEM_TYPES:?}"));
        }
        check_model_type(self.extra.get("model_type"))?;
        match self.extra.get("position_embedding_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "absolute" => {}
            Some(v) => return fail(format!("position_embedding_type {v} is not supported (only \"absolute\")")),
        }
        for key in ["is_decoder", "add_cross_attention"] {
            if self.extra.get(key) == Some(&Value::Bool(true)) {
                return fail(format!("{key} is true; kd runs bidirectional encoders only"));
            }
        }
        self.validate_labels()
    }
}
