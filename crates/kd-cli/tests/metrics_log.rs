//! OUT/metrics.jsonl of a real run: the per-step training records beside the dev evaluations.
mod common;

use common::*;
use serde_json::Value;

/// Fine-tunes paraphrase-MiniLM-L3-v2 for 8 steps (64 SST-2 rows in batches of 8), evaluating
/// every 4 and logging training every 3; returns the run's OUT folder.
fn small_run(name: &str) -> Option<std::path::PathBuf> {
    let dir = scratch(name);
    let (model, task) = sst2(&dir, 200, 40)?;
    let out = dir.join("model");
    let mut args = vec!["finetune", "--model", s(&model), "--out", s(&out), "--task", "sst2", "--data", s(&task)];
    args.extend(["--max-train", "64", "--batch", "8", "--epochs", "1", "--max-len", "32"]);
    args.extend(["--eval-every", "4", "--log-every", "3"]);
    ok(kd(&args));
    Some(out)
}

#[test]
fn training_records_every_log_every_steps_and_at_the_last() {
    let Some(out) = small_run("metrics-log") else { return };
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |split: &str| -> Vec<u64> {
        lines.iter().filter(|l| l["split"] == split).map(|l| l["step"].as_u64().unwrap()).collect()
    };
    assert_eq!(of("train"), [3, 6, 8], "{log}");
    assert_eq!(of("dev"), [4, 8], "{log}");
    for line in lines.iter().filter(|l| l["split"] == "train") {
        assert_eq!(line["stage"], "finetune");
        let step = line["step"].as_f64().unwrap();
        assert_eq!(line["epoch"].as_f64(), Some(step / 8.0));
        let loss = line["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{line}");
        assert!(line["lr"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["examples_per_s"].as_f64().unwrap() > 0.0, "{line}");
    }
}

#[test]
fn log_every_zero_is_refused() {
    let args = ["finetune", "--model", "no-such-model", "--out", "unused", "--log-every", "0"];
    fails_with(kd(&args), &["--log-every must be at least 1"]);
}
