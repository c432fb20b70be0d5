//! Logits-only passes (`Outputs::Logits`, `Outputs::LogitsInference`): the last layer's
//! post-attention half runs on the [CLS] rows alone, and inference shares the layers' buffers.
//! Their logits and gradients must be the full pass's, in training (same dropout masks) too, on
//! every device: the CPU's last layer attends only its [CLS] queries, a GPU's gathers them.
use kd_kernels::rng::Rng;
use kd_kernels::testing::devices;
use kd_kernels::{Device, Tensor};
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode, Outputs};
use kd_model::{BertConfig, BertWeights};

/// A random model with real dropout probabilities and a 3-class head.
fn model(layers: usize, device: &Device) -> Bert {
    let config: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": layers, "num_attention_heads": 2,
        "intermediate_size": 24, "max_position_embeddings": 16,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    }))
    .unwrap();
    let weights = BertWeights::init(&config, 3, 7, device).unwrap();
    Bert::new(config, weights)
}

/// Three examples of 6 tokens, two of them padded.
fn batch(model: &Bert) -> EncoderBatch {
    let (b, l) = (3, 6);
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..b * l).map(|_| rng.below(model.config.vocab_size) as u32).collect();
    let mask: Vec<f32> = (0..b * l).map(|t| f32::from(t / l == 0 || t % l < 6 - t / l)).collect();
    EncoderBatch::new(&ids, &vec![0; b * l], &mask, b, l, &model.device()).unwrap()
}

fn forward(model: &Bert, batch: &EncoderBatch, outputs: Outputs, train: bool) -> Activations {
    let mut acts = model.activations_for(batch.batch, batch.seq, outputs).unwrap();
    let mode = ForwardMode { train, seed: 11, keep_scores: false };
    model.forward(&mut acts, batch, None, mode).unwrap();
    acts
}

fn logits(acts: &Activations) -> Vec<f32> {
    acts.logits.as_ref().unwrap().to_vec().unwrap()
}

/// How far a logits-only pass may be from the full one, relative to the values: on a GPU cuBLAS
/// picks other kernels (other summation orders) for the B-row and the N-row products.
fn tolerance(device: &Device) -> f32 {
    match device {
        Device::Cpu => 1e-6,
        Device::Cuda(_) => 1e-5,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Backward of `sum G * logits` (G fixed random) into fresh gradient buffers.
fn gradients(model: &Bert, batch: &EncoderBatch, acts: &mut Activations) -> BertWeights {
    let mut out_grads = acts.output_grads().unwrap();
    let dlogits = out_grads.logits.as_mut().unwrap();
    let mut rng = Rng::new(5);
    let g: Vec<f32> = (0..dlogits.numel()).map(|_| rng.normal() as f32).collect();
    *dlogits = Tensor::from_vec(g, dlogits.shape(), &dlogits.device()).unwrap();
    let mut grads = model.weights.zeros_like().unwrap();
    model.backward(&mut grads, acts, &out_grads, batch, None).unwrap();
    grads
}

#[test]
fn logits_only_passes_give_the_full_pass_logits() {
    for (device, layers) in devices().iter().flat_map(|d| [1, 2, 4, 5].map(|l| (d.clone(), l))) {
        let model = model(layers, &device);
        let batch = batch(&model);
        let full = logits(&forward(&model, &batch, Outputs::All, false));
        let magnitude = full.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(magnitude > 1e-3, "{layers} layers: logits are all about zero");
        for outputs in [Outputs::Logits, Outputs::LogitsInference] {
            // Twice through the same buffers: the shared ones must not leak the previous pass.
            let mut acts = model.activations_for(batch.batch, batch.seq, outputs).unwrap();
            for _ in 0..2 {
                model.forward(&mut acts, &batch, None, ForwardMode::default()).unwrap();
                let diff = max_diff(&logits(&acts), &full);
                assert!(
                    diff <= tolerance(&device) * magnitude,
                    "{device}, {layers} layers, {outputs:?}: logits differ by {diff}"
                );
            }
            assert_eq!(acts.hidden.last().unwrap().shape(), [batch.batch, model.config.hidden_size]);
        }
    }
}

/// In training too: the last layer's [CLS] rows draw the masks they have in the full pass.
#[test]
fn logits_only_backward_matches_the_full_backward() {
    for (device, train) in devices().iter().flat_map(|d| [false, true].map(|t| (d.clone(), t))) {
        let model = model(3, &device);
        let batch = batch(&model);
        let mut full_acts = forward(&model, &batch, Outputs::All, train);
        let mut cls_acts = forward(&model, &batch, Outputs::Logits, train);
        let (want, got) = (logits(&full_acts), logits(&cls_acts));
        assert!(
            max_diff(&got, &want) <= tolerance(&device),
            "{device}, train {train}: logits differ by {}",
            max_diff(&got, &want)
        );
        let full = gradients(&model, &batch, &mut full_acts);
        let cls = gradients(&model, &batch, &mut cls_acts);
        let mut compared = 0;
        full.visit(&mut |name, want| {
            let mut got = None;
            cls.visit(&mut |other, t| {
                if other == name {
                    got = Some(t.to_vec().unwrap());
                }
            });
            let (want, got) = (want.to_vec().unwrap(), got.unwrap());
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let diff = max_diff(&got, &want);
            assert!(
                diff <= 10.0 * tolerance(&device) * scale.max(1e-3),
                "{device}, train {train}, {name}: gradients differ by {diff} ({scale})"
            );
            compared += 1;
        });
        assert!(compared > 20, "only {compared} parameters compared");
    }
}

#[test]
fn inference_buffers_refuse_a_backward_and_logits_only_refuses_attention_scores() {
    let model = model(2, &Device::Cpu);
    let batch = batch(&model);
    let mut acts = forward(&model, &batch, Outputs::LogitsInference, false);
    let out_grads = model.activations(batch.batch, batch.seq).unwrap().output_grads().unwrap();
    let mut grads = model.weights.zeros_like().unwrap();
    let err = model.backward(&mut grads, &mut acts, &out_grads, &batch, None).unwrap_err().to_string();
    assert!(err.contains("inference"), "{err}");

    let mut acts = model.activations_for(batch.batch, batch.seq, Outputs::Logits).unwrap();
    let mode = ForwardMode { train: false, seed: 0, keep_scores: true };
    let err = model.forward(&mut acts, &batch, None, mode).unwrap_err().to_string();
    assert!(err.contains("scores"), "{err}");
}
