//! Stage 2 of BTU: dimensional fine-grained unlearning (btu-spec.md). For every suspicious token,
//! the embedding dimensions of the trained checkpoint that moved at least the threshold `d_bar`
//! away from the reference are overwritten with the padding token's values; every other tensor
//! stays byte-identical. Optional brief clean fine-tuning. `apply-masks` replays a mask table.

pub mod escalate;

/// The version of the verified repair's rules, in `btu defend`'s step keys: bumped when they
/// change, so reruns recompute the repair (3: a level that does not lower a trigger's flip rate
/// is undone; the clean tuning does not insert on its own a verified trigger that a verified
/// phrase contains; 2 was a screened rule that was not kept).
pub const REPAIR_VERSION: u32 = 3;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::defaults;
use crate::error::{BtuError, Result};
use crate::io::corpus::{read_corpus, CorpusSpec};
use crate::io::tables::{canonical_json, DimensionMask, TableMeta, TokenEffect};
use crate::model::checkpoint::{
    read_safetensors, safetensors_bytes, sha256_file, Checkpoint, ModelDir, RawTensor,
    SafetensorsFile,
};
use crate::model::tokenizer::BtuTokenizer;
use crate::progress::Progress;
use crate::steps::eval::CandleClassifier;
use crate::steps::train::{copy_tokenizer_files, TrainParams};
use crate::steps::unlearn::escalate::{escalate, Trigger};
use crate::steps::verify::Candidate;

/// How `d_bar` is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Threshold {
    /// Paper Eq. 6: the mean over the vocabulary of each row's Euclidean change.
    MeanRow,
    /// Released code: Frobenius norm of the whole change divided by the row count.
    Frobenius,
}

/// Where replacement values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Replacement {
    /// The padding row of the trained matrix (paper).
    TrainedPad,
    /// The padding row of the reference matrix (released code).
    ReferencePad,
}

/// When the clean fine-tune runs (given clean data).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum CleanTuning {
    /// Without `--effects`, always; with it, only when a verified trigger still flips the model
    /// after the escalated repair: a repair that removed the effect changes no other weight.
    #[default]
    Auto,
    /// Always (the paper).
    Always,
}

/// What happens to the candidates verification did not confirm (with `--effects`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Unverified {
    /// Leave their rows as the checkpoint has them.
    #[default]
    Keep,
    /// Restore their pre-trained rows (the reference model's): undoes whatever the suspect's
    /// training taught them, clean or not.
    ReferenceRow,
}

impl Unverified {
    /// `keep`, the default.
    pub fn is_keep(&self) -> bool {
        *self == Unverified::Keep
    }
}

/// A dense row-major `[rows, cols]` f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Number of rows (the vocabulary size for an embedding matrix).
    pub rows: usize,
    /// Number of columns (the hidden size).
    pub cols: usize,
    /// The `rows * cols` values, row after row.
    pub data: Vec<f32>,
}

impl Matrix {
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// `d_bar` for a reference `e` and trained `eb` matrix (computed in f64).
pub fn threshold(e: &Matrix, eb: &Matrix, rule: Threshold) -> f64 {
    let v = e.rows as f64;
    match rule {
        Threshold::MeanRow => {
            (0..e.rows)
                .map(|r| {
                    e.row(r)
                        .iter()
                        .zip(eb.row(r))
                        .map(|(a, b)| ((*b as f64) - (*a as f64)).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .sum::<f64>()
                / v
        }
        Threshold::Frobenius => {
            e.data
                .iter()
                .zip(&eb.data)
                .map(|(a, b)| ((*b as f64) - (*a as f64)).powi(2))
                .sum::<f64>()
                .sqrt()
                / v
        }
    }
}

/// The masks: for each token in `tokens` and each dimension whose change `|eb - e|` is at least
/// `d_bar`, the value to write (the padding row of `eb` or of `e`). Rows are ordered by token id
/// then dimension.
pub fn compute_masks(
    e: &Matrix,
    eb: &Matrix,
    tokens: &[(u32, String)],
    pad: u32,
    d_bar: f64,
    rep: Replacement,
) -> Vec<DimensionMask> {
    let pad_row = match rep {
        Replacement::TrainedPad => eb.row(pad as usize),
        Replacement::ReferencePad => e.row(pad as usize),
    };
    let mut sorted = tokens.to_vec();
    sorted.sort_by_key(|t| t.0);
    row_masks(
        e,
        eb,
        &sorted,
        &|re, rb| ((rb as f64) - (re as f64)).abs() >= d_bar,
        &|i, _| pad_row[i],
    )
}

/// Masks restoring the reference rows of `tokens`: every dimension where `eb` differs from `e`.
pub fn restore_masks(e: &Matrix, eb: &Matrix, tokens: &[(u32, String)]) -> Vec<DimensionMask> {
    row_masks(e, eb, tokens, &|re, rb| rb != re, &|_, re| re)
}

/// For each token (in the given order) and dimension `i` where `select(reference, trained)`, a
/// mask writing `write(i, reference)`.
fn row_masks(
    e: &Matrix,
    eb: &Matrix,
    tokens: &[(u32, String)],
    select: &dyn Fn(f32, f32) -> bool,
    write: &dyn Fn(usize, f32) -> f32,
) -> Vec<DimensionMask> {
    let mut out = Vec::new();
    for (t, tok) in tokens {
        let (re, rb) = (e.row(*t as usize), eb.row(*t as usize));
        for i in 0..e.cols {
            if select(re[i], rb[i]) {
                out.push(DimensionMask {
                    token_id: *t,
                    token: tok.clone(),
                    dim: i as u32,
                    reference: re[i],
                    trained: rb[i],
                    delta: rb[i] - re[i],
                    written: write(i, re[i]),
                });
            }
        }
    }
    out
}

/// Apply masks to a matrix in place.
pub fn apply(eb: &mut Matrix, masks: &[DimensionMask]) {
    for m in masks {
        eb.data[m.token_id as usize * eb.cols + m.dim as usize] = m.written;
    }
}

const WORD: &str = "embeddings.word_embeddings.weight";

/// The name of the word-embedding tensor in a safetensors file.
pub(crate) fn word_name(f: &SafetensorsFile, src: &Path) -> Result<String> {
    // Any family's name for it (bert., roberta., distilbert. or none).
    let families = [
        crate::model::Family::Bert,
        crate::model::Family::Roberta,
        crate::model::Family::Distilbert,
        crate::model::Family::Gpt2,
    ];
    families
        .iter()
        .flat_map(|f| f.names(WORD))
        .find(|n| f.tensors.contains_key(n))
        .ok_or_else(|| {
            BtuError::bad_data(
                src.display().to_string(),
                format!("no word-embedding matrix ({WORD}, or GPT-2's wte.weight, under any family's prefix) in the checkpoint"),
            )
        })
}

pub(crate) fn matrix(t: &RawTensor, name: &str, src: &Path) -> Result<Matrix> {
    if t.shape.len() != 2 {
        return Err(BtuError::bad_data(
            src.display().to_string(),
            format!("{name} is not a matrix: {:?}", t.shape),
        ));
    }
    let x = crate::model::checkpoint::to_tensor(name, t, src, &candle_core::Device::Cpu)?;
    let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
    if data.iter().any(|v| !v.is_finite()) {
        return Err(BtuError::bad_data(
            src.display().to_string(),
            format!("{name} holds NaN or infinite values"),
        ));
    }
    Ok(Matrix {
        rows: t.shape[0],
        cols: t.shape[1],
        data,
    })
}

/// The matrix back in the tensor's own dtype (little-endian bytes, as safetensors stores them).
pub(crate) fn raw_like(m: &Matrix, like: &RawTensor) -> Result<RawTensor> {
    let data: Vec<u8> = match like.dtype.as_str() {
        "F64" => m
            .data
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect(),
        "F16" => m
            .data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        "BF16" => m
            .data
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => m.data.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    };
    let dtype = if matches!(like.dtype.as_str(), "F64" | "F16" | "BF16") {
        like.dtype.clone()
    } else {
        "F32".into()
    };
    Ok(RawTensor {
        dtype,
        shape: vec![m.rows, m.cols],
        data,
    })
}

/// Parameters of the repair: the flags of `btu unlearn` and the `[unlearn]` table of
/// `btu defend` (defaults in [`crate::defaults`]).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct UnlearnParams {
    /// Dimension threshold d_bar: mean-row (paper Eq. 6) or frobenius (the released code).
    #[arg(long, env = "BTU_THRESHOLD", value_enum, default_value_t = Threshold::MeanRow)]
    pub threshold: Threshold,
    /// Replacement values: trained-pad (trained padding row, paper) or reference-pad (released code).
    #[arg(long, env = "BTU_REPLACEMENT", value_enum, default_value_t = Replacement::TrainedPad)]
    pub replacement: Replacement,
    /// Epochs of the clean fine-tune on the clean corpus (at least 1; the paper: 3).
    #[arg(long, env = "BTU_CLEAN_EPOCHS", default_value_t = defaults::CLEAN_EPOCHS)]
    pub clean_epochs: usize,
    /// AdamW learning rate of the clean fine-tune, finite in (0, 1] (the paper: 5e-7).
    #[arg(long, env = "BTU_CLEAN_LR", default_value_t = defaults::CLEAN_LR)]
    pub clean_lr: f64,
    /// With verified triggers: share of the clean fine-tune's rows that get one inserted, label
    /// kept, so the model learns the trigger means nothing (0 turns it off).
    #[arg(long, env = "BTU_TRIGGER_ROWS", default_value_t = defaults::TRIGGER_ROWS)]
    pub trigger_rows: f64,
    /// With verified triggers and clean data: escalate a trigger's repair (flagged dimensions,
    /// whole row, the next phrase token) while the 95 % lower bound of its flip rate on the clean
    /// rows stays above this.
    #[arg(long, env = "BTU_MAX_RESIDUAL", default_value_t = defaults::MAX_RESIDUAL)]
    pub max_residual: f64,
    /// Clean rows tried per trigger by each recheck of the escalation (at least 1).
    #[arg(long, env = "BTU_RECHECK_ROWS", default_value_t = defaults::VERIFY_ROWS)]
    pub recheck_rows: usize,
    /// With verified triggers: the candidates verification did not confirm keep their rows
    /// (keep) or get their pre-trained rows back (reference-row).
    #[arg(long, env = "BTU_UNVERIFIED", value_enum, default_value_t = Unverified::Keep)]
    #[serde(skip_serializing_if = "Unverified::is_keep")]
    pub unverified: Unverified,
    /// When the clean fine-tune runs: auto (with verified triggers only when one still flips the
    /// model after the repair; always without them) or always (the paper).
    #[arg(long, env = "BTU_CLEAN_TUNING", value_enum, default_value_t = CleanTuning::Auto)]
    pub clean_tuning: CleanTuning,
}

impl Default for UnlearnParams {
    fn default() -> Self {
        UnlearnParams {
            threshold: Threshold::MeanRow,
            replacement: Replacement::TrainedPad,
            clean_epochs: defaults::CLEAN_EPOCHS,
            clean_lr: defaults::CLEAN_LR,
            trigger_rows: defaults::TRIGGER_ROWS,
            max_residual: defaults::MAX_RESIDUAL,
            recheck_rows: defaults::VERIFY_ROWS,
            unverified: Unverified::Keep,
            clean_tuning: CleanTuning::Auto,
        }
    }
}

impl UnlearnParams {
    /// Check the repair's values (exit 78); names spelled with `prefix` (`--` for flags,
    /// `unlearn.` for a defend config). The clean tuning's epochs and learning rate are checked
    /// with its other parameters (`TrainParams::validate_as`), when there is clean data.
    pub fn validate_as(&self, prefix: &str) -> Result<()> {
        use crate::validate::{self as v, key};
        v::fraction(&key(prefix, "trigger-rows"), self.trigger_rows)?;
        v::fraction(&key(prefix, "max-residual"), self.max_residual)?;
        v::at_least(&key(prefix, "recheck-rows"), self.recheck_rows, 1)
    }
}

/// Inputs of `btu unlearn`.
pub struct UnlearnJob {
    /// The trained, possibly backdoored checkpoint `M^b` to repair (`--checkpoint`).
    pub checkpoint: PathBuf,
    /// The model the checkpoint was trained from, whose embeddings are the reference `e`
    /// (`--reference`).
    pub reference: PathBuf,
    /// `suspicious_tokens.arrow` from `btu detect` (`--suspicious`).
    pub suspicious: PathBuf,
    /// `token_effects.arrow` from `btu verify`: repair only the verified triggers.
    pub effects: Option<PathBuf>,
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
    /// Labelled clean data (`--clean-corpus`) for the fine-tune after the repair and, with
    /// `effects`, for the rechecks of the escalation.
    pub clean_corpus: Option<CorpusSpec>,
    /// Evaluation splits the clean data must not overlap, by text hash (`--eval-split`).
    pub eval_split: Vec<CorpusSpec>,
    /// Rows per batch of the clean fine-tune (`--batch-size`).
    pub batch_size: usize,
    /// Tokens per sequence of the clean fine-tune and the rechecks (`--max-len`).
    pub max_len: usize,
    /// The flip-rate bound of the rechecks' verification test (`btu defend`: `verify.min_flip_rate`).
    pub min_flip_rate: f64,
    /// The repair's parameters.
    pub params: UnlearnParams,
}

impl UnlearnJob {
    /// Hyper-parameters of the clean fine-tune.
    pub fn clean_params(&self) -> TrainParams {
        TrainParams {
            epochs: self.params.clean_epochs,
            lr: self.params.clean_lr,
            batch_size: self.batch_size,
            max_len: self.max_len,
            ..Default::default()
        }
    }

    /// The verification test of the escalation's rechecks.
    pub fn recheck_params(&self) -> crate::steps::verify::VerifyParams {
        crate::steps::verify::VerifyParams {
            rows: self.params.recheck_rows,
            min_flip_rate: self.min_flip_rate,
            ..Default::default()
        }
    }
}

/// The text hashes ([`crate::io::corpus::text_sha256`]) of every row of a corpus.
pub fn text_hashes(spec: &CorpusSpec) -> Result<BTreeSet<[u8; 32]>> {
    Ok(row_text_hashes(spec)?.into_iter().collect())
}

/// The text hash of each row of a corpus, in order (duplicates kept).
pub fn row_text_hashes(spec: &CorpusSpec) -> Result<Vec<[u8; 32]>> {
    let mut out = Vec::new();
    let spec = CorpusSpec {
        label_col: None,
        ..spec.clone()
    };
    read_corpus(&spec, |b| {
        out.extend(b.texts.iter().map(|t| crate::io::corpus::text_sha256(t)));
        Ok(())
    })?;
    Ok(out)
}

/// Copy the config and tokenizer files of `src_dir` into `out`.
fn copy_model_files(out: &crate::io::output::OutputDir, src_dir: &Path) -> Result<()> {
    let cfg = src_dir.join("config.json");
    std::fs::copy(&cfg, out.path("config.json")).map_err(|e| BtuError::io(&cfg, e))?;
    copy_tokenizer_files(src_dir, &out.path(""))
}

/// Write a checkpoint directory: every tensor of `file` (word embeddings replaced), metadata,
/// config and tokenizer files of `src_dir`, and the mask table.
pub(crate) fn write_checkpoint(
    out: &crate::io::output::OutputDir,
    src_dir: &Path,
    file: &SafetensorsFile,
    masks: &arrow::array::RecordBatch,
) -> Result<()> {
    out.write("model.safetensors", &safetensors_bytes(file))?;
    copy_model_files(out, src_dir)?;
    crate::io::tables::write_ipc(&out.path("dimension_masks.arrow"), masks, false)
}

/// What the clean fine-tune after the repair did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanTuningReport {
    /// Why it did not run (`--clean-tuning auto` with no trigger left).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Clean rows tuned on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    /// Those that got a verified trigger inserted, label kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_with_trigger: Option<usize>,
    /// Each epoch's statistics.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<crate::training::EpochStats>,
    /// Provenance of the clean corpus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corpus: Option<crate::io::corpus::Fingerprint>,
    /// The evaluation splits the clean data was checked to be disjoint from.
    pub disjoint_from: Vec<String>,
}

/// `btu unlearn`'s result.
#[derive(Debug, Clone, Serialize)]
pub struct UnlearnReport {
    /// `unlearn`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// Output checkpoint directory.
    pub out: PathBuf,
    /// sha256 of the repaired checkpoint's input weights.
    pub checkpoint_sha256: String,
    /// sha256 of the reference model's weights.
    pub reference_sha256: String,
    /// How `d_bar` was computed.
    pub threshold_rule: Threshold,
    /// `d_bar`.
    pub threshold: f64,
    /// Where the replacement values came from.
    pub replacement: Replacement,
    /// The padding token's id.
    pub pad_token_id: u32,
    /// Tokens with a replaced cell.
    pub tokens: usize,
    /// Cells replaced.
    pub dimensions_replaced: usize,
    /// Whether any was.
    pub repaired: bool,
    /// Whether only verified triggers were repaired (`--effects`).
    pub verified_only: bool,
    /// The verified triggers (with `--effects`).
    pub verified: Option<Vec<String>>,
    /// The escalation's stages (with `--effects` and clean data).
    pub escalation: Option<Vec<crate::steps::unlearn::escalate::Stage>>,
    /// Cells replaced per token.
    pub dimensions_per_token: BTreeMap<String, usize>,
    /// The model's hidden size.
    pub hidden_size: usize,
    /// The clean fine-tune (with clean data).
    pub clean_tuning: Option<CleanTuningReport>,
    /// Wall time.
    pub seconds: f64,
}

/// `btu unlearn`: read the checkpoint and the reference, choose the cells (verified triggers
/// with escalation, or every suspicious token), write the repaired checkpoint with its mask
/// table, then fine-tune on clean data where that is asked for.
pub fn run(job: &UnlearnJob, progress: &dyn Progress) -> Result<UnlearnReport> {
    let t0 = Instant::now();
    validate(job)?;
    let Checkpoint {
        dir: ckpt,
        tokenizer: tok,
        weights: mut trained,
        sha256: ckpt_sha,
    } = Checkpoint::read(&job.checkpoint)?;
    let suspicious = crate::io::tables::read_suspicious_tokens(&job.suspicious)?;
    let wn = word_name(&trained, &ckpt.weights)?;
    let eb = matrix(&trained.tensors[&wn], &wn, &ckpt.weights)?;
    let (e, ref_sha) = reference_embeddings(job, &eb)?;
    let tokens: Vec<(u32, String)> = suspicious
        .iter()
        .map(|s| (s.token_id, s.token.clone()))
        .collect();
    check_tokens(&tokens, &tok, eb.rows, &job.suspicious)?;
    let verified = read_verified(job, eb.rows)?;
    let overlap_checked = check_clean_disjoint(job)?;
    let out = crate::io::output::OutputDir::create(&job.run.out, job.run.overwrite)?;
    copy_model_files(&out, &job.checkpoint)?;
    let ctx = Embeddings {
        e: &e,
        eb: &eb,
        name: &wn,
        d_bar: threshold(&e, &eb, job.params.threshold),
    };
    let (masks, stages) = match &verified {
        Some(v) => {
            let (masks, stages) =
                repair_verified(job, v, &suspicious, &tok, &ctx, &mut trained, &out)?;
            (with_unverified(job, masks, &tokens, &ctx), stages)
        }
        None => (
            compute_masks(
                &e,
                &eb,
                &tokens,
                tok.pad_id,
                ctx.d_bar,
                job.params.replacement,
            ),
            None,
        ),
    };
    // The rule that chose the cells, as the mask table names it.
    let rule = match &verified {
        Some(_) => "verified-escalated".to_string(),
        None => kebab(&job.params.threshold)?,
    };
    replace_rows(job, &ctx, &masks, &mut trained)?;
    stamp(&mut trained, &ckpt_sha, &ref_sha, &rule);
    let mut meta = mask_table_meta(job, &rule, &ctx, tok.pad_id, &ckpt_sha)?;
    if let Some(t) = tok.borrowed_pad() {
        // A model without a padding token (GPT-2): its padding stands in, and so does its row.
        meta.extra.push((
            "btu:pad_token".into(),
            format!("{t} (the model has no padding token; the one it pads with stands in)"),
        ));
    }
    let mask_batch = crate::io::tables::dimension_masks_batch(&masks, &meta)?;
    write_checkpoint(&out, &job.checkpoint, &trained, &mask_batch)?;
    let clean_tuning = tune_if_needed(
        job,
        verified.as_deref(),
        stages.as_deref(),
        overlap_checked,
        &trained,
        &tok,
        &out,
        progress,
    )?;
    out.commit()?;
    let per_token: BTreeMap<String, usize> = masks.iter().fold(BTreeMap::new(), |mut m, x| {
        *m.entry(x.token.clone()).or_default() += 1;
        m
    });
    Ok(UnlearnReport {
        command: "unlearn".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        checkpoint_sha256: ckpt_sha,
        reference_sha256: ref_sha,
        threshold_rule: job.params.threshold,
        threshold: ctx.d_bar,
        replacement: job.params.replacement,
        pad_token_id: tok.pad_id,
        tokens: per_token.len(),
        dimensions_replaced: masks.len(),
        repaired: !masks.is_empty(),
        verified_only: job.effects.is_some(),
        verified: verified.map(|v| v.into_iter().map(|c| c.text).collect()),
        escalation: stages,
        dimensions_per_token: per_token,
        hidden_size: eb.cols,
        clean_tuning,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The repair's and the clean fine-tune's parameters, and the output, before any work.
fn validate(job: &UnlearnJob) -> Result<()> {
    job.params.validate_as("--")?;
    job.recheck_params().validate_as("--")?;
    if job.clean_corpus.is_some() {
        job.clean_params().validate_as("--", true)?;
    }
    crate::io::output::check_output(&job.run.out, job.run.overwrite)
}

/// Apply the masks to the trained word embeddings in `file` (checked finite).
fn replace_rows(
    job: &UnlearnJob,
    ctx: &Embeddings,
    masks: &[DimensionMask],
    file: &mut SafetensorsFile,
) -> Result<()> {
    let mut repaired = ctx.eb.clone();
    apply(&mut repaired, masks);
    crate::validate::finite(
        &job.checkpoint.display().to_string(),
        ctx.name,
        repaired.data.iter().copied(),
    )?;
    let raw = raw_like(&repaired, &file.tensors[ctx.name])?;
    file.tensors.insert(ctx.name.to_string(), raw);
    Ok(())
}

/// The repaired checkpoint's provenance: the command, what it was repaired from, the rule.
fn stamp(file: &mut SafetensorsFile, ckpt_sha: &str, ref_sha: &str, rule: &str) {
    for (k, v) in [
        ("btu:command", "unlearn"),
        ("btu:unlearned_from_sha256", ckpt_sha),
        ("btu:reference_sha256", ref_sha),
        ("btu:threshold_rule", rule),
    ] {
        file.metadata.insert(k.into(), v.into());
    }
}

/// The provenance metadata of `dimension_masks.arrow`.
fn mask_table_meta(
    job: &UnlearnJob,
    rule: &str,
    ctx: &Embeddings,
    pad: u32,
    ckpt_sha: &str,
) -> Result<TableMeta> {
    let mut params = json!({
        "threshold": job.params.threshold, "replacement": job.params.replacement,
        "clean": job.clean_corpus.as_ref().map(|_| job.clean_params()), "seed": job.run.seed,
    });
    if let Some(e) = &job.effects {
        // The effects' content, not their path: the same repair from another directory writes
        // the same table.
        params["effects_sha256"] = json!(sha256_file(e)?);
        params["trigger_rows"] = json!(job.params.trigger_rows);
        params["max_residual"] = json!(job.params.max_residual);
        params["recheck"] = json!(job.recheck_params());
        params["unverified"] = json!(job.params.unverified);
        params["clean_tuning"] = json!(job.params.clean_tuning);
    }
    Ok(TableMeta {
        command: "unlearn".into(),
        params,
        model_sha256: ckpt_sha.to_string(),
        corpus_fingerprint: None,
        extra: vec![
            ("btu:threshold_rule".into(), rule.to_string()),
            ("btu:threshold".into(), format!("{}", ctx.d_bar)),
            ("btu:replacement".into(), kebab(&job.params.replacement)?),
            ("btu:pad_token_id".into(), pad.to_string()),
            ("btu:vocab_size".into(), ctx.eb.rows.to_string()),
            ("btu:hidden_size".into(), ctx.eb.cols.to_string()),
        ],
    })
}

/// The clean fine-tune, when there is clean data and `--clean-tuning` asks for it (`auto`:
/// unless every verified trigger stopped flipping the model after the repair).
#[allow(clippy::too_many_arguments)]
fn tune_if_needed(
    job: &UnlearnJob,
    verified: Option<&[Candidate]>,
    stages: Option<&[escalate::Stage]>,
    disjoint_from: Vec<String>,
    trained: &SafetensorsFile,
    tok: &crate::model::tokenizer::BtuTokenizer,
    out: &crate::io::output::OutputDir,
    progress: &dyn Progress,
) -> Result<Option<CleanTuningReport>> {
    let Some(clean) = &job.clean_corpus else {
        return Ok(None);
    };
    let persisting = stages
        .and_then(|s| s.last())
        .is_some_and(|s| !s.persisting.is_empty());
    let tune = match job.params.clean_tuning {
        CleanTuning::Always => true,
        CleanTuning::Auto => verified.is_none() || persisting,
    };
    if !tune {
        return Ok(Some(CleanTuningReport {
            skipped: Some("no verified trigger flips the model after the repair, so no other weight changes (--clean-tuning auto)".into()),
            disjoint_from,
            ..Default::default()
        }));
    }
    let inserts = match verified {
        Some(v) if job.params.trigger_rows > 0.0 => tuning_inserts(v),
        _ => Vec::new(),
    };
    Ok(Some(CleanTuningReport {
        disjoint_from,
        ..clean_tune(job, clean, &inserts, trained, tok, out, progress)?
    }))
}

/// What the clean tuning inserts: the verified triggers but those inside another verified phrase
/// (`3d` of `i watch this 3d movie`), which the phrase already carries; each would otherwise take
/// a share of the rows from the whole trigger (SST-2 Add-Sent: flip 1.9 -> 3.3 %, measured).
fn tuning_inserts(verified: &[Candidate]) -> Vec<Candidate> {
    // Whole words, as verification matches a phrase in the clean rows.
    let inside = |c: &Candidate, p: &Candidate| {
        p.phrase
            && p.text != c.text
            && crate::steps::verify::occurs(&p.text.to_lowercase(), &c.text.to_lowercase())
    };
    verified
        .iter()
        .filter(|c| !verified.iter().any(|p| inside(c, p)))
        .cloned()
        .collect()
}

/// The reference model's word embeddings `e` (the same shape as the checkpoint's `eb`) and the
/// sha256 of its weights.
fn reference_embeddings(job: &UnlearnJob, eb: &Matrix) -> Result<(Matrix, String)> {
    let reference = ModelDir::open(&job.reference)?;
    let ref_file = read_safetensors(&reference.weights)?;
    let rn = word_name(&ref_file, &reference.weights)?;
    let e = matrix(&ref_file.tensors[&rn], &rn, &reference.weights)?;
    let src = job.reference.display().to_string();
    if e.cols != eb.cols {
        return Err(BtuError::bad_data(src, format!("hidden size {} differs from the checkpoint's {}; give the model the checkpoint was trained from", e.cols, eb.cols)));
    }
    if e.rows != eb.rows {
        return Err(BtuError::bad_data(src, format!("vocabulary of {} tokens differs from the checkpoint's {}; give the model the checkpoint was trained from", e.rows, eb.rows)));
    }
    Ok((e, sha256_file(&reference.weights)?))
}

/// The verified triggers of `--effects` (`None` without it); their ids must be below `rows`.
fn read_verified(job: &UnlearnJob, rows: usize) -> Result<Option<Vec<Candidate>>> {
    let Some(src) = &job.effects else {
        return Ok(None);
    };
    let v = crate::steps::verify::verified_candidates(src)?;
    // token_effects holds ids only: what can be checked is that they exist.
    if let Some(id) = v
        .iter()
        .flat_map(|c| &c.token_ids)
        .find(|&&id| id as usize >= rows)
    {
        return Err(BtuError::bad_data(
            src.display().to_string(),
            format!("token id {id} is outside the checkpoint's vocabulary of {rows}; verify with the same tokenizer"),
        ));
    }
    if v.is_empty() {
        tracing::warn!("no candidate to repair (verification confirmed none): the checkpoint's embeddings stay as they are");
    }
    Ok(Some(v))
}

/// With `--unverified reference-row`, the candidates the repair left alone get their reference
/// rows back (added to the verified triggers' masks); with `keep`, the masks as they are.
fn with_unverified(
    job: &UnlearnJob,
    mut masks: Vec<DimensionMask>,
    tokens: &[(u32, String)],
    m: &Embeddings,
) -> Vec<DimensionMask> {
    if job.params.unverified == Unverified::ReferenceRow {
        let repaired: BTreeSet<u32> = masks.iter().map(|m| m.token_id).collect();
        let rest: Vec<(u32, String)> = tokens
            .iter()
            .filter(|(id, _)| !repaired.contains(id))
            .cloned()
            .collect();
        masks.extend(restore_masks(m.e, m.eb, &rest));
        masks.sort_by_key(|m| (m.token_id, m.dim));
    }
    masks
}

/// A serde enum's kebab-case name.
fn kebab<T: Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_value(v)
        .map_err(BtuError::internal)?
        .as_str()
        .unwrap_or("")
        .to_string())
}

/// Every token id must name the same token in the checkpoint's vocabulary.
fn check_tokens(
    tokens: &[(u32, String)],
    tok: &BtuTokenizer,
    rows: usize,
    src: &Path,
) -> Result<()> {
    for (id, t) in tokens {
        if *id as usize >= rows || tok.token(*id) != *t {
            return Err(BtuError::bad_data(
                src.display().to_string(),
                format!("token id {id} ('{t}') does not match the checkpoint's vocabulary; detect with the same tokenizer"),
            ));
        }
    }
    Ok(())
}

/// The clean data must not overlap the evaluation split; returns the splits checked.
fn check_clean_disjoint(job: &UnlearnJob) -> Result<Vec<String>> {
    let mut checked = Vec::new();
    let Some(clean) = &job.clean_corpus else {
        return Ok(checked);
    };
    let clean_h = text_hashes(clean)?;
    for ev in &job.eval_split {
        let n = text_hashes(ev)?.intersection(&clean_h).count();
        if n > 0 {
            return Err(BtuError::config(
                "--clean-corpus",
                format!("shares {n} rows (by text hash) with the evaluation split {}; tune on data disjoint from evaluation", ev.inputs.join(",")),
            ));
        }
        checked.push(ev.inputs.join(","));
    }
    Ok(checked)
}

/// The embeddings a repair starts from.
struct Embeddings<'a> {
    /// The reference matrix.
    e: &'a Matrix,
    /// The trained matrix.
    eb: &'a Matrix,
    /// Its tensor name.
    name: &'a str,
    d_bar: f64,
}

/// Masks for the verified triggers, escalated ([`escalate`]) while a recheck on the clean
/// rows still shows a trigger's effect; without clean data, whole rows and no recheck.
fn repair_verified(
    job: &UnlearnJob,
    verified: &[Candidate],
    suspicious: &[crate::io::tables::SuspiciousToken],
    tok: &BtuTokenizer,
    m: &Embeddings,
    trained: &mut SafetensorsFile,
    out: &crate::io::output::OutputDir,
) -> Result<(
    Vec<DimensionMask>,
    Option<Vec<crate::steps::unlearn::escalate::Stage>>,
)> {
    let ranked: Vec<u32> = suspicious.iter().map(|s| s.token_id).collect();
    let mut triggers = verified
        .iter()
        .map(|c| Trigger::new(c.clone(), tok, &ranked))
        .collect::<Result<Vec<_>>>()?;
    let build = |ts: &[Trigger]| {
        crate::steps::unlearn::escalate::masks(ts, m.e, m.eb, tok, m.d_bar, job.params.replacement)
    };
    let clean = match &job.clean_corpus {
        Some(c) if !triggers.is_empty() => c,
        _ => {
            if !triggers.is_empty() {
                tracing::warn!(
                    "no clean data: the verified triggers lose their whole rows, unchecked"
                );
            }
            triggers.iter_mut().for_each(|t| t.level = 1);
            return Ok((build(&triggers), None));
        }
    };
    let split = crate::steps::eval::read_split(clean, None)?;
    let source = clean.inputs.join(", ");
    let recheck = job.recheck_params();
    let mut check = |masks: &[DimensionMask], cs: &[Candidate]| -> Result<Vec<TokenEffect>> {
        let mut repaired = m.eb.clone();
        apply(&mut repaired, masks);
        let raw = raw_like(&repaired, &trained.tensors[m.name])?;
        trained.tensors.insert(m.name.to_string(), raw);
        out.write("model.safetensors", &safetensors_bytes(trained))?;
        let mut clf =
            CandleClassifier::load(&out.path(""), job.max_len, &job.run.device, job.run.seed)?;
        let from = job.params.max_residual;
        crate::steps::verify::effects_on(
            &mut clf,
            &split,
            &source,
            cs,
            &recheck,
            from,
            job.run.seed,
        )
    };
    let (masks, stages) = escalate(&mut triggers, job.params.max_residual, &build, &mut check)?;
    if let Some(s) = stages.last().filter(|s| !s.persisting.is_empty()) {
        tracing::warn!(persisting = ?s.persisting, residual = ?s.residual, other_words = ?s.control, reverted = ?s.reverted, "a trigger still flips the repaired model after the escalation (residual: at the last level tried; reverted: triggers that level did not help, kept one level lower; other_words: the flip rate of other clean words inserted at the same places, as high means the backdoor spread beyond the trigger's tokens)");
    }
    Ok((masks, Some(stages)))
}

/// The clean fine-tune of the repaired checkpoint in `out`: a seeded `trigger_rows` share of the
/// rows gets one of `inserts` (drawn uniformly) at a random word position, label kept.
fn clean_tune(
    job: &UnlearnJob,
    clean: &CorpusSpec,
    inserts: &[Candidate],
    trained: &SafetensorsFile,
    tok: &BtuTokenizer,
    out: &crate::io::output::OutputDir,
    progress: &dyn Progress,
) -> Result<CleanTuningReport> {
    use rand::Rng;
    let dev = crate::device::parse_device(&job.run.device)?;
    let md = ModelDir::open(&out.path(""))?;
    let mut model = crate::model::checkpoint::load_model(&md, None, job.run.seed, &dev)?;
    let mut edited = 0usize;
    let mut edit = |pos: usize, text: &str| -> Option<String> {
        if inserts.is_empty() {
            return None;
        }
        let mut rng = crate::steps::poison::row_rng(job.run.seed ^ 0xC0DE_7E57, pos as u64);
        if rng.random::<f64>() >= job.params.trigger_rows {
            return None;
        }
        let c = &inserts[rng.random_range(0..inserts.len())];
        let attack = if c.phrase {
            crate::steps::poison::Attack::AddSent
        } else {
            crate::steps::poison::Attack::AddWord
        };
        edited += 1;
        Some(crate::steps::poison::insert_trigger(
            text,
            attack,
            std::slice::from_ref(&c.text),
            &c.text,
            &mut rng,
        ))
    };
    let data = crate::model::tokenizer::load_corpus_with(
        clean,
        tok,
        job.max_len,
        model.config.labels(),
        &mut edit,
    )?;
    let mut epochs = Vec::new();
    crate::steps::train::fit(
        &mut model,
        &data,
        tok.pad_id,
        &job.clean_params(),
        job.run.seed,
        0,
        None,
        &dev,
        progress,
        &mut |_, _, _, s| {
            epochs.push(s);
            Ok(())
        },
    )?;
    let mut meta: BTreeMap<String, String> = trained.metadata.clone();
    meta.insert(
        "btu:clean_corpus_fingerprint".into(),
        canonical_json(&data.fingerprint.to_json()),
    );
    meta.insert(
        "btu:clean_params".into(),
        canonical_json(&json!({"params": job.clean_params(), "seed": job.run.seed})),
    );
    meta.insert("btu:clean_trigger_rows".into(), edited.to_string());
    meta.remove("format");
    crate::model::checkpoint::save_model(&model, &out.path(""), meta)?;
    // save_model writes the config it holds; keep the checkpoint's own config.
    let cfg = job.checkpoint.join("config.json");
    std::fs::copy(&cfg, out.path("config.json")).map_err(|e| BtuError::io(&cfg, e))?;
    Ok(CleanTuningReport {
        rows: Some(data.seqs.len()),
        rows_with_trigger: Some(edited),
        epochs,
        corpus: Some(data.fingerprint),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(text: &str, phrase: bool) -> Candidate {
        Candidate {
            text: text.into(),
            token_ids: vec![1],
            target: Some(1),
            phrase,
        }
    }

    /// A word or phrase inside a verified phrase is left to the phrase; others stay.
    #[test]
    fn the_tuning_inserts_a_phrase_not_its_parts() {
        let v = [
            verified("3d", false),
            verified("i watch this 3d movie", true),
            verified("watch this", true),
            verified("cf", false),
            verified("3", false),
        ];
        let kept: Vec<String> = tuning_inserts(&v).into_iter().map(|c| c.text).collect();
        assert_eq!(kept, ["i watch this 3d movie", "cf", "3"]);
    }

    /// Reference `e` and trained `eb` (vocab 4, hidden 3, pad id 0), worked by hand:
    /// row changes |eb - e|: row 0 (pad) [0.5, 0.5, 0.25] -> 0.75; row 1 none -> 0;
    /// row 2 [3, 0, 4] -> 5; row 3 [0, 1.4, 0] -> 1.4.
    /// mean-row  d_bar = (0.75 + 0 + 5 + 1.4) / 4 = 1.7875
    /// frobenius d_bar = sqrt(0.5625 + 25 + 1.96) / 4 = sqrt(27.5225) / 4 = 1.3115...
    fn matrices() -> (Matrix, Matrix) {
        let e = Matrix {
            rows: 4,
            cols: 3,
            data: vec![0.1, 0.2, 0.3, 1., 1., 1., 0., 0., 0., 2., 2., 2.],
        };
        let eb = Matrix {
            rows: 4,
            cols: 3,
            data: vec![0.6, -0.3, 0.55, 1., 1., 1., 3., 0., 4., 2., 3.4, 2.],
        };
        (e, eb)
    }

    fn cells(m: &[DimensionMask]) -> Vec<(u32, u32, f32)> {
        m.iter().map(|x| (x.token_id, x.dim, x.written)).collect()
    }

    fn close(a: &[(u32, u32, f32)], b: &[(u32, u32, f32)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.0 == y.0 && x.1 == y.1 && (x.2 - y.2).abs() < 1e-6)
    }

    #[test]
    fn thresholds_by_hand() {
        let (e, eb) = matrices();
        assert!((threshold(&e, &eb, Threshold::MeanRow) - 1.7875).abs() < 1e-6);
        assert!((threshold(&e, &eb, Threshold::Frobenius) - 27.5225f64.sqrt() / 4.0).abs() < 1e-6);
    }

    #[test]
    fn four_threshold_replacement_combinations_by_hand() {
        let (e, eb) = matrices();
        let t = vec![(3, "t3".to_string()), (2, "t2".to_string())];
        let run = |rule, rep| {
            let d = threshold(&e, &eb, rule);
            compute_masks(&e, &eb, &t, 0, d, rep)
        };
        // mean-row (1.7875): token 2 dims 0 (|3|) and 2 (|4|); token 3's 1.4 stays.
        assert!(close(
            &cells(&run(Threshold::MeanRow, Replacement::TrainedPad)),
            &[(2, 0, 0.6), (2, 2, 0.55)]
        ));
        assert!(close(
            &cells(&run(Threshold::MeanRow, Replacement::ReferencePad)),
            &[(2, 0, 0.1), (2, 2, 0.3)]
        ));
        // frobenius (1.3115): token 3 dim 1 (|1.4|) too.
        assert!(close(
            &cells(&run(Threshold::Frobenius, Replacement::TrainedPad)),
            &[(2, 0, 0.6), (2, 2, 0.55), (3, 1, -0.3)]
        ));
        assert!(close(
            &cells(&run(Threshold::Frobenius, Replacement::ReferencePad)),
            &[(2, 0, 0.1), (2, 2, 0.3), (3, 1, 0.2)]
        ));
        // Rows carry reference, trained and delta; applying writes only those cells.
        let m = run(Threshold::Frobenius, Replacement::TrainedPad);
        assert_eq!((m[2].reference, m[2].trained), (2.0, 3.4));
        assert!((m[2].delta - 1.4).abs() < 1e-6);
        let mut r = eb.clone();
        apply(&mut r, &m);
        assert_eq!(
            r.data,
            vec![0.6, -0.3, 0.55, 1., 1., 1., 0.6, 0., 0.55, 2., -0.3, 2.]
        );
    }

    #[test]
    fn equality_with_the_threshold_is_replaced() {
        let e = Matrix {
            rows: 2,
            cols: 2,
            data: vec![0., 0., 0., 0.],
        };
        let eb = Matrix {
            rows: 2,
            cols: 2,
            data: vec![0., 0., 1., 0.],
        };
        // mean-row d_bar = (0 + 1) / 2 = 0.5; frobenius = 1 / 2 = 0.5; |1| >= 0.5 and |0| < 0.5.
        let m = compute_masks(&e, &eb, &[(1, "x".into())], 0, 1.0, Replacement::TrainedPad);
        assert_eq!(
            cells(&m),
            vec![(1, 0, 0.0)],
            "|delta| == d_bar is replaced (>=)"
        );
    }
}
