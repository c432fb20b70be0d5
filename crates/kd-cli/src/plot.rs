//! `kd-cli plot OUT`: the curves of a run's OUT/metrics.jsonl as one SVG picture.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

use crate::curves::{draw_svg, Curves, Series};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run's output folder (holding metrics.jsonl), or the metrics.jsonl file itself.
    #[arg(value_name = "OUT")]
    run: PathBuf,
    /// The SVG file to write (default: OUT/curves.svg).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let (log, dir) = match args.run.is_dir() {
        true => (args.run.join("metrics.jsonl"), args.run.clone()),
        false => (args.run.clone(), args.run.parent().map_or_else(PathBuf::new, Path::to_path_buf)),
    };
    let curves = read_log(&log)?;
    let out = args.out.unwrap_or_else(|| dir.join("curves.svg"));
    draw_svg(&curves, &out).with_context(|| format!("drawing {}", out.display()))?;
    crate::print_line(&out.display().to_string())
}

/// Fields of an evaluation line that are not metrics.
const NOT_METRICS: [&str; 5] = ["stage", "step", "epoch", "split", "loss"];

/// Training records (the lines with an `lr`) give the loss and learning-rate curves, by stage;
/// evaluations give one curve per stage, split and metric.
pub fn read_log(path: &Path) -> Result<Curves> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut curves = Curves::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let record: Map<String, Value> =
            serde_json::from_str(line).with_context(|| format!("{at}: not a JSON object"))?;
        let text_field =
            |key: &str| record.get(key).and_then(Value::as_str).with_context(|| format!("{at}: no \"{key}\" text"));
        let number =
            |key: &str| record.get(key).and_then(Value::as_f64).with_context(|| format!("{at}: no \"{key}\" number"));
        let (stage, step) = (text_field("stage")?, number("step")?);
        if record.contains_key("lr") {
            add(&mut curves.loss, stage, (step, number("loss")?));
            add(&mut curves.lr, stage, (step, number("lr")?));
            continue;
        }
        let split = text_field("split")?;
        for (key, value) in record.iter().filter(|(k, _)| !NOT_METRICS.contains(&k.as_str())) {
            // A metric that could not be computed (NaN) is written as null: a gap, not an error.
            match value {
                Value::Number(x) => {
                    add(&mut curves.evals, &format!("{stage} {split} {key}"), (step, x.as_f64().unwrap_or(f64::NAN)))
                }
                Value::Null => {}
                other => bail!("{at}: \"{key}\" is {other}, expected a number"),
            }
        }
    }
    ensure!(
        !(curves.loss.is_empty() && curves.evals.is_empty()),
        "{}: no training records or evaluations to plot",
        path.display()
    );
    Ok(curves)
}

fn add(series: &mut Vec<Series>, name: &str, point: (f64, f64)) {
    match series.iter_mut().find(|s| s.name == name) {
        Some(s) => s.points.push(point),
        None => series.push(Series { name: name.to_string(), points: vec![point] }),
    }
}
