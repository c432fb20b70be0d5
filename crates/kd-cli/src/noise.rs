//! `kd-cli noise`: a copy of the training file with labels flipped (METHODS.md B §1.4a), for
//! fine-tuning and distilling on noisy labels. The copy keeps the source's format row for row
//! (a GLUE TSV keeps its header and every other column), so it loads with the same flags, and
//! `FILE.flipped.json` lists the rows whose label changed.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use kd_methods::data::{Column, Dataset, Format, Label, Split};
use kd_methods::noise::{inject, NoiseModel};
use kd_methods::task::{DataSource, Labels};
use serde_json::{json, Value};

use crate::args::DataArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    /// Flip each label with probability R to one of the other classes, uniformly.
    #[arg(long, value_name = "R", required_unless_present = "transition", conflicts_with = "transition")]
    rate: Option<f64>,
    /// A JSON matrix: row i is the distribution of the noisy label of class i (rows sum to 1).
    #[arg(long, value_name = "FILE")]
    transition: Option<PathBuf>,
    /// Seed of the corruption, independent of any run's seed, so every run sees the same noise.
    #[arg(long, value_name = "N", default_value_t = 0)]
    noise_seed: u64,
    /// The noisy training file to write, in the source's format; the flipped rows go to
    /// FILE.flipped.json. The dev set is left as it is.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let data = args.data.options(None)?;
    let model = match (&args.transition, args.rate) {
        (Some(path), _) => NoiseModel::Transition(read_matrix(path)?),
        (None, Some(rate)) => NoiseModel::Symmetric { rate },
        (None, None) => bail!("give --rate R or --transition FILE"),
    };
    let layout = Layout::of(&data.source)?;
    let clean = data
        .source
        .load_labels(Split::Train, Labels::FromData, data.skip_bad_rows, data.allow_new_labels)
        .context("loading the data")?;
    if let Some(first) = clean.skipped.first() {
        bail!(
            "{}: {} unreadable row(s), the first on line {} ({}); noise copies the file row for row, so fix or remove them first",
            clean.source.display(),
            clean.skipped.len(),
            first.line,
            first.reason
        );
    }
    ensure!(!same_file(&clean.source, &args.out), "--out {} would overwrite the training file", args.out.display());
    let noisy = inject(&clean, &model, args.noise_seed).with_context(|| match &args.transition {
        Some(path) => format!("--transition {}", path.display()),
        None => "--rate".to_string(),
    })?;
    let bytes = std::fs::read(&clean.source).with_context(|| format!("reading {}", clean.source.display()))?;
    let copy = layout.relabel(&bytes, &clean, &noisy.dataset, &noisy.flipped)?;
    crate::run_dir::remove_stale_temps_beside(&args.out);
    kd_kernels::io::write_atomic(&args.out, &copy)?;

    let rows = clean.len();
    let rate = noisy.flipped.len() as f64 / rows.max(1) as f64;
    let noise = match &model {
        NoiseModel::Symmetric { rate } => json!({ "symmetric": rate }),
        NoiseModel::Transition(m) => json!({ "transition": m }),
    };
    let mut flipped_file = args.out.clone().into_os_string();
    flipped_file.push(".flipped.json");
    let flipped_file = PathBuf::from(flipped_file);
    let source = clean.source.display().to_string();
    let record = json!({
        "source": source, "rows": rows, "rate": rate, "noise": noise, "noise_seed": args.noise_seed,
        "flipped": noisy.flipped,
    });
    kd_kernels::io::write_atomic(&flipped_file, format!("{record}\n").as_bytes())?;
    let line = if args.json {
        json!({
            "source": source, "out": args.out.display().to_string(),
            "flipped_file": flipped_file.display().to_string(), "rows": rows,
            "flipped": noisy.flipped.len(), "rate": rate, "noise": record["noise"], "noise_seed": args.noise_seed,
        })
        .to_string()
    } else {
        format!(
            "{source}: flipped {} of {rows} labels (rate {rate:.4}, noise seed {}); wrote {} and {}",
            noisy.flipped.len(),
            args.noise_seed,
            args.out.display(),
            flipped_file.display()
        )
    };
    crate::print_line(&line)
}

fn read_matrix(path: &Path) -> Result<Vec<Vec<f64>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the transition matrix {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("{}: expected a JSON matrix of probabilities, [[p00, p01], [p10, p11]]", path.display())
    })
}

/// Whether `out` names the existing file `source` (so writing would destroy the clean labels).
fn same_file(source: &Path, out: &Path) -> bool {
    match (source.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The new label (as written in the file) of each flipped row.
type Flips = HashMap<usize, String>;

/// Where a training file keeps its labels.
struct Layout {
    format: Format,
    has_header: bool,
    label: Column,
}

impl Layout {
    fn of(source: &DataSource) -> Result<Layout> {
        Ok(match source {
            DataSource::Glue { task, .. } => {
                let spec = task.table_spec(Split::Train, false);
                let label = spec.label.context("GLUE's training split has no label column")?;
                Layout { format: spec.format, has_header: spec.has_header, label }
            }
            DataSource::Files(f) => {
                let train = f.train.as_deref().context("no training file given (--train FILE)")?;
                Layout { format: Format::from_path(train)?, has_header: f.has_header, label: f.label.clone() }
            }
        })
    }

    /// `bytes`, the file `clean` was read from, with the label of each row in `flipped` set to
    /// its label in `noisy`. Rows are the file's records after the header, in order.
    fn relabel(&self, bytes: &[u8], clean: &Dataset, noisy: &Dataset, flipped: &[usize]) -> Result<Vec<u8>> {
        let path = &clean.source;
        let new_labels = flipped
            .iter()
            .map(|&row| match noisy.examples[row].label {
                Label::Class(c) => Ok((row, noisy.label_names[c].clone())),
                _ => bail!("{}: row {row} has no class label to flip", path.display()),
            })
            .collect::<Result<Flips>>()?;
        let (out, rows) = match self.format {
            Format::Tsv => self.relabel_tsv(bytes, &new_labels)?,
            Format::Jsonl => self.relabel_jsonl(bytes, &new_labels)?,
            Format::Csv => self.relabel_csv(bytes, &new_labels)?,
            // The copy keeps the source's format, and kd reads parquet but writes none.
            Format::Parquet => {
                bail!("{}: noise cannot copy a parquet file; convert it to CSV, TSV or JSONL", path.display())
            }
        };
        // The loader read the same records; a different count means the two disagree on the file.
        ensure!(rows == clean.len(), "{}: copied {rows} rows but the data has {}", path.display(), clean.len());
        Ok(out)
    }

    /// The label's position, from the header (or with none, the column number).
    fn label_index(&self, header: Option<&[String]>) -> Result<usize> {
        match (&self.label, header) {
            (Column::Index(i), _) => Ok(*i),
            (Column::Name(n), Some(h)) => h.iter().position(|c| c == n).with_context(|| format!("no column '{n}'")),
            (Column::Name(n), None) => bail!("label column '{n}' named, but the file has no header"),
        }
    }

    /// Lines are copied byte for byte, except the flipped rows' label field.
    fn relabel_tsv(&self, bytes: &[u8], flips: &Flips) -> Result<(Vec<u8>, usize)> {
        let text = std::str::from_utf8(bytes).context("the training file is not UTF-8")?;
        let mut out = String::with_capacity(text.len());
        let (mut column, mut row) = (None, 0);
        for line in text.split_inclusive('\n') {
            let body = line.trim_end_matches('\n').trim_end_matches('\r');
            if body.is_empty() {
                out.push_str(line);
                continue;
            }
            let fields: Vec<&str> = body.split('\t').collect();
            let index = match column {
                Some(i) => i,
                None if self.has_header => {
                    let header: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
                    column = Some(self.label_index(Some(&header))?);
                    out.push_str(line);
                    continue;
                }
                None => *column.insert(self.label_index(None)?),
            };
            if let Some(label) = flips.get(&row) {
                let mut fields = fields;
                *fields.get_mut(index).with_context(|| format!("row {row} has no column {index}"))? = label;
                out.push_str(&fields.join("\t"));
                out.push_str(&line[body.len()..]);
            } else {
                out.push_str(line);
            }
            row += 1;
        }
        Ok((out.into_bytes(), row))
    }

    /// Lines are copied byte for byte, except the flipped rows, whose label key is rewritten (a
    /// number stays a number).
    fn relabel_jsonl(&self, bytes: &[u8], flips: &Flips) -> Result<(Vec<u8>, usize)> {
        let Column::Name(key) = &self.label else { bail!("JSONL columns are keys, not positions") };
        let mut out = Vec::with_capacity(bytes.len());
        let mut row = 0;
        for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
            if line.trim_ascii().is_empty() {
                out.extend_from_slice(line);
                continue;
            }
            if let Some(label) = flips.get(&row) {
                let mut value: Value =
                    serde_json::from_slice(line).with_context(|| format!("line {}: invalid JSON", i + 1))?;
                let slot = value.get_mut(key.as_str()).with_context(|| format!("line {}: no key '{key}'", i + 1))?;
                *slot = match (&*slot, label.parse::<serde_json::Number>()) {
                    (Value::Number(_), Ok(n)) => Value::Number(n),
                    _ => Value::String(label.clone()),
                };
                out.extend_from_slice(value.to_string().as_bytes());
                out.extend_from_slice(&line[line.trim_ascii_end().len()..]);
            } else {
                out.extend_from_slice(line);
            }
            row += 1;
        }
        Ok((out, row))
    }

    /// Records are written back with CSV quoting where needed; only flipped labels change.
    fn relabel_csv(&self, bytes: &[u8], flips: &Flips) -> Result<(Vec<u8>, usize)> {
        let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(bytes);
        let mut writer = csv::WriterBuilder::new().flexible(true).from_writer(Vec::with_capacity(bytes.len()));
        let (mut column, mut row) = (None, 0);
        for record in reader.byte_records() {
            let mut record = record.context("unreadable CSV record")?;
            let index = match column {
                Some(i) => i,
                None if self.has_header => {
                    let header: Vec<String> = record.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
                    column = Some(self.label_index(Some(&header))?);
                    writer.write_byte_record(&record)?;
                    continue;
                }
                None => *column.insert(self.label_index(None)?),
            };
            if let Some(label) = flips.get(&row) {
                let fields: Vec<&[u8]> =
                    record.iter().enumerate().map(|(i, f)| if i == index { label.as_bytes() } else { f }).collect();
                record = csv::ByteRecord::from(fields);
            }
            writer.write_byte_record(&record)?;
            row += 1;
        }
        Ok((writer.into_inner().context("writing CSV")?, row))
    }
}
