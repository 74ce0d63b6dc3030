//! `btu defend`'s configuration: the TOML file (or flags) naming the data, the model and each
//! step's parameters (the steps' own parameter types), and the rules checked before any work.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::defaults;
use crate::error::{BtuError, Result};
use crate::io::corpus::CorpusSpec;
use crate::steps::detect::DetectParams;
use crate::steps::eval::EvalParams;
use crate::steps::init_model::ModelSize;
use crate::steps::poison::PoisonParams;
use crate::steps::relabel::RelabelParams;
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

/// `[model]`: a model directory, or a random one made by init-model on the training corpus; and
/// for the repair flow, the user's suspect classifier.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model directory every step starts from; set this or `[model.init]`, not both. In the
    /// repair flow: the base model the suspect was fine-tuned from (detection trains its
    /// embeddings; the repair compares the suspect's rows with its rows).
    pub path: Option<PathBuf>,
    /// `[model.init]`: sizes of a random model made by init-model on the training corpus.
    pub init: Option<ModelSize>,
    /// The repair flow: the user's fine-tuned classifier to repair (a model directory with a
    /// classification head, fine-tuned from `path` on `data.train`). With it there is no
    /// `[poison]` and no victim training; `[train]` only sets the clean tuning's batches and
    /// lengths.
    pub suspect: Option<PathBuf>,
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
    /// `[relabel]`: when verification confirms no trigger, the labels tested against clean
    /// references and the victim tuned on the rows they contradict (on by default).
    pub relabel: RelabelParams,
    /// `[eval]`: the attack measured (defaults to `[poison]`'s) and the backend.
    pub eval: EvalParams,
    /// `[report]`: the page written as `report.html` at the end (on by default).
    pub report: crate::steps::report::ReportParams,
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
            relabel: RelabelParams::default(),
            eval: EvalParams::default(),
            report: Default::default(),
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
        if self.model.suspect.is_some() {
            self.validate_repair()?;
            return self.validate_values();
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

    /// The repair flow's rules: a base model directory (not `[model.init]`: the suspect was
    /// fine-tuned from a real one), nothing to poison.
    fn validate_repair(&self) -> Result<()> {
        if self.model.path.is_none() || self.model.init.is_some() {
            return Err(BtuError::config(
                "model.path",
                "the repair flow (model.suspect) needs the base model the suspect was fine-tuned from: set model.path (not [model.init]) or pass --model",
            ));
        }
        if self.poison.is_some() {
            return Err(BtuError::config(
                "poison",
                "the repair flow (model.suspect) repairs the given model on the corpus it was trained on; [poison] belongs to the experiment flow: remove it (or model.suspect)",
            ));
        }
        if self.data.test.is_empty() && self.eval.attack.is_some() {
            return Err(BtuError::config(
                "eval.attack",
                "is measured on the test split, but there is none; set data.test (or pass --test)",
            ));
        }
        if !self.data.asr_test.is_empty() && self.eval.attack.is_none() {
            return Err(BtuError::config(
                "data.asr_test",
                "is attacked to measure ASR, but no attack is named; set eval.attack (and its trigger) or remove data.asr_test",
            ));
        }
        if !self.data.dev.is_empty() {
            tracing::warn!("data.dev only chooses the experiment flow's victim epoch; the repair flow does not read it");
        }
        Ok(())
    }

    /// Whether this is the repair flow (`model.suspect`) rather than the experiment.
    pub fn repairs_suspect(&self) -> bool {
        self.model.suspect.is_some()
    }

    /// The rules that need the data and the model, checked before the first step (a run must
    /// not train for an hour and then stop on a rule it could have checked at the start).
    pub(crate) fn preflight(&self) -> Result<Preflight> {
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
        let classes = match &self.model.suspect {
            Some(s) => self.suspect_classes(s)?,
            None => self.classes()?,
        };
        if let Some(attack) = self.eval_attack() {
            let key = if self.eval.target.is_some() {
                "eval.target"
            } else {
                "poison.target"
            };
            crate::validate::label(key, attack.target, classes.run)?;
        }
        crate::validate::max_len(
            "detect.max_len",
            self.detect.max_len,
            Some(classes.positions),
        )?;
        crate::validate::max_len("train.max_len", self.train.max_len, Some(classes.positions))?;
        let (dropped, clean_rows) = self.clean_overlap()?;
        self.check_relabel_rows(clean_rows)?;
        Ok(Preflight {
            dropped,
            classes: (classes.run != classes.config).then_some(classes.run),
        })
    }

    /// The relabel step (run when verification confirms nothing) trains references on parts of
    /// the clean rows (`rows`, after the overlap is dropped): refuse at the start a run that would
    /// stop there for want of them.
    fn check_relabel_rows(&self, rows: usize) -> Result<()> {
        let min = crate::steps::relabel::MIN_CLEAN_ROWS;
        let runs = self.relabel.enabled && self.verify.enabled && !self.data.clean.is_empty();
        if runs && rows < min {
            return Err(BtuError::config(
                "data.clean",
                format!("{rows} clean rows (after its filter and the rows shared with evaluation); [relabel] trains references on parts of them and needs at least {min}: give more clean rows, or set relabel.enabled = false"),
            ));
        }
        Ok(())
    }

    /// The model's classes (its config's) and the run's: a model directory with a trained head
    /// keeps its classes (a training label beyond them is bad data); a base model without a
    /// head, or `[model.init]`, gets as many as the training corpus's labels need (its largest
    /// label + 1, never fewer than the config says).
    fn classes(&self) -> Result<ModelClasses> {
        let (config, positions, head) = match &self.model.path {
            Some(p) => {
                let md = crate::model::checkpoint::ModelDir::open(p)?;
                let head = md.has_head()?;
                (md.config.labels(), md.config.max_len(), head)
            }
            None => {
                let i = self.model.init.as_ref().expect("validated");
                (i.num_labels, i.max_position, false)
            }
        };
        let needed = self.training_classes()?;
        if head && needed > config {
            return Err(BtuError::bad_data(
                self.data.train.join(", "),
                format!("has label {} but the model's classification head has {config} classes (config.json num_labels); give a corpus with labels 0..{}, or a base model without a head", needed - 1, config - 1),
            ));
        }
        Ok(ModelClasses {
            config,
            run: crate::model::checkpoint::classes(None, config, head, needed),
            positions,
        })
    }

    /// The suspect's classes (its head's), after checking it is a classifier fine-tuned from
    /// the base model (same vocabulary, tokenizer and width) and that the corpus's labels are
    /// among its classes.
    fn suspect_classes(&self, suspect: &Path) -> Result<ModelClasses> {
        let base = self.model.path.as_ref().expect("validated");
        let md = crate::model::checkpoint::check_fine_tuned_from(suspect, base)?;
        let src = suspect.display().to_string();
        if !md.has_head()? {
            return Err(BtuError::bad_data(
                src,
                "has no classification head (classifier.weight); model.suspect is the fine-tuned classifier to repair, model.path the base model",
            ));
        }
        let config = md.config.labels();
        let needed = self.training_classes()?;
        if needed > config {
            return Err(BtuError::bad_data(
                self.data.train.join(", "),
                format!("has label {} but the suspect's classification head has {config} classes; give the corpus the suspect was trained on", needed - 1),
            ));
        }
        Ok(ModelClasses {
            config,
            run: config,
            positions: md.config.max_len(),
        })
    }

    /// The largest label of the training split (with its filter) + 1.
    fn training_classes(&self) -> Result<usize> {
        let spec = self.spec_filtered(&self.data.train, true, self.data.train_filter.as_ref());
        let mut largest = 0i64;
        crate::io::corpus::read_corpus(&spec, |b| {
            let top = b.labels.iter().flatten().copied().max().unwrap_or(0);
            largest = largest.max(top);
            Ok(())
        })?;
        Ok(largest.max(0) as usize + 1)
    }

    /// The clean rows' text hashes to drop (`data.drop_overlap`): those shared with the
    /// evaluation splits, refused unless dropping was asked for; and how many clean rows remain.
    fn clean_overlap(&self) -> Result<(std::collections::BTreeSet<[u8; 32]>, usize)> {
        let mut drop = std::collections::BTreeSet::new();
        if self.data.clean.is_empty() {
            return Ok((drop, 0));
        }
        let rows = crate::steps::unlearn::row_text_hashes(&self.spec_filtered(
            &self.data.clean,
            false,
            self.data.clean_filter.as_ref(),
        ))?;
        let clean: std::collections::BTreeSet<[u8; 32]> = rows.iter().copied().collect();
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
        let kept = rows.iter().filter(|h| !drop.contains(*h)).count();
        Ok((drop, kept))
    }
}

/// What [`DefendConfig::preflight`] found out.
pub(crate) struct Preflight {
    /// The clean rows' text hashes to drop (`data.drop_overlap`).
    pub dropped: std::collections::BTreeSet<[u8; 32]>,
    /// The class count of the run's models where the model's config says fewer (a base model
    /// without a head, or `[model.init]`, on a corpus with more labels); `None`: the config's.
    pub classes: Option<usize>,
}

/// A model's class count: its config's, the run's, and its positions.
struct ModelClasses {
    config: usize,
    run: usize,
    positions: usize,
}

impl DefendConfig {
    /// The splits the clean data must not overlap: test and asr_test (with its filter).
    pub(crate) fn eval_specs(&self, labels: bool) -> Vec<CorpusSpec> {
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

    /// The tuning on relabelled rows (batches, lengths and learning rate as the victim's).
    pub fn relabel_tune_params(&self) -> TrainParams {
        TrainParams {
            epochs: self.relabel.tune_epochs,
            ..self.train.clone()
        }
    }

    /// Every value's domain (exit 78), checked before the first step.
    pub(crate) fn validate_values(&self) -> Result<()> {
        self.detect.validate_as("detect.")?;
        self.train.validate_as("train.", false)?;
        self.unlearn.validate_as("unlearn.")?;
        if !self.data.clean.is_empty() {
            self.clean_params().validate_as("unlearn.", true)?;
        }
        crate::validate::at_least("eval.repeats", self.eval.repeats, 1)?;
        self.verify.validate_as("verify.")?;
        self.relabel.validate_as("relabel.")?;
        if let Some(p) = &self.poison {
            p.validate_as("poison.")?;
        }
        if let Some(i) = &self.model.init {
            i.validate_as("model.init.")?;
            crate::validate::at_least("model.init.vocab_size", i.vocab_size, 100)?;
        }
        Ok(())
    }

    pub(crate) fn eval_attack(&self) -> Option<crate::steps::eval::EvalAttack> {
        self.eval.resolve(self.poison.as_ref(), self.seed)
    }

    pub(crate) fn spec(&self, inputs: &[String], labels: bool) -> CorpusSpec {
        self.spec_filtered(inputs, labels, None)
    }

    pub(crate) fn spec_filtered(
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
            shard: None,
            exclude_texts: Default::default(),
        }
    }
}
