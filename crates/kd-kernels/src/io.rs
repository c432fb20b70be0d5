//! safetensors in and out, as f32 host arrays (F64, F32, F16 and BF16 on disk are read).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
/// Reads the header alone, not the tensors.
pub fn read_safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    use std::io::Read;
    let io_err = |e: std::io::Error| file_err(path, e.to_string());
    let not_safetensors = |detail: String| file_err(path, format!("not a safetensors file: {detail}"));
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| not_safetensors(e.to_string()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 || len > file.metadata().map_err(io_err)?.len() {
        return Err(not_safetensors(format!("a header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| not_safetensors(e.to_string()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| not_safetensors(format!("header: {e}")))?;
    match header.get("__metadata__") {
        None | Some(serde_json::Value::Null) => Ok(Default::default()),
        Some(meta) => serde_json::from_value(meta.clone()).map_err(|e| not_safetensors(format!("metadata: {e}"))),
    }
}

/// Writes f32 arrays to `path` atomically: a temporary file in the same folder, then a rename,
/// so a reader never sees a half-written checkpoint.
pub fn write_safetensors(
    path: &Path,
    arrays: &BTreeMap<String, HostArray>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    write_atomic(path, &safetensors_bytes(path, arrays, metadata)?)
}

/// The bytes of a safetensors file of f32 arrays (`path` names it in errors).
pub fn safetensors_bytes(
    path: &Path,
    arrays: &BTreeMap<String, HostArray>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = arrays
        .iter()
        .map(|(name, a)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, a.shape.clone(), bytemuck::cast_slice(&a.data))
                .map_err(|e| file_err(path, format!("tensor '{name}': {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views, metadata).map_err(|e| file_err(path, e.to_string()))?;
    Ok(bytes)
}

/// The temporary file that [`write_atomic`] writes `path` through: hidden, in the same folder
/// (so the rename stays on one filesystem), named by the writing process: `.NAME.tmpPID`.
pub fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new(""));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.tmp{}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file and a rename: a reader sees the old file or
/// the new one, never a part. A failed write (a full disk) removes the temporary file and leaves
/// the old `path` as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_files_atomic(&[(path, bytes)])
}

/// Writes several files as one: each to its temporary file (flushed to the disk), and only when
/// every one is written, the renames. A failed write removes every temporary file and leaves
/// every target as it was, so a folder (a saved model) is never left half old, half new by a
/// full disk. (The renames themselves, metadata operations that need no space, run in order.)
pub fn write_files_atomic(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut written: Vec<(PathBuf, &Path)> = Vec::with_capacity(files.len());
    let result = (|| {
        for &(path, bytes) in files {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
            let tmp = temp_path(path);
            written.push((tmp.clone(), path));
            write_synced(&tmp, bytes).map_err(|e| file_err(path, format!("writing {}: {e}", tmp.display())))?;
        }
        for (tmp, path) in &written {
            std::fs::rename(tmp, path).map_err(|e| file_err(path, e.to_string()))?;
        }
        Ok(())
    })();
    if result.is_err() {
        for (tmp, _) in &written {
            let _ = std::fs::remove_file(tmp);
        }
    }
    result
}

/// Writes and syncs a file: some filesystems (NFS) report a full disk only at the sync.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The process id of a temporary file of [`temp_path`]'s form, `.NAME.tmpPID`.
fn temp_owner(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".tmp")?;
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.parse().ok()).flatten()
}

/// Whether process `pid` is running on this machine (`true` where that cannot be told).
pub fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Removes the temporary files of [`write_atomic`] that a killed or failed writer left in `dir`
/// (`.NAME.tmpPID`): those of processes no longer running, or every one when `any_owner` (the
/// caller holds the folder's lock). Returns the paths removed.
pub fn remove_stale_temps(dir: &Path, any_owner: bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_owner(&name) else { continue };
        let stale = pid != std::process::id() && (any_owner || !process_alive(pid));
        if stale && entry.file_type().is_ok_and(|t| !t.is_dir()) && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kd-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn temps(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| temp_owner(n).is_some())
            .collect();
        names.sort();
        names
    }

    /// A full disk: the temporary file is a link to /dev/full, whose every write fails with
    /// ENOSPC. The old file stays whole and no temporary file is left.
    #[test]
    fn a_full_disk_leaves_the_old_file_and_no_temporary_file() {
        if !Path::new("/dev/full").exists() {
            eprintln!("skipped: no /dev/full");
            return;
        }
        let dir = scratch("full");
        let path = dir.join("model.safetensors");
        write_atomic(&path, b"old contents").unwrap();
        std::os::unix::fs::symlink("/dev/full", temp_path(&path)).unwrap();
        let err = write_atomic(&path, &vec![7u8; 1 << 16]).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("No space left"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old contents");
        assert_eq!(temps(&dir), Vec::<String>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Files written as one: the second failing leaves the first target unchanged as well.
    #[test]
    fn a_failed_file_of_several_leaves_every_target_as_it_was() {
        let dir = scratch("several");
        let (a, b) = (dir.join("a.json"), dir.join("b.json"));
        write_files_atomic(&[(&a, b"a1"), (&b, b"b1")]).unwrap();
        // b's temporary file cannot be created: a folder stands in its place.
        std::fs::create_dir(temp_path(&b)).unwrap();
        assert!(write_files_atomic(&[(&a, b"a2"), (&b, b"b2")]).is_err());
        assert_eq!((std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap()), (b"a1".to_vec(), b"b1".to_vec()));
        assert!(!temp_path(&a).exists(), "a's temporary file was left");
        std::fs::remove_dir(temp_path(&b)).unwrap();
        write_files_atomic(&[(&a, b"a2"), (&b, b"b2")]).unwrap();
        assert_eq!((std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap()), (b"a2".to_vec(), b"b2".to_vec()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temporary_files_are_those_of_dead_processes() {
        let dir = scratch("stale");
        // A process that has exited: its id is free (reuse within the test is very unlikely).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = std::process::id();
        for name in [format!(".x.json.tmp{dead}"), format!(".y.json.tmp{live}"), "x.json".into(), ".tmp".into()] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        assert_eq!(remove_stale_temps(&dir, false), vec![dir.join(format!(".x.json.tmp{dead}"))]);
        // This process's own temporary files are never stale.
        assert!(remove_stale_temps(&dir, true).is_empty());
        assert_eq!(temps(&dir), vec![format!(".y.json.tmp{live}")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
