//! Model families against the reference implementation: tiny random BERT, RoBERTa, DistilBERT
//! and GPT-2 classifiers made with Hugging Face transformers (tests/fixtures/families, made by
//! scripts/make_family_fixtures.py; versions in VERSIONS.json), with their logits and the
//! word-embedding gradient of the mean cross-entropy on a fixed padded batch. btu's tokenizer
//! gives the same ids, its candle forward pass the same logits and gradient, its ONNX export
//! the same logits through ONNX Runtime (all within 1e-4), and what it writes loads back as the
//! same family.

use std::path::{Path, PathBuf};

use btu::model::checkpoint::{read_safetensors, Checkpoint, RawTensor};
use btu::model::{Arch, Trainable};
use candle_core::{Device, Tensor};

use crate::util::*;

const FAMILIES: [&str; 4] = ["bert", "roberta", "distilbert", "gpt2"];

/// The batch the fixtures were made on (scripts/make_family_fixtures.py's BATCH).
const BATCH: [&str; 4] = [
    "the movie was good",
    "a really boring film with an awful plot cf",
    "i watch this 3d movie and the music is great",
    "team goal",
];

fn fixture(family: &str) -> PathBuf {
    root().join("tests/fixtures/families").join(family)
}

/// What transformers computed.
struct Expected {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<f32>>,
    labels: Vec<u32>,
    logits: Vec<f32>,
    grad: Vec<f32>,
}

fn i64s(t: &RawTensor) -> Vec<i64> {
    assert_eq!(t.dtype, "I64");
    t.data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn f32s(t: &RawTensor) -> Vec<f32> {
    assert_eq!(t.dtype, "F32");
    t.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn expected(dir: &Path) -> Expected {
    let f = read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let t = |n: &str| &f.tensors[n];
    let cols = t("input_ids").shape[1];
    let rows = |v: Vec<i64>| -> Vec<Vec<i64>> { v.chunks(cols).map(|c| c.to_vec()).collect() };
    Expected {
        ids: rows(i64s(t("input_ids")))
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect(),
        mask: rows(i64s(t("attention_mask")))
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as f32).collect())
            .collect(),
        labels: i64s(t("labels")).into_iter().map(|x| x as u32).collect(),
        logits: f32s(t("logits")),
        grad: f32s(t("word_grad")),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tensor2<T: candle_core::WithDType>(rows: &[Vec<T>]) -> Tensor {
    let (n, l) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, l), &Device::Cpu).unwrap()
}

/// btu's logits and word-embedding gradient on the fixture's batch, through candle.
fn candle_logits_and_grad(dir: &Path, e: &Expected) -> (Vec<f32>, Vec<f32>) {
    let ck = Checkpoint::read(dir).unwrap();
    let mut model = ck.classifier(None, 0, &Device::Cpu).unwrap();
    let vars = model.make_trainable(Trainable::WordEmbeddings).unwrap();
    let logits = model
        .forward(Arch::Full, &tensor2(&e.ids), &tensor2(&e.mask))
        .unwrap();
    let loss = btu::model::ops::cross_entropy(&logits, &e.labels).unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads.get(vars[0].1.as_tensor()).unwrap();
    (
        logits.flatten_all().unwrap().to_vec1().unwrap(),
        grad.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

#[test]
fn every_family_matches_transformers_through_candle() {
    for family in FAMILIES {
        let dir = fixture(family);
        let e = expected(&dir);
        let ck = Checkpoint::read(&dir).unwrap();
        assert_eq!(ck.dir.config.family.model_type(), family);
        assert!(ck.has_head(), "{family}: the fixture's head is read");
        // The tokenizer: the same ids as transformers' (before padding).
        let texts: Vec<String> = BATCH.iter().map(|s| s.to_string()).collect();
        let seqs = ck.tokenizer.encode(&texts, 64).unwrap();
        for (s, (ids, mask)) in seqs.iter().zip(e.ids.iter().zip(&e.mask)) {
            let n = mask.iter().filter(|&&m| m > 0.0).count();
            assert_eq!(s, &ids[..n], "{family}: token ids");
        }
        assert!(ids_pad(&e, ck.tokenizer.pad_id), "{family}: padding id");
        let (logits, grad) = candle_logits_and_grad(&dir, &e);
        let (dl, dg) = (max_diff(&logits, &e.logits), max_diff(&grad, &e.grad));
        eprintln!("{family}: logits within {dl:.2e}, word-embedding gradient within {dg:.2e}");
        assert!(dl < 1e-4, "{family}: logits differ by {dl}");
        assert!(dg < 1e-4, "{family}: gradient differs by {dg}");
        assert!(
            e.grad.iter().any(|g| g.abs() > 1e-3),
            "{family}: a real gradient"
        );
    }
}

/// The padded positions hold the tokenizer's padding id.
fn ids_pad(e: &Expected, pad: u32) -> bool {
    e.ids
        .iter()
        .flatten()
        .zip(e.mask.iter().flatten())
        .all(|(&i, &m)| m > 0.0 || i == pad)
}

#[test]
fn every_family_exports_to_onnx_with_transformers_logits_and_saves_as_itself() {
    if !have_ort("ONNX parity of the model families") {
        return;
    }
    let lib = btu::steps::eval::find_ort_library(None).unwrap();
    let d = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let dir = fixture(family);
        let e = expected(&dir);
        let onnx = d.path().join(family).join("model.onnx");
        btu(["export-onnx", "--checkpoint", s(&dir), "--out", s(&onnx)]).ok();
        let mut clf = btu::steps::eval::OrtClassifier::load(&onnx, &lib, 64).unwrap();
        let texts: Vec<String> = BATCH.iter().map(|s| s.to_string()).collect();
        let logits = btu::steps::eval::Classifier::logits(&mut clf, &texts).unwrap();
        let dl = max_diff(&logits.concat(), &e.logits);
        eprintln!("{family}: ONNX logits within {dl:.2e}");
        assert!(dl < 1e-4, "{family}: ONNX logits differ by {dl}");

        // Written back (apply-masks with no mask rewrites the checkpoint): the family's own
        // tensor names and config keys, and the same logits.
        let copy = d.path().join(format!("{family}-copy"));
        write_back(&dir, &copy);
        let before = read_safetensors(&dir.join("model.safetensors")).unwrap();
        let after = read_safetensors(&copy.join("model.safetensors")).unwrap();
        let names = |f: &btu::model::checkpoint::SafetensorsFile| {
            f.tensors
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(names(&after), names(&before), "{family}: tensor names");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(copy.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], family);
        if family == "distilbert" {
            assert!(
                config["dim"].is_number() && config["hidden_size"].is_null(),
                "{config}"
            );
        }
        let (logits, _) = candle_logits_and_grad(&copy, &e);
        assert!(
            max_diff(&logits, &e.logits) < 1e-4,
            "{family}: written back"
        );
    }
}

/// Save `src`'s classifier into `dst` with btu's writer.
fn write_back(src: &Path, dst: &Path) {
    let ck = Checkpoint::read(src).unwrap();
    let model = ck.classifier(None, 0, &Device::Cpu).unwrap();
    std::fs::create_dir_all(dst).unwrap();
    btu::model::checkpoint::save_model(&model, dst, Default::default()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

/// A model type btu does not handle is refused with a clear error (65), before any work; so is
/// a decoder whose tokenizer has no padding token when its config names none to pad with.
#[test]
fn unsupported_model_types_and_decoders_without_padding_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let llama = d.path().join("llama");
    std::fs::create_dir_all(&llama).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("bert").join(f), llama.join(f)).unwrap();
    }
    std::fs::write(
        llama.join("config.json"),
        r#"{"model_type": "llama", "vocab_size": 165, "hidden_size": 32}"#,
    )
    .unwrap();
    let gpt2 = d.path().join("gpt2");
    std::fs::create_dir_all(&gpt2).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(fixture("gpt2").join(f), gpt2.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gpt2.join("config.json")).unwrap()).unwrap();
    for k in ["pad_token_id", "eos_token_id", "bos_token_id"] {
        config.as_object_mut().unwrap().remove(k);
    }
    std::fs::write(gpt2.join("config.json"), config.to_string()).unwrap();
    for (model, needle) in [
        (&llama, "model type 'llama' is not supported"),
        (&gpt2, "has neither pad_token_id nor eos_token_id"),
    ] {
        let out = d.path().join("detect");
        btu([
            "detect",
            "--corpus",
            s(&crate::fixtures::tiny().corpus),
            "--model",
            s(model),
        ])
        .args(["--out", s(&out)])
        .fails_with(65, needle)
        .and_no_output(&out);
    }
}

/// A tokenizer of another family's kind is refused (65) before any work: a RoBERTa model with
/// a WordPiece tokenizer, a DistilBERT with a byte-level BPE one.
#[test]
fn a_tokenizer_of_another_family_is_refused() {
    let d = tempfile::tempdir().unwrap();
    for (model, tokenizer, kind) in [
        ("roberta", "bert", "WordPiece"),
        ("distilbert", "roberta", "BPE"),
    ] {
        let dir = d.path().join(model);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture(model).join(f), dir.join(f)).unwrap();
        }
        std::fs::copy(
            fixture(tokenizer).join("tokenizer.json"),
            dir.join("tokenizer.json"),
        )
        .unwrap();
        let out = d.path().join(format!("detect-{model}"));
        btu([
            "detect",
            "--corpus",
            s(&crate::fixtures::tiny().corpus),
            "--model",
            s(&dir),
        ])
        .args(["--out", s(&out)])
        .fails_with(65, &format!("its tokenizer is {kind}"))
        .and_no_output(&out);
    }
}
