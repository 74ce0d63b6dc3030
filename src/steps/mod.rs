//! One module per `btu` command, named after it. The experiment flow runs them in this order:
//! poison -> detect -> train -> verify -> unlearn (-> relabel -> train, when verify confirms no
//! trigger) -> export-onnx -> eval; `defend` runs them all,
//! `apply-masks` replays a repair on another checkpoint, `scan` and `sql` audit corpora and
//! tables, `init-model` makes the embedded default model, `schemas` writes the tables' schemas, `report`
//! renders a run as a page for a person.

/// A step's typed result as the summary JSON the CLI prints and `btu defend` records.
pub fn summary<T: serde::Serialize>(result: crate::Result<T>) -> crate::Result<serde_json::Value> {
    serde_json::to_value(result?).map_err(crate::BtuError::internal)
}

/// What every step that writes shares: where, whether an existing output may be replaced, the
/// seed that makes a rerun repeat, and the device. One type for the commands' `--out`,
/// `--overwrite`, `--seed` and `--device` (see `cli::RunArgs`) and for `btu defend`'s steps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunOpts {
    /// The output: a directory, or a file for `poison` (`--output`) and `scan`.
    pub out: std::path::PathBuf,
    /// Replace an existing output (`--overwrite`).
    pub overwrite: bool,
    /// Seed of every random choice the step makes (`--seed`); steps that make none ignore it.
    pub seed: u64,
    /// Device the step computes on: `auto`, `cpu` or `cuda:N` (`--device`); steps that only
    /// read and write files ignore it.
    pub device: String,
}

impl RunOpts {
    /// Write to `out` with the default seed and device, refusing an existing output.
    pub fn new(out: impl Into<std::path::PathBuf>) -> Self {
        RunOpts {
            out: out.into(),
            overwrite: false,
            seed: crate::defaults::SEED,
            device: crate::defaults::DEVICE.into(),
        }
    }

    /// The same options writing to `out`.
    pub fn to(&self, out: impl Into<std::path::PathBuf>) -> Self {
        RunOpts {
            out: out.into(),
            ..self.clone()
        }
    }
}

pub mod apply_masks;
pub mod defend;
pub mod detect;
pub mod eval;
pub mod export_onnx;
pub mod init_model;
pub mod poison;
pub mod relabel;
pub mod report;
pub mod scan;
pub mod schemas;
pub mod sql;
pub mod train;
pub mod unlearn;
pub mod verify;
