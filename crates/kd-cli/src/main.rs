//! `kd-cli`: fine-tune, evaluate and run BERT-family encoders on the CPU or a CUDA GPU.
//!
//! Every failure ends the process with one line `error: ...` on stderr (the whole cause chain)
//! and a non-zero exit status; results go to stdout, progress and notes to stderr.
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod args;
mod bench;
mod config;
mod curves;
mod demo;
mod distill;
mod eval;
mod finetune;
mod method_args;
mod model;
mod noise;
mod plot;
mod predict;
mod pseudo_label;
mod report;
mod run_dir;
mod session;
mod train_generator;

#[derive(Parser)]
#[command(
    name = "kd-cli",
    version,
    about = "Knowledge distillation for BERT-family encoders: distil, fine-tune, evaluate, predict, benchmark.",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Read flags from a TOML file of `long-flag-name = value` lines (switches: `= true`);
    /// flags on the command line win.
    #[arg(long, global = true, value_name = "FILE", display_order = 1000)]
    config: Option<std::path::PathBuf>,
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
    /// Write a copy of the training file with some labels flipped (label-noise studies).
    Noise(noise::Args),
    /// Label text with a fine-tuned teacher: JSON lines of hard or soft labels.
    PseudoLabel(pseudo_label::Args),
    /// Train a masked-LM head on a frozen encoder (MATE-KD's generator) and save it.
    TrainGenerator(train_generator::Args),
    /// Draw a run's OUT/metrics.jsonl (training loss, learning rate, evaluations) as SVG.
    Plot(plot::Args),
    /// Time kd's training work on real checkpoints (`bench step`: the standard distillation step).
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = match config::matches(Cli::command(), std::env::args_os().collect()) {
        Ok(m) => Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit()),
        Err(e) => return fail(e),
    };
    let result = match cli.command {
        Command::Distill(a) => distill::run(*a),
        Command::Finetune(a) => finetune::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Noise(a) => noise::run(a),
        Command::PseudoLabel(a) => pseudo_label::run(a),
        Command::TrainGenerator(a) => train_generator::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    // Some causes (tokenizers, I/O) carry line breaks of their own.
    let message = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

/// Writes one line to stdout, as an error rather than a panic when stdout is gone (a closed pipe).
fn print_line(line: &str) -> Result<()> {
    writeln!(std::io::stdout().lock(), "{line}").context("writing to stdout")
}
