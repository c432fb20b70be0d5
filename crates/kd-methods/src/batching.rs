//! Tokenized examples and their collation into padded encoder batches.

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
}
