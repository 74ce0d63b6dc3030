//! `btu train`: full fine-tuning of a classifier (the victim `M^b`, or any classifier) on a
//! corpus, optional dev-set epoch selection, checkpoints in HF layout with provenance in the
//! safetensors metadata. Resumable per epoch: every completed epoch is written (model and
//! optimizer state) under a hidden `.<out>.partial/` directory; a rerun with the same inputs and
//! parameters continues after the last complete epoch and ends with the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::defaults;
use crate::device::Precision;
use crate::error::{BtuError, Result};
use crate::io::corpus::CorpusSpec;
use crate::io::tables::canonical_json;
use crate::model::checkpoint::{
    from_tensor, load_model, read_safetensors, safetensors_bytes, save_model, to_tensor,
    Checkpoint, ModelDir, SafetensorsFile,
};
use crate::model::tokenizer::{load_corpus, Batching, BtuTokenizer, TokenizedCorpus};
use crate::model::{Arch, BertClassifier, Trainable};
use crate::progress::Progress;
use crate::training::{train_epoch, AdamW, AdamWConfig, EpochData, EpochStats};

/// Hyper-parameters of fine-tuning: the flags of `btu train` and the `[train]` table of
/// `btu defend` (defaults in [`crate::defaults`]).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    /// Training epochs (at least 1); with a dev split the best epoch by accuracy is kept.
    #[arg(long, env = "BTU_EPOCHS", default_value_t = defaults::TRAIN_EPOCHS)]
    pub epochs: usize,
    /// AdamW learning rate, finite in (0, 1].
    #[arg(long, env = "BTU_LR", default_value_t = defaults::LR)]
    pub lr: f64,
    /// AdamW weight decay, in [0, 1].
    #[arg(long, env = "BTU_WEIGHT_DECAY", default_value_t = defaults::WEIGHT_DECAY)]
    pub weight_decay: f64,
    /// Rows per training batch (at least 1).
    #[arg(long, env = "BTU_BATCH_SIZE", default_value_t = defaults::BATCH_SIZE)]
    pub batch_size: usize,
    /// Tokens per sequence including [CLS]/[SEP]; at most the model's max_position_embeddings.
    #[arg(long, env = "BTU_MAX_LEN", default_value_t = defaults::MAX_LEN)]
    pub max_len: usize,
    /// Batch grouping: random (uniformly shuffled) or bucketed by length (less padding).
    #[arg(long, env = "BTU_BATCHING", value_enum, default_value_t = Batching::Random)]
    pub batching: Batching,
    /// Number of classes of the head (default: the model config's).
    #[arg(long, env = "BTU_NUM_LABELS")]
    pub num_labels: Option<usize>,
    /// Arithmetic of the training steps: f32, tf32 (CUDA tensor cores) or bf16 (mixed
    /// precision; the parameters and AdamW's moments stay f32).
    #[arg(long, env = "BTU_PRECISION", value_enum, default_value_t = Precision::F32)]
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl TrainParams {
    /// Check every value's domain (exit 78) before any work. Names are spelled with `prefix`
    /// (`--` for flags, `train.` for a defend config); `clean` names the epochs and learning
    /// rate as unlearn's clean tuning does (`--clean-epochs`, `--clean-lr`).
    pub fn validate_as(&self, prefix: &str, clean: bool) -> Result<()> {
        use crate::validate::{self as v, key};
        let c = if clean { "clean-" } else { "" };
        v::at_least(&key(prefix, &format!("{c}epochs")), self.epochs, 1)?;
        v::learning_rate(&key(prefix, &format!("{c}lr")), self.lr)?;
        v::weight_decay(&key(prefix, "weight-decay"), self.weight_decay)?;
        v::at_least(&key(prefix, "batch-size"), self.batch_size, 1)?;
        v::max_len(&key(prefix, "max-len"), self.max_len, None)?;
        if let Some(n) = self.num_labels {
            v::at_least(&key(prefix, "num-labels"), n, 2)?;
        }
        Ok(())
    }

    /// [`TrainParams::validate_as`] with `btu train`'s flag names.
    pub fn validate(&self) -> Result<()> {
        self.validate_as("--", false)
    }
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            epochs: defaults::TRAIN_EPOCHS,
            lr: defaults::LR,
            weight_decay: defaults::WEIGHT_DECAY,
            batch_size: defaults::BATCH_SIZE,
            max_len: defaults::MAX_LEN,
            batching: Batching::Random,
            num_labels: None,
            precision: Precision::F32,
        }
    }
}

/// Files copied from a model directory into every checkpoint made from it.
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Copy the tokenizer files of `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f)).map_err(|e| BtuError::io(&src, e))?;
        }
    }
    Ok(())
}

/// Accuracy of `model` on a tokenized labelled corpus.
pub fn accuracy(
    model: &BertClassifier,
    data: &TokenizedCorpus,
    pad_id: u32,
    dev: &Device,
) -> Result<f64> {
    let probs = crate::model::infer::predict_proba(model, &data.seqs, pad_id, 64, dev)?;
    let pred: Vec<i64> = probs
        .iter()
        .map(|p| crate::model::infer::argmax(p) as i64)
        .collect();
    let labels: Vec<i64> = data.labels.iter().map(|&l| l as i64).collect();
    Ok(crate::metrics::accuracy(&pred, &labels))
}

/// Train every parameter of `model` for `epochs` epochs starting at `first_epoch` (in place),
/// calling `after_epoch(epoch, model, optimizer, stats)` after each.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    model: &mut BertClassifier,
    data: &TokenizedCorpus,
    pad_id: u32,
    p: &TrainParams,
    seed: u64,
    first_epoch: usize,
    opt_state: Option<(i32, Vec<(candle_core::Tensor, candle_core::Tensor)>)>,
    dev: &Device,
    progress: &dyn Progress,
    after_epoch: &mut dyn FnMut(usize, &BertClassifier, &AdamW, EpochStats) -> Result<()>,
) -> Result<()> {
    let vars = model.make_trainable(Trainable::All)?;
    let _matmul = p.precision.matmul_mode();
    model.set_compute_dtype(p.precision.compute_dtype())?;
    let mut opt = AdamW::new(
        vars.into_iter().map(|(_, v)| v).collect(),
        AdamWConfig {
            weight_decay: p.weight_decay,
            ..AdamWConfig::with_lr(p.lr)
        },
    )?;
    if let Some((steps, m)) = opt_state {
        opt.restore(steps, m)?;
    }
    for epoch in first_epoch..p.epochs {
        let _epoch = tracing::info_span!("epoch", n = epoch + 1).entered();
        let bar = progress.bar(
            &format!("train epoch {}/{}", epoch + 1, p.epochs),
            data.seqs.len() as u64,
        );
        let ed = EpochData {
            seqs: &data.seqs,
            labels: &data.labels,
            pad_id,
            batch_size: p.batch_size,
            pad_to: None,
            batching: p.batching,
            seed: seed.wrapping_add(epoch as u64),
        };
        let stats = train_epoch(model, Arch::Full, &mut opt, &ed, dev, &mut |n, loss| {
            bar.inc(n as u64);
            bar.set_message(format!("loss {loss:.4}"));
        })?;
        bar.finish_and_clear();
        tracing::info!(
            epoch,
            loss = stats.loss_mean,
            seconds = stats.seconds,
            "training epoch done"
        );
        after_epoch(epoch, model, &opt, stats)?;
    }
    Ok(())
}

/// Inputs of `btu train`.
pub struct TrainJob {
    /// Labelled training corpus (`--corpus`).
    pub corpus: CorpusSpec,
    /// Labelled dev corpus (`--dev`): the epoch with the best accuracy on it is kept; without it
    /// the last epoch.
    pub dev: Option<CorpusSpec>,
    /// Model directory to start from (`--model`).
    pub model: PathBuf,
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
    /// Hyper-parameters.
    pub params: TrainParams,
}

/// One completed epoch of a run (kept beside its checkpoint so an interrupted run resumes).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 0.
    pub epoch: usize,
    /// Its training statistics.
    pub stats: Value,
    /// Accuracy on the dev split, when given.
    pub dev_acc: Option<f64>,
}

/// `btu train`'s result (`train_summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// `train`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// Output checkpoint directory.
    pub out: PathBuf,
    /// The model trained from.
    pub model: PathBuf,
    /// sha256 of its weights.
    pub base_model_sha256: String,
    /// Device trained on.
    pub device: String,
    /// Hyper-parameters.
    pub params: TrainParams,
    /// Seed.
    pub seed: u64,
    /// Training rows.
    pub rows: usize,
    /// Dev rows, when given.
    pub dev_rows: Option<usize>,
    /// Every epoch.
    pub epochs: Vec<EpochRecord>,
    /// The epoch kept (from 1).
    pub selected_epoch: usize,
    /// The epoch a resumed run started at (from 1).
    pub resumed_from_epoch: Option<usize>,
    /// Provenance of the training corpus.
    pub corpus: crate::io::corpus::Fingerprint,
    /// Wall time.
    pub seconds: f64,
}

/// Where a run keeps its completed epochs: keyed by the run's hash (inputs and parameters), so
/// runs with other parameters writing the same `--out` never share or wipe each other's state.
pub fn partial_dir(out: &Path, run_hash: &str) -> PathBuf {
    let name = out.file_name().and_then(|s| s.to_str()).unwrap_or("out");
    out.with_file_name(format!(
        ".{name}.partial-{}",
        &run_hash[..16.min(run_hash.len())]
    ))
}

/// Hold the partial directory's lock for the whole run: a second identical run writing the same
/// state is refused (exit 73) instead of interleaving epochs with the first.
fn lock_partial(partial: &Path, out: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(partial).map_err(|e| BtuError::OutputUnwritable {
        path: partial.to_path_buf(),
        reason: e.to_string(),
    })?;
    let path = partial.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| BtuError::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(BtuError::OutputUnwritable {
            path: out.to_path_buf(),
            reason: format!(
                "another btu train with the same inputs is writing it (lock {}); wait for it to finish",
                path.display()
            ),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(BtuError::io(&path, e)),
    }
}

fn optimizer_file(opt: &AdamW) -> Result<SafetensorsFile> {
    let mut f = SafetensorsFile::default();
    f.metadata.insert("steps".into(), opt.steps().to_string());
    for (i, (m, v)) in opt.moments()?.iter().enumerate() {
        f.tensors.insert(format!("m.{i:04}"), from_tensor(m)?);
        f.tensors.insert(format!("v.{i:04}"), from_tensor(v)?);
    }
    Ok(f)
}

type OptState = (i32, Vec<(candle_core::Tensor, candle_core::Tensor)>);

fn load_optimizer(path: &Path, dev: &Device) -> Result<OptState> {
    let f = read_safetensors(path)?;
    let steps: i32 = f
        .metadata
        .get("steps")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BtuError::bad_data(path.display().to_string(), "no step count"))?;
    let n = f.tensors.len() / 2;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let m = f
            .tensors
            .get(&format!("m.{i:04}"))
            .ok_or_else(|| BtuError::bad_data(path.display().to_string(), "missing moments"))?;
        let v = f
            .tensors
            .get(&format!("v.{i:04}"))
            .ok_or_else(|| BtuError::bad_data(path.display().to_string(), "missing moments"))?;
        out.push((to_tensor("m", m, path, dev)?, to_tensor("v", v, path, dev)?));
    }
    Ok((steps, out))
}

/// The latest complete epoch directory of a partial run.
fn latest_epoch(partial: &Path) -> Option<(usize, PathBuf)> {
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(partial).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("epoch-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if e.path().join("epoch.json").is_file() && best.as_ref().is_none_or(|(b, _)| n > *b) {
                best = Some((n, e.path()));
            }
        }
    }
    best
}

/// `btu train`.
pub fn run(job: &TrainJob, progress: &dyn Progress) -> Result<TrainReport> {
    let t0 = Instant::now();
    let p = &job.params;
    p.validate()?;
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    let dev = crate::device::parse_device(&job.run.device)?;
    p.precision.check("--precision", &dev)?;
    let ckpt = Checkpoint::read(&job.model)?;
    ckpt.check_max_len("--max-len", p.max_len)?;
    let tok = &ckpt.tokenizer;
    let base_sha = ckpt.sha256.clone();
    let data = load_corpus(&job.corpus, tok, p.max_len, ckpt.label_bound(p.num_labels))?;
    let model = ckpt.classifier(
        Some(ckpt.classes(p.num_labels, &data.labels)),
        job.run.seed,
        &dev,
    )?;
    let labels = model.config.labels();
    let dev_data = match &job.dev {
        Some(spec) => Some(load_corpus(spec, tok, p.max_len, labels)?),
        None => None,
    };
    let params_json = json!({"params": p, "seed": job.run.seed, "text_col": job.corpus.text_col, "label_col": job.corpus.label_col});
    let run_hash = hex::encode(Sha256::digest(canonical_json(&json!({
        "base_model_sha256": base_sha,
        "corpus": data.fingerprint.to_json(),
        "dev": dev_data.as_ref().map(|d| d.fingerprint.to_json()),
        "params": params_json,
        "version": crate::VERSION,
    }))));
    let mut metadata: BTreeMap<String, String> = BTreeMap::new();
    metadata.insert("btu:command".into(), "train".into());
    metadata.insert("btu:version".into(), crate::VERSION.into());
    metadata.insert("btu:base_model_sha256".into(), base_sha.clone());
    metadata.insert(
        "btu:corpus_fingerprint".into(),
        canonical_json(&data.fingerprint.to_json()),
    );
    metadata.insert("btu:params".into(), canonical_json(&params_json));

    // Resume from the last complete epoch of an interrupted identical run.
    let partial = partial_dir(&job.run.out, &run_hash);
    let _lock = lock_partial(&partial, &job.run.out)?;
    let state_path = partial.join("state.json");
    let result = train_in(
        job,
        progress,
        TrainState {
            partial: &partial,
            state_path: &state_path,
            run_hash: &run_hash,
            model,
            data: &data,
            dev_data: dev_data.as_ref(),
            tok,
            dev: &dev,
            metadata,
            base_sha: &base_sha,
            t0,
        },
    );
    if !matches!(result, Ok(_) | Err(BtuError::Temporary { .. }))
        && latest_epoch(&partial).is_none()
    {
        // Nothing worth resuming: leave no state behind a failed run.
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}

/// What `run` prepared for the epoch loop.
struct TrainState<'a> {
    partial: &'a Path,
    state_path: &'a Path,
    run_hash: &'a str,
    model: BertClassifier,
    data: &'a TokenizedCorpus,
    dev_data: Option<&'a TokenizedCorpus>,
    tok: &'a BtuTokenizer,
    dev: &'a Device,
    metadata: BTreeMap<String, String>,
    base_sha: &'a str,
    t0: Instant,
}

/// The completed epochs of one training run, kept beside the output (`partial_dir`) so that a
/// killed run resumes after its last complete epoch: each epoch's checkpoint, optimizer state
/// and the records so far; only the latest and the best epoch stay on disk.
struct EpochStore<'a> {
    dir: &'a Path,
    metadata: &'a BTreeMap<String, String>,
    records: Vec<EpochRecord>,
}

/// Where an interrupted run left off.
struct Resumed {
    model: BertClassifier,
    optimizer: (i32, Vec<(candle_core::Tensor, candle_core::Tensor)>),
    next_epoch: usize,
}

impl<'a> EpochStore<'a> {
    /// The store in `dir` for the run `run_hash`: a state from another run (or an older btu) is
    /// cleared (the held lock stays), as are the leftovers of an epoch being written when a run
    /// was killed.
    fn open(
        dir: &'a Path,
        state_path: &Path,
        run_hash: &str,
        metadata: &'a BTreeMap<String, String>,
    ) -> Result<Self> {
        let same_run = std::fs::read_to_string(state_path)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .is_some_and(|v| v["run_hash"] == run_hash);
        let entries = || -> Result<Vec<std::fs::DirEntry>> {
            Ok(std::fs::read_dir(dir)
                .map_err(|e| BtuError::io(dir, e))?
                .flatten()
                .collect())
        };
        if !same_run {
            for e in entries()?.into_iter().filter(|e| e.file_name() != "lock") {
                let _ =
                    std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
            std::fs::write(state_path, canonical_json(&json!({"run_hash": run_hash})))
                .map_err(|e| BtuError::io(state_path, e))?;
        }
        for e in entries()? {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(EpochStore {
            dir,
            metadata,
            records: Vec::new(),
        })
    }

    /// The last complete epoch of this run, if any (its model with `labels` classes, optimizer
    /// state and records).
    fn resume(&mut self, labels: usize, seed: u64, dev: &Device) -> Result<Option<Resumed>> {
        let Some((n, dir)) = latest_epoch(self.dir) else {
            return Ok(None);
        };
        let model = load_model(&ModelDir::open(&dir)?, Some(labels), seed, dev)?;
        let optimizer = load_optimizer(&dir.join("optimizer.safetensors"), dev)?;
        let text =
            std::fs::read_to_string(dir.join("epoch.json")).map_err(|e| BtuError::io(&dir, e))?;
        self.records = serde_json::from_str(&text)
            .map_err(|e| BtuError::bad_data(dir.display().to_string(), e.to_string()))?;
        tracing::warn!(
            epoch = n + 1,
            "resuming an interrupted run after its last complete epoch"
        );
        Ok(Some(Resumed {
            model,
            optimizer,
            next_epoch: n + 1,
        }))
    }

    fn epoch_dir(&self, epoch: usize) -> PathBuf {
        self.dir.join(format!("epoch-{epoch}"))
    }

    /// Record a finished epoch and write its checkpoint (atomically); drop epochs that are
    /// neither the latest nor the best.
    fn save(&mut self, record: EpochRecord, model: &BertClassifier, opt: &AdamW) -> Result<()> {
        let epoch = record.epoch;
        self.records.push(record);
        let out = crate::io::output::OutputDir::create(&self.epoch_dir(epoch), false)?;
        let mut meta = self.metadata.clone();
        meta.insert("btu:epoch".into(), (epoch + 1).to_string());
        save_model(model, &out.path(""), meta)?;
        out.write(
            "optimizer.safetensors",
            &safetensors_bytes(&optimizer_file(opt)?),
        )?;
        let records = serde_json::to_vec(&self.records).map_err(BtuError::internal)?;
        out.write("epoch.json", &records)?;
        out.commit()?;
        let keep = [epoch, self.best()];
        for r in self.records.iter().filter(|r| !keep.contains(&r.epoch)) {
            let _ = std::fs::remove_dir_all(self.epoch_dir(r.epoch));
        }
        Ok(())
    }

    /// The epoch to keep: the best by dev accuracy when every epoch has one, else the last.
    fn best(&self) -> usize {
        let records = &self.records;
        let mut best = records.len() - 1;
        if records.iter().all(|r| r.dev_acc.is_some()) {
            best = 0;
            for (i, r) in records.iter().enumerate() {
                if r.dev_acc > records[best].dev_acc {
                    best = i;
                }
            }
        }
        records[best].epoch
    }
}

/// The epochs (resumed where an identical run stopped), then the chosen epoch as the output.
fn train_in(job: &TrainJob, progress: &dyn Progress, st: TrainState) -> Result<TrainReport> {
    let TrainState {
        partial,
        state_path,
        run_hash,
        mut model,
        data,
        dev_data,
        tok,
        dev,
        metadata,
        base_sha,
        t0,
    } = st;
    let p = &job.params;
    let dev = dev.clone();
    let mut store = EpochStore::open(partial, state_path, run_hash, &metadata)?;
    let (mut first_epoch, mut opt_state) = (0, None);
    if let Some(r) = store.resume(model.config.labels(), job.run.seed, &dev)? {
        (model, opt_state, first_epoch) = (r.model, Some(r.optimizer), r.next_epoch);
    }
    let resumed_from = first_epoch;
    fit(
        &mut model,
        data,
        tok.pad_id,
        p,
        job.run.seed,
        first_epoch,
        opt_state,
        &dev,
        progress,
        &mut |epoch, m, opt, stats| {
            let dev_acc = match &dev_data {
                Some(d) => Some(accuracy(m, d, tok.pad_id, &dev)?),
                None => None,
            };
            let stats = serde_json::to_value(&stats).map_err(BtuError::internal)?;
            store.save(
                EpochRecord {
                    epoch,
                    stats,
                    dev_acc,
                },
                m,
                opt,
            )
        },
    )?;
    let best = store.best();
    let records = store.records;
    let chosen = partial.join(format!("epoch-{best}"));
    let out = crate::io::output::OutputDir::create(&job.run.out, job.run.overwrite)?;
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(chosen.join(f), out.path(f)).map_err(|e| BtuError::io(chosen.join(f), e))?;
    }
    copy_tokenizer_files(&job.model, &out.path(""))?;
    let summary = TrainReport {
        command: "train".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        model: job.model.clone(),
        base_model_sha256: base_sha.to_string(),
        device: crate::device::device_name(&dev),
        params: p.clone(),
        seed: job.run.seed,
        rows: data.seqs.len(),
        dev_rows: dev_data.as_ref().map(|d| d.seqs.len()),
        epochs: records,
        selected_epoch: best + 1,
        resumed_from_epoch: (resumed_from > 0).then_some(resumed_from + 1),
        corpus: data.fingerprint.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    out.write_json("train_summary.json", &summary)?;
    out.commit()?;
    let _ = std::fs::remove_dir_all(partial);
    Ok(summary)
}
