//! The MLM head (`kd_model::mlm`) on a tiny random model: its backward, through the tied
//! decoder and the encoder, against central finite differences of the forward; logits only for
//! the selected rows; the frozen-encoder variant computing the same head gradients.

use kd_kernels::rng::Rng;
use kd_kernels::{Device, Tensor};
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode};
use kd_model::mlm::MlmActivations;
use kd_model::optim::Params;
use kd_model::{BertConfig, BertWeights, MlmHead};

const VOCAB: usize = 23;

fn tiny() -> Bert {
    let json = serde_json::json!({
        "model_type": "bert", "vocab_size": VOCAB, "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": 0,
        "initializer_range": 0.3,
    });
    let config: BertConfig = serde_json::from_value(json).unwrap();
    let mut weights = BertWeights::init(&config, 2, 7, &Device::Cpu).unwrap();
    (weights.pooler, weights.classifier) = (None, None);
    weights.init_mlm_head(&config, 7).unwrap();
    // Move the head off its HF initialisation (LayerNorm 1/0, zero biases) so every term shows.
    let mut rng = Rng::new(9);
    for (_, t) in weights.mlm_head.as_mut().unwrap().params_mut() {
        t.cpu_mut().unwrap().iter_mut().for_each(|v| *v += 0.3 * rng.normal() as f32);
    }
    Bert::new(config, weights)
}

/// Two examples of 6 tokens, the second with 2 padded positions.
fn batch() -> EncoderBatch {
    let (b, l) = (2, 6);
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..b * l).map(|_| 1 + rng.below(VOCAB - 1) as u32).collect();
    let mask: Vec<f32> = (0..b * l).map(|t| f32::from(t < l || t % l < 4)).collect();
    EncoderBatch::new(&ids, &vec![0; b * l], &mask, b, l, &Device::Cpu).unwrap()
}

/// Selected rows (out of order, as a masking would not guarantee order either).
const ROWS: [u32; 4] = [7, 1, 4, 9];

fn forward(model: &Bert, batch: &EncoderBatch) -> (Activations, MlmActivations) {
    let mut acts = model.activations(batch.batch, batch.seq).unwrap();
    model.forward(&mut acts, batch, None, ForwardMode::default()).unwrap();
    let mut mlm = model.mlm_activations(&ROWS).unwrap();
    model.mlm_forward(&mut mlm, &acts).unwrap();
    (acts, mlm)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

/// `sum G * logits` in float64.
fn objective(model: &Bert, batch: &EncoderBatch, g: &[f32]) -> f64 {
    let (_, mlm) = forward(model, batch);
    host(&mlm.logits).iter().zip(g).map(|(&z, &g)| z as f64 * g as f64).sum()
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn logits_cover_only_the_selected_rows_and_match_a_float64_reference() {
    let model = tiny();
    let batch = batch();
    let (acts, mlm) = forward(&model, &batch);
    assert_eq!(mlm.logits.shape(), [ROWS.len(), VOCAB]);
    // Reference: the head written out in float64 on the gathered rows.
    let w = &model.weights;
    let head = w.mlm_head.as_ref().unwrap();
    let (d, eps) = (8, model.config.layer_norm_eps);
    let f = |t: &Tensor| host(t).iter().map(|&v| v as f64).collect::<Vec<_>>();
    let (hidden, tw, tb) = (f(acts.hidden.last().unwrap()), f(&head.transform.weight), f(&head.transform.bias));
    let (lw, lb, bias, we) =
        (f(&head.layer_norm.weight), f(&head.layer_norm.bias), f(&head.bias), f(&w.embeddings.word_embeddings));
    let logits = host(&mlm.logits);
    for (p, &row) in ROWS.iter().enumerate() {
        let x = &hidden[row as usize * d..][..d];
        let a: Vec<f64> = (0..d)
            .map(|o| {
                let z = tb[o] + (0..d).map(|i| tw[o * d + i] * x[i]).sum::<f64>();
                0.5 * z * (1.0 + erf(z / std::f64::consts::SQRT_2))
            })
            .collect();
        let mean = a.iter().sum::<f64>() / d as f64;
        let var = a.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
        let h: Vec<f64> = (0..d).map(|i| (a[i] - mean) / (var + eps).sqrt() * lw[i] + lb[i]).collect();
        for v in 0..VOCAB {
            let want = bias[v] + (0..d).map(|i| h[i] * we[v * d + i]).sum::<f64>();
            let got = logits[p * VOCAB + v] as f64;
            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "row {row} word {v}: {got} vs {want}");
        }
    }
}

/// erf from the Chebyshev fit of erfc in Numerical Recipes (error below 1.2e-7 everywhere).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

#[test]
fn backward_matches_finite_differences_through_head_decoder_and_encoder() {
    let mut model = tiny();
    let batch = batch();
    let (mut acts, mut mlm) = forward(&model, &batch);
    let g = random(mlm.logits.numel(), 5);
    mlm.dlogits.cpu_mut().unwrap().copy_from_slice(&g);
    let mut out_grads = acts.output_grads().unwrap();
    let mut grads = model.weights.zeros_like().unwrap();
    model.mlm_backward(&mut grads, &mut mlm, &acts, &mut out_grads).unwrap();

    // The gradient reaches the encoder output only at the selected rows.
    let n_layers = model.config.num_hidden_layers;
    let dh = host(out_grads.hidden[n_layers].as_ref().unwrap());
    for row in 0..batch.rows() {
        let norm: f32 = dh[row * 8..][..8].iter().map(|v| v * v).sum();
        assert_eq!(norm > 0.0, ROWS.contains(&(row as u32)), "row {row}: |d hidden|^2 = {norm}");
    }
    model.backward(&mut grads, &mut acts, &out_grads, &batch, None).unwrap();

    type Param = fn(&mut BertWeights) -> &mut Tensor;
    let params: [(&str, Param); 8] = [
        ("transform weight", |w| &mut w.mlm_head.as_mut().unwrap().transform.weight),
        ("transform bias", |w| &mut w.mlm_head.as_mut().unwrap().transform.bias),
        ("head LayerNorm weight", |w| &mut w.mlm_head.as_mut().unwrap().layer_norm.weight),
        ("head LayerNorm bias", |w| &mut w.mlm_head.as_mut().unwrap().layer_norm.bias),
        ("decoder bias", |w| &mut w.mlm_head.as_mut().unwrap().bias),
        // Tied: the decoder's and the input lookup's gradients both land here.
        ("word embeddings", |w| &mut w.embeddings.word_embeddings),
        ("layer 1 value", |w| &mut w.layers[1].value.weight),
        ("layer 0 query", |w| &mut w.layers[0].query.weight),
    ];
    let h = 1e-2;
    for (name, param) in params {
        let analytic = host(param(&mut grads));
        let mut order: Vec<usize> = (0..analytic.len()).collect();
        order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
        assert!(analytic[order[0]].abs() > 1e-3, "{name}: no gradient at all");
        for &i in &order[..4.min(order.len())] {
            let original = host(param(&mut model.weights))[i];
            let mut at = |x: f32| {
                param(&mut model.weights).cpu_mut().unwrap()[i] = x;
                objective(&model, &batch, &g)
            };
            let numeric = (at(original + h) - at(original - h)) / (2.0 * h as f64);
            at(original);
            let want = analytic[i] as f64;
            assert!(
                (numeric - want).abs() <= 5e-3 * want.abs() + 2e-4,
                "{name}[{i}]: analytic {want}, finite differences {numeric}"
            );
        }
    }
}

#[test]
fn frozen_encoder_and_table_give_the_same_head_gradients() {
    let model = tiny();
    let batch = batch();
    let (acts, mut mlm) = forward(&model, &batch);
    let g = random(mlm.logits.numel(), 6);
    mlm.dlogits.cpu_mut().unwrap().copy_from_slice(&g);
    let head = model.weights.mlm_head.as_ref().unwrap();
    let table = &model.weights.embeddings.word_embeddings;

    let mut full = head.zeros_like().unwrap();
    let mut dw = Tensor::zeros(table.shape(), &Device::Cpu).unwrap();
    let mut dh = Tensor::zeros(acts.hidden.last().unwrap().shape(), &Device::Cpu).unwrap();
    head.backward(&mut full, Some(&mut dw), Some(&mut dh), &mut mlm, table).unwrap();
    let mut frozen = head.zeros_like().unwrap();
    head.backward(&mut frozen, None, None, &mut mlm, table).unwrap();

    let flat = |h: &mut MlmHead| h.params_mut().into_iter().map(|(n, t)| (n, host(t))).collect::<Vec<_>>();
    for ((name, a), (_, b)) in flat(&mut full).into_iter().zip(flat(&mut frozen)) {
        assert!(a.iter().any(|&v| v != 0.0), "{name}: zero gradient");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{name}: {x} vs {y}");
        }
    }
    // The decoder's table gradient is `dlogits^T . h`: rows of words never scored still get it
    // (every word has a logit at every selected row), so it is dense.
    assert!(host(&dw).chunks(8).all(|r| r.iter().any(|&v| v != 0.0)));
}

#[test]
fn bad_rows_and_a_missing_head_are_errors() {
    let mut model = tiny();
    let batch = batch();
    let mut acts = model.activations(batch.batch, batch.seq).unwrap();
    model.forward(&mut acts, &batch, None, ForwardMode::default()).unwrap();
    let mut out_of_range = model.mlm_activations(&[0, 12]).unwrap();
    assert!(model.mlm_forward(&mut out_of_range, &acts).is_err());
    model.weights.mlm_head = None;
    let mut mlm = model.mlm_activations(&[0]).unwrap();
    let err = model.mlm_forward(&mut mlm, &acts).unwrap_err().to_string();
    assert!(err.contains("MLM head"), "{err}");
}
