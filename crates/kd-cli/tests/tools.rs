//! The data and model tools of `kd-cli` end to end: `noise` on the real SST-2 and on generic
//! files, `pseudo-label` with a fine-tuned paraphrase-MiniLM-L3-v2, `train-generator` on SST-2
//! sentences, and `--config FILE` against the same flags.
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{fails_with, kd, last_json, ok, s, scratch, sst2_head, stderr};
use kd_kernels::assets::asset;
use kd_kernels::Device;
use kd_methods::data::{load_glue, load_table, Column, Dataset, Format, GlueTask, Label, LabelKind, Split, TableSpec};
use kd_methods::pseudo::{read_jsonl, PseudoLabels};
use kd_model::testing::{minilm_dir, STUDENT};
use kd_model::{BertConfig, BertWeights};
use serde_json::Value;

fn student() -> Option<PathBuf> {
    minilm_dir().map(|d| d.join(STUDENT))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn class(label: &Label) -> usize {
    match label {
        Label::Class(c) => *c,
        other => panic!("not a class label: {other:?}"),
    }
}

/// The rows whose label differs between two loads of the same rows.
fn diff(clean: &Dataset, noisy: &Dataset) -> Vec<usize> {
    assert_eq!(clean.len(), noisy.len());
    let pairs = clean.examples.iter().zip(&noisy.examples).enumerate();
    pairs
        .filter(|(_, (a, b))| {
            assert_eq!((&a.text_a, &a.text_b), (&b.text_a, &b.text_b), "a text changed");
            a.label != b.label
        })
        .map(|(i, _)| i)
        .collect()
}

fn flipped_list(record: &Value) -> Vec<usize> {
    record["flipped"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
}

/// The flags of the tiny fine-tune that makes the teacher of these tests.
fn finetune_flags<'a>(model: &'a Path, task: &'a Path) -> Vec<&'a str> {
    let mut args = vec!["--model", s(model), "--task", "sst2", "--data", s(task), "--max-train", "64"];
    args.extend(["--epochs", "1", "--batch", "32", "--lr", "1e-4", "--max-len", "32", "--seed", "7", "--json"]);
    args
}

/// paraphrase-MiniLM-L3-v2 fine-tuned on 64 SST-2 examples (made once for all tests), the
/// SST-2 folder it trained on (200 train, 40 dev rows) and its `--json` result.
fn teacher() -> Option<&'static (PathBuf, PathBuf, Value)> {
    static TEACHER: OnceLock<Option<(PathBuf, PathBuf, Value)>> = OnceLock::new();
    TEACHER
        .get_or_init(|| {
            let dir = scratch("teacher");
            let (model, task) = (student()?, sst2_head(&dir, 200, 40)?);
            let out = dir.join("model");
            let run = ok(kd(&[&["finetune", "--out", s(&out)][..], &finetune_flags(&model, &task)].concat()));
            // Only the final model is used: the rest would crowd the disk.
            for part in ["best", "checkpoint"] {
                std::fs::remove_dir_all(out.join(part)).unwrap();
            }
            Some((out, task, last_json(&run)))
        })
        .as_ref()
}

#[test]
fn noise_flips_about_r_of_real_sst2_and_the_copy_trains() {
    let dir = scratch("noise-sst2");
    let (Some(glue), Some(model)) = (asset("data/glue/SST-2"), student()) else { return };
    let noisy_dir = dir.join("SST-2");
    std::fs::create_dir_all(&noisy_dir).unwrap();
    let out = noisy_dir.join("train.tsv");
    let noise = |seed: &str| {
        let args = ["noise", "--task", "sst2", "--data", s(&glue), "--rate", "0.3", "--noise-seed", seed];
        last_json(&ok(kd(&[&args[..], &["--out", s(&out), "--json"]].concat())))
    };
    let summary = noise("0");

    let clean = load_glue(GlueTask::Sst2, &glue, Split::Train, false).unwrap();
    let noisy = load_glue(GlueTask::Sst2, &noisy_dir, Split::Train, false).unwrap();
    let record = read_json(&dir.join("SST-2/train.tsv.flipped.json"));
    let flipped = flipped_list(&record);
    assert_eq!(flipped, diff(&clean, &noisy), "the list is exactly the rows whose label changed");
    let rate = flipped.len() as f64 / clean.len() as f64;
    assert!((rate - 0.3).abs() < 0.01, "flipped {rate} of the labels");
    assert_eq!(record["rate"].as_f64(), Some(rate));
    assert_eq!(summary["rate"].as_f64(), Some(rate));
    assert_eq!((summary["rows"].as_u64(), summary["flipped"].as_u64()), (Some(67349), Some(flipped.len() as u64)));
    // Two classes: a flip is always to the other one.
    for &i in &flipped {
        assert_eq!(class(&noisy.examples[i].label), 1 - class(&clean.examples[i].label));
    }

    // The header and every unflipped line are copied byte for byte.
    let (source, copy) =
        (std::fs::read_to_string(glue.join("train.tsv")).unwrap(), std::fs::read_to_string(&out).unwrap());
    let changed: Vec<usize> =
        source.lines().zip(copy.lines()).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
    assert_eq!(source.lines().count(), copy.lines().count());
    assert_eq!(changed, flipped.iter().map(|i| i + 1).collect::<Vec<_>>());

    // The noise seed, not any run seed, fixes the corruption.
    assert_eq!(flipped_list(&read_json(&dir.join("SST-2/train.tsv.flipped.json"))), flipped);
    noise("1");
    assert_ne!(flipped_list(&read_json(&dir.join("SST-2/train.tsv.flipped.json"))), flipped);

    // Beside a dev file, the copy is a GLUE folder that finetune trains on.
    let dev_head: String =
        std::fs::read_to_string(glue.join("dev.tsv")).unwrap().lines().take(21).map(|l| format!("{l}\n")).collect();
    std::fs::write(noisy_dir.join("dev.tsv"), dev_head).unwrap();
    let mut args = vec!["finetune", "--model", s(&model), "--task", "sst2", "--data", s(&noisy_dir)];
    args.extend(["--out", s(&dir), "--max-train", "16", "--epochs", "1", "--batch", "16", "--max-len", "16", "--json"]);
    let result = last_json(&ok(kd(&args)));
    assert_eq!((result["task"].as_str(), result["examples"].as_u64()), (Some("sst2"), Some(20)));
    // Model folders are large; only a failed test leaves its files to look at.
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn noise_keeps_generic_files_in_their_format() {
    let dir = scratch("noise-generic");
    // CSV: quoted commas and quotes, string labels, a column the loader does not read.
    let mut csv = String::from("id,review,sentiment\n");
    for i in 0..40 {
        let label = ["good", "bad"][i % 2];
        csv += &format!("{i},\"a \"\"fine\"\", {i} times watchable film\",{label}\n");
    }
    let train = dir.join("reviews.csv");
    std::fs::write(&train, &csv).unwrap();
    let out = dir.join("noisy.csv");
    let columns = ["--text-column", "review", "--label-column", "sentiment"];
    let args = [&["noise", "--train", s(&train), "--rate", "0.5", "--out", s(&out)][..], &columns].concat();
    let run = ok(kd(&args));
    assert!(common::stdout(&run).contains("labels (rate"), "{}", common::stdout(&run));

    let spec = |format, label_kind| TableSpec {
        format,
        has_header: true,
        text: Column::Name("review".into()),
        // The id column rides along as the pair text, to check it is kept.
        text_pair: Some(Column::Name("id".into())),
        label: Some(Column::Name("sentiment".into())),
        label_kind,
        skip_bad_rows: false,
        allow_new_labels: false,
    };
    let names = LabelKind::Classes { names: Some(vec!["good".into(), "bad".into()]) };
    let clean = load_table(&train, &spec(Format::Csv, names.clone())).unwrap();
    let noisy = load_table(&out, &spec(Format::Csv, names)).unwrap();
    let flipped = flipped_list(&read_json(&dir.join("noisy.csv.flipped.json")));
    assert_eq!(flipped, diff(&clean, &noisy));
    assert!(!flipped.is_empty() && flipped.len() < 40, "{flipped:?}");
    assert!(std::fs::read_to_string(&out).unwrap().starts_with("id,review,sentiment\n"));

    // The copy trains with the same flags as its source.
    let mut args = vec!["finetune", "--model", "", "--train", s(&out), "--out", s(&dir)];
    args.extend(columns);
    args.extend(["--epochs", "1", "--batch", "40", "--max-len", "16", "--json"]);
    if let Some(model) = student() {
        args[2] = s(&model);
        let result = last_json(&ok(kd(&args)));
        assert_eq!((result["task"].as_str(), result["examples"].as_u64()), (Some("noisy"), Some(40)));
    }

    // JSONL with integer labels, CRLF and an extra key; a transition matrix that rotates the
    // three classes flips every row, and numbers stay numbers.
    let mut jsonl = String::new();
    for i in 0..9 {
        jsonl += &format!("{{\"text\": \"t{i}\", \"label\": {}, \"extra\": [{i}]}}\r\n", i % 3);
    }
    let (train, out, matrix) = (dir.join("rows.jsonl"), dir.join("rows-noisy.jsonl"), dir.join("rotate.json"));
    std::fs::write(&train, jsonl).unwrap();
    std::fs::write(&matrix, "[[0, 1, 0], [0, 0, 1], [1, 0, 0]]").unwrap();
    let summary =
        last_json(&ok(kd(&["noise", "--train", s(&train), "--transition", s(&matrix), "--out", s(&out), "--json"])));
    assert_eq!((summary["flipped"].as_u64(), summary["rate"].as_f64()), (Some(9), Some(1.0)));
    let copy = std::fs::read_to_string(&out).unwrap();
    assert_eq!(copy.matches("\r\n").count(), 9);
    for (i, line) in copy.lines().enumerate() {
        let row: Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["label"].as_u64(), Some((i as u64 + 1) % 3), "{line}");
        assert_eq!((row["text"].as_str(), row["extra"][0].as_u64()), (Some(format!("t{i}").as_str()), Some(i as u64)));
    }

    // Errors: one line, naming what is wrong.
    let noise =
        |extra: &[&str]| kd(&[&["noise", "--train", s(&train), "--out", s(&dir.join("x.jsonl"))][..], extra].concat());
    fails_with(noise(&["--rate", "1.5"]), &["--rate", "not in [0, 1]"]);
    std::fs::write(&matrix, "[[0.5, 0.5], [0, 1]]").unwrap();
    fails_with(noise(&["--transition", s(&matrix)]), &["rotate.json", "3x3"]);
    std::fs::write(&matrix, "[[0.5, 0.5],").unwrap();
    fails_with(noise(&["--transition", s(&matrix)]), &["rotate.json", "JSON matrix"]);
    fails_with(kd(&["noise", "--train", s(&train), "--rate", "0.1", "--out", s(&train)]), &["overwrite"]);
    let (bad, scrap) = (dir.join("bad.tsv"), dir.join("x.tsv"));
    std::fs::write(&bad, "text\tlabel\na\t0\nb\t1\t2\n").unwrap();
    let args = ["noise", "--train", s(&bad), "--rate", "0.1", "--out", s(&scrap), "--skip-bad-rows"];
    fails_with(kd(&args), &["bad.tsv", "line 3", "fix or remove"]);
    if let Some(stsb) = asset("data/glue/STS-B") {
        let args = ["noise", "--task", "stsb", "--data", s(&stsb), "--rate", "0.1", "--out", s(&scrap)];
        fails_with(kd(&args), &["classification"]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pseudo_label_writes_one_teacher_label_per_example() {
    let dir = scratch("pseudo");
    let Some((teacher, task, _)) = teacher() else { return };
    let names = vec!["0".to_string(), "1".to_string()];
    let label = |extra: &[&str], out: &Path| {
        let args = ["pseudo-label", "--teacher", s(teacher), "--task", "sst2", "--data", s(task), "--max-len", "32"];
        last_json(&ok(kd(&[&args[..], extra, &["--out", s(out), "--json"]].concat())))
    };
    let (hard_file, soft_file) = (dir.join("hard.jsonl"), dir.join("soft.jsonl"));
    let summary = label(&["--split", "dev"], &hard_file);
    assert_eq!((summary["examples"].as_u64(), summary["labels"].as_str()), (Some(40), Some("hard")));
    label(&["--split", "dev", "--soft"], &soft_file);
    for file in [&hard_file, &soft_file] {
        assert_eq!(std::fs::read_to_string(file).unwrap().lines().count(), 40);
    }
    let hard = read_jsonl(&hard_file, &names, 40).unwrap();
    let PseudoLabels::Soft(probs) = read_jsonl(&soft_file, &names, 40).unwrap() else { panic!("soft labels") };
    assert!(probs.iter().all(|p| p.len() == 2 && (p.iter().sum::<f32>() - 1.0).abs() < 1e-5));
    assert_eq!(hard.hard(), PseudoLabels::Soft(probs).hard(), "hard labels are the argmax of the soft ones");
    let counts = &summary["classes"];
    assert_eq!(counts["0"].as_u64().unwrap() + counts["1"].as_u64().unwrap(), 40);

    // The same classes as the teacher's predictions.
    let predictions = dir.join("predict.jsonl");
    let args = ["predict", "--model", s(teacher), "--task", "sst2", "--data", s(task), "--max-len", "32"];
    ok(kd(&[&args[..], &["--out", s(&predictions)]].concat()));
    let predicted: Vec<u32> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["label_id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(hard.hard(), predicted);

    // Unlabelled text from a generic file; the training split is the default.
    let input = dir.join("new.jsonl");
    std::fs::write(&input, "{\"text\": \"what a film\"}\n\n{\"text\": \"so dull\"}\n{\"text\": \"fine\"}\n").unwrap();
    let out = dir.join("new-labels.jsonl");
    ok(kd(&["pseudo-label", "--teacher", s(teacher), "--input", s(&input), "--out", s(&out)]));
    assert_eq!(read_jsonl(&out, &names, 3).unwrap().len(), 3);
    assert_eq!(label(&[], &out)["examples"].as_u64(), Some(200));
    assert_eq!(read_jsonl(&out, &names, 200).unwrap().len(), 200);

    // A bare encoder cannot label; a regression task does not fit a classifier.
    let bare = student().unwrap();
    fails_with(
        kd(&["pseudo-label", "--teacher", s(&bare), "--input", s(&input), "--out", s(&out)]),
        &["no classification head"],
    );
    if let Some(stsb) = asset("data/glue/STS-B") {
        let args = ["pseudo-label", "--teacher", s(teacher), "--task", "stsb", "--data", s(&stsb), "--out", s(&out)];
        fails_with(kd(&args), &["classification", "regression"]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_generator_lowers_the_held_out_mlm_loss_and_saves_a_masked_lm() {
    let dir = scratch("generator");
    let (Some(model), Some(glue)) = (student(), asset("data/glue/SST-2")) else { return };
    let train = std::fs::read_to_string(glue.join("train.tsv")).unwrap();
    let sentences: Vec<&str> = train.lines().skip(1).take(200).map(|l| l.split('\t').next().unwrap()).collect();
    let text = dir.join("sentences.txt");
    std::fs::write(&text, sentences.join("\n\n")).unwrap();
    let out = dir.join("generator");
    let mut args = vec!["train-generator", "--model", s(&model), "--out", s(&out), "--text", s(&text)];
    args.extend(["--epochs", "1", "--max-len", "32", "--json"]);
    let result = last_json(&ok(kd(&args)));
    assert_eq!((result["train_texts"].as_u64(), result["held_out_texts"].as_u64()), (Some(180), Some(20)));
    let (before, after) = (&result["before"], &result["after"]);
    assert!(result["masked_tokens"].as_u64().unwrap() > 10, "{result}");
    assert!(
        after["loss"].as_f64().unwrap() < before["loss"].as_f64().unwrap(),
        "held-out MLM loss did not fall: {result}"
    );

    // An HF BertForMaskedLM folder: its config, tokenizer files, and weights with an MLM head on
    // the source encoder, unchanged.
    let config = BertConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(read_json(&out.join("config.json"))["architectures"][0], "BertForMaskedLM");
    for file in ["tokenizer.json", "vocab.txt"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let saved = BertWeights::load(&out.join("model.safetensors"), &config, &Device::Cpu).unwrap();
    assert!(saved.mlm_head.is_some() && saved.classifier.is_none());
    let source_config = BertConfig::from_file(&model.join("config.json")).unwrap();
    let source = BertWeights::load(&model.join("model.safetensors"), &source_config, &Device::Cpu).unwrap();
    let last = |w: &BertWeights| w.layers.last().unwrap().output.weight.to_vec().unwrap();
    assert!(last(&saved) == last(&source), "the encoder moved");

    // The training split of a data set, and too little text.
    let (tsv, out2) = (dir.join("few.tsv"), dir.join("g2"));
    std::fs::write(
        &tsv,
        format!("sentence\tlabel\n{}", sentences[..20].iter().map(|t| format!("{t}\t1\n")).collect::<String>()),
    )
    .unwrap();
    let mut args = vec!["train-generator", "--model", s(&model), "--out", s(&out2), "--train", s(&tsv)];
    args.extend(["--text-column", "sentence", "--epochs", "1", "--max-len", "16", "--json"]);
    let result = last_json(&ok(kd(&args)));
    assert_eq!((result["train_texts"].as_u64(), result["held_out_texts"].as_u64()), (Some(18), Some(2)));
    std::fs::write(&text, "one line\n").unwrap();
    fails_with(kd(&["train-generator", "--model", s(&model), "--out", s(&out), "--text", s(&text)]), &["at least 2"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_generator_unfrozen_moves_the_encoder_and_measures_on_held_out_text() {
    let dir = scratch("generator-unfrozen");
    let (Some(model), Some(glue)) = (student(), asset("data/glue/SST-2")) else { return };
    let sentences = |file: &str, n: usize| -> String {
        let text = std::fs::read_to_string(glue.join(file)).unwrap();
        text.lines().skip(1).take(n).map(|l| l.split('\t').next().unwrap()).collect::<Vec<_>>().join("\n")
    };
    let (half_a, half_b, dev) = (dir.join("a.txt"), dir.join("b.txt"), dir.join("dev.txt"));
    std::fs::write(&half_a, sentences("train.tsv", 60)).unwrap();
    std::fs::write(&half_b, sentences("dev.tsv", 40)).unwrap();
    std::fs::write(&dev, sentences("dev.tsv", 872).lines().skip(840).collect::<Vec<_>>().join("\n")).unwrap();
    let out = dir.join("generator");
    let texts = format!("{},{}", s(&half_a), s(&half_b));
    let mut args = vec!["train-generator", "--model", s(&model), "--out", s(&out), "--text", &texts];
    args.extend(["--held-out", s(&dev), "--unfreeze", "--epochs", "1", "--batch", "20", "--max-len", "32", "--json"]);
    let result = last_json(&ok(kd(&args)));
    // Both text files train, the dev file alone is measured on.
    assert_eq!((result["train_texts"].as_u64(), result["held_out_texts"].as_u64()), (Some(100), Some(32)));
    assert_eq!((result["unfreeze"].as_bool(), result["lr"].as_f64()), (Some(true), Some(1e-4f32 as f64)));
    assert!(result["after"]["loss"].as_f64() < result["before"]["loss"].as_f64(), "{result}");
    let config = BertConfig::from_file(&out.join("config.json")).unwrap();
    let saved = BertWeights::load(&out.join("model.safetensors"), &config, &Device::Cpu).unwrap();
    let source_config = BertConfig::from_file(&model.join("config.json")).unwrap();
    let source = BertWeights::load(&model.join("model.safetensors"), &source_config, &Device::Cpu).unwrap();
    let last = |w: &BertWeights| w.layers.last().unwrap().output.weight.to_vec().unwrap();
    assert!(last(&saved) != last(&source), "the encoder did not move");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_config_file_equals_its_flags_and_errors_name_the_file() {
    let dir = scratch("config");
    let Some((_, task, flag_result)) = teacher() else { return };
    let model = student().unwrap();
    // The same run as the teacher's flags, with `epochs` overridden from the command line.
    let config = dir.join("finetune.toml");
    let text = format!(
        "# the teacher of these tests\nmodel = \"{}\"\ntask = \"sst2\"\ndata = \"{}\"\nmax-train = 64\n\
         epochs = 4\nbatch = 32\nlr = 1e-4\nmax_len = 32\nseed = 7\njson = true\n",
        s(&model),
        s(task)
    );
    std::fs::write(&config, text).unwrap();
    let run = ok(kd(&["finetune", "--config", s(&config), "--out", s(&dir.join("model")), "--epochs", "1"]));
    let mut result = last_json(&run);
    let mut expected = flag_result.clone();
    for v in [&mut result, &mut expected] {
        v.as_object_mut().unwrap().remove("seconds");
    }
    assert_eq!(result, expected, "{}", stderr(&run));

    // The tools read config files too.
    let (csv, out) = (dir.join("rows.csv"), dir.join("noisy.csv"));
    std::fs::write(&csv, "text,label\na,x\nb,y\nc,x\nd,y\n").unwrap();
    let noise_config = dir.join("noise.toml");
    std::fs::write(&noise_config, format!("train = \"{}\"\nrate = 1.0\njson = true\n", s(&csv))).unwrap();
    let summary = last_json(&ok(kd(&["noise", "--config", s(&noise_config), "--out", s(&out)])));
    assert_eq!(summary["flipped"].as_u64(), Some(4));
    // A value the command line replaces is not even read.
    std::fs::write(&noise_config, format!("train = \"{}\"\nrate = \"all\"\njson = true\n", s(&csv))).unwrap();
    let summary = last_json(&ok(kd(&["noise", "--config", s(&noise_config), "--out", s(&out), "--rate", "0"])));
    assert_eq!(summary["flipped"].as_u64(), Some(0));

    let bad = dir.join("bad.toml");
    let finetune = || kd(&["finetune", "--config", s(&bad), "--out", s(&dir)]);
    for (contents, needles) in [
        ("task = \"sst2\"\nlrr = 1e-4\n", &["bad.toml:2:", "'--lrr'", "'--lr'"][..]),
        ("lr = \"fast\"\n", &["bad.toml:1:", "'fast'", "--lr"]),
        ("\n\nlr = \n", &["bad.toml:3:"]),
        ("json = 1\n", &["bad.toml:1:", "'json' is a switch"]),
        ("[finetune]\nlr = 1\n", &["bad.toml:1:", "table"]),
    ] {
        std::fs::write(&bad, contents).unwrap();
        fails_with(finetune(), needles);
    }
    fails_with(kd(&["finetune", "--config", s(&dir.join("none.toml")), "--out", s(&dir)]), &["none.toml"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
