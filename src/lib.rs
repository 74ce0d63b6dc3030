//! # btu: Backdoor Token Unlearning
//!
//! Finds backdoor trigger tokens in text training corpora and removes them from models
//! (Jiang et al., AAAI 2025). A columnar pipeline: Parquet corpora in through DataFusion,
//! `tokenizers`, candle training on CPU or CUDA, Arrow IPC tables and safetensors checkpoints out.
//!
//! One module per pipeline step (`poison`, `detect`, ...), the tables they write in [`tables`],
//! typed errors with exit codes in [`error`]. The library never prints: results are returned as
//! values (and summary JSON), logs go through `tracing`, progress through [`progress::Progress`].
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod cli;
pub mod corpus;
pub mod defend;
pub mod demo;
pub mod detect;
pub mod device;
pub mod error;
pub mod escalate;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod infer;
pub mod init_model;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod output;
pub mod poison;
pub mod progress;
pub mod scan;
pub mod sql;
pub mod store;
pub mod synth;
pub mod tables;
pub mod tokenize;
pub mod train;
pub mod unlearn;
pub mod validate;
pub mod verify;

/// btu's version, written into every table's metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub use error::{BtuError, Result};
