//! Parquet input: files written here with the `parquet` crate's own writer (snappy, several row
//! groups), read back through `load_table` as `--train/--dev/--test` files are.
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use kd_kernels::assets::asset;
use kd_methods::data::{load_glue, load_table, Column, Example, Format, GlueTask, Label, LabelKind, Split, TableSpec};
use parquet::basic::Compression;
use parquet::column::writer::ColumnWriterImpl;
use parquet::data_type::{ByteArray, ByteArrayType, DataType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// One nullable column's cells; `None` is a null.
enum Cells {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
}

fn text(cells: &[Option<&str>]) -> Cells {
    Cells::Text(cells.iter().map(|c| c.map(str::to_string)).collect())
}

impl Cells {
    fn len(&self) -> usize {
        match self {
            Cells::Text(v) => v.len(),
            Cells::Int(v) => v.len(),
            Cells::Float(v) => v.len(),
        }
    }
}

fn write_cells<T: DataType, X>(w: &mut ColumnWriterImpl<T>, cells: &[Option<X>], value: impl Fn(&X) -> T::T) {
    let values: Vec<T::T> = cells.iter().flatten().map(value).collect();
    let defined: Vec<i16> = cells.iter().map(|c| i16::from(c.is_some())).collect();
    w.write_batch(&values, Some(&defined), None).unwrap();
}

/// Writes `columns` to a fresh snappy-compressed parquet file, `group` rows per row group.
fn write_parquet(name: &str, columns: &[(&str, Cells)], group: usize) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kd-methods-parquet");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let fields: String = columns
        .iter()
        .map(|(n, c)| match c {
            Cells::Text(_) => format!("OPTIONAL BYTE_ARRAY {n} (UTF8); "),
            Cells::Int(_) => format!("OPTIONAL INT64 {n}; "),
            Cells::Float(_) => format!("OPTIONAL DOUBLE {n}; "),
        })
        .collect();
    let schema = Arc::new(parse_message_type(&format!("message schema {{ {fields}}}")).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut writer = SerializedFileWriter::new(File::create(&path).unwrap(), schema, props).unwrap();
    let rows = columns[0].1.len();
    for start in (0..rows).step_by(group) {
        let range = start..(start + group).min(rows);
        let mut row_group = writer.next_row_group().unwrap();
        for (_, cells) in columns {
            let mut column = row_group.next_column().unwrap().unwrap();
            match cells {
                Cells::Text(v) => {
                    write_cells(column.typed::<ByteArrayType>(), &v[range.clone()], |s| ByteArray::from(s.as_str()))
                }
                Cells::Int(v) => write_cells(column.typed::<Int64Type>(), &v[range.clone()], |&x| x),
                Cells::Float(v) => write_cells(column.typed::<DoubleType>(), &v[range.clone()], |&x| x),
            }
            column.close().unwrap();
        }
        row_group.close().unwrap();
    }
    writer.close().unwrap();
    path
}

fn spec(text: &str, pair: Option<&str>, label: Option<&str>, label_kind: LabelKind) -> TableSpec {
    TableSpec {
        format: Format::Parquet,
        has_header: true,
        text: Column::parse(text),
        text_pair: pair.map(Column::parse),
        label: label.map(Column::parse),
        label_kind,
        skip_bad_rows: false,
        allow_new_labels: false,
    }
}

const CLASSES: LabelKind = LabelKind::Classes { names: None };

fn example(a: &str, b: Option<&str>, label: Label) -> Example {
    Example { text_a: a.into(), text_b: b.map(str::to_string), label }
}

#[test]
fn parquet_extension_is_recognised() {
    assert_eq!(Format::from_path(&PathBuf::from("train.parquet")).unwrap(), Format::Parquet);
    assert_eq!(Format::from_path(&PathBuf::from("TRAIN.PQ")).unwrap(), Format::Parquet);
}

#[test]
fn parquet_text_pairs_with_string_labels_by_name() {
    let path = write_parquet(
        "pairs.parquet",
        &[
            ("id", Cells::Int(vec![Some(7), Some(8), Some(9)])),
            ("premise", text(&[Some("A man sleeps."), Some("Dogs bark."), Some("It rains.")])),
            ("hypothesis", text(&[Some("Someone rests."), Some("Cats bark."), Some("It is wet.")])),
            ("label", text(&[Some("entailment"), Some("contradiction"), Some("entailment")])),
        ],
        2,
    );
    let d = load_table(&path, &spec("premise", Some("hypothesis"), Some("label"), CLASSES)).unwrap();
    assert_eq!(d.label_names, ["entailment", "contradiction"]);
    assert_eq!(
        d.examples,
        [
            example("A man sleeps.", Some("Someone rests."), Label::Class(0)),
            example("Dogs bark.", Some("Cats bark."), Label::Class(1)),
            example("It rains.", Some("It is wet."), Label::Class(0)),
        ]
    );
}

#[test]
fn parquet_integer_labels_by_position_keep_their_ids() {
    let path = write_parquet(
        "ints.parquet",
        &[
            ("label", Cells::Int(vec![Some(2), Some(0), Some(1)])),
            ("sentence", text(&[Some("good"), Some("bad"), Some("fine")])),
        ],
        3,
    );
    let d = load_table(&path, &spec("1", None, Some("0"), CLASSES)).unwrap();
    assert_eq!(d.label_names, ["0", "1", "2"]);
    let labels: Vec<Label> = d.examples.iter().map(|e| e.label.clone()).collect();
    assert_eq!(labels, [Label::Class(2), Label::Class(0), Label::Class(1)]);
    assert_eq!(d.examples[1].text_a, "bad");
    // Fixed names (a teacher's) map integer cells through their text, as in CSV.
    let fixed = LabelKind::Classes { names: Some(vec!["0".into(), "1".into(), "2".into()]) };
    assert_eq!(load_table(&path, &spec("sentence", None, Some("label"), fixed)).unwrap().examples, d.examples);
}

#[test]
fn parquet_float_scores_for_regression() {
    let path = write_parquet(
        "scores.parquet",
        &[
            ("s1", text(&[Some("a"), Some("b")])),
            ("s2", text(&[Some("c"), Some("d")])),
            ("score", Cells::Float(vec![Some(4.25), Some(0.0)])),
        ],
        2,
    );
    let d = load_table(&path, &spec("s1", Some("s2"), Some("score"), LabelKind::Regression)).unwrap();
    assert_eq!(d.examples[0], example("a", Some("c"), Label::Score(4.25)));
    assert_eq!(d.examples[1].label, Label::Score(0.0));
}

#[test]
fn parquet_null_cell_is_a_bad_row_named_by_file_and_row() {
    // The null sits in the second row group: its row number counts the first group's rows.
    let path = write_parquet(
        "nulls.parquet",
        &[
            ("text", text(&[Some("one"), Some("two"), None, Some("four")])),
            ("label", Cells::Int(vec![Some(0), Some(1), Some(1), None])),
        ],
        2,
    );
    let mut s = spec("text", None, Some("label"), CLASSES);
    let err = load_table(&path, &s).unwrap_err().to_string();
    assert_eq!(err, format!("{}:3: null in column 'text'", path.display()));
    s.skip_bad_rows = true;
    let d = load_table(&path, &s).unwrap();
    assert_eq!(d.examples, [example("one", None, Label::Class(0)), example("two", None, Label::Class(1))]);
    let skipped: Vec<(usize, &str)> = d.skipped.iter().map(|r| (r.line, r.reason.as_str())).collect();
    assert_eq!(skipped, [(3, "null in column 'text'"), (4, "null in column 'label'")]);
}

#[test]
fn parquet_wrong_column_or_type_names_the_file() {
    let path =
        write_parquet("columns.parquet", &[("text", text(&[Some("x")])), ("label", Cells::Float(vec![Some(1.5)]))], 1);
    let err = load_table(&path, &spec("sentence", None, Some("label"), CLASSES)).unwrap_err().to_string();
    assert_eq!(err, format!("{}: no column named 'sentence' (columns: text, label)", path.display()));
    let err = load_table(&path, &spec("text", None, Some("5"), CLASSES)).unwrap_err().to_string();
    assert_eq!(err, format!("{}: column 5 out of range: rows have 2", path.display()));
    let err = load_table(&path, &spec("label", None, None, CLASSES)).unwrap_err().to_string();
    assert_eq!(err, format!("{}:1: column 'label' holds 1.5, expected a string", path.display()));
}

#[test]
fn parquet_not_a_parquet_file_is_a_file_error() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("not-parquet.parquet");
    std::fs::write(&path, "sentence\tlabel\nhello\t1\n").unwrap();
    let err = load_table(&path, &spec("sentence", None, Some("label"), CLASSES)).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: unreadable parquet:", path.display())), "{err}");
}

#[test]
fn parquet_slice_of_glue_sst2_reads_as_the_tsv() {
    let Some(dir) = asset("data/glue/SST-2") else { return };
    let tsv = load_glue(GlueTask::Sst2, &dir, Split::Train, false).unwrap();
    let rows = &tsv.examples[..2000];
    let sentences: Vec<Option<String>> = rows.iter().map(|e| Some(e.text_a.clone())).collect();
    let labels: Vec<Option<i64>> = rows
        .iter()
        .map(|e| match e.label {
            Label::Class(c) => Some(tsv.label_names[c].parse().unwrap()),
            ref other => panic!("SST-2 train row without a class: {other:?}"),
        })
        .collect();
    let path =
        write_parquet("sst2.parquet", &[("sentence", Cells::Text(sentences)), ("label", Cells::Int(labels))], 700);
    let spec = TableSpec { format: Format::Parquet, ..GlueTask::Sst2.table_spec(Split::Train, false) };
    let parquet = load_table(&path, &spec).unwrap();
    assert_eq!(parquet.label_names, tsv.label_names);
    assert_eq!(parquet.examples, rows);
    assert!(parquet.skipped.is_empty());
}
