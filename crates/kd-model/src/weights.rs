//! BERT parameters in structs that mirror HF's module tree, so loading and saving are a
//! mechanical walk over HF names. Every walk (build, visit) names a parameter by its
//! `BertForSequenceClassification` / `BertForMaskedLM` key, e.g.
//! `bert.encoder.layer.3.attention.self.query.weight`, `classifier.bias`, `cls.predictions.bias`.
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};

use kd_kernels::io::HostArray;
use kd_kernels::rng::Rng;
use kd_kernels::{Device, Tensor};

use crate::family::Family;
use crate::{BertConfig, Error, Result};

/// A dense layer, `y = x W^T + b` with `weight` `[out, in]` (PyTorch's layout).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
}

#[derive(Debug)]
pub struct Embeddings {
    /// `[vocab, hidden]`; also the MLM decoder's weight (tied).
    pub word_embeddings: Tensor,
    pub position_embeddings: Tensor,
    /// `None` for DistilBERT, which has no token types.
    pub token_type_embeddings: Option<Tensor>,
    pub layer_norm: LayerNorm,
    /// ELECTRA's `embeddings_project` from the embedding width to the hidden width, when they
    /// differ.
    pub project: Option<Linear>,
}

/// One encoder layer (HF `BertLayer`).
#[derive(Debug)]
pub struct Layer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attention_output: Linear,
    pub attention_layer_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_layer_norm: LayerNorm,
}

/// HF `BertLMPredictionHead`; the decoder is tied to the word embeddings, so only its bias
/// (`[vocab]`) is stored here.
#[derive(Debug)]
pub struct MlmHead {
    pub transform: Linear,
    pub layer_norm: LayerNorm,
    pub bias: Tensor,
}

#[derive(Debug)]
pub struct BertWeights {
    pub embeddings: Embeddings,
    pub layers: Vec<Layer>,
    pub pooler: Option<Linear>,
    pub classifier: Option<Linear>,
    pub mlm_head: Option<MlmHead>,
}

// The HF names, shared by `build` and `walk!` so both spell them the same way.
const WORD_EMBEDDINGS: &str = "bert.embeddings.word_embeddings.weight";
const POSITION_EMBEDDINGS: &str = "bert.embeddings.position_embeddings.weight";
const TOKEN_TYPE_EMBEDDINGS: &str = "bert.embeddings.token_type_embeddings.weight";
const EMBEDDINGS_LAYER_NORM: &str = "bert.embeddings.LayerNorm";
const EMBEDDINGS_PROJECT: &str = "bert.embeddings_project";
const LAYER: &str = "bert.encoder.layer.";
const QUERY: &str = "attention.self.query";
const KEY: &str = "attention.self.key";
const VALUE: &str = "attention.self.value";
const ATTENTION_OUTPUT: &str = "attention.output.dense";
const ATTENTION_LAYER_NORM: &str = "attention.output.LayerNorm";
const INTERMEDIATE: &str = "intermediate.dense";
const OUTPUT: &str = "output.dense";
const OUTPUT_LAYER_NORM: &str = "output.LayerNorm";
const POOLER: &str = "bert.pooler.dense";
const CLASSIFIER: &str = "classifier";
pub(crate) const MLM_TRANSFORM: &str = "cls.predictions.transform.dense";
pub(crate) const MLM_LAYER_NORM: &str = "cls.predictions.transform.LayerNorm";
pub(crate) const MLM_BIAS: &str = "cls.predictions.bias";
const MLM_DECODER_WEIGHT: &str = "cls.predictions.decoder.weight";
const MLM_DECODER_BIAS: &str = "cls.predictions.decoder.bias";

/// The sizes and heads that fix a `BertWeights`' structure.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dims {
    vocab: usize,
    /// The embedding tables' width (ELECTRA's `embedding_size`; `hidden` elsewhere).
    embedding: usize,
    hidden: usize,
    intermediate: usize,
    max_positions: usize,
    /// 0: no token type embeddings.
    type_vocab: usize,
    layers: usize,
    pooler: bool,
    labels: Option<usize>,
    mlm: bool,
}

impl Dims {
    fn of_config(c: &BertConfig, pooler: bool, labels: Option<usize>, mlm: bool) -> Dims {
        Dims {
            vocab: c.vocab_size,
            embedding: c.embedding_size(),
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            max_positions: c.max_position_embeddings,
            type_vocab: c.type_vocab_size,
            layers: c.num_hidden_layers,
            pooler,
            labels,
            mlm,
        }
    }
}

/// Makes the tensor called `name` with `shape`: the one hook `build` calls per parameter.
type Make<'a> = dyn FnMut(&str, &[usize]) -> Result<Tensor> + 'a;

fn pair(make: &mut Make, prefix: &str, weight: &[usize], bias: usize) -> Result<(Tensor, Tensor)> {
    Ok((make(&format!("{prefix}.weight"), weight)?, make(&format!("{prefix}.bias"), &[bias])?))
}

fn linear(make: &mut Make, prefix: &str, out: usize, input: usize) -> Result<Linear> {
    let (weight, bias) = pair(make, prefix, &[out, input], out)?;
    Ok(Linear { weight, bias })
}

fn layer_norm(make: &mut Make, prefix: &str, dim: usize) -> Result<LayerNorm> {
    let (weight, bias) = pair(make, prefix, &[dim], dim)?;
    Ok(LayerNorm { weight, bias })
}

fn mlm_head(make: &mut Make, vocab: usize, hidden: usize) -> Result<MlmHead> {
    Ok(MlmHead {
        transform: linear(make, MLM_TRANSFORM, hidden, hidden)?,
        layer_norm: layer_norm(make, MLM_LAYER_NORM, hidden)?,
        bias: make(MLM_BIAS, &[vocab])?,
    })
}

/// Calls `$f(name, &tensor)` (or `&mut tensor` when given `mut`) on every parameter, in the
/// order `build` creates them; `$f` returns a `Result` and the first error stops the walk.
macro_rules! walk {
    ($w:ident, $f:ident, $($m:tt)?) => {{
        macro_rules! pair {
            ($prefix:expr, $p:expr) => {{
                let prefix = $prefix;
                $f(&format!("{prefix}.weight"), &$($m)? $p.weight)?;
                $f(&format!("{prefix}.bias"), &$($m)? $p.bias)?;
            }};
        }
        let e = &$($m)? $w.embeddings;
        $f(WORD_EMBEDDINGS, &$($m)? e.word_embeddings)?;
        $f(POSITION_EMBEDDINGS, &$($m)? e.position_embeddings)?;
        if let Some(t) = &$($m)? e.token_type_embeddings {
            $f(TOKEN_TYPE_EMBEDDINGS, t)?;
        }
        pair!(EMBEDDINGS_LAYER_NORM, e.layer_norm);
        if let Some(p) = &$($m)? e.project {
            pair!(EMBEDDINGS_PROJECT, p);
        }
        for (i, l) in (&$($m)? $w.layers).into_iter().enumerate() {
            pair!(format!("{LAYER}{i}.{QUERY}"), l.query);
            pair!(format!("{LAYER}{i}.{KEY}"), l.key);
            pair!(format!("{LAYER}{i}.{VALUE}"), l.value);
            pair!(format!("{LAYER}{i}.{ATTENTION_OUTPUT}"), l.attention_output);
            pair!(format!("{LAYER}{i}.{ATTENTION_LAYER_NORM}"), l.attention_layer_norm);
            pair!(format!("{LAYER}{i}.{INTERMEDIATE}"), l.intermediate);
            pair!(format!("{LAYER}{i}.{OUTPUT}"), l.output);
            pair!(format!("{LAYER}{i}.{OUTPUT_LAYER_NORM}"), l.output_layer_norm);
        }
        if let Some(p) = &$($m)? $w.pooler {
            pair!(POOLER, p);
        }
        if let Some(c) = &$($m)? $w.classifier {
            pair!(CLASSIFIER, c);
        }
        if let Some(h) = &$($m)? $w.mlm_head {
            pair!(MLM_TRANSFORM, h.transform);
            pair!(MLM_LAYER_NORM, h.layer_norm);
            $f(MLM_BIAS, &$($m)? h.bias)?;
        }
        Ok(())
    }};
}

impl BertWeights {
    /// Creates every parameter of the structure `d` describes through `make`, in walk order.
    fn build(d: &Dims, make: &mut Make) -> Result<BertWeights> {
        let (e, h, i) = (d.embedding, d.hidden, d.intermediate);
        let embeddings = Embeddings {
            word_embeddings: make(WORD_EMBEDDINGS, &[d.vocab, e])?,
            position_embeddings: make(POSITION_EMBEDDINGS, &[d.max_positions, e])?,
            token_type_embeddings: (d.type_vocab > 0)
                .then(|| make(TOKEN_TYPE_EMBEDDINGS, &[d.type_vocab, e]))
                .transpose()?,
            layer_norm: layer_norm(make, EMBEDDINGS_LAYER_NORM, e)?,
            project: (e != h).then(|| linear(make, EMBEDDINGS_PROJECT, h, e)).transpose()?,
        };
        let layers = (0..d.layers)
            .map(|n| {
                let p = |part: &str| format!("{LAYER}{n}.{part}");
                Ok(Layer {
                    query: linear(make, &p(QUERY), h, h)?,
                    key: linear(make, &p(KEY), h, h)?,
                    value: linear(make, &p(VALUE), h, h)?,
                    attention_output: linear(make, &p(ATTENTION_OUTPUT), h, h)?,
                    attention_layer_norm: layer_norm(make, &p(ATTENTION_LAYER_NORM), h)?,
                    intermediate: linear(make, &p(INTERMEDIATE), i, h)?,
                    output: linear(make, &p(OUTPUT), h, i)?,
                    output_layer_norm: layer_norm(make, &p(OUTPUT_LAYER_NORM), h)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(BertWeights {
            embeddings,
            layers,
            pooler: d.pooler.then(|| linear(make, POOLER, h, h)).transpose()?,
            classifier: d.labels.map(|n| linear(make, CLASSIFIER, n, h)).transpose()?,
            mlm_head: d.mlm.then(|| mlm_head(make, d.vocab, h)).transpose()?,
        })
    }

    /// The structure of `self`, read off its tensors' shapes.
    fn dims(&self) -> Dims {
        let dim = |t: &Tensor, axis: usize| t.shape().get(axis).copied().unwrap_or(0);
        let e = &self.embeddings;
        Dims {
            vocab: dim(&e.word_embeddings, 0),
            embedding: dim(&e.word_embeddings, 1),
            hidden: self.layers.first().map_or(dim(&e.word_embeddings, 1), |l| dim(&l.query.weight, 0)),
            intermediate: self.layers.first().map_or(0, |l| dim(&l.intermediate.weight, 0)),
            max_positions: dim(&e.position_embeddings, 0),
            type_vocab: e.token_type_embeddings.as_ref().map_or(0, |t| dim(t, 0)),
            layers: self.layers.len(),
            pooler: self.pooler.is_some(),
            labels: self.classifier.as_ref().map(|c| dim(&c.weight, 0)),
            mlm: self.mlm_head.is_some(),
        }
    }

    /// Every parameter with its HF name, in a fixed order (the same for equal structures, so
    /// parameters, gradients and optimizer moments can be walked side by side).
    pub fn visit<'a>(&'a self, f: &mut impl FnMut(&str, &'a Tensor)) {
        let Ok(()) = self.try_visit(&mut |name, t| -> std::result::Result<(), Infallible> {
            f(name, t);
            Ok(())
        });
    }

    /// [`visit`](Self::visit) with mutable access; the references live as long as the borrow of
    /// `self`, so a caller can collect them (e.g. the Adam moments) and walk several side by side.
    pub fn visit_mut<'a>(&'a mut self, f: &mut impl FnMut(&str, &'a mut Tensor)) {
        let Ok(()) = self.try_visit_mut(&mut |name, t| -> std::result::Result<(), Infallible> {
            f(name, t);
            Ok(())
        });
    }

    /// [`visit`](Self::visit) for fallible work (device copies, ops): stops at the first error.
    pub fn try_visit<'a, E>(
        &'a self,
        f: &mut impl FnMut(&str, &'a Tensor) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        walk!(self, f,)
    }

    pub fn try_visit_mut<'a, E>(
        &'a mut self,
        f: &mut impl FnMut(&str, &'a mut Tensor) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        walk!(self, f, mut)
    }

    /// Whether AdamW decays the parameter `name`: not biases and LayerNorm (as HF's Trainer).
    /// Every parameter with its HF name, in the walk order (the same for every weight set).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v = Vec::new();
        self.visit_mut(&mut |name, t| v.push((name.to_string(), t)));
        v
    }

    /// Sets every tensor to zero (gradient buffers, once per step).
    pub fn zero(&mut self) -> Result<()> {
        self.try_visit_mut(&mut |_, t| t.fill(0.0))?;
        Ok(())
    }

    pub fn decays(name: &str) -> bool {
        !(name.ends_with(".bias") || name.contains("LayerNorm"))
    }

    pub fn num_params(&self) -> usize {
        let mut n = 0;
        self.visit(&mut |_, t| n += t.numel());
        n
    }

    fn device(&self) -> Device {
        self.embeddings.word_embeddings.device()
    }

    fn by_name(&self) -> HashMap<String, &Tensor> {
        let mut map = HashMap::new();
        self.visit(&mut |name, t| {
            map.insert(name.to_string(), t);
        });
        map
    }

    /// Zero tensors of the same structure and device: gradient and Adam-moment buffers.
    pub fn zeros_like(&self) -> Result<BertWeights> {
        let device = self.device();
        Self::build(&self.dims(), &mut |_, shape| Ok(Tensor::zeros(shape, &device)?))
    }

    pub fn try_clone(&self) -> Result<BertWeights> {
        self.select_layers(&(0..self.layers.len()).collect::<Vec<_>>())
    }

    /// A copy keeping only the encoder layers `layers` (in that order), e.g. `[0, 2, 4]` of a
    /// 6-layer teacher for a 3-layer student; embeddings and heads are copied whole.
    pub fn select_layers(&self, layers: &[usize]) -> Result<BertWeights> {
        if layers.is_empty() {
            return Err(Error::Invalid("select_layers: no layers selected".into()));
        }
        if let Some(bad) = layers.iter().find(|&&l| l >= self.layers.len()) {
            return Err(Error::Invalid(format!(
                "select_layers: layer {bad} does not exist (the model has {} layers, numbered from 0)",
                self.layers.len()
            )));
        }
        let source = self.by_name();
        let dims = Dims { layers: layers.len(), ..self.dims() };
        Self::build(&dims, &mut |name, _| {
            // `bert.encoder.layer.{j}.rest` comes from layer `layers[j]` of `self`.
            let renamed = name
                .strip_prefix(LAYER)
                .and_then(|r| r.split_once('.'))
                .and_then(|(j, rest)| Some(format!("{LAYER}{}.{rest}", layers.get(j.parse::<usize>().ok()?)?)));
            let from = renamed.as_deref().unwrap_or(name);
            let t = source.get(from).ok_or_else(|| Error::Invalid(format!("select_layers: no parameter {from}")))?;
            Ok(t.try_clone()?)
        })
    }

    /// Fresh weights of a `BertForSequenceClassification` with `num_labels` outputs, initialised
    /// as HF's `_init_weights`.
    pub fn init(config: &BertConfig, num_labels: usize, seed: u64, device: &Device) -> Result<BertWeights> {
        config.validate()?;
        if num_labels == 0 {
            return Err(Error::Invalid("init: num_labels is 0".into()));
        }
        let dims = Dims::of_config(config, true, Some(num_labels), false);
        Self::build(&dims, &mut |name, shape| init_tensor(name, shape, config, seed, device))
    }

    /// Puts a fresh classifier with `num_labels` outputs on the model, and a fresh pooler if it
    /// has none (encoder-only checkpoints such as the MiniLM sentence models); as HF does when a
    /// `BertForSequenceClassification` is made from a `BertModel`.
    pub fn init_classifier(&mut self, config: &BertConfig, num_labels: usize, seed: u64) -> Result<()> {
        if num_labels == 0 {
            return Err(Error::Invalid("init_classifier: num_labels is 0".into()));
        }
        let device = self.device();
        let make = &mut |name: &str, shape: &[usize]| init_tensor(name, shape, config, seed, &device);
        let h = config.hidden_size;
        if self.pooler.is_none() {
            self.pooler = Some(linear(make, POOLER, h, h)?);
        }
        self.classifier = Some(linear(make, CLASSIFIER, num_labels, h)?);
        Ok(())
    }

    /// Puts a fresh MLM head on the model (MATE-KD's generator is trained from one).
    pub fn init_mlm_head(&mut self, config: &BertConfig, seed: u64) -> Result<()> {
        let device = self.device();
        let make = &mut |name: &str, shape: &[usize]| init_tensor(name, shape, config, seed, &device);
        self.mlm_head = Some(mlm_head(make, config.vocab_size, config.hidden_size)?);
        Ok(())
    }

    /// Errors unless every tensor has the name and shape `config` implies.
    pub fn check(&self, config: &BertConfig) -> Result<()> {
        let labels = self.classifier.as_ref().map(|_| config.num_labels());
        let dims = Dims::of_config(config, self.pooler.is_some(), labels, self.mlm_head.is_some());
        let mut expected = BTreeMap::new();
        // Only the names and shapes are wanted: empty placeholder tensors cost nothing.
        Self::build(&dims, &mut |name, shape| {
            expected.insert(name.to_string(), shape.to_vec());
            Ok(Tensor::zeros(&[0], &Device::Cpu)?)
        })?;
        let mismatch = |detail: String| Err(Error::Invalid(format!("weights do not match the config: {detail}")));
        let mut actual = BTreeMap::new();
        self.visit(&mut |name, t| {
            actual.insert(name.to_string(), t.shape().to_vec());
        });
        for (name, shape) in &actual {
            match expected.get(name) {
                None => return mismatch(format!("tensor '{name}' is not in the configured model")),
                Some(want) if want != shape => {
                    return mismatch(format!("tensor '{name}' has shape {shape:?}, expected {want:?}"))
                }
                Some(_) => {}
            }
        }
        match expected.keys().find(|name| !actual.contains_key(*name)) {
            Some(name) => mismatch(format!("tensor '{name}' is missing")),
            None => Ok(()),
        }
    }

    /// Reads `model.safetensors` (HF names with or without the `bert.` prefix, old-style
    /// `gamma`/`beta` LayerNorm names too) onto `device`. Which heads exist is read off the file;
    /// every tensor is checked against `config`.
    pub fn load(path: &Path, config: &BertConfig, device: &Device) -> Result<BertWeights> {
        Self::from_arrays(kd_kernels::io::read_safetensors(path)?, config, device, path)
    }

    /// As [`BertWeights::load`], from arrays already read; `source` names them in errors.
    pub fn from_arrays(
        arrays: BTreeMap<String, HostArray>,
        config: &BertConfig,
        device: &Device,
        source: &Path,
    ) -> Result<BertWeights> {
        config.validate()?;
        let mut file = Checkpoint::new(source, arrays, Family::of(config))?;
        let has = |name: &str| file.tensors.contains_key(name);
        let pooler = has(&format!("{POOLER}.weight"));
        let labels = has(&format!("{CLASSIFIER}.weight")).then(|| config.num_labels());
        let mlm = has(&format!("{MLM_TRANSFORM}.weight")) || has(MLM_BIAS);
        let dims = Dims::of_config(config, pooler, labels, mlm);
        file.check_decoder(&dims)?;
        let weights = Self::build(&dims, &mut |name, shape| file.take(name, shape, device))?;
        file.finish()?;
        Ok(weights)
    }

    /// Writes `model.safetensors` with `BertForSequenceClassification` / `BertForMaskedLM`
    /// names (the tied decoder is left out, as `transformers` does), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        kd_kernels::io::write_atomic(path, &self.to_safetensors(path, Family::Bert)?)?;
        Ok(())
    }

    /// The bytes of `model.safetensors` under `family`'s names; `path` names the file in errors.
    pub fn to_safetensors(&self, path: &Path, family: Family) -> Result<Vec<u8>> {
        let mut arrays = BTreeMap::new();
        self.try_visit(&mut |name, t| -> Result<()> {
            arrays.insert(family.file_name(name), HostArray { shape: t.shape().to_vec(), data: t.to_vec()? });
            Ok(())
        })?;
        // `transformers` refuses safetensors files without a framework tag.
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        Ok(kd_kernels::io::safetensors_bytes(path, &arrays, Some(metadata))?)
    }
}

/// HF `_init_weights`: N(0, initializer_range) for matrices and embeddings, zero biases,
/// LayerNorm 1 and 0, the padding row of the word embeddings zero. Each tensor draws from its
/// own stream, seeded by `seed` and its name, so a head initialised later matches one made by
/// [`BertWeights::init`] with the same seed.
fn init_tensor(name: &str, shape: &[usize], config: &BertConfig, seed: u64, device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    let data = if name.ends_with(".bias") {
        vec![0.0; n]
    } else if name.contains("LayerNorm") {
        vec![1.0; n]
    } else {
        let name_hash =
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let mut rng = Rng::new(seed ^ name_hash);
        let mut v: Vec<f32> = (0..n).map(|_| (rng.normal() * config.initializer_range) as f32).collect();
        if name == WORD_EMBEDDINGS {
            let (pad, h) = (config.pad_token_id as usize, shape[1]);
            v[pad * h..(pad + 1) * h].fill(0.0);
        }
        v
    };
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// The tensors of a checkpoint file under their canonical names, taken one by one while the
/// model is built; what is left at the end is unknown.
struct Checkpoint {
    path: PathBuf,
    /// Whether the file names the encoder without the family's prefix (a `BertModel` file);
    /// errors then use the file's spelling.
    bare: bool,
    family: Family,
    /// canonical name -> (name in the file, array)
    tensors: BTreeMap<String, (String, HostArray)>,
}

impl Checkpoint {
    fn new(path: &Path, arrays: BTreeMap<String, HostArray>, family: Family) -> Result<Checkpoint> {
        let bare = !arrays.keys().filter_map(|k| family.canonical_name(k)).any(|k| k.starts_with("bert."));
        let mut tensors = BTreeMap::new();
        for (name, array) in arrays {
            let Some(canonical) = family.canonical_name(&name).and_then(|n| canonical_name(&n)) else { continue };
            if let Some((first, _)) = tensors.insert(canonical.clone(), (name.clone(), array)) {
                return Err(tensor_err(path, &name, format!("duplicates '{first}' (both are {canonical})")));
            }
        }
        Ok(Checkpoint { path: path.to_path_buf(), bare, family, tensors })
    }

    fn file_name(&self, canonical: &str) -> String {
        match canonical.strip_prefix("bert.").filter(|_| self.bare) {
            Some(bare) => bare.to_string(),
            None => self.family.file_name(canonical),
        }
    }

    /// The MLM decoder is tied: its weight must have the word embeddings' shape and is dropped;
    /// its bias is `cls.predictions.bias` under an older name.
    fn check_decoder(&mut self, d: &Dims) -> Result<()> {
        if let Some((name, a)) = self.tensors.remove(MLM_DECODER_WEIGHT) {
            if a.shape != [d.vocab, d.hidden] {
                return Err(shape_err(&self.path, &name, &a.shape, &[d.vocab, d.hidden]));
            }
        }
        if let Some((name, a)) = self.tensors.remove(MLM_DECODER_BIAS) {
            match self.tensors.get(MLM_BIAS) {
                Some((_, bias)) if bias.shape != a.shape => {
                    return Err(shape_err(&self.path, &name, &a.shape, &bias.shape));
                }
                Some(_) => {}
                None => {
                    self.tensors.insert(MLM_BIAS.to_string(), (name, a));
                }
            }
        }
        Ok(())
    }

    fn take(&mut self, canonical: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let Some((name, array)) = self.tensors.remove(canonical) else {
            return Err(tensor_err(&self.path, &self.file_name(canonical), "is missing"));
        };
        if array.shape != shape {
            return Err(shape_err(&self.path, &name, &array.shape, shape));
        }
        if let Some(i) = array.data.iter().position(|v| !v.is_finite()) {
            let detail = format!(
                "has the non-finite value {} at element {i}: the file is corrupt or was written by a run that diverged",
                array.data[i]
            );
            return Err(tensor_err(&self.path, &name, detail));
        }
        Ok(Tensor::from_vec(array.data, shape, device)?)
    }

    fn finish(self) -> Result<()> {
        match self.tensors.into_values().next() {
            Some((name, _)) => Err(tensor_err(
                &self.path,
                &name,
                "is unknown: not a parameter of the BERT model that config.json describes",
            )),
            None => Ok(()),
        }
    }
}

/// The name under which `build` knows a file's tensor, or `None` for tensors that carry no
/// parameter: the `position_ids` buffer and the next-sentence head of `BertForPreTraining`.
fn canonical_name(name: &str) -> Option<String> {
    let body = name.strip_prefix("bert.").unwrap_or(name);
    let mut canonical = if ["embeddings.", "encoder.", "pooler."].iter().any(|p| body.starts_with(p)) {
        format!("bert.{body}")
    } else {
        name.to_string()
    };
    if canonical == "bert.embeddings.position_ids" || canonical.starts_with("cls.seq_relationship.") {
        return None;
    }
    if canonical.contains("LayerNorm.") {
        for (old, new) in [(".gamma", ".weight"), (".beta", ".bias")] {
            if let Some(stem) = canonical.strip_suffix(old) {
                canonical = format!("{stem}{new}");
            }
        }
    }
    Some(canonical)
}

fn tensor_err(path: &Path, name: &str, detail: impl Into<String>) -> Error {
    Error::Tensor { path: path.to_path_buf(), name: name.to_string(), detail: detail.into() }
}

fn shape_err(path: &Path, name: &str, found: &[usize], expected: &[usize]) -> Error {
    tensor_err(path, name, format!("has shape {found:?}, expected {expected:?} (from config.json)"))
}

/// The tokenizer files that travel with a model, whichever are present.
const TOKENIZER_FILES: [&str; 4] = ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"];

/// Writes a HF model folder that `transformers` loads as-is: `config.json` (labels and
/// `architectures` set from the heads present), `model.safetensors`, and the tokenizer files
/// copied from beside `tokenizer_file` (the file the tokenizer was read from, which must
/// exist). The files are written as one ([`kd_kernels::io::write_files_atomic`]): a failed
/// write (a full disk) leaves the folder's old files as they were, never a new
/// model.safetensors beside an old config.json.
pub fn save_pretrained(dir: &Path, config: &BertConfig, weights: &BertWeights, tokenizer_file: &Path) -> Result<()> {
    let mut config = config.clone();
    if let Some(c) = &weights.classifier {
        config.set_num_labels(c.weight.shape().first().copied().unwrap_or(0));
    }
    weights.check(&config)?;
    let family = Family::of(&config);
    let architecture = match (&weights.classifier, &weights.mlm_head) {
        (Some(_), _) => "ForSequenceClassification",
        (None, Some(_)) => "ForMaskedLM",
        (None, None) => "Model",
    };
    let architecture = format!("{}{architecture}", family.class_prefix());
    config.extra.insert("architectures".into(), serde_json::json!([architecture]));

    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::file(p, e));
    read(tokenizer_file)?;
    let source_dir = tokenizer_file.parent().unwrap_or(Path::new("."));
    let mut tokenizer_files = Vec::new();
    for name in TOKENIZER_FILES {
        let p = source_dir.join(name);
        if p.is_file() {
            tokenizer_files.push((name, read(&p)?));
        }
    }

    let (model_path, config_path) = (dir.join("model.safetensors"), dir.join("config.json"));
    let model_bytes = weights.to_safetensors(&model_path, family)?;
    let config_text = config.to_json(&config_path)?;
    let paths: Vec<PathBuf> = tokenizer_files.iter().map(|(name, _)| dir.join(name)).collect();
    let mut files: Vec<(&Path, &[u8])> = vec![(&model_path, &model_bytes), (&config_path, config_text.as_bytes())];
    files.extend(paths.iter().zip(&tokenizer_files).map(|(p, (_, bytes))| (p.as_path(), bytes.as_slice())));
    kd_kernels::io::write_files_atomic(&files)?;
    Ok(())
}
