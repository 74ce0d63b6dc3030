//! Stage 1 of BTU: backdoor token detection in three rounds (btu-spec.md). Each round starts
//! again from the reference word embeddings, trains one epoch, and scores every token by how far
//! its embedding row moved; the top `k = ceil(alpha% * |V|)` non-special tokens of each round
//! form that round's set and their union is the suspicious set `T`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::json;

use crate::defaults;
use crate::device::Precision;
use crate::error::{BtuError, Result};
use crate::io::corpus::CorpusSpec;
use crate::io::tables::{SuspiciousToken, TokenScore};
use crate::model::checkpoint::Checkpoint;
use crate::model::tokenizer::{
    delete_tokens, load_corpus, Batching, BtuTokenizer, TokenizedCorpus,
};
use crate::model::{Arch, BertClassifier, Trainable};
use crate::progress::Progress;
use crate::training::{train_epoch, AdamW, AdamWConfig, EpochData, EpochStats};

/// Which variant of the algorithm runs (btu-spec.md, stage 1 table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The paper: full model, then `M*` twice (round 3 without the round-2 tokens).
    Paper,
    /// The authors' released code: "pruned" model twice (round 2 without round-1 tokens), then the full model.
    ReferenceCode,
}

/// Which corpus a round trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoundData {
    /// The corpus as read.
    Corpus,
    /// The corpus with every occurrence of the tokens selected in round `n` deleted.
    WithoutRound(u8),
}

/// The plan of one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundPlan {
    /// Round number, 1 to 3.
    pub round: u8,
    /// Forward pass the round trains.
    pub arch: Arch,
    /// Parameters that train (the rest stay frozen).
    pub trainable: Trainable,
    /// Rows per batch (the preset's, or `--batch-size`).
    pub batch_size: usize,
    /// Pad every batch to this length instead of its longest row (`reference-code`: `--max-len`).
    pub pad_to: Option<usize>,
    /// Corpus the round trains on.
    pub data: RoundData,
}

/// Parameters of detection: the flags of `btu detect` and the `[detect]` table of `btu defend`
/// (defaults in [`crate::defaults`]).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct DetectParams {
    /// Round layout: paper (full model, then M* twice) or reference-code (the authors' released code).
    #[arg(long, env = "BTU_PRESET", value_enum, default_value_t = Preset::Paper)]
    pub preset: Preset,
    /// Tokens flagged per round, as a percentage of the vocabulary, in (0, 100].
    #[arg(long, env = "BTU_ALPHA", default_value_t = defaults::ALPHA)]
    pub alpha: f64,
    /// AdamW learning rate of every round, finite in (0, 1].
    #[arg(long, env = "BTU_LR", default_value_t = defaults::LR)]
    pub lr: f64,
    /// AdamW weight decay, in [0, 1].
    #[arg(long, env = "BTU_WEIGHT_DECAY", default_value_t = defaults::WEIGHT_DECAY)]
    pub weight_decay: f64,
    /// Batch size of every round (default: the preset's).
    #[arg(long, env = "BTU_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Tokens per sequence including [CLS]/[SEP]; at most the model's max_position_embeddings.
    #[arg(long, env = "BTU_MAX_LEN", default_value_t = defaults::MAX_LEN)]
    pub max_len: usize,
    /// Epochs per round (the paper: 1).
    #[arg(long, env = "BTU_EPOCHS", default_value_t = defaults::DETECT_EPOCHS)]
    pub epochs: usize,
    /// Batch grouping: random (as the paper) or bucketed by length (less padding; bucketing
    /// puts the rows an insertion attack lengthened into the same few batches and weakens their
    /// signal).
    #[arg(long, env = "BTU_BATCHING", value_enum, default_value_t = Batching::Random)]
    pub batching: Batching,
    /// Number of classes of the head (default: the model config's).
    #[arg(long, env = "BTU_NUM_LABELS")]
    pub num_labels: Option<usize>,
    /// Start the frozen head from the corpus's class prior (bias = log prior), so that frequent
    /// tokens carrying only the prior stop moving.
    #[arg(long, env = "BTU_PRIOR_NEUTRAL")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub prior_neutral: bool,
    /// Arithmetic of the rounds: f32, tf32 (CUDA tensor cores) or bf16 (mixed precision; the
    /// trained embeddings stay f32). docs/decisions.md gives their measured effect on the ranks.
    #[arg(long, env = "BTU_PRECISION", value_enum, default_value_t = Precision::F32)]
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Default for DetectParams {
    fn default() -> Self {
        DetectParams {
            preset: Preset::Paper,
            alpha: defaults::ALPHA,
            lr: defaults::LR,
            weight_decay: defaults::WEIGHT_DECAY,
            batch_size: None,
            max_len: defaults::MAX_LEN,
            epochs: defaults::DETECT_EPOCHS,
            batching: Batching::Random,
            num_labels: None,
            prior_neutral: false,
            precision: Precision::F32,
        }
    }
}

impl DetectParams {
    /// Check every value's domain (exit 78) before any work; names spelled with `prefix`
    /// (`--` for flags, `detect.` for a defend config).
    pub fn validate_as(&self, prefix: &str) -> Result<()> {
        use crate::validate::{self as v, key};
        if !(self.alpha > 0.0 && self.alpha <= 100.0) {
            return Err(BtuError::config(
                key(prefix, "alpha"),
                format!("{} is not a percentage in (0, 100]", self.alpha),
            ));
        }
        v::learning_rate(&key(prefix, "lr"), self.lr)?;
        v::weight_decay(&key(prefix, "weight-decay"), self.weight_decay)?;
        if let Some(b) = self.batch_size {
            v::at_least(&key(prefix, "batch-size"), b, 1)?;
        }
        v::max_len(&key(prefix, "max-len"), self.max_len, None)?;
        v::at_least(&key(prefix, "epochs"), self.epochs, 1)?;
        if let Some(n) = self.num_labels {
            v::at_least(&key(prefix, "num-labels"), n, 2)?;
        }
        Ok(())
    }

    /// [`DetectParams::validate_as`] with `btu detect`'s flag names.
    pub fn validate(&self) -> Result<()> {
        self.validate_as("--")
    }
}

/// The three rounds of a preset.
pub fn plan(p: &DetectParams) -> Vec<RoundPlan> {
    let bs = |d: usize| p.batch_size.unwrap_or(d);
    match p.preset {
        Preset::Paper => vec![
            RoundPlan {
                round: 1,
                arch: Arch::Full,
                trainable: Trainable::WordEmbeddings,
                batch_size: bs(32),
                pad_to: None,
                data: RoundData::Corpus,
            },
            RoundPlan {
                round: 2,
                arch: Arch::WordMean,
                trainable: Trainable::WordEmbeddings,
                batch_size: bs(32),
                pad_to: None,
                data: RoundData::Corpus,
            },
            RoundPlan {
                round: 3,
                arch: Arch::WordMean,
                trainable: Trainable::WordEmbeddings,
                batch_size: bs(32),
                pad_to: None,
                data: RoundData::WithoutRound(2),
            },
        ],
        Preset::ReferenceCode => vec![
            RoundPlan {
                round: 1,
                arch: Arch::EmbeddingMean,
                trainable: Trainable::EmbeddingBlockAndHead,
                batch_size: bs(256),
                pad_to: Some(p.max_len),
                data: RoundData::Corpus,
            },
            RoundPlan {
                round: 2,
                arch: Arch::EmbeddingMean,
                trainable: Trainable::EmbeddingBlockAndHead,
                batch_size: bs(256),
                pad_to: Some(p.max_len),
                data: RoundData::WithoutRound(1),
            },
            RoundPlan {
                round: 3,
                arch: Arch::Full,
                trainable: Trainable::WordEmbeddings,
                batch_size: bs(64),
                pad_to: None,
                data: RoundData::Corpus,
            },
        ],
    }
}

/// `k = ceil(alpha% * |V|)`, at least 1.
pub fn top_k(alpha: f64, vocab: usize) -> usize {
    ((alpha / 100.0 * vocab as f64).ceil() as usize).max(1)
}

/// What one round did.
#[derive(Debug, Clone, Serialize)]
pub struct RoundSummary {
    /// What the round was to do.
    pub plan: RoundPlan,
    /// One entry per epoch.
    pub stats: Vec<EpochStats>,
    /// Wall-clock seconds of the round, scoring included.
    pub seconds: f64,
    /// Rows trained per second of training time.
    pub samples_per_s: f64,
    /// The round's selected tokens as strings, best rank first.
    pub selected: Vec<String>,
    /// The same tokens' ids, in the same order.
    pub selected_ids: Vec<u32>,
}

/// Everything detection found.
pub struct Detection {
    /// `token_scores` rows: every round x every vocabulary id, in that order.
    pub scores: Vec<TokenScore>,
    /// `suspicious_tokens` rows: the union `T`, by best rank then id.
    pub suspicious: Vec<SuspiciousToken>,
    /// One summary per round.
    pub rounds: Vec<RoundSummary>,
    /// Tokens selected per round, `ceil(alpha% * |V|)`.
    pub k: usize,
}

/// Euclidean distance of each row of `a` and `b` ([v, h]).
pub fn row_distances(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .sqr()?
        .sum(1)?
        .sqrt()?;
    Ok(d.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
}

/// `log p(y)` of the corpus's labels (add-one smoothed, so no class is impossible), as the head's
/// bias: the untrained model then predicts the class prior, and a token whose documents carry the
/// labels in prior proportions gets no consistent gradient.
pub fn prior_bias(labels: &[u32], classes: usize, dev: &Device) -> Result<Tensor> {
    let mut counts = vec![1.0f64; classes];
    for &l in labels {
        counts[l as usize] += 1.0;
    }
    let total: f64 = counts.iter().sum();
    let bias: Vec<f32> = counts.iter().map(|c| (c / total).ln() as f32).collect();
    Ok(Tensor::from_vec(bias, classes, dev)?)
}

/// A round whose distances are not finite, or in which no ordinary token moved, has nothing to
/// rank: flagging its top k would be noise presented as a finding.
fn check_movement(dist: &[f32], special: &BTreeSet<u32>, round: u8) -> Result<()> {
    crate::validate::finite(
        &format!("detection round {round}"),
        "the embedding distances",
        dist.iter().copied(),
    )?;
    let moved = dist
        .iter()
        .enumerate()
        .any(|(t, &d)| d > 0.0 && !special.contains(&(t as u32)));
    if !moved {
        return Err(BtuError::bad_data(
            format!("detection round {round}"),
            "no token's embedding moved: the corpus holds no tokens besides the special ones (are its texts empty?)",
        ));
    }
    Ok(())
}

/// Rank tokens by distance (largest first, ties by id), specials excluded; returns rank per token.
pub fn rank(distances: &[f32], special: &BTreeSet<u32>) -> Vec<Option<u32>> {
    let mut order: Vec<u32> = (0..distances.len() as u32)
        .filter(|t| !special.contains(t))
        .collect();
    order.sort_by(|&a, &b| {
        distances[b as usize]
            .total_cmp(&distances[a as usize])
            .then(a.cmp(&b))
    });
    let mut ranks = vec![None; distances.len()];
    for (r, t) in order.into_iter().enumerate() {
        ranks[t as usize] = Some(r as u32 + 1);
    }
    ranks
}

/// Run the three rounds on a tokenized corpus.
pub fn detect(
    base: &BertClassifier,
    tok: &BtuTokenizer,
    corpus: &TokenizedCorpus,
    params: &DetectParams,
    seed: u64,
    dev: &Device,
    progress: &dyn Progress,
) -> Result<Detection> {
    let vocab = base.config.vocab_size;
    let k = top_k(params.alpha, vocab);
    let reference = base.word.clone();
    let mut base = base.clone();
    if params.prior_neutral {
        base.classifier.b = prior_bias(&corpus.labels, base.config.labels(), dev)?;
    }
    let _matmul = params.precision.matmul_mode();
    let mut selected_by_round: BTreeMap<u8, BTreeSet<u32>> = BTreeMap::new();
    let mut scores = Vec::with_capacity(3 * vocab);
    let mut rounds = Vec::new();
    for rp in plan(params) {
        let _round = tracing::info_span!("round", n = rp.round).entered();
        let t0 = Instant::now();
        let deleted;
        let seqs: &[Vec<u32>] = match rp.data {
            RoundData::Corpus => &corpus.seqs,
            RoundData::WithoutRound(r) => {
                let ids = selected_by_round.get(&r).cloned().unwrap_or_default();
                let ids: BTreeSet<u32> = ids.difference(&tok.special).copied().collect();
                deleted = delete_tokens(&corpus.seqs, &ids);
                &deleted
            }
        };
        let mut model = base.clone();
        let vars = model.make_trainable(rp.trainable)?;
        model.set_compute_dtype(params.precision.compute_dtype())?;
        let mut opt = AdamW::new(
            vars.into_iter().map(|(_, v)| v).collect(),
            AdamWConfig {
                weight_decay: params.weight_decay,
                ..AdamWConfig::with_lr(params.lr)
            },
        )?;
        let bar = progress.bar(
            &format!("detect round {}", rp.round),
            (seqs.len() * params.epochs) as u64,
        );
        bar.set_message(format!("round {}", rp.round));
        let mut stats = Vec::new();
        for epoch in 0..params.epochs {
            let _epoch = tracing::debug_span!("epoch", n = epoch + 1).entered();
            let data = EpochData {
                seqs,
                labels: &corpus.labels,
                pad_id: tok.pad_id,
                batch_size: rp.batch_size,
                pad_to: rp.pad_to,
                batching: params.batching,
                seed: seed.wrapping_add(1000 * rp.round as u64 + epoch as u64),
            };
            let s = train_epoch(&model, rp.arch, &mut opt, &data, dev, &mut |n, loss| {
                bar.inc(n as u64);
                bar.set_message(format!("round {} loss {loss:.4}", rp.round));
            })?;
            tracing::info!(
                round = rp.round,
                epoch,
                steps = s.steps,
                seconds = s.seconds,
                loss = s.loss_mean,
                "detection epoch done"
            );
            stats.push(s);
        }
        bar.finish_and_clear();
        let dist = row_distances(&reference, &model.word)?;
        check_movement(&dist, &tok.special, rp.round)?;
        let ranks = rank(&dist, &tok.special);
        let mut chosen = BTreeSet::new();
        for t in 0..vocab {
            let r = ranks[t];
            let selected = r.is_some_and(|r| r as usize <= k);
            if selected {
                chosen.insert(t as u32);
            }
            scores.push(TokenScore {
                round: rp.round,
                token_id: t as u32,
                token: tok.token(t as u32),
                special: tok.special.contains(&(t as u32)),
                distance: dist[t],
                rank: r,
                selected,
            });
        }
        let mut ordered: Vec<u32> = chosen.iter().copied().collect();
        ordered.sort_by_key(|&t| ranks[t as usize]);
        let seconds = t0.elapsed().as_secs_f64();
        let samples: usize = stats.iter().map(|s| s.samples).sum();
        let train_s: f64 = stats.iter().map(|s| s.seconds).sum();
        rounds.push(RoundSummary {
            plan: rp.clone(),
            samples_per_s: samples as f64 / train_s.max(1e-9),
            stats,
            seconds,
            selected: ordered.iter().map(|&t| tok.token(t)).collect(),
            selected_ids: ordered,
        });
        selected_by_round.insert(rp.round, chosen);
    }
    let suspicious = summarize(&scores, &selected_by_round, corpus, vocab);
    Ok(Detection {
        scores,
        suspicious,
        rounds,
        k,
    })
}

/// Build the `suspicious_tokens` rows: union of the rounds with corpus statistics.
fn summarize(
    scores: &[TokenScore],
    selected: &BTreeMap<u8, BTreeSet<u32>>,
    corpus: &TokenizedCorpus,
    vocab: usize,
) -> Vec<SuspiciousToken> {
    let union: BTreeSet<u32> = selected.values().flatten().copied().collect();
    let mut occ: BTreeMap<u32, u64> = BTreeMap::new();
    let mut docs: BTreeMap<u32, BTreeMap<u32, u64>> = BTreeMap::new();
    for (s, &label) in corpus.seqs.iter().zip(&corpus.labels) {
        let mut seen = BTreeSet::new();
        for &t in s {
            if union.contains(&t) {
                *occ.entry(t).or_default() += 1;
                seen.insert(t);
            }
        }
        for t in seen {
            *docs.entry(t).or_default().entry(label).or_default() += 1;
        }
    }
    let mut rows: Vec<SuspiciousToken> = union
        .iter()
        .map(|&t| {
            let mine: Vec<&TokenScore> = (0..selected.len())
                .map(|r| &scores[r * vocab + t as usize])
                .collect();
            let rounds: Vec<u8> = selected
                .iter()
                .filter(|(_, s)| s.contains(&t))
                .map(|(r, _)| *r)
                .collect();
            let by_label = docs.get(&t).cloned().unwrap_or_default();
            let documents: u64 = by_label.values().sum();
            let majority = by_label
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(l, n)| (*l as i64, *n));
            SuspiciousToken {
                token_id: t,
                token: mine[0].token.clone(),
                rounds,
                best_rank: mine.iter().filter_map(|s| s.rank).min().unwrap_or(0),
                max_distance: mine.iter().map(|s| s.distance).fold(0.0, f32::max),
                occurrences: occ.get(&t).copied().unwrap_or(0),
                documents,
                majority_label: majority.map(|m| m.0),
                label_share: majority.map(|m| m.1 as f32 / documents as f32),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        a.best_rank
            .cmp(&b.best_rank)
            .then(a.token_id.cmp(&b.token_id))
    });
    rows
}

/// Inputs of `btu detect`.
pub struct DetectJob {
    /// Labelled corpus to detect on (`--corpus`).
    pub corpus: CorpusSpec,
    /// Model directory every round starts from (`--model`).
    pub model: PathBuf,
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
    /// Detection parameters.
    pub params: DetectParams,
}

/// What one detection round did.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// Round number, 1 to 3.
    pub round: u8,
    /// Forward pass the round trained.
    pub arch: Arch,
    /// Parameters that trained.
    pub trainable: Trainable,
    /// Rows per batch.
    pub batch_size: usize,
    /// Corpus the round trained on.
    pub data: RoundData,
    /// Wall time of the round, scoring included.
    pub seconds: f64,
    /// Rows trained per second of training time.
    pub samples_per_s: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Loss of the first batch.
    pub loss_first: Option<f64>,
    /// Mean loss over the round's epochs.
    pub loss_mean: f64,
    /// Loss of the last batch.
    pub loss_last: Option<f64>,
    /// The round's selected tokens, best rank first.
    pub selected: Vec<String>,
}

impl RoundReport {
    fn of(r: &RoundSummary) -> Self {
        RoundReport {
            round: r.plan.round,
            arch: r.plan.arch,
            trainable: r.plan.trainable,
            batch_size: r.plan.batch_size,
            data: r.plan.data,
            seconds: r.seconds,
            samples_per_s: r.samples_per_s,
            steps: r.stats.iter().map(|s| s.steps).sum(),
            loss_first: r.stats.first().map(|s| s.loss_first),
            loss_mean: r.stats.iter().map(|s| s.loss_mean).sum::<f64>()
                / r.stats.len().max(1) as f64,
            loss_last: r.stats.last().map(|s| s.loss_last),
            selected: r.selected.clone(),
        }
    }
}

/// `btu detect`'s result (`summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct DetectReport {
    /// `detect`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// Output directory.
    pub out: PathBuf,
    /// Variant of the algorithm.
    pub preset: Preset,
    /// Percentage of the vocabulary selected per round.
    pub alpha: f64,
    /// Tokens selected per round.
    pub k: usize,
    /// The model's vocabulary size.
    pub vocab_size: usize,
    /// Corpus rows.
    pub rows: usize,
    /// Device the rounds ran on.
    pub device: String,
    /// The model directory.
    pub model: PathBuf,
    /// sha256 of its weights.
    pub model_sha256: String,
    /// Provenance of the corpus.
    pub corpus: crate::io::corpus::Fingerprint,
    /// The rounds.
    pub rounds: Vec<RoundReport>,
    /// The suspicious set.
    pub flagged: Vec<SuspiciousToken>,
    /// Wall time.
    pub seconds: f64,
}

/// `btu detect`: read, tokenize, three rounds, write `token_scores.arrow`,
/// `suspicious_tokens.arrow` and `summary.json` into `out` atomically; returns the summary.
pub fn run(job: &DetectJob, progress: &dyn Progress) -> Result<DetectReport> {
    let t0 = Instant::now();
    job.params.validate()?;
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    let dev = crate::device::parse_device(&job.run.device)?;
    job.params.precision.check("--precision", &dev)?;
    let ckpt = Checkpoint::read(&job.model)?;
    ckpt.check_max_len("--max-len", job.params.max_len)?;
    let tok = &ckpt.tokenizer;
    let model_sha = ckpt.sha256.clone();
    let bound = ckpt.label_bound(job.params.num_labels);
    let corpus = load_corpus(&job.corpus, tok, job.params.max_len, bound)?;
    let classes = ckpt.classes(job.params.num_labels, &corpus.labels);
    let base = ckpt.classifier(Some(classes), job.run.seed, &dev)?;
    if corpus
        .seqs
        .iter()
        .all(|s| s.iter().all(|t| tok.special.contains(t)))
    {
        return Err(BtuError::bad_data(
            job.corpus.inputs.join(", "),
            format!(
                "every text of column '{}' is empty after tokenization; nothing to detect",
                job.corpus.text_col
            ),
        ));
    }
    tracing::info!(rows = corpus.seqs.len(), "corpus tokenized");
    let det = detect(
        &base,
        tok,
        &corpus,
        &job.params,
        job.run.seed,
        &dev,
        progress,
    )?;

    let params = json!({
        "params": job.params,
        "seed": job.run.seed,
        "rounds": plan(&job.params),
        "text_col": job.corpus.text_col,
        "label_col": job.corpus.label_col,
        "k": det.k,
    });
    let meta = crate::io::tables::TableMeta {
        command: "detect".into(),
        params,
        model_sha256: model_sha.clone(),
        corpus_fingerprint: Some(corpus.fingerprint.to_json()),
        extra: vec![],
    };
    let out = crate::io::output::OutputDir::create(&job.run.out, job.run.overwrite)?;
    let scores = crate::io::tables::token_scores_batch(&det.scores, &meta)?;
    crate::io::tables::write_ipc(&out.path("token_scores.arrow"), &scores, false)?;
    let sus = crate::io::tables::suspicious_tokens_batch(&det.suspicious, &meta)?;
    crate::io::tables::write_ipc(&out.path("suspicious_tokens.arrow"), &sus, false)?;
    let summary = DetectReport {
        command: "detect".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        preset: job.params.preset,
        alpha: job.params.alpha,
        k: det.k,
        vocab_size: base.config.vocab_size,
        rows: corpus.seqs.len(),
        device: crate::device::device_name(&dev),
        model: job.model.clone(),
        model_sha256: model_sha,
        corpus: corpus.fingerprint.clone(),
        rounds: det.rounds.iter().map(RoundReport::of).collect(),
        flagged: det.suspicious,
        seconds: t0.elapsed().as_secs_f64(),
    };
    out.write_json("summary.json", &summary)?;
    out.commit()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prior_bias_is_the_smoothed_log_prior() {
        let b = prior_bias(&[1, 1, 1, 0, 2, 1], 3, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // counts + 1 = [2, 5, 2] of 9; softmax(log p) = p.
        for (got, want) in b.iter().zip([2.0f32 / 9.0, 5.0 / 9.0, 2.0 / 9.0]) {
            assert!((got - want.ln()).abs() < 1e-6, "{b:?}");
        }
    }

    #[test]
    fn k_is_a_percentage_of_the_vocabulary() {
        assert_eq!(top_k(0.05, 30522), 16); // ceil(15.261)
        assert_eq!(top_k(0.05, 35022), 18);
        assert_eq!(top_k(0.05, 100), 1);
        assert_eq!(top_k(1.0, 400), 4);
    }

    #[test]
    fn ranking_excludes_specials_and_breaks_ties_by_id() {
        let d = [9.0, 5.0, 7.0, 7.0, 1.0];
        let special: BTreeSet<u32> = [0].into_iter().collect();
        let r = rank(&d, &special);
        assert_eq!(r, vec![None, Some(3), Some(1), Some(2), Some(4)]);
    }

    #[test]
    fn presets_plan_the_rounds_of_the_spec() {
        let p = DetectParams::default();
        let paper = plan(&p);
        assert_eq!(
            paper.iter().map(|r| r.arch).collect::<Vec<_>>(),
            [Arch::Full, Arch::WordMean, Arch::WordMean]
        );
        assert_eq!(paper[2].data, RoundData::WithoutRound(2));
        assert!(paper
            .iter()
            .all(|r| r.trainable == Trainable::WordEmbeddings && r.batch_size == 32));
        let rc = plan(&DetectParams {
            preset: Preset::ReferenceCode,
            ..p
        });
        assert_eq!(rc[1].data, RoundData::WithoutRound(1));
        assert_eq!(
            rc.iter().map(|r| r.batch_size).collect::<Vec<_>>(),
            [256, 256, 64]
        );
        assert_eq!(rc[0].pad_to, Some(128));
        assert_eq!(rc[2].arch, Arch::Full);
    }
}
