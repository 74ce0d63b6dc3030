//! `btu eval`: clean accuracy (ACC) and attack success rate (ASR) of a classifier on a test
//! split (btu-spec.md "Evaluation"). ASR counts only samples whose true label is not the target;
//! insertion attacks are averaged over `--repeats` random insertions. Writes `metrics.json` and
//! `predictions.parquet`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Int64Array, RecordBatch, StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use serde::Serialize;

use crate::defaults;
use crate::error::{BtuError, Result};
use crate::io::corpus::{read_corpus, CorpusSpec};
use crate::metrics::{accuracy, attack_success_rate, confusion, flip_rate};
use crate::model::checkpoint::{sha256_file, Checkpoint};

use crate::model::tokenizer::BtuTokenizer;
use crate::steps::poison::{insert_trigger, row_rng, Attack};

/// The attack measured: the flags of `btu eval` and the `[eval]` table of `btu defend`, where an
/// unset value falls back to `[poison]`'s (defaults in [`crate::defaults`]).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct EvalParams {
    /// Attack applied to the non-target rows for ASR (none: ACC only; `btu defend`: poison.attack).
    #[arg(long, env = "BTU_ATTACK", value_enum)]
    pub attack: Option<Attack>,
    /// Trigger word(s) for add-word, one drawn per attacked row (default: poison.trigger, else cf).
    #[arg(long = "trigger", value_name = "TRIGGER", env = "BTU_TRIGGER")]
    #[serde(rename = "trigger")]
    pub triggers: Vec<String>,
    /// Trigger sentence for add-sent (default: poison.sentence, else the paper's "I watch this 3D movie").
    #[arg(long, env = "BTU_SENTENCE")]
    pub sentence: Option<String>,
    /// Column holding the rewritten text, for rewrite (default: poison.rewrite_col).
    #[arg(long, env = "BTU_REWRITE_COL")]
    pub rewrite_col: Option<String>,
    /// Target label of the attack: ASR counts non-target rows predicted as it; among the classes
    /// (default: poison.target, else 1).
    #[arg(long, env = "BTU_TARGET")]
    pub target: Option<i64>,
    /// Random insertions averaged for ASR (at least 1).
    #[arg(long, env = "BTU_REPEATS", default_value_t = defaults::REPEATS)]
    pub repeats: usize,
    /// `btu defend` only: how the models are evaluated: auto, ort or candle.
    #[arg(skip = crate::steps::defend::EvalBackend::Auto)]
    pub backend: crate::steps::defend::EvalBackend,
}

impl Default for EvalParams {
    fn default() -> Self {
        EvalParams {
            attack: None,
            triggers: vec![],
            sentence: None,
            rewrite_col: None,
            target: None,
            repeats: defaults::REPEATS,
            backend: crate::steps::defend::EvalBackend::Auto,
        }
    }
}

impl EvalParams {
    /// The attack these parameters name, unset values taken from `poison` (then the defaults);
    /// `None` without an attack.
    pub fn resolve(
        &self,
        poison: Option<&crate::steps::poison::PoisonParams>,
        seed: u64,
    ) -> Option<EvalAttack> {
        let attack = self.attack.or(poison.map(|p| p.attack))?;
        Some(EvalAttack {
            attack,
            triggers: match (self.triggers.is_empty(), poison) {
                (false, _) => self.triggers.clone(),
                (true, Some(p)) => p.triggers.clone(),
                (true, None) => vec![defaults::TRIGGER.into()],
            },
            sentence: self
                .sentence
                .clone()
                .or(poison.map(|p| p.sentence.clone()))
                .unwrap_or_else(|| defaults::SENTENCE.into()),
            rewrite_col: self
                .rewrite_col
                .clone()
                .or(poison.and_then(|p| p.rewrite_col.clone())),
            target: self
                .target
                .or(poison.map(|p| p.target))
                .unwrap_or(defaults::TARGET),
            repeats: self.repeats,
            seed,
        })
    }
}

/// The attack applied to the test split for ASR, resolved ([`EvalParams::resolve`]).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EvalAttack {
    /// The attack (`--attack`).
    pub attack: Attack,
    /// Trigger words of Add-Word, one drawn per attacked row (`--trigger`).
    pub triggers: Vec<String>,
    /// Trigger sentence of Add-Sent (`--sentence`).
    pub sentence: String,
    /// Column holding the rewritten texts, for Rewrite (`--rewrite-col`).
    pub rewrite_col: Option<String>,
    /// Target label: ASR counts non-target rows predicted as it (`--target`).
    pub target: i64,
    /// Random insertions averaged for ASR (`--repeats`, at least 1).
    pub repeats: usize,
    /// Seed of the insert positions (`--seed`).
    pub seed: u64,
}

/// A test split read for evaluation.
pub struct TestSplit {
    /// Each row's `id` column value (cast to Int64), else its row number within its file.
    pub ids: Vec<i64>,
    /// The texts, in reading order.
    pub texts: Vec<String>,
    /// The labels, parallel to `texts`.
    pub labels: Vec<i64>,
    /// The rewrite column's text (None where absent), when one was asked for.
    pub rewrites: Option<Vec<Option<String>>>,
}

/// Read a labelled test split (and the rewrite column when given).
pub fn read_split(spec: &CorpusSpec, rewrite_col: Option<&str>) -> Result<TestSplit> {
    let mut s = TestSplit {
        ids: vec![],
        texts: vec![],
        labels: vec![],
        rewrites: rewrite_col.map(|_| vec![]),
    };
    read_corpus(spec, |b| {
        let n = b.texts.len();
        match b
            .batch
            .column_by_name("id")
            .map(|c| arrow::compute::cast(c, &DataType::Int64))
        {
            Some(Ok(c)) => {
                let c = c.as_any().downcast_ref::<Int64Array>().expect("int64");
                s.ids.extend((0..n).map(|i| {
                    if c.is_valid(i) {
                        c.value(i)
                    } else {
                        b.rows[i] as i64
                    }
                }));
            }
            _ => s.ids.extend(b.rows.iter().map(|&r| r as i64)),
        }
        if let (Some(rc), Some(out)) = (rewrite_col, s.rewrites.as_mut()) {
            let c = b.batch.column_by_name(rc).ok_or_else(|| {
                BtuError::bad_data(
                    b.source.to_string(),
                    format!("missing rewrite column '{rc}'; name it with --rewrite-col"),
                )
            })?;
            let c = arrow::compute::cast(c, &DataType::Utf8)
                .map_err(|e| BtuError::bad_data(b.source.to_string(), e.to_string()))?;
            let c = c.as_any().downcast_ref::<StringArray>().expect("utf8");
            out.extend((0..n).map(|i| {
                (c.is_valid(i) && !c.value(i).trim().is_empty()).then(|| c.value(i).to_string())
            }));
        }
        s.labels.extend(b.labels.expect("labels requested"));
        s.texts.extend(b.texts);
        Ok(())
    })?;
    Ok(s)
}

/// The attacked copies of the non-target rows for one repeat: (row index, text).
pub fn attacked_rows(split: &TestSplit, a: &EvalAttack, repeat: usize) -> Vec<(usize, String)> {
    (0..split.texts.len())
        .filter(|&i| split.labels[i] != a.target)
        .filter_map(|i| match a.attack {
            Attack::Rewrite => split
                .rewrites
                .as_ref()
                .and_then(|r| r[i].clone())
                .map(|t| (i, t)),
            kind => {
                let mut rng = row_rng(a.seed.wrapping_add(repeat as u64 * 7919), i as u64);
                Some((
                    i,
                    insert_trigger(&split.texts[i], kind, &a.triggers, &a.sentence, &mut rng),
                ))
            }
        })
        .collect()
}

/// A classifier that gives class logits for texts.
pub trait Classifier {
    /// Logits `[n][num_labels]`.
    fn logits(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
    /// Number of classes the model predicts.
    fn num_labels(&self) -> usize;
    /// Name of the runtime (`candle` or `ort`), as `metrics.json` reports it.
    fn backend(&self) -> &'static str;
    /// The tokenizer the model reads its texts with.
    fn tokenizer(&self) -> &BtuTokenizer;
    /// Class probabilities.
    fn proba(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .logits(texts)?
            .iter()
            .map(|l| crate::model::infer::softmax(l))
            .collect())
    }
}

/// The candle classifier over a checkpoint directory.
pub struct CandleClassifier {
    model: crate::model::BertClassifier,
    tok: BtuTokenizer,
    max_len: usize,
    dev: candle_core::Device,
}

impl CandleClassifier {
    /// Load a checkpoint directory (a missing head is initialised from `seed`, as export does).
    pub fn load(dir: &std::path::Path, max_len: usize, device: &str, seed: u64) -> Result<Self> {
        let dev = crate::device::parse_device(device)?;
        let ckpt = Checkpoint::read(dir)?;
        ckpt.check_max_len("--max-len", max_len)?;
        let model = ckpt.classifier(None, seed, &dev)?;
        Ok(CandleClassifier {
            model,
            tok: ckpt.tokenizer,
            max_len,
            dev,
        })
    }
}

impl Classifier for CandleClassifier {
    fn logits(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let seqs = self.tok.encode(texts, self.max_len)?;
        crate::model::infer::predict_logits(&self.model, &seqs, self.tok.pad_id, 64, &self.dev)
    }
    fn num_labels(&self) -> usize {
        self.model.config.labels()
    }
    fn backend(&self) -> &'static str {
        "candle"
    }
    fn tokenizer(&self) -> &BtuTokenizer {
        &self.tok
    }
}

/// Where btu looks for the ONNX Runtime library, in order: `--ort-lib`, `ORT_DYLIB_PATH`, then
/// the project's set-up (`make setup` installs the onnxruntime wheel into `.venv/`), searched
/// from the working directory and from the binary's location upwards.
pub fn find_ort_library(flag: Option<&std::path::Path>) -> Result<PathBuf> {
    let hint = "install it with `make setup` (the onnxruntime==1.31.1 wheel into .venv), or point ORT_DYLIB_PATH or --ort-lib at libonnxruntime.so";
    if let Some(p) = flag {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(BtuError::missing(p.display().to_string(), hint))
        };
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(BtuError::missing(
                format!("ORT_DYLIB_PATH={}", p.display()),
                hint,
            ))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(|p| p.to_path_buf()));
    }
    for root in roots {
        let pattern =
            root.join(".venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*");
        if let Some(hit) = glob::glob(&pattern.to_string_lossy())
            .ok()
            .and_then(|mut g| g.find_map(|p| p.ok()))
        {
            return Ok(hit);
        }
    }
    Err(BtuError::missing(
        "libonnxruntime.so",
        format!("ONNX Runtime library not found; {hint}"),
    ))
}

/// The process-wide ONNX Runtime environment (the library can be loaded once per process).
fn ort_env(lib: &std::path::Path) -> Result<&'static ort::environment::Environment> {
    static ENV: std::sync::OnceLock<std::result::Result<ort::environment::Environment, String>> =
        std::sync::OnceLock::new();
    let r = ENV.get_or_init(|| {
        let b = ort::init_from(lib).map_err(|e| format!("cannot load {}: {e}", lib.display()))?;
        b.with_name("btu")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", lib.display()))
    });
    r.as_ref()
        .map_err(|e| BtuError::config("--ort-lib", e.clone()))
}

/// An exported ONNX model run through ONNX Runtime (`ort`), with the `tokenizer.json` beside it.
pub struct OrtClassifier {
    session: ort::session::Session,
    tok: BtuTokenizer,
    max_len: usize,
    num_labels: usize,
}

impl OrtClassifier {
    /// Load `model` (an .onnx file) with the ONNX Runtime library at `lib`.
    pub fn load(model: &std::path::Path, lib: &std::path::Path, max_len: usize) -> Result<Self> {
        let (meta, rows) = crate::steps::export_onnx::inspect(model)?;
        // The export's own tokenizer, else the shared one beside it (exports before 0.1 had only that).
        let own = crate::steps::export_onnx::own_tokenizer_path(model);
        let tok_path = if own.is_file() {
            own
        } else {
            model.with_file_name("tokenizer.json")
        };
        let tok = BtuTokenizer::load(&tok_path)?;
        if let Some(m) = meta
            .iter()
            .find(|(k, _)| k == "btu:max_position_embeddings")
            .and_then(|(_, v)| v.parse::<usize>().ok())
        {
            crate::validate::max_len("--max-len", max_len, Some(m))?;
        }
        let vocab = meta
            .iter()
            .find(|(k, _)| k == "btu:vocab_size")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .or(rows);
        if let Some(v) = vocab {
            if tok.vocab_size() != v {
                return Err(BtuError::bad_data(
                    model.display().to_string(),
                    format!("the model's vocabulary has {v} tokens but {} has {}; use the tokenizer.json exported with it", tok_path.display(), tok.vocab_size()),
                ));
            }
        }
        let env = ort_env(lib)?;
        let mut builder = ort::session::Session::builder(env)
            .map_err(|e| BtuError::internal(format!("ort session builder: {e}")))?;
        let session = builder.commit_from_file(model).map_err(|e| {
            BtuError::bad_data(
                model.display().to_string(),
                format!("ONNX Runtime cannot load the model: {e}"),
            )
        })?;
        let num_labels = meta
            .iter()
            .find(|(k, _)| k == "btu:num_labels")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(2);
        Ok(OrtClassifier {
            session,
            tok,
            max_len,
            num_labels,
        })
    }
}

impl Classifier for OrtClassifier {
    fn logits(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let seqs = self.tok.encode(texts, self.max_len)?;
        let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let mut out = vec![Vec::new(); seqs.len()];
        for idx in crate::model::tokenizer::bucketed_batches(&lengths, 64, None) {
            let b = crate::model::tokenizer::make_batch(&seqs, &idx, self.tok.pad_id, None);
            let shape = [b.rows, b.seq_len];
            let ids: Vec<i64> = b.ids.iter().map(|&x| x as i64).collect();
            let mask: Vec<i64> = b.mask.iter().map(|&x| x as i64).collect();
            let types = vec![0i64; ids.len()];
            let t = |v: Vec<i64>| {
                ort::value::Tensor::from_array((shape, v))
                    .map_err(|e| BtuError::internal(format!("ort tensor: {e}")))
            };
            let outputs = self
                .session
                .run(ort::inputs!["input_ids" => t(ids)?, "attention_mask" => t(mask)?, "token_type_ids" => t(types)?])
                .map_err(|e| BtuError::internal(format!("ONNX Runtime run failed: {e}")))?;
            let (oshape, data) = outputs["logits"]
                .try_extract_tensor::<f32>()
                .map_err(|e| BtuError::internal(format!("ort logits: {e}")))?;
            let c = oshape[1] as usize;
            for (k, &i) in idx.iter().enumerate() {
                out[i] = data[k * c..(k + 1) * c].to_vec();
            }
        }
        Ok(out)
    }
    fn num_labels(&self) -> usize {
        self.num_labels
    }
    fn backend(&self) -> &'static str {
        "ort"
    }
    fn tokenizer(&self) -> &BtuTokenizer {
        &self.tok
    }
}

/// Which runtime evaluates the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// ONNX Runtime on an exported .onnx model (what users deploy).
    Ort,
    /// The candle classifier on a checkpoint directory.
    Candle,
}

/// Open a classifier: an `.onnx` file through ONNX Runtime, a checkpoint directory through candle.
pub fn open_classifier(
    model: &std::path::Path,
    backend: Option<Backend>,
    ort_lib: Option<&std::path::Path>,
    max_len: usize,
    device: &str,
    seed: u64,
) -> Result<Box<dyn Classifier>> {
    let is_onnx = model.extension().is_some_and(|e| e == "onnx");
    match backend.unwrap_or(if is_onnx {
        Backend::Ort
    } else {
        Backend::Candle
    }) {
        Backend::Ort => {
            if !is_onnx {
                return Err(BtuError::config("--backend", format!("ort runs .onnx files; export {} with btu export-onnx or use --backend candle", model.display())));
            }
            if !model.is_file() {
                return Err(BtuError::missing(
                    model.display().to_string(),
                    "give an .onnx file made by btu export-onnx",
                ));
            }
            let lib = find_ort_library(ort_lib)?;
            Ok(Box::new(OrtClassifier::load(model, &lib, max_len)?))
        }
        Backend::Candle => {
            if is_onnx {
                return Err(BtuError::config(
                    "--backend",
                    "candle runs checkpoint directories; use --backend ort for .onnx files",
                ));
            }
            Ok(Box::new(CandleClassifier::load(
                model, max_len, device, seed,
            )?))
        }
    }
}

/// Predictions of one pass.
pub struct Pass {
    /// Indices of the rows in the [`TestSplit`].
    pub rows: Vec<usize>,
    /// Predicted class of each row (argmax).
    pub pred: Vec<i64>,
    /// Probability of the target class for each row.
    pub target_prob: Vec<f32>,
}

fn predict(
    c: &mut dyn Classifier,
    rows: Vec<usize>,
    texts: &[String],
    target: i64,
) -> Result<Pass> {
    let probs = c.proba(texts)?;
    let pred = probs
        .iter()
        .map(|p| crate::model::infer::argmax(p) as i64)
        .collect();
    let target_prob = probs
        .iter()
        .map(|p| p.get(target as usize).copied().unwrap_or(f32::NAN))
        .collect();
    Ok(Pass {
        rows,
        pred,
        target_prob,
    })
}

/// A rate, `None` where it is undefined (no row to measure it on; JSON `null`).
fn rate(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// What a classifier scored on a split.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Scores {
    /// Runtime that produced the predictions (`ort` or `candle`).
    pub backend: String,
    /// Clean accuracy.
    pub acc: Option<f64>,
    /// Attack success rate, averaged over the repeats (`None` without an attack).
    pub asr: Option<f64>,
    /// ASR of each repeat.
    pub asr_per_repeat: Vec<Option<f64>>,
    /// Trigger flip rate ([`flip_rate`]), averaged over the repeats.
    pub flip_rate: Option<f64>,
    /// Share of the clean non-target rows predicted as the target (ASR's floor).
    pub clean_false_positive_rate: Option<f64>,
    /// Share of the clean target rows predicted as another class.
    pub clean_false_negative_rate: Option<f64>,
    /// Rows of the split.
    pub rows: usize,
    /// Rows attacked per repeat.
    pub attacked_rows: usize,
    /// Clean confusion matrix `[true][predicted]`.
    pub confusion_matrix: Vec<Vec<u64>>,
    /// The attack measured.
    pub attack: Option<EvalAttack>,
}

/// `btu eval`'s result (`metrics.json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EvalReport {
    /// `eval`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The model evaluated.
    pub model: PathBuf,
    /// sha256 of its weights.
    pub model_sha256: String,
    /// The test split's inputs.
    pub test: Vec<String>,
    /// The scores.
    #[serde(flatten)]
    pub scores: Scores,
    /// Wall time.
    pub seconds: f64,
}

/// Metrics of a classifier on a split, with the predictions table.
pub fn evaluate(
    c: &mut dyn Classifier,
    split: &TestSplit,
    attack: Option<&EvalAttack>,
    target: i64,
) -> Result<(Scores, RecordBatch)> {
    let classes = c.num_labels();
    if let Some(bad) = split
        .labels
        .iter()
        .find(|&&l| l < 0 || l as usize >= classes)
    {
        return Err(BtuError::bad_data(
            "--test",
            format!("label {bad} is outside the model's {classes} classes"),
        ));
    }
    let clean = predict(c, (0..split.texts.len()).collect(), &split.texts, target)?;
    let acc = accuracy(&clean.pred, &split.labels);
    let mut passes = vec![(None, clean)];
    let mut asrs = Vec::new();
    let mut flips = Vec::new();
    let mut attacked_n = 0;
    if let Some(a) = attack {
        for r in 0..a.repeats.max(1) {
            let rows = attacked_rows(split, a, r);
            attacked_n = rows.len();
            let (idx, texts): (Vec<usize>, Vec<String>) = rows.into_iter().unzip();
            let p = predict(c, idx.clone(), &texts, a.target)?;
            let labels: Vec<i64> = idx.iter().map(|&i| split.labels[i]).collect();
            asrs.push(attack_success_rate(&p.pred, &labels, a.target));
            let clean_here: Vec<i64> = idx.iter().map(|&i| passes[0].1.pred[i]).collect();
            flips.push(flip_rate(&p.pred, &clean_here, &labels, a.target));
            passes.push((Some(r as u32), p));
        }
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let clean_pred = &passes[0].1.pred;
    let target = attack.map_or(target, |a| a.target);
    let metrics = Scores {
        backend: c.backend().to_string(),
        acc: rate(acc),
        asr: mean(&asrs).and_then(rate),
        asr_per_repeat: asrs.iter().map(|&x| rate(x)).collect(),
        flip_rate: mean(&flips).and_then(rate),
        clean_false_positive_rate: rate(attack_success_rate(clean_pred, &split.labels, target)),
        clean_false_negative_rate: rate(crate::metrics::false_negative_rate(
            clean_pred,
            &split.labels,
            target,
        )),
        rows: split.texts.len(),
        attacked_rows: attacked_n,
        confusion_matrix: confusion(clean_pred, &split.labels, classes),
        attack: attack.cloned(),
    };
    // predictions: clean rows, then attacked rows per repeat.
    let (mut id, mut label, mut pred, mut prob, mut poisoned, mut repeat) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (r, p) in &passes {
        for (k, &i) in p.rows.iter().enumerate() {
            id.push(split.ids[i]);
            label.push(split.labels[i]);
            pred.push(p.pred[k]);
            prob.push(p.target_prob[k]);
            poisoned.push(r.is_some());
            repeat.push(*r);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("label", DataType::Int64, false),
        Field::new("prediction", DataType::Int64, false),
        Field::new("target_prob", DataType::Float32, false),
        Field::new("poisoned", DataType::Boolean, false),
        Field::new("repeat", DataType::UInt32, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(id)),
        Arc::new(Int64Array::from(label)),
        Arc::new(Int64Array::from(pred)),
        Arc::new(Float32Array::from(prob)),
        Arc::new(BooleanArray::from(poisoned)),
        Arc::new(UInt32Array::from(repeat)),
    ];
    let batch = RecordBatch::try_new(schema, cols)
        .map_err(|e| BtuError::internal(format!("predictions: {e}")))?;
    crate::io::tables::ensure_finite(&batch)?;
    Ok((metrics, batch))
}

/// Inputs of `btu eval`.
pub struct EvalJob {
    /// Checkpoint directory or exported `.onnx` file (`--model`).
    pub model: PathBuf,
    /// Labelled test split (`--test`).
    pub test: CorpusSpec,
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
    /// Attack for ASR; `None` measures ACC only.
    pub attack: Option<EvalAttack>,
    /// Target label (`--target`): the class of `target_prob` and of the clean false-positive and
    /// false-negative rates.
    pub target: i64,
    /// Tokens per sequence including `[CLS]`/`[SEP]` (`--max-len`).
    pub max_len: usize,
    /// Runtime (`--backend`); `None` picks ort for `.onnx` files, candle otherwise.
    pub backend: Option<Backend>,
    /// `libonnxruntime.so` to load (`--ort-lib`); see [`find_ort_library`].
    pub ort_lib: Option<PathBuf>,
}

/// Whether each clean (not attacked) row of a `predictions.parquet` is classified correctly, in
/// the file's order.
pub fn clean_correct(predictions: &std::path::Path) -> Result<Vec<bool>> {
    use arrow::array::{AsArray, BooleanArray};
    use arrow::datatypes::Int64Type;
    let bad = |e: &dyn std::fmt::Display| {
        BtuError::bad_data(predictions.display().to_string(), e.to_string())
    };
    let mut out = Vec::new();
    for b in crate::io::tables::read_parquet(predictions)? {
        let col = |n: &str| {
            b.column_by_name(n)
                .cloned()
                .ok_or_else(|| bad(&format!("no column '{n}'")))
        };
        let (label, pred, poisoned) = (col("label")?, col("prediction")?, col("poisoned")?);
        let (label, pred) = (
            label.as_primitive::<Int64Type>(),
            pred.as_primitive::<Int64Type>(),
        );
        let poisoned: &BooleanArray = poisoned.as_boolean();
        out.extend(
            (0..b.num_rows())
                .filter(|&i| !poisoned.value(i))
                .map(|i| label.value(i) == pred.value(i)),
        );
    }
    Ok(out)
}

/// `btu eval`.
pub fn run(job: &EvalJob) -> Result<EvalReport> {
    let t0 = Instant::now();
    crate::validate::max_len("--max-len", job.max_len, None)?;
    if let Some(a) = &job.attack {
        crate::validate::at_least("--repeats", a.repeats, 1)?;
        match a.attack {
            Attack::Rewrite if a.rewrite_col.is_none() => {
                return Err(BtuError::config(
                    "--rewrite-col",
                    "--attack rewrite needs the column holding the rewritten texts",
                ))
            }
            Attack::AddWord if a.triggers.iter().all(|t| t.trim().is_empty()) => {
                return Err(BtuError::config(
                    "--trigger",
                    "--attack add-word needs a trigger word",
                ))
            }
            Attack::AddSent if a.sentence.trim().is_empty() => {
                return Err(BtuError::config(
                    "--sentence",
                    "--attack add-sent needs a trigger sentence",
                ))
            }
            _ => {}
        }
    }
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    let mut clf = open_classifier(
        &job.model,
        job.backend,
        job.ort_lib.as_deref(),
        job.max_len,
        &job.run.device,
        job.run.seed,
    )?;
    let weights = if job.model.is_dir() {
        job.model.join("model.safetensors")
    } else {
        job.model.clone()
    };
    let sha = sha256_file(&weights)?;
    crate::validate::label("--target", job.target, clf.num_labels())?;
    let split = read_split(
        &job.test,
        job.attack.as_ref().and_then(|a| a.rewrite_col.as_deref()),
    )?;
    let (scores, batch) = evaluate(clf.as_mut(), &split, job.attack.as_ref(), job.target)?;
    let out = crate::io::output::OutputDir::create(&job.run.out, job.run.overwrite)?;
    crate::io::tables::write_parquet(&out.path("predictions.parquet"), &batch, false)?;
    let report = EvalReport {
        command: "eval".into(),
        version: crate::VERSION.into(),
        model: job.model.clone(),
        model_sha256: sha,
        test: job.test.inputs.clone(),
        scores,
        seconds: t0.elapsed().as_secs_f64(),
    };
    out.write_json("metrics.json", &report)?;
    out.commit()?;
    Ok(report)
}
