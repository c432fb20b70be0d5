//! A BERT WordPiece tokenizer built from `vocab.txt`, for folders without `tokenizer.json`:
//! the pipeline `transformers`' `BertTokenizerFast` converts a `BertTokenizer` into.
use std::path::Path;

use serde_json::Value;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::AddedToken;

use crate::{Error, Result};

const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]"];

/// `vocab` is the path of `vocab.txt`; `tokenizer_config.json` beside it, when present, sets
/// the lower-casing, accent stripping and Chinese-character splitting (BertTokenizer's
/// defaults otherwise: lower-case, accents stripped with it, Chinese characters split).
pub fn from_vocab(vocab: &Path) -> Result<tokenizers::Tokenizer> {
    let fail = |e: String| Error::file(vocab, e);
    let settings = read_settings(&vocab.with_file_name("tokenizer_config.json"))?;
    let flag = |key: &str| settings.get(key).and_then(Value::as_bool);
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    let id = |token: &str| inner.token_to_id(token).ok_or_else(|| fail(format!("no {token} token")));
    let (sep, cls) = (id("[SEP]")?, id("[CLS]")?);
    inner
        .with_normalizer(Some(BertNormalizer::new(
            true,
            flag("tokenize_chinese_chars").unwrap_or(true),
            flag("strip_accents"),
            flag("do_lower_case").unwrap_or(true),
        )))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
    let specials: Vec<AddedToken> =
        SPECIAL_TOKENS.iter().filter(|t| inner.token_to_id(t).is_some()).map(|t| AddedToken::from(*t, true)).collect();
    inner.add_special_tokens(&specials);
    Ok(inner)
}

/// The settings of `tokenizer_config.json`, empty when the file is absent.
fn read_settings(path: &Path) -> Result<serde_json::Map<String, Value>> {
    if !path.is_file() {
        return Ok(Default::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    match serde_json::from_str(&text).map_err(|e| Error::file(path, e))? {
        Value::Object(map) => Ok(map),
        other => Err(Error::file(path, format!("expected a JSON object, found {other}"))),
    }
}
