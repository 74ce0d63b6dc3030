//! Tokenization with the `tokenizers` crate: loading a model directory's `tokenizer.json` (or a
//! BERT `vocab.txt`), encoding with truncation to `--max-len`, and length-bucketed batches padded
//! per batch so padding is not wasted work.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{BtuError, Result};
use crate::io::corpus::{read_corpus, CorpusSpec, Fingerprint};

/// BERT's (and DistilBERT's) special tokens, in the order a vocabulary btu trains starts with.
pub const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// RoBERTa's special tokens, in its order (`<pad>` = 1).
pub const ROBERTA_SPECIALS: [&str; 5] = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"];

/// GPT-2's only special token, end-of-text; it also pads.
pub const GPT2_EOT: &str = "<|endoftext|>";

/// Padding tokens by name, when the tokenizer has no padding configuration.
pub const PAD_NAMES: [&str; 2] = ["[PAD]", "<pad>"];

/// A loaded tokenizer plus the ids btu needs.
#[derive(Clone)]
pub struct BtuTokenizer {
    inner: Tokenizer,
    /// File it was loaded from.
    pub source: PathBuf,
    /// Padding token id (`[PAD]`).
    pub pad_id: u32,
    /// Special token ids: never flagged, never deleted.
    pub special: BTreeSet<u32>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> BtuError {
    BtuError::bad_data(
        path.display().to_string(),
        format!("cannot load tokenizer: {e}"),
    )
}

impl BtuTokenizer {
    /// Load from a model directory (`tokenizer.json`, else `vocab.txt`) or a tokenizer file.
    pub fn load(path: &Path) -> Result<Self> {
        let (file, is_vocab) = if path.is_dir() {
            let json = path.join("tokenizer.json");
            let vocab = path.join("vocab.txt");
            if json.is_file() {
                (json, false)
            } else if vocab.is_file() {
                (vocab, true)
            } else {
                return Err(BtuError::missing(
                    json.display().to_string(),
                    "the model directory needs tokenizer.json or vocab.txt",
                ));
            }
        } else if path.is_file() {
            let is_vocab = path.extension().is_some_and(|e| e == "txt");
            (path.to_path_buf(), is_vocab)
        } else {
            return Err(BtuError::missing(
                path.display().to_string(),
                "give a model directory or a tokenizer.json",
            ));
        };
        let mut inner = if is_vocab {
            from_vocab_txt(&file)?
        } else {
            Tokenizer::from_file(&file).map_err(|e| tok_err(&file, e))?
        };
        if path.is_dir() {
            pad_from_config(&mut inner, path);
        }
        Self::from_tokenizer(inner, file)
    }

    /// Wrap an in-memory tokenizer.
    pub fn from_tokenizer(inner: Tokenizer, source: PathBuf) -> Result<Self> {
        let mut special: BTreeSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        for name in BERT_SPECIALS.iter().chain(&ROBERTA_SPECIALS) {
            if let Some(id) = inner.token_to_id(name) {
                special.insert(id);
            }
        }
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| PAD_NAMES.iter().find_map(|p| inner.token_to_id(p)))
            .ok_or_else(|| {
                tok_err(
                    &source,
                    "no padding token ([PAD] or <pad>), no padding configuration and no pad_token_id or eos_token_id in the model's config.json; set pad_token_id (a decoder such as GPT-2 pads with its end-of-text token)",
                )
            })?;
        special.insert(pad_id);
        Ok(BtuTokenizer {
            inner,
            source,
            pad_id,
            special,
        })
    }

    /// The padding token's text when the vocabulary has no padding token of its own and
    /// another stands in (GPT-2's end-of-text); `None` for a real padding token.
    pub fn borrowed_pad(&self) -> Option<String> {
        let t = self.token(self.pad_id);
        (!PAD_NAMES.contains(&t.as_str())).then_some(t)
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The string of a token id.
    pub fn token(&self, id: u32) -> String {
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<{id}>"))
    }

    /// Token id of a string, if it is in the vocabulary.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encode texts (with `[CLS]`/`[SEP]`), truncated to `max_len` tokens.
    pub fn encode(&self, texts: &[String], max_len: usize) -> Result<Vec<Vec<u32>>> {
        let mut t = self.inner.clone();
        t.with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| tok_err(&self.source, e))?;
        t.with_padding(None);
        let enc = t
            .encode_batch(texts.iter().map(|s| s.as_str()).collect::<Vec<_>>(), true)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Encode texts without truncation (scanning must see every token).
    pub fn encode_untruncated(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let mut t = self.inner.clone();
        t.with_truncation(None)
            .map_err(|e| tok_err(&self.source, e))?;
        t.with_padding(None);
        let enc = t
            .encode_batch(texts.iter().map(|s| s.as_str()).collect::<Vec<_>>(), true)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }
}

/// A decoder's tokenizer without a padding token (GPT-2's) pads with the padding id its model's
/// `config.json` in `dir` resolves to (`pad_token_id`, else `eos_token_id`: the config's own
/// rule, [`crate::model::BertConfig::from_json`]), recorded as the tokenizer's padding so an
/// export carries it.
fn pad_from_config(inner: &mut Tokenizer, dir: &Path) {
    if inner.get_padding().is_some() || PAD_NAMES.iter().any(|p| inner.token_to_id(p).is_some()) {
        return;
    }
    let src = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&src) else {
        return;
    };
    let Ok(config) = crate::model::BertConfig::from_json(&text, &src.display().to_string()) else {
        return; // the model's own checks report a bad config
    };
    let pad_id = config.pad_token_id;
    if let (true, Some(pad_token)) = (config.family.is_decoder(), inner.id_to_token(pad_id)) {
        inner.with_padding(Some(tokenizers::PaddingParams {
            pad_id,
            pad_token,
            ..Default::default()
        }));
    }
}

/// Build a BERT (uncased) tokenizer from a `vocab.txt`.
fn from_vocab_txt(file: &Path) -> Result<Tokenizer> {
    let f = file
        .to_str()
        .ok_or_else(|| tok_err(file, "path is not UTF-8"))?;
    let wp = WordPiece::from_file(f)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| tok_err(file, e))?;
    let mut tok = Tokenizer::new(wp);
    let sep = tok
        .token_to_id("[SEP]")
        .ok_or_else(|| tok_err(file, "vocab has no [SEP]"))?;
    let cls = tok
        .token_to_id("[CLS]")
        .ok_or_else(|| tok_err(file, "vocab has no [CLS]"))?;
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .map_err(|e| tok_err(file, e))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(tok)
}

/// A tokenized corpus with its labels.
pub struct TokenizedCorpus {
    /// Token ids of each row (with `[CLS]`/`[SEP]`, truncated to `max_len`), in corpus order.
    pub seqs: Vec<Vec<u32>>,
    /// Label of each row, below `num_labels`; parallel to `seqs`.
    pub labels: Vec<u32>,
    /// Fingerprint of the rows read (before any edit).
    pub fingerprint: Fingerprint,
}

/// Read and tokenize a labelled corpus, checking labels against `num_labels`.
pub fn load_corpus(
    spec: &CorpusSpec,
    tok: &BtuTokenizer,
    max_len: usize,
    num_labels: usize,
) -> Result<TokenizedCorpus> {
    load_corpus_with(spec, tok, max_len, num_labels, &mut |_, _| None)
}

/// [`load_corpus`], with `edit(row position, text)` returning a replacement text for a row
/// (labels are kept).
pub fn load_corpus_with(
    spec: &CorpusSpec,
    tok: &BtuTokenizer,
    max_len: usize,
    num_labels: usize,
    edit: &mut dyn FnMut(usize, &str) -> Option<String>,
) -> Result<TokenizedCorpus> {
    let mut seqs = Vec::new();
    let mut labels = Vec::new();
    let fingerprint = read_corpus(spec, |b| {
        let ls = b.labels.as_ref().expect("labels requested");
        for (i, &l) in ls.iter().enumerate() {
            if l < 0 {
                return Err(BtuError::bad_data(
                    b.source.to_string(),
                    format!("label {l} at row {} is negative; labels are class indices 0, 1, ...; fix the label column", b.rows[i]),
                ));
            }
            if l as usize >= num_labels {
                return Err(BtuError::bad_data(
                    b.source.to_string(),
                    format!(
                        "label {l} at row {} is outside the model's {num_labels} classes (0..{}); pass --num-labels or fix the label column",
                        b.rows[i],
                        num_labels - 1
                    ),
                ));
            }
            labels.push(l as u32);
        }
        let texts: Vec<String> = b
            .texts
            .iter()
            .enumerate()
            .map(|(i, t)| edit(seqs.len() + i, t).unwrap_or_else(|| t.clone()))
            .collect();
        seqs.extend(tok.encode(&texts, max_len)?);
        Ok(())
    })?;
    Ok(TokenizedCorpus {
        seqs,
        labels,
        fingerprint,
    })
}

/// A padded batch: row-major `ids` and `mask` of shape `[rows, seq_len]`.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Indices of the samples in the corpus.
    pub index: Vec<usize>,
    /// Token ids, `rows * seq_len`, padded with the tokenizer's pad id.
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub mask: Vec<u8>,
    /// Number of sequences (`index.len()`).
    pub rows: usize,
    /// Padded length of every row (at least 1).
    pub seq_len: usize,
}

/// Pad the sequences `index` to the longest among them (or to `pad_to` when given).
pub fn make_batch(seqs: &[Vec<u32>], index: &[usize], pad_id: u32, pad_to: Option<usize>) -> Batch {
    let longest = index
        .iter()
        .map(|&i| seqs[i].len())
        .max()
        .unwrap_or(0)
        .max(1);
    let seq_len = pad_to.map_or(longest, |p| p.max(longest));
    let mut ids = Vec::with_capacity(index.len() * seq_len);
    let mut mask = Vec::with_capacity(index.len() * seq_len);
    for &i in index {
        let s = &seqs[i];
        ids.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(1u8, s.len()));
        ids.extend(std::iter::repeat_n(pad_id, seq_len - s.len()));
        mask.extend(std::iter::repeat_n(0u8, seq_len - s.len()));
    }
    Batch {
        index: index.to_vec(),
        ids,
        mask,
        rows: index.len(),
        seq_len,
    }
}

/// Split sample indices into batches of similar length. With `shuffle`, samples are shuffled
/// (seeded), sorted by length within windows of 50 batches, and the batch order shuffled again;
/// without, they are sorted by length (for inference).
pub fn bucketed_batches(
    lengths: &[usize],
    batch_size: usize,
    shuffle: Option<u64>,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    match shuffle {
        Some(seed) => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            idx.shuffle(&mut rng);
            let mut batches: Vec<Vec<usize>> = Vec::new();
            for window in idx.chunks(batch_size * 50) {
                let mut w = window.to_vec();
                w.sort_by_key(|&i| lengths[i]);
                batches.extend(w.chunks(batch_size).map(|c| c.to_vec()));
            }
            batches.shuffle(&mut rng);
            batches
        }
        None => {
            idx.sort_by_key(|&i| lengths[i]);
            idx.chunks(batch_size).map(|c| c.to_vec()).collect()
        }
    }
}

/// How samples are grouped into training batches.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Batching {
    /// Uniformly shuffled batches (what the paper's PyTorch code does).
    Random,
    /// Shuffled, then sorted by length within windows of 50 batches: less padding, but rows that
    /// an attack made longer end up in the same few batches.
    Bucketed,
}

/// Seeded training batches of `batch_size` for samples of the given lengths.
pub fn training_batches(
    lengths: &[usize],
    batch_size: usize,
    batching: Batching,
    seed: u64,
) -> Vec<Vec<usize>> {
    match batching {
        Batching::Bucketed => bucketed_batches(lengths, batch_size, Some(seed)),
        Batching::Random => {
            let mut idx: Vec<usize> = (0..lengths.len()).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            idx.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect()
        }
    }
}

/// Remove every occurrence of `ids` from each sequence (special tokens are never removed).
pub fn delete_tokens(seqs: &[Vec<u32>], ids: &BTreeSet<u32>) -> Vec<Vec<u32>> {
    seqs.iter()
        .map(|s| s.iter().copied().filter(|t| !ids.contains(t)).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_sample_once_and_group_lengths() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 61 + 2).collect();
        let b = bucketed_batches(&lengths, 32, Some(1));
        let mut all: Vec<usize> = b.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(b, bucketed_batches(&lengths, 32, Some(1)), "seeded");
        assert_ne!(b, bucketed_batches(&lengths, 32, Some(2)));
        // Bucketing: padding waste is far below that of random batches.
        let waste = |bs: &[Vec<usize>]| -> usize {
            bs.iter()
                .map(|x| {
                    let m = x.iter().map(|&i| lengths[i]).max().unwrap();
                    x.iter().map(|&i| m - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let random: Vec<Vec<usize>> = (0..1000)
            .collect::<Vec<_>>()
            .chunks(32)
            .map(|c| c.to_vec())
            .collect();
        assert!(
            waste(&b) * 5 < waste(&random),
            "{} vs {}",
            waste(&b),
            waste(&random)
        );
    }

    #[test]
    fn padding_and_deletion_work_on_ids() {
        let seqs = vec![vec![2, 10, 11, 3], vec![2, 12, 3]];
        let b = make_batch(&seqs, &[0, 1], 0, None);
        assert_eq!(b.ids, vec![2, 10, 11, 3, 2, 12, 3, 0]);
        assert_eq!(b.mask, vec![1, 1, 1, 1, 1, 1, 1, 0]);
        let b = make_batch(&seqs, &[1], 0, Some(5));
        assert_eq!((b.seq_len, b.ids.len()), (5, 5));
        let del: BTreeSet<u32> = [11, 12].into_iter().collect();
        assert_eq!(delete_tokens(&seqs, &del), vec![vec![2, 10, 3], vec![2, 3]]);
    }
}
