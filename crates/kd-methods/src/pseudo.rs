//! Teacher pseudo-labels for distillation from labels rather than logits (PA-KD, METHODS.md A.2):
//! made by a teacher model run on unlabelled text, or read from a JSONL file that anything (an
//! LLM prompted few-shot, another toolkit) may have written. Also the low-data split of the
//! paper: k gold labels to fine-tune the teacher, the rest of the training set to be labelled.
//!
//! The file has one JSON object per line (blank lines are passed over, other keys ignored):
//!   {"index": 17, "label": "positive"}        a hard label, by class name or by id
//!   {"index": 18, "probs": [0.2, 0.8]}         a soft label, one probability per class
//! `index` is the row of the dataset (for a training set, of the whole file: a `--max-train`
//! run selects its rows from the file's labels); without it (on every line) lines follow the
//! dataset's order. All lines are hard or all soft, and every row is labelled exactly once: a teacher
//! that skipped rows is an error, not a silently smaller training set.

use std::io::Write;
use std::path::Path;

use kd_kernels::rng::Rng;
use kd_model::bert::Bert;
use serde_json::Value;

use crate::batching::{EncodedSet, Targets};
use crate::trainer::{argmax, predict};
use crate::{Error, Result};

/// How far a soft label's probabilities may sum from 1 (rounded LLM or spreadsheet output).
const SUM_TOLERANCE: f64 = 1e-3;

/// A teacher's label for each example of a set, index-aligned with it.
#[derive(Clone, Debug, PartialEq)]
pub enum PseudoLabels {
    /// A class id per example.
    Hard(Vec<u32>),
    /// A distribution over the classes per example.
    Soft(Vec<Vec<f32>>),
}

impl PseudoLabels {
    /// Hard labels are the argmax of each row, soft ones its softmax at T = 1.
    pub fn from_logits(logits: &[Vec<f32>], soft: bool) -> PseudoLabels {
        if soft {
            PseudoLabels::Soft(logits.iter().map(|r| softmax(r)).collect())
        } else {
            PseudoLabels::Hard(logits.iter().map(|r| argmax(r) as u32).collect())
        }
    }

    pub fn len(&self) -> usize {
        match self {
            PseudoLabels::Hard(v) => v.len(),
            PseudoLabels::Soft(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_soft(&self) -> bool {
        matches!(self, PseudoLabels::Soft(_))
    }

    /// The class of each example: the label itself, or the argmax of the distribution.
    pub fn hard(&self) -> Vec<u32> {
        match self {
            PseudoLabels::Hard(v) => v.clone(),
            PseudoLabels::Soft(v) => v.iter().map(|r| argmax(r) as u32).collect(),
        }
    }

    /// The labels of `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> PseudoLabels {
        match self {
            PseudoLabels::Hard(v) => PseudoLabels::Hard(rows.iter().map(|&i| v[i]).collect()),
            PseudoLabels::Soft(v) => PseudoLabels::Soft(rows.iter().map(|&i| v[i].clone()).collect()),
        }
    }

    /// Overwrites the labels of `rows` with `with`'s, taken in order.
    pub fn replace(&mut self, rows: &[usize], with: &PseudoLabels) -> Result<()> {
        if rows.len() != with.len() || rows.iter().any(|&i| i >= self.len()) {
            return Err(Error::Invalid(format!(
                "cannot replace {} rows (largest {:?}) of {} labels with {} labels",
                rows.len(),
                rows.iter().max(),
                self.len(),
                with.len()
            )));
        }
        match (self, with) {
            (PseudoLabels::Hard(to), PseudoLabels::Hard(from)) => rows.iter().zip(from).for_each(|(&i, &y)| to[i] = y),
            (PseudoLabels::Soft(to), PseudoLabels::Soft(from)) => {
                rows.iter().zip(from).for_each(|(&i, p)| to[i].clone_from(p))
            }
            _ => return Err(Error::Invalid("cannot mix hard and soft pseudo-labels".into())),
        }
        Ok(())
    }
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let exp: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|&e| (e / sum) as f32).collect()
}

/// The teacher's labels for every example of `set` (its targets are ignored).
pub fn from_teacher(teacher: &Bert, set: &EncodedSet, batch_size: usize, soft: bool) -> Result<PseudoLabels> {
    Ok(PseudoLabels::from_logits(&predict(teacher, &set.items, batch_size)?, soft))
}

/// Writes `labels` as JSONL, one `{"index", "label"}` (class name) or `{"index", "probs"}` line
/// per example, readable back by [`read_jsonl`]. Atomically: a failed write (a full disk)
/// leaves an older file at `path` as it was.
pub fn write_jsonl(path: &Path, labels: &PseudoLabels, label_names: &[String]) -> Result<()> {
    let file_error = |e: std::io::Error| Error::File { path: path.to_path_buf(), detail: e.to_string() };
    let mut out = Vec::new();
    for i in 0..labels.len() {
        let line = match labels {
            PseudoLabels::Hard(v) => {
                let name = label_names.get(v[i] as usize).ok_or_else(|| {
                    Error::Invalid(format!("label {} of row {i} has no name ({} classes)", v[i], label_names.len()))
                })?;
                serde_json::json!({ "index": i, "label": name })
            }
            PseudoLabels::Soft(v) => serde_json::json!({ "index": i, "probs": v[i] }),
        };
        writeln!(out, "{line}").map_err(file_error)?;
    }
    Ok(kd_kernels::io::write_atomic(path, &out)?)
}

/// One line of a pseudo-label file, parsed.
struct Line {
    index: Option<usize>,
    label: LineLabel,
}

enum LineLabel {
    Hard(u32),
    Soft(Vec<f32>),
}

/// Reads a pseudo-label file for a dataset of `rows` examples whose classes are `label_names`
/// (names are matched ignoring case and surrounding space). Errors name the file and line.
pub fn read_jsonl(path: &Path, label_names: &[String], rows: usize) -> Result<PseudoLabels> {
    if label_names.is_empty() {
        return Err(Error::Invalid("pseudo-labels need a classification task (no class names given)".into()));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::File { path: path.to_path_buf(), detail: e.to_string() })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let bad = |line: usize, detail: String| Error::BadRow { path: path.to_path_buf(), line, detail };
    let mut hard = vec![0u32; rows];
    let mut soft: Vec<Vec<f32>> = vec![Vec::new(); rows];
    // The line that labelled each row, for duplicate and missing-row errors.
    let mut seen: Vec<Option<usize>> = vec![None; rows];
    // Whether lines carry "index" and "probs", fixed by the first line.
    let mut form: Option<(bool, bool)> = None;
    let mut count = 0;
    for (i, text) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        if text.trim_ascii().is_empty() {
            continue;
        }
        let line = parse_line(text, label_names).map_err(|e| bad(line_no, e))?;
        let this = (line.index.is_some(), matches!(line.label, LineLabel::Soft(_)));
        let (indexed, is_soft) = *form.get_or_insert(this);
        if this.0 != indexed {
            let has = if indexed { "has no" } else { "has an" };
            return Err(bad(line_no, format!("{has} \"index\", unlike the first line")));
        }
        if this.1 != is_soft {
            let first = if is_soft { "soft (\"probs\")" } else { "hard (\"label\")" };
            return Err(bad(line_no, format!("the first line's label is {first}; a file cannot mix the two")));
        }
        let row = line.index.unwrap_or(count);
        if row >= rows {
            let what = if indexed { format!("index {row} is") } else { "more lines than rows:".into() };
            return Err(bad(line_no, format!("{what} out of range for a dataset of {rows} rows")));
        }
        if let Some(earlier) = seen[row] {
            return Err(bad(line_no, format!("row {row} is already labelled on line {earlier}")));
        }
        seen[row] = Some(line_no);
        count += 1;
        match line.label {
            LineLabel::Hard(y) => hard[row] = y,
            LineLabel::Soft(p) => soft[row] = p,
        }
    }
    if let Some(missing) = seen.iter().position(Option::is_none) {
        return Err(Error::File {
            path: path.to_path_buf(),
            detail: format!("{} of {rows} rows have no label (the first is row {missing})", rows - count),
        });
    }
    Ok(match form {
        Some((_, true)) => PseudoLabels::Soft(soft),
        _ => PseudoLabels::Hard(hard),
    })
}

fn parse_line(text: &[u8], names: &[String]) -> std::result::Result<Line, String> {
    let value: Value = serde_json::from_slice(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value.as_object().ok_or("not a JSON object")?;
    let index = obj
        .get("index")
        .map(|v| v.as_u64().map(|i| i as usize).ok_or_else(|| format!("\"index\" is {v}, expected a row number")))
        .transpose()?;
    let label = match (obj.get("label"), obj.get("probs")) {
        (Some(_), Some(_)) => return Err("has both \"label\" and \"probs\"; give one".into()),
        (None, None) => return Err("has neither \"label\" nor \"probs\"".into()),
        (Some(v), None) => LineLabel::Hard(class_id(v, names)?),
        (None, Some(v)) => LineLabel::Soft(distribution(v, names.len())?),
    };
    Ok(Line { index, label })
}

fn class_id(v: &Value, names: &[String]) -> std::result::Result<u32, String> {
    let known = || names.join(", ");
    match v {
        Value::String(s) => names
            .iter()
            .position(|n| n.trim().eq_ignore_ascii_case(s.trim()))
            .map(|c| c as u32)
            .ok_or_else(|| format!("unknown label '{s}' (labels: {})", known())),
        Value::Number(n) => match n.as_u64() {
            Some(c) if (c as usize) < names.len() => Ok(c as u32),
            _ => Err(format!("label id {n} is not one of 0..{} ({})", names.len(), known())),
        },
        other => Err(format!("\"label\" is {other}, expected a class name or id")),
    }
}

fn distribution(v: &Value, classes: usize) -> std::result::Result<Vec<f32>, String> {
    let items = v.as_array().ok_or_else(|| format!("\"probs\" is {v}, expected a list of numbers"))?;
    if items.len() != classes {
        return Err(format!("\"probs\" has {} entries, expected one per class ({classes})", items.len()));
    }
    let probs = items
        .iter()
        .map(|p| p.as_f64().filter(|p| p.is_finite() && *p >= 0.0).ok_or_else(|| format!("probability {p} is invalid")))
        .collect::<std::result::Result<Vec<f64>, String>>()?;
    let sum: f64 = probs.iter().sum();
    if (sum - 1.0).abs() > SUM_TOLERANCE {
        return Err(format!("\"probs\" sums to {sum}, not 1"));
    }
    Ok(probs.into_iter().map(|p| p as f32).collect())
}

/// The paper's low-data setting: `k` rows keep their gold label (to fine-tune the teacher), the
/// rest are to be pseudo-labelled. Rows are drawn with `seed` and kept in dataset order.
#[derive(Clone, Debug)]
pub struct GoldSplit {
    pub gold: EncodedSet,
    pub unlabelled: EncodedSet,
    /// Positions in the original set of `gold`'s and `unlabelled`'s rows.
    pub gold_rows: Vec<usize>,
    pub unlabelled_rows: Vec<usize>,
}

pub fn gold_subset(set: &EncodedSet, k: usize, seed: u64) -> Result<GoldSplit> {
    let n = set.items.len();
    if k == 0 || k >= n {
        return Err(Error::Invalid(format!("a gold subset of {k} must leave rows to label, out of {n}")));
    }
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    let (gold_rows, unlabelled_rows) = order.split_at_mut(k);
    gold_rows.sort_unstable();
    unlabelled_rows.sort_unstable();
    Ok(GoldSplit {
        gold: select_rows(set, gold_rows),
        unlabelled: select_rows(set, unlabelled_rows),
        gold_rows: gold_rows.to_vec(),
        unlabelled_rows: unlabelled_rows.to_vec(),
    })
}

/// Puts back the gold labels of `set`'s `gold_rows` into teacher `labels` over the same set
/// (the low-data setting of peer-advised KD: those rows' labels are trusted), as one-hot
/// distributions over `classes` when the labels are soft.
pub fn keep_gold(labels: &mut PseudoLabels, set: &EncodedSet, gold_rows: &[usize], classes: usize) -> Result<()> {
    let Targets::Classes(gold) = &set.targets else {
        return Err(Error::Invalid("gold labels are kept only for classification tasks".into()));
    };
    let hard: Vec<u32> = gold_rows.iter().map(|&i| gold[i]).collect();
    let with = if labels.is_soft() {
        let one_hot = |y: u32| (0..classes).map(|c| if c == y as usize { 1.0 } else { 0.0 }).collect();
        PseudoLabels::Soft(hard.into_iter().map(one_hot).collect())
    } else {
        PseudoLabels::Hard(hard)
    };
    labels.replace(gold_rows, &with)
}

/// The examples and targets of `rows`, in that order.
pub fn select_rows(set: &EncodedSet, rows: &[usize]) -> EncodedSet {
    EncodedSet {
        items: rows.iter().map(|&i| set.items[i].clone()).collect(),
        targets: match &set.targets {
            Targets::Classes(v) => Targets::Classes(rows.iter().map(|&i| v[i]).collect()),
            Targets::Scores(v) => Targets::Scores(rows.iter().map(|&i| v[i]).collect()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::batching::Encoded;

    /// A scratch file of this test process under the system temp folder.
    fn scratch(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kd-pseudo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hard_and_soft_labels_round_trip_through_jsonl() {
        let classes = names(&["neg", "pos", "neutral"]);
        let hard = PseudoLabels::Hard(vec![2, 0, 1, 1, 0]);
        let soft =
            PseudoLabels::from_logits(&[vec![0.3, -1.0, 2.5], vec![4.0, 4.0, -7.25], vec![0.0, 1e-3, 0.0]], true);
        for labels in [hard, soft] {
            let path = scratch("round_trip.jsonl", "");
            write_jsonl(&path, &labels, &classes).unwrap();
            assert_eq!(read_jsonl(&path, &classes, labels.len()).unwrap(), labels);
        }
    }

    #[test]
    fn files_may_give_names_ids_any_order_or_file_order() {
        let classes = names(&["negative", "positive"]);
        let text = "{\"index\": 2, \"label\": \"Positive \"}\n\n{\"index\": 0, \"label\": 1, \"why\": \"x\"}\n\
                    {\"index\": 1, \"label\": \"negative\"}\n";
        let path = scratch("indexed.jsonl", text);
        assert_eq!(read_jsonl(&path, &classes, 3).unwrap(), PseudoLabels::Hard(vec![1, 0, 1]));
        let path = scratch("ordered.jsonl", "{\"probs\": [0.25, 0.75]}\n{\"probs\": [1, 0]}\n");
        assert_eq!(read_jsonl(&path, &classes, 2).unwrap(), PseudoLabels::Soft(vec![vec![0.25, 0.75], vec![1.0, 0.0]]));
    }

    #[test]
    fn bad_lines_are_errors_naming_file_and_line() {
        let classes = names(&["a", "b"]);
        let ok = "{\"index\": 0, \"label\": \"a\"}\n";
        let cases = [
            ("not json", format!("{ok}\n{{\"index\": 1, \"label\": \"a\"\n"), 3, "invalid JSON"),
            ("unknown", format!("{ok}{{\"index\": 1, \"label\": \"c\"}}\n"), 2, "unknown label 'c'"),
            ("id range", format!("{ok}{{\"index\": 1, \"label\": 2}}\n"), 2, "label id 2"),
            ("duplicate", format!("{ok}{ok}"), 2, "already labelled on line 1"),
            ("out of range", format!("{ok}{{\"index\": 5, \"label\": \"b\"}}\n"), 2, "index 5 is out of range"),
            ("unindexed", format!("{ok}{{\"label\": \"b\"}}\n"), 2, "has no \"index\""),
            ("mixed", format!("{ok}{{\"index\": 1, \"probs\": [0.5, 0.5]}}\n"), 2, "cannot mix"),
            ("sum", format!("{ok}{{\"index\": 1, \"probs\": [0.5, 0.6]}}\n"), 2, "sums to"),
            ("width", format!("{ok}{{\"index\": 1, \"probs\": [1.0]}}\n"), 2, "has 1 entries"),
            ("negative", format!("{ok}{{\"index\": 1, \"probs\": [1.5, -0.5]}}\n"), 2, "probability -0.5"),
            ("both", format!("{ok}{{\"index\": 1, \"label\": \"a\", \"probs\": [1, 0]}}\n"), 2, "both"),
            ("neither", format!("{ok}{{\"index\": 1}}\n"), 2, "neither"),
            (
                "too many",
                "{\"label\": \"a\"}\n{\"label\": \"a\"}\n{\"label\": \"a\"}\n".into(),
                3,
                "more lines than rows",
            ),
        ];
        for (name, text, line, detail) in cases {
            let path = scratch(&format!("{}.jsonl", name.replace(' ', "_")), &text);
            let err = read_jsonl(&path, &classes, 2).unwrap_err();
            match &err {
                Error::BadRow { path: p, line: l, detail: d } => {
                    assert_eq!((p, *l), (&path, line), "{name}: {err}");
                    assert!(d.contains(detail), "{name}: {err}");
                }
                other => panic!("{name}: expected a bad row, got {other}"),
            }
            assert!(err.to_string().starts_with(&format!("{}:{line}: ", path.display())), "{err}");
        }
        let path = scratch("missing.jsonl", ok);
        let err = read_jsonl(&path, &classes, 3).unwrap_err().to_string();
        assert!(err.contains("2 of 3 rows have no label (the first is row 1)"), "{err}");
    }

    #[test]
    fn soft_labels_are_the_softmax_and_hard_their_argmax() {
        let logits = [vec![1.0, 2.0, 0.5], vec![-3.0, -4.0, -3.5]];
        let PseudoLabels::Soft(p) = PseudoLabels::from_logits(&logits, true) else { panic!("soft") };
        for (row, probs) in logits.iter().zip(&p) {
            let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
            for (&v, &q) in row.iter().zip(probs) {
                assert!(((v as f64).exp() / z - q as f64).abs() < 1e-6);
            }
        }
        assert_eq!(PseudoLabels::Soft(p).hard(), vec![1, 0]);
        assert_eq!(PseudoLabels::from_logits(&logits, false), PseudoLabels::Hard(vec![1, 0]));
    }

    #[test]
    fn teacher_labels_are_its_argmax_or_its_probabilities() {
        let teacher = kd_model::testing::tiny_bert(16, 8, 3, 1);
        let items = (0..7).map(|i| Encoded { ids: vec![1, 3 + i, 2 + i % 3], type_ids: vec![0; 3] }).collect();
        let set = EncodedSet { items, targets: Targets::Classes(vec![]) };
        let logits = predict(&teacher, &set.items, 3).unwrap();
        let hard = from_teacher(&teacher, &set, 3, false).unwrap();
        assert_eq!(hard, PseudoLabels::Hard(logits.iter().map(|r| argmax(r) as u32).collect()));
        let soft = from_teacher(&teacher, &set, 3, true).unwrap();
        assert_eq!(soft, PseudoLabels::from_logits(&logits, true));
        assert_eq!(soft.hard(), hard.hard());
        let PseudoLabels::Soft(p) = soft else { panic!("soft") };
        assert!(p.iter().all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5));
    }

    #[test]
    fn gold_subset_keeps_k_rows_and_partitions_the_set() {
        let items: Vec<Encoded> = (0..20).map(|i| Encoded { ids: vec![i], type_ids: vec![0] }).collect();
        let set = EncodedSet { items, targets: Targets::Classes((0..20).map(|i| i % 2).collect()) };
        let split = gold_subset(&set, 5, 7).unwrap();
        assert_eq!(split.gold_rows.len(), 5);
        let mut all: Vec<usize> = split.gold_rows.iter().chain(&split.unlabelled_rows).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        for (rows, part) in [(&split.gold_rows, &split.gold), (&split.unlabelled_rows, &split.unlabelled)] {
            assert!(rows.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(part.items.iter().map(|e| e.ids[0] as usize).collect::<Vec<_>>(), *rows);
            assert_eq!(part.targets, Targets::Classes(rows.iter().map(|&i| i as u32 % 2).collect()));
        }
        assert_eq!(gold_subset(&set, 5, 7).unwrap().gold_rows, split.gold_rows);
        assert_ne!(gold_subset(&set, 5, 8).unwrap().gold_rows, split.gold_rows);
        assert!(gold_subset(&set, 0, 7).is_err() && gold_subset(&set, 20, 7).is_err());

        // The teacher's labels, with the gold rows' own put back (hard, and one-hot when soft).
        let Targets::Classes(gold) = &set.targets else { unreachable!() };
        let mut hard = PseudoLabels::Hard(gold.iter().map(|&y| 1 - y.min(1)).collect());
        keep_gold(&mut hard, &set, &split.gold_rows, 2).unwrap();
        let kept = hard.hard();
        for i in 0..set.items.len() {
            let want = if split.gold_rows.contains(&i) { gold[i] } else { 1 - gold[i].min(1) };
            assert_eq!(kept[i], want, "row {i}");
        }
        let mut soft = PseudoLabels::Soft(vec![vec![0.5, 0.5]; set.items.len()]);
        keep_gold(&mut soft, &set, &split.gold_rows, 2).unwrap();
        let PseudoLabels::Soft(rows) = &soft else { unreachable!() };
        let g = split.gold_rows[0];
        assert_eq!(rows[g][gold[g] as usize], 1.0);
        assert!(split.unlabelled_rows.iter().all(|&i| rows[i] == vec![0.5, 0.5]));
    }
}
