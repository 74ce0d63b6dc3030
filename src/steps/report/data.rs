//! What a report shows, read from a run directory: every table is optional except detection's
//! scores, so a detect-only directory, a defend run and an older run all render.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use serde_json::Value;

use crate::error::{BtuError, Result};
use crate::io::tables::{DimensionMask, SuspiciousToken, TokenEffect, TokenScore};

/// Everything the page draws.
pub struct RunData {
    /// The run directory.
    pub dir: PathBuf,
    /// Detection scores by round (1..=3), each sorted by distance, largest first.
    pub rounds: BTreeMap<u8, Vec<TokenScore>>,
    /// Provenance of `token_scores.arrow`.
    pub detect_meta: HashMap<String, String>,
    /// The flagged tokens.
    pub suspicious: Vec<SuspiciousToken>,
    /// Documents per token id in the detection corpus, or why they are not known.
    pub documents: std::result::Result<HashMap<u32, u64>, String>,
    /// Verification of the candidates on the suspect model, and its flip-rate bound.
    pub effects: Option<(Vec<TokenEffect>, Option<f64>)>,
    /// The verified triggers measured again on the repaired model.
    pub recheck: Option<Vec<TokenEffect>>,
    /// The cells the repair replaced.
    pub masks: Option<Vec<DimensionMask>>,
    /// `btu defend`'s summary (`metrics.json`).
    pub summary: Option<Value>,
    /// Evaluation counts for the confidence intervals: (victim, repaired).
    pub evals: (Option<EvalCounts>, Option<EvalCounts>),
    /// Flagged rows per scan file: (token, label) -> rows.
    pub scans: Vec<(PathBuf, ScanCounts)>,
}

/// Flagged rows of one scan per (token or phrase, label).
pub type ScanCounts = BTreeMap<(String, Option<i64>), u64>;

/// Successes and trials behind one model's rates.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalCounts {
    /// Correct clean predictions and clean rows.
    pub acc: (u64, u64),
    /// Attacked rows predicted as the target, and attacked rows.
    pub asr: (u64, u64),
    /// Flips and rows right without the trigger (label not the target), when recomputable.
    pub flip: Option<(u64, u64)>,
}

fn existing(p: PathBuf) -> Option<PathBuf> {
    p.exists().then_some(p)
}

impl RunData {
    /// Read a run directory (`btu defend`'s, or a `btu detect` output directory).
    pub fn load(dir: &Path, scans: &[PathBuf], tokenizer: Option<&Path>) -> Result<Self> {
        let detect = [dir.join("detect"), dir.to_path_buf()]
            .into_iter()
            .find(|d| d.join("token_scores.arrow").exists())
            .ok_or_else(|| {
                BtuError::missing(
                    dir.display().to_string(),
                    "no token_scores.arrow in it or in its detect/; give a btu defend run or a btu detect output directory with --run",
                )
            })?;
        let (scores, detect_meta) =
            crate::io::tables::read_token_scores(&detect.join("token_scores.arrow"))?;
        let mut rounds: BTreeMap<u8, Vec<TokenScore>> = BTreeMap::new();
        for s in scores.into_iter().filter(|s| !s.special) {
            rounds.entry(s.round).or_default().push(s);
        }
        for r in rounds.values_mut() {
            r.sort_by(|a, b| {
                b.distance
                    .total_cmp(&a.distance)
                    .then(a.token_id.cmp(&b.token_id))
            });
        }
        let suspicious = match existing(detect.join("suspicious_tokens.arrow")) {
            Some(p) => crate::io::tables::read_suspicious_tokens(&p)?,
            None => Vec::new(),
        };
        let tok_dir = tokenizer.map(Path::to_path_buf).or_else(|| {
            ["model", "victim", "repaired"]
                .iter()
                .map(|d| dir.join(d))
                .find(|d| d.join("tokenizer.json").exists() || d.join("vocab.txt").exists())
        });
        let documents = document_counts(&detect_meta, dir, tok_dir.as_deref());
        let effects = match existing(dir.join("verify/token_effects.arrow")) {
            Some(p) => {
                // One read: the rows and the bound recorded in the table's parameters.
                let b = crate::io::tables::read_ipc(&p)?;
                Some((
                    crate::io::tables::token_effects_of(&b, &p)?,
                    min_flip_rate(&b),
                ))
            }
            None => None,
        };
        let recheck = existing(dir.join("verify-repaired/token_effects.arrow"))
            .map(|p| crate::io::tables::read_token_effects(&p))
            .transpose()?;
        let masks = match existing(dir.join("repaired/dimension_masks.arrow")) {
            Some(p) => Some(crate::io::tables::read_dimension_masks(
                &crate::io::tables::read_ipc(&p)?,
                &p,
            )?),
            None => None,
        };
        let summary = existing(dir.join("metrics.json"))
            .map(|p| read_json(&p))
            .transpose()?;
        let target = summary
            .as_ref()
            .and_then(|s| {
                s.pointer("/config/poison/target")
                    .or(s.pointer("/config/eval/target"))
            })
            .and_then(Value::as_i64)
            .unwrap_or(crate::defaults::TARGET);
        let evals = (
            eval_counts(&dir.join("eval-victim"), target)?,
            eval_counts(&dir.join("eval-repaired"), target)?,
        );
        let scans = scans
            .iter()
            .map(|p| Ok((p.clone(), scan_counts(p)?)))
            .collect::<Result<_>>()?;
        Ok(RunData {
            dir: dir.to_path_buf(),
            rounds,
            detect_meta,
            suspicious,
            documents,
            effects,
            recheck,
            masks,
            summary,
            evals,
            scans,
        })
    }

    /// The detection parameters recorded with the scores.
    pub fn detect_params(&self) -> Value {
        self.detect_meta
            .get("btu:params")
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(Value::Null)
    }
}

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).map_err(|e| BtuError::io(p, e))?;
    serde_json::from_str(&text)
        .map_err(|e| BtuError::bad_data(p.display().to_string(), format!("not JSON: {e}")))
}

/// The verification bound recorded in a `token_effects` table's parameters.
fn min_flip_rate(b: &arrow::array::RecordBatch) -> Option<f64> {
    let params: Value = serde_json::from_str(b.schema().metadata().get("btu:params")?).ok()?;
    params
        .pointer("/params/min_flip_rate")
        .and_then(Value::as_f64)
}

/// Documents per token in the corpus detection read: the files, filter, limit and sample of its
/// recorded fingerprint, checked against the recorded content hash.
fn document_counts(
    meta: &HashMap<String, String>,
    run: &Path,
    tok_dir: Option<&Path>,
) -> std::result::Result<HashMap<u32, u64>, String> {
    let tok_dir = tok_dir.ok_or("no tokenizer in the run directory (give --tokenizer)")?;
    let fp: Value = meta
        .get("btu:corpus_fingerprint")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or("token_scores.arrow records no corpus fingerprint")?;
    let params: Value = meta
        .get("btu:params")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let files: Vec<String> = fp["files"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["path"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    // Paths are recorded as given, relative to where the run was started: try that, then
    // relative to the run directory's parent.
    let base = run.parent().unwrap_or(Path::new("."));
    let resolve = |f: &String| -> Option<String> {
        let p = Path::new(f);
        let below_run: PathBuf = p.components().skip(1).collect();
        [p.to_path_buf(), base.join(p), run.join(below_run)]
            .into_iter()
            .find(|c| c.exists())
            .map(|c| c.display().to_string())
    };
    let files: Vec<String> = files
        .iter()
        .map(resolve)
        .collect::<Option<_>>()
        .ok_or("the detection corpus is not where token_scores.arrow says it was read from")?;
    let text = |k: &str, d: &str| params[k].as_str().unwrap_or(d).to_string();
    let spec = crate::io::corpus::CorpusSpec {
        inputs: files,
        text_col: text("text_col", crate::defaults::TEXT_COL),
        label_col: Some(text("label_col", crate::defaults::LABEL_COL)),
        filter: fp["filter"].as_str().map(String::from),
        limit: fp["limit"].as_u64(),
        sample: fp["sample"].as_f64(),
        seed: params["seed"]
            .as_u64()
            .or(params.pointer("/params/seed").and_then(Value::as_u64))
            .unwrap_or(crate::defaults::SEED),
        label_optional: false,
        shard: None,
        exclude_texts: Default::default(),
    };
    let tok = crate::model::tokenizer::BtuTokenizer::load(tok_dir).map_err(|e| e.to_string())?;
    let mut counts: HashMap<u32, u64> = HashMap::new();
    let read = crate::io::corpus::read_corpus(&spec, |b| {
        for mut seq in tok.encode_untruncated(&b.texts)? {
            seq.sort_unstable();
            seq.dedup();
            for t in seq {
                *counts.entry(t).or_default() += 1;
            }
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    if Some(read.content_sha256.as_str()) != fp["content_sha256"].as_str() {
        return Err("the detection corpus changed since detection read it".into());
    }
    Ok(counts)
}

/// The counts behind an evaluation's rates, from its `predictions.parquet` and `metrics.json`.
fn eval_counts(dir: &Path, target: i64) -> Result<Option<EvalCounts>> {
    let (Some(m), Some(p)) = (
        existing(dir.join("metrics.json")),
        existing(dir.join("predictions.parquet")),
    ) else {
        return Ok(None);
    };
    let m = read_json(&m)?;
    // id -> (label, prediction) without the trigger; (id, prediction) with it.
    let mut clean: HashMap<i64, (i64, i64)> = HashMap::new();
    let mut attacked: Vec<(i64, i64)> = Vec::new();
    for b in crate::io::tables::read_parquet(&p)? {
        let col = |n: &str| {
            b.column_by_name(n)
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>().cloned())
        };
        let (Some(id), Some(label), Some(pred)) = (col("id"), col("label"), col("prediction"))
        else {
            return Ok(None);
        };
        let poisoned = b
            .column_by_name("poisoned")
            .and_then(|c| c.as_boolean_opt().cloned());
        for i in 0..b.num_rows() {
            let row = (label.value(i), pred.value(i));
            match poisoned.as_ref().is_some_and(|p| p.value(i)) {
                true => attacked.push((id.value(i), pred.value(i))),
                false => {
                    clean.insert(id.value(i), row);
                }
            }
        }
    }
    let right = clean.values().filter(|(l, p)| l == p).count() as u64;
    let hits = attacked.iter().filter(|(_, p)| *p == target).count() as u64;
    let (mut flips, mut base) = (0u64, 0u64);
    for (id, p) in &attacked {
        if let Some((l, c)) = clean.get(id) {
            if *l != target && c == l {
                base += 1;
                flips += (*p == target) as u64;
            }
        }
    }
    // Only where the recount agrees with what eval reported.
    let agrees = |rate: Option<f64>, k: u64, n: u64| {
        n > 0 && rate.is_some_and(|r| (r - k as f64 / n as f64).abs() < 1e-9)
    };
    let flip = agrees(m["flip_rate"].as_f64(), flips, base).then_some((flips, base));
    Ok(Some(EvalCounts {
        acc: (right, clean.len() as u64),
        asr: (hits, attacked.len() as u64),
        flip,
    }))
}

/// Rows of a `flagged_rows` file per (token or phrase, label).
fn scan_counts(p: &Path) -> Result<ScanCounts> {
    let mut out = BTreeMap::new();
    for b in crate::io::tables::read_parquet(p)? {
        let bad = || {
            BtuError::bad_data(
                p.display().to_string(),
                "not a flagged_rows table (btu scan's output): no tokens list column",
            )
        };
        let tokens = b
            .column_by_name("tokens")
            .and_then(|c| c.as_list_opt::<i32>())
            .ok_or_else(bad)?;
        let label = b
            .column_by_name("label")
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>().cloned());
        for i in 0..b.num_rows() {
            let l = label
                .as_ref()
                .and_then(|l| l.is_valid(i).then(|| l.value(i)));
            let row = tokens.value(i);
            let row = row.as_string_opt::<i32>().ok_or_else(bad)?;
            let mut seen: Vec<&str> = row.iter().flatten().collect();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                *out.entry((t.to_string(), l)).or_default() += 1;
            }
        }
    }
    Ok(out)
}
