//! BERT-family sequence classifiers in candle, mirroring Hugging Face checkpoints: a `Config`
//! that mirrors `config.json`, parameters named as in `model.safetensors` (with or without the
//! `bert.` prefix), a seeded classification head, and forward passes for the three shapes BTU
//! trains: the full model, word embeddings + mean pooling + head (`M*`), and the embedding
//! block + mean pooling + head (the released code's "pruned" model).

pub mod attention;
pub mod checkpoint;
pub mod family;
pub mod infer;
pub mod onnx;
pub mod ops;
pub mod tokenizer;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{BtuError, Result};
pub use family::Family;
use ops::{attention_bias, layer_norm, linear, softmax_last};

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}

/// Mirrors Hugging Face `config.json` for BERT; unknown fields are kept and written back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Rows of the word-embedding matrix (token ids are below this).
    pub vocab_size: usize,
    /// Width of every hidden state (`h`).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer inside each encoder layer.
    pub intermediate_size: usize,
    /// Feed-forward activation: `gelu` (erf, the default), `gelu_new` (tanh approximation) or
    /// `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout on hidden states (default 0.1); kept for `config.json`, btu's forward passes do
    /// not apply it.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (default 0.1); kept for `config.json`, not applied.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Rows of the position-embedding matrix: the longest sequence the model accepts.
    pub max_position_embeddings: usize,
    /// Rows of the token-type embedding matrix (default 2); btu only uses type 0.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm (default 1e-12).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token (default 0); a randomly initialised model zeroes its embedding row.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Number of classes, when `config.json` states it; see [`BertConfig::labels`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// Class index (as a string) to label name, when `config.json` states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Every other field of `config.json`, written back unchanged.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// The model family (from `model_type` / `architectures`; not a key of its own).
    #[serde(skip)]
    pub family: Family,
}

impl BertConfig {
    /// Parse `config.json` of any supported family (DistilBERT's keys read as BERT's).
    pub fn from_json(text: &str, src: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| BtuError::bad_data(src, format!("not a JSON config: {e}")))?;
        let family = Family::of_config(&v, src)?;
        if v["sinusoidal_pos_embds"] == serde_json::Value::Bool(true) {
            return Err(BtuError::bad_data(
                src,
                "sinusoidal position embeddings are not supported (sinusoidal_pos_embds); give a model with learned positions",
            ));
        }
        let v = family.to_bert_keys(v);
        if family.is_decoder() && v.get("pad_token_id").is_none() {
            return Err(BtuError::bad_data(
                src,
                "has neither pad_token_id nor eos_token_id: a decoder classifier reads each text's last token and needs a padding id; set pad_token_id (transformers: model.config.pad_token_id = tokenizer.eos_token_id)",
            ));
        }
        let mut c: BertConfig = serde_json::from_value(v).map_err(|e| {
            BtuError::bad_data(src, format!("not a {} config: {e}", family.model_type()))
        })?;
        c.family = family;
        c.validate(src)?;
        Ok(c)
    }

    /// `config.json` in the family's own keys, naming its sequence-classification class.
    pub fn to_json(&self) -> Result<String> {
        let mut c = self.clone();
        c.extra
            .entry("model_type".to_string())
            .or_insert(self.family.model_type().into());
        c.extra.insert(
            "architectures".into(),
            serde_json::json!([self.family.architecture()]),
        );
        let text = match self.family {
            // BERT's keys in the struct's order, as btu always wrote them.
            Family::Bert => serde_json::to_string_pretty(&c),
            f => serde_json::to_value(&c)
                .and_then(|v| serde_json::to_string_pretty(&f.from_bert_keys(v))),
        };
        Ok(text.map_err(BtuError::internal)? + "\n")
    }

    /// The longest sequence the model takes: its positions after the first token's.
    pub fn max_len(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.first_position())
    }

    /// The position of the first token (RoBERTa: after the padding position).
    pub fn first_position(&self) -> usize {
        if self.family.offset_positions() {
            self.pad_token_id as usize + 1
        } else {
            0
        }
    }

    /// Number of classes of the classification head (`num_labels`, else `id2label`, else 2).
    pub fn labels(&self) -> usize {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
            .unwrap_or(2)
    }

    /// Set the number of classes (and a matching `id2label`).
    pub fn set_labels(&mut self, n: usize) {
        self.num_labels = Some(n);
        self.id2label = Some(
            (0..n)
                .map(|i| (i.to_string(), format!("LABEL_{i}")))
                .collect(),
        );
    }

    /// Check the shape facts every forward pass relies on.
    pub fn validate(&self, src: &str) -> Result<()> {
        for (key, v, min) in [
            ("vocab_size", self.vocab_size, 1),
            ("hidden_size", self.hidden_size, 1),
            ("num_hidden_layers", self.num_hidden_layers, 1),
            ("intermediate_size", self.intermediate_size, 1),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                crate::validate::MIN_MAX_LEN,
            ),
            ("type_vocab_size", self.type_vocab_size, 1),
            ("num_labels", self.labels(), 2),
        ] {
            if v < min {
                return Err(BtuError::bad_data(
                    src,
                    format!("{key} is {v}, below the minimum {min}; fix config.json"),
                ));
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(BtuError::bad_data(
                src,
                format!(
                    "layer_norm_eps {} is not a small positive number",
                    self.layer_norm_eps
                ),
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(BtuError::bad_data(
                src,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "relu") {
            return Err(BtuError::bad_data(
                src,
                format!("unsupported hidden_act '{}'", self.hidden_act),
            ));
        }
        Ok(())
    }
}

/// `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `W`, `[out, in]`.
    pub w: Tensor,
    /// Bias `b`, `[out]`.
    pub b: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.w, Some(&self.b))
    }
}

/// LayerNorm parameters.
#[derive(Debug, Clone)]
pub struct Norm {
    /// Scale (gamma), `[h]`.
    pub w: Tensor,
    /// Shift (beta), `[h]`.
    pub b: Tensor,
}

/// One encoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Query projection (`attention.self.query`), `h -> h`.
    pub query: Linear,
    /// Key projection (`attention.self.key`), `h -> h`.
    pub key: Linear,
    /// Value projection (`attention.self.value`), `h -> h`.
    pub value: Linear,
    /// Projection of the attention output (`attention.output.dense`), `h -> h`.
    pub attn_out: Linear,
    /// LayerNorm after attention and its residual (`attention.output.LayerNorm`).
    pub attn_norm: Norm,
    /// Feed-forward expansion (`intermediate.dense`), `h -> intermediate_size`.
    pub intermediate: Linear,
    /// Feed-forward contraction (`output.dense`), `intermediate_size -> h`.
    pub output: Linear,
    /// LayerNorm after the feed-forward block and its residual (`output.LayerNorm`).
    pub out_norm: Norm,
}

/// A BERT encoder with pooler and classification head.
#[derive(Debug, Clone)]
pub struct BertClassifier {
    /// The configuration the parameters were built or loaded for.
    pub config: BertConfig,
    /// Word embeddings (`embeddings.word_embeddings.weight`), `[vocab_size, h]`.
    pub word: Tensor,
    /// Position embeddings (`embeddings.position_embeddings.weight`),
    /// `[max_position_embeddings, h]`.
    pub position: Tensor,
    /// Token-type embeddings (`embeddings.token_type_embeddings.weight`), `[type_vocab_size, h]`;
    /// `None` for a family without token types (DistilBERT).
    pub token_type: Option<Tensor>,
    /// LayerNorm of the embedding block (`embeddings.LayerNorm`); `None` for a decoder.
    pub emb_norm: Option<Norm>,
    /// The encoder layers, in order.
    pub layers: Vec<Layer>,
    /// Pooler on the `[CLS]` state (`pooler.dense`), `h -> h`, followed by tanh (ReLU for
    /// DistilBERT); `None` for a decoder.
    pub pooler: Option<Linear>,
    /// A decoder's final LayerNorm (GPT-2's `ln_f`).
    pub final_norm: Option<Norm>,
    /// Classification head (`classifier`), `h -> num_labels`; a decoder's has no bias (its
    /// `b` is zeros and not a parameter).
    pub classifier: Linear,
    /// The dtype the passes compute in: the parameters' own, or bf16 under mixed precision
    /// ([`BertClassifier::set_compute_dtype`]).
    pub compute: DType,
}

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trainable {
    /// Only the word-embedding matrix.
    WordEmbeddings,
    /// The embedding block (word, position, type embeddings and their LayerNorm) and the head.
    EmbeddingBlockAndHead,
    /// Everything.
    All,
}

/// How a forward pass pools and which parts it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// Encoder, pooler on `[CLS]`, classifier.
    Full,
    /// Word embeddings, mean over non-padding tokens, classifier (`M*`).
    WordMean,
    /// Embedding block (with LayerNorm), mean over all positions including padding, classifier.
    EmbeddingMean,
}

/// Standard-normal samples from a seeded ChaCha stream (Box-Muller), identical on every platform.
pub fn normal_vec(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    use rand::Rng;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos() * std) as f32);
        if out.len() < n {
            out.push((r * t.sin() * std) as f32);
        }
    }
    out
}

fn randn(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f64, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        normal_vec(rng, shape.0 * shape.1, std),
        shape,
        dev,
    )?)
}

/// A seeded `Linear(in -> out)` as BERT initialises it: N(0, 0.02) weights, zero bias.
pub fn init_linear(rng: &mut ChaCha8Rng, inp: usize, out: usize, dev: &Device) -> Result<Linear> {
    Ok(Linear {
        w: randn(rng, (out, inp), 0.02, dev)?,
        b: Tensor::zeros(out, DType::F32, dev)?,
    })
}

fn init_norm(h: usize, dev: &Device) -> Result<Norm> {
    Ok(Norm {
        w: Tensor::ones(h, DType::F32, dev)?,
        b: Tensor::zeros(h, DType::F32, dev)?,
    })
}

impl BertClassifier {
    /// A randomly initialised model (BERT's initialisation, padding row zero), seeded.
    pub fn random(config: BertConfig, seed: u64, dev: &Device) -> Result<Self> {
        config.validate("config")?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let h = config.hidden_size;
        let mut word = normal_vec(&mut rng, config.vocab_size * h, 0.02);
        let p = config.pad_token_id as usize;
        if p < config.vocab_size {
            word[p * h..(p + 1) * h].iter_mut().for_each(|v| *v = 0.0);
        }
        let word = Tensor::from_vec(word, (config.vocab_size, h), dev)?;
        let position = randn(&mut rng, (config.max_position_embeddings, h), 0.02, dev)?;
        let token_type = randn(&mut rng, (config.type_vocab_size, h), 0.02, dev)?;
        let token_type = config.family.has_token_types().then_some(token_type);
        let mut layers = Vec::new();
        for _ in 0..config.num_hidden_layers {
            layers.push(Layer {
                query: init_linear(&mut rng, h, h, dev)?,
                key: init_linear(&mut rng, h, h, dev)?,
                value: init_linear(&mut rng, h, h, dev)?,
                attn_out: init_linear(&mut rng, h, h, dev)?,
                attn_norm: init_norm(h, dev)?,
                intermediate: init_linear(&mut rng, h, config.intermediate_size, dev)?,
                output: init_linear(&mut rng, config.intermediate_size, h, dev)?,
                out_norm: init_norm(h, dev)?,
            });
        }
        let decoder = config.family.is_decoder();
        let pooler = if decoder {
            None
        } else {
            Some(init_linear(&mut rng, h, h, dev)?)
        };
        let classifier = init_linear(&mut rng, h, config.labels(), dev)?;
        Ok(BertClassifier {
            compute: word.dtype(),
            emb_norm: (!decoder).then(|| init_norm(h, dev)).transpose()?,
            final_norm: decoder.then(|| init_norm(h, dev)).transpose()?,
            config,
            word,
            position,
            token_type,
            layers,
            pooler,
            classifier,
        })
    }

    /// Every parameter with its canonical (unprefixed) Hugging Face name.
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut v: Vec<(String, &Tensor)> = vec![
            ("embeddings.word_embeddings.weight".into(), &self.word),
            (
                "embeddings.position_embeddings.weight".into(),
                &self.position,
            ),
        ];
        if let Some(t) = &self.token_type {
            v.push(("embeddings.token_type_embeddings.weight".into(), t));
        }
        if let Some(n) = &self.emb_norm {
            v.extend([
                ("embeddings.LayerNorm.weight".into(), &n.w),
                ("embeddings.LayerNorm.bias".into(), &n.b),
            ]);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            for (n, lin) in [
                ("attention.self.query", &l.query),
                ("attention.self.key", &l.key),
                ("attention.self.value", &l.value),
                ("attention.output.dense", &l.attn_out),
                ("intermediate.dense", &l.intermediate),
                ("output.dense", &l.output),
            ] {
                v.push((format!("{p}.{n}.weight"), &lin.w));
                v.push((format!("{p}.{n}.bias"), &lin.b));
            }
            for (n, norm) in [
                ("attention.output.LayerNorm", &l.attn_norm),
                ("output.LayerNorm", &l.out_norm),
            ] {
                v.push((format!("{p}.{n}.weight"), &norm.w));
                v.push((format!("{p}.{n}.bias"), &norm.b));
            }
        }
        if let Some(n) = &self.final_norm {
            let p = family::FINAL_NORM;
            v.push((format!("{p}.weight"), &n.w));
            v.push((format!("{p}.bias"), &n.b));
        }
        if let Some(p) = &self.pooler {
            v.push(("pooler.dense.weight".into(), &p.w));
            v.push(("pooler.dense.bias".into(), &p.b));
        }
        v.push(("classifier.weight".into(), &self.classifier.w));
        if !self.config.family.is_decoder() {
            v.push(("classifier.bias".into(), &self.classifier.b));
        }
        v
    }

    /// Mutable access to every parameter, in the order of [`BertClassifier::named`].
    fn params_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v: Vec<&mut Tensor> = vec![&mut self.word, &mut self.position];
        if let Some(t) = self.token_type.as_mut() {
            v.push(t);
        }
        if let Some(n) = self.emb_norm.as_mut() {
            v.extend([&mut n.w, &mut n.b]);
        }
        for l in self.layers.iter_mut() {
            for lin in [
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.intermediate,
                &mut l.output,
            ] {
                v.push(&mut lin.w);
                v.push(&mut lin.b);
            }
            for norm in [&mut l.attn_norm, &mut l.out_norm] {
                v.push(&mut norm.w);
                v.push(&mut norm.b);
            }
        }
        if let Some(n) = self.final_norm.as_mut() {
            v.extend([&mut n.w, &mut n.b]);
        }
        if let Some(p) = self.pooler.as_mut() {
            v.extend([&mut p.w, &mut p.b]);
        }
        v.push(&mut self.classifier.w);
        if !self.config.family.is_decoder() {
            v.push(&mut self.classifier.b);
        }
        v
    }

    /// Convert every parameter to `dtype` (tests check gradients in f64).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut m = self.map_tensors(|t| t.to_dtype(dtype))?;
        m.compute = dtype;
        Ok(m)
    }

    /// Mixed precision: compute in `dtype` (bf16). The frozen parameters are converted once; the
    /// trained ones (variables, the f32 master copy the optimiser updates) are cast at every
    /// forward pass, the word embeddings row by row after the lookup. Call after
    /// [`BertClassifier::make_trainable`].
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        for t in self.params_mut() {
            if !t.is_variable() {
                *t = t.to_dtype(dtype)?;
            }
        }
        if self.config.family.is_decoder() {
            self.classifier.b = self.classifier.b.to_dtype(dtype)?;
        }
        self.compute = dtype;
        Ok(())
    }

    /// The model a pass computes with: itself, or under mixed precision a copy whose trained
    /// parameters are cast (differentiably) to the compute dtype; the word embeddings stay.
    fn for_compute(&self) -> Result<std::borrow::Cow<'_, Self>> {
        let uniform = self
            .named()
            .iter()
            .skip(1) // the word embeddings, cast after the lookup
            .all(|(_, t)| t.dtype() == self.compute);
        if uniform {
            return Ok(std::borrow::Cow::Borrowed(self));
        }
        let word = self.word.clone();
        let mut m = self.map_tensors(|t| t.to_dtype(self.compute))?;
        m.word = word;
        Ok(std::borrow::Cow::Owned(m))
    }

    /// Move every parameter to `dev`.
    pub fn to_device(&self, dev: &Device) -> Result<Self> {
        self.map_tensors(|t| t.to_device(dev))
    }

    /// A copy with `f` applied to every tensor: the parameters, and a decoder's head bias (zeros,
    /// not a parameter, but it must follow the rest).
    fn map_tensors(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        let mut m = self.clone();
        for t in m.params_mut() {
            *t = f(t)?;
        }
        if m.config.family.is_decoder() {
            m.classifier.b = f(&m.classifier.b)?;
        }
        Ok(m)
    }

    /// Replace the parameters selected by `which` with fresh variables (copies) and return them
    /// with their names. The model then reads the variables, so optimiser steps show in it.
    pub fn make_trainable(&mut self, which: Trainable) -> Result<Vec<(String, Var)>> {
        let names: Vec<String> = self.named().into_iter().map(|(n, _)| n).collect();
        let mut out = Vec::new();
        for (name, t) in names.into_iter().zip(self.params_mut()) {
            let train = match which {
                Trainable::WordEmbeddings => name == "embeddings.word_embeddings.weight",
                Trainable::EmbeddingBlockAndHead => {
                    name.starts_with("embeddings.") || name.starts_with("classifier.")
                }
                Trainable::All => true,
            };
            if train {
                let var = Var::from_tensor(&t.detach())?;
                *t = var.as_tensor().clone();
                out.push((name, var));
            } else {
                *t = t.detach();
            }
        }
        Ok(out)
    }

    /// Hidden states of the embedding block: word + position (+ token type), then LayerNorm.
    /// `mask` places RoBERTa's positions (padding at `pad_token_id`, tokens after it).
    fn embed_block(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l > self.config.max_len() {
            return Err(BtuError::config(
                "--max-len",
                format!(
                    "sequence length {l} exceeds the model's {} positions (max_position_embeddings)",
                    self.config.max_len()
                ),
            ));
        }
        let h = self.config.hidden_size;
        let word = self
            .word
            .embedding(&ids.flatten_all()?)?
            .to_dtype(self.compute)?
            .reshape((b, l, h))?;
        let x = if self.config.family.offset_positions() {
            let pos = self
                .position
                .embedding(&offset_positions(mask, self.config.pad_token_id)?.flatten_all()?)?
                .reshape((b, l, h))?;
            (word + pos)?
        } else {
            word.broadcast_add(&self.position.narrow(0, 0, l)?)?
        };
        let x = match &self.token_type {
            Some(tt) => x.broadcast_add(&tt.narrow(0, 0, 1)?)?,
            None => x,
        };
        Ok(match &self.emb_norm {
            Some(n) => layer_norm(&x, &n.w, &n.b, self.config.layer_norm_eps)?,
            None => x,
        })
    }

    fn act(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.hidden_act.as_str() {
            "relu" => x.relu(),
            "gelu_new" => x.gelu(),
            _ => ops::gelu_erf(x),
        }
    }

    /// Final hidden states of the encoder, `[b, l, h]` (a decoder's after its final LayerNorm).
    pub fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if self.config.family.is_decoder() {
            return self.decode(ids, mask);
        }
        let eps = self.config.layer_norm_eps;
        let bias = attention_bias(mask, self.compute)?;
        let mut x = self.embed_block(ids, mask)?;
        for layer in &self.layers {
            let ctx = self.attention(layer, &x, &bias)?;
            let a = layer_norm(
                &(layer.attn_out.forward(&ctx)? + &x)?,
                &layer.attn_norm.w,
                &layer.attn_norm.b,
                eps,
            )?;
            let i = self.act(&layer.intermediate.forward(&a)?)?;
            x = layer_norm(
                &(layer.output.forward(&i)? + &a)?,
                &layer.out_norm.w,
                &layer.out_norm.b,
                eps,
            )?;
        }
        Ok(x)
    }

    /// Multi-head attention of `layer` over `x` `[b, l, h]` with an additive `bias`
    /// (broadcast to `[b, heads, l, l]`), before the output projection.
    fn attention(&self, layer: &Layer, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let nh = self.config.num_attention_heads;
        let hd = h / nh;
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, nh, hd))?.transpose(1, 2)?.contiguous()
        };
        // A per-key bias (no causal mask) on the CPU in f32: one projection to q, k and v side
        // by side, then the fused op.
        let (wq, wk, wv) = (&layer.query, &layer.key, &layer.value);
        if bias.dims() == [b, 1, 1, l] && ops::cpu_f32(&[x, bias, &wq.w, &wk.w, &wv.w]) {
            let w = Tensor::cat(&[&wq.w, &wk.w, &wv.w], 0)?;
            let bs = Tensor::cat(&[&wq.b, &wk.b, &wv.b], 0)?;
            let qkv = linear(x, &w, Some(&bs))?;
            let key_bias = bias.flatten_all()?.to_vec1::<f32>()?;
            return Ok(attention::self_attention(&qkv, key_bias, nh)?);
        }
        let (q, k, v) = (
            heads(wq.forward(x)?)?,
            heads(wk.forward(x)?)?,
            heads(wv.forward(x)?)?,
        );
        let scores = q
            .matmul(&k.t()?)?
            .affine(1.0 / (hd as f64).sqrt(), 0.0)?
            .broadcast_add(bias)?;
        let probs = softmax_last(&scores)?;
        Ok(probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, h))?)
    }

    /// A decoder's hidden states (GPT-2): pre-LayerNorm blocks with causal attention, then the
    /// final LayerNorm.
    fn decode(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let eps = self.config.layer_norm_eps;
        let l = ids.dim(1)?;
        let dtype = self.compute;
        let bias =
            attention_bias(mask, dtype)?.broadcast_add(&causal_bias(l, dtype, ids.device())?)?;
        let mut x = self.embed_block(ids, mask)?;
        for layer in &self.layers {
            let n = &layer.attn_norm;
            let a = self.attention(layer, &layer_norm(&x, &n.w, &n.b, eps)?, &bias)?;
            let a = (layer.attn_out.forward(&a)? + &x)?;
            let n = &layer.out_norm;
            let i = self.act(
                &layer
                    .intermediate
                    .forward(&layer_norm(&a, &n.w, &n.b, eps)?)?,
            )?;
            x = (layer.output.forward(&i)? + &a)?;
        }
        let n = self
            .final_norm
            .as_ref()
            .expect("a decoder has a final LayerNorm");
        Ok(layer_norm(&x, &n.w, &n.b, eps)?)
    }

    /// The head's input: the pooled first token (encoders), or a decoder's last attended token.
    fn pooled(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let Some(pooler) = &self.pooler else {
            let last = mask.sum(1)?.affine(1.0, -1.0)?.clamp(0.0, f64::MAX)?;
            let last = last.to_dtype(DType::U32)?;
            let (b, _, h) = x.dims3()?;
            let idx = last
                .reshape((b, 1, 1))?
                .broadcast_as((b, 1, h))?
                .contiguous()?;
            return Ok(x.gather(&idx, 1)?.squeeze(1)?);
        };
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = pooler.forward(&cls)?;
        Ok(if self.config.family.relu_head() {
            pooled.relu()?
        } else {
            pooled.tanh()?
        })
    }

    /// Class logits `[b, num_labels]` for token ids `[b, l]` (u32) and a 0/1 mask `[b, l]`.
    pub fn forward(&self, arch: Arch, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.for_compute()?.forward_uniform(arch, ids, mask)
    }

    /// A text's representation in this model: the mean of its final hidden states over the
    /// attended tokens, `[b, h]` in f32, for token ids `[b, l]` (u32) and a 0/1 mask `[b, l]`.
    pub fn mean_hidden(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let m = self.for_compute()?;
        let x = m.encode(ids, &mask.to_dtype(m.compute)?)?;
        let w = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let sum = x.to_dtype(DType::F32)?.broadcast_mul(&w)?.sum(1)?;
        Ok(sum.broadcast_div(&w.sum(1)?.clamp(1.0, f64::MAX)?)?)
    }

    /// [`BertClassifier::forward`] once every parameter but the word embeddings is in the
    /// compute dtype.
    fn forward_uniform(&self, arch: Arch, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match arch {
            Arch::Full => {
                let x = self.encode(ids, mask)?;
                Ok(self.classifier.forward(&self.pooled(&x, mask)?)?)
            }
            Arch::WordMean => {
                let (b, l) = ids.dims2()?;
                let h = self.config.hidden_size;
                let x = self
                    .word
                    .embedding(&ids.flatten_all()?)?
                    .to_dtype(self.compute)?
                    .reshape((b, l, h))?;
                let m = mask.to_dtype(x.dtype())?;
                let summed = x.broadcast_mul(&m.unsqueeze(D::Minus1)?)?.sum(1)?;
                let count = m.sum_keepdim(1)?.clamp(1.0, f64::MAX)?;
                let mean = summed.broadcast_div(&count)?;
                Ok(self.classifier.forward(&mean)?)
            }
            Arch::EmbeddingMean => {
                let x = self.embed_block(ids, mask)?;
                Ok(self.classifier.forward(&x.mean(1)?)?)
            }
        }
    }
}

/// RoBERTa's position ids for a 0/1 mask `[b, l]`: `pad + 1, pad + 2, ...` over the attended
/// tokens, `pad` on padding (Hugging Face counts non-padding ids; btu's inputs are the same).
fn offset_positions(mask: &Tensor, pad: u32) -> Result<Tensor> {
    let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let (b, l) = (rows.len(), rows.first().map_or(0, |r| r.len()));
    let mut out = Vec::with_capacity(b * l);
    for row in rows {
        let mut n = 0;
        for m in row {
            n += m;
            out.push(if m > 0 { pad + n } else { pad });
        }
    }
    Ok(Tensor::from_vec(out, (b, l), mask.device())?)
}

/// Causal attention bias `[l, l]`: 0 on and below the diagonal, -1e9 above (a token attends to
/// itself and the tokens before it).
fn causal_bias(l: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { -1e9 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (l, l), dev)?.to_dtype(dtype)?)
}
