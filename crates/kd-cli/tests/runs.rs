//! Runs that lose nothing and say what is wrong (docs/RUNS.md), end to end on the real
//! paraphrase-MiniLM-L3-v2 and a few SST-2 rows: OUT is locked, is never an input, keeps its
//! files when a run fails before training, resumes only its own checkpoint (trimming
//! metrics.jsonl to it); outputs survive a full disk; labels, vocabularies and weights are
//! checked.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

/// The student checkpoint and an SST-2 folder of 48 training and 16 dev rows in `dir`.
fn data(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    sst2(dir, 48, 16)
}

/// A fine-tune of 6 steps (48 rows in batches of 8), evaluated after each, its state written
/// every 3 steps.
fn finetune(model: &Path, task: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["finetune", "--model", s(model), "--task", "sst2", "--data", s(task), "--out", s(out)];
    args.extend(["--epochs", "1", "--batch", "8", "--max-len", "32", "--eval-every", "1", "--checkpoint-every", "3"]);
    // One training record, at the last step: the first lines of the log are the evaluations.
    args.extend(["--log-every", "1000"]);
    args.push("--json");
    args.extend(extra);
    args.into_iter().map(String::from).collect()
}

fn run(args: &[String]) -> std::process::Output {
    kd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn lines(path: &Path) -> Vec<Value> {
    String::from_utf8(read(path)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The fine-tuned teacher of these tests (made once) and its SST-2 folder.
fn teacher() -> Option<&'static (PathBuf, PathBuf)> {
    static TEACHER: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    TEACHER
        .get_or_init(|| {
            let dir = scratch("runs-teacher");
            let (model, task) = data(&dir)?;
            let out = dir.join("teacher");
            ok(run(&finetune(&model, &task, &out, &["--lr", "1e-4"])));
            for part in ["best", "checkpoint"] {
                std::fs::remove_dir_all(out.join(part)).unwrap();
            }
            Some((out, task))
        })
        .as_ref()
}

/// A copy of a model folder's files, `edit` applied to each (name, bytes).
fn copy_model(from: &Path, to: &Path, edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            let name = entry.file_name().into_string().unwrap();
            std::fs::write(to.join(&name), edit(&name, read(&entry.path()))).unwrap();
        }
    }
}

/// An interrupted fine-tune resumes to the uninterrupted run's model and log; a checkpoint of
/// other flags or data is refused, naming them, and no failed start changes OUT.
#[test]
fn resume_continues_only_its_own_checkpoint_and_trims_the_log() {
    let dir = scratch("runs-resume");
    let Some((model, task)) = data(&dir) else { return };
    let whole = dir.join("whole");
    ok(run(&finetune(&model, &task, &whole, &[])));
    assert_eq!(lines(&whole.join("metrics.jsonl")).len(), 7);

    // Kill a second run after its 4th evaluation: its state is that of step 3.
    let part = dir.join("part");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kd-cli"))
        .args(finetune(&model, &task, &part, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = part.join("metrics.jsonl");
    while std::fs::read(&log).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count()) < 4 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its 4th evaluation");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let state = part.join("checkpoint/finetune/train_state.safetensors");
    let meta = kd_kernels::io::read_safetensors_metadata(&state).unwrap();
    assert_eq!(meta["step"], "3", "the run was not stopped between its checkpoints");
    assert!(part.join("kd.lock").exists(), "a killed run leaves its lock");
    let interrupted = read(&log);

    // Other flags or other data: refused, each difference named, nothing in OUT changed.
    let refused = [
        (vec!["--resume", "--lr", "1e-4"], vec!["--lr was 0.00005 and is now 0.0001"]),
        (
            vec!["--resume", "--seed", "7", "--max-train", "40"],
            vec!["--seed was 42 and is now 7", "--max-train", "training data"],
        ),
    ];
    for (i, (extra, needles)) in refused.into_iter().enumerate() {
        let out = run(&finetune(&model, &task, &part, &extra));
        // The first run after the kill finds its lock, of a process gone.
        assert_eq!(stderr(&out).contains("taking the lock over"), i == 0, "{}", stderr(&out));
        fails_with(out, &[&["--resume", "run.json"][..], &needles].concat());
        assert!(read(&log) == interrupted && state.exists(), "{extra:?} changed OUT");
    }

    // The same flags: the log is trimmed to step 3 and the run ends as the uninterrupted one.
    let resumed = ok(run(&finetune(&model, &task, &part, &["--resume"])));
    let err = stderr(&resumed);
    assert!(err.contains("resumed after step 3") && err.contains("dropped"), "{err}");
    // Training records' speed is a timing, and their mean loss covers the steps since the last
    // record or the resume: the rest of each line repeats the uninterrupted run.
    let repeatable = |path: &Path| -> Vec<Value> {
        let mut lines = lines(path);
        for line in lines.iter_mut().filter(|l| l.get("lr").is_some()) {
            let obj = line.as_object_mut().unwrap();
            obj.remove("examples_per_s");
            obj.remove("loss");
        }
        lines
    };
    assert_eq!(
        repeatable(&log),
        repeatable(&whole.join("metrics.jsonl")),
        "the resumed log is not the uninterrupted one"
    );
    assert!(read(&part.join("model.safetensors")) == read(&whole.join("model.safetensors")));
    assert!(!part.join("kd.lock").exists(), "the lock outlived the run");

    // A fresh run that fails before training (no data, a held lock) leaves the old run whole.
    let before = read(&log);
    fails_with(run(&finetune(&model, &task, &part, &["--max-train", "0"])), &["--max-train 0"]);
    std::fs::write(part.join("kd.lock"), format!("{} {}\n", std::process::id(), host())).unwrap();
    fails_with(run(&finetune(&model, &task, &part, &[])), &["in use by another kd run", "kd.lock"]);
    assert!(part.join("kd.lock").exists(), "a refused run removed the lock it did not hold");
    std::fs::remove_file(part.join("kd.lock")).unwrap();
    assert!(read(&log) == before && state.exists() && part.join("best/model.safetensors").exists());

    // A checkpoint whose flags are unknown is not resumed blindly.
    std::fs::remove_file(part.join("checkpoint/run.json")).unwrap();
    fails_with(run(&finetune(&model, &task, &part, &["--resume"])), &["has no run.json"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// An output folder that is an input, or would overwrite or remove one, is refused before
/// anything is read or written.
#[test]
fn out_may_not_be_an_input() {
    let dir = scratch("runs-out");
    let (m, t, o) = (dir.join("model"), dir.join("glue"), dir.join("out"));
    let finetune = |out: &Path, extra: &[&str]| {
        let args = ["finetune", "--model", s(&m), "--task", "sst2", "--data", s(&t), "--out", s(out)];
        kd(&[&args[..], extra].concat())
    };
    fails_with(finetune(&m, &[]), &["--out", "would overwrite --model"]);
    fails_with(finetune(&dir.join("glue/./"), &[]), &["would overwrite --data"]);
    let distill = |out: &Path, extra: &[&str]| {
        let args =
            ["distill", "--method", "kd", "--teacher", s(&m), "--out", s(out), "--task", "sst2", "--data", s(&t)];
        kd(&[&args[..], extra].concat())
    };
    fails_with(distill(&o, &["--student", s(&o.join("best"))]), &["would overwrite --student"]);
    fails_with(distill(&m, &["--student-layers", "0"]), &["would overwrite --teacher"]);
    let file = dir.join("train.tsv");
    std::fs::write(&file, "sentence\tlabel\n").unwrap();
    let args = ["pseudo-label", "--teacher", s(&m), "--train", s(&file), "--out", s(&file)];
    fails_with(kd(&args), &["--out", "would overwrite --train"]);
    assert!(!o.exists() && !m.exists(), "a refused run created its output");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A pseudo-label file written over an older one on a full disk (a file size limit: writes
/// past 1 KiB fail with EFBIG) leaves the old file whole and no temporary file; the temporary
/// file of a killed writer is removed by the next run.
#[test]
fn pseudo_labels_survive_a_full_disk() {
    let Some((teacher, task)) = teacher() else { return };
    let dir = scratch("runs-full-disk");
    let labels = dir.join("labels.jsonl");
    let args = ["pseudo-label", "--teacher", s(teacher), "--task", "sst2", "--data", s(task), "--max-len", "32"];
    let args: Vec<&str> = [&args[..], &["--soft", "--out", s(&labels)]].concat();
    ok(kd(&args));
    let old = read(&labels);
    assert!(old.len() > 1024, "the file must outgrow the limit");
    // SIGXFSZ ignored (and so ignored after exec): a write past the limit fails instead.
    let script = "trap '' XFSZ; ulimit -f 1; exec \"$0\" \"$@\"";
    let full = Command::new("bash").arg("-c").arg(script).arg(env!("CARGO_BIN_EXE_kd-cli")).args(&args).output();
    fails_with(full.unwrap(), &["labels.jsonl", "File too large"]);
    assert!(read(&labels) == old, "the old labels changed");
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["labels.jsonl"], "a temporary file was left");

    // A writer killed mid-write leaves its temporary file (of a process id not running).
    let stale = dir.join(".labels.jsonl.tmp4194305");
    std::fs::write(&stale, "half a file").unwrap();
    let again = ok(kd(&args));
    assert!(stderr(&again).contains("left by an interrupted write"), "{}", stderr(&again));
    assert!(!stale.exists() && read(&labels) == old);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--labels-file` rows are those of the whole training file, whatever --max-train draws; a file
/// that labels fewer rows is an error. Peer-advised logs each of its trainings as its own stage.
#[test]
fn labels_file_rows_are_those_of_the_whole_file() {
    let Some((teacher, task)) = teacher() else { return };
    let dir = scratch("runs-labels-file");
    let labels = dir.join("labels.jsonl");
    let data = ["--task", "sst2", "--data", s(task), "--max-len", "32"];
    ok(kd(&[&["pseudo-label", "--teacher", s(teacher), "--out", s(&labels)][..], &data].concat()));
    let short = dir.join("short.jsonl");
    let text = String::from_utf8(read(&labels)).unwrap();
    std::fs::write(&short, text.lines().take(16).map(|l| format!("{l}\n")).collect::<String>()).unwrap();

    let out = dir.join("student");
    let distill = |file: &Path| {
        let mut args = vec!["distill", "--method", "peer-advised", "--teacher", s(teacher), "--student-layers", "0"];
        args.extend(["--labels-file", s(file), "--max-train", "16", "--epochs", "1", "--batch", "8", "--out", s(&out)]);
        kd(&[&args[..], &data].concat())
    };
    ok(distill(&labels));
    let stages: Vec<String> = lines(&out.join("metrics.jsonl")).iter().map(|l| l["stage"].to_string()).collect();
    for stage in ["probe", "peer", "student"] {
        assert!(stages.contains(&format!("\"peer-advised/{stage}\"")), "{stages:?}");
    }
    fails_with(distill(&short), &["short.jsonl", "32 of 48 rows have no label"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Labels outside the task's set, a model whose classes are not the task's, a student of
/// another vocabulary, an alpha outside [0, 1], NaN weights and a diverging run: each an error
/// that names its cause, and none of them touches OUT.
#[test]
fn labels_vocabularies_and_weights_are_checked() {
    let Some((teacher, task)) = teacher() else { return };
    let Some((model, _)) = sst2(&scratch("runs-checks-data"), 1, 1) else { return };
    let dir = scratch("runs-checks");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"old\": true}\n").unwrap();
    let out_untouched = || assert_eq!(read(&out.join("metrics.jsonl")), b"{\"old\": true}\n");

    // A 7 among 0 and 1 in a training file; a name outside the teacher's classes.
    let train = dir.join("train.csv");
    std::fs::write(&train, "text,label\ngood,1\nbad,0\nodd,7\nfine,1\n").unwrap();
    let finetune = ["finetune", "--model", s(&model), "--train", s(&train), "--out", s(&out), "--max-len", "16"];
    fails_with(kd(&finetune), &["train.csv:4: label 7", "--allow-new-labels"]);
    std::fs::write(&train, "text,label\ngood,1\nbad,0\nodd,positive\n").unwrap();
    let distill = ["distill", "--method", "kd", "--teacher", s(teacher), "--out", s(&out), "--max-len", "16"];
    let with = |extra: &[&str]| kd(&[&distill[..], extra].concat());
    fails_with(with(&["--student-layers", "0", "--train", s(&train)]), &["train.csv:4: unknown label 'positive'"]);

    // alpha out of [0, 1]; a student whose vocabulary has the size of the teacher's but two
    // tokens swapped.
    let glue = ["--task", "sst2", "--data", s(task)];
    fails_with(with(&[&["--student-layers", "0", "--alpha", "1.5"][..], &glue].concat()), &["--alpha", "1.5"]);
    let swapped = dir.join("swapped");
    copy_model(&model, &swapped, |name, bytes| {
        if name != "tokenizer.json" {
            return bytes;
        }
        let mut json: Value = serde_json::from_slice(&bytes).unwrap();
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        let (the, a) = (vocab["the"].clone(), vocab["a"].clone());
        (vocab["the"], vocab["a"]) = (a, the);
        serde_json::to_vec(&json).unwrap()
    });
    fails_with(with(&[&["--student", s(&swapped)][..], &glue].concat()), &["does not share the teacher's vocabulary"]);

    // A model that numbers the task's classes otherwise: eval refuses to score it.
    let renamed = dir.join("renamed");
    copy_model(teacher, &renamed, |name, bytes| {
        if name != "config.json" {
            return bytes;
        }
        let mut config: Value = serde_json::from_slice(&bytes).unwrap();
        config["id2label"] = serde_json::json!({"0": "positive", "1": "negative"});
        config["label2id"] = serde_json::json!({"positive": 0, "negative": 1});
        serde_json::to_vec(&config).unwrap()
    });
    let eval = ["eval", "--model", s(&renamed), "--task", "sst2", "--data", s(task), "--max-len", "32"];
    fails_with(kd(&eval), &["id2label: 0 positive, 1 negative", "not sst2's (0 0, 1 1)"]);

    // A NaN weight is refused at load, naming the tensor; a diverging run names the model and step.
    let poisoned = dir.join("poisoned");
    copy_model(&model, &poisoned, |_, bytes| bytes);
    let weights = poisoned.join("model.safetensors");
    let mut arrays = kd_kernels::io::read_safetensors(&weights).unwrap();
    arrays.get_mut("encoder.layer.1.attention.self.query.bias").unwrap().data[3] = f32::NAN;
    kd_kernels::io::write_safetensors(&weights, &arrays, None).unwrap();
    let finetune = |model: &Path, extra: &[&str]| {
        let args =
            ["finetune", "--model", s(model), "--out", s(&out), "--epochs", "1", "--batch", "8", "--max-len", "32"];
        kd(&[&args[..], &glue, extra].concat())
    };
    fails_with(finetune(&poisoned, &[]), &["'encoder.layer.1.attention.self.query.bias'", "NaN", "element 3"]);
    out_untouched();
    fails_with(finetune(&model, &["--lr", "1e30", "--warmup", "0"]), &["the student's loss is NaN at step 2"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
