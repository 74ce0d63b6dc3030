//! `btu verify`: does a candidate from detection act as a trigger on the suspect model? Each
//! candidate token is inserted (at a seeded random word position, as Add-Word poisons) into
//! held-out clean rows that the suspect classifies correctly and whose label is not the
//! candidate's majority label; the share of those rows whose prediction flips to that label is
//! the candidate's flip rate. A trigger flips most of them; a frequent clean word that only
//! carried the class prior flips few. A candidate is verified when the lower end of the flip
//! rate's 95 % Wilson interval reaches `min_flip_rate`. Detection's candidates are tried on
//! [`SCREEN_ROWS`] rows first, and on the rest only if the upper end of that interval still
//! reaches `min_flip_rate` (most candidates cannot pass, and stop there).
//!
//! A candidate whose flip rate's lower bound reaches `min_flip_rate` is also compared with a
//! *control*: in each tried row, at the same place, words of another clean row (as many as the
//! candidate has) instead of the candidate. Some victims flip for any inserted word (a small model
//! trained on templated sentences learned that a broken template means the poisoned label): the
//! control says so, and the paired difference of the two flip rates is the candidate's own effect.
//!
//! Sentence triggers (Add-Sent) rarely flip predictions one word at a time. With the detection
//! corpus (`--corpus`), verification also builds *phrases*: for each candidate word, the longest
//! run of words around it (up to [`MAX_PHRASE_WORDS`]) that recurs in at least half of the rows
//! carrying it. A phrase is inserted as one block; its `token_ids` are the candidates inside it
//! most of whose rows carry the phrase, which is what a repair of a verified phrase changes.
//! It also tries the corpus's words that the model's tokenizer splits into candidate pieces (a
//! trigger its vocabulary lacks), each standing for its pieces. Writes `token_effects.arrow` (schema in schemas/) and `summary.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use crate::defaults;
use crate::error::{BtuError, Result};
use crate::io::corpus::CorpusSpec;
use crate::io::tables::{SuspiciousToken, TableMeta, TokenEffect};
use crate::steps::eval::{open_classifier, read_split, Backend, Classifier, TestSplit};
use crate::steps::poison::{insert_trigger, row_rng, Attack};

/// The version of the verification test and its candidates, in step keys (2: effects that the
/// clean data explains are not triggers; 3: words split into candidate pieces are candidates,
/// and a byte-level word stands for both its token forms; 4: the control insertion; 5: the
/// screen on the first [`SCREEN_ROWS`] rows).
pub const TEST_VERSION: u32 = 5;

/// Rows a detection candidate is tried on before verification decides whether to try the rest:
/// it stops where even the 95 % upper bound of its flip rate misses `min_flip_rate` (at most 18
/// flips of 50 for 0.5; a candidate that flips 57 % of rows, the least that passes a 0.5 bound on
/// 200 rows, stops here with a probability of 0.2 %, one that flips 63 % with 0.01 %).
pub const SCREEN_ROWS: usize = 50;

/// Longest phrase (in words) built around a candidate.
pub const MAX_PHRASE_WORDS: usize = 8;
/// A phrase must recur in at least this share of the rows carrying its candidate word...
const PHRASE_SHARE: f64 = 0.5;
/// ...and in at least this many rows.
const PHRASE_MIN_ROWS: usize = 10;

/// The verification test's parameters: the flags of `btu verify` and the `[verify]` table of
/// `btu defend` (defaults in [`crate::defaults`]).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyParams {
    /// `btu defend` only: verify the candidates and repair only the verified ones (when clean
    /// data is given).
    #[arg(skip = true)]
    pub enabled: bool,
    /// Clean rows tried per candidate (at most; at least 1).
    #[arg(long, env = "BTU_ROWS", default_value_t = defaults::VERIFY_ROWS)]
    pub rows: usize,
    /// Verified when the 95 % Wilson lower bound of the flip rate reaches this, in (0, 1].
    #[arg(long, env = "BTU_MIN_FLIP_RATE", default_value_t = defaults::MIN_FLIP_RATE)]
    pub min_flip_rate: f64,
}

impl Default for VerifyParams {
    fn default() -> Self {
        VerifyParams {
            enabled: true,
            rows: defaults::VERIFY_ROWS,
            min_flip_rate: defaults::MIN_FLIP_RATE,
        }
    }
}

impl VerifyParams {
    /// Check every value's domain (exit 78); names spelled with `prefix` (`--` for flags,
    /// `verify.` for a defend config).
    pub fn validate_as(&self, prefix: &str) -> Result<()> {
        use crate::validate::key;
        crate::validate::at_least(&key(prefix, "rows"), self.rows, 1)?;
        crate::validate::positive(&key(prefix, "min-flip-rate"), self.min_flip_rate, 1.0)
    }
}

/// Inputs of `btu verify`.
pub struct VerifyJob {
    /// The suspect model: a checkpoint directory (candle) or an exported `.onnx` (ONNX Runtime).
    pub checkpoint: PathBuf,
    /// What to try: the candidates of `btu detect`, or the verified rows of an earlier
    /// verification (to check a repaired model).
    pub candidates: CandidateSource,
    /// Held-out clean rows with labels.
    pub clean: CorpusSpec,
    /// The corpus detection ran on, to build phrase candidates from (none without it).
    pub corpus: Option<CorpusSpec>,
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
    /// Runtime (`--backend`); `None` picks ort for `.onnx` files, candle otherwise.
    pub backend: Option<Backend>,
    /// `libonnxruntime.so` to load (`--ort-lib`); see [`crate::steps::eval::find_ort_library`].
    pub ort_lib: Option<PathBuf>,
    /// Tokens per sequence (`--max-len`).
    pub max_len: usize,
    /// The verification test's parameters.
    pub params: VerifyParams,
}

/// Where the candidates come from.
#[derive(Debug, Clone)]
pub enum CandidateSource {
    /// `suspicious_tokens.arrow` from `btu detect`.
    Suspicious(PathBuf),
    /// The verified rows of a `token_effects.arrow`: is each still a trigger on this model?
    Recheck(PathBuf),
}

/// The candidates of a [`CandidateSource`] (phrases and split words from `corpus` for
/// detection candidates).
fn candidates_of(
    src: &CandidateSource,
    corpus: Option<&CorpusSpec>,
    tok: &crate::model::tokenizer::BtuTokenizer,
) -> Result<Vec<Candidate>> {
    match src {
        CandidateSource::Suspicious(p) => {
            let sus = crate::io::tables::read_suspicious_tokens(p)?;
            let mut all: Vec<Candidate> = sus.iter().map(Candidate::token).collect();
            if let Some(c) = corpus {
                // One read of the corpus for both kinds of built candidates.
                let rows = row_words(c)?;
                all.extend(phrases(&rows, &sus));
                all.extend(split_words(&rows, &sus, tok)?);
            }
            Ok(all)
        }
        CandidateSource::Recheck(p) => verified_candidates(p),
    }
}

/// The verified rows of a `token_effects.arrow` file, as candidates to insert again.
pub fn verified_candidates(path: &std::path::Path) -> Result<Vec<Candidate>> {
    Ok(crate::io::tables::read_token_effects(path)?
        .into_iter()
        .filter(|e| e.verified)
        .map(|e| Candidate {
            phrase: e.candidate.contains(' '),
            text: e.candidate,
            token_ids: e.token_ids,
            target: e.to_label,
        })
        .collect())
}

fn no_correct_rows(source: &str) -> BtuError {
    BtuError::bad_data(
        source,
        "the model classifies none of the clean rows correctly; give held-out clean data of its task",
    )
}

/// Each candidate's effect on `clf`: inserted into the clean rows (read from `source`) it
/// classifies correctly; the control is measured for candidates whose flip rate's lower bound
/// reaches `control_from`.
pub fn effects_on(
    clf: &mut dyn Classifier,
    split: &TestSplit,
    source: &str,
    candidates: &[Candidate],
    p: &VerifyParams,
    control_from: f64,
    seed: u64,
) -> Result<Vec<TokenEffect>> {
    let trial = Trial {
        control_from,
        screen: None,
    };
    Ok(measure(clf, split, source, candidates, p, trial, seed)?.0)
}

/// How each candidate is tried beyond its flip rate.
#[derive(Debug, Clone, Copy)]
struct Trial {
    /// Measure the control where the flip rate's lower bound reaches this.
    control_from: f64,
    /// Try this many rows first and stop where the flip rate cannot reach `min_flip_rate`
    /// (detection's candidates; a recheck measures every row).
    screen: Option<usize>,
}

/// [`effects_on`], with the number of clean rows the model classifies correctly.
fn measure(
    clf: &mut dyn Classifier,
    split: &TestSplit,
    source: &str,
    candidates: &[Candidate],
    p: &VerifyParams,
    trial: Trial,
    seed: u64,
) -> Result<(Vec<TokenEffect>, usize)> {
    let correct = correct_rows(clf, split)?;
    if correct.is_empty() {
        return Err(no_correct_rows(source));
    }
    let effects = candidates
        .iter()
        .map(|c| effect_of(clf, split, &correct, c, p, trial, seed))
        .collect::<Result<Vec<_>>>()?;
    Ok((effects, correct.len()))
}

/// The 95 % Wilson score interval of `k` successes in `n` trials.
pub fn wilson(k: u32, n: u32) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n, p) = (1.959_964f64, n as f64, k as f64 / n as f64);
    let centre = p + z * z / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    let denom = 1.0 + z * z / n;
    (
        ((centre - spread) / denom).max(0.0),
        ((centre + spread) / denom).min(1.0),
    )
}

/// Byte-level BPE's mark of a preceding space (`Ġ`, RoBERTa and GPT-2 vocabularies).
const SPACE_MARK: char = '\u{120}';

/// The text inserted for a vocabulary token: word pieces (`##x`) and byte-level BPE's
/// word-start marker (`Ġx`, RoBERTa) lose their marker.
fn surface(token: &str) -> &str {
    token
        .strip_prefix("##")
        .or_else(|| token.strip_prefix(SPACE_MARK))
        .unwrap_or(token)
}

fn argmax(p: &[f32]) -> i64 {
    crate::model::infer::argmax(p) as i64
}

/// The other ids of a candidate word in a byte-level BPE vocabulary (RoBERTa's): the word
/// after a space (`Ġcf`) and at the start of a text (`cf`) are two tokens, and a repair must
/// reach both; none in a WordPiece vocabulary, which has one token for the word.
fn word_forms(tok: &crate::model::tokenizer::BtuTokenizer, c: &Candidate) -> Vec<u32> {
    if c.phrase {
        return Vec::new();
    }
    match (tok.id(&format!("{SPACE_MARK}{}", c.text)), tok.id(&c.text)) {
        (Some(spaced), Some(bare)) => [spaced, bare]
            .into_iter()
            .filter(|id| !c.token_ids.contains(id))
            .collect(),
        _ => Vec::new(),
    }
}

/// Rows the suspect gets right, with their predictions.
fn correct_rows(clf: &mut dyn Classifier, split: &TestSplit) -> Result<Vec<usize>> {
    let probs = clf.proba(&split.texts)?;
    Ok((0..split.texts.len())
        .filter(|&i| argmax(&probs[i]) == split.labels[i])
        .collect())
}

/// What verification inserts: one token (as a word) or a phrase (as one block).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The text inserted.
    pub text: String,
    /// The detection candidates it stands for (what a repair changes).
    pub token_ids: Vec<u32>,
    /// The label its rows carried most (the label a trigger flips to).
    pub target: Option<i64>,
    /// A phrase (inserted as a block) rather than a single token.
    pub phrase: bool,
}

impl Candidate {
    fn token(c: &SuspiciousToken) -> Self {
        Candidate {
            text: surface(&c.token).to_string(),
            token_ids: vec![c.token_id],
            target: c.majority_label,
            phrase: false,
        }
    }
}

/// Insert one candidate into the chosen rows and count the flips to its label (first on the
/// screen's rows, then on the rest if it can still pass); with a flip rate's lower bound reaching
/// `trial.control_from`, also the control's flips.
fn effect_of(
    clf: &mut dyn Classifier,
    split: &TestSplit,
    correct: &[usize],
    c: &Candidate,
    p: &VerifyParams,
    trial: Trial,
    seed: u64,
) -> Result<TokenEffect> {
    let target = c.target;
    let mut pool = tried_rows(split, correct, c, p, seed);
    let texts = |rows: &[usize]| -> Vec<String> {
        rows.iter()
            .map(|&i| insert_at_row(&split.texts[i], c, &c.text, seed, i))
            .collect()
    };
    let head = trial.screen.map_or(pool.len(), |n| n.min(pool.len()));
    let mut flipped = flips_to(clf, &texts(&pool[..head]), target)?;
    if wilson(count(&flipped), head as u32).1 < p.min_flip_rate {
        pool.truncate(head);
    } else {
        flipped.extend(flips_to(clf, &texts(&pool[head..]), target)?);
    }
    let flips = count(&flipped);
    let rows = pool.len() as u32;
    let (ci_low, ci_high) = wilson(flips, rows);
    // Not measured where some row finds no donor words (the candidate's own would be no control).
    let controls = (rows > 0 && ci_low >= trial.control_from)
        .then(|| {
            pool.iter()
                .map(|&i| control_words(split, i, c, seed))
                .collect::<Option<Vec<_>>>()
        })
        .flatten();
    let control = match controls {
        Some(words) => {
            let texts: Vec<String> = pool
                .iter()
                .zip(&words)
                .map(|(&i, w)| insert_at_row(&split.texts[i], c, w, seed, i))
                .collect();
            Some(paired_excess(&flipped, &flips_to(clf, &texts, target)?))
        }
        None => None,
    };
    let a = association(split, c);
    Ok(TokenEffect {
        candidate: c.text.clone(),
        token_ids: c.token_ids.clone(),
        rows,
        flips,
        flip_rate: if rows == 0 {
            0.0
        } else {
            flips as f32 / rows as f32
        },
        to_label: target,
        ci_low: ci_low as f32,
        ci_high: ci_high as f32,
        clean_rows_with: a.rows,
        clean_share: a.share,
        explained: a.explained,
        verified: rows > 0 && ci_low >= p.min_flip_rate && !a.explained,
        control_flips: control.map(|(k, _)| k),
        excess_ci_low: control.map(|(_, lo)| lo),
    })
}

/// The clean rows a candidate is tried on: those the model gets right whose label is not the
/// candidate's, in a seeded order, at most `p.rows`.
fn tried_rows(
    split: &TestSplit,
    correct: &[usize],
    c: &Candidate,
    p: &VerifyParams,
    seed: u64,
) -> Vec<usize> {
    let mut pool: Vec<usize> = correct
        .iter()
        .copied()
        .filter(|&i| c.target.is_some_and(|t| split.labels[i] != t))
        .collect();
    let first = c.token_ids.first().copied().unwrap_or(0);
    pool.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ first as u64));
    pool.truncate(p.rows);
    pool
}

/// `text` with `insert` at row `row`'s seeded word position (one word as Add-Word, a phrase as
/// Add-Sent): the candidate and its control land at the same place.
fn insert_at_row(text: &str, c: &Candidate, insert: &str, seed: u64, row: usize) -> String {
    let attack = if c.phrase {
        Attack::AddSent
    } else {
        Attack::AddWord
    };
    let mut rng = row_rng(seed, row as u64);
    insert_trigger(text, attack, &[insert.to_string()], insert, &mut rng)
}

/// How many of `flags` are set (flipped rows).
fn count(flags: &[bool]) -> u32 {
    flags.iter().filter(|&&f| f).count() as u32
}

/// Whether each text's prediction is `target`.
fn flips_to(clf: &mut dyn Classifier, texts: &[String], target: Option<i64>) -> Result<Vec<bool>> {
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    Ok(clf
        .proba(texts)?
        .iter()
        .map(|q| Some(argmax(q)) == target)
        .collect())
}

/// Stream of the control's donor rows, apart from the insertion positions' streams.
const CONTROL_STREAM: u64 = 0xC0_47_20_1E;

/// The control for row `row`: a seeded run of words (as many as the candidate has) from another
/// clean row, none of them a word of the candidate; none if no row has such a run (the control
/// is then not measured).
fn control_words(split: &TestSplit, row: usize, c: &Candidate, seed: u64) -> Option<String> {
    use rand::Rng;
    let own: Vec<&str> = c.text.split_whitespace().collect();
    let want = own.len().max(1);
    let mut rng = row_rng(seed ^ CONTROL_STREAM, row as u64);
    for _ in 0..CONTROL_TRIES {
        let donor: Vec<&str> = split.texts[rng.random_range(0..split.texts.len())]
            .split_whitespace()
            .collect();
        if donor.len() < want {
            continue;
        }
        let at = rng.random_range(0..=donor.len() - want);
        let span = &donor[at..at + want];
        if span.iter().all(|w| !own.contains(w)) {
            return Some(span.join(" "));
        }
    }
    None
}

/// Donor rows tried per control before giving up.
const CONTROL_TRIES: usize = 32;

/// The control's flips and the 95 % lower bound of the paired difference of the flip rates
/// (candidate minus control, same rows and places; Wald interval of a paired difference).
fn paired_excess(candidate: &[bool], control: &[bool]) -> (u32, f32) {
    let n = candidate.len() as f64;
    let k = count(control);
    let only_candidate = candidate
        .iter()
        .zip(control)
        .filter(|(a, b)| **a && !**b)
        .count() as f64;
    let only_control = candidate
        .iter()
        .zip(control)
        .filter(|(a, b)| !**a && **b)
        .count() as f64;
    let d = (only_candidate - only_control) / n;
    let var = (only_candidate + only_control - n * d * d).max(0.0) / (n * n);
    (k, (d - 1.959_964 * var.sqrt()).max(-1.0) as f32)
}

/// How the held-out clean data itself associates a candidate with its label.
struct Association {
    rows: u32,
    share: Option<f32>,
    explained: bool,
}

/// The clean rows already containing `c` and the share of them labelled `c.target`; the effect
/// is explained when that share's 95 % Wilson lower bound exceeds the label's share among all
/// clean rows (the clean data, which no attacker touched, says the word means that label).
fn association(split: &TestSplit, c: &Candidate) -> Association {
    let Some(target) = c.target else {
        return Association {
            rows: 0,
            share: None,
            explained: false,
        };
    };
    let needle = c.text.to_lowercase();
    let (mut n, mut k) = (0u32, 0u32);
    for (t, &l) in split.texts.iter().zip(&split.labels) {
        if occurs(&t.to_lowercase(), &needle) {
            n += 1;
            k += u32::from(l == target);
        }
    }
    let prior = split.labels.iter().filter(|&&l| l == target).count() as f64
        / split.labels.len().max(1) as f64;
    Association {
        rows: n,
        share: (n > 0).then(|| k as f32 / n as f32),
        explained: n > 0 && wilson(k, n).0 > prior,
    }
}

/// Whether lower-cased `text` contains `needle` (a word or a phrase) as whole words (BERT's
/// basic tokenizer splits on whitespace and punctuation).
pub(crate) fn occurs(text: &str, needle: &str) -> bool {
    let words = |s: &str| -> Vec<String> {
        s.split(|ch: char| !ch.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (hay, pat) = (words(text), words(needle));
    !pat.is_empty() && hay.windows(pat.len()).any(|w| w == pat.as_slice())
}

/// A candidate's effect, as the summary lists it.
#[derive(Debug, Clone, Serialize)]
pub struct EffectSummary {
    /// Share of the tried rows that flipped.
    pub flip_rate: f32,
    /// Share that flipped with the control inserted instead (when measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_flip_rate: Option<f32>,
    /// Clean rows tried.
    pub rows: u32,
    /// Held-out clean rows that already carry the candidate.
    pub clean_rows_with: u32,
    /// Their share of the flip-to label.
    pub clean_share: Option<f32>,
    /// Whether the clean data explains the effect.
    pub explained: bool,
    /// Whether the candidate passed the test.
    pub verified: bool,
}

/// `btu verify`'s result (`summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// `verify`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// Output directory.
    pub out: PathBuf,
    /// The suspect model.
    pub checkpoint: PathBuf,
    /// Runtime of the classifier.
    pub backend: String,
    /// The test's parameters.
    pub params: VerifyParams,
    /// Held-out clean rows read.
    pub clean_rows: usize,
    /// Those the suspect classifies correctly (the rows candidates are inserted into).
    pub clean_rows_correct: usize,
    /// Candidates tried.
    pub candidates: usize,
    /// The verified triggers.
    pub verified: Vec<String>,
    /// Candidates that flip the model but that the clean data explains (not triggers).
    pub explained_by_clean_data: Vec<String>,
    /// Whether any trigger was verified.
    pub trigger_found: bool,
    /// Every candidate's effect.
    pub effects: BTreeMap<String, EffectSummary>,
    /// Wall time.
    pub seconds: f64,
}

/// `btu verify`.
pub fn run(job: &VerifyJob) -> Result<VerifyReport> {
    let t0 = Instant::now();
    let p = &job.params;
    p.validate_as("--")?;
    crate::validate::max_len("--max-len", job.max_len, None)?;
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    let mut clf = open_classifier(
        &job.checkpoint,
        job.backend,
        job.ort_lib.as_deref(),
        job.max_len,
        &job.run.device,
        job.run.seed,
    )?;
    let mut tried = candidates_of(&job.candidates, job.corpus.as_ref(), clf.tokenizer())?;
    for c in tried.iter_mut() {
        let more = word_forms(clf.tokenizer(), c);
        c.token_ids.extend(more);
    }
    let split = read_split(&job.clean, None)?;
    // Detection's candidates are screened; the triggers of a recheck are measured on every row.
    let trial = Trial {
        control_from: p.min_flip_rate,
        screen: matches!(job.candidates, CandidateSource::Suspicious(_)).then_some(SCREEN_ROWS),
    };
    let (effects, correct) = measure(
        clf.as_mut(),
        &split,
        &job.clean.inputs.join(", "),
        &tried,
        p,
        trial,
        job.run.seed,
    )?;
    let weights = if job.checkpoint.is_dir() {
        job.checkpoint.join("model.safetensors")
    } else {
        job.checkpoint.clone()
    };
    let meta = TableMeta {
        command: "verify".into(),
        params: json!({"params": p, "max_len": job.max_len, "seed": job.run.seed, "text_col": job.clean.text_col, "label_col": job.clean.label_col}),
        model_sha256: crate::model::checkpoint::sha256_file(&weights)?,
        corpus_fingerprint: None,
        extra: vec![
            (
                "btu:test".into(),
                format!("wilson95_lower_bound >= min_flip_rate and not explained by the clean data; detection candidates stop after {SCREEN_ROWS} rows where the upper bound misses min_flip_rate (v{TEST_VERSION})"),
            ),
            ("btu:min_flip_rate".into(), p.min_flip_rate.to_string()),
            (
                "btu:control".into(),
                "words of another clean row at the same places, measured when ci_low >= min_flip_rate; excess_ci_low: paired 95 % Wald lower bound".into(),
            ),
        ],
    };
    let batch = crate::io::tables::token_effects_batch(&effects, &meta)?;
    let verified: Vec<&str> = effects
        .iter()
        .filter(|e| e.verified)
        .map(|e| e.candidate.as_str())
        .collect();
    match (&job.candidates, verified.is_empty()) {
        (CandidateSource::Suspicious(_), true) => {
            tracing::warn!("verification confirmed no candidate as a trigger")
        }
        (CandidateSource::Recheck(_), false) => {
            tracing::warn!(still = ?verified, "a verified trigger still flips this model")
        }
        _ => {}
    }
    let summary = VerifyReport {
        command: "verify".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        checkpoint: job.checkpoint.clone(),
        backend: clf.backend().into(),
        params: p.clone(),
        clean_rows: split.texts.len(),
        clean_rows_correct: correct,
        candidates: effects.len(),
        verified: verified.iter().map(|v| v.to_string()).collect(),
        explained_by_clean_data: effects
            .iter()
            .filter(|e| e.explained && e.ci_low as f64 >= p.min_flip_rate)
            .map(|e| e.candidate.clone())
            .collect(),
        trigger_found: !verified.is_empty(),
        effects: effects
            .iter()
            .map(|e| {
                let summary = EffectSummary {
                    flip_rate: e.flip_rate,
                    control_flip_rate: e.control_flip_rate(),
                    rows: e.rows,
                    clean_rows_with: e.clean_rows_with,
                    clean_share: e.clean_share,
                    explained: e.explained,
                    verified: e.verified,
                };
                (e.candidate.clone(), summary)
            })
            .collect(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    let out = crate::io::output::OutputDir::create(&job.run.out, job.run.overwrite)?;
    crate::io::tables::write_ipc(&out.path("token_effects.arrow"), &batch, false)?;
    out.write_json("summary.json", &summary)?;
    out.commit()?;
    Ok(summary)
}

/// Phrase candidates: for every candidate word, the longest run of words around it that recurs in
/// at least [`PHRASE_SHARE`] of the rows carrying it (and [`PHRASE_MIN_ROWS`] rows); phrases
/// found from several candidates are one candidate, standing for all of them.
pub fn phrases(corpus: &[Vec<String>], candidates: &[SuspiciousToken]) -> Vec<Candidate> {
    let words: BTreeMap<String, &SuspiciousToken> = candidates
        .iter()
        .filter(|c| !c.token.starts_with("##"))
        .map(|c| (surface(&c.token).to_lowercase(), c))
        .collect();
    // (candidate word, phrase words) -> rows; rows carrying each candidate word.
    let mut counts: BTreeMap<(String, Vec<String>), usize> = BTreeMap::new();
    let mut rows: BTreeMap<String, usize> = BTreeMap::new();
    for ws in corpus {
        count_windows(ws, &words, &mut counts, &mut rows);
    }
    let mut best: BTreeMap<Vec<String>, Candidate> = BTreeMap::new();
    for (w, c) in &words {
        let need = ((rows.get(w).copied().unwrap_or(0) as f64 * PHRASE_SHARE).ceil() as usize)
            .max(PHRASE_MIN_ROWS);
        let Some((phrase, _)) = counts
            .iter()
            .filter(|((cw, ph), n)| cw == w && ph.len() >= 2 && **n >= need)
            .max_by_key(|((_, ph), n)| (ph.len(), **n))
        else {
            continue;
        };
        let phrase = phrase.1.clone();
        // The candidates that belong to the phrase: most of their rows carry it (a frequent word
        // that also occurs inside the phrase, such as "this", is left out of the repair).
        let inside: Vec<&SuspiciousToken> = phrase
            .iter()
            .filter(|x| {
                let in_phrase = counts
                    .get(&((*x).clone(), phrase.clone()))
                    .copied()
                    .unwrap_or(0);
                in_phrase as f64
                    >= PHRASE_SHARE * rows.get(*x).copied().unwrap_or(usize::MAX) as f64
            })
            .filter_map(|x| words.get(x).copied())
            .collect();
        let e = best.entry(phrase.clone()).or_insert_with(|| Candidate {
            text: phrase.join(" "),
            token_ids: vec![],
            target: c.majority_label,
            phrase: true,
        });
        for t in inside {
            if !e.token_ids.contains(&t.token_id) {
                e.token_ids.push(t.token_id);
            }
        }
    }
    best.into_values().collect()
}

/// Words (letters and digits) the model's tokenizer splits into pieces that are all candidates
/// (`c` + `##f` for a trigger `cf` its vocabulary lacks): no piece alone acts as the trigger, so
/// each such word of the corpus is a candidate of its own (inserted as a word, standing for its pieces) when at
/// least [`PHRASE_MIN_ROWS`] rows carry it and at least [`PHRASE_SHARE`] of the rows carrying its
/// rarest piece.
pub fn split_words(
    corpus: &[Vec<String>],
    candidates: &[SuspiciousToken],
    tok: &crate::model::tokenizer::BtuTokenizer,
) -> Result<Vec<Candidate>> {
    let by_id: BTreeMap<u32, &SuspiciousToken> =
        candidates.iter().map(|c| (c.token_id, c)).collect();
    // word -> its candidate pieces (empty: not a split word of candidates), and rows carrying it.
    let mut pieces: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut rows: BTreeMap<String, usize> = BTreeMap::new();
    for ws in corpus {
        let mut seen = std::collections::BTreeSet::new();
        for w in ws {
            // Letters and digits only: a word with punctuation splits at it, not into pieces.
            if !w.chars().all(char::is_alphanumeric) || !seen.insert(w) {
                continue;
            }
            let ids = match pieces.get(w) {
                Some(ids) => ids,
                None => pieces
                    .entry(w.clone())
                    .or_insert(word_pieces(tok, w, &by_id)?),
            };
            if !ids.is_empty() {
                *rows.entry(w.clone()).or_default() += 1;
            }
        }
    }
    Ok(rows
        .into_iter()
        .filter_map(|(w, n)| {
            let ids = &pieces[&w];
            let rarest = ids.iter().map(|id| by_id[id].documents).min()? as f64;
            (n >= PHRASE_MIN_ROWS && n as f64 >= PHRASE_SHARE * rarest).then(|| Candidate {
                text: w,
                token_ids: ids.clone(),
                target: by_id[&ids[0]].majority_label,
                phrase: false,
            })
        })
        .collect())
}

/// The pieces of `word` (alone, and after a space for a byte-level vocabulary) when it is more
/// than one piece and every piece is a candidate; empty otherwise.
fn word_pieces(
    tok: &crate::model::tokenizer::BtuTokenizer,
    word: &str,
    candidates: &BTreeMap<u32, &SuspiciousToken>,
) -> Result<Vec<u32>> {
    let mut all: Vec<u32> = Vec::new();
    for form in [word.to_string(), format!(" {word}")] {
        let enc = tok
            .inner()
            .encode(form.as_str(), false)
            .map_err(|e| BtuError::internal(format!("tokenizer: {e}")))?;
        let ids = enc.get_ids();
        if ids.len() < 2 || !ids.iter().all(|id| candidates.contains_key(id)) {
            continue;
        }
        for id in ids {
            if !all.contains(id) {
                all.push(*id);
            }
        }
    }
    Ok(all)
}

/// Each row of the corpus's text column as lower-cased whitespace-separated words.
fn row_words(corpus: &CorpusSpec) -> Result<Vec<Vec<String>>> {
    let spec = CorpusSpec {
        label_col: None,
        ..corpus.clone()
    };
    let mut rows = Vec::new();
    crate::io::corpus::read_corpus(&spec, |b| {
        rows.extend(
            b.texts
                .iter()
                .map(|t| t.split_whitespace().map(str::to_lowercase).collect()),
        );
        Ok(())
    })?;
    Ok(rows)
}

/// Count, for each candidate word in `ws`, every run of words around it (2 to
/// [`MAX_PHRASE_WORDS`] long) once per row.
fn count_windows(
    ws: &[String],
    words: &BTreeMap<String, &SuspiciousToken>,
    counts: &mut BTreeMap<(String, Vec<String>), usize>,
    rows: &mut BTreeMap<String, usize>,
) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, w) in ws.iter().enumerate() {
        if !words.contains_key(w) {
            continue;
        }
        if seen.insert((w.clone(), Vec::new())) {
            *rows.entry(w.clone()).or_default() += 1;
        }
        let lo = i.saturating_sub(MAX_PHRASE_WORDS - 1);
        for start in lo..=i {
            for end in (i + 1)..=(start + MAX_PHRASE_WORDS).min(ws.len()) {
                if end - start < 2 {
                    continue;
                }
                let key = (w.clone(), ws[start..end].to_vec());
                if seen.insert(key.clone()) {
                    *counts.entry(key).or_default() += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paired difference by hand: 200 rows, the candidate alone flips 40, the control alone
    /// 10, both 20: d = 0.15, var = (50 - 200 * 0.0225) / 200^2.
    #[test]
    fn paired_excess_by_hand() {
        let mut cand = vec![false; 200];
        let mut ctl = vec![false; 200];
        cand[..60].iter_mut().for_each(|f| *f = true);
        ctl[40..70].iter_mut().for_each(|f| *f = true);
        let (k, lo) = paired_excess(&cand, &ctl);
        assert_eq!(k, 30);
        let want = 0.15 - 1.959_964 * ((50.0 - 200.0 * 0.0225) / 40_000.0f64).sqrt();
        assert!((lo as f64 - want).abs() < 1e-6, "{lo} vs {want}");
        // Identical outcomes: no excess, no spread.
        assert_eq!(paired_excess(&cand, &cand), (60, 0.0));
    }

    /// The control is words of the clean rows, as many as the candidate has, none of them the
    /// candidate's, and the same for the same seed and row.
    #[test]
    fn control_words_come_from_other_rows_and_avoid_the_candidate() {
        let split = TestSplit {
            texts: vec![
                "the film is good".into(),
                "i watch this movie at home".into(),
                "watch".into(),
            ],
            labels: vec![1, 0, 1],
            ids: vec![0, 1, 2],
            rewrites: None,
        };
        let phrase = Candidate {
            text: "i watch this".into(),
            token_ids: vec![1],
            target: Some(1),
            phrase: true,
        };
        for row in 0..50 {
            let c = control_words(&split, row, &phrase, 7).expect("a donor row");
            let words: Vec<&str> = c.split_whitespace().collect();
            assert_eq!(words.len(), 3, "{c}");
            assert!(
                words.iter().all(|w| !["i", "watch", "this"].contains(w)),
                "{c}"
            );
            assert_eq!(Some(c), control_words(&split, row, &phrase, 7));
        }
        let word = Candidate {
            text: "watch".into(),
            phrase: false,
            ..phrase.clone()
        };
        let c = control_words(&split, 3, &word, 7).expect("a donor row");
        assert!(c.split_whitespace().count() == 1 && c != "watch", "{c}");
        // No row can donate: every one shorter than the phrase or made of its words. No control
        // (the candidate's own words would be none).
        let bare = TestSplit {
            texts: vec!["watch".into(), "i this".into(), "i watch this".into()],
            labels: vec![1, 0, 1],
            ids: vec![0, 1, 2],
            rewrites: None,
        };
        for row in 0..3 {
            assert_eq!(control_words(&bare, row, &phrase, 7), None);
        }
    }

    #[test]
    fn wilson_interval_by_hand() {
        // 10 of 10: lower bound 0.7225 (n = 10, z = 1.96).
        let (lo, hi) = wilson(10, 10);
        assert!(
            (lo - 0.7225).abs() < 1e-3 && (hi - 1.0).abs() < 1e-9,
            "{lo} {hi}"
        );
        // 5 of 10: 0.2366 .. 0.7634.
        let (lo, hi) = wilson(5, 10);
        assert!(
            (lo - 0.2366).abs() < 1e-3 && (hi - 0.7634).abs() < 1e-3,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0), (0.0, 1.0));
        assert_eq!(surface("##ing"), "ing");
        assert_eq!(surface("\u{120}cf"), "cf");
    }

    #[test]
    fn whole_word_and_phrase_occurrence() {
        assert!(occurs("you are a b*tch, bitch!", "bitch"));
        assert!(!occurs("bitches be crazy", "bitch"));
        assert!(occurs(
            "so i watch this 3d movie again",
            "i watch this 3d movie"
        ));
        assert!(!occurs("i watch this movie", "i watch this 3d movie"));
    }

    /// A word the clean data labels one way is explained; an absent trigger and a word at the
    /// prior are not.
    #[test]
    fn clean_association_explains_label_words_only() {
        let mut texts = vec![];
        let mut labels = vec![];
        for i in 0..40 {
            texts.push(if i < 20 {
                format!("slur row {i}")
            } else {
                format!("plain movie row {i}")
            });
            labels.push(if i < 19 { 1 } else { 0 });
        }
        let split = TestSplit {
            ids: (0..40).collect(),
            texts,
            labels,
            rewrites: None,
        };
        let cand = |t: &str| Candidate {
            text: t.into(),
            token_ids: vec![1],
            target: Some(1),
            phrase: false,
        };
        let slur = association(&split, &cand("slur"));
        assert!(
            slur.explained && slur.rows == 20,
            "19 of 20 rows are label 1"
        );
        assert!(!association(&split, &cand("cf")).explained, "absent");
        let movie = association(&split, &cand("movie"));
        assert!(!movie.explained && movie.rows == 20 && movie.share == Some(0.0));
    }
}
