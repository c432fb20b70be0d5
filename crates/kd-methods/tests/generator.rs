//! MATE-KD's generator (`methods::generator`): BERT and MATE-KD masking, an MLM head trained on
//! a frozen encoder over a tiny synthetic corpus, and the `BertForMaskedLM` folder it saves as.

use kd_kernels::rng::Rng;
use kd_kernels::Device;
use kd_methods::batching::Encoded;
use kd_methods::methods::generator::{evaluate_mlm, generator_from_encoder, train_generator, GeneratorConfig, Masking};
use kd_model::bert::Bert;
use kd_model::{BertConfig, BertWeights};

const VOCAB: usize = 24;
const PAD: u32 = 0;
const CLS: u32 = 1;
const SEP: u32 = 2;
const MASK: u32 = 3;
const SPECIAL: [u32; 4] = [PAD, CLS, SEP, MASK];

fn encoder() -> Bert {
    let json = serde_json::json!({
        "model_type": "bert", "vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32,
        "pad_token_id": PAD, "initializer_range": 0.2,
    });
    let config: BertConfig = serde_json::from_value(json).unwrap();
    let weights = BertWeights::init(&config, 3, 11, &Device::Cpu).unwrap();
    Bert::new(config, weights)
}

/// Sentences of a toy language: word `w` is followed by `w + 1` (wrapping within 4..24) with
/// probability 0.8, else by a word drawn with Zipf-like frequencies; so a masked word is
/// predictable from its neighbours, and some words are far more frequent than others.
fn corpus(n: usize, seed: u64) -> Vec<Encoded> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let len = 6 + rng.below(8);
            let zipf = |rng: &mut Rng| 4 + (rng.uniform().powi(3) * 20.0) as u32;
            let mut w = zipf(&mut rng);
            let mut ids = vec![CLS];
            for _ in 0..len {
                ids.push(w);
                w = if rng.uniform() < 0.8 { 4 + (w - 3) % 20 } else { zipf(&mut rng) };
            }
            ids.push(SEP);
            Encoded { type_ids: vec![0; ids.len()], ids }
        })
        .collect()
}

fn snapshot(w: &BertWeights, skip_head: bool) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    w.visit(&mut |name, t| {
        if !(skip_head && name.starts_with("cls.")) {
            out.push((name.to_string(), t.to_vec().unwrap()));
        }
    });
    out
}

#[test]
fn masking_selects_only_real_non_special_tokens_at_the_configured_rates() {
    let items = corpus(400, 1);
    let seq = 16;
    let mut ids = Vec::new();
    let mut attention = Vec::new();
    for e in &items {
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat(PAD)).take(seq));
        attention.extend((0..seq).map(|i| f32::from(i < e.ids.len())));
    }
    let eligible = ids.iter().zip(&attention).filter(|(id, &a)| a > 0.5 && !SPECIAL.contains(id)).count();
    let mut rng = Rng::new(2);

    let (masked, rows) = Masking::mate_kd(MASK, SPECIAL.to_vec()).apply(&ids, &attention, VOCAB, &mut rng);
    assert!(rows.windows(2).all(|w| w[0] < w[1]), "rows are increasing");
    for (i, (&before, &after)) in ids.iter().zip(&masked).enumerate() {
        let selected = rows.contains(&(i as u32));
        assert_eq!(after, if selected { MASK } else { before }, "position {i}");
        if selected {
            assert!(attention[i] > 0.5 && !SPECIAL.contains(&before), "position {i} is padding or special");
        }
    }
    let rate = rows.len() as f64 / eligible as f64;
    assert!((rate - 0.3).abs() < 0.03, "selected {rate} of eligible tokens, expected 0.3");

    let (masked, rows) = Masking::bert(MASK, SPECIAL.to_vec()).apply(&ids, &attention, VOCAB, &mut rng);
    let rate = rows.len() as f64 / eligible as f64;
    assert!((rate - 0.15).abs() < 0.02, "selected {rate}, expected 0.15");
    let to_mask = rows.iter().filter(|&&r| masked[r as usize] == MASK).count() as f64 / rows.len() as f64;
    let kept = rows.iter().filter(|&&r| masked[r as usize] == ids[r as usize]).count() as f64 / rows.len() as f64;
    // A random replacement may draw the original word or [MASK] (1 in 24 each): about 10.4% kept, 80.4% masked.
    assert!((to_mask - 0.804).abs() < 0.05, "{to_mask} of the selected tokens became [MASK]");
    assert!((kept - 0.104).abs() < 0.04, "{kept} of the selected tokens were kept");
}

#[test]
fn the_head_learns_on_a_frozen_encoder_and_the_mlm_loss_falls() {
    let encoder = encoder();
    let mut generator = generator_from_encoder(&encoder, 5).unwrap();
    assert!(generator.weights.pooler.is_none() && generator.weights.classifier.is_none());
    let (train, held_out) = (corpus(300, 3), corpus(100, 4));
    let masking = Masking::bert(MASK, SPECIAL.to_vec());
    let before = evaluate_mlm(&generator, &held_out, &masking, 16, 9).unwrap();
    let frozen = snapshot(&generator.weights, true);

    let mut cfg = GeneratorConfig::new(masking.clone());
    (cfg.epochs, cfg.batch_size, cfg.lr) = (20, 16, 1e-2);
    let mut losses = Vec::new();
    let report = train_generator(&mut generator, &train, &cfg, &mut |event| {
        if let kd_methods::trainer::Event::Step { loss, .. } = event {
            losses.push(loss.total);
        }
    })
    .unwrap();
    assert_eq!(report.steps, 20 * 300u64.div_ceil(16));
    assert_eq!(losses.len() as u64, report.steps);

    let after = evaluate_mlm(&generator, &held_out, &masking, 16, 9).unwrap();
    assert_eq!(before.tokens, after.tokens, "the same masks for both evaluations");
    assert!(
        after.loss < before.loss - 0.5 && after.accuracy > before.accuracy + 0.1,
        "MLM loss {} -> {}, accuracy {} -> {}",
        before.loss,
        after.loss,
        before.accuracy,
        after.accuracy
    );
    // Only the head moved: the encoder, and the word embeddings the decoder is tied to, did not.
    assert!(frozen == snapshot(&generator.weights, true), "the encoder changed");
}

#[test]
fn unfrozen_the_whole_model_learns_and_beats_the_head_alone_at_equal_steps() {
    let (train, held_out) = (corpus(300, 3), corpus(100, 4));
    let masking = Masking::bert(MASK, SPECIAL.to_vec());
    let train_with = |cfg: &GeneratorConfig| {
        let mut generator = generator_from_encoder(&encoder(), 5).unwrap();
        let before = snapshot(&generator.weights, false);
        train_generator(&mut generator, &train, cfg, &mut |_| {}).unwrap();
        let score = evaluate_mlm(&generator, &held_out, &masking, 16, 9).unwrap();
        let after = snapshot(&generator.weights, false);
        let moved: Vec<String> =
            before.iter().zip(&after).filter(|(b, a)| b.1 != a.1).map(|(b, _)| b.0.clone()).collect();
        (score, moved)
    };
    let mut head_only = GeneratorConfig::new(masking.clone());
    (head_only.epochs, head_only.batch_size, head_only.lr) = (40, 16, 1e-2);
    let mut whole = GeneratorConfig::unfrozen(masking.clone());
    (whole.epochs, whole.batch_size, whole.lr) = (40, 16, 1e-2);
    let (head_score, head_moved) = train_with(&head_only);
    let (whole_score, whole_moved) = train_with(&whole);

    assert!(head_moved.iter().all(|n| n.starts_with("cls.")), "frozen run moved {head_moved:?}");
    // Unfrozen, every parameter moves: the layers, and the word embeddings through the tied decoder.
    for name in ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"] {
        assert!(whole_moved.iter().any(|n| n == name), "{name} did not move: {whole_moved:?}");
    }
    assert!(
        whole_score.accuracy > head_score.accuracy + 0.05,
        "held-out accuracy: whole model {} vs head alone {}",
        whole_score.accuracy,
        head_score.accuracy
    );
}

#[test]
fn the_generator_saves_as_a_bert_for_masked_lm_and_loads_back() {
    let generator = generator_from_encoder(&encoder(), 5).unwrap();
    let dir = std::env::temp_dir().join(format!("kd-generator-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    generator.weights.save(&path).unwrap();
    let arrays = kd_kernels::io::read_safetensors(&path).unwrap();
    for name in [
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.bias",
        "bert.embeddings.word_embeddings.weight",
    ] {
        assert!(arrays.contains_key(name), "{name} missing");
    }
    assert!(!arrays.keys().any(|k| k.contains("pooler") || k.starts_with("classifier")));
    let loaded = BertWeights::load(&path, &generator.config, &Device::Cpu).unwrap();
    assert!(snapshot(&loaded, false) == snapshot(&generator.weights, false));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_settings_are_errors() {
    let mut generator = generator_from_encoder(&encoder(), 5).unwrap();
    let text = corpus(4, 1);
    let mut cfg = GeneratorConfig::new(Masking::bert(VOCAB as u32, SPECIAL.to_vec()));
    let err = train_generator(&mut generator, &text, &cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("[MASK] id"), "{err}");
    cfg.masking = Masking::bert(MASK, SPECIAL.to_vec());
    assert!(train_generator(&mut generator, &[], &cfg, &mut |_| {}).is_err());
    generator.weights.mlm_head = None;
    let err = train_generator(&mut generator, &text, &cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("MLM head"), "{err}");
}
