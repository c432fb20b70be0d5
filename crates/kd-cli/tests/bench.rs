//! `kd-cli bench step` on the real MiniLM pair, at a tiny shape so it runs in seconds.
mod common;

use std::path::PathBuf;

use common::{fails_with, kd, last_json, ok, s, scratch};
use kd_model::testing::{minilm_dir, STUDENT, TEACHER};

fn models() -> Option<(PathBuf, PathBuf)> {
    let dir = minilm_dir()?;
    Some((dir.join(TEACHER), dir.join(STUDENT)))
}

#[test]
fn step_reports_positive_finite_numbers_as_json() {
    let Some((teacher, student)) = models() else { return };
    let args = ["--batch", "2", "--seq", "8", "--steps", "2", "--warmup", "0", "--json"];
    let out = ok(kd(&[&["bench", "step", "--teacher", s(&teacher), "--student", s(&student)][..], &args].concat()));
    let v = last_json(&out);
    for key in ["seq_per_s", "seconds_per_step", "peak_rss_mb"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    let step = v["seconds_per_step"].as_f64().unwrap();
    // Throughput is the batch over the time of one step.
    assert!((v["seq_per_s"].as_f64().unwrap() * step - 2.0).abs() < 1e-6, "{v}");
    let phases = v["phase_seconds"].as_object().unwrap();
    assert_eq!(phases.len(), 5, "{v}");
    let sum: f64 = phases.values().map(|p| p.as_f64().unwrap()).sum();
    assert!(sum > 0.0 && sum <= step * 1.01, "phases {sum} s of a {step} s step");
    assert_eq!((v["batch"].as_u64(), v["seq"].as_u64(), v["steps"].as_u64()), (Some(2), Some(8), Some(2)));
    assert_eq!(v["device"], "cpu");
}

#[test]
fn step_takes_a_config_file_and_rejects_bad_shapes() {
    let Some((teacher, student)) = models() else { return };
    let dir = scratch("bench-config");
    let config = dir.join("bench.toml");
    let lines = format!("teacher = {:?}\nbatch = 1\nseq = 4\nsteps = 1\nwarmup = 0\njson = true\n", s(&teacher));
    std::fs::write(&config, lines).unwrap();
    let v = last_json(&ok(kd(&["bench", "step", "--config", s(&config), "--student", s(&student)])));
    assert_eq!((v["batch"].as_u64(), v["seq"].as_u64(), v["steps"].as_u64()), (Some(1), Some(4), Some(1)));

    let base = ["bench", "step", "--teacher", s(&teacher), "--student", s(&student)];
    fails_with(kd(&[&base[..], &["--steps", "0"]].concat()), &["--steps"]);
    fails_with(kd(&[&base[..], &["--seq", "513"]].concat()), &["513", "max_position_embeddings"]);
    fails_with(kd(&["bench", "step", "--teacher", s(&dir), "--student", s(&student)]), &["teacher"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
