//! Helpers shared by the kd-model tests: scratch folders and the tiny golden checkpoint.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kd_kernels::io::{read_safetensors, HostArray};
use kd_model::{BertConfig, BertWeights};

/// A fresh, empty scratch folder for one test, removed when dropped.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("kd-model-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// The golden tiny student (`BertForSequenceClassification` names, 2 layers, 3 labels) as the
/// arrays of a model.safetensors, and its config; `None` without test assets.
pub fn tiny_student() -> Option<(BertConfig, BTreeMap<String, HostArray>)> {
    let golden = kd_kernels::assets::asset("golden/tiny_bert.safetensors")?;
    let config_path = kd_kernels::assets::asset("golden/student_config/config.json")?;
    let arrays = read_safetensors(&golden)
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("student.")?.to_string(), v)))
        .filter(|(k, _)| !k.starts_with("out."))
        .collect();
    Some((BertConfig::from_file(&config_path).unwrap(), arrays))
}

pub fn write(path: &Path, arrays: &BTreeMap<String, HostArray>) {
    kd_kernels::io::write_safetensors(path, arrays, None).unwrap();
}

/// Every parameter as (name, shape, bits), for exact comparisons.
pub fn snapshot(w: &BertWeights) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    let mut out = Vec::new();
    w.visit(&mut |name, t| {
        out.push((name.to_string(), t.shape().to_vec(), t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect()))
    });
    out
}
