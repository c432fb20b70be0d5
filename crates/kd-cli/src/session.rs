//! What every training command shares: the optimisation flags, the progress bar, OUT/metrics.jsonl,
//! the best-on-dev and final model folders, and the resumable state in OUT/checkpoint.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kd_methods::batching::EncodedSet;
use kd_methods::checkpoint::{CheckpointConfig, STATE_FILE};
use kd_methods::metrics::{MetricKind, Metrics};
use kd_methods::trainer::{train, Event, Objective, TrainConfig, TrainReport};
use kd_model::bert::Bert;
use serde_json::{json, Map, Value};

use crate::report::{describe, metric_fields};
use crate::run_dir::{Fingerprint, RunLock, RUN_FILE};

/// Optimisation flags, shared by `finetune` and `distill` (HF `TrainingArguments` defaults).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct TrainArgs {
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Examples per optimiser step.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f32,
    /// Fraction of the steps spent warming the learning rate up from 0 (then it decays linearly).
    #[arg(long, value_name = "RATIO", default_value_t = 0.1)]
    pub warmup: f32,
    /// Decoupled weight decay (not on biases and LayerNorm).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Seed of the example order, dropout, a new head and the --max-train cut.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Batch examples of similar length together: each epoch's shuffle is cut into pools of 50
    /// batches, each pool sorted by length, and the batches shuffled (HF's `group_by_length`).
    /// Less padding, so faster on short texts (docs/PERFORMANCE.md measures it); not the default,
    /// since it changes which examples share a batch.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")] // runs without it keep their fingerprint
    pub group_by_length: bool,
    /// Evaluate on dev every N steps (always at the end).
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Write the mean training loss, learning rate and speed to OUT/metrics.jsonl every N steps
    /// (and at a stage's last step).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub log_every: u64,
    /// Write the resumable state to OUT/checkpoint every N steps (and at the end).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Continue an interrupted run from OUT/checkpoint (same result; a checkpoint of other
    /// flags or inputs is refused, docs/RUNS.md).
    #[arg(long)]
    pub resume: bool,
    /// Train on N examples drawn (with --seed) from the training set.
    #[arg(long, value_name = "N")]
    pub max_train: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl TrainArgs {
    /// Fields that do not change a run's result, left out of its fingerprint: where it runs
    /// (a resumed run may move from the CPU to a GPU), how often the state and the training
    /// records are written, whether it resumes.
    pub const NOT_RESULT: [&'static str; 4] = ["device", "checkpoint_every", "log_every", "resume"];

    pub fn check(&self) -> Result<()> {
        ensure!(self.epochs > 0, "--epochs must be at least 1");
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(self.lr > 0.0 && self.lr.is_finite(), "--lr must be a positive number");
        ensure!((0.0..=1.0).contains(&self.warmup), "--warmup is a ratio of the steps, in [0, 1]");
        ensure!(self.weight_decay >= 0.0 && self.weight_decay.is_finite(), "--weight-decay must be >= 0");
        ensure!(self.max_grad_norm >= 0.0, "--max-grad-norm must be >= 0 (0: no clipping)");
        ensure!(self.eval_every != Some(0), "--eval-every must be at least 1");
        ensure!(self.log_every > 0, "--log-every must be at least 1");
        ensure!(self.checkpoint_every > 0, "--checkpoint-every must be at least 1");
        Ok(())
    }

    /// The trainer's configuration for a stage of `epochs` epochs whose state lives in `state_dir`.
    pub fn config(&self, epochs: usize, metric: MetricKind, state_dir: &Path) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: self.batch,
            lr: self.lr,
            warmup_ratio: self.warmup,
            weight_decay: self.weight_decay,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            seed: self.seed,
            group_by_length: self.group_by_length,
            eval_every: self.eval_every,
            metric,
            checkpoint: Some(CheckpointConfig {
                dir: state_dir.to_path_buf(),
                every: self.checkpoint_every,
                resume: self.resume,
            }),
        }
    }
}

/// Where a run writes: the final model in OUT, the best on dev in OUT/best, the log in
/// OUT/metrics.jsonl, the resumable state in OUT/checkpoint[/stage] (docs/RUNS.md).
pub struct Session {
    pub out: PathBuf,
    pub tokenizer_file: PathBuf,
    /// Opened when the first stage begins.
    log: Option<MetricsLog>,
    start: Start,
    log_every: u64,
    _lock: RunLock,
}

/// How the first stage treats what OUT holds.
enum Start {
    /// Replace the previous run: a new checkpoint with this fingerprint, a new log.
    Fresh(Fingerprint),
    /// Continue the checkpoint, whose stages stopped after these steps.
    Resume(BTreeMap<String, u64>),
}

impl Session {
    /// Locks OUT and, with `resume`, checks that OUT/checkpoint was written by a run with this
    /// `fingerprint`. Nothing in OUT changes until the first stage begins ([`Session::run`]):
    /// a run that fails before training leaves the previous run's files as they were.
    /// `log_every`: steps between the training records of OUT/metrics.jsonl.
    pub fn create(
        out: &Path,
        tokenizer_file: &Path,
        resume: bool,
        fingerprint: Fingerprint,
        log_every: u64,
    ) -> Result<Session> {
        let lock = RunLock::acquire(out)?;
        // Temporary files of a killed run: no other run writes here while the lock is held.
        let checkpoint = out.join("checkpoint");
        for dir in [out.to_path_buf(), out.join("best")].into_iter().chain(dirs_below(&checkpoint)) {
            for path in kd_kernels::io::remove_stale_temps(&dir, true) {
                eprintln!("removed {}, left by an interrupted write", path.display());
            }
        }
        let steps = checkpoint_steps(&checkpoint)?;
        let run_file = checkpoint.join(RUN_FILE);
        let start = match (resume, steps.is_empty()) {
            (false, _) => Start::Fresh(fingerprint),
            (true, true) => {
                eprintln!("--resume: no checkpoint in {}; starting afresh", checkpoint.display());
                Start::Fresh(fingerprint)
            }
            (true, false) => {
                ensure!(
                    run_file.exists(),
                    "--resume: {} has no {RUN_FILE} (an older kd wrote it, or it was removed), so its flags cannot \
                     be checked; leave out --resume to start afresh",
                    checkpoint.display()
                );
                fingerprint.check_resumes(&Fingerprint::load(&run_file)?, &run_file)?;
                Start::Resume(steps)
            }
        };
        Ok(Session {
            out: out.to_path_buf(),
            tokenizer_file: tokenizer_file.to_path_buf(),
            log: None,
            start,
            log_every,
            _lock: lock,
        })
    }

    /// Prepares OUT when the first stage begins: a fresh run removes the previous run's
    /// checkpoint and best model and starts the log; a resumed one trims the log to the
    /// checkpoint.
    fn begin(&mut self) -> Result<&mut MetricsLog> {
        if self.log.is_none() {
            let path = self.out.join("metrics.jsonl");
            let log = match &self.start {
                Start::Fresh(fingerprint) => {
                    for dir in [self.out.join("checkpoint"), self.out.join("best")] {
                        if dir.exists() {
                            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
                        }
                    }
                    fingerprint.save(&self.out.join("checkpoint").join(RUN_FILE))?;
                    MetricsLog::open(&path, None)?
                }
                Start::Resume(steps) => MetricsLog::open(&path, Some(steps))?,
            };
            self.log = Some(log);
        }
        Ok(self.log.as_mut().expect("opened above"))
    }

    pub fn state_dir(&self, stage: &str) -> PathBuf {
        self.out.join("checkpoint").join(stage)
    }

    /// Trains `bert` with `objective`, drawing progress, logging every evaluation (tagged with
    /// `stage`) and saving each new best-on-dev model to OUT/best.
    pub fn train(
        &mut self,
        stage: &str,
        bert: &mut Bert,
        train_set: &EncodedSet,
        dev: Option<&EncodedSet>,
        objective: &mut dyn Objective,
        cfg: &TrainConfig,
    ) -> Result<TrainReport> {
        let steps = train_set.items.len().div_ceil(cfg.batch_size) as u64 * cfg.epochs as u64;
        self.run(stage, steps, cfg.epochs, |observer| Ok(train(bert, train_set, dev, objective, cfg, observer)?))
    }

    /// Runs a training loop of `steps` steps over `epochs` epochs that reports through an
    /// observer (methods with loops of their own, like MATE-KD), with the same progress, log
    /// and best-model saving as [`Session::train`].
    pub fn run(
        &mut self,
        stage: &str,
        steps: u64,
        epochs: usize,
        body: impl FnOnce(&mut dyn FnMut(Event)) -> Result<TrainReport>,
    ) -> Result<TrainReport> {
        self.run_stages(stage, steps, epochs, |observer| body(&mut |event| observer("", event)))
    }

    /// As [`Session::run`], for a pipeline of several trainings: each event comes with its
    /// sub-stage (`probe`, ...), logged as `stage/sub-stage`, the name of its checkpoint folder.
    pub fn run_stages(
        &mut self,
        stage: &str,
        steps: u64,
        epochs: usize,
        body: impl FnOnce(&mut dyn FnMut(&str, Event)) -> Result<TrainReport>,
    ) -> Result<TrainReport> {
        let best_dir = self.out.join("best");
        let tokenizer = self.tokenizer_file.clone();
        let (record_every, mut window) = (self.log_every, StepWindow::default());
        let log = self.begin()?;
        let steps_per_epoch = (steps / epochs.max(1) as u64).max(1);
        let bar = progress_bar(steps, stage)?;
        // Where no bar is drawn (a log file, CI), a line every tenth of the run says how it goes.
        let log_every = (steps / 10).max(1);
        let mut save_error: Option<anyhow::Error> = None;
        let name = |sub: &str| if sub.is_empty() { stage.to_string() } else { format!("{stage}/{sub}") };
        let mut observer = |sub: &str, event: Event| match event {
            Event::Step { step, total_steps, loss, lr, examples_per_s } => {
                log.add_loss(loss.total);
                window.add(loss.total, examples_per_s);
                if step.is_multiple_of(record_every) || step == total_steps {
                    log.train_record(&name(sub), step, step as f64 / steps_per_epoch as f64, lr, window.take());
                }
                log.rate = Some(log.rate.map_or(examples_per_s, |r| 0.9 * r + 0.1 * examples_per_s));
                bar.set_position(step);
                let rate = log.rate.unwrap_or(0.0);
                let message = format!("loss {:.4}  lr {lr:.2e}  {rate:.0} ex/s", log.mean_loss());
                if bar.is_hidden() && step.is_multiple_of(log_every) {
                    eprintln!("{stage}: step {step}/{steps}: {message}");
                }
                bar.set_message(message);
            }
            Event::Eval { step, metrics } => {
                let line = log.record(&name(sub), step, step as f64 / steps_per_epoch as f64, "dev", metrics);
                bar.suspend(|| eprintln!("{line}"));
            }
            Event::Best { model, .. } => {
                if save_error.is_none() {
                    save_error = kd_model::save_pretrained(&best_dir, &model.config, &model.weights, &tokenizer)
                        .with_context(|| format!("saving the best model to {}", best_dir.display()))
                        .err();
                }
            }
            Event::Resumed { step } => bar.suspend(|| eprintln!("{stage}: resumed after step {step}")),
        };
        let report = body(&mut observer);
        bar.finish_and_clear();
        if let Some(e) = save_error {
            return Err(e);
        }
        report.with_context(|| format!("training stage {stage}"))
    }

    /// Records a final evaluation that the trainer did not make (e.g. on the training set).
    pub fn record(&mut self, stage: &str, step: u64, epoch: f64, split: &str, metrics: &Metrics) -> Result<()> {
        self.begin()?.record(stage, step, epoch, split, metrics);
        Ok(())
    }

    /// Writes the final model to OUT (all files or none) and closes the log.
    pub fn finish(mut self, bert: &Bert) -> Result<()> {
        if let Some(log) = self.log.take() {
            log.finish()?;
        }
        kd_model::save_pretrained(&self.out, &bert.config, &bert.weights, &self.tokenizer_file)
            .with_context(|| format!("saving the model to {}", self.out.display()))?;
        Ok(())
    }
}

/// `dir` and every folder below it.
fn dirs_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            todo.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
            out.push(d);
        }
    }
    out
}

/// The step each stage's state in `checkpoint` stopped after, by stage name (the folder's path
/// below `checkpoint`: `kd`, `peer-advised/probe`).
fn checkpoint_steps(checkpoint: &Path) -> Result<BTreeMap<String, u64>> {
    let mut steps = BTreeMap::new();
    for dir in dirs_below(checkpoint) {
        let state = dir.join(STATE_FILE);
        if !state.is_file() {
            continue;
        }
        let meta = kd_kernels::io::read_safetensors_metadata(&state)?;
        let step = meta.get("step").and_then(|s| s.parse().ok());
        let step = step.with_context(|| format!("{}: no step count in the metadata", state.display()))?;
        let stage = dir.strip_prefix(checkpoint).unwrap_or(&dir).to_string_lossy().replace('\\', "/");
        steps.insert(stage, step);
    }
    Ok(steps)
}

pub fn progress_bar(steps: u64, stage: &str) -> Result<ProgressBar> {
    // Drawn on stderr, and only on a terminal: redirected output stays clean.
    let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
    let template = format!("{stage} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} steps  {{msg}}  eta {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template)?.progress_chars("=> "));
    Ok(bar)
}

/// `OUT/metrics.jsonl`: one object per evaluation (its split's metrics and the mean training loss
/// since the last) and one every `--log-every` steps (`"split": "train"`, told apart from an
/// evaluation on the training set by its `lr`); every line has its `stage` and `step`.
/// The observer cannot fail, so the first write error is kept for [`MetricsLog::finish`].
struct MetricsLog {
    file: File,
    path: PathBuf,
    error: Option<std::io::Error>,
    loss_sum: f64,
    loss_steps: u64,
    /// Smoothed examples per second.
    rate: Option<f64>,
}

impl MetricsLog {
    /// A new log, or (when resuming) the existing one trimmed to the checkpoint and appended
    /// to: a line of a stage (its "stage" and "step" fields) is kept when that stage's state
    /// (`resume[stage]`) comes after its step; half-written lines (of a killed run) are dropped.
    fn open(path: &Path, resume: Option<&BTreeMap<String, u64>>) -> Result<MetricsLog> {
        if let Some(steps) = resume {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let keep = |line: &&str| match serde_json::from_str::<Value>(line) {
                Ok(v) => match (v.get("stage").and_then(Value::as_str), v.get("step").and_then(Value::as_u64)) {
                    (Some(stage), Some(step)) => steps.get(stage).is_some_and(|&done| step <= done),
                    _ => true,
                },
                Err(_) => false,
            };
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let kept: Vec<&str> = lines.iter().copied().filter(keep).collect();
            if kept.len() < lines.len() || (!text.is_empty() && !text.ends_with('\n')) {
                if kept.len() < lines.len() {
                    eprintln!(
                        "--resume: {}: dropped {} line(s) written after the checkpoint",
                        path.display(),
                        lines.len() - kept.len()
                    );
                }
                let text: String = kept.iter().map(|l| format!("{l}\n")).collect();
                kd_kernels::io::write_atomic(path, text.as_bytes())?;
            }
        }
        let append = resume.is_some();
        let file = File::options()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(MetricsLog { file, path: path.to_path_buf(), error: None, loss_sum: 0.0, loss_steps: 0, rate: None })
    }

    fn add_loss(&mut self, loss: f32) {
        self.loss_sum += loss as f64;
        self.loss_steps += 1;
    }

    /// The mean training loss over the steps since the last evaluation.
    fn mean_loss(&self) -> f64 {
        self.loss_sum / self.loss_steps.max(1) as f64
    }

    /// Appends an evaluation, `loss` being [`mean_loss`](Self::mean_loss), and returns a
    /// line for people.
    fn record(&mut self, stage: &str, step: u64, epoch: f64, split: &str, metrics: &Metrics) -> String {
        let fields = metric_fields(metrics);
        let loss = self.mean_loss();
        let mut obj = Map::new();
        obj.insert("stage".into(), json!(stage));
        obj.insert("step".into(), json!(step));
        obj.insert("epoch".into(), json!(epoch));
        obj.insert("split".into(), json!(split));
        obj.extend(fields.clone());
        obj.insert("loss".into(), json!(loss));
        self.write(Value::Object(obj));
        (self.loss_sum, self.loss_steps) = (0.0, 0);
        format!("{stage} step {step} (epoch {epoch:.2}): {split} {}, training loss {loss:.4}", describe(&fields))
    }

    /// Appends a training record: the mean loss and speed over the steps since the last one
    /// and the learning rate of this step.
    fn train_record(&mut self, stage: &str, step: u64, epoch: f64, lr: f32, (loss, examples_per_s): (f64, f64)) {
        self.write(json!({
            "stage": stage, "step": step, "epoch": epoch, "split": "train",
            "loss": loss, "lr": lr, "examples_per_s": examples_per_s,
        }));
    }

    fn write(&mut self, line: Value) {
        if self.error.is_none() {
            self.error = writeln!(self.file, "{line}").and_then(|()| self.file.flush()).err();
        }
    }

    fn finish(self) -> Result<()> {
        match self.error {
            Some(e) => Err(e).with_context(|| format!("writing {}", self.path.display())),
            None => Ok(()),
        }
    }
}

/// The steps since the last training record in OUT/metrics.jsonl.
#[derive(Default)]
struct StepWindow {
    loss_sum: f64,
    rate_sum: f64,
    steps: u64,
}

impl StepWindow {
    fn add(&mut self, loss: f32, examples_per_s: f64) {
        self.loss_sum += loss as f64;
        self.rate_sum += examples_per_s;
        self.steps += 1;
    }

    /// The mean loss and examples per second over the window, which starts again empty.
    fn take(&mut self) -> (f64, f64) {
        let n = self.steps.max(1) as f64;
        let means = (self.loss_sum / n, self.rate_sum / n);
        *self = StepWindow::default();
        means
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On resume a line is kept when its stage's state comes after its step, whatever its kind
    /// (per-step training records too); lines of stages with no state and a half-written last
    /// line go.
    #[test]
    fn a_resumed_log_is_trimmed_to_each_stages_checkpoint() {
        let dir = std::env::temp_dir().join(format!("kd-cli-trim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let lines = [
            r#"{"stage":"ild","step":10,"split":"dev","accuracy":0.5}"#,
            r#"{"stage":"kd","step":4,"split":"train","loss":0.7}"#,
            r#"{"stage":"kd","step":4,"split":"dev","accuracy":0.6}"#,
            r#"{"stage":"kd","step":5,"split":"train","loss":0.6}"#,
            r#"{"stage":"kd","step":6,"split":"dev","accuracy":0.7}"#,
            r#"{"stage":"peer-advised/probe","step":1,"split":"dev","accuracy":0.5}"#,
            r#"{"note":"no stage"}"#,
            r#"{"stage":"kd","step":7,"spl"#,
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let steps = BTreeMap::from([("ild".to_string(), 10), ("kd".to_string(), 4)]);
        let mut log = MetricsLog::open(&path, Some(&steps)).unwrap();
        log.record("kd", 5, 1.25, "dev", &Metrics::default());
        log.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text.lines().collect();
        assert_eq!(kept[..4], [lines[0], lines[1], lines[2], lines[6]]);
        assert_eq!(kept.len(), 5);
        assert!(kept[4].contains(r#""step":5"#), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
