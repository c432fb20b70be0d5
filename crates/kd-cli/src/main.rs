//! `kd-cli`: fine-tune, evaluate and run BERT-family encoders on the CPU or a CUDA GPU.
//!
//! Every failure ends the process with one line `error: ...` on stderr (the whole cause chain)
//! and a non-zero exit status; results go to stdout, progress and notes to stderr.
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod args;
mod demo;
mod distill;
mod eval;
mod finetune;
mod model;
mod predict;
mod report;
mod session;

#[derive(Parser)]
#[command(
    name = "kd-cli",
    version,
    about = "Knowledge distillation for BERT-family encoders: distil, fine-tune, evaluate, predict.",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Distil a teacher into a student with a KD method (no arguments: the built-in demo).
    Distill(Box<distill::Args>),
    /// Fine-tune a model on a task's labels and save it as an HF model folder.
    Finetune(finetune::Args),
    /// Evaluate a fine-tuned model on a labelled split.
    Eval(eval::Args),
    /// Write a fine-tuned model's predictions as JSON lines.
    Predict(predict::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Distill(a) => distill::run(*a),
        Command::Finetune(a) => finetune::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Some causes (tokenizers, I/O) carry line breaks of their own.
            let message = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Writes one line to stdout, as an error rather than a panic when stdout is gone (a closed pipe).
fn print_line(line: &str) -> Result<()> {
    writeln!(std::io::stdout().lock(), "{line}").context("writing to stdout")
}
