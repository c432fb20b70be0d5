//! Tokenizing datasets (encode.rs) and loading a run's data as the command line names it (task.rs).
use std::path::PathBuf;

use kd_kernels::assets::asset;
use kd_methods::batching::Targets;
use kd_methods::data::{Column, Dataset, Example, GlueTask, Label, Split};
use kd_methods::encode::{encode_dataset, encode_texts, targets};
use kd_methods::metrics::MetricKind;
use kd_methods::task::{DataOptions, DataSource, FileSource, Labels};
use kd_model::testing::{minilm_dir, STUDENT};
use kd_model::Tokenizer;

fn tokenizer() -> Option<Tokenizer> {
    Some(Tokenizer::from_file(&minilm_dir()?.join(STUDENT).join("tokenizer.json")).unwrap())
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kd-methods-task").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dataset(examples: Vec<Example>) -> Dataset {
    Dataset { examples, label_names: vec![], source: PathBuf::from("mem.tsv"), skipped: vec![] }
}

fn ex(a: &str, b: Option<&str>, label: Label) -> Example {
    Example { text_a: a.into(), text_b: b.map(Into::into), label }
}

fn files(dir: &std::path::Path, train: &str, dev: Option<&str>) -> FileSource {
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    FileSource {
        train: Some(write("train.tsv", train)),
        dev: dev.map(|d| write("dev.tsv", d)),
        test: None,
        text: Column::parse("text"),
        text_pair: None,
        label: Column::parse("label"),
        has_header: true,
        regression: false,
    }
}

#[test]
fn encoded_rows_are_the_tokenizers_unpadded_and_truncated() {
    let Some(tok) = tokenizer() else { return };
    let long = "a long sentence that goes on and on well past the limit of tokens";
    let data = dataset(vec![
        ex("Hello world!", None, Label::Class(1)),
        ex("Is it?", Some("It is."), Label::Class(0)),
        ex(long, None, Label::Class(0)),
    ]);
    let items = encode_texts(&data, &tok, 8).unwrap();
    let inputs: Vec<(&str, Option<&str>)> =
        data.examples.iter().map(|e| (e.text_a.as_str(), e.text_b.as_deref())).collect();
    let padded = tok.encode_batch(&inputs, 8).unwrap();
    let (cls, sep) = (tok.token_to_id("[CLS]").unwrap(), tok.token_to_id("[SEP]").unwrap());
    for (row, item) in items.iter().enumerate() {
        let real = padded.mask[row * padded.seq..(row + 1) * padded.seq].iter().filter(|&&m| m == 1.0).count();
        assert_eq!(item.ids, padded.ids[row * padded.seq..][..real]);
        assert_eq!(item.type_ids.len(), item.ids.len());
        assert_eq!((item.ids[0], *item.ids.last().unwrap()), (cls, sep));
    }
    // Hello world ! between [CLS] and [SEP]; the pair's second segment has type 1.
    assert_eq!(items[0].ids.len(), 5);
    let second = items[1].type_ids.iter().position(|&t| t == 1).unwrap();
    assert!(items[1].type_ids[..second].iter().all(|&t| t == 0) && items[1].type_ids[second..].iter().all(|&t| t == 1));
    assert_eq!(items[1].ids[second - 1], sep);
    assert_eq!(items[2].ids.len(), 8);
}

#[test]
fn targets_are_classes_or_scores_and_need_labels() {
    let classes = dataset(vec![ex("a", None, Label::Class(2)), ex("b", None, Label::Class(0))]);
    assert_eq!(targets(&classes).unwrap(), Targets::Classes(vec![2, 0]));
    let scores = dataset(vec![ex("a", None, Label::Score(4.5)), ex("b", None, Label::Score(0.25))]);
    assert_eq!(targets(&scores).unwrap(), Targets::Scores(vec![4.5, 0.25]));
    let unlabelled = dataset(vec![ex("a", None, Label::Class(1)), ex("b", None, Label::None)]);
    let err = targets(&unlabelled).unwrap_err().to_string();
    assert_eq!(err, "mem.tsv: example 2 has no label; training and evaluation need labelled examples");
    let mixed = dataset(vec![ex("a", None, Label::Score(1.0)), ex("b", None, Label::Class(1))]);
    assert!(targets(&mixed).unwrap_err().to_string().contains("example 2 has label Class(1) among scores"));
    assert_eq!(targets(&dataset(vec![])).unwrap(), Targets::Classes(vec![]));

    let Some(tok) = tokenizer() else { return };
    let set = encode_dataset(&classes, &tok, 16).unwrap();
    assert_eq!((set.items.len(), set.targets), (2, Targets::Classes(vec![2, 0])));
}

#[test]
fn dev_labels_take_the_training_sets_ids() {
    let Some(tok) = tokenizer() else { return };
    let dir = scratch("dev_ids");
    let train = "text\tlabel\ngood\tpos\nbad\tneg\nfine\tpos\n";
    let source = DataSource::Files(files(&dir, train, Some("text\tlabel\nawful\tneg\ngreat\tpos\n")));
    let opts = DataOptions { source, max_len: 16, skip_bad_rows: false, allow_new_labels: false };
    assert_eq!(opts.source.metric(), MetricKind::Accuracy);
    assert_eq!(opts.source.name(Split::Dev), "dev");
    let data = opts.train_dev(&tok, None, 1).unwrap();
    assert_eq!(data.label_names, ["pos", "neg"]);
    assert_eq!(data.train.set.targets, Targets::Classes(vec![0, 1, 0]));
    assert_eq!(data.dev.unwrap().set.targets, Targets::Classes(vec![1, 0]));

    // A dev label the training set never had is a bad row of the dev file.
    let source = DataSource::Files(files(&dir, train, Some("text\tlabel\nmeh\tmixed\nok\tpos\n")));
    let opts = DataOptions { source, max_len: 16, skip_bad_rows: false, allow_new_labels: false };
    let err = opts.train_dev(&tok, None, 1).unwrap_err().to_string();
    assert!(err.contains("dev.tsv:2: unknown label 'mixed' (labels: pos, neg;"), "{err}");
    // ... which --skip-bad-rows drops and records.
    let opts = DataOptions { skip_bad_rows: true, ..opts };
    let data = opts.train_dev(&tok, None, 1).unwrap();
    assert_eq!(data.dev.unwrap().data.skipped.len(), 1);
    // A dev set left empty is an error naming its file, not a score of nothing.
    let source = DataSource::Files(files(&dir, train, Some("text\tlabel\nmeh\tmixed\n")));
    let err = DataOptions { source, ..opts }.train_dev(&tok, None, 1).unwrap_err().to_string();
    assert!(err.ends_with("dev.tsv: no labelled examples to evaluate on"), "{err}");

    // One class cannot be classified; no dev file means no dev set.
    let source = DataSource::Files(files(&dir, "text\tlabel\ngood\tpos\nfine\tpos\n", None));
    let opts = DataOptions { source, max_len: 16, skip_bad_rows: false, allow_new_labels: false };
    let err = opts.train_dev(&tok, None, 1).unwrap_err().to_string();
    assert!(err.contains("1 class(es) in the training data"), "{err}");
    let DataSource::Files(f) = &opts.source else { unreachable!() };
    let opts = DataOptions { source: DataSource::Files(FileSource { regression: true, ..f.clone() }), ..opts };
    assert!(opts.train_dev(&tok, None, 1).unwrap_err().to_string().contains("unparsable score 'pos'"));
}

/// An empty training set names its file; --max-train's draw keeps each example's row in the
/// whole file (what a --labels-file indexes).
#[test]
fn empty_training_sets_name_the_file_and_draws_keep_their_rows() {
    let Some(tok) = tokenizer() else { return };
    let dir = scratch("empty");
    let opts = |train: &str, skip| DataOptions {
        source: DataSource::Files(files(&dir, train, None)),
        max_len: 16,
        skip_bad_rows: skip,
        allow_new_labels: false,
    };
    let err = opts("text\tlabel\n", false).train_dev(&tok, None, 1).unwrap_err().to_string();
    assert!(err.ends_with("train.tsv: no training examples"), "{err}");
    let err = opts("text\tlabel\na\tb\tc\n", true).train_dev(&tok, None, 1).unwrap_err().to_string();
    assert!(err.ends_with("train.tsv: no training examples (1 unreadable row(s) skipped)"), "{err}");
    let rows: String = (0..20).map(|i| format!("text {i}\t{}\n", i % 2)).collect();
    let err = opts(&format!("text\tlabel\n{rows}"), false).train_dev(&tok, Some(0), 1).unwrap_err();
    assert!(err.to_string().contains("--max-train 0"), "{err}");

    let data = opts(&format!("text\tlabel\n{rows}"), false).train_dev(&tok, Some(5), 3).unwrap();
    assert_eq!((data.file_rows, data.train_rows.len()), (20, 5));
    for (e, &row) in data.train.data.examples.iter().zip(&data.train_rows) {
        assert_eq!(e.text_a, format!("text {row}"));
    }
    assert_ne!(data.train_rows, (0..5).collect::<Vec<_>>(), "seed 3 draws other rows than the first five");
}

#[test]
fn model_label_names_fix_the_ids_and_placeholders_mean_integers() {
    let Some(tok) = tokenizer() else { return };
    let dir = scratch("fixed");
    let opts = DataOptions {
        source: DataSource::Files(files(&dir, "text\tlabel\ngood\t1\nbad\t0\n", None)),
        max_len: 16,
        skip_bad_rows: false,
        allow_new_labels: false,
    };
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let split = opts.labelled(Split::Train, Labels::Fixed(&names(&["LABEL_0", "LABEL_1"])), &tok).unwrap();
    assert_eq!(split.set.targets, Targets::Classes(vec![1, 0]));
    let err = opts.labelled(Split::Train, Labels::Fixed(&names(&["neg", "pos"])), &tok).unwrap_err();
    assert!(err.to_string().contains("train.tsv:2: unknown label '1' (labels: neg, pos;"), "{err}");
    let err = opts.labelled(Split::Dev, Labels::Fixed(&names(&["neg", "pos"])), &tok).unwrap_err();
    assert_eq!(err.to_string(), "no dev file given");
    // Prediction reads no labels, so a file without the label column will do.
    let source = DataSource::Files(FileSource { test: Some(dir.join("test.tsv")), ..files(&dir, "", None) });
    std::fs::write(dir.join("test.tsv"), "text\nso so\n").unwrap();
    let opts = DataOptions { source, ..opts };
    let (data, items) = opts.unlabelled(Split::Test, &tok).unwrap();
    assert_eq!((data.examples[0].label.clone(), items.len()), (Label::None, 1));
}

#[test]
fn glue_train_cut_is_seeded_and_dev_is_whole() {
    let Some(tok) = tokenizer() else { return };
    let Some(dir) = asset("data/glue/SST-2") else { return };
    let opts = DataOptions {
        source: DataSource::Glue { task: GlueTask::Sst2, dir },
        max_len: 32,
        skip_bad_rows: false,
        allow_new_labels: false,
    };
    let a = opts.train_dev(&tok, Some(100), 7).unwrap();
    let b = opts.train_dev(&tok, Some(100), 7).unwrap();
    let c = opts.train_dev(&tok, Some(100), 8).unwrap();
    assert_eq!(a.label_names, ["0", "1"]);
    assert_eq!(a.train.set.items.len(), 100);
    assert_eq!(a.train.data.examples, b.train.data.examples);
    assert_ne!(a.train.data.examples, c.train.data.examples);
    let dev = a.dev.unwrap();
    assert_eq!(dev.set.items.len(), 872);
    assert!(dev.set.items.iter().all(|e| e.ids.len() <= 32));
    assert_eq!(opts.source.name(Split::Train), "sst2");
    // The test split has no labels to evaluate on.
    let err = opts.labelled(Split::Test, Labels::FromData, &tok).unwrap_err().to_string();
    assert!(err.contains("example 1 has no label"), "{err}");
}

#[test]
fn transfer_text_is_plain_lines_or_a_table_in_the_training_layout() {
    let dir = scratch("transfer-text");
    // Plain text: a line a text, a tab splits a pair, blank lines passed over, CRLF and BOM kept out.
    let plain = dir.join("extra.txt");
    std::fs::write(&plain, "\u{feff}a good film\r\n\n  \nfirst half\tsecond half\n").unwrap();
    let glue = DataSource::Glue { task: GlueTask::Sst2, dir: dir.clone() };
    let texts = glue.load_texts(&plain, false).unwrap();
    assert_eq!(
        texts.examples,
        vec![ex("a good film", None, Label::None), ex("first half", Some("second half"), Label::None)]
    );
    // A GLUE-layout TSV: the task's text column by header; the label column, if any, is not read
    // (so a label the task does not know is no error).
    let tsv = dir.join("extra.tsv");
    std::fs::write(&tsv, "sentence\tlabel\nfine acting\t7\nsecond row\t\n").unwrap();
    let texts = glue.load_texts(&tsv, false).unwrap();
    assert_eq!(texts.examples, vec![ex("fine acting", None, Label::None), ex("second row", None, Label::None)]);
    // Generic files: the training data's own text columns.
    let source = DataSource::Files(files(&dir, "q\tr\tlabel\nx\ty\t1\n", None));
    let jsonl = dir.join("extra.jsonl");
    std::fs::write(&jsonl, "{\"q\": \"one\", \"r\": \"two\"}\n").unwrap();
    let mut f = files(&dir, "q\tr\tlabel\nx\ty\t1\n", None);
    (f.text, f.text_pair) = (Column::Name("q".into()), Some(Column::Name("r".into())));
    let texts = DataSource::Files(f).load_texts(&jsonl, false).unwrap();
    assert_eq!(texts.examples, vec![ex("one", Some("two"), Label::None)]);
    // A table without the text column, an empty file and invalid UTF-8 are errors naming the file.
    let err = source.load_texts(&jsonl, false).unwrap_err().to_string();
    assert!(err.contains("extra.jsonl"), "{err}");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n \n").unwrap();
    let err = glue.load_texts(&empty, false).unwrap_err().to_string();
    assert!(err.contains("empty.txt") && err.contains("no text"), "{err}");
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, b"ok\n\xff\xfe\n").unwrap();
    let err = glue.load_texts(&bad, false).unwrap_err().to_string();
    assert!(err.contains("bad.txt") && err.contains('2'), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
