use std::path::PathBuf;

use kd_kernels::assets::asset;
use kd_methods::data::{
    load_glue, load_table, Column, Dataset, Example, Format, GlueTask, Label, LabelKind, Split, TableSpec,
};
use kd_methods::Error;

/// Writes `contents` to a fresh file under cargo's per-target scratch folder.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kd-methods-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn spec(format: Format, text: &str, pair: Option<&str>, label: Option<&str>, kind: LabelKind) -> TableSpec {
    TableSpec {
        format,
        has_header: true,
        text: Column::parse(text),
        text_pair: pair.map(Column::parse),
        label: label.map(Column::parse),
        label_kind: kind,
        skip_bad_rows: false,
        allow_new_labels: false,
    }
}

const CLASSES: LabelKind = LabelKind::Classes { names: None };

fn labels(d: &Dataset) -> Vec<Label> {
    d.examples.iter().map(|e| e.label.clone()).collect()
}

fn class_counts(d: &Dataset) -> Vec<usize> {
    let mut counts = vec![0; d.label_names.len()];
    for e in &d.examples {
        match e.label {
            Label::Class(c) => counts[c] += 1,
            ref other => panic!("unexpected label {other:?}"),
        }
    }
    counts
}

fn glue(task: GlueTask, split: Split) -> Option<Dataset> {
    let dir = asset(&format!("data/glue/{}", task.dir_name()))?;
    Some(load_glue(task, &dir, split, false).unwrap())
}

#[test]
fn glue_sst2_rows_first_row_and_labels() {
    let Some(train) = glue(GlueTask::Sst2, Split::Train) else { return };
    assert_eq!(train.len(), 67_349);
    assert_eq!(train.label_names, ["0", "1"]);
    assert_eq!(
        train.examples[0],
        Example { text_a: "hide new secretions from the parental units ".into(), text_b: None, label: Label::Class(0) }
    );
    assert_eq!(class_counts(&train), [29_780, 37_569]);
    assert!(train.skipped.is_empty());
    let dev = glue(GlueTask::Sst2, Split::Dev).unwrap();
    assert_eq!(class_counts(&dev), [428, 444]);
    let test = glue(GlueTask::Sst2, Split::Test).unwrap();
    assert_eq!(test.len(), 1_821);
    assert_eq!(test.examples[0].text_a, "uneasy mishmash of styles and genres .");
    assert!(test.examples.iter().all(|e| e.label == Label::None));
}

#[test]
fn glue_cola_has_no_header_in_train_and_dev() {
    let Some(train) = glue(GlueTask::Cola, Split::Train) else { return };
    assert_eq!(train.len(), 8_551);
    assert_eq!(train.examples[0].text_a, "Our friends won't buy this analysis, let alone the next one we propose.");
    assert_eq!(train.examples[0].label, Label::Class(1));
    assert_eq!(class_counts(&train), [2_528, 6_023]);
    let dev = glue(GlueTask::Cola, Split::Dev).unwrap();
    assert_eq!(class_counts(&dev), [322, 721]);
    let test = glue(GlueTask::Cola, Split::Test).unwrap();
    assert_eq!(test.len(), 1_063);
    assert_eq!(test.examples[0].text_a, "Bill whistled past the house.");
}

#[test]
fn glue_mrpc_strips_the_bom_and_keeps_quotes_literal() {
    let Some(train) = glue(GlueTask::Mrpc, Split::Train) else { return };
    assert_eq!(train.len(), 3_668);
    let first = &train.examples[0];
    assert_eq!(
        first.text_a,
        r#"Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence."#
    );
    assert_eq!(
        first.text_b.as_deref(),
        Some(
            r#"Referring to him as only "the witness", Amrozi accused his brother of deliberately distorting his evidence."#
        )
    );
    assert_eq!(first.label, Label::Class(1));
    assert_eq!(class_counts(&train), [1_194, 2_474]);
    let dev = glue(GlueTask::Mrpc, Split::Dev).unwrap();
    assert_eq!(dev.len(), 408);
    // An opening quote with no closing one: a CSV reader would run on into the next rows.
    assert!(dev.examples[0].text_b.as_deref().unwrap().starts_with(r#""The foodservice pie business"#));
    assert_eq!(class_counts(&dev), [129, 279]);
    assert_eq!(glue(GlueTask::Mrpc, Split::Test).unwrap().len(), 1_725);
}

#[test]
fn glue_rte_string_labels() {
    let Some(train) = glue(GlueTask::Rte, Split::Train) else { return };
    assert_eq!(train.len(), 2_490);
    assert_eq!(train.label_names, ["entailment", "not_entailment"]);
    assert_eq!(train.examples[0].text_a, "No Weapons of Mass Destruction Found in Iraq Yet.");
    assert_eq!(train.examples[0].text_b.as_deref(), Some("Weapons of Mass Destruction Found in Iraq."));
    assert_eq!(train.examples[0].label, Label::Class(1));
    assert_eq!(class_counts(&train), [1_249, 1_241]);
    assert_eq!(class_counts(&glue(GlueTask::Rte, Split::Dev).unwrap()), [146, 131]);
    assert_eq!(glue(GlueTask::Rte, Split::Test).unwrap().len(), 3_000);
}

#[test]
fn glue_stsb_scores() {
    let Some(train) = glue(GlueTask::Stsb, Split::Train) else { return };
    assert_eq!(train.len(), 5_749);
    assert!(train.label_names.is_empty());
    assert_eq!(
        train.examples[0],
        Example {
            text_a: "A plane is taking off.".into(),
            text_b: Some("An air plane is taking off.".into()),
            label: Label::Score(5.0)
        }
    );
    let scores: Vec<f32> = labels(&train).iter().map(|l| if let Label::Score(s) = l { *s } else { -1.0 }).collect();
    assert!(scores.iter().all(|s| (0.0..=5.0).contains(s)));
    let mean = scores.iter().sum::<f32>() / scores.len() as f32;
    assert!((1.5..3.5).contains(&mean), "mean score {mean}");
    assert_eq!(glue(GlueTask::Stsb, Split::Dev).unwrap().len(), 1_500);
    assert_eq!(glue(GlueTask::Stsb, Split::Test).unwrap().len(), 1_379);
}

/// The four tasks with no copy on this machine, on one-row files with their official headers.
#[test]
fn glue_layouts_of_qqp_mnli_qnli_wnli() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kd-methods-glue");
    let write = |task: GlueTask, split: Split, text: &str| {
        std::fs::create_dir_all(dir.join(task.dir_name())).unwrap();
        std::fs::write(dir.join(task.dir_name()).join(task.file_name(split)), text).unwrap();
        load_glue(task, &dir.join(task.dir_name()), split, false)
    };
    let ex = |a: &str, b: &str, label| Example { text_a: a.into(), text_b: Some(b.into()), label };
    let qqp_file = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t1\t2\tq \"a\"?\tq b?\t1\n";
    let qqp = write(GlueTask::Qqp, Split::Train, qqp_file).unwrap();
    assert_eq!(qqp.examples, [ex("q \"a\"?", "q b?", Label::Class(1))]);
    let mnli_header = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t\
                       sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t\
                       label5\tgold_label\n";
    let mnli_row = "0\t1\t1e\tfic\t(p)\t(h)\t(P)\t(H)\tThe premise.\tThe hypothesis.\t\
                    neutral\tneutral\tneutral\tneutral\tneutral\tneutral\n";
    let mnli = write(GlueTask::Mnli, Split::Dev, &format!("{mnli_header}{mnli_row}")).unwrap();
    assert_eq!(mnli.examples, [ex("The premise.", "The hypothesis.", Label::Class(2))]);
    assert_eq!(mnli.source.file_name().unwrap(), "dev_matched.tsv");
    let qnli_header = "index\tquestion\tsentence\tlabel\n";
    let qnli = write(GlueTask::Qnli, Split::Train, &format!("{qnli_header}0\tWho?\tHim.\tnot_entailment\n")).unwrap();
    assert_eq!(qnli.examples, [ex("Who?", "Him.", Label::Class(1))]);
    let wnli = write(GlueTask::Wnli, Split::Test, "index\tsentence1\tsentence2\n0\tA.\tB.\n").unwrap();
    assert_eq!(wnli.examples, [ex("A.", "B.", Label::None)]);
    assert_eq!(wnli.label_names, ["0", "1"]);
    let err = write(GlueTask::Qnli, Split::Dev, &format!("{qnli_header}0\tWho?\tHim.\tmaybe\n")).unwrap_err();
    assert!(err.to_string().contains("dev.tsv:2: unknown label 'maybe' (labels: entailment, not_entailment;"), "{err}");
}

#[test]
fn glue_task_names() {
    assert_eq!("SST-2".parse::<GlueTask>().unwrap(), GlueTask::Sst2);
    assert_eq!("sts_b".parse::<GlueTask>().unwrap(), GlueTask::Stsb);
    for task in GlueTask::ALL {
        assert_eq!(task.name().parse::<GlueTask>().unwrap(), task);
        assert_eq!(task.dir_name().parse::<GlueTask>().unwrap(), task);
    }
    let err = "imdb".parse::<GlueTask>().unwrap_err().to_string();
    assert!(err.contains("unknown GLUE task 'imdb'") && err.contains("wnli"), "{err}");
}

#[test]
fn tsv_with_string_labels_in_first_seen_order() {
    let path = temp_file("first_seen.tsv", "text\tlabel\nsay \"hi\tpos\nbad\tneg\n\ngood\tpos\n");
    let d = load_table(&path, &spec(Format::Tsv, "text", None, Some("label"), CLASSES)).unwrap();
    assert_eq!(d.label_names, ["pos", "neg"]);
    assert_eq!(labels(&d), [Label::Class(0), Label::Class(1), Label::Class(0)]);
    assert_eq!(d.examples[0].text_a, "say \"hi");
    assert_eq!(d.source, path);
}

#[test]
fn given_label_list_fixes_ids_and_rejects_unknown_labels() {
    let path = temp_file("fixed.tsv", "text\tlabel\na\tpos\nb\tneg\nc\tmaybe\n");
    let names = LabelKind::Classes { names: Some(vec!["neg".into(), "pos".into()]) };
    let mut s = spec(Format::Tsv, "text", None, Some("label"), names);
    let err = load_table(&path, &s).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:4: unknown label 'maybe' (labels: neg, pos;", path.display())), "{err}");
    s.skip_bad_rows = true;
    let d = load_table(&path, &s).unwrap();
    assert_eq!(labels(&d), [Label::Class(1), Label::Class(0)]);
    assert_eq!(d.skipped.len(), 1);
    assert_eq!(d.skipped[0].line, 4);
}

/// Each task has a closed label set: a label outside it is a bad row naming file and line,
/// unless `allow_new_labels`. A training file's own set is its pattern: integer ids from 0 or
/// names, each spelt one way.
#[test]
fn labels_outside_the_tasks_set_are_bad_rows_unless_allowed() {
    let cases = [
        // A stray id past a class that never appears.
        ("gap.tsv", "text\tlabel\na\t0\nb\t1\nc\t7\nd\t1\n", 4, "label 7 leaves class 2 without an example"),
        // A name among integer ids, and a float spelling of one.
        ("name.tsv", "text\tlabel\na\t0\nb\t1\nc\tpositive\nd\t1\n", 4, "label 'positive' is not a class id"),
        ("float.tsv", "text\tlabel\na\t0\nb\t1\nc\t1.0\nd\t0\n", 4, "label '1.0' is not a class id"),
        // An integer among names, and a name spelt two ways.
        ("int.tsv", "text\tlabel\na\tpos\nb\tneg\nc\t1\nd\tpos\n", 4, "label '1' is an integer among"),
        (
            "case.tsv",
            "text\tlabel\na\tpos\nb\tneg\nc\tPos\n",
            4,
            "label 'Pos' differs from the label 'pos' only in case",
        ),
    ];
    for (name, text, line, reason) in cases {
        let path = temp_file(name, text);
        let mut s = spec(Format::Tsv, "text", None, Some("label"), CLASSES);
        let err = load_table(&path, &s).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:{line}: {reason}", path.display())), "{err}");
        assert!(err.contains("--allow-new-labels"), "{err}");
        // --skip-bad-rows drops the row, leaving the file's own set.
        s.skip_bad_rows = true;
        let d = load_table(&path, &s).unwrap();
        assert_eq!((d.skipped.len(), d.skipped[0].line, d.label_names.len()), (1, line, 2), "{name}");
        // --allow-new-labels makes it a class.
        s.skip_bad_rows = false;
        s.allow_new_labels = true;
        let d = load_table(&path, &s).unwrap();
        assert!(d.skipped.is_empty() && d.label_names.len() > 2, "{name}: {:?}", d.label_names);
    }
    // The allowed gap: ids 0..=7, six classes without an example.
    let d = load_table(
        &temp_file("gap.tsv", cases[0].1),
        &TableSpec { allow_new_labels: true, ..spec(Format::Tsv, "text", None, Some("label"), CLASSES) },
    )
    .unwrap();
    assert_eq!(d.label_names.len(), 8);

    // A given set (a model's classes): outside it is a bad row, or with allow_new_labels a new class.
    let path = temp_file("given.tsv", "text\tlabel\na\t1\nb\t7\n");
    let names = LabelKind::Classes { names: Some(vec!["0".into(), "1".into()]) };
    let mut s = spec(Format::Tsv, "text", None, Some("label"), names);
    let err = load_table(&path, &s).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:3: unknown label '7' (labels: 0, 1;", path.display())), "{err}");
    s.allow_new_labels = true;
    let d = load_table(&path, &s).unwrap();
    assert_eq!(
        (labels(&d), d.label_names),
        (vec![Label::Class(1), Label::Class(2)], vec!["0".into(), "1".into(), "7".to_string()])
    );

    // Huge ids are refused even when allowed (they would make as many classes).
    let path = temp_file("huge.tsv", "text\tlabel\na\t0\nb\t99999999999\n");
    let err = load_table(&path, &s_open(&path)).unwrap_err().to_string();
    assert!(err.contains(":3: label 99999999999: class ids go up to"), "{err}");
}

fn s_open(_: &std::path::Path) -> TableSpec {
    TableSpec { allow_new_labels: true, ..spec(Format::Tsv, "text", None, Some("label"), CLASSES) }
}

#[test]
fn integer_labels_are_their_own_ids() {
    let path = temp_file("ints.tsv", "1\tx\n0\ty\n2\tz\n");
    let s = TableSpec { has_header: false, ..spec(Format::Tsv, "1", None, Some("0"), CLASSES) };
    let d = load_table(&path, &s).unwrap();
    assert_eq!(labels(&d), [Label::Class(1), Label::Class(0), Label::Class(2)]);
    assert_eq!(d.label_names, ["0", "1", "2"]);
    assert_eq!(d.examples[2].text_a, "z");
}

#[test]
fn malformed_line_is_an_error_naming_file_and_line_or_skipped_and_counted() {
    let path = temp_file("ragged.tsv", "a\tb\tlabel\nx\ty\t1\nonly one column\nx2\ty2\t0\nx3\ty3\t1\textra\n");
    let mut s = spec(Format::Tsv, "a", Some("b"), Some("label"), CLASSES);
    let err = load_table(&path, &s).unwrap_err();
    assert!(matches!(err, Error::BadRow { line: 3, .. }));
    assert_eq!(err.to_string(), format!("{}:3: 1 columns, expected 3", path.display()));
    s.skip_bad_rows = true;
    let d = load_table(&path, &s).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d.examples[1].text_b.as_deref(), Some("y2"));
    assert_eq!(d.skipped.iter().map(|r| r.line).collect::<Vec<_>>(), [3, 5]);
    assert!(d.skipped[1].reason.contains("4 columns"), "{:?}", d.skipped);
}

#[test]
fn csv_quoting_bom_and_crlf() {
    let path = temp_file(
        "quoted.csv",
        "\u{feff}id,text,score\r\n1,\"hello, \"\"world\"\"\",2.5\r\n2,\"two\nlines\",x\r\n3,plain,0\r\n",
    );
    let mut s = spec(Format::Csv, "text", None, Some("score"), LabelKind::Regression);
    let err = load_table(&path, &s).unwrap_err().to_string();
    assert_eq!(err, format!("{}:3: unparsable score 'x'", path.display()));
    s.skip_bad_rows = true;
    let d = load_table(&path, &s).unwrap();
    assert_eq!(d.examples[0].text_a, "hello, \"world\"");
    assert_eq!(labels(&d), [Label::Score(2.5), Label::Score(0.0)]);
    assert_eq!(d.skipped[0].line, 3);
    // Columns by position work with a header too.
    let by_index = load_table(&path, &TableSpec { text: Column::Index(1), ..s }).unwrap();
    assert_eq!(by_index.examples, d.examples);
}

#[test]
fn jsonl_rows_with_pairs_numbers_and_bad_lines() {
    let path = temp_file(
        "rows.jsonl",
        "{\"q\": \"a?\", \"p\": \"b\", \"y\": 1}\n\n{\"q\": \"c?\", \"p\": \"d\", \"y\": 0}\n{\"q\": 3, \"p\": \"e\", \"y\": 0}\nnot json\n",
    );
    let mut s = spec(Format::Jsonl, "q", Some("p"), Some("y"), CLASSES);
    let err = load_table(&path, &s).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:4: key 'q' is 3", path.display())), "{err}");
    s.skip_bad_rows = true;
    let d = load_table(&path, &s).unwrap();
    assert_eq!(labels(&d), [Label::Class(1), Label::Class(0)]);
    assert_eq!(d.examples[1].text_b.as_deref(), Some("d"));
    assert_eq!(d.skipped.iter().map(|r| r.line).collect::<Vec<_>>(), [4, 5]);
    let unlabelled = load_table(&path, &TableSpec { label: None, ..s.clone() }).unwrap();
    assert!(labels(&unlabelled).iter().all(|l| *l == Label::None));
    let err = load_table(&path, &TableSpec { text: Column::Index(0), ..s }).unwrap_err().to_string();
    assert!(err.contains("keys, not positions"), "{err}");
}

#[test]
fn missing_columns_and_files_are_clear_errors() {
    let path = temp_file("cols.tsv", "sentence\tlabel\nx\t0\n");
    let err = load_table(&path, &spec(Format::Tsv, "text", None, Some("label"), CLASSES)).unwrap_err().to_string();
    assert!(err.contains("no column named 'text' in the header (sentence, label)"), "{err}");
    let err = load_table(&path, &spec(Format::Tsv, "5", None, None, CLASSES)).unwrap_err().to_string();
    assert!(err.contains("column 5 out of range"), "{err}");
    let headerless = TableSpec { has_header: false, ..spec(Format::Tsv, "sentence", None, None, CLASSES) };
    assert!(load_table(&path, &headerless).unwrap_err().to_string().contains("without a header"));
    let missing = path.with_file_name("does-not-exist.tsv");
    let err = load_table(&missing, &spec(Format::Tsv, "0", None, None, CLASSES)).unwrap_err().to_string();
    assert!(err.starts_with(&missing.display().to_string()), "{err}");
    assert_eq!(Format::from_path(&path).unwrap(), Format::Tsv);
    assert!(Format::from_path(&path.with_extension("xlsx")).is_err());
}

#[test]
fn subset_is_seeded_and_keeps_file_order() {
    let rows: String = (0..50).map(|i| format!("t{i}\t{}\n", i % 2)).collect();
    let path = temp_file("fifty.tsv", &format!("text\tlabel\n{rows}"));
    let d = load_table(&path, &spec(Format::Tsv, "text", None, Some("label"), CLASSES)).unwrap();
    let texts = |d: &Dataset| d.examples.iter().map(|e| e.text_a[1..].parse::<usize>().unwrap()).collect::<Vec<_>>();
    let a = d.subset(10, 1);
    assert_eq!(a.len(), 10);
    assert_eq!(texts(&a), texts(&d.subset(10, 1)));
    assert_ne!(texts(&a), texts(&d.subset(10, 2)));
    assert!(texts(&a).windows(2).all(|w| w[0] < w[1]));
    assert_ne!(texts(&a), (0..10).collect::<Vec<_>>(), "a subset is not the first rows");
    assert_eq!(a.label_names, d.label_names);
    assert_eq!(d.subset(500, 3).examples, d.examples);
}
