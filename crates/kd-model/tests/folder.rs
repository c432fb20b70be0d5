//! Model folders as users bring them: sharded safetensors, PyTorch-only checkpoints, and
//! tokenizers given as a bare `vocab.txt`.
mod common;

use std::collections::BTreeMap;

use common::{snapshot, temp_dir, tiny_student, write};
use kd_kernels::Device;
use kd_model::testing::{minilm_dir, TEACHER};
use kd_model::{BertWeights, Tokenizer};
use serde_json::json;

/// Writes `arrays` as two shards and the index that maps each tensor to its shard.
fn write_sharded(dir: &std::path::Path, arrays: &BTreeMap<String, kd_kernels::io::HostArray>) {
    let (mut first, mut second) = (BTreeMap::new(), BTreeMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, a)) in arrays.iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut first, "model-00001-of-00002.safetensors")
        } else {
            (&mut second, "model-00002-of-00002.safetensors")
        };
        shard.insert(name.clone(), a.clone());
        weight_map.insert(name.clone(), json!(file));
    }
    write(&dir.join("model-00001-of-00002.safetensors"), &first);
    write(&dir.join("model-00002-of-00002.safetensors"), &second);
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_safetensors_load_as_the_single_file_does() {
    let Some((config, arrays)) = tiny_student() else { return };
    let single = temp_dir("single");
    write(&single.join("model.safetensors"), &arrays);
    let expected = snapshot(&BertWeights::load_dir(&single, &config, &Device::Cpu).unwrap());

    let sharded = temp_dir("sharded");
    write_sharded(&sharded, &arrays);
    assert_eq!(snapshot(&BertWeights::load_dir(&sharded, &config, &Device::Cpu).unwrap()), expected);

    // A tensor the index places in a shard that lacks it.
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap()).unwrap();
    index["weight_map"]["classifier.bias"] = json!("model-00001-of-00002.safetensors");
    index["weight_map"]["classifier.weight"] = json!("model-00001-of-00002.safetensors");
    let moved = temp_dir("moved");
    write_sharded(&moved, &arrays);
    std::fs::write(moved.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = BertWeights::load_dir(&moved, &config, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model-00001-of-00002.safetensors") && err.contains("'classifier."), "{err}");

    std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors")).unwrap();
    let err = BertWeights::load_dir(&sharded, &config, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn pytorch_only_folder_asks_for_safetensors() {
    let Some((config, _)) = tiny_student() else { return };
    let dir = temp_dir("pytorch-only");
    std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
    let err = BertWeights::load_dir(&dir, &config, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("pytorch_model.bin") && err.contains("convert") && err.contains("safetensors"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    std::fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
    let err = BertWeights::load_dir(&dir, &config, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

/// The texts of the comparison: plain, cased, accented, Chinese, unknown characters, pairs.
const TEXTS: [(&str, Option<&str>); 5] = [
    ("Hello, World! It's a test.", None),
    ("Café Müller naïvely re-tokenises unbelievable things", None),
    ("中文 字符 and emoji 🙂 with\ttabs", None),
    ("the first sentence", Some("and THE second, longer one?")),
    ("short", Some("x")),
];

#[test]
fn vocab_txt_tokenizer_matches_tokenizer_json() {
    let Some(models) = minilm_dir() else { return };
    let src = models.join(TEACHER);
    let dir = temp_dir("vocab-only");
    for file in ["config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
    let from_json = Tokenizer::from_dir(&src).unwrap();
    let from_vocab = Tokenizer::from_dir(&dir).unwrap();
    assert!(from_vocab.path().ends_with("vocab.txt"), "{}", from_vocab.path().display());
    assert_eq!(from_vocab.pad_id(), from_json.pad_id());
    assert_eq!(from_vocab.special_ids(), from_json.special_ids());
    for input in TEXTS {
        assert_eq!(
            from_vocab.encode_batch(&[input], 64).unwrap(),
            from_json.encode_batch(&[input], 64).unwrap(),
            "{input:?}"
        );
    }
    assert_eq!(from_vocab.encode_batch(&TEXTS, 8).unwrap(), from_json.encode_batch(&TEXTS, 8).unwrap());

    // do_lower_case false keeps the case, as BertTokenizer does.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"do_lower_case": false}"#).unwrap();
    let cased = Tokenizer::from_dir(&dir).unwrap().encode_batch(&[("Hello", None)], 16).unwrap();
    let lower = from_json.encode_batch(&[("Hello", None)], 16).unwrap();
    assert_ne!(cased.ids, lower.ids);

    std::fs::remove_file(dir.join("vocab.txt")).unwrap();
    let err = Tokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("vocab.txt"), "{err}");
}
