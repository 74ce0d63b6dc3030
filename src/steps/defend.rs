//! `btu defend`: the paper's whole pipeline in a run directory: [poison] -> [init-model] ->
//! detect -> train (`M^b`) -> unlearn (+ clean fine-tune) -> export-onnx -> eval before and
//! after. Each step writes its outputs and then a completion marker holding a hash of its
//! parameters and inputs; a rerun skips steps whose marker matches and redoes the rest (a killed
//! training step resumes after its last complete epoch).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{BtuError, Result};
use crate::io::corpus::CorpusSpec;
use crate::io::tables::canonical_json;
use crate::progress::Progress;

use crate::defaults;
use crate::steps::detect::DetectParams;
use crate::steps::eval::EvalParams;
use crate::steps::init_model::ModelSize;
use crate::steps::poison::PoisonParams;
use crate::steps::train::TrainParams;
use crate::steps::unlearn::UnlearnParams;
use crate::steps::verify::VerifyParams;

fn d_text() -> String {
    defaults::TEXT_COL.into()
}
fn d_label() -> String {
    defaults::LABEL_COL.into()
}

/// The data of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training corpus (poisoned here when `[poison]` is given).
    #[serde(default)]
    pub train: Vec<String>,
    /// Dev split for choosing the victim's epoch.
    #[serde(default)]
    pub dev: Vec<String>,
    /// Test split: ACC, and ASR unless `asr_test` is given.
    #[serde(default)]
    pub test: Vec<String>,
    /// Split the attack is applied to for ASR (Stylebkd/Synbkd rewrites exist for dev only).
    #[serde(default)]
    pub asr_test: Vec<String>,
    /// Clean data for the brief fine-tune after unlearning (must not overlap test / asr_test).
    #[serde(default)]
    pub clean: Vec<String>,
    /// SQL predicate selecting the training rows (e.g. `id % 10 <> 0` to hold out a slice).
    pub train_filter: Option<String>,
    /// SQL predicate selecting the clean tuning rows (e.g. `id % 10 = 0`).
    pub clean_filter: Option<String>,
    /// SQL predicate selecting the `asr_test` rows (e.g. `id % 10 = 1` when the rewrites exist
    /// for train only and a slice of it is held out for ASR).
    pub asr_test_filter: Option<String>,
    /// Drop clean rows that also occur in test / asr_test (by text) instead of refusing the run.
    #[serde(default)]
    pub drop_overlap: bool,
    /// Text column of every split (default `text`).
    #[serde(default = "d_text")]
    pub text_col: String,
    /// Label column of every split (default `label`).
    #[serde(default = "d_label")]
    pub label_col: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: vec![],
            dev: vec![],
            test: vec![],
            asr_test: vec![],
            clean: vec![],
            train_filter: None,
            clean_filter: None,
            asr_test_filter: None,
            drop_overlap: false,
            text_col: d_text(),
            label_col: d_label(),
        }
    }
}

/// `[model]`: a model directory, or a random one made by init-model on the training corpus.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model directory every step starts from; set this or `[model.init]`, not both.
    pub path: Option<PathBuf>,
    /// `[model.init]`: sizes of a random model made by init-model on the training corpus.
    pub init: Option<ModelSize>,
}

/// How models are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EvalBackend {
    /// ONNX Runtime when its library is found, else candle.
    Auto,
    /// ONNX Runtime on the exported models (fails when its library is missing).
    Ort,
    /// candle on the checkpoint directories (no export needed).
    Candle,
}

/// A whole `btu defend` configuration (TOML).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefendConfig {
    /// The run directory.
    pub run: Option<PathBuf>,
    /// Seed of every step, so reruns repeat (default 42).
    pub seed: u64,
    /// Device of every step: `auto`, `cpu` or `cuda:N` (default `auto`).
    pub device: String,
    /// `[data]`: the corpora and splits.
    pub data: DataConfig,
    /// `[poison]`: attack the training corpus first (absent: it is used as given).
    pub poison: Option<PoisonParams>,
    /// `[model]`: the model every step starts from.
    pub model: ModelConfig,
    /// `[detect]`: stage 1 (defaults as `btu detect`).
    pub detect: DetectParams,
    /// `[train]`: the victim (defaults as `btu train`).
    pub train: TrainParams,
    /// `[unlearn]`: stage 2 (defaults as `btu unlearn`).
    pub unlearn: UnlearnParams,
    /// `[verify]`: trigger verification (on by default when `data.clean` is given).
    pub verify: VerifyParams,
    /// `[eval]`: the attack measured (defaults to `[poison]`'s) and the backend.
    pub eval: EvalParams,
}

impl Default for DefendConfig {
    /// What an empty TOML file gives: seed 42, device `auto`, every table at its defaults.
    fn default() -> Self {
        DefendConfig {
            run: None,
            seed: defaults::SEED,
            device: defaults::DEVICE.into(),
            data: DataConfig::default(),
            poison: None,
            model: ModelConfig::default(),
            detect: DetectParams::default(),
            train: TrainParams::default(),
            unlearn: UnlearnParams::default(),
            verify: VerifyParams::default(),
            eval: EvalParams::default(),
        }
    }
}

impl DefendConfig {
    /// Parse a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BtuError::missing(
                path.display().to_string(),
                "give a TOML config (see pipelines/*.toml)",
            ),
            _ => BtuError::io(path, e),
        })?;
        toml::from_str(&text).map_err(|e| {
            BtuError::config(
                path.display().to_string(),
                e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })
    }

    /// Check what the run needs is there.
    pub fn validate(&self) -> Result<()> {
        if self.run.is_none() {
            return Err(BtuError::config(
                "run",
                "no run directory; set run = \"...\" in the config or pass --run",
            ));
        }
        if self.data.train.is_empty() {
            return Err(BtuError::config(
                "data.train",
                "no training corpus; set data.train or pass --train",
            ));
        }
        if self.data.test.is_empty() {
            return Err(BtuError::config(
                "data.test",
                "no test split; set data.test or pass --test",
            ));
        }
        match (&self.model.path, &self.model.init) {
            (None, None) => {
                return Err(BtuError::config(
                    "model",
                    "set model.path (a model directory) or [model.init] sizes, or pass --model",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(BtuError::config(
                    "model",
                    "set model.path or [model.init], not both",
                ))
            }
            _ => {}
        }
        if self.eval_attack().is_none() {
            return Err(BtuError::config(
                "eval.attack",
                "no attack to measure ASR with; add [poison] or set eval.attack",
            ));
        }
        self.validate_values()
    }

    /// The rules that need the data and the model, checked before the first step (a run must
    /// not train for an hour and then stop on a rule it could have checked at the start).
    /// Returns the clean rows' text hashes to drop (`data.drop_overlap`).
    fn preflight(&self) -> Result<std::collections::BTreeSet<[u8; 32]>> {
        let attack = self.eval_attack().expect("validated");
        for split in [
            &self.data.train,
            &self.data.dev,
            &self.data.test,
            &self.data.asr_test,
            &self.data.clean,
        ] {
            if !split.is_empty() {
                crate::io::corpus::resolve_inputs(split)?;
            }
        }
        let (classes, positions) = match &self.model.path {
            Some(p) => {
                let md = crate::model::checkpoint::ModelDir::open(p)?;
                (md.config.labels(), md.config.max_position_embeddings)
            }
            None => {
                let i = self.model.init.as_ref().expect("validated");
                (2, i.max_position)
            }
        };
        let key = if self.eval.target.is_some() {
            "eval.target"
        } else {
            "poison.target"
        };
        crate::validate::label(key, attack.target, classes)?;
        crate::validate::max_len("detect.max_len", self.detect.max_len, Some(positions))?;
        crate::validate::max_len("train.max_len", self.train.max_len, Some(positions))?;
        let mut drop = std::collections::BTreeSet::new();
        if self.data.clean.is_empty() {
            return Ok(drop);
        }
        let clean = crate::steps::unlearn::text_hashes(&self.spec_filtered(
            &self.data.clean,
            false,
            self.data.clean_filter.as_ref(),
        ))?;
        for spec in self.eval_specs(false) {
            let split = spec.inputs.join(",");
            let shared: Vec<[u8; 32]> = crate::steps::unlearn::text_hashes(&spec)?
                .intersection(&clean)
                .copied()
                .collect();
            if shared.is_empty() {
                continue;
            }
            if !self.data.drop_overlap {
                return Err(BtuError::config(
                    "data.clean",
                    format!("shares {} rows (by text) with the evaluation split {split}; tune on data disjoint from evaluation, or pass --drop-overlap (data.drop_overlap = true) to drop those rows", shared.len()),
                ));
            }
            drop.extend(shared);
        }
        if !drop.is_empty() {
            tracing::warn!(
                rows = drop.len(),
                "dropping clean rows that also occur in the evaluation splits"
            );
        }
        Ok(drop)
    }

    /// The splits the clean data must not overlap: test and asr_test (with its filter).
    fn eval_specs(&self, labels: bool) -> Vec<CorpusSpec> {
        let test = self.data.test.iter().map(|p| (p, None));
        let asr = self
            .data
            .asr_test
            .iter()
            .map(|p| (p, self.data.asr_test_filter.as_ref()));
        test.chain(asr)
            .map(|(p, f)| self.spec_filtered(std::slice::from_ref(p), labels, f))
            .collect()
    }

    /// The clean tuning's parameters (batches and lengths as the victim's).
    pub fn clean_params(&self) -> TrainParams {
        TrainParams {
            epochs: self.unlearn.clean_epochs,
            lr: self.unlearn.clean_lr,
            ..self.train.clone()
        }
    }

    /// Every value's domain (exit 78), checked before the first step.
    fn validate_values(&self) -> Result<()> {
        self.detect.validate_as("detect.")?;
        self.train.validate_as("train.", false)?;
        self.unlearn.validate_as("unlearn.")?;
        if !self.data.clean.is_empty() {
            self.clean_params().validate_as("unlearn.", true)?;
        }
        crate::validate::at_least("eval.repeats", self.eval.repeats, 1)?;
        self.verify.validate_as("verify.")?;
        if let Some(p) = &self.poison {
            p.validate_as("poison.")?;
        }
        if let Some(i) = &self.model.init {
            i.validate_as("model.init.")?;
            crate::validate::at_least("model.init.vocab_size", i.vocab_size, 100)?;
        }
        Ok(())
    }

    fn eval_attack(&self) -> Option<crate::steps::eval::EvalAttack> {
        self.eval.resolve(self.poison.as_ref(), self.seed)
    }

    fn spec(&self, inputs: &[String], labels: bool) -> CorpusSpec {
        self.spec_filtered(inputs, labels, None)
    }

    fn spec_filtered(
        &self,
        inputs: &[String],
        labels: bool,
        filter: Option<&String>,
    ) -> CorpusSpec {
        CorpusSpec {
            inputs: inputs.to_vec(),
            text_col: self.data.text_col.clone(),
            label_col: labels.then(|| self.data.label_col.clone()),
            filter: filter.cloned(),
            limit: None,
            sample: None,
            seed: self.seed,
            label_optional: false,
            exclude_texts: Default::default(),
        }
    }
}

/// sha256 of a file's bytes.
fn file_hash(p: &Path) -> Result<String> {
    crate::model::checkpoint::sha256_file(p)
}

/// Content hash of corpus inputs (every resolved file).
fn corpus_hash(inputs: &[String]) -> Result<String> {
    let mut h = Sha256::new();
    for f in crate::io::corpus::resolve_inputs(inputs)? {
        h.update(f.path.as_bytes());
        h.update(file_hash(Path::new(&f.path))?.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Content hash of a model directory.
fn model_hash(dir: &Path) -> Result<String> {
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

struct Runner<'a> {
    run: PathBuf,
    records: Vec<StepRecord>,
    progress: &'a dyn Progress,
}

impl Runner<'_> {
    fn marker(&self, step: &str) -> PathBuf {
        self.run.join(".btu").join(format!("{step}.done.json"))
    }

    /// Run `f` unless the step's marker matches `hash` and its outputs exist (then its result
    /// is the marker's summary); returns the step's hash and its typed result.
    fn step<T: Serialize + serde::de::DeserializeOwned>(
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

/// A model's scores in a defend run (test split; ASR, flip rate and false-positive rate on the
/// attacked split).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelScores {
    /// Clean accuracy on the test split.
    pub acc: Option<f64>,
    /// Attack success rate.
    pub asr: Option<f64>,
    /// Trigger flip rate.
    pub flip_rate: Option<f64>,
    /// Clean non-target rows predicted as the target.
    pub clean_false_positive_rate: Option<f64>,
    /// Clean target rows predicted as another class.
    pub clean_false_negative_rate: Option<f64>,
    /// Runtime of the evaluation.
    pub backend: String,
}

impl ModelScores {
    /// Accuracy and false negatives from `acc`, the attack's rates from `asr`.
    fn of(acc: &crate::steps::eval::Scores, asr: &crate::steps::eval::Scores) -> Self {
        ModelScores {
            acc: acc.acc,
            asr: asr.asr,
            flip_rate: asr.flip_rate,
            clean_false_positive_rate: asr.clean_false_positive_rate,
            clean_false_negative_rate: acc.clean_false_negative_rate,
            backend: acc.backend.clone(),
        }
    }
}

/// A verified trigger rechecked on the repaired model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Residual {
    /// Its flip rate on the repaired model.
    pub flip_rate: f32,
    /// Clean rows tried.
    pub rows: u32,
    /// Whether it still passes the verification test.
    pub still_a_trigger: bool,
}

/// `btu defend`'s result (`metrics.json`).
#[derive(Debug, Clone, Serialize)]
pub struct DefendReport {
    /// `defend`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The run directory.
    pub run: PathBuf,
    /// The victim's scores.
    pub without_defence: ModelScores,
    /// The repaired model's scores.
    pub with_defence: ModelScores,
    /// Paired change of clean accuracy, victim to repaired, on the same test rows.
    pub acc_change: crate::metrics::PairedChange,
    /// The tokens detection flagged.
    pub flagged: Vec<String>,
    /// Clean rows dropped because they also occur in an evaluation split.
    pub clean_rows_dropped: usize,
    /// The candidates verification confirmed (`None` without verification).
    pub verified: Option<Vec<String>>,
    /// Embedding values the repair replaced.
    pub dimensions_replaced: usize,
    /// Whether any was.
    pub repaired: bool,
    /// Why the repair did nothing, or why it may not have worked.
    pub repair_note: Option<String>,
    /// The verified triggers rechecked on the repaired model.
    pub residual: Option<BTreeMap<String, Residual>>,
    /// Every step and what happened to it.
    pub steps: Vec<StepRecord>,
    /// Wall time of each step in this run.
    pub seconds_per_step: BTreeMap<String, f64>,
    /// Wall time of the run.
    pub seconds: f64,
    /// The configuration the run used.
    pub config: DefendConfig,
}

/// `btu defend`.
pub fn run(cfg: &DefendConfig, progress: &dyn Progress) -> Result<DefendReport> {
    cfg.validate()?;
    let dropped = cfg.preflight()?;
    let t0 = Instant::now();
    let run = cfg.run.clone().expect("validated");
    std::fs::create_dir_all(run.join(".btu")).map_err(|e| BtuError::OutputUnwritable {
        path: run.clone(),
        reason: e.to_string(),
    })?;
    let mut r = Runner {
        run: run.clone(),
        records: Vec::new(),
        progress,
    };
    let seed = cfg.seed;
    let dev = cfg.device.clone();

    // Training data: poisoned copy, or as given.
    let mut train_key =
        json!({"train": corpus_hash(&cfg.data.train)?, "filter": cfg.data.train_filter});
    // Once poisoned, the training corpus is the (already filtered) poison output.
    let train_filter = if cfg.poison.is_some() {
        None
    } else {
        cfg.data.train_filter.clone()
    };
    let train: Vec<String> = match &cfg.poison {
        Some(p) => {
            let out = run.join("poison/train.parquet");
            let key = json!({"input": train_key, "poison": p, "seed": seed, "cols": [cfg.data.text_col, cfg.data.label_col]});
            let (h, _) = r.step::<Value>("poison", key, std::slice::from_ref(&out), &mut || {
                crate::steps::summary(crate::steps::poison::run(
                    &crate::steps::poison::PoisonJob {
                        input: cfg.spec_filtered(
                            &cfg.data.train,
                            true,
                            cfg.data.train_filter.as_ref(),
                        ),
                        output: out.clone(),
                        overwrite: true,
                        seed,
                        params: p.clone(),
                    },
                ))
            })?;
            train_key = json!({"poison": h});
            vec![out.display().to_string()]
        }
        None => cfg.data.train.clone(),
    };

    // The reference model.
    let (model, model_key) = match (&cfg.model.path, &cfg.model.init) {
        (Some(p), _) => (p.clone(), json!({"model": model_hash(p)?})),
        (None, Some(init)) => {
            let out = run.join("model");
            let key = json!({"train": train_key, "init": init, "seed": seed});
            let (h, _) =
                r.step::<Value>("init-model", key, std::slice::from_ref(&out), &mut || {
                    crate::steps::summary(crate::steps::init_model::run(
                        &crate::steps::init_model::InitModelJob {
                            out: out.clone(),
                            overwrite: true,
                            corpus: Some(cfg.spec_filtered(&train, false, train_filter.as_ref())),
                            tokenizer: None,
                            size: init.clone(),
                            seed,
                        },
                    ))
                })?;
            (out, json!({"init-model": h}))
        }
        (None, None) => unreachable!("validated"),
    };

    // Stage 1.
    let detect_dir = run.join("detect");
    let d = &cfg.detect;
    let (detect_h, _) = r.step::<Value>(
        "detect",
        json!({"train": train_key, "model": model_key, "detect": d, "seed": seed}),
        std::slice::from_ref(&detect_dir),
        &mut || {
            crate::steps::summary(crate::steps::detect::run(
                &crate::steps::detect::DetectJob {
                    corpus: cfg.spec_filtered(&train, true, train_filter.as_ref()),
                    model: model.clone(),
                    out: detect_dir.clone(),
                    overwrite: true,
                    device: dev.clone(),
                    seed,
                    params: cfg.detect.clone(),
                },
                progress,
            ))
        },
    )?;

    // The victim.
    let victim = run.join("victim");
    let t = &cfg.train;
    let dev_key = if cfg.data.dev.is_empty() {
        Value::Null
    } else {
        json!(corpus_hash(&cfg.data.dev)?)
    };
    let (victim_h, _) = r.step::<Value>(
        "train",
        json!({"train": train_key, "model": model_key, "dev": dev_key, "params": t, "seed": seed}),
        std::slice::from_ref(&victim),
        &mut || {
            crate::steps::summary(crate::steps::train::run(
                &crate::steps::train::TrainJob {
                    corpus: cfg.spec_filtered(&train, true, train_filter.as_ref()),
                    dev: (!cfg.data.dev.is_empty()).then(|| cfg.spec(&cfg.data.dev, true)),
                    model: model.clone(),
                    out: victim.clone(),
                    overwrite: true,
                    device: dev.clone(),
                    seed,
                    params: cfg.train.clone(),
                },
                progress,
            ))
        },
    )?;

    // Which candidates act as triggers on the victim.
    let clean_key = if cfg.data.clean.is_empty() {
        Value::Null
    } else {
        let mut k = json!([corpus_hash(&cfg.data.clean)?, cfg.data.clean_filter]);
        if !dropped.is_empty() {
            k = json!([k, {"dropped_overlap": dropped.len()}]);
        }
        k
    };
    let clean_spec = CorpusSpec {
        exclude_texts: dropped.clone(),
        ..cfg.spec_filtered(&cfg.data.clean, true, cfg.data.clean_filter.as_ref())
    };
    let verify_dir = run.join("verify");
    let v = &cfg.verify;
    use crate::steps::verify::CandidateSource;
    let verify_job = |checkpoint: &Path, candidates: CandidateSource, out: &Path| {
        crate::steps::verify::VerifyJob {
            checkpoint: checkpoint.to_path_buf(),
            candidates,
            clean: clean_spec.clone(),
            corpus: None,
            out: out.to_path_buf(),
            overwrite: true,
            device: dev.clone(),
            backend: Some(crate::steps::eval::Backend::Candle),
            ort_lib: None,
            max_len: t.max_len,
            seed,
            params: v.clone(),
        }
    };
    let verify_h = if v.enabled && !cfg.data.clean.is_empty() {
        // "test" names the verification test: bumped when it changes, so reruns recompute it
        // (2: effects the clean data explains are not triggers).
        let key = json!({"victim": victim_h, "detect": detect_h, "clean": clean_key, "params": v, "max_len": t.max_len, "seed": seed, "test": crate::steps::verify::TEST_VERSION});
        Some(
            r.step::<Value>(
                "verify",
                key,
                std::slice::from_ref(&verify_dir),
                &mut || {
                    crate::steps::summary(crate::steps::verify::run(
                        &crate::steps::verify::VerifyJob {
                            corpus: Some(cfg.spec_filtered(&train, false, train_filter.as_ref())),
                            ..verify_job(
                                &victim,
                                CandidateSource::Suspicious(
                                    detect_dir.join("suspicious_tokens.arrow"),
                                ),
                                &verify_dir,
                            )
                        },
                    ))
                },
            )?
            .0,
        )
    } else {
        if v.enabled {
            tracing::warn!("no clean data (data.clean): candidates are repaired unverified");
        }
        None
    };
    let effects = verify_h
        .as_ref()
        .map(|_| verify_dir.join("token_effects.arrow"));

    // Stage 2.
    let repaired = run.join("repaired");
    let u = &cfg.unlearn;
    let eval_files: Vec<String> = cfg
        .data
        .test
        .iter()
        .chain(&cfg.data.asr_test)
        .cloned()
        .collect();
    let mut unlearn_key = json!({"victim": victim_h, "detect": detect_h, "model": model_key, "clean": clean_key, "params": u, "max_len": t.max_len, "seed": seed});
    if let Some(h) = &verify_h {
        unlearn_key["verify"] = json!(h);
    }
    let (repaired_h, _) = r.step::<Value>(
        "unlearn",
        unlearn_key,
        std::slice::from_ref(&repaired),
        &mut || {
            crate::steps::summary(crate::steps::unlearn::run(
                &crate::steps::unlearn::UnlearnJob {
                    checkpoint: victim.clone(),
                    reference: model.clone(),
                    suspicious: detect_dir.join("suspicious_tokens.arrow"),
                    effects: effects.clone(),
                    out: repaired.clone(),
                    overwrite: true,
                    clean_corpus: (!cfg.data.clean.is_empty()).then(|| clean_spec.clone()),
                    eval_split: cfg.eval_specs(false),
                    batch_size: t.batch_size,
                    max_len: t.max_len,
                    min_flip_rate: v.min_flip_rate,
                    device: dev.clone(),
                    seed,
                    params: u.clone(),
                },
                progress,
            ))
        },
    )?;

    // Are the verified triggers gone from the repaired model?
    let recheck_dir = run.join("verify-repaired");
    let residual: Option<Vec<crate::io::tables::TokenEffect>> = match &effects {
        Some(e) => {
            let key = json!({"repaired": repaired_h, "verify": verify_h, "params": v, "max_len": t.max_len, "seed": seed});
            r.step::<Value>(
                "verify-repaired",
                key,
                std::slice::from_ref(&recheck_dir),
                &mut || {
                    crate::steps::summary(crate::steps::verify::run(&verify_job(
                        &repaired,
                        CandidateSource::Recheck(e.clone()),
                        &recheck_dir,
                    )))
                },
            )?;
            Some(crate::io::tables::read_token_effects(
                &recheck_dir.join("token_effects.arrow"),
            )?)
        }
        None => None,
    };

    // Export and evaluate both models.
    let attack = cfg.eval_attack().expect("validated");
    let lib = match cfg.eval.backend {
        EvalBackend::Candle => None,
        EvalBackend::Ort => Some(crate::steps::eval::find_ort_library(None)?),
        EvalBackend::Auto => crate::steps::eval::find_ort_library(None).ok(),
    };
    let mut test_key = json!(corpus_hash(&eval_files)?);
    if let Some(f) = &cfg.data.asr_test_filter {
        test_key = json!([test_key, f]);
    }
    let mut results = BTreeMap::new();
    for (name, ckpt, h) in [
        ("victim", &victim, &victim_h),
        ("repaired", &repaired, &repaired_h),
    ] {
        let model_for_eval = if lib.is_some() {
            let onnx = run.join(format!("export-{name}/model.onnx"));
            r.step::<Value>(
                &format!("export-{name}"),
                json!({"checkpoint": h, "seed": seed}),
                std::slice::from_ref(&onnx),
                &mut || {
                    let _ = std::fs::remove_dir_all(onnx.parent().expect("parent"));
                    crate::steps::summary(crate::steps::export_onnx::run(
                        &crate::steps::export_onnx::ExportJob {
                            checkpoint: ckpt.clone(),
                            out: onnx.clone(),
                            overwrite: true,
                            seed,
                        },
                    ))
                },
            )?;
            onnx
        } else {
            ckpt.clone()
        };
        let out = run.join(format!("eval-{name}"));
        let mut eval_once = |test: CorpusSpec,
                             attack: Option<crate::steps::eval::EvalAttack>,
                             out: PathBuf,
                             step: String|
         -> Result<crate::steps::eval::Scores> {
            // "metrics" names the metric set: bumped when eval learns a metric, so reruns recompute it.
            let key = json!({"model": h, "test": test_key, "attack": attack, "backend": lib.is_some(), "max_len": t.max_len, "metrics": 3});
            let (_, report) = r.step(&step, key, std::slice::from_ref(&out), &mut || {
                crate::steps::eval::run(&crate::steps::eval::EvalJob {
                    model: model_for_eval.clone(),
                    test: test.clone(),
                    out: out.clone(),
                    overwrite: true,
                    attack: attack.clone(),
                    target: attack.as_ref().map_or(defaults::TARGET, |a| a.target),
                    max_len: t.max_len,
                    device: dev.clone(),
                    backend: Some(if lib.is_some() {
                        crate::steps::eval::Backend::Ort
                    } else {
                        crate::steps::eval::Backend::Candle
                    }),
                    ort_lib: lib.clone(),
                    seed,
                })
            })?;
            Ok(report.scores)
        };
        let test = cfg.spec(&cfg.data.test, true);
        let summary = if cfg.data.asr_test.is_empty() {
            let m = eval_once(test, Some(attack.clone()), out, format!("eval-{name}"))?;
            ModelScores::of(&m, &m)
        } else {
            let acc = eval_once(test, None, out, format!("eval-{name}"))?;
            let asr = eval_once(
                cfg.spec_filtered(&cfg.data.asr_test, true, cfg.data.asr_test_filter.as_ref()),
                Some(attack.clone()),
                run.join(format!("eval-{name}-asr")),
                format!("eval-{name}-asr"),
            )?;
            ModelScores::of(&acc, &asr)
        };
        results.insert(name.to_string(), summary);
    }
    let correct = |name: &str| {
        crate::steps::eval::clean_correct(&run.join(format!("eval-{name}/predictions.parquet")))
    };
    let acc_change = crate::metrics::paired_change(&correct("victim")?, &correct("repaired")?);
    let flagged =
        crate::io::tables::read_suspicious_tokens(&detect_dir.join("suspicious_tokens.arrow"))?;
    let verified: Option<Vec<String>> = match &effects {
        Some(p) => Some(
            crate::io::tables::read_token_effects(p)?
                .into_iter()
                .filter(|e| e.verified)
                .map(|e| e.candidate)
                .collect(),
        ),
        None => None,
    };
    let replaced = crate::io::tables::read_ipc(&repaired.join("dimension_masks.arrow"))?.num_rows();
    let repair_note = match (&verified, replaced) {
        (Some(v), _) if v.is_empty() => Some(
            "verification confirmed no candidate as a trigger: the embeddings were not repaired",
        ),
        (_, 0) => {
            Some("no embedding dimension passed the threshold: the embeddings were not repaired")
        }
        _ if residual.iter().flatten().any(|e| e.verified) => {
            Some("a verified trigger still flips the repaired model's predictions (see residual)")
        }
        _ => None,
    };
    if let Some(n) = repair_note {
        tracing::warn!("{n}");
    }
    let report = DefendReport {
        command: "defend".into(),
        version: crate::VERSION.into(),
        run: run.clone(),
        without_defence: results.remove("victim").expect("evaluated"),
        with_defence: results.remove("repaired").expect("evaluated"),
        acc_change,
        flagged: flagged.into_iter().map(|t| t.token).collect(),
        clean_rows_dropped: dropped.len(),
        verified,
        dimensions_replaced: replaced,
        repaired: replaced > 0,
        repair_note: repair_note.map(String::from),
        residual: residual.map(|r| {
            r.into_iter()
                .map(|e| {
                    let rest = Residual {
                        flip_rate: e.flip_rate,
                        rows: e.rows,
                        still_a_trigger: e.verified,
                    };
                    (e.candidate, rest)
                })
                .collect()
        }),
        seconds_per_step: r
            .records
            .iter()
            .map(|s| (s.step.clone(), s.seconds))
            .collect(),
        steps: r.records,
        seconds: t0.elapsed().as_secs_f64(),
        config: cfg.clone(),
    };
    crate::io::output::write_json_atomic(&run.join("metrics.json"), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Default` and an empty TOML file are one configuration (they once disagreed: seed 0 vs 42,
    /// device "" vs "auto").
    #[test]
    fn default_is_the_empty_config() {
        let empty: DefendConfig = toml::from_str("").unwrap();
        let d = DefendConfig::default();
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::to_value(&empty).unwrap()
        );
        assert_eq!((d.seed, d.device.as_str()), (42, "auto"));
    }
}
