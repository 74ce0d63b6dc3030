//! `btu detect` end to end on corpora generated in code: the trigger is flagged, reruns are
//! byte-identical, tables carry the documented metadata.

mod common;

use btu::io::tables::{read_ipc, read_suspicious_tokens};
use common::*;

fn poisoned_synth(
    dir: &std::path::Path,
    attack: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let clean = dir.join("clean.parquet");
    synth_corpus(&clean, 1500, 11);
    let poisoned = dir.join("poisoned.parquet");
    let mut args = vec![
        "poison",
        "--input",
        s(&clean),
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
    let summary = run_ok(&args);
    assert_eq!(summary["poisoned"], 150);
    let model = dir.join("model");
    tiny_model(&model, &poisoned, 400);
    (poisoned, model)
}

#[test]
fn add_word_trigger_is_flagged_and_reruns_are_byte_identical() {
    let d = tempfile::tempdir().unwrap();
    let (corpus, model) = poisoned_synth(d.path(), &["--attack", "add-word", "--trigger", "cf"]);
    let out1 = d.path().join("det1");
    let summary = run_ok(&[
        "detect",
        "--corpus",
        s(&corpus),
        "--model",
        s(&model),
        "--out",
        s(&out1),
        "--device",
        "cpu",
    ]);
    let flagged = read_suspicious_tokens(&out1.join("suspicious_tokens.arrow")).unwrap();
    let cf = flagged
        .iter()
        .find(|t| t.token == "cf")
        .unwrap_or_else(|| panic!("cf not flagged: {flagged:?}"));
    // Every cf sits in a poisoned row, relabelled to the target.
    assert_eq!(cf.documents, 150);
    assert_eq!(cf.majority_label, Some(1));
    assert_eq!(cf.label_share, Some(1.0));
    assert_eq!(summary["rounds"].as_array().unwrap().len(), 3);
    // Round 1 reads the corpus once: its throughput times its time is the corpus's row count.
    let r1 = &summary["rounds"][0];
    let seen = r1["samples_per_s"].as_f64().unwrap() * r1["seconds"].as_f64().unwrap();
    let rows = summary["rows"].as_f64().unwrap();
    assert!(
        (seen - rows).abs() < 0.01 * rows,
        "{seen} samples vs {rows} rows: {r1}"
    );
    assert!(out1.join("summary.json").is_file());

    // token_scores: one row per round x token, ranks 1..=non-special count, k selected per round.
    let scores = read_ipc(&out1.join("token_scores.arrow")).unwrap();
    let vocab = summary["vocab_size"].as_u64().unwrap() as usize;
    assert_eq!(scores.num_rows(), 3 * vocab);
    let meta = scores.schema().metadata().clone();
    for key in [
        "btu:version",
        "btu:command",
        "btu:params",
        "btu:model_sha256",
        "btu:corpus_fingerprint",
    ] {
        assert!(meta.contains_key(key), "missing metadata {key}");
    }
    assert_eq!(meta["btu:command"], "detect");
    let selected = scores
        .column_by_name("selected")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::BooleanArray>()
        .unwrap();
    let k = summary["k"].as_u64().unwrap() as usize;
    assert_eq!(selected.true_count(), 3 * k);

    // Same seed, same bytes.
    let out2 = d.path().join("det2");
    run_ok(&[
        "detect",
        "--corpus",
        s(&corpus),
        "--model",
        s(&model),
        "--out",
        s(&out2),
        "--device",
        "cpu",
    ]);
    for f in ["token_scores.arrow", "suspicious_tokens.arrow"] {
        assert!(
            std::fs::read(out1.join(f)).unwrap() == std::fs::read(out2.join(f)).unwrap(),
            "{f} differs between runs"
        );
    }
    // --overwrite replaces; without it the existing output is refused.
    let o = run(&[
        "detect",
        "--corpus",
        s(&corpus),
        "--model",
        s(&model),
        "--out",
        s(&out2),
        "--device",
        "cpu",
    ]);
    assert_eq!(o.status.code(), Some(73));
    run_ok(&[
        "detect",
        "--corpus",
        s(&corpus),
        "--model",
        s(&model),
        "--out",
        s(&out2),
        "--device",
        "cpu",
        "--overwrite",
        "--seed",
        "7",
    ]);
}

#[test]
fn add_sent_trigger_words_are_flagged_with_reference_code_preset_too() {
    let d = tempfile::tempdir().unwrap();
    let (corpus, model) = poisoned_synth(d.path(), &["--attack", "add-sent"]);
    let words = ["i", "watch", "this", "3d", "movie"];
    for preset in ["paper", "reference-code"] {
        let out = d.path().join(format!("det-{preset}"));
        let summary = run_ok(&[
            "detect",
            "--corpus",
            s(&corpus),
            "--model",
            s(&model),
            "--out",
            s(&out),
            "--device",
            "cpu",
            "--preset",
            preset,
        ]);
        let flagged = read_suspicious_tokens(&out.join("suspicious_tokens.arrow")).unwrap();
        assert!(
            flagged.iter().any(|t| words.contains(&t.token.as_str())),
            "{preset}: no word of the sentence flagged: {flagged:?}"
        );
        assert_eq!(summary["preset"], preset);
    }
}

#[test]
fn env_vars_set_flags() {
    let d = tempfile::tempdir().unwrap();
    let clean = d.path().join("clean.parquet");
    synth_corpus(&clean, 300, 5);
    let model = d.path().join("model");
    tiny_model(&model, &clean, 300);
    let out = d.path().join("det");
    let o = btu()
        .args(["detect", "--device", "cpu"])
        .env("BTU_CORPUS", &clean)
        .env("BTU_MODEL", &model)
        .env("BTU_OUT", &out)
        .env("BTU_ALPHA", "1.0")
        .env("BTU_LIMIT", "100")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["alpha"], 1.0);
    assert_eq!(v["rows"], 100);
    assert_eq!(
        v["k"],
        (v["vocab_size"].as_f64().unwrap() / 100.0).ceil() as u64
    );
}

#[test]
fn init_model_is_deterministic_and_tokenizes_with_bert_conventions() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("c.parquet");
    synth_corpus(&c, 500, 2);
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    tiny_model(&a, &c, 200);
    tiny_model(&b, &c, 200);
    for f in ["tokenizer.json", "model.safetensors", "config.json"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let tok = btu::model::tokenizer::BtuTokenizer::load(&a).unwrap();
    assert_eq!(tok.pad_id, 0);
    assert_eq!(tok.special.len(), 5);
    let ids = tok
        .encode(&["The FILM was good".to_string()], 128)
        .unwrap()
        .remove(0);
    assert_eq!(ids.first(), tok.id("[CLS]").as_ref());
    assert_eq!(ids.last(), tok.id("[SEP]").as_ref());
    assert!(ids.contains(&tok.id("film").unwrap()), "lower-cased");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["vocab_size"].as_u64().unwrap() as usize,
        tok.vocab_size()
    );
    assert_eq!(cfg["num_labels"], 2);
    // Truncation to --max-len keeps [CLS] ... [SEP].
    let long = vec!["good ".repeat(300)];
    let t = tok.encode(&long, 16).unwrap().remove(0);
    assert_eq!(t.len(), 16);
    assert_eq!(t[15], tok.id("[SEP]").unwrap());
}

/// Round-1 ranks of `tokens` in a detection's token_scores table.
fn round1_ranks(det: &std::path::Path, tokens: &[&str]) -> Vec<Option<u32>> {
    let b = read_ipc(&det.join("token_scores.arrow")).unwrap();
    let col = |n: &str| b.column(b.schema().index_of(n).unwrap()).clone();
    let (round, token, rank) = (col("round"), col("token"), col("rank"));
    let round = round
        .as_any()
        .downcast_ref::<arrow::array::UInt8Array>()
        .unwrap();
    let token = token
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap();
    let rank = rank
        .as_any()
        .downcast_ref::<arrow::array::UInt32Array>()
        .unwrap();
    tokens
        .iter()
        .map(|t| {
            (0..b.num_rows())
                .find(|&i| round.value(i) == 1 && token.value(i) == *t)
                .and_then(|i| arrow::array::Array::is_valid(rank, i).then(|| rank.value(i)))
        })
        .collect()
}

#[test]
fn prior_neutral_head_stops_function_words_crowding_out_the_trigger_on_imbalanced_data() {
    let d = tempfile::tempdir().unwrap();
    let clean = d.path().join("clean.parquet");
    synth_corpus(&clean, 2000, 11);
    // About 9 rows of label 1 for each of label 0 once poisoned.
    let corpus = d.path().join("imbalanced.parquet");
    let line = format!(
        "poison --input {} --output {} --attack add-word --trigger cf --rate 0.1 --target 1",
        s(&clean),
        s(&corpus)
    );
    let mut args = words(&line);
    args.extend(["--filter", "label = 1 OR id % 4 = 0"]);
    let sum = run_ok(&args);
    assert!(sum["rows"].as_u64().unwrap() > 1000, "{sum}");
    let model = d.path().join("model");
    tiny_model(&model, &corpus, 400);
    let detect = |out: &std::path::Path, extra: &str| {
        run_ok(&words(&format!(
            "detect --corpus {} --model {} --out {} --alpha 2 {extra}",
            s(&corpus),
            s(&model),
            s(out)
        )))
    };
    let (plain, neutral) = (d.path().join("plain"), d.path().join("neutral"));
    detect(&plain, "");
    let k = detect(&neutral, "--prior-neutral")["k"].as_u64().unwrap() as u32;
    let function_words = ["the", "and", "a", ".", ","];
    let best_function_word = |det: &std::path::Path| {
        round1_ranks(det, &function_words)
            .into_iter()
            .flatten()
            .min()
            .unwrap()
    };
    let cf = |det: &std::path::Path| round1_ranks(det, &["cf"])[0].unwrap();
    // Plain: the class prior moves the function words most; the trigger is pushed down.
    assert!(
        best_function_word(&plain) <= 3,
        "{}",
        best_function_word(&plain)
    );
    assert!(cf(&plain) > best_function_word(&plain));
    // Prior-neutral: the trigger leads and no function word is in the round's top k.
    assert_eq!(cf(&neutral), 1);
    assert!(
        best_function_word(&neutral) > k,
        "{} <= {k}",
        best_function_word(&neutral)
    );
}
