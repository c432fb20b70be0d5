//! Tokenized examples and their collation into padded encoder batches.

use kd_kernels::rng::Rng;
use kd_kernels::{Device, IdTensor, Tensor};
use kd_model::bert::EncoderBatch;

use crate::Result;

/// One example as the encoder sees it: token ids and segment ids, unpadded.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// What a model is trained to predict for each example of a set.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Class ids in `0..num_labels`.
    Classes(Vec<u32>),
    /// Regression scores (STS-B).
    Scores(Vec<f32>),
}

impl Targets {
    pub fn len(&self) -> usize {
        match self {
            Targets::Classes(v) => v.len(),
            Targets::Scores(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tokenized split: examples and their targets, index-aligned.
#[derive(Clone, Debug)]
pub struct EncodedSet {
    pub items: Vec<Encoded>,
    pub targets: Targets,
}

/// Pads `items` on the right to the longest of them (dynamic padding) with `pad_id`.
pub fn collate<'a>(items: impl IntoIterator<Item = &'a Encoded>, pad_id: u32, device: &Device) -> Result<EncoderBatch> {
    let items: Vec<&Encoded> = items.into_iter().collect();
    let batch = items.len();
    let seq = items.iter().map(|e| e.ids.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id; batch * seq];
    let mut type_ids = vec![0u32; batch * seq];
    let mut mask = vec![0.0f32; batch * seq];
    for (b, e) in items.iter().enumerate() {
        let row = b * seq;
        ids[row..row + e.ids.len()].copy_from_slice(&e.ids);
        type_ids[row..row + e.type_ids.len()].copy_from_slice(&e.type_ids);
        mask[row..row + e.ids.len()].fill(1.0);
    }
    Ok(EncoderBatch::new(&ids, &type_ids, &mask, batch, seq, device)?)
}

/// Batches per pool sorted by length when batches are grouped by length: large enough that a
/// batch's examples are of nearly one length, small enough that the pool is still a random
/// sample of the set (HF transformers' `group_by_length` uses the same 50).
const LENGTH_POOL_BATCHES: usize = 50;

/// One epoch's batches, as positions in `items`: a shuffle by `rng` cut into `batch_size`
/// chunks. With `group_by_length`, each pool of 50 batches' worth of the shuffle is sorted by
/// length before it is cut, and the batches are shuffled again: a batch then pads to nearly
/// its examples' own length (short-text sets such as SST-2 pad three tokens for every real one
/// otherwise) while every example is still seen once an epoch in a random order of batches.
pub fn epoch_batches(items: &[Encoded], batch_size: usize, group_by_length: bool, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    rng.shuffle(&mut order);
    if !group_by_length {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(items.len().div_ceil(batch_size));
    for pool in order.chunks_mut(batch_size * LENGTH_POOL_BATCHES) {
        pool.sort_by_key(|&i| std::cmp::Reverse(items[i].ids.len()));
        batches.extend(pool.chunks(batch_size).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// The targets of the examples at `indices`, as class ids or scores on `device`.
pub enum BatchTargets {
    Classes(IdTensor),
    Scores(Tensor),
}

impl BatchTargets {
    /// The class ids, or `None` for a regression batch.
    pub fn classes(&self) -> Option<&IdTensor> {
        match self {
            BatchTargets::Classes(labels) => Some(labels),
            BatchTargets::Scores(_) => None,
        }
    }
}

pub fn gather_targets(targets: &Targets, indices: &[usize], device: &Device) -> Result<BatchTargets> {
    Ok(match targets {
        Targets::Classes(v) => BatchTargets::Classes(IdTensor::from_vec(
            indices.iter().map(|&i| v[i]).collect(),
            &[indices.len()],
            device,
        )?),
        Targets::Scores(v) => {
            BatchTargets::Scores(Tensor::from_vec(indices.iter().map(|&i| v[i]).collect(), &[indices.len()], device)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_pads_right_and_masks() {
        let a = Encoded { ids: vec![101, 7, 102], type_ids: vec![0, 0, 0] };
        let b = Encoded { ids: vec![101, 102], type_ids: vec![0, 1] };
        let batch = collate([&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!((batch.batch, batch.seq), (2, 3));
        assert_eq!(batch.ids.to_vec().unwrap(), vec![101, 7, 102, 101, 102, 0]);
        assert_eq!(batch.type_ids.to_vec().unwrap(), vec![0, 0, 0, 0, 1, 0]);
        assert_eq!(batch.mask.to_vec().unwrap(), vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        assert_eq!(batch.positions.to_vec().unwrap(), vec![0, 1, 2, 0, 1, 2]);
    }

    /// Lengths 1..=n in a scrambled order, one example each.
    fn items_of_lengths(n: usize) -> Vec<Encoded> {
        (0..n).map(|i| (i * 7919) % n + 1).map(|len| Encoded { ids: vec![1; len], type_ids: vec![0; len] }).collect()
    }

    #[test]
    fn grouped_batches_cover_every_example_once_and_pad_less() {
        let items = items_of_lengths(1000);
        let padded = |batches: &[Vec<usize>]| -> usize {
            batches.iter().map(|b| b.len() * b.iter().map(|&i| items[i].ids.len()).max().unwrap()).sum()
        };
        let plain = epoch_batches(&items, 8, false, &mut Rng::new(3));
        let grouped = epoch_batches(&items, 8, true, &mut Rng::new(3));
        assert_eq!(grouped.len(), plain.len());
        let mut seen: Vec<usize> = grouped.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert_eq!(grouped.iter().filter(|b| b.len() < 8).count(), 0, "1000 is a multiple of 8: no short batch");
        let real: usize = items.iter().map(|e| e.ids.len()).sum();
        assert!(padded(&grouped) * 100 < real * 110, "grouped pads {} for {real} real tokens", padded(&grouped));
        assert!(padded(&plain) > real * 3 / 2, "a random batch pads to its longest: {}", padded(&plain));
        // Batches are not in length order: the pools' shuffled batches interleave.
        let longest: Vec<usize> = grouped.iter().map(|b| items[b[0]].ids.len()).collect();
        assert!(longest.windows(2).any(|w| w[0] < w[1]) && longest.windows(2).any(|w| w[0] > w[1]));
    }

    #[test]
    fn ungrouped_batches_are_the_seeded_shuffle_cut_in_order() {
        let items = items_of_lengths(10);
        let mut order: Vec<usize> = (0..10).collect();
        Rng::new(9).shuffle(&mut order);
        let batches = epoch_batches(&items, 4, false, &mut Rng::new(9));
        assert_eq!(batches, vec![order[..4].to_vec(), order[4..8].to_vec(), order[8..].to_vec()]);
    }
}
