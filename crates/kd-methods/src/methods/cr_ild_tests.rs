use kd_kernels::rng::Rng;
use kd_kernels::Device;
use kd_model::BertConfig;

use super::*;
use crate::batching::{collate, gather_targets, Encoded};
use crate::metrics::MetricKind;
use crate::trainer::{train, TrainConfig};

fn config(layers: usize) -> BertConfig {
    let mut c: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": layers, "num_attention_heads": 2,
        "intermediate_size": 24, "max_position_embeddings": 16, "initializer_range": 0.4,
    }))
    .unwrap();
    c.set_num_labels(3);
    c
}

fn model(layers: usize, seed: u64) -> Bert {
    let c = config(layers);
    let w = BertWeights::init(&c, 3, seed, &Device::Cpu).unwrap();
    Bert::new(c, w)
}

/// Examples of different lengths (so the masks differ between partners), some of them pairs.
fn set(n: usize, seed: u64) -> EncodedSet {
    let mut rng = Rng::new(seed);
    let items = (0..n)
        .map(|i| {
            let len = 2 + rng.below(6);
            let ids = (0..len).map(|_| 1 + rng.below(39) as u32).collect();
            let type_ids = (0..len).map(|t| u32::from(i % 2 == 1 && t >= len / 2)).collect();
            Encoded { ids, type_ids }
        })
        .collect();
    EncodedSet { items, targets: Targets::Classes((0..n).map(|i| (i % 3) as u32).collect()) }
}

fn batch_of(s: &EncodedSet) -> EncoderBatch {
    collate(&s.items, 0, &Device::Cpu).unwrap()
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn lambda_is_max_of_u_and_one_minus_u() {
    let draws: Vec<f32> = (0..4000).map(|step| sample_lambda(7, step)).collect();
    assert!(draws.iter().all(|l| (0.5..=1.0).contains(l)));
    // max(u, 1 - u) with u ~ U(0, 1) is uniform on [0.5, 1]: mean 0.75, a quarter below 0.625.
    let mean = draws.iter().sum::<f32>() / draws.len() as f32;
    let low = draws.iter().filter(|&&l| l < 0.625).count() as f32 / draws.len() as f32;
    assert!((mean - 0.75).abs() < 0.01, "mean {mean}");
    assert!((low - 0.25).abs() < 0.03, "{low}");
    assert_eq!(sample_lambda(7, 3), sample_lambda(7, 3));
    assert_ne!(sample_lambda(7, 3), sample_lambda(8, 3));
}

#[test]
fn partners_are_the_reversed_batch_and_masks_are_united() {
    assert_eq!(partners(5), vec![4, 3, 2, 1, 0]);
    assert_eq!(partners(1), vec![0]);
    let s = set(5, 1);
    let batch = batch_of(&s);
    let mix = Mixup::new(&batch, 0.7).unwrap();
    assert_eq!(mix.partners, vec![4, 3, 2, 1, 0]);
    let l = batch.seq;
    let m = batch.mask.to_vec().unwrap();
    let union = mix.batch.mask.to_vec().unwrap();
    let partner = mix.partner_mask.to_vec().unwrap();
    for b in 0..5 {
        for t in 0..l {
            let (own, other) = (m[b * l + t], m[(4 - b) * l + t]);
            assert_eq!(union[b * l + t], own.max(other), "example {b} token {t}");
            assert_eq!(partner[b * l + t], other);
        }
    }
    assert_ne!(union, m, "the test set must have partners of different lengths");
    assert_eq!(mix.own_mask.to_vec().unwrap(), m);
    assert_eq!(mix.batch.ids.to_vec().unwrap(), batch.ids.to_vec().unwrap());
    assert_eq!(mix.batch.type_ids.to_vec().unwrap(), batch.type_ids.to_vec().unwrap());
}

#[test]
fn consistency_weight_is_zero_in_the_first_epoch_and_ramps_linearly() {
    let w: Vec<f32> = (0..5).map(|e| consistency_weight(0.1, e, 5)).collect();
    assert_eq!(w[0], 0.0);
    for (e, &v) in w.iter().enumerate() {
        assert!(close(v, 0.1 * e as f32 / 5.0, 1e-6), "{w:?}");
    }
    assert!(w.iter().all(|&v| v <= 0.1 * 4.0 / 5.0 + 1e-7));
}

#[test]
fn blend_mixes_each_row_with_its_partner() {
    let batch = batch_of(&set(3, 2));
    let lambda = 0.8;
    let mix = Mixup::new(&batch, lambda).unwrap();
    let (n, d) = (batch.rows(), 5);
    let mut rng = Rng::new(3);
    let e: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let mut x = Tensor::from_slice(&e, &[n, d], &Device::Cpu).unwrap();
    mix.blend(&mut x).unwrap();
    let got = x.to_vec().unwrap();
    let l = batch.seq;
    for r in 0..n {
        let p = (2 - r / l) * l + r % l;
        for c in 0..d {
            let want = lambda * e[r * d + c] + (1.0 - lambda) * e[p * d + c];
            assert!(close(got[r * d + c], want, 1e-6), "row {r} col {c}");
        }
    }
}

#[test]
fn both_models_encode_their_own_mixed_embedding_output() {
    let batch = batch_of(&set(4, 4));
    let mix = Mixup::new(&batch, 0.6).unwrap();
    for m in [model(2, 1), model(3, 2)] {
        let mode = ForwardMode { train: true, seed: 9, keep_scores: false };
        let mut clean = m.activations(batch.batch, batch.seq).unwrap();
        m.embed(&mut clean, &mix.batch, None, mode).unwrap();
        let e = clean.hidden[0].to_vec().unwrap();
        let mut mixed = m.activations(batch.batch, batch.seq).unwrap();
        mix.forward(&m, &mut mixed, mode).unwrap();
        let got = mixed.hidden[0].to_vec().unwrap();
        let (l, d) = (batch.seq, m.config.hidden_size);
        for r in 0..batch.rows() {
            let p = (3 - r / l) * l + r % l;
            for c in 0..d {
                assert!(close(got[r * d + c], 0.6 * e[r * d + c] + 0.4 * e[p * d + c], 1e-6));
            }
        }
        // The encoder ran on the mixed input with the united mask: a plain forward differs.
        let mut plain = m.activations(batch.batch, batch.seq).unwrap();
        m.forward(&mut plain, &batch, None, mode).unwrap();
        assert_ne!(plain.hidden.last().unwrap().to_vec().unwrap(), mixed.hidden.last().unwrap().to_vec().unwrap());
    }
}

/// One stage-1 step by hand, as the trainer runs it.
struct Step {
    batch: EncoderBatch,
    targets: crate::batching::BatchTargets,
    indices: Vec<usize>,
    epoch: usize,
}

impl Step {
    fn new(s: &EncodedSet, epoch: usize) -> Step {
        let indices: Vec<usize> = (0..s.items.len()).collect();
        let targets = gather_targets(&s.targets, &indices, &Device::Cpu).unwrap();
        Step { batch: batch_of(s), targets, indices, epoch }
    }

    fn input(&self) -> StepInput<'_> {
        StepInput {
            batch: &self.batch,
            indices: &self.indices,
            targets: &self.targets,
            epoch: self.epoch,
            step: 11,
            steps_per_epoch: 1,
        }
    }
}

const MODE: ForwardMode = ForwardMode { train: true, seed: 5, keep_scores: false };

fn mode_of(obj: &CrIld) -> ForwardMode {
    ForwardMode { keep_scores: obj.keep_scores(), ..MODE }
}

/// Forward and loss of one step; returns the loss log and the activations.
fn run(obj: &mut CrIld, student: &Bert, step: &Step) -> (LossLog, Activations, OutputGrads) {
    let input = step.input();
    let mut acts = student.activations(step.batch.batch, step.batch.seq).unwrap();
    obj.student_forward(student, &mut acts, &input, mode_of(obj)).unwrap();
    let mut og = acts.output_grads().unwrap();
    let log = obj.loss(&input, &acts, &mut og).unwrap();
    (log, acts, og)
}

fn term(log: &LossLog, name: &str) -> Option<f32> {
    log.terms.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
}

#[test]
fn the_consistency_term_is_off_in_epoch_zero_and_scales_with_the_ramp() {
    let (teacher, student) = (model(4, 1), model(2, 2));
    let s = set(4, 5);
    let mut obj = stage1(&teacher, &student, CrIldConfig::new(4, 3)).unwrap();
    let (first, ..) = run(&mut obj, &student, &Step::new(&s, 0));
    assert_eq!(first.terms.iter().map(|t| t.0).collect::<Vec<_>>(), vec!["attn_kl", "hidden_mse"]);
    let (one, ..) = run(&mut obj, &student, &Step::new(&s, 1));
    let (two, ..) = run(&mut obj, &student, &Step::new(&s, 2));
    assert_eq!(one.terms.len(), 4);
    for name in ["ic_attn", "ic_hidden"] {
        let (a, b) = (term(&one, name).unwrap(), term(&two, name).unwrap());
        assert!(a > 0.0 && close(b, 2.0 * a, 1e-5), "{name}: {a} then {b}");
    }
    // Same step, same λ and dropout: the ILD terms do not depend on the epoch.
    assert_eq!(term(&first, "attn_kl"), term(&two, "attn_kl"));
    let off = CrIldConfig { w_ic: 0.0, ..CrIldConfig::new(4, 3) };
    let (none, ..) = run(&mut stage1(&teacher, &student, off).unwrap(), &student, &Step::new(&s, 2));
    assert_eq!(none.terms.len(), 2);
}

#[test]
fn losses_vanish_when_the_student_is_the_teacher() {
    let teacher = model(2, 1);
    let student = Bert::new(teacher.config.clone(), teacher.weights.try_clone().unwrap());
    let s = set(5, 6);
    for objective in [Stage1Objective::AttentionHidden, Stage1Objective::Qkv] {
        let mut obj = stage1(&teacher, &student, CrIldConfig { objective, ..CrIldConfig::new(3, 1) }).unwrap();
        let step = Step::new(&s, 0);
        let input = step.input();
        let mut acts = student.activations(step.batch.batch, step.batch.seq).unwrap();
        let eval = ForwardMode { train: false, seed: 0, keep_scores: obj.keep_scores() };
        obj.student_forward(&student, &mut acts, &input, eval).unwrap();
        let mut og = acts.output_grads().unwrap();
        let log = obj.loss(&input, &acts, &mut og).unwrap();
        assert_eq!(log.terms.len(), if objective == Stage1Objective::Qkv { 3 } else { 2 });
        assert!(log.total.abs() < 1e-5, "{objective:?}: {log:?}");
        let grads: Vec<f32> =
            og.scores.iter().chain(og.hidden.iter()).flatten().flat_map(|t| t.to_vec().unwrap()).collect();
        let qkv: Vec<f32> = og.qkv.iter().flatten().flatten().flat_map(|t| t.to_vec().unwrap()).collect();
        assert!(grads.iter().chain(&qkv).all(|g| g.abs() < 1e-5));
        assert_eq!(qkv.is_empty(), objective == Stage1Objective::AttentionHidden);
    }
}

fn values(w: &BertWeights, name: &str) -> Vec<f32> {
    let mut found = None;
    w.visit(&mut |n, t| {
        if n == name {
            found = Some(t.to_vec().unwrap());
        }
    });
    found.unwrap_or_else(|| panic!("no parameter {name}"))
}

fn param<'a>(w: &'a mut BertWeights, name: &str) -> &'a mut Tensor {
    let mut found = None;
    w.visit_mut(&mut |n, t| {
        if n == name {
            found = Some(t);
        }
    });
    found.unwrap_or_else(|| panic!("no parameter {name}"))
}

/// A λ seed: `sample_lambda(LAMBDA_059, 11)` ≈ 0.59.
const LAMBDA_059: u64 = 6;

fn obj_lambda(obj: &mut CrIld, student: &Bert, step: &Step) -> f32 {
    run(obj, student, step);
    obj.mixup.as_ref().unwrap().lambda
}

/// Central differences of the stage-1 loss against the analytic gradient, the consistency
/// target held fixed (it is a stop-gradient view).
fn check_gradients(objective: Stage1Objective, probes: &[(&str, usize)]) {
    let teacher = model(4, 1);
    let mut student = model(2, 2);
    let s = set(5, 7);
    let step = Step::new(&s, 2);
    // Seed 6 draws λ ≈ 0.59 at this step: both partners weigh in.
    let mut obj = stage1(&teacher, &student, CrIldConfig { objective, ..CrIldConfig::new(3, LAMBDA_059) }).unwrap();
    assert!((obj_lambda(&mut obj, &student, &step) - 0.59).abs() < 0.01);
    let (log, mut acts, og) = run(&mut obj, &student, &step);
    assert_eq!(log.terms.len(), if objective == Stage1Objective::Qkv { 3 } else { 4 });
    let mut grads = student.weights.zeros_like().unwrap();
    obj.student_backward(&student, &mut grads, &mut acts, &og, &step.input()).unwrap();

    let mode = mode_of(&obj);
    let mut loss_at = |student: &Bert| -> f64 {
        let mut acts = student.activations(step.batch.batch, step.batch.seq).unwrap();
        obj.mixup.as_ref().unwrap().forward(student, &mut acts, mode).unwrap();
        let mut og = acts.output_grads().unwrap();
        obj.loss(&step.input(), &acts, &mut og).unwrap().total as f64
    };
    assert!((loss_at(&student) - log.total as f64).abs() < 1e-6);
    let eps = 1e-2;
    for &(name, index) in probes {
        let analytic = values(&grads, name)[index];
        let base = values(&student.weights, name)[index];
        let mut at = |v: f32| {
            param(&mut student.weights, name).cpu_mut().unwrap()[index] = v;
            loss_at(&student)
        };
        let numeric = ((at(base + eps) - at(base - eps)) / (2.0 * eps as f64)) as f32;
        at(base);
        assert!(analytic.abs() > 1e-4, "{objective:?} {name}[{index}]: gradient {analytic} too small to check");
        assert!(
            close(analytic, numeric, 2e-2),
            "{objective:?} {name}[{index}]: analytic {analytic}, numeric {numeric}"
        );
    }
}

#[test]
fn attention_hidden_gradient_matches_finite_differences() {
    let s = set(5, 7);
    // A word id used in the batch, so its row gets gradient through both partners.
    let word = s.items[0].ids[1] as usize * 16 + 3;
    check_gradients(
        Stage1Objective::AttentionHidden,
        &[
            ("bert.embeddings.word_embeddings.weight", word),
            ("bert.embeddings.position_embeddings.weight", 16 + 5),
            ("bert.embeddings.LayerNorm.weight", 2),
            ("bert.encoder.layer.0.attention.self.query.weight", 7),
            ("bert.encoder.layer.1.attention.self.key.weight", 30),
            ("bert.encoder.layer.1.output.dense.weight", 11),
        ],
    );
}

#[test]
fn qkv_relation_gradient_matches_finite_differences() {
    let s = set(5, 7);
    let word = s.items[1].ids[0] as usize * 16 + 9;
    check_gradients(
        Stage1Objective::Qkv,
        &[
            ("bert.embeddings.word_embeddings.weight", word),
            ("bert.encoder.layer.0.output.dense.weight", 20),
            ("bert.encoder.layer.1.attention.self.query.weight", 5),
            ("bert.encoder.layer.1.attention.self.key.weight", 40),
            ("bert.encoder.layer.1.attention.self.value.weight", 17),
            ("bert.encoder.layer.1.attention.self.value.bias", 3),
        ],
    );
}

#[test]
fn stage1_trains_through_the_trainer_on_task_and_supplementary_text() {
    let teacher = model(4, 1);
    let mut student = model(2, 2);
    let task = set(6, 8);
    let extra = EncodedSet { items: set(4, 9).items, targets: Targets::Classes(vec![]) };
    let all = stage1_set(&task, Some(&extra));
    assert_eq!(all.items.len(), 10);
    assert_eq!(all.targets.len(), 10);
    assert_eq!(&all.items[6..], &extra.items[..]);
    let before = student.weights.try_clone().unwrap();
    for objective in [Stage1Objective::AttentionHidden, Stage1Objective::Qkv] {
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 4,
            lr: 1e-3,
            warmup_ratio: 0.0,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            seed: 1,
            group_by_length: false,
            eval_every: None,
            metric: MetricKind::Accuracy,
            checkpoint: None,
        };
        let mut obj = stage1(&teacher, &student, CrIldConfig { objective, ..CrIldConfig::new(cfg.epochs, 1) }).unwrap();
        let mut logs = Vec::new();
        let report = train(&mut student, &all, None, &mut obj, &cfg, &mut |e| {
            if let crate::trainer::Event::Step { loss, .. } = e {
                logs.push(loss.clone());
            }
        })
        .unwrap();
        assert_eq!(report.steps, 6);
        assert!(logs.iter().all(|l| l.total.is_finite() && l.total > 0.0));
        if objective == Stage1Objective::AttentionHidden {
            assert!(logs[..3].iter().all(|l| l.terms.len() == 2) && logs[3..].iter().all(|l| l.terms.len() == 4));
        }
    }
    let moved = |name: &str| values(&before, name) != values(&student.weights, name);
    assert!(moved("bert.embeddings.word_embeddings.weight"));
    assert!(moved("bert.encoder.layer.1.attention.self.value.weight"));
    assert!(stage1(&teacher, &model(2, 2), CrIldConfig::new(0, 1)).is_err());
}

#[test]
fn the_stage1_settings_follow_the_official_code() {
    assert!(CrIldConfig::new(1, 0).consistency_never_acts());
    assert!(!CrIldConfig::new(2, 0).consistency_never_acts());
    assert!(!CrIldConfig { w_ic: 0.0, ..CrIldConfig::new(1, 0) }.consistency_never_acts());
    assert!(!CrIldConfig { objective: Stage1Objective::Qkv, ..CrIldConfig::new(1, 0) }.consistency_never_acts());
    assert_eq!("qkv".parse::<Stage1Objective>().unwrap(), Stage1Objective::Qkv);
    assert_eq!("ah".parse::<Stage1Objective>().unwrap(), Stage1Objective::AttentionHidden);
    assert!("a+h".parse::<Stage1Objective>().is_err());
    assert_eq!(stage1_epochs(GlueTask::Rte), Some(20));
    assert_eq!(stage1_epochs(GlueTask::Mnli), Some(5));
}

/// `KL(target ‖ student)` rows of `[B, H, L, L]` scores, keys and query rows restricted to
/// `mask`, the target block of example b read from example `from[b]`; float64.
fn kl_reference(student: &[f32], target: &[f32], from: &[usize], mask: &[f32], heads: usize, l: usize) -> f64 {
    let (mut total, mut rows) = (0.0, 0usize);
    for (b, &fb) in from.iter().enumerate() {
        let keys: Vec<usize> = (0..l).filter(|&j| mask[b * l + j] > 0.5).collect();
        for h in 0..heads {
            for i in keys.iter().copied() {
                let row = |z: &[f32], ex: usize| -> Vec<f64> {
                    let v: Vec<f64> = keys.iter().map(|&j| z[((ex * heads + h) * l + i) * l + j] as f64).collect();
                    let max = v.iter().copied().fold(f64::MIN, f64::max);
                    let lse = max + v.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                    v.iter().map(|x| x - lse).collect()
                };
                let (ls, lt) = (row(student, b), row(target, fb));
                total += lt.iter().zip(&ls).map(|(t, s)| t.exp() * (t - s)).sum::<f64>();
                rows += 1;
            }
        }
    }
    total / rows as f64
}

/// Masked hidden MSE, the target's token rows read from example `from[b]`; float64.
fn mse_reference(student: &[f32], target: &[f32], from: &[usize], mask: &[f32], l: usize, d: usize) -> f64 {
    let (mut total, mut tokens) = (0.0, 0usize);
    for (b, &fb) in from.iter().enumerate() {
        for t in (0..l).filter(|&t| mask[b * l + t] > 0.5) {
            let (s, g) = (&student[(b * l + t) * d..][..d], &target[(fb * l + t) * d..][..d]);
            total += s.iter().zip(g).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>();
            tokens += 1;
        }
    }
    total / (tokens * d) as f64
}

/// `x xᵀ / √d_h` per head of `[B, L, H * d_h]` rows; float32 like the model.
fn relation_reference(x: &[f32], b: usize, l: usize, heads: usize, dh: usize) -> Vec<f32> {
    let mut out = vec![0.0; b * heads * l * l];
    for ex in 0..b {
        for h in 0..heads {
            for i in 0..l {
                for j in 0..l {
                    let dot: f64 = (0..dh)
                        .map(|c| {
                            let at = |t: usize| x[(ex * l + t) * heads * dh + h * dh + c] as f64;
                            at(i) * at(j)
                        })
                        .sum();
                    out[((ex * heads + h) * l + i) * l + j] = (dot / (dh as f64).sqrt()) as f32;
                }
            }
        }
    }
    out
}

#[test]
fn stage1_terms_match_a_float64_reference_of_the_spec() {
    let (teacher, student) = (model(4, 1), model(2, 2));
    let s = set(5, 11);
    let step = Step::new(&s, 2);
    let (heads, d) = (2, 16);
    let close64 = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs());

    let mut obj = stage1(&teacher, &student, CrIldConfig::new(3, LAMBDA_059)).unwrap();
    let (log, acts, _) = run(&mut obj, &student, &step);
    let mix = obj.mixup.as_ref().unwrap();
    let (lambda, ramp) = (mix.lambda as f64, 0.1 * 2.0 / 3.0);
    let (b, l) = (step.batch.batch, step.batch.seq);
    let own: Vec<usize> = (0..b).collect();
    let rev = partners(b);
    let m = step.batch.mask.to_vec().unwrap();
    let (m_rev, union) = (mix.partner_mask.to_vec().unwrap(), mix.batch.mask.to_vec().unwrap());
    let (tch, clean) = (obj.teacher_acts.as_ref().unwrap(), obj.clean_acts.as_ref().unwrap());
    let scores = |a: &Activations| a.layers.last().unwrap().scores.as_ref().unwrap().to_vec().unwrap();
    let hidden = |a: &Activations| a.hidden.last().unwrap().to_vec().unwrap();
    let (ss, ts, cs) = (scores(&acts), scores(tch), scores(clean));
    let (sh, th, ch) = (hidden(&acts), hidden(tch), hidden(clean));

    assert!(close64(term(&log, "attn_kl").unwrap(), kl_reference(&ss, &ts, &own, &m, heads, l)));
    assert!(close64(term(&log, "hidden_mse").unwrap(), mse_reference(&sh, &th, &own, &union, l, d)));
    let ic_attn = ramp
        * (lambda * kl_reference(&ss, &cs, &own, &m, heads, l)
            + (1.0 - lambda) * kl_reference(&ss, &cs, &rev, &m_rev, heads, l));
    assert!(close64(term(&log, "ic_attn").unwrap(), ic_attn), "{log:?} vs {ic_attn}");
    let ic_hidden = ramp
        * (lambda * mse_reference(&sh, &ch, &own, &union, l, d)
            + (1.0 - lambda) * mse_reference(&sh, &ch, &rev, &union, l, d));
    assert!(close64(term(&log, "ic_hidden").unwrap(), ic_hidden), "{log:?} vs {ic_hidden}");

    let qkv = CrIldConfig { objective: Stage1Objective::Qkv, ..CrIldConfig::new(3, LAMBDA_059) };
    let mut obj = stage1(&teacher, &student, qkv).unwrap();
    let (log, acts, _) = run(&mut obj, &student, &step);
    let tch = obj.teacher_acts.as_ref().unwrap();
    let (sl, tl) = (acts.layers.last().unwrap(), tch.layers.last().unwrap());
    for (name, xs, xt) in [("q_rel", &sl.q, &tl.q), ("k_rel", &sl.k, &tl.k), ("v_rel", &sl.v, &tl.v)] {
        let rs = relation_reference(&xs.to_vec().unwrap(), b, l, heads, d / heads);
        let rt = relation_reference(&xt.to_vec().unwrap(), b, l, heads, d / heads);
        let want = kl_reference(&rs, &rt, &own, &union, heads, l);
        assert!(want > 1e-3 && close64(term(&log, name).unwrap(), want), "{name}: {log:?} vs {want}");
    }
}
