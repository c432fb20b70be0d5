//! TinyBERT-style data augmentation (Jiao et al. 2020, its `data_augmentation.py`): copies of
//! each training text in which words are replaced by a masked LM's guesses. The copies are
//! transfer rows: the teacher labels them, the student learns the teacher's soft labels.
//!
//! ```text
//! for each text, N times:
//!     chosen = each whole word (one token, not special) with probability p (0.4)
//!     logits = Generator(ids with every chosen word -> [MASK])
//!     each chosen word <- a uniform draw from the K (15) likeliest whole words, itself left out
//! ```
//!
//! Departures from TinyBERT, for speed and to need no GloVe: it masks one word per forward pass
//! (the others unmasked), here a copy's chosen words are masked together in one pass; words of
//! several WordPiece tokens, which it replaces by GloVe neighbours, are kept.

use kd_kernels::rng::{mix64, Rng};
use kd_model::bert::{Bert, ForwardMode};

use crate::batching::{collate, Encoded};
use crate::{Error, Result};

/// What a vocabulary entry is, for choosing and replacing words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A whole word (or punctuation): may be replaced and may replace.
    Word,
    /// A WordPiece continuation (`##ing`): the word before it has several pieces.
    Piece,
    /// [CLS], [SEP], [PAD], [UNK], [MASK] and the like: never touched.
    Special,
}

pub struct Augmenter<'g> {
    /// A `BertForMaskedLM` with the training data's vocabulary.
    pub generator: &'g Bert,
    pub mask_id: u32,
    /// Per vocabulary id.
    pub kinds: Vec<TokenKind>,
    /// Probability that a word is replaced (TinyBERT's `p`).
    pub prob: f64,
    /// Candidates per replaced word (TinyBERT's `M`).
    pub top_k: usize,
}

impl Augmenter<'_> {
    /// `copies` augmented copies of every text, in order (text 0's copies first); texts with no
    /// word chosen come back unchanged. Seeded per text and copy, so the result does not
    /// depend on `batch_size`.
    pub fn augment(&self, texts: &[Encoded], copies: usize, seed: u64, batch_size: usize) -> Result<Vec<Encoded>> {
        let vocab = self.generator.config.vocab_size;
        if self.kinds.len() != vocab || self.mask_id as usize >= vocab {
            return Err(Error::Config(format!(
                "augment: the generator's vocabulary ({vocab}) is not the tokenizer's ({})",
                self.kinds.len()
            )));
        }
        if !(self.prob > 0.0 && self.prob <= 1.0) || self.top_k == 0 {
            return Err(Error::Config(format!(
                "augment: replacement probability {} must be in (0, 1] and candidates {} at least 1",
                self.prob, self.top_k
            )));
        }
        let jobs: Vec<(usize, usize)> = (0..texts.len()).flat_map(|t| (0..copies).map(move |c| (t, c))).collect();
        let mut out = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(batch_size.max(1)) {
            out.extend(self.augment_batch(texts, chunk, seed)?);
        }
        Ok(out)
    }

    fn augment_batch(&self, texts: &[Encoded], jobs: &[(usize, usize)], seed: u64) -> Result<Vec<Encoded>> {
        let mut rngs: Vec<Rng> =
            jobs.iter().map(|&(t, c)| Rng::new(mix64(seed ^ mix64(t as u64) ^ (c as u64)))).collect();
        let mut masked: Vec<Encoded> = Vec::with_capacity(jobs.len());
        let mut chosen: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
        for (&(t, _), rng) in jobs.iter().zip(&mut rngs) {
            let text = &texts[t];
            let words: Vec<usize> = (0..text.ids.len()).filter(|&i| self.replaceable(&text.ids, i)).collect();
            let picked: Vec<usize> = words.into_iter().filter(|_| rng.uniform() < self.prob).collect();
            let mut ids = text.ids.clone();
            for &i in &picked {
                ids[i] = self.mask_id;
            }
            masked.push(Encoded { ids, type_ids: text.type_ids.clone() });
            chosen.push(picked);
        }
        let device = self.generator.device();
        let batch = collate(&masked, self.generator.config.pad_token_id, &device)?;
        let rows: Vec<u32> = chosen
            .iter()
            .enumerate()
            .flat_map(|(b, picked)| picked.iter().map(move |&i| (b * batch.seq + i) as u32))
            .collect();
        let mut out: Vec<Encoded> = jobs.iter().map(|&(t, _)| texts[t].clone()).collect();
        if rows.is_empty() {
            return Ok(out);
        }
        let mut acts = self.generator.activations(batch.batch, batch.seq)?;
        self.generator.forward(&mut acts, &batch, None, ForwardMode::default())?;
        let mut mlm = self.generator.mlm_activations(&rows)?;
        self.generator.mlm_forward(&mut mlm, &acts)?;
        let logits = mlm.logits.to_vec()?;
        let vocab = self.generator.config.vocab_size;
        let mut row_logits = logits.chunks(vocab);
        for ((b, picked), rng) in chosen.iter().enumerate().zip(&mut rngs) {
            for &i in picked {
                let scores = row_logits.next().ok_or_else(|| Error::Config("augment: missing MLM logits".into()))?;
                let original = texts[jobs[b].0].ids[i];
                let candidates = self.top_words(scores, original);
                if !candidates.is_empty() {
                    out[b].ids[i] = candidates[rng.below(candidates.len())];
                }
            }
        }
        Ok(out)
    }

    /// A single-token word: a `Word` not followed by a continuation piece.
    fn replaceable(&self, ids: &[u32], i: usize) -> bool {
        let kind = |id: u32| self.kinds.get(id as usize).copied().unwrap_or(TokenKind::Special);
        kind(ids[i]) == TokenKind::Word && ids.get(i + 1).is_none_or(|&next| kind(next) != TokenKind::Piece)
    }

    /// The `top_k` likeliest whole words other than `original`, likeliest first.
    fn top_words(&self, scores: &[f32], original: u32) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..scores.len() as u32)
            .filter(|&id| id != original && self.kinds[id as usize] == TokenKind::Word)
            .collect();
        let k = self.top_k.min(ids.len());
        if k == 0 {
            return ids;
        }
        ids.select_nth_unstable_by(k - 1, |&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
        ids.truncate(k);
        ids.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::generator::generator_from_encoder;

    /// Ids 0-3 special (0 [PAD], 3 [MASK]), 4-9 continuation pieces, the rest words.
    fn kinds() -> Vec<TokenKind> {
        (0..40)
            .map(|id| {
                if id < 4 {
                    TokenKind::Special
                } else if id < 10 {
                    TokenKind::Piece
                } else {
                    TokenKind::Word
                }
            })
            .collect()
    }

    fn generator() -> Bert {
        generator_from_encoder(&kd_model::testing::tiny_bert(40, 16, 2, 1), 2).unwrap()
    }

    #[test]
    fn only_single_token_words_change_into_other_words_reproducibly() {
        let g = generator();
        let aug = Augmenter { generator: &g, mask_id: 3, kinds: kinds(), prob: 1.0, top_k: 5 };
        // [CLS]=1 w w piece w [SEP]=2 | a second, shorter text
        let texts = vec![
            Encoded { ids: vec![1, 12, 20, 5, 33, 2], type_ids: vec![0; 6] },
            Encoded { ids: vec![1, 15, 2], type_ids: vec![0; 3] },
        ];
        let out = aug.augment(&texts, 3, 7, 4).unwrap();
        assert_eq!(out.len(), 6);
        for (k, copy) in out.iter().enumerate() {
            let text = &texts[k / 3];
            assert_eq!(copy.type_ids, text.type_ids);
            for (i, (&new, &old)) in copy.ids.iter().zip(&text.ids).enumerate() {
                let replaceable = aug.replaceable(&text.ids, i);
                // p = 1: every single-token word is replaced by another word; nothing else moves.
                if replaceable {
                    assert!(new != old && kinds()[new as usize] == TokenKind::Word, "copy {k} pos {i}: {old} -> {new}");
                } else {
                    assert_eq!(new, old, "copy {k} pos {i}");
                }
            }
        }
        // Word 20 is followed by a piece (a two-token word): kept.
        assert!(!aug.replaceable(&texts[0].ids, 2) && aug.replaceable(&texts[0].ids, 1));
        // Seeded per text and copy: the batch size does not change the copies; the seed does.
        assert_eq!(aug.augment(&texts, 3, 7, 1).unwrap(), out);
        assert_ne!(aug.augment(&texts, 3, 8, 4).unwrap(), out);
        // Candidates are the K likeliest: with K = 1 every copy of a text is the same.
        let greedy = Augmenter { top_k: 1, ..aug };
        let g1 = greedy.augment(&texts, 2, 7, 4).unwrap();
        assert_eq!(g1[0], g1[1]);
        assert!(Augmenter { prob: 0.0, ..greedy }.augment(&texts, 1, 7, 4).is_err());
    }
}
