//! Checkpoints in Hugging Face layout: `config.json`, `model.safetensors`, `tokenizer.json`.
//! Loads tensor names with or without the `bert.` prefix; writes safetensors with a sorted
//! header (deterministic bytes) and provenance in `__metadata__`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{init_linear, BertClassifier, BertConfig, Layer, Linear, Norm};
use crate::error::{BtuError, Result};

/// A tensor as stored: safetensors dtype name, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// safetensors dtype name (`F32`, `F16`, `BF16`, `F64`, ...).
    pub dtype: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Element bytes, little-endian, row-major.
    pub data: Vec<u8>,
}

/// Contents of a safetensors file.
#[derive(Debug, Clone, Default)]
pub struct SafetensorsFile {
    /// Tensors by name, sorted.
    pub tensors: BTreeMap<String, RawTensor>,
    /// The header's `__metadata__` string map (empty when absent).
    pub metadata: BTreeMap<String, String>,
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> BtuError {
    BtuError::bad_data(
        path.display().to_string(),
        format!("corrupt safetensors file: {e}"),
    )
}

/// Read every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<SafetensorsFile> {
    parse_safetensors(&read_weights(path)?, path)
}

/// The bytes of a `model.safetensors`.
fn read_weights(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => BtuError::missing(
            path.display().to_string(),
            "the model directory needs model.safetensors",
        ),
        _ => BtuError::io(path, e),
    })
}

/// Parse safetensors `bytes` read from `path` (named in errors).
fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<SafetensorsFile> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(path, e))?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(path, e))?;
    let mut out = SafetensorsFile::default();
    if let Some(m) = meta.metadata() {
        out.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    for (name, view) in st.tensors() {
        out.tensors.insert(
            name,
            RawTensor {
                dtype: format!("{:?}", view.dtype()),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            },
        );
    }
    Ok(out)
}

/// Serialize a safetensors file with tensors and metadata in sorted order (same input, same bytes).
pub fn safetensors_bytes(file: &SafetensorsFile) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !file.metadata.is_empty() {
        header.insert("__metadata__".into(), json!(file.metadata));
    }
    let mut offset = 0usize;
    for (name, t) in &file.tensors {
        header.insert(
            name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
        );
        offset += t.data.len();
    }
    let mut h = serde_json::to_string(&serde_json::Value::Object(header))
        .expect("header serializes")
        .into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for t in file.tensors.values() {
        out.extend_from_slice(&t.data);
    }
    out
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| BtuError::io(path, e))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        _ => return None,
    })
}

/// A raw tensor as an f32 candle tensor.
pub fn to_tensor(name: &str, t: &RawTensor, src: &Path, dev: &Device) -> Result<Tensor> {
    let dt = dtype_of(&t.dtype).ok_or_else(|| {
        BtuError::bad_data(
            src.display().to_string(),
            format!("tensor {name} has unsupported dtype {}", t.dtype),
        )
    })?;
    let x = Tensor::from_raw_buffer(&t.data, dt, &t.shape, &Device::Cpu)
        .map_err(|e| corrupt(src, format!("{name}: {e}")))?
        .to_dtype(DType::F32)?;
    Ok(x.to_device(dev)?)
}

/// A candle tensor as raw f32 bytes.
pub fn from_tensor(t: &Tensor) -> Result<RawTensor> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let mut data = Vec::with_capacity(v.len() * 4);
    for x in v {
        data.extend_from_slice(&x.to_le_bytes());
    }
    Ok(RawTensor {
        dtype: "F32".into(),
        shape: t.dims().to_vec(),
        data,
    })
}

/// Files of a model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory itself.
    pub dir: PathBuf,
    /// Its parsed and validated `config.json`.
    pub config: BertConfig,
    /// Path of its `model.safetensors`.
    pub weights: PathBuf,
}

impl ModelDir {
    /// Check a model directory has `config.json` and `model.safetensors`, and parse the config.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(BtuError::missing(
                dir.display().to_string(),
                "give a model directory (config.json, model.safetensors, tokenizer.json)",
            ));
        }
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BtuError::missing(
                cfg_path.display().to_string(),
                "the model directory needs config.json",
            ),
            _ => BtuError::io(&cfg_path, e),
        })?;
        let config = BertConfig::from_json(&text, &cfg_path.display().to_string())?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(BtuError::missing(
                weights.display().to_string(),
                "the model directory has no weights; it needs model.safetensors",
            ));
        }
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// Whether the weights hold a classification head (`classifier.weight`), read from the
    /// safetensors header alone.
    pub fn has_head(&self) -> Result<bool> {
        use std::io::Read;
        let io = |e| BtuError::io(&self.weights, e);
        let mut f = std::fs::File::open(&self.weights).map_err(io)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io)?;
        let len = u64::from_le_bytes(len);
        let size = f.metadata().map_err(io)?.len();
        if len > size.saturating_sub(8) {
            return Err(corrupt(
                &self.weights,
                format!("header of {len} bytes in a file of {size}"),
            ));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header).map_err(io)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| corrupt(&self.weights, e))?;
        Ok(header.contains_key(&self.config.family.head_weight()))
    }
}

/// The classes a model trains with: `num_labels` when given; a trained head's (`config`, what
/// its config says); for a base model without a head, enough for `needed` labels (the corpus's
/// largest + 1), never fewer than its config says.
pub fn classes(num_labels: Option<usize>, config: usize, head: bool, needed: usize) -> usize {
    match num_labels {
        Some(n) => n,
        None if head => config,
        None => config.max(needed),
    }
}

/// Refuse a `suspect` classifier that was not fine-tuned from `base`: its word-embedding matrix
/// must have the base's shape (vocabulary and width) and its tokenizer must give every token the
/// base's id, or the repair would compare and overwrite unrelated rows. Returns the suspect's
/// directory.
pub fn check_fine_tuned_from(suspect: &Path, base: &Path) -> Result<ModelDir> {
    let (s, b) = (ModelDir::open(suspect)?, ModelDir::open(base)?);
    let src = suspect.display().to_string();
    let fix = format!(
        "give the classifier fine-tuned from {} (or that model as the base)",
        base.display()
    );
    for (what, ours, theirs) in [
        ("vocab_size", s.config.vocab_size, b.config.vocab_size),
        ("hidden_size", s.config.hidden_size, b.config.hidden_size),
    ] {
        if ours != theirs {
            return Err(BtuError::bad_data(
                src,
                format!("{what} is {ours} but the base model's is {theirs}; {fix}"),
            ));
        }
    }
    let tokens = |p: &Path| -> Result<std::collections::HashMap<String, u32>> {
        Ok(crate::model::tokenizer::BtuTokenizer::load(p)?
            .inner()
            .get_vocab(true))
    };
    let (ts, tb) = (tokens(suspect)?, tokens(base)?);
    if ts != tb {
        let differ = tb.iter().filter(|(t, id)| ts.get(*t) != Some(id)).count()
            + ts.keys().filter(|t| !tb.contains_key(*t)).count();
        return Err(BtuError::bad_data(
            src,
            format!("its tokenizer differs from the base model's ({differ} tokens missing or with other ids); {fix}"),
        ));
    }
    Ok(s)
}

/// Refuse a tokenizer of another family's kind: BERT and DistilBERT read WordPiece pieces,
/// RoBERTa byte-level BPE tokens; the ids of one mean nothing to the other's embeddings.
fn check_tokenizer_kind(
    tok: &crate::model::tokenizer::BtuTokenizer,
    family: super::Family,
    dir: &Path,
) -> Result<()> {
    use tokenizers::models::ModelWrapper;
    let kind = match tok.inner().get_model() {
        ModelWrapper::WordPiece(_) => "WordPiece",
        ModelWrapper::BPE(_) => "BPE",
        _ => return Ok(()),
    };
    let wanted = if family.byte_level() {
        "BPE"
    } else {
        "WordPiece"
    };
    if kind != wanted {
        return Err(BtuError::bad_data(
            dir.display().to_string(),
            format!(
                "its tokenizer is {kind} but a {} model reads {wanted} tokens: the tokenizer does not belong to the model; give the model's own tokenizer.json",
                family.model_type()
            ),
        ));
    }
    Ok(())
}

/// A model directory read once: its config, tokenizer and weights (the file read a single time,
/// its sha256 from the same bytes). Every step that reads a model directory starts here.
pub struct Checkpoint {
    /// The directory and its validated config.
    pub dir: ModelDir,
    /// Its tokenizer (no more tokens than the config's vocabulary).
    pub tokenizer: crate::model::tokenizer::BtuTokenizer,
    /// Its weights and metadata.
    pub weights: SafetensorsFile,
    /// sha256 (hex) of `model.safetensors`.
    pub sha256: String,
}

impl Checkpoint {
    /// Whether the weights hold a classification head (`classifier.weight`).
    pub fn has_head(&self) -> bool {
        self.weights
            .tensors
            .contains_key(&self.dir.config.family.head_weight())
    }

    /// The largest label a corpus may have for this model: below `--num-labels` when given,
    /// below the head's classes when it has one; any (a base model gets a head that fits).
    pub fn label_bound(&self, num_labels: Option<usize>) -> usize {
        match num_labels {
            Some(n) => n,
            None if self.has_head() => self.dir.config.labels(),
            None => usize::MAX,
        }
    }

    /// The classes a step trains with: `--num-labels` when given; the head's when the model has
    /// one; for a base model without a head, enough for the corpus's labels (`labels`: largest
    /// + 1), never fewer than its config says.
    pub fn classes(&self, num_labels: Option<usize>, labels: &[u32]) -> usize {
        let needed = labels.iter().max().map_or(0, |&l| l as usize + 1);
        classes(
            num_labels,
            self.dir.config.labels(),
            self.has_head(),
            needed,
        )
    }

    /// Open `dir`: config, tokenizer and weights, each checked.
    pub fn read(dir: &Path) -> Result<Self> {
        let md = ModelDir::open(dir)?;
        let tokenizer = crate::model::tokenizer::BtuTokenizer::load(dir)?;
        check_tokenizer_kind(&tokenizer, md.config.family, dir)?;
        if tokenizer.vocab_size() > md.config.vocab_size {
            return Err(BtuError::bad_data(
                dir.display().to_string(),
                format!(
                    "tokenizer has {} tokens but the model's vocab_size is {}; give the tokenizer the model was made with",
                    tokenizer.vocab_size(),
                    md.config.vocab_size
                ),
            ));
        }
        let bytes = read_weights(&md.weights)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let weights = parse_safetensors(&bytes, &md.weights)?;
        Ok(Checkpoint {
            dir: md,
            tokenizer,
            weights,
            sha256,
        })
    }

    /// `--max-len` must fit the model's position embeddings.
    pub fn check_max_len(&self, flag: &str, max_len: usize) -> Result<()> {
        crate::validate::max_len(flag, max_len, Some(self.dir.config.max_len()))
    }

    /// The classifier ([`classifier_from`]).
    pub fn classifier(
        &self,
        num_labels: Option<usize>,
        head_seed: u64,
        dev: &Device,
    ) -> Result<BertClassifier> {
        classifier_from(&self.dir, &self.weights, num_labels, head_seed, dev)
    }
}

/// Find a tensor under its canonical (BERT, unprefixed) name: any name the family gives it.
fn find<'a>(
    file: &'a SafetensorsFile,
    family: super::Family,
    canonical: &str,
) -> Option<(&'a String, &'a RawTensor)> {
    family
        .names(canonical)
        .iter()
        .find_map(|c| file.tensors.get_key_value(c))
}

/// Load a classifier from a model directory. A missing pooler or classification head (or one
/// with another number of classes than `num_labels`) is initialised from `head_seed`.
pub fn load_model(
    md: &ModelDir,
    num_labels: Option<usize>,
    head_seed: u64,
    dev: &Device,
) -> Result<BertClassifier> {
    classifier_from(
        md,
        &read_safetensors(&md.weights)?,
        num_labels,
        head_seed,
        dev,
    )
}

/// The classifier of a model directory whose weights are `file`. A missing pooler or
/// classification head (or one with another number of classes than `num_labels`) is initialised
/// from `head_seed`.
pub fn classifier_from(
    md: &ModelDir,
    file: &SafetensorsFile,
    num_labels: Option<usize>,
    head_seed: u64,
    dev: &Device,
) -> Result<BertClassifier> {
    let mut config = md.config.clone();
    let labels = num_labels.unwrap_or_else(|| config.labels());
    config.set_labels(labels);
    let w = Weights {
        file,
        src: &md.weights,
        dev,
        h: config.hidden_size,
        family: config.family,
    };
    let h = w.h;
    let word = w.need("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
    let position = w.need(
        "embeddings.position_embeddings.weight",
        &[config.max_position_embeddings, h],
    )?;
    let token_type = if config.family.has_token_types() {
        Some(w.need(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?)
    } else {
        None
    };
    let decoder = config.family.is_decoder();
    let emb_norm = (!decoder)
        .then(|| w.norm("embeddings.LayerNorm"))
        .transpose()?;
    let layers = (0..config.num_hidden_layers)
        .map(|i| match decoder {
            true => w.decoder_layer(i, config.intermediate_size),
            false => w.layer(i, config.intermediate_size),
        })
        .collect::<Result<Vec<_>>>()?;
    let final_norm = decoder
        .then(|| w.norm(super::family::FINAL_NORM))
        .transpose()?;
    let mut rng = ChaCha8Rng::seed_from_u64(head_seed);
    let pooler = (!decoder).then(|| w.pooler(&mut rng)).transpose()?;
    let replace_head = num_labels.is_some_and(|n| n != md.config.labels());
    let classifier = w.head(labels, replace_head, &mut rng)?;
    Ok(BertClassifier {
        compute: word.dtype(),
        config,
        word,
        position,
        token_type,
        emb_norm,
        final_norm,
        layers,
        pooler,
        classifier,
    })
}

/// A checkpoint's tensors, checked (shape from config.json, finite) and moved to the device.
struct Weights<'a> {
    file: &'a SafetensorsFile,
    src: &'a Path,
    dev: &'a Device,
    /// Hidden size.
    h: usize,
    /// The family naming the tensors.
    family: super::Family,
}

impl Weights<'_> {
    fn bad(&self, why: String) -> BtuError {
        BtuError::bad_data(self.src.display().to_string(), why)
    }

    /// The tensor of canonical name `name` (under any of the family's names), `None` when
    /// absent.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some((full, raw)) = find(self.file, self.family, name) else {
            return Ok(None);
        };
        if raw.shape != shape {
            return Err(self.bad(format!(
                "tensor {full} has shape {:?}, config.json implies {:?}",
                raw.shape, shape
            )));
        }
        let t = to_tensor(full, raw, self.src, &Device::Cpu)?;
        if !t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite())
        {
            return Err(self.bad(format!("tensor {full} holds NaN or infinite values")));
        }
        Ok(Some(t.to_device(self.dev)?))
    }

    /// The tensor `name`, which the model cannot do without.
    fn need(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)?.ok_or_else(|| {
            let names = self.family.names(name);
            self.bad(format!(
                "missing tensor {} of a {} model",
                names.first().map_or(name, |n| n.as_str()),
                self.family.model_type()
            ))
        })
    }

    fn lin(&self, p: &str, inp: usize, out: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.need(&format!("{p}.weight"), &[out, inp])?,
            b: self.need(&format!("{p}.bias"), &[out])?,
        })
    }

    fn norm(&self, p: &str) -> Result<Norm> {
        Ok(Norm {
            w: self.need(&format!("{p}.weight"), &[self.h])?,
            b: self.need(&format!("{p}.bias"), &[self.h])?,
        })
    }

    /// Encoder layer `i`.
    fn layer(&self, i: usize, intermediate: usize) -> Result<Layer> {
        let (p, h) = (format!("encoder.layer.{i}"), self.h);
        Ok(Layer {
            query: self.lin(&format!("{p}.attention.self.query"), h, h)?,
            key: self.lin(&format!("{p}.attention.self.key"), h, h)?,
            value: self.lin(&format!("{p}.attention.self.value"), h, h)?,
            attn_out: self.lin(&format!("{p}.attention.output.dense"), h, h)?,
            attn_norm: self.norm(&format!("{p}.attention.output.LayerNorm"))?,
            intermediate: self.lin(&format!("{p}.intermediate.dense"), h, intermediate)?,
            output: self.lin(&format!("{p}.output.dense"), intermediate, h)?,
            out_norm: self.norm(&format!("{p}.output.LayerNorm"))?,
        })
    }

    /// A decoder's block `i` (GPT-2): its Conv1D weights (`[in, out]`) as linear layers, its
    /// fused query/key/value projection split in three.
    fn decoder_layer(&self, i: usize, intermediate: usize) -> Result<Layer> {
        let (p, h) = (format!("encoder.layer.{i}"), self.h);
        let qkv = format!("{p}.{}", super::family::QKV);
        let w = self.need(&format!("{qkv}.weight"), &[h, 3 * h])?.t()?;
        let b = self.need(&format!("{qkv}.bias"), &[3 * h])?;
        let part = |k: usize| -> Result<Linear> {
            Ok(Linear {
                w: w.narrow(0, k * h, h)?.contiguous()?,
                b: b.narrow(0, k * h, h)?.contiguous()?,
            })
        };
        Ok(Layer {
            query: part(0)?,
            key: part(1)?,
            value: part(2)?,
            attn_out: self.conv1d(&format!("{p}.attention.output.dense"), h, h)?,
            attn_norm: self.norm(&format!("{p}.attention.output.LayerNorm"))?,
            intermediate: self.conv1d(&format!("{p}.intermediate.dense"), h, intermediate)?,
            output: self.conv1d(&format!("{p}.output.dense"), intermediate, h)?,
            out_norm: self.norm(&format!("{p}.output.LayerNorm"))?,
        })
    }

    /// A Conv1D (`weight` `[in, out]`, GPT-2) as a linear layer (`[out, in]`).
    fn conv1d(&self, p: &str, inp: usize, out: usize) -> Result<Linear> {
        Ok(Linear {
            w: self
                .need(&format!("{p}.weight"), &[inp, out])?
                .t()?
                .contiguous()?,
            b: self.need(&format!("{p}.bias"), &[out])?,
        })
    }

    /// The pooler, seeded from `rng` when the checkpoint has none.
    fn pooler(&self, rng: &mut ChaCha8Rng) -> Result<Linear> {
        let h = self.h;
        match (
            self.get("pooler.dense.weight", &[h, h])?,
            self.get("pooler.dense.bias", &[h])?,
        ) {
            (Some(w), Some(b)) => Ok(Linear { w, b }),
            _ => {
                tracing::info!(
                    "{}: no pooler weights; initialising a seeded pooler",
                    self.src.display()
                );
                init_linear(rng, h, h, self.dev)
            }
        }
    }

    /// The `labels`-class head: the checkpoint's when it fits, seeded from `rng` when it has
    /// none or `replace` (another class count was asked for), an error when it does not fit.
    fn head(&self, labels: usize, replace: bool, rng: &mut ChaCha8Rng) -> Result<Linear> {
        if self.family.is_decoder() {
            return self.decoder_head(labels, replace, rng);
        }
        let h = self.h;
        let raw = |n: &str| find(self.file, self.family, n).map(|(_, t)| t);
        match (raw("classifier.weight"), raw("classifier.bias")) {
            (Some(w), Some(b)) if w.shape == [labels, h] && b.shape == [labels] => Ok(Linear {
                w: self.need("classifier.weight", &[labels, h])?,
                b: self.need("classifier.bias", &[labels])?,
            }),
            (None, None) => {
                tracing::info!(
                    "{}: initialising a seeded {labels}-class head",
                    self.src.display()
                );
                init_linear(rng, h, labels, self.dev)
            }
            (Some(w), _) if replace && w.shape.len() == 2 => {
                // The caller asked for another number of classes than the checkpoint's: a new head.
                tracing::info!(
                    "{}: replacing the {}-class head by a seeded {labels}-class head (--num-labels)",
                    self.src.display(),
                    w.shape[0]
                );
                init_linear(rng, h, labels, self.dev)
            }
            (w, b) => {
                let shape = |t: Option<&RawTensor>| {
                    t.map_or("missing".to_string(), |t| format!("{:?}", t.shape))
                };
                Err(self.bad(format!(
                    "classifier head does not fit the model: classifier.weight {}, classifier.bias {}, expected [{labels}, {h}] and [{labels}] (num_labels {labels} in config.json); fix config.json or the checkpoint",
                    shape(w),
                    shape(b)
                )))
            }
        }
    }
}

impl Weights<'_> {
    /// A decoder's head (GPT-2's `score`, no bias): the checkpoint's when it fits, seeded from
    /// `rng` when it has none or `replace`; its bias is zeros, not a parameter.
    fn decoder_head(&self, labels: usize, replace: bool, rng: &mut ChaCha8Rng) -> Result<Linear> {
        let h = self.h;
        let zeros = Tensor::zeros(labels, candle_core::DType::F32, self.dev)?;
        match find(self.file, self.family, "classifier.weight").map(|(_, t)| t) {
            Some(w) if w.shape == [labels, h] => Ok(Linear {
                w: self.need("classifier.weight", &[labels, h])?,
                b: zeros,
            }),
            Some(w) if !(replace && w.shape.len() == 2) => Err(self.bad(format!(
                "classifier head does not fit the model: score.weight {:?}, expected [{labels}, {h}] (num_labels {labels} in config.json); fix config.json or the checkpoint",
                w.shape
            ))),
            _ => {
                tracing::info!(
                    "{}: initialising a seeded {labels}-class head",
                    self.src.display()
                );
                Ok(Linear {
                    b: zeros,
                    ..init_linear(rng, h, labels, self.dev)?
                })
            }
        }
    }
}

/// Write `config.json` and `model.safetensors` with the family's Hugging Face names (for BERT
/// `BertForSequenceClassification`'s: `bert.` prefix on the encoder, `classifier.*` bare) into
/// `dir`.
pub fn save_model(
    model: &BertClassifier,
    dir: &Path,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    let mut file = SafetensorsFile {
        metadata,
        ..Default::default()
    };
    file.metadata.insert("format".into(), "pt".into());
    for (name, t) in family_tensors(model)? {
        let raw = raw_finite(dir, &name, &t)?;
        file.tensors.insert(name, raw);
    }
    let p = dir.join("model.safetensors");
    std::fs::write(&p, safetensors_bytes(&file)).map_err(|e| BtuError::io(&p, e))?;
    let p = dir.join("config.json");
    std::fs::write(&p, model.config.to_json()?).map_err(|e| BtuError::io(&p, e))?;
    Ok(())
}

/// A tensor as raw bytes, refusing non-finite values.
fn raw_finite(dir: &Path, name: &str, t: &Tensor) -> Result<RawTensor> {
    let raw = from_tensor(t)?;
    crate::validate::finite(
        &dir.display().to_string(),
        name,
        raw.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
    )?;
    Ok(raw)
}

/// The model's tensors under the family's names, in the family's layout: a decoder's (GPT-2)
/// Conv1D weights as `[in, out]` and query/key/value joined into one projection.
fn family_tensors(model: &BertClassifier) -> Result<Vec<(String, Tensor)>> {
    let family = model.config.family;
    let name_of = |canonical: &str| {
        family.names(canonical).into_iter().next().ok_or_else(|| {
            BtuError::internal(format!("no {} name for {canonical}", family.model_type()))
        })
    };
    let decoder = family.is_decoder();
    let mut out = Vec::new();
    for (name, t) in model.named() {
        if decoder && name.contains(".attention.self.") {
            continue; // joined below
        }
        let conv1d =
            decoder && name.starts_with("encoder.layer.") && name.ends_with("dense.weight");
        let t = if conv1d {
            t.t()?.contiguous()?
        } else {
            t.clone()
        };
        out.push((name_of(&name)?, t));
    }
    if decoder {
        for (i, l) in model.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}.{}", super::family::QKV);
            let w = Tensor::cat(&[&l.query.w, &l.key.w, &l.value.w], 0)?;
            out.push((name_of(&format!("{p}.weight"))?, w.t()?.contiguous()?));
            let b = Tensor::cat(&[&l.query.b, &l.key.b, &l.value.b], 0)?;
            out.push((name_of(&format!("{p}.bias"))?, b));
        }
    }
    Ok(out)
}
