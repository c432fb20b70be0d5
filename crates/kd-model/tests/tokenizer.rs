use std::path::PathBuf;

use kd_model::testing::{minilm_dir, TEACHER};
use kd_model::Tokenizer;

fn tokenizer_path() -> Option<PathBuf> {
    Some(minilm_dir()?.join(TEACHER).join("tokenizer.json"))
}

/// Parses the Python literal `[('text', None), ('text', 'pair'), ...]` that the golden file
/// stores its inputs as (single- or double-quoted strings with backslash escapes).
fn parse_inputs(literal: &str) -> Vec<(String, Option<String>)> {
    let mut chars = literal.chars().peekable();
    let mut items = Vec::new();
    let mut current: Vec<Option<String>> = Vec::new();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let mut s = String::new();
                loop {
                    match chars.next().expect("unterminated string") {
                        '\\' => s.push(chars.next().expect("dangling escape")),
                        q if q == c => break,
                        other => s.push(other),
                    }
                }
                current.push(Some(s));
            }
            'N' => {
                let rest: String = chars.by_ref().take(3).collect();
                assert_eq!(rest, "one", "unexpected token in {literal}");
                current.push(None);
            }
            ')' => {
                let [Some(text), pair] = <[Option<String>; 2]>::try_from(std::mem::take(&mut current)).unwrap() else {
                    panic!("bad item in {literal}")
                };
                items.push((text, pair));
            }
            _ => {}
        }
    }
    items
}

#[test]
fn matches_the_golden_hf_encoding() {
    let Some(golden) = kd_kernels::assets::asset("golden/all-MiniLM-L6-v2.forward.safetensors") else { return };
    let Some(path) = tokenizer_path() else { return };
    let bytes = std::fs::read(&golden).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let inputs = parse_inputs(&metadata.metadata().as_ref().unwrap()["sentences"]);
    assert_eq!(inputs.len(), 5);
    assert_eq!(inputs[4].1.as_deref(), Some("A cat is sitting on a mat."));
    let refs: Vec<(&str, Option<&str>)> = inputs.iter().map(|(t, p)| (t.as_str(), p.as_deref())).collect();

    let batch = Tokenizer::from_file(&path).unwrap().encode_batch(&refs, 128).unwrap();
    let want = kd_kernels::io::read_safetensors(&golden).unwrap();
    let as_u32 = |name: &str| want[name].data.iter().map(|&x| x as u32).collect::<Vec<_>>();
    assert_eq!((batch.batch, batch.seq), (5, 18));
    assert_eq!(want["input.ids"].shape, [5, 18]);
    assert_eq!(batch.ids, as_u32("input.ids"));
    assert_eq!(batch.type_ids, as_u32("input.token_type_ids"));
    assert_eq!(batch.mask, want["input.attention_mask"].data);
}

#[test]
fn truncates_longest_first_and_pads_to_the_longest_row() {
    let Some(path) = tokenizer_path() else { return };
    let tok = Tokenizer::from_file(&path).unwrap();
    let (cls, sep, pad) = (tok.token_to_id("[CLS]").unwrap(), tok.token_to_id("[SEP]").unwrap(), tok.pad_id());
    assert_eq!((cls, sep, pad), (101, 102, 0));
    assert_eq!(tok.vocab_size(), 30522);
    assert_eq!(tok.id_to_token(101).as_deref(), Some("[CLS]"));
    assert_eq!(tok.special_ids(), [0, 100, 101, 102, 103]);

    let long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen";
    let inputs = [(long, Some("red green blue")), ("short", None), (long, None)];
    let b = tok.encode_batch(&inputs, 12).unwrap();
    assert_eq!((b.batch, b.seq), (3, 12));
    let row = |r: usize| r * b.seq..(r + 1) * b.seq;
    // Pair: 12 = [CLS] 6 words [SEP] 3 colours [SEP]; the long side alone was cut.
    let pair = &b.ids[row(0)];
    assert_eq!((pair[0], pair[7], pair[11]), (cls, sep, sep));
    assert_eq!(&b.type_ids[row(0)], &[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
    assert!(b.mask[row(0)].iter().all(|&m| m == 1.0));
    // Single short row: padded on the right with the pad id, mask 0, type id 0.
    assert_eq!(&b.ids[row(1)][..2], &[cls, tok.token_to_id("short").unwrap()]);
    assert_eq!(b.ids[row(1)][2], sep);
    assert!(b.ids[row(1)][3..].iter().all(|&i| i == pad));
    assert_eq!(b.mask[row(1)].iter().sum::<f32>(), 3.0);
    assert!(b.mask[row(1)][3..].iter().all(|&m| m == 0.0) && b.type_ids[row(1)].iter().all(|&t| t == 0));
    assert_eq!(b.ids[row(2)][11], sep);

    // No padding baked in by tokenizer.json (which pads to 128): the batch is as long as its
    // longest row.
    let b = tok.encode_batch(&[("a b", None)], 128).unwrap();
    assert_eq!((b.seq, b.ids.len(), b.mask.len()), (4, 4, 4));
    // Nor its truncation to 128.
    let words = vec!["word"; 300].join(" ");
    assert_eq!(tok.encode_batch(&[(&words, None)], 512).unwrap().seq, 302);
}

#[test]
fn errors_name_the_problem() {
    let err = Tokenizer::from_file(std::path::Path::new("/nonexistent/tokenizer.json")).err().unwrap().to_string();
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    let Some(path) = tokenizer_path() else { return };
    let tok = Tokenizer::from_file(&path).unwrap();
    let err = tok.encode_batch(&[("a", Some("b"))], 3).unwrap_err().to_string();
    assert!(err.contains("max_len 3") && err.contains("3 special tokens"), "{err}");
    assert!(tok.encode_batch(&[], 8).is_err());
}
