//! `btu scan`: stream a corpus (many files, local or `s3://`, any size) through the tokenizer and
//! write `flagged_rows` for every row carrying a suspicious token, with a summary of rows
//! scanned and flagged, per-token counts and label shares, and — when the corpus has a
//! `poisoned` column (from `btu poison`) — precision and recall of the flagged rows. Memory is
//! bounded by the batch size: nothing but per-token counters outlives a batch.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, ListBuilder, RecordBatch, StringArray, StringBuilder,
    UInt32Array, UInt32Builder, UInt64Array,
};
use arrow::datatypes::{DataType, SchemaRef};

use crate::error::{BtuError, Result};
use crate::io::corpus::{read_corpus, CorpusSpec};
use crate::model::tokenizer::BtuTokenizer;
use crate::progress::Progress;

/// Inputs of `btu scan`.
pub struct ScanJob {
    /// The corpus to scan (`--corpus`); the label column is optional per file.
    pub corpus: CorpusSpec,
    /// `suspicious_tokens.arrow` from `btu detect` (`--suspicious`).
    pub suspicious: PathBuf,
    /// `token_effects.arrow` from `btu verify`: flag rows by the verified triggers only.
    pub effects: Option<PathBuf>,
    /// Model directory or `tokenizer.json` of the tokenizer detection used (`--tokenizer`).
    pub tokenizer: PathBuf,
    /// Output Parquet file of `flagged_rows` (`--out`, must end in `.parquet`).
    pub out: PathBuf,
    /// Replace an existing output (`--overwrite`).
    pub overwrite: bool,
}

#[derive(Default)]
struct TokenStats {
    occurrences: u64,
    rows: u64,
    labels: BTreeMap<i64, u64>,
}

/// Rows carrying one flagged token or phrase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenRows {
    /// The token's id (none for a phrase).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<u32>,
    /// Whether this is a verified phrase.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub phrase: bool,
    /// Occurrences in the corpus.
    pub occurrences: u64,
    /// Rows carrying it.
    pub rows: u64,
    /// Share of those rows per label.
    pub label_shares: BTreeMap<String, f64>,
}

/// How well the flagged rows match the `poisoned` column, when the corpus has one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScanQuality {
    /// Rows marked poisoned.
    pub poisoned_rows: u64,
    /// Flagged rows that are poisoned.
    pub flagged_and_poisoned: u64,
    /// Share of the flagged rows that are poisoned (`None`: none flagged).
    pub precision: Option<f64>,
    /// Share of the poisoned rows that are flagged (`None`: none poisoned).
    pub recall: Option<f64>,
}

/// `btu scan`'s result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScanReport {
    /// `scan`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The flagged-rows Parquet file.
    pub out: PathBuf,
    /// Rows read.
    pub rows_scanned: u64,
    /// Rows flagged.
    pub rows_flagged: u64,
    /// Per flagged token or phrase.
    pub tokens: BTreeMap<String, TokenRows>,
    /// Agreement with the `poisoned` column, when present.
    pub poisoned: Option<ScanQuality>,
    /// Wall time.
    pub seconds: f64,
    /// Rows per second.
    pub rows_per_s: f64,
    /// Provenance of the corpus.
    pub corpus: Option<crate::io::corpus::Fingerprint>,
}

/// `btu scan`.
pub fn run(job: &ScanJob, progress: &dyn Progress) -> Result<ScanReport> {
    let t0 = Instant::now();
    if job.out.extension().is_none_or(|e| e != "parquet") {
        return Err(BtuError::config(
            "--out",
            format!("{} should end in .parquet", job.out.display()),
        ));
    }
    crate::io::output::check_output(&job.out, job.overwrite)?;
    let tok = BtuTokenizer::load(&job.tokenizer)?;
    let mut suspicious = crate::io::tables::read_suspicious_tokens(&job.suspicious)?;
    // With verification: single tokens by id, phrases by their token sequence in the row.
    let mut phrases: Vec<(String, Vec<u32>)> = Vec::new();
    if let Some(p) = &job.effects {
        let verified: Vec<_> = crate::io::tables::read_token_effects(p)?
            .into_iter()
            .filter(|e| e.verified)
            .collect();
        let single: std::collections::BTreeSet<u32> = verified
            .iter()
            .filter(|e| !e.candidate.contains(' '))
            .flat_map(|e| e.token_ids.iter().copied())
            .collect();
        suspicious.retain(|s| single.contains(&s.token_id));
        for e in verified.iter().filter(|e| e.candidate.contains(' ')) {
            let seq = tok.encode_untruncated(std::slice::from_ref(&e.candidate))?;
            let seq: Vec<u32> = seq[0]
                .iter()
                .copied()
                .filter(|t| !tok.special.contains(t))
                .collect();
            if !seq.is_empty() {
                phrases.push((e.candidate.clone(), seq));
            }
        }
        if suspicious.is_empty() && phrases.is_empty() {
            tracing::warn!("{}: no verified trigger; no row is flagged", p.display());
        }
    }
    let mut phrase_stats: BTreeMap<String, TokenStats> = phrases
        .iter()
        .map(|(p, _)| (p.clone(), TokenStats::default()))
        .collect();
    let mut wanted: HashMap<u32, String> = HashMap::new();
    for s in &suspicious {
        if tok.token(s.token_id) != s.token {
            return Err(BtuError::bad_data(
                job.suspicious.display().to_string(),
                format!("token id {} is '{}' in the table but '{}' in the tokenizer; scan with the tokenizer detection used", s.token_id, s.token, tok.token(s.token_id)),
            ));
        }
        wanted.insert(s.token_id, s.token.clone());
    }
    let mut stats: BTreeMap<u32, TokenStats> =
        wanted.keys().map(|&t| (t, TokenStats::default())).collect();
    let (mut scanned, mut flagged, mut poisoned_rows, mut tp) = (0u64, 0u64, 0u64, 0u64);
    let mut has_poisoned = false;
    let bar = progress.bar("scan", 0);
    let spec = CorpusSpec {
        label_optional: true,
        ..job.corpus.clone()
    };
    let mut fingerprint = None;
    crate::io::output::write_file_atomic(&job.out, job.overwrite, |file| {
        let mut sink = crate::io::tables::ParquetSink::new(file, &job.out, Some(65_536));
        // The id column's type, fixed by the first batch with a flagged row.
        let mut first_id: Option<Option<DataType>> = None;
        let fp = read_corpus(&spec, |b| {
            let n = b.texts.len();
            let seqs = tok.encode_untruncated(&b.texts)?;
            let poisoned = b
                .batch
                .column_by_name("poisoned")
                .and_then(|c| c.as_boolean_opt().cloned());
            has_poisoned |= poisoned.is_some();
            let id_col = b.batch.column_by_name("id").cloned();
            let mut keep: Vec<u32> = Vec::new();
            let (mut tokens, mut ids) = (
                ListBuilder::new(StringBuilder::new()),
                ListBuilder::new(UInt32Builder::new()),
            );
            let mut hits = Vec::new();
            for (i, s) in seqs.iter().enumerate() {
                let label = b.labels.as_ref().map(|l| l[i]);
                let mut seen: Vec<u32> = Vec::new();
                let mut count = 0u32;
                for t in s {
                    if wanted.contains_key(t) {
                        count += 1;
                        stats.get_mut(t).expect("wanted").occurrences += 1;
                        if !seen.contains(t) {
                            seen.push(*t);
                        }
                    }
                }
                let mut found: Vec<&(String, Vec<u32>)> = Vec::new();
                for ph in &phrases {
                    let n = s
                        .windows(ph.1.len())
                        .filter(|w| *w == ph.1.as_slice())
                        .count();
                    if n > 0 {
                        count += n as u32;
                        found.push(ph);
                        let st = phrase_stats.get_mut(&ph.0).expect("phrase");
                        st.occurrences += n as u64;
                        st.rows += 1;
                        if let Some(l) = label {
                            *st.labels.entry(l).or_default() += 1;
                        }
                    }
                }
                let is_poisoned = poisoned
                    .as_ref()
                    .is_some_and(|p| p.is_valid(i) && p.value(i));
                poisoned_rows += is_poisoned as u64;
                if count > 0 {
                    flagged += 1;
                    tp += is_poisoned as u64;
                    for t in &seen {
                        let st = stats.get_mut(t).expect("wanted");
                        st.rows += 1;
                        if let Some(l) = label {
                            *st.labels.entry(l).or_default() += 1;
                        }
                        tokens.values().append_value(&wanted[t]);
                        ids.values().append_value(*t);
                    }
                    for (text, seq) in &found {
                        tokens.values().append_value(text);
                        ids.values().append_slice(seq);
                    }
                    tokens.append(true);
                    ids.append(true);
                    hits.push(count);
                    keep.push(i as u32);
                }
            }
            scanned += n as u64;
            bar.inc(n as u64);
            if keep.is_empty() {
                return Ok(());
            }
            let take = UInt32Array::from(keep.clone());
            let id_type = id_col.as_ref().map(|c| c.data_type().clone());
            let first_id = first_id.get_or_insert(id_type);
            let schema: SchemaRef =
                Arc::new(crate::io::tables::flagged_rows_schema(first_id.clone()));
            let mut cols: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(vec![b.source.as_ref(); keep.len()])),
                Arc::new(UInt64Array::from(
                    keep.iter().map(|&i| b.rows[i as usize]).collect::<Vec<_>>(),
                )),
            ];
            if let Some(t) = first_id.as_ref() {
                let col = match &id_col {
                    Some(c) => {
                        let c = arrow::compute::take(c, &take, None)
                            .map_err(|e| BtuError::internal(e.to_string()))?;
                        arrow::compute::cast(&c, t).map_err(|e| {
                            BtuError::bad_data(b.source.to_string(), format!("id column: {e}"))
                        })?
                    }
                    None => arrow::array::new_null_array(t, keep.len()),
                };
                cols.push(col);
            }
            cols.push(Arc::new(Int64Array::from(
                keep.iter()
                    .map(|&i| b.labels.as_ref().map(|l| l[i as usize]))
                    .collect::<Vec<_>>(),
            )));
            cols.push(Arc::new(tokens.finish()));
            cols.push(Arc::new(ids.finish()));
            cols.push(Arc::new(UInt32Array::from(hits)));
            let batch = RecordBatch::try_new(schema, cols)
                .map_err(|e| BtuError::internal(format!("flagged_rows: {e}")))?;
            sink.write(&batch)
        })?;
        // No row flagged: an empty table with the schema.
        sink.finish(|| Arc::new(crate::io::tables::flagged_rows_schema(None)))?;
        fingerprint = Some(fp);
        Ok(())
    })?;
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let shares = |s: &TokenStats| -> BTreeMap<String, f64> {
        s.labels
            .iter()
            .map(|(l, n)| (l.to_string(), *n as f64 / s.rows.max(1) as f64))
            .collect()
    };
    let stat = |token_id: Option<u32>, s: &TokenStats| TokenRows {
        token_id,
        phrase: token_id.is_none(),
        occurrences: s.occurrences,
        rows: s.rows,
        label_shares: shares(s),
    };
    let mut tokens: BTreeMap<String, TokenRows> = stats
        .iter()
        .map(|(t, s)| (wanted[t].clone(), stat(Some(*t), s)))
        .collect();
    for (p, s) in &phrase_stats {
        tokens.insert(p.clone(), stat(None, s));
    }
    let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    Ok(ScanReport {
        command: "scan".into(),
        version: crate::VERSION.into(),
        out: job.out.clone(),
        rows_scanned: scanned,
        rows_flagged: flagged,
        tokens,
        poisoned: has_poisoned.then(|| ScanQuality {
            poisoned_rows,
            flagged_and_poisoned: tp,
            precision: ratio(tp, flagged),
            recall: ratio(tp, poisoned_rows),
        }),
        seconds,
        rows_per_s: scanned as f64 / seconds.max(1e-9),
        corpus: fingerprint,
    })
}
