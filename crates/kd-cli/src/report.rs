//! The results a command prints: one JSON object (`--json`) or a line for people.
use anyhow::Result;
use kd_methods::metrics::Metrics;
use serde_json::{json, Map, Value};

/// The metrics as JSON fields (only the computed ones; NaN becomes null).
pub fn metric_fields(metrics: &Metrics) -> Map<String, Value> {
    match serde_json::to_value(metrics) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// The result of an evaluation: the last line of stdout, as JSON with `--json`.
pub fn print_result(
    json: bool,
    task: &str,
    split: &str,
    examples: usize,
    seconds: f64,
    metrics: &Metrics,
) -> Result<()> {
    let fields = metric_fields(metrics);
    let line = if json {
        let mut obj = Map::new();
        obj.insert("task".into(), json!(task));
        obj.insert("split".into(), json!(split));
        obj.insert("examples".into(), json!(examples));
        obj.insert("seconds".into(), json!(seconds));
        obj.extend(fields);
        Value::Object(obj).to_string()
    } else {
        format!("{task} {split} ({examples} examples, {seconds:.1} s): {}", describe(&fields))
    };
    crate::print_line(&line)
}

/// `accuracy 0.8383, f1 0.8012`.
pub fn describe(fields: &Map<String, Value>) -> String {
    let each = fields.iter().map(|(name, v)| match v.as_f64() {
        Some(x) => format!("{name} {x:.4}"),
        None => format!("{name} n/a"),
    });
    each.collect::<Vec<_>>().join(", ")
}
