//! Training-mode dropout in the BERT encoder, on the tiny golden student: attention-probability
//! dropout changes the training forward (and only where it should), and the backward follows
//! the same masks (central finite differences through the whole model).
mod common;

use std::path::Path;

use common::tiny_student;
use kd_kernels::rng::Rng;
use kd_kernels::{Device, Tensor};
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode};
use kd_model::BertWeights;

/// The tiny student with the given dropout probabilities; `None` without test assets.
fn student(p_attention: f64, p_hidden: f64) -> Option<Bert> {
    let (mut config, arrays) = tiny_student()?;
    config.attention_probs_dropout_prob = p_attention;
    config.hidden_dropout_prob = p_hidden;
    let weights = BertWeights::from_arrays(arrays, &config, &Device::Cpu, Path::new("tiny_bert.safetensors")).unwrap();
    Some(Bert::new(config, weights))
}

/// Two examples of 7 tokens, the second with 3 padded positions.
fn batch(model: &Bert) -> EncoderBatch {
    let (b, l) = (2, 7);
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..b * l).map(|_| rng.below(model.config.vocab_size) as u32).collect();
    let mask: Vec<f32> = (0..b * l).map(|t| f32::from(t < l || t % l < 4)).collect();
    EncoderBatch::new(&ids, &vec![0; b * l], &mask, b, l, &Device::Cpu).unwrap()
}

fn forward(model: &Bert, batch: &EncoderBatch, train: bool) -> Activations {
    let mut acts = model.activations(batch.batch, batch.seq).unwrap();
    model.forward(&mut acts, batch, None, ForwardMode { train, seed: 11, keep_scores: false }).unwrap();
    acts
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

#[test]
fn attention_dropout_changes_the_training_forward_only_after_the_maps() {
    let Some(model) = student(0.3, 0.0) else { return };
    let batch = batch(&model);
    let (eval, train) = (forward(&model, &batch, false), forward(&model, &batch, true));
    // Without hidden dropout the embeddings and the first layer's (undropped) map are unchanged...
    assert_eq!(host(&train.hidden[0]), host(&eval.hidden[0]));
    assert_eq!(host(&train.layers[0].probs), host(&eval.layers[0].probs));
    // ...but the context and everything after it see the dropped probabilities.
    for (what, a, b) in [
        ("context 0", &train.layers[0].context, &eval.layers[0].context),
        ("hidden 1", &train.hidden[1], &eval.hidden[1]),
        ("logits", train.logits.as_ref().unwrap(), eval.logits.as_ref().unwrap()),
    ] {
        let diff = host(a).iter().zip(host(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff > 1e-3, "{what}: training and evaluation differ by only {diff}");
    }
    // With p = 0 training is evaluation, bit for bit.
    let Some(plain) = student(0.0, 0.0) else { return };
    let train = forward(&plain, &batch, true);
    assert_eq!(host(train.logits.as_ref().unwrap()), host(eval.logits.as_ref().unwrap()));
}

/// `sum G * logits` in float64 after a training forward with the fixed seed.
fn objective(model: &Bert, batch: &EncoderBatch, g: &[f32]) -> f64 {
    let acts = forward(model, batch, true);
    host(acts.logits.as_ref().unwrap()).iter().zip(g).map(|(&z, &g)| z as f64 * g as f64).sum()
}

/// Central differences in f32 through the whole model: loose tolerances, but a backward that
/// ignored the attention mask is off by tens of percent.
#[test]
fn training_backward_with_attention_dropout_matches_finite_differences() {
    let Some(mut model) = student(0.3, 0.1) else { return };
    let batch = batch(&model);
    let mut acts = forward(&model, &batch, true);
    let mut rng = Rng::new(5);
    let g: Vec<f32> = (0..acts.logits.as_ref().unwrap().numel()).map(|_| rng.normal() as f32).collect();
    let mut out_grads = acts.output_grads().unwrap();
    out_grads.logits.as_mut().unwrap().cpu_mut().unwrap().copy_from_slice(&g);
    let mut grads = model.weights.zeros_like().unwrap();
    model.backward(&mut grads, &mut acts, &out_grads, &batch, None).unwrap();

    type Param = fn(&mut BertWeights) -> &mut Tensor;
    let params: [(&str, Param); 4] = [
        ("layer 0 value", |w| &mut w.layers[0].value.weight),
        ("layer 0 query", |w| &mut w.layers[0].query.weight),
        ("layer 1 value", |w| &mut w.layers[1].value.weight),
        ("layer 1 key", |w| &mut w.layers[1].key.weight),
    ];
    let h = 1e-2;
    for (name, param) in params {
        let analytic = host(param(&mut grads));
        // The entries with the largest gradients: finite differences in f32 resolve them best.
        let mut order: Vec<usize> = (0..analytic.len()).collect();
        order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
        for &i in &order[..4] {
            let original = host(param(&mut model.weights))[i];
            let mut at = |x: f32| {
                param(&mut model.weights).cpu_mut().unwrap()[i] = x;
                objective(&model, &batch, &g)
            };
            let numeric = (at(original + h) - at(original - h)) / (2.0 * h as f64);
            at(original);
            let want = analytic[i] as f64;
            assert!(
                (numeric - want).abs() <= 5e-3 * want.abs() + 1e-4,
                "{name}[{i}]: analytic {want}, finite differences {numeric}"
            );
        }
    }
}
