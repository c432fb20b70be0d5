//! `kd-cli distill`: train a student from a fine-tuned teacher with one of kd's methods, and
//! save it as an HF folder. With no arguments it runs the built-in demonstration.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use kd_kernels::Device;
use kd_methods::augment::{Augmenter, TokenKind};
use kd_methods::batching::{Encoded, EncodedSet, Targets};
use kd_methods::encode::encode_texts;
use kd_methods::methods::ce::Ce;
use kd_methods::methods::cr_ild::{self, CrIldConfig};
use kd_methods::methods::ild::Ild;
use kd_methods::methods::kd::Kd;
use kd_methods::methods::mate_kd::{self, MateKdConfig};
use kd_methods::methods::noisy_coteach::{estimate_noise_rate, keep_better, CoTeach, CoTeachParams};
use kd_methods::methods::noisy_relabel::{NoisyRelabel, RelabelParams};
use kd_methods::methods::peer_advised::{peer_advised, PeerAdvisedConfig};
use kd_methods::methods::teacher::{check_compatible, CachedLogits};
use kd_methods::noise::{inject_targets, NoiseModel};
use kd_methods::pseudo::{self, PseudoLabels};
use kd_methods::task::{DataOptions, Labels};
use kd_methods::trainer::{evaluate, TrainReport};
use kd_model::bert::Bert;
use kd_model::family::Family;
use kd_model::{BertConfig, BertWeights, Tokenizer};

use crate::args::{device, report_skipped, DataArgs};
use crate::finetune::with_head;
use crate::method_args::MethodArgs;
use crate::model::{check_task, label_names, same_vocabulary, ModelDir};
use crate::report::print_result;
use crate::run_dir::{check_out, hash_model, hash_path, hash_set, Fingerprint};
use crate::session::{Session, TrainArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The student on the labels alone (no teacher).
    Ce,
    /// Hinton et al. 2015: (1-a) CE + a T^2 KL on the logits.
    Kd,
    /// Intermediate-layer distillation (hidden MSE + attention KL), then logit KD.
    Ild,
    /// Two students that pick small-loss examples for each other under the KD loss.
    NoisyCoteach,
    /// KD whose hard-label term is weighted by the teacher's belief in the label.
    NoisyRelabel,
    /// CR-ILD (Ko et al. 2023): last-layer ILD on mixup with consistency, then logit KD.
    CrIld,
    /// MATE-KD (Rashid et al. 2021): an MLM generator perturbs text to maximise divergence.
    MateKd,
    /// Peer-advised KD (Zhao 2023): probe, keep the converged half of each class, peer relabels the rest.
    PeerAdvised,
    /// Hard-label KD (SLKD's word-level form): the student on the teacher's argmax labels alone
    /// (or --labels-file's), CE; peer-advised's baseline without its probe and peer.
    Slkd,
}

/// (Serialised into the run's fingerprint, docs/RUNS.md.)
#[derive(clap::Args, Debug, serde::Serialize)]
pub struct Args {
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// The fine-tuned teacher (an HF folder with a classification head).
    #[arg(long, value_name = "DIR")]
    teacher: Option<PathBuf>,
    /// The student to start from: an HF folder with the teacher's vocabulary.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["student_layers", "student_config"])]
    student: Option<PathBuf>,
    /// Build the student from these teacher layers, e.g. 0,2,4.
    #[arg(long, value_name = "LIST", value_delimiter = ',', conflicts_with = "student_config")]
    student_layers: Option<Vec<usize>>,
    /// Build a fresh student from this config.json (the teacher's vocabulary).
    #[arg(long, value_name = "FILE")]
    student_config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    data: DataArgs,
    /// Where the student (an HF folder), OUT/best and metrics.jsonl go.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    train: TrainArgs,
    /// Flip each training label to another class with this probability (seeded by --noise-seed).
    #[arg(long, value_name = "RATE")]
    label_noise: Option<f64>,
    /// Seed of --label-noise, independent of --seed so every run sees the same corrupted set.
    #[arg(long, default_value_t = 0)]
    noise_seed: u64,
    /// Cache of teacher logits, keyed by teacher weights and data (default ~/.cache/kd/teacher-logits).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Print the final result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    /// The methods' own flags, each group under its own heading (method_args.rs); a flag the
    /// chosen --method does not read is an error.
    #[command(flatten)]
    #[serde(flatten)]
    methods: MethodArgs,
}

/// Fields of [`Args`] left out of the run's fingerprint: paths (their contents are hashed
/// instead) and flags that do not change the result.
const NOT_IN_FINGERPRINT: [&str; 6] = ["teacher", "student", "student_config", "out", "cache_dir", "json"];

impl Args {
    /// The checks of the flags that need no file: made before anything is loaded, and before
    /// OUT is touched. A method flag that `method` does not read is an error.
    fn check(&self, method: Method) -> Result<()> {
        self.methods.check_given(Some(method))?;
        self.methods.check_ranges()?;
        if let Some(r) = self.label_noise {
            ensure!((0.0..=1.0).contains(&r), "--label-noise {r} is not a rate in [0, 1]");
        }
        ensure!(
            method != Method::MateKd || self.methods.mate_kd.generator.is_some(),
            "mate-kd needs --generator DIR (see kd-cli train-generator)"
        );
        Ok(())
    }

    /// cr-ild's stage 1: its consistency ramp runs over the stage-1 epochs (--stage1-epochs,
    /// default --epochs), the epochs that stage trains.
    fn cr_ild_config(&self) -> CrIldConfig {
        let e1 = self.methods.ild.stage1_epochs.unwrap_or(self.train.epochs);
        let c = &self.methods.cr_ild;
        CrIldConfig { objective: c.objective().into(), w_ic: c.w_ic(), ..CrIldConfig::new(e1, self.train.seed) }
    }

    /// The run's flags in its fingerprint (after [`MethodArgs::fill_defaults`]).
    fn fingerprint(&self) -> Result<Fingerprint> {
        let ignore = [&NOT_IN_FINGERPRINT[..], &DataArgs::PATHS, &MethodArgs::PATHS, &TrainArgs::NOT_RESULT].concat();
        Fingerprint::of_flags("distill", self, &ignore)
    }

    /// The paths the run reads, by flag.
    fn inputs(&self) -> Vec<(&'static str, &Path)> {
        let mut inputs = self.data.inputs();
        let given =
            [("--teacher", &self.teacher), ("--student", &self.student), ("--student-config", &self.student_config)];
        inputs.extend(given.into_iter().filter_map(|(flag, p)| Some((flag, p.as_deref()?))));
        inputs.extend(self.methods.inputs());
        inputs
    }
}

pub fn run(mut args: Args) -> Result<()> {
    let Some(teacher_dir) = args.teacher.clone() else {
        ensure!(args.method.is_none(), "--method needs --teacher DIR (or run `kd-cli distill` alone for the demo)");
        args.methods.check_given(None)?;
        return crate::demo::run(args.json, device(&args.train.device)?);
    };
    let method = args.method.context("--method is required with --teacher")?;
    args.check(method)?;
    args.methods.fill_defaults();
    let out = args.out.clone().context("--out DIR is required with --teacher")?;
    args.train.check()?;
    check_out(&out, &args.inputs())?;
    let device = device(&args.train.device)?;
    let data = args.data.options(None)?;
    let tdir = ModelDir::open(&teacher_dir)?;
    tdir.check_max_len(data.max_len)?;
    let teacher = tdir.classifier(&device)?;
    check_task(&teacher, &data.source)?;
    // The teacher's classes are the task's: a training label outside them is an error.
    let teacher_labels = label_names(&teacher.config);
    let train_labels = if data.source.is_regression() { Labels::FromData } else { Labels::Fixed(&teacher_labels) };
    let mut task = data
        .train_dev_with(train_labels, &tdir.tokenizer, args.train.max_train, args.train.seed)
        .context("loading the data")?;
    report_skipped(&task.train.data);
    if let Some(dev) = &task.dev {
        report_skipped(&dev.data);
    }
    if !data.source.is_regression() && task.label_names.len() != teacher_labels.len() {
        let extra = task.label_names.get(teacher_labels.len()..).unwrap_or_default().join(", ");
        bail!(
            "{}: labels the teacher does not predict ({extra}; it knows {}): distillation cannot teach them",
            task.train.data.source.display(),
            teacher_labels.join(", ")
        );
    }
    if let Some(rate) = args.label_noise {
        let classes = task.label_names.len();
        let flipped =
            inject_targets(&mut task.train.set.targets, classes, &NoiseModel::Symmetric { rate }, args.noise_seed)?;
        eprintln!("--label-noise {rate}: flipped {} of {} training labels", flipped.len(), task.train.set.items.len());
    }
    let metric = data.source.metric();
    let dev = task.dev.as_ref().map(|d| &d.set);
    let train = &task.train.set;
    let build = StudentSpec { args: &args, teacher_dir: &tdir, device: &device, label_names: &task.label_names };
    let mut student = build.student(args.train.seed)?;
    check_compatible(&teacher, &student)?;

    // Every other input is read before OUT is touched.
    let mut fingerprint = args.fingerprint()?;
    fingerprint.input("teacher weights", hash_model(&teacher)?);
    fingerprint.input("initial student weights", hash_model(&student)?);
    fingerprint.input("training data", hash_set(train));
    if let Some(dev) = dev {
        fingerprint.input("dev data", hash_set(dev));
    }
    let labels_file = match (&args.methods.peer_advised.labels_file, method) {
        (Some(path), Method::PeerAdvised | Method::Slkd) => {
            // Rows by their index in the whole training file, not in the --max-train draw.
            let all = pseudo::read_jsonl(path, &task.label_names, task.file_rows)?;
            fingerprint.input("--labels-file contents", hash_path(path)?);
            Some(all.select(&task.train_rows))
        }
        (Some(_), _) => bail!("--labels-file is an option of --method peer-advised and slkd"),
        (None, _) => None,
    };
    let supplementary = match (&args.methods.cr_ild.supplementary, method) {
        (Some(path), Method::CrIld) => {
            fingerprint.input("--supplementary contents", hash_path(path)?);
            // Stage 1 of cr-ild reads no labels: placeholders.
            let items = read_texts(&data, path, &tdir.tokenizer)?;
            Some(EncodedSet { targets: Targets::Classes(vec![0; items.len()]), items })
        }
        (Some(_), _) => bail!("--supplementary is an option of --method cr-ild"),
        (None, _) => None,
    };
    // The generator feeds mate-kd, and --augment for the methods that take transfer rows.
    let transfer_args = &args.methods.transfer;
    let takes_transfer = matches!(method, Method::Kd | Method::Ild | Method::CrIld);
    let wants_generator = method == Method::MateKd || (transfer_args.augment.is_some() && takes_transfer);
    let mut generator = match &args.methods.mate_kd.generator {
        Some(gdir) if wants_generator => {
            let gdir = ModelDir::open(gdir)?;
            same_vocabulary(&tdir, &gdir, "generator")?;
            let generator = Bert::new(gdir.config.clone(), gdir.weights(&device)?);
            fingerprint.input("generator weights", hash_model(&generator)?);
            Some(generator)
        }
        Some(_) => bail!("--generator is an option of --method mate-kd, and of kd, ild and cr-ild with --augment"),
        None => None,
    };
    let mut transfer: Vec<Encoded> = Vec::new();
    match &transfer_args.unlabeled {
        Some(path) if takes_transfer => {
            fingerprint.input("--unlabeled contents", hash_path(path)?);
            let texts = read_texts(&data, path, &tdir.tokenizer)?;
            let repeats = repeated_rows(&train.items, &texts);
            if repeats > 0 {
                eprintln!(
                    "--unlabeled: {repeats} of its {} texts are also training rows; both are kept (the teacher's \
                     soft labels on them add to their gold labels)",
                    texts.len()
                );
            }
            transfer.extend(texts);
        }
        Some(_) => bail!("--unlabeled is an option of --method kd, ild and cr-ild"),
        None => {}
    }
    match (transfer_args.augment, &generator) {
        (Some(copies), Some(generator)) if takes_transfer => {
            let augmenter = Augmenter {
                generator,
                mask_id: token(&tdir.tokenizer, "[MASK]")?,
                kinds: token_kinds(&tdir.tokenizer, generator.config.vocab_size),
                prob: AUGMENT_PROB,
                top_k: AUGMENT_TOP_K,
            };
            let copies = augmenter.augment(&train.items, copies as usize, args.train.seed, args.train.batch)?;
            eprintln!("--augment: {} copies of the training rows", copies.len());
            transfer.extend(copies);
        }
        (Some(_), None) if takes_transfer => {
            bail!("--augment needs --generator DIR (a BertForMaskedLM: see kd-cli train-generator)")
        }
        (Some(_), _) => bail!("--augment is an option of --method kd, ild and cr-ild"),
        (None, _) => {}
    }
    // What the teacher-signal stages train on: the training rows, then the transfer rows.
    let with_transfer = (!transfer.is_empty()).then(|| with_transfer_rows(train, transfer));
    let kd_set = with_transfer.as_ref().unwrap_or(train);
    if with_transfer.is_some() {
        eprintln!("{} training rows and {} transfer rows", train.items.len(), kd_set.items.len() - train.items.len());
    }
    let mut session =
        Session::create(&out, &tdir.tokenizer_file, args.train.resume, fingerprint, args.train.log_every)?;
    let epochs = args.train.epochs;
    let cfg = |stage: &str, epochs: usize| args.train.config(epochs, metric, &session_state(&out, stage));
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    crate::run_dir::remove_stale_temps(&cache_dir);
    let logits = |set: &EncodedSet| -> Result<CachedLogits> {
        CachedLogits::build_or_load(&teacher, set, 128, &cache_dir).context("computing the teacher's logits")
    };

    let first_transfer_row = if with_transfer.is_some() { train.items.len() } else { usize::MAX };
    // peer-advised's and slkd's training labels: the teacher's (argmax, or --labels-file), with
    // --gold-subset's gold rows.
    let mut labels_file = labels_file;
    let mut teacher_labels = |name: &str| -> Result<PseudoLabels> {
        ensure!(!data.source.is_regression(), "{name} trains on the teacher's class labels: this task is a regression");
        let mut labels = match labels_file.take() {
            Some(labels) => labels,
            None => PseudoLabels::from_logits(logits(train)?.rows(), false),
        };
        if let Some(k) = args.methods.peer_advised.gold_subset {
            let split = pseudo::gold_subset(train, k, args.train.seed).context("--gold-subset")?;
            pseudo::keep_gold(&mut labels, train, &split.gold_rows, task.label_names.len())?;
            eprintln!("{name}: {k} rows keep their gold labels");
        }
        Ok(labels)
    };
    let report: TrainReport = match method {
        Method::Ce => session.train("ce", &mut student, train, dev, &mut Ce, &cfg("ce", epochs))?,
        Method::Kd => {
            let mut cache = logits(kd_set)?;
            let mut objective = Kd { first_transfer_row, ..args.methods.kd.loss(&mut cache) };
            session.train("kd", &mut student, kd_set, dev, &mut objective, &cfg("kd", epochs))?
        }
        Method::Ild => {
            let mut stage1 = Ild::new(&teacher, &student, args.methods.ild.last_layer, args.train.seed)?;
            let e1 = args.methods.ild.stage1_epochs.unwrap_or(epochs);
            session.train("ild", &mut student, kd_set, None, &mut stage1, &cfg("ild", e1))?;
            let mut cache = logits(kd_set)?;
            let mut objective = Kd { first_transfer_row, ..args.methods.kd.loss(&mut cache) };
            session.train("kd", &mut student, kd_set, dev, &mut objective, &cfg("kd", epochs))?
        }
        Method::NoisyRelabel => {
            let mut cache = logits(train)?;
            let params = RelabelParams {
                alpha: args.methods.kd.alpha(),
                temperature: args.methods.kd.temperature(),
                trust_threshold: args.methods.noisy.trust_threshold,
            };
            let mut objective = NoisyRelabel::new(&mut cache, params)?;
            session.train("noisy-relabel", &mut student, train, dev, &mut objective, &cfg("noisy-relabel", epochs))?
        }
        Method::NoisyCoteach => {
            let mut cache = logits(train)?;
            let r_est = match args.methods.noisy.noise_rate {
                Some(r) => r,
                None => estimate_noise_rate(cache.rows(), &train.targets)?,
            };
            eprintln!("noisy-coteach: forget rate up to {r_est:.3}");
            let peer_seed = args.train.seed.wrapping_add(1);
            let peer = build.student(peer_seed)?;
            let params = CoTeachParams {
                alpha: args.methods.kd.alpha(),
                temperature: args.methods.kd.temperature(),
                ..CoTeachParams::new(r_est, peer_seed)
            };
            let stage_cfg = cfg("noisy-coteach", epochs);
            let mut objective = CoTeach::new(&mut cache, peer, params, &stage_cfg, train.items.len())?;
            let report = session.train("noisy-coteach", &mut student, train, dev, &mut objective, &stage_cfg)?;
            // Student A, unless --keep-better asks for the better of the two on dev.
            if !args.methods.noisy.keep_better {
                report
            } else {
                let dev = dev.context("--keep-better picks the student that is better on dev: it needs a dev set")?;
                let kept = keep_better(student, objective.into_peer(), dev, args.train.batch, metric)?;
                eprintln!(
                    "noisy-coteach: kept student {:?} (dev {:.4} vs {:.4})",
                    kept.which,
                    kept.dev_a.main(),
                    kept.dev_b.main()
                );
                student = kept.model;
                TrainReport { final_metrics: Some(evaluate(&student, dev, args.train.batch, metric)?), ..report }
            }
        }
        Method::CrIld => {
            let stage1_set = cr_ild::stage1_set(kd_set, supplementary.as_ref());
            let cr_cfg = args.cr_ild_config();
            let e1 = cr_cfg.epochs;
            if cr_cfg.consistency_never_acts() {
                eprintln!(
                    "cr-ild: the consistency weight ramps from 0 by stage-1 epoch, so in a 1-epoch stage 1 it stays 0 and only the mixup ILD term trains (--stage1-epochs 2 or more to use it)"
                );
            }
            let mut stage1 = cr_ild::stage1(&teacher, &student, cr_cfg)?;
            session.train("cr-ild", &mut student, &stage1_set, None, &mut stage1, &cfg("cr-ild", e1))?;
            // Stage 2 is ild's (and kd's): --alpha and --temperature.
            let mut cache = logits(kd_set)?;
            let mut objective = Kd { first_transfer_row, ..args.methods.kd.loss(&mut cache) };
            session.train("kd", &mut student, kd_set, dev, &mut objective, &cfg("kd", epochs))?
        }
        Method::MateKd => {
            let mut generator = generator.take().context("mate-kd needs --generator DIR")?;
            let mut mate = MateKdConfig::new(token(&tdir.tokenizer, "[MASK]")?, special_ids(&tdir.tokenizer));
            let m = &args.methods.mate_kd;
            mate.divergence = m.divergence().into();
            mate.generator_steps = m.generator_steps();
            mate.student_steps = m.student_steps();
            mate.masking.prob = m.mask_rate();
            mate.generator_lr = m.generator_lr();
            let stage_cfg = cfg("mate-kd", epochs);
            let steps = train.items.len().div_ceil(args.train.batch) as u64 * epochs as u64;
            session.run("mate-kd", steps, epochs, |observer| {
                Ok(mate_kd::train(&mut student, &teacher, &mut generator, train, dev, &stage_cfg, &mate, observer)?)
            })?
        }
        Method::Slkd => {
            let labels = teacher_labels("slkd")?;
            let set = EncodedSet { items: train.items.clone(), targets: Targets::Classes(labels.hard()) };
            session.train("slkd", &mut student, &set, dev, &mut Ce, &cfg("slkd", epochs))?
        }
        Method::PeerAdvised => {
            let labels = teacher_labels("peer-advised")?;
            let pa_cfg = PeerAdvisedConfig {
                keep: args.methods.peer_advised.keep(),
                ..PeerAdvisedConfig::new(cfg("peer-advised", epochs))
            };
            let steps = train.items.len().div_ceil(args.train.batch) as u64 * (2 * epochs + pa_cfg.probe.epochs) as u64;
            let mut new_student =
                || build.student(args.train.seed).map_err(|e| kd_methods::Error::Config(format!("{e:#}")));
            let mut result = None;
            let report = session.run_stages("peer-advised", steps, 2 * epochs + pa_cfg.probe.epochs, |observer| {
                let out = peer_advised(&mut new_student, &train.items, &labels, dev, &pa_cfg, observer)?;
                let report = out.reports.last().map(|(_, r)| r.clone()).context("peer-advised ran no stage")?;
                result = Some(out);
                Ok(report)
            })?;
            let out = result.context("peer-advised returned nothing")?;
            eprintln!(
                "peer-advised: kept {} teacher labels, the peer relabelled {}",
                out.kept.len(),
                out.relabelled.len()
            );
            student = out.student;
            report
        }
    };

    let (split, examples, metrics) = match (dev, report.final_metrics.clone()) {
        (Some(dev), Some(m)) => ("dev", dev.items.len(), m),
        _ => ("train", train.items.len(), evaluate(&student, train, args.train.batch, metric)?),
    };
    session.finish(&student)?;
    if !args.json {
        crate::print_line(&format!(
            "{} student: {} parameters, {} steps in {:.1} s; saved to {}",
            method.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
            student.weights.num_params(),
            report.steps,
            report.seconds,
            out.display()
        ))?;
    }
    print_result(
        args.json,
        &data.source.name(kd_methods::data::Split::Train),
        split,
        examples,
        report.seconds,
        &metrics,
    )
}

fn session_state(out: &Path, stage: &str) -> PathBuf {
    out.join("checkpoint").join(stage)
}

fn default_cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache/kd/teacher-logits")
}

/// How the student is made: from its own folder, from teacher layers, or fresh from a config.
struct StudentSpec<'a> {
    args: &'a Args,
    teacher_dir: &'a ModelDir,
    device: &'a Device,
    label_names: &'a [String],
}

impl StudentSpec<'_> {
    fn student(&self, seed: u64) -> Result<Bert> {
        let regression = self.label_names.is_empty();
        let a = self.args;
        if let Some(dir) = &a.student {
            let sdir = ModelDir::open(dir)?;
            same_family(&self.teacher_dir.config, &sdir.config, dir)?;
            same_vocabulary(self.teacher_dir, &sdir, "student")?;
            return with_head(&sdir, self.device, regression, self.label_names, seed);
        }
        let tconfig = &self.teacher_dir.config;
        let teacher_weights = self.teacher_dir.weights(self.device)?;
        let (config, weights) = if let Some(layers) = &a.student_layers {
            let mut config = tconfig.clone();
            config.num_hidden_layers = layers.len();
            (config, teacher_weights.select_layers(layers)?)
        } else if let Some(path) = &a.student_config {
            let mut config = BertConfig::from_file(path)?;
            same_family(tconfig, &config, path)?;
            ensure!(
                config.vocab_size == tconfig.vocab_size,
                "{}: vocab_size {} differs from the teacher's {}",
                path.display(),
                config.vocab_size,
                tconfig.vocab_size
            );
            config.id2label = tconfig.id2label.clone();
            config.label2id = tconfig.label2id.clone();
            config.problem_type = tconfig.problem_type.clone();
            let outputs = if regression { 1 } else { self.label_names.len() };
            let weights = BertWeights::init(&config, outputs, seed, self.device)?;
            (config, weights)
        } else {
            bail!("say which student: --student DIR, --student-layers 0,2,4 or --student-config FILE");
        };
        Ok(Bert::new(config, weights))
    }
}

/// The student reads the batches the teacher's tokenizer makes, and families number their
/// vocabularies and special tokens differently: a student of another family would read the
/// teacher's ids as other words.
fn same_family(teacher: &BertConfig, student: &BertConfig, source: &Path) -> Result<()> {
    let (t, s) = (Family::of(teacher), Family::of(student));
    ensure!(
        t == s,
        "{}: a {} student cannot read the {} teacher's tokens; use a student of the teacher's family",
        source.display(),
        s.class_prefix(),
        t.class_prefix()
    );
    Ok(())
}

/// TinyBERT's replacement probability and candidate count (its `p` and `M`).
const AUGMENT_PROB: f64 = 0.4;
const AUGMENT_TOP_K: usize = 15;

/// Each vocabulary id's kind: specials (and bracketed `[unused]` slots), `##` pieces, words.
fn token_kinds(tokenizer: &Tokenizer, vocab: usize) -> Vec<TokenKind> {
    let special = tokenizer.special_ids();
    (0..vocab as u32)
        .map(|id| match tokenizer.id_to_token(id) {
            _ if special.contains(&id) => TokenKind::Special,
            Some(t) if t.starts_with("##") => TokenKind::Piece,
            Some(t) if !(t.starts_with('[') && t.ends_with(']')) => TokenKind::Word,
            _ => TokenKind::Special,
        })
        .collect()
}

fn token(tokenizer: &Tokenizer, name: &str) -> Result<u32> {
    tokenizer.token_to_id(name).with_context(|| format!("the tokenizer has no {name} token"))
}

fn special_ids(tokenizer: &Tokenizer) -> Vec<u32> {
    ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"].iter().filter_map(|t| tokenizer.token_to_id(t)).collect()
}

/// Unlabelled text (`--unlabeled`, `--supplementary`) tokenized as the training data.
fn read_texts(data: &DataOptions, path: &Path, tokenizer: &Tokenizer) -> Result<Vec<Encoded>> {
    let texts = data.source.load_texts(path, data.skip_bad_rows)?;
    report_skipped(&texts);
    Ok(encode_texts(&texts, tokenizer, data.max_len)?)
}

/// How many of `texts` tokenize exactly as one of the training rows (a user who passes the
/// whole train file as --unlabeled text with --max-train is told, not silently double-counted).
fn repeated_rows(train: &[Encoded], texts: &[Encoded]) -> usize {
    let known: std::collections::HashSet<(&[u32], &[u32])> =
        train.iter().map(|e| (e.ids.as_slice(), e.type_ids.as_slice())).collect();
    texts.iter().filter(|e| known.contains(&(e.ids.as_slice(), e.type_ids.as_slice()))).count()
}

/// The training rows followed by the transfer rows, whose placeholder targets the KD objective
/// weights to zero (`Kd::first_transfer_row`).
fn with_transfer_rows(train: &EncodedSet, transfer: Vec<Encoded>) -> EncodedSet {
    let mut set = train.clone();
    let n = transfer.len();
    set.items.extend(transfer);
    match &mut set.targets {
        Targets::Classes(c) => c.extend(std::iter::repeat_n(0, n)),
        Targets::Scores(s) => s.extend(std::iter::repeat_n(0.0, n)),
    }
    set
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn transfer_texts_that_repeat_a_training_row_are_counted() {
        let row = |ids: &[u32], types: &[u32]| Encoded { ids: ids.to_vec(), type_ids: types.to_vec() };
        let train = [row(&[101, 7, 102], &[0, 0, 0]), row(&[101, 8, 102, 9, 102], &[0, 0, 0, 1, 1])];
        let texts = [
            row(&[101, 7, 102], &[0, 0, 0]),
            row(&[101, 7, 102], &[0, 0, 0]),
            row(&[101, 8, 102, 9, 102], &[0, 0, 0, 0, 0]), // the same tokens as one text, not a pair
            row(&[101, 9, 102], &[0, 0, 0]),
        ];
        assert_eq!(repeated_rows(&train, &texts), 2);
        assert_eq!(repeated_rows(&train, &texts[2..]), 0);
    }

    fn fingerprint(line: &[&str]) -> Fingerprint {
        let mut args = parse(line);
        args.methods.fill_defaults();
        args.fingerprint().unwrap()
    }

    fn same(a: &Fingerprint, b: &Fingerprint) -> Result<()> {
        a.check_resumes(b, Path::new("run.json"))
    }

    fn parse(line: &[&str]) -> Args {
        Cli::try_parse_from([&["distill"], line].concat()).unwrap().args
    }

    /// cr-ild's consistency ramp runs over the stage-1 epochs, not --epochs.
    #[test]
    fn cr_ild_ramps_over_the_stage1_epochs() {
        use kd_methods::methods::cr_ild::consistency_weight;
        let cfg =
            parse(&["--method", "cr-ild", "--epochs", "5", "--stage1-epochs", "3", "--w-ic", "0.2"]).cr_ild_config();
        assert_eq!((cfg.epochs, cfg.w_ic), (3, 0.2));
        // The last stage-1 epoch (2 of 0..3) reaches 2/3 of w_ic (2/5 if it ramped over --epochs).
        assert_eq!(consistency_weight(cfg.w_ic, 2, cfg.epochs), 0.2 * 2.0 / 3.0);
        let cfg = parse(&["--method", "cr-ild", "--epochs", "4"]).cr_ild_config();
        assert_eq!((cfg.epochs, cfg.w_ic), (4, 0.1));
    }

    /// A default given explicitly resumes a run that left it out; a changed method flag does
    /// not, and the error names it; method paths are not in the fingerprint.
    #[test]
    fn method_flags_in_the_fingerprint() {
        let base = ["--method", "mate-kd", "--generator", "g1"];
        let with = |extra: &[&'static str]| fingerprint(&[&base[..], extra].concat());
        let plain = with(&[]);
        same(&plain, &with(&["--mask-rate", "0.3", "--generator-steps", "10", "--divergence", "ce"])).unwrap();
        same(&plain, &fingerprint(&["--method", "mate-kd", "--generator", "elsewhere/g2"])).unwrap();
        for (flag, value, was) in [
            ("--mask-rate", "0.5", "0.3"),
            ("--generator-steps", "3", "10"),
            ("--student-steps", "7", "100"),
            ("--generator-lr", "1e-6", "0.0000005"),
            ("--divergence", "kl", "ce"),
        ] {
            let err = format!("{:#}", same(&with(&[flag, value]), &plain).unwrap_err());
            assert!(err.contains(&format!("{flag} was {was} and is now")), "{err}");
        }
        let cr = |extra: &[&'static str]| fingerprint(&[&["--method", "cr-ild"][..], extra].concat());
        same(&cr(&["--w-ic", "0.1", "--objective", "ah"]), &cr(&[])).unwrap();
        let err = format!("{:#}", same(&cr(&["--w-ic", "0.2"]), &cr(&[])).unwrap_err());
        assert!(err.contains("--w-ic was 0.1 and is now 0.2"), "{err}");
        let err = format!("{:#}", same(&cr(&["--objective", "qkv"]), &cr(&[])).unwrap_err());
        assert!(err.contains("--objective was ah and is now qkv"), "{err}");
    }

    /// --group-by-length changes the batches, so it is in the fingerprint, but only when given:
    /// a run from before the flag existed has no such key and still resumes.
    #[test]
    fn group_by_length_is_fingerprinted_only_when_given() {
        let plain = fingerprint(&["--method", "kd"]);
        assert!(!plain.0.contains_key("--group-by-length"), "{:?}", plain.0);
        let grouped = fingerprint(&["--method", "kd", "--group-by-length"]);
        assert_eq!(grouped.0.get("--group-by-length").map(String::as_str), Some("true"));
        same(&grouped, &plain).unwrap_err();
    }
}
