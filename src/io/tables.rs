//! Every table btu writes, in one place: Arrow schemas (the contract of design.md "Tables"),
//! row types, writers (Arrow IPC *file* format, atomically) and readers, and the JSON form of the
//! schemas that `schemas/*.schema.json` holds.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Int64Array, ListArray, RecordBatch, StringArray,
    UInt32Array, UInt64Array, UInt8Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use serde_json::{json, Value};

use crate::error::{BtuError, Result};
use crate::io::output::write_file_atomic;

/// Provenance carried in every table's schema metadata.
#[derive(Debug, Clone)]
pub struct TableMeta {
    /// The btu command that wrote the table (`detect`, `unlearn`...).
    pub command: String,
    /// Effective parameters (written as canonical JSON).
    pub params: Value,
    /// sha256 of the model's weights file.
    pub model_sha256: String,
    /// Canonical JSON of the corpus fingerprint, where a corpus was read.
    pub corpus_fingerprint: Option<Value>,
    /// Table-specific keys (`btu:threshold_rule`...).
    pub extra: Vec<(String, String)>,
}

impl TableMeta {
    fn to_map(&self) -> std::collections::HashMap<String, String> {
        let mut m = std::collections::HashMap::new();
        m.insert("btu:version".into(), crate::VERSION.to_string());
        m.insert("btu:command".into(), self.command.clone());
        m.insert("btu:params".into(), canonical_json(&self.params));
        m.insert("btu:model_sha256".into(), self.model_sha256.clone());
        if let Some(fp) = &self.corpus_fingerprint {
            m.insert("btu:corpus_fingerprint".into(), canonical_json(fp));
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

/// JSON with object keys sorted at every level and no whitespace: equal values give equal bytes.
pub fn canonical_json(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, sort(v))).collect();
                let mut out = serde_json::Map::new();
                for (k, v) in sorted {
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(v)).expect("json values serialize")
}

fn list_u8() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::UInt8, false)))
}

/// `token_scores`: one row per round x vocabulary token.
pub fn token_scores_schema() -> Schema {
    Schema::new(vec![
        Field::new("round", DataType::UInt8, false),
        Field::new("token_id", DataType::UInt32, false),
        Field::new("token", DataType::Utf8, false),
        Field::new("special", DataType::Boolean, false),
        Field::new("distance", DataType::Float32, false),
        Field::new("rank", DataType::UInt32, true),
        Field::new("selected", DataType::Boolean, false),
    ])
}

/// `suspicious_tokens`: one row per token in the union `T`.
pub fn suspicious_tokens_schema() -> Schema {
    Schema::new(vec![
        Field::new("token_id", DataType::UInt32, false),
        Field::new("token", DataType::Utf8, false),
        Field::new("rounds", list_u8(), false),
        Field::new("best_rank", DataType::UInt32, false),
        Field::new("max_distance", DataType::Float32, false),
        Field::new("occurrences", DataType::UInt64, false),
        Field::new("documents", DataType::UInt64, false),
        Field::new("majority_label", DataType::Int64, true),
        Field::new("label_share", DataType::Float32, true),
    ])
}

/// `dimension_masks`: one row per replaced embedding dimension.
pub fn dimension_masks_schema() -> Schema {
    Schema::new(vec![
        Field::new("token_id", DataType::UInt32, false),
        Field::new("token", DataType::Utf8, false),
        Field::new("dim", DataType::UInt32, false),
        Field::new("reference", DataType::Float32, false),
        Field::new("trained", DataType::Float32, false),
        Field::new("delta", DataType::Float32, false),
        Field::new("written", DataType::Float32, false),
    ])
}

/// `token_effects`: one row per verified-or-rejected candidate (`btu verify`).
pub fn token_effects_schema() -> Schema {
    Schema::new(vec![
        Field::new("candidate", DataType::Utf8, false),
        Field::new(
            "token_ids",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
            false,
        ),
        Field::new("rows", DataType::UInt32, false),
        Field::new("flips", DataType::UInt32, false),
        Field::new("flip_rate", DataType::Float32, false),
        Field::new("to_label", DataType::Int64, true),
        Field::new("ci_low", DataType::Float32, false),
        Field::new("ci_high", DataType::Float32, false),
        Field::new("clean_rows_with", DataType::UInt32, false),
        Field::new("clean_share", DataType::Float32, true),
        Field::new("explained", DataType::Boolean, false),
        Field::new("verified", DataType::Boolean, false),
        Field::new("control_flips", DataType::UInt32, true),
        Field::new("control_flip_rate", DataType::Float32, true),
        Field::new("excess_ci_low", DataType::Float32, true),
    ])
}

/// `flagged_rows` (Parquet, written by `btu scan`); `id` is present, with the corpus's own type,
/// when the corpus has one.
pub fn flagged_rows_schema(id: Option<DataType>) -> Schema {
    let mut f = vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("row", DataType::UInt64, false),
    ];
    if let Some(t) = id {
        f.push(Field::new("id", t, true));
    }
    f.extend([
        Field::new("label", DataType::Int64, true),
        Field::new(
            "tokens",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        ),
        Field::new(
            "token_ids",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
            false,
        ),
        Field::new("hits", DataType::UInt32, false),
    ]);
    Schema::new(f)
}

/// Names and schemas of every table with a committed `schemas/<name>.schema.json`.
pub fn all_schemas() -> Vec<(&'static str, Schema, Vec<&'static str>)> {
    let common = vec![
        "btu:version",
        "btu:command",
        "btu:params",
        "btu:model_sha256",
    ];
    let with_corpus = {
        let mut v = common.clone();
        v.push("btu:corpus_fingerprint");
        v
    };
    let mut masks = common.clone();
    masks.extend([
        "btu:threshold_rule",
        "btu:threshold",
        "btu:replacement",
        "btu:pad_token_id",
        "btu:vocab_size",
        "btu:hidden_size",
    ]);
    let mut effects = common.clone();
    effects.extend(["btu:test", "btu:min_flip_rate", "btu:control"]);
    vec![
        ("token_scores", token_scores_schema(), with_corpus.clone()),
        ("suspicious_tokens", suspicious_tokens_schema(), with_corpus),
        ("dimension_masks", dimension_masks_schema(), masks),
        ("token_effects", token_effects_schema(), effects),
        // `id` shown as Int64: it passes through with the corpus's own type.
        (
            "flagged_rows",
            flagged_rows_schema(Some(DataType::Int64)),
            vec![],
        ),
    ]
}

/// Metadata keys a table carries only sometimes: `dimension_masks`' `btu:pad_token`, written when
/// the model has no padding token of its own (GPT-2) and another stands in.
pub fn optional_metadata_keys(name: &str) -> &'static [&'static str] {
    match name {
        "dimension_masks" => &["btu:pad_token"],
        _ => &[],
    }
}

/// The JSON document committed as `schemas/<name>.schema.json`.
pub fn schema_json(name: &str, schema: &Schema, metadata_keys: &[&str]) -> Value {
    let fields: Vec<Value> = schema
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()}))
        .collect();
    let mut doc = json!({
        "table": name,
        "format": if name == "flagged_rows" { "Parquet" } else { "Arrow IPC file" },
        "fields": fields,
        "metadata_keys": metadata_keys,
    });
    let optional = optional_metadata_keys(name);
    if !optional.is_empty() {
        doc["optional_metadata_keys"] = json!(optional);
    }
    doc
}

/// Write one record batch as an Arrow IPC file, atomically.
pub fn write_ipc(path: &Path, batch: &RecordBatch, overwrite: bool) -> Result<()> {
    write_file_atomic(path, overwrite, |f| {
        let mut w = FileWriter::try_new(f, &batch.schema())
            .map_err(|e| BtuError::internal(format!("arrow writer: {e}")))?;
        w.write(batch)
            .map_err(|e| BtuError::io(path, std::io::Error::other(e)))?;
        w.finish()
            .map_err(|e| BtuError::io(path, std::io::Error::other(e)))?;
        Ok(())
    })
}

/// Read every batch of an Arrow IPC file and concatenate them.
pub fn read_ipc(path: &Path) -> Result<RecordBatch> {
    let f = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            BtuError::missing(path.display().to_string(), "check the path")
        }
        _ => BtuError::io(path, e),
    })?;
    let reader = FileReader::try_new(f, None).map_err(|e| {
        BtuError::bad_data(
            path.display().to_string(),
            format!("not an Arrow IPC file: {e}"),
        )
    })?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader.collect::<std::result::Result<_, _>>().map_err(|e| {
        BtuError::bad_data(
            path.display().to_string(),
            format!("corrupt Arrow IPC file: {e}"),
        )
    })?;
    arrow::compute::concat_batches(&schema, &batches)
        .map_err(|e| BtuError::bad_data(path.display().to_string(), e.to_string()))
}

fn with_meta(schema: Schema, meta: &TableMeta) -> SchemaRef {
    Arc::new(schema.with_metadata(meta.to_map()))
}

fn batch(schema: SchemaRef, cols: Vec<ArrayRef>) -> Result<RecordBatch> {
    let b = RecordBatch::try_new(schema, cols)
        .map_err(|e| BtuError::internal(format!("table build: {e}")))?;
    ensure_finite(&b)?;
    Ok(b)
}

/// Refuse (exit 65) a table btu made whose float columns hold NaN or an infinity: a table of
/// non-finite scores or weights is garbage that looks like a result.
pub fn ensure_finite(b: &RecordBatch) -> Result<()> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float32Type, Float64Type};
    for (field, col) in b.schema().fields().iter().zip(b.columns()) {
        let bad = match col.data_type() {
            DataType::Float32 => col
                .as_primitive::<Float32Type>()
                .iter()
                .flatten()
                .position(|v| !v.is_finite()),
            DataType::Float64 => col
                .as_primitive::<Float64Type>()
                .iter()
                .flatten()
                .position(|v| !v.is_finite()),
            _ => None,
        };
        if let Some(row) = bad {
            return Err(BtuError::bad_data(
                format!("table column '{}'", field.name()),
                format!("holds a non-finite value at row {row}; refusing to write it (check the inputs and the learning rate)"),
            ));
        }
    }
    Ok(())
}

/// One row of `token_scores`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    /// Detection round, 1 to 3.
    pub round: u8,
    /// Vocabulary id.
    pub token_id: u32,
    /// The token's string in the tokenizer's vocabulary.
    pub token: String,
    /// Whether it is a special token (never ranked, never selected).
    pub special: bool,
    /// Euclidean distance its word-embedding row moved in this round.
    pub distance: f32,
    /// 1-based rank by distance among non-special tokens; null for special tokens.
    pub rank: Option<u32>,
    /// Whether it is in this round's top `k`.
    pub selected: bool,
}

/// Rows of a `token_scores.arrow` file, and its provenance metadata.
pub fn read_token_scores(
    path: &Path,
) -> Result<(Vec<TokenScore>, std::collections::HashMap<String, String>)> {
    let b = read_ipc(path)?;
    let round = column::<UInt8Array>(&b, "round", path)?;
    let ids = column::<UInt32Array>(&b, "token_id", path)?;
    let toks = column::<StringArray>(&b, "token", path)?;
    let special = column::<BooleanArray>(&b, "special", path)?;
    let dist = column::<Float32Array>(&b, "distance", path)?;
    let rank = column::<UInt32Array>(&b, "rank", path)?;
    let selected = column::<BooleanArray>(&b, "selected", path)?;
    let rows = (0..b.num_rows())
        .map(|i| TokenScore {
            round: round.value(i),
            token_id: ids.value(i),
            token: toks.value(i).to_string(),
            special: special.value(i),
            distance: dist.value(i),
            rank: rank.is_valid(i).then(|| rank.value(i)),
            selected: selected.value(i),
        })
        .collect();
    Ok((rows, b.schema().metadata().clone()))
}

/// Build the `token_scores` batch.
pub fn token_scores_batch(rows: &[TokenScore], meta: &TableMeta) -> Result<RecordBatch> {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt8Array::from_iter_values(rows.iter().map(|r| r.round))),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.token_id),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.token.as_str()),
        )),
        Arc::new(BooleanArray::from(
            rows.iter().map(|r| r.special).collect::<Vec<_>>(),
        )),
        Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|r| r.distance),
        )),
        Arc::new(UInt32Array::from(
            rows.iter().map(|r| r.rank).collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            rows.iter().map(|r| r.selected).collect::<Vec<_>>(),
        )),
    ];
    batch(with_meta(token_scores_schema(), meta), cols)
}

/// One row of `suspicious_tokens`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SuspiciousToken {
    /// Vocabulary id.
    pub token_id: u32,
    /// The token's string in the tokenizer's vocabulary.
    pub token: String,
    /// The rounds that selected it, ascending.
    pub rounds: Vec<u8>,
    /// Its best (smallest) rank over the rounds.
    pub best_rank: u32,
    /// Its largest distance over the rounds.
    pub max_distance: f32,
    /// Occurrences in the tokenized (truncated) corpus.
    pub occurrences: u64,
    /// Corpus rows that contain it at least once.
    pub documents: u64,
    /// The label most of those rows carry (ties to the smaller label); null when it occurs in none.
    pub majority_label: Option<i64>,
    /// Share of those rows that carry `majority_label`, in [0, 1]; null when it occurs in none.
    pub label_share: Option<f32>,
}

/// A non-null `List<T>` column (items not nullable) from one slice per row.
fn list_array<'a, T: arrow::datatypes::ArrowPrimitiveType>(
    rows: impl Iterator<Item = &'a [T::Native]>,
) -> ListArray {
    let mut offsets = vec![0i32];
    let mut values = Vec::new();
    for r in rows {
        values.extend_from_slice(r);
        offsets.push(values.len() as i32);
    }
    ListArray::new(
        Arc::new(Field::new("item", T::DATA_TYPE, false)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(arrow::array::PrimitiveArray::<T>::from_iter_values(values)),
        None,
    )
}

/// Build the `suspicious_tokens` batch.
pub fn suspicious_tokens_batch(rows: &[SuspiciousToken], meta: &TableMeta) -> Result<RecordBatch> {
    let rounds =
        list_array::<arrow::datatypes::UInt8Type>(rows.iter().map(|r| r.rounds.as_slice()));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.token_id),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.token.as_str()),
        )),
        Arc::new(rounds),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.best_rank),
        )),
        Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|r| r.max_distance),
        )),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.occurrences),
        )),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.documents),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.majority_label).collect::<Vec<_>>(),
        )),
        Arc::new(Float32Array::from(
            rows.iter().map(|r| r.label_share).collect::<Vec<_>>(),
        )),
    ];
    batch(with_meta(suspicious_tokens_schema(), meta), cols)
}

/// [`column`] where `present` (a column that older tables lack), else `None`.
fn column_if<'a, T: 'static>(
    present: bool,
    b: &'a RecordBatch,
    name: &str,
    src: &Path,
) -> Result<Option<&'a T>> {
    present.then(|| column::<T>(b, name, src)).transpose()
}

/// Row `i` of a nullable primitive column.
fn nullable<T: arrow::datatypes::ArrowPrimitiveType>(
    c: &arrow::array::PrimitiveArray<T>,
    i: usize,
) -> Option<T::Native> {
    c.is_valid(i).then(|| c.value(i))
}

fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str, src: &Path) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            BtuError::bad_data(
                src.display().to_string(),
                format!(
                    "column '{name}' missing or of the wrong type; expected the schema in schemas/"
                ),
            )
        })
}

/// Read a `suspicious_tokens.arrow` file back into rows.
pub fn read_suspicious_tokens(path: &Path) -> Result<Vec<SuspiciousToken>> {
    let b = read_ipc(path)?;
    let ids = column::<UInt32Array>(&b, "token_id", path)?;
    let toks = column::<StringArray>(&b, "token", path)?;
    let rounds = column::<ListArray>(&b, "rounds", path)?;
    let best = column::<UInt32Array>(&b, "best_rank", path)?;
    let maxd = column::<Float32Array>(&b, "max_distance", path)?;
    let occ = column::<UInt64Array>(&b, "occurrences", path)?;
    let docs = column::<UInt64Array>(&b, "documents", path)?;
    let maj = column::<Int64Array>(&b, "majority_label", path)?;
    let share = column::<Float32Array>(&b, "label_share", path)?;
    (0..b.num_rows())
        .map(|i| {
            let r = rounds.value(i);
            let r = r.as_any().downcast_ref::<UInt8Array>().ok_or_else(|| {
                BtuError::bad_data(
                    path.display().to_string(),
                    "column 'rounds' is not List<UInt8>",
                )
            })?;
            Ok(SuspiciousToken {
                token_id: ids.value(i),
                token: toks.value(i).to_string(),
                rounds: r.values().to_vec(),
                best_rank: best.value(i),
                max_distance: maxd.value(i),
                occurrences: occ.value(i),
                documents: docs.value(i),
                majority_label: nullable(maj, i),
                label_share: nullable(share, i),
            })
        })
        .collect()
}

/// One row of `token_effects`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenEffect {
    /// The text inserted (a token's surface form, or a phrase).
    pub candidate: String,
    /// The detection candidates (token ids) it stands for.
    pub token_ids: Vec<u32>,
    /// Clean rows it was inserted into (correctly classified, label other than `to_label`).
    pub rows: u32,
    /// Rows whose prediction flipped to `to_label` after the insertion.
    pub flips: u32,
    /// `flips / rows` (0 when `rows` is 0).
    pub flip_rate: f32,
    /// The label a trigger would flip to (the candidate's majority label); null when unknown.
    pub to_label: Option<i64>,
    /// Lower bound of the 95 % Wilson interval of the flip rate.
    pub ci_low: f32,
    /// Upper bound of the 95 % Wilson interval of the flip rate.
    pub ci_high: f32,
    /// Held-out clean rows that already contain the candidate.
    pub clean_rows_with: u32,
    /// Share of those rows labelled `to_label`; null when there are none.
    pub clean_share: Option<f32>,
    /// The clean data explains the effect: the 95 % Wilson lower bound of `clean_share` is above
    /// the share of `to_label` among all clean rows (a word such as a slur in a hate-speech
    /// corpus, not a trigger).
    pub explained: bool,
    /// Whether `ci_low` reached `--min-flip-rate` (with at least one row) and the effect is not
    /// `explained`.
    pub verified: bool,
    /// Rows that flipped to `to_label` when the control (words of another clean row) was inserted
    /// at the same places; null where it was not measured: by `btu verify` for candidates whose
    /// `ci_low` is below `--min-flip-rate`, by the repair's rechecks for residuals whose `ci_low` is
    /// below `--max-residual`, and in tables that predate the control.
    pub control_flips: Option<u32>,
    /// Lower bound of the 95 % interval of the paired difference `flip_rate` minus the control's
    /// flip rate (the candidate's own effect); null with `control_flips`.
    pub excess_ci_low: Option<f32>,
}

impl TokenEffect {
    /// The control's flip rate, when measured.
    pub fn control_flip_rate(&self) -> Option<f32> {
        self.control_flips
            .filter(|_| self.rows > 0)
            .map(|k| k as f32 / self.rows as f32)
    }
}

/// Build the `token_effects` batch.
pub fn token_effects_batch(rows: &[TokenEffect], meta: &TableMeta) -> Result<RecordBatch> {
    let ids =
        list_array::<arrow::datatypes::UInt32Type>(rows.iter().map(|r| r.token_ids.as_slice()));
    let f32s = |f: fn(&TokenEffect) -> f32| -> ArrayRef {
        Arc::new(Float32Array::from_iter_values(rows.iter().map(f)))
    };
    let u32s = |f: fn(&TokenEffect) -> u32| -> ArrayRef {
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(f)))
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.candidate.as_str()),
        )),
        Arc::new(ids),
        u32s(|r| r.rows),
        u32s(|r| r.flips),
        f32s(|r| r.flip_rate),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.to_label).collect::<Vec<_>>(),
        )),
        f32s(|r| r.ci_low),
        f32s(|r| r.ci_high),
        u32s(|r| r.clean_rows_with),
        Arc::new(Float32Array::from(
            rows.iter().map(|r| r.clean_share).collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            rows.iter().map(|r| r.explained).collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            rows.iter().map(|r| r.verified).collect::<Vec<_>>(),
        )),
        Arc::new(UInt32Array::from(
            rows.iter().map(|r| r.control_flips).collect::<Vec<_>>(),
        )),
        Arc::new(Float32Array::from(
            rows.iter()
                .map(TokenEffect::control_flip_rate)
                .collect::<Vec<_>>(),
        )),
        Arc::new(Float32Array::from(
            rows.iter().map(|r| r.excess_ci_low).collect::<Vec<_>>(),
        )),
    ];
    batch(with_meta(token_effects_schema(), meta), cols)
}

/// Read a `token_effects.arrow` file back into rows.
pub fn read_token_effects(path: &Path) -> Result<Vec<TokenEffect>> {
    token_effects_of(&read_ipc(path)?, path)
}

/// Rows of a `token_effects` batch read from `path`.
pub fn token_effects_of(b: &RecordBatch, path: &Path) -> Result<Vec<TokenEffect>> {
    let cand = column::<StringArray>(b, "candidate", path)?;
    let ids = column::<ListArray>(b, "token_ids", path)?;
    let rows = column::<UInt32Array>(b, "rows", path)?;
    let flips = column::<UInt32Array>(b, "flips", path)?;
    let rate = column::<Float32Array>(b, "flip_rate", path)?;
    let to = column::<Int64Array>(b, "to_label", path)?;
    let lo = column::<Float32Array>(b, "ci_low", path)?;
    let hi = column::<Float32Array>(b, "ci_high", path)?;
    let ok = column::<BooleanArray>(b, "verified", path)?;
    // Tables written before the clean-association columns existed read as "no clean rows".
    let with = b.column_by_name("clean_rows_with").is_some();
    let n_with = column_if::<UInt32Array>(with, b, "clean_rows_with", path)?;
    let share = column_if::<Float32Array>(with, b, "clean_share", path)?;
    let explained = column_if::<BooleanArray>(with, b, "explained", path)?;
    // Tables written before the control read as "not measured".
    let ctl = b.column_by_name("control_flips").is_some();
    let control = column_if::<UInt32Array>(ctl, b, "control_flips", path)?;
    let excess = column_if::<Float32Array>(ctl, b, "excess_ci_low", path)?;
    (0..b.num_rows())
        .map(|i| {
            let v = ids.value(i);
            let v = v.as_any().downcast_ref::<UInt32Array>().ok_or_else(|| {
                BtuError::bad_data(
                    path.display().to_string(),
                    "column 'token_ids' is not List<UInt32>",
                )
            })?;
            Ok(TokenEffect {
                candidate: cand.value(i).to_string(),
                token_ids: v.values().to_vec(),
                rows: rows.value(i),
                flips: flips.value(i),
                flip_rate: rate.value(i),
                to_label: nullable(to, i),
                ci_low: lo.value(i),
                ci_high: hi.value(i),
                clean_rows_with: n_with.map_or(0, |c| c.value(i)),
                clean_share: share.and_then(|c| nullable(c, i)),
                explained: explained.is_some_and(|c| c.value(i)),
                verified: ok.value(i),
                control_flips: control.and_then(|c| nullable(c, i)),
                excess_ci_low: excess.and_then(|c| nullable(c, i)),
            })
        })
        .collect()
}

/// Every batch of a Parquet file (a small table read whole: predictions, flagged rows).
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>> {
    let f = File::open(path).map_err(|e| BtuError::io(path, e))?;
    let bad =
        |e: &dyn std::fmt::Display| BtuError::bad_data(path.display().to_string(), e.to_string());
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.build())
        .map_err(|e| bad(&e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))
}

/// Write one record batch as a zstd Parquet file, atomically.
pub fn write_parquet(path: &Path, batch: &RecordBatch, overwrite: bool) -> Result<()> {
    write_file_atomic(path, overwrite, |f| {
        let mut sink = ParquetSink::new(f, path, None);
        sink.write(batch)?;
        sink.finish(|| batch.schema()).map(|_| ())
    })
}

/// How btu writes Parquet: zstd level 3; row groups of at most `max_row_group` rows when given.
pub fn parquet_props(max_row_group: Option<usize>) -> parquet::file::properties::WriterProperties {
    use parquet::basic::{Compression, ZstdLevel};
    let mut b = parquet::file::properties::WriterProperties::builder().set_compression(
        Compression::ZSTD(ZstdLevel::try_new(3).expect("valid level")),
    );
    if let Some(n) = max_row_group {
        b = b.set_max_row_group_row_count(Some(n));
    }
    b.build()
}

/// A Parquet file written batch by batch ([`parquet_props`]); the writer opens with the first
/// batch's schema, so a stream whose schema is known only once it is read writes in one pass.
pub struct ParquetSink<W: std::io::Write + Send> {
    file: Option<W>,
    writer: Option<(parquet::arrow::ArrowWriter<W>, SchemaRef)>,
    path: std::path::PathBuf,
    max_row_group: Option<usize>,
    rows: usize,
}

impl<W: std::io::Write + Send> ParquetSink<W> {
    /// A sink writing to `file`, which is `path` (named in errors).
    pub fn new(file: W, path: &Path, max_row_group: Option<usize>) -> Self {
        ParquetSink {
            file: Some(file),
            writer: None,
            path: path.to_path_buf(),
            max_row_group,
            rows: 0,
        }
    }

    /// The schema of the first batch written (`None` before it).
    pub fn schema(&self) -> Option<SchemaRef> {
        self.writer.as_ref().map(|(_, s)| s.clone())
    }

    fn open(&mut self, schema: SchemaRef) -> Result<()> {
        let file = self.file.take().expect("opened once");
        let w = parquet::arrow::ArrowWriter::try_new(
            file,
            schema.clone(),
            Some(parquet_props(self.max_row_group)),
        )
        .map_err(|e| BtuError::internal(format!("parquet writer: {e}")))?;
        self.writer = Some((w, schema));
        Ok(())
    }

    /// Append a batch (the first one fixes the schema).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if self.writer.is_none() {
            self.open(batch.schema())?;
        }
        let path = &self.path;
        self.writer
            .as_mut()
            .expect("opened")
            .0
            .write(batch)
            .map_err(|e| BtuError::io(path, std::io::Error::other(e)))?;
        self.rows += batch.num_rows();
        Ok(())
    }

    /// Append a batch read from `source`, refusing one whose columns differ from the batches
    /// before it (exit 65, `message` says what to do).
    pub fn write_same_columns(
        &mut self,
        batch: &RecordBatch,
        source: &str,
        message: &str,
    ) -> Result<()> {
        if self
            .schema()
            .is_some_and(|s| s.fields() != batch.schema().fields())
        {
            return Err(BtuError::bad_data(source, message));
        }
        self.write(batch)
    }

    /// Close the file (with the schema `empty` gives when no batch was written); returns the
    /// rows written.
    pub fn finish(mut self, empty: impl FnOnce() -> SchemaRef) -> Result<usize> {
        if self.writer.is_none() {
            self.open(empty())?;
        }
        let path = self.path.clone();
        self.writer
            .take()
            .expect("opened")
            .0
            .close()
            .map_err(|e| BtuError::io(&path, std::io::Error::other(e)))?;
        Ok(self.rows)
    }
}

/// A corpus batch with columns `id` (Int64), `text` (Utf8), `label` (Int64).
pub fn corpus_batch(texts: &[String], labels: &[i64]) -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("label", DataType::Int64, false),
    ]));
    batch(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..texts.len() as i64)),
            Arc::new(StringArray::from_iter_values(texts.iter())),
            Arc::new(Int64Array::from(labels.to_vec())),
        ],
    )
}

/// One row of `dimension_masks`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DimensionMask {
    /// Vocabulary id of the repaired token.
    pub token_id: u32,
    /// The token's string in the tokenizer's vocabulary.
    pub token: String,
    /// Embedding dimension replaced, `0..hidden_size`.
    pub dim: u32,
    /// Value in the reference (pre-training) word embeddings `E`.
    pub reference: f32,
    /// Value in the trained word embeddings `E^b`.
    pub trained: f32,
    /// `trained - reference`.
    pub delta: f32,
    /// Value written into the repaired model (the padding row's, or the reference value when a
    /// row is restored).
    pub written: f32,
}

/// Build the `dimension_masks` batch.
pub fn dimension_masks_batch(rows: &[DimensionMask], meta: &TableMeta) -> Result<RecordBatch> {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.token_id),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.token.as_str()),
        )),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.dim))),
        Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|r| r.reference),
        )),
        Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|r| r.trained),
        )),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.delta))),
        Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|r| r.written),
        )),
    ];
    batch(with_meta(dimension_masks_schema(), meta), cols)
}

/// Rows of a `dimension_masks` batch read from `src`.
pub fn read_dimension_masks(b: &RecordBatch, src: &Path) -> Result<Vec<DimensionMask>> {
    let ids = column::<UInt32Array>(b, "token_id", src)?;
    let toks = column::<StringArray>(b, "token", src)?;
    let dims = column::<UInt32Array>(b, "dim", src)?;
    let r = column::<Float32Array>(b, "reference", src)?;
    let t = column::<Float32Array>(b, "trained", src)?;
    let d = column::<Float32Array>(b, "delta", src)?;
    let w = column::<Float32Array>(b, "written", src)?;
    Ok((0..b.num_rows())
        .map(|i| DimensionMask {
            token_id: ids.value(i),
            token: toks.value(i).to_string(),
            dim: dims.value(i),
            reference: r.value(i),
            trained: t.value(i),
            delta: d.value(i),
            written: w.value(i),
        })
        .collect())
}
