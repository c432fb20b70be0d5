//! Label-noise injection for the noisy-label KD study (METHODS.md A.1 and B §1.4a, the protocol
//! of the CR-ILD code): each training label is replaced with probability r by a class drawn
//! uniformly from the other C - 1, or by a draw from a class-transition matrix. The generator
//! is seeded independently of the run seed (0 by default, as in CR-ILD), so every run sees the
//! same corrupted set; the flipped rows are recorded.

use kd_kernels::rng::Rng;

use crate::batching::Targets;
use crate::data::{Dataset, Label};
use crate::{Error, Result};

/// How labels are corrupted.
#[derive(Clone, Debug, PartialEq)]
pub enum NoiseModel {
    /// Flip with probability `rate` to one of the other classes, uniformly.
    Symmetric { rate: f64 },
    /// Row `i` is the distribution of the noisy label given true class `i` (rows sum to 1).
    Transition(Vec<Vec<f64>>),
}

/// A corrupted copy of a dataset and the positions whose label changed.
pub struct Noisy {
    pub dataset: Dataset,
    pub flipped: Vec<usize>,
}

/// Corrupts the class labels of `dataset` (regression and unlabelled rows are left alone).
pub fn inject(dataset: &Dataset, model: &NoiseModel, seed: u64) -> Result<Noisy> {
    let classes = dataset.label_names.len();
    let mut corrupt = Corrupter::new(model, classes, seed)
        .map_err(|e| Error::Invalid(format!("{}: {e}", dataset.source.display())))?;
    let mut out = dataset.clone();
    let mut flipped = Vec::new();
    for (i, ex) in out.examples.iter_mut().enumerate() {
        let Label::Class(y) = ex.label else { continue };
        let noisy = corrupt.draw(y);
        if noisy != y {
            ex.label = Label::Class(noisy);
            flipped.push(i);
        }
    }
    Ok(Noisy { dataset: out, flipped })
}

/// As [`inject`], on the class ids of an encoded set; returns the flipped rows.
pub fn inject_targets(targets: &mut Targets, classes: usize, model: &NoiseModel, seed: u64) -> Result<Vec<usize>> {
    let Targets::Classes(labels) = targets else {
        return Err(Error::Invalid("label noise needs a classification task, not regression".into()));
    };
    let mut corrupt = Corrupter::new(model, classes, seed).map_err(Error::Invalid)?;
    let mut flipped = Vec::new();
    for (i, y) in labels.iter_mut().enumerate() {
        let noisy = corrupt.draw(*y as usize) as u32;
        if noisy != *y {
            *y = noisy;
            flipped.push(i);
        }
    }
    Ok(flipped)
}

/// Draws noisy labels one example at a time, in order, from one seeded stream.
struct Corrupter<'m> {
    model: &'m NoiseModel,
    classes: usize,
    rng: Rng,
}

impl<'m> Corrupter<'m> {
    fn new(model: &'m NoiseModel, classes: usize, seed: u64) -> std::result::Result<Self, String> {
        if classes < 2 {
            return Err(format!("label noise needs a classification task; this one has {classes} classes"));
        }
        match model {
            NoiseModel::Symmetric { rate } if !(0.0..=1.0).contains(rate) => {
                return Err(format!("noise rate {rate} is not in [0, 1]"))
            }
            NoiseModel::Transition(m) => {
                let bad_row = m.iter().position(|row| {
                    row.len() != classes || (row.iter().sum::<f64>() - 1.0).abs() > 1e-6 || row.iter().any(|&p| p < 0.0)
                });
                if m.len() != classes || bad_row.is_some() {
                    return Err(format!(
                        "the transition matrix must be {classes}x{classes} with rows of non-negative probabilities summing to 1 (row {bad_row:?} is not)"
                    ));
                }
            }
            NoiseModel::Symmetric { .. } => {}
        }
        Ok(Corrupter { model, classes, rng: Rng::new(seed) })
    }

    fn draw(&mut self, y: usize) -> usize {
        match self.model {
            NoiseModel::Symmetric { rate } => {
                if self.rng.uniform() < *rate {
                    let other = self.rng.below(self.classes - 1);
                    if other >= y {
                        other + 1
                    } else {
                        other
                    }
                } else {
                    y
                }
            }
            NoiseModel::Transition(m) => sample(&m[y], self.rng.uniform()),
        }
    }
}

/// The index whose cumulative probability first exceeds `u`.
fn sample(probs: &[f64], u: f64) -> usize {
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    probs.len() - 1
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::data::Example;

    fn dataset(n: usize, classes: usize) -> Dataset {
        Dataset {
            examples: (0..n)
                .map(|i| Example { text_a: format!("t{i}"), text_b: None, label: Label::Class(i % classes) })
                .collect(),
            label_names: (0..classes).map(|c| c.to_string()).collect(),
            source: PathBuf::from("mem"),
            skipped: vec![],
        }
    }

    #[test]
    fn symmetric_noise_flips_about_r_to_other_classes_and_records_them() {
        let clean = dataset(10_000, 3);
        let noisy = inject(&clean, &NoiseModel::Symmetric { rate: 0.3 }, 0).unwrap();
        let rate = noisy.flipped.len() as f64 / 10_000.0;
        assert!((rate - 0.3).abs() < 0.02, "rate {rate}");
        for (i, (a, b)) in clean.examples.iter().zip(&noisy.dataset.examples).enumerate() {
            assert_eq!(a.label != b.label, noisy.flipped.binary_search(&i).is_ok());
        }
        // every other class is reachable, about equally
        let mut to = [0usize; 3];
        for &i in &noisy.flipped {
            if let (Label::Class(0), Label::Class(c)) = (&clean.examples[i].label, &noisy.dataset.examples[i].label) {
                to[*c] += 1;
            }
        }
        assert_eq!(to[0], 0);
        assert!(to[1].abs_diff(to[2]) < to[1] / 5, "{to:?}");
        let again = inject(&clean, &NoiseModel::Symmetric { rate: 0.3 }, 0).unwrap();
        assert_eq!(again.flipped, noisy.flipped);
    }

    #[test]
    fn transition_matrix_is_followed_and_validated() {
        let clean = dataset(6000, 2);
        let m = vec![vec![0.8, 0.2], vec![0.0, 1.0]];
        let noisy = inject(&clean, &NoiseModel::Transition(m), 1).unwrap();
        assert!(noisy.flipped.iter().all(|&i| clean.examples[i].label == Label::Class(0)));
        let rate = noisy.flipped.len() as f64 / 3000.0;
        assert!((rate - 0.2).abs() < 0.03, "rate {rate}");
        assert!(inject(&clean, &NoiseModel::Transition(vec![vec![0.5, 0.6], vec![0.0, 1.0]]), 0).is_err());
        assert!(inject(&clean, &NoiseModel::Symmetric { rate: 1.5 }, 0).is_err());
    }
}
