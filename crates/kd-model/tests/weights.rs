mod common;

use std::collections::BTreeMap;

use common::{snapshot, temp_dir, tiny_student, write};
use kd_kernels::io::{read_safetensors, HostArray};
use kd_kernels::Device;
use kd_model::testing::{minilm_dir, STUDENT, TEACHER};
use kd_model::{save_pretrained, BertConfig, BertWeights, Error};

/// Parameters of a BERT encoder with a pooler, by formula.
fn bert_params(c: &BertConfig, pooler: bool) -> usize {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h;
    let layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h;
    embeddings + c.num_hidden_layers * layer + if pooler { h * h + h } else { 0 }
}

#[test]
fn loads_minilm_checkpoints() {
    let Some(dir) = minilm_dir() else { return };
    for (model, layers, pooler) in [(TEACHER, 6, true), (STUDENT, 3, false)] {
        let dir = dir.join(model);
        let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
        let w = BertWeights::load(&dir.join("model.safetensors"), &config, &Device::Cpu).unwrap();
        assert_eq!(w.layers.len(), layers, "{model}");
        assert_eq!(w.embeddings.word_embeddings.shape(), [30522, 384]);
        assert_eq!(w.embeddings.position_embeddings.shape(), [512, 384]);
        assert_eq!(w.embeddings.token_type_embeddings.as_ref().unwrap().shape(), [2, 384]);
        let last = w.layers.last().unwrap();
        assert_eq!(last.query.weight.shape(), [384, 384]);
        assert_eq!(last.intermediate.weight.shape(), [1536, 384]);
        assert_eq!(last.output.weight.shape(), [384, 1536]);
        assert_eq!(last.output_layer_norm.bias.shape(), [384]);
        assert_eq!((w.pooler.is_some(), w.classifier.is_none(), w.mlm_head.is_none()), (pooler, true, true));
        assert_eq!(w.num_params(), bert_params(&config, pooler), "{model}");
        // The data is the file's, under the file's (prefix-less) name.
        let raw = read_safetensors(&dir.join("model.safetensors")).unwrap();
        let name = format!("encoder.layer.{}.output.LayerNorm.weight", layers - 1);
        assert_eq!(last.output_layer_norm.weight.to_vec().unwrap(), raw[&name].data);
    }
}

#[test]
fn loads_golden_names_and_heads() {
    let Some((config, arrays)) = tiny_student() else { return };
    let dir = temp_dir("golden-names");
    let path = dir.join("model.safetensors");
    write(&path, &arrays);
    let w = BertWeights::load(&path, &config, &Device::Cpu).unwrap();
    assert_eq!(w.classifier.as_ref().unwrap().weight.shape(), [3, 32]);
    assert!(w.pooler.is_some() && w.mlm_head.is_none());
    let mut seen = 0;
    w.visit(&mut |name, t| {
        assert_eq!(t.to_vec().unwrap(), arrays[name].data, "{name}");
        seen += 1;
    });
    assert_eq!(seen, arrays.len());

    // Old-style LayerNorm names, no `bert.` prefix, a position_ids buffer, a tied decoder and a
    // next-sentence head all load to the same weights.
    let mut variant: BTreeMap<String, HostArray> = arrays
        .iter()
        .map(|(k, v)| {
            let k = k.strip_prefix("bert.").unwrap_or(k);
            (k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"), v.clone())
        })
        .collect();
    variant.insert(
        "embeddings.position_ids".into(),
        HostArray { shape: vec![1, 32], data: (0..32).map(|i| i as f32).collect() },
    );
    variant.insert("cls.seq_relationship.weight".into(), HostArray { shape: vec![2, 32], data: vec![0.5; 64] });
    write(&path, &variant);
    assert_eq!(snapshot(&BertWeights::load(&path, &config, &Device::Cpu).unwrap()), snapshot(&w));
}

#[test]
fn load_errors_name_the_tensor() {
    let Some((config, arrays)) = tiny_student() else { return };
    let dir = temp_dir("load-errors");
    let path = dir.join("model.safetensors");
    let load_err = |arrays: &BTreeMap<String, HostArray>| {
        write(&path, arrays);
        match BertWeights::load(&path, &config, &Device::Cpu) {
            Err(e @ Error::Tensor { .. }) => e.to_string(),
            other => panic!("expected a tensor error, got {:?}", other.map(|_| ())),
        }
    };
    let assert_names = |err: String, parts: &[&str]| {
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        for part in parts {
            assert!(err.contains(part), "'{part}' not in: {err}");
        }
    };

    let mut missing = arrays.clone();
    missing.remove("bert.encoder.layer.1.output.dense.weight");
    assert_names(load_err(&missing), &["'bert.encoder.layer.1.output.dense.weight'", "missing"]);

    let mut unknown = arrays.clone();
    unknown.insert("bert.encoder.layer.0.attention.self.rotary.weight".into(), arrays["classifier.bias"].clone());
    assert_names(load_err(&unknown), &["'bert.encoder.layer.0.attention.self.rotary.weight'", "unknown"]);

    let mut extra_layer = arrays.clone();
    extra_layer.insert("bert.encoder.layer.2.output.dense.bias".into(), arrays["classifier.bias"].clone());
    assert_names(load_err(&extra_layer), &["'bert.encoder.layer.2.output.dense.bias'", "unknown"]);

    let mut wrong_shape = arrays.clone();
    wrong_shape.insert(
        "bert.encoder.layer.0.intermediate.dense.weight".into(),
        HostArray { shape: vec![47, 32], data: vec![0.0; 47 * 32] },
    );
    assert_names(load_err(&wrong_shape), &["'bert.encoder.layer.0.intermediate.dense.weight'", "[47, 32]", "[48, 32]"]);

    let mut duplicate = arrays.clone();
    duplicate.insert("pooler.dense.bias".into(), arrays["bert.pooler.dense.bias"].clone());
    assert_names(load_err(&duplicate), &["pooler.dense.bias", "duplicates"]);

    let mut bad_decoder = arrays.clone();
    bad_decoder
        .insert("cls.predictions.decoder.weight".into(), HostArray { shape: vec![96, 32], data: vec![0.0; 96 * 32] });
    assert_names(load_err(&bad_decoder), &["'cls.predictions.decoder.weight'", "[96, 32]", "[97, 32]"]);

    let mut no_bias = arrays.clone();
    no_bias.insert("cls.predictions.transform.dense.weight".into(), arrays["bert.pooler.dense.weight"].clone());
    assert_names(load_err(&no_bias), &["'cls.predictions.transform.dense.bias'", "missing"]);

    let err = BertWeights::load(&dir.join("absent.safetensors"), &config, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("absent.safetensors"), "{err}");

    // NaN or infinite weights are refused at load, naming the tensor and the element.
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")] {
        let mut poisoned = arrays.clone();
        poisoned.get_mut("bert.encoder.layer.1.attention.self.key.bias").unwrap().data[5] = bad;
        let err = load_err(&poisoned);
        assert_names(err, &["'bert.encoder.layer.1.attention.self.key.bias'", shown, "element 5"]);
    }
}

#[test]
fn save_load_round_trip_is_bit_exact() {
    let Some((config, arrays)) = tiny_student() else { return };
    let dir = temp_dir("round-trip");
    let path = dir.join("model.safetensors");
    write(&path, &arrays);
    let mut w = BertWeights::load(&path, &config, &Device::Cpu).unwrap();
    w.init_mlm_head(&config, 3).unwrap();
    // Non-trivial values everywhere, the MLM head's LayerNorm and biases included.
    let mut k = 0u32;
    w.visit_mut(&mut |_, t| {
        for x in t.cpu_mut().unwrap() {
            k += 1;
            *x = (k as f32 * 0.618).sin() / 3.0;
        }
    });
    let saved = dir.join("saved.safetensors");
    w.save(&saved).unwrap();
    let names: Vec<String> = read_safetensors(&saved).unwrap().into_keys().collect();
    for name in ["bert.embeddings.word_embeddings.weight", "classifier.weight", "cls.predictions.bias"] {
        assert!(names.contains(&name.to_string()), "{name} not in {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("decoder")), "the tied decoder is not written");
    assert_eq!(snapshot(&BertWeights::load(&saved, &config, &Device::Cpu).unwrap()), snapshot(&w));
    let leftovers: Vec<_> = std::fs::read_dir(&*dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");

    // A transformers BertForMaskedLM file also carries the tied decoder: it loads the same.
    let mut with_decoder = read_safetensors(&saved).unwrap();
    with_decoder.insert(
        "cls.predictions.decoder.weight".into(),
        with_decoder["bert.embeddings.word_embeddings.weight"].clone(),
    );
    with_decoder.insert("cls.predictions.decoder.bias".into(), with_decoder["cls.predictions.bias"].clone());
    write(&saved, &with_decoder);
    assert_eq!(snapshot(&BertWeights::load(&saved, &config, &Device::Cpu).unwrap()), snapshot(&w));
}

#[test]
fn minilm_round_trip_and_save_pretrained() {
    let Some(models) = minilm_dir() else { return };
    let src = models.join(STUDENT);
    let mut config = BertConfig::from_file(&src.join("config.json")).unwrap();
    let mut w = BertWeights::load(&src.join("model.safetensors"), &config, &Device::Cpu).unwrap();
    w.init_classifier(&config, 5, 11).unwrap();
    let scratch = temp_dir("save-pretrained");
    let out = scratch.join("student");
    save_pretrained(&out, &config, &w, &src.join("tokenizer.json")).unwrap();

    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    let expected = [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ];
    assert_eq!(files, expected);
    for copied in &expected[2..] {
        assert_eq!(std::fs::read(out.join(copied)).unwrap(), std::fs::read(src.join(copied)).unwrap(), "{copied}");
    }
    let saved = BertConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(saved.num_labels(), 5);
    assert_eq!(saved.extra["architectures"], serde_json::json!(["BertForSequenceClassification"]));
    assert_eq!(saved.hidden_size, config.hidden_size);
    let reloaded = BertWeights::load(&out.join("model.safetensors"), &saved, &Device::Cpu).unwrap();
    assert_eq!(snapshot(&reloaded), snapshot(&w));

    config.num_hidden_layers = 2;
    let err = save_pretrained(&out, &config, &w, &src.join("tokenizer.json")).unwrap_err().to_string();
    assert!(err.contains("'bert.encoder.layer.2.") && err.contains("not in the configured model"), "{err}");
}

/// A full disk while a model folder is saved over an older one: config.json's write fails
/// (its temporary file is a link to /dev/full, every write to which fails with ENOSPC) after
/// model.safetensors' was written. Every old file is left as it was, with no temporary file.
#[test]
fn save_pretrained_on_a_full_disk_leaves_the_old_folder_whole() {
    let Some(models) = minilm_dir() else { return };
    if !std::path::Path::new("/dev/full").exists() {
        return eprintln!("skipped: no /dev/full");
    }
    let src = models.join(STUDENT);
    let config = BertConfig::from_file(&src.join("config.json")).unwrap();
    let mut w = BertWeights::load(&src.join("model.safetensors"), &config, &Device::Cpu).unwrap();
    w.init_classifier(&config, 2, 1).unwrap();
    let scratch = temp_dir("save-full-disk");
    let out = scratch.join("student");
    save_pretrained(&out, &config, &w, &src.join("tokenizer.json")).unwrap();
    let listing = |dir: &std::path::Path| {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
            .collect();
        files.sort();
        files
    };
    let before = listing(&out);

    w.init_classifier(&config, 2, 2).unwrap();
    let config_tmp = kd_kernels::io::temp_path(&out.join("config.json"));
    std::os::unix::fs::symlink("/dev/full", &config_tmp).unwrap();
    let err = save_pretrained(&out, &config, &w, &src.join("tokenizer.json")).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("No space left"), "{err}");
    assert!(!config_tmp.exists() && std::fs::symlink_metadata(&config_tmp).is_err(), "temporary file left");
    assert!(before == listing(&out), "the old folder changed");
}

#[test]
fn select_layers_copies_the_chosen_teacher_layers() {
    let Some(models) = minilm_dir() else { return };
    let dir = models.join(TEACHER);
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let teacher = BertWeights::load(&dir.join("model.safetensors"), &config, &Device::Cpu).unwrap();
    let student = teacher.select_layers(&[1, 3, 5]).unwrap();
    assert_eq!(student.layers.len(), 3);
    let t = snapshot(&teacher);
    let t: BTreeMap<_, _> = t.iter().map(|(n, s, d)| (n.as_str(), (s, d))).collect();
    let mut checked = 0;
    for (name, shape, data) in snapshot(&student) {
        let source = match name.strip_prefix("bert.encoder.layer.") {
            Some(rest) => {
                let (j, tail) = rest.split_once('.').unwrap();
                format!("bert.encoder.layer.{}.{tail}", [1, 3, 5][j.parse::<usize>().unwrap()])
            }
            None => name.clone(),
        };
        assert_eq!(t[source.as_str()], (&shape, &data), "{name} from {source}");
        checked += 1;
    }
    assert_eq!(checked, t.len() - 3 * 16);
    assert_eq!(snapshot(&teacher.try_clone().unwrap()), snapshot(&teacher));

    let err = teacher.select_layers(&[0, 6]).unwrap_err().to_string();
    assert!(err.contains("layer 6 does not exist") && err.contains("6 layers"), "{err}");
    assert!(teacher.select_layers(&[]).is_err());
}

#[test]
fn init_is_seeded_and_follows_hf() {
    let Some((config, _)) = tiny_student() else { return };
    let a = BertWeights::init(&config, 3, 7, &Device::Cpu).unwrap();
    assert_eq!(snapshot(&a), snapshot(&BertWeights::init(&config, 3, 7, &Device::Cpu).unwrap()));
    let b = BertWeights::init(&config, 3, 8, &Device::Cpu).unwrap();
    assert_ne!(snapshot(&a), snapshot(&b));
    assert_eq!(a.num_params(), bert_params(&config, true) + 3 * 32 + 3);
    assert!(a.mlm_head.is_none());

    a.visit(&mut |name, t| {
        let v = t.to_vec().unwrap();
        if name.ends_with(".bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}");
        } else if name.contains("LayerNorm") {
            assert!(v.iter().all(|&x| x == 1.0), "{name}");
        } else if v.len() >= 1000 {
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            assert!(mean.abs() < 0.003 && (std - 0.02).abs() < 0.002, "{name}: mean {mean}, std {std}");
        }
    });
    let pad = config.pad_token_id as usize * 32;
    assert!(a.embeddings.word_embeddings.to_vec().unwrap()[pad..pad + 32].iter().all(|&x| x == 0.0));
    assert!(a.embeddings.word_embeddings.to_vec().unwrap()[pad + 32..pad + 64].iter().all(|&x| x != 0.0));

    // A head added later draws the same numbers as one made by `init` with the same seed.
    let mut headless = a.select_layers(&[0, 1]).unwrap();
    headless.classifier = None;
    headless.init_classifier(&config, 3, 7).unwrap();
    assert_eq!(snapshot(&headless), snapshot(&a));
    assert!(BertWeights::init(&config, 0, 7, &Device::Cpu).is_err());
}

#[test]
fn walks_are_uniform() {
    let Some((config, _)) = tiny_student() else { return };
    let mut w = BertWeights::init(&config, 3, 1, &Device::Cpu).unwrap();
    w.init_mlm_head(&config, 1).unwrap();
    let mut zeros = w.zeros_like().unwrap();
    let names = |w: &BertWeights| {
        let mut v = Vec::new();
        w.visit(&mut |n, t| v.push((n.to_string(), t.shape().to_vec())));
        v
    };
    assert_eq!(names(&zeros), names(&w));
    assert_eq!(names(&w).len(), 5 + 2 * 16 + 2 + 2 + 5);
    zeros.visit(&mut |n, t| assert!(t.to_vec().unwrap().iter().all(|&x| x == 0.0), "{n}"));
    zeros.visit_mut(&mut |_, t| t.fill(2.0).unwrap());
    w.try_visit_mut(&mut |_, t| t.fill(2.0)).unwrap();
    assert_eq!(snapshot(&zeros), snapshot(&w));
    let stopped = w.try_visit(&mut |n, _| if n.starts_with("classifier") { Err(n.to_string()) } else { Ok(()) });
    assert_eq!(stopped, Err("classifier.weight".to_string()));

    let decayed: Vec<String> = names(&w).into_iter().map(|(n, _)| n).filter(|n| BertWeights::decays(n)).collect();
    assert_eq!(decayed.len(), 3 + 2 * 6 + 1 + 1 + 1);
    assert!(decayed.contains(&"bert.embeddings.word_embeddings.weight".to_string()));
    assert!(!BertWeights::decays("cls.predictions.bias"));
    assert!(!BertWeights::decays("bert.encoder.layer.0.output.LayerNorm.weight"));
}

#[test]
fn walks_side_by_side() {
    let Some((config, _)) = tiny_student() else { return };
    let params = BertWeights::init(&config, 3, 1, &Device::Cpu).unwrap();
    let mut moments = params.zeros_like().unwrap();
    let mut slots = Vec::new();
    moments.visit_mut(&mut |_, t| slots.push(t));
    let mut slots = slots.into_iter();
    params.visit(&mut |_, p| slots.next().unwrap().cpu_mut().unwrap().copy_from_slice(p.cpu().unwrap()));
    assert!(slots.next().is_none());
    assert_eq!(snapshot(&moments), snapshot(&params));
}
