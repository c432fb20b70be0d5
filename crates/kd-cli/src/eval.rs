//! `kd-cli eval`: a fine-tuned model's metrics on a labelled split.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use kd_methods::data::Split;
use kd_methods::task::Labels;
use kd_methods::trainer::evaluate;

use crate::args::{report_skipped, split_name, DataArgs, InferenceArgs, SplitArg};
use crate::model::{check_task, label_names, ModelDir};
use crate::report::print_result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model folder (config.json, model.safetensors, tokenizer.json) with its classifier.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// The labelled split to evaluate on.
    #[arg(long, value_enum, default_value = "dev")]
    split: SplitArg,
    #[command(flatten)]
    inference: InferenceArgs,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let batch = args.inference.batch()?;
    ensure!(args.split != SplitArg::Test, "the test split is unlabelled: use kd-cli predict");
    let device = args.inference.device()?;
    let data = args.data.options(None)?;
    let model = ModelDir::open(&args.model)?;
    model.check_max_len(data.max_len)?;
    let bert = model.classifier(&device)?;
    check_task(&bert, &data.source)?;

    let split = Split::from(args.split);
    let names = label_names(&bert.config);
    let loaded = data
        .labelled(split, Labels::Fixed(&names), &model.tokenizer)
        .with_context(|| format!("loading the {} data", split_name(split)))?;
    report_skipped(&loaded.data);
    let started = Instant::now();
    let metrics = evaluate(&bert, &loaded.set, batch, data.source.metric())?;
    let seconds = started.elapsed().as_secs_f64();
    print_result(args.json, &data.source.name(split), split_name(split), loaded.set.items.len(), seconds, &metrics)
}
