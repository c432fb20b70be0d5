//! `kd-cli distill`'s per-method flags: one group (a clap `Args` struct, its own `--help`
//! heading) per method or shared loss, flattened into `distill::Args`.
//!
//! Every option is an `Option` (a switch a `bool`) so that a flag the command line (or a
//! `--config` file) gives can be told from one left out: a flag the chosen `--method` does not
//! read is an error naming the flag and the methods that read it ([`MethodArgs::check_given`]),
//! never silently ignored. Defaults are stated in the help text and applied by
//! [`MethodArgs::fill_defaults`] before the run's fingerprint is taken, so `--alpha 0.5` and no
//! `--alpha` fingerprint alike.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use clap::ValueEnum;
use kd_kernels::ops::softmax_kl::KlForm;
use kd_methods::methods::cr_ild::Stage1Objective;
use kd_methods::methods::kd::{Kd, TeacherLogits};
use serde_json::Value;

use crate::distill::Method;

/// `--objective` of cr-ild.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Attention-map KL + hidden-state MSE, with the consistency term.
    Ah,
    /// Q-Q, K-K and V-V self-relation KL (no consistency term).
    Qkv,
}

impl From<Objective> for Stage1Objective {
    fn from(o: Objective) -> Stage1Objective {
        match o {
            Objective::Ah => Stage1Objective::AttentionHidden,
            Objective::Qkv => Stage1Objective::Qkv,
        }
    }
}

/// `--divergence` of mate-kd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Divergence {
    /// The official code's cross-entropy form (the KL plus the teacher's entropy).
    Ce,
    /// The KL divergence.
    Kl,
}

impl From<Divergence> for KlForm {
    fn from(d: Divergence) -> KlForm {
        match d {
            Divergence::Ce => KlForm::CrossEntropy,
            Divergence::Kl => KlForm::Kl,
        }
    }
}

/// The logit-KD loss `(1-a)·CE + a·T²·KL`: kd's, ild's and cr-ild's stage 2 (one loss with one
/// default, so that ild − kd and cr-ild − kd measure stage 1 alone), and the noisy methods'.
#[derive(clap::Args, Debug, Default, serde::Serialize)]
#[command(next_help_heading = "KD loss (kd; ild's and cr-ild's stage 2; noisy-coteach, noisy-relabel)")]
pub struct KdArgs {
    /// Share a of the soft (teacher) term, in [0, 1] [default: 0.5].
    #[arg(long, value_name = "A")]
    pub alpha: Option<f32>,
    /// Softmax temperature T of the KD term, positive [default: 2].
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
}

impl KdArgs {
    pub const ALPHA: f32 = 0.5;
    pub const TEMPERATURE: f32 = 2.0;

    pub fn alpha(&self) -> f32 {
        self.alpha.unwrap_or(Self::ALPHA)
    }

    pub fn temperature(&self) -> f32 {
        self.temperature.unwrap_or(Self::TEMPERATURE)
    }

    /// The loss of kd and of ild's and cr-ild's stage 2, against `teacher`'s logits.
    pub fn loss<'t>(&self, teacher: &'t mut dyn TeacherLogits) -> Kd<'t> {
        Kd::new(teacher, self.alpha(), self.temperature())
    }
}

/// Intermediate-layer distillation (ild, and cr-ild's stage 1).
#[derive(clap::Args, Debug, Default, serde::Serialize)]
#[command(next_help_heading = "ild (and cr-ild)")]
pub struct IldArgs {
    /// ild: match only the last layer (L-ILD).
    #[arg(long)]
    pub last_layer: bool,
    /// ild and cr-ild: epochs of the intermediate-layer stage, at least 1 [default: --epochs].
    #[arg(long, value_name = "N")]
    pub stage1_epochs: Option<usize>,
}

/// CR-ILD (Ko et al. 2023).
#[derive(clap::Args, Debug, Default, serde::Serialize)]
#[command(next_help_heading = "cr-ild")]
pub struct CrIldArgs {
    /// Stage 1's objective [default: ah].
    #[arg(long, value_enum)]
    pub objective: Option<Objective>,
    /// Peak weight of the consistency term, ramped from 0 over the stage-1 epochs; 0 turns it
    /// off [default: 0.1].
    #[arg(long, value_name = "W")]
    pub w_ic: Option<f32>,
    /// Extra unlabelled text for stage 1, one text (or a tab-separated pair) a line.
    #[arg(long, value_name = "FILE")]
    pub supplementary: Option<PathBuf>,
}

impl CrIldArgs {
    pub const W_IC: f32 = kd_methods::methods::cr_ild::W_IC;

    pub fn objective(&self) -> Objective {
        self.objective.unwrap_or(Objective::Ah)
    }

    pub fn w_ic(&self) -> f32 {
        self.w_ic.unwrap_or(Self::W_IC)
    }
}

/// MATE-KD (Rashid et al. 2021).
#[derive(clap::Args, Debug, Default, serde::Serialize)]
#[command(next_help_heading = "mate-kd")]
pub struct MateKdArgs {
    /// The generator, an HF BertForMaskedLM folder with the teacher's vocabulary (required).
    #[arg(long, value_name = "DIR")]
    pub generator: Option<PathBuf>,
    /// The divergence the generator maximises and the student minimises [default: ce].
    #[arg(long, value_enum)]
    pub divergence: Option<Divergence>,
    /// Generator batches (n_G) before each run of student batches, at least 1 [default: 10].
    #[arg(long, value_name = "N")]
    pub generator_steps: Option<u64>,
    /// Student batches (n_S) after each run of generator batches, at least 1 [default: 100].
    #[arg(long, value_name = "N")]
    pub student_steps: Option<u64>,
    /// Share of the real, non-special tokens masked for the generator, in (0, 1] [default: 0.3].
    #[arg(long, value_name = "RATE")]
    pub mask_rate: Option<f64>,
    /// The generator's AdamW learning rate, positive [default: 5e-7].
    #[arg(long, value_name = "LR")]
    pub generator_lr: Option<f32>,
}

impl MateKdArgs {
    pub const GENERATOR_STEPS: u64 = 10;
    pub const STUDENT_STEPS: u64 = 100;
    pub const MASK_RATE: f64 = 0.3;
    pub const GENERATOR_LR: f32 = 5e-7;

    pub fn divergence(&self) -> Divergence {
        self.divergence.unwrap_or(Divergence::Ce)
    }

    pub fn generator_steps(&self) -> u64 {
        self.generator_steps.unwrap_or(Self::GENERATOR_STEPS)
    }

    pub fn student_steps(&self) -> u64 {
        self.student_steps.unwrap_or(Self::STUDENT_STEPS)
    }

    pub fn mask_rate(&self) -> f64 {
        self.mask_rate.unwrap_or(Self::MASK_RATE)
    }

    pub fn generator_lr(&self) -> f32 {
        self.generator_lr.unwrap_or(Self::GENERATOR_LR)
    }
}

/// The project's noisy-label mitigations.
#[derive(clap::Args, Debug, Default, serde::Serialize)]
#[command(next_help_heading = "noisy-coteach, noisy-relabel")]
pub struct NoisyArgs {
    /// noisy-coteach: the noise rate r_est, in [0, 1] [default: the teacher's disagreement with
    /// the labels].
    #[arg(long, value_name = "RATE")]
    pub noise_rate: Option<f32>,
    /// noisy-relabel: zero the hard-label weight where the teacher's belief is below this, in
    /// [0, 1] [default: none].
    #[arg(long, value_name = "P")]
    pub trust_threshold: Option<f32>,
    /// noisy-coteach: return whichever of the two students is better on dev (needs a dev set).
    /// Off by default: the selection looks at dev and picks the best of two trained models, an
    /// advantage no other method gets, so it is unfair in a comparison of methods.
    #[arg(long)]
    pub keep_better: bool,
}

/// Peer-advised KD (Zhao 2023).
#[derive(clap::Args, Debug, Default, serde::Serialize)]
#[command(next_help_heading = "peer-advised (and slkd)")]
pub struct PeerAdvisedArgs {
    /// peer-advised and slkd: the teacher's labels as JSONL (hard or soft; slkd takes the argmax), one per row of the whole training file
    /// ("index": its row, whatever --max-train draws) [default: the teacher's argmax].
    #[arg(long, value_name = "FILE")]
    pub labels_file: Option<PathBuf>,
    /// peer-advised and slkd: keep the gold labels of K training rows (drawn with --seed, the rows
    /// `finetune --gold-subset K` trains on) in place of the teacher's.
    #[arg(long, value_name = "K")]
    pub gold_subset: Option<usize>,
    /// peer-advised: the fraction of teacher labels kept, within each teacher-label class, in
    /// (0, 1) [default: 0.5].
    #[arg(long, value_name = "FRACTION")]
    pub keep: Option<f64>,
}

impl PeerAdvisedArgs {
    pub const KEEP: f64 = 0.5;

    pub fn keep(&self) -> f64 {
        self.keep.unwrap_or(Self::KEEP)
    }
}

/// Every method's flags (serialised flat into the run's fingerprint).
/// Transfer rows: text the teacher labels beside the gold rows (docs/METHODS.md).
#[derive(clap::Args, Debug, Default, serde::Serialize)]
#[command(next_help_heading = "Transfer rows (kd, ild, cr-ild)")]
pub struct TransferArgs {
    /// Transfer text the teacher labels, mixed with the training rows (the soft term alone on
    /// it): plain lines (a tab splits a pair), or a CSV/TSV/JSONL/Parquet file read with the
    /// training data's text columns, its labels ignored.
    #[arg(long, value_name = "FILE")]
    pub unlabeled: Option<PathBuf>,
    /// N copies of each training row with words replaced by --generator's guesses (TinyBERT's
    /// augmentation, p = 0.4, K = 15), trained on as transfer rows; needs --generator.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub augment: Option<u32>,
}

#[derive(clap::Args, Debug, Default, serde::Serialize)]
pub struct MethodArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub kd: KdArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub ild: IldArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub cr_ild: CrIldArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub mate_kd: MateKdArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub noisy: NoisyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub peer_advised: PeerAdvisedArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub transfer: TransferArgs,
}

use Method::*;

/// Which methods read each flag of [`MethodArgs`] (by field name). A test checks that every
/// field is listed.
const READERS: [(&str, &[Method]); 21] = [
    ("alpha", &[Kd, Ild, CrIld, NoisyCoteach, NoisyRelabel]),
    ("temperature", &[Kd, Ild, CrIld, NoisyCoteach, NoisyRelabel]),
    ("last_layer", &[Ild]),
    ("stage1_epochs", &[Ild, CrIld]),
    ("objective", &[CrIld]),
    ("w_ic", &[CrIld]),
    ("supplementary", &[CrIld]),
    // kd, ild and cr-ild read it with --augment (distill checks the pair).
    ("generator", &[MateKd, Kd, Ild, CrIld]),
    ("divergence", &[MateKd]),
    ("generator_steps", &[MateKd]),
    ("student_steps", &[MateKd]),
    ("mask_rate", &[MateKd]),
    ("generator_lr", &[MateKd]),
    ("noise_rate", &[NoisyCoteach]),
    ("keep_better", &[NoisyCoteach]),
    ("trust_threshold", &[NoisyRelabel]),
    ("labels_file", &[PeerAdvised, Slkd]),
    ("gold_subset", &[PeerAdvised, Slkd]),
    ("keep", &[PeerAdvised]),
    ("unlabeled", &[Kd, Ild, CrIld]),
    ("augment", &[Kd, Ild, CrIld]),
];

/// The `--flag` of a field.
fn flag(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

pub fn method_name(method: Method) -> String {
    method.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

impl MethodArgs {
    /// The fields given (an option with a value, a switch that is on), in declaration order.
    pub fn given(&self) -> Result<Vec<String>> {
        let Value::Object(fields) = serde_json::to_value(self)? else { bail!("method flags are not an object") };
        Ok(fields.into_iter().filter(|(_, v)| !matches!(v, Value::Null | Value::Bool(false))).map(|(k, _)| k).collect())
    }

    /// Errors on the first flag given that `method` does not read (`None`: no method, the demo).
    pub fn check_given(&self, method: Option<Method>) -> Result<()> {
        for field in self.given()? {
            let readers = readers(&field)?;
            let Some(method) = method else {
                bail!("{} is an option of a --method run; the demo (distill alone) takes none", flag(&field));
            };
            if !readers.contains(&method) {
                let names: Vec<String> = readers.iter().map(|&m| method_name(m)).collect();
                bail!(
                    "{} is not an option of --method {} (it is read by {})",
                    flag(&field),
                    method_name(method),
                    names.join(", ")
                );
            }
        }
        Ok(())
    }

    /// The range checks of the flags given, one line each.
    pub fn check_ranges(&self) -> Result<()> {
        if let Some(a) = self.kd.alpha {
            ensure!((0.0..=1.0).contains(&a), "--alpha {a} is not in [0, 1]");
        }
        if let Some(t) = self.kd.temperature {
            ensure!(t.is_finite() && t > 0.0, "--temperature {t} is not a positive number");
        }
        if let Some(e) = self.ild.stage1_epochs {
            ensure!(e > 0, "--stage1-epochs must be at least 1");
        }
        if let Some(w) = self.cr_ild.w_ic {
            ensure!(w.is_finite() && w >= 0.0, "--w-ic {w} is not a non-negative number");
        }
        let m = &self.mate_kd;
        if let Some(n) = m.generator_steps {
            ensure!(n > 0, "--generator-steps must be at least 1");
        }
        if let Some(n) = m.student_steps {
            ensure!(n > 0, "--student-steps must be at least 1");
        }
        if let Some(r) = m.mask_rate {
            ensure!(r > 0.0 && r <= 1.0, "--mask-rate {r} is not a rate in (0, 1]");
        }
        if let Some(lr) = m.generator_lr {
            ensure!(lr.is_finite() && lr > 0.0, "--generator-lr {lr} is not a positive number");
        }
        if let Some(r) = self.noisy.noise_rate {
            ensure!((0.0..=1.0).contains(&r), "--noise-rate {r} is not in [0, 1]");
        }
        if let Some(p) = self.noisy.trust_threshold {
            ensure!((0.0..=1.0).contains(&p), "--trust-threshold {p} is not a probability in [0, 1]");
        }
        if let Some(k) = self.peer_advised.keep {
            ensure!(k > 0.0 && k < 1.0, "--keep {k} is not a fraction in (0, 1)");
        }
        Ok(())
    }

    /// Sets every option with a default to its value (those without one, e.g. --noise-rate,
    /// stay unset), so that the fingerprint records the values the run uses.
    pub fn fill_defaults(&mut self) {
        self.kd.alpha = Some(self.kd.alpha());
        self.kd.temperature = Some(self.kd.temperature());
        self.cr_ild.objective = Some(self.cr_ild.objective());
        self.cr_ild.w_ic = Some(self.cr_ild.w_ic());
        let m = &mut self.mate_kd;
        m.divergence = Some(m.divergence());
        m.generator_steps = Some(m.generator_steps());
        m.student_steps = Some(m.student_steps());
        m.mask_rate = Some(m.mask_rate());
        m.generator_lr = Some(m.generator_lr());
        self.peer_advised.keep = Some(self.peer_advised.keep());
    }

    /// The input files given, by flag.
    pub fn inputs(&self) -> Vec<(&'static str, &Path)> {
        let given = [
            ("--generator", &self.mate_kd.generator),
            ("--labels-file", &self.peer_advised.labels_file),
            ("--supplementary", &self.cr_ild.supplementary),
            ("--unlabeled", &self.transfer.unlabeled),
        ];
        given.into_iter().filter_map(|(flag, p)| Some((flag, p.as_deref()?))).collect()
    }

    /// Fields that name files: their contents are hashed into the fingerprint instead.
    pub const PATHS: [&'static str; 4] = ["generator", "labels_file", "supplementary", "unlabeled"];
}

fn readers(field: &str) -> Result<&'static [Method]> {
    match READERS.iter().find(|(f, _)| *f == field) {
        Some((_, readers)) => Ok(readers),
        None => bail!("{} is read by no method (a flag missing from distill's table)", flag(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of every group has its readers listed (a new flag cannot be forgotten).
    #[test]
    fn every_flag_has_its_methods() {
        let mut all = MethodArgs::default();
        all.fill_defaults();
        let Value::Object(fields) = serde_json::to_value(&all).unwrap() else { panic!() };
        for field in fields.keys() {
            assert!(readers(field).is_ok(), "{field} has no entry in READERS");
        }
        assert_eq!(fields.len(), READERS.len(), "READERS lists a field that is gone");
    }
}
