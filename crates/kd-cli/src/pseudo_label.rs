//! `kd-cli pseudo-label`: a fine-tuned teacher's labels for a split's text, as the JSON lines
//! that distillation from pseudo-labels reads (`kd_methods::pseudo`).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use kd_methods::batching::{EncodedSet, Targets};
use kd_methods::data::Split;
use kd_methods::pseudo::{from_teacher, write_jsonl};
use serde_json::{json, Map, Value};

use crate::args::{report_skipped, split_name, DataArgs, InferenceArgs, SplitArg};
use crate::model::{check_task, is_regression, label_names, ModelDir};
use crate::run_dir::{check_out_file, remove_stale_temps_beside};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The fine-tuned teacher folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    teacher: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// A generic file (.csv, .tsv, .jsonl or .parquet) of text to label; labels in it are not needed.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["task", "split"])]
    input: Option<PathBuf>,
    /// The split of the task (or of --train/--dev files) to label; its labels are not read.
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
    /// Write the teacher's class probabilities instead of its argmax class.
    #[arg(long)]
    soft: bool,
    /// The JSONL file to write: {"index", "label"} (or {"index", "probs"}) per example.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    inference: InferenceArgs,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let batch = args.inference.batch()?;
    let mut inputs = args.data.inputs();
    inputs.push(("--teacher", args.teacher.as_path()));
    if let Some(input) = &args.input {
        inputs.push(("--input", input.as_path()));
    }
    check_out_file("--out", &args.out, &inputs)?;
    remove_stale_temps_beside(&args.out);
    let device = args.inference.device()?;
    let split = if args.input.is_some() { Split::Test } else { Split::from(args.split) };
    let data = args.data.options(args.input.clone())?;
    let model = ModelDir::open(&args.teacher)?;
    model.check_max_len(data.max_len)?;
    let teacher = model.classifier(&device)?;
    ensure!(
        !is_regression(&teacher.config),
        "{} predicts scores; pseudo-labels need a classifier",
        args.teacher.display()
    );
    check_task(&teacher, &data.source)?;

    let (dataset, items) = data.unlabelled(split, &model.tokenizer).context("loading the data")?;
    report_skipped(&dataset);
    let started = Instant::now();
    let set = EncodedSet { items, targets: Targets::Classes(Vec::new()) };
    let labels = from_teacher(&teacher, &set, batch, args.soft)?;
    let seconds = started.elapsed().as_secs_f64();
    let names = label_names(&teacher.config);
    write_jsonl(&args.out, &labels, &names)?;

    let mut counts = vec![0usize; names.len()];
    for c in labels.hard() {
        if let Some(k) = counts.get_mut(c as usize) {
            *k += 1;
        }
    }
    let counts: Map<String, Value> = names.iter().zip(&counts).map(|(n, &k)| (n.clone(), json!(k))).collect();
    let kind = if args.soft { "soft" } else { "hard" };
    let (name, split) = (data.source.name(split), if args.input.is_some() { "input" } else { split_name(split) });
    let line = if args.json {
        json!({
            "task": name, "split": split, "examples": labels.len(), "labels": kind, "classes": counts,
            "seconds": seconds, "out": args.out.display().to_string(),
        })
        .to_string()
    } else {
        let described: Vec<String> = counts.iter().map(|(n, k)| format!("{n} {k}")).collect();
        format!(
            "{name} {split}: {} {kind} labels from {} ({}) in {seconds:.1} s; wrote {}",
            labels.len(),
            args.teacher.display(),
            described.join(", "),
            args.out.display()
        )
    };
    crate::print_line(&line)
}
