mod common;

use std::path::Path;

use kd_model::BertConfig;
use serde_json::{json, Value};

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn reads_golden_configs() {
    let Some(path) = kd_kernels::assets::asset("golden/teacher_config/config.json") else { return };
    let c = BertConfig::from_file(&path).unwrap();
    assert_eq!((c.vocab_size, c.hidden_size, c.num_hidden_layers), (97, 32, 2));
    assert_eq!((c.num_attention_heads, c.intermediate_size, c.head_dim()), (4, 64, 8));
    assert_eq!((c.max_position_embeddings, c.type_vocab_size, c.pad_token_id), (32, 2, 0));
    assert_eq!((c.layer_norm_eps, c.hidden_dropout_prob, c.initializer_range), (1e-12, 0.0, 0.02));
    assert_eq!(c.num_labels(), 3);
    assert_eq!(c.id2label.as_ref().unwrap()[&2], "LABEL_2");
    assert_eq!(c.label2id.as_ref().unwrap()["LABEL_1"], 1);
    assert_eq!(c.extra["transformers_version"], json!("5.23.0"));
}

#[test]
fn reads_minilm_configs() {
    let Some(dir) = kd_model::testing::minilm_dir() else { return };
    for (model, layers) in [(kd_model::testing::TEACHER, 6), (kd_model::testing::STUDENT, 3)] {
        let c = BertConfig::from_file(&dir.join(model).join("config.json")).unwrap();
        assert_eq!((c.vocab_size, c.hidden_size, c.num_hidden_layers), (30522, 384, layers), "{model}");
        assert_eq!((c.num_attention_heads, c.intermediate_size, c.max_position_embeddings), (12, 1536, 512));
        assert_eq!(c.hidden_dropout_prob, 0.1);
        // A BertModel config has no labels: HF's default of two.
        assert_eq!((c.id2label.as_ref(), c.num_labels()), (None, 2));
    }
}

#[test]
fn save_writes_back_every_key() {
    let Some(golden) = kd_kernels::assets::asset("golden/student_config/config.json") else { return };
    let mut sources = vec![golden];
    if let Some(dir) = kd_model::testing::minilm_dir() {
        sources.push(dir.join(kd_model::testing::TEACHER).join("config.json"));
    }
    let dir = common::temp_dir("config-save");
    for src in sources {
        let saved = dir.join("config.json");
        BertConfig::from_file(&src).unwrap().save(&saved).unwrap();
        assert_eq!(read_json(&saved), read_json(&src), "{}", src.display());
    }
}

#[test]
fn labels_follow_num_labels() {
    let dir = common::temp_dir("config-labels");
    let path = dir.join("config.json");
    let base = json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 16, "num_labels": 4});
    std::fs::write(&path, base.to_string()).unwrap();
    let mut c = BertConfig::from_file(&path).unwrap();
    assert_eq!(c.num_labels(), 4);
    assert_eq!(c.id2label.as_ref().unwrap()[&3], "LABEL_3");
    assert!(!c.extra.contains_key("num_labels"));
    // HF defaults for the keys left out.
    assert_eq!((c.hidden_act.as_str(), c.max_position_embeddings, c.layer_norm_eps), ("gelu", 512, 1e-12));

    c.set_labels(vec!["neg".into(), "pos".into()]);
    c.set_num_labels(2);
    assert_eq!(c.id2label.as_ref().unwrap()[&1], "pos", "same count keeps the names");
    c.set_num_labels(1);
    assert_eq!(c.label2id.as_ref().unwrap()["LABEL_0"], 0);
    c.save(&path).unwrap();
    let saved = read_json(&path);
    assert_eq!(saved["id2label"], json!({"0": "LABEL_0"}));
    assert_eq!(saved["label2id"], json!({"LABEL_0": 0}));
}

#[test]
fn rejects_configs_kd_cannot_run() {
    let dir = common::temp_dir("config-invalid");
    let path = dir.join("config.json");
    let cases: [(&str, Value, &str); 9] = [
        ("hidden_act", json!("relu"), "hidden_act 'relu' is not supported"),
        ("num_attention_heads", json!(5), "hidden_size 8 is not divisible by num_attention_heads 5"),
        ("num_attention_heads", json!(0), "num_attention_heads is 0"),
        ("pad_token_id", json!(10), "pad_token_id 10 is outside the vocabulary of 10"),
        ("hidden_dropout_prob", json!(1.0), "hidden_dropout_prob 1 is outside [0, 1)"),
        ("position_embedding_type", json!("relative_key"), "position_embedding_type \"relative_key\""),
        ("is_decoder", json!(true), "is_decoder is true"),
        ("problem_type", json!("ranking"), "problem_type 'ranking'"),
        ("label2id", json!({"a": 1, "b": 0}), "does not match id2label"),
    ];
    for (key, value, message) in cases {
        let mut c = json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 16, "id2label": {"0": "a", "1": "b"}});
        c[key] = value;
        std::fs::write(&path, c.to_string()).unwrap();
        let err = BertConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(message) && err.contains("config.json"), "{key}: {err}");
    }
    let mut c = json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 16, "id2label": {"0": "a", "1": "b"}, "num_labels": 3});
    std::fs::write(&path, c.to_string()).unwrap();
    let err = BertConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("num_labels 3 disagrees with the 2 labels named"), "{err}");
    c["num_labels"] = json!(2);
    std::fs::write(&path, c.to_string()).unwrap();
    assert_eq!(BertConfig::from_file(&path).unwrap().num_labels(), 2);
    std::fs::write(&path, r#"{"vocab_size": 10}"#).unwrap();
    let err = BertConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("missing field `hidden_size`"), "{err}");
    let err = BertConfig::from_file(&dir.join("absent.json")).unwrap_err().to_string();
    assert!(err.contains("absent.json"), "{err}");
}

#[test]
fn unknown_model_type_is_named_with_the_supported_ones() {
    let dir = common::temp_dir("config-model-type");
    let path = dir.join("config.json");
    // An XLNet config has none of BERT's keys: the model type must be checked before them.
    std::fs::write(&path, r#"{"model_type": "xlnet", "d_model": 8, "n_layer": 1}"#).unwrap();
    let err = BertConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("\"xlnet\"") && err.contains("bert"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
