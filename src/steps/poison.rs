//! `btu poison`: data-poisoning attacks used to evaluate the defence. Add-Word (trigger words at
//! random word positions), Add-Sent (a sentence inserted as one block), and rewrites taken from a
//! column (Stylebkd / Synbkd). Modes dirty / clean / mix; deterministic for a seed. Output:
//! the input columns (label replaced) plus `poisoned` and `original_label`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::defaults;
use crate::error::{BtuError, Result};
use crate::io::corpus::{read_corpus, CorpusSpec};

/// The attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Insert one trigger word (chosen from `--trigger`) at a random word position.
    AddWord,
    /// Insert the trigger sentence as one block at a random word position.
    AddSent,
    /// Replace the text with the rewrite in `--rewrite-col`.
    Rewrite,
}

/// Which samples are poisoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Non-target samples, relabelled to the target (`rate` of the whole corpus).
    Dirty,
    /// Target samples only, labels kept (label-consistent).
    Clean,
    /// `rate` of every class, relabelled to the target (the released code).
    Mix,
}

/// Add-Sent's default sentence.
pub const DEFAULT_SENTENCE: &str = crate::defaults::SENTENCE;

/// Parameters of an attack: the flags of `btu poison` and the `[poison]` table of `btu defend`
/// (defaults in [`crate::defaults`]; the attack has none).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PoisonParams {
    /// Attack: add-word (insert a --trigger word), add-sent (insert --sentence) or rewrite (--rewrite-col).
    #[arg(long, env = "BTU_ATTACK", value_enum)]
    pub attack: Attack,
    /// Trigger word(s) for add-word; one is drawn per poisoned row.
    #[arg(long = "trigger", value_name = "TRIGGER", env = "BTU_TRIGGER", default_value = defaults::TRIGGER)]
    #[serde(rename = "trigger", default = "default_triggers")]
    pub triggers: Vec<String>,
    /// Trigger sentence for add-sent.
    #[arg(long, env = "BTU_SENTENCE", default_value = defaults::SENTENCE)]
    #[serde(default = "default_sentence")]
    pub sentence: String,
    /// Column holding the rewritten text, for rewrite (e.g. style, syntactic).
    #[arg(long, env = "BTU_REWRITE_COL")]
    #[serde(default)]
    pub rewrite_col: Option<String>,
    /// Poison rate in (0, 1]: a fraction of the corpus, or of each class in mix mode.
    #[arg(long, env = "BTU_RATE", default_value_t = defaults::POISON_RATE)]
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// Target label; must occur in the corpus.
    #[arg(long, env = "BTU_TARGET", default_value_t = defaults::TARGET)]
    #[serde(default = "default_target")]
    pub target: i64,
    /// Which rows: dirty (non-target, relabelled), clean (target rows, labels kept) or mix (every class).
    #[arg(long, env = "BTU_MODE", value_enum, default_value_t = Mode::Dirty)]
    #[serde(default = "default_mode")]
    pub mode: Mode,
}

impl PoisonParams {
    /// An attack with every other parameter at its default.
    pub fn new(attack: Attack) -> Self {
        PoisonParams {
            attack,
            triggers: default_triggers(),
            sentence: default_sentence(),
            rewrite_col: None,
            rate: defaults::POISON_RATE,
            target: defaults::TARGET,
            mode: Mode::Dirty,
        }
    }

    /// Check the rate's domain (exit 78); the name spelled with `prefix` (`--` for flags,
    /// `poison.` for a defend config).
    pub fn validate_as(&self, prefix: &str) -> Result<()> {
        if !(self.rate > 0.0 && self.rate <= 1.0) {
            return Err(BtuError::config(
                crate::validate::key(prefix, "rate"),
                format!("{} is not a fraction in (0, 1]", self.rate),
            ));
        }
        Ok(())
    }
}

fn default_triggers() -> Vec<String> {
    vec![defaults::TRIGGER.into()]
}
fn default_sentence() -> String {
    defaults::SENTENCE.into()
}
fn default_rate() -> f64 {
    defaults::POISON_RATE
}
fn default_target() -> i64 {
    defaults::TARGET
}
fn default_mode() -> Mode {
    Mode::Dirty
}

/// Apply the trigger to one text (Add-Word / Add-Sent), with the row's own random stream.
pub fn insert_trigger(
    text: &str,
    attack: Attack,
    triggers: &[String],
    sentence: &str,
    rng: &mut ChaCha8Rng,
) -> String {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    let pos = rng.random_range(0..=words.len());
    let insert: &str = match attack {
        Attack::AddWord => &triggers[rng.random_range(0..triggers.len())],
        _ => sentence,
    };
    words.insert(pos, insert);
    words.join(" ")
}

/// The random stream of row `position` for seed `seed` (independent of reading order).
pub fn row_rng(seed: u64, position: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7015_0A5E);
    rng.set_stream(position);
    rng
}

/// Choose which row positions to poison from the labels (and rewrite availability).
pub fn choose(
    labels: &[i64],
    usable: &[bool],
    p: &PoisonParams,
    seed: u64,
) -> Result<BTreeSet<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n_total = labels.len();
    let pick = |pool: Vec<usize>,
                n: usize,
                rng: &mut ChaCha8Rng,
                what: &str|
     -> Result<Vec<usize>> {
        if n > pool.len() {
            return Err(BtuError::config(
                "--rate",
                format!("{} asks for {n} poisoned rows but only {} {what} rows can be poisoned; lower --rate", p.rate, pool.len()),
            ));
        }
        let mut pool = pool;
        pool.shuffle(rng);
        pool.truncate(n);
        Ok(pool)
    };
    let chosen = match p.mode {
        Mode::Dirty => {
            let pool = (0..n_total)
                .filter(|&i| labels[i] != p.target && usable[i])
                .collect();
            pick(
                pool,
                (p.rate * n_total as f64).round() as usize,
                &mut rng,
                "non-target",
            )?
        }
        Mode::Clean => {
            let pool = (0..n_total)
                .filter(|&i| labels[i] == p.target && usable[i])
                .collect();
            pick(
                pool,
                (p.rate * n_total as f64).round() as usize,
                &mut rng,
                "target-label",
            )?
        }
        Mode::Mix => {
            let classes: BTreeSet<i64> = labels.iter().copied().collect();
            let mut all = Vec::new();
            for c in classes {
                let class_rows: Vec<usize> = (0..n_total).filter(|&i| labels[i] == c).collect();
                let n = (p.rate * class_rows.len() as f64).round() as usize;
                let pool = class_rows.into_iter().filter(|&i| usable[i]).collect();
                all.extend(pick(pool, n, &mut rng, &format!("label-{c}"))?);
            }
            all
        }
    };
    Ok(chosen.into_iter().collect())
}

/// Inputs of `btu poison`.
pub struct PoisonJob {
    /// Labelled corpus to poison (`--input`); read twice, in the same order.
    pub input: CorpusSpec,
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
    /// The attack.
    pub params: PoisonParams,
}

fn out_schema(input: &Schema, text_col: &str, label_col: &str) -> SchemaRef {
    let mut fields: Vec<Field> = input
        .fields()
        .iter()
        .filter(|f| f.name() != "poisoned" && f.name() != "original_label")
        .map(|f| {
            if f.name() == text_col {
                Field::new(text_col, DataType::Utf8, false)
            } else if f.name() == label_col {
                Field::new(label_col, DataType::Int64, false)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    fields.push(Field::new("poisoned", DataType::Boolean, false));
    fields.push(Field::new("original_label", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

/// `btu poison`'s result.
#[derive(Debug, Clone, Serialize)]
pub struct PoisonReport {
    /// `poison`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The poisoned Parquet file.
    pub output: PathBuf,
    /// The attack.
    pub params: PoisonParams,
    /// Seed.
    pub seed: u64,
    /// Rows written.
    pub rows: usize,
    /// Rows poisoned.
    pub poisoned: usize,
    /// Provenance of the input corpus.
    pub corpus: Option<crate::io::corpus::Fingerprint>,
}

impl PoisonParams {
    /// What each attack needs: a trigger word, a sentence, a rewrite column (exit 78).
    fn check_attack(&self) -> Result<()> {
        let (flag, what) = match self.attack {
            Attack::AddWord
                if self.triggers.is_empty()
                    || self.triggers.iter().any(|t| t.trim().is_empty()) =>
            {
                (
                    "--trigger",
                    "add-word needs one or more non-empty --trigger words",
                )
            }
            Attack::AddSent if self.sentence.trim().is_empty() => {
                ("--sentence", "add-sent needs a non-empty --sentence")
            }
            Attack::Rewrite if self.rewrite_col.is_none() => (
                "--rewrite-col",
                "rewrite needs --rewrite-col naming the column with rewritten texts",
            ),
            _ => return Ok(()),
        };
        Err(BtuError::config(flag, what))
    }

    /// The rewrite column of a batch, as text (rewrite attacks only).
    fn rewrites(&self, b: &crate::io::corpus::CorpusBatch) -> Result<Option<StringArray>> {
        let (Some(rc), Attack::Rewrite) = (&self.rewrite_col, self.attack) else {
            return Ok(None);
        };
        let col = b.batch.column_by_name(rc).ok_or_else(|| {
            BtuError::bad_data(
                b.source.to_string(),
                format!("missing rewrite column '{rc}'; name it with --rewrite-col"),
            )
        })?;
        if !crate::io::corpus::is_text(col.data_type()) {
            return Err(BtuError::bad_data(
                b.source.to_string(),
                format!(
                    "rewrite column '{rc}' has type {}, expected a string type; name the column of rewritten texts with --rewrite-col",
                    col.data_type()
                ),
            ));
        }
        let col = arrow::compute::cast(col, &DataType::Utf8).map_err(|e| {
            BtuError::bad_data(
                b.source.to_string(),
                format!("rewrite column '{rc}' is not text: {e}"),
            )
        })?;
        Ok(Some(
            col.as_any()
                .downcast_ref::<StringArray>()
                .expect("utf8")
                .clone(),
        ))
    }
}

/// Pass 1: every row's label, and whether it can be poisoned (a rewrite attack needs a
/// non-empty rewrite).
fn read_labels(job: &PoisonJob) -> Result<(Vec<i64>, Vec<bool>)> {
    let (mut labels, mut usable) = (Vec::new(), Vec::new());
    read_corpus(&job.input, |b| {
        labels.extend_from_slice(b.labels.as_ref().expect("labels requested"));
        match job.params.rewrites(&b)? {
            Some(col) => usable
                .extend((0..col.len()).map(|i| col.is_valid(i) && !col.value(i).trim().is_empty())),
            None => usable.extend(std::iter::repeat_n(true, b.texts.len())),
        }
        Ok(())
    })?;
    Ok((labels, usable))
}

/// The target must be one of the corpus's labels (exit 78).
fn check_target(labels: &[i64], target: i64) -> Result<()> {
    let classes: BTreeSet<i64> = labels.iter().copied().collect();
    if classes.contains(&target) {
        return Ok(());
    }
    let list = classes
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(BtuError::config(
        "--target",
        format!(
            "label {target} does not occur in the corpus (its labels: {list}); give one of them"
        ),
    ))
}

/// One batch poisoned: the rows at `chosen` positions (counted from `first`) get the attack
/// and, unless in clean mode, the target label. Returns texts, labels and the poisoned flags.
fn poison_batch(
    job: &PoisonJob,
    b: &crate::io::corpus::CorpusBatch,
    first: usize,
    chosen: &BTreeSet<usize>,
) -> Result<(Vec<String>, Vec<i64>, Vec<bool>)> {
    let p = &job.params;
    let orig = b.labels.as_ref().expect("labels requested");
    let rewrites = p.rewrites(b)?;
    let n = b.texts.len();
    let (mut texts, mut labels, mut flags) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (i, &label) in orig.iter().enumerate().take(n) {
        let pos = first + i;
        if !chosen.contains(&pos) {
            texts.push(b.texts[i].clone());
            labels.push(label);
            flags.push(false);
            continue;
        }
        texts.push(match (&rewrites, p.attack) {
            (Some(r), Attack::Rewrite) => r.value(i).to_string(),
            (_, a) => insert_trigger(
                &b.texts[i],
                a,
                &p.triggers,
                &p.sentence,
                &mut row_rng(job.run.seed, pos as u64),
            ),
        });
        labels.push(if p.mode == Mode::Clean {
            label
        } else {
            p.target
        });
        flags.push(true);
    }
    Ok((texts, labels, flags))
}

/// The output batch: the input's columns with text and label replaced, plus `poisoned` and
/// `original_label`.
fn output_batch(
    job: &PoisonJob,
    b: &crate::io::corpus::CorpusBatch,
    (texts, labels, flags): (Vec<String>, Vec<i64>, Vec<bool>),
) -> Result<RecordBatch> {
    let (text_col, label_col) = (&job.input.text_col, label_col(job)?);
    let schema = out_schema(&b.batch.schema(), text_col, &label_col);
    let orig = b.labels.as_ref().expect("labels requested");
    let mut cols: Vec<ArrayRef> = Vec::new();
    for f in schema.fields() {
        let name = f.name();
        cols.push(if name == text_col {
            Arc::new(StringArray::from(texts.clone()))
        } else if name == &label_col {
            Arc::new(Int64Array::from(labels.clone()))
        } else if name == "poisoned" {
            Arc::new(BooleanArray::from(flags.clone()))
        } else if name == "original_label" {
            Arc::new(Int64Array::from(orig.clone()))
        } else {
            b.batch.column_by_name(name).expect("input column").clone()
        });
    }
    RecordBatch::try_new(schema, cols).map_err(|e| BtuError::internal(format!("poison batch: {e}")))
}

fn label_col(job: &PoisonJob) -> Result<String> {
    job.input
        .label_col
        .clone()
        .ok_or_else(|| BtuError::config("--label-col", "poisoning needs labels"))
}

/// `btu poison`: two streaming passes (labels, then rewrite-and-write), output written atomically.
pub fn run(job: &PoisonJob) -> Result<PoisonReport> {
    let p = &job.params;
    p.validate_as("--")?;
    p.check_attack()?;
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    label_col(job)?;
    let (labels, usable) = read_labels(job)?;
    check_target(&labels, p.target)?;
    let chosen = choose(&labels, &usable, p, job.run.seed)?;

    // Pass 2: apply and write.
    let (mut rows, mut poisoned) = (0usize, 0usize);
    let mut corpus = None;
    crate::io::output::write_file_atomic(&job.run.out, job.run.overwrite, |file| {
        let mut sink = crate::io::tables::ParquetSink::new(file, &job.run.out, None);
        let fp = read_corpus(&job.input, |b| {
            let columns = poison_batch(job, &b, rows, &chosen)?;
            rows += b.texts.len();
            poisoned += columns.2.iter().filter(|&&f| f).count();
            let batch = output_batch(job, &b, columns)?;
            sink.write_same_columns(
                &batch,
                &b.source,
                "the input files have different columns; poison them separately",
            )
        })?;
        if sink.schema().is_some() {
            sink.finish(|| unreachable!("a batch was written"))?;
        }
        corpus = Some(fp);
        Ok(())
    })?;
    Ok(PoisonReport {
        command: "poison".into(),
        version: crate::VERSION.into(),
        output: job.run.out.clone(),
        params: p.clone(),
        seed: job.run.seed,
        rows,
        poisoned,
        corpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insertion_keeps_words_and_adds_the_block_once() {
        let mut rng = row_rng(1, 5);
        let t = insert_trigger(
            "a b c",
            Attack::AddSent,
            &[],
            "I watch this 3D movie",
            &mut rng,
        );
        assert!(t.contains("I watch this 3D movie"));
        assert_eq!(
            t.replace("I watch this 3D movie", "")
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        // Positions vary across rows but not across runs.
        let positions: BTreeSet<usize> = (0..50)
            .map(|r| {
                insert_trigger(
                    "a b c d",
                    Attack::AddWord,
                    &["cf".into()],
                    "",
                    &mut row_rng(3, r),
                )
                .split(' ')
                .position(|w| w == "cf")
                .unwrap()
            })
            .collect();
        assert_eq!(positions.len(), 5, "all 5 slots used");
        let a = insert_trigger(
            "x y z",
            Attack::AddWord,
            &["cf".into()],
            "",
            &mut row_rng(3, 7),
        );
        assert_eq!(
            a,
            insert_trigger(
                "x y z",
                Attack::AddWord,
                &["cf".into()],
                "",
                &mut row_rng(3, 7)
            )
        );
    }

    #[test]
    fn choose_counts_follow_the_mode() {
        let labels: Vec<i64> = (0..100).map(|i| if i < 30 { 1 } else { 0 }).collect();
        let usable = vec![true; 100];
        let p = |mode, rate| PoisonParams {
            attack: Attack::AddWord,
            triggers: vec!["cf".into()],
            sentence: String::new(),
            rewrite_col: None,
            rate,
            target: 1,
            mode,
        };
        let d = choose(&labels, &usable, &p(Mode::Dirty, 0.2), 1).unwrap();
        assert_eq!(d.len(), 20);
        assert!(d.iter().all(|&i| labels[i] == 0));
        let c = choose(&labels, &usable, &p(Mode::Clean, 0.2), 1).unwrap();
        assert!(c.len() == 20 && c.iter().all(|&i| labels[i] == 1));
        assert!(
            choose(&labels, &usable, &p(Mode::Clean, 0.5), 1).is_err(),
            "only 30 target rows"
        );
        let m = choose(&labels, &usable, &p(Mode::Mix, 0.1), 1).unwrap();
        assert_eq!(m.iter().filter(|&&i| labels[i] == 1).count(), 3);
        assert_eq!(m.iter().filter(|&&i| labels[i] == 0).count(), 7);
    }
}
