//! One module per `btu` command, named after it. The experiment flow runs them in this order:
//! poison -> detect -> train -> verify -> unlearn -> export-onnx -> eval; `defend` runs them all,
//! `apply-masks` replays a repair on another checkpoint, `scan` and `sql` audit corpora and
//! tables, `init-model` makes the embedded default model, `schemas` writes the tables' schemas.

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
