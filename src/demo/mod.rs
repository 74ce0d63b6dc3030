//! `btu demo`: the embedded default. Synthetic sentiment splits generated in code (no files or
//! downloads), a small random BERT from `init-model`, and the whole `defend` pipeline on CPU:
//! poison with Add-Word `cf`, detect, train the victim, unlearn with a brief clean fine-tune,
//! export to ONNX and evaluate before and after (through ONNX Runtime when its library is
//! installed, else candle).

pub mod synth;

use std::collections::HashSet;
use std::path::PathBuf;

use crate::error::{BtuError, Result};
use crate::progress::Progress;
use crate::steps::defend::{DefendConfig, DefendReport, EvalBackend, ModelScores};
use crate::steps::init_model::ModelSize;
use crate::steps::poison::{Attack, PoisonParams};

/// Inputs of `btu demo`.
pub struct DemoJob {
    /// Run directory (kept); a temporary one when `None`.
    pub out: Option<PathBuf>,
    /// Replace an existing `out` directory (`--overwrite`).
    pub overwrite: bool,
    /// Rows of the synthetic training split (`--rows`); test and clean splits get 30 % as many.
    pub rows: usize,
    /// Seed of the synthetic corpus and of every step (`--seed`).
    pub seed: u64,
    /// Device spec (`--device`: `auto`, `cpu` or `cuda:N`).
    pub device: String,
    /// How the models are evaluated (`--backend`: auto, ort or candle).
    pub backend: EvalBackend,
}

/// The demo's configuration for a run directory whose `data/` holds the generated splits.
pub fn config(
    run: &std::path::Path,
    seed: u64,
    device: &str,
    backend: EvalBackend,
) -> DefendConfig {
    let data = |n: &str| vec![run.join("data").join(n).display().to_string()];
    let mut c = DefendConfig {
        run: Some(run.to_path_buf()),
        seed,
        device: device.to_string(),
        ..Default::default()
    };
    c.data.train = data("train.parquet");
    c.data.test = data("test.parquet");
    c.data.clean = data("clean.parquet");
    c.poison = Some(PoisonParams::new(Attack::AddWord));
    c.model.init = Some(ModelSize {
        vocab_size: 500,
        layers: 2,
        hidden: 64,
        heads: 2,
        intermediate: 128,
        max_position: 128,
        num_labels: 2,
        arch: Default::default(),
    });
    c.train.epochs = 3;
    c.train.lr = 1e-3;
    // The synthetic vocabulary is small and every word is frequent, so the paper's mean-row
    // threshold (a mean over rows that all moved) replaces almost nothing; the released code's
    // Frobenius rule is the one that fits this corpus.
    c.unlearn.threshold = crate::steps::unlearn::Threshold::Frobenius;
    // The brief clean tuning (when a trigger survives its highest repair level) at the victim's
    // own learning rate, as the released code tunes at its training rate (2e-5 for both). A tenth
    // of it (1e-4) leaves this victim's backdoor, which spread to any word inserted into the
    // corpus's templated sentences: ASR 18.1 % against 3.4 % at 1e-3, measured.
    c.unlearn.clean_epochs = 1;
    c.unlearn.clean_lr = c.train.lr;
    c.eval.backend = backend;
    c
}

/// Write the synthetic splits: train, test and clean data, the clean data sharing no text with test.
pub fn write_splits(dir: &std::path::Path, rows: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| BtuError::OutputUnwritable {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (train, train_l) = crate::demo::synth::generate(rows, seed);
    let (test, test_l) = crate::demo::synth::generate(rows * 3 / 10, seed.wrapping_add(1));
    let seen: HashSet<&String> = test.iter().collect();
    let (clean_all, clean_all_l) =
        crate::demo::synth::generate(rows * 3 / 10, seed.wrapping_add(2));
    let (clean, clean_l): (Vec<String>, Vec<i64>) = clean_all
        .into_iter()
        .zip(clean_all_l)
        .filter(|(t, _)| !seen.contains(t))
        .unzip();
    for (name, t, l) in [
        ("train", &train, &train_l),
        ("test", &test, &test_l),
        ("clean", &clean, &clean_l),
    ] {
        crate::io::tables::write_parquet(
            &dir.join(format!("{name}.parquet")),
            &crate::io::tables::corpus_batch(t, l)?,
            true,
        )?;
    }
    Ok(())
}

/// A short before/after table for people.
pub fn table(m: &DefendReport) -> String {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.1}", 100.0 * x));
    let none = ModelScores::default();
    let b = m.without_defence.as_ref().unwrap_or(&none);
    let a = m.with_defence.as_ref().unwrap_or(&none);
    let verified = m
        .verified
        .as_ref()
        .map_or_else(|| "(not verified)".into(), |v| v.join(", "));
    let residual: String = m
        .residual
        .iter()
        .flatten()
        .filter_map(|(t, r)| {
            let c = r.control_flip_rate?;
            Some(format!(
                "after the repair {t} flips {:.1} % of clean rows; other words at the same places {:.1} %\n",
                100.0 * r.flip_rate,
                100.0 * c
            ))
        })
        .collect();
    format!(
        "                 ACC %   ASR %   flip %\nwithout defence  {:>5}   {:>5}   {:>5}\nwith BTU         {:>5}   {:>5}   {:>5}\nflagged: {}\nverified triggers (repaired): {}\n{residual}",
        pct(b.acc),
        pct(b.asr),
        pct(b.flip_rate),
        pct(a.acc),
        pct(a.asr),
        pct(a.flip_rate),
        m.flagged.join(", "),
        verified,
    )
}

/// `btu demo`'s result: the defend run's, with the table a person reads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// The defend run's result (`command` is `demo`; `run` is null when the directory was
    /// temporary).
    #[serde(flatten)]
    pub defend: DefendReport,
    /// [`table`].
    pub table: String,
}

/// Run the demo.
pub fn run(job: &DemoJob, progress: &dyn Progress) -> Result<DemoReport> {
    let tmp;
    let dir = match &job.out {
        Some(d) => {
            if d.exists() && !job.overwrite {
                return Err(BtuError::OutputExists { path: d.clone() });
            }
            if d.exists() {
                // Replace only an earlier demo run (never, say, `--out .`).
                if !d.join("data").is_dir() || !d.join(".btu").is_dir() {
                    return Err(BtuError::config(
                        "--out",
                        format!("{} exists and is not a btu demo run; give a new directory (--overwrite replaces only an earlier demo run)", d.display()),
                    ));
                }
                std::fs::remove_dir_all(d).map_err(|e| BtuError::io(d, e))?;
            }
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| BtuError::io(std::env::temp_dir(), e))?;
            tmp.path().join("run")
        }
    };
    write_splits(&dir.join("data"), job.rows, job.seed)?;
    let cfg = config(&dir, job.seed, &job.device, job.backend);
    let mut defend = crate::steps::defend::run(&cfg, progress)?;
    defend.command = "demo".into();
    if job.out.is_none() {
        defend.run = None;
    }
    Ok(DemoReport {
        table: table(&defend),
        defend,
    })
}
