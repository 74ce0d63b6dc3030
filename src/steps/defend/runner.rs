//! The run directory's bookkeeping: each step writes its outputs, then a completion marker
//! holding a hash of its name, inputs, parameters and btu's version; a rerun skips a step whose
//! marker matches and whose outputs exist, and takes its result from the marker.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{BtuError, Result};
use crate::io::tables::canonical_json;
use crate::progress::Progress;

/// sha256 of a file's bytes.
pub(crate) fn file_hash(p: &Path) -> Result<String> {
    crate::model::checkpoint::sha256_file(p)
}

/// Content hash of corpus inputs (every resolved file).
pub(crate) fn corpus_hash(inputs: &[String]) -> Result<String> {
    let mut h = Sha256::new();
    for f in crate::io::corpus::resolve_inputs(inputs)? {
        h.update(f.path.as_bytes());
        h.update(file_hash(Path::new(&f.path))?.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Content hash of a model directory.
pub(crate) fn model_hash(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ] {
        let p = dir.join(f);
        if p.is_file() {
            h.update(f.as_bytes());
            h.update(file_hash(&p)?.as_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// One step of a run and what happened to it.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// The step's name (`detect`, `train`, `eval-victim`...).
    pub step: String,
    /// sha256 (hex) of the step's key: its name, inputs, parameters and the btu version.
    pub hash: String,
    /// Whether the step was skipped because its completion marker matched and its outputs exist.
    pub skipped: bool,
    /// Wall time of this run of the step (0 when skipped).
    pub seconds: f64,
    /// Wall time when the step's outputs were computed (by this run, or by the earlier run a
    /// skipped step reuses; absent for markers written before btu recorded it).
    pub computed_seconds: Option<f64>,
    /// The step's summary JSON (from its completion marker when skipped).
    pub summary: Value,
}

/// The steps of one run directory and what happened to each.
pub(crate) struct Runner<'a> {
    run: PathBuf,
    /// Every step so far, in order.
    pub(crate) records: Vec<StepRecord>,
    progress: &'a dyn Progress,
}

impl<'a> Runner<'a> {
    /// Bookkeeping for `run` (its `.btu/` directory is created).
    pub(crate) fn new(run: &Path, progress: &'a dyn Progress) -> Result<Self> {
        std::fs::create_dir_all(run.join(".btu")).map_err(|e| BtuError::OutputUnwritable {
            path: run.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Runner {
            run: run.to_path_buf(),
            records: Vec::new(),
            progress,
        })
    }

    fn marker(&self, step: &str) -> PathBuf {
        self.run.join(".btu").join(format!("{step}.done.json"))
    }

    /// Run `f` unless the step's marker matches `hash` and its outputs exist (then its result
    /// is the marker's summary); returns the step's hash and its typed result.
    pub(crate) fn step<T: Serialize + serde::de::DeserializeOwned>(
        &mut self,
        step: &str,
        key: Value,
        outputs: &[PathBuf],
        f: &mut dyn FnMut() -> Result<T>,
    ) -> Result<(String, T)> {
        let hash = hex::encode(Sha256::digest(canonical_json(
            &json!({"step": step, "key": key, "version": crate::VERSION}),
        )));
        let marker = self.marker(step);
        let done = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .filter(|v| v["hash"] == hash.as_str() && outputs.iter().all(|o| o.exists()))
            .and_then(|v| {
                // A marker whose summary no longer reads as this step's result is redone.
                let result = serde_json::from_value::<T>(v["summary"].clone()).ok()?;
                Some((v, result))
            });
        if let Some((v, result)) = done {
            tracing::info!(step, "unchanged since the last run; skipped");
            self.records.push(StepRecord {
                step: step.into(),
                hash: hash.clone(),
                skipped: true,
                seconds: 0.0,
                computed_seconds: v["seconds"].as_f64(),
                summary: v["summary"].clone(),
            });
            return Ok((hash, result));
        }
        let _ = std::fs::remove_file(&marker);
        let _span = tracing::info_span!("step", name = step).entered();
        let bar = self.progress.bar(&format!("defend: {step}"), 1);
        let t0 = Instant::now();
        let result = f()?;
        let summary = serde_json::to_value(&result).map_err(BtuError::internal)?;
        let seconds = t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let body = json!({"step": step, "hash": hash, "seconds": seconds, "summary": summary});
        crate::io::output::write_json_atomic(&marker, &body)?;
        self.records.push(StepRecord {
            step: step.into(),
            hash: hash.clone(),
            skipped: false,
            seconds,
            computed_seconds: Some(seconds),
            summary,
        });
        Ok((hash, result))
    }
}

#[cfg(test)]
mod tests {
    /// A skipped step's result is read back from its marker: every float must come back as the
    /// same number, so that a resumed run writes the summary a fresh one writes (serde_json's
    /// `float_roundtrip`; without it this value came back one unit in the last place off).
    #[test]
    fn a_marker_gives_back_the_same_floats() {
        for x in [
            0.14719460227272727_f64,
            0.11330049261083745,
            0.121012101210121,
        ] {
            let text = serde_json::to_string(&serde_json::json!({ "x": x })).unwrap();
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back["x"].as_f64().unwrap().to_bits(), x.to_bits(), "{x}");
        }
    }
}
