//! What keeps an output folder OUT safe (docs/RUNS.md): one run at a time (`OUT/kd.lock`), no
//! input overwritten by an output, and the fingerprint of a run (`OUT/checkpoint/run.json`) that
//! `--resume` checks before it continues a checkpoint.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use kd_kernels::rng::mix64;
use kd_kernels::Tensor;
use kd_methods::batching::{EncodedSet, Targets};
use kd_model::bert::Bert;
use serde_json::Value;

/// The lock file of a run in OUT.
pub const LOCK_FILE: &str = "kd.lock";
/// The fingerprint of the run whose state OUT/checkpoint holds.
pub const RUN_FILE: &str = "run.json";
/// What a run writes in OUT; an input there would be overwritten (files) or removed (folders).
const OUTPUT_FILES: [&str; 7] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "metrics.jsonl",
];
const OUTPUT_DIRS: [&str; 2] = ["best", "checkpoint"];

/// `path` made absolute and free of `.`, `..` and links as far as it exists (the rest appended),
/// so that two spellings of one place compare equal.
pub fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break,
        }
    }
    // Nothing of it exists: drop `.` and fold `..` by hand.
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Refuses an output folder that is, or would overwrite or remove, one of the run's `inputs`
/// (flag, path): `--out` equal to `--teacher`, a data folder, or holding an input where a run
/// writes (OUT/best, OUT/checkpoint, OUT/config.json, ...). Also refuses an OUT that is a file.
pub fn check_out(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {} is a file; give a folder", out.display());
    }
    let out_r = resolved(out);
    for &(flag, input) in inputs {
        let input_r = resolved(input);
        let clash = input_r == out_r
            || OUTPUT_DIRS.iter().any(|d| input_r.starts_with(out_r.join(d)))
            || OUTPUT_FILES.iter().any(|f| input_r == out_r.join(f));
        if clash {
            bail!(
                "--out {} would overwrite {flag} {}: a run writes its model, OUT/best, OUT/checkpoint and \
                 OUT/metrics.jsonl there; give another --out folder",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Refuses an output file that is one of the `inputs` (flag, path) or a file inside an input
/// folder (a model's config.json, say).
pub fn check_out_file(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    if out.is_dir() {
        bail!("{flag} {} is a folder; give a file", out.display());
    }
    let out_r = resolved(out);
    for &(in_flag, input) in inputs {
        let input_r = resolved(input);
        let clash =
            if input.is_dir() { out_r.parent() == Some(input_r.as_path()) && out.exists() } else { input_r == out_r };
        if clash {
            bail!("{flag} {} would overwrite {in_flag} {}: give another file", out.display(), input.display());
        }
    }
    Ok(())
}

/// Removes the temporary files that killed writers (processes no longer running) left in
/// `dir`, saying so on stderr.
pub fn remove_stale_temps(dir: &Path) {
    for stale in kd_kernels::io::remove_stale_temps(dir, false) {
        eprintln!("removed {}, left by an interrupted write", stale.display());
    }
}

/// [`remove_stale_temps`] in the folder of the file `path`.
pub fn remove_stale_temps_beside(path: &Path) {
    remove_stale_temps(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
}

/// This machine's name, to tell a lock of this machine's (whose process can be checked) from one
/// of another machine sharing the disk.
fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".into())
}

/// `OUT/kd.lock`, held while a run writes OUT and removed when it ends (an error included). A
/// lock whose process is gone from this machine (a killed run) is taken over, said on stderr.
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    pub fn acquire(out: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let path = out.join(LOCK_FILE);
        let host = host_name();
        for _ in 0..3 {
            match std::fs::File::options().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    writeln!(file, "{} {host}", std::process::id())
                        .and_then(|()| file.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut fields = text.split_whitespace();
            let owner = fields.next().and_then(|p| p.parse::<u32>().ok());
            let owner_host = fields.next().unwrap_or_default();
            match owner {
                Some(pid) if owner_host == host && !kd_kernels::io::process_alive(pid) => {
                    eprintln!("{}: process {pid}, which held it, is gone; taking the lock over", path.display());
                    let _ = std::fs::remove_file(&path);
                }
                Some(pid) => bail!(
                    "{} is in use by another kd run (process {pid} on {owner_host}, see {}); wait for it to end, \
                     or delete the lock file if that run is gone",
                    out.display(),
                    path.display()
                ),
                // Being written this instant by a run that just created it.
                None => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        bail!("{} is in use by another kd run (see {})", out.display(), path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A hash of what decides a run's result: flags by name, inputs by the hash of their contents.
/// Stored in OUT/checkpoint/run.json; `--resume` continues only a checkpoint with the same.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fingerprint(pub BTreeMap<String, String>);

impl Fingerprint {
    /// `command`'s flags as clap parsed them (`args` serialised), each under its `--flag` name,
    /// less those in `ignore` (field names) that do not change the result or that name inputs
    /// (which [`Fingerprint::input`] adds by content).
    pub fn of_flags(command: &str, args: &impl serde::Serialize, ignore: &[&str]) -> Result<Fingerprint> {
        let Value::Object(fields) = serde_json::to_value(args)? else { bail!("flags do not serialise to an object") };
        let mut map = BTreeMap::from([("command".to_string(), command.to_string())]);
        for (name, value) in fields {
            if ignore.contains(&name.as_str()) {
                continue;
            }
            let shown = match value {
                Value::Null => "(not given)".to_string(),
                Value::String(s) => s,
                // An f32 flag as it was written (5e-5, not 0.00004999999873689376).
                Value::Number(n) if n.is_f64() => match n.as_f64().unwrap_or(f64::NAN) {
                    f if (f as f32) as f64 == f => (f as f32).to_string(),
                    f => f.to_string(),
                },
                other => other.to_string(),
            };
            map.insert(format!("--{}", name.replace('_', "-")), shown);
        }
        Ok(Fingerprint(map))
    }

    /// Adds an input by a hash of its contents.
    pub fn input(&mut self, what: &str, hash: u64) {
        self.0.insert(what.to_string(), format!("{hash:016x}"));
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(&self.0)?;
        text.push('\n');
        kd_kernels::io::write_atomic(path, text.as_bytes())?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Fingerprint> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Fingerprint(serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?))
    }

    /// Errors unless `stored` (the checkpoint's, from `path`) is this run's, naming every
    /// flag and input that differs.
    pub fn check_resumes(&self, stored: &Fingerprint, path: &Path) -> Result<()> {
        let mut differences = String::new();
        let keys: std::collections::BTreeSet<&String> = self.0.keys().chain(stored.0.keys()).collect();
        for key in keys {
            let (then, now) = (stored.0.get(key), self.0.get(key));
            if then == now {
                continue;
            }
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(not recorded)".into());
            if !differences.is_empty() {
                differences.push_str("; ");
            }
            if key.starts_with("--") || key == "command" {
                let _ = write!(differences, "{key} was {} and is now {}", show(then), show(now));
            } else {
                let _ = write!(differences, "the {key} differ from the checkpoint's");
            }
        }
        if differences.is_empty() {
            return Ok(());
        }
        bail!(
            "--resume: {} was written by another run ({differences}); resume with that run's flags and inputs, \
             or leave out --resume to start afresh",
            path.display()
        )
    }
}

/// Hashes into one 64-bit value (splitmix64 chaining: not cryptographic, but any change of a
/// value or of the order changes it with near certainty).
pub struct Hasher(u64);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(0x6b64_2d72_756e_2d31)
    }

    pub fn u64(&mut self, v: u64) {
        self.0 = mix64(self.0 ^ v);
    }

    pub fn bytes(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.u64(u64::from_le_bytes(word));
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// A model's configuration and every weight.
pub fn hash_model(model: &Bert) -> Result<u64> {
    let mut h = Hasher::new();
    h.bytes(serde_json::to_string(&model.config)?.as_bytes());
    model.weights.try_visit(&mut |name: &str, t: &Tensor| -> Result<()> {
        h.bytes(name.as_bytes());
        t.to_vec()?.iter().for_each(|v| h.u64(v.to_bits() as u64));
        Ok(())
    })?;
    Ok(h.finish())
}

/// A tokenized set: every example's ids and type ids, and the targets.
pub fn hash_set(set: &EncodedSet) -> u64 {
    let mut h = Hasher::new();
    h.u64(set.items.len() as u64);
    for e in &set.items {
        h.u64(e.ids.len() as u64);
        e.ids.iter().chain(&e.type_ids).for_each(|&i| h.u64(i as u64));
    }
    match &set.targets {
        Targets::Classes(c) => c.iter().for_each(|&y| h.u64(y as u64)),
        Targets::Scores(s) => s.iter().for_each(|&y| h.u64(y.to_bits() as u64 | 1 << 40)),
    }
    h.finish()
}

/// A file's bytes, or every file of a folder (by name).
pub fn hash_path(path: &Path) -> Result<u64> {
    let mut h = Hasher::new();
    if path.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        for p in names {
            h.bytes(p.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
            h.bytes(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
        }
    } else {
        h.bytes(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_to_one_spelling() {
        let here = std::env::current_dir().unwrap();
        assert_eq!(resolved(Path::new(".")), here.canonicalize().unwrap());
        assert_eq!(resolved(Path::new("no-such/../x")), here.canonicalize().unwrap().join("x"));
        assert_eq!(resolved(Path::new("/no-such-root/a/./b/../c")), PathBuf::from("/no-such-root/a/c"));
    }

    #[test]
    fn fingerprints_name_every_difference() {
        let a = Fingerprint(BTreeMap::from([
            ("--lr".to_string(), "0.0001".to_string()),
            ("--seed".to_string(), "1".to_string()),
            ("teacher weights".to_string(), "00ff".to_string()),
        ]));
        let mut b = a.clone();
        assert!(a.check_resumes(&b, Path::new("run.json")).is_ok());
        b.0.insert("--lr".into(), "0.001".into());
        b.0.insert("teacher weights".into(), "00fe".into());
        let err = b.check_resumes(&a, Path::new("OUT/run.json")).unwrap_err().to_string();
        assert!(err.contains("--lr was 0.0001 and is now 0.001"), "{err}");
        assert!(err.contains("the teacher weights differ"), "{err}");
        assert!(!err.contains("--seed"), "{err}");
    }
}
