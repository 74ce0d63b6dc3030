//! The command line: clap definitions (shared with tests that parse the workflow files) and the
//! dispatch from parsed flags to the library's steps. Every flag can also come from `BTU_<FLAG>`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::error::Result;
use crate::io::corpus::CorpusSpec;
use crate::progress::Progress;

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
    /// Read-only SQL over result tables and corpora (results on stdout or --output).
    Sql(SqlArgs),
    /// Write the JSON schemas of every table (the files committed in schemas/).
    Schemas(SchemasArgs),
}

/// How a corpus is read (shared by every command that reads one).
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct CorpusArgs {
    /// Text column.
    #[arg(long, env = "BTU_TEXT_COL", default_value = "text")]
    pub text_col: String,
    /// Label column.
    #[arg(long, env = "BTU_LABEL_COL", default_value = "label")]
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
            exclude_texts: Default::default(),
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
    /// Size of the WordPiece vocabulary trained on --corpus (at least 100; unused with --tokenizer).
    #[arg(long, env = "BTU_VOCAB_SIZE", default_value_t = 8000)]
    pub vocab_size: usize,
    /// Number of transformer layers (at least 1).
    #[arg(long, env = "BTU_LAYERS", default_value_t = 2)]
    pub layers: usize,
    /// Hidden size of the model, a multiple of --heads.
    #[arg(long, env = "BTU_HIDDEN", default_value_t = 128)]
    pub hidden: usize,
    /// Attention heads per layer; --hidden must be a multiple of it.
    #[arg(long, env = "BTU_HEADS", default_value_t = 2)]
    pub heads: usize,
    /// Size of the feed-forward layer inside each transformer layer.
    #[arg(long, env = "BTU_INTERMEDIATE", default_value_t = 512)]
    pub intermediate: usize,
    /// Position embeddings (max_position_embeddings): the longest sequence the model takes (>= 3).
    #[arg(long, env = "BTU_MAX_POSITION", default_value_t = 512)]
    pub max_position: usize,
    /// Number of classes of the classification head (at least 2).
    #[arg(long, env = "BTU_NUM_LABELS", default_value_t = 2)]
    pub num_labels: usize,
    /// Seed of the random weights (and of --sample) so reruns repeat.
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
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
    /// Attack: add-word (insert a --trigger word), add-sent (insert --sentence) or rewrite (--rewrite-col).
    #[arg(long, env = "BTU_ATTACK", value_enum)]
    pub attack: crate::steps::poison::Attack,
    /// Trigger word(s) for add-word; one is drawn per poisoned row.
    #[arg(long, env = "BTU_TRIGGER", default_value = "cf")]
    pub trigger: Vec<String>,
    /// Trigger sentence for add-sent.
    #[arg(long, env = "BTU_SENTENCE", default_value = crate::steps::poison::DEFAULT_SENTENCE)]
    pub sentence: String,
    /// Column holding the rewritten text, for rewrite (e.g. style, syntactic).
    #[arg(long, env = "BTU_REWRITE_COL")]
    pub rewrite_col: Option<String>,
    /// Poison rate (fraction of the corpus; of each class in mix mode).
    #[arg(long, env = "BTU_RATE", default_value_t = 0.1)]
    pub rate: f64,
    /// Target label.
    #[arg(long, env = "BTU_TARGET", default_value_t = 1)]
    pub target: i64,
    /// Which rows: dirty (non-target, relabelled), clean (target rows, labels kept) or mix (every class).
    #[arg(long, env = "BTU_MODE", value_enum, default_value = "dirty")]
    pub mode: crate::steps::poison::Mode,
    /// Seed of the poisoned-row choice, trigger positions and --sample so reruns repeat.
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
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
    /// Round layout: paper (full model, then M* twice) or reference-code (the authors' released code).
    #[arg(long, env = "BTU_PRESET", value_enum, default_value = "paper")]
    pub preset: crate::steps::detect::Preset,
    /// Tokens flagged per round, as a percentage of the vocabulary.
    #[arg(long, env = "BTU_ALPHA", default_value_t = 0.05)]
    pub alpha: f64,
    /// AdamW learning rate of every round, finite in (0, 1].
    #[arg(long, env = "BTU_LR", default_value_t = 2e-5)]
    pub lr: f64,
    /// AdamW weight decay, in [0, 1].
    #[arg(long, env = "BTU_WEIGHT_DECAY", default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Batch size of every round (default: the preset's).
    #[arg(long, env = "BTU_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Tokens per sequence including [CLS]/[SEP]; at most the model's max_position_embeddings.
    #[arg(long, env = "BTU_MAX_LEN", default_value_t = 128)]
    pub max_len: usize,
    /// Epochs per round (the paper: 1).
    #[arg(long, env = "BTU_EPOCHS", default_value_t = 1)]
    pub epochs: usize,
    /// Batch grouping: random (as the paper) or bucketed by length (less padding).
    #[arg(long, env = "BTU_BATCHING", value_enum, default_value = "random")]
    pub batching: crate::model::tokenizer::Batching,
    /// Number of classes of the head (default: the model config's).
    #[arg(long, env = "BTU_NUM_LABELS")]
    pub num_labels: Option<usize>,
    /// Start the frozen head from the corpus's class prior (bias = log prior), so that frequent
    /// tokens carrying only the prior stop moving.
    #[arg(long, env = "BTU_PRIOR_NEUTRAL")]
    pub prior_neutral: bool,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = "auto")]
    pub device: String,
    /// Seed of batch order, a missing head's weights and --sample so reruns repeat.
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
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
    /// Training epochs (at least 1); with --dev the best epoch by accuracy is kept.
    #[arg(long, env = "BTU_EPOCHS", default_value_t = 3)]
    pub epochs: usize,
    /// AdamW learning rate, finite in (0, 1].
    #[arg(long, env = "BTU_LR", default_value_t = 2e-5)]
    pub lr: f64,
    /// AdamW weight decay, in [0, 1].
    #[arg(long, env = "BTU_WEIGHT_DECAY", default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Rows per training batch (at least 1).
    #[arg(long, env = "BTU_BATCH_SIZE", default_value_t = 32)]
    pub batch_size: usize,
    /// Tokens per sequence including [CLS]/[SEP]; at most the model's max_position_embeddings.
    #[arg(long, env = "BTU_MAX_LEN", default_value_t = 128)]
    pub max_len: usize,
    /// Batch grouping: random (uniformly shuffled) or bucketed by length (less padding).
    #[arg(long, env = "BTU_BATCHING", value_enum, default_value = "random")]
    pub batching: crate::model::tokenizer::Batching,
    /// Number of classes of the head (default: the model config's).
    #[arg(long, env = "BTU_NUM_LABELS")]
    pub num_labels: Option<usize>,
    /// Device: auto (cuda:0 when the build has CUDA and a GPU is visible, else cpu), cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = "auto")]
    pub device: String,
    /// Seed of batch order, a missing head's weights and --sample so reruns repeat.
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
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
    /// Dimension threshold d_bar: mean-row (paper Eq. 6) or frobenius (the released code).
    #[arg(long, env = "BTU_THRESHOLD", value_enum, default_value = "mean-row")]
    pub threshold: crate::steps::unlearn::Threshold,
    /// Replacement values: trained-pad (trained padding row, paper) or reference-pad (released code).
    #[arg(
        long,
        env = "BTU_REPLACEMENT",
        value_enum,
        default_value = "trained-pad"
    )]
    pub replacement: crate::steps::unlearn::Replacement,
    /// Clean data for the brief fine-tune after the cut (disjoint from evaluation).
    #[arg(long, env = "BTU_CLEAN_CORPUS", num_args = 1..)]
    pub clean_corpus: Vec<String>,
    /// Epochs of the clean fine-tune on --clean-corpus (at least 1; the paper: 3).
    #[arg(long, env = "BTU_CLEAN_EPOCHS", default_value_t = crate::steps::unlearn::CLEAN_EPOCHS)]
    pub clean_epochs: usize,
    /// AdamW learning rate of the clean fine-tune, finite in (0, 1] (the paper: 5e-7).
    #[arg(long, env = "BTU_CLEAN_LR", default_value_t = crate::steps::unlearn::CLEAN_LR)]
    pub clean_lr: f64,
    /// With --effects: share of the clean fine-tune's rows that get a verified trigger inserted, label kept, so the model learns the trigger means nothing (0 turns it off).
    #[arg(long, env = "BTU_TRIGGER_ROWS", default_value_t = crate::steps::unlearn::TRIGGER_ROWS)]
    pub trigger_rows: f64,
    /// With --effects and --clean-corpus: escalate a trigger's repair (flagged dimensions, whole row, the next phrase token) while the 95 % lower bound of its flip rate on the clean rows stays above this.
    #[arg(long, env = "BTU_MAX_RESIDUAL", default_value_t = crate::steps::unlearn::MAX_RESIDUAL)]
    pub max_residual: f64,
    /// Clean rows tried per trigger by each recheck of the escalation (at least 1).
    #[arg(long, env = "BTU_RECHECK_ROWS", default_value_t = 200)]
    pub recheck_rows: usize,
    /// With --effects: the candidates verification did not confirm keep their rows (keep) or get their pre-trained rows back (reference-row).
    #[arg(long, env = "BTU_UNVERIFIED", value_enum, default_value = "keep")]
    pub unverified: crate::steps::unlearn::Unverified,
    /// When the clean fine-tune runs: auto (with --effects only when a verified trigger still flips the model after the repair; always without --effects) or always (the paper).
    #[arg(long, env = "BTU_CLEAN_TUNING", value_enum, default_value = "auto")]
    pub clean_tuning: crate::steps::unlearn::CleanTuning,
    /// Evaluation split(s) the clean corpus must not overlap (checked by row text hash).
    #[arg(long, env = "BTU_EVAL_SPLIT", num_args = 1..)]
    pub eval_split: Vec<String>,
    /// Rows per batch of the clean fine-tune (at least 1).
    #[arg(long, env = "BTU_BATCH_SIZE", default_value_t = 32)]
    pub batch_size: usize,
    /// Tokens per sequence of the clean fine-tune including [CLS]/[SEP]; at most max_position_embeddings.
    #[arg(long, env = "BTU_MAX_LEN", default_value_t = 128)]
    pub max_len: usize,
    /// Device: auto (cuda:0 when the build has CUDA and a GPU is visible, else cpu), cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = "auto")]
    pub device: String,
    /// Seed of the clean fine-tune's batch order and of --sample so reruns repeat.
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
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
    /// Attack applied to the non-target rows for ASR (none: ACC only).
    #[arg(long, env = "BTU_ATTACK", value_enum)]
    pub attack: Option<crate::steps::poison::Attack>,
    /// Trigger word(s) for --attack add-word; one is drawn per attacked row.
    #[arg(long, env = "BTU_TRIGGER", default_value = "cf")]
    pub trigger: Vec<String>,
    /// Trigger sentence for --attack add-sent.
    #[arg(long, env = "BTU_SENTENCE", default_value = crate::steps::poison::DEFAULT_SENTENCE)]
    pub sentence: String,
    /// Column holding the rewritten text, for --attack rewrite.
    #[arg(long, env = "BTU_REWRITE_COL")]
    pub rewrite_col: Option<String>,
    /// Target label of the attack (ASR counts non-target rows predicted as it); among the classes.
    #[arg(long, env = "BTU_TARGET", default_value_t = 1)]
    pub target: i64,
    /// Random insertions averaged for ASR.
    #[arg(long, env = "BTU_REPEATS", default_value_t = 1)]
    pub repeats: usize,
    /// How the model is opened and fed (--max-len, --backend, --ort-lib, --device).
    #[command(flatten)]
    #[serde(flatten)]
    pub classifier: ClassifierArgs,
    /// Seed of the attack's insertions (and of a missing head, as export-onnx initialises it).
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
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
    /// Seed of a head the checkpoint lacks (a bare encoder).
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
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
        if let Some(a) = self.attack {
            let p = c.poison.get_or_insert_with(|| {
                toml::from_str(&format!(
                    "attack = \"{}\"",
                    serde_json::to_value(a)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default()
                ))
                .expect("poison defaults")
            });
            p.attack = a;
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
                p.trigger = self.trigger.clone();
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
    #[arg(long, env = "BTU_DEVICE", default_value = "auto")]
    pub device: String,
    /// Seed of the synthetic corpus and of every step so reruns repeat.
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing --out run directory.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
}

/// Flags of `btu scan`.
#[derive(Debug, Args, serde::Serialize)]
pub struct ScanArgs {
    /// Corpus (Parquet files, directories, globs, s3:// URLs).
    #[arg(long, env = "BTU_CORPUS", num_args = 1.., required = true)]
    pub corpus: Vec<String>,
    /// suspicious_tokens.arrow from btu detect.
    #[arg(long, env = "BTU_SUSPICIOUS")]
    pub suspicious: PathBuf,
    /// token_effects.arrow from btu verify: flag rows by the verified triggers only.
    #[arg(long, env = "BTU_EFFECTS")]
    pub effects: Option<PathBuf>,
    /// Model directory or tokenizer.json of the tokenizer detection used.
    #[arg(long, env = "BTU_TOKENIZER")]
    pub tokenizer: PathBuf,
    /// Output Parquet file (flagged_rows).
    #[arg(long, env = "BTU_OUT")]
    pub out: PathBuf,
    /// Seed of --sample's row selection.
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
    /// How --corpus is read.
    #[command(flatten)]
    pub corpus_args: CorpusArgs,
}

/// How a classifier is opened and fed (eval, verify).
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct ClassifierArgs {
    /// Tokens per sequence including [CLS]/[SEP]; at most the model's max_position_embeddings.
    #[arg(long, env = "BTU_MAX_LEN", default_value_t = 128)]
    pub max_len: usize,
    /// ort for .onnx files (default), candle for checkpoint directories.
    #[arg(long, env = "BTU_BACKEND", value_enum)]
    pub backend: Option<crate::steps::eval::Backend>,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, then the .venv that `make setup` makes).
    #[arg(long, env = "BTU_ORT_LIB")]
    pub ort_lib: Option<PathBuf>,
    /// Device of the candle backend: auto, cpu or cuda:N.
    #[arg(long, env = "BTU_DEVICE", default_value = "auto")]
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
    /// Clean rows tried per candidate (at most).
    #[arg(long, env = "BTU_ROWS", default_value_t = crate::steps::verify::VerifyParams::default().rows)]
    pub rows: usize,
    /// Verified when the 95 % Wilson lower bound of the flip rate reaches this, in (0, 1].
    #[arg(long, env = "BTU_MIN_FLIP_RATE", default_value_t = crate::steps::verify::VerifyParams::default().min_flip_rate)]
    pub min_flip_rate: f64,
    /// How the model is opened and fed (--max-len, --backend, --ort-lib, --device).
    #[command(flatten)]
    #[serde(flatten)]
    pub classifier: ClassifierArgs,
    /// Seed of the rows tried and the insert positions, so reruns repeat.
    #[arg(long, env = "BTU_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long, env = "BTU_OVERWRITE")]
    pub overwrite: bool,
    /// How --clean-corpus and --corpus are read.
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
            Command::Sql(_) => "sql",
            Command::Schemas(_) => "schemas",
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
                i.extend(c.model.path.iter().map(p));
                (i, vec![p(&run), p(&run.join("metrics.json"))], json!(c))
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
            Command::Scan(a) => {
                let mut i = a.corpus.clone();
                i.push(p(&a.suspicious));
                i.extend(a.effects.iter().map(p));
                i.push(p(&a.tokenizer));
                (i, vec![p(&a.out)], json!(a))
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
    if cli.global.dry_run {
        return cli.command.plan();
    }
    match &cli.command {
        Command::InitModel(a) => {
            let corpus =
                (!a.corpus.is_empty()).then(|| a.corpus_args.spec(a.corpus.clone(), a.seed, false));
            crate::steps::init_model::run(&crate::steps::init_model::InitModelJob {
                out: a.out.clone(),
                overwrite: a.overwrite,
                corpus,
                tokenizer: a.tokenizer.clone(),
                vocab_size: a.vocab_size,
                size: crate::steps::init_model::ModelSize {
                    layers: a.layers,
                    hidden: a.hidden,
                    heads: a.heads,
                    intermediate: a.intermediate,
                    max_position: a.max_position,
                    num_labels: a.num_labels,
                },
                seed: a.seed,
            })
        }
        Command::Poison(a) => crate::steps::poison::run(&crate::steps::poison::PoisonJob {
            input: a.corpus_args.spec(a.input.clone(), a.seed, true),
            output: a.output.clone(),
            overwrite: a.overwrite,
            params: crate::steps::poison::PoisonParams {
                attack: a.attack,
                triggers: a.trigger.clone(),
                sentence: a.sentence.clone(),
                rewrite_col: a.rewrite_col.clone(),
                rate: a.rate,
                target: a.target,
                mode: a.mode,
                seed: a.seed,
            },
        }),
        Command::Detect(a) => crate::steps::detect::run(
            &crate::steps::detect::DetectJob {
                corpus: a.corpus_args.spec(a.corpus.clone(), a.seed, true),
                model: a.model.clone(),
                out: a.out.clone(),
                overwrite: a.overwrite,
                device: a.device.clone(),
                params: crate::steps::detect::DetectParams {
                    preset: a.preset,
                    alpha: a.alpha,
                    lr: a.lr,
                    weight_decay: a.weight_decay,
                    batch_size: a.batch_size,
                    max_len: a.max_len,
                    epochs: a.epochs,
                    batching: a.batching,
                    seed: a.seed,
                    num_labels: a.num_labels,
                    prior_neutral: a.prior_neutral,
                },
            },
            progress,
        ),
        Command::Train(a) => crate::steps::train::run(
            &crate::steps::train::TrainJob {
                corpus: a.corpus_args.spec(a.corpus.clone(), a.seed, true),
                dev: (!a.dev.is_empty())
                    .then(|| a.corpus_args.spec(a.dev.clone(), a.seed, true))
                    .map(|s| crate::io::corpus::CorpusSpec {
                        limit: None,
                        sample: None,
                        ..s
                    }),
                model: a.model.clone(),
                out: a.out.clone(),
                overwrite: a.overwrite,
                device: a.device.clone(),
                params: crate::steps::train::TrainParams {
                    epochs: a.epochs,
                    lr: a.lr,
                    weight_decay: a.weight_decay,
                    batch_size: a.batch_size,
                    max_len: a.max_len,
                    batching: a.batching,
                    seed: a.seed,
                    num_labels: a.num_labels,
                },
            },
            progress,
        ),
        Command::Unlearn(a) => crate::steps::unlearn::run(
            &crate::steps::unlearn::UnlearnJob {
                checkpoint: a.checkpoint.clone(),
                reference: a.reference.clone(),
                suspicious: a.suspicious.clone(),
                effects: a.effects.clone(),
                out: a.out.clone(),
                overwrite: a.overwrite,
                threshold: a.threshold,
                replacement: a.replacement,
                clean_corpus: (!a.clean_corpus.is_empty())
                    .then(|| a.corpus_args.spec(a.clean_corpus.clone(), a.seed, true)),
                eval_split: a
                    .eval_split
                    .iter()
                    .map(|p| crate::io::corpus::CorpusSpec {
                        label_col: None,
                        ..crate::io::corpus::CorpusSpec::new(vec![p.clone()])
                    })
                    .map(|s| crate::io::corpus::CorpusSpec {
                        text_col: a.corpus_args.text_col.clone(),
                        ..s
                    })
                    .collect(),
                clean: crate::steps::train::TrainParams {
                    epochs: a.clean_epochs,
                    lr: a.clean_lr,
                    batch_size: a.batch_size,
                    max_len: a.max_len,
                    seed: a.seed,
                    ..Default::default()
                },
                device: a.device.clone(),
                trigger_rows: a.trigger_rows,
                max_residual: a.max_residual,
                unverified: a.unverified,
                clean_tuning: a.clean_tuning,
                recheck: crate::steps::verify::VerifyParams {
                    rows: a.recheck_rows,
                    max_len: a.max_len,
                    seed: a.seed,
                    ..Default::default()
                },
            },
            progress,
        ),
        Command::ApplyMasks(a) => {
            crate::steps::apply_masks::run(&crate::steps::apply_masks::ApplyMasksJob {
                checkpoint: a.checkpoint.clone(),
                masks: a.masks.clone(),
                out: a.out.clone(),
                overwrite: a.overwrite,
            })
        }
        Command::Eval(a) => crate::steps::eval::run(&crate::steps::eval::EvalJob {
            model: a.model.clone(),
            test: a.corpus_args.spec(a.test.clone(), a.seed, true),
            out: a.out.clone(),
            overwrite: a.overwrite,
            attack: a.attack.map(|attack| crate::steps::eval::EvalAttack {
                attack,
                triggers: a.trigger.clone(),
                sentence: a.sentence.clone(),
                rewrite_col: a.rewrite_col.clone(),
                target: a.target,
                repeats: a.repeats,
                seed: a.seed,
            }),
            target: a.target,
            max_len: a.classifier.max_len,
            device: a.classifier.device.clone(),
            backend: a.classifier.backend,
            ort_lib: a.classifier.ort_lib.clone(),
            seed: a.seed,
        }),
        Command::ExportOnnx(a) => {
            crate::steps::export_onnx::run(&crate::steps::export_onnx::ExportJob {
                checkpoint: a.checkpoint.clone(),
                out: a.out.clone(),
                overwrite: a.overwrite,
                seed: a.seed,
            })
        }
        Command::Defend(a) => crate::steps::defend::run(&a.config()?, progress),
        Command::Demo(a) => crate::demo::run(
            &crate::demo::DemoJob {
                out: a.out.clone(),
                overwrite: a.overwrite,
                rows: a.rows,
                seed: a.seed,
                device: a.device.clone(),
                backend: a.backend,
            },
            progress,
        ),
        Command::Verify(a) => crate::steps::verify::run(&crate::steps::verify::VerifyJob {
            checkpoint: a.checkpoint.clone(),
            candidates: match (&a.suspicious, &a.recheck) {
                (_, Some(r)) => crate::steps::verify::CandidateSource::Recheck(r.clone()),
                (Some(s), None) => crate::steps::verify::CandidateSource::Suspicious(s.clone()),
                (None, None) => unreachable!("clap requires one"),
            },
            clean: a.corpus_args.spec(a.clean_corpus.clone(), a.seed, true),
            corpus: (!a.corpus.is_empty())
                .then(|| a.corpus_args.spec(a.corpus.clone(), a.seed, false)),
            out: a.out.clone(),
            overwrite: a.overwrite,
            device: a.classifier.device.clone(),
            backend: a.classifier.backend,
            ort_lib: a.classifier.ort_lib.clone(),
            params: crate::steps::verify::VerifyParams {
                rows: a.rows,
                min_flip_rate: a.min_flip_rate,
                max_len: a.classifier.max_len,
                seed: a.seed,
            },
        }),
        Command::Scan(a) => crate::steps::scan::run(
            &crate::steps::scan::ScanJob {
                corpus: a.corpus_args.spec(a.corpus.clone(), a.seed, true),
                suspicious: a.suspicious.clone(),
                effects: a.effects.clone(),
                tokenizer: a.tokenizer.clone(),
                out: a.out.clone(),
                overwrite: a.overwrite,
            },
            progress,
        ),
        Command::Sql(a) => crate::steps::sql::run(
            &crate::steps::sql::SqlJob {
                tables: a.tables.clone(),
                run: a.run.clone(),
                query: a.query.clone(),
                format: a.format,
                output: a.output.clone(),
                overwrite: a.overwrite,
                timeout: a
                    .timeout
                    .as_deref()
                    .map(crate::steps::sql::parse_timeout)
                    .transpose()?,
                memory_limit: crate::steps::sql::parse_memory_limit(&a.memory_limit)?,
            },
            stdout,
        ),
        Command::Schemas(a) => crate::steps::schemas::run(&a.out),
    }
}
