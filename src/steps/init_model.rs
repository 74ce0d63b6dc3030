//! `btu init-model`: the embedded default model. A randomly initialised classifier of any family
//! (`--arch bert|roberta|distilbert|gpt2`; sizes by flag, seeded) in Hugging Face layout, with a
//! vocabulary trained on a corpus (WordPiece for BERT and DistilBERT, byte-level BPE for RoBERTa
//! and GPT-2) or a given `tokenizer.json`.

use std::path::PathBuf;

use candle_core::Device;
use serde::Serialize;

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::defaults;
use crate::error::{BtuError, Result};
use crate::io::corpus::{read_corpus, CorpusSpec};
use crate::model::checkpoint::save_model;
use crate::model::tokenizer::{BtuTokenizer, BERT_SPECIALS, GPT2_EOT, ROBERTA_SPECIALS};
use crate::model::{BertClassifier, BertConfig, Family};

/// Sizes of a random model: the flags of `btu init-model` and the `[model.init]` table of
/// `btu defend` (defaults in [`crate::defaults`]).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSize {
    /// Size of the WordPiece vocabulary trained on the corpus (at least 100; unused with --tokenizer).
    #[arg(long, env = "BTU_VOCAB_SIZE", default_value_t = defaults::VOCAB_SIZE)]
    pub vocab_size: usize,
    /// Number of transformer layers (at least 1).
    #[arg(long, env = "BTU_LAYERS", default_value_t = defaults::LAYERS)]
    pub layers: usize,
    /// Hidden size of the model, a multiple of --heads.
    #[arg(long, env = "BTU_HIDDEN", default_value_t = defaults::HIDDEN)]
    pub hidden: usize,
    /// Attention heads per layer; --hidden must be a multiple of it.
    #[arg(long, env = "BTU_HEADS", default_value_t = defaults::HEADS)]
    pub heads: usize,
    /// Size of the feed-forward layer inside each transformer layer.
    #[arg(long, env = "BTU_INTERMEDIATE", default_value_t = defaults::INTERMEDIATE)]
    pub intermediate: usize,
    /// Position embeddings (max_position_embeddings): the longest sequence the model takes (>= 3).
    #[arg(long, env = "BTU_MAX_POSITION", default_value_t = defaults::MAX_POSITION)]
    pub max_position: usize,
    /// Number of classes of the classification head (at least 2).
    #[arg(long, env = "BTU_NUM_LABELS", default_value_t = defaults::NUM_LABELS)]
    pub num_labels: usize,
    /// Model family: bert, roberta (byte-level BPE vocabulary, positions after the padding
    /// position, one token type) or distilbert (no token types, ReLU head).
    #[arg(long, env = "BTU_ARCH", value_enum, default_value_t = Family::Bert)]
    #[serde(skip_serializing_if = "Family::is_bert")]
    pub arch: Family,
}

impl Default for ModelSize {
    fn default() -> Self {
        ModelSize {
            vocab_size: defaults::VOCAB_SIZE,
            layers: defaults::LAYERS,
            hidden: defaults::HIDDEN,
            heads: defaults::HEADS,
            intermediate: defaults::INTERMEDIATE,
            max_position: defaults::MAX_POSITION,
            num_labels: defaults::NUM_LABELS,
            arch: Family::Bert,
        }
    }
}

/// Inputs of `btu init-model`.
pub struct InitModelJob {
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
    /// Corpus to train the WordPiece vocabulary on (`--corpus`); ignored when `tokenizer` is given.
    pub corpus: Option<CorpusSpec>,
    /// A tokenizer to use instead of training one (`--tokenizer`: `tokenizer.json`, `vocab.txt`
    /// or a model directory).
    pub tokenizer: Option<PathBuf>,
    /// Model sizes (and the vocabulary size trained on `corpus`).
    pub size: ModelSize,
}

fn tok_err(e: impl std::fmt::Display) -> BtuError {
    BtuError::internal(format!("tokenizer training: {e}"))
}

/// An uncased BERT tokenizer around a WordPiece model (`[CLS] ... [SEP]` post-processing).
fn bert_tokenizer(wp: WordPiece) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .map_err(tok_err)?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    Ok(tok)
}

/// A vocabulary: `tokens` first, then the words of `counts` that `keep` accepts, by descending
/// count (ties in byte order), up to `vocab_size` in all; ids in that order.
fn vocabulary(
    mut tokens: Vec<String>,
    counts: &std::collections::HashMap<String, u64>,
    keep: impl Fn(&str) -> bool,
    vocab_size: usize,
) -> ahash::AHashMap<String, u32> {
    let mut words: Vec<(&String, &u64)> = counts.iter().filter(|(w, _)| keep(w)).collect();
    words.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let room = vocab_size.saturating_sub(tokens.len());
    tokens.extend(words.into_iter().take(room).map(|(w, _)| w.clone()));
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect()
}

/// Build an uncased BERT WordPiece tokenizer from a corpus, deterministically: `[PAD]`=0,
/// `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, then every character seen (alone and as a `##`
/// continuation, so any word can be spelled), then whole words by descending frequency (ties in
/// byte order) up to `vocab_size`. (The `tokenizers` crate's WordPiece trainer breaks ties in
/// hash-map order, so the same corpus gave different vocabularies from run to run.)
pub fn train_wordpiece(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    use tokenizers::{
        NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
        PreTokenizer,
    };
    let normalizer = BertNormalizer::new(true, true, None, true);
    let mut counts: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for t in texts {
        let mut pts = PreTokenizedString::from(t.as_str());
        pts.normalize(|n: &mut NormalizedString| normalizer.normalize(n))
            .map_err(tok_err)?;
        BertPreTokenizer.pre_tokenize(&mut pts).map_err(tok_err)?;
        for (w, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *counts.entry(w.to_string()).or_default() += 1;
        }
    }
    let mut chars: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for w in counts.keys() {
        for c in w.chars() {
            chars.insert(c.to_string());
            chars.insert(format!("##{c}"));
        }
    }
    let mut tokens: Vec<String> = BERT_SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(chars);
    let vocab = vocabulary(tokens, &counts, |w| w.chars().count() > 1, vocab_size);
    let wp = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .map_err(tok_err)?;
    let mut tok = bert_tokenizer(wp)?;
    tok.add_special_tokens(
        BERT_SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    )
    .map_err(tok_err)?;
    let sep = tok
        .token_to_id("[SEP]")
        .ok_or_else(|| tok_err("no [SEP]"))?;
    let cls = tok
        .token_to_id("[CLS]")
        .ok_or_else(|| tok_err("no [CLS]"))?;
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(tok)
}

/// Build a byte-level BPE tokenizer (RoBERTa's and GPT-2's kind, cased) from a corpus,
/// deterministically: the family's special tokens (`specials`: RoBERTa's five, framing each
/// text with `<s> ... </s>`; GPT-2's end-of-text alone, which pads and frames nothing), the
/// 256 byte symbols (so any text can be spelled), then whole
/// pre-tokenized words (`Ġ` marks a preceding space) by descending frequency (ties in byte
/// order) up to `vocab_size`. A word in the vocabulary is one token (`ignore_merges`); any other
/// is spelled in bytes (no merges are learned).
pub fn train_bytelevel(texts: &[String], vocab_size: usize, family: Family) -> Result<Tokenizer> {
    let specials: &[&str] = match family {
        Family::Gpt2 => &[GPT2_EOT],
        _ => &ROBERTA_SPECIALS,
    };
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::roberta::RobertaProcessing;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let bytes = ByteLevel::new(false, true, true);
    let mut counts: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for t in texts {
        let mut pts = PreTokenizedString::from(t.as_str());
        bytes.pre_tokenize(&mut pts).map_err(tok_err)?;
        for (w, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *counts.entry(w.to_string()).or_default() += 1;
        }
    }
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let alphabet: std::collections::BTreeSet<String> = ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    tokens.extend(alphabet.iter().cloned());
    let vocab = vocabulary(tokens, &counts, |w| !alphabet.contains(w), vocab_size);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .ignore_merges(true)
        .build()
        .map_err(tok_err)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(bytes));
    tok.with_decoder(Some(bytes));
    tok.add_special_tokens(
        specials
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    )
    .map_err(tok_err)?;
    if family != Family::Gpt2 {
        tok.with_post_processor(Some(RobertaProcessing::new(
            ("</s>".into(), 2),
            ("<s>".into(), 0),
        )));
    } else {
        tok.with_padding(Some(tokenizers::PaddingParams {
            pad_id: 0,
            pad_token: specials[0].to_string(),
            ..Default::default()
        }));
    }
    Ok(tok)
}

impl ModelSize {
    /// Check the sizes make a model (exit 78) before any work; names spelled with `prefix`
    /// (`--` for flags, `model.init.` for a defend config).
    pub fn validate_as(&self, prefix: &str) -> Result<()> {
        use crate::validate::{at_least, key};
        at_least(&key(prefix, "layers"), self.layers, 1)?;
        at_least(&key(prefix, "hidden"), self.hidden, 1)?;
        at_least(&key(prefix, "heads"), self.heads, 1)?;
        at_least(&key(prefix, "intermediate"), self.intermediate, 1)?;
        at_least(
            &key(prefix, "max-position"),
            self.max_position,
            crate::validate::MIN_MAX_LEN,
        )?;
        at_least(&key(prefix, "num-labels"), self.num_labels, 2)?;
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(BtuError::config(
                format!("{}/{}", key(prefix, "hidden"), key(prefix, "heads")),
                format!(
                    "hidden size {} is not a multiple of {} heads",
                    self.hidden, self.heads
                ),
            ));
        }
        Ok(())
    }
}

/// A config of the given sizes and family (RoBERTa: `max_position` positions after the padding
/// position, one token type).
pub fn config_for(vocab_size: usize, s: &ModelSize, pad_token_id: u32) -> BertConfig {
    let roberta = s.arch == Family::Roberta;
    let decoder = s.arch.is_decoder();
    let mut c = BertConfig {
        vocab_size,
        hidden_size: s.hidden,
        num_hidden_layers: s.layers,
        num_attention_heads: s.heads,
        intermediate_size: s.intermediate,
        // GPT-2's activation and LayerNorm eps are its own.
        hidden_act: if decoder { "gelu_new" } else { "gelu" }.into(),
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        max_position_embeddings: if roberta {
            s.max_position + pad_token_id as usize + 1
        } else {
            s.max_position
        },
        type_vocab_size: if roberta { 1 } else { 2 },
        layer_norm_eps: if decoder { 1e-5 } else { 1e-12 },
        pad_token_id,
        num_labels: None,
        id2label: None,
        extra: Default::default(),
        family: s.arch,
    };
    if decoder {
        // It pads with its end-of-text token, which also begins and ends texts.
        for k in ["bos_token_id", "eos_token_id"] {
            c.extra.insert(k.into(), pad_token_id.into());
        }
    }
    c.set_labels(s.num_labels);
    c
}

/// `btu init-model`'s result.
#[derive(Debug, Clone, Serialize)]
pub struct InitModelReport {
    /// `init-model`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The model directory.
    pub out: PathBuf,
    /// The tokenizer's vocabulary size (the model's).
    pub vocab_size: usize,
    /// The sizes asked for.
    pub size: ModelSize,
    /// Seed of the weights.
    pub seed: u64,
}

/// `btu init-model`.
pub fn run(job: &InitModelJob) -> Result<InitModelReport> {
    job.size.validate_as("--")?;
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    let tokenizer = match (&job.tokenizer, &job.corpus) {
        (Some(path), _) => BtuTokenizer::load(path)?.inner().clone(),
        (None, Some(spec)) => {
            crate::validate::at_least("--vocab-size", job.size.vocab_size, 100)?;
            let mut texts = Vec::new();
            read_corpus(spec, |b| {
                texts.extend(b.texts);
                Ok(())
            })?;
            match job.size.arch {
                f if f.byte_level() => train_bytelevel(&texts, job.size.vocab_size, f)?,
                _ => train_wordpiece(&texts, job.size.vocab_size)?,
            }
        }
        (None, None) => {
            return Err(BtuError::config(
                "--corpus",
                "init-model needs --corpus (to train a vocabulary) or --tokenizer",
            ))
        }
    };
    let tok = BtuTokenizer::from_tokenizer(tokenizer, PathBuf::from("tokenizer.json"))?;
    let config = config_for(tok.vocab_size(), &job.size, tok.pad_id);
    config.validate("--hidden/--heads")?;
    let model = BertClassifier::random(config, job.run.seed, &Device::Cpu)?;
    let out = crate::io::output::OutputDir::create(&job.run.out, job.run.overwrite)?;
    let meta = [
        ("btu:command".to_string(), "init-model".to_string()),
        ("btu:version".to_string(), crate::VERSION.to_string()),
        ("btu:seed".to_string(), job.run.seed.to_string()),
    ]
    .into_iter()
    .collect();
    save_model(&model, &out.path(""), meta)?;
    tok.inner()
        .save(out.path("tokenizer.json"), true)
        .map_err(|e| {
            BtuError::io(
                out.path("tokenizer.json"),
                std::io::Error::other(e.to_string()),
            )
        })?;
    out.commit()?;
    Ok(InitModelReport {
        command: "init-model".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        vocab_size: tok.vocab_size(),
        size: job.size.clone(),
        seed: job.run.seed,
    })
}
