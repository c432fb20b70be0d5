//! `peer-advised`: Peer-Advised KD (Zhao 2023; METHODS.md A.2, B §4.4-4.7). A data pipeline
//! over the teacher's pseudo-labels, not a per-step loss: a student fits clean labels before
//! noisy ones, so how well a briefly trained probe agrees with each teacher label marks the
//! labels to trust; a peer trained on those re-annotates the rest.
//!
//! ```text
//! S0 = train(init(), X, Y_t, epochs = 2)                    # the probe, on every teacher label
//! score[i] = p_S0(y_t[i] | x_i)                             # convergence score (B §4.7)
//! High = per teacher-label class c, the `keep` fraction of c's rows with the highest score;
//!        Low = the rest                                     # a skewed class keeps its share
//! S1 = train(init(), X[High], Y_t[High])                    # the peer
//! Y_peer = S1(X[Low])                                       # its argmax
//! S2 = train(init(), X, Y_t[High] ∪ Y_peer)                 # the student returned
//! ```
//!
//! Every student starts from the same initial weights (`init()`; the paper leaves this open,
//! fresh starts follow its follow-up MCKD). Hard labels train with CE, as sequence-level KD does.
//! With soft teacher labels every stage trains on distributions (KD at T = 1 with no hard term,
//! i.e. soft-label CE), the score is the probe's probability of the teacher's argmax, and the
//! peer re-annotates with its softmax (B §4.7's alternative).

use kd_model::bert::Bert;

use crate::batching::{Encoded, EncodedSet, Targets};
use crate::checkpoint::CheckpointConfig;
use crate::methods::ce::Ce;
use crate::methods::kd::Kd;
use crate::methods::teacher::CachedLogits;
use crate::pseudo::PseudoLabels;
use crate::trainer::{predict, train, Event, TrainConfig, TrainReport};
use crate::{Error, Result};

/// The paper's r: the half of the teacher labels the probe agrees with most is kept.
pub const DEFAULT_KEEP: f64 = 0.5;
/// The probe's training length in the paper.
pub const PROBE_EPOCHS: usize = 2;

#[derive(Clone, Debug)]
pub struct PeerAdvisedConfig {
    /// Fraction of the teacher labels kept, in (0, 1).
    pub keep: f64,
    /// The probe S0's run.
    pub probe: TrainConfig,
    /// The peer S1's and the final student S2's runs. A checkpoint directory is shared by the
    /// three runs, each in its own sub-directory (`probe`, `peer`, `student`), so a resumed
    /// pipeline skips the stages already finished.
    pub train: TrainConfig,
}

impl PeerAdvisedConfig {
    /// The paper's settings around `train`: keep 0.5, a probe of 2 epochs.
    pub fn new(train: TrainConfig) -> Self {
        PeerAdvisedConfig { keep: DEFAULT_KEEP, probe: TrainConfig { epochs: PROBE_EPOCHS, ..train.clone() }, train }
    }
}

/// The final student and what the pipeline decided on the way.
pub struct PeerAdvised {
    /// S2, the student to deploy.
    pub student: Bert,
    /// Each row's convergence score p_S0(teacher label | x).
    pub scores: Vec<f32>,
    /// Rows whose teacher label was kept (the highest scores), ascending.
    pub kept: Vec<usize>,
    /// The other rows, ascending; their labels came from the peer.
    pub relabelled: Vec<usize>,
    /// The peer's labels of `relabelled`, in that order.
    pub peer_labels: PseudoLabels,
    /// The training runs: ("probe" | "peer" | "student", report).
    pub reports: Vec<(&'static str, TrainReport)>,
}

/// Runs PA-KD on the examples `items` with the teacher's `labels`. `new_student` must return
/// the same initial student at every call. `observer` sees each run's events with its stage name.
pub fn peer_advised(
    new_student: &mut dyn FnMut() -> Result<Bert>,
    items: &[Encoded],
    labels: &PseudoLabels,
    dev: Option<&EncodedSet>,
    cfg: &PeerAdvisedConfig,
    observer: &mut dyn FnMut(&str, Event),
) -> Result<PeerAdvised> {
    if labels.len() != items.len() {
        return Err(Error::Invalid(format!("{} teacher labels for {} examples", labels.len(), items.len())));
    }
    kept_count(items.len(), cfg.keep)?;
    let mut reports = Vec::new();
    let mut fit = |stage: &'static str, rows: &[usize], labels: &PseudoLabels, cfg: &TrainConfig| -> Result<Bert> {
        let checkpoint = cfg.checkpoint.as_ref().map(|c| CheckpointConfig { dir: c.dir.join(stage), ..c.clone() });
        let cfg = TrainConfig { checkpoint, ..cfg.clone() };
        let mut student = new_student()?;
        let report = fit_labels(&mut student, rows, items, labels, dev, &cfg, &mut |e| observer(stage, e))?;
        reports.push((stage, report));
        Ok(student)
    };
    let all: Vec<usize> = (0..items.len()).collect();

    let probe = fit("probe", &all, labels, &cfg.probe)?;
    let scores =
        convergence_scores(&predict(&probe, &subset(items, &all).items, cfg.probe.batch_size)?, &labels.hard());
    drop(probe);
    let (kept, relabelled) = partition(&scores, &labels.hard(), cfg.keep)?;

    let peer = fit("peer", &kept, labels, &cfg.train)?;
    let peer_logits = predict(&peer, &subset(items, &relabelled).items, cfg.train.batch_size)?;
    drop(peer);
    let peer_labels = PseudoLabels::from_logits(&peer_logits, labels.is_soft());

    let mut combined = labels.clone();
    combined.replace(&relabelled, &peer_labels)?;
    let student = fit("student", &all, &combined, &cfg.train)?;
    Ok(PeerAdvised { student, scores, kept, relabelled, peer_labels, reports })
}

/// p(label_i | x_i) under each row of logits: how far a student has converged on each label.
pub fn convergence_scores(logits: &[Vec<f32>], labels: &[u32]) -> Vec<f32> {
    logits
        .iter()
        .zip(labels)
        .map(|(row, &y)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            row.get(y as usize).map_or(0.0, |&v| ((v as f64 - max).exp() / z) as f32)
        })
        .collect()
}

/// Splits the rows into those kept and the rest, both ascending: within each class of
/// `classes` (the teacher's label of each row), the `keep` fraction of its rows (rounded) with
/// the highest scores, ties to the earlier row. Class by class, so that a class the probe fits
/// worse (a minority or harder class, whose scores are lower) keeps its share instead of being
/// relabelled wholesale. At least one row is kept and one relabelled overall.
pub fn partition(scores: &[f32], classes: &[u32], keep: f64) -> Result<(Vec<usize>, Vec<usize>)> {
    let n = scores.len();
    kept_count(n, keep)?;
    if classes.len() != n {
        return Err(Error::Invalid(format!("{} classes for {n} scores", classes.len())));
    }
    let by_score = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut by_class: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &c) in classes.iter().enumerate() {
        by_class.entry(c).or_default().push(i);
    }
    let (mut high, mut low) = (Vec::new(), Vec::new());
    for rows in by_class.values_mut() {
        rows.sort_by(by_score);
        let k = ((keep * rows.len() as f64).round() as usize).min(rows.len());
        high.extend_from_slice(&rows[..k]);
        low.extend_from_slice(&rows[k..]);
    }
    // Tiny classes can round to keeping nothing or everything.
    if high.is_empty() {
        let best = (0..low.len()).min_by(|&a, &b| by_score(&low[a], &low[b])).unwrap_or(0);
        high.push(low.remove(best));
    } else if low.is_empty() {
        let worst = (0..high.len()).max_by(|&a, &b| by_score(&high[a], &high[b])).unwrap_or(0);
        low.push(high.remove(worst));
    }
    high.sort_unstable();
    low.sort_unstable();
    Ok((high, low))
}

/// How many of `n` rows `keep` keeps: at least one, and at least one left to relabel.
fn kept_count(n: usize, keep: f64) -> Result<usize> {
    if !(keep > 0.0 && keep < 1.0) || n < 2 {
        return Err(Error::Invalid(format!(
            "peer-advised keeps a fraction in (0, 1) of at least 2 examples (keep {keep}, {n} examples)"
        )));
    }
    Ok(((keep * n as f64).round() as usize).clamp(1, n - 1))
}

fn subset(items: &[Encoded], rows: &[usize]) -> EncodedSet {
    EncodedSet { items: rows.iter().map(|&i| items[i].clone()).collect(), targets: Targets::Classes(vec![]) }
}

/// Trains `student` on the examples `rows` of `items` with their `labels` (aligned with `items`):
/// CE on hard labels, soft-label CE (KD, T = 1, no hard term) on distributions.
fn fit_labels(
    student: &mut Bert,
    rows: &[usize],
    items: &[Encoded],
    labels: &PseudoLabels,
    dev: Option<&EncodedSet>,
    cfg: &TrainConfig,
    observer: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    let set = EncodedSet { targets: Targets::Classes(labels.select(rows).hard()), ..subset(items, rows) };
    match labels {
        PseudoLabels::Hard(_) => train(student, &set, dev, &mut Ce, cfg, observer),
        PseudoLabels::Soft(p) => {
            // softmax(ln p) = p, so log-probabilities stand in for the teacher's logits.
            let log_p = rows.iter().map(|&i| p[i].iter().map(|&q| q.max(1e-12).ln()).collect()).collect();
            let mut teacher = CachedLogits::from_rows(log_p);
            let mut kd = Kd::new(&mut teacher, 1.0, 1.0);
            train(student, &set, dev, &mut kd, cfg, observer)
        }
    }
}
