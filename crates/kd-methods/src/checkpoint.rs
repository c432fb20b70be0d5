//! The resumable state of a training run, written atomically as one safetensors file: the
//! student's weights, AdamW's moments, and (in the metadata) the step count and the best dev
//! metrics so far. Shuffles and dropout masks derive from (seed, epoch, step), so a run resumed
//! from step k replays exactly what an uninterrupted run does after step k.
//!
//! A run that trains several models (MATE-KD's student and generator) stores each (weights,
//! optimiser) pair under its own prefix, with that optimiser's own update count as
//! `{prefix}step`: its optimisers step on different batches. The plain trainer's single pair
//! has the empty prefix, so its optimiser's count is the run's `step`. Parameters an objective
//! trains beside the student (ILD's width projections) are one more part, [`OwnPart`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kd_kernels::io::{read_safetensors, read_safetensors_metadata, write_safetensors, HostArray};
use kd_kernels::Tensor;
use kd_model::optim::{Optimizer, Params};
use kd_model::BertWeights;

use crate::losses::ProjectionParams;
use crate::metrics::Metrics;
use crate::trainer::Event;
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

/// A model's weights and its optimiser, stored under a prefix.
pub type Part<'a> = (&'a str, &'a BertWeights, &'a Optimizer);
/// A [`Part`] to load into.
pub type PartMut<'a, P = BertWeights> = (&'a str, &'a mut P, &'a mut Optimizer<P>);
/// The parameters an objective trains beside the student, with their optimiser (saved and loaded
/// through the same mutable borrow the objective hands out).
pub type OwnPart<'a> = PartMut<'a, ProjectionParams>;

pub const STATE_FILE: &str = "train_state.safetensors";

/// What a resumed run starts from.
pub struct Resumed {
    pub step: u64,
    pub best: Option<Metrics>,
}

fn collect(prefix: &str, name: &str, t: &Tensor, out: &mut BTreeMap<String, HostArray>) -> Result<()> {
    out.insert(format!("{prefix}{name}"), HostArray { shape: t.shape().to_vec(), data: t.to_vec()? });
    Ok(())
}

fn collect_weights(prefix: &str, weights: &BertWeights, out: &mut BTreeMap<String, HostArray>) -> Result<()> {
    weights.try_visit(&mut |name: &str, t: &Tensor| collect(prefix, name, t, out))
}

fn collect_params<P: Params>(prefix: &str, params: &mut P, out: &mut BTreeMap<String, HostArray>) -> Result<()> {
    params.params_mut().into_iter().try_for_each(|(name, t)| collect(prefix, &name, t, out))
}

/// Writes the state after `step` batches. An unprefixed part's optimiser must have stepped once
/// a batch: its count is stored as the run's.
pub fn save(dir: &Path, parts: &[Part], own: Option<OwnPart>, step: u64, best: Option<&Metrics>) -> Result<()> {
    let mut arrays = BTreeMap::new();
    let mut meta = HashMap::new();
    for &(prefix, weights, optimizer) in parts {
        collect_weights(&format!("{prefix}weights."), weights, &mut arrays)?;
        collect_weights(&format!("{prefix}adam_m."), &optimizer.m, &mut arrays)?;
        collect_weights(&format!("{prefix}adam_v."), &optimizer.v, &mut arrays)?;
        meta.insert(format!("{prefix}step"), optimizer.step.to_string());
    }
    if let Some((prefix, weights, optimizer)) = own {
        collect_params(&format!("{prefix}weights."), weights, &mut arrays)?;
        collect_params(&format!("{prefix}adam_m."), &mut optimizer.m, &mut arrays)?;
        collect_params(&format!("{prefix}adam_v."), &mut optimizer.v, &mut arrays)?;
        meta.insert(format!("{prefix}step"), optimizer.step.to_string());
    }
    meta.insert("step".to_string(), step.to_string());
    if let Some(b) = best {
        meta.insert("best".into(), serde_json::to_string(b).map_err(|e| Error::Invalid(e.to_string()))?);
    }
    write_safetensors(&dir.join(STATE_FILE), &arrays, Some(meta))?;
    Ok(())
}

fn restore<P: Params>(
    prefix: &str,
    path: &Path,
    arrays: &mut BTreeMap<String, HostArray>,
    weights: &mut P,
) -> Result<()> {
    weights.params_mut().into_iter().try_for_each(|(name, t)| -> Result<()> {
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
        if let Some(i) = a.data.iter().position(|v| !v.is_finite()) {
            return Err(Error::File {
                path: path.to_path_buf(),
                detail: format!("tensor '{key}' has the non-finite value {} at element {i}", a.data[i]),
            });
        }
        *t = Tensor::from_vec(a.data, &a.shape, &t.device())?;
        Ok(())
    })
}

fn restore_part<P: Params>(
    (prefix, weights, optimizer): &mut PartMut<P>,
    path: &Path,
    arrays: &mut BTreeMap<String, HostArray>,
    step: u64,
) -> Result<()> {
    restore(&format!("{prefix}weights."), path, arrays, *weights)?;
    restore(&format!("{prefix}adam_m."), path, arrays, &mut optimizer.m)?;
    restore(&format!("{prefix}adam_v."), path, arrays, &mut optimizer.v)?;
    optimizer.step = step;
    Ok(())
}

/// Loads the state in `dir` into `parts` and `own`, if a state file is there. A state written
/// without `own` (before objectives' parameters were stored) leaves them as they are, their
/// optimiser placed at the run's step.
pub fn load(dir: &Path, parts: &mut [PartMut], own: Option<OwnPart>) -> Result<Option<Resumed>> {
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let meta = read_safetensors_metadata(&path)?;
    let bad = |detail: String| Error::File { path: path.clone(), detail };
    let count = |key: &str| -> Result<u64> {
        meta.get(key).and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("no '{key}' count in the metadata")))
    };
    let step = count("step")?;
    let best = match meta.get("best") {
        Some(s) => Some(serde_json::from_str(s).map_err(|e| bad(format!("best metrics: {e}")))?),
        None => None,
    };
    let mut arrays = read_safetensors(&path)?;
    for part in parts.iter_mut() {
        let part_step = count(&format!("{}step", part.0))?;
        restore_part(part, &path, &mut arrays, part_step)?;
    }
    if let Some(mut own) = own {
        let key = format!("{}step", own.0);
        if meta.contains_key(&key) {
            let own_step = count(&key)?;
            restore_part(&mut own, &path, &mut arrays, own_step)?;
        } else {
            own.2.step = step;
        }
    }
    Ok(Some(Resumed { step, best }))
}

/// Loads the state into `parts` when `cfg` asks to resume and a state is there, and reports
/// [`Event::Resumed`].
pub fn resume(
    cfg: Option<&CheckpointConfig>,
    parts: &mut [PartMut],
    own: Option<OwnPart>,
    observer: &mut dyn FnMut(Event),
) -> Result<Option<Resumed>> {
    let Some(ck) = cfg.filter(|c| c.resume) else { return Ok(None) };
    let resumed = load(&ck.dir, parts, own)?;
    if let Some(r) = &resumed {
        observer(Event::Resumed { step: r.step });
    }
    Ok(resumed)
}

/// Writes the state after `step` of `total` batches when `cfg` says it is due: every `every`
/// batches and at the end.
pub fn save_if_due(
    cfg: Option<&CheckpointConfig>,
    parts: &[Part],
    own: Option<OwnPart>,
    step: u64,
    total: u64,
    best: Option<&Metrics>,
) -> Result<()> {
    match cfg {
        Some(ck) if step.is_multiple_of(ck.every) || step == total => save(&ck.dir, parts, own, step, best),
        _ => Ok(()),
    }
}
