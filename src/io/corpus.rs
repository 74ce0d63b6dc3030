//! Corpus ingest through DataFusion: Parquet files, directories or globs, read file by file in a
//! fixed order and streamed as record batches (never the whole corpus at once), with column and
//! type checks, an optional SQL filter, `--limit` / `--sample`, and a fingerprint for provenance.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{BtuError, Result};

/// The shared tokio runtime DataFusion runs on.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// What to read and how.
#[derive(Debug, Clone, Serialize)]
pub struct CorpusSpec {
    /// Files, directories or glob patterns.
    pub inputs: Vec<String>,
    /// Text column (`--text-col`).
    pub text_col: String,
    /// Label column (`--label-col`); `None` when labels are not needed.
    pub label_col: Option<String>,
    /// SQL predicate over the corpus columns (`--filter`).
    pub filter: Option<String>,
    /// Stop after this many rows (`--limit`), counted after filter and sample.
    pub limit: Option<u64>,
    /// Keep each row with this probability, decided by a seeded hash of its position (`--sample`).
    pub sample: Option<f64>,
    /// Seed of `--sample`.
    pub seed: u64,
    /// Read files without the label column too (their labels are then unknown).
    #[serde(default)]
    pub label_optional: bool,
    /// Read only this shard's row groups (`btu scan --shard I/N`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::io::shard::Shard>,
    /// Skip rows whose trimmed text has one of these sha256 hashes (`btu defend --drop-overlap`).
    #[serde(skip)]
    pub exclude_texts: std::collections::BTreeSet<[u8; 32]>,
}

impl CorpusSpec {
    /// A spec reading `inputs` with the default columns `text` and `label`.
    pub fn new(inputs: Vec<String>) -> Self {
        CorpusSpec {
            inputs,
            text_col: "text".into(),
            label_col: Some("label".into()),
            filter: None,
            limit: None,
            sample: None,
            seed: 0,
            label_optional: false,
            shard: None,
            exclude_texts: Default::default(),
        }
    }
}

/// One input file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InputFile {
    /// Path as given or resolved.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Rows of each row group (from the footer).
    #[serde(skip)]
    pub row_groups: Vec<u64>,
    /// The file's columns as Arrow reads them (from the footer).
    #[serde(skip)]
    pub schema: Option<arrow::datatypes::SchemaRef>,
}

/// Provenance of a corpus read: which files, how many rows, and a hash of their content.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Fingerprint {
    /// The resolved input files, in reading order.
    pub files: Vec<InputFile>,
    /// Rows delivered (after filter, sample and limit).
    pub rows: u64,
    /// sha256 over every row's text and label, in reading order.
    pub content_sha256: String,
    /// The `--filter` predicate applied, if any.
    pub filter: Option<String>,
    /// The `--limit` applied, if any.
    pub limit: Option<u64>,
    /// The `--sample` fraction applied, if any.
    pub sample: Option<f64>,
    /// The shard read (`I/N`), if any: `files` are the shard's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

impl Fingerprint {
    /// JSON form for table metadata and summaries.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("fingerprint serializes")
    }
}

/// A batch of corpus rows, already checked: texts non-null, labels non-null integers.
pub struct CorpusBatch {
    /// File the rows come from.
    pub source: Arc<str>,
    /// Row numbers within that file (0-based, before filtering).
    pub rows: Vec<u64>,
    /// The texts.
    pub texts: Vec<String>,
    /// The labels, when a label column was asked for.
    pub labels: Option<Vec<i64>>,
    /// The full input batch (all columns), rows aligned with `texts`.
    pub batch: RecordBatch,
}

/// Resolve inputs (files, directories, globs) into a sorted, de-duplicated file list.
pub fn resolve_inputs(inputs: &[String]) -> Result<Vec<InputFile>> {
    if inputs.is_empty() {
        return Err(BtuError::config(
            "--corpus",
            "no corpus given; name one or more Parquet files, directories or globs",
        ));
    }
    let mut files: Vec<PathBuf> = Vec::new();
    let mut remote: Vec<InputFile> = Vec::new();
    for input in inputs {
        if crate::io::store::S3Url::parse(input).is_some() {
            remote.extend(
                crate::io::store::resolve(input)?
                    .into_iter()
                    .map(|(path, bytes)| InputFile {
                        path,
                        bytes,
                        row_groups: Vec::new(),
                        schema: None,
                    }),
            );
            continue;
        }
        let local = input.strip_prefix("file://").unwrap_or(input);
        if local.contains(['*', '?', '[']) {
            let mut hits: Vec<PathBuf> = glob::glob(local)
                .map_err(|e| BtuError::config("--corpus", format!("bad glob '{input}': {e}")))?
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect();
            if hits.is_empty() {
                return Err(BtuError::missing(input, "the glob matched no file"));
            }
            hits.sort();
            files.extend(hits);
            continue;
        }
        let p = Path::new(local);
        let meta = std::fs::metadata(p).map_err(|_| {
            BtuError::missing(
                input,
                "check the path of the corpus (a Parquet file, directory or glob)",
            )
        })?;
        if meta.is_dir() {
            let mut hits = Vec::new();
            collect_parquet(p, &mut hits).map_err(|e| BtuError::io(p, e))?;
            if hits.is_empty() {
                return Err(BtuError::missing(
                    input,
                    "the directory holds no *.parquet file",
                ));
            }
            hits.sort();
            files.extend(hits);
        } else {
            files.push(p.to_path_buf());
        }
    }
    // The same file named twice (by two globs, or `a b a`) is read once, in first-seen order.
    let mut seen = std::collections::BTreeSet::new();
    files.retain(|p| seen.insert(p.clone()));
    let mut local: Vec<InputFile> = files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::metadata(&p)
                .map_err(|e| BtuError::io(&p, e))?
                .len();
            Ok(InputFile {
                path: p.display().to_string(),
                bytes,
                row_groups: Vec::new(),
                schema: None,
            })
        })
        .collect::<Result<_>>()?;
    local.extend(remote);
    for f in &mut local {
        let meta = check_parquet_file(f)?;
        f.row_groups = meta
            .row_groups()
            .iter()
            .map(|rg| rg.num_rows().max(0) as u64)
            .collect();
        let fm = meta.file_metadata();
        f.schema =
            parquet::arrow::parquet_to_arrow_schema(fm.schema_descr(), fm.key_value_metadata())
                .ok()
                .map(Arc::new);
    }
    Ok(local)
}

/// Refuse (65, `message` says what to do) inputs whose files have different columns, from their
/// footers alone: for a step that writes the rows back as one file, before any work.
pub fn check_same_columns(inputs: &[String], message: &str) -> Result<()> {
    let files = resolve_inputs(inputs)?;
    let columns = |f: &InputFile| f.schema.as_ref().map(|s| s.fields().clone());
    match files.split_first() {
        Some((first, rest)) => match rest.iter().find(|f| columns(f) != columns(first)) {
            Some(other) => Err(BtuError::bad_data(&other.path, message)),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

fn collect_parquet(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        if p.is_dir() {
            collect_parquet(&p, out)?;
        } else if name.ends_with(".parquet") {
            out.push(p);
        }
    }
    Ok(())
}

/// Check a file is Parquet before any reader touches it: `PAR1` at both ends and a footer
/// length that fits in the file (a corrupt length made the Parquet readers panic). Returns the
/// decoded footer.
pub fn check_parquet_file(f: &InputFile) -> Result<parquet::file::metadata::ParquetMetaData> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |what: String| BtuError::bad_data(&f.path, what);
    let not_parquet = || bad("not a Parquet file (no PAR1 magic); pass Parquet files only".into());
    if f.bytes < 12 {
        return Err(not_parquet());
    }
    let remote = crate::io::store::S3Url::parse(&f.path).is_some();
    let io = |e| BtuError::io(&f.path, e);
    // One open for the three reads of a local file (`&File` reads and seeks).
    let local = if remote {
        None
    } else {
        Some(std::fs::File::open(&f.path).map_err(io)?)
    };
    let read = |start: u64, end: u64| -> Result<Vec<u8>> {
        let Some(mut file) = local.as_ref() else {
            return crate::io::store::read_range(&f.path, start, end);
        };
        let mut buf = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        file.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    };
    let (head, tail) = (read(0, 4)?, read(f.bytes - 8, f.bytes)?);
    if head != b"PAR1" || &tail[4..] != b"PAR1" {
        return Err(not_parquet());
    }
    let footer = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if footer + 12 > f.bytes {
        return Err(bad(format!(
            "corrupt Parquet file: its footer claims {footer} bytes of metadata but the file has {} bytes; re-export the file",
            f.bytes
        )));
    }
    // The footer itself: decoded here so that a damaged one is a clear 65, and so that duplicate
    // column names (which the SQL layer silently merges into one) are refused.
    let meta = read(f.bytes - 8 - footer, f.bytes - 8)?;
    let meta = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&meta)
        .map_err(|e| bad(format!("corrupt Parquet footer ({e}); re-export the file")))?;
    let mut seen = std::collections::BTreeSet::new();
    for field in meta
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
    {
        if !seen.insert(field.name().to_string()) {
            return Err(bad(format!(
                "column '{}' appears more than once; give every column its own name",
                field.name()
            )));
        }
    }
    Ok(meta)
}

fn df_err(src: &str, e: impl std::fmt::Display) -> BtuError {
    let msg = e.to_string();
    if crate::io::store::S3Url::parse(src).is_some() && crate::io::store::is_temporary(&msg) {
        return BtuError::Temporary {
            context: src.to_string(),
            message: msg.split_whitespace().collect::<Vec<_>>().join(" "),
        };
    }
    BtuError::bad_data(src, format!("cannot read as Parquet: {msg}"))
}

/// Whether a data type holds text (plain or dictionary-encoded strings).
pub fn is_text(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_text(v),
        _ => false,
    }
}

fn is_integer(t: &DataType) -> bool {
    t.is_integer()
}

/// Deterministic keep/drop for `--sample`: a SplitMix64 hash of (seed, position).
fn sample_keep(seed: u64, position: u64, fraction: f64) -> bool {
    let mut z = seed ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// Read the corpus batch by batch, calling `each` for every checked batch; returns the
/// fingerprint of what was read. Fails on an empty result.
pub fn read_corpus(
    spec: &CorpusSpec,
    each: impl FnMut(CorpusBatch) -> Result<()>,
) -> Result<Fingerprint> {
    check_spec(spec)?;
    read_files(spec, resolve_inputs(&spec.inputs)?, each)
}

/// The checks of a spec that need no I/O (`--sample`'s range; `--shard` with `--limit` or
/// `--sample`), for callers that resolve the inputs themselves before [`read_files`].
pub fn check_spec(spec: &CorpusSpec) -> Result<()> {
    check_sample(spec)?;
    crate::io::shard::check_compatible(spec.shard, spec.limit, spec.sample)
}

/// [`read_corpus`] over inputs already resolved by [`resolve_inputs`] (for a caller that needs
/// the files' footers first, without reading them twice); `spec` checked by [`check_spec`].
pub fn read_files(
    spec: &CorpusSpec,
    all: Vec<InputFile>,
    mut each: impl FnMut(CorpusBatch) -> Result<()>,
) -> Result<Fingerprint> {
    let (files, reads) = file_reads(all, spec.shard);
    let mut rows = RowSelection::new(spec);
    runtime().block_on(async {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        for (f, read) in files.iter().zip(&reads) {
            if rows.full() {
                break;
            }
            let (df, eff) = open_file(&ctx, f, spec).await?;
            let predicate = filter_predicate(&ctx, &df, spec)?;
            let mut stream = stream_row_groups(&ctx, df, f, read.row_groups).await?;
            let source: Arc<str> = Arc::from(f.path.as_str());
            let mut file_row: u64 = read.first_row;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| df_err(&f.path, e))?;
                let n = batch.num_rows();
                let keep = row_mask(&batch, predicate.as_deref(), spec)?;
                let idx = rows.select(&keep);
                let first = file_row;
                file_row += n as u64;
                if idx.is_empty() {
                    continue;
                }
                let take = arrow::array::UInt64Array::from(idx.clone());
                let batch = arrow::compute::take_record_batch(&batch, &take)
                    .map_err(|e| BtuError::internal(format!("take: {e}")))?;
                let rows_in_file = idx.iter().map(|i| first + i).collect();
                let cb = check_batch(&eff, &f.path, source.clone(), batch, rows_in_file)?;
                rows.record(&cb);
                each(cb)?;
                if rows.full() {
                    break;
                }
            }
        }
        Ok::<(), BtuError>(())
    })?;
    rows.fingerprint(files, spec)
}

/// The files to read and, per file, which row groups: all of every file, or a shard's.
fn file_reads(
    files: Vec<InputFile>,
    shard: Option<crate::io::shard::Shard>,
) -> (Vec<InputFile>, Vec<crate::io::shard::ShardFile>) {
    let Some(shard) = shard else {
        let reads = files
            .iter()
            .map(|f| crate::io::shard::ShardFile {
                path: f.path.clone(),
                row_groups: [0, f.row_groups.len()],
                first_row: 0,
                rows: f.row_groups.iter().sum(),
            })
            .collect();
        return (files, reads);
    };
    let item = crate::io::shard::plan(&files, shard.count).swap_remove(shard.index);
    let files = item
        .files
        .iter()
        .map(|r| {
            files
                .iter()
                .find(|f| f.path == r.path)
                .expect("planned from these files")
                .clone()
        })
        .collect();
    (files, item.files)
}

/// Stream a file's row groups `[start, end)`: the whole frame, or (for a shard) the frame's scan
/// given a Parquet access plan naming those row groups.
async fn stream_row_groups(
    ctx: &SessionContext,
    df: datafusion::prelude::DataFrame,
    f: &InputFile,
    [start, end]: [usize; 2],
) -> Result<datafusion::physical_plan::SendableRecordBatchStream> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::datasource::physical_plan::parquet::ParquetAccessPlan;
    use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig};
    use datafusion::datasource::source::DataSourceExec;
    let groups = f.row_groups.len();
    if start == 0 && end == groups {
        return df.execute_stream().await.map_err(|e| df_err(&f.path, e));
    }
    let mut access = ParquetAccessPlan::new_none(groups);
    (start..end).for_each(|rg| access.scan(rg));
    let plan = df
        .create_physical_plan()
        .await
        .map_err(|e| df_err(&f.path, e))?;
    let mut scans = 0;
    let plan = plan
        .transform_up(|node| {
            let any: &dyn std::any::Any = node.as_ref();
            let Some(config) = any.downcast_ref::<DataSourceExec>().and_then(|exec| {
                let source: &dyn std::any::Any = exec.data_source().as_ref();
                source.downcast_ref::<FileScanConfig>()
            }) else {
                return Ok(Transformed::no(node));
            };
            let mut config = config.clone();
            config.file_groups = std::mem::take(&mut config.file_groups)
                .into_iter()
                .map(|g| {
                    FileGroup::new(
                        g.into_inner()
                            .into_iter()
                            .map(|file| file.with_extension(access.clone()))
                            .collect(),
                    )
                })
                .collect();
            scans += 1;
            Ok(Transformed::yes(DataSourceExec::from_data_source(config)
                as Arc<dyn datafusion::physical_plan::ExecutionPlan>))
        })
        .map_err(|e| df_err(&f.path, e))?
        .data;
    if scans != 1 {
        return Err(BtuError::internal(format!(
            "{}: expected one Parquet scan to restrict to row groups {start}..{end}, found {scans}",
            f.path
        )));
    }
    datafusion::physical_plan::execute_stream(plan, ctx.task_ctx()).map_err(|e| df_err(&f.path, e))
}

/// `--sample` must be a fraction in (0, 1].
fn check_sample(spec: &CorpusSpec) -> Result<()> {
    match spec.sample {
        Some(s) if !(s > 0.0 && s <= 1.0) => Err(BtuError::config(
            "--sample",
            format!("{s} is not a fraction in (0, 1]"),
        )),
        _ => Ok(()),
    }
}

/// Open one Parquet file (registering its object store) and check its columns; returns the
/// frame and the spec that applies to it (the label column dropped where it is optional and
/// absent).
async fn open_file(
    ctx: &SessionContext,
    f: &InputFile,
    spec: &CorpusSpec,
) -> Result<(datafusion::prelude::DataFrame, CorpusSpec)> {
    let ext = Path::new(&f.path)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    let ext = if ext.is_empty() {
        String::new()
    } else {
        format!(".{ext}")
    };
    if let Some(u) = crate::io::store::S3Url::parse(&f.path) {
        ctx.register_object_store(&u.root(), crate::io::store::s3_store(&u.bucket)?);
    }
    let opts = ParquetReadOptions {
        file_extension: &ext,
        ..Default::default()
    };
    let df = ctx
        .read_parquet(f.path.clone(), opts)
        .await
        .map_err(|e| df_err(&f.path, e))?;
    let eff = check_columns(df.schema().as_arrow(), spec, &f.path)?;
    Ok((df, eff))
}

/// The text column must be a string type and the label column (unless optional and absent)
/// an integer type.
fn check_columns(
    schema: &arrow::datatypes::Schema,
    spec: &CorpusSpec,
    path: &str,
) -> Result<CorpusSpec> {
    let text_field = schema.field_with_name(&spec.text_col).map_err(|_| {
        BtuError::bad_data(
            path,
            format!(
                "missing text column '{}' (columns: {}); name it with --text-col",
                spec.text_col,
                column_names(schema)
            ),
        )
    })?;
    if !is_text(text_field.data_type()) {
        return Err(BtuError::bad_data(
            path,
            format!("text column '{}' has type {}, expected a string type; pick another with --text-col", spec.text_col, text_field.data_type()),
        ));
    }
    let mut eff = spec.clone();
    if spec.label_optional
        && spec
            .label_col
            .as_ref()
            .is_some_and(|lc| schema.field_with_name(lc).is_err())
    {
        eff.label_col = None;
    }
    if let Some(lc) = &eff.label_col {
        let lf = schema.field_with_name(lc).map_err(|_| {
            BtuError::bad_data(
                path,
                format!(
                    "missing label column '{lc}' (columns: {}); name it with --label-col",
                    column_names(schema)
                ),
            )
        })?;
        if !is_integer(lf.data_type()) {
            return Err(BtuError::bad_data(
                path,
                format!("label column '{lc}' has type {}, expected integers; pick another with --label-col", lf.data_type()),
            ));
        }
    }
    Ok(eff)
}

type Predicate = Arc<dyn datafusion::physical_plan::PhysicalExpr>;

/// `--filter` compiled against the file's schema.
fn filter_predicate(
    ctx: &SessionContext,
    df: &datafusion::prelude::DataFrame,
    spec: &CorpusSpec,
) -> Result<Option<Predicate>> {
    let Some(sql) = &spec.filter else {
        return Ok(None);
    };
    let bad = |e: datafusion::error::DataFusionError| {
        BtuError::config("--filter", format!("'{sql}': {e}"))
    };
    let expr = df.parse_sql_expr(sql).map_err(bad)?;
    Ok(Some(
        ctx.create_physical_expr(expr, df.schema()).map_err(bad)?,
    ))
}

/// The rows of `batch` that pass `--filter` and are not excluded by text.
fn row_mask(
    batch: &RecordBatch,
    predicate: Option<&dyn datafusion::physical_plan::PhysicalExpr>,
    spec: &CorpusSpec,
) -> Result<Vec<bool>> {
    let n = batch.num_rows();
    let mut keep: Vec<bool> = vec![true; n];
    if let Some(p) = predicate {
        let v = p
            .evaluate(batch)
            .and_then(|v| v.into_array(n))
            .map_err(|e| BtuError::config("--filter", format!("cannot evaluate: {e}")))?;
        let mask = v.as_boolean_opt().ok_or_else(|| {
            BtuError::config("--filter", "the predicate must be a boolean expression")
        })?;
        for (i, k) in keep.iter_mut().enumerate() {
            *k = mask.is_valid(i) && mask.value(i);
        }
    }
    if !spec.exclude_texts.is_empty() {
        exclude_rows(batch, &spec.text_col, &spec.exclude_texts, &mut keep);
    }
    Ok(keep)
}

/// `--sample` and `--limit` over the rows that pass the filter, and the content hash of the
/// rows read.
struct RowSelection {
    sample: Option<f64>,
    seed: u64,
    limit: Option<u64>,
    /// Rows that passed the filter so far (the sample's position).
    position: u64,
    /// Rows handed out so far.
    rows_out: u64,
    hasher: Sha256,
}

impl RowSelection {
    fn new(spec: &CorpusSpec) -> Self {
        RowSelection {
            sample: spec.sample,
            seed: spec.seed,
            limit: spec.limit,
            position: 0,
            rows_out: 0,
            hasher: Sha256::new(),
        }
    }

    /// Whether `--limit` rows have been read.
    fn full(&self) -> bool {
        self.limit.is_some_and(|l| self.rows_out >= l)
    }

    /// Indices of the rows of a batch to read, given which pass the filter.
    fn select(&mut self, keep: &[bool]) -> Vec<u64> {
        let mut idx: Vec<u64> = Vec::new();
        for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
            let pos = self.position;
            self.position += 1;
            if self.sample.is_some_and(|s| !sample_keep(self.seed, pos, s)) {
                continue;
            }
            if self
                .limit
                .is_some_and(|l| self.rows_out + idx.len() as u64 >= l)
            {
                break;
            }
            idx.push(i as u64);
        }
        idx
    }

    /// Count a checked batch and hash its texts and labels.
    fn record(&mut self, cb: &CorpusBatch) {
        for (i, t) in cb.texts.iter().enumerate() {
            self.hasher.update((t.len() as u64).to_le_bytes());
            self.hasher.update(t.as_bytes());
            if let Some(l) = &cb.labels {
                self.hasher.update(l[i].to_le_bytes());
            }
        }
        self.rows_out += cb.texts.len() as u64;
    }

    /// The fingerprint of what was read; an empty result is an error.
    fn fingerprint(self, files: Vec<InputFile>, spec: &CorpusSpec) -> Result<Fingerprint> {
        // A shard may be empty (coarse row groups, or a filter); a whole corpus may not.
        if let (0, Some(shard)) = (self.rows_out, spec.shard) {
            tracing::warn!(
                "shard {shard} read no row (more shards than row groups, or --filter left none)"
            );
        }
        if self.rows_out == 0 && spec.shard.is_none() {
            let what = files
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(BtuError::bad_data(
                what,
                "the corpus has no rows (after --filter/--sample/--limit); give a corpus with data",
            ));
        }
        Ok(Fingerprint {
            files,
            rows: self.rows_out,
            content_sha256: hex::encode(self.hasher.finalize()),
            filter: spec.filter.clone(),
            limit: spec.limit,
            sample: spec.sample,
            shard: spec.shard.map(|s| s.to_string()),
        })
    }
}

/// sha256 of a row's text as the overlap checks compare it (surrounding white space trimmed).
pub fn text_sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.trim().as_bytes()).into()
}

/// Unset `keep` for rows whose text hash is in `exclude`.
fn exclude_rows(
    batch: &RecordBatch,
    text_col: &str,
    exclude: &std::collections::BTreeSet<[u8; 32]>,
    keep: &mut [bool],
) {
    let Some(col) = batch
        .column_by_name(text_col)
        .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
    else {
        return;
    };
    let texts = col.as_string::<i32>();
    for (i, k) in keep.iter_mut().enumerate() {
        if *k && texts.is_valid(i) && exclude.contains(&text_sha256(texts.value(i))) {
            *k = false;
        }
    }
}

fn column_names(schema: &arrow::datatypes::Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_batch(
    spec: &CorpusSpec,
    path: &str,
    source: Arc<str>,
    batch: RecordBatch,
    rows: Vec<u64>,
) -> Result<CorpusBatch> {
    let text = batch.column_by_name(&spec.text_col).expect("checked above");
    let text: ArrayRef = arrow::compute::cast(text, &DataType::Utf8)
        .map_err(|e| BtuError::bad_data(path, e.to_string()))?;
    let text = text
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8");
    if text.null_count() > 0 {
        let i = (0..text.len()).find(|&i| text.is_null(i)).unwrap_or(0);
        return Err(BtuError::bad_data(
            path,
            format!(
                "text column '{}' is null at row {}; drop such rows with --filter \"{} IS NOT NULL\"",
                spec.text_col, rows[i], spec.text_col
            ),
        ));
    }
    let texts: Vec<String> = text
        .iter()
        .map(|t| t.unwrap_or_default().to_string())
        .collect();
    let labels = match &spec.label_col {
        Some(lc) => {
            let l = batch.column_by_name(lc).expect("checked above");
            let l = arrow::compute::cast(l, &DataType::Int64)
                .map_err(|e| BtuError::bad_data(path, e.to_string()))?;
            let l = l
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("cast to Int64");
            if l.null_count() > 0 {
                let i = (0..l.len()).find(|&i| l.is_null(i)).unwrap_or(0);
                return Err(BtuError::bad_data(
                    path,
                    format!("label column '{lc}' is null at row {}; drop such rows with --filter \"{lc} IS NOT NULL\"", rows[i]),
                ));
            }
            Some(l.values().to_vec())
        }
        None => None,
    };
    Ok(CorpusBatch {
        source,
        rows,
        texts,
        labels,
        batch,
    })
}
