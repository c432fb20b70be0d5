//! The encoder families kd runs: BERT's computation under each family's own tensor names and
//! position ids, read off `config.json`'s `model_type`. RoBERTa is BERT with its encoder under
//! `roberta.`, positions counted from `pad_token_id + 1`, and the pooler + classifier head named
//! `classifier.dense` / `classifier.out_proj`. ELECTRA (the discriminator) is BERT under
//! `electra.`, with `embeddings_project` when `embedding_size` differs from `hidden_size`, and
//! the same head names as RoBERTa's with GELU in place of tanh.
use crate::BertConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Bert,
    Roberta,
    Electra,
}

/// The activation between the head's two dense layers ([CLS] -> dense -> activation -> out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadActivation {
    Tanh,
    Gelu,
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

impl Family {
    /// The family of `config` (a config without `model_type` is BERT's).
    pub fn of(config: &BertConfig) -> Family {
        match config.extra.get("model_type").and_then(|v| v.as_str()) {
            Some("roberta") => Family::Roberta,
            Some("electra") => Family::Electra,
            _ => Family::Bert,
        }
    }

    fn names(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::Bert => &[],
            Family::Roberta => &ROBERTA_NAMES,
            Family::Electra => &ELECTRA_NAMES,
        }
    }

    /// The name of kd's tensor `canonical` in the family's files.
    pub fn file_name(self, canonical: &str) -> String {
        rename(canonical, self.names().iter().map(|&(bert, own)| (bert, own)))
    }

    /// kd's name for the family's tensor `name`; `None` for tensors the family's sequence
    /// classifier does not use (RoBERTa's pooler, the replaced-token head of an ELECTRA
    /// discriminator checkpoint).
    pub fn canonical_name(self, name: &str) -> Option<String> {
        let unused = match self {
            Family::Bert => None,
            Family::Roberta => Some("roberta.pooler."),
            Family::Electra => Some("discriminator_predictions."),
        };
        if unused.is_some_and(|prefix| name.starts_with(prefix)) {
            return None;
        }
        Some(rename(name, self.names().iter().map(|&(bert, own)| (own, bert))))
    }

    /// The prefix of `transformers`' class names for the family (`Bert`, `Roberta`).
    pub fn class_prefix(self) -> &'static str {
        match self {
            Family::Bert => "Bert",
            Family::Roberta => "Roberta",
            Family::Electra => "Electra",
        }
    }

    pub fn head_activation(self) -> HeadActivation {
        match self {
            Family::Bert | Family::Roberta => HeadActivation::Tanh,
            Family::Electra => HeadActivation::Gelu,
        }
    }

    /// The position id of a sequence's first token; padding tokens take `pad_token_id`
    /// (RoBERTa's numbering). `None` for BERT, whose positions are simply 0, 1, 2, ...
    pub fn first_position(self, config: &BertConfig) -> Option<u32> {
        match self {
            Family::Bert | Family::Electra => None,
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

fn rename<'a>(name: &str, mut rules: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    match rules.find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}"))) {
        Some(renamed) => renamed,
        None => name.to_string(),
    }
}
