//! `ild`: intermediate-layer distillation (TinyBERT / PKD style), stage 1 of a two-stage run
//! whose stage 2 is logit KD ([`crate::methods::kd`]).
//!
//! With a teacher of N layers and a student of M, student layer m is matched to teacher layer
//! g(m) = m * N / M (uniform mapping):
//!   loss = sum_m MSE(h_s[m], h_t[g(m)])  +  sum_m KL(A_t[g(m)] || A_s[m])
//! over hidden states (masked MSE, DESIGN.md) and attention maps (row KL, masked keys excluded).
//! `last_layer` keeps only the last pair of each (L-ILD). A student narrower or wider than its
//! teacher is matched through a learned projection per hidden pair, MSE(h_s[m] W_mᵀ + b_m,
//! h_t[g(m)]) ([`losses::HiddenProjection`], TinyBERT's `fit_dense`); equal widths use none.

use kd_kernels::rng::mix64;
use kd_model::bert::{Activations, Bert, OutputGrads};
use kd_model::optim::Optimizer;

use crate::checkpoint::OwnPart;
use crate::losses::{self, HiddenProjection};
use crate::methods::teacher::LiveTeacher;
use crate::trainer::{LossLog, Objective, StepInput};
use crate::{Error, Result};

/// Which layers are matched.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerMap {
    /// (student hidden-state index, teacher hidden-state index); 0 is the embedding output.
    pub hidden: Vec<(usize, usize)>,
    /// (student layer, teacher layer) attention maps, 0-based.
    pub attention: Vec<(usize, usize)>,
}

impl LayerMap {
    /// Uniform mapping of every student layer, or of the last one only.
    pub fn uniform(student_layers: usize, teacher_layers: usize, last_layer: bool) -> Result<LayerMap> {
        if student_layers == 0 || !teacher_layers.is_multiple_of(student_layers) {
            return Err(Error::Config(format!(
                "cannot map {student_layers} student layers uniformly onto {teacher_layers} teacher layers"
            )));
        }
        let per = teacher_layers / student_layers;
        let first = if last_layer { student_layers } else { 1 };
        Ok(LayerMap {
            hidden: (first..=student_layers).map(|m| (m, m * per)).collect(),
            attention: (first..=student_layers).map(|m| (m - 1, m * per - 1)).collect(),
        })
    }
}

pub struct Ild<'t> {
    pub teacher: LiveTeacher<'t>,
    pub map: LayerMap,
    /// One projection per hidden pair when the widths differ.
    pub projection: Option<HiddenProjection>,
}

/// Salt of the projections' initialisation seed, so they draw apart from the student's weights.
const PROJECTION_SEED: u64 = 0x6669_745f_6465_6e73;

impl<'t> Ild<'t> {
    /// `seed` draws the width projections' initial weights (unused when the widths match).
    pub fn new(teacher: &'t Bert, student: &Bert, last_layer: bool, seed: u64) -> Result<Self> {
        let (t, s) = (&teacher.config, &student.config);
        if t.num_attention_heads != s.num_attention_heads {
            return Err(Error::Config(format!(
                "ild matches attention maps head by head: teacher has {} heads, student {}",
                t.num_attention_heads, s.num_attention_heads
            )));
        }
        let map = LayerMap::uniform(s.num_hidden_layers, t.num_hidden_layers, last_layer)?;
        let projection =
            HiddenProjection::between(t, s, map.hidden.len(), mix64(seed ^ PROJECTION_SEED), &student.device())?;
        Ok(Ild { teacher: LiveTeacher::new(teacher, true), map, projection })
    }
}

impl Objective for Ild<'_> {
    fn keep_scores(&self) -> bool {
        true
    }

    fn loss(&mut self, input: &StepInput, student: &Activations, grads: &mut OutputGrads) -> Result<LossLog> {
        let teacher = self.teacher.forward(input)?;
        let mask = &input.batch.mask;
        let mut log = LossLog::default();
        let hidden = match &mut self.projection {
            None => losses::hidden_mse(grads, student, teacher, &self.map.hidden, mask, 1.0)?,
            Some(p) => p.hidden_mse(grads, student, teacher, &self.map.hidden, mask, 1.0)?,
        };
        log.push("hidden_mse", hidden);
        log.push("attn_kl", losses::attention_kl(grads, student, teacher, &self.map.attention, mask, 1.0)?);
        Ok(log)
    }

    fn update_own(&mut self, student: &Optimizer) -> Result<()> {
        HiddenProjection::update_any(&mut self.projection, student)
    }

    fn own_part(&mut self, student: &Optimizer) -> Result<Option<OwnPart<'_>>> {
        HiddenProjection::part_of_any(&mut self.projection, student)
    }
}

#[cfg(test)]
mod tests {
    use kd_kernels::rng::Rng;
    use kd_kernels::Device;
    use kd_model::bert::{EncoderBatch, ForwardMode};
    use kd_model::optim::Params;
    use kd_model::{BertConfig, BertWeights};

    use super::*;
    use crate::batching::{collate, gather_targets, BatchTargets, Encoded, EncodedSet, Targets};
    use crate::methods::cr_ild::{self, CrIldConfig, Stage1Objective};
    use crate::metrics::MetricKind;
    use crate::trainer::{train, Event, TrainConfig};

    /// A fresh BERT from a tiny config, dropout off so a step is a function of the weights.
    fn model(hidden: usize, layers: usize, heads: usize, seed: u64) -> Bert {
        let mut c: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 2 * hidden, "max_position_embeddings": 16, "initializer_range": 0.2,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        }))
        .unwrap();
        c.set_num_labels(2);
        let w = BertWeights::init(&c, 2, seed, &Device::Cpu).unwrap();
        Bert::new(c, w)
    }

    fn set(n: usize, seed: u64) -> EncodedSet {
        let mut rng = Rng::new(seed);
        let items = (0..n)
            .map(|_| {
                let ids: Vec<u32> = (0..3 + rng.below(6)).map(|_| 1 + rng.below(39) as u32).collect();
                Encoded { type_ids: vec![0; ids.len()], ids }
            })
            .collect();
        EncodedSet { items, targets: Targets::Classes((0..n).map(|i| (i % 2) as u32).collect()) }
    }

    fn train_config(epochs: usize, batch_size: usize) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size,
            lr: 1e-2,
            warmup_ratio: 0.0,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            seed: 3,
            group_by_length: false,
            eval_every: None,
            metric: MetricKind::Accuracy,
            checkpoint: None,
        }
    }

    /// The losses of each step of `objective` training `student` on `s`.
    fn train_losses(student: &mut Bert, s: &EncodedSet, objective: &mut dyn Objective, cfg: &TrainConfig) -> Vec<f32> {
        let mut losses = Vec::new();
        train(student, s, None, objective, cfg, &mut |e| {
            if let Event::Step { loss, .. } = e {
                losses.push(loss.total);
            }
        })
        .unwrap();
        losses
    }

    #[test]
    fn uniform_map_follows_tinybert() {
        let m = LayerMap::uniform(3, 6, false).unwrap();
        assert_eq!(m.hidden, vec![(1, 2), (2, 4), (3, 6)]);
        assert_eq!(m.attention, vec![(0, 1), (1, 3), (2, 5)]);
        let last = LayerMap::uniform(3, 6, true).unwrap();
        assert_eq!(last.hidden, vec![(3, 6)]);
        assert_eq!(last.attention, vec![(2, 5)]);
        assert!(LayerMap::uniform(4, 6, false).is_err());
    }

    #[test]
    fn a_narrower_student_trains_through_learned_projections() {
        let teacher = model(64, 4, 2, 1);
        let mut student = model(32, 2, 2, 2);
        let s = set(8, 4);
        let mut ild = Ild::new(&teacher, &student, false, 5).unwrap();
        let initial = {
            let p = ild.projection.as_ref().expect("widths differ: a projection per hidden pair");
            assert_eq!(p.weights.0.len(), 2);
            assert_eq!(p.weights.0[0].weight.shape(), &[64, 32]);
            p.weights.0[0].weight.to_vec().unwrap()
        };
        // One batch of every example per step: the loss is a function of the step's weights.
        let losses = train_losses(&mut student, &s, &mut ild, &train_config(12, 8));
        assert_eq!(losses.len(), 12);
        assert!(losses.iter().all(|l| l.is_finite()));
        assert!(losses[11] < 0.8 * losses[0], "{losses:?}");
        let p = ild.projection.as_mut().unwrap();
        assert_ne!(p.weights.0[0].weight.to_vec().unwrap(), initial, "the projection trains with the student");
        assert!(p.grads.params_mut().iter().all(|(_, g)| g.to_vec().unwrap().iter().all(|&v| v == 0.0)));
        // The student itself stays a plain BERT of its own width.
        assert_eq!(student.weights.embeddings.word_embeddings.shape(), &[40, 32]);
    }

    /// The step's batch and targets, for an objective run by hand.
    fn step_of(s: &EncodedSet) -> (EncoderBatch, BatchTargets, Vec<usize>) {
        let indices: Vec<usize> = (0..s.items.len()).collect();
        let batch = collate(&s.items, 0, &Device::Cpu).unwrap();
        (batch, gather_targets(&s.targets, &indices, &Device::Cpu).unwrap(), indices)
    }

    #[test]
    fn the_projection_and_student_gradients_match_finite_differences() {
        let teacher = model(64, 2, 2, 1);
        let mut student = model(32, 1, 2, 2);
        let s = set(5, 6);
        let (batch, targets, indices) = step_of(&s);
        let input =
            StepInput { batch: &batch, indices: &indices, targets: &targets, epoch: 0, step: 0, steps_per_epoch: 1 };
        let mut ild = Ild::new(&teacher, &student, false, 7).unwrap();
        let mode = ForwardMode { train: false, seed: 0, keep_scores: true };
        let loss_at = |ild: &mut Ild, student: &Bert, backward: Option<&mut BertWeights>| -> f64 {
            let mut acts = student.activations(batch.batch, batch.seq).unwrap();
            student.forward(&mut acts, &batch, None, mode).unwrap();
            let mut og = acts.output_grads().unwrap();
            let log = ild.loss(&input, &acts, &mut og).unwrap();
            if let Some(grads) = backward {
                student.backward(grads, &mut acts, &og, &batch, None).unwrap();
            }
            log.total as f64
        };
        let mut grads = student.weights.zeros_like().unwrap();
        loss_at(&mut ild, &student, Some(&mut grads));
        let projection = |ild: &mut Ild| -> Vec<(String, Vec<f32>)> {
            let p = ild.projection.as_mut().unwrap();
            p.grads.params_mut().into_iter().map(|(n, t)| (n, t.to_vec().unwrap())).collect()
        };
        let analytic = projection(&mut ild);
        let eps = 1e-2;
        let close = |a: f32, b: f32| (a - b).abs() <= 2e-2 * (1.0 + a.abs().max(b.abs())) && a.abs() > 1e-4;
        for (k, index) in [(0, 5), (0, 64 * 32 - 3), (0, 33 * 32 + 17), (1, 0), (1, 41)] {
            let want = analytic[k].1[index];
            let at = |ild: &mut Ild, v: f32| {
                let mut p = ild.projection.as_mut().unwrap().weights.params_mut();
                p[k].1.cpu_mut().unwrap()[index] = v;
                drop(p);
                loss_at(ild, &student, None)
            };
            let base = ild.projection.as_mut().unwrap().weights.params_mut()[k].1.to_vec().unwrap()[index];
            let numeric = ((at(&mut ild, base + eps) - at(&mut ild, base - eps)) / (2.0 * eps as f64)) as f32;
            at(&mut ild, base);
            assert!(close(want, numeric), "{}[{index}]: analytic {want}, numeric {numeric}", analytic[k].0);
        }
        // The gradient reaches the student's weights through the projection too.
        let name = "bert.encoder.layer.0.output.dense.weight";
        for index in [3, 200] {
            let mut want = None;
            grads.visit(&mut |n, t| {
                if n == name {
                    want = Some(t.to_vec().unwrap()[index]);
                }
            });
            let want = want.unwrap();
            let base = student.weights.layers[0].output.weight.to_vec().unwrap()[index];
            let mut at = |v: f32| {
                student.weights.visit_mut(&mut |n, t| {
                    if n == name {
                        t.cpu_mut().unwrap()[index] = v;
                    }
                });
                loss_at(&mut ild, &student, None)
            };
            let numeric = ((at(base + eps) - at(base - eps)) / (2.0 * eps as f64)) as f32;
            at(base);
            assert!(close(want, numeric), "{name}[{index}]: analytic {want}, numeric {numeric}");
        }
    }

    #[test]
    fn a_run_with_projections_resumes_to_the_uninterrupted_result() {
        use crate::checkpoint::{self, CheckpointConfig};
        fn snapshot<P: Params>(p: &mut P) -> Vec<(String, Vec<f32>)> {
            p.params_mut().into_iter().map(|(n, t)| (n, t.to_vec().unwrap())).collect()
        }
        let teacher = model(64, 4, 2, 1);
        let s = set(8, 4);
        let dir = std::env::temp_dir().join(format!("kd-ild-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // 2 steps an epoch, 6 in all; the state is written after steps 2 and 4, the run dies in 5.
        let cfg = |checkpoint| TrainConfig { checkpoint, warmup_ratio: 0.2, ..train_config(3, 4) };
        let ck = |resume| Some(CheckpointConfig { dir: dir.clone(), every: 2, resume });
        let run = |checkpoint, observer: &mut dyn FnMut(Event)| {
            let mut student = model(32, 2, 2, 2);
            let mut ild = Ild::new(&teacher, &student, false, 5).unwrap();
            let done = train(&mut student, &s, None, &mut ild, &cfg(checkpoint), observer).map(|r| r.steps);
            let projection = snapshot(&mut ild.projection.unwrap().weights);
            (done, snapshot(&mut student.weights), projection)
        };

        let (_, want_student, want_projection) = run(None, &mut |_| {});
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(ck(false), &mut |e| {
                if let Event::Step { step: 5, .. } = e {
                    panic!("interrupted");
                }
            })
        }));
        assert!(died.is_err());
        let mut events = Vec::new();
        let (done, student, projection) = run(ck(true), &mut |e| match e {
            Event::Resumed { step } => events.push(format!("resumed {step}")),
            Event::Step { step, .. } => events.push(format!("step {step}")),
            _ => {}
        });
        assert_eq!(done.unwrap(), 6);
        assert_eq!(events, ["resumed 4", "step 5", "step 6"]);
        assert!(student == want_student, "students differ");
        assert!(projection == want_projection, "projections differ");

        // A state written without the projections (before they were stored) still loads: they
        // keep their values, their optimiser at the run's step.
        let mut student = model(32, 2, 2, 2);
        let mut optimizer = Optimizer::new(cfg(None).optimizer(6), &student.weights).unwrap();
        checkpoint::save(&dir, &[("", &student.weights, &optimizer)], None, 4, None).unwrap();
        let mut ild = Ild::new(&teacher, &student, false, 5).unwrap();
        let own = ild.own_part(&optimizer).unwrap();
        let resumed = checkpoint::load(&dir, &mut [("", &mut student.weights, &mut optimizer)], own).unwrap();
        assert_eq!(resumed.unwrap().step, 4);
        assert_eq!(ild.own_part(&optimizer).unwrap().unwrap().2.step, 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn equal_widths_compare_states_directly_and_head_counts_must_match() {
        let teacher = model(32, 2, 2, 1);
        let student = model(32, 1, 2, 2);
        let s = set(4, 8);
        let (batch, targets, indices) = step_of(&s);
        let input =
            StepInput { batch: &batch, indices: &indices, targets: &targets, epoch: 0, step: 0, steps_per_epoch: 1 };
        let mut ild = Ild::new(&teacher, &student, false, 7).unwrap();
        assert!(ild.projection.is_none());
        let mode = ForwardMode { train: false, seed: 0, keep_scores: true };
        let mut acts = student.activations(batch.batch, batch.seq).unwrap();
        student.forward(&mut acts, &batch, None, mode).unwrap();
        let mut og = acts.output_grads().unwrap();
        let log = ild.loss(&input, &acts, &mut og).unwrap();
        let mut direct = acts.output_grads().unwrap();
        let t = ild.teacher.forward(&input).unwrap();
        let want = losses::hidden_mse(&mut direct, &acts, t, &ild.map.hidden, &batch.mask, 1.0).unwrap();
        assert_eq!(log.terms[0], ("hidden_mse", want));
        let grad = |g: &OutputGrads| g.hidden[1].as_ref().unwrap().to_vec().unwrap();
        assert_eq!(grad(&og), grad(&direct));

        let err = Ild::new(&teacher, &model(32, 1, 4, 2), false, 7).err().unwrap().to_string();
        assert_eq!(err, "ild matches attention maps head by head: teacher has 2 heads, student 4");
    }

    #[test]
    fn cr_ild_projects_a_narrower_students_last_hidden_state() {
        let teacher = model(64, 2, 2, 1);
        let s = set(6, 9);
        for objective in [Stage1Objective::AttentionHidden, Stage1Objective::Qkv] {
            let mut student = model(32, 1, 2, 2);
            let cfg = train_config(6, 6);
            let mut obj =
                cr_ild::stage1(&teacher, &student, CrIldConfig { objective, ..CrIldConfig::new(cfg.epochs, 1) })
                    .unwrap();
            let losses = train_losses(&mut student, &s, &mut obj, &cfg);
            assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{objective:?}: {losses:?}");
        }
        let err = cr_ild::stage1(&teacher, &model(32, 1, 4, 2), CrIldConfig::new(2, 1)).err().unwrap().to_string();
        assert!(err.contains("teacher has 2 heads, student 4"), "{err}");
    }
}
