//! `btu schemas`: write the JSON schema of every table btu writes (the files committed in
//! schemas/, checked by tests/schemas.rs).

use std::path::{Path, PathBuf};

use crate::error::{BtuError, Result};
use crate::io::tables::{all_schemas, schema_json};

/// `btu schemas`' result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SchemasReport {
    /// `schemas`.
    pub command: String,
    /// The files written.
    pub written: Vec<PathBuf>,
}

/// Write `<table>.schema.json` for every table into `out`.
pub fn run(out: &Path) -> Result<SchemasReport> {
    std::fs::create_dir_all(out).map_err(|e| BtuError::io(out, e))?;
    let mut written = Vec::new();
    for (name, schema, keys) in all_schemas() {
        let p = out.join(format!("{name}.schema.json"));
        crate::io::output::write_json_atomic(&p, &schema_json(name, &schema, &keys))?;
        written.push(p);
    }
    Ok(SchemasReport {
        command: "schemas".into(),
        written,
    })
}
