//! `kd-cli predict`: one JSON line per example with the model's prediction.
use std::path::PathBuf;

use anyhow::{Context, Result};
use kd_methods::data::Split;
use kd_methods::trainer::{argmax, predict};
use serde_json::json;

use crate::args::{report_skipped, DataArgs, InferenceArgs, SplitArg};
use crate::model::{is_regression, label_names, ModelDir};
use crate::run_dir::{check_out_file, remove_stale_temps_beside};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model folder (config.json, model.safetensors, tokenizer.json) with its classifier.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// A generic file (.csv, .tsv, .jsonl or .parquet) to predict on; labels in it are not needed.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["task", "split"])]
    input: Option<PathBuf>,
    /// The split of the task (or of --train/--dev files) to predict on.
    #[arg(long, value_enum, default_value = "dev")]
    split: SplitArg,
    /// Write the JSON lines to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    inference: InferenceArgs,
}

pub fn run(args: Args) -> Result<()> {
    let batch = args.inference.batch()?;
    if let Some(out) = &args.out {
        let mut inputs = args.data.inputs();
        inputs.push(("--model", args.model.as_path()));
        if let Some(input) = &args.input {
            inputs.push(("--input", input.as_path()));
        }
        check_out_file("--out", out, &inputs)?;
        remove_stale_temps_beside(out);
    }
    let device = args.inference.device()?;
    let split = if args.input.is_some() { Split::Test } else { Split::from(args.split) };
    let data = args.data.options(args.input.clone())?;
    let model = ModelDir::open(&args.model)?;
    model.check_max_len(data.max_len)?;
    let bert = model.classifier(&device)?;

    let (dataset, items) = data.unlabelled(split, &model.tokenizer).context("loading the data")?;
    report_skipped(&dataset);
    let outputs = predict(&bert, &items, batch)?;
    let regression = is_regression(&bert.config);
    let names = label_names(&bert.config);
    let mut text = String::new();
    for (index, logits) in outputs.iter().enumerate() {
        let line = if regression {
            json!({ "index": index, "score": logits[0] })
        } else {
            let label_id = argmax(logits);
            let label = names.get(label_id).cloned().unwrap_or_else(|| label_id.to_string());
            json!({ "index": index, "label": label, "label_id": label_id, "probs": softmax(logits) })
        };
        text.push_str(&line.to_string());
        text.push('\n');
    }
    match &args.out {
        Some(path) => kd_kernels::io::write_atomic(path, text.as_bytes())?,
        None => {
            use std::io::Write;
            std::io::stdout().lock().write_all(text.as_bytes()).context("writing to stdout")?
        }
    }
    Ok(())
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    let exp: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}
