//! `kd-cli train-generator`: MATE-KD's generator, an MLM head trained on a frozen encoder or
//! (`--unfreeze`) the whole encoder with it (`kd_methods::methods::generator`), saved as an HF
//! `BertForMaskedLM` folder. A tenth of the text is held out to measure the masked-LM loss and
//! accuracy before and after.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use kd_kernels::rng::Rng;
use kd_methods::batching::Encoded;
use kd_methods::data::{read_lines, Split};
use kd_methods::encode::encode_texts;
use kd_methods::methods::generator::{
    evaluate_mlm, generator_from_encoder, train_generator, GeneratorConfig, Masking, MlmScore,
};
use kd_methods::task::Labels;
use kd_methods::trainer::Event;
use kd_model::bert::Bert;
use kd_model::Tokenizer;
use serde_json::json;

use crate::args::{device, report_skipped, DataArgs};
use crate::model::ModelDir;
use crate::session::progress_bar;

/// The tokens BERT's masking never selects (HF's `get_special_tokens_mask`).
const SPECIAL_TOKENS: [&str; 5] = ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The encoder (config.json, model.safetensors, tokenizer.json), e.g. the teacher; a
    /// classification head in it is dropped, an MLM head is trained further.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Where the BertForMaskedLM folder goes.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Text files, one text per line (blank lines are passed over), instead of a data set:
    /// `--text a.txt --text b.txt` or `--text a.txt,b.txt`.
    #[arg(long, value_name = "FILE", value_delimiter = ',', conflicts_with_all = ["task", "data", "train", "dev"])]
    text: Vec<PathBuf>,
    /// The training split's texts (labels ignored), when no --text is given.
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Texts per optimiser step.
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch: usize,
    /// Peak learning rate of AdamW. Default 1e-3 for the head alone (fixed encoder features allow
    /// larger steps), 1e-4 with --unfreeze (BERT's pre-training rate, the whole encoder moving).
    #[arg(long)]
    lr: Option<f32>,
    /// Texts to measure the masked-LM accuracy on (one a line), instead of a tenth of the
    /// training text: e.g. the dev sentences, which share no phrase with SST-2's train phrases.
    #[arg(long, value_name = "FILE")]
    held_out: Option<PathBuf>,
    /// Train the encoder and embeddings with the head (dropout on): the generator for encoders
    /// that never had an MLM objective, such as MiniLM sentence encoders.
    #[arg(long)]
    unfreeze: bool,
    /// Batch texts of similar length together (as `distill --group-by-length`): less padding.
    #[arg(long)]
    group_by_length: bool,
    /// Seed of the head's initialisation, the held-out draw, the order and the masks.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    ensure!(args.epochs > 0, "--epochs must be at least 1");
    ensure!(args.batch > 0, "--batch must be at least 1");
    ensure!(args.lr.is_none_or(|lr| lr > 0.0 && lr.is_finite()), "--lr must be a positive number");
    let mut inputs = args.data.inputs();
    inputs.push(("--model", args.model.as_path()));
    inputs.extend(args.text.iter().map(|text| ("--text", text.as_path())));
    if let Some(held_out) = &args.held_out {
        inputs.push(("--held-out", held_out.as_path()));
    }
    crate::run_dir::check_out(&args.out, &inputs)?;
    let device = device(&args.device)?;
    let model = ModelDir::open(&args.model)?;
    model.check_max_len(args.data.max_len)?;
    let masking = bert_masking(&model.tokenizer, &model.tokenizer_file)?;
    let texts = match args.text.as_slice() {
        [] => {
            let data = args.data.options(None)?;
            let dataset =
                data.source.load(Split::Train, Labels::Ignore, data.skip_bad_rows).context("loading the data")?;
            report_skipped(&dataset);
            encode_texts(&dataset, &model.tokenizer, data.max_len)?
        }
        files => {
            let mut texts = Vec::new();
            for path in files {
                texts.extend(encode_texts(&read_lines(path)?, &model.tokenizer, args.data.max_len)?);
            }
            texts
        }
    };
    let (train, held_out) = match &args.held_out {
        Some(path) => (texts, encode_texts(&read_lines(path)?, &model.tokenizer, args.data.max_len)?),
        None => hold_out(texts, args.seed)?,
    };
    ensure!(!train.is_empty() && !held_out.is_empty(), "no text to train on or to evaluate on");

    let encoder = Bert::new(model.config.clone(), model.weights(&device)?);
    let mut generator = generator_from_encoder(&encoder, args.seed)?;
    // The generator holds a copy of the weights; a teacher-sized model need not stay twice.
    drop(encoder);
    let before = evaluate_mlm(&generator, &held_out, &masking, args.batch, args.seed)?;
    let mut cfg =
        if args.unfreeze { GeneratorConfig::unfrozen(masking.clone()) } else { GeneratorConfig::new(masking.clone()) };
    (cfg.epochs, cfg.batch_size, cfg.seed) = (args.epochs, args.batch, args.seed);
    cfg.lr = args.lr.unwrap_or(cfg.lr);
    cfg.group_by_length = args.group_by_length;

    let bar = progress_bar(train.len().div_ceil(args.batch) as u64 * args.epochs as u64, "train-generator")?;
    let report = train_generator(&mut generator, &train, &cfg, &mut |event| {
        if let Event::Step { step, total_steps, loss, lr, examples_per_s } = event {
            let message = if loss.terms.is_empty() {
                // Short texts can draw no mask at all: the step had nothing to learn from.
                format!("no masked token in this batch  lr {lr:.2e}")
            } else {
                format!("mlm loss {:.4}  lr {lr:.2e}  {examples_per_s:.0} texts/s", loss.total)
            };
            // Off a terminal (a run in the background) the bar is hidden: a line now and then.
            if bar.is_hidden() && (step.is_multiple_of(PLAIN_PROGRESS_EVERY) || step == total_steps) {
                eprintln!("train-generator: step {step}/{total_steps}: {message}");
            }
            bar.set_position(step);
            bar.set_message(message);
        }
    });
    bar.finish_and_clear();
    let report = report?;
    let after = evaluate_mlm(&generator, &held_out, &masking, args.batch, args.seed)?;

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    kd_model::save_pretrained(&args.out, &generator.config, &generator.weights, &model.tokenizer_file)?;

    let score = |s: &MlmScore| json!({ "loss": s.loss, "accuracy": s.accuracy });
    if args.json {
        let line = json!({
            "train_texts": train.len(), "held_out_texts": held_out.len(), "masked_tokens": before.tokens,
            "before": score(&before), "after": score(&after), "steps": report.steps, "seconds": report.seconds,
            "unfreeze": cfg.unfreeze, "group_by_length": cfg.group_by_length, "lr": cfg.lr, "epochs": cfg.epochs,
            "out": args.out.display().to_string(),
        });
        return crate::print_line(&line.to_string());
    }
    crate::print_line(&format!(
        "trained {} {} steps on {} texts in {:.1} s; saved a BertForMaskedLM to {}",
        if cfg.unfreeze { "the encoder and its MLM head" } else { "the MLM head" },
        report.steps,
        train.len(),
        report.seconds,
        args.out.display()
    ))?;
    crate::print_line(&format!(
        "held-out MLM ({} texts, {} masked tokens): loss {:.4} -> {:.4}, accuracy {:.4} -> {:.4}",
        held_out.len(),
        before.tokens,
        before.loss,
        after.loss,
        before.accuracy,
        after.accuracy
    ))
}

/// BERT's 15% / 80-10-10 masking with the tokenizer's own [MASK] and special ids.
fn bert_masking(tokenizer: &Tokenizer, tokenizer_file: &Path) -> Result<Masking> {
    let Some(mask) = tokenizer.token_to_id("[MASK]") else {
        bail!("{} has no [MASK] token: not a BERT (WordPiece) tokenizer", tokenizer_file.display())
    };
    let special = SPECIAL_TOKENS.iter().filter_map(|t| tokenizer.token_to_id(t));
    Ok(Masking::bert(mask, special.chain([tokenizer.pad_id()]).collect()))
}

/// Steps between the progress lines printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: u64 = 100;

/// A tenth of the texts (at least one) drawn with `seed` to evaluate on, the rest to train on;
/// both kept in their original order.
fn hold_out(texts: Vec<Encoded>, seed: u64) -> Result<(Vec<Encoded>, Vec<Encoded>)> {
    let n = texts.len();
    ensure!(n >= 2, "{n} text(s): the generator needs at least 2, one of them held out to evaluate on");
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    let mut held = vec![false; n];
    for &i in &order[..n.div_ceil(10)] {
        held[i] = true;
    }
    let (mut train, mut held_out) = (Vec::new(), Vec::new());
    for (text, h) in texts.into_iter().zip(held) {
        if h {
            held_out.push(text)
        } else {
            train.push(text)
        }
    }
    Ok((train, held_out))
}
