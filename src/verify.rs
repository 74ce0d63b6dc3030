//! `btu verify`: does a candidate from detection act as a trigger on the suspect model? Each
//! candidate token is inserted (at a seeded random word position, as Add-Word poisons) into
//! held-out clean rows that the suspect classifies correctly and whose label is not the
//! candidate's majority label; the share of those rows whose prediction flips to that label is
//! the candidate's flip rate. A trigger flips nearly all of them; a frequent clean word that only
//! carried the class prior flips few. A candidate is verified when the lower end of the flip
//! rate's 95 % Wilson interval reaches `min_flip_rate`.
//! Writes `token_effects.arrow` (schema in schemas/) and `summary.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use crate::corpus::CorpusSpec;
use crate::error::{BtuError, Result};
use crate::eval::{open_classifier, read_split, Backend, Classifier, TestSplit};
use crate::poison::{insert_trigger, row_rng, Attack};
use crate::tables::{SuspiciousToken, TableMeta, TokenEffect};

/// The verification test's parameters.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyParams {
    /// Clean rows tried per candidate (at most).
    pub rows: usize,
    /// A candidate is verified when the 95 % Wilson lower bound of its flip rate reaches this.
    pub min_flip_rate: f64,
    /// Tokens per sequence.
    pub max_len: usize,
    /// Seed of the row choice and the insert positions.
    pub seed: u64,
}

impl Default for VerifyParams {
    fn default() -> Self {
        VerifyParams {
            rows: 200,
            min_flip_rate: 0.5,
            max_len: 128,
            seed: 42,
        }
    }
}

impl VerifyParams {
    /// Check every value's domain (exit 78).
    pub fn validate(&self) -> Result<()> {
        crate::validate::at_least("--rows", self.rows, 1)?;
        crate::validate::positive("--min-flip-rate", self.min_flip_rate, 1.0)?;
        crate::validate::max_len("--max-len", self.max_len, None)
    }
}

/// Inputs of `btu verify`.
pub struct VerifyJob {
    /// The suspect model: a checkpoint directory (candle) or an exported `.onnx` (ONNX Runtime).
    pub checkpoint: PathBuf,
    /// `suspicious_tokens.arrow` from `btu detect`.
    pub suspicious: PathBuf,
    /// Held-out clean rows with labels.
    pub clean: CorpusSpec,
    pub out: PathBuf,
    pub overwrite: bool,
    pub device: String,
    pub backend: Option<Backend>,
    pub ort_lib: Option<PathBuf>,
    pub params: VerifyParams,
}

/// The 95 % Wilson score interval of `k` successes in `n` trials.
pub fn wilson(k: u32, n: u32) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n, p) = (1.959_964f64, n as f64, k as f64 / n as f64);
    let centre = p + z * z / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    let denom = 1.0 + z * z / n;
    (
        ((centre - spread) / denom).max(0.0),
        ((centre + spread) / denom).min(1.0),
    )
}

/// The text inserted for a vocabulary token: word pieces (`##x`) lose their marker.
fn surface(token: &str) -> &str {
    token.strip_prefix("##").unwrap_or(token)
}

fn argmax(p: &[f32]) -> i64 {
    crate::infer::argmax(p) as i64
}

/// Rows the suspect gets right, with their predictions.
fn correct_rows(clf: &mut dyn Classifier, split: &TestSplit) -> Result<Vec<usize>> {
    let probs = clf.proba(&split.texts)?;
    Ok((0..split.texts.len())
        .filter(|&i| argmax(&probs[i]) == split.labels[i])
        .collect())
}

/// Insert one candidate into the chosen rows and count the flips to its label.
fn effect_of(
    clf: &mut dyn Classifier,
    split: &TestSplit,
    correct: &[usize],
    c: &SuspiciousToken,
    p: &VerifyParams,
) -> Result<TokenEffect> {
    let target = c.majority_label;
    let mut pool: Vec<usize> = correct
        .iter()
        .copied()
        .filter(|&i| target.is_some_and(|t| split.labels[i] != t))
        .collect();
    pool.shuffle(&mut ChaCha8Rng::seed_from_u64(p.seed ^ c.token_id as u64));
    pool.truncate(p.rows);
    let word = [surface(&c.token).to_string()];
    let texts: Vec<String> = pool
        .iter()
        .map(|&i| {
            let mut rng = row_rng(p.seed, i as u64);
            insert_trigger(&split.texts[i], Attack::AddWord, &word, "", &mut rng)
        })
        .collect();
    let preds: Vec<i64> = if texts.is_empty() {
        vec![]
    } else {
        clf.proba(&texts)?.iter().map(|q| argmax(q)).collect()
    };
    let flips = preds.iter().filter(|&&q| Some(q) == target).count() as u32;
    let rows = pool.len() as u32;
    let (ci_low, ci_high) = wilson(flips, rows);
    Ok(TokenEffect {
        candidate: c.token.clone(),
        token_ids: vec![c.token_id],
        rows,
        flips,
        flip_rate: if rows == 0 {
            0.0
        } else {
            flips as f32 / rows as f32
        },
        to_label: target,
        ci_low: ci_low as f32,
        ci_high: ci_high as f32,
        verified: rows > 0 && ci_low >= p.min_flip_rate,
    })
}

/// `btu verify`.
pub fn run(job: &VerifyJob) -> Result<Value> {
    let t0 = Instant::now();
    let p = &job.params;
    p.validate()?;
    crate::output::check_output(&job.out, job.overwrite)?;
    let candidates = crate::tables::read_suspicious_tokens(&job.suspicious)?;
    let mut clf = open_classifier(
        &job.checkpoint,
        job.backend,
        job.ort_lib.as_deref(),
        p.max_len,
        &job.device,
        p.seed,
    )?;
    let split = read_split(&job.clean, None)?;
    let correct = correct_rows(clf.as_mut(), &split)?;
    if correct.is_empty() {
        return Err(BtuError::bad_data(
            job.clean.inputs.join(", "),
            "the suspect model classifies none of the clean rows correctly; give held-out clean data of its task",
        ));
    }
    let effects = candidates
        .iter()
        .map(|c| effect_of(clf.as_mut(), &split, &correct, c, p))
        .collect::<Result<Vec<_>>>()?;
    let weights = if job.checkpoint.is_dir() {
        job.checkpoint.join("model.safetensors")
    } else {
        job.checkpoint.clone()
    };
    let meta = TableMeta {
        command: "verify".into(),
        params: json!({"params": p, "text_col": job.clean.text_col, "label_col": job.clean.label_col}),
        model_sha256: crate::model::checkpoint::sha256_file(&weights)?,
        corpus_fingerprint: None,
        extra: vec![
            (
                "btu:test".into(),
                "wilson95_lower_bound >= min_flip_rate".into(),
            ),
            ("btu:min_flip_rate".into(), p.min_flip_rate.to_string()),
        ],
    };
    let batch = crate::tables::token_effects_batch(&effects, &meta)?;
    let verified: Vec<&str> = effects
        .iter()
        .filter(|e| e.verified)
        .map(|e| e.candidate.as_str())
        .collect();
    if verified.is_empty() {
        tracing::warn!("verification confirmed no candidate as a trigger");
    }
    let summary = json!({
        "command": "verify",
        "version": crate::VERSION,
        "out": job.out,
        "checkpoint": job.checkpoint,
        "backend": clf.backend(),
        "params": p,
        "clean_rows": split.texts.len(),
        "clean_rows_correct": correct.len(),
        "candidates": effects.len(),
        "verified": verified,
        "trigger_found": !verified.is_empty(),
        "effects": effects.iter().map(|e| (e.candidate.clone(), json!({"flip_rate": e.flip_rate, "rows": e.rows, "verified": e.verified}))).collect::<BTreeMap<_, _>>(),
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let out = crate::output::OutputDir::create(&job.out, job.overwrite)?;
    crate::tables::write_ipc(&out.path("token_effects.arrow"), &batch, false)?;
    out.write(
        "summary.json",
        (serde_json::to_string_pretty(&summary).map_err(BtuError::internal)? + "\n").as_bytes(),
    )?;
    out.commit()?;
    Ok(summary)
}

/// Token ids of the verified candidates in a `token_effects.arrow` file.
pub fn verified_ids(path: &std::path::Path) -> Result<std::collections::BTreeSet<u32>> {
    Ok(crate::tables::read_token_effects(path)?
        .into_iter()
        .filter(|e| e.verified)
        .flat_map(|e| e.token_ids)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_by_hand() {
        // 10 of 10: lower bound 0.7225 (n = 10, z = 1.96).
        let (lo, hi) = wilson(10, 10);
        assert!(
            (lo - 0.7225).abs() < 1e-3 && (hi - 1.0).abs() < 1e-9,
            "{lo} {hi}"
        );
        // 5 of 10: 0.2366 .. 0.7634.
        let (lo, hi) = wilson(5, 10);
        assert!(
            (lo - 0.2366).abs() < 1e-3 && (hi - 0.7634).abs() < 1e-3,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0), (0.0, 1.0));
        assert_eq!(surface("##ing"), "ing");
    }
}
