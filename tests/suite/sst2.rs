//! Real data: SST-2 from ../shared/datasets (read in place), poisoned with Add-Word `cf` and
//! Add-Sent, a tiny model, CPU. Skips, saying so, when the datasets are absent.

use std::path::{Path, PathBuf};

use btu::io::tables::{read_suspicious_tokens, SuspiciousToken};

use crate::util::*;

struct Run {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    poisoned: PathBuf,
    model: PathBuf,
    flagged: Vec<SuspiciousToken>,
}

fn detect_attack(attack: &[&str]) -> Option<Run> {
    let data = datasets()?;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let train = data.join("sst2/train.parquet");
    let poisoned = root.join("poisoned.parquet");
    let p = btu!(
        "poison --input {} --output {} --rate 0.1 --mode dirty --target 1",
        s(&train),
        s(&poisoned)
    )
    .args(attack)
    .ok();
    assert_eq!(p["rows"], 6920);
    assert_eq!(p["poisoned"], 692);
    let model = root.join("model");
    tiny_model(&model, &poisoned, 4000);
    let out = root.join("detect");
    let summary = btu([
        "detect",
        "--corpus",
        s(&poisoned),
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ])
    .ok();
    eprintln!(
        "k = {}, rounds: {}",
        summary["k"],
        serde_json::to_string(&summary["rounds"]).unwrap()
    );
    let flagged = read_suspicious_tokens(&out.join("suspicious_tokens.arrow")).unwrap();
    Some(Run {
        _dir: dir,
        root,
        data,
        poisoned,
        model,
        flagged,
    })
}

/// (ASR on triggered dev, share of clean non-target dev rows predicted as the target).
fn asr_and_fpr(model: &Path, dev: &Path, out: &Path) -> (f64, f64) {
    let m = btu([
        "eval",
        "--model",
        s(model),
        "--test",
        s(dev),
        "--out",
        s(out),
        "--attack",
        "add-word",
        "--trigger",
        "cf",
        "--target",
        "1",
        "--device",
        "cpu",
    ])
    .ok();
    (
        m["asr"].as_f64().unwrap(),
        m["clean_false_positive_rate"].as_f64().unwrap(),
    )
}

#[test]
fn sst2_add_word_cf_is_flagged_and_unlearning_shrinks_the_backdoor() {
    let Some(r) = detect_attack(&["--attack", "add-word", "--trigger", "cf"]) else {
        return;
    };
    let cf = r
        .flagged
        .iter()
        .find(|t| t.token == "cf")
        .unwrap_or_else(|| panic!("cf not flagged: {:?}", r.flagged));
    assert!(cf.documents >= 692, "cf in {} documents", cf.documents);
    assert_eq!(cf.majority_label, Some(1));

    // Audit the corpus with the detected tokens: the poisoned rows are found.
    let flagged = r.root.join("flagged_rows.parquet");
    let scan = btu([
        "scan",
        "--corpus",
        s(&r.poisoned),
        "--suspicious",
        s(&r.root.join("detect/suspicious_tokens.arrow")),
        "--tokenizer",
        s(&r.model),
        "--out",
        s(&flagged),
    ])
    .ok();
    eprintln!("scan: {}", scan["poisoned"]);
    assert!(
        scan["poisoned"]["recall"].as_f64().unwrap() >= 0.95,
        "{}",
        scan["poisoned"]
    );
    let rows = btu(["sql", "--format", "json", "--table", &format!("flagged_rows={}", flagged.display()), "--table", &format!("suspicious_tokens={}", r.root.join("detect/suspicious_tokens.arrow").display())])
        .arg("SELECT t.token, COUNT(*) AS rows FROM flagged_rows f JOIN suspicious_tokens t ON array_has(f.token_ids, t.token_id) WHERE t.token = 'cf' GROUP BY t.token")
        .ok();
    assert_eq!(rows[0]["rows"], 692);

    // Victim: full fine-tune on the poisoned corpus, epoch chosen on dev.
    let dev = r.data.join("sst2/dev.parquet");
    let ckpt = r.root.join("victim");
    btu([
        "train",
        "--corpus",
        s(&r.poisoned),
        "--dev",
        s(&dev),
        "--model",
        s(&r.model),
        "--out",
        s(&ckpt),
        "--epochs",
        "3",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
    ])
    .ok();
    let (asr_b, fpr_b) = asr_and_fpr(&ckpt, &dev, &r.root.join("eval-victim"));
    eprintln!("victim: ASR {asr_b:.4}, clean false-positive rate {fpr_b:.4}");
    assert!(
        asr_b - fpr_b > 0.4,
        "the backdoor was learned: ASR {asr_b} vs FPR {fpr_b}"
    );

    // The deployed form: ONNX through ONNX Runtime gives the same ACC and ASR on the test split.
    let test = r.data.join("sst2/test.parquet");
    let onnx = r.root.join("onnx/victim.onnx");
    btu(["export-onnx", "--checkpoint", s(&ckpt), "--out", s(&onnx)]).ok();
    let via_ort = btu([
        "eval",
        "--model",
        s(&onnx),
        "--test",
        s(&test),
        "--out",
        s(&r.root.join("eval-ort")),
        "--attack",
        "add-word",
        "--trigger",
        "cf",
        "--target",
        "1",
    ])
    .ok();
    let via_candle = btu([
        "eval",
        "--model",
        s(&ckpt),
        "--test",
        s(&test),
        "--out",
        s(&r.root.join("eval-candle")),
        "--attack",
        "add-word",
        "--trigger",
        "cf",
        "--target",
        "1",
        "--device",
        "cpu",
    ])
    .ok();
    eprintln!(
        "victim on test via ort: ACC {} ASR {} (clean FPR {})",
        via_ort["acc"], via_ort["asr"], via_ort["clean_false_positive_rate"]
    );
    assert_eq!(via_ort["backend"], "ort");
    assert_eq!(
        (&via_ort["acc"], &via_ort["asr"]),
        (&via_candle["acc"], &via_candle["asr"])
    );
    assert!(
        via_ort["asr"].as_f64().unwrap()
            > via_ort["clean_false_positive_rate"].as_f64().unwrap() + 0.4
    );

    let fixed = r.root.join("unlearned");
    let u = btu([
        "unlearn",
        "--checkpoint",
        s(&ckpt),
        "--reference",
        s(&r.model),
        "--suspicious",
        s(&r.root.join("detect/suspicious_tokens.arrow")),
        "--out",
        s(&fixed),
    ])
    .ok();
    let (asr_a, fpr_a) = asr_and_fpr(&fixed, &dev, &r.root.join("eval-unlearned"));
    eprintln!(
        "unlearned ({} dims): ASR {asr_a:.4}, FPR {fpr_a:.4}",
        u["dimensions_replaced"]
    );
    assert!(
        (asr_a - fpr_a) < (asr_b - fpr_b) - 0.2,
        "gap {} -> {}",
        asr_b - fpr_b,
        asr_a - fpr_a
    );
}

#[test]
fn sst2_add_sent_a_word_of_the_sentence_is_flagged() {
    let Some(r) = detect_attack(&["--attack", "add-sent"]) else {
        return;
    };
    let words = ["i", "watch", "this", "3d", "movie"];
    assert!(
        r.flagged.iter().any(|t| words.contains(&t.token.as_str())),
        "none of {words:?} flagged: {:?}",
        r.flagged
    );
}

/// A random-init RoBERTa and GPT-2 (byte-level BPE vocabularies trained by init-model) and
/// DistilBERT flag the Add-Word trigger on SST-2 as BERT does (`sst2_add_word_cf_is_flagged...`):
/// `Ġcf` (the trigger after a space, as byte-level BPE writes it) and `cf`.
#[test]
fn every_model_family_flags_cf_on_sst2() {
    let Some(data) = datasets() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let poisoned = d.path().join("poisoned.parquet");
    btu!(
        "poison --input {} --output {} --rate 0.1 --mode dirty --target 1 --attack add-word",
        s(&data.join("sst2/train.parquet")),
        s(&poisoned)
    )
    .ok();
    for (arch, vocab, trigger) in [
        ("roberta", 8000, "\u{120}cf"),
        ("distilbert", 4000, "cf"),
        ("gpt2", 8000, "\u{120}cf"),
    ] {
        let model = d.path().join(arch);
        btu!(
            "init-model --arch {arch} --out {} --corpus {} --vocab-size {vocab} --layers 1 \
             --hidden 32 --heads 2 --intermediate 64 --max-position 256",
            s(&model),
            s(&poisoned)
        )
        .ok();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], arch);
        let out = d.path().join(format!("detect-{arch}"));
        btu!(
            "detect --corpus {} --model {} --out {} --device cpu",
            s(&poisoned),
            s(&model),
            s(&out)
        )
        .ok();
        let flagged = read_suspicious_tokens(&out.join("suspicious_tokens.arrow")).unwrap();
        let tokens: Vec<&str> = flagged.iter().map(|t| t.token.as_str()).collect();
        eprintln!("{arch}: flagged {tokens:?}");
        let cf = flagged.iter().find(|t| t.token == trigger);
        assert!(cf.is_some(), "{arch}: {trigger} not flagged: {tokens:?}");
    }
}
