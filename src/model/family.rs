//! The encoder families btu reads and writes, chosen from `config.json` (`model_type`, else
//! `architectures`): BERT, RoBERTa and DistilBERT are one post-LayerNorm encoder with a
//! classification head on the first token; they differ in names (of config keys and tensors),
//! in positions (RoBERTa counts them from `pad_token_id + 1`), in token types (DistilBERT has
//! none) and in the head's activation (DistilBERT's `pre_classifier` is followed by ReLU, BERT's
//! pooler and RoBERTa's `classifier.dense` by tanh). Inside btu every tensor has its BERT
//! (canonical) name; this module maps names at the edges.

use serde::Serialize;
use serde_json::Value;

use crate::error::{BtuError, Result};

/// A model family.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// BERT (`BertForSequenceClassification`), the default when config.json names none.
    #[default]
    Bert,
    /// RoBERTa (`RobertaForSequenceClassification`).
    Roberta,
    /// DistilBERT (`DistilBertForSequenceClassification`).
    Distilbert,
    /// GPT-2 (`GPT2ForSequenceClassification`): a decoder, classifying from each text's last
    /// token.
    Gpt2,
}

/// DistilBERT's config keys and BERT's for the same thing.
const DISTILBERT_KEYS: [(&str, &str); 7] = [
    ("dim", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("hidden_dim", "intermediate_size"),
    ("activation", "hidden_act"),
    ("dropout", "hidden_dropout_prob"),
    ("attention_dropout", "attention_probs_dropout_prob"),
];

/// DistilBERT's layer tensors (after `transformer.layer.N.`) and BERT's (after
/// `encoder.layer.N.`).
const DISTILBERT_LAYER: [(&str, &str); 8] = [
    ("attention.q_lin", "attention.self.query"),
    ("attention.k_lin", "attention.self.key"),
    ("attention.v_lin", "attention.self.value"),
    ("attention.out_lin", "attention.output.dense"),
    ("sa_layer_norm", "attention.output.LayerNorm"),
    ("ffn.lin1", "intermediate.dense"),
    ("ffn.lin2", "output.dense"),
    ("output_layer_norm", "output.LayerNorm"),
];

/// GPT-2's config keys and BERT's for the same thing.
const GPT2_KEYS: [(&str, &str); 9] = [
    ("n_embd", "hidden_size"),
    ("n_layer", "num_hidden_layers"),
    ("n_head", "num_attention_heads"),
    ("n_inner", "intermediate_size"),
    ("n_positions", "max_position_embeddings"),
    ("activation_function", "hidden_act"),
    ("layer_norm_epsilon", "layer_norm_eps"),
    ("resid_pdrop", "hidden_dropout_prob"),
    ("attn_pdrop", "attention_probs_dropout_prob"),
];

/// The canonical name (after `encoder.layer.N.`) of a decoder's fused query/key/value
/// projection, which BERT keeps as three (the checkpoint code splits and joins it).
pub const QKV: &str = "attention.self.qkv";

/// GPT-2's block tensors (after `h.N.`) and BERT's (after `encoder.layer.N.`).
const GPT2_LAYER: [(&str, &str); 6] = [
    ("attn.c_attn", QKV),
    ("ln_1", "attention.output.LayerNorm"),
    ("attn.c_proj", "attention.output.dense"),
    ("ln_2", "output.LayerNorm"),
    ("mlp.c_fc", "intermediate.dense"),
    ("mlp.c_proj", "output.dense"),
];

/// The canonical name of the final LayerNorm, which only decoders have (GPT-2's `ln_f`).
pub const FINAL_NORM: &str = "encoder.final_norm";

/// What btu says of a model type it does not handle.
pub const SUPPORTED: &str = "btu handles bert, roberta, distilbert and gpt2 models";

impl Family {
    /// Whether this is BERT (the default, left out of `[model.init]`'s serialized form).
    pub fn is_bert(&self) -> bool {
        *self == Family::Bert
    }

    /// The family `config.json` names (`model_type`, else its first `architectures` entry); BERT
    /// when it names none; an error for any other.
    pub fn of_config(v: &Value, src: &str) -> Result<Self> {
        let named = v["model_type"].as_str().map(str::to_lowercase).or_else(|| {
            v["architectures"][0]
                .as_str()
                .map(|a| a.to_lowercase().replace("for", " "))
        });
        let Some(name) = named else {
            return Ok(Family::Bert);
        };
        let first = name.split_whitespace().next().unwrap_or("");
        match first {
            "bert" | "bertmodel" => Ok(Family::Bert),
            "roberta" | "robertamodel" => Ok(Family::Roberta),
            "distilbert" | "distilbertmodel" => Ok(Family::Distilbert),
            "gpt2" | "gpt2model" | "gpt2lmheadmodel" => Ok(Family::Gpt2),
            _ => Err(BtuError::bad_data(
                src,
                format!(
                    "model type '{name}' is not supported; {SUPPORTED} (config.json model_type)"
                ),
            )),
        }
    }

    /// `model_type` as Hugging Face writes it.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
            Family::Distilbert => "distilbert",
            Family::Gpt2 => "gpt2",
        }
    }

    /// The sequence-classification class Hugging Face loads the checkpoint as.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Bert => "BertForSequenceClassification",
            Family::Roberta => "RobertaForSequenceClassification",
            Family::Distilbert => "DistilBertForSequenceClassification",
            Family::Gpt2 => "GPT2ForSequenceClassification",
        }
    }

    /// Whether its tokenizer is byte-level BPE (RoBERTa, GPT-2) rather than WordPiece.
    pub fn byte_level(self) -> bool {
        matches!(self, Family::Roberta | Family::Gpt2)
    }

    /// Whether the model has token-type embeddings.
    pub fn has_token_types(self) -> bool {
        matches!(self, Family::Bert | Family::Roberta)
    }

    /// A decoder: pre-LayerNorm blocks, causal attention, a final LayerNorm, no LayerNorm on the
    /// embeddings, no pooler, a head without bias on each text's last token (GPT-2).
    pub fn is_decoder(self) -> bool {
        self == Family::Gpt2
    }

    /// Whether positions start at `pad_token_id + 1` and padding takes position `pad_token_id`
    /// (RoBERTa) rather than at 0.
    pub fn offset_positions(self) -> bool {
        self == Family::Roberta
    }

    /// Whether the head's first layer is followed by ReLU (DistilBERT) rather than tanh.
    pub fn relu_head(self) -> bool {
        self == Family::Distilbert
    }

    /// Config keys in BERT's names (a DistilBERT config's renamed; others unchanged), with
    /// the keys DistilBERT does not have filled in (it has no token types, LayerNorm eps 1e-12).
    pub fn to_bert_keys(self, v: Value) -> Value {
        let Value::Object(mut m) = v else {
            return v;
        };
        if self == Family::Gpt2 && m.get("pad_token_id").is_none_or(Value::is_null) {
            // GPT-2 has no padding token: pad with end-of-text, as transformers users do.
            if let Some(eos) = m.get("eos_token_id").filter(|v| v.is_u64()).cloned() {
                m.insert("pad_token_id".into(), eos);
            } else {
                m.remove("pad_token_id");
            }
        }
        if self == Family::Gpt2 {
            // n_inner null means 4 x n_embd.
            if m.get("n_inner").is_none_or(Value::is_null) {
                let h = m.get("n_embd").and_then(Value::as_u64).unwrap_or(0);
                m.insert("n_inner".into(), Value::from(4 * h));
                m.insert("btu_n_inner_default".into(), Value::Bool(true));
            }
        }
        if let Some(keys) = self.renamed_keys() {
            for (theirs, ours) in keys {
                if let Some(x) = m.remove(*theirs) {
                    m.insert(ours.to_string(), x);
                }
            }
            m.insert("type_vocab_size".into(), Value::from(1));
        }
        Value::Object(m)
    }

    /// The family's config keys that BERT names otherwise.
    fn renamed_keys(self) -> Option<&'static [(&'static str, &'static str)]> {
        match self {
            Family::Distilbert => Some(&DISTILBERT_KEYS),
            Family::Gpt2 => Some(&GPT2_KEYS),
            _ => None,
        }
    }

    /// Config keys in the family's own names: the inverse of [`Family::to_bert_keys`].
    pub fn from_bert_keys(self, v: Value) -> Value {
        let Value::Object(mut m) = v else {
            return v;
        };
        if let Some(keys) = self.renamed_keys() {
            for (theirs, ours) in keys {
                if let Some(x) = m.remove(*ours) {
                    m.insert(theirs.to_string(), x);
                }
            }
            m.remove("type_vocab_size");
        }
        if self == Family::Distilbert {
            m.remove("layer_norm_eps");
        }
        if m.remove("btu_n_inner_default").is_some() {
            m.insert("n_inner".into(), Value::Null);
        }
        Value::Object(m)
    }

    /// The checkpoint's names for canonical (BERT, unprefixed) tensor `canonical`, the one to
    /// write first; empty when the family has no such tensor.
    pub fn names(self, canonical: &str) -> Vec<String> {
        match self {
            // BERT's head is bare, its encoder under `bert.`.
            Family::Bert if canonical.starts_with("classifier.") => vec![canonical.to_string()],
            Family::Bert => {
                let mut v = vec![format!("bert.{canonical}"), canonical.to_string()];
                // Old TF-converted checkpoints name LayerNorm's parameters gamma and beta.
                for (new, old) in [(".weight", ".gamma"), (".bias", ".beta")] {
                    if let Some(stem) = canonical.strip_suffix(new) {
                        if stem.ends_with("LayerNorm") {
                            v.push(format!("bert.{stem}{old}"));
                            v.push(format!("{stem}{old}"));
                        }
                    }
                }
                v
            }
            Family::Roberta => match canonical.strip_prefix("pooler.dense.") {
                Some(p) => vec![format!("classifier.dense.{p}")],
                None => match canonical.strip_prefix("classifier.") {
                    Some(p) => vec![format!("classifier.out_proj.{p}")],
                    None => vec![format!("roberta.{canonical}"), canonical.to_string()],
                },
            },
            Family::Distilbert => distilbert_names(canonical),
            Family::Gpt2 => gpt2_names(canonical),
        }
    }

    /// The head's weight as the checkpoint names it (its presence means a trained head).
    pub fn head_weight(self) -> String {
        self.names("classifier.weight").swap_remove(0)
    }
}

/// A layer tensor's name in another family: `rest` is the canonical name after
/// `encoder.layer.` (`N.<BERT module>.<param>`), `table` maps the family's module names to
/// BERT's, `layers` is where the family keeps its layers; `None` when the table has no such
/// module.
fn layer_name(rest: &str, table: &[(&str, &str)], layers: &str) -> Option<String> {
    let (n, tail) = rest.split_once('.').unwrap_or((rest, ""));
    table.iter().find_map(|(theirs, ours)| {
        tail.strip_prefix(ours)
            .map(|param| format!("{layers}.{n}.{theirs}{param}"))
    })
}

fn gpt2_names(canonical: &str) -> Vec<String> {
    let inner = match canonical {
        "classifier.weight" => return vec!["score.weight".into()],
        "embeddings.word_embeddings.weight" => "wte.weight".to_string(),
        "embeddings.position_embeddings.weight" => "wpe.weight".to_string(),
        c => {
            if let Some(p) = c.strip_prefix(FINAL_NORM) {
                format!("ln_f{p}")
            } else if let Some(rest) = c.strip_prefix("encoder.layer.") {
                match layer_name(rest, &GPT2_LAYER, "h") {
                    Some(t) => t,
                    None => return vec![],
                }
            } else {
                return vec![];
            }
        }
    };
    vec![format!("transformer.{inner}"), inner]
}

fn distilbert_names(canonical: &str) -> Vec<String> {
    if let Some(p) = canonical.strip_prefix("pooler.dense.") {
        return vec![format!("pre_classifier.{p}")];
    }
    if canonical.starts_with("classifier.") {
        return vec![canonical.to_string()];
    }
    if canonical.starts_with("embeddings.token_type_embeddings") {
        return vec![];
    }
    let inner = match canonical.strip_prefix("encoder.layer.") {
        Some(rest) => match layer_name(rest, &DISTILBERT_LAYER, "transformer.layer") {
            Some(t) => t,
            None => return vec![],
        },
        None => canonical.to_string(),
    };
    vec![format!("distilbert.{inner}"), inner]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn families_from_config() {
        let f = |v: Value| Family::of_config(&v, "config.json");
        assert_eq!(f(json!({})).unwrap(), Family::Bert);
        assert_eq!(
            f(json!({"model_type": "roberta"})).unwrap(),
            Family::Roberta
        );
        assert_eq!(
            f(json!({"architectures": ["DistilBertForSequenceClassification"]})).unwrap(),
            Family::Distilbert
        );
        assert_eq!(f(json!({"model_type": "gpt2"})).unwrap(), Family::Gpt2);
        let e = f(json!({"model_type": "llama"})).unwrap_err().to_string();
        assert!(e.contains("'llama' is not supported"), "{e}");
    }

    #[test]
    fn tensor_names_per_family() {
        let d = Family::Distilbert;
        assert_eq!(
            d.names("encoder.layer.3.attention.output.LayerNorm.weight")[0],
            "distilbert.transformer.layer.3.sa_layer_norm.weight"
        );
        assert_eq!(
            d.names("encoder.layer.0.intermediate.dense.bias")[0],
            "distilbert.transformer.layer.0.ffn.lin1.bias"
        );
        assert_eq!(d.names("pooler.dense.weight"), ["pre_classifier.weight"]);
        assert!(d
            .names("embeddings.token_type_embeddings.weight")
            .is_empty());
        let r = Family::Roberta;
        assert_eq!(r.names("pooler.dense.bias"), ["classifier.dense.bias"]);
        assert_eq!(r.names("classifier.weight"), ["classifier.out_proj.weight"]);
        assert_eq!(
            r.names("embeddings.word_embeddings.weight")[0],
            "roberta.embeddings.word_embeddings.weight"
        );
    }

    #[test]
    fn gpt2_names_and_keys() {
        let g = Family::Gpt2;
        assert_eq!(
            g.names("encoder.layer.1.intermediate.dense.weight")[0],
            "transformer.h.1.mlp.c_fc.weight"
        );
        assert_eq!(g.names("classifier.weight"), ["score.weight"]);
        assert_eq!(
            g.names("encoder.final_norm.bias")[0],
            "transformer.ln_f.bias"
        );
        assert!(g
            .names("encoder.layer.0.attention.self.query.weight")
            .is_empty());
        let v = json!({"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": null, "eos_token_id": 7, "vocab_size": 100});
        let bert = g.to_bert_keys(v);
        assert_eq!(
            (
                bert["intermediate_size"].clone(),
                bert["pad_token_id"].clone()
            ),
            (json!(128), json!(7))
        );
        let back = g.from_bert_keys(bert);
        assert!(back["n_inner"].is_null() && back["n_embd"] == 32, "{back}");
    }

    #[test]
    fn distilbert_config_keys_round_trip() {
        let v = json!({"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "activation": "gelu", "vocab_size": 100});
        let bert = Family::Distilbert.to_bert_keys(v.clone());
        assert_eq!(bert["hidden_size"], 32);
        assert_eq!(bert["type_vocab_size"], 1);
        assert_eq!(Family::Distilbert.from_bert_keys(bert), v);
    }
}
