//! PA-KD on a learnable synthetic task with teacher labels corrupted at a known rate: the probe's
//! convergence score must separate the corrupted labels from the clean ones.

use std::path::PathBuf;
use std::sync::OnceLock;

use kd_kernels::rng::Rng;
use kd_kernels::Device;
use kd_methods::batching::{Encoded, EncodedSet, Targets};
use kd_methods::checkpoint::{CheckpointConfig, STATE_FILE};
use kd_methods::data::{Dataset, Example, Label};
use kd_methods::methods::ce::Ce;
use kd_methods::methods::peer_advised::{partition, peer_advised, PeerAdvisedConfig};
use kd_methods::metrics::MetricKind;
use kd_methods::noise::{inject, NoiseModel};
use kd_methods::pseudo::PseudoLabels;
use kd_methods::trainer::{predict, train, Event, TrainConfig};
use kd_methods::Result;
use kd_model::bert::Bert;
use kd_model::{BertConfig, BertWeights};

const CLASSES: usize = 2;
const EXAMPLES: usize = 480;
const NOISE: f64 = 0.3;

/// Class c is marked by token 3 + c somewhere among filler tokens 6..32.
fn marker_set(n: usize, seed: u64) -> (Vec<Encoded>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let (mut items, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let class = rng.below(CLASSES);
        let mut words: Vec<u32> = (0..4 + rng.below(5)).map(|_| 6 + rng.below(26) as u32).collect();
        words.insert(rng.below(words.len() + 1), 3 + class as u32);
        let ids: Vec<u32> = [1].into_iter().chain(words).chain([2]).collect();
        items.push(Encoded { type_ids: vec![0; ids.len()], ids });
        labels.push(class as u32);
    }
    (items, labels)
}

/// The gold labels flipped symmetrically at `NOISE` by the noise harness; the flipped rows.
fn corrupt(gold: &[u32]) -> (Vec<u32>, Vec<usize>) {
    let dataset = Dataset {
        examples: gold
            .iter()
            .map(|&y| Example { text_a: String::new(), text_b: None, label: Label::Class(y as usize) })
            .collect(),
        label_names: (0..CLASSES).map(|c| c.to_string()).collect(),
        source: PathBuf::from("synthetic"),
        skipped: vec![],
    };
    let noisy = inject(&dataset, &NoiseModel::Symmetric { rate: NOISE }, 5).unwrap();
    let labels = noisy
        .dataset
        .examples
        .iter()
        .map(|e| match e.label {
            Label::Class(c) => c as u32,
            ref other => panic!("unexpected label {other:?}"),
        })
        .collect();
    (labels, noisy.flipped)
}

fn new_student() -> Result<Bert> {
    let json = serde_json::json!({
        "model_type": "bert", "vocab_size": 32, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 16,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.0, "pad_token_id": 0, "initializer_range": 0.1,
    });
    let config: BertConfig = serde_json::from_value(json).unwrap();
    let weights = BertWeights::init(&config, CLASSES, 11, &Device::Cpu)?;
    Ok(Bert::new(config, weights))
}

fn config() -> PeerAdvisedConfig {
    PeerAdvisedConfig::new(TrainConfig {
        epochs: 6,
        batch_size: 16,
        lr: 5e-3,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        seed: 3,
        group_by_length: false,
        eval_every: None,
        metric: MetricKind::Accuracy,
        checkpoint: None,
    })
}

/// One hard-label and one soft-label run, shared by the tests.
struct Run {
    items: Vec<Encoded>,
    gold: Vec<u32>,
    teacher: Vec<u32>,
    flipped: Vec<usize>,
    hard: Outcome,
    soft: Outcome,
}

struct Outcome {
    scores: Vec<f32>,
    kept: Vec<usize>,
    relabelled: Vec<usize>,
    peer_labels: PseudoLabels,
    stages: Vec<&'static str>,
    dev_accuracy: f64,
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let (items, gold) = marker_set(EXAMPLES, 1);
        let (teacher, flipped) = corrupt(&gold);
        let (dev_items, dev_gold) = marker_set(200, 2);
        let dev = EncodedSet { items: dev_items, targets: Targets::Classes(dev_gold) };
        let go = |labels: &PseudoLabels| {
            let out = peer_advised(&mut new_student, &items, labels, None, &config(), &mut |_, _| {}).unwrap();
            let dev_outputs = predict(&out.student, &dev.items, 64).unwrap();
            let Targets::Classes(dev_gold) = &dev.targets else { unreachable!() };
            let right = dev_outputs.iter().zip(dev_gold).filter(|(r, &y)| argmax(r) == y as usize).count();
            Outcome {
                scores: out.scores,
                kept: out.kept,
                relabelled: out.relabelled,
                peer_labels: out.peer_labels,
                stages: out.reports.iter().map(|(s, _)| *s).collect(),
                dev_accuracy: right as f64 / dev_gold.len() as f64,
            }
        };
        // Soft labels: 0.9 on the (possibly corrupted) teacher label, the rest spread evenly.
        let other = 0.1 / (CLASSES - 1) as f32;
        let soft = teacher
            .iter()
            .map(|&y| (0..CLASSES).map(|c| if c == y as usize { 0.9 } else { other }).collect())
            .collect();
        let hard = go(&PseudoLabels::Hard(teacher.clone()));
        let soft = go(&PseudoLabels::Soft(soft));
        Run { items, gold, teacher, flipped, hard, soft }
    })
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

fn noise_rate(rows: &[usize], flipped: &[usize]) -> f64 {
    rows.iter().filter(|i| flipped.binary_search(i).is_ok()).count() as f64 / rows.len() as f64
}

#[test]
fn kept_half_has_a_lower_noise_rate_and_the_peer_repairs_the_rest() {
    let r = run();
    assert!((noise_rate(&(0..EXAMPLES).collect::<Vec<_>>(), &r.flipped) - NOISE).abs() < 0.06);
    for (form, out) in [("hard", &r.hard), ("soft", &r.soft)] {
        let (kept, rest) = (noise_rate(&out.kept, &r.flipped), noise_rate(&out.relabelled, &r.flipped));
        assert!(kept < 0.5 * rest, "{form}: kept noise {kept:.3}, relabelled noise {rest:.3}");
        // The peer's labels of the low half are better than the teacher's there.
        let peer = out.peer_labels.hard();
        let wrong = |labels: &mut dyn Iterator<Item = u32>| {
            labels.zip(&out.relabelled).filter(|(y, &i)| *y != r.gold[i]).count()
        };
        let (peer_wrong, teacher_wrong) =
            (wrong(&mut peer.iter().copied()), wrong(&mut out.relabelled.iter().map(|&i| r.teacher[i])));
        assert!(peer_wrong < teacher_wrong, "{form}: peer wrong on {peer_wrong}, teacher on {teacher_wrong}");
        assert!(out.dev_accuracy > 0.8, "{form}: final student dev accuracy {}", out.dev_accuracy);
        assert_eq!(out.stages, ["probe", "peer", "student"]);
    }
}

#[test]
fn scores_are_the_probe_probability_of_the_teacher_label() {
    let r = run();
    let cfg = config();
    assert_eq!(cfg.probe.epochs, 2);
    let mut probe = new_student().unwrap();
    let set = EncodedSet { items: r.items.clone(), targets: Targets::Classes(r.teacher.clone()) };
    train(&mut probe, &set, None, &mut Ce, &cfg.probe, &mut |_| {}).unwrap();
    let logits = predict(&probe, &set.items, 64).unwrap();
    for (i, (row, &y)) in logits.iter().zip(&r.teacher).enumerate() {
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        let p = (row[y as usize] as f64).exp() / z;
        assert!((p - r.hard.scores[i] as f64).abs() < 1e-5, "row {i}: probe p {p}, score {}", r.hard.scores[i]);
    }
    // Within each teacher class, the kept rows are exactly those with the highest scores.
    for c in 0..CLASSES as u32 {
        let of_c = |rows: &[usize]| rows.iter().copied().filter(|&i| r.teacher[i] == c).collect::<Vec<_>>();
        let min_kept = of_c(&r.hard.kept).iter().map(|&i| r.hard.scores[i]).fold(f32::INFINITY, f32::min);
        assert!(of_c(&r.hard.relabelled).iter().all(|&i| r.hard.scores[i] <= min_kept), "class {c}");
    }
}

#[test]
fn keep_fraction_is_respected() {
    let r = run();
    for out in [&r.hard, &r.soft] {
        // Half of each teacher class (rounded), so about half of all.
        for c in 0..CLASSES as u32 {
            let n = r.teacher.iter().filter(|&&y| y == c).count();
            let kept = out.kept.iter().filter(|&&i| r.teacher[i] == c).count();
            assert_eq!(kept, (0.5 * n as f64).round() as usize, "class {c} of {n} rows");
        }
        assert!(out.kept.len().abs_diff(EXAMPLES / 2) <= CLASSES / 2);
        let mut all: Vec<usize> = out.kept.iter().chain(&out.relabelled).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..EXAMPLES).collect::<Vec<_>>());
        assert_eq!(out.peer_labels.len(), out.relabelled.len());
    }
    let PseudoLabels::Soft(p) = &r.soft.peer_labels else { panic!("soft labels give soft peer labels") };
    assert!(p.iter().all(|row| row.len() == CLASSES && (row.iter().sum::<f32>() - 1.0).abs() < 1e-4));

    let scores = [0.9, 0.1, 0.5, 0.5, 0.7, 0.2, 0.5];
    let one = [0; 7];
    assert_eq!(partition(&scores, &one, 0.5).unwrap(), (vec![0, 2, 3, 4], vec![1, 5, 6]));
    assert_eq!(partition(&scores, &one, 0.3).unwrap(), (vec![0, 4], vec![1, 2, 3, 5, 6]));
    assert_eq!(partition(&scores, &one, 0.01).unwrap().0, vec![0]);
    assert_eq!(partition(&scores, &one, 0.99).unwrap().1, vec![1]);
    for bad in [0.0, 1.0, -0.5, f64::NAN] {
        assert!(partition(&scores, &one, bad).is_err(), "keep {bad}");
    }
    assert!(partition(&[0.5], &[0], 0.5).is_err());
    assert!(partition(&scores, &[0; 6], 0.5).is_err());
}

/// The kept share is taken class by class: a class whose scores are all low (the probe fits it
/// worse) keeps its top share instead of being relabelled wholesale.
#[test]
fn each_teacher_class_keeps_its_share() {
    let scores = [0.9, 0.3, 0.8, 0.95, 0.2, 0.85, 0.25, 0.1];
    let classes = [0, 1, 0, 0, 1, 0, 1, 1];
    // Globally the top half would be rows 0, 2, 3, 5: all of class 0.
    let (kept, relabelled) = partition(&scores, &classes, 0.5).unwrap();
    assert_eq!(kept, vec![0, 1, 3, 6]);
    assert_eq!(relabelled, vec![2, 4, 5, 7]);
    // keep 0.25 of 4 rows a class: one each.
    assert_eq!(partition(&scores, &classes, 0.25).unwrap().0, vec![1, 3]);
    // A class of one row keeps it (rounded half up); one row is still relabelled overall.
    assert_eq!(partition(&[0.9, 0.2], &[0, 1], 0.5).unwrap(), (vec![0], vec![1]));
    assert_eq!(partition(&[0.1, 0.9, 0.5], &[0, 1, 2], 0.01).unwrap(), (vec![1], vec![0, 2]));
}

#[test]
fn bad_inputs_fail_before_any_training() {
    let (items, gold) = marker_set(10, 9);
    let labels = PseudoLabels::Hard(gold[..9].to_vec());
    let err = peer_advised(&mut new_student, &items, &labels, None, &config(), &mut |_, _| {}).err().unwrap();
    assert!(err.to_string().contains("9 teacher labels for 10 examples"), "{err}");
    let mut never = || -> Result<Bert> { panic!("no student may be built for a bad keep") };
    let labels = PseudoLabels::Hard(gold);
    let cfg = PeerAdvisedConfig { keep: 1.0, ..config() };
    let err = peer_advised(&mut never, &items, &labels, None, &cfg, &mut |_, _| {}).err().unwrap();
    assert!(err.to_string().contains("keep 1"), "{err}");
}

#[test]
fn each_stage_checkpoints_apart_and_a_resumed_pipeline_skips_finished_stages() {
    let (items, gold) = marker_set(64, 4);
    let labels = PseudoLabels::Hard(corrupt(&gold).0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("peer-advised-ck-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = config();
    for c in [&mut cfg.probe, &mut cfg.train] {
        c.epochs = c.epochs.min(2);
        c.checkpoint = Some(CheckpointConfig { dir: dir.clone(), every: 1000, resume: true });
    }
    let mut events: Vec<(String, &'static str)> = Vec::new();
    let mut observe = |stage: &str, e: Event| {
        let kind = match e {
            Event::Step { .. } => "step",
            Event::Resumed { .. } => "resumed",
            _ => "other",
        };
        events.push((stage.to_string(), kind));
    };
    let first = peer_advised(&mut new_student, &items, &labels, None, &cfg, &mut observe).unwrap();
    for stage in ["probe", "peer", "student"] {
        assert!(dir.join(stage).join(STATE_FILE).is_file(), "{stage} wrote no state");
    }
    let again = peer_advised(&mut new_student, &items, &labels, None, &cfg, &mut observe).unwrap();
    let second: Vec<_> =
        events.iter().skip_while(|(s, _)| s != "student").skip_while(|(s, _)| s == "student").collect();
    assert_eq!(second.iter().filter(|(_, k)| *k == "resumed").count(), 3, "{second:?}");
    assert!(second.iter().all(|(_, k)| *k != "step"), "a finished stage trained again: {second:?}");
    assert_eq!((again.scores, again.kept, again.peer_labels), (first.scores, first.kept, first.peer_labels));
    let set = EncodedSet { items, targets: Targets::Classes(gold) };
    assert_eq!(predict(&again.student, &set.items, 64).unwrap(), predict(&first.student, &set.items, 64).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}
