//! safetensors in and out, as f32 host arrays (F64, F32, F16 and BF16 on disk are read).
use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// One named array read from a file.
#[derive(Clone, Debug)]
pub struct HostArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn file_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::File { path: path.to_path_buf(), detail: detail.into() }
}

/// Reads every floating-point and integer tensor of a safetensors file, converted to f32.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostArray>> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F64 => raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::I32 => raw.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32).collect(),
            Dtype::I64 => raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            other => return Err(file_err(path, format!("tensor '{name}' has unsupported dtype {other:?}"))),
        };
        out.insert(name, HostArray { shape: view.shape().to_vec(), data });
    }
    Ok(out)
}

/// The `__metadata__` string map of a safetensors file (empty when it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Writes f32 arrays to `path` atomically: a temporary file in the same folder, then a rename,
/// so a reader never sees a half-written checkpoint.
pub fn write_safetensors(
    path: &Path,
    arrays: &BTreeMap<String, HostArray>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = arrays
        .iter()
        .map(|(name, a)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, a.shape.clone(), bytemuck::cast_slice(&a.data))
                .map_err(|e| file_err(path, format!("tensor '{name}': {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views, metadata).map_err(|e| file_err(path, e.to_string()))?;
    crate::io::write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| file_err(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e.to_string()))
}
