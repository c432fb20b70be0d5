//! `kd-cli` on encoder families besides BERT: the tiny RoBERTa, ELECTRA and DistilBERT of
//! tests/assets/families are fine-tuned, distilled into a student of their family and reloaded,
//! all under the family's names; model folders kd cannot read fail with one line.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn family(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/assets/families").join(name)
}

/// A learnable word task over the tiny vocabulary: label 1 when most words are below w50.
fn write_words(path: &Path, rows: usize, seed: usize) {
    let mut text = String::from("text\tlabel\n");
    for r in 0..rows {
        let words: Vec<usize> = (0..3 + (r * 7 + seed) % 9).map(|i| 5 + (r * 31 + i * 17 + seed) % 94).collect();
        let low = words.iter().filter(|&&w| w < 50).count();
        let line: Vec<String> = words.iter().map(|w| format!("w{w}")).collect();
        text += &format!("{}\t{}\n", line.join(" "), u8::from(2 * low > words.len()));
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn roberta_finetune_distill_and_eval_keep_its_names() {
    let dir = end_to_end("roberta", "Roberta", ROBERTA_HEAD);
    let [teacher, student, train, dev] = ["teacher", "student", "train.tsv", "dev.tsv"].map(|f| dir.join(f));
    let data = ["--train", s(&train), "--dev", s(&dev), "--max-len", "32", "--epochs", "1"];
    // A BERT student cannot read the RoBERTa teacher's tokens.
    let bert_config = dir.join("bert.json");
    let bert = r#"{"vocab_size": 99, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "intermediate_size": 32, "max_position_embeddings": 40, "pad_token_id": 1}"#;
    std::fs::write(&bert_config, bert).unwrap();
    let args = ["distill", "--method", "kd", "--teacher", s(&teacher), "--student-config", s(&bert_config)];
    fails_with(
        kd(&[&args[..], &["--out", s(&dir.join("mixed"))], &data].concat()),
        &["bert.json", "a Bert student", "Roberta teacher"],
    );
    // 38 of RoBERTa's 40 position rows are left for tokens (the first are padding_idx's).
    fails_with(
        kd(&["eval", "--model", s(&student), "--dev", s(&dev), "--max-len", "39"]),
        &["--max-len 39", "38 tokens"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn electra_finetune_distill_and_eval_keep_its_names() {
    let dir = end_to_end("electra", "Electra", ROBERTA_HEAD);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn distilbert_finetune_distill_and_eval_keep_its_names() {
    let dir = end_to_end("distilbert", "DistilBert", ["pre_classifier.", "classifier."]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The prefixes of the classifier head's two dense layers in RoBERTa's and ELECTRA's files.
const ROBERTA_HEAD: [&str; 2] = ["classifier.dense.", "classifier.out_proj."];

/// Fine-tunes the family's tiny model, distils it into a student of the family, checks the
/// student's names (the encoder's under `{name}.`, the head's under `head`) and architecture,
/// and that it reloads to the accuracy training reported.
fn end_to_end(name: &str, class_prefix: &str, head: [&str; 2]) -> PathBuf {
    let dir = scratch(name);
    let (train, dev) = (dir.join("train.tsv"), dir.join("dev.tsv"));
    write_words(&train, 96, 0);
    write_words(&dev, 32, 5);
    let data = ["--train", s(&train), "--dev", s(&dev), "--max-len", "32", "--epochs", "1", "--json"];
    let (model, teacher, student) = (family(name), dir.join("teacher"), dir.join("student"));
    ok(kd(&[&["finetune", "--model", s(&model), "--out", s(&teacher)][..], &data].concat()));
    let args = ["distill", "--method", "kd", "--teacher", s(&teacher), "--student", s(&model)];
    let distilled = last_json(&ok(kd(&[&args[..], &["--out", s(&student)], &data].concat())));

    let config: Value = serde_json::from_str(&std::fs::read_to_string(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], format!("{class_prefix}ForSequenceClassification"));
    assert_eq!(config["model_type"], name);
    let names = kd_kernels::io::read_safetensors(&student.join("model.safetensors")).unwrap();
    let prefix = format!("{name}.");
    let ours = |k: &String| k.starts_with(&prefix) || head.iter().any(|h| k.starts_with(h));
    assert!(names.keys().all(ours), "{:?}", names.keys());
    assert!(head.iter().all(|h| names.contains_key(&format!("{h}weight"))), "{:?}", names.keys());

    let eval = last_json(&ok(kd(&["eval", "--model", s(&student), "--dev", s(&dev), "--max-len", "32", "--json"])));
    assert_eq!(eval["accuracy"], distilled["accuracy"]);
    dir
}

#[test]
fn unreadable_model_folders_fail_with_one_line() {
    let dir = scratch("folders");
    let dev = dir.join("dev.tsv");
    write_words(&dev, 8, 0);
    let copy = |name: &str, skip: &str| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(family("roberta")).unwrap() {
            let from = entry.unwrap().path();
            if !from.ends_with(skip) {
                std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
            }
        }
        to
    };
    let pytorch = copy("pytorch", "model.safetensors");
    std::fs::write(pytorch.join("pytorch_model.bin"), b"pickle").unwrap();
    let eval = |model: &Path| kd(&["eval", "--model", s(model), "--dev", s(&dev), "--max-len", "16"]);
    fails_with(eval(&pytorch), &["pytorch_model.bin", "convert", "safetensors"]);

    let xlnet = copy("xlnet", "golden.safetensors");
    let config = std::fs::read_to_string(xlnet.join("config.json")).unwrap().replace("\"roberta\"", "\"xlnet\"");
    std::fs::write(xlnet.join("config.json"), config).unwrap();
    fails_with(eval(&xlnet), &["\"xlnet\"", "bert, roberta, electra, distilbert"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
