//! Every default value of btu's parameters, in one place. The parameter types of the steps
//! ([`crate::steps::detect::DetectParams`], ...) use these in their clap attributes, their serde
//! defaults (a `btu defend` TOML table) and their `Default` impls, so a flag, a config key and the
//! library agree; a test checks that the three give the same values.

/// Seed of every random choice, so reruns repeat.
pub const SEED: u64 = 42;
/// Device: `auto` (cuda:0 when the build has CUDA and a GPU is visible, else cpu).
pub const DEVICE: &str = "auto";
/// Text column of every corpus.
pub const TEXT_COL: &str = "text";
/// Label column of every corpus.
pub const LABEL_COL: &str = "label";

/// AdamW learning rate of detection and of training.
pub const LR: f64 = 2e-5;
/// AdamW weight decay.
pub const WEIGHT_DECAY: f64 = 0.01;
/// Tokens per sequence including `[CLS]`/`[SEP]`.
pub const MAX_LEN: usize = 128;
/// Rows per training batch.
pub const BATCH_SIZE: usize = 32;

/// Tokens flagged per detection round, as a percentage of the vocabulary.
pub const ALPHA: f64 = 0.05;
/// Epochs per detection round (the paper: 1).
pub const DETECT_EPOCHS: usize = 1;
/// Training epochs of `btu train` (the victim).
pub const TRAIN_EPOCHS: usize = 3;

/// Epochs of unlearning's clean tuning (measured: the paper's 3 x 5e-7 does not move MiniLM's
/// layers; one epoch at 2e-5 does; docs/decisions.md).
pub const CLEAN_EPOCHS: usize = 1;
/// AdamW learning rate of the clean tuning.
pub const CLEAN_LR: f64 = 2e-5;
/// Share of the clean tuning's rows that get a verified trigger inserted, label kept.
pub const TRIGGER_ROWS: f64 = 0.4;
/// Escalate a verified trigger's repair while the 95 % Wilson lower bound of its flip rate on
/// clean rows stays above this.
pub const MAX_RESIDUAL: f64 = 0.03;

/// Clean rows tried per candidate by verification (and per trigger by each recheck).
pub const VERIFY_ROWS: usize = 200;
/// A candidate is verified when the 95 % Wilson lower bound of its flip rate reaches this: a
/// trigger flips a majority of the rows the model otherwise gets right, outweighing the rest of
/// the sentence (docs/decisions.md: a weakly learned trigger at 1 % poison flips ~70 %).
pub const MIN_FLIP_RATE: f64 = 0.5;

/// `btu relabel`'s references, each fine-tuned on all parts of the clean rows but one.
pub const REFERENCES: usize = 4;
/// Epochs of each of `btu relabel`'s references.
pub const REFERENCE_EPOCHS: usize = 4;
/// AdamW learning rate of `btu relabel`'s references.
pub const REFERENCE_LR: f64 = 2e-5;
/// `btu relabel`: a class is poisoned when the references doubt its training rows this many
/// standard errors more than its clean rows (one-sided p = 0.0005).
pub const RELABEL_MIN_Z: f64 = 3.29;
/// `btu relabel`: a target row is relabelled when the references' mean probability of the other
/// classes over its neighbourhood is at least this (it takes the most likely other class).
/// Averaging over a neighbourhood pulls a poisoned row's doubt towards its clean neighbours'; on
/// the four rewrite rows of both datasets 0.4 meets issue 12's bars and 0.5 does not (HSOL
/// Synbkd ASR 29.87 %; docs/decisions.md, "Neighbourhoods in the suspect").
pub const RELABEL_MIN_DOUBT: f64 = 0.4;
/// `btu relabel`: a target row's neighbourhood is itself and this many nearest rows of the target
/// in the suspect (docs/decisions.md, "Neighbourhoods in the suspect").
pub const RELABEL_NEIGHBOURS: usize = 10;
/// `btu relabel`: at most this many rows are relabelled per row the target's excess doubt
/// accounts for (its estimate of the poisoned rows): about as many clean rows as poisoned ones at
/// worst. On the four rewrite rows the rule relabels 1.1-1.9 times the estimate and the cap does
/// not bind; with weak references whose doubts all sit near the threshold it stops the whole class
/// from being relabelled (docs/decisions.md, "Neighbourhoods in the suspect").
pub const RELABEL_MAX_PER_POISONED: f64 = 2.0;
/// Epochs of `btu defend`'s tuning of the victim on the relabelled rows.
pub const RELABEL_TUNE_EPOCHS: usize = 1;

/// Trigger word of Add-Word.
pub const TRIGGER: &str = "cf";
/// Trigger sentence of Add-Sent (the paper's).
pub const SENTENCE: &str = "I watch this 3D movie";
/// Poison rate: a fraction of the corpus (of each class in `mix` mode).
pub const POISON_RATE: f64 = 0.1;
/// Target label of an attack.
pub const TARGET: i64 = 1;
/// Random insertions averaged for ASR.
pub const REPEATS: usize = 1;

/// WordPiece vocabulary trained by `init-model`.
pub const VOCAB_SIZE: usize = 8000;
/// Encoder layers of `init-model`.
pub const LAYERS: usize = 2;
/// Hidden size of `init-model`.
pub const HIDDEN: usize = 128;
/// Attention heads of `init-model`.
pub const HEADS: usize = 2;
/// Feed-forward width of `init-model`.
pub const INTERMEDIATE: usize = 512;
/// Position embeddings of `init-model`.
pub const MAX_POSITION: usize = 512;
/// Classes of `init-model`'s head.
pub const NUM_LABELS: usize = 2;
