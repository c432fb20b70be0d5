//! `kd-cli finetune`: train a model on a task's labels (the `ce` objective) and save it.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kd_methods::methods::ce::Ce;
use kd_methods::metrics::Metrics;
use kd_methods::trainer::{evaluate, train, Event, TrainConfig};
use kd_model::bert::Bert;
use serde_json::{json, Map, Value};

use crate::args::{device, report_skipped, DataArgs};
use crate::model::ModelDir;
use crate::report::{describe, metric_fields, print_result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model folder to start from (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Where the fine-tuned model (an HF folder) and metrics.jsonl go.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Examples per optimiser step.
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 5e-5)]
    lr: f32,
    /// Fraction of the steps spent warming the learning rate up from 0 (then it decays linearly).
    #[arg(long, value_name = "RATIO", default_value_t = 0.1)]
    warmup: f32,
    /// Decoupled weight decay (not on biases and LayerNorm).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Seed of the example order, dropout, a new head and the --max-train cut.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate on dev every N steps (always at the end).
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Train on N examples drawn (with --seed) from the training set.
    #[arg(long, value_name = "N")]
    max_train: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the final result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    ensure!(args.epochs > 0, "--epochs must be at least 1");
    ensure!(args.batch > 0, "--batch must be at least 1");
    ensure!(args.lr > 0.0 && args.lr.is_finite(), "--lr must be a positive number");
    ensure!((0.0..=1.0).contains(&args.warmup), "--warmup is a ratio of the steps, in [0, 1]");
    ensure!(args.weight_decay >= 0.0 && args.weight_decay.is_finite(), "--weight-decay must be >= 0");
    ensure!(args.max_grad_norm >= 0.0, "--max-grad-norm must be >= 0 (0: no clipping)");
    ensure!(args.eval_every != Some(0), "--eval-every must be at least 1");
    let device = device(&args.device)?;
    let data = args.data.options(None)?;
    let model = ModelDir::open(&args.model)?;
    model.check_max_len(data.max_len)?;
    let task = data.train_dev(&model.tokenizer, args.max_train, args.seed).context("loading the data")?;
    report_skipped(&task.train.data);
    if let Some(dev) = &task.dev {
        report_skipped(&dev.data);
    }
    let regression = data.source.is_regression();
    let mut bert = with_head(&model, &device, regression, &task.label_names, args.seed)?;

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let log_path = args.out.join("metrics.jsonl");
    let mut log = MetricsLog::create(&log_path)?;
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch,
        lr: args.lr,
        warmup_ratio: args.warmup,
        weight_decay: args.weight_decay,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        seed: args.seed,
        eval_every: args.eval_every,
        metric: data.source.metric(),
    };
    let steps_per_epoch = task.train.set.items.len().div_ceil(args.batch) as u64;
    let bar = progress_bar(steps_per_epoch * args.epochs as u64)?;
    let mut observer = |event: Event| match event {
        Event::Step { step, loss, lr, examples_per_s, .. } => {
            log.add_loss(loss.total);
            log.rate = match log.rate {
                Some(r) => Some(0.9 * r + 0.1 * examples_per_s),
                None => Some(examples_per_s),
            };
            bar.set_position(step);
            let rate = log.rate.unwrap_or(0.0);
            bar.set_message(format!("loss {:.4}  lr {lr:.2e}  {rate:.0} ex/s", log.mean_loss()));
        }
        Event::Eval { step, metrics } => {
            let line = log.record(step, step as f64 / steps_per_epoch as f64, "dev", metrics);
            bar.suspend(|| eprintln!("{line}"));
        }
    };
    let dev = task.dev.as_ref().map(|d| &d.set);
    let report = train(&mut bert, &task.train.set, dev, &mut Ce, &cfg, &mut observer)?;
    bar.finish_and_clear();

    // Without a dev set the result is measured on the training set.
    let (split, examples, metrics) = match (&task.dev, report.final_metrics) {
        (Some(dev), Some(m)) => ("dev", dev.set.items.len(), m),
        _ => {
            let m = evaluate(&bert, &task.train.set, args.batch, cfg.metric)?;
            log.record(report.steps, args.epochs as f64, "train", &m);
            ("train", task.train.set.items.len(), m)
        }
    };
    log.finish()?;
    kd_model::save_pretrained(&args.out, &bert.config, &bert.weights, &model.tokenizer_json)?;
    if !args.json {
        let rate = (task.train.set.items.len() * args.epochs) as f64 / report.seconds;
        crate::print_line(&format!(
            "trained {} steps in {:.1} s ({rate:.1} examples/s); saved to {}",
            report.steps,
            report.seconds,
            args.out.display()
        ))?;
    }
    let name = data.source.name(kd_methods::data::Split::Train);
    print_result(args.json, &name, split, examples, report.seconds, &metrics)
}

/// The model with a classification head for `label_names` (one output for regression): the
/// checkpoint's when it has one of that size, else a fresh one (and a fresh pooler where the
/// checkpoint has none, as encoder-only sentence models), said on stderr. The labels go into
/// the config, so the saved folder names them.
fn with_head(
    model: &ModelDir,
    device: &kd_kernels::Device,
    regression: bool,
    label_names: &[String],
    seed: u64,
) -> Result<Bert> {
    let mut weights = model.weights(device)?;
    let mut config = model.config.clone();
    let outputs = if regression { 1 } else { label_names.len() };
    let head_fits = weights.classifier.as_ref().is_some_and(|c| c.weight.shape().first() == Some(&outputs));
    if !(head_fits && weights.pooler.is_some()) {
        let pooler = if weights.pooler.is_none() { " and pooler" } else { "" };
        eprintln!(
            "{}: new classifier{pooler} with {outputs} output(s), initialised with seed {seed}",
            model.dir.display()
        );
        weights.init_classifier(&config, outputs, seed)?;
    }
    if regression {
        config.set_num_labels(1);
        config.problem_type = Some("regression".into());
    } else {
        config.set_labels(label_names.to_vec());
        config.problem_type = Some("single_label_classification".into());
    }
    Ok(Bert::new(config, weights))
}

fn progress_bar(steps: u64) -> Result<ProgressBar> {
    // Drawn on stderr, and only on a terminal: redirected output stays clean.
    let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}")?;
    bar.set_style(style.progress_chars("=> "));
    Ok(bar)
}

/// `OUT/metrics.jsonl`, one object per evaluation, and the running training loss it reports.
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
    fn create(path: &Path) -> Result<MetricsLog> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
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
    fn record(&mut self, step: u64, epoch: f64, split: &str, metrics: &Metrics) -> String {
        let fields = metric_fields(metrics);
        let loss = self.mean_loss();
        let mut obj = Map::new();
        obj.insert("step".into(), json!(step));
        obj.insert("epoch".into(), json!(epoch));
        obj.insert("split".into(), json!(split));
        obj.extend(fields.clone());
        obj.insert("loss".into(), json!(loss));
        if self.error.is_none() {
            self.error = writeln!(self.file, "{}", Value::Object(obj)).and_then(|()| self.file.flush()).err();
        }
        (self.loss_sum, self.loss_steps) = (0.0, 0);
        format!("step {step} (epoch {epoch:.2}): {split} {}, training loss {loss:.4}", describe(&fields))
    }

    fn finish(self) -> Result<()> {
        match self.error {
            Some(e) => Err(e).with_context(|| format!("writing {}", self.path.display())),
            None => Ok(()),
        }
    }
}
