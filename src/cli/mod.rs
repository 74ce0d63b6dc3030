//! The command line: clap definitions (shared with tests that parse the workflow files) and the
//! dispatch from parsed flags to the library's steps. Every flag can also come from `BTU_<FLAG>`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

mod jobs;

use crate::defaults;
use crate::error::Result;
use crate::io::corpus::CorpusSpec;
use crate::progress::Progress;
use crate::steps::summary;

/// Backdoor Token Unlearning: find backdoor triggers in text corpora and remove them from models.
#[derive(Debug, Parser)]
#[command(name = "btu", version, about, propagate_version = true)]
pub struct Cli {
    /// Flags every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The step to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Args, serde::Serialize)]
pub struct GlobalArgs {
    /// Also write the summary JSON to this file (default /airflow/xcom/return.json when /airflow/xcom exists).
    #[arg(long, global = true, env = "BTU_SUMMARY")]
    pub summary: Option<PathBuf>,
    /// Log filter for stderr (tracing EnvFilter syntax: error, warn, info, debug, btu=debug...).
    #[arg(long, global = true, env = "BTU_LOG", default_value = "warn")]
    pub log: String,
    /// No progress bars on stderr.
    #[arg(long, global = true, env = "BTU_QUIET")]
    pub quiet: bool,
    /// Print the plan (inputs, outputs, parameters) as JSON and touch nothing.
    #[arg(long, global = true, env = "BTU_DRY_RUN")]
    pub dry_run: bool,
}

/// The steps.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A random-init BERT classifier in HF layout with a WordPiece vocabulary trained on a corpus.
    InitModel(InitModelArgs),
    /// Poison a corpus (Add-Word, Add-Sent, rewrite) for evaluating the defence.
    Poison(PoisonArgs),
    /// Stage 1: three detection rounds; writes token_scores.arrow, suspicious_tokens.arrow, summary.json.
    Detect(DetectArgs),
    /// Full fine-tune of a classifier (the victim M^b, or any classifier); resumable per epoch.
    Train(TrainArgs),
    /// Stage 2: overwrite the suspicious tokens' moved dimensions; optional clean fine-tune.
    Unlearn(UnlearnArgs),
    /// Replay a dimension_masks table onto another checkpoint.
    ApplyMasks(ApplyMasksArgs),
    /// Export a classifier checkpoint to ONNX (opset 17), tokenizer.json beside it.
    ExportOnnx(ExportArgs),
    /// ACC and ASR of a checkpoint on a test split; writes metrics.json and predictions.parquet.
    Eval(EvalArgs),
    /// The whole pipeline in a run directory, resumable: [poison] -> detect -> train -> unlearn -> export -> eval.
    Defend(DefendArgs),
    /// The embedded default: synthetic poisoned corpus, small model, detection (no files needed).
    Demo(DemoArgs),
    /// Flag the rows of a corpus that carry suspicious tokens; writes flagged_rows Parquet.
    Scan(ScanArgs),
    /// Insert each candidate into clean rows: does the suspect model flip? Writes token_effects.arrow.
    Verify(VerifyArgs),
    /// Test the training labels against clean references; write the rows they contradict relabelled.
    Relabel(RelabelArgs),
    /// Read-only SQL over result tables and corpora (results on stdout or --output).
    Sql(SqlArgs),
    /// Write the JSON schemas of every table (the files committed in schemas/).
    Schemas(SchemasArgs),
    /// One self-contained HTML page about a run, with figures, for a person to read.
    Report(ReportArgs),
}

/// How a corpus is read (shared by every command that reads one).
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct CorpusArgs {
    /// Text column.
    #[arg(long, env = "BTU_TEXT_COL", default_value = defaults::TEXT_COL)]
    pub text_col: String,
    /// Label column.
    #[arg(long, env = "BTU_LABEL_COL", default_value = defaults::LABEL_COL)]
    pub label_col: String,
    /// SQL predicate over the corpus columns; rows where it is not true are skipped.
    #[arg(long, env = "BTU_FILTER")]
    pub filter: Option<String>,
    /// Read at most this many rows (after --filter and --sample).
    #[arg(long, env = "BTU_LIMIT")]
    pub limit: Option<u64>,
    /// Keep each row with this probability (seeded by --seed).
    #[arg(long, env = "BTU_SAMPLE")]
    pub sample: Option<f64>,
}

impl CorpusArgs {
    /// The corpus spec for `inputs`.
    pub fn spec(&self, inputs: Vec<String>, seed: u64, labels: bool) -> CorpusSpec {
        CorpusSpec {
            inputs,
            text_col: self.text_col.clone(),
            label_col: labels.then(|| self.label_col.clone()),
            filter: self.filter.clone(),
            limit: self.limit,
            sample: self.sample,
            seed,
            label_optional: false,
            shard: None,
            exclude_texts: Default::default(),
        }
    }
}

/// How a step that trains batches them, and where (unlearn's clean fine-tune, relabel's
/// references).
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct BatchArgs {
    /// Rows per training batch (at least 1).
    #[arg(long, env = "BTU_BATCH_SIZE", default_value_t = defaults::BATCH_SIZE)]
    pub batch_size: usize,
    /// Tokens per sequence including [CLS]/[SEP]; at most the model's max_position_embeddings.
    #[arg(long, env = "BTU_MAX_LEN", default_value_t = defaults::MAX_LEN)]
    pub max_len: usize,
    /// Device: auto (cuda:0 when the build has CUDA and a GPU is visible, else cpu), cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = defaults::DEVICE)]
    pub device: String,
}

/// Flags every command that makes random choices and writes takes.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct RunArgs {
    /// Seed of every random choice the command makes (--sample, batch order, new weights, poisoned
    /// rows and trigger positions), so reruns repeat.
    #[arg(long, env = "BTU_SEED", default_value_t = defaults::SEED)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
}

impl RunArgs {
    /// The library's options for a step writing to `out` on `device`.
    pub fn opts(&self, out: &std::path::Path, device: &str) -> crate::steps::RunOpts {
        crate::steps::RunOpts {
            out: out.to_path_buf(),
            overwrite: self.overwrite,
            seed: self.seed,
            device: device.to_string(),
        }
    }
}

/// Flags of `btu init-model`.
#[derive(Debug, Args, serde::Serialize)]
pub struct InitModelArgs {
    /// Output model directory.
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// Corpus to train the WordPiece vocabulary on (Parquet file, directory or glob).
    #[arg(long, env = "BTU_CORPUS", num_args = 1..)]
    pub corpus: Vec<String>,
    /// Use this tokenizer.json (or vocab.txt / model directory) instead of training one.
    #[arg(long, env = "BTU_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// The model's sizes.
    #[command(flatten)]
    #[serde(flatten)]
    pub size: crate::steps::init_model::ModelSize,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --corpus is read.
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// Flags of `btu poison`.
#[derive(Debug, Args, serde::Serialize)]
pub struct PoisonArgs {
    /// Input corpus (Parquet file, directory or glob).
    #[arg(long, env = "BTU_INPUT", num_args = 1.., required = true)]
    pub input: Vec<String>,
    /// Output Parquet file.
    #[arg(long, env = "BTU_OUTPUT")]
    pub output: PathBuf,
    /// The attack.
    #[command(flatten)]
    #[serde(flatten)]
    pub params: crate::steps::poison::PoisonParams,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --input is read.
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// Flags of `btu detect`.
#[derive(Debug, Args, serde::Serialize)]
pub struct DetectArgs {
    /// Corpus (Parquet files, directories or globs).
    #[arg(long, env = "BTU_CORPUS", num_args = 1.., required = true)]
    pub corpus: Vec<String>,
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, env = "BTU_MODEL")]
    pub model: PathBuf,
    /// Output directory.
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// Detection parameters.
    #[command(flatten)]
    #[serde(flatten)]
    pub params: crate::steps::detect::DetectParams,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = defaults::DEVICE)]
    pub device: String,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --corpus is read.
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// Flags of `btu train`.
#[derive(Debug, Args, serde::Serialize)]
pub struct TrainArgs {
    /// Training corpus.
    #[arg(long, env = "BTU_CORPUS", num_args = 1.., required = true)]
    pub corpus: Vec<String>,
    /// Dev corpus for choosing the best epoch (by accuracy).
    #[arg(long, env = "BTU_DEV", num_args = 1..)]
    pub dev: Vec<String>,
    /// Model directory to start from.
    #[arg(long, env = "BTU_MODEL")]
    pub model: PathBuf,
    /// Output checkpoint directory.
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// Hyper-parameters.
    #[command(flatten)]
    #[serde(flatten)]
    pub params: crate::steps::train::TrainParams,
    /// Device: auto (cuda:0 when the build has CUDA and a GPU is visible, else cpu), cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = defaults::DEVICE)]
    pub device: String,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --corpus and --dev are read (--limit and --sample apply to --corpus only).
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// Flags of `btu unlearn`.
#[derive(Debug, Args, serde::Serialize)]
pub struct UnlearnArgs {
    /// The trained (possibly backdoored) checkpoint M^b.
    #[arg(long, env = "BTU_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// The reference model it was trained from (whose embeddings detection used).
    #[arg(long, env = "BTU_REFERENCE")]
    pub reference: PathBuf,
    /// suspicious_tokens.arrow from btu detect.
    #[arg(long, env = "BTU_SUSPICIOUS")]
    pub suspicious: PathBuf,
    /// token_effects.arrow from btu verify: repair only the verified triggers.
    #[arg(long, env = "BTU_EFFECTS")]
    pub effects: Option<PathBuf>,
    /// Output checkpoint directory (with dimension_masks.arrow).
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// The repair's parameters.
    #[command(flatten)]
    #[serde(flatten)]
    pub params: crate::steps::unlearn::UnlearnParams,
    /// Clean data for the brief fine-tune after the cut (disjoint from evaluation).
    #[arg(long, env = "BTU_CLEAN_CORPUS", num_args = 1..)]
    pub clean_corpus: Vec<String>,
    /// Evaluation split(s) the clean corpus must not overlap (checked by row text hash).
    #[arg(long, env = "BTU_EVAL_SPLIT", num_args = 1..)]
    pub eval_split: Vec<String>,
    /// The escalation's rechecks find a trigger still there when the 95 % Wilson lower bound of
    /// its flip rate reaches this, in (0, 1] (btu verify's --min-flip-rate).
    #[arg(long, env = "BTU_MIN_FLIP_RATE", default_value_t = crate::defaults::MIN_FLIP_RATE)]
    pub min_flip_rate: f64,
    /// Batches of the clean fine-tune (--batch-size, --max-len, --device).
    #[command(flatten)]
    #[serde(flatten)]
    pub batches: BatchArgs,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --clean-corpus is read (--text-col applies to --eval-split too).
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// Flags of `btu apply-masks`.
#[derive(Debug, Args, serde::Serialize)]
pub struct ApplyMasksArgs {
    /// Checkpoint directory to repair (same vocabulary and hidden size as the masks).
    #[arg(long, env = "BTU_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// dimension_masks.arrow from btu unlearn.
    #[arg(long, env = "BTU_MASKS")]
    pub masks: PathBuf,
    /// Output checkpoint directory.
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
}

/// Flags of `btu eval`.
#[derive(Debug, Args, serde::Serialize)]
pub struct EvalArgs {
    /// Checkpoint directory.
    #[arg(long, env = "BTU_MODEL")]
    pub model: PathBuf,
    /// Test split.
    #[arg(long, env = "BTU_TEST", num_args = 1.., required = true)]
    pub test: Vec<String>,
    /// Output directory (metrics.json, predictions.parquet).
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// The attack measured.
    #[command(flatten)]
    #[serde(flatten)]
    pub params: crate::steps::eval::EvalParams,
    /// How the model is opened and fed (--max-len, --backend, --ort-lib, --device).
    #[command(flatten)]
    #[serde(flatten)]
    pub classifier: ClassifierArgs,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --test is read.
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// Flags of `btu export-onnx`.
#[derive(Debug, Args, serde::Serialize)]
pub struct ExportArgs {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, env = "BTU_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// Output .onnx file (tokenizer.json is written beside it).
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
}

/// Flags of `btu defend`.
#[derive(Debug, Args, serde::Serialize)]
pub struct DefendArgs {
    /// TOML configuration (see pipelines/*.toml); flags override its settings.
    #[arg(long, env = "BTU_CONFIG")]
    pub config: Option<PathBuf>,
    /// Run directory.
    #[arg(long, env = "BTU_RUN")]
    pub run: Option<PathBuf>,
    /// Training corpus (data.train).
    #[arg(long, env = "BTU_TRAIN", num_args = 1..)]
    pub train: Vec<String>,
    /// Dev split (data.dev).
    #[arg(long, env = "BTU_DEV", num_args = 1..)]
    pub dev: Vec<String>,
    /// Test split (data.test).
    #[arg(long, env = "BTU_TEST", num_args = 1..)]
    pub test: Vec<String>,
    /// Split the attack is applied to for ASR (data.asr_test).
    #[arg(long, env = "BTU_ASR_TEST", num_args = 1..)]
    pub asr_test: Vec<String>,
    /// Clean tuning data (data.clean).
    #[arg(long, env = "BTU_CLEAN", num_args = 1..)]
    pub clean: Vec<String>,
    /// Model directory (model.path).
    #[arg(long, env = "BTU_MODEL")]
    pub model: Option<PathBuf>,
    /// Repair this fine-tuned classifier instead of training a victim (model.suspect; --model
    /// is then the base model it was fine-tuned from).
    #[arg(long, env = "BTU_SUSPECT")]
    pub suspect: Option<PathBuf>,
    /// Poison the training corpus first with this attack ([poison]).
    #[arg(long, env = "BTU_ATTACK", value_enum)]
    pub attack: Option<crate::steps::poison::Attack>,
    /// Trigger word(s) of the attack (poison.trigger; needs [poison] or --attack).
    #[arg(long, env = "BTU_TRIGGER")]
    pub trigger: Vec<String>,
    /// Column holding the rewritten text, for rewrite (poison.rewrite_col).
    #[arg(long, env = "BTU_REWRITE_COL")]
    pub rewrite_col: Option<String>,
    /// Poison rate, a fraction in (0, 1] (poison.rate).
    #[arg(long, env = "BTU_RATE")]
    pub rate: Option<f64>,
    /// Target label of the attack (poison.target).
    #[arg(long, env = "BTU_TARGET")]
    pub target: Option<i64>,
    /// Detection preset: paper or reference-code (detect.preset).
    #[arg(long, env = "BTU_PRESET", value_enum)]
    pub preset: Option<crate::steps::detect::Preset>,
    /// Tokens flagged per detection round, as a percentage of the vocabulary (detect.alpha).
    #[arg(long, env = "BTU_ALPHA")]
    pub alpha: Option<f64>,
    /// Victim training epochs (train.epochs).
    #[arg(long, env = "BTU_EPOCHS")]
    pub epochs: Option<usize>,
    /// Victim learning rate (train.lr).
    #[arg(long, env = "BTU_LR")]
    pub lr: Option<f64>,
    /// Unlearning threshold: mean-row or frobenius (unlearn.threshold).
    #[arg(long, env = "BTU_THRESHOLD", value_enum)]
    pub threshold: Option<crate::steps::unlearn::Threshold>,
    /// Replacement values: trained-pad or reference-pad (unlearn.replacement).
    #[arg(long, env = "BTU_REPLACEMENT", value_enum)]
    pub replacement: Option<crate::steps::unlearn::Replacement>,
    /// Clean fine-tune epochs after unlearning (unlearn.clean_epochs).
    #[arg(long, env = "BTU_CLEAN_EPOCHS")]
    pub clean_epochs: Option<usize>,
    /// Clean fine-tune learning rate (unlearn.clean_lr).
    #[arg(long, env = "BTU_CLEAN_LR")]
    pub clean_lr: Option<f64>,
    /// How the models are evaluated: auto, ort or candle (eval.backend).
    #[arg(long, env = "BTU_BACKEND", value_enum)]
    pub backend: Option<crate::steps::defend::EvalBackend>,
    /// Device of every step: auto, cpu or cuda:N (top-level key device).
    #[arg(long, env = "BTU_DEVICE")]
    pub device: Option<String>,
    /// Seed of every step so reruns repeat (top-level key seed).
    #[arg(long, env = "BTU_SEED")]
    pub seed: Option<u64>,
    /// Drop clean rows that also occur in the test / ASR splits (by text) instead of refusing
    /// the run (data.drop_overlap); the summary reports how many.
    #[arg(long, env = "BTU_DROP_OVERLAP")]
    pub drop_overlap: bool,
}

impl DefendArgs {
    /// The configuration: the file (if any) with the flags applied on top.
    pub fn config(&self) -> crate::Result<crate::steps::defend::DefendConfig> {
        let mut c = match &self.config {
            Some(p) => crate::steps::defend::DefendConfig::from_file(p)?,
            None => crate::steps::defend::DefendConfig::default(),
        };
        if let Some(r) = &self.run {
            c.run = Some(r.clone());
        }
        for (dst, src) in [
            (&mut c.data.train, &self.train),
            (&mut c.data.dev, &self.dev),
            (&mut c.data.test, &self.test),
            (&mut c.data.asr_test, &self.asr_test),
            (&mut c.data.clean, &self.clean),
        ] {
            if !src.is_empty() {
                *dst = src.clone();
            }
        }
        if let Some(m) = &self.model {
            c.model.path = Some(m.clone());
            c.model.init = None;
        }
        if let Some(s) = &self.suspect {
            c.model.suspect = Some(s.clone());
        }
        if let Some(a) = self.attack {
            c.poison
                .get_or_insert_with(|| crate::steps::poison::PoisonParams::new(a))
                .attack = a;
        }
        if c.poison.is_none() {
            // These flags change the poisoning only: with none to change they would do nothing.
            let given = [
                ("--trigger", !self.trigger.is_empty()),
                ("--rewrite-col", self.rewrite_col.is_some()),
                ("--rate", self.rate.is_some()),
                ("--target", self.target.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                return Err(crate::BtuError::config(
                    *flag,
                    "changes the poisoning, but the run poisons nothing; give --attack or a [poison] table",
                ));
            }
        }
        if let Some(p) = c.poison.as_mut() {
            if !self.trigger.is_empty() {
                p.triggers = self.trigger.clone();
            }
            if self.rewrite_col.is_some() {
                p.rewrite_col = self.rewrite_col.clone();
            }
            if let Some(r) = self.rate {
                p.rate = r;
            }
            if let Some(t) = self.target {
                p.target = t;
            }
        }
        if let Some(v) = self.preset {
            c.detect.preset = v;
        }
        if let Some(v) = self.alpha {
            c.detect.alpha = v;
        }
        if let Some(v) = self.epochs {
            c.train.epochs = v;
        }
        if let Some(v) = self.lr {
            c.train.lr = v;
        }
        if let Some(v) = self.threshold {
            c.unlearn.threshold = v;
        }
        if let Some(v) = self.replacement {
            c.unlearn.replacement = v;
        }
        if let Some(v) = self.clean_epochs {
            c.unlearn.clean_epochs = v;
        }
        if let Some(v) = self.clean_lr {
            c.unlearn.clean_lr = v;
        }
        if let Some(v) = self.backend {
            c.eval.backend = v;
        }
        if let Some(v) = &self.device {
            c.device = v.clone();
        }
        if let Some(v) = self.seed {
            c.seed = v;
        }
        if self.drop_overlap {
            c.data.drop_overlap = true;
        }
        Ok(c)
    }
}

/// Flags of `btu demo`.
#[derive(Debug, Args, serde::Serialize)]
pub struct DemoArgs {
    /// Keep the run directory here (default: a temporary directory, removed afterwards).
    #[arg(long, env = "BTU_OUT")]
    pub out: Option<PathBuf>,
    /// Rows of the synthetic corpus.
    #[arg(long, env = "BTU_ROWS", default_value_t = 2000)]
    pub rows: usize,
    /// How the models are evaluated: ONNX Runtime when installed (auto), ort, or candle.
    #[arg(long, env = "BTU_BACKEND", value_enum, default_value = "auto")]
    pub backend: crate::steps::defend::EvalBackend,
    /// Device: auto (cuda:0 when the build has CUDA and a GPU is visible, else cpu), cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = defaults::DEVICE)]
    pub device: String,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
}

/// Flags of `btu scan`.
#[derive(Debug, Args, serde::Serialize)]
pub struct ScanArgs {
    /// Corpus (Parquet files, directories, globs, s3:// URLs).
    #[arg(long, env = "BTU_CORPUS", num_args = 1.., required = true)]
    pub corpus: Vec<String>,
    /// suspicious_tokens.arrow from btu detect.
    #[arg(long, env = "BTU_SUSPICIOUS", required_unless_present = "plan")]
    pub suspicious: Option<PathBuf>,
    /// token_effects.arrow from btu verify: flag rows by the verified triggers only.
    #[arg(long, env = "BTU_EFFECTS")]
    pub effects: Option<PathBuf>,
    /// Model directory or tokenizer.json of the tokenizer detection used.
    #[arg(long, env = "BTU_TOKENIZER", required_unless_present = "plan")]
    pub tokenizer: Option<PathBuf>,
    /// Output Parquet file (flagged_rows), local or s3://bucket/key.parquet.
    #[arg(long, env = "BTU_OUT", required_unless_present = "plan")]
    pub out: Option<PathBuf>,
    /// Scan only shard I of N (0-based, e.g. 2/8): the corpus's row groups, in reading order,
    /// cut into N contiguous runs of about equal rows; the N shards' flagged rows together are
    /// the whole scan's. Not with --limit or --sample.
    #[arg(long, env = "BTU_SHARD", conflicts_with = "plan")]
    pub shard: Option<crate::io::shard::Shard>,
    /// Print the shard list (a JSON array, one item per shard: its `shard` for --shard, rows,
    /// files and row groups) for a workflow engine's fan-out, and scan nothing.
    #[arg(long)]
    pub plan: bool,
    /// How many shards --plan cuts the corpus into (default: one per million rows, at most one
    /// per row group).
    #[arg(long, env = "BTU_SHARDS", requires = "plan")]
    pub shards: Option<usize>,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --corpus is read.
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// How a classifier is opened and fed (eval, verify).
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct ClassifierArgs {
    /// Tokens per sequence including [CLS]/[SEP]; at most the model's max_position_embeddings.
    #[arg(long, env = "BTU_MAX_LEN", default_value_t = defaults::MAX_LEN)]
    pub max_len: usize,
    /// ort for .onnx files (default), candle for checkpoint directories.
    #[arg(long, env = "BTU_BACKEND", value_enum)]
    pub backend: Option<crate::steps::eval::Backend>,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, then the .venv that `make setup` makes).
    #[arg(long, env = "BTU_ORT_LIB")]
    pub ort_lib: Option<PathBuf>,
    /// Device of the candle backend: auto, cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = defaults::DEVICE)]
    pub device: String,
}

/// Flags of `btu verify`.
#[derive(Debug, Args, serde::Serialize)]
pub struct VerifyArgs {
    /// The suspect model: a checkpoint directory (candle) or an exported .onnx (ONNX Runtime).
    #[arg(long, env = "BTU_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// suspicious_tokens.arrow from btu detect (the candidates).
    #[arg(long, env = "BTU_SUSPICIOUS", required_unless_present = "recheck")]
    pub suspicious: Option<PathBuf>,
    /// Instead: token_effects.arrow of an earlier verification; are its verified triggers still
    /// triggers on this (repaired) model?
    #[arg(long, env = "BTU_RECHECK", conflicts_with = "suspicious")]
    pub recheck: Option<PathBuf>,
    /// Held-out clean rows with labels (disjoint from the training and evaluation data).
    #[arg(long, env = "BTU_CLEAN_CORPUS", num_args = 1.., required = true)]
    pub clean_corpus: Vec<String>,
    /// The corpus detection ran on: phrases recurring around the candidates are verified too.
    #[arg(long, env = "BTU_CORPUS", num_args = 1..)]
    pub corpus: Vec<String>,
    /// Output directory (token_effects.arrow, summary.json).
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// The verification test.
    #[command(flatten)]
    #[serde(flatten)]
    pub params: crate::steps::verify::VerifyParams,
    /// How the model is opened and fed (--max-len, --backend, --ort-lib, --device).
    #[command(flatten)]
    #[serde(flatten)]
    pub classifier: ClassifierArgs,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --clean-corpus and --corpus are read.
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// Flags of `btu relabel`.
#[derive(Debug, Args, serde::Serialize)]
pub struct RelabelArgs {
    /// The labelled rows the suspect model trained on.
    #[arg(long, env = "BTU_CORPUS", num_args = 1.., required = true)]
    pub corpus: Vec<String>,
    /// Held-out clean rows with labels (disjoint from the corpus and the evaluation data).
    #[arg(long, env = "BTU_CLEAN_CORPUS", num_args = 1.., required = true)]
    pub clean_corpus: Vec<String>,
    /// SQL predicate over the clean corpus's columns (--filter applies to --corpus only).
    #[arg(long, env = "BTU_CLEAN_FILTER")]
    pub clean_filter: Option<String>,
    /// The pre-trained model the references are fine-tuned from (the suspect's starting point).
    #[arg(long, env = "BTU_MODEL")]
    pub model: PathBuf,
    /// The model trained on --corpus (fine-tuned from --model): each row's neighbours are read
    /// in it. Needed unless --neighbours is 0.
    #[arg(long, env = "BTU_SUSPECT")]
    pub suspect: Option<PathBuf>,
    /// Output directory (summary.json; relabelled.parquet when a class fails the test and rows
    /// of it are doubted enough to relabel).
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// The test.
    #[command(flatten)]
    #[serde(flatten)]
    pub params: crate::steps::relabel::RelabelParams,
    /// Batches of the references' training (--batch-size, --max-len, --device).
    #[command(flatten)]
    #[serde(flatten)]
    pub batches: BatchArgs,
    /// --seed and --overwrite.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    /// How --corpus and --clean-corpus are read.
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// Flags of `btu sql`.
#[derive(Debug, Args, serde::Serialize)]
pub struct SqlArgs {
    /// The query (omit it to read queries separated by ';' from standard input; the last may
    /// lack its ';'; when one fails the others still run and btu exits with the first failure).
    pub query: Option<String>,
    /// Register a table: NAME=PATH (Arrow IPC file, or Parquet file/directory/glob/s3:// URL).
    #[arg(long = "table", env = "BTU_TABLE")]
    pub tables: Vec<String>,
    /// Register the tables of a run or output directory under their own names.
    #[arg(long, env = "BTU_RUN")]
    pub run: Option<PathBuf>,
    /// Result format: table, csv or json on stdout; parquet or arrow need --output.
    #[arg(long, env = "BTU_FORMAT", value_enum, default_value = "table")]
    pub format: crate::steps::sql::Format,
    /// Write the result here instead of stdout (needed for parquet and arrow).
    #[arg(long, env = "BTU_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Replace an existing --output file.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
    /// Stop a query that runs longer than this many seconds (planning, execution and writing its
    /// result; each query from standard input has its own), with exit 78. Default: no limit.
    #[arg(long, env = "BTU_TIMEOUT", value_name = "SECONDS")]
    pub timeout: Option<String>,
    /// Memory a query may use: bytes, or with a K, M or G suffix (512M, 2G). A query needing more
    /// fails with exit 78 (nothing spills to disk); --format table holds the whole result within
    /// it too (csv and json stream).
    #[arg(long, env = "BTU_MEMORY_LIMIT", value_name = "SIZE", default_value = crate::steps::sql::DEFAULT_MEMORY_LIMIT)]
    pub memory_limit: String,
}

/// Flags of `btu report`.
#[derive(Debug, Args, serde::Serialize)]
pub struct ReportArgs {
    /// The run directory: `btu defend`'s, or a `btu detect` output directory.
    #[arg(long, env = "BTU_RUN")]
    pub run: PathBuf,
    /// The HTML file to write (must end in .html).
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// flagged_rows Parquet files from `btu scan` to include (flagged rows per token and label).
    #[arg(long, env = "BTU_SCAN", num_args = 1..)]
    pub scan: Vec<PathBuf>,
    /// Tokenizer (model directory or tokenizer.json) for document frequencies when the run
    /// directory has no model in it.
    #[arg(long, env = "BTU_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
}

/// Flags of `btu schemas`.
#[derive(Debug, Args, serde::Serialize)]
pub struct SchemasArgs {
    /// Directory to write <table>.schema.json files into.
    #[arg(long, env = "BTU_OUT", default_value = "schemas")]
    pub out: PathBuf,
}

impl Command {
    /// The subcommand's name as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::InitModel(_) => "init-model",
            Command::Poison(_) => "poison",
            Command::Detect(_) => "detect",
            Command::Train(_) => "train",
            Command::Unlearn(_) => "unlearn",
            Command::ApplyMasks(_) => "apply-masks",
            Command::ExportOnnx(_) => "export-onnx",
            Command::Eval(_) => "eval",
            Command::Defend(_) => "defend",
            Command::Demo(_) => "demo",
            Command::Scan(_) => "scan",
            Command::Verify(_) => "verify",
            Command::Relabel(_) => "relabel",
            Command::Sql(_) => "sql",
            Command::Schemas(_) => "schemas",
            Command::Report(_) => "report",
        }
    }

    /// Only scan, detect, verify and sql write to object stores (`s3://` outputs); the other
    /// commands write local files, which their later steps read back.
    fn check_remote_outputs(&self) -> Result<()> {
        let outputs: Vec<PathBuf> = match self {
            Command::InitModel(a) => vec![a.out.clone()],
            Command::Poison(a) => vec![a.output.clone()],
            Command::Train(a) => vec![a.out.clone()],
            Command::Unlearn(a) => vec![a.out.clone()],
            Command::ApplyMasks(a) => vec![a.out.clone()],
            Command::ExportOnnx(a) => vec![a.out.clone()],
            Command::Eval(a) => vec![a.out.clone()],
            Command::Defend(a) => a.config()?.run.into_iter().collect(),
            Command::Demo(a) => a.out.clone().into_iter().collect(),
            Command::Schemas(a) => vec![a.out.clone()],
            Command::Report(a) => vec![a.out.clone()],
            Command::Relabel(a) => vec![a.out.clone()],
            Command::Scan(_) | Command::Detect(_) | Command::Verify(_) | Command::Sql(_) => vec![],
        };
        match outputs.into_iter().find(|p| crate::io::output::remote(p).is_some()) {
            Some(p) => Err(crate::BtuError::config(
                if matches!(self, Command::Poison(_)) { "--output" } else { "--out" },
                format!(
                    "{}: {} writes local files only (s3:// outputs are for scan, detect, verify and sql); write locally, then copy",
                    p.display(),
                    self.name()
                ),
            )),
            None => Ok(()),
        }
    }

    /// What the command would read and write, and with which parameters (`--dry-run`).
    pub fn plan(&self) -> Result<Value> {
        use serde_json::json;
        let p = |v: &PathBuf| v.display().to_string();
        let (inputs, outputs, params): (Vec<String>, Vec<String>, Value) = match self {
            Command::InitModel(a) => {
                let mut i = a.corpus.clone();
                i.extend(a.tokenizer.iter().map(p));
                (i, vec![p(&a.out)], json!(a))
            }
            Command::Poison(a) => (a.input.clone(), vec![p(&a.output)], json!(a)),
            Command::Detect(a) => {
                let mut i = a.corpus.clone();
                i.push(p(&a.model));
                let o = [
                    "token_scores.arrow",
                    "suspicious_tokens.arrow",
                    "summary.json",
                ]
                .iter()
                .map(|f| p(&a.out.join(f)))
                .collect();
                (i, o, json!(a))
            }
            Command::Train(a) => {
                let mut i = a.corpus.clone();
                i.extend(a.dev.iter().cloned());
                i.push(p(&a.model));
                (i, vec![p(&a.out)], json!(a))
            }
            Command::Unlearn(a) => {
                let mut i = vec![p(&a.checkpoint), p(&a.reference), p(&a.suspicious)];
                i.extend(a.effects.iter().map(p));
                i.extend(a.clean_corpus.iter().cloned());
                i.extend(a.eval_split.iter().cloned());
                (
                    i,
                    vec![p(&a.out), p(&a.out.join("dimension_masks.arrow"))],
                    json!(a),
                )
            }
            Command::ApplyMasks(a) => (
                vec![p(&a.checkpoint), p(&a.masks)],
                vec![p(&a.out)],
                json!(a),
            ),
            Command::ExportOnnx(a) => (
                vec![p(&a.checkpoint)],
                vec![p(&a.out), p(&a.out.with_file_name("tokenizer.json"))],
                json!(a),
            ),
            Command::Eval(a) => {
                let mut i = vec![p(&a.model)];
                i.extend(a.test.iter().cloned());
                (
                    i,
                    vec![
                        p(&a.out.join("metrics.json")),
                        p(&a.out.join("predictions.parquet")),
                    ],
                    json!(a),
                )
            }
            Command::Defend(a) => {
                let c = a.config()?;
                c.validate()?;
                let run = c.run.clone().unwrap_or_default();
                let mut i = c.data.train.clone();
                for v in [&c.data.dev, &c.data.test, &c.data.asr_test, &c.data.clean] {
                    i.extend(v.iter().cloned());
                }
                i.extend(c.model.path.iter().chain(&c.model.suspect).map(p));
                let mut o = vec![p(&run), p(&run.join("metrics.json"))];
                if c.report.enabled {
                    o.push(p(&run.join("report.html")));
                }
                (i, o, json!(c))
            }
            Command::Demo(a) => (vec![], a.out.iter().map(p).collect(), json!(a)),
            Command::Verify(a) => {
                let mut i = vec![p(&a.checkpoint)];
                i.extend(a.suspicious.iter().chain(&a.recheck).map(p));
                i.extend(a.clean_corpus.iter().cloned());
                i.extend(a.corpus.iter().cloned());
                let o = ["token_effects.arrow", "summary.json"];
                (i, o.iter().map(|f| p(&a.out.join(f))).collect(), json!(a))
            }
            Command::Relabel(a) => {
                let mut i = a.corpus.clone();
                i.extend(a.clean_corpus.iter().cloned());
                i.push(p(&a.model));
                let o = ["summary.json", "relabelled.parquet"];
                (i, o.iter().map(|f| p(&a.out.join(f))).collect(), json!(a))
            }
            Command::Scan(a) => {
                let mut i = a.corpus.clone();
                i.extend(
                    a.suspicious
                        .iter()
                        .chain(&a.effects)
                        .chain(&a.tokenizer)
                        .map(p),
                );
                (i, a.out.iter().map(p).collect(), json!(a))
            }
            Command::Sql(a) => {
                let mut i: Vec<String> = a
                    .tables
                    .iter()
                    .map(|t| t.split_once('=').map_or(t.clone(), |(_, p)| p.to_string()))
                    .collect();
                i.extend(a.run.iter().map(p));
                (i, a.output.iter().map(p).collect(), json!(a))
            }
            Command::Schemas(a) => (vec![], vec![p(&a.out)], json!(a)),
            Command::Report(a) => {
                let mut i = vec![p(&a.run)];
                i.extend(a.scan.iter().chain(&a.tokenizer).map(p));
                (i, vec![p(&a.out)], json!(a))
            }
        };
        Ok(
            json!({"command": self.name(), "dry_run": true, "version": crate::VERSION, "inputs": inputs, "outputs": outputs, "params": params}),
        )
    }
}

/// Run the parsed command; returns its summary JSON. Query results (`btu sql`) go to `stdout`.
pub fn execute(
    cli: &Cli,
    progress: &dyn Progress,
    stdout: &mut dyn std::io::Write,
) -> Result<Value> {
    cli.command.check_remote_outputs()?;
    if cli.global.dry_run {
        return cli.command.plan();
    }
    match &cli.command {
        Command::InitModel(a) => summary(crate::steps::init_model::run(&a.job())),
        Command::Poison(a) => summary(crate::steps::poison::run(&a.job())),
        Command::Detect(a) => summary(crate::steps::detect::run(&a.job(), progress)),
        Command::Train(a) => summary(crate::steps::train::run(&a.job(), progress)),
        Command::Unlearn(a) => summary(crate::steps::unlearn::run(&a.job(), progress)),
        Command::ApplyMasks(a) => summary(crate::steps::apply_masks::run(&a.job())),
        Command::Eval(a) => summary(crate::steps::eval::run(&a.job())),
        Command::ExportOnnx(a) => summary(crate::steps::export_onnx::run(&a.job())),
        Command::Defend(a) => summary(crate::steps::defend::run(&a.config()?, progress)),
        Command::Demo(a) => summary(crate::demo::run(&a.job(), progress)),
        Command::Verify(a) => summary(crate::steps::verify::run(&a.job())),
        Command::Relabel(a) => summary(crate::steps::relabel::run(&a.job(), progress)),
        Command::Scan(a) if a.plan => summary(crate::steps::scan::plan(&a.job().corpus, a.shards)),
        Command::Scan(a) => summary(crate::steps::scan::run(&a.job(), progress)),
        Command::Sql(a) => summary(crate::steps::sql::run(&a.job()?, stdout)),
        Command::Schemas(a) => summary(crate::steps::schemas::run(&a.out)),
        Command::Report(a) => summary(crate::steps::report::run(&a.job())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(line: &str) -> Command {
        let args = std::iter::once("btu").chain(line.split_whitespace());
        Cli::try_parse_from(args).expect("parses").command
    }

    fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        toml::from_str(text).expect("parses")
    }

    /// A flag's default, a config key's default and the library's `Default` are one value: each
    /// parameter type is parsed with no flags and from an empty TOML table.
    #[test]
    fn flags_config_and_library_share_their_defaults() {
        let Command::Detect(d) = parse("detect --corpus c --model m --out o") else {
            panic!()
        };
        assert_eq!(d.params, crate::steps::detect::DetectParams::default());
        assert_eq!(d.params, from_toml(""));
        let Command::Train(t) = parse("train --corpus c --model m --out o") else {
            panic!()
        };
        assert_eq!(t.params, crate::steps::train::TrainParams::default());
        assert_eq!(t.params, from_toml(""));
        let Command::Unlearn(u) =
            parse("unlearn --checkpoint c --reference r --suspicious s --out o")
        else {
            panic!()
        };
        assert_eq!(u.params, crate::steps::unlearn::UnlearnParams::default());
        assert_eq!(u.params, from_toml(""));
        let Command::Verify(v) =
            parse("verify --checkpoint c --suspicious s --clean-corpus c --out o")
        else {
            panic!()
        };
        assert_eq!(v.params, crate::steps::verify::VerifyParams::default());
        assert_eq!(v.params, from_toml(""));
        let Command::Relabel(r) = parse("relabel --corpus c --clean-corpus c --model m --out o")
        else {
            panic!()
        };
        assert_eq!(r.params, crate::steps::relabel::RelabelParams::default());
        assert_eq!(r.params, from_toml(""));
        let Command::Eval(e) = parse("eval --model m --test t --out o") else {
            panic!()
        };
        assert_eq!(e.params, crate::steps::eval::EvalParams::default());
        assert_eq!(e.params, from_toml(""));
        let Command::InitModel(i) = parse("init-model --out o") else {
            panic!()
        };
        assert_eq!(i.size, crate::steps::init_model::ModelSize::default());
        assert_eq!(i.size, from_toml(""));
        let Command::Poison(p) = parse("poison --input i --output o --attack add-sent") else {
            panic!()
        };
        let attack = crate::steps::poison::Attack::AddSent;
        assert_eq!(p.params, crate::steps::poison::PoisonParams::new(attack));
        assert_eq!(p.params, from_toml("attack = \"add-sent\""));
        assert_eq!(p.run.seed, crate::defaults::SEED);
    }

    /// Every flag of every command says what it does in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let mut missing = Vec::new();
        let mut seen = 0;
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                seen += 1;
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("{} --{id}", sub.get_name()));
                }
            }
        }
        assert!(seen > 100, "only {seen} flags found");
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    /// A defend config's tables are the steps' parameter types: a key set in `[detect]` reaches
    /// detection unchanged, and the flags `btu defend` takes override the file.
    #[test]
    fn defend_tables_are_the_step_parameters() {
        let c: crate::steps::defend::DefendConfig = from_toml(
            "[detect]\nalpha = 0.5\nbatching = \"bucketed\"\n[unlearn]\nrecheck_rows = 7\n[poison]\nattack = \"add-word\"\nrate = 0.2",
        );
        assert_eq!(c.detect.alpha, 0.5);
        assert_eq!(
            c.detect.batching,
            crate::model::tokenizer::Batching::Bucketed
        );
        assert_eq!(c.unlearn.recheck_rows, 7);
        assert_eq!(c.poison.as_ref().unwrap().rate, 0.2);
        assert_eq!(c.poison.as_ref().unwrap().triggers, ["cf"]);
        let Command::Defend(d) = parse("defend --attack add-sent --rate 0.3 --alpha 0.2") else {
            panic!()
        };
        let c = d.config().unwrap();
        let p = c.poison.unwrap();
        assert_eq!(
            (p.attack, p.rate),
            (crate::steps::poison::Attack::AddSent, 0.3)
        );
        assert_eq!(p.sentence, crate::defaults::SENTENCE);
        assert_eq!(c.detect.alpha, 0.2);
    }
}
