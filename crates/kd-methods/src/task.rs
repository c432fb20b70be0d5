//! A run's data as the command line names it, a GLUE task folder or generic files, loaded and
//! tokenized with the choices every command shares: which split, how labels become class ids,
//! what to do with bad rows, and the seeded `--max-train` cut.
use std::path::{Path, PathBuf};

use kd_model::Tokenizer;

use crate::batching::{Encoded, EncodedSet};
use crate::data::{load_table, read_lines, Column, Dataset, Format, GlueTask, LabelKind, Split, TableSpec};
use crate::encode::{encode_dataset, encode_texts};
use crate::metrics::MetricKind;
use crate::{Error, Result};

/// Where the examples come from.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// A GLUE task read from its folder of the official download (`.../glue/SST-2`).
    Glue {
        task: GlueTask,
        dir: PathBuf,
    },
    Files(FileSource),
}

/// Generic CSV, TSV or JSONL files (the format follows each file's extension).
#[derive(Clone, Debug)]
pub struct FileSource {
    pub train: Option<PathBuf>,
    pub dev: Option<PathBuf>,
    /// The test split: a file to predict on, labelled or not.
    pub test: Option<PathBuf>,
    pub text: Column,
    pub text_pair: Option<Column>,
    pub label: Column,
    /// Whether CSV and TSV files start with a header row.
    pub has_header: bool,
    /// Labels are real-valued scores rather than classes.
    pub regression: bool,
}

/// How a split's labels become class ids.
#[derive(Clone, Copy, Debug)]
pub enum Labels<'a> {
    /// Not read at all (prediction).
    Ignore,
    /// As the data has them: the training set, which defines the classes.
    FromData,
    /// `names[i]` is class `i` (the training set's or a model's `id2label`); a label outside
    /// them is a bad row. HF's placeholder names `LABEL_i` stand for the integer labels `i`.
    Fixed(&'a [String]),
}

impl DataSource {
    pub fn is_regression(&self) -> bool {
        match self {
            DataSource::Glue { task, .. } => task.is_regression(),
            DataSource::Files(f) => f.regression,
        }
    }

    /// The metrics an evaluation reports: GLUE's for a task, accuracy (or correlations for
    /// scores) for files.
    pub fn metric(&self) -> MetricKind {
        match self {
            DataSource::Glue { task, .. } => MetricKind::from(*task),
            DataSource::Files(_) if self.is_regression() => MetricKind::Correlation,
            DataSource::Files(_) => MetricKind::Accuracy,
        }
    }

    /// A name for reports: the GLUE task, or the stem of the split's file.
    pub fn name(&self, split: Split) -> String {
        match self {
            DataSource::Glue { task, .. } => task.name().to_string(),
            DataSource::Files(f) => f
                .path(split)
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_default(),
        }
    }

    /// Reads `split`. With `skip_bad_rows` unreadable rows are dropped and listed in
    /// [`Dataset::skipped`] instead of failing the load. Labels outside the task's set are bad
    /// rows (see [`crate::data::load_table`]).
    pub fn load(&self, split: Split, labels: Labels, skip_bad_rows: bool) -> Result<Dataset> {
        self.load_labels(split, labels, skip_bad_rows, false)
    }

    /// As [`DataSource::load`]; `allow_new_labels` accepts labels outside the set of generic
    /// files (GLUE's sets are the tasks' own).
    pub fn load_labels(
        &self,
        split: Split,
        labels: Labels,
        skip_bad_rows: bool,
        allow_new_labels: bool,
    ) -> Result<Dataset> {
        match self {
            DataSource::Glue { task, dir } => {
                let mut spec = task.table_spec(split, skip_bad_rows);
                if let Labels::Ignore = labels {
                    spec.label = None;
                }
                // GLUE's class ids are the task's (as HF's processors number them) whatever `labels` says.
                load_table(&dir.join(task.file_name(split)), &spec)
            }
            DataSource::Files(f) => f.load(split, labels, skip_bad_rows, allow_new_labels),
        }
    }

    /// Unlabelled text for distillation or the generator: a table (`.csv`, `.tsv`, `.jsonl`,
    /// `.parquet`) read with the training data's text columns, its labels not read; any other
    /// file is plain text, one text a line (a tab splits a pair). An empty file is an error.
    pub fn load_texts(&self, path: &Path, skip_bad_rows: bool) -> Result<Dataset> {
        let data = match Format::from_path(path) {
            Err(_) => read_lines(path)?,
            Ok(format) => {
                let mut spec = match self {
                    DataSource::Glue { task, .. } => task.table_spec(Split::Train, skip_bad_rows),
                    DataSource::Files(f) => TableSpec {
                        format,
                        has_header: f.has_header,
                        text: f.text.clone(),
                        text_pair: f.text_pair.clone(),
                        label: None,
                        label_kind: LabelKind::Classes { names: None },
                        skip_bad_rows,
                        allow_new_labels: false,
                    },
                };
                (spec.format, spec.label) = (format, None);
                load_table(path, &spec)?
            }
        };
        if data.is_empty() {
            return Err(Error::File { path: path.to_path_buf(), detail: "no text".into() });
        }
        Ok(data)
    }
}

impl FileSource {
    fn path(&self, split: Split) -> Result<&Path> {
        let (path, flag) = match split {
            Split::Train => (&self.train, "train"),
            Split::Dev => (&self.dev, "dev"),
            Split::Test => (&self.test, "test"),
        };
        path.as_deref().ok_or_else(|| Error::Config(format!("no {flag} file given")))
    }

    fn load(&self, split: Split, labels: Labels, skip_bad_rows: bool, allow_new_labels: bool) -> Result<Dataset> {
        let path = self.path(split)?;
        let label_kind = match labels {
            _ if self.regression => LabelKind::Regression,
            Labels::Fixed(names) => LabelKind::Classes { names: Some(fixed_names(names)) },
            Labels::Ignore | Labels::FromData => LabelKind::Classes { names: None },
        };
        let spec = TableSpec {
            format: Format::from_path(path)?,
            has_header: self.has_header,
            text: self.text.clone(),
            text_pair: self.text_pair.clone(),
            label: (!matches!(labels, Labels::Ignore)).then(|| self.label.clone()),
            label_kind,
            skip_bad_rows,
            allow_new_labels,
        };
        load_table(path, &spec)
    }
}

/// `names`, with HF's placeholders `LABEL_0, LABEL_1, ...` (a model whose classes were never
/// named) replaced by the integer labels they stand for.
pub fn fixed_names(names: &[String]) -> Vec<String> {
    let placeholders = names.iter().enumerate().all(|(i, n)| *n == format!("LABEL_{i}"));
    match placeholders {
        true => (0..names.len()).map(|i| i.to_string()).collect(),
        false => names.to_vec(),
    }
}

/// A split, loaded and tokenized.
#[derive(Clone, Debug)]
pub struct LoadedSplit {
    pub data: Dataset,
    pub set: EncodedSet,
}

/// What fine-tuning and distillation train on.
#[derive(Clone, Debug)]
pub struct TrainData {
    pub train: LoadedSplit,
    /// The position of each training example among the training file's rows (as
    /// `pseudo-label` numbers them): not `0..n` when `max_train` drew a subset.
    pub train_rows: Vec<usize>,
    /// The number of rows of the whole training file.
    pub file_rows: usize,
    /// Absent for generic files given without a dev file.
    pub dev: Option<LoadedSplit>,
    /// Class names by id (empty for regression): the `id2label` of a model trained on them.
    pub label_names: Vec<String>,
}

/// The data options every command shares.
#[derive(Clone, Debug)]
pub struct DataOptions {
    pub source: DataSource,
    /// Tokens per example, special tokens included.
    pub max_len: usize,
    pub skip_bad_rows: bool,
    /// Accept labels outside a task's closed set (see [`crate::data::load_table`]).
    pub allow_new_labels: bool,
}

impl DataOptions {
    /// The training set, cut to `max_train` examples drawn with `seed`, and the dev set with its
    /// labels mapped to the training set's class ids.
    pub fn train_dev(&self, tokenizer: &Tokenizer, max_train: Option<usize>, seed: u64) -> Result<TrainData> {
        self.train_dev_with(Labels::FromData, tokenizer, max_train, seed)
    }

    /// As [`DataOptions::train_dev`], the training labels read as `labels` says: a teacher's
    /// classes ([`Labels::Fixed`]) or the file's own ([`Labels::FromData`]).
    pub fn train_dev_with(
        &self,
        labels: Labels,
        tokenizer: &Tokenizer,
        max_train: Option<usize>,
        seed: u64,
    ) -> Result<TrainData> {
        let mut train = self.source.load_labels(Split::Train, labels, self.skip_bad_rows, self.allow_new_labels)?;
        if train.is_empty() {
            let skipped = match train.skipped.len() {
                0 => String::new(),
                n => format!(" ({n} unreadable row(s) skipped)"),
            };
            return Err(Error::File { path: train.source, detail: format!("no training examples{skipped}") });
        }
        let file_rows = train.len();
        let mut train_rows: Vec<usize> = (0..file_rows).collect();
        if let Some(n) = max_train {
            if n == 0 {
                return Err(Error::Config("--max-train 0 leaves no training examples".into()));
            }
            train_rows = train.subset_rows(n, seed);
            train = train.subset(n, seed);
        }
        let label_names = train.label_names.clone();
        if !self.source.is_regression() && label_names.len() < 2 {
            return Err(Error::Config(format!(
                "{}: {} class(es) in the training data; classification needs at least 2 (scores need regression)",
                train.source.display(),
                label_names.len()
            )));
        }
        let dev = match &self.source {
            DataSource::Files(FileSource { dev: None, .. }) => None,
            _ => Some(self.labelled(Split::Dev, Labels::Fixed(&label_names), tokenizer)?),
        };
        let set = encode_dataset(&train, tokenizer, self.max_len)?;
        Ok(TrainData { train: LoadedSplit { data: train, set }, train_rows, file_rows, dev, label_names })
    }

    /// A labelled split for evaluation, its class ids given by `labels`; an empty one is an error.
    pub fn labelled(&self, split: Split, labels: Labels, tokenizer: &Tokenizer) -> Result<LoadedSplit> {
        let data = self.source.load_labels(split, labels, self.skip_bad_rows, self.allow_new_labels)?;
        if data.is_empty() {
            return Err(Error::File { path: data.source, detail: "no labelled examples to evaluate on".into() });
        }
        let set = encode_dataset(&data, tokenizer, self.max_len)?;
        Ok(LoadedSplit { data, set })
    }

    /// A split's texts for prediction; its labels, if any, are not read.
    pub fn unlabelled(&self, split: Split, tokenizer: &Tokenizer) -> Result<(Dataset, Vec<Encoded>)> {
        let data = self.source.load(split, Labels::Ignore, self.skip_bad_rows)?;
        let items = encode_texts(&data, tokenizer, self.max_len)?;
        Ok((data, items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_names_stand_for_integer_labels() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(fixed_names(&names(&["LABEL_0", "LABEL_1"])), names(&["0", "1"]));
        assert_eq!(fixed_names(&names(&["neg", "pos"])), names(&["neg", "pos"]));
        // Only the complete placeholder sequence is replaced.
        assert_eq!(fixed_names(&names(&["LABEL_1", "LABEL_0"])), names(&["LABEL_1", "LABEL_0"]));
    }
}
