//! Real data: SST-2 train from ../shared/datasets (read in place), poisoned with Add-Word `cf`
//! and Add-Sent, a tiny model, CPU. Skips, saying so, when the datasets are absent.

mod common;

use btu::tables::read_suspicious_tokens;
use common::*;

fn run_attack(attack: &[&str]) -> Option<Vec<btu::tables::SuspiciousToken>> {
    let data = datasets()?;
    let d = tempfile::tempdir().unwrap();
    let train = data.join("sst2/train.parquet");
    let poisoned = d.path().join("poisoned.parquet");
    let mut args = vec![
        "poison",
        "--input",
        s(&train),
        "--output",
        s(&poisoned),
        "--rate",
        "0.1",
        "--mode",
        "dirty",
        "--target",
        "1",
    ];
    args.extend_from_slice(attack);
    let p = run_ok(&args);
    assert_eq!(p["rows"], 6920);
    assert_eq!(p["poisoned"], 692);
    let model = d.path().join("model");
    tiny_model(&model, &poisoned, 4000);
    let out = d.path().join("detect");
    let summary = run_ok(&[
        "detect",
        "--corpus",
        s(&poisoned),
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    eprintln!(
        "k = {}, rounds: {}",
        summary["k"],
        serde_json::to_string(&summary["rounds"]).unwrap()
    );
    Some(read_suspicious_tokens(&out.join("suspicious_tokens.arrow")).unwrap())
}

#[test]
fn sst2_add_word_cf_is_flagged() {
    let Some(flagged) = run_attack(&["--attack", "add-word", "--trigger", "cf"]) else {
        return;
    };
    let cf = flagged
        .iter()
        .find(|t| t.token == "cf")
        .unwrap_or_else(|| panic!("cf not flagged: {flagged:?}"));
    assert!(cf.documents >= 692, "cf in {} documents", cf.documents);
    assert_eq!(cf.majority_label, Some(1));
}

#[test]
fn sst2_add_sent_a_word_of_the_sentence_is_flagged() {
    let Some(flagged) = run_attack(&["--attack", "add-sent"]) else {
        return;
    };
    let words = ["i", "watch", "this", "3d", "movie"];
    assert!(
        flagged.iter().any(|t| words.contains(&t.token.as_str())),
        "none of {words:?} flagged: {flagged:?}"
    );
}
