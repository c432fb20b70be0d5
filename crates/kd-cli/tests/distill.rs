//! `kd-cli distill` end to end on real checkpoints and data: a paraphrase-MiniLM-L3-v2 teacher
//! fine-tuned on a few SST-2 rows is distilled into a 1-layer student (its layer 0) with every
//! method; each run must exit cleanly, print its dev metrics and save a student that reloads.
mod common;

use std::path::Path;

use common::*;

/// Fine-tunes the teacher once (a few rows, one epoch) and returns its folder and the task's.
fn teacher(dir: &Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let (model, task) = sst2(dir, 96, 32)?;
    let teacher = dir.join("teacher");
    ok(kd(&[
        "finetune",
        "--model",
        s(&model),
        "--task",
        "sst2",
        "--data",
        s(&task),
        "--out",
        s(&teacher),
        "--epochs",
        "1",
        "--batch",
        "16",
        "--max-len",
        "32",
        "--lr",
        "1e-4",
    ]));
    Some((teacher, task))
}

fn distill(teacher: &Path, task: &Path, out: &Path, method: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "distill",
        "--teacher",
        s(teacher),
        "--student-layers",
        "0",
        "--task",
        "sst2",
        "--data",
        s(task),
        "--out",
        s(out),
        "--epochs",
        "1",
        "--batch",
        "16",
        "--max-len",
        "32",
        "--lr",
        "1e-4",
        "--json",
        "--cache-dir",
    ];
    let cache = out.parent().unwrap().join("cache");
    args.push(s(&cache));
    args.extend_from_slice(method);
    let result = last_json(&ok(kd(&args)));
    // The saved student is an HF folder that `eval` reloads to the same metrics.
    let again = last_json(&ok(kd(&[
        "eval",
        "--model",
        s(out),
        "--task",
        "sst2",
        "--data",
        s(task),
        "--max-len",
        "32",
        "--json",
    ])));
    assert_eq!(result["accuracy"], again["accuracy"], "{method:?}: saved student differs");
    assert!(out.join("metrics.jsonl").exists());
    result
}

#[test]
fn every_method_distils_a_real_teacher() {
    let dir = scratch("distill");
    let Some((teacher, task)) = teacher(&dir) else { return };
    // MATE-KD's generator: an MLM head trained on the frozen teacher vocabulary's encoder.
    let (model, _) = sst2(&dir, 96, 32).unwrap();
    let generator = dir.join("generator");
    ok(kd(&[
        "train-generator",
        "--model",
        s(&model),
        "--task",
        "sst2",
        "--data",
        s(&task),
        "--out",
        s(&generator),
        "--epochs",
        "1",
        "--max-len",
        "32",
    ]));
    let methods: [&[&str]; 9] = [
        &["--method", "ce"],
        &["--method", "kd"],
        &["--method", "ild", "--stage1-epochs", "1"],
        &["--method", "ild", "--last-layer", "--stage1-epochs", "1"],
        &["--method", "noisy-relabel", "--label-noise", "0.3"],
        &["--method", "noisy-coteach", "--label-noise", "0.3"],
        &["--method", "cr-ild", "--stage1-epochs", "1"],
        &["--method", "peer-advised"],
        &["--method", "mate-kd", "--generator", s(&generator)],
    ];
    for (i, method) in methods.iter().enumerate() {
        let out = dir.join(format!("student{i}"));
        let result = distill(&teacher, &task, &out, method);
        assert_eq!(result["split"], "dev", "{method:?}");
        assert_eq!(result["examples"], 32, "{method:?}");
        let acc = result["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{method:?}: accuracy {acc}");
    }
    // The teacher cache was written once per (teacher, data) and reused by later methods.
    assert!(std::fs::read_dir(dir.join("cache")).unwrap().count() >= 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The largest step in a run's metrics.jsonl.
fn last_step(out: &Path) -> u64 {
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()).max().unwrap()
}

/// Transfer rows: `--unlabeled` text and `--augment` copies, which the teacher labels and which
/// train with the labelled rows (so an epoch has more steps); methods that cannot use them, and
/// --augment without a generator, are refused.
#[test]
fn unlabeled_text_and_augmented_copies_extend_the_kd_epoch() {
    let dir = scratch("distill-transfer");
    let Some((teacher, task)) = teacher(&dir) else { return };
    // 64 sentences from further down SST-2's train file, as plain lines.
    let glue = kd_kernels::assets::asset("data/glue/SST-2").unwrap();
    let text = std::fs::read_to_string(glue.join("train.tsv")).unwrap();
    let lines: Vec<&str> = text.lines().skip(1001).take(64).map(|l| l.split('\t').next().unwrap()).collect();
    let extra = dir.join("extra.txt");
    std::fs::write(&extra, lines.join("\n")).unwrap();
    let (model, _) = sst2(&dir, 96, 32).unwrap();
    let generator = dir.join("generator");
    ok(kd(&["train-generator", "--model", s(&model), "--text", s(&extra), "--out", s(&generator), "--epochs", "1"]));
    let cache = dir.join("cache");
    let run = |method: &str, out: &Path, transfer: &[&str]| {
        let mut args = vec![
            "distill",
            "--method",
            method,
            "--teacher",
            s(&teacher),
            "--student-layers",
            "0",
            "--task",
            "sst2",
            "--data",
            s(&task),
            "--out",
            s(out),
            "--epochs",
            "1",
            "--batch",
            "16",
            "--max-len",
            "32",
            "--log-every",
            "1",
            "--json",
            "--cache-dir",
            s(&cache),
        ];
        args.extend_from_slice(transfer);
        kd(&args)
    };

    let out = dir.join("unlabeled");
    let err = stderr(&ok(run("kd", &out, &["--unlabeled", s(&extra)])));
    assert!(err.contains("96 training rows and 64 transfer rows"), "{err}");
    assert_eq!(last_step(&out), 10, "(96 + 64) / 16 steps");

    let out = dir.join("augment");
    let err = stderr(&ok(run("kd", &out, &["--augment", "2", "--generator", s(&generator)])));
    assert!(err.contains("192 copies") && err.contains("96 training rows and 192 transfer rows"), "{err}");
    assert_eq!(last_step(&out), 18, "(96 + 2 * 96) / 16 steps");

    fails_with(run("ce", &dir.join("ce"), &["--unlabeled", s(&extra)]), &["--unlabeled", "kd"]);
    fails_with(run("kd", &dir.join("nogen"), &["--augment", "2"]), &["--augment", "--generator"]);
    fails_with(run("kd", &dir.join("gen"), &["--generator", s(&generator)]), &["--generator", "--augment"]);
    // clap refuses 0 copies before anything runs.
    let zero = run("kd", &dir.join("zero"), &["--augment", "0", "--generator", s(&generator)]);
    assert!(!zero.status.success() && stderr(&zero).contains("'--augment <N>'"), "{}", stderr(&zero));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_interrupted_run_resumes_to_the_same_student() {
    let dir = scratch("distill-resume");
    let Some((teacher, task)) = teacher(&dir) else { return };
    let args = |out: &Path| -> Vec<String> {
        [
            "distill",
            "--method",
            "kd",
            "--teacher",
            s(&teacher),
            "--student-layers",
            "0",
            "--task",
            "sst2",
            "--data",
            s(&task),
            "--out",
            s(out),
            "--epochs",
            "2",
            "--batch",
            "16",
            "--max-len",
            "32",
            "--checkpoint-every",
            "1",
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = dir.join("whole");
    let uninterrupted = last_json(&ok(kd(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>())));

    // Kill a second run as soon as its first state is on disk, then resume it.
    let part = dir.join("part");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kd-cli"))
        .args(args(&part))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = part.join("checkpoint/kd/train_state.safetensors");
    while !state.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before writing its state");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!part.join("model.safetensors").exists(), "the run was not interrupted");
    let mut resume = args(&part);
    resume.push("--resume".into());
    let resumed = last_json(&ok(kd(&resume.iter().map(String::as_str).collect::<Vec<_>>())));
    assert_eq!(uninterrupted["accuracy"], resumed["accuracy"]);
    let a = std::fs::read(whole.join("model.safetensors")).unwrap();
    let b = std::fs::read(part.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run's");

    // The checkpoint of another alpha, or of another student, is not continued.
    let mut other = args(&part);
    other.extend(["--resume", "--alpha", "0.7"].map(String::from));
    fails_with(kd(&other.iter().map(String::as_str).collect::<Vec<_>>()), &["--alpha was 0.5 and is now 0.7"]);
    let mut other = args(&part);
    let layers = other.iter().position(|a| a == "--student-layers").unwrap() + 1;
    other[layers] = "1".into();
    other.push("--resume".into());
    fails_with(
        kd(&other.iter().map(String::as_str).collect::<Vec<_>>()),
        &["--student-layers was [0] and is now [1]", "initial student weights differ"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn distill_errors_are_one_line() {
    let dir = scratch("distill-errors");
    let Some((teacher, task)) = teacher(&dir) else { return };
    let t = s(&teacher);
    let d = s(&task);
    let out = dir.join("o");
    let run = |extra: &[&str]| {
        let mut args = vec!["distill", "--teacher", t, "--task", "sst2", "--data", d, "--out", s(&out)];
        args.extend_from_slice(extra);
        kd(&args)
    };
    fails_with(run(&["--method", "kd"]), &["--student"]);
    fails_with(run(&["--method", "mate-kd", "--student-layers", "0"]), &["--generator"]);
    fails_with(run(&["--method", "kd", "--student-layers", "0,9"]), &["9"]);
    fails_with(run(&["--method", "kd", "--student-layers", "0", "--device", "cuda"]), &["cuda"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_demo_shows_distillation_beating_the_labels_alone() {
    let out = ok(kd(&["distill", "--json"]));
    let rows: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let acc = |method: &str, model: &str| {
        let row = rows.iter().find(|r| r["method"] == method && r["model"].as_str().unwrap().starts_with(model));
        row.unwrap_or_else(|| panic!("no {model} {method} row in {rows:?}"))["dev_accuracy"].as_f64().unwrap()
    };
    let (teacher, ce, kd) = (acc("ce", "teacher"), acc("ce", "student"), acc("kd", "student"));
    assert!(teacher > 0.75, "teacher {teacher}");
    assert!(kd > ce + 0.03, "kd {kd} should beat ce {ce}");
}
