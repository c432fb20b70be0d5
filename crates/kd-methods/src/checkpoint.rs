//! The resumable state of a training run, written atomically as one safetensors file: the
//! student's weights, AdamW's moments, and (in the metadata) the step count and the best dev
//! metrics so far. Shuffles and dropout masks derive from (seed, epoch, step), so a run resumed
//! from step k replays exactly what an uninterrupted run does after step k.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kd_kernels::io::{read_safetensors, read_safetensors_metadata, write_safetensors, HostArray};
use kd_kernels::Tensor;
use kd_model::optim::Optimizer;
use kd_model::BertWeights;

use crate::metrics::Metrics;
use crate::{Error, Result};

/// Where and how often the state is written.
#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    pub dir: PathBuf,
    /// Write the state every this many steps (and at the end).
    pub every: u64,
    /// Continue from the state in `dir` when there is one.
    pub resume: bool,
}

pub const STATE_FILE: &str = "train_state.safetensors";

/// What a resumed run starts from.
pub struct Resumed {
    pub step: u64,
    pub best: Option<Metrics>,
}

fn collect(prefix: &str, weights: &BertWeights, out: &mut BTreeMap<String, HostArray>) -> Result<()> {
    weights.try_visit(&mut |name: &str, t: &Tensor| -> Result<()> {
        out.insert(format!("{prefix}{name}"), HostArray { shape: t.shape().to_vec(), data: t.to_vec()? });
        Ok(())
    })
}

/// Writes the state after `step` updates.
pub fn save(dir: &Path, weights: &BertWeights, optimizer: &Optimizer, step: u64, best: Option<&Metrics>) -> Result<()> {
    let mut arrays = BTreeMap::new();
    collect("weights.", weights, &mut arrays)?;
    collect("adam_m.", &optimizer.m, &mut arrays)?;
    collect("adam_v.", &optimizer.v, &mut arrays)?;
    let mut meta = HashMap::from([("step".to_string(), step.to_string())]);
    if let Some(b) = best {
        meta.insert("best".into(), serde_json::to_string(b).map_err(|e| Error::Invalid(e.to_string()))?);
    }
    write_safetensors(&dir.join(STATE_FILE), &arrays, Some(meta))?;
    Ok(())
}

fn restore(
    prefix: &str,
    path: &Path,
    arrays: &mut BTreeMap<String, HostArray>,
    weights: &mut BertWeights,
) -> Result<()> {
    weights.try_visit_mut(&mut |name: &str, t: &mut Tensor| -> Result<()> {
        let key = format!("{prefix}{name}");
        let a = arrays
            .remove(&key)
            .ok_or_else(|| Error::File { path: path.to_path_buf(), detail: format!("tensor '{key}' is missing") })?;
        if a.shape != t.shape() {
            return Err(Error::File {
                path: path.to_path_buf(),
                detail: format!("tensor '{key}' has shape {:?}, the model {:?}", a.shape, t.shape()),
            });
        }
        *t = Tensor::from_vec(a.data, &a.shape, &t.device())?;
        Ok(())
    })
}

/// Loads the state in `dir` into `weights` and `optimizer`, if a state file is there.
pub fn load(dir: &Path, weights: &mut BertWeights, optimizer: &mut Optimizer) -> Result<Option<Resumed>> {
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let meta = read_safetensors_metadata(&path)?;
    let bad = |detail: String| Error::File { path: path.clone(), detail };
    let step: u64 =
        meta.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("no step count in the metadata".into()))?;
    let best = match meta.get("best") {
        Some(s) => Some(serde_json::from_str(s).map_err(|e| bad(format!("best metrics: {e}")))?),
        None => None,
    };
    let mut arrays = read_safetensors(&path)?;
    restore("weights.", &path, &mut arrays, weights)?;
    restore("adam_m.", &path, &mut arrays, &mut optimizer.m)?;
    restore("adam_v.", &path, &mut arrays, &mut optimizer.v)?;
    optimizer.step = step;
    Ok(Some(Resumed { step, best }))
}
