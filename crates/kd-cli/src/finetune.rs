//! `kd-cli finetune`: train a model on a task's labels (the `ce` objective) and save it.
use std::path::PathBuf;

use anyhow::{Context, Result};
use kd_methods::methods::ce::Ce;
use kd_methods::pseudo;
use kd_methods::trainer::evaluate;
use kd_model::bert::Bert;

use crate::args::{device, report_skipped, DataArgs};
use crate::model::ModelDir;
use crate::report::print_result;
use crate::run_dir::{check_out, hash_model, hash_set, Fingerprint};
use crate::session::{Session, TrainArgs};

/// (Serialised into the run's fingerprint, docs/RUNS.md.)
#[derive(clap::Args, Debug, serde::Serialize)]
pub struct Args {
    /// The model folder to start from (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    data: DataArgs,
    /// Where the fine-tuned model (an HF folder) and metrics.jsonl go.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    train: TrainArgs,
    /// Train on K gold-labelled rows only, drawn with --seed from the training set: the
    /// low-data teacher of peer-advised KD (`distill --gold-subset K` with the same seed keeps
    /// the same rows' labels).
    #[arg(long, value_name = "K")]
    gold_subset: Option<usize>,
    /// Print the final result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    args.train.check()?;
    check_out(&args.out, &[&[("--model", args.model.as_path())][..], &args.data.inputs()].concat())?;
    let device = device(&args.train.device)?;
    let data = args.data.options(None)?;
    let model = ModelDir::open(&args.model)?;
    model.check_max_len(data.max_len)?;
    let task = data.train_dev(&model.tokenizer, args.train.max_train, args.train.seed).context("loading the data")?;
    report_skipped(&task.train.data);
    if let Some(dev) = &task.dev {
        report_skipped(&dev.data);
    }
    let regression = data.source.is_regression();
    let mut bert = with_head(&model, &device, regression, &task.label_names, args.train.seed)?;

    let gold = match args.gold_subset {
        Some(k) => Some(pseudo::gold_subset(&task.train.set, k, args.train.seed).context("--gold-subset")?.gold),
        None => None,
    };
    let train = gold.as_ref().unwrap_or(&task.train.set);

    let ignore = [&["model", "out", "json"][..], &DataArgs::PATHS, &TrainArgs::NOT_RESULT].concat();
    let mut fingerprint = Fingerprint::of_flags("finetune", &args, &ignore)?;
    fingerprint.input("initial model weights", hash_model(&bert)?);
    fingerprint.input("training data", hash_set(train));
    if let Some(dev) = &task.dev {
        fingerprint.input("dev data", hash_set(&dev.set));
    }
    let mut session =
        Session::create(&args.out, &model.tokenizer_file, args.train.resume, fingerprint, args.train.log_every)?;
    let cfg = args.train.config(args.train.epochs, data.source.metric(), &session.state_dir("finetune"));
    let dev = task.dev.as_ref().map(|d| &d.set);
    let report = session.train("finetune", &mut bert, train, dev, &mut Ce, &cfg)?;

    // Without a dev set the result is measured on the training set.
    let (split, examples, metrics) = match (&task.dev, report.final_metrics) {
        (Some(dev), Some(m)) => ("dev", dev.set.items.len(), m),
        _ => {
            let m = evaluate(&bert, train, args.train.batch, cfg.metric)?;
            session.record("finetune", report.steps, cfg.epochs as f64, "train", &m)?;
            ("train", train.items.len(), m)
        }
    };
    session.finish(&bert)?;
    if !args.json {
        let rate = (train.items.len() * cfg.epochs) as f64 / report.seconds;
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
pub fn with_head(
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
