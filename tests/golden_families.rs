//! The encoder families besides BERT against transformers: the tiny random models that
//! scripts/make_family_goldens.py writes to tests/assets/families (committed, so this runs
//! without Python), loaded as a user's folder would be. Logits and every hidden state within
//! 1e-5, every parameter's gradient of the mean cross-entropy within 1e-4 relative, on the CPU
//! and, where there is one, on GPU 0 (`kd_kernels::testing::devices`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kd_kernels::io::{read_safetensors, HostArray};
use kd_kernels::{testing, Device, IdTensor, Tensor};
use kd_methods::losses;
use kd_model::bert::{Bert, EncoderBatch, ForwardMode};
use kd_model::family::Family;
use kd_model::{BertConfig, BertWeights};

/// The family's folder in this checkout, or under `KD_REPO` (a packed test binary run from
/// another copy of the repository, scripts/gpu_run.sh).
fn folder(family: &str) -> PathBuf {
    let repo = std::env::var_os("KD_REPO").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    repo.join("tests/assets/families").join(family)
}

struct Golden(BTreeMap<String, HostArray>);

impl Golden {
    fn get(&self, name: &str) -> &HostArray {
        self.0.get(name).unwrap_or_else(|| panic!("golden tensor {name} missing"))
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        self.get(name).data.iter().map(|&v| v as u32).collect()
    }
}

fn max_abs_diff(got: &Tensor, want: &HostArray) -> f32 {
    assert_eq!(got.numel(), want.data.len());
    got.to_vec().unwrap().iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// ||got - want|| / ||want||.
fn rel_err(got: &Tensor, want: &HostArray) -> f64 {
    let g = got.to_vec().unwrap();
    let num: f64 = g.iter().zip(&want.data).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let den: f64 = want.data.iter().map(|&b| (b as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn check_family(name: &str, device: &Device) {
    let dir = folder(name);
    let g = Golden(read_safetensors(&dir.join("golden.safetensors")).unwrap());
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let family = Family::of(&config);
    let bert = Bert::new(config.clone(), BertWeights::load_dir(&dir, &config, device).unwrap());

    let shape = &g.get("input_ids").shape;
    let (b, l) = (shape[0], shape[1]);
    let ids = g.ids("input_ids");
    let batch = EncoderBatch::new(&ids, &vec![0; b * l], &g.get("attention_mask").data, b, l, device).unwrap();
    let mut acts = bert.activations(b, l).unwrap();
    bert.forward(&mut acts, &batch, None, ForwardMode { train: false, seed: 0, keep_scores: true }).unwrap();
    let err = max_abs_diff(acts.logits.as_ref().unwrap(), g.get("logits"));
    assert!(err < 1e-5, "{device}: {name} logits max abs err {err}");
    assert_eq!(acts.hidden.len(), config.num_hidden_layers + 1);
    for (i, h) in acts.hidden.iter().enumerate() {
        let err = max_abs_diff(h, g.get(&format!("hidden.{i}")));
        assert!(err < 1e-5, "{device}: {name} hidden {i} max abs err {err}");
    }

    let labels = IdTensor::from_vec(g.ids("labels"), &[b], device).unwrap();
    let mut out_grads = acts.output_grads().unwrap();
    let loss = losses::cross_entropy(&mut out_grads, &acts, &labels, None, 1.0).unwrap();
    let want = g.get("loss").data[0];
    assert!(((loss - want) / want).abs() < 1e-5, "{device}: {name} loss {loss}, transformers {want}");
    let mut grads = bert.weights.zeros_like().unwrap();
    bert.backward(&mut grads, &mut acts, &out_grads, &batch, None).unwrap();
    let mut checked = 0;
    grads.visit(&mut |param: &str, grad: &Tensor| {
        if param.ends_with("attention.self.key.bias") {
            // Zero in exact arithmetic (it shifts every score of a softmax row equally): both
            // sides hold only rounding noise, so check that ours is noise-sized.
            let norm = grad.to_vec().unwrap().iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(norm < 1e-6, "{device}: {name}: {param} should be ~0, norm {norm}");
            return;
        }
        let err = rel_err(grad, g.get(&format!("grad.{}", family.file_name(param))));
        assert!(err < 1e-4, "{device}: {name}: {param} rel err {err}");
        checked += 1;
    });
    let params = g.0.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked + config.num_hidden_layers, params, "{device}: {name}: every gradient compared");
}

#[test]
fn roberta_matches_transformers() {
    for device in testing::devices() {
        check_family("roberta", &device);
    }
}

#[test]
fn electra_matches_transformers() {
    for device in testing::devices() {
        check_family("electra", &device);
    }
}

#[test]
fn distilbert_matches_transformers() {
    for device in testing::devices() {
        check_family("distilbert", &device);
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kd-golden-families-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// DistilBERT's keys become BERT's inside kd and are written back as DistilBERT's, nothing added
/// or lost (so `transformers` reads a kd-saved config as the one it wrote).
#[test]
fn distilbert_config_reads_and_writes_its_own_keys() {
    let src = folder("distilbert").join("config.json");
    let c = BertConfig::from_file(&src).unwrap();
    assert_eq!(Family::of(&c), Family::Distilbert);
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size), (32, 2, 4, 37));
    assert_eq!((c.type_vocab_size, c.max_position_embeddings, c.hidden_act.as_str()), (0, 40, "gelu"));
    assert_eq!((c.hidden_dropout_prob, c.attention_probs_dropout_prob, c.classifier_dropout()), (0.0, 0.0, 0.0));
    let saved = temp_dir("config").join("config.json");
    c.save(&saved).unwrap();
    assert_eq!(read_json(&saved), read_json(&src));
    std::fs::remove_dir_all(saved.parent().unwrap()).unwrap();
}

#[test]
fn distilbert_sinusoidal_positions_are_refused_in_one_line() {
    let mut config = read_json(&folder("distilbert").join("config.json"));
    config["sinusoidal_pos_embds"] = true.into();
    let path = temp_dir("sinusoidal").join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = BertConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("sinusoidal_pos_embds"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

/// A bare `DistilBertModel` file (names without `distilbert.`, no head, as sentence-transformers
/// save them) loads to the same encoder tensors as the full model's file.
#[test]
fn distilbert_bare_model_file_loads_the_same_encoder() {
    let dir = folder("distilbert");
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let full = read_safetensors(&dir.join("model.safetensors")).unwrap();
    let bare: BTreeMap<String, HostArray> =
        full.iter().filter_map(|(name, a)| Some((name.strip_prefix("distilbert.")?.to_string(), a.clone()))).collect();
    assert!(bare.contains_key("transformer.layer.1.ffn.lin2.weight"));
    let path = temp_dir("bare").join("model.safetensors");
    kd_kernels::io::write_safetensors(&path, &bare, None).unwrap();
    let [full, bare] =
        [dir.join("model.safetensors"), path.clone()].map(|p| BertWeights::load(&p, &config, &Device::Cpu).unwrap());
    assert!(bare.pooler.is_none() && bare.classifier.is_none());
    let mut encoder = BTreeMap::new();
    full.visit(&mut |name, t| {
        encoder.insert(name.to_string(), t.to_vec().unwrap());
    });
    let mut compared = 0;
    bare.visit(&mut |name, t| {
        assert_eq!(t.to_vec().unwrap(), encoder[name], "{name}");
        compared += 1;
    });
    // Word, position, LayerNorm (2) embeddings and 16 tensors per layer.
    assert_eq!(compared, 4 + 16 * config.num_hidden_layers);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

/// Errors about a DistilBERT config name DistilBERT's keys, the ones in the user's file.
#[test]
fn distilbert_config_errors_name_its_keys() {
    let mut config = read_json(&folder("distilbert").join("config.json"));
    config["n_heads"] = 5.into();
    let path = temp_dir("keys").join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = BertConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("dim 32 is not divisible by n_heads 5"), "{err}");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}
