//! Evaluation metrics with GLUE's conventions, as fractions (0.853, not 85.3).
//!
//! Definitions follow scikit-learn and SciPy, including their degenerate cases, so numbers
//! compare directly with published HF/PyTorch runs: F1 and Matthews correlation are 0 when
//! undefined, Pearson and Spearman are NaN for a constant input (JSON `null`).
use serde::Serialize;

use crate::data::{GlueTask, Label};
use crate::{Error, Result};

/// Which metrics an evaluation reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Accuracy,
    /// Accuracy and binary F1 (MRPC, QQP).
    AccuracyF1,
    /// Matthews correlation and accuracy (CoLA).
    Matthews,
    /// Pearson and Spearman correlation of scores (STS-B).
    Correlation,
}

impl From<GlueTask> for MetricKind {
    fn from(task: GlueTask) -> MetricKind {
        match task {
            GlueTask::Cola => MetricKind::Matthews,
            GlueTask::Mrpc | GlueTask::Qqp => MetricKind::AccuracyF1,
            GlueTask::Stsb => MetricKind::Correlation,
            GlueTask::Sst2 | GlueTask::Mnli | GlueTask::Qnli | GlueTask::Rte | GlueTask::Wnli => MetricKind::Accuracy,
        }
    }
}

/// The metrics of one evaluation; only the computed ones appear in JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Metrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pearson: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spearman: Option<f64>,
}

impl Metrics {
    /// The number model selection maximises: the task's headline metric (MCC for CoLA, the
    /// mean of accuracy and F1 for MRPC/QQP, Pearson for STS-B, accuracy otherwise).
    pub fn main(&self) -> f64 {
        match (self.mcc, self.f1, self.pearson, self.accuracy) {
            (Some(m), _, _, _) => m,
            (_, Some(f), _, Some(a)) => (f + a) / 2.0,
            (_, _, Some(p), _) => p,
            (_, _, _, Some(a)) => a,
            _ => f64::NAN,
        }
    }
}

/// The metrics of `kind` (or of a GLUE task's convention) for predictions against gold labels:
/// class labels for the classification kinds, scores for [`MetricKind::Correlation`].
pub fn task_metrics(kind: impl Into<MetricKind>, preds: &[Label], labels: &[Label]) -> Result<Metrics> {
    const WHAT: &str = "task_metrics";
    same_len(WHAT, preds.len(), labels.len())?;
    let kind = kind.into();
    if kind == MetricKind::Correlation {
        let (p, l) = (scores(WHAT, "preds", preds)?, scores(WHAT, "labels", labels)?);
        return Ok(Metrics {
            pearson: Some(pearson(&p, &l)?),
            spearman: Some(spearman(&p, &l)?),
            ..Metrics::default()
        });
    }
    let (p, l) = (classes(WHAT, "preds", preds)?, classes(WHAT, "labels", labels)?);
    let mut metrics = Metrics { accuracy: Some(accuracy(&p, &l)?), ..Metrics::default() };
    match kind {
        MetricKind::AccuracyF1 => metrics.f1 = Some(f1_binary(&p, &l)?),
        MetricKind::Matthews => metrics.mcc = Some(matthews_corrcoef(&p, &l)?),
        MetricKind::Accuracy | MetricKind::Correlation => {}
    }
    Ok(metrics)
}

/// Fraction of predictions equal to the label.
pub fn accuracy(preds: &[usize], labels: &[usize]) -> Result<f64> {
    same_len("accuracy", preds.len(), labels.len())?;
    Ok(preds.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / preds.len() as f64)
}

/// F1 of the positive class 1 (`f1_score(average="binary")`); 0 when there is no positive
/// prediction and no positive label.
pub fn f1_binary(preds: &[usize], labels: &[usize]) -> Result<f64> {
    const WHAT: &str = "f1_binary";
    same_len(WHAT, preds.len(), labels.len())?;
    if let Some(c) = preds.iter().chain(labels).find(|&&c| c > 1) {
        return Err(Error::Invalid(format!("{WHAT}: class {c} in a binary metric")));
    }
    let count = |p: usize, l: usize| preds.iter().zip(labels).filter(|&(&a, &b)| a == p && b == l).count();
    let (tp, fp, fn_) = (count(1, 1), count(1, 0), count(0, 1));
    Ok(if tp + fp + fn_ == 0 { 0.0 } else { 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64 })
}

/// Matthews correlation coefficient, in its multiclass form (Gorodkin's R_K, as scikit-learn):
/// (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)), 0 when undefined.
pub fn matthews_corrcoef(preds: &[usize], labels: &[usize]) -> Result<f64> {
    same_len("matthews_corrcoef", preds.len(), labels.len())?;
    let k = preds.iter().chain(labels).max().map_or(0, |&m| m + 1);
    let (mut pc, mut tc) = (vec![0f64; k], vec![0f64; k]);
    let mut correct = 0f64;
    for (&p, &l) in preds.iter().zip(labels) {
        pc[p] += 1.0;
        tc[l] += 1.0;
        correct += (p == l) as u8 as f64;
    }
    let s = preds.len() as f64;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let cov_pt = correct * s - dot(&pc, &tc);
    let cov_pp = s * s - dot(&pc, &pc);
    let cov_tt = s * s - dot(&tc, &tc);
    let denom = (cov_pp * cov_tt).sqrt();
    Ok(if denom == 0.0 { 0.0 } else { cov_pt / denom })
}

/// Pearson correlation; NaN when either input is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> Result<f64> {
    same_len("pearson", x.len(), y.len())?;
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    Ok(sxy / (sxx * syy).sqrt())
}

/// Spearman rank correlation: Pearson of the ranks, ties sharing their average rank.
pub fn spearman(x: &[f64], y: &[f64]) -> Result<f64> {
    same_len("spearman", x.len(), y.len())?;
    pearson(&average_ranks(x), &average_ranks(y))
}

/// 1-based ranks, each group of equal values taking the mean of the ranks it spans.
fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end, whose mean is (start + 1 + end) / 2.
        let rank = (start + 1 + end) as f64 / 2.0;
        order[start..end].iter().for_each(|&i| ranks[i] = rank);
        start = end;
    }
    ranks
}

fn same_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::Invalid(format!("{what}: {a} predictions for {b} labels")));
    }
    if a == 0 {
        return Err(Error::Invalid(format!("{what}: no examples")));
    }
    Ok(())
}

fn classes(what: &str, name: &str, labels: &[Label]) -> Result<Vec<usize>> {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| match l {
            Label::Class(c) => Ok(*c),
            other => Err(Error::Invalid(format!("{what}: {name}[{i}] is {other:?}, expected a class"))),
        })
        .collect()
}

fn scores(what: &str, name: &str, labels: &[Label]) -> Result<Vec<f64>> {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| match l {
            Label::Score(s) => Ok(*s as f64),
            other => Err(Error::Invalid(format!("{what}: {name}[{i}] is {other:?}, expected a score"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    // preds vs labels: tp = 2 (0, 3), fp = 1 (1), fn = 1 (4), tn = 2 (2, 5).
    const P: [usize; 6] = [1, 1, 0, 1, 0, 0];
    const L: [usize; 6] = [1, 0, 0, 1, 1, 0];

    #[test]
    fn accuracy_counts_matches() {
        close(accuracy(&[0, 1, 1, 0], &[0, 1, 0, 0]).unwrap(), 0.75);
        close(accuracy(&P, &L).unwrap(), 4.0 / 6.0);
    }

    #[test]
    fn f1_of_the_positive_class() {
        // precision = recall = 2/3.
        close(f1_binary(&P, &L).unwrap(), 2.0 / 3.0);
        // precision 1, recall 1/3: F1 = 2 * 1/3 / (4/3) = 1/2.
        close(f1_binary(&[1, 0, 0], &[1, 1, 1]).unwrap(), 0.5);
        // No positive anywhere: undefined, 0 like scikit-learn.
        close(f1_binary(&[0, 0], &[0, 0]).unwrap(), 0.0);
        assert!(f1_binary(&[2, 0], &[1, 0]).unwrap_err().to_string().contains("class 2"));
    }

    #[test]
    fn matthews_binary_and_multiclass() {
        // (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / 9.
        close(matthews_corrcoef(&P, &L).unwrap(), 1.0 / 3.0);
        // scikit-learn's docstring example ([+1,+1,+1,-1] vs [+1,-1,+1,+1]): -0.333...
        close(matthews_corrcoef(&[1, 0, 1, 1], &[1, 1, 1, 0]).unwrap(), -1.0 / 3.0);
        close(matthews_corrcoef(&L, &L).unwrap(), 1.0);
        close(matthews_corrcoef(&L.map(|l| 1 - l), &L).unwrap(), -1.0);
        // A constant prediction is uncorrelated: 0, not NaN.
        close(matthews_corrcoef(&[1; 6], &L).unwrap(), 0.0);
        // c = 3 correct of s = 6, t = (2,2,2), p = (3,1,2): (18 - 12) / sqrt((36 - 14)(36 - 12)).
        close(matthews_corrcoef(&[0, 2, 1, 0, 0, 2], &[0, 1, 2, 0, 1, 2]).unwrap(), 6.0 / 528f64.sqrt());
    }

    #[test]
    fn pearson_and_spearman_with_ties() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 4.0, 5.0, 4.0, 5.0];
        // Centered: dx = (-2..2), dy = (-2, 0, 1, 0, 1): 6 / sqrt(10 * 6).
        close(pearson(&x, &y).unwrap(), 6.0 / 60f64.sqrt());
        // Ranks of y with ties averaged: (1, 2.5, 4.5, 2.5, 4.5): 7 / sqrt(10 * 9);
        // scipy.stats.spearmanr gives 0.7378647873726218.
        close(spearman(&x, &y).unwrap(), 7.0 / 90f64.sqrt());
        // Monotone but not linear.
        close(spearman(&[1.0, 2.0, 3.0], &[1.0, 8.0, 27.0]).unwrap(), 1.0);
        assert!(pearson(&[1.0, 2.0, 3.0], &[1.0, 8.0, 27.0]).unwrap() < 0.99);
        // Ranks (3, 1, 2) and (3, 2, 1): centered (1, -1, 0) . (1, 0, -1) / 2.
        close(spearman(&[3.0, 1.0, 2.0], &[0.3, 0.2, 0.1]).unwrap(), 0.5);
        assert!(pearson(&x, &[1.0; 5]).unwrap().is_nan());
        assert_eq!(average_ranks(&[2.0, 2.0, 2.0]), vec![2.0; 3]);
    }

    #[test]
    fn mismatched_or_empty_inputs_are_errors() {
        assert!(accuracy(&[0, 1], &[0]).unwrap_err().to_string().contains("2 predictions for 1 labels"));
        assert!(pearson(&[], &[]).unwrap_err().to_string().contains("no examples"));
        assert!(spearman(&[1.0], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn glue_conventions_pick_the_metrics() {
        let cls = |v: &[usize]| v.iter().map(|&c| Label::Class(c)).collect::<Vec<_>>();
        let (p, l) = (cls(&P), cls(&L));
        let cola = task_metrics(GlueTask::Cola, &p, &l).unwrap();
        assert_eq!(cola, Metrics { accuracy: Some(4.0 / 6.0), mcc: Some(1.0 / 3.0), ..Metrics::default() });
        let mrpc = task_metrics(GlueTask::Mrpc, &p, &l).unwrap();
        assert_eq!((mrpc.accuracy, mrpc.f1, mrpc.mcc), (Some(4.0 / 6.0), Some(2.0 / 3.0), None));
        assert_eq!(task_metrics(GlueTask::Qqp, &p, &l).unwrap(), mrpc);
        for task in [GlueTask::Sst2, GlueTask::Rte, GlueTask::Mnli, GlueTask::Qnli, GlueTask::Wnli] {
            assert_eq!(
                task_metrics(task, &p, &l).unwrap(),
                Metrics { accuracy: Some(4.0 / 6.0), ..Metrics::default() }
            );
        }
        let scores = |v: &[f32]| v.iter().map(|&s| Label::Score(s)).collect::<Vec<_>>();
        let stsb =
            task_metrics(GlueTask::Stsb, &scores(&[1.0, 2.0, 3.0, 4.0, 5.0]), &scores(&[2.0, 4.0, 5.0, 4.0, 5.0]))
                .unwrap();
        close(stsb.pearson.unwrap(), 6.0 / 60f64.sqrt());
        close(stsb.spearman.unwrap(), 7.0 / 90f64.sqrt());
        assert_eq!((stsb.accuracy, stsb.f1, stsb.mcc), (None, None, None));
        let err = task_metrics(GlueTask::Stsb, &p, &l).unwrap_err().to_string();
        assert!(err.contains("preds[0]") && err.contains("expected a score"), "{err}");
        let err = task_metrics(MetricKind::Accuracy, &p, &vec![Label::None; 6]).unwrap_err().to_string();
        assert!(err.contains("labels[0] is None"), "{err}");
    }

    #[test]
    fn json_holds_only_the_computed_metrics() {
        let m = Metrics { accuracy: Some(0.75), mcc: Some(0.5), ..Metrics::default() };
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"accuracy":0.75,"mcc":0.5}"#);
        assert_eq!(serde_json::to_string(&Metrics::default()).unwrap(), "{}");
    }
}
