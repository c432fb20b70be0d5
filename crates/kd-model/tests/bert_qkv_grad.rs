//! Gradients a loss puts on a layer's query, key and value (`OutputGrads::qkv`, for Q/K/V
//! relation losses) reach the parameters as central finite differences say, and the split
//! forward/backward (embed, encode; backward_encoder, backward_embeddings) is the whole one.
use kd_kernels::rng::Rng;
use kd_kernels::{Device, Tensor};
use kd_model::bert::{Bert, EncoderBatch, ForwardMode};
use kd_model::{BertConfig, BertWeights};

fn tiny() -> Bert {
    let mut config: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 30, "hidden_size": 12, "num_hidden_layers": 2, "num_attention_heads": 3,
        "intermediate_size": 20, "max_position_embeddings": 8, "initializer_range": 0.4,
    }))
    .unwrap();
    config.set_num_labels(2);
    let weights = BertWeights::init(&config, 2, 3, &Device::Cpu).unwrap();
    Bert::new(config, weights)
}

fn batch() -> EncoderBatch {
    let ids = [2, 7, 9, 4, 0, 3, 11, 5, 6, 8];
    let types = [0, 0, 1, 1, 0, 0, 0, 1, 1, 1];
    let mask = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0];
    EncoderBatch::new(&ids, &types, &mask, 2, 5, &Device::Cpu).unwrap()
}

const MODE: ForwardMode = ForwardMode { train: true, seed: 17, keep_scores: false };

/// The probe loss: `sum over layer 0's q, k, v of <G_x, x>` with fixed random `G`.
fn probe(seed: u64, n: usize) -> [Vec<f32>; 3] {
    let mut rng = Rng::new(seed);
    [(); 3].map(|_| (0..n).map(|_| rng.normal() as f32).collect())
}

fn loss(model: &Bert, batch: &EncoderBatch, g: &[Vec<f32>; 3]) -> f64 {
    let mut acts = model.activations(batch.batch, batch.seq).unwrap();
    model.forward(&mut acts, batch, None, MODE).unwrap();
    let l = &acts.layers[0];
    [&l.q, &l.k, &l.v]
        .iter()
        .zip(g)
        .map(|(x, g)| x.to_vec().unwrap().iter().zip(g).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>())
        .sum()
}

fn entry(w: &mut BertWeights, name: &str, index: usize, set: Option<f32>) -> f32 {
    let mut value = None;
    w.visit_mut(&mut |n, t| {
        if n == name {
            let data = t.cpu_mut().unwrap();
            value = Some(data[index]);
            if let Some(v) = set {
                data[index] = v;
            }
        }
    });
    value.unwrap_or_else(|| panic!("no parameter {name}"))
}

#[test]
fn qkv_output_gradients_match_finite_differences() {
    let mut model = tiny();
    let batch = batch();
    let n = batch.rows() * model.config.hidden_size;
    let g = probe(5, n);
    let mut acts = model.activations(batch.batch, batch.seq).unwrap();
    model.forward(&mut acts, &batch, None, MODE).unwrap();
    let mut og = acts.output_grads().unwrap();
    let like = acts.layers[0].q.try_clone().unwrap();
    for (buf, g) in og.qkv_mut(0, &like).unwrap().iter_mut().zip(&g) {
        *buf = Tensor::from_slice(g, like.shape(), &Device::Cpu).unwrap();
    }
    let mut grads = model.weights.zeros_like().unwrap();
    model.backward(&mut grads, &mut acts, &og, &batch, None).unwrap();

    let eps = 1e-2;
    for (name, index) in [
        ("bert.encoder.layer.0.attention.self.query.weight", 13),
        ("bert.encoder.layer.0.attention.self.key.bias", 4),
        ("bert.encoder.layer.0.attention.self.value.weight", 100),
        ("bert.embeddings.LayerNorm.weight", 7),
        ("bert.embeddings.word_embeddings.weight", 9 * 12 + 2),
        ("bert.embeddings.token_type_embeddings.weight", 12 + 5),
    ] {
        let analytic = entry(&mut grads, name, index, None);
        let base = entry(&mut model.weights, name, index, None);
        let mut at = |v: f32| {
            entry(&mut model.weights, name, index, Some(v));
            loss(&model, &batch, &g)
        };
        let numeric = ((at(base + eps) - at(base - eps)) / (2.0 * eps as f64)) as f32;
        at(base);
        assert!(analytic.abs() > 1e-3, "{name}[{index}]: gradient {analytic} too small to check");
        let tol = 1e-2 * (1.0 + analytic.abs().max(numeric.abs()));
        assert!((analytic - numeric).abs() <= tol, "{name}[{index}]: analytic {analytic}, numeric {numeric}");
    }
    // Nothing reaches the layer above the probe, or the heads.
    let untouched = entry(&mut grads, "bert.encoder.layer.1.attention.self.query.weight", 13, None);
    assert_eq!(untouched, 0.0);

    // Zeroing the output gradients clears the q/k/v buffers too.
    og.zero().unwrap();
    assert!(og.qkv[0].as_ref().unwrap().iter().all(|t| t.to_vec().unwrap().iter().all(|&v| v == 0.0)));
}

#[test]
fn split_passes_compose_to_the_whole() {
    let model = tiny();
    let batch = batch();
    let mut whole = model.activations(batch.batch, batch.seq).unwrap();
    model.forward(&mut whole, &batch, None, MODE).unwrap();
    let mut split = model.activations(batch.batch, batch.seq).unwrap();
    model.embed(&mut split, &batch, None, MODE).unwrap();
    model.encode(&mut split, &batch).unwrap();
    assert_eq!(whole.logits.as_ref().unwrap().to_vec().unwrap(), split.logits.as_ref().unwrap().to_vec().unwrap());

    let mut og = whole.output_grads().unwrap();
    og.logits.as_mut().unwrap().fill(1.0).unwrap();
    let mut g_whole = model.weights.zeros_like().unwrap();
    model.backward(&mut g_whole, &mut whole, &og, &batch, None).unwrap();
    let mut g_split = model.weights.zeros_like().unwrap();
    let d0 = model.backward_encoder(&mut g_split, &mut split, &og, &batch).unwrap();
    assert!(d0.to_vec().unwrap().iter().any(|&v| v != 0.0));
    model.backward_embeddings(&mut g_split, &mut split, &batch, None).unwrap();
    let name = "bert.embeddings.word_embeddings.weight";
    let (a, b) = (entry(&mut g_whole, name, 9 * 12 + 2, None), entry(&mut g_split, name, 9 * 12 + 2, None));
    assert!(a != 0.0 && a == b);

    // backward_embeddings needs the encoder's half first; mismatched batches are refused.
    let mut fresh = model.activations(batch.batch, batch.seq).unwrap();
    model.embed(&mut fresh, &batch, None, MODE).unwrap();
    assert!(model.backward_embeddings(&mut g_split, &mut fresh, &batch, None).is_err());
    let other = EncoderBatch::new(&[1, 2], &[0, 0], &[1.0, 1.0], 1, 2, &Device::Cpu).unwrap();
    assert!(model.encode(&mut fresh, &other).is_err());
}
