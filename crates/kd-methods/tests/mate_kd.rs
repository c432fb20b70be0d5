//! `mate-kd` on tiny random models: the soft one-hot reaches only masked positions, the
//! gradient into the generator's samples matches finite differences through both models, a
//! generator step raises the divergence and touches only the generator, the student's loss is
//! the three thirds, a run follows the 10 generator / 100 student batch schedule, and an
//! interrupted run resumes to the same student and generator, bit for bit.

use kd_kernels::ops::embedding::soft_embedding_forward;
use kd_kernels::ops::softmax_kl::KlForm;
use kd_kernels::rng::Rng;
use kd_kernels::{Device, IdTensor, Tensor};
use kd_methods::batching::{collate, BatchTargets, Encoded, EncodedSet, Targets};
use kd_methods::methods::generator::generator_from_encoder;
use kd_methods::methods::mate_kd::{
    self, adversarial_divergence, generator_backward, student_loss, AdversarialPass, BatchSeeds, Divergence, MateKd,
    MateKdConfig, Phase,
};
use kd_methods::metrics::MetricKind;
use kd_methods::trainer::{Event, TrainConfig};
use kd_model::bert::{Bert, EncoderBatch, ForwardMode};
use kd_model::optim::{LinearSchedule, OptimizerConfig};
use kd_model::{BertConfig, BertWeights};

const VOCAB: usize = 24;
const PAD: u32 = 0;
const CLS: u32 = 1;
const SEP: u32 = 2;
const MASK: u32 = 3;
const SPECIAL: [u32; 4] = [PAD, CLS, SEP, MASK];

fn model(hidden: usize, layers: usize, labels: usize, dropout: f64, seed: u64) -> Bert {
    let json = serde_json::json!({
        "model_type": "bert", "vocab_size": VOCAB, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": 2, "intermediate_size": 2 * hidden, "max_position_embeddings": 32,
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout, "pad_token_id": PAD,
        "initializer_range": 0.3,
    });
    let config: BertConfig = serde_json::from_value(json).unwrap();
    let weights = BertWeights::init(&config, labels, seed, &Device::Cpu).unwrap();
    Bert::new(config, weights)
}

struct Models {
    teacher: Bert,
    student: Bert,
    generator: Bert,
}

fn models(dropout: f64) -> Models {
    Models {
        teacher: model(16, 2, 2, dropout, 1),
        student: model(8, 1, 2, dropout, 2),
        generator: generator_from_encoder(&model(8, 1, 2, dropout, 3), 4).unwrap(),
    }
}

/// Scales the classifiers of teacher and student by 10, so their outputs react visibly to a
/// changed input word (the random heads are near-uniform otherwise).
fn sharpen(m: &mut Models) {
    for bert in [&mut m.teacher, &mut m.student] {
        let c = bert.weights.classifier.as_mut().unwrap();
        c.weight.cpu_mut().unwrap().iter_mut().for_each(|v| *v *= 10.0);
    }
}

fn items(n: usize, seed: u64) -> Vec<Encoded> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let len = 5 + rng.below(6);
            let ids: Vec<u32> =
                std::iter::once(CLS).chain((0..len).map(|_| 4 + rng.below(VOCAB - 4) as u32)).chain([SEP]).collect();
            Encoded { type_ids: vec![0; ids.len()], ids }
        })
        .collect()
}

fn labelled(n: usize, seed: u64) -> EncodedSet {
    let items = items(n, seed);
    let labels = (0..n).map(|i| (i % 2) as u32).collect();
    EncodedSet { items, targets: Targets::Classes(labels) }
}

/// Four examples of different lengths (so some rows are padding) and their class labels.
fn batch() -> (EncoderBatch, BatchTargets) {
    let batch = collate(&items(4, 7), PAD, &Device::Cpu).unwrap();
    let labels = IdTensor::from_vec(vec![0, 1, 1, 0], &[4], &Device::Cpu).unwrap();
    (batch, BatchTargets::Classes(labels))
}

fn config() -> MateKdConfig {
    MateKdConfig::new(MASK, SPECIAL.to_vec())
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

fn snapshot(w: &BertWeights) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    w.visit(&mut |_, t| out.push(host(t)));
    out
}

fn adam(lr: f32) -> OptimizerConfig {
    OptimizerConfig {
        lr,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm: Some(5.0),
        schedule: LinearSchedule { warmup: 0, total: 1000 },
    }
}

#[test]
fn the_soft_one_hot_reaches_only_the_masked_positions() {
    let m = models(0.1);
    let (batch, targets) = batch();
    let cfg = config();
    let seeds = BatchSeeds::new(5, 0);
    let mut pass =
        AdversarialPass::forward(&m.teacher, &m.student, &m.generator, &batch, &targets, &cfg, &seeds).unwrap();
    let rows = pass.perturbation.masked.rows.clone();
    let (ids, attention) = (batch.ids.to_vec().unwrap(), host(&batch.mask));
    assert!(!rows.is_empty());
    for &r in &rows {
        let r = r as usize;
        assert!(attention[r] > 0.5 && !SPECIAL.contains(&ids[r]), "row {r} is padding or a special token");
        assert_eq!(
            pass.perturbation.masked.batch.ids.to_vec().unwrap()[r],
            MASK,
            "the generator sees [MASK] at row {r}"
        );
    }
    let hard = &pass.perturbation.hard;
    let p = rows.len();
    assert_eq!(hard.shape(), [p, VOCAB], "logits and samples exist for the masked rows only");

    // e = M * (y . W_E) + (1 - M) * W_E[ids], for each model's own table.
    let mut replaced = 0;
    for (name, bert, embeds) in
        [("teacher", &m.teacher, &pass.teacher_embeds), ("student", &m.student, &pass.student_embeds)]
    {
        let table = &bert.weights.embeddings.word_embeddings;
        let d = table.shape()[1];
        let mut y_w = Tensor::zeros(&[p, d], &Device::Cpu).unwrap();
        soft_embedding_forward(&mut y_w, hard, table, false).unwrap();
        let (y_w, table, embeds) = (host(&y_w), host(table), host(embeds));
        for r in 0..batch.rows() {
            let got = &embeds[r * d..][..d];
            let original = &table[ids[r] as usize * d..][..d];
            match rows.iter().position(|&m| m as usize == r) {
                Some(k) => {
                    assert_eq!(got, &y_w[k * d..][..d], "{name}: masked row {r} is not y . W_E");
                    replaced += usize::from(got != original);
                }
                None => assert_eq!(got, original, "{name}: unmasked row {r} changed"),
            }
        }
    }
    assert!(replaced > 0, "no masked token was replaced by another word");

    // The gradient reaches the generator only at the masked rows.
    let mut tg = m.teacher.weights.zeros_like().unwrap();
    let mut sg = m.student.weights.zeros_like().unwrap();
    let dy = pass.d_samples(&m.teacher, &m.student, &mut tg, &mut sg, 1.0).unwrap();
    assert_eq!(dy.shape(), [p, VOCAB]);
    let mut gg = m.generator.weights.zeros_like().unwrap();
    let out = generator_backward(&m.generator, &mut pass.perturbation, &dy, 1.0, &mut gg).unwrap();
    let d = m.generator.config.hidden_size;
    let dh = host(out.hidden.last().unwrap().as_ref().unwrap());
    for r in 0..batch.rows() {
        let norm: f32 = dh[r * d..][..d].iter().map(|v| v * v).sum();
        assert_eq!(norm > 0.0, rows.contains(&(r as u32)), "row {r}: |d generator output|^2 = {norm}");
    }
    assert!(host(&gg.layers[0].query.weight).iter().any(|&v| v != 0.0), "no gradient in the generator's encoder");
}

/// d_adv with the masked rows' embeddings moved to `e + eps * W_E[word]` in both models (a
/// dense y = one-hot + eps at (k, word)), in float64 from the f32 forwards.
fn divergence_with(m: &Models, pass: &AdversarialPass, seeds: &BatchSeeds, k: usize, word: usize, eps: f32) -> f64 {
    let row = pass.perturbation.masked.rows[k] as usize;
    let input = &pass.perturbation.perturbed;
    let shifted = |bert: &Bert, embeds: &Tensor| {
        let table = host(&bert.weights.embeddings.word_embeddings);
        let d = embeds.last_dim();
        let mut e = host(embeds);
        for j in 0..d {
            e[row * d + j] += eps * table[word * d + j];
        }
        Tensor::from_vec(e, embeds.shape(), &Device::Cpu).unwrap()
    };
    let (et, es) = (shifted(&m.teacher, &pass.teacher_embeds), shifted(&m.student, &pass.student_embeds));
    let mut ta = m.teacher.activations(input.batch, input.seq).unwrap();
    m.teacher.forward(&mut ta, input, Some(&et), ForwardMode::default()).unwrap();
    let mut sa = m.student.activations(input.batch, input.seq).unwrap();
    let mode = ForwardMode { train: true, seed: seeds.student_dropout, keep_scores: false };
    m.student.forward(&mut sa, input, Some(&es), mode).unwrap();
    let value = pass.divergence.apply(sa.logits.as_ref().unwrap(), ta.logits.as_ref().unwrap(), None, None, 1.0);
    value.unwrap() as f64
}

#[test]
fn the_gradient_into_the_samples_matches_finite_differences_through_teacher_and_student() {
    let mut m = models(0.1);
    sharpen(&mut m);
    let (batch, targets) = batch();
    let seeds = BatchSeeds::new(6, 3);
    let mut per_form = Vec::new();
    for form in [KlForm::CrossEntropy, KlForm::Kl] {
        let cfg = MateKdConfig { divergence: form, ..config() };
        let mut pass =
            AdversarialPass::forward(&m.teacher, &m.student, &m.generator, &batch, &targets, &cfg, &seeds).unwrap();
        let mut tg = m.teacher.weights.zeros_like().unwrap();
        let mut sg = m.student.weights.zeros_like().unwrap();
        let dy = host(&pass.d_samples(&m.teacher, &m.student, &mut tg, &mut sg, 1.0).unwrap());
        let mut order: Vec<usize> = (0..dy.len()).collect();
        order.sort_by(|&a, &b| dy[b].abs().total_cmp(&dy[a].abs()));
        // The largest entries, and a spread of others.
        let probes: Vec<usize> = order[..4].iter().chain(order.iter().step_by(order.len() / 5 + 1)).copied().collect();
        let h = 1e-2;
        for i in probes {
            let (k, word) = (i / VOCAB, i % VOCAB);
            let numeric = (divergence_with(&m, &pass, &seeds, k, word, h)
                - divergence_with(&m, &pass, &seeds, k, word, -h))
                / (2.0 * h as f64);
            let want = dy[i] as f64;
            assert!(
                (numeric - want).abs() <= 1e-2 * want.abs() + 2e-4,
                "{form:?} dy[{k}, {word}]: analytic {want}, finite differences {numeric}"
            );
        }
        per_form.push(dy);
    }
    // The CE form also pushes the teacher's entropy: a different gradient into the samples.
    let diff = per_form[0].iter().zip(&per_form[1]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff > 1e-4, "CE-form and KL gradients agree to {diff}");
}

/// The divergence on hard samples moves only when a sample flips to another word, so the
/// check runs several steps, on three seeds, with sharpened classifier heads.
#[test]
fn generator_steps_raise_the_divergence_and_move_only_the_generator() {
    for seed in [8, 9, 10] {
        let mut m = models(0.1);
        sharpen(&mut m);
        let (batch, targets) = batch();
        let cfg = config();
        let seeds = BatchSeeds::new(seed, 0);
        let measure = |m: &Models| {
            adversarial_divergence(&m.teacher, &m.student, &m.generator, &batch, &targets, &cfg, &seeds).unwrap()
        };
        let before = measure(&m);
        let teacher = snapshot(&m.teacher.weights);
        let student = snapshot(&m.student.weights);
        let generator = snapshot(&m.generator.weights);
        let mut run = MateKd::new(&m.teacher, &m.student, &m.generator, cfg.clone(), adam(1e-3), adam(3e-2)).unwrap();
        let mut reported = Vec::new();
        for _ in 0..10 {
            reported.push(run.generator_step(&mut m.generator, &m.student, &batch, &targets, &seeds).unwrap());
        }
        assert_eq!(reported[0], before, "the step reports d_adv before its update");
        let after = measure(&m);
        assert!(after > before + 0.1, "seed {seed}: d_adv {before} -> {after} over 10 generator steps ({reported:?})");
        assert!(snapshot(&m.teacher.weights) == teacher, "the teacher changed");
        assert!(snapshot(&m.student.weights) == student, "the student changed in a generator step");
        assert!(snapshot(&m.generator.weights) != generator, "the generator did not change");

        // A student step moves the student only.
        let generator = snapshot(&m.generator.weights);
        let log = run.student_step(&mut m.student, &m.generator, &batch, &targets, &BatchSeeds::new(seed, 1)).unwrap();
        assert!(log.total.is_finite());
        assert!(snapshot(&m.student.weights) != student, "the student did not change");
        assert!(snapshot(&m.generator.weights) == generator, "the generator changed in a student step");
        assert!(snapshot(&m.teacher.weights) == teacher, "the teacher changed");
    }
}

fn log_softmax(z: &[f32]) -> Vec<f64> {
    let max = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v as f64 - lse).collect()
}

#[test]
fn the_student_loss_is_one_third_each_of_ce_kd_and_the_perturbed_kd() {
    let m = models(0.0);
    let (batch, targets) = batch();
    let other = collate(&items(4, 9), PAD, &Device::Cpu).unwrap();
    let run = |b: &EncoderBatch| {
        let mut acts = m.student.activations(b.batch, b.seq).unwrap();
        m.student.forward(&mut acts, b, None, ForwardMode::default()).unwrap();
        acts
    };
    let (clean, perturbed) = (run(&batch), run(&other));
    let mut rng = Rng::new(4);
    let mut random =
        || Tensor::from_vec((0..8).map(|_| 2.0 * rng.normal() as f32).collect(), &[4, 2], &Device::Cpu).unwrap();
    let (zt, zt_adv) = (random(), random());
    let (mut g_clean, mut g_adv) = (clean.output_grads().unwrap(), perturbed.output_grads().unwrap());
    let divergence = Divergence::Softmax { form: KlForm::CrossEntropy, temperature: 1.0 };
    let log = student_loss(&clean, &perturbed, &zt, &zt_adv, &targets, divergence, &mut g_clean, &mut g_adv).unwrap();

    // Float64 reference, the official code's formulas.
    let y = [0usize, 1, 1, 0];
    let zs = host(clean.logits.as_ref().unwrap());
    let zs_adv = host(perturbed.logits.as_ref().unwrap());
    let (zt, zt_adv) = (host(&zt), host(&zt_adv));
    let cross = |s: &[f32], t: &[f32]| {
        let (ls, lt) = (log_softmax(s), log_softmax(t));
        -lt.iter().zip(&ls).map(|(t, s)| t.exp() * s).sum::<f64>()
    };
    let rows = |z: &[f32]| z.chunks(2).map(<[f32]>::to_vec).collect::<Vec<_>>();
    let (s, s_adv, t, t_adv) = (rows(&zs), rows(&zs_adv), rows(&zt), rows(&zt_adv));
    let ce = (0..4).map(|b| -log_softmax(&s[b])[y[b]]).sum::<f64>() / 4.0;
    let kd = (0..4).map(|b| cross(&s[b], &t[b])).sum::<f64>() / 4.0;
    let adv = (0..4).map(|b| cross(&s_adv[b], &t_adv[b])).sum::<f64>() / 4.0;
    let want = (ce + kd + adv) / 3.0;
    assert!((log.total as f64 - want).abs() < 1e-5, "loss {} vs (ce + kd + adv) / 3 = {want}", log.total);
    let term = |name: &str| log.terms.iter().find(|(n, _)| *n == name).unwrap().1 as f64;
    for (name, value) in [("ce", ce), ("kd", kd), ("adv", adv)] {
        assert!((term(name) - value / 3.0).abs() < 1e-5, "{name}: {} vs {}", term(name), value / 3.0);
    }
    // d/dz_s: (1/3B) [(p_s - onehot) + (p_s - p_t)] on the clean input, (1/3B)(p_s' - p_t') on the perturbed.
    let (dc, da) = (host(g_clean.logits.as_ref().unwrap()), host(g_adv.logits.as_ref().unwrap()));
    for b in 0..4 {
        let (ps, pt) = (log_softmax(&s[b]), log_softmax(&t[b]));
        let (pa, pta) = (log_softmax(&s_adv[b]), log_softmax(&t_adv[b]));
        for c in 0..2 {
            let onehot = f64::from(u8::from(y[b] == c));
            let want_clean = ((ps[c].exp() - onehot) + (ps[c].exp() - pt[c].exp())) / 12.0;
            let want_adv = (pa[c].exp() - pta[c].exp()) / 12.0;
            assert!((dc[b * 2 + c] as f64 - want_clean).abs() < 1e-6, "clean gradient [{b}, {c}]");
            assert!((da[b * 2 + c] as f64 - want_adv).abs() < 1e-6, "perturbed gradient [{b}, {c}]");
        }
    }
}

#[test]
fn regression_compares_with_mse_and_pushes_the_teacher_the_other_way() {
    let zs = Tensor::from_vec(vec![0.5, -1.0, 2.0], &[3, 1], &Device::Cpu).unwrap();
    let zt = Tensor::from_vec(vec![1.0, -1.5, 2.0], &[3, 1], &Device::Cpu).unwrap();
    let (mut ds, mut dt) =
        (Tensor::zeros(&[3, 1], &Device::Cpu).unwrap(), Tensor::zeros(&[3, 1], &Device::Cpu).unwrap());
    let value = Divergence::Mse.apply(&zs, &zt, Some(&mut ds), Some(&mut dt), 2.0).unwrap();
    assert!((value - 2.0 * (0.25 + 0.25) / 3.0).abs() < 1e-6);
    // d/dz_s = weight * 2 (z_s - z_t) / B, and the teacher's the opposite.
    let want = [2.0 * 2.0 * -0.5 / 3.0, 2.0 * 2.0 * 0.5 / 3.0, 0.0];
    for (i, ((s, t), w)) in host(&ds).into_iter().zip(host(&dt)).zip(want).enumerate() {
        assert!((s - w).abs() < 1e-6 && (t + w).abs() < 1e-6, "entry {i}: {s}, {t}, want {w}");
    }
}

fn train_config(epochs: usize, batch_size: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size,
        lr: 1e-3,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        max_grad_norm: Some(5.0),
        seed: 3,
        group_by_length: false,
        eval_every: None,
        metric: MetricKind::Accuracy,
        checkpoint: None,
    }
}

#[test]
fn a_run_alternates_10_generator_and_100_student_batches() {
    let mut m = models(0.1);
    let cfg = config();
    assert_eq!((cfg.generator_steps, cfg.student_steps), (10, 100));
    let train = labelled(230, 11);
    let dev = labelled(20, 12);
    let tc = train_config(2, 2);
    let (mut phases, mut evals) = (Vec::new(), 0);
    let report =
        mate_kd::train(&mut m.student, &m.teacher, &mut m.generator, &train, Some(&dev), &tc, &cfg, &mut |e| match e {
            Event::Step { step, loss, .. } => {
                assert_eq!(step as usize, phases.len() + 1);
                let names: Vec<&str> = loss.terms.iter().map(|(n, _)| *n).collect();
                phases.push(match names.as_slice() {
                    ["generator"] => Phase::Generator,
                    ["ce", "kd", "adv"] => Phase::Student,
                    other => panic!("unexpected loss terms {other:?}"),
                });
            }
            Event::Eval { .. } => evals += 1,
            Event::Best { .. } | Event::Resumed { .. } => {}
        })
        .unwrap();
    // 115 batches an epoch; the cycle runs on across the epoch boundary.
    assert_eq!(report.steps, 230);
    let runs: Vec<(Phase, usize)> = phases.chunk_by(|a, b| a == b).map(|c| (c[0], c.len())).collect();
    use Phase::{Generator as G, Student as S};
    assert_eq!(runs, [(G, 10), (S, 100), (G, 10), (S, 100), (G, 10)]);
    assert_eq!(evals, 1, "one evaluation, at the end");
    assert!(report.final_metrics.is_some());
}

/// 20 rows in batches of 2 are 10 batches: all of them generator batches at n_G = 10.
#[test]
fn a_run_too_short_to_reach_a_student_batch_is_an_error() {
    let mut m = models(0.0);
    let tc = train_config(1, 2);
    let err = mate_kd::train(
        &mut m.student,
        &m.teacher,
        &mut m.generator,
        &labelled(20, 1),
        None,
        &tc,
        &config(),
        &mut |_| {},
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("all 10 batches") && err.to_string().contains("--generator-steps"), "{err}");
    assert!(mate_kd::train(
        &mut m.student,
        &m.teacher,
        &mut m.generator,
        &labelled(22, 1),
        None,
        &tc,
        &config(),
        &mut |_| {}
    )
    .is_ok());
}

#[test]
fn models_that_cannot_work_together_are_errors() {
    let m = models(0.0);
    let mut headless = generator_from_encoder(&model(8, 1, 2, 0.0, 3), 4).unwrap();
    headless.weights.mlm_head = None;
    let err = MateKd::new(&m.teacher, &m.student, &headless, config(), adam(1e-3), adam(1e-3)).err().unwrap();
    assert!(err.to_string().contains("MLM head"), "{err}");
    let json = serde_json::json!({
        "model_type": "bert", "vocab_size": VOCAB + 1, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32,
    });
    let config_other: BertConfig = serde_json::from_value(json).unwrap();
    let other = Bert::new(config_other.clone(), BertWeights::init(&config_other, 2, 1, &Device::Cpu).unwrap());
    let other = generator_from_encoder(&other, 1).unwrap();
    let err = MateKd::new(&m.teacher, &m.student, &other, config(), adam(1e-3), adam(1e-3)).err().unwrap();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let bad_mask = MateKdConfig::new(VOCAB as u32, SPECIAL.to_vec());
    assert!(MateKd::new(&m.teacher, &m.student, &m.generator, bad_mask, adam(1e-3), adam(1e-3)).is_err());
}

#[test]
fn an_interrupted_run_resumes_to_the_same_student_and_generator() {
    use kd_methods::checkpoint::CheckpointConfig;
    // 2 generator then 3 student batches, 6 batches an epoch, 12 in all; dropout on.
    let mate = MateKdConfig { generator_steps: 2, student_steps: 3, generator_lr: 1e-2, ..config() };
    let (train, dev) = (labelled(12, 21), labelled(6, 22));
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kd-methods-mate-kd-resume");
    let _ = std::fs::remove_dir_all(&dir);
    let tc = |checkpoint| TrainConfig {
        epochs: 2,
        batch_size: 2,
        lr: 1e-2,
        warmup_ratio: 0.2,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        seed: 5,
        group_by_length: false,
        eval_every: Some(3),
        metric: MetricKind::Accuracy,
        checkpoint,
    };
    let run = |m: &mut Models, checkpoint, observer: &mut dyn FnMut(Event)| {
        mate_kd::train(
            &mut m.student,
            &m.teacher,
            &mut m.generator,
            &train,
            Some(&dev),
            &tc(checkpoint),
            &mate,
            observer,
        )
    };

    let mut whole = models(0.1);
    let want = run(&mut whole, None, &mut |_| {}).unwrap();

    // The state is written after batches 4 and 8; the run dies during batch 10, in epoch 2.
    let ck = |resume| Some(CheckpointConfig { dir: dir.clone(), every: 4, resume });
    let mut first = models(0.1);
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&mut first, ck(false), &mut |e| {
            if let Event::Step { step: 10, .. } = e {
                panic!("interrupted");
            }
        })
    }));
    assert!(died.is_err());

    let mut resumed = models(0.1);
    let mut events = Vec::new();
    let report = run(&mut resumed, ck(true), &mut |e| match e {
        Event::Resumed { step } => events.push(format!("resumed {step}")),
        Event::Step { step, .. } => events.push(format!("step {step}")),
        _ => {}
    })
    .unwrap();
    assert_eq!(events, ["resumed 8", "step 9", "step 10", "step 11", "step 12"]);
    assert_eq!(report.steps, 12);
    assert!(snapshot(&resumed.student.weights) == snapshot(&whole.student.weights), "students differ");
    assert!(snapshot(&resumed.generator.weights) == snapshot(&whole.generator.weights), "generators differ");
    assert_ne!(snapshot(&resumed.generator.weights), snapshot(&models(0.1).generator.weights), "the generator trained");
    assert_eq!(report.best_metrics, want.best_metrics);
    assert_eq!(report.final_metrics, want.final_metrics);
}
