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
use crate::io::corpus::{read_files, CorpusBatch, CorpusSpec};
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
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
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

/// `btu scan`: check the output, load what to look for, stream the corpus writing each batch's
/// flagged rows, then summarise.
pub fn run(job: &ScanJob, progress: &dyn Progress) -> Result<ScanReport> {
    let t0 = Instant::now();
    check_out(job)?;
    let tok = BtuTokenizer::load(&job.tokenizer)?;
    let matcher = Matcher::load(job, &tok)?;
    let mut tally = Tally::new(&matcher);
    let bar = progress.bar("scan", 0);
    let spec = CorpusSpec {
        label_optional: true,
        ..job.corpus.clone()
    };
    crate::io::corpus::check_spec(&spec)?;
    let files = crate::io::corpus::resolve_inputs(&spec.inputs)?;
    let id_type = id_type(&files);
    let mut fingerprint = None;
    crate::io::output::write_file_atomic(&job.run.out, job.run.overwrite, |file| {
        let mut sink = crate::io::tables::ParquetSink::new(file, &job.run.out, Some(65_536));
        let fp = read_files(&spec, files, |b| {
            let seqs = tok.encode_untruncated(&b.texts)?;
            let flagged = tally.batch(&matcher, &b, &seqs);
            bar.inc(b.texts.len() as u64);
            if flagged.keep.is_empty() {
                return Ok(());
            }
            sink.write(&flagged.into_batch(&b, id_type.clone())?)
        })?;
        // No row flagged: an empty table with the schema.
        sink.finish(|| Arc::new(crate::io::tables::flagged_rows_schema(id_type.clone())))?;
        fingerprint = Some(fp);
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(tally.report(job, &matcher, t0.elapsed().as_secs_f64(), fingerprint))
}

/// `btu scan --plan`: the shards of the corpus (`shards` of them, default
/// [`crate::io::shard::default_count`]) for a fan-out.
pub fn plan(
    corpus: &CorpusSpec,
    shards: Option<usize>,
) -> Result<Vec<crate::io::shard::ShardItem>> {
    if shards == Some(0) {
        return Err(BtuError::config(
            "--shards",
            "0 is not a shard count; give 1 or more",
        ));
    }
    let files = crate::io::corpus::resolve_inputs(&corpus.inputs)?;
    let count = shards.unwrap_or_else(|| crate::io::shard::default_count(&files));
    Ok(crate::io::shard::plan(&files, count))
}

/// The type of the `id` column of flagged_rows: the `id` column's type in the corpus's first
/// file that has one (the whole corpus's, so that every shard of a scan writes one schema);
/// `None` (no `id` column) when no file has one.
fn id_type(files: &[crate::io::corpus::InputFile]) -> Option<DataType> {
    files.iter().find_map(|f| {
        let schema = f.schema.as_ref()?;
        Some(schema.field_with_name("id").ok()?.data_type().clone())
    })
}

/// The output must be a new (or, with --overwrite, replaceable) `.parquet` file.
fn check_out(job: &ScanJob) -> Result<()> {
    if job.run.out.extension().is_none_or(|e| e != "parquet") {
        return Err(BtuError::config(
            "--out",
            format!("{} should end in .parquet", job.run.out.display()),
        ));
    }
    crate::io::output::check_output(&job.run.out, job.run.overwrite)
}

/// What a row is flagged for: single tokens by id, verified phrases by their token sequence.
struct Matcher {
    /// Token id -> its text, each checked against the tokenizer.
    wanted: HashMap<u32, String>,
    /// Verified phrases (with `--effects`) and their token sequences.
    phrases: Vec<(String, Vec<u32>)>,
}

impl Matcher {
    /// The suspicious tokens, narrowed to the verified triggers when `--effects` is given.
    fn load(job: &ScanJob, tok: &BtuTokenizer) -> Result<Self> {
        let mut suspicious = crate::io::tables::read_suspicious_tokens(&job.suspicious)?;
        let mut phrases = Vec::new();
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
            phrases = phrase_sequences(&verified, tok)?;
            if suspicious.is_empty() && phrases.is_empty() {
                tracing::warn!("{}: no verified trigger; no row is flagged", p.display());
            }
        }
        let mut wanted = HashMap::new();
        for s in &suspicious {
            if tok.token(s.token_id) != s.token {
                return Err(BtuError::bad_data(
                    job.suspicious.display().to_string(),
                    format!("token id {} is '{}' in the table but '{}' in the tokenizer; scan with the tokenizer detection used", s.token_id, s.token, tok.token(s.token_id)),
                ));
            }
            wanted.insert(s.token_id, s.token.clone());
        }
        Ok(Matcher { wanted, phrases })
    }

    /// What one row's token sequence carries.
    fn find<'a>(&'a self, seq: &[u32]) -> RowMatch<'a> {
        let mut m = RowMatch::default();
        for t in seq.iter().filter(|t| self.wanted.contains_key(t)) {
            m.count += 1;
            m.token_occurrences.push(*t);
            if !m.tokens.contains(t) {
                m.tokens.push(*t);
            }
        }
        for ph in &self.phrases {
            let n = seq
                .windows(ph.1.len())
                .filter(|w| *w == ph.1.as_slice())
                .count();
            if n > 0 {
                m.count += n as u32;
                m.phrases.push((ph, n as u64));
            }
        }
        m
    }
}

/// The verified phrases' token sequences (special tokens dropped; empty ones skipped).
fn phrase_sequences(
    verified: &[crate::io::tables::TokenEffect],
    tok: &BtuTokenizer,
) -> Result<Vec<(String, Vec<u32>)>> {
    let mut phrases = Vec::new();
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
    Ok(phrases)
}

/// One row's matches.
#[derive(Default)]
struct RowMatch<'a> {
    /// Occurrences of tokens and phrases together (the `hits` column).
    count: u32,
    /// Each occurrence of a wanted token, in row order.
    token_occurrences: Vec<u32>,
    /// The distinct wanted tokens, in order of first occurrence.
    tokens: Vec<u32>,
    /// The phrases found, with their occurrences.
    phrases: Vec<(&'a (String, Vec<u32>), u64)>,
}

#[derive(Default)]
struct TokenStats {
    occurrences: u64,
    rows: u64,
    labels: BTreeMap<i64, u64>,
}

impl TokenStats {
    /// One row carrying the token or phrase.
    fn add_row(&mut self, label: Option<i64>) {
        self.rows += 1;
        if let Some(l) = label {
            *self.labels.entry(l).or_default() += 1;
        }
    }

    /// The summary entry.
    fn rows(&self, token_id: Option<u32>) -> TokenRows {
        TokenRows {
            token_id,
            phrase: token_id.is_none(),
            occurrences: self.occurrences,
            rows: self.rows,
            label_shares: self
                .labels
                .iter()
                .map(|(l, n)| (l.to_string(), *n as f64 / self.rows.max(1) as f64))
                .collect(),
        }
    }
}

/// The counters that outlive a batch.
struct Tally {
    tokens: BTreeMap<u32, TokenStats>,
    phrases: BTreeMap<String, TokenStats>,
    scanned: u64,
    flagged: u64,
    poisoned_rows: u64,
    flagged_and_poisoned: u64,
    has_poisoned: bool,
}

impl Tally {
    fn new(m: &Matcher) -> Self {
        Tally {
            tokens: m
                .wanted
                .keys()
                .map(|&t| (t, TokenStats::default()))
                .collect(),
            phrases: m
                .phrases
                .iter()
                .map(|(p, _)| (p.clone(), TokenStats::default()))
                .collect(),
            scanned: 0,
            flagged: 0,
            poisoned_rows: 0,
            flagged_and_poisoned: 0,
            has_poisoned: false,
        }
    }

    /// Count one batch and collect its flagged rows.
    fn batch(&mut self, m: &Matcher, b: &CorpusBatch, seqs: &[Vec<u32>]) -> Flagged {
        let poisoned = b
            .batch
            .column_by_name("poisoned")
            .and_then(|c| c.as_boolean_opt().cloned());
        self.has_poisoned |= poisoned.is_some();
        let mut out = Flagged::default();
        for (i, seq) in seqs.iter().enumerate() {
            let label = b.labels.as_ref().map(|l| l[i]);
            let found = m.find(seq);
            for t in &found.token_occurrences {
                self.tokens.get_mut(t).expect("wanted").occurrences += 1;
            }
            for (ph, n) in &found.phrases {
                let st = self.phrases.get_mut(&ph.0).expect("phrase");
                st.occurrences += n;
                st.add_row(label);
            }
            let is_poisoned = poisoned
                .as_ref()
                .is_some_and(|p| p.is_valid(i) && p.value(i));
            self.poisoned_rows += is_poisoned as u64;
            if found.count == 0 {
                continue;
            }
            self.flagged += 1;
            self.flagged_and_poisoned += is_poisoned as u64;
            for t in &found.tokens {
                self.tokens.get_mut(t).expect("wanted").add_row(label);
            }
            out.push(i as u32, m, &found);
        }
        self.scanned += seqs.len() as u64;
        out
    }

    /// The summary.
    fn report(
        self,
        job: &ScanJob,
        m: &Matcher,
        seconds: f64,
        corpus: Option<crate::io::corpus::Fingerprint>,
    ) -> ScanReport {
        let mut tokens: BTreeMap<String, TokenRows> = self
            .tokens
            .iter()
            .map(|(t, s)| (m.wanted[t].clone(), s.rows(Some(*t))))
            .collect();
        for (p, s) in &self.phrases {
            tokens.insert(p.clone(), s.rows(None));
        }
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        ScanReport {
            command: "scan".into(),
            version: crate::VERSION.into(),
            out: job.run.out.clone(),
            rows_scanned: self.scanned,
            rows_flagged: self.flagged,
            tokens,
            poisoned: self.has_poisoned.then(|| ScanQuality {
                poisoned_rows: self.poisoned_rows,
                flagged_and_poisoned: self.flagged_and_poisoned,
                precision: ratio(self.flagged_and_poisoned, self.flagged),
                recall: ratio(self.flagged_and_poisoned, self.poisoned_rows),
            }),
            seconds,
            rows_per_s: self.scanned as f64 / seconds.max(1e-9),
            corpus,
        }
    }
}

/// One batch's flagged rows, column by column.
struct Flagged {
    keep: Vec<u32>,
    tokens: ListBuilder<StringBuilder>,
    ids: ListBuilder<UInt32Builder>,
    hits: Vec<u32>,
}

impl Default for Flagged {
    fn default() -> Self {
        Flagged {
            keep: Vec::new(),
            tokens: ListBuilder::new(StringBuilder::new()),
            ids: ListBuilder::new(UInt32Builder::new()),
            hits: Vec::new(),
        }
    }
}

impl Flagged {
    /// Row `i` of the batch, with what it carries.
    fn push(&mut self, i: u32, m: &Matcher, found: &RowMatch) {
        for t in &found.tokens {
            self.tokens.values().append_value(&m.wanted[t]);
            self.ids.values().append_value(*t);
        }
        for ((text, seq), _) in &found.phrases {
            self.tokens.values().append_value(text);
            self.ids.values().append_slice(seq);
        }
        self.tokens.append(true);
        self.ids.append(true);
        self.hits.push(found.count);
        self.keep.push(i);
    }

    /// The `flagged_rows` batch; the id column cast to `id_type` (see [`id_type`]).
    fn into_batch(mut self, b: &CorpusBatch, id_type: Option<DataType>) -> Result<RecordBatch> {
        let n = self.keep.len();
        let schema: SchemaRef = Arc::new(crate::io::tables::flagged_rows_schema(id_type.clone()));
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![b.source.as_ref(); n])),
            Arc::new(UInt64Array::from(
                self.keep
                    .iter()
                    .map(|&i| b.rows[i as usize])
                    .collect::<Vec<_>>(),
            )),
        ];
        if let Some(t) = &id_type {
            cols.push(self.id_column(b, t)?);
        }
        cols.push(Arc::new(Int64Array::from(
            self.keep
                .iter()
                .map(|&i| b.labels.as_ref().map(|l| l[i as usize]))
                .collect::<Vec<_>>(),
        )));
        cols.push(Arc::new(self.tokens.finish()));
        cols.push(Arc::new(self.ids.finish()));
        cols.push(Arc::new(UInt32Array::from(std::mem::take(&mut self.hits))));
        RecordBatch::try_new(schema, cols)
            .map_err(|e| BtuError::internal(format!("flagged_rows: {e}")))
    }

    /// The flagged rows' ids as `t` (nulls when this file has no id column).
    fn id_column(&self, b: &CorpusBatch, t: &DataType) -> Result<ArrayRef> {
        let Some(c) = b.batch.column_by_name("id") else {
            return Ok(arrow::array::new_null_array(t, self.keep.len()));
        };
        let take = UInt32Array::from(self.keep.clone());
        let c =
            arrow::compute::take(c, &take, None).map_err(|e| BtuError::internal(e.to_string()))?;
        arrow::compute::cast(&c, t)
            .map_err(|e| BtuError::bad_data(b.source.to_string(), format!("id column: {e}")))
    }
}
