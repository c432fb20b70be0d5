//! OUT/metrics.jsonl of a real run: the per-step training records beside the dev evaluations,
//! and `kd-cli plot`'s picture of them.
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

/// The text lines of an SVG (plotters writes each `<text>`'s content on a line of its own).
fn svg_texts(svg: &str) -> Vec<&str> {
    svg.lines().filter(|l| !l.starts_with('<')).map(str::trim).collect()
}

#[test]
fn plot_draws_loss_lr_and_dev_curves_of_a_real_run() {
    let Some(out) = small_run("plot") else { return };
    let run = ok(kd(&["plot", s(&out)]));
    let picture = out.join("curves.svg");
    assert_eq!(stdout(&run).trim(), s(&picture));
    let svg = std::fs::read_to_string(&picture).unwrap();
    let texts = svg_texts(&svg);
    for title in ["training loss", "learning rate", "evaluations", "loss", "lr", "metric", "finetune dev accuracy"] {
        assert!(texts.contains(&title), "'{title}' missing from {texts:?}");
    }
    assert_eq!(texts.iter().filter(|t| **t == "step").count(), 3, "{texts:?}");
    // One coloured line per curve (loss, lr, dev accuracy) and one in each legend.
    let curves: Vec<&str> = svg.lines().filter(|l| l.starts_with("<polyline") && !l.contains("#000000")).collect();
    assert_eq!(curves.len(), 6, "{curves:?}");
    // The loss line has a vertex per training record (steps 3, 6, 8), the dev line one per evaluation.
    let vertices = |l: &str| l.split("points=\"").nth(1).unwrap().split('"').next().unwrap().split_whitespace().count();
    let mut counts: Vec<usize> = curves.iter().map(|l| vertices(l)).collect();
    counts.sort_unstable();
    assert_eq!(counts, [2, 2, 2, 2, 3, 3], "{curves:?}");

    let elsewhere = out.parent().unwrap().join("elsewhere.svg");
    ok(kd(&["plot", s(&out.join("metrics.jsonl")), "--out", s(&elsewhere)]));
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), svg);
}

#[test]
fn plot_errors_name_the_file_and_line() {
    let dir = scratch("plot-errors");
    fails_with(kd(&["plot", s(&dir)]), &[&format!("reading {}", s(&dir.join("metrics.jsonl")))]);
    let log = dir.join("metrics.jsonl");
    std::fs::write(&log, "\n").unwrap();
    fails_with(kd(&["plot", s(&dir)]), &[s(&log), "no training records or evaluations"]);
    let good = r#"{"stage":"kd","step":1,"epoch":0.5,"split":"train","loss":0.7,"lr":1e-5,"examples_per_s":30}"#;
    std::fs::write(&log, format!("{good}\n{{\"stage\": \"kd\", \n")).unwrap();
    fails_with(kd(&["plot", s(&dir)]), &[&format!("{}:2: not a JSON object", s(&log))]);
    std::fs::write(&log, format!("{good}\n{}\n", r#"{"stage":"kd","split":"dev","accuracy":0.5}"#)).unwrap();
    fails_with(kd(&["plot", s(&dir)]), &[&format!("{}:2: no \"step\" number", s(&log))]);
}
