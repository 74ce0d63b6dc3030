//! `btu sql`: read-only SQL (DataFusion) over btu's result tables and corpora. Tables come from
//! `--table NAME=PATH` (Arrow IPC files; Parquet files, directories, globs or `s3://` URLs) and
//! from a run or output directory (`--run DIR`: `token_scores`, `suspicious_tokens`,
//! `dimension_masks`, `flagged_rows`, `predictions[_<step>]` under their own names). DDL, DML,
//! `COPY` and other statements are refused. Results stream batch by batch to the writer the
//! caller gives (stdout) as CSV or JSON, or to `--output` (written under a temporary name and
//! renamed into place when complete) as CSV, JSON, Parquet or Arrow; only `--format table`
//! holds the whole result, within `--memory-limit`.
//!
//! Hostile queries are bounded: DataFusion's memory pool is `--memory-limit` (nothing spills to
//! disk, so a query needing more fails with exit 78), and `--timeout` bounds each query's
//! planning and execution, result writing included (exit 78 on expiry).

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use datafusion::datasource::file_format::options::ArrowReadOptions;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use futures::StreamExt;

use crate::error::{BtuError, Result};

/// Default of `--memory-limit`.
pub const DEFAULT_MEMORY_LIMIT: &str = "2G";

/// Output format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A pretty-printed text table (holds the whole result, within `--memory-limit`).
    Table,
    /// CSV with a header row, streamed.
    Csv,
    /// One JSON array of row objects, streamed.
    Json,
    /// A zstd-compressed Parquet file (needs `--output`).
    Parquet,
    /// An Arrow IPC file (needs `--output`).
    Arrow,
}

/// Inputs of `btu sql`.
pub struct SqlJob {
    /// `NAME=PATH` pairs.
    pub tables: Vec<String>,
    /// A run or output directory whose tables are registered under their own names.
    pub run: Option<PathBuf>,
    /// The query; `None` reads queries (separated by `;`) from standard input.
    pub query: Option<String>,
    /// How results are written (`--format`).
    pub format: Format,
    /// File to write the result to instead of standard output (`--output`), atomically.
    pub output: Option<PathBuf>,
    /// Replace an existing `--output` file (`--overwrite`).
    pub overwrite: bool,
    /// Bound on each query: planning, execution and writing its result (`--timeout`).
    pub timeout: Option<Duration>,
    /// Bytes DataFusion's memory pool holds, and that `--format table` may collect (`--memory-limit`).
    pub memory_limit: usize,
}

/// Parse `--timeout`: a finite number of seconds above 0.
pub fn parse_timeout(s: &str) -> Result<Duration> {
    let bad = || {
        BtuError::config(
            "--timeout",
            format!(
                "'{s}' is not a number of seconds above 0; give e.g. --timeout 30 or --timeout 0.5"
            ),
        )
    };
    let secs: f64 = s.trim().parse().map_err(|_| bad())?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(bad());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Parse `--memory-limit`: bytes, or a number with a K, M, G or T suffix (powers of 1024; `512M`,
/// `2G`, `1.5G`; a trailing `B` or `iB` is accepted); 0 is refused.
pub fn parse_memory_limit(s: &str) -> Result<usize> {
    let bad = |why: &str| {
        BtuError::config(
            "--memory-limit",
            format!(
                "'{s}' {why}; give bytes or a size with K, M or G, e.g. --memory-limit 512M or 2G"
            ),
        )
    };
    let upper = s.trim().to_ascii_uppercase();
    let body = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (num, shift) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 10),
        Some('M') => (&body[..body.len() - 1], 20),
        Some('G') => (&body[..body.len() - 1], 30),
        Some('T') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let v: f64 = num.trim().parse().map_err(|_| bad("is not a size"))?;
    let bytes = v * (1u64 << shift) as f64;
    if bytes.is_nan() || bytes < 1.0 {
        return Err(bad("is not a size above 0"));
    }
    if bytes >= usize::MAX as f64 {
        return Err(bad("is too large"));
    }
    Ok(bytes as usize)
}

/// A byte count the way `--memory-limit` takes it (`2G`, `512M`, `1.5G`, `100 bytes`).
fn fmt_size(bytes: usize) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        let u = 1usize << shift;
        if bytes >= u {
            return if bytes.is_multiple_of(u) {
                format!("{}{unit}", bytes / u)
            } else {
                format!("{:.1}{unit}", bytes as f64 / u as f64)
            };
        }
    }
    format!("{bytes} bytes")
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
    files: Vec<crate::io::corpus::InputFile>,
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
        if crate::io::store::S3Url::parse(path).is_none() {
            if !Path::new(path).is_file() {
                return Err(BtuError::missing(path, "the Arrow file does not exist"));
            }
            // Check it is an Arrow IPC file before DataFusion does, for a clear error.
            crate::io::tables::read_ipc(Path::new(path))?;
        }
        vec![]
    } else {
        crate::io::corpus::resolve_inputs(&[path.to_string()])?
    };
    Ok(Source {
        name: name.to_string(),
        path: path.to_string(),
        files,
    })
}

/// How DataFusion's failures become btu's: the limits in force and whether tables are remote.
#[derive(Clone)]
struct Limits {
    timeout: Option<Duration>,
    memory_limit: usize,
    /// Some table is read from an object store (its failures may be temporary).
    remote: bool,
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_remote(path: &str) -> bool {
    crate::io::store::S3Url::parse(path).is_some()
}

/// A table that cannot be registered: temporary (exit 75) when its object store failed in a way
/// worth a retry, bad data (65) otherwise.
fn source_err(path: &str, remote: bool, what: &str, e: DataFusionError) -> BtuError {
    let msg = one_line(&e.to_string());
    if remote && crate::io::store::is_temporary(&msg) {
        return BtuError::Temporary {
            context: path.to_string(),
            message: msg,
        };
    }
    BtuError::bad_data(path, format!("{what}: {msg}"))
}

/// A failed query: over `--memory-limit` (78), a temporary object-store failure (75), or a bad
/// query (78).
fn query_err(e: DataFusionError, limits: &Limits) -> BtuError {
    let msg = one_line(&e.to_string());
    let root = e.find_root();
    if matches!(root, DataFusionError::ResourcesExhausted(_)) || msg.contains("Resources exhausted")
    {
        let detail = one_line(&root.to_string());
        // The pool's report lists its top consumers; the allocation that failed is the gist.
        let detail = detail
            .split_once("Error: ")
            .map_or(detail.as_str(), |(_, d)| d);
        let detail = detail
            .strip_prefix("Resources exhausted: ")
            .unwrap_or(detail)
            .to_string();
        return BtuError::config(
            "--memory-limit",
            format!(
                "the query exceeds --memory-limit {} ({detail}); raise it or narrow the query",
                fmt_size(limits.memory_limit)
            ),
        );
    }
    if limits.remote && crate::io::store::is_temporary(&msg) {
        return BtuError::Temporary {
            context: "query".into(),
            message: msg,
        };
    }
    BtuError::config("query", msg)
}

fn timeout_err(d: Duration) -> BtuError {
    BtuError::config(
        "--timeout",
        format!(
            "the query did not finish within --timeout {}s; raise --timeout or narrow the query",
            d.as_secs_f64()
        ),
    )
}

/// A session whose memory pool holds `memory_limit` bytes and which never spills to disk.
fn session(memory_limit: usize) -> Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(memory_limit, 1.0)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(|e| BtuError::internal(format!("DataFusion runtime: {e}")))?;
    Ok(SessionContext::new_with_config_rt(
        SessionConfig::new(),
        runtime,
    ))
}

async fn register(ctx: &SessionContext, src: &Source) -> Result<()> {
    let (name, path) = (src.name.as_str(), src.path.as_str());
    let is_arrow = [".arrow", ".ipc", ".feather"]
        .iter()
        .any(|e| path.ends_with(e));
    if is_arrow {
        if let Some(u) = crate::io::store::S3Url::parse(path) {
            ctx.register_object_store(&u.root(), crate::io::store::s3_store(&u.bucket)?);
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
        .map_err(|e| source_err(path, is_remote(path), "cannot register as Arrow", e))?;
        return Ok(());
    }
    let files = &src.files;
    for f in files {
        if let Some(u) = crate::io::store::S3Url::parse(&f.path) {
            ctx.register_object_store(&u.root(), crate::io::store::s3_store(&u.bucket)?);
        }
    }
    let remote = is_remote(path) || files.iter().any(|f| is_remote(&f.path));
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
        .map_err(|e| source_err(path, remote, "cannot read as Parquet", e))?;
    ctx.register_table(name, df.into_view())
        .map_err(|e| BtuError::config("--table", e.to_string()))?;
    Ok(())
}

/// Plan one read-only query and start it.
async fn plan(
    ctx: &SessionContext,
    sql: &str,
    limits: &Limits,
) -> Result<SendableRecordBatchStream> {
    let opts = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx.sql_with_options(sql, opts).await.map_err(|e| {
        let msg = one_line(&e.to_string());
        if msg.contains("not supported") {
            BtuError::config(
                "query",
                format!("btu sql is read-only: {msg}; only queries (SELECT, WITH, EXPLAIN...) run"),
            )
        } else {
            query_err(e, limits)
        }
    })?;
    df.execute_stream().await.map_err(|e| query_err(e, limits))
}

/// A query running on the runtime's workers. The thread that writes its results waits for them
/// batch by batch (at most two ahead of the writer) and watches `--timeout` meanwhile, so a
/// runaway query stops on time even while it holds every worker. Dropped, it stops the query.
struct Running {
    rt: &'static tokio::runtime::Runtime,
    schema: SchemaRef,
    batches: tokio::sync::mpsc::Receiver<Result<RecordBatch>>,
    deadline: Option<Deadline>,
    _task: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `--timeout`, kept by a thread of its own: the runtime's timers are driven by its worker
/// threads, which an operator such as a nested-loop join holds for seconds without yielding.
struct Deadline {
    after: Duration,
    expired: tokio::sync::oneshot::Receiver<()>,
    /// Dropping it ends the watching thread.
    _cancel: std::sync::mpsc::Sender<()>,
}

impl Deadline {
    fn start(after: Duration) -> Deadline {
        let (fire, expired) = tokio::sync::oneshot::channel();
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(after) {
                let _ = fire.send(());
            }
        });
        Deadline {
            after,
            expired,
            _cancel: cancel,
        }
    }
}

/// Wait on the runtime for `fut`, or until the deadline.
fn wait<T>(
    rt: &tokio::runtime::Runtime,
    deadline: &mut Option<Deadline>,
    fut: impl std::future::Future<Output = T>,
) -> Result<T> {
    let Some(d) = deadline else {
        return Ok(rt.block_on(fut));
    };
    let after = d.after;
    rt.block_on(async {
        tokio::select! {
            v = fut => Ok(v),
            _ = &mut d.expired => Err(timeout_err(after)),
        }
    })
}

impl Running {
    /// Plan and start `sql` (planning counts against `--timeout` too).
    fn start(
        rt: &'static tokio::runtime::Runtime,
        ctx: &SessionContext,
        sql: &str,
        limits: &Limits,
    ) -> Result<Running> {
        let mut deadline = limits.timeout.map(Deadline::start);
        let (tx, batches) = tokio::sync::mpsc::channel(2);
        let (schema_tx, schema_rx) = tokio::sync::oneshot::channel();
        let (ctx, sql, task_limits) = (ctx.clone(), sql.to_string(), limits.clone());
        let task = AbortOnDrop(rt.spawn(async move {
            let mut stream = match plan(&ctx, &sql, &task_limits).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = schema_tx.send(Err(e));
                    return;
                }
            };
            if schema_tx.send(Ok(stream.schema())).is_err() {
                return;
            }
            while let Some(b) = stream.next().await {
                let b = b.map_err(|e| query_err(e, &task_limits));
                let failed = b.is_err();
                if tx.send(b).await.is_err() || failed {
                    return;
                }
            }
        }));
        let schema = wait(rt, &mut deadline, schema_rx)?
            .map_err(|_| BtuError::internal("the query task ended without a result"))??;
        Ok(Running {
            rt,
            schema,
            batches,
            deadline,
            _task: task,
        })
    }

    /// The next batch; `None` at the end.
    fn next(&mut self) -> Result<Option<RecordBatch>> {
        wait(self.rt, &mut self.deadline, self.batches.recv())?.transpose()
    }
}

/// A writer that keeps its first I/O error: the CSV writer flattens I/O errors into strings, and
/// a full disk or a closed pipe must still come out as an I/O error (exit 74).
struct Tracked<W> {
    inner: W,
    error: Arc<Mutex<Option<std::io::Error>>>,
}

impl<W: Write> Tracked<W> {
    fn keep<T>(&mut self, r: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &r {
            let mut slot = self.error.lock().expect("not poisoned");
            if slot.is_none() {
                *slot = Some(std::io::Error::new(e.kind(), e.to_string()));
            }
        }
        r
    }
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.inner.write(buf);
        self.keep(r)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.inner.flush();
        self.keep(r)
    }
}

/// Stream a result as text (`table`, `csv`, `json`) into `out`; `dest` names it in errors.
/// Returns the number of rows.
fn write_text(
    run: &mut Running,
    format: Format,
    limits: &Limits,
    out: impl Write,
    dest: &Path,
) -> Result<usize> {
    let error = Arc::new(Mutex::new(None));
    let mut out = Tracked {
        inner: BufWriter::with_capacity(1 << 16, out),
        error: error.clone(),
    };
    let write_err = |e: ArrowError| match error.lock().expect("not poisoned").take() {
        Some(io) => BtuError::io(dest, io),
        None if format == Format::Csv => BtuError::config(
            "--format",
            format!("cannot write CSV ({e}); use --format json or parquet for nested columns"),
        ),
        None => BtuError::internal(e),
    };
    let schema = run.schema.clone();
    let mut rows = 0usize;
    match format {
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            let mut any = false;
            while let Some(b) = run.next()? {
                rows += b.num_rows();
                w.write(&b).map_err(write_err)?;
                any = true;
            }
            if !any {
                // An empty result still gets its header.
                w.write(&RecordBatch::new_empty(schema))
                    .map_err(write_err)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut out);
            while let Some(b) = run.next()? {
                rows += b.num_rows();
                w.write(&b).map_err(write_err)?;
            }
            // Writes `[]` for an empty result.
            w.finish().map_err(write_err)?;
            out.write_all(b"\n").map_err(|e| BtuError::io(dest, e))?;
        }
        Format::Table => {
            // A pretty table needs every row: collect them, within --memory-limit.
            let mut batches = Vec::new();
            let mut bytes = 0usize;
            while let Some(b) = run.next()? {
                bytes += b.get_array_memory_size();
                if bytes > limits.memory_limit {
                    return Err(BtuError::config(
                        "--memory-limit",
                        format!(
                            "the result takes more than --memory-limit {} to print as a table; use --format csv or --format json (streamed), or --output FILE, or raise --memory-limit",
                            fmt_size(limits.memory_limit)
                        ),
                    ));
                }
                rows += b.num_rows();
                batches.push(b);
            }
            if batches.is_empty() {
                batches.push(RecordBatch::new_empty(schema));
            }
            let t = arrow::util::pretty::pretty_format_batches(&batches)
                .map_err(|e| BtuError::internal(e.to_string()))?;
            writeln!(out, "{t}").map_err(|e| BtuError::io(dest, e))?;
        }
        Format::Parquet | Format::Arrow => {
            return Err(BtuError::config(
                "--format",
                "parquet and arrow need --output FILE",
            ))
        }
    }
    out.flush().map_err(|e| BtuError::io(dest, e))?;
    Ok(rows)
}

/// Stream a result into a Parquet (zstd, as [`crate::io::tables::write_parquet`]) or Arrow IPC file.
fn write_binary(
    run: &mut Running,
    format: Format,
    file: &mut std::fs::File,
    dest: &Path,
) -> Result<usize> {
    let io = |e: &dyn std::fmt::Display| BtuError::io(dest, std::io::Error::other(e.to_string()));
    let schema = run.schema.clone();
    let mut rows = 0usize;
    if format == Format::Parquet {
        let mut sink = crate::io::tables::ParquetSink::new(file, dest, None);
        while let Some(b) = run.next()? {
            sink.write(&b)?;
        }
        rows = sink.finish(|| schema)?;
    } else {
        let mut w = arrow::ipc::writer::FileWriter::try_new(file, &schema)
            .map_err(|e| BtuError::internal(format!("arrow writer: {e}")))?;
        while let Some(b) = run.next()? {
            rows += b.num_rows();
            w.write(&b).map_err(|e| io(&e))?;
        }
        w.finish().map_err(|e| io(&e))?;
    }
    Ok(rows)
}

/// Run one query within `--timeout` and write its result (an `--output` file atomically);
/// returns its row count.
fn run_one(
    ctx: &SessionContext,
    sql: &str,
    job: &SqlJob,
    limits: &Limits,
    stdout: &mut dyn Write,
) -> Result<usize> {
    let mut run = Running::start(crate::io::corpus::runtime(), ctx, sql, limits)?;
    match &job.output {
        None => write_text(&mut run, job.format, limits, stdout, Path::new("stdout")),
        Some(p) => {
            let mut rows = 0;
            crate::io::output::write_file_atomic(p, job.overwrite, |file| {
                rows = match job.format {
                    Format::Parquet | Format::Arrow => write_binary(&mut run, job.format, file, p)?,
                    f => write_text(&mut run, f, limits, file, p)?,
                };
                Ok(())
            })?;
            Ok(rows)
        }
    }
}

/// The statements of `text` that end in a `;` of their own (not one inside a string, quoted
/// name or comment), without it, and the text after the last of them; `None` while `text` ends
/// inside a string or comment (or does not tokenize).
fn split_statements(text: &str) -> Option<(Vec<String>, String)> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, text)
        .tokenize_with_location()
        .ok()?;
    // The tokenizer counts lines at '\n' and columns in characters, from 1.
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let offset = |line: u64, column: u64| -> Option<usize> {
        let start = *line_starts.get(usize::try_from(line).ok()?.checked_sub(1)?)?;
        text[start..]
            .char_indices()
            .nth(usize::try_from(column).ok()?.checked_sub(1)?)
            .map(|(i, _)| start + i)
    };
    let mut statements = Vec::new();
    let mut cut = 0;
    for t in &tokens {
        if matches!(t.token, Token::SemiColon) {
            let at = offset(t.span.start.line, t.span.start.column)?;
            if at < cut || text.as_bytes().get(at) != Some(&b';') {
                return None;
            }
            statements.push(text[cut..at].to_string());
            cut = at + 1;
        }
    }
    Some((statements, text[cut..].to_string()))
}

/// Whether a statement holds nothing but whitespace and comments.
fn is_blank(statement: &str) -> bool {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    match Tokenizer::new(&GenericDialect {}, statement).tokenize() {
        Ok(tokens) => tokens
            .iter()
            .all(|t| matches!(t, Token::Whitespace(_) | Token::EOF)),
        Err(_) => statement.trim().is_empty(),
    }
}

/// Failures of the output itself (stdout closed, output file unwritable) end a run of queries
/// from standard input; a failed query does not.
fn ends_the_run(e: &BtuError) -> bool {
    matches!(
        e,
        BtuError::Io { .. } | BtuError::OutputExists { .. } | BtuError::OutputUnwritable { .. }
    )
}

/// `btu sql`'s result (the query results themselves go to stdout or `--output`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SqlReport {
    /// `sql`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The tables registered.
    pub tables: Vec<String>,
    /// Queries run.
    pub queries: usize,
    /// Result rows, all queries together.
    pub rows: usize,
    /// The output file, when given.
    pub output: Option<PathBuf>,
}

/// `btu sql`: results to `stdout` (or `--output`); returns a summary. With queries from standard
/// input, each query runs (the last one may lack its `;`) even when an earlier one failed; the
/// run then fails with the first failure.
pub fn run(job: &SqlJob, stdout: &mut dyn Write) -> Result<SqlReport> {
    if job.memory_limit == 0 {
        return Err(BtuError::config(
            "--memory-limit",
            "0 is not a size above 0; give e.g. --memory-limit 512M or 2G",
        ));
    }
    if let Some(p) = &job.output {
        crate::io::output::check_output(p, job.overwrite)?;
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
    let limits = Limits {
        timeout: job.timeout,
        memory_limit: job.memory_limit,
        remote: sources
            .iter()
            .any(|s| is_remote(&s.path) || s.files.iter().any(|f| is_remote(&f.path))),
    };
    let ctx = session(job.memory_limit)?;
    let mut names = Vec::new();
    crate::io::corpus::runtime().block_on(async {
        for src in &sources {
            register(&ctx, src).await?;
            names.push(src.name.clone());
        }
        Ok::<_, BtuError>(())
    })?;
    let mut rows = 0usize;
    let mut queries = 0usize;
    match &job.query {
        Some(q) => {
            rows += run_one(&ctx, q, job, &limits, stdout)?;
            queries += 1;
        }
        None => {
            // Queries from standard input, separated by ';'; each runs as soon as it is
            // complete, the last one also without its ';'.
            let stdin = std::io::stdin();
            let mut lines = stdin.lock().lines();
            let mut pending = String::new();
            let mut first_failure: Option<BtuError> = None;
            let mut failed = 0usize;
            loop {
                let next = lines.next();
                let eof = next.is_none();
                let mut ready = Vec::new();
                if let Some(line) = next {
                    let line = line.map_err(|e| BtuError::io("stdin", e))?;
                    pending.push_str(&line);
                    pending.push('\n');
                    if line.contains(';') {
                        if let Some((done, rest)) = split_statements(&pending) {
                            ready = done;
                            pending = rest;
                        }
                    }
                } else {
                    let rest = std::mem::take(&mut pending);
                    match split_statements(&rest) {
                        Some((done, rest)) => {
                            ready = done;
                            ready.push(rest);
                        }
                        None => ready.push(rest),
                    }
                }
                for q in ready.iter().filter(|q| !is_blank(q)) {
                    let n = queries + failed + 1;
                    match run_one(&ctx, q, job, &limits, stdout) {
                        Ok(r) => {
                            rows += r;
                            queries += 1;
                        }
                        Err(e) if ends_the_run(&e) => return Err(e),
                        Err(e) => {
                            tracing::error!("query {n}: {}", one_line(&e.to_string()));
                            failed += 1;
                            first_failure.get_or_insert(e);
                        }
                    }
                }
                if eof {
                    break;
                }
            }
            if let Some(e) = first_failure {
                return Err(e);
            }
        }
    }
    Ok(SqlReport {
        command: "sql".into(),
        version: crate::VERSION.into(),
        tables: names,
        queries,
        rows,
        output: job.output.clone(),
    })
}
