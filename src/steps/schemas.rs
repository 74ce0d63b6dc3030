//! `btu schemas`: write the JSON schema of every table btu writes (the files committed in
//! schemas/, checked by tests/schemas.rs).

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{BtuError, Result};
use crate::io::tables::{all_schemas, schema_json};

/// Write `<table>.schema.json` for every table into `out`.
pub fn run(out: &Path) -> Result<Value> {
    std::fs::create_dir_all(out).map_err(|e| BtuError::io(out, e))?;
    let mut written = Vec::new();
    for (name, schema, keys) in all_schemas() {
        let p = out.join(format!("{name}.schema.json"));
        let text = serde_json::to_string_pretty(&schema_json(name, &schema, &keys))
            .map_err(BtuError::internal)?;
        crate::io::output::write_file_atomic(&p, true, |f| {
            use std::io::Write;
            f.write_all((text + "\n").as_bytes())
                .map_err(|e| BtuError::io(&p, e))
        })?;
        written.push(p);
    }
    Ok(json!({"command": "schemas", "written": written}))
}
