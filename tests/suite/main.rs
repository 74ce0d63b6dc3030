//! The integration tests, one binary (as ripgrep does): every module runs the real `btu` binary
//! or the library, shares one command builder (`util::Btu`) and fixtures built once per test
//! process (`fixtures`).
//!
//! Run one module or test with a filter: `cargo test --release --test suite detect::` or
//! `cargo test --release --test suite hostile::a_file_named_twice_is_read_once`.

#[macro_use]
mod util;
mod fixtures;

mod bad_input;
mod defend;
mod detect;
mod families;
mod fanout;
mod gradients;
mod hostile;
mod lake;
mod onnx;
mod pipelines;
mod poison;
mod relabel;
mod report;
mod schemas;
mod sql_limits;
mod sst2;
mod unlearn;
