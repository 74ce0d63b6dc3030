//! One module per `btu` command, named after it. The experiment flow runs them in this order:
//! poison -> detect -> train -> verify -> unlearn -> export-onnx -> eval; `defend` runs them all,
//! `apply-masks` replays a repair on another checkpoint, `scan` and `sql` audit corpora and
//! tables, `init-model` makes the embedded default model, `schemas` writes the tables' schemas.

/// A step's typed result as the summary JSON the CLI prints and `btu defend` records.
pub fn summary<T: serde::Serialize>(result: crate::Result<T>) -> crate::Result<serde_json::Value> {
    serde_json::to_value(result?).map_err(crate::BtuError::internal)
}

pub mod apply_masks;
pub mod defend;
pub mod detect;
pub mod eval;
pub mod export_onnx;
pub mod init_model;
pub mod poison;
pub mod scan;
pub mod schemas;
pub mod sql;
pub mod train;
pub mod unlearn;
pub mod verify;
