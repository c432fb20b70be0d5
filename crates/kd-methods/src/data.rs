//! Datasets: the nine GLUE tasks by name, and generic CSV, TSV, JSONL and Parquet files.
//!
//! Every loader goes through [`load_table`]. A row that cannot be read (wrong column count,
//! unknown label, unparsable score, invalid UTF-8 or JSON, a null Parquet cell) is an error
//! naming file and line (for Parquet, the 1-based row), or, with `skip_bad_rows`, dropped and
//! recorded in [`Dataset::skipped`]: never lost silently. Empty lines carry no data and are
//! passed over.
//!
//! TSV is split on tabs with no quoting at all: GLUE's texts contain `"` as literal characters
//! (a CSV reader would swallow quotes and merge rows). CSV follows RFC 4180 quoting.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use kd_kernels::rng::Rng;
use serde_json::Value;

use crate::{Error, Result};

mod parquet_file;

#[derive(Clone, Debug, PartialEq)]
pub enum Label {
    Class(usize),
    Score(f32),
    /// Unlabelled (GLUE test sets, unlabelled text for distillation).
    None,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text_a: String,
    pub text_b: Option<String>,
    pub label: Label,
}

/// A row dropped under `skip_bad_rows`, with the reason it could not be read.
#[derive(Clone, Debug, PartialEq)]
pub struct SkippedRow {
    pub line: usize,
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Class names in id order; empty for regression (and for unlabelled data given no list).
    pub label_names: Vec<String>,
    pub source: PathBuf,
    /// Rows dropped because `skip_bad_rows` was set, in line order.
    pub skipped: Vec<SkippedRow>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The positions (ascending) of the rows [`Dataset::subset`] keeps.
    pub fn subset_rows(&self, n: usize, seed: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        Rng::new(seed).shuffle(&mut idx);
        idx.truncate(n);
        idx.sort_unstable();
        idx
    }

    /// `n` rows drawn without replacement with `seed`, kept in file order (all rows when
    /// `n >= len`): the `--max-train` cut, reproducible per seed.
    pub fn subset(&self, n: usize, seed: u64) -> Dataset {
        let idx = self.subset_rows(n, seed);
        Dataset {
            examples: idx.iter().map(|&i| self.examples[i].clone()).collect(),
            label_names: self.label_names.clone(),
            source: self.source.clone(),
            skipped: self.skipped.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
    Parquet,
}

impl Format {
    /// From the file extension: `.csv`, `.tsv`/`.tab`, `.jsonl`/`.ndjson`, `.parquet`/`.pq`.
    pub fn from_path(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("csv") => Ok(Format::Csv),
            Some("tsv" | "tab") => Ok(Format::Tsv),
            Some("jsonl" | "ndjson") => Ok(Format::Jsonl),
            Some("parquet" | "pq") => Ok(Format::Parquet),
            _ => Err(Error::File {
                path: path.to_path_buf(),
                detail: "unknown data format: expected a .csv, .tsv, .jsonl or .parquet file".into(),
            }),
        }
    }
}

/// A column by header name (JSON key, Parquet field) or by 0-based position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Column {
    Name(String),
    Index(usize),
}

impl Column {
    /// A command-line value: all digits is a position, anything else a name.
    pub fn parse(s: &str) -> Column {
        match s.parse() {
            Ok(i) => Column::Index(i),
            Err(_) => Column::Name(s.to_string()),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum LabelKind {
    /// Class labels. With `names`, a label must be one of them (its position is the id).
    /// Without, labels that are all non-negative integers are their own ids (so `0`/`1` files
    /// keep the ids a teacher was trained with); otherwise ids follow first appearance.
    Classes { names: Option<Vec<String>> },
    /// A real-valued score per row.
    Regression,
}

/// How to read a table file.
#[derive(Clone, Debug)]
pub struct TableSpec {
    pub format: Format,
    /// Whether the first row names the columns (CSV and TSV; JSONL rows carry their keys and
    /// Parquet files their schema).
    pub has_header: bool,
    pub text: Column,
    pub text_pair: Option<Column>,
    /// `None` for unlabelled data.
    pub label: Option<Column>,
    pub label_kind: LabelKind,
    pub skip_bad_rows: bool,
    /// Accept labels outside the task's closed set (see [`load_table`]'s label rules).
    pub allow_new_labels: bool,
}

/// Loads `path` as described by `spec`.
pub fn load_table(path: &Path, spec: &TableSpec) -> Result<Dataset> {
    let mut sink = RowSink { path, skip: spec.skip_bad_rows, skipped: Vec::new() };
    let rows = match spec.format {
        Format::Tsv => read_tabular(tsv_records(&read_text(&sink)?), spec, &mut sink)?,
        Format::Csv => read_tabular(csv_records(&read_text(&sink)?), spec, &mut sink)?,
        Format::Jsonl => read_jsonl(&read_text(&sink)?, spec, &mut sink)?,
        Format::Parquet => parquet_file::read_parquet(spec, &mut sink)?,
    };
    let (examples, label_names) = resolve_labels(rows, spec, &mut sink)?;
    let mut skipped = sink.skipped;
    skipped.sort_by_key(|s| s.line);
    Ok(Dataset { examples, label_names, source: path.to_path_buf(), skipped })
}

/// The bytes of a text file, less a UTF-8 byte order mark.
fn read_text(sink: &RowSink) -> Result<Vec<u8>> {
    let mut bytes = std::fs::read(sink.path).map_err(|e| sink.file_error(e.to_string()))?;
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3);
    }
    Ok(bytes)
}

/// Where bad rows go: an error, or the skipped list.
struct RowSink<'a> {
    path: &'a Path,
    skip: bool,
    skipped: Vec<SkippedRow>,
}

impl RowSink<'_> {
    fn bad(&mut self, line: usize, reason: String) -> Result<()> {
        if !self.skip {
            return Err(Error::BadRow { path: self.path.to_path_buf(), line, detail: reason });
        }
        self.skipped.push(SkippedRow { line, reason });
        Ok(())
    }

    fn file_error(&self, detail: String) -> Error {
        Error::File { path: self.path.to_path_buf(), detail }
    }
}

/// A row's texts and its label as written, before labels are mapped to ids.
struct RawRow {
    line: usize,
    text_a: String,
    text_b: Option<String>,
    label: Option<String>,
}

/// One record of a CSV or TSV file: its 1-based line and raw fields (or why it is unreadable).
type Record = (usize, std::result::Result<Vec<String>, String>);

fn tsv_records(bytes: &[u8]) -> impl Iterator<Item = Record> + '_ {
    bytes.split(|&b| b == b'\n').enumerate().filter_map(|(i, line)| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let fields = std::str::from_utf8(line)
            .map(|l| l.split('\t').map(str::to_string).collect())
            .map_err(|e| format!("invalid UTF-8: {e}"));
        (!line.is_empty()).then_some((i + 1, fields))
    })
}

fn csv_records(bytes: &[u8]) -> impl Iterator<Item = Record> + '_ {
    let reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(bytes);
    // The csv crate's own line count drifts on CRLF files, so lines are counted here from the
    // record's byte offset (which may point at the previous record's trailing newline).
    let (mut counted, mut line) = (0, 1);
    let mut line_at = move |byte: u64| {
        let start = (byte as usize).min(bytes.len());
        let start = start + bytes[start..].iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
        line += bytes[counted.min(start)..start].iter().filter(|&&b| b == b'\n').count();
        counted = counted.max(start);
        line
    };
    reader.into_byte_records().map(move |rec| match rec {
        Ok(rec) => {
            let line = line_at(rec.position().map_or(0, |p| p.byte()));
            let fields = rec
                .iter()
                .map(|f| std::str::from_utf8(f).map(str::to_string).map_err(|e| format!("invalid UTF-8: {e}")))
                .collect();
            (line, fields)
        }
        Err(e) => (line_at(e.position().map_or(0, |p| p.byte())), Err(format!("unreadable CSV record: {e}"))),
    })
}

/// Column positions in a CSV or TSV file, fixed by its header (or first row).
struct Layout {
    columns: usize,
    text: usize,
    text_pair: Option<usize>,
    label: Option<usize>,
}

impl Layout {
    fn new(spec: &TableSpec, header: Option<&[String]>, columns: usize, sink: &RowSink) -> Result<Layout> {
        let find = |col: &Column| -> Result<usize> {
            match (col, header) {
                (Column::Index(i), _) if *i < columns => Ok(*i),
                (Column::Index(i), _) => Err(sink.file_error(format!("column {i} out of range: rows have {columns}"))),
                (Column::Name(n), Some(h)) => h
                    .iter()
                    .position(|c| c == n)
                    .ok_or_else(|| sink.file_error(format!("no column named '{n}' in the header ({})", h.join(", ")))),
                (Column::Name(n), None) => {
                    Err(sink.file_error(format!("column '{n}' named, but the file is read without a header")))
                }
            }
        };
        Ok(Layout {
            columns,
            text: find(&spec.text)?,
            text_pair: spec.text_pair.as_ref().map(find).transpose()?,
            label: spec.label.as_ref().map(find).transpose()?,
        })
    }

    fn pick(&self, line: usize, mut fields: Vec<String>) -> std::result::Result<RawRow, String> {
        if fields.len() != self.columns {
            return Err(format!("{} columns, expected {}", fields.len(), self.columns));
        }
        let mut take = |i: usize| std::mem::take(&mut fields[i]);
        Ok(RawRow { line, text_a: take(self.text), text_b: self.text_pair.map(&mut take), label: self.label.map(take) })
    }
}

/// The first record fixes the layout (it is the header, or with no header the first row).
fn read_tabular(
    mut records: impl Iterator<Item = Record>,
    spec: &TableSpec,
    sink: &mut RowSink,
) -> Result<Vec<RawRow>> {
    let Some((line, fields)) = records.next() else {
        return Ok(Vec::new());
    };
    let fields = fields.map_err(|e| Error::BadRow { path: sink.path.to_path_buf(), line, detail: e })?;
    let (layout, pending) = if spec.has_header {
        (Layout::new(spec, Some(&fields), fields.len(), sink)?, None)
    } else {
        (Layout::new(spec, None, fields.len(), sink)?, Some((line, Ok(fields))))
    };
    let mut rows = Vec::new();
    for (line, fields) in pending.into_iter().chain(records) {
        match fields.and_then(|f| layout.pick(line, f)) {
            Ok(row) => rows.push(row),
            Err(reason) => sink.bad(line, reason)?,
        }
    }
    Ok(rows)
}

fn read_jsonl(bytes: &[u8], spec: &TableSpec, sink: &mut RowSink) -> Result<Vec<RawRow>> {
    let key = |col: &Column| match col {
        Column::Name(n) => Ok(n.clone()),
        Column::Index(i) => Err(sink.file_error(format!("JSONL columns are keys, not positions (got {i})"))),
    };
    let text = key(&spec.text)?;
    let pair = spec.text_pair.as_ref().map(key).transpose()?;
    let label = spec.label.as_ref().map(key).transpose()?;
    let mut rows = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        if line.trim_ascii().is_empty() {
            continue;
        }
        match parse_json_row(line, &text, pair.as_deref(), label.as_deref()) {
            Ok((text_a, text_b, label)) => rows.push(RawRow { line: line_no, text_a, text_b, label }),
            Err(reason) => sink.bad(line_no, reason)?,
        }
    }
    Ok(rows)
}

type JsonRow = (String, Option<String>, Option<String>);

fn parse_json_row(
    line: &[u8],
    text: &str,
    pair: Option<&str>,
    label: Option<&str>,
) -> std::result::Result<JsonRow, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value.as_object().ok_or("not a JSON object")?;
    let get = |k: &str| obj.get(k).ok_or_else(|| format!("no key '{k}'"));
    let string = |k: &str| match get(k)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("key '{k}' is {other}, expected a string")),
    };
    let label = label
        .map(|k| match get(k)? {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(format!("key '{k}' is {other}, expected a string or a number")),
        })
        .transpose()?;
    Ok((string(text)?, pair.map(string).transpose()?, label))
}

/// The largest integer class id a file may use (with `allow_new_labels`, ids may skip classes).
const MAX_CLASS_ID: usize = 100_000;

/// Turns raw label strings into [`Label`]s by the spec's [`LabelKind`].
///
/// Every task has a closed label set, and a label outside it is a bad row (file:line), unless
/// `spec.allow_new_labels`. With `names`, the set is those names (a new label is appended as a
/// class of its own when allowed). Without, the training file defines it, and a row that breaks
/// the file's pattern is taken for a typo rather than for a class: a name or a `1.0` among
/// integer class ids (or an integer among names, whichever is rarer), an integer id past a
/// class that never appears (a `7` in a file of 0 and 1), a name that differs from another only
/// in case.
fn resolve_labels(rows: Vec<RawRow>, spec: &TableSpec, sink: &mut RowSink) -> Result<(Vec<Example>, Vec<String>)> {
    const ALLOW: &str = "--allow-new-labels accepts it";
    let (mut names, fixed) = match &spec.label_kind {
        LabelKind::Classes { names: Some(n) } => (n.clone(), true),
        _ => (Vec::new(), false),
    };
    let open = spec.allow_new_labels;
    let from_data = matches!(spec.label_kind, LabelKind::Classes { names: None });
    let mut ids: HashMap<String, usize> = names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
    let is_id = |l: &str| l.trim().parse::<usize>().is_ok();
    let given = || rows.iter().filter_map(|r| r.label.as_deref()).filter(|l| !l.trim().is_empty());
    let (id_count, name_count) = given().fold((0, 0), |(i, n), l| if is_id(l) { (i + 1, n) } else { (i, n + 1) });
    // Integer labels are class ids: in a file of integers alone, or (closed) of mostly integers.
    let integer_ids = from_data && id_count > 0 && (name_count == 0 || (!open && name_count <= id_count));
    let mut examples = Vec::with_capacity(rows.len());
    let mut lines = Vec::with_capacity(rows.len());
    for row in rows {
        let label = match (row.label, &spec.label_kind) {
            (None, _) => Ok(Label::None),
            (Some(raw), LabelKind::Regression) => match raw.trim().parse::<f32>() {
                Ok(s) if s.is_finite() => Ok(Label::Score(s)),
                _ => Err(format!("unparsable score '{raw}'")),
            },
            (Some(raw), LabelKind::Classes { .. }) => {
                let raw = raw.trim();
                if integer_ids {
                    raw.parse().map(Label::Class).map_err(|_| {
                        format!(
                            "label '{raw}' is not a class id like the file's {id_count} integer labels: a label \
                             outside the task's set ({ALLOW} as a class of its own)"
                        )
                    })
                } else if let Some(&id) = ids.get(raw) {
                    Ok(Label::Class(id))
                } else if raw.is_empty() {
                    Err("empty label".to_string())
                } else if fixed && !open {
                    Err(format!("unknown label '{raw}' (labels: {}; {ALLOW})", names.join(", ")))
                } else if from_data && !open && is_id(raw) {
                    Err(format!(
                        "label '{raw}' is an integer among the file's {name_count} named labels: a label outside \
                         the task's set ({ALLOW})"
                    ))
                } else if let Some(same) = names.iter().find(|n| from_data && !open && n.eq_ignore_ascii_case(raw)) {
                    Err(format!("label '{raw}' differs from the label '{same}' only in case ({ALLOW})"))
                } else {
                    ids.insert(raw.to_string(), names.len());
                    names.push(raw.to_string());
                    Ok(Label::Class(names.len() - 1))
                }
            }
        };
        match label {
            Ok(label) => {
                examples.push(Example { text_a: row.text_a, text_b: row.text_b, label });
                lines.push(row.line);
            }
            Err(reason) => sink.bad(row.line, reason)?,
        }
    }
    if integer_ids {
        let class = |e: &Example| if let Label::Class(c) = e.label { Some(c) } else { None };
        // The first class without an example (ids past the examples' count surely leave one).
        let n = examples.len();
        let mut present = vec![false; n + 1];
        examples.iter().filter_map(class).filter(|&c| c <= n).for_each(|c| present[c] = true);
        let classes = present.iter().position(|p| !p).unwrap_or(n + 1);
        let mut kept = Vec::with_capacity(n);
        for (example, line) in examples.into_iter().zip(lines) {
            match class(&example) {
                Some(c) if c > classes && (!open || c > MAX_CLASS_ID) => {
                    let reason = if open {
                        format!("label {c}: class ids go up to {MAX_CLASS_ID}")
                    } else {
                        format!(
                            "label {c} leaves class {classes} without an example (integer labels are class ids \
                             from 0): a label outside the file's set ({ALLOW}, with the classes it skips)"
                        )
                    };
                    sink.bad(line, reason)?
                }
                _ => kept.push(example),
            }
        }
        examples = kept;
        let max = examples.iter().filter_map(class).max();
        names = max.map_or(Vec::new(), |m| (0..=m).map(|i| i.to_string()).collect());
    }
    Ok((examples, names))
}

/// The nine GLUE tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GlueTask {
    Cola,
    Sst2,
    Mrpc,
    Stsb,
    Qqp,
    Mnli,
    Qnli,
    Rte,
    Wnli,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Dev,
    /// Unlabelled: every label is [`Label::None`].
    Test,
}

impl GlueTask {
    pub const ALL: [GlueTask; 9] = [
        GlueTask::Cola,
        GlueTask::Sst2,
        GlueTask::Mrpc,
        GlueTask::Stsb,
        GlueTask::Qqp,
        GlueTask::Mnli,
        GlueTask::Qnli,
        GlueTask::Rte,
        GlueTask::Wnli,
    ];

    /// The lower-case name used on the command line (`sst2`, `stsb`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GlueTask::Cola => "cola",
            GlueTask::Sst2 => "sst2",
            GlueTask::Mrpc => "mrpc",
            GlueTask::Stsb => "stsb",
            GlueTask::Qqp => "qqp",
            GlueTask::Mnli => "mnli",
            GlueTask::Qnli => "qnli",
            GlueTask::Rte => "rte",
            GlueTask::Wnli => "wnli",
        }
    }

    /// The folder name in the official GLUE download (`SST-2`, `STS-B`, ...).
    pub fn dir_name(self) -> &'static str {
        match self {
            GlueTask::Cola => "CoLA",
            GlueTask::Sst2 => "SST-2",
            GlueTask::Mrpc => "MRPC",
            GlueTask::Stsb => "STS-B",
            GlueTask::Qqp => "QQP",
            GlueTask::Mnli => "MNLI",
            GlueTask::Qnli => "QNLI",
            GlueTask::Rte => "RTE",
            GlueTask::Wnli => "WNLI",
        }
    }

    /// Class names in id order, as HF transformers' GLUE processors list them (so a teacher
    /// fine-tuned there has the same ids); empty for the regression task STS-B.
    pub fn label_names(self) -> &'static [&'static str] {
        match self {
            GlueTask::Cola | GlueTask::Sst2 | GlueTask::Mrpc | GlueTask::Qqp | GlueTask::Wnli => &["0", "1"],
            GlueTask::Mnli => &["contradiction", "entailment", "neutral"],
            GlueTask::Qnli | GlueTask::Rte => &["entailment", "not_entailment"],
            GlueTask::Stsb => &[],
        }
    }

    pub fn is_regression(self) -> bool {
        self == GlueTask::Stsb
    }

    pub fn file_name(self, split: Split) -> &'static str {
        match (self, split) {
            (_, Split::Train) => "train.tsv",
            (GlueTask::Mnli, Split::Dev) => "dev_matched.tsv",
            (GlueTask::Mnli, Split::Test) => "test_matched.tsv",
            (_, Split::Dev) => "dev.tsv",
            (_, Split::Test) => "test.tsv",
        }
    }

    /// Header names of (text, text pair, label). Test files lack the label column.
    fn columns(self) -> (&'static str, Option<&'static str>, &'static str) {
        match self {
            GlueTask::Cola | GlueTask::Sst2 => ("sentence", None, "label"),
            GlueTask::Mrpc => ("#1 String", Some("#2 String"), "Quality"),
            GlueTask::Stsb => ("sentence1", Some("sentence2"), "score"),
            GlueTask::Qqp => ("question1", Some("question2"), "is_duplicate"),
            GlueTask::Mnli => ("sentence1", Some("sentence2"), "gold_label"),
            GlueTask::Qnli => ("question", Some("sentence"), "label"),
            GlueTask::Rte | GlueTask::Wnli => ("sentence1", Some("sentence2"), "label"),
        }
    }

    /// How to read `split` of this task: columns by header name, except CoLA's train and dev
    /// files, which have no header (source, label, original mark, sentence).
    pub fn table_spec(self, split: Split, skip_bad_rows: bool) -> TableSpec {
        let (text, pair, label) = self.columns();
        let label_kind = if self.is_regression() {
            LabelKind::Regression
        } else {
            LabelKind::Classes { names: Some(self.label_names().iter().map(|s| s.to_string()).collect()) }
        };
        let labelled = split != Split::Test;
        let headerless = self == GlueTask::Cola && labelled;
        TableSpec {
            format: Format::Tsv,
            has_header: !headerless,
            text: if headerless { Column::Index(3) } else { Column::Name(text.into()) },
            text_pair: pair.map(|p| Column::Name(p.into())),
            label: labelled.then(|| if headerless { Column::Index(1) } else { Column::Name(label.into()) }),
            label_kind,
            skip_bad_rows,
            // GLUE's label sets are the tasks' own.
            allow_new_labels: false,
        }
    }
}

impl FromStr for GlueTask {
    type Err = Error;

    /// Accepts the command-line name or the folder name, any case (`sst2`, `SST-2`, `sts_b`).
    fn from_str(s: &str) -> Result<GlueTask> {
        let key: String = s.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
        GlueTask::ALL.into_iter().find(|t| t.name() == key).ok_or_else(|| {
            let names: Vec<&str> = GlueTask::ALL.iter().map(|t| t.name()).collect();
            Error::Invalid(format!("unknown GLUE task '{s}' (tasks: {})", names.join(", ")))
        })
    }
}

/// Loads `split` of `task` from `dir`, the task's folder (`.../glue/SST-2`).
pub fn load_glue(task: GlueTask, dir: &Path, split: Split, skip_bad_rows: bool) -> Result<Dataset> {
    load_table(&dir.join(task.file_name(split)), &task.table_spec(split, skip_bad_rows))
}

/// A plain text file as unlabelled examples: one text a line, a tab splitting a sentence pair;
/// blank lines are passed over. Invalid UTF-8 names its line.
pub fn read_lines(path: &Path) -> Result<Dataset> {
    let bytes = std::fs::read(path).map_err(|e| Error::File { path: path.to_path_buf(), detail: e.to_string() })?;
    let mut examples = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(line.strip_suffix(b"\r").unwrap_or(line)).map_err(|e| Error::BadRow {
            path: path.to_path_buf(),
            line: i + 1,
            detail: format!("invalid UTF-8: {e}"),
        })?;
        let line = line.strip_prefix('\u{feff}').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let (text_a, text_b) = match line.split_once('\t') {
            Some((a, b)) => (a.to_string(), Some(b.to_string())),
            None => (line.trim().to_string(), None),
        };
        examples.push(Example { text_a, text_b, label: Label::None });
    }
    Ok(Dataset { examples, label_names: Vec::new(), source: path.to_path_buf(), skipped: Vec::new() })
}
