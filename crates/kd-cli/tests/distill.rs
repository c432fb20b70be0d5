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

/// `distill`'s flags for a 1-epoch run of the 1-layer student, before the method's.
fn distill_args<'a>(teacher: &'a Path, task: &'a Path, out: &'a Path, cache: &'a Path) -> Vec<&'a str> {
    vec![
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
        s(cache),
    ]
}

fn distill(teacher: &Path, task: &Path, out: &Path, method: &[&str]) -> serde_json::Value {
    let cache = out.parent().unwrap().join("cache");
    let mut args = distill_args(teacher, task, out, &cache);
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
    let methods: [&[&str]; 10] = [
        &["--method", "ce"],
        &["--method", "kd"],
        &["--method", "ild", "--stage1-epochs", "1"],
        &["--method", "ild", "--last-layer", "--stage1-epochs", "1"],
        &["--method", "noisy-relabel", "--label-noise", "0.3"],
        &["--method", "noisy-coteach", "--label-noise", "0.3"],
        &["--method", "cr-ild", "--stage1-epochs", "1"],
        &["--method", "peer-advised"],
        &["--method", "slkd"],
        // 6 batches: 2 generator batches, then 4 student ones (at the default n_G of 10 the
        // student would never train, an error).
        &["--method", "mate-kd", "--generator", s(&generator), "--generator-steps", "2"],
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
        let mut args = distill_args(&teacher, &task, out, &cache);
        args.extend_from_slice(&["--method", method, "--log-every", "1"]);
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
            // Length-grouped batches too must replay exactly after a resume.
            "--group-by-length",
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

/// The flag checks come before any file is read: no model or data is needed, and the teacher
/// folder does not exist.
fn flags_only(extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "distill",
        "--teacher",
        "/nonexistent/kd-teacher",
        "--student-layers",
        "0",
        "--task",
        "sst2",
        "--data",
        "/nonexistent/kd-data",
        "--out",
        "/nonexistent/kd-out",
    ];
    args.extend_from_slice(extra);
    kd(&args)
}

#[test]
fn a_flag_the_method_does_not_read_is_an_error() {
    // (method and its own flags, a flag of another method, the methods that read it)
    let cases: [(&[&str], &[&str], &str); 9] = [
        (&["ce"], &["--alpha", "0.5"], "kd, ild, cr-ild, noisy-coteach, noisy-relabel"),
        (&["kd"], &["--last-layer"], "ild"),
        (&["ild", "--last-layer"], &["--keep", "0.3"], "peer-advised"),
        (&["noisy-coteach"], &["--trust-threshold", "0.5"], "noisy-relabel"),
        (&["noisy-relabel"], &["--keep-better"], "noisy-coteach"),
        (&["cr-ild"], &["--divergence", "kl"], "mate-kd"),
        (&["mate-kd", "--generator", "/nonexistent/g"], &["--temperature", "3"], "kd, ild"),
        (&["peer-advised"], &["--stage1-epochs", "2"], "ild, cr-ild"),
        (&["noisy-relabel"], &["--noise-rate", "0.2"], "noisy-coteach"),
    ];
    for (method, flag, readers) in cases {
        let mut args = vec!["--method"];
        args.extend_from_slice(method);
        args.extend_from_slice(flag);
        let not_option = format!("{} is not an option of --method {}", flag[0], method[0]);
        fails_with(flags_only(&args), &[&not_option, &format!("(it is read by {readers}")]);
    }
    // A switch is given only when on; the demo takes no method flag.
    fails_with(kd(&["distill", "--last-layer"]), &["--last-layer is an option of a --method run"]);
}

#[test]
fn valid_method_flags_pass_validation() {
    let cases: [&[&str]; 8] = [
        &["ce", "--label-noise", "0.1", "--noise-seed", "3"],
        &["kd", "--alpha", "0.7", "--temperature", "4"],
        &["ild", "--last-layer", "--stage1-epochs", "2", "--alpha", "1"],
        &["noisy-coteach", "--noise-rate", "0.2", "--alpha", "0.5", "--keep-better"],
        &["noisy-relabel", "--trust-threshold", "0.4", "--temperature", "1"],
        &[
            "cr-ild",
            "--objective",
            "qkv",
            "--w-ic",
            "0",
            "--stage1-epochs",
            "1",
            "--supplementary",
            "/nonexistent/s",
            "--alpha",
            "1",
            "--temperature",
            "3",
        ],
        &[
            "mate-kd",
            "--generator",
            "/nonexistent/g",
            "--divergence",
            "kl",
            "--generator-steps",
            "2",
            "--student-steps",
            "3",
            "--mask-rate",
            "1",
            "--generator-lr",
            "1e-5",
        ],
        &["peer-advised", "--keep", "0.3", "--gold-subset", "4", "--labels-file", "/nonexistent/l"],
    ];
    for method in cases {
        let mut args = vec!["--method"];
        args.extend_from_slice(method);
        // Past every flag check, the run stops at the first file it reads: the teacher.
        fails_with(flags_only(&args), &["/nonexistent/kd-teacher does not exist"]);
    }
}

#[test]
fn method_flags_out_of_range_are_one_line_errors() {
    let g = ["--method", "mate-kd", "--generator", "/nonexistent/g"];
    fn with<'a>(g: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [g, extra].concat()
    }
    fails_with(flags_only(&with(&g, &["--generator-steps", "0"])), &["--generator-steps must be at least 1"]);
    fails_with(flags_only(&with(&g, &["--student-steps", "0"])), &["--student-steps must be at least 1"]);
    fails_with(flags_only(&with(&g, &["--mask-rate", "0"])), &["--mask-rate 0 is not a rate in (0, 1]"]);
    fails_with(flags_only(&with(&g, &["--mask-rate", "1.5"])), &["--mask-rate 1.5"]);
    fails_with(flags_only(&with(&g, &["--generator-lr", "0"])), &["--generator-lr 0 is not a positive number"]);
    fails_with(flags_only(&["--method", "cr-ild", "--w-ic=-1"]), &["--w-ic -1"]);
    fails_with(flags_only(&["--method", "ild", "--stage1-epochs", "0"]), &["--stage1-epochs must be at least 1"]);
    fails_with(flags_only(&["--method", "kd", "--alpha", "1.5"]), &["--alpha 1.5 is not in [0, 1]"]);
    fails_with(flags_only(&["--method", "peer-advised", "--keep", "1"]), &["--keep 1 is not a fraction"]);
}

#[test]
fn objective_and_divergence_take_only_their_values() {
    for (flag, bad, values) in [("--objective", "ah2", "ah, qkv"), ("--divergence", "js", "ce, kl")] {
        let out = flags_only(&["--method", "kd", flag, bad]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "clap's usage error expected:\n{err}");
        assert!(err.contains(&format!("invalid value '{bad}' for '{flag}")), "{err}");
        assert!(err.contains(&format!("[possible values: {values}]")), "{err}");
    }
}

/// ild and cr-ild share kd's stage 2 (docs/METHODS.md): cr-ild's reads --alpha and
/// --temperature, with kd's defaults a = 0.5, T = 2.
#[test]
fn cr_ild_stage2_is_kd_with_its_flags() {
    let dir = scratch("distill-cr-ild-stage2");
    let Some((teacher, task)) = teacher(&dir) else { return };
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        distill(&teacher, &task, &out, &[&["--method", "cr-ild", "--stage1-epochs", "1"][..], extra].concat());
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let default = run("default", &[]);
    assert!(default == run("explicit", &["--alpha", "0.5", "--temperature", "2"]), "defaults are not a = 0.5, T = 2");
    assert!(default != run("alpha1", &["--alpha", "1"]), "--alpha does not reach cr-ild's stage 2");
    assert!(default != run("t4", &["--temperature", "4"]), "--temperature does not reach cr-ild's stage 2");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// noisy-coteach returns student A: without a dev set too, and without saying it picked one;
/// --keep-better opts in to the best-of-two selection on dev.
#[test]
fn noisy_coteach_reports_student_a_unless_keep_better() {
    let dir = scratch("distill-coteach");
    let Some((teacher, task)) = teacher(&dir) else { return };
    let run = |out: &str, data: &[&str], extra: &[&str]| {
        let mut args = vec!["distill", "--method", "noisy-coteach", "--teacher", s(&teacher), "--student-layers", "0"];
        let out = dir.join(out);
        args.extend_from_slice(&["--out", s(&out), "--epochs", "1", "--batch", "16", "--max-len", "32", "--json"]);
        args.extend_from_slice(data);
        args.extend_from_slice(extra);
        kd(&args)
    };
    let glue = ["--task", "sst2", "--data", s(&task)];
    let train = task.join("train.tsv");
    let train_only = ["--train", s(&train), "--text-column", "sentence"];

    let a = ok(run("a", &train_only, &[]));
    assert_eq!(last_json(&a)["split"], "train");
    let a = ok(run("a-dev", &glue, &[]));
    assert!(!stderr(&a).contains("kept student"), "{}", stderr(&a));
    let better = ok(run("better", &glue, &["--keep-better"]));
    assert!(stderr(&better).contains("noisy-coteach: kept student"), "{}", stderr(&better));
    fails_with(run("better-no-dev", &train_only, &["--keep-better"]), &["--keep-better", "dev set"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// slkd trains the student on the teacher's hard labels alone: by default the teacher's argmax,
/// which gives the student `pseudo-label`'s file gives (hard, or soft, whose argmax it takes);
/// given the gold labels as its file it is `ce`, bit for bit.
#[test]
fn slkd_trains_on_the_teachers_hard_labels() {
    let dir = scratch("distill-slkd");
    let Some((teacher, task)) = teacher(&dir) else { return };
    let data = ["--task", "sst2", "--data", s(&task), "--max-len", "32"];
    let (hard, soft, gold) = (dir.join("hard.jsonl"), dir.join("soft.jsonl"), dir.join("gold.jsonl"));
    ok(kd(&[&["pseudo-label", "--teacher", s(&teacher), "--out", s(&hard)][..], &data].concat()));
    ok(kd(&[&["pseudo-label", "--teacher", s(&teacher), "--soft", "--out", s(&soft)][..], &data].concat()));
    let train = std::fs::read_to_string(task.join("train.tsv")).unwrap();
    let gold_lines: Vec<String> = train
        .lines()
        .skip(1)
        .map(|l| format!("{{\"label\": \"{}\"}}\n", l.rsplit('\t').next().unwrap().trim()))
        .collect();
    std::fs::write(&gold, gold_lines.concat()).unwrap();

    let run = |name: &str, method: &[&str]| {
        let out = dir.join(name);
        distill(&teacher, &task, &out, method);
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let slkd = run("slkd", &["--method", "slkd"]);
    assert!(slkd == run("slkd-hard", &["--method", "slkd", "--labels-file", s(&hard)]), "not the teacher's argmax");
    assert!(slkd == run("slkd-soft", &["--method", "slkd", "--labels-file", s(&soft)]), "soft labels not argmaxed");
    let ce = run("ce", &["--method", "ce"]);
    assert!(ce == run("slkd-gold", &["--method", "slkd", "--labels-file", s(&gold)]), "gold labels do not give ce");
    // The teacher (deterministic) disagrees with some gold labels, so its labels train another
    // student.
    let disagree = std::fs::read_to_string(&hard)
        .unwrap()
        .lines()
        .zip(train.lines().skip(1))
        .filter(|(h, g)| {
            let h: serde_json::Value = serde_json::from_str(h).unwrap();
            h["label"].to_string().trim_matches('"') != g.rsplit('\t').next().unwrap().trim()
        })
        .count();
    assert!(disagree > 0, "the teacher agrees with every gold label: the test shows nothing");
    assert!(slkd != ce, "slkd trained on the gold labels");
    fails_with(flags_only(&["--method", "slkd", "--keep", "0.3"]), &["--keep is not an option of --method slkd"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
