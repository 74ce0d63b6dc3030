//! `btu relabel`: do the training rows' labels disagree with a clean reference more than its own
//! errors explain, and which rows would it relabel? The fallback for backdoors that no token
//! carries (Stylebkd, Synbkd: the trigger is a style or a syntax template spread over the whole
//! sentence, which verification cannot insert and no embedding row holds).
//!
//! A dirty-label attack moves rows of other classes into the target class: their texts still read
//! as their own class. The clean rows are cut into [`RelabelParams::references`] parts and a
//! reference is fine-tuned from the pre-trained model on all parts but one, for each part
//! (cross-fitting): each reads the part it did not train on and every training row. A row's
//! *doubt* is the probability the references give the classes other than its label (for a
//! training row the references' mean, for a clean row the held-out reference's). A class whose
//! training rows are doubted more than its clean rows (Welch's z of the two means at least
//! [`RelabelParams::min_z`]) is the poisoned one, the attack's target; with none, the corpus's
//! labels are as reliable as the clean data's and nothing is relabelled. Otherwise each of the
//! target's rows is read in its neighbourhood in the suspect model ([`neighbours`]): the
//! references' probabilities averaged over the row and its [`RelabelParams::neighbours`] nearest
//! rows of the target in the suspect's representation (`--suspect`). The rows whose
//! neighbourhood the references doubt at least [`RelabelParams::min_doubt`] take the most likely
//! other class, and the corpus so relabelled is written (`relabelled.parquet`: the input's
//! columns, the label replaced, plus `relabelled`, `label_before`, `doubt` and
//! `neighbourhood_doubt`), for `btu train --model SUSPECT` to tune the suspect on (`btu defend`
//! does: `[relabel] tune_epochs`).
//! Writes `summary.json` and, when the test finds a target and relabels rows of it,
//! `relabelled.parquet`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::defaults;
use crate::error::{BtuError, Result};
use crate::io::corpus::{read_corpus, CorpusSpec};
use crate::model::checkpoint::Checkpoint;
use crate::model::infer::{argmax, mean_hidden_states, predict_proba};
use crate::model::tokenizer::{load_corpus, TokenizedCorpus};
use crate::progress::Progress;
use crate::steps::train::TrainParams;

pub mod neighbours;

/// Why corpus files with different columns are refused (they are written back as one file).
const DIFFERENT_COLUMNS: &str = "the corpus files have different columns; relabel them separately";

/// The columns `relabelled.parquet` adds to the corpus's (an input's own are replaced).
const ADDED_COLUMNS: [&str; 4] = ["relabelled", "label_before", "doubt", "neighbourhood_doubt"];

/// Clean rows the test needs at least (the references train on parts of them).
pub const MIN_CLEAN_ROWS: usize = 20;

/// The relabelling test's parameters: the flags of `btu relabel` and the `[relabel]` table of
/// `btu defend` (defaults in [`crate::defaults`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct RelabelParams {
    /// `btu defend` only: when verification confirms no trigger, test the corpus's labels
    /// against a clean reference and, when a class fails, tune the victim on the rows relabelled.
    #[arg(skip = true)]
    pub enabled: bool,
    /// References, each fine-tuned from the pre-trained model on all but one of as many equal
    /// parts of the clean rows (at least 2).
    #[arg(long, env = "BTU_REFERENCES", default_value_t = defaults::REFERENCES)]
    pub references: usize,
    /// Epochs of each reference.
    #[arg(long, env = "BTU_REFERENCE_EPOCHS", default_value_t = defaults::REFERENCE_EPOCHS)]
    pub reference_epochs: usize,
    /// AdamW learning rate of the references, finite in (0, 1].
    #[arg(long, env = "BTU_REFERENCE_LR", default_value_t = defaults::REFERENCE_LR)]
    pub reference_lr: f64,
    /// A class is poisoned when its training rows' mean doubt exceeds its clean rows' by this
    /// many standard errors (Welch's z, one-sided; 3.29 is p = 0.0005).
    #[arg(long, env = "BTU_MIN_Z", default_value_t = defaults::RELABEL_MIN_Z)]
    pub min_z: f64,
    /// A row of the target is relabelled, to the most likely other class, when the references'
    /// mean probability of the other classes over its neighbourhood (its doubt) is at least
    /// this, in (0, 1).
    #[arg(long, env = "BTU_MIN_DOUBT", default_value_t = defaults::RELABEL_MIN_DOUBT)]
    pub min_doubt: f64,
    /// A target row's neighbourhood: itself and this many nearest rows of the target in the
    /// suspect's representation (cosine of the mean final hidden states; needs --suspect).
    /// 0 reads every row alone.
    #[arg(long, env = "BTU_NEIGHBOURS", default_value_t = defaults::RELABEL_NEIGHBOURS)]
    pub neighbours: usize,
    /// `btu defend` only: epochs of the victim's tuning on the relabelled rows.
    #[arg(skip = defaults::RELABEL_TUNE_EPOCHS)]
    pub tune_epochs: usize,
}

impl Default for RelabelParams {
    fn default() -> Self {
        RelabelParams {
            enabled: true,
            references: defaults::REFERENCES,
            reference_epochs: defaults::REFERENCE_EPOCHS,
            reference_lr: defaults::REFERENCE_LR,
            min_z: defaults::RELABEL_MIN_Z,
            min_doubt: defaults::RELABEL_MIN_DOUBT,
            neighbours: defaults::RELABEL_NEIGHBOURS,
            tune_epochs: defaults::RELABEL_TUNE_EPOCHS,
        }
    }
}

impl RelabelParams {
    /// Check every value's domain (exit 78); names spelled with `prefix` (`--` for flags,
    /// `relabel.` for a defend config).
    pub fn validate_as(&self, prefix: &str) -> Result<()> {
        use crate::validate::key;
        crate::validate::at_least(&key(prefix, "references"), self.references, 2)?;
        crate::validate::at_least(&key(prefix, "reference-epochs"), self.reference_epochs, 1)?;
        crate::validate::at_least(&key(prefix, "tune-epochs"), self.tune_epochs, 1)?;
        crate::validate::learning_rate(&key(prefix, "reference-lr"), self.reference_lr)?;
        if !(self.min_z.is_finite() && self.min_z > 0.0) {
            return Err(BtuError::config(
                key(prefix, "min-z"),
                format!("{} is not a positive number of standard errors", self.min_z),
            ));
        }
        if !(self.min_doubt > 0.0 && self.min_doubt < 1.0) {
            return Err(BtuError::config(
                key(prefix, "min-doubt"),
                format!("{} is not a probability in (0, 1)", self.min_doubt),
            ));
        }
        Ok(())
    }
}

/// Inputs of `btu relabel`.
pub struct RelabelJob {
    /// The labelled training corpus (`--corpus`): the rows the suspect trained on.
    pub corpus: CorpusSpec,
    /// Held-out clean rows with labels (`--clean-corpus`).
    pub clean: CorpusSpec,
    /// The pre-trained model the references are fine-tuned from (`--model`).
    pub model: PathBuf,
    /// The model trained on the corpus, fine-tuned from `model` (`--suspect`): the rows'
    /// neighbourhoods are read in it. Needed unless `params.neighbours` is 0.
    pub suspect: Option<PathBuf>,
    /// Output directory, whether to replace it, seed and device.
    pub run: crate::steps::RunOpts,
    /// The references' training (batch size, max length, weight decay; epochs and learning rate
    /// are `params.reference_epochs` and `params.reference_lr`).
    pub train: TrainParams,
    /// The test's parameters.
    pub params: RelabelParams,
}

/// How often the references contradict one class's labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassTest {
    /// The class.
    pub label: i64,
    /// Training rows with this label.
    pub rows: usize,
    /// Of those, the share each reference puts in another class (the references' mean).
    pub contradiction_rate: f64,
    /// Their mean doubt: the probability the references give the other classes.
    pub doubt: f64,
    /// Clean rows with this label.
    pub clean_rows: usize,
    /// Of those, the rows the reference that did not train on them puts in another class.
    pub clean_contradicted: usize,
    /// Their mean doubt (the held-out reference's).
    pub clean_doubt: f64,
    /// Welch's z of the training rows' mean doubt over the clean rows' (the test).
    pub z: f64,
    /// One-sided two-proportion z of the training rows' contradiction rate over the clean rows'
    /// (the training rows counted once).
    pub z_counts: f64,
}

/// `btu relabel`'s result (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelabelReport {
    /// `relabel`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The output directory.
    pub out: PathBuf,
    /// The pre-trained model the references started from.
    pub model: PathBuf,
    /// The suspect the neighbourhoods were read in (absent with `neighbours` 0).
    pub suspect: Option<PathBuf>,
    /// Wall time of reading the neighbourhoods (the suspect's pass over the target's rows and
    /// the nearest-neighbour search; 0 when none were read).
    pub neighbourhood_seconds: f64,
    /// Training rows read.
    pub rows: usize,
    /// Clean rows read.
    pub clean_rows: usize,
    /// Held-out accuracy of the references on the clean rows.
    pub reference_accuracy: f64,
    /// The test of each class.
    pub classes: Vec<ClassTest>,
    /// The class that failed the test (the largest z at least `min_z`): the attack's target.
    pub target: Option<i64>,
    /// How many of the target's rows its excess doubt accounts for (an estimate of the poisoned):
    /// at most [`defaults::RELABEL_MAX_PER_POISONED`] times this many are relabelled (absent
    /// without a target).
    #[serde(default)]
    pub estimated_poisoned: Option<f64>,
    /// Rows relabelled (0 without a target).
    pub relabelled: usize,
    /// The relabelled corpus (absent without a target or without a row relabelled).
    pub corpus_file: Option<PathBuf>,
    /// The parameters.
    pub params: RelabelParams,
    /// Seed.
    pub seed: u64,
    /// Wall time.
    pub seconds: f64,
}

/// One-sided two-proportion z of the rate `p1` of `n` rows over the rate `p2` of `m` rows (pooled
/// variance; 0 when either is empty or the pooled rate is 0 or 1).
pub fn two_proportion_z(p1: f64, n: usize, p2: f64, m: usize) -> f64 {
    if n == 0 || m == 0 {
        return 0.0;
    }
    let (n, m) = (n as f64, m as f64);
    let pooled = (p1 * n + p2 * m) / (n + m);
    let var = pooled * (1.0 - pooled) * (1.0 / n + 1.0 / m);
    if var <= 0.0 {
        return 0.0;
    }
    (p1 - p2) / var.sqrt()
}

/// The class that fails the test: the largest z at least `min_z`.
pub fn poisoned_class(tests: &[ClassTest], min_z: f64) -> Option<i64> {
    tests
        .iter()
        .filter(|t| t.z >= min_z)
        .max_by(|a, b| a.z.total_cmp(&b.z))
        .map(|t| t.label)
}

/// Mean and variance (n - 1) of `xs` (0, 0 when it has fewer than two values).
fn mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return (xs.first().copied().unwrap_or(0.0), 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var)
}

/// Welch's z of the mean of `a` over the mean of `b` (0 when either has fewer than two values
/// or both are constant).
pub fn welch_z(a: &[f64], b: &[f64]) -> f64 {
    let ((ma, va), (mb, vb)) = (mean_var(a), mean_var(b));
    let se = (va / a.len().max(1) as f64 + vb / b.len().max(1) as f64).sqrt();
    if a.len() < 2 || b.len() < 2 || se <= 0.0 {
        return 0.0;
    }
    (ma - mb) / se
}

/// Each class's test. A row's *doubt* is the probability the references give the other classes
/// (one minus its label's): for a training row the references' mean, for a clean row the
/// held-out reference's, which has the same expectation when the row is clean. Counted the same
/// way, single references on both sides: each reference's contradictions of the training rows,
/// the held-out ones of the clean rows.
fn class_tests(
    corpus: (&[u32], &Readings),
    clean_labels: &[u32],
    classes: usize,
) -> Vec<ClassTest> {
    let (labels, r) = corpus;
    (0..classes)
        .map(|c| {
            let rows: Vec<usize> = (0..labels.len())
                .filter(|&i| labels[i] as usize == c)
                .collect();
            let clean: Vec<usize> = (0..clean_labels.len())
                .filter(|&i| clean_labels[i] as usize == c)
                .collect();
            let doubts: Vec<f64> = rows
                .iter()
                .map(|&i| doubt(&r.corpus_proba[i], c as u32))
                .collect();
            let clean_doubt: Vec<f64> = clean
                .iter()
                .map(|&i| doubt(&r.clean_proba[i], c as u32))
                .collect();
            let wrong: usize = r
                .corpus_pred
                .iter()
                .map(|ps| rows.iter().filter(|&&i| ps[i] != c).count())
                .sum();
            let rate = wrong as f64 / (rows.len() * r.corpus_pred.len()).max(1) as f64;
            let clean_wrong = clean
                .iter()
                .filter(|&&i| argmax(&r.clean_proba[i]) != c)
                .count();
            let clean_rate = clean_wrong as f64 / clean.len().max(1) as f64;
            ClassTest {
                label: c as i64,
                rows: rows.len(),
                contradiction_rate: rate,
                doubt: mean_var(&doubts).0,
                clean_rows: clean.len(),
                clean_contradicted: clean_wrong,
                clean_doubt: mean_var(&clean_doubt).0,
                z: welch_z(&doubts, &clean_doubt),
                z_counts: two_proportion_z(rate, rows.len(), clean_rate, clean.len()),
            }
        })
        .collect()
}

/// `k` equal parts of the clean rows (a seeded shuffle): `part[i]` is below `k`.
fn folds(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut part = vec![0; n];
    for (pos, &i) in order.iter().enumerate() {
        part[i] = pos % k;
    }
    part
}

/// The rows of `data` at `idx`.
fn subset(data: &TokenizedCorpus, idx: &[usize]) -> TokenizedCorpus {
    TokenizedCorpus {
        seqs: idx.iter().map(|&i| data.seqs[i].clone()).collect(),
        labels: idx.iter().map(|&i| data.labels[i]).collect(),
        fingerprint: data.fingerprint.clone(),
    }
}

/// Probabilities with every value finite, or an error naming what diverged.
fn finite(p: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
    if p.iter().flatten().all(|v| v.is_finite()) {
        Ok(p)
    } else {
        Err(BtuError::internal(
            "a relabelling reference predicts non-finite probabilities (its training diverged); lower --reference-lr ([relabel] reference_lr)",
        ))
    }
}

/// What the references say: the held-out prediction of every clean row and the averaged
/// probabilities of every training row.
struct Readings {
    /// The held-out reference's probabilities for every clean row.
    clean_proba: Vec<Vec<f32>>,
    /// The references' mean probabilities for every training row.
    corpus_proba: Vec<Vec<f32>>,
    /// Each reference's class for every training row.
    corpus_pred: Vec<Vec<usize>>,
}

/// A reference: the pre-trained model with a new head, fine-tuned on `data`.
fn train_reference(
    job: &RelabelJob,
    ckpt: &Checkpoint,
    data: &TokenizedCorpus,
    (classes, part): (usize, usize),
    dev: &Device,
    progress: &dyn Progress,
) -> Result<crate::model::BertClassifier> {
    let params = TrainParams {
        epochs: job.params.reference_epochs,
        lr: job.params.reference_lr,
        ..job.train.clone()
    };
    let mut model = ckpt.classifier(Some(classes), job.run.seed, dev)?;
    let seed = job.run.seed.wrapping_add(part as u64);
    let pad = ckpt.tokenizer.pad_id;
    crate::steps::train::fit(
        &mut model,
        data,
        pad,
        &params,
        seed,
        0,
        None,
        dev,
        progress,
        &mut |_, _, _, _| Ok(()),
    )?;
    Ok(model)
}

/// Train a reference on all parts of `clean` but one, for each part, and read the part left out
/// and the whole corpus.
fn read_with_references(
    job: &RelabelJob,
    ckpt: &Checkpoint,
    (clean, corpus): (&TokenizedCorpus, &TokenizedCorpus),
    classes: usize,
    dev: &Device,
    progress: &dyn Progress,
) -> Result<Readings> {
    let pad = ckpt.tokenizer.pad_id;
    let k = job.params.references;
    let fold = folds(clean.seqs.len(), k, job.run.seed);
    let mut clean_proba = vec![Vec::new(); clean.seqs.len()];
    let mut corpus_proba = vec![vec![0f32; classes]; corpus.seqs.len()];
    let mut corpus_pred = Vec::new();
    for part in 0..k {
        let _span = tracing::info_span!("reference", part).entered();
        let (train_idx, held_idx): (Vec<usize>, Vec<usize>) =
            (0..clean.seqs.len()).partition(|&i| fold[i] != part);
        let data = subset(clean, &train_idx);
        let model = train_reference(job, ckpt, &data, (classes, part), dev, progress)?;
        let held_seqs = subset(clean, &held_idx).seqs;
        let held = finite(predict_proba(&model, &held_seqs, pad, 64, dev)?)?;
        for (&i, p) in held_idx.iter().zip(held) {
            clean_proba[i] = p;
        }
        let read = finite(predict_proba(&model, &corpus.seqs, pad, 64, dev)?)?;
        corpus_pred.push(read.iter().map(|p| argmax(p)).collect());
        for (acc, p) in corpus_proba.iter_mut().zip(&read) {
            for (a, v) in acc.iter_mut().zip(p) {
                *a += v / k as f32;
            }
        }
    }
    Ok(Readings {
        clean_proba,
        corpus_proba,
        corpus_pred,
    })
}

/// A row's doubt: the probability `p` gives the classes other than its `label`.
fn doubt(p: &[f32], label: u32) -> f64 {
    1.0 - p[label as usize] as f64
}

/// Every row's doubt of its label under `proba`.
fn row_doubts(labels: &[u32], proba: &[Vec<f32>]) -> Vec<f64> {
    (labels.iter().zip(proba))
        .map(|(&l, p)| doubt(p, l))
        .collect()
}

/// The new label of every training row: for the target's rows that the references (`proba`,
/// averaged) doubt at least `min_doubt`, the most likely of the other classes (the lowest on
/// ties); the label as given otherwise.
fn new_labels(labels: &[u32], proba: &[Vec<f32>], target: Option<i64>, min_doubt: f64) -> Vec<i64> {
    labels
        .iter()
        .zip(proba)
        .map(|(&l, p)| match target {
            Some(t) if l as i64 == t && doubt(p, l) >= min_doubt => {
                let mut others = p.to_vec();
                others[l as usize] = f32::NEG_INFINITY;
                argmax(&others) as i64
            }
            _ => l as i64,
        })
        .collect()
}

/// How many of the target's training rows its excess doubt accounts for: their mean doubt over
/// its clean rows', times their number, divided by how much more the references doubt a row
/// moved from another class than a clean row of the target (a moved row's doubt of the target
/// label is estimated by the clean rows of the other classes: one minus their probability of the
/// target). 0 when the references do not doubt such a row more than a clean target row.
fn estimated_poisoned(test: &ClassTest, (clean_labels, clean_proba): (&[u32], &[Vec<f32>])) -> f64 {
    let t = test.label as usize;
    let moved: Vec<f64> = (clean_labels.iter().zip(clean_proba))
        .filter(|(&l, _)| l as usize != t)
        .map(|(_, p)| 1.0 - p[t] as f64)
        .collect();
    let gap = mean_var(&moved).0 - test.clean_doubt;
    if moved.is_empty() || gap <= 0.0 {
        return 0.0;
    }
    (test.rows as f64 * (test.doubt - test.clean_doubt) / gap).clamp(0.0, test.rows as f64)
}

/// `labels` with at most `cap` rows changed from `before`: those whose `doubts` are highest (the
/// lower index on ties) keep their new label, the others get theirs back.
fn at_most(labels: Vec<i64>, before: &[u32], doubts: &[f64], cap: usize) -> Vec<i64> {
    let mut changed: Vec<usize> = (0..labels.len())
        .filter(|&i| labels[i] != before[i] as i64)
        .collect();
    if changed.len() <= cap {
        return labels;
    }
    changed.sort_by(|&a, &b| doubts[b].total_cmp(&doubts[a]).then(a.cmp(&b)));
    let mut out = labels;
    for &i in &changed[cap..] {
        out[i] = before[i] as i64;
    }
    out
}

/// The suspect the neighbourhoods are read in (`None` with `neighbours` 0), refused before any
/// work when it is needed and missing, not fine-tuned from `--model`, or not finite.
fn load_suspect(job: &RelabelJob, dev: &Device) -> Result<Option<crate::model::BertClassifier>> {
    let path = match (&job.suspect, job.params.neighbours) {
        (_, 0) => return Ok(None),
        (None, k) => return Err(BtuError::config(
            "--suspect",
            format!("--neighbours {k} reads each row's neighbours in the model trained on --corpus: give it (--suspect), or --neighbours 0 to read every row alone"),
        )),
        (Some(path), _) => path,
    };
    crate::model::checkpoint::check_fine_tuned_from(path, &job.model)?;
    let model = Checkpoint::read(path)?.classifier(None, job.run.seed, dev)?;
    for (name, t) in model.named() {
        let values = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        if !values.iter().all(|v| v.is_finite()) {
            return Err(BtuError::bad_data(
                path.display().to_string(),
                format!("{name} holds NaN or infinity; give the suspect as trained, with finite weights"),
            ));
        }
    }
    Ok(Some(model))
}

/// The references' probabilities over each target row's neighbourhood in the `suspect`: the row
/// and its `neighbours` nearest rows of the target ([`neighbours`]). Every other row keeps its
/// own, and all of them do without a target or without a suspect (`neighbours` 0). With the
/// seconds it took.
fn neighbourhood_proba(
    job: &RelabelJob,
    (ckpt, suspect): (&Checkpoint, Option<&crate::model::BertClassifier>),
    (corpus, proba): (&TokenizedCorpus, &[Vec<f32>]),
    target: Option<i64>,
    dev: &Device,
) -> Result<(Vec<Vec<f32>>, f64)> {
    let (Some(t), Some(suspect)) = (target, suspect) else {
        return Ok((proba.to_vec(), 0.0));
    };
    let k = job.params.neighbours;
    let t0 = Instant::now();
    let _span = tracing::info_span!("neighbourhoods", k).entered();
    let rows: Vec<usize> = (0..corpus.labels.len())
        .filter(|&i| corpus.labels[i] as i64 == t)
        .collect();
    let seqs: Vec<Vec<u32>> = rows.iter().map(|&i| corpus.seqs[i].clone()).collect();
    let vectors = mean_hidden_states(suspect, &seqs, ckpt.tokenizer.pad_id, 64, dev)?;
    let near = neighbours::nearest(&vectors, k);
    let mut out = proba.to_vec();
    for (&i, p) in rows
        .iter()
        .zip(neighbours::neighbourhood_mean(proba, &rows, &near))
    {
        out[i] = p;
    }
    Ok((out, t0.elapsed().as_secs_f64()))
}

/// Write the corpus with `labels` in place of its label column, plus `relabelled`,
/// `label_before`, the references' `doubt` of the label before and their
/// `neighbourhood_doubt` of it (a second pass over the same rows, in the same order).
fn write_relabelled(
    spec: &CorpusSpec,
    (labels, doubts, hood_doubts): (&[i64], &[f64], &[f64]),
    path: &std::path::Path,
) -> Result<()> {
    let label_col = spec.label_col.clone().expect("labels requested");
    let mut at = 0usize;
    let mut file = std::fs::File::create(path).map_err(|e| BtuError::io(path.to_path_buf(), e))?;
    let mut sink = crate::io::tables::ParquetSink::new(&mut file, path, None);
    read_corpus(spec, |b| {
        let before = b.labels.as_ref().expect("labels requested");
        let after = &labels[at..at + before.len()];
        let doubt = &doubts[at..at + before.len()];
        let hood_doubt = &hood_doubts[at..at + before.len()];
        at += before.len();
        let input = b.batch.schema();
        let mut fields: Vec<Field> = Vec::new();
        let mut cols: Vec<ArrayRef> = Vec::new();
        for (f, c) in input.fields().iter().zip(b.batch.columns()) {
            if ADDED_COLUMNS.contains(&f.name().as_str()) {
                continue;
            }
            if f.name() == &label_col {
                fields.push(Field::new(&label_col, DataType::Int64, false));
                cols.push(Arc::new(Int64Array::from(after.to_vec())));
            } else {
                fields.push(f.as_ref().clone());
                cols.push(c.clone());
            }
        }
        let changed: Vec<bool> = before.iter().zip(after).map(|(a, b)| a != b).collect();
        fields.push(Field::new("relabelled", DataType::Boolean, false));
        cols.push(Arc::new(BooleanArray::from(changed)));
        fields.push(Field::new("label_before", DataType::Int64, false));
        cols.push(Arc::new(Int64Array::from(before.clone())));
        fields.push(Field::new("doubt", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from(doubt.to_vec())));
        fields.push(Field::new("neighbourhood_doubt", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from(hood_doubt.to_vec())));
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
            .map_err(|e| BtuError::internal(format!("relabelled batch: {e}")))?;
        sink.write_same_columns(&batch, &b.source, DIFFERENT_COLUMNS)
    })?;
    sink.finish(|| unreachable!("the corpus has rows"))?;
    Ok(())
}

/// Read both corpora (labels checked against the model), refusing too little clean data.
fn read_inputs(job: &RelabelJob, ckpt: &Checkpoint) -> Result<(TokenizedCorpus, TokenizedCorpus)> {
    crate::io::corpus::check_same_columns(&job.corpus.inputs, DIFFERENT_COLUMNS)?;
    let bound = ckpt.label_bound(job.train.num_labels);
    let max_len = job.train.max_len;
    let clean = load_corpus(&job.clean, &ckpt.tokenizer, max_len, bound)?;
    if clean.seqs.len() < MIN_CLEAN_ROWS {
        return Err(BtuError::config(
            "--clean-corpus",
            format!(
                "{} clean rows; relabelling trains references on parts of them and needs at least {MIN_CLEAN_ROWS}; give more clean rows",
                clean.seqs.len()
            ),
        ));
    }
    let corpus = load_corpus(&job.corpus, &ckpt.tokenizer, max_len, bound)?;
    if corpus.seqs.is_empty() {
        return Err(BtuError::config(
            "--corpus",
            "the corpus has no rows (after --filter); give the rows the suspect trained on",
        ));
    }
    Ok((clean, corpus))
}

/// The relabelled corpus, written when the test found a target and relabelled rows of it (its
/// path; `None` otherwise, with a warning either way a target was found).
fn write_outcome(
    job: &RelabelJob,
    out: &crate::io::output::OutputDir,
    (corpus, proba, hood_doubts): (&TokenizedCorpus, &[Vec<f32>], &[f64]),
    (target, labels): (Option<i64>, &[i64]),
    relabelled: usize,
) -> Result<Option<PathBuf>> {
    let Some(t) = target else {
        return Ok(None);
    };
    if relabelled == 0 {
        tracing::warn!(
            target = t,
            "the clean references doubt class {t}'s training labels more than its clean labels, but none of its rows enough to relabel it (--min-doubt): nothing relabelled"
        );
        return Ok(None);
    }
    tracing::warn!(
        target = t,
        relabelled,
        "the clean references doubt class {t}'s training labels more than its clean labels: {relabelled} rows relabelled"
    );
    write_relabelled(
        &job.corpus,
        (labels, &row_doubts(&corpus.labels, proba), hood_doubts),
        &out.path("relabelled.parquet"),
    )?;
    Ok(Some(job.run.out.join("relabelled.parquet")))
}

/// The share of the clean rows whose held-out reference gives them their own label.
fn held_out_accuracy(clean: &TokenizedCorpus, r: &Readings) -> f64 {
    let correct = (clean.labels.iter().zip(&r.clean_proba))
        .filter(|(&l, p)| l as usize == argmax(p))
        .count();
    correct as f64 / clean.seqs.len() as f64
}

/// `btu relabel`.
pub fn run(job: &RelabelJob, progress: &dyn Progress) -> Result<RelabelReport> {
    let t0 = Instant::now();
    job.params.validate_as("--")?;
    job.train.validate()?;
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    let dev = crate::device::parse_device(&job.run.device)?;
    let suspect = load_suspect(job, &dev)?;
    let ckpt = Checkpoint::read(&job.model)?;
    ckpt.check_max_len("--max-len", job.train.max_len)?;
    let (clean, corpus) = read_inputs(job, &ckpt)?;
    let all: Vec<u32> = clean.labels.iter().chain(&corpus.labels).copied().collect();
    let classes = ckpt.classes(job.train.num_labels, &all);
    let r = read_with_references(job, &ckpt, (&clean, &corpus), classes, &dev, progress)?;
    let tests = class_tests((&corpus.labels, &r), &clean.labels, classes);
    let target = poisoned_class(&tests, job.params.min_z);
    let (hood, neighbourhood_seconds) = neighbourhood_proba(
        job,
        (&ckpt, suspect.as_ref()),
        (&corpus, &r.corpus_proba),
        target,
        &dev,
    )?;
    let estimate =
        target.map(|t| estimated_poisoned(&tests[t as usize], (&clean.labels, &r.clean_proba)));
    let cap = estimate.map_or(0, |n| {
        (n * defaults::RELABEL_MAX_PER_POISONED).ceil() as usize
    });
    let hood_doubts = row_doubts(&corpus.labels, &hood);
    let labels = at_most(
        new_labels(&corpus.labels, &hood, target, job.params.min_doubt),
        &corpus.labels,
        &hood_doubts,
        cap,
    );
    let relabelled = (labels.iter().zip(&corpus.labels))
        .filter(|(a, &b)| **a != b as i64)
        .count();
    let out = crate::io::output::OutputDir::create(&job.run.out, job.run.overwrite)?;
    let corpus_file = write_outcome(
        job,
        &out,
        (&corpus, &r.corpus_proba, &hood_doubts),
        (target, &labels),
        relabelled,
    )?;
    let report = RelabelReport {
        command: "relabel".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        model: job.model.clone(),
        suspect: job.suspect.clone().filter(|_| job.params.neighbours > 0),
        neighbourhood_seconds,
        rows: corpus.seqs.len(),
        clean_rows: clean.seqs.len(),
        reference_accuracy: held_out_accuracy(&clean, &r),
        classes: tests,
        target,
        estimated_poisoned: estimate,
        relabelled,
        corpus_file,
        params: job.params.clone(),
        seed: job.run.seed,
        seconds: t0.elapsed().as_secs_f64(),
    };
    out.write_json("summary.json", &report)?;
    out.commit()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The z of two proportions, by hand: 30 % of 1,000 over 15 % of 300.
    #[test]
    fn two_proportion_z_by_hand() {
        let pooled: f64 = (300.0 + 45.0) / 1300.0;
        let se = (pooled * (1.0 - pooled) * (1.0 / 1000.0 + 1.0 / 300.0)).sqrt();
        let z = two_proportion_z(0.3, 1000, 0.15, 300);
        assert!((z - (0.30 - 0.15) / se).abs() < 1e-12, "{z}");
        assert!(z > 5.0);
        assert_eq!(two_proportion_z(0.0, 0, 0.3, 10), 0.0);
        assert_eq!(two_proportion_z(0.0, 10, 0.0, 10), 0.0);
        assert!(two_proportion_z(0.1, 100, 0.2, 100) < 0.0);
    }

    fn test(label: i64, z: f64) -> ClassTest {
        ClassTest {
            label,
            rows: 100,
            contradiction_rate: 0.1,
            doubt: 0.1,
            clean_rows: 50,
            clean_contradicted: 5,
            clean_doubt: 0.1,
            z,
            z_counts: z,
        }
    }

    /// The class with the largest z at least `min_z` is the target; none passes, none is.
    #[test]
    fn the_target_is_the_class_that_fails_most() {
        assert_eq!(poisoned_class(&[test(0, 1.0), test(1, 7.0)], 3.29), Some(1));
        assert_eq!(poisoned_class(&[test(0, 4.0), test(1, 3.5)], 3.29), Some(0));
        assert_eq!(poisoned_class(&[test(0, 3.0), test(1, -2.0)], 3.29), None);
    }

    /// Only the target's rows that the references doubt at least `min_doubt` change, to the most
    /// likely other class; without a target none.
    #[test]
    fn only_doubted_target_rows_are_relabelled() {
        let p = |x: f32| vec![1.0 - x, x];
        let labels = [1, 1, 0, 0, 1, 1];
        let proba = [p(0.1), p(0.55), p(0.9), p(0.2), p(0.4), p(0.25)];
        assert_eq!(
            new_labels(&labels, &proba, Some(1), 0.7),
            vec![0, 1, 0, 0, 1, 0]
        );
        assert_eq!(
            new_labels(&labels, &proba, Some(1), 0.5),
            vec![0, 1, 0, 0, 0, 0]
        );
        assert_eq!(
            new_labels(&labels, &proba, None, 0.5),
            vec![1, 1, 0, 0, 1, 1]
        );
        // Below one half the label may still be the most likely class (row 1: 0.55).
        assert_eq!(
            new_labels(&labels, &proba, Some(1), 0.4),
            vec![0, 0, 0, 0, 0, 0]
        );
        // Three classes: the row takes the most likely class other than its label, even where
        // its label is the most likely of all.
        let proba3 = [
            vec![0.3, 0.45, 0.25],
            vec![0.1, 0.15, 0.75],
            vec![0.1, 0.8, 0.1],
        ];
        assert_eq!(new_labels(&[1, 1, 1], &proba3, Some(1), 0.5), vec![0, 2, 1]);
    }

    /// Per class: rows with the label, the share each reference puts elsewhere (averaged), the
    /// mean doubt on both sides, and the clean rows' held-out counts.
    #[test]
    fn class_tests_count_contradictions() {
        let p = |x: f32| vec![1.0 - x, x];
        let r = Readings {
            clean_proba: vec![p(0.2), p(0.9), p(0.4)],
            corpus_proba: vec![p(0.1), p(0.5), p(0.3), p(0.6), p(0.9)],
            corpus_pred: vec![vec![0, 1, 0, 0, 1], vec![0, 0, 0, 1, 1]],
        };
        let t = class_tests((&[0, 0, 1, 1, 1], &r), &[0, 1, 1], 2);
        assert_eq!((t[0].rows, t[0].contradiction_rate), (2, 0.25));
        assert_eq!((t[1].rows, t[1].contradiction_rate), (3, 0.5));
        assert_eq!((t[0].clean_rows, t[0].clean_contradicted), (1, 0));
        assert_eq!((t[1].clean_rows, t[1].clean_contradicted), (2, 1));
        assert!(
            (t[1].doubt - (0.7 + 0.4 + 0.1) / 3.0).abs() < 1e-6,
            "{}",
            t[1].doubt
        );
        assert!((t[1].clean_doubt - (0.1 + 0.6) / 2.0).abs() < 1e-6);
        assert_eq!(t[1].z_counts, two_proportion_z(0.5, 3, 0.5, 2));
        assert_eq!(t[0].z, 0.0, "one clean row: no variance, no test");
    }

    /// The rows the excess doubt accounts for, by hand: 100 target rows doubted 0.2 more than its
    /// clean rows (0.1), a moved row doubted as the other class's clean rows read the target
    /// (1 - 0.3 = 0.7, 0.6 more): 100 * 0.2 / 0.6.
    #[test]
    fn estimated_poisoned_by_hand() {
        let mut t = test(1, 5.0);
        (t.rows, t.doubt, t.clean_doubt) = (100, 0.3, 0.1);
        let p = |x: f32| vec![1.0 - x, x];
        let clean = [0, 0, 1];
        let proba = [p(0.2), p(0.4), p(0.9)];
        let n = estimated_poisoned(&t, (&clean, &proba));
        assert!((n - 100.0 * 0.2 / 0.6).abs() < 1e-4, "{n}");
        // References that read the other class as the target: nothing to estimate.
        assert_eq!(
            estimated_poisoned(&t, (&clean, &[p(0.95), p(0.95), p(0.9)])),
            0.0
        );
        // Never more than the class's rows.
        t.doubt = 0.9;
        assert_eq!(estimated_poisoned(&t, (&clean, &proba)), 100.0);
    }

    /// Beyond the cap, the most doubted changed rows keep their new label (ties: lower index).
    #[test]
    fn at_most_keeps_the_most_doubted() {
        let before = [1, 1, 1, 0, 1];
        let labels = vec![0, 0, 0, 0, 0];
        let doubts = [0.5, 0.9, 0.5, 0.99, 0.7];
        assert_eq!(
            at_most(labels.clone(), &before, &doubts, 2),
            vec![1, 0, 1, 0, 0]
        );
        assert_eq!(
            at_most(labels.clone(), &before, &doubts, 3),
            vec![0, 0, 1, 0, 0]
        );
        assert_eq!(at_most(labels.clone(), &before, &doubts, 4), labels);
        assert_eq!(at_most(labels, &before, &doubts, 0), vec![1, 1, 1, 0, 1]);
    }

    /// Welch's z by hand.
    #[test]
    fn welch_z_by_hand() {
        let a = [0.1, 0.2, 0.3, 0.4];
        let b = [0.0, 0.1, 0.2];
        let (va, vb) = (0.05f64 / 3.0, 0.02 / 2.0);
        let z = (0.25 - 0.1) / (va / 4.0 + vb / 3.0).sqrt();
        assert!((welch_z(&a, &b) - z).abs() < 1e-12);
        assert_eq!(welch_z(&a, &[0.5]), 0.0);
        assert_eq!(welch_z(&[0.2, 0.2], &[0.1, 0.1]), 0.0);
    }

    /// The parts are balanced and depend on the seed.
    #[test]
    fn folds_are_equal_parts() {
        let f = folds(101, 4, 42);
        let sizes: Vec<usize> = (0..4)
            .map(|k| f.iter().filter(|&&x| x == k).count())
            .collect();
        assert_eq!(sizes, vec![26, 25, 25, 25]);
        assert_ne!(f, folds(101, 4, 43));
        assert_eq!(f, folds(101, 4, 42));
    }
}
