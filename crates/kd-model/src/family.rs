//! The encoder families kd runs: BERT's computation under each family's own tensor names and
//! position ids, read off `config.json`'s `model_type`. RoBERTa is BERT with its encoder under
//! `roberta.`, positions counted from `pad_token_id + 1`, and the pooler + classifier head named
//! `classifier.dense` / `classifier.out_proj`. ELECTRA (the discriminator) is BERT under
//! `electra.`, with `embeddings_project` when `embedding_size` differs from `hidden_size`, and
//! the same head names as RoBERTa's with GELU in place of tanh. DistilBERT is BERT without token
//! type embeddings, under `distilbert.` with its own names inside each layer and its own
//! config keys, and a `pre_classifier` + ReLU + `classifier` head on the first token.
use serde_json::{Map, Value};

use crate::{BertConfig, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Bert,
    Roberta,
    Electra,
    Distilbert,
}

/// The activation between the head's two dense layers ([CLS] -> dense -> activation -> out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadActivation {
    Tanh,
    Gelu,
    Relu,
}

/// (kd's BERT name prefix, the family's), first match wins in both directions: longer
/// prefixes come first.
const ROBERTA_NAMES: [(&str, &str); 7] = [
    ("bert.pooler.dense.", "classifier.dense."),
    ("classifier.", "classifier.out_proj."),
    ("cls.predictions.transform.dense.", "lm_head.dense."),
    ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
    ("cls.predictions.decoder.", "lm_head.decoder."),
    ("cls.predictions.bias", "lm_head.bias"),
    ("bert.", "roberta."),
];

const ELECTRA_NAMES: [(&str, &str); 3] =
    [("bert.pooler.dense.", "classifier.dense."), ("classifier.", "classifier.out_proj."), ("bert.", "electra.")];

/// The last rule reads a bare `DistilBertModel` file (sentence-transformers' DistilBERTs), whose
/// layers are under `transformer.layer.`; writing never reaches it.
const DISTILBERT_NAMES: [(&str, &str); 8] = [
    ("bert.pooler.dense.", "pre_classifier."),
    ("cls.predictions.transform.dense.", "vocab_transform."),
    ("cls.predictions.transform.LayerNorm.", "vocab_layer_norm."),
    ("cls.predictions.decoder.", "vocab_projector."),
    ("cls.predictions.bias", "vocab_projector.bias"),
    ("bert.encoder.layer.", "distilbert.transformer.layer."),
    ("bert.", "distilbert."),
    ("bert.encoder.layer.", "transformer.layer."),
];

/// DistilBERT's names inside layer N (after `...layer.N.`), as [`DISTILBERT_NAMES`].
const DISTILBERT_LAYER_NAMES: [(&str, &str); 8] = [
    ("attention.self.query.", "attention.q_lin."),
    ("attention.self.key.", "attention.k_lin."),
    ("attention.self.value.", "attention.v_lin."),
    ("attention.output.dense.", "attention.out_lin."),
    ("attention.output.LayerNorm.", "sa_layer_norm."),
    ("intermediate.dense.", "ffn.lin1."),
    ("output.dense.", "ffn.lin2."),
    ("output.LayerNorm.", "output_layer_norm."),
];

/// (BERT's config key, DistilBERT's, `DistilBertConfig`'s default for a config that omits it).
const DISTILBERT_SIZE_KEYS: [(&str, &str, u64); 4] = [
    ("hidden_size", "dim", 768),
    ("num_hidden_layers", "n_layers", 6),
    ("num_attention_heads", "n_heads", 12),
    ("intermediate_size", "hidden_dim", 3072),
];
const DISTILBERT_DROPOUT_KEYS: [(&str, &str, f64); 3] = [
    ("hidden_dropout_prob", "dropout", 0.1),
    ("attention_probs_dropout_prob", "attention_dropout", 0.1),
    ("classifier_dropout", "seq_classif_dropout", 0.2),
];
const DISTILBERT_ACTIVATION: (&str, &str, &str) = ("hidden_act", "activation", "gelu");

/// DistilBERT's renamed config keys: (BERT's, DistilBERT's, default).
fn distilbert_config_keys() -> impl Iterator<Item = (&'static str, &'static str, Value)> {
    let sizes = DISTILBERT_SIZE_KEYS.into_iter().map(|(b, o, d)| (b, o, Value::from(d)));
    let dropouts = DISTILBERT_DROPOUT_KEYS.into_iter().map(|(b, o, d)| (b, o, Value::from(d)));
    let (b, o, d) = DISTILBERT_ACTIVATION;
    sizes.chain(dropouts).chain(std::iter::once((b, o, Value::from(d))))
}

/// BERT's config keys that DistilBERT has no counterpart of: it has no token types, and its
/// LayerNorm epsilon is fixed at BERT's default of 1e-12.
const DISTILBERT_LACKS: [&str; 2] = ["type_vocab_size", "layer_norm_eps"];

impl Family {
    /// The family of `config` (a config without `model_type` is BERT's).
    pub fn of(config: &BertConfig) -> Family {
        Family::of_model_type(config.extra.get("model_type"))
    }

    fn of_model_type(model_type: Option<&Value>) -> Family {
        match model_type.and_then(Value::as_str) {
            Some("roberta") => Family::Roberta,
            Some("electra") => Family::Electra,
            Some("distilbert") => Family::Distilbert,
            _ => Family::Bert,
        }
    }

    fn names(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::Bert => &[],
            Family::Roberta => &ROBERTA_NAMES,
            Family::Electra => &ELECTRA_NAMES,
            Family::Distilbert => &DISTILBERT_NAMES,
        }
    }

    fn layer_names(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::Distilbert => &DISTILBERT_LAYER_NAMES,
            Family::Bert | Family::Roberta | Family::Electra => &[],
        }
    }

    /// The name of kd's tensor `canonical` in the family's files.
    pub fn file_name(self, canonical: &str) -> String {
        let name = rename(canonical, self.names().iter().map(|&(bert, own)| (bert, own)));
        let layer_prefix = rename(LAYER, self.names().iter().map(|&(bert, own)| (bert, own)));
        rename_in_layer(&name, &layer_prefix, self.layer_names().iter().map(|&(bert, own)| (bert, own)))
    }

    /// kd's name for the family's tensor `name`; `None` for tensors the family's sequence
    /// classifier does not use (RoBERTa's pooler, the replaced-token head of an ELECTRA
    /// discriminator checkpoint).
    pub fn canonical_name(self, name: &str) -> Option<String> {
        let unused = match self {
            Family::Bert => None,
            Family::Roberta => Some("roberta.pooler."),
            Family::Electra => Some("discriminator_predictions."),
            Family::Distilbert => None,
        };
        if unused.is_some_and(|prefix| name.starts_with(prefix)) {
            return None;
        }
        let name = rename(name, self.names().iter().map(|&(bert, own)| (own, bert)));
        Some(rename_in_layer(&name, LAYER, self.layer_names().iter().map(|&(bert, own)| (own, bert))))
    }

    /// The family's `config.json` key for BERT's key `bert` (which kd's [`BertConfig`] uses).
    pub fn config_key(self, bert: &'static str) -> &'static str {
        match self {
            Family::Distilbert => distilbert_config_keys().find(|&(b, _, _)| b == bert).map_or(bert, |(_, own, _)| own),
            Family::Bert | Family::Roberta | Family::Electra => bert,
        }
    }

    /// Whether the family's embeddings add token type embeddings (DistilBERT's do not).
    pub fn has_token_types(self) -> bool {
        self != Family::Distilbert
    }

    /// Rewrites a `config.json` object of the family in BERT's keys, which [`BertConfig`] reads.
    /// DistilBERT's keys are renamed (its defaults filled in where absent) and it gets
    /// `type_vocab_size` 0: no token type embeddings.
    pub(crate) fn config_to_bert(config: &mut Map<String, Value>) -> Result<()> {
        if Family::of_model_type(config.get("model_type")) != Family::Distilbert {
            return Ok(());
        }
        // HF fills the position table with fixed sines that are never trained; kd would train it.
        if config.get("sinusoidal_pos_embds") == Some(&Value::Bool(true)) {
            return Err(Error::Config(
                "sinusoidal_pos_embds is true: kd trains learned DistilBERT position embeddings only".into(),
            ));
        }
        for (bert, own, default) in distilbert_config_keys() {
            let value = config.remove(own).unwrap_or(default);
            config.insert(bert.into(), value);
        }
        config.insert("type_vocab_size".into(), 0.into());
        Ok(())
    }

    /// The inverse of [`Family::config_to_bert`], for writing `config.json` in the family's keys.
    pub(crate) fn config_from_bert(self, config: &mut Map<String, Value>) {
        if self != Family::Distilbert {
            return;
        }
        for (bert, own, _) in distilbert_config_keys() {
            if let Some(value) = config.remove(bert) {
                config.insert(own.into(), value);
            }
        }
        for key in DISTILBERT_LACKS {
            config.remove(key);
        }
    }

    /// The prefix of `transformers`' class names for the family (`Bert`, `Roberta`).
    pub fn class_prefix(self) -> &'static str {
        match self {
            Family::Bert => "Bert",
            Family::Roberta => "Roberta",
            Family::Electra => "Electra",
            Family::Distilbert => "DistilBert",
        }
    }

    pub fn head_activation(self) -> HeadActivation {
        match self {
            Family::Bert | Family::Roberta => HeadActivation::Tanh,
            Family::Electra => HeadActivation::Gelu,
            Family::Distilbert => HeadActivation::Relu,
        }
    }

    /// The position id of a sequence's first token; padding tokens take `pad_token_id`
    /// (RoBERTa's numbering). `None` for BERT, whose positions are simply 0, 1, 2, ...
    pub fn first_position(self, config: &BertConfig) -> Option<u32> {
        match self {
            Family::Bert | Family::Electra | Family::Distilbert => None,
            Family::Roberta => Some(config.pad_token_id + 1),
        }
    }

    /// The most tokens a sequence may have: RoBERTa spends `pad_token_id + 1` position rows
    /// before the first token.
    pub fn max_tokens(self, config: &BertConfig) -> usize {
        let first = self.first_position(config).unwrap_or(0) as usize;
        config.max_position_embeddings.saturating_sub(first)
    }
}

/// kd's prefix of the encoder layers' names, `LAYER` + `N.` + the layer's own name.
const LAYER: &str = "bert.encoder.layer.";

/// Renames the part of `name` after `prefix` + `N.` (a layer's tensor) by `rules`.
fn rename_in_layer<'a>(name: &str, prefix: &str, rules: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let Some((layer, rest)) = name.strip_prefix(prefix).and_then(|r| r.split_once('.')) else {
        return name.to_string();
    };
    format!("{prefix}{layer}.{}", rename(rest, rules))
}

fn rename<'a>(name: &str, mut rules: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    match rules.find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}"))) {
        Some(renamed) => renamed,
        None => name.to_string(),
    }
}
