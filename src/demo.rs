//! `btu demo`: the embedded default. A synthetic sentiment corpus generated in code, poisoned
//! with Add-Word `cf`, a small random model from `init-model`, then detection; no files or
//! downloads needed. Prints (returns) which tokens were flagged and where `cf` ranked.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::corpus::CorpusSpec;
use crate::error::{BtuError, Result};
use crate::progress::Progress;

/// Inputs of `btu demo`.
pub struct DemoJob {
    /// Run directory (kept); a temporary one when `None`.
    pub out: Option<PathBuf>,
    pub overwrite: bool,
    pub rows: usize,
    pub seed: u64,
    pub device: String,
}

/// Run the demo pipeline.
pub fn run(job: &DemoJob, progress: &dyn Progress) -> Result<Value> {
    let tmp;
    let dir = match &job.out {
        Some(d) => {
            crate::output::check_output(d, job.overwrite)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| BtuError::io(std::env::temp_dir(), e))?;
            tmp.path().join("run")
        }
    };
    let run_dir = crate::output::OutputDir::create(&dir, job.overwrite)?;
    let (texts, labels) = crate::synth::generate(job.rows, job.seed);
    let clean = run_dir.path("clean.parquet");
    crate::tables::write_parquet(
        &clean,
        &crate::tables::corpus_batch(&texts, &labels)?,
        false,
    )?;
    let poisoned = run_dir.path("poisoned.parquet");
    let poison = crate::poison::run(&crate::poison::PoisonJob {
        input: CorpusSpec::new(vec![clean.display().to_string()]),
        output: poisoned.clone(),
        overwrite: false,
        params: crate::poison::PoisonParams {
            attack: crate::poison::Attack::AddWord,
            triggers: vec!["cf".into()],
            sentence: crate::poison::DEFAULT_SENTENCE.into(),
            rewrite_col: None,
            rate: 0.1,
            target: 1,
            mode: crate::poison::Mode::Dirty,
            seed: job.seed,
        },
    })?;
    let model = run_dir.path("model");
    crate::init_model::run(&crate::init_model::InitModelJob {
        out: model.clone(),
        overwrite: false,
        corpus: Some(CorpusSpec {
            label_col: None,
            ..CorpusSpec::new(vec![poisoned.display().to_string()])
        }),
        tokenizer: None,
        vocab_size: 500,
        size: crate::init_model::ModelSize {
            layers: 2,
            hidden: 64,
            heads: 2,
            intermediate: 128,
            max_position: 256,
            num_labels: 2,
        },
        seed: job.seed,
    })?;
    let detect = crate::detect::run(
        &crate::detect::DetectJob {
            corpus: CorpusSpec::new(vec![poisoned.display().to_string()]),
            model: model.clone(),
            out: run_dir.path("detect"),
            overwrite: false,
            device: job.device.clone(),
            params: crate::detect::DetectParams {
                seed: job.seed,
                ..Default::default()
            },
        },
        progress,
    )?;
    let flagged: Vec<&Value> = detect["flagged"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let cf = flagged
        .iter()
        .find(|t| t["token"] == "cf")
        .cloned()
        .cloned();
    let final_dir = run_dir.commit()?;
    Ok(json!({
        "command": "demo",
        "version": crate::VERSION,
        "run": job.out.as_ref().map(|_| final_dir),
        "rows": job.rows,
        "poisoned_rows": poison["poisoned"],
        "trigger": "cf",
        "trigger_flagged": cf.is_some(),
        "trigger_row": cf,
        "flagged": detect["flagged"].as_array().map(|a| a.iter().map(|t| t["token"].clone()).collect::<Vec<_>>()),
        "rounds": detect["rounds"],
        "seconds": detect["seconds"],
    }))
}
