//! The built-in demonstration behind `kd-cli distill` with no arguments: a synthetic sentiment
//! task that shows what distillation is for. A 4-layer teacher learns from plenty of clean
//! labels; a 1-layer student gets only a few labels, and then the same few labels plus the
//! teacher's soft predictions on unlabelled text. Everything is generated, so it runs anywhere.
//!
//! The task: sequences of word ids; words 3..13 are positive, 13..23 negative, the word `NOT`
//! flips the polarity of the word after it, the rest are neutral. The label says whether the
//! (negation-aware) positive words outnumber the negative ones. Ties are not generated.

use std::time::Instant;

use kd_kernels::rng::Rng;
use kd_kernels::Device;
use kd_model::bert::Bert;
use kd_model::{BertConfig, BertWeights};

use crate::batching::{Encoded, EncodedSet, Targets};
use crate::methods::ce::Ce;
use crate::methods::kd::Kd;
use crate::methods::teacher::CachedLogits;
use crate::metrics::MetricKind;
use crate::trainer::{evaluate, train, Event, TrainConfig};
use crate::Result;

const VOCAB: usize = 64;
const CLS: u32 = 1;
const SEP: u32 = 2;
const NOT: u32 = 23;

/// Sizes of the demonstration (the defaults take about a minute on 2 cores).
#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub teacher_examples: usize,
    pub student_labels: usize,
    pub unlabelled: usize,
    pub dev_examples: usize,
    pub seed: u64,
    /// Where the models live and train.
    pub device: Device,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            teacher_examples: 4000,
            student_labels: 200,
            unlabelled: 4000,
            dev_examples: 1000,
            seed: 42,
            device: Device::Cpu,
        }
    }
}

/// One row of the printed table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoRow {
    pub model: String,
    pub method: String,
    pub parameters: usize,
    pub labelled_examples: usize,
    pub unlabelled_examples: usize,
    pub dev_accuracy: f64,
    pub train_seconds: f64,
    pub train_examples_per_s: f64,
}

fn polarity(w: u32) -> i32 {
    match w {
        3..=12 => 1,
        13..=22 => -1,
        _ => 0,
    }
}

/// `n` labelled sequences of 8 to 24 words.
pub fn synthetic_set(n: usize, rng: &mut Rng) -> EncodedSet {
    let mut items = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    while items.len() < n {
        let len = 8 + rng.below(17);
        let words: Vec<u32> = (0..len)
            .map(|_| match rng.below(10) {
                0 => NOT,
                1..=4 => 3 + rng.below(20) as u32,
                _ => 24 + rng.below(VOCAB - 24) as u32,
            })
            .collect();
        let score: i32 = words
            .iter()
            .enumerate()
            .map(|(i, &w)| if i > 0 && words[i - 1] == NOT { -polarity(w) } else { polarity(w) })
            .sum();
        if score == 0 {
            continue;
        }
        let ids: Vec<u32> = std::iter::once(CLS).chain(words).chain(std::iter::once(SEP)).collect();
        items.push(Encoded { type_ids: vec![0; ids.len()], ids });
        labels.push(u32::from(score > 0));
    }
    EncodedSet { items, targets: Targets::Classes(labels) }
}

fn config(hidden: usize, layers: usize, heads: usize) -> Result<BertConfig> {
    let json = serde_json::json!({
        "model_type": "bert", "vocab_size": VOCAB, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": 4 * hidden, "max_position_embeddings": 32,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
        "id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1},
    });
    serde_json::from_value(json).map_err(|e| crate::Error::Config(format!("demo config: {e}")))
}

fn fresh(config: BertConfig, seed: u64, device: &Device) -> Result<Bert> {
    let weights = BertWeights::init(&config, 2, seed, device)?;
    Ok(Bert::new(config, weights))
}

fn train_config(epochs: usize, lr: f32, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        lr,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        seed,
        group_by_length: false,
        eval_every: None,
        metric: MetricKind::Accuracy,
        checkpoint: None,
    }
}

/// Runs the demonstration; `observer` sees every training event, labelled by the run's name.
pub fn run(cfg: &DemoConfig, observer: &mut dyn FnMut(&str, Event)) -> Result<Vec<DemoRow>> {
    let mut rng = Rng::new(cfg.seed);
    let teacher_set = synthetic_set(cfg.teacher_examples, &mut rng);
    let few = synthetic_set(cfg.student_labels, &mut rng);
    let transfer = synthetic_set(cfg.unlabelled, &mut rng);
    let dev = synthetic_set(cfg.dev_examples, &mut rng);
    let mut rows = Vec::new();
    let mut record = |model: &Bert,
                      name: &str,
                      method: &str,
                      labelled: usize,
                      unlabelled: usize,
                      seconds: f64,
                      seen: usize|
     -> Result<()> {
        let metrics = evaluate(model, &dev, 128, MetricKind::Accuracy)?;
        rows.push(DemoRow {
            model: name.into(),
            method: method.into(),
            parameters: model.weights.num_params(),
            labelled_examples: labelled,
            unlabelled_examples: unlabelled,
            dev_accuracy: metrics.accuracy.unwrap_or(f64::NAN),
            train_seconds: seconds,
            train_examples_per_s: seen as f64 / seconds,
        });
        Ok(())
    };

    // The teacher: 4 layers, width 64, plenty of clean labels.
    let mut teacher = fresh(config(64, 4, 4)?, cfg.seed, &cfg.device)?;
    let tc = train_config(4, 1e-3, cfg.seed);
    let report = train(&mut teacher, &teacher_set, None, &mut Ce, &tc, &mut |e| observer("teacher", e))?;
    record(
        &teacher,
        "teacher (4x64)",
        "ce",
        teacher_set.items.len(),
        0,
        report.seconds,
        teacher_set.items.len() * tc.epochs,
    )?;

    // The student with its few labels only.
    let sc = train_config(20, 2e-3, cfg.seed + 1);
    let mut ce_student = fresh(config(32, 1, 2)?, cfg.seed + 1, &cfg.device)?;
    let report = train(&mut ce_student, &few, None, &mut Ce, &sc, &mut |e| observer("student ce", e))?;
    record(&ce_student, "student (1x32)", "ce", few.items.len(), 0, report.seconds, few.items.len() * sc.epochs)?;

    // The same student distilled: its labels plus the teacher's soft labels on unlabelled text.
    // The unlabelled rows carry the teacher's argmax as a placeholder target; alpha = 1 on them.
    let started = Instant::now();
    let mut kd_set = few.clone();
    kd_set.items.extend(transfer.items.iter().cloned());
    let mut cache = CachedLogits::build(&teacher, &kd_set, 256)?;
    let teacher_labels: Vec<u32> = cache.rows().iter().map(|r| u32::from(r[1] > r[0])).collect();
    let Targets::Classes(labels) = &mut kd_set.targets else { unreachable!("demo sets are classification") };
    labels.extend(&teacher_labels[few.items.len()..]);
    let kc = train_config(3, 2e-3, cfg.seed + 1);
    let mut kd_student = fresh(config(32, 1, 2)?, cfg.seed + 1, &cfg.device)?;
    let mut objective = Kd::new(&mut cache, 1.0, 2.0);
    train(&mut kd_student, &kd_set, None, &mut objective, &kc, &mut |e| observer("student kd", e))?;
    let seconds = started.elapsed().as_secs_f64();
    record(
        &kd_student,
        "student (1x32)",
        "kd",
        few.items.len(),
        transfer.items.len(),
        seconds,
        kd_set.items.len() * kc.epochs,
    )?;
    Ok(rows)
}
