//! The `kd-cli` binary end to end: fine-tune the real paraphrase-MiniLM-L3-v2 on a few SST-2
//! examples, reload what it saved with `eval` and `predict`, and fail cleanly on bad input.
mod common;

use common::*;
use kd_model::testing::{minilm_dir, STUDENT};
use serde_json::Value;

fn metric_keys(v: &Value) -> Vec<&str> {
    let keys = ["accuracy", "f1", "mcc", "pearson", "spearman"];
    keys.into_iter().filter(|k| v.get(k).is_some()).collect()
}

#[test]
fn finetune_then_eval_and_predict_the_saved_model() {
    let dir = scratch("sst2");
    let Some((model, task)) = sst2(&dir, 200, 40) else { return };
    let out = dir.join("model");
    let data = ["--task", "sst2", "--data", s(&task), "--max-len", "32"];
    let mut args = vec!["finetune", "--model", s(&model), "--out", s(&out), "--max-train", "64", "--epochs", "1"];
    args.extend(["--batch", "32", "--eval-every", "1", "--json"]);
    let run = ok(kd(&[args, data.to_vec()].concat()));
    // The L3 sentence model has neither pooler nor classifier: both are made, and said so.
    assert!(stderr(&run).contains("new classifier and pooler with 2 output(s)"), "{}", stderr(&run));

    let result = last_json(&run);
    assert_eq!(result["task"], "sst2");
    assert_eq!(result["split"], "dev");
    assert_eq!(result["examples"], 40);
    assert!(result["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(metric_keys(&result), ["accuracy"]);
    let accuracy = result["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));

    // 64 examples in batches of 32, evaluated after each of the 2 steps.
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|l: &Value| l["split"] == "dev").collect();
    assert_eq!(lines.len(), 2, "{log}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        assert_eq!(line["epoch"].as_f64(), Some((i + 1) as f64 / 2.0));
        assert_eq!(line["split"], "dev");
        assert!(line["loss"].as_f64().unwrap().is_finite());
        assert_eq!(metric_keys(line), ["accuracy"]);
    }
    assert_eq!(lines[1]["accuracy"].as_f64(), Some(accuracy));

    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["id2label"], serde_json::json!({"0": "0", "1": "1"}));
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");

    // The saved folder reloads and scores exactly what training reported.
    let eval = ok(kd(&[&["eval", "--model", s(&out), "--batch", "32", "--json"][..], &data].concat()));
    let evaluated = last_json(&eval);
    assert_eq!(evaluated["accuracy"].as_f64(), Some(accuracy));
    assert_eq!((evaluated["split"].as_str(), evaluated["examples"].as_u64()), (Some("dev"), Some(40)));

    // predict: one line per dev example, in order; its argmax labels give the same accuracy.
    let predictions = dir.join("dev.jsonl");
    ok(kd(&[&["predict", "--model", s(&out), "--out", s(&predictions)][..], &data].concat()));
    let gold: Vec<u64> = std::fs::read_to_string(task.join("dev.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.rsplit('\t').next().unwrap().parse().unwrap())
        .collect();
    let text = std::fs::read_to_string(&predictions).unwrap();
    let rows: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), gold.len());
    let mut correct = 0;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["index"], i as u64);
        let probs: Vec<f64> = row["probs"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
        assert_eq!(probs.len(), 2);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{row}");
        let id = row["label_id"].as_u64().unwrap();
        assert_eq!(id, (probs[1] > probs[0]) as u64, "{row}");
        assert_eq!(row["label"], id.to_string());
        correct += (id == gold[i]) as usize;
    }
    assert_eq!(correct as f64 / gold.len() as f64, accuracy);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn finetune_on_generic_files_keeps_the_label_names() {
    let dir = scratch("generic");
    let Some(model) = minilm_dir().map(|d| d.join(STUDENT)) else { return };
    // Quoted CSV with string labels; no dev file, so the result is measured on train.
    let mut csv = String::from("review,sentiment\n");
    for i in 0..8 {
        csv += &format!("\"a fine, {i} times watchable film\",good\n\"dull, {i} hours too long\",bad\n");
    }
    let train = dir.join("reviews.csv");
    std::fs::write(&train, csv).unwrap();
    let out = dir.join("model");
    let mut args = vec!["finetune", "--model", s(&model), "--out", s(&out), "--train", s(&train)];
    args.extend(["--text-column", "review", "--label-column", "sentiment", "--epochs", "1", "--batch", "8"]);
    args.extend(["--max-len", "16", "--json"]);
    let result = last_json(&ok(kd(&args)));
    assert_eq!((result["task"].as_str(), result["split"].as_str()), (Some("reviews"), Some("train")));
    assert_eq!(result["examples"], 16);
    assert_eq!(metric_keys(&result), ["accuracy"]);

    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["id2label"], serde_json::json!({"0": "good", "1": "bad"}));

    // Unlabelled JSONL in, names out, on stdout.
    let input = dir.join("new.jsonl");
    std::fs::write(&input, "{\"review\": \"what a film\"}\n\n{\"review\": \"so dull\"}\n").unwrap();
    let run = ok(kd(&["predict", "--model", s(&out), "--input", s(&input), "--text-column", "review"]));
    let rows: Vec<Value> = stdout(&run).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let id = row["label_id"].as_u64().unwrap() as usize;
        assert_eq!(row["label"], ["good", "bad"][id]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--gold-subset K` trains on K of the training rows: 8 rows in batches of 4 are 2 steps.
#[test]
fn finetune_gold_subset_trains_on_k_rows() {
    let dir = scratch("gold");
    let Some((model, task)) = sst2(&dir, 200, 40) else { return };
    let out = dir.join("model");
    let mut args = vec!["finetune", "--model", s(&model), "--out", s(&out), "--max-train", "64", "--gold-subset", "8"];
    args.extend(["--batch", "4", "--epochs", "1", "--eval-every", "1", "--task", "sst2", "--data", s(&task)]);
    ok(kd(&args));
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains(r#""split":"dev""#)).count(), 2, "{log}");
    // It is a peer-advised option of distill, refused elsewhere before anything loads.
    let distill = ["distill", "--method", "kd", "--teacher", s(&out), "--out", s(&dir), "--gold-subset", "8"];
    fails_with(kd(&distill), &["--gold-subset", "peer-advised"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_fails_with_one_line_naming_the_culprit() {
    let dir = scratch("errors");
    let missing = dir.join("no-such-model");
    let out = dir.join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["finetune", "--out", s(&out), "--epochs", "1"];
        args.extend(extra);
        kd(&args)
    };
    fails_with(
        run(&["--model", s(&missing), "--task", "sst2", "--data", s(&dir)]),
        &["no-such-model", "does not exist"],
    );
    if kd_kernels::Device::cuda(0).is_err() {
        fails_with(run(&["--model", s(&missing), "--task", "sst2", "--data", s(&dir), "--device", "cuda"]), &["cuda"]);
    }
    fails_with(run(&["--model", s(&missing), "--task", "sst3", "--data", s(&dir)]), &["unknown GLUE task 'sst3'"]);

    let Some(model) = minilm_dir().map(|d| d.join(STUDENT)) else { return };
    // A row with a stray tab: file and line.
    let bad = dir.join("bad.tsv");
    std::fs::write(&bad, "sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n").unwrap();
    fails_with(
        run(&["--model", s(&model), "--train", s(&bad), "--text-column", "sentence"]),
        &["bad.tsv:3:", "3 columns, expected 2"],
    );

    // Model folders whose parts disagree: a layer the weights lack, a tokenizer too big for the vocabulary.
    let config = std::fs::read_to_string(model.join("config.json")).unwrap();
    for (name, from, to, needles) in [
        ("four-layers", "\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4", ["encoder.layer.3.", "missing"]),
        ("small-vocab", "\"vocab_size\": 30522", "\"vocab_size\": 1000", ["tokenizer.json", "vocab_size is 1000"]),
    ] {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        assert!(config.contains(from), "{config}");
        std::fs::write(folder.join("config.json"), config.replace(from, to)).unwrap();
        for file in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(model.join(file), folder.join(file)).unwrap();
        }
        let train = dir.join("ok.tsv");
        std::fs::write(&train, "sentence\tlabel\ngood film\t1\nbad film\t0\n").unwrap();
        fails_with(run(&["--model", s(&folder), "--train", s(&train), "--text-column", "sentence"]), &needles);
    }

    // eval needs a classifier; the checkpoint is a bare encoder.
    fails_with(
        kd(&["eval", "--model", s(&model), "--dev", s(&bad), "--text-column", "sentence"]),
        &["no classification head"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_subcommand_prints_help() {
    let out = kd(&[]);
    let text = stdout(&out) + &stderr(&out);
    for command in ["finetune", "eval", "predict"] {
        assert!(text.contains(command), "{text}");
    }
}
