//! `btu defend`: the paper's whole pipeline in a run directory. Two flows: the experiment,
//! [poison] -> [init-model] -> detect -> train (`M^b`) -> verify -> unlearn (+ clean fine-tune)
//! -> verify-repaired (-> relabel -> tune, when verification confirms no trigger) -> export-onnx ->
//! eval before and after; and the repair of a user's model
//! (`[model] suspect`), the same steps with the suspect in the victim's place and neither
//! poisoning nor the victim's training (evaluation only when a test split is given). Each step is skipped when an earlier run computed it from
//! the same inputs ([`runner`]); a killed training step resumes after its last complete epoch.
//! [`config`] holds the configuration; this module runs the steps in order and composes their
//! typed results into a [`DefendReport`].

pub mod config;
pub(crate) mod runner;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use config::{DataConfig, DefendConfig, EvalBackend, ModelConfig};
pub use runner::StepRecord;

use crate::defaults;
use crate::error::Result;
use crate::io::corpus::CorpusSpec;
use crate::progress::Progress;
use crate::steps::summary;
use crate::steps::verify::CandidateSource;
use runner::{corpus_hash, model_hash, Runner};

/// A model's scores in a defend run (test split; ASR, flip rate and false-positive rate on the
/// attacked split).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// The flip rate of the control (words of other clean rows inserted at the same places) on
    /// the repaired model: what any inserted word does; absent where it was not measured (a
    /// residual below the verification bound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_flip_rate: Option<f32>,
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
    /// `experiment` (btu poisoned the corpus and trained the victim) or `repair` (the user's
    /// suspect model, `[model] suspect`).
    pub flow: String,
    /// btu's version.
    pub version: String,
    /// The run directory (`None` for a demo's temporary one, removed afterwards).
    pub run: Option<PathBuf>,
    /// The victim's (or suspect's) scores (`None`: no test split, repair flow only).
    pub without_defence: Option<ModelScores>,
    /// The repaired model's scores (`None`: no test split).
    pub with_defence: Option<ModelScores>,
    /// Paired change of clean accuracy, victim to repaired, on the same test rows (`None`: no
    /// test split).
    pub acc_change: Option<crate::metrics::PairedChange>,
    /// The tokens detection flagged.
    pub flagged: Vec<String>,
    /// Clean rows dropped because they also occur in an evaluation split.
    pub clean_rows_dropped: usize,
    /// The candidates verification confirmed (`None` without verification).
    pub verified: Option<Vec<String>>,
    /// Embedding values the repair replaced.
    pub dimensions_replaced: usize,
    /// Whether any was, or the victim was tuned on relabelled rows.
    pub repaired: bool,
    /// Why the repair did nothing, or why it may not have worked.
    pub repair_note: Option<String>,
    /// The verified triggers rechecked on the repaired model.
    pub residual: Option<BTreeMap<String, Residual>>,
    /// The labels tested against clean references (`None`: not run, because verification
    /// confirmed a trigger or did not run); when it relabelled rows, the repaired model is the
    /// victim tuned on them.
    pub relabel: Option<crate::steps::relabel::RelabelReport>,
    /// Every step and what happened to it.
    pub steps: Vec<StepRecord>,
    /// Wall time of each step in this run.
    pub seconds_per_step: BTreeMap<String, f64>,
    /// Wall time of the run.
    pub seconds: f64,
    /// The configuration the run used.
    pub config: DefendConfig,
}

/// The training corpus as detection and the victim read it.
struct TrainData {
    /// Its files (the poisoned copy when `[poison]` is given).
    files: Vec<String>,
    /// The row filter still to apply (the poisoned copy is already filtered).
    filter: Option<String>,
    /// What later steps' keys chain on.
    key: Value,
}

/// A step's output and the hash later steps' keys chain on.
struct Done {
    path: PathBuf,
    hash: String,
}

/// One `btu defend` run in progress.
struct Pipeline<'a> {
    cfg: &'a DefendConfig,
    run: PathBuf,
    steps: Runner<'a>,
    progress: &'a dyn Progress,
    /// Clean rows (by text hash) dropped because an evaluation split has them.
    dropped: BTreeSet<[u8; 32]>,
    /// The class count of `[model.init]`'s model where its size says fewer (see
    /// [`config::Preflight`]); a model directory without a head gets its classes in detect and
    /// train, from the corpus.
    classes: Option<usize>,
    /// [`clean_key`], computed once.
    clean_key: Value,
    /// [`test_key`], computed once.
    test_key: Value,
}

impl Pipeline<'_> {
    fn seed(&self) -> u64 {
        self.cfg.seed
    }

    fn device(&self) -> String {
        self.cfg.device.clone()
    }

    /// A step's run options: writing to `out` (replacing a half-done earlier attempt), the
    /// run's seed and device.
    fn opts(&self, out: &Path) -> crate::steps::RunOpts {
        crate::steps::RunOpts {
            out: out.to_path_buf(),
            overwrite: true,
            seed: self.seed(),
            device: self.device(),
        }
    }

    fn train_spec(&self, train: &TrainData, labels: bool) -> CorpusSpec {
        self.cfg
            .spec_filtered(&train.files, labels, train.filter.as_ref())
    }

    /// The clean rows (verification, rechecks, clean tuning), overlap with evaluation dropped.
    fn clean_spec(&self) -> CorpusSpec {
        let d = &self.cfg.data;
        CorpusSpec {
            exclude_texts: self.dropped.clone(),
            ..self
                .cfg
                .spec_filtered(&d.clean, true, d.clean_filter.as_ref())
        }
    }

    /// `[poison]`: the poisoned copy of the training corpus, or the corpus as given.
    fn training_data(&mut self) -> Result<TrainData> {
        let cfg = self.cfg;
        let key = json!({"train": corpus_hash(&cfg.data.train)?, "filter": cfg.data.train_filter});
        let Some(p) = &cfg.poison else {
            return Ok(TrainData {
                files: cfg.data.train.clone(),
                filter: cfg.data.train_filter.clone(),
                key,
            });
        };
        let out = self.run.join("poison/train.parquet");
        let seed = self.seed();
        let step_key = json!({"input": key, "poison": p, "seed": seed, "cols": [cfg.data.text_col, cfg.data.label_col]});
        let run = self.opts(&out);
        let (h, _) = self.steps.step::<Value>(
            "poison",
            step_key,
            std::slice::from_ref(&out),
            &mut || {
                summary(crate::steps::poison::run(
                    &crate::steps::poison::PoisonJob {
                        input: cfg.spec_filtered(
                            &cfg.data.train,
                            true,
                            cfg.data.train_filter.as_ref(),
                        ),
                        run: run.clone(),
                        params: p.clone(),
                    },
                ))
            },
        )?;
        Ok(TrainData {
            files: vec![out.display().to_string()],
            filter: None,
            key: json!({"poison": h}),
        })
    }

    /// `[model]`: the given model directory, or a random one made by init-model.
    fn reference_model(&mut self, train: &TrainData) -> Result<(PathBuf, Value)> {
        let cfg = self.cfg;
        let init = match (&cfg.model.path, &cfg.model.init) {
            (Some(p), _) => return Ok((p.clone(), json!({"model": model_hash(p)?}))),
            (None, Some(init)) => init,
            (None, None) => unreachable!("validated"),
        };
        let out = self.run.join("model");
        let seed = self.seed();
        let init = &crate::steps::init_model::ModelSize {
            num_labels: self.classes.unwrap_or(init.num_labels),
            ..init.clone()
        };
        let key = json!({"train": train.key, "init": init, "seed": seed});
        let corpus = self.train_spec(train, false);
        let run = self.opts(&out);
        let (h, _) =
            self.steps
                .step::<Value>("init-model", key, std::slice::from_ref(&out), &mut || {
                    summary(crate::steps::init_model::run(
                        &crate::steps::init_model::InitModelJob {
                            run: run.clone(),
                            corpus: Some(corpus.clone()),
                            tokenizer: None,
                            size: init.clone(),
                        },
                    ))
                })?;
        Ok((out, json!({"init-model": h})))
    }

    /// Stage 1.
    fn detect(&mut self, train: &TrainData, model: &Path, model_key: &Value) -> Result<Done> {
        let cfg = self.cfg;
        let out = self.run.join("detect");
        let job = crate::steps::detect::DetectJob {
            corpus: self.train_spec(train, true),
            model: model.to_path_buf(),
            run: self.opts(&out),
            params: cfg.detect.clone(),
        };
        let key =
            json!({"train": train.key, "model": model_key, "detect": cfg.detect, "seed": cfg.seed});
        let progress = self.progress;
        let (hash, _) =
            self.steps
                .step::<Value>("detect", key, std::slice::from_ref(&out), &mut || {
                    summary(crate::steps::detect::run(&job, progress))
                })?;
        Ok(Done { path: out, hash })
    }

    /// The victim `M^b`: the user's suspect (repair flow), or trained here.
    fn victim(&mut self, train: &TrainData, model: &Path, model_key: &Value) -> Result<Done> {
        let cfg = self.cfg;
        if let Some(suspect) = &cfg.model.suspect {
            return Ok(Done {
                path: suspect.clone(),
                hash: model_hash(suspect)?,
            });
        }
        let out = self.run.join("victim");
        let dev_key = if cfg.data.dev.is_empty() {
            Value::Null
        } else {
            json!(corpus_hash(&cfg.data.dev)?)
        };
        let job = crate::steps::train::TrainJob {
            corpus: self.train_spec(train, true),
            dev: (!cfg.data.dev.is_empty()).then(|| cfg.spec(&cfg.data.dev, true)),
            model: model.to_path_buf(),
            run: self.opts(&out),
            params: cfg.train.clone(),
        };
        let key = json!({"train": train.key, "model": model_key, "dev": dev_key, "params": cfg.train, "seed": cfg.seed});
        let progress = self.progress;
        let (hash, _) =
            self.steps
                .step::<Value>("train", key, std::slice::from_ref(&out), &mut || {
                    summary(crate::steps::train::run(&job, progress))
                })?;
        Ok(Done { path: out, hash })
    }

    /// A verification of `checkpoint` (candidates from detection, or a recheck).
    fn verify_job(
        &self,
        checkpoint: &Path,
        candidates: CandidateSource,
        out: &Path,
    ) -> crate::steps::verify::VerifyJob {
        crate::steps::verify::VerifyJob {
            checkpoint: checkpoint.to_path_buf(),
            candidates,
            clean: self.clean_spec(),
            corpus: None,
            run: self.opts(out),
            backend: Some(crate::steps::eval::Backend::Candle),
            ort_lib: None,
            max_len: self.cfg.train.max_len,
            params: self.cfg.verify.clone(),
        }
    }

    /// Which candidates act as triggers on the victim (`None` without clean data or with
    /// `verify.enabled = false`): the `token_effects.arrow` and its step hash.
    fn verify(&mut self, train: &TrainData, victim: &Done, detect: &Done) -> Result<Option<Done>> {
        let cfg = self.cfg;
        let v = &cfg.verify;
        if !v.enabled || cfg.data.clean.is_empty() {
            if v.enabled {
                tracing::warn!("no clean data (data.clean): candidates are repaired unverified");
            }
            return Ok(None);
        }
        let dir = self.run.join("verify");
        // "test" names the verification test: bumped when it or its candidates change, so reruns
        // recompute it (see verify::TEST_VERSION).
        let key = json!({"victim": victim.hash, "detect": detect.hash, "clean": self.clean_key, "params": v, "max_len": cfg.train.max_len, "seed": cfg.seed, "test": crate::steps::verify::TEST_VERSION});
        let job = crate::steps::verify::VerifyJob {
            corpus: Some(self.train_spec(train, false)),
            ..self.verify_job(
                &victim.path,
                CandidateSource::Suspicious(detect.path.join("suspicious_tokens.arrow")),
                &dir,
            )
        };
        let (hash, _) =
            self.steps
                .step::<Value>("verify", key, std::slice::from_ref(&dir), &mut || {
                    summary(crate::steps::verify::run(&job))
                })?;
        Ok(Some(Done {
            path: dir.join("token_effects.arrow"),
            hash,
        }))
    }

    /// Stage 2: the repaired checkpoint.
    fn unlearn(
        &mut self,
        model: (&Path, &Value),
        victim: &Done,
        detect: &Done,
        effects: Option<&Done>,
    ) -> Result<Done> {
        let cfg = self.cfg;
        let (u, t) = (&cfg.unlearn, &cfg.train);
        let out = self.run.join("repaired");
        let mut key = json!({"victim": victim.hash, "detect": detect.hash, "model": model.1, "clean": self.clean_key, "params": u, "max_len": t.max_len, "seed": cfg.seed});
        if let Some(e) = effects {
            key["verify"] = json!(e.hash);
            key["rules"] = json!(crate::steps::unlearn::REPAIR_VERSION);
        }
        let job = crate::steps::unlearn::UnlearnJob {
            checkpoint: victim.path.clone(),
            reference: model.0.to_path_buf(),
            suspicious: detect.path.join("suspicious_tokens.arrow"),
            effects: effects.map(|e| e.path.clone()),
            run: self.opts(&out),
            clean_corpus: (!cfg.data.clean.is_empty()).then(|| self.clean_spec()),
            eval_split: cfg.eval_specs(false),
            batch_size: t.batch_size,
            max_len: t.max_len,
            min_flip_rate: cfg.verify.min_flip_rate,
            params: u.clone(),
        };
        let progress = self.progress;
        let (hash, _) =
            self.steps
                .step::<Value>("unlearn", key, std::slice::from_ref(&out), &mut || {
                    summary(crate::steps::unlearn::run(&job, progress))
                })?;
        Ok(Done { path: out, hash })
    }

    /// With no trigger verified: do clean references doubt a class's training labels more than
    /// its clean labels? The step's report and hash (`None` with `relabel.enabled = false`).
    fn relabel(
        &mut self,
        train: &TrainData,
        model: (&Path, &Value),
        victim: &Done,
    ) -> Result<Option<(crate::steps::relabel::RelabelReport, String)>> {
        let cfg = self.cfg;
        if !cfg.relabel.enabled {
            return Ok(None);
        }
        let out = self.run.join("relabel");
        let r = &cfg.relabel;
        // The tuning's epochs are the next step's: changing them does not redo the test.
        let test = crate::steps::relabel::RelabelParams {
            tune_epochs: 0,
            ..r.clone()
        };
        let key = json!({"train": train.key, "model": model.1, "suspect": victim.hash, "clean": self.clean_key, "relabel": test, "params": cfg.train, "seed": cfg.seed});
        let job = crate::steps::relabel::RelabelJob {
            corpus: self.train_spec(train, true),
            clean: self.clean_spec(),
            model: model.0.to_path_buf(),
            suspect: Some(victim.path.clone()),
            run: self.opts(&out),
            train: cfg.train.clone(),
            params: r.clone(),
        };
        let progress = self.progress;
        let (hash, report) =
            self.steps
                .step("relabel", key, std::slice::from_ref(&out), &mut || {
                    crate::steps::relabel::run(&job, progress)
                })?;
        Ok(Some((report, hash)))
    }

    /// A style or syntax template is no token: with nothing verified, the labels are tested, and
    /// where a class fails the repaired model is tuned on the rows relabelled. The model to
    /// evaluate, and the test's report (`None`: not run).
    fn relabel_and_tune(
        &mut self,
        train: &TrainData,
        (model, victim): ((&Path, &Value), &Done),
        repaired: Done,
        verified: &Option<Vec<String>>,
    ) -> Result<(Done, Option<crate::steps::relabel::RelabelReport>)> {
        let relabel = match verified {
            Some(v) if v.is_empty() => self.relabel(train, model, victim)?,
            _ => None,
        };
        Ok(match relabel {
            Some((r, hash)) => match &r.corpus_file {
                Some(file) => (self.tune(&repaired, (file, &hash))?, Some(r)),
                None => (repaired, Some(r)),
            },
            None => (repaired, None),
        })
    }

    /// The repaired model tuned on the relabelled training rows.
    fn tune(&mut self, repaired: &Done, relabelled: (&Path, &str)) -> Result<Done> {
        let cfg = self.cfg;
        let out = self.run.join("tuned");
        let params = cfg.relabel_tune_params();
        let job = crate::steps::train::TrainJob {
            corpus: cfg.spec(&[relabelled.0.display().to_string()], true),
            dev: None,
            model: repaired.path.clone(),
            run: self.opts(&out),
            params: params.clone(),
        };
        let key = json!({"repaired": repaired.hash, "relabel": relabelled.1, "params": params, "seed": cfg.seed});
        let progress = self.progress;
        let (hash, _) =
            self.steps
                .step::<Value>("tune", key, std::slice::from_ref(&out), &mut || {
                    summary(crate::steps::train::run(&job, progress))
                })?;
        Ok(Done { path: out, hash })
    }

    /// Are the verified triggers gone from the repaired model? Their effects on it.
    fn recheck(
        &mut self,
        repaired: &Done,
        effects: &Done,
    ) -> Result<Vec<crate::io::tables::TokenEffect>> {
        let cfg = self.cfg;
        let dir = self.run.join("verify-repaired");
        let key = json!({"repaired": repaired.hash, "verify": Some(&effects.hash), "params": cfg.verify, "max_len": cfg.train.max_len, "seed": cfg.seed});
        let job = self.verify_job(
            &repaired.path,
            CandidateSource::Recheck(effects.path.clone()),
            &dir,
        );
        self.steps.step::<Value>(
            "verify-repaired",
            key,
            std::slice::from_ref(&dir),
            &mut || summary(crate::steps::verify::run(&job)),
        )?;
        crate::io::tables::read_token_effects(&dir.join("token_effects.arrow"))
    }

    /// The ONNX Runtime library the evaluation uses (`None`: candle).
    fn ort_library(&self) -> Result<Option<PathBuf>> {
        Ok(match self.cfg.eval.backend {
            EvalBackend::Candle => None,
            EvalBackend::Ort => Some(crate::steps::eval::find_ort_library(None)?),
            EvalBackend::Auto => crate::steps::eval::find_ort_library(None).ok(),
        })
    }

    /// The model `eval` reads: the checkpoint, or its ONNX export when ONNX Runtime is used.
    fn exported(&mut self, name: &str, ckpt: &Done, ort: bool) -> Result<PathBuf> {
        if !ort {
            return Ok(ckpt.path.clone());
        }
        let onnx = self.run.join(format!("export-{name}/model.onnx"));
        let job = crate::steps::export_onnx::ExportJob {
            checkpoint: ckpt.path.clone(),
            run: self.opts(&onnx),
        };
        self.steps.step::<Value>(
            &format!("export-{name}"),
            json!({"checkpoint": ckpt.hash, "seed": self.cfg.seed}),
            std::slice::from_ref(&onnx),
            &mut || {
                let _ = std::fs::remove_dir_all(onnx.parent().expect("parent"));
                summary(crate::steps::export_onnx::run(&job))
            },
        )?;
        Ok(onnx)
    }

    /// One evaluation step of `model` (an attack for ASR, or none for ACC only).
    fn eval_once(
        &mut self,
        step: String,
        model: (&Path, &str),
        test: CorpusSpec,
        attack: Option<crate::steps::eval::EvalAttack>,
        ort_lib: &Option<PathBuf>,
    ) -> Result<crate::steps::eval::Scores> {
        let cfg = self.cfg;
        // "metrics" names the metric set: bumped when eval learns a metric, so reruns recompute it.
        let key = json!({"model": model.1, "test": self.test_key, "attack": attack, "backend": ort_lib.is_some(), "max_len": cfg.train.max_len, "metrics": 3});
        let out = self.run.join(&step);
        let job = crate::steps::eval::EvalJob {
            model: model.0.to_path_buf(),
            test,
            run: self.opts(&out),
            target: attack.as_ref().map_or(defaults::TARGET, |a| a.target),
            attack,
            max_len: cfg.train.max_len,
            backend: Some(if ort_lib.is_some() {
                crate::steps::eval::Backend::Ort
            } else {
                crate::steps::eval::Backend::Candle
            }),
            ort_lib: ort_lib.clone(),
        };
        let (_, report) = self
            .steps
            .step(&step, key, std::slice::from_ref(&out), &mut || {
                crate::steps::eval::run(&job)
            })?;
        Ok(report.scores)
    }

    /// The victim's and the repaired model's scores, and the paired ACC change between them.
    fn evaluate_both(
        &mut self,
        victim: &Done,
        repaired: &Done,
    ) -> Result<(ModelScores, ModelScores, crate::metrics::PairedChange)> {
        let ort_lib = self.ort_library()?;
        let before = self.evaluate("victim", victim, &ort_lib)?;
        let after = self.evaluate("repaired", repaired, &ort_lib)?;
        let correct = |name: &str| {
            crate::steps::eval::clean_correct(
                &self.run.join(format!("eval-{name}/predictions.parquet")),
            )
        };
        let change = crate::metrics::paired_change(&correct("victim")?, &correct("repaired")?);
        Ok((before, after, change))
    }

    /// Export (with ONNX Runtime) and evaluate one model: ACC on the test split; ASR and the
    /// flip rate on it too, or on `data.asr_test` when given.
    fn evaluate(
        &mut self,
        name: &str,
        ckpt: &Done,
        ort_lib: &Option<PathBuf>,
    ) -> Result<ModelScores> {
        let cfg = self.cfg;
        let model = self.exported(name, ckpt, ort_lib.is_some())?;
        let model = (model.as_path(), ckpt.hash.as_str());
        let attack = cfg.eval_attack();
        let test = cfg.spec(&cfg.data.test, true);
        let step = format!("eval-{name}");
        let (Some(attack), false) = (&attack, cfg.data.asr_test.is_empty()) else {
            // ACC and ASR on the test split (ACC only without an attack: repair flow).
            let m = self.eval_once(step, model, test, attack, ort_lib)?;
            return Ok(ModelScores::of(&m, &m));
        };
        let attack = attack.clone();
        let acc = self.eval_once(step.clone(), model, test, None, ort_lib)?;
        let asr_test =
            cfg.spec_filtered(&cfg.data.asr_test, true, cfg.data.asr_test_filter.as_ref());
        let asr = self.eval_once(
            format!("{step}-asr"),
            model,
            asr_test,
            Some(attack),
            ort_lib,
        )?;
        Ok(ModelScores::of(&acc, &asr))
    }
}

/// What the steps that read the clean data chain on: its content hash, filter and the rows
/// dropped for overlapping evaluation.
fn clean_key(cfg: &DefendConfig, dropped: usize) -> Result<Value> {
    let d = &cfg.data;
    if d.clean.is_empty() {
        return Ok(Value::Null);
    }
    let mut k = json!([corpus_hash(&d.clean)?, d.clean_filter]);
    if dropped > 0 {
        k = json!([k, {"dropped_overlap": dropped}]);
    }
    Ok(k)
}

/// What the evaluation steps chain on: the content hash of the test and ASR splits, and the ASR
/// split's filter.
fn test_key(cfg: &DefendConfig) -> Result<Value> {
    let files: Vec<String> = cfg
        .data
        .test
        .iter()
        .chain(&cfg.data.asr_test)
        .cloned()
        .collect();
    if files.is_empty() {
        return Ok(Value::Null);
    }
    let key = json!(corpus_hash(&files)?);
    Ok(match &cfg.data.asr_test_filter {
        Some(f) => json!([key, f]),
        None => key,
    })
}

/// Why the repair did nothing, or why it may not have worked.
fn repair_note(
    verified: &Option<Vec<String>>,
    replaced: usize,
    residual: &Option<Vec<crate::io::tables::TokenEffect>>,
    relabel: Option<&crate::steps::relabel::RelabelReport>,
) -> Option<String> {
    let note = match (verified, replaced) {
        (Some(v), _) if v.is_empty() => match relabel.map(|r| (r.target, r.relabelled)) {
            Some((Some(_), 0)) => "verification confirmed no candidate as a trigger; clean references doubt one class's training labels more than its clean labels but none of its rows enough to relabel it (relabel.min_doubt): the model was not repaired",
            Some((Some(_), _)) => "verification confirmed no candidate as a trigger; clean references doubt one class's training labels more than its clean labels: the victim was tuned on the rows they relabelled (see relabel)",
            Some((None, _)) => "verification confirmed no candidate as a trigger and clean references find the training labels no less reliable than the clean data's: the model was not repaired",
            None => "verification confirmed no candidate as a trigger: the embeddings were not repaired",
        },
        (_, 0) => "no embedding dimension passed the threshold: the embeddings were not repaired",
        _ if residual.iter().flatten().any(|e| e.verified) => {
            "a verified trigger still flips the repaired model's predictions (see residual)"
        }
        _ => return None,
    };
    tracing::warn!("{note}");
    Some(note.to_string())
}

/// `btu defend`.
pub fn run(cfg: &DefendConfig, progress: &dyn Progress) -> Result<DefendReport> {
    cfg.validate()?;
    let preflight = cfg.preflight()?;
    let t0 = Instant::now();
    let run = cfg.run.clone().expect("validated");
    let mut p = Pipeline {
        cfg,
        run: run.clone(),
        steps: Runner::new(&run, progress)?,
        progress,
        clean_key: clean_key(cfg, preflight.dropped.len())?,
        test_key: test_key(cfg)?,
        dropped: preflight.dropped,
        classes: preflight.classes,
    };
    let train = p.training_data()?;
    let (model, model_key) = p.reference_model(&train)?;
    let detect = p.detect(&train, &model, &model_key)?;
    let victim = p.victim(&train, &model, &model_key)?;
    let effects = p.verify(&train, &victim, &detect)?;
    let repaired = p.unlearn((&model, &model_key), &victim, &detect, effects.as_ref())?;
    let residual = match &effects {
        Some(e) => Some(p.recheck(&repaired, e)?),
        None => None,
    };
    let verified: Option<Vec<String>> = match &effects {
        Some(e) => Some(
            crate::io::tables::read_token_effects(&e.path)?
                .into_iter()
                .filter(|e| e.verified)
                .map(|e| e.candidate)
                .collect(),
        ),
        None => None,
    };
    let (repaired, relabel) =
        p.relabel_and_tune(&train, ((&model, &model_key), &victim), repaired, &verified)?;
    let tuned = relabel.as_ref().is_some_and(|r| r.corpus_file.is_some());
    let scores = if cfg.data.test.is_empty() {
        None
    } else {
        Some(p.evaluate_both(&victim, &repaired)?)
    };
    let (without_defence, with_defence, acc_change) = match scores {
        Some((b, a, c)) => (Some(b), Some(a), Some(c)),
        None => (None, None, None),
    };
    let flagged =
        crate::io::tables::read_suspicious_tokens(&detect.path.join("suspicious_tokens.arrow"))?;
    let replaced =
        crate::io::tables::read_ipc(&p.run.join("repaired/dimension_masks.arrow"))?.num_rows();
    let records = p.steps.records;
    let report = DefendReport {
        command: "defend".into(),
        flow: if cfg.repairs_suspect() {
            "repair"
        } else {
            "experiment"
        }
        .into(),
        version: crate::VERSION.into(),
        run: Some(run.clone()),
        without_defence,
        with_defence,
        acc_change,
        flagged: flagged.into_iter().map(|t| t.token).collect(),
        clean_rows_dropped: p.dropped.len(),
        repair_note: repair_note(&verified, replaced, &residual, relabel.as_ref()),
        verified,
        dimensions_replaced: replaced,
        repaired: replaced > 0 || tuned,
        relabel,
        residual: residual.map(|r| {
            r.into_iter()
                .map(|e| {
                    let rest = Residual {
                        flip_rate: e.flip_rate,
                        control_flip_rate: e.control_flip_rate(),
                        rows: e.rows,
                        still_a_trigger: e.verified,
                    };
                    (e.candidate, rest)
                })
                .collect()
        }),
        seconds_per_step: records
            .iter()
            .map(|s| (s.step.clone(), s.seconds))
            .collect(),
        steps: records,
        seconds: t0.elapsed().as_secs_f64(),
        config: cfg.clone(),
    };
    crate::io::output::write_json_atomic(&run.join("metrics.json"), &report)?;
    if cfg.report.enabled {
        write_report(&run)?;
    }
    Ok(report)
}

/// `[report]`: the run's page, `report.html`, from what the run directory now holds.
fn write_report(run: &Path) -> Result<()> {
    let _span = tracing::info_span!("step", name = "report").entered();
    crate::steps::report::run(&crate::steps::report::ReportJob {
        dir: run.to_path_buf(),
        scans: Vec::new(),
        tokenizer: None,
        run: crate::steps::RunOpts {
            overwrite: true,
            ..crate::steps::RunOpts::new(run.join("report.html"))
        },
    })?;
    Ok(())
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

    /// With nothing verified, the note says what the labels' test did: no target, a target with
    /// no row doubted enough (nothing tuned), or rows relabelled and the victim tuned.
    #[test]
    fn the_repair_note_says_what_the_labels_test_did() {
        let report =
            |target: Option<i64>, relabelled: usize| crate::steps::relabel::RelabelReport {
                command: "relabel".into(),
                version: String::new(),
                out: PathBuf::new(),
                model: PathBuf::new(),
                suspect: None,
                neighbourhood_seconds: 0.0,
                rows: 10,
                clean_rows: 20,
                reference_accuracy: 0.9,
                classes: vec![],
                target,
                estimated_poisoned: None,
                relabelled,
                corpus_file: None,
                params: Default::default(),
                seed: 42,
                seconds: 0.0,
            };
        let none = Some(vec![]);
        let note = |r: Option<&crate::steps::relabel::RelabelReport>| {
            repair_note(&none, 0, &None, r).unwrap()
        };
        assert!(note(None).contains("embeddings were not repaired"));
        assert!(note(Some(&report(None, 0))).contains("no less reliable"));
        assert!(note(Some(&report(Some(1), 0))).contains("none of its rows enough"));
        assert!(note(Some(&report(Some(1), 5))).contains("tuned on the rows they relabelled"));
        // A verified trigger: the labels' test is not the note's business.
        assert_eq!(
            repair_note(&Some(vec!["cf".into()]), 384, &None, None),
            None
        );
    }
}
