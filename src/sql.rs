//! `btu sql`: read-only SQL (DataFusion) over btu's result tables and corpora. Tables come from
//! `--table NAME=PATH` (Arrow IPC files; Parquet files, directories, globs or `s3://` URLs) and
//! from a run or output directory (`--run DIR`: `token_scores`, `suspicious_tokens`,
//! `dimension_masks`, `flagged_rows`, `predictions[_<step>]` under their own names). DDL, DML,
//! `COPY` and other statements are refused. Results go to the writer the caller gives (stdout)
//! as a table, CSV or JSON, or to `--output` as Parquet or Arrow.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::datasource::file_format::options::ArrowReadOptions;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde_json::{json, Value};

use crate::error::{BtuError, Result};

/// Output format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Table,
    Csv,
    Json,
    Parquet,
    Arrow,
}

/// Inputs of `btu sql`.
pub struct SqlJob {
    /// `NAME=PATH` pairs.
    pub tables: Vec<String>,
    /// A run or output directory whose tables are registered under their own names.
    pub run: Option<PathBuf>,
    /// The query; `None` reads queries (ending in `;`) from standard input.
    pub query: Option<String>,
    pub format: Format,
    pub output: Option<PathBuf>,
    pub overwrite: bool,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !n.starts_with(|c: char| c.is_ascii_digit())
}

/// Tables a run/output directory holds: `(name, path)`.
pub fn run_tables(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        return Err(BtuError::missing(
            dir.display().to_string(),
            "give a run directory (btu defend) or a command's output directory",
        ));
    }
    let mut found = Vec::new();
    let mut visit = |p: PathBuf, parent: Option<String>| {
        let name = p
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        let table = match name.as_str() {
            "token_scores.arrow" => Some("token_scores".to_string()),
            "suspicious_tokens.arrow" => Some("suspicious_tokens".to_string()),
            "dimension_masks.arrow" => Some("dimension_masks".to_string()),
            "predictions.parquet" => Some(match &parent {
                Some(d) => format!(
                    "predictions_{}",
                    d.trim_start_matches("eval-").replace('-', "_")
                ),
                None => "predictions".to_string(),
            }),
            n if n.starts_with("flagged_rows") && n.ends_with(".parquet") => {
                Some(n.trim_end_matches(".parquet").replace('-', "_"))
            }
            _ => None,
        };
        if let Some(t) = table {
            found.push((t, p));
        }
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| BtuError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            let parent = p.file_name().and_then(|s| s.to_str()).map(String::from);
            if parent.as_deref().is_some_and(|n| n.starts_with('.')) {
                continue;
            }
            let mut inner: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(|e| BtuError::io(&p, e))?
                .flatten()
                .map(|e| e.path())
                .collect();
            inner.sort();
            for q in inner {
                if q.is_file() {
                    visit(q, parent.clone());
                }
            }
        } else {
            visit(p, None);
        }
    }
    // A name seen twice keeps the first (sorted) path.
    let mut seen = std::collections::BTreeSet::new();
    found.retain(|(n, _)| seen.insert(n.clone()));
    Ok(found)
}

/// A table to register: its name, the path as given, and (for Parquet) the resolved files.
struct Source {
    name: String,
    path: String,
    files: Vec<crate::corpus::InputFile>,
}

/// Resolve a table's files (blocking: object-store listings run on the shared runtime).
fn source(name: &str, path: &str) -> Result<Source> {
    if !valid_name(name) {
        return Err(BtuError::config(
            "--table",
            format!("'{name}' is not a table name (letters, digits, _)"),
        ));
    }
    let is_arrow = [".arrow", ".ipc", ".feather"]
        .iter()
        .any(|e| path.ends_with(e));
    let files = if is_arrow {
        if crate::store::S3Url::parse(path).is_none() {
            if !Path::new(path).is_file() {
                return Err(BtuError::missing(path, "the Arrow file does not exist"));
            }
            // Check it is an Arrow IPC file before DataFusion does, for a clear error.
            crate::tables::read_ipc(Path::new(path))?;
        }
        vec![]
    } else {
        crate::corpus::resolve_inputs(&[path.to_string()])?
    };
    Ok(Source {
        name: name.to_string(),
        path: path.to_string(),
        files,
    })
}

async fn register(ctx: &SessionContext, src: &Source) -> Result<()> {
    let (name, path) = (src.name.as_str(), src.path.as_str());
    let is_arrow = [".arrow", ".ipc", ".feather"]
        .iter()
        .any(|e| path.ends_with(e));
    if is_arrow {
        if let Some(u) = crate::store::S3Url::parse(path) {
            ctx.register_object_store(&u.root(), crate::store::s3_store(&u.bucket)?);
        }
        let ext = Path::new(path)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("arrow");
        let ext = format!(".{ext}");
        ctx.register_arrow(
            name,
            path,
            ArrowReadOptions {
                file_extension: &ext,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| BtuError::bad_data(path, format!("cannot register as Arrow: {e}")))?;
        return Ok(());
    }
    let files = &src.files;
    for f in files {
        if let Some(u) = crate::store::S3Url::parse(&f.path) {
            ctx.register_object_store(&u.root(), crate::store::s3_store(&u.bucket)?);
        }
    }
    let paths: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    let df = ctx
        .read_parquet(
            paths,
            ParquetReadOptions {
                file_extension: "",
                ..Default::default()
            },
        )
        .await
        .map_err(|e| BtuError::bad_data(path, format!("cannot read as Parquet: {e}")))?;
    ctx.register_table(name, df.into_view())
        .map_err(|e| BtuError::config("--table", e.to_string()))?;
    Ok(())
}

/// Run one read-only query.
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    let opts = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let one_line = |e: &dyn std::fmt::Display| {
        e.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let df = ctx.sql_with_options(sql, opts).await.map_err(|e| {
        let msg = one_line(&e);
        if msg.contains("not supported") {
            BtuError::config(
                "query",
                format!("btu sql is read-only: {msg}; only queries (SELECT, WITH, EXPLAIN...) run"),
            )
        } else {
            BtuError::config("query", msg)
        }
    })?;
    df.collect()
        .await
        .map_err(|e| BtuError::config("query", one_line(&e)))
}

/// Render batches in a text format.
pub fn render(batches: &[RecordBatch], format: Format) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Table => {
            let t = arrow::util::pretty::pretty_format_batches(batches)
                .map_err(|e| BtuError::internal(e.to_string()))?;
            out.extend(format!("{t}\n").as_bytes());
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for b in batches {
                w.write(b).map_err(|e| BtuError::config("--format", format!("cannot write CSV ({e}); use --format json or parquet for nested columns")))?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut out);
            for b in batches {
                w.write(b).map_err(|e| BtuError::internal(e.to_string()))?;
            }
            w.finish().map_err(|e| BtuError::internal(e.to_string()))?;
            if out.is_empty() {
                out.extend(b"[]");
            }
            out.push(b'\n');
        }
        Format::Parquet | Format::Arrow => {
            return Err(BtuError::config(
                "--format",
                "parquet and arrow need --output FILE",
            ))
        }
    }
    Ok(out)
}

fn write_result(batches: &[RecordBatch], job: &SqlJob, stdout: &mut dyn Write) -> Result<()> {
    match (&job.output, job.format) {
        (Some(p), Format::Parquet | Format::Arrow) => {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
            let all = arrow::compute::concat_batches(&schema, batches)
                .map_err(|e| BtuError::internal(e.to_string()))?;
            if job.format == Format::Parquet {
                crate::tables::write_parquet(p, &all, job.overwrite)
            } else {
                crate::tables::write_ipc(p, &all, job.overwrite)
            }
        }
        (Some(p), f) => {
            let bytes = render(batches, f)?;
            crate::output::write_file_atomic(p, job.overwrite, |file| {
                file.write_all(&bytes).map_err(|e| BtuError::io(p, e))
            })
        }
        (None, f) => {
            let bytes = render(batches, f)?;
            stdout
                .write_all(&bytes)
                .map_err(|e| BtuError::io("stdout", e))
        }
    }
}

/// `btu sql`: results to `stdout` (or `--output`); returns a summary.
pub fn run(job: &SqlJob, stdout: &mut dyn Write) -> Result<Value> {
    if let Some(p) = &job.output {
        crate::output::check_output(p, job.overwrite)?;
    }
    if job.output.is_none() && matches!(job.format, Format::Parquet | Format::Arrow) {
        return Err(BtuError::config(
            "--format",
            "parquet and arrow need --output FILE",
        ));
    }
    let mut sources = Vec::new();
    if let Some(dir) = &job.run {
        for (name, path) in run_tables(dir)? {
            sources.push(source(&name, &path.display().to_string())?);
        }
    }
    for t in &job.tables {
        let (name, path) = t
            .split_once('=')
            .ok_or_else(|| BtuError::config("--table", format!("'{t}' is not NAME=PATH")))?;
        sources.push(source(name, path)?);
    }
    let rt = crate::corpus::runtime();
    rt.block_on(async {
        let ctx = SessionContext::new();
        let mut names = Vec::new();
        for src in &sources {
            register(&ctx, src).await?;
            names.push(src.name.clone());
        }
        let mut rows = 0usize;
        let mut queries = 0usize;
        match &job.query {
            Some(q) => {
                let b = query(&ctx, q).await?;
                rows += b.iter().map(|b| b.num_rows()).sum::<usize>();
                queries += 1;
                write_result(&b, job, stdout)?;
            }
            None => {
                // Queries from standard input, each ending in ';'.
                let stdin = std::io::stdin();
                let mut buf = String::new();
                for line in stdin.lock().lines() {
                    let line = line.map_err(|e| BtuError::io("stdin", e))?;
                    buf.push_str(&line);
                    buf.push('\n');
                    if line.trim_end().ends_with(';') {
                        let q = std::mem::take(&mut buf);
                        match query(&ctx, &q).await {
                            Ok(b) => {
                                rows += b.iter().map(|b| b.num_rows()).sum::<usize>();
                                queries += 1;
                                write_result(&b, job, stdout)?;
                            }
                            Err(e) => tracing::error!("{e}"),
                        }
                    }
                }
            }
        }
        Ok(json!({"command": "sql", "version": crate::VERSION, "tables": names, "queries": queries, "rows": rows, "output": job.output}))
    })
}
