//! `noisy-relabel` and `noisy-coteach` on a tiny random BERT and a synthetic three-class task,
//! checked against float64 formulas written out here.

use kd_kernels::rng::Rng;
use kd_kernels::{Device, IdTensor, Tensor};
use kd_methods::batching::{collate, gather_targets, BatchTargets, Encoded, EncodedSet, Targets};
use kd_methods::checkpoint::{CheckpointConfig, OwnPart, PartMut};
use kd_methods::data::{Dataset, Example, Label};
use kd_methods::methods::ce::Ce;
use kd_methods::methods::kd::TeacherLogits;
use kd_methods::methods::noisy_coteach::{
    estimate_noise_rate, forget_rate, keep_better, keep_count, ramp_steps, smallest, CoTeach, CoTeachParams, Student,
};
use kd_methods::methods::noisy_relabel::{trust_weights, NoisyRelabel, RelabelParams};
use kd_methods::methods::teacher::CachedLogits;
use kd_methods::metrics::MetricKind;
use kd_methods::noise::{inject, NoiseModel};
use kd_methods::trainer::{evaluate, predict, train, Event, Objective, StepInput, TrainConfig};
use kd_model::bert::{Activations, Bert, EncoderBatch, ForwardMode};
use kd_model::{BertConfig, BertWeights};

const CLASSES: usize = 3;

/// Vocabulary 50, width 16, 2 layers of 2 heads. The initialiser is 10x BERT's 0.02: at 0.02 a
/// model this narrow often stalls for many epochs with two classes merged (near-identical logits
/// for all their examples); at 0.2 it learns the synthetic task in a few epochs, seed after seed.
fn config(dropout: f64) -> BertConfig {
    let mut c: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 50,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 16,
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
        "initializer_range": 0.2,
    }))
    .unwrap();
    c.set_num_labels(CLASSES);
    c
}

fn bert(seed: u64, dropout: f64) -> Bert {
    let c = config(dropout);
    let w = BertWeights::init(&c, CLASSES, seed, &Device::Cpu).unwrap();
    Bert::new(c, w)
}

fn copy(model: &Bert) -> Bert {
    Bert::new(model.config.clone(), model.weights.try_clone().unwrap())
}

fn snapshot(model: &Bert) -> Vec<f32> {
    let mut out = Vec::new();
    model.weights.visit(&mut |_, t| out.extend(t.to_vec().unwrap()));
    out
}

/// `n` examples of 4 to 8 tokens: [CLS] = 1, then ids that are each a signal of the class
/// (2 + 4c .. 6 + 4c) with probability 1/2 and filler (14..50) otherwise, the first always a
/// signal. Ids are the text, so that `noise::inject` runs on it as on a real dataset.
fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let examples = (0..n)
        .map(|_| {
            let y = rng.below(CLASSES);
            let len = 4 + rng.below(5);
            let signal = |rng: &mut Rng| (2 + 4 * y + rng.below(4)) as u32;
            let mut ids: Vec<u32> = (0..len)
                .map(|_| if rng.uniform() < 0.5 { signal(&mut rng) } else { 14 + rng.below(36) as u32 })
                .collect();
            ids[0] = 1;
            ids[1] = signal(&mut rng);
            let text_a = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
            Example { text_a, text_b: None, label: Label::Class(y) }
        })
        .collect();
    Dataset {
        examples,
        label_names: (0..CLASSES).map(|c| c.to_string()).collect(),
        source: "synthetic".into(),
        skipped: vec![],
    }
}

fn encode(d: &Dataset) -> EncodedSet {
    let items = d
        .examples
        .iter()
        .map(|e| {
            let ids: Vec<u32> = e.text_a.split(' ').map(|t| t.parse().unwrap()).collect();
            Encoded { type_ids: vec![0; ids.len()], ids }
        })
        .collect();
    let labels = d
        .examples
        .iter()
        .map(|e| match e.label {
            Label::Class(c) => c as u32,
            ref other => panic!("unexpected label {other:?}"),
        })
        .collect();
    EncodedSet { items, targets: Targets::Classes(labels) }
}

fn labels(set: &EncodedSet) -> &[u32] {
    match &set.targets {
        Targets::Classes(l) => l,
        Targets::Scores(_) => panic!("regression set"),
    }
}

fn random_rows(n: usize, scale: f64, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| (0..CLASSES).map(|_| (scale * rng.normal()) as f32).collect()).collect()
}

/// Teacher logits held in memory, by training-set position.
struct Rows(Vec<Vec<f32>>);

impl TeacherLogits for Rows {
    fn logits(&mut self, input: &StepInput) -> kd_methods::Result<Tensor> {
        let data = input.indices.iter().flat_map(|&i| self.0[i].clone()).collect();
        Ok(Tensor::from_vec(data, &[input.indices.len(), CLASSES], &Device::Cpu)?)
    }
}

/// One batch of a set, ready to become a [`StepInput`].
struct Batch {
    batch: EncoderBatch,
    indices: Vec<usize>,
    targets: BatchTargets,
}

fn batch_of(set: &EncodedSet, indices: Vec<usize>) -> Batch {
    let batch = collate(indices.iter().map(|&i| &set.items[i]), 0, &Device::Cpu).unwrap();
    let targets = gather_targets(&set.targets, &indices, &Device::Cpu).unwrap();
    Batch { batch, indices, targets }
}

fn input(b: &Batch, step: u64) -> StepInput<'_> {
    StepInput { batch: &b.batch, indices: &b.indices, targets: &b.targets, epoch: 0, step, steps_per_epoch: 1 }
}

fn forward(model: &Bert, batch: &EncoderBatch) -> Activations {
    let mut acts = model.activations(batch.batch, batch.seq).unwrap();
    model.forward(&mut acts, batch, None, ForwardMode::default()).unwrap();
    acts
}

fn logit_rows(acts: &Activations) -> Vec<Vec<f32>> {
    acts.logits.as_ref().unwrap().to_vec().unwrap().chunks(CLASSES).map(<[f32]>::to_vec).collect()
}

fn softmax(z: &[f32], t: f64) -> Vec<f64> {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
    let e: Vec<f64> = z.iter().map(|&v| (v as f64 / t - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// (CE(z, y), KL(softmax(t / T) || softmax(z / T))) in float64.
fn ce_kl(z: &[f32], teacher: &[f32], y: usize, temperature: f64) -> (f64, f64) {
    let ce = -softmax(z, 1.0)[y].ln();
    let (ps, pt) = (softmax(z, temperature), softmax(teacher, temperature));
    (ce, pt.iter().zip(&ps).map(|(p, q)| p * (p.ln() - q.ln())).sum())
}

/// d/dz of `weight * [(1 - a) * w * CE + a * T^2 * KL]` for one row.
fn kd_row_grad(z: &[f32], teacher: &[f32], y: usize, a: f64, t: f64, w: f64, weight: f64) -> Vec<f64> {
    let (p, ps, pt) = (softmax(z, 1.0), softmax(z, t), softmax(teacher, t));
    (0..z.len()).map(|c| weight * ((1.0 - a) * w * (p[c] - (c == y) as u8 as f64) + a * t * (ps[c] - pt[c]))).collect()
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{what}: got {got}, want {want}");
}

fn cfg(epochs: usize, batch_size: usize, lr: f32, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size,
        lr,
        warmup_ratio: 0.0,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        seed,
        group_by_length: false,
        eval_every: None,
        metric: MetricKind::Accuracy,
        checkpoint: None,
    }
}

fn accuracy(model: &Bert, set: &EncodedSet) -> f64 {
    evaluate(model, set, 64, MetricKind::Accuracy).unwrap().main()
}

// ---------------------------------------------------------------- noisy-relabel

#[test]
fn relabel_weights_are_the_teachers_probability_of_the_label() {
    let rows = random_rows(7, 2.0, 1);
    let ys: Vec<u32> = vec![0, 1, 2, 2, 1, 0, 1];
    let t = Tensor::from_vec(rows.concat(), &[7, CLASSES], &Device::Cpu).unwrap();
    let y = IdTensor::from_vec(ys.clone(), &[7], &Device::Cpu).unwrap();
    let w = trust_weights(&t, &y, None).unwrap();
    let want: Vec<f64> = rows.iter().zip(&ys).map(|(r, &y)| softmax(r, 1.0)[y as usize]).collect();
    for (i, (&g, &e)) in w.iter().zip(&want).enumerate() {
        assert_close(g as f64, e, &format!("w[{i}]"));
    }

    let cut = 0.3;
    assert!(want.iter().any(|&p| p < cut) && want.iter().any(|&p| p >= cut), "{want:?}");
    let hard = trust_weights(&t, &y, Some(cut as f32)).unwrap();
    for (i, (&h, &p)) in hard.iter().zip(&want).enumerate() {
        if p < cut {
            assert_eq!(h, 0.0, "row {i} (p = {p}) is below the cut");
        } else {
            assert_eq!(h, w[i], "row {i} (p = {p}) is above the cut");
        }
    }

    let bad = IdTensor::from_vec(vec![0, 1, 2, 3, 1, 0, 1], &[7], &Device::Cpu).unwrap();
    assert!(trust_weights(&t, &bad, None).unwrap_err().to_string().contains("label 3"));
}

#[test]
fn relabel_loss_and_gradient_follow_the_formula() {
    let set = encode(&synthetic(9, 3));
    let rows = random_rows(9, 2.0, 4);
    let b = batch_of(&set, (0..9).collect());
    let student = bert(1, 0.0);
    let acts = forward(&student, &b.batch);
    let z = logit_rows(&acts);
    let ys = labels(&set);
    let (a, t) = (0.3, 2.5);

    for cut in [None, Some(0.35f32)] {
        let mut teacher = Rows(rows.clone());
        let params = RelabelParams { alpha: a as f32, temperature: t as f32, trust_threshold: cut };
        let mut objective = NoisyRelabel::new(&mut teacher, params).unwrap();
        let mut grads = acts.output_grads().unwrap();
        let log = objective.loss(&input(&b, 0), &acts, &mut grads).unwrap();

        let mut want = 0.0;
        let mut cut_rows = 0;
        let dz = grads.logits.as_ref().unwrap().to_vec().unwrap();
        for i in 0..9 {
            let y = ys[i] as usize;
            let p = softmax(&rows[i], 1.0)[y];
            let w = if cut.is_some_and(|c| p < c as f64) { 0.0 } else { p };
            cut_rows += (w == 0.0) as usize;
            let (ce, kl) = ce_kl(&z[i], &rows[i], y, t);
            want += (a * t * t * kl + (1.0 - a) * w * ce) / 9.0;
            let g = kd_row_grad(&z[i], &rows[i], y, a, t, w, 1.0 / 9.0);
            for c in 0..CLASSES {
                assert_close(dz[i * CLASSES + c] as f64, g[c], &format!("dlogits[{i}, {c}] cut {cut:?}"));
            }
        }
        assert_eq!(cut_rows > 0, cut.is_some(), "the cut must zero some rows, and only a cut");
        assert_close(log.total as f64, want, &format!("loss, cut {cut:?}"));
    }

    let mut teacher = Rows(rows);
    let bad = RelabelParams { trust_threshold: Some(1.5), ..RelabelParams::default() };
    assert!(NoisyRelabel::new(&mut teacher, bad).is_err());
    assert!(NoisyRelabel::new(&mut teacher, RelabelParams { alpha: -0.1, ..RelabelParams::default() }).is_err());
}

// ---------------------------------------------------------------- noisy-coteach

#[test]
fn forget_rate_ramps_linearly_to_r_est_over_a_tenth_of_the_run() {
    assert_eq!(ramp_steps(100), 10);
    assert_eq!(ramp_steps(95), 10);
    assert_eq!(ramp_steps(3), 1);
    let r = 0.4;
    assert_eq!(forget_rate(0, r, 10), 0.0);
    for t in 0..=10 {
        assert_close(forget_rate(t, r, 10) as f64, 0.4 * t as f64 / 10.0, &format!("R({t})"));
    }
    assert_eq!(forget_rate(11, r, 10), r);
    assert_eq!(forget_rate(1000, r, 10), r);

    assert_eq!(keep_count(10, 0.0), 10);
    assert_eq!(keep_count(10, 0.3), 7);
    assert_eq!(keep_count(10, 0.15), 9); // ceil(8.5)
    assert_eq!(keep_count(7, 0.5), 4); // ceil(3.5)
    assert_eq!(keep_count(4, 1.0), 1);
    assert_eq!(smallest(&[0.3, 0.1, 0.5, 0.1, 0.2], 3), vec![1, 3, 4]);
}

#[test]
fn noise_rate_is_estimated_from_teacher_disagreement() {
    let rows = vec![vec![2.0, 0.0, 0.0], vec![0.0, 1.0, 0.5], vec![0.0, 0.0, 3.0], vec![1.0, 0.0, 0.0]];
    let targets = Targets::Classes(vec![0, 2, 2, 1]);
    assert_eq!(estimate_noise_rate(&rows, &targets).unwrap(), 0.5);
    assert_eq!(estimate_noise_rate(&rows[..3], &Targets::Classes(vec![0, 1, 2])).unwrap(), 0.0);
    assert!(estimate_noise_rate(&rows[..3], &targets).is_err());
    assert!(estimate_noise_rate(&rows, &Targets::Scores(vec![0.5; 4])).is_err());
}

/// Runs the objective at several steps on one batch (B is updated each time, A never) and
/// recomputes, from A and from a copy of B taken before the call, the losses, the kept rows
/// and A's gradient.
#[test]
fn each_student_trains_on_the_smallest_loss_rows_under_its_peer() {
    let n = 10;
    let set = encode(&synthetic(n, 5));
    let rows = random_rows(n, 2.0, 6);
    let ys = labels(&set);
    let b = batch_of(&set, (0..n).collect());
    let (student_a, peer) = (bert(1, 0.0), bert(2, 0.0));
    let mut teacher = Rows(rows.clone());
    let params = CoTeachParams { alpha: 0.4, temperature: 2.0, noise_rate: 0.4, peer_seed: 2 };
    let (a, t) = (0.4, 2.0);
    // 1000 examples in batches of 10: 100 steps, T_k = 10.
    let mut objective = CoTeach::new(&mut teacher, peer, params, &cfg(1, 10, 1e-2, 1), 1000).unwrap();
    let acts_a = forward(&student_a, &b.batch);
    let z_a = logit_rows(&acts_a);
    let mut kept_sets = Vec::new();

    for (step, rate, k) in [(0, 0.0, 10), (5, 0.2, 8), (10, 0.4, 6), (40, 0.4, 6)] {
        let z_b = logit_rows(&forward(&copy(objective.peer()), &b.batch));
        let mut grads = acts_a.output_grads().unwrap();
        let log = objective.loss(&input(&b, step), &acts_a, &mut grads).unwrap();
        let sel = objective.last.clone().unwrap();
        assert_eq!(sel.step, step);
        assert_close(sel.forget_rate as f64, rate, &format!("R({step})"));

        let rows_of = |z: &[Vec<f32>]| -> Vec<f64> {
            (0..n)
                .map(|i| {
                    let (ce, kl) = ce_kl(&z[i], &rows[i], ys[i] as usize, t);
                    (1.0 - a) * ce + a * t * t * kl
                })
                .collect()
        };
        let (l_a, l_b) = (rows_of(&z_a), rows_of(&z_b));
        for i in 0..n {
            assert_close(sel.loss_a[i] as f64, l_a[i], &format!("l_A({i})"));
            assert_close(sel.loss_b[i] as f64, l_b[i], &format!("l_B({i})"));
        }
        let smallest_k = |l: &[f64]| {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&i, &j| l[i].total_cmp(&l[j]));
            let mut kept = order[..k].to_vec();
            kept.sort();
            kept
        };
        let sorted = |v: &[usize]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        assert_eq!(sorted(&sel.keep_a), smallest_k(&l_b), "A keeps the smallest under B at step {step}");
        assert_eq!(sorted(&sel.keep_b), smallest_k(&l_a), "B keeps the smallest under A at step {step}");

        // A's loss and gradient are the mean over its kept rows only.
        let want: f64 = sel.keep_a.iter().map(|&i| l_a[i]).sum::<f64>() / k as f64;
        assert_close(log.total as f64, want, &format!("A's loss at step {step}"));
        let dz = grads.logits.as_ref().unwrap().to_vec().unwrap();
        for i in 0..n {
            let weight = if sel.keep_a.contains(&i) { 1.0 / k as f64 } else { 0.0 };
            let g = kd_row_grad(&z_a[i], &rows[i], ys[i] as usize, a, t, 1.0, weight);
            for c in 0..CLASSES {
                assert_close(dz[i * CLASSES + c] as f64, g[c], &format!("dlogits[{i}, {c}] at step {step}"));
            }
        }
        kept_sets.push(sorted(&sel.keep_a));
    }
    // B learns between calls, so its choice for A moves.
    assert_ne!(kept_sets[2], kept_sets[3], "{kept_sets:?}");
}

#[test]
fn one_step_updates_both_students() {
    let set = encode(&synthetic(12, 7));
    let mut teacher = Rows(random_rows(12, 2.0, 8));
    let mut a = bert(1, 0.1);
    let peer = bert(2, 0.1);
    let (a0, b0) = (snapshot(&a), snapshot(&peer));
    let run = cfg(1, 12, 1e-2, 1);
    let mut objective = CoTeach::new(&mut teacher, peer, CoTeachParams::new(0.3, 2), &run, 12).unwrap();
    let report = train(&mut a, &set, None, &mut objective, &run, &mut |_| {}).unwrap();
    assert_eq!(report.steps, 1);
    let (a1, b1) = (snapshot(&a), snapshot(objective.peer()));
    let changed = |x: &[f32], y: &[f32]| x.iter().zip(y).filter(|(p, q)| p != q).count();
    assert!(changed(&a0, &a1) > a0.len() / 2, "A barely moved");
    assert!(changed(&b0, &b1) > b0.len() / 2, "B barely moved");
    assert_ne!(a1, b1);
}

/// Co-teaching whose step `stop_at` (0-based) fails, as a run killed there would stop.
struct StopAt<'t> {
    inner: CoTeach<'t>,
    stop_at: u64,
}

impl Objective for StopAt<'_> {
    fn student_outputs(&self) -> kd_model::bert::Outputs {
        self.inner.student_outputs()
    }

    fn loss(
        &mut self,
        input: &StepInput,
        student: &Activations,
        grads: &mut kd_model::bert::OutputGrads,
    ) -> kd_methods::Result<kd_methods::trainer::LossLog> {
        if input.step == self.stop_at {
            return Err(kd_methods::Error::Config("interrupted".into()));
        }
        self.inner.loss(input, student, grads)
    }

    fn checkpoint_parts(
        &mut self,
        student: &kd_model::optim::Optimizer,
    ) -> kd_methods::Result<(Option<OwnPart<'_>>, Vec<PartMut<'_>>)> {
        self.inner.checkpoint_parts(student)
    }
}

/// A run interrupted after step 5 and resumed from its checkpoint ends with both students and
/// their optimisers exactly where an uninterrupted run's are: the peer B and its AdamW moments
/// are in the checkpoint, not re-initialised on resume.
#[test]
fn a_resumed_run_ends_bit_exact_with_the_peer() {
    let set = encode(&synthetic(40, 21));
    let rows = random_rows(40, 2.0, 22);
    let dir = std::env::temp_dir().join(format!("kd-coteach-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let checkpoint = |resume| CheckpointConfig { dir: dir.clone(), every: 1, resume };
    let run = |resume| TrainConfig { checkpoint: Some(checkpoint(resume)), ..cfg(2, 8, 1e-2, 5) };
    let params = CoTeachParams::new(0.3, 2);

    let (mut whole_a, mut teacher) = (bert(1, 0.1), Rows(rows.clone()));
    let mut objective = CoTeach::new(&mut teacher, bert(2, 0.1), params, &run(false), 40).unwrap();
    let whole = train(&mut whole_a, &set, None, &mut objective, &run(false), &mut |_| {}).unwrap();
    let whole_b = snapshot(objective.peer());
    assert_eq!(whole.steps, 10);
    std::fs::remove_dir_all(&dir).unwrap();

    let (mut a, mut teacher) = (bert(1, 0.1), Rows(rows.clone()));
    let inner = CoTeach::new(&mut teacher, bert(2, 0.1), params, &run(false), 40).unwrap();
    let mut stopping = StopAt { inner, stop_at: 5 };
    let err = train(&mut a, &set, None, &mut stopping, &run(false), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");

    // A fresh process: both students rebuilt from their seeds, then the checkpoint loaded.
    let (mut a, mut teacher) = (bert(1, 0.1), Rows(rows));
    let mut objective = CoTeach::new(&mut teacher, bert(2, 0.1), params, &run(true), 40).unwrap();
    let mut resumed_at = None;
    let report = train(&mut a, &set, None, &mut objective, &run(true), &mut |e| {
        if let Event::Resumed { step } = e {
            resumed_at = Some(step);
        }
    })
    .unwrap();
    assert_eq!((resumed_at, report.steps), (Some(5), 10));
    assert!(snapshot(&a) == snapshot(&whole_a), "student A differs from the uninterrupted run's");
    assert!(snapshot(objective.peer()) == whole_b, "peer B differs from the uninterrupted run's");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_student_kept_is_the_better_on_dev() {
    let mut dev = encode(&synthetic(40, 9));
    let (a, b) = (bert(1, 0.0), bert(2, 0.0));
    let argmaxes = |m: &Bert| -> Vec<u32> {
        predict(m, &dev.items, 16).unwrap().iter().map(|r| kd_methods::trainer::argmax(r) as u32).collect()
    };
    let (pa, pb) = (argmaxes(&a), argmaxes(&b));
    assert_ne!(pa, pb, "the two random students must disagree somewhere");

    dev.targets = Targets::Classes(pb);
    let kept = keep_better(a, b, &dev, 16, MetricKind::Accuracy).unwrap();
    assert_eq!(kept.which, Student::B);
    assert_eq!(kept.dev_b.main(), 1.0);
    assert!(kept.dev_a.main() < 1.0);
    assert_eq!(accuracy(&kept.model, &dev), 1.0);

    let b = kept.model;
    dev.targets = Targets::Classes(pa);
    let kept = keep_better(bert(1, 0.0), b, &dev, 16, MetricKind::Accuracy).unwrap();
    assert_eq!(kept.which, Student::A);
    assert_eq!(accuracy(&kept.model, &dev), 1.0);
}

// ---------------------------------------------------------------- end to end

/// A teacher trained on clean labels; 40% of the student's labels flipped by `noise::inject`.
/// Relabel must distrust the flipped labels, co-teaching must estimate the rate and drop mostly
/// flipped rows, and both must still learn the task (about 1.5 s).
#[test]
fn both_methods_see_through_injected_label_noise() {
    let clean = synthetic(480, 11);
    let dev = encode(&synthetic(240, 12));
    let mut teacher = bert(10, 0.1);
    train(&mut teacher, &encode(&clean), None, &mut Ce, &cfg(5, 16, 3e-3, 10), &mut |_| {}).unwrap();
    let teacher_acc = accuracy(&teacher, &dev);
    assert!(teacher_acc > 0.95, "teacher dev accuracy {teacher_acc}");

    let noisy = inject(&clean, &NoiseModel::Symmetric { rate: 0.4 }, 0).unwrap();
    let train_noisy = encode(&noisy.dataset);
    let n = train_noisy.items.len();
    let is_flipped: Vec<bool> = (0..n).map(|i| noisy.flipped.binary_search(&i).is_ok()).collect();
    let mut cache = CachedLogits::build(&teacher, &train_noisy, 64).unwrap();
    let run = cfg(5, 16, 3e-3, 1);

    // noisy-relabel: the flipped labels lose their hard-label weight, and the student learns.
    let t = Tensor::from_vec(cache.rows().concat(), &[n, CLASSES], &Device::Cpu).unwrap();
    let y = IdTensor::from_vec(labels(&train_noisy).to_vec(), &[n], &Device::Cpu).unwrap();
    let w = trust_weights(&t, &y, None).unwrap();
    let mean_w = |flipped: bool| {
        let v: Vec<f32> = w.iter().zip(&is_flipped).filter(|(_, &f)| f == flipped).map(|(&w, _)| w).collect();
        v.iter().sum::<f32>() / v.len() as f32
    };
    let (trust_flipped, trust_clean) = (mean_w(true), mean_w(false));
    assert!(trust_flipped < 0.2 && trust_clean > 0.8, "mean trust: flipped {trust_flipped}, clean {trust_clean}");
    let mut student = bert(20, 0.1);
    let mut relabel = NoisyRelabel::new(&mut cache, RelabelParams::default()).unwrap();
    train(&mut student, &train_noisy, None, &mut relabel, &run, &mut |_| {}).unwrap();
    let relabel_acc = accuracy(&student, &dev);
    assert!(relabel_acc > 0.9, "noisy-relabel dev accuracy {relabel_acc}");

    // noisy-coteach: r_est from the teacher (right on train, so the estimate is the true rate).
    let true_rate = noisy.flipped.len() as f32 / n as f32;
    let r_est = estimate_noise_rate(cache.rows(), &train_noisy.targets).unwrap();
    assert!((r_est - true_rate).abs() < 0.02, "r_est {r_est}, true rate {true_rate}");
    let mut a = bert(20, 0.1);
    let mut objective = CoTeach::new(&mut cache, bert(30, 0.1), CoTeachParams::new(r_est, 30), &run, n).unwrap();
    train(&mut a, &train_noisy, None, &mut objective, &run, &mut |_| {}).unwrap();
    // One more selection, over the whole training set past the ramp: what each student drops
    // for the other is almost only flipped rows.
    let all = batch_of(&train_noisy, (0..n).collect());
    let acts = forward(&a, &all.batch);
    let mut grads = acts.output_grads().unwrap();
    objective.loss(&input(&all, u64::MAX / 2), &acts, &mut grads).unwrap();
    let sel = objective.last.clone().unwrap();
    for (who, keep) in [("A", &sel.keep_a), ("B", &sel.keep_b)] {
        let dropped: Vec<usize> = (0..n).filter(|i| !keep.contains(i)).collect();
        let precision = dropped.iter().filter(|&&i| is_flipped[i]).count() as f32 / dropped.len() as f32;
        assert!(precision > 0.8, "{precision} of the rows dropped for {who} are flipped (base rate {true_rate})");
    }
    let kept = keep_better(a, objective.into_peer(), &dev, 64, MetricKind::Accuracy).unwrap();
    let best = kept.dev_a.main().max(kept.dev_b.main());
    assert_eq!(accuracy(&kept.model, &dev), best);
    assert!(best > 0.9, "noisy-coteach dev accuracy {best} (A {:?}, B {:?})", kept.dev_a, kept.dev_b);
}
