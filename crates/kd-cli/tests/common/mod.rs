//! Running the `kd-cli` binary in tests and checking what it says.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kd_kernels::assets::asset;
use serde_json::Value;

pub fn kd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kd-cli")).args(args).output().expect("the kd-cli binary runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn ok(out: Output) -> Output {
    assert!(out.status.success(), "kd-cli failed ({}):\n{}", out.status, stderr(&out));
    out
}

/// Asserts a failure reported as one `error: ...` line that mentions every one of `needles`.
pub fn fails_with(out: Output, needles: &[&str]) {
    let err = stderr(&out);
    assert!(!out.status.success(), "kd-cli succeeded; stderr:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(last.starts_with("error: ") && !err.contains("panicked"), "not a clean error:\n{err}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("error")).count(), 1, "{err}");
    for needle in needles {
        assert!(last.contains(needle), "'{needle}' missing from: {last}");
    }
}

/// The last line of stdout, which `--json` makes one JSON object.
pub fn last_json(out: &Output) -> Value {
    let text = stdout(out);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// A fresh scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kd-cli").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An SST-2 folder in `dir` holding the first `train` and `dev` rows of the real files (the
/// real dev set would take most of the time budget to evaluate).
pub fn sst2_head(dir: &Path, train: usize, dev: usize) -> Option<PathBuf> {
    let glue = asset("data/glue/SST-2")?;
    let task = dir.join("SST-2");
    std::fs::create_dir_all(&task).unwrap();
    for (file, rows) in [("train.tsv", train), ("dev.tsv", dev)] {
        let text = std::fs::read_to_string(glue.join(file)).unwrap();
        let head: Vec<&str> = text.lines().take(rows + 1).collect();
        std::fs::write(task.join(file), head.join("\n") + "\n").unwrap();
    }
    Some(task)
}

/// The student checkpoint (paraphrase-MiniLM-L3-v2) and an SST-2 head folder (see [`sst2_head`]).
pub fn sst2(dir: &Path, train: usize, dev: usize) -> Option<(PathBuf, PathBuf)> {
    let model = kd_model::testing::minilm_dir()?.join(kd_model::testing::STUDENT);
    Some((model, sst2_head(dir, train, dev)?))
}
