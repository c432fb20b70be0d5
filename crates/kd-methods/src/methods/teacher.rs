//! The teacher side of distillation: a frozen model run on the student's batch, or its logits
//! computed once for a whole training set and reused across epochs (the teacher cache).

use std::collections::BTreeMap;
use std::path::Path;

use kd_kernels::io::{read_safetensors, write_safetensors, HostArray};
use kd_kernels::rng::mix64;
use kd_kernels::Tensor;
use kd_model::bert::{Activations, Bert, ForwardMode};

use crate::batching::EncodedSet;
use crate::methods::kd::TeacherLogits;
use crate::trainer::{predict, StepInput};
use crate::{Error, Result};

/// Errors unless teacher and student read the same token ids the same way.
pub fn check_compatible(teacher: &Bert, student: &Bert) -> Result<()> {
    let (t, s) = (&teacher.config, &student.config);
    if t.vocab_size != s.vocab_size || t.pad_token_id != s.pad_token_id {
        return Err(Error::Config(format!(
            "teacher and student vocabularies differ (teacher vocab_size {} pad {}, student vocab_size {} pad {})",
            t.vocab_size, t.pad_token_id, s.vocab_size, s.pad_token_id
        )));
    }
    if teacher.num_labels() != student.num_labels() {
        return Err(Error::Config(format!(
            "teacher has {:?} labels, student {:?}",
            teacher.num_labels(),
            student.num_labels()
        )));
    }
    Ok(())
}

/// A frozen teacher evaluated on each batch (dropout off), for methods that need more than
/// its logits (hidden states, attention maps) or whose inputs change every step.
pub struct LiveTeacher<'t> {
    pub model: &'t Bert,
    pub keep_scores: bool,
    acts: Option<Activations>,
}

impl<'t> LiveTeacher<'t> {
    pub fn new(model: &'t Bert, keep_scores: bool) -> Self {
        LiveTeacher { model, keep_scores, acts: None }
    }

    /// Runs the teacher on the step's batch and returns its activations.
    pub fn forward(&mut self, input: &StepInput) -> Result<&Activations> {
        let b = input.batch;
        let reuse = self.acts.as_ref().is_some_and(|a| (a.batch, a.seq) == (b.batch, b.seq));
        if !reuse {
            self.acts = Some(self.model.activations(b.batch, b.seq)?);
        }
        let acts = self.acts.as_mut().expect("made above");
        let mode = ForwardMode { train: false, seed: 0, keep_scores: self.keep_scores };
        self.model.forward(acts, b, None, mode)?;
        Ok(acts)
    }
}

impl TeacherLogits for LiveTeacher<'_> {
    fn logits(&mut self, input: &StepInput) -> Result<Tensor> {
        let acts = self.forward(input)?;
        let logits = acts.logits.as_ref().ok_or_else(|| Error::Config("the teacher has no classifier head".into()))?;
        Ok(logits.try_clone()?)
    }
}

/// The teacher's logits for every example of a training set, computed once.
pub struct CachedLogits {
    rows: Vec<Vec<f32>>,
}

/// A 64-bit fingerprint of everything the teacher's logits depend on: its weights and the
/// token ids of the set (which carry the tokenizer and its truncation settings).
fn fingerprint(teacher: &Bert, set: &EncodedSet) -> Result<u64> {
    let mut h = 0x6b64_7465_6163_6865u64;
    let mut eat = |v: u64| h = mix64(h ^ v);
    teacher.weights.try_visit(&mut |name: &str, t: &Tensor| -> Result<()> {
        name.bytes().for_each(|b| eat(b as u64));
        t.to_vec()?.iter().for_each(|v| eat(v.to_bits() as u64));
        Ok(())
    })?;
    for e in &set.items {
        eat(e.ids.len() as u64);
        e.ids.iter().chain(&e.type_ids).for_each(|&i| eat(i as u64));
    }
    Ok(h)
}

impl CachedLogits {
    pub fn build(teacher: &Bert, set: &EncodedSet, batch_size: usize) -> Result<Self> {
        Ok(CachedLogits { rows: predict(teacher, &set.items, batch_size)? })
    }

    /// As [`CachedLogits::build`], reusing `dir/teacher-logits-<fingerprint>.safetensors`
    /// when an earlier run computed the same logits, and writing it (atomically) otherwise.
    pub fn build_or_load(teacher: &Bert, set: &EncodedSet, batch_size: usize, dir: &Path) -> Result<Self> {
        let path = dir.join(format!("teacher-logits-{:016x}.safetensors", fingerprint(teacher, set)?));
        if path.exists() {
            let arrays = read_safetensors(&path)?;
            let a =
                arrays.get("logits").ok_or_else(|| Error::Config(format!("{}: no 'logits' tensor", path.display())))?;
            let c = a.shape[1];
            return Ok(CachedLogits { rows: a.data.chunks(c).map(<[f32]>::to_vec).collect() });
        }
        let cache = Self::build(teacher, set, batch_size)?;
        let c = cache.rows.first().map_or(0, Vec::len);
        let array = HostArray { shape: vec![cache.rows.len(), c], data: cache.rows.concat() };
        write_safetensors(&path, &BTreeMap::from([("logits".to_string(), array)]), None)?;
        Ok(cache)
    }

    pub fn rows(&self) -> &[Vec<f32>] {
        &self.rows
    }

    /// Logits from elsewhere (a file of soft labels: log-probabilities serve as logits).
    pub fn from_rows(rows: Vec<Vec<f32>>) -> Self {
        CachedLogits { rows }
    }
}

impl TeacherLogits for CachedLogits {
    fn logits(&mut self, input: &StepInput) -> Result<Tensor> {
        let c = self.rows.first().map_or(0, Vec::len);
        let data: Vec<f32> = input.indices.iter().flat_map(|&i| self.rows[i].iter().copied()).collect();
        Ok(Tensor::from_vec(data, &[input.indices.len(), c], &input.batch.mask.device())?)
    }
}

#[cfg(test)]
mod tests {
    use kd_kernels::Device;
    use kd_model::{BertConfig, BertWeights};

    use super::*;
    use crate::demo::synthetic_set;

    #[test]
    fn logit_cache_is_reused_only_for_the_same_teacher_and_data() {
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 32
        }))
        .unwrap();
        let teacher = Bert::new(config.clone(), BertWeights::init(&config, 2, 1, &Device::Cpu).unwrap());
        let other = Bert::new(config.clone(), BertWeights::init(&config, 2, 2, &Device::Cpu).unwrap());
        let set = synthetic_set(20, &mut kd_kernels::rng::Rng::new(3));
        let dir = std::env::temp_dir().join(format!("kd-cache-test-{}", std::process::id()));
        let first = CachedLogits::build_or_load(&teacher, &set, 8, &dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let again = CachedLogits::build_or_load(&teacher, &set, 8, &dir).unwrap();
        assert_eq!(first.rows(), again.rows());
        CachedLogits::build_or_load(&other, &set, 8, &dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "another teacher gets its own file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
