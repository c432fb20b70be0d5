//! The options several commands share: where the data is, how to read it, the device.
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use kd_kernels::Device;
use kd_methods::data::{Column, Dataset, GlueTask, Split};
use kd_methods::task::{DataOptions, DataSource, FileSource};

/// A GLUE task folder, or generic CSV/TSV/JSONL/Parquet files with named (or numbered) columns.
/// (Serialised into a run's fingerprint, docs/RUNS.md.)
#[derive(clap::Args, Debug, serde::Serialize)]
pub struct DataArgs {
    /// GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli (read from --data).
    #[arg(long, requires = "data", conflicts_with_all = ["train", "dev"])]
    task: Option<String>,
    /// The GLUE task's folder, holding train.tsv and dev.tsv (e.g. glue/SST-2).
    #[arg(long, value_name = "DIR", requires = "task")]
    data: Option<PathBuf>,
    /// Training file (.csv, .tsv, .jsonl or .parquet), instead of a GLUE task.
    #[arg(long, value_name = "FILE")]
    train: Option<PathBuf>,
    /// Dev file (.csv, .tsv, .jsonl or .parquet), instead of a GLUE task.
    #[arg(long, value_name = "FILE")]
    dev: Option<PathBuf>,
    /// Text column of generic files: a header name (JSON key, Parquet field) or a 0-based position.
    #[arg(long, value_name = "COLUMN", default_value = "text")]
    text_column: String,
    /// Second-text column of sentence-pair data.
    #[arg(long, value_name = "COLUMN")]
    text_pair_column: Option<String>,
    /// Label column of generic files.
    #[arg(long, value_name = "COLUMN", default_value = "label")]
    label_column: String,
    /// Generic CSV/TSV files have no header row (columns by position).
    #[arg(long)]
    no_header: bool,
    /// Generic files' labels are real-valued scores (regression), not classes.
    #[arg(long)]
    regression: bool,
    /// Drop rows that cannot be read, reporting them on stderr, instead of stopping.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Accept labels outside the task's label set (the model's classes, or the pattern of the
    /// training file's labels: a `7` among 0 and 1, a name among ids) as classes of their own.
    #[arg(long)]
    allow_new_labels: bool,
    /// Tokens per example, special tokens included; longer texts are truncated.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub max_len: usize,
}

impl DataArgs {
    /// The data options; `test` is the file the test split reads (prediction input).
    pub fn options(&self, test: Option<PathBuf>) -> Result<DataOptions> {
        let source = match (&self.task, &self.data) {
            (Some(task), Some(dir)) => DataSource::Glue { task: GlueTask::from_str(task)?, dir: dir.clone() },
            _ if self.train.is_none() && self.dev.is_none() && test.is_none() => {
                bail!("no data given: use --task NAME --data DIR, or generic files (--train/--dev FILE)")
            }
            _ => DataSource::Files(FileSource {
                train: self.train.clone(),
                dev: self.dev.clone(),
                test,
                text: Column::parse(&self.text_column),
                text_pair: self.text_pair_column.as_deref().map(Column::parse),
                label: Column::parse(&self.label_column),
                has_header: !self.no_header,
                regression: self.regression,
            }),
        };
        Ok(DataOptions {
            source,
            max_len: self.max_len,
            skip_bad_rows: self.skip_bad_rows,
            allow_new_labels: self.allow_new_labels,
        })
    }

    /// The data paths given, by flag (for the checks that an output overwrites none of them).
    pub fn inputs(&self) -> Vec<(&'static str, &Path)> {
        let given = [("--data", &self.data), ("--train", &self.train), ("--dev", &self.dev)];
        given.into_iter().filter_map(|(flag, p)| Some((flag, p.as_deref()?))).collect()
    }

    /// Fields of the fingerprint that name files: their contents are hashed instead.
    pub const PATHS: [&'static str; 3] = ["data", "train", "dev"];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Train,
    Dev,
    Test,
}

impl From<SplitArg> for Split {
    fn from(s: SplitArg) -> Split {
        match s {
            SplitArg::Train => Split::Train,
            SplitArg::Dev => Split::Dev,
            SplitArg::Test => Split::Test,
        }
    }
}

pub fn split_name(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Dev => "dev",
        Split::Test => "test",
    }
}

/// `--device`: `cpu`, `cuda` or `cuda:N`.
pub fn device(spec: &str) -> Result<Device> {
    Device::parse(spec).with_context(|| format!("--device {spec}"))
}

/// The batch size and device of a command that only runs models forward (eval, predict,
/// pseudo-label).
#[derive(clap::Args, Debug)]
pub struct InferenceArgs {
    /// Examples per forward pass.
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl InferenceArgs {
    /// --batch, refused when 0.
    pub fn batch(&self) -> Result<usize> {
        ensure!(self.batch > 0, "--batch must be at least 1");
        Ok(self.batch)
    }

    /// --device, parsed (a CUDA device that is not there is an error here).
    pub fn device(&self) -> Result<Device> {
        device(&self.device)
    }
}

/// Says on stderr which rows `--skip-bad-rows` dropped, so none are lost silently.
pub fn report_skipped(data: &Dataset) {
    if let Some(first) = data.skipped.first() {
        eprintln!(
            "{}: skipped {} unreadable row(s); the first, line {}: {}",
            data.source.display(),
            data.skipped.len(),
            first.line,
            first.reason
        );
    }
}
