//! # btu: Backdoor Token Unlearning
//!
//! Finds backdoor trigger tokens in text training corpora and removes them from models
//! (Jiang et al., AAAI 2025). A columnar pipeline: Parquet corpora in through DataFusion,
//! `tokenizers`, candle training on CPU or CUDA, Arrow IPC tables and safetensors checkpoints out.
//!
//! The layout follows the pipeline: [`steps`] holds one module per command (`btu poison` is
//! [`steps::poison`], `btu export-onnx` is [`steps::export_onnx`], ...); [`io`] reads corpora and
//! object stores and writes tables and outputs; [`model`] holds the BERT classifier, checkpoints,
//! the tokenizer and ONNX; [`training`] the optimiser and the epoch loop; [`cli`] the command line;
//! [`demo`] the embedded default. Typed errors with exit codes are in [`error`]. The library never
//! prints: results are returned as values (and summary JSON), logs go through `tracing`, progress
//! through [`progress::Progress`].
#![deny(clippy::print_stdout, clippy::print_stderr)]
#![warn(missing_docs)]

pub mod cli;
pub mod defaults;
pub mod demo;
pub mod device;
pub mod error;
pub mod io;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod steps;
pub mod training;
pub mod validate;

/// btu's version, written into every table's metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub use error::{BtuError, Result};
