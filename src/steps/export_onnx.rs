//! `btu export-onnx`: a BERT-family classifier checkpoint as an ONNX model (opset 17): inputs
//! `input_ids`, `attention_mask`, `token_type_ids` (int64, dynamic batch and sequence axes),
//! output `logits`; weights as initializers; provenance in `metadata_props`; `tokenizer.json`
//! written beside it. The graph computes exactly what [`crate::model::BertClassifier`] computes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use prost::Message;

use crate::error::{BtuError, Result};
use crate::model::checkpoint::Checkpoint;
use crate::model::onnx::*;
use crate::model::{BertClassifier, Linear, Norm};

/// The opset the exported graph uses.
pub const OPSET: i64 = 17;

/// Builds a graph node by node.
struct Builder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    n: usize,
}

fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INT,
        i,
        ..Default::default()
    }
}
fn attr_f(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::FLOAT,
        f,
        ..Default::default()
    }
}
fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INTS,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

impl Builder {
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.n += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.n);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("n{}", self.n),
            op_type: op.into(),
            domain: String::new(),
            attribute: attrs,
        });
        out
    }

    /// Add an initializer holding little-endian `raw` bytes.
    fn init(&mut self, name: &str, dims: &[usize], data_type: i32, raw: Vec<u8>) -> String {
        self.inits.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.into(),
            raw_data: raw,
        });
        name.into()
    }

    fn f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.init(
            name,
            dims,
            data_type::FLOAT,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    fn i64s(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        self.init(
            name,
            dims,
            data_type::INT64,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    fn tensor(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        Ok(self.f32(name, t.dims(), &data))
    }

    /// `x @ W^T + b` with `W^T` stored as the initializer.
    fn linear(&mut self, x: &str, l: &Linear, name: &str) -> Result<String> {
        let w = self.tensor(&format!("{name}.weight_t"), &l.w.t()?.contiguous()?)?;
        let b = self.tensor(&format!("{name}.bias"), &l.b)?;
        let y = self.op("MatMul", &[x, &w], vec![]);
        Ok(self.op("Add", &[&y, &b], vec![]))
    }

    fn layer_norm(&mut self, x: &str, n: &Norm, name: &str, eps: f64) -> Result<String> {
        let w = self.tensor(&format!("{name}.weight"), &n.w)?;
        let b = self.tensor(&format!("{name}.bias"), &n.b)?;
        Ok(self.op(
            "LayerNormalization",
            &[x, &w, &b],
            vec![attr_i("axis", -1), attr_f("epsilon", eps as f32)],
        ))
    }
}

fn int64_input(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: data_type::INT64,
                shape: Some(TensorShapeProto {
                    dim: vec![
                        Dimension {
                            dim_value: None,
                            dim_param: Some("batch".into()),
                        },
                        Dimension {
                            dim_value: None,
                            dim_param: Some("sequence".into()),
                        },
                    ],
                }),
            }),
        }),
    }
}

/// The position ids: `0..seq` (BERT, DistilBERT), or RoBERTa's `pad + cumsum(mask)` over the
/// attended tokens and `pad` on padding.
fn position_ids(g: &mut Builder, c: &crate::model::BertConfig, zero: &str, one: &str) -> String {
    if !c.family.offset_positions() {
        let shape = g.op("Shape", &["input_ids"], vec![]);
        let seq = g.op("Gather", &[&shape, one], vec![attr_i("axis", 0)]);
        return g.op("Range", &[zero, &seq, one], vec![]);
    }
    let pad = g.i64s("const.pad_token_id", &[], &[c.pad_token_id as i64]);
    let counted = g.op("CumSum", &["attention_mask", one], vec![]);
    let counted = g.op("Mul", &[&counted, "attention_mask"], vec![]);
    g.op("Add", &[&counted, &pad], vec![])
}

/// The per-model constants of the attention nodes.
struct Heads {
    split: String,
    merge: String,
    scale: String,
    bias: String,
}

/// The constants of the erf GELU.
struct GeluConsts {
    half: String,
    onef: String,
    rsqrt2: String,
}

/// Multi-head attention of layer `l` (named `p`) over `x`, before its output projection.
fn attention(
    g: &mut Builder,
    x: &str,
    l: &crate::model::Layer,
    p: &str,
    h: &Heads,
) -> Result<String> {
    let q = g.linear(x, &l.query, &format!("{p}.attention.self.query"))?;
    let k = g.linear(x, &l.key, &format!("{p}.attention.self.key"))?;
    let v = g.linear(x, &l.value, &format!("{p}.attention.self.value"))?;
    let q = g.op("Reshape", &[&q, &h.split], vec![]);
    let q = g.op("Transpose", &[&q], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let k = g.op("Reshape", &[&k, &h.split], vec![]);
    let k = g.op("Transpose", &[&k], vec![attr_ints("perm", &[0, 2, 3, 1])]);
    let v = g.op("Reshape", &[&v, &h.split], vec![]);
    let v = g.op("Transpose", &[&v], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let s = g.op("MatMul", &[&q, &k], vec![]);
    let s = g.op("Mul", &[&s, &h.scale], vec![]);
    let s = g.op("Add", &[&s, &h.bias], vec![]);
    let pr = g.op("Softmax", &[&s], vec![attr_i("axis", -1)]);
    let ctx = g.op("MatMul", &[&pr, &v], vec![]);
    let ctx = g.op("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    Ok(g.op("Reshape", &[&ctx, &h.merge], vec![]))
}

/// The feed-forward activation `act` of `x`: relu, gelu (erf) or gelu_new (tanh).
fn activation(g: &mut Builder, act: &str, x: &str, k: &GeluConsts) -> Result<String> {
    Ok(match act {
        "relu" => g.op("Relu", &[x], vec![]),
        "gelu" => {
            // 0.5 * x * (1 + erf(x / sqrt(2)))
            let sx = g.op("Mul", &[x, &k.rsqrt2], vec![]);
            let e = g.op("Erf", &[&sx], vec![]);
            let e1 = g.op("Add", &[&e, &k.onef], vec![]);
            let xe = g.op("Mul", &[x, &e1], vec![]);
            g.op("Mul", &[&xe, &k.half], vec![])
        }
        "gelu_new" => {
            // 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))
            let c = g.f32(
                "const.gelu_c",
                &[],
                &[(2.0f32 / std::f32::consts::PI).sqrt()],
            );
            let a = g.f32("const.gelu_a", &[], &[0.044715]);
            let x2 = g.op("Mul", &[x, x], vec![]);
            let x3 = g.op("Mul", &[&x2, x], vec![]);
            let ax3 = g.op("Mul", &[&x3, &a], vec![]);
            let inner = g.op("Add", &[x, &ax3], vec![]);
            let inner = g.op("Mul", &[&inner, &c], vec![]);
            let t = g.op("Tanh", &[&inner], vec![]);
            let t1 = g.op("Add", &[&t, &k.onef], vec![]);
            let xt = g.op("Mul", &[x, &t1], vec![]);
            g.op("Mul", &[&xt, &k.half], vec![])
        }
        other => {
            return Err(BtuError::config(
                "--checkpoint",
                format!("hidden_act '{other}' cannot be exported yet; use gelu, gelu_new or relu"),
            ))
        }
    })
}

/// The causal bias `[s, s]`: 0 on and below the diagonal, -`big` above.
fn causal_bias(g: &mut Builder, big: &str) -> String {
    let shape = g.op("Shape", &["input_ids"], vec![]);
    let idx = g.i64s("const.seq_axis", &[1], &[1]);
    let seq = g.op("Gather", &[&shape, &idx], vec![attr_i("axis", 0)]);
    let square = g.op("Concat", &[&seq, &seq], vec![attr_i("axis", 0)]);
    let onef = g.f32("const.causal_one", &[1], &[1.0]);
    let ones = g.op("Expand", &[&onef, &square], vec![]);
    let lower = g.op("Trilu", &[&ones], vec![attr_i("upper", 0)]);
    let upper = g.op("Sub", &[&onef, &lower], vec![]);
    let neg = g.op("Mul", &[&upper, big], vec![]);
    g.op("Neg", &[&neg], vec![])
}

/// Each row's last attended token of `x` `[b, s, h]` (right padding): `[b, h]`.
fn last_token(g: &mut Builder, x: &str, one: &str) -> String {
    let axes = g.i64s("const.axes_1", &[1], &[1]);
    let n = g.op(
        "ReduceSum",
        &["attention_mask", &axes],
        vec![attr_i("keepdims", 1)],
    );
    let last = g.op("Sub", &[&n, one], vec![]);
    g.op("GatherND", &[x, &last], vec![attr_i("batch_dims", 1)])
}

/// The ONNX model of a classifier.
pub fn build(model: &BertClassifier, metadata: Vec<(String, String)>) -> Result<ModelProto> {
    let c = &model.config;
    let (h, nh) = (c.hidden_size, c.num_attention_heads);
    let hd = h / nh;
    let eps = c.layer_norm_eps;
    let mut g = Builder {
        nodes: vec![],
        inits: vec![],
        n: 0,
    };
    // Embeddings.
    let word = g.tensor("embeddings.word_embeddings.weight", &model.word)?;
    let pos = g.tensor("embeddings.position_embeddings.weight", &model.position)?;
    let tt = match &model.token_type {
        Some(t) => Some(g.tensor("embeddings.token_type_embeddings.weight", t)?),
        None => None,
    };
    let zero = g.i64s("const.zero", &[], &[0]);
    let one = g.i64s("const.one", &[], &[1]);
    let we = g.op("Gather", &[&word, "input_ids"], vec![attr_i("axis", 0)]);
    let positions = position_ids(&mut g, c, &zero, &one);
    let pe = g.op("Gather", &[&pos, &positions], vec![attr_i("axis", 0)]);
    let te = tt.map(|tt| g.op("Gather", &[&tt, "token_type_ids"], vec![attr_i("axis", 0)]));
    let mut sum = g.op("Add", &[&we, &pe], vec![]);
    if let Some(te) = te {
        sum = g.op("Add", &[&sum, &te], vec![]);
    }
    let mut x = match &model.emb_norm {
        Some(n) => g.layer_norm(&sum, n, "embeddings.LayerNorm", eps)?,
        None => sum,
    };
    // Additive attention bias [b, 1, 1, s]: 0 where attended, -1e9 where padded.
    let m = g.op(
        "Cast",
        &["attention_mask"],
        vec![attr_i("to", data_type::FLOAT as i64)],
    );
    let big = g.f32("const.mask_scale", &[], &[1e9]);
    let m1 = g.op("Mul", &[&m, &big], vec![]);
    let m2 = g.op("Sub", &[&m1, &big], vec![]);
    let axes = g.i64s("const.axes_1_2", &[2], &[1, 2]);
    let mut bias = g.op("Unsqueeze", &[&m2, &axes], vec![]);
    if c.family.is_decoder() {
        let causal = causal_bias(&mut g, &big);
        bias = g.op("Add", &[&bias, &causal], vec![]);
    }
    let split_heads = g.i64s("const.split_heads", &[4], &[0, 0, nh as i64, hd as i64]);
    let merge_heads = g.i64s("const.merge_heads", &[3], &[0, 0, h as i64]);
    let scale = g.f32("const.attention_scale", &[], &[1.0 / (hd as f32).sqrt()]);
    let half = g.f32("const.half", &[], &[0.5]);
    let onef = g.f32("const.one_f", &[], &[1.0]);
    let rsqrt2 = g.f32("const.rsqrt2", &[], &[std::f32::consts::FRAC_1_SQRT_2]);
    let heads = Heads {
        split: split_heads,
        merge: merge_heads,
        scale,
        bias,
    };
    let consts = GeluConsts { half, onef, rsqrt2 };
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("encoder.layer.{i}");
        if c.family.is_decoder() {
            // Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(.)).
            let n = g.layer_norm(
                &x,
                &l.attn_norm,
                &format!("{p}.attention.output.LayerNorm"),
                eps,
            )?;
            let ctx = attention(&mut g, &n, l, &p, &heads)?;
            let a = g.linear(&ctx, &l.attn_out, &format!("{p}.attention.output.dense"))?;
            let a = g.op("Add", &[&a, &x], vec![]);
            let n = g.layer_norm(&a, &l.out_norm, &format!("{p}.output.LayerNorm"), eps)?;
            let inter = g.linear(&n, &l.intermediate, &format!("{p}.intermediate.dense"))?;
            let act = activation(&mut g, &c.hidden_act, &inter, &consts)?;
            let o = g.linear(&act, &l.output, &format!("{p}.output.dense"))?;
            x = g.op("Add", &[&o, &a], vec![]);
            continue;
        }
        let ctx = attention(&mut g, &x, l, &p, &heads)?;
        let a = g.linear(&ctx, &l.attn_out, &format!("{p}.attention.output.dense"))?;
        let a = g.op("Add", &[&a, &x], vec![]);
        let a = g.layer_norm(
            &a,
            &l.attn_norm,
            &format!("{p}.attention.output.LayerNorm"),
            eps,
        )?;
        let inter = g.linear(&a, &l.intermediate, &format!("{p}.intermediate.dense"))?;
        let act = activation(&mut g, &c.hidden_act, &inter, &consts)?;
        let o = g.linear(&act, &l.output, &format!("{p}.output.dense"))?;
        let o = g.op("Add", &[&o, &a], vec![]);
        x = g.layer_norm(&o, &l.out_norm, &format!("{p}.output.LayerNorm"), eps)?;
    }
    let pooled = match (&model.pooler, &model.final_norm) {
        (Some(pooler), _) => {
            let cls = g.op("Gather", &[&x, &zero], vec![attr_i("axis", 1)]);
            let pooled = g.linear(&cls, pooler, "pooler.dense")?;
            if c.family.relu_head() {
                g.op("Relu", &[&pooled], vec![])
            } else {
                g.op("Tanh", &[&pooled], vec![])
            }
        }
        (None, Some(n)) => {
            let x = g.layer_norm(&x, n, crate::model::family::FINAL_NORM, eps)?;
            last_token(&mut g, &x, &one)
        }
        (None, None) => return Err(BtuError::internal("a model without pooler or final norm")),
    };
    let logits = g.linear(&pooled, &model.classifier, "classifier")?;
    // Name the final output `logits`.
    g.nodes.last_mut().expect("nodes").output = vec!["logits".into()];
    let _ = logits;
    let graph = GraphProto {
        node: g.nodes,
        name: "btu_bert_classifier".into(),
        initializer: g.inits,
        doc_string: String::new(),
        input: vec![
            int64_input("input_ids"),
            int64_input("attention_mask"),
            int64_input("token_type_ids"),
        ],
        output: vec![ValueInfoProto {
            name: "logits".into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TypeProtoTensor {
                    elem_type: data_type::FLOAT,
                    shape: Some(TensorShapeProto {
                        dim: vec![
                            Dimension {
                                dim_value: None,
                                dim_param: Some("batch".into()),
                            },
                            Dimension {
                                dim_value: Some(c.labels() as i64),
                                dim_param: None,
                            },
                        ],
                    }),
                }),
            }),
        }],
    };
    Ok(ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "btu".into(),
        producer_version: crate::VERSION.into(),
        domain: String::new(),
        model_version: 1,
        doc_string: "BERT sequence classifier exported by btu".into(),
        graph: Some(graph),
        metadata_props: metadata
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key, value })
            .collect(),
    })
}

/// The tokenizer file that belongs to one exported model: `<stem>.tokenizer.json` beside it.
pub fn own_tokenizer_path(onnx: &Path) -> PathBuf {
    let stem = onnx.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    onnx.with_file_name(format!("{stem}.tokenizer.json"))
}

/// Inputs of `btu export-onnx`.
pub struct ExportJob {
    /// Model directory to export (`--checkpoint`: `config.json`, `model.safetensors`, tokenizer).
    pub checkpoint: PathBuf,
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
}

/// `btu export-onnx`'s result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    /// `export-onnx`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The `.onnx` file.
    pub out: PathBuf,
    /// The `tokenizer.json` written beside it.
    pub tokenizer: PathBuf,
    /// ONNX opset.
    pub opset: i64,
    /// Size of the file.
    pub bytes: usize,
    /// Its sha256.
    pub sha256: String,
    /// sha256 of the checkpoint's weights.
    pub checkpoint_sha256: String,
    /// Classes of the head.
    pub num_labels: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

/// `btu export-onnx`.
pub fn run(job: &ExportJob) -> Result<ExportReport> {
    if job.run.out.extension().is_none_or(|e| e != "onnx") {
        return Err(BtuError::config(
            "--out",
            format!("{} should end in .onnx", job.run.out.display()),
        ));
    }
    let tok_out = own_tokenizer_path(&job.run.out);
    let shared_tok = job.run.out.with_file_name("tokenizer.json");
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    crate::io::output::check_output(&tok_out, job.run.overwrite)?;
    let ckpt = Checkpoint::read(&job.checkpoint)?;
    let tok = &ckpt.tokenizer;
    let model = ckpt.classifier(None, job.run.seed, &Device::Cpu)?;
    let sha = ckpt.sha256.clone();
    let st = &ckpt.weights;
    let mut meta = vec![
        ("btu:version".to_string(), crate::VERSION.to_string()),
        ("btu:command".to_string(), "export-onnx".to_string()),
        ("btu:checkpoint_sha256".to_string(), sha.clone()),
        (
            "btu:vocab_size".to_string(),
            model.config.vocab_size.to_string(),
        ),
        (
            "btu:num_labels".to_string(),
            model.config.labels().to_string(),
        ),
        (
            "btu:max_position_embeddings".to_string(),
            model.config.max_len().to_string(),
        ),
        ("btu:pad_token_id".to_string(), tok.pad_id.to_string()),
    ];
    for (k, v) in &st.metadata {
        if k.starts_with("btu:") && !meta.iter().any(|(mk, _)| mk == k) {
            meta.push((format!("checkpoint.{k}"), v.clone()));
        }
    }
    let proto = build(&model, meta)?;
    let bytes = proto.encode_to_vec();
    crate::io::output::write_file_atomic(&job.run.out, job.run.overwrite, |f| {
        use std::io::Write;
        f.write_all(&bytes)
            .map_err(|e| BtuError::io(&job.run.out, e))
    })?;
    let tok_bytes = tok
        .inner()
        .to_string(true)
        .map_err(|e| BtuError::internal(format!("tokenizer: {e}")))?;
    let write_tok = |path: &Path, overwrite: bool| {
        crate::io::output::write_file_atomic(path, overwrite, |f| {
            use std::io::Write;
            f.write_all(tok_bytes.as_bytes())
                .map_err(|e| BtuError::io(path, e))
        })
    };
    write_tok(&tok_out, job.run.overwrite)?;
    // `tokenizer.json` beside the model is shared by every export in the folder: written when
    // absent, never replaced by another model's tokenizer (each export has its own copy).
    match std::fs::read(&shared_tok) {
        Ok(existing) if existing == tok_bytes.as_bytes() => {}
        Ok(_) => tracing::warn!(
            "{} belongs to another export and is left as it is; this model's tokenizer is {}",
            shared_tok.display(),
            tok_out.display()
        ),
        Err(_) => match write_tok(&shared_tok, false) {
            Ok(()) | Err(BtuError::OutputExists { .. }) => {}
            Err(e) => return Err(e),
        },
    }
    Ok(ExportReport {
        command: "export-onnx".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        tokenizer: tok_out,
        opset: OPSET,
        bytes: bytes.len(),
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        checkpoint_sha256: sha,
        num_labels: model.config.labels(),
        vocab_size: model.config.vocab_size,
    })
}

/// An ONNX file's metadata (key, value) and the row count of its word-embedding initializer.
pub type OnnxInfo = (Vec<(String, String)>, Option<usize>);

/// Read an ONNX file's metadata and the row count of its word-embedding initializer.
pub fn inspect(path: &std::path::Path) -> Result<OnnxInfo> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => BtuError::missing(
            path.display().to_string(),
            "give an .onnx file made by btu export-onnx",
        ),
        _ => BtuError::io(path, e),
    })?;
    let m = ModelProto::decode(bytes.as_slice()).map_err(|e| {
        BtuError::bad_data(
            path.display().to_string(),
            format!("not an ONNX model ({e}); re-export it with btu export-onnx"),
        )
    })?;
    let g = m.graph.ok_or_else(|| {
        BtuError::bad_data(
            path.display().to_string(),
            "not an ONNX model (no graph); re-export it with btu export-onnx",
        )
    })?;
    let rows = g
        .initializer
        .iter()
        .find(|t| t.name == "embeddings.word_embeddings.weight")
        .and_then(|t| t.dims.first())
        .map(|&d| d as usize);
    Ok((
        m.metadata_props
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect(),
        rows,
    ))
}
