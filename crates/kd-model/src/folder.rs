//! The weight files of a HF model folder: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; a PyTorch-only folder is refused with the way out.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kd_kernels::io::{read_safetensors, HostArray};
use kd_kernels::Device;
use serde::Deserialize;

use crate::{BertConfig, BertWeights, Error, Result};

pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
const PYTORCH_WEIGHTS: &str = "pytorch_model.bin";

#[derive(Deserialize)]
struct Index {
    /// tensor name -> shard file name, relative to the folder.
    weight_map: BTreeMap<String, String>,
}

/// Every tensor of the folder's checkpoint, and the file that names them in errors (the
/// single file, or the index for shards).
pub fn read_weights(dir: &Path) -> Result<(PathBuf, BTreeMap<String, HostArray>)> {
    let single = dir.join(WEIGHTS);
    if single.is_file() {
        return Ok((single.clone(), read_safetensors(&single)?));
    }
    let index = dir.join(WEIGHTS_INDEX);
    if index.is_file() {
        return Ok((index.clone(), read_shards(dir, &index)?));
    }
    if dir.join(PYTORCH_WEIGHTS).is_file() {
        return Err(Error::file(
            dir.join(PYTORCH_WEIGHTS),
            "kd reads safetensors only; convert it first, e.g. in Python: \
             AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)",
        ));
    }
    Err(Error::file(dir, format!("no weights: neither {WEIGHTS} nor {WEIGHTS_INDEX}")))
}

/// Reads each shard once and takes from it the tensors the index places there.
fn read_shards(dir: &Path, index_path: &Path) -> Result<BTreeMap<String, HostArray>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::file(index_path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| Error::file(index_path, e))?;
    let shards: BTreeSet<&String> = index.weight_map.values().collect();
    let mut out = BTreeMap::new();
    for shard in shards {
        let path = dir.join(shard);
        if !path.is_file() {
            return Err(Error::file(index_path, format!("shard '{shard}' is missing from {}", dir.display())));
        }
        let mut arrays = read_safetensors(&path)?;
        for name in index.weight_map.iter().filter(|(_, s)| *s == shard).map(|(n, _)| n) {
            let array = arrays.remove(name).ok_or_else(|| Error::Tensor {
                path: path.clone(),
                name: name.clone(),
                detail: format!("is missing from this shard, where {WEIGHTS_INDEX} places it"),
            })?;
            out.insert(name.clone(), array);
        }
    }
    Ok(out)
}

impl BertWeights {
    /// Reads the weights of a model folder (see [`read_weights`]) onto `device`, checked
    /// against `config` as [`BertWeights::load`] does.
    pub fn load_dir(dir: &Path, config: &BertConfig, device: &Device) -> Result<BertWeights> {
        let (source, arrays) = read_weights(dir)?;
        Self::from_arrays(arrays, config, device, &source)
    }
}
