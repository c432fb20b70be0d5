//! From a loaded [`Dataset`] to what the trainer consumes: token ids per example and targets.

use kd_model::Tokenizer;

use crate::batching::{Encoded, EncodedSet, Targets};
use crate::data::{Dataset, Label};
use crate::{Error, Result};

/// Examples tokenized per call: `encode_batch` pads a call's rows to its longest, so chunks
/// bound that scratch while leaving each call enough rows to run in parallel.
const CHUNK: usize = 1024;

/// Tokenizes every example (`text_b` as the second segment of a pair), each truncated to
/// `max_len` tokens with its special tokens, unpadded: batches pad later, to their own longest.
pub fn encode_texts(data: &Dataset, tokenizer: &Tokenizer, max_len: usize) -> Result<Vec<Encoded>> {
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.examples.chunks(CHUNK) {
        let inputs: Vec<(&str, Option<&str>)> =
            chunk.iter().map(|e| (e.text_a.as_str(), e.text_b.as_deref())).collect();
        let batch = tokenizer.encode_batch(&inputs, max_len)?;
        for row in 0..batch.batch {
            let start = row * batch.seq;
            // Padding is on the right, so the real tokens are the row's first `len`.
            let len = batch.mask[start..start + batch.seq].iter().filter(|&&m| m > 0.0).count();
            out.push(Encoded {
                ids: batch.ids[start..start + len].to_vec(),
                type_ids: batch.type_ids[start..start + len].to_vec(),
            });
        }
    }
    Ok(out)
}

/// The class ids or scores of `data`, which must all be labelled, and all alike.
pub fn targets(data: &Dataset) -> Result<Targets> {
    let scores = matches!(data.examples.first().map(|e| &e.label), Some(Label::Score(_)));
    let fail = |i: usize, label: &Label| {
        let detail = match label {
            Label::None => "has no label; training and evaluation need labelled examples".to_string(),
            other => format!("has label {other:?} among {}", if scores { "scores" } else { "class labels" }),
        };
        Error::File { path: data.source.clone(), detail: format!("example {} {detail}", i + 1) }
    };
    if scores {
        let values = data.examples.iter().enumerate().map(|(i, e)| match e.label {
            Label::Score(s) => Ok(s),
            ref other => Err(fail(i, other)),
        });
        return Ok(Targets::Scores(values.collect::<Result<_>>()?));
    }
    let ids = data.examples.iter().enumerate().map(|(i, e)| match e.label {
        Label::Class(c) => u32::try_from(c).map_err(|_| Error::Invalid(format!("class id {c} is too large"))),
        ref other => Err(fail(i, other)),
    });
    Ok(Targets::Classes(ids.collect::<Result<_>>()?))
}

/// A labelled dataset, tokenized: [`targets`] (checked first, as it is cheap) and
/// [`encode_texts`].
pub fn encode_dataset(data: &Dataset, tokenizer: &Tokenizer, max_len: usize) -> Result<EncodedSet> {
    let targets = targets(data)?;
    Ok(EncodedSet { items: encode_texts(data, tokenizer, max_len)?, targets })
}
