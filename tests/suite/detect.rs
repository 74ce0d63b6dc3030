//! `btu detect` end to end on corpora generated in code: the trigger is flagged, reruns are
//! byte-identical, tables carry the documented metadata.

use btu::io::tables::{read_ipc, read_suspicious_tokens};

use crate::fixtures::tiny;
use crate::util::*;

fn poisoned_synth(
    dir: &std::path::Path,
    attack: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let clean = dir.join("clean.parquet");
    synth_corpus(&clean, 1500, 11);
    let poisoned = dir.join("poisoned.parquet");
    let summary = btu!(
        "poison --input {} --output {} --rate 0.1 --mode dirty --target 1",
        s(&clean),
        s(&poisoned)
    )
    .args(attack)
    .ok();
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
    let detect = |out: &std::path::Path| {
        btu!(
            "detect --corpus {} --model {} --out {} --device cpu",
            s(&corpus),
            s(&model),
            s(out)
        )
    };
    let summary = detect(&out1).ok();
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
    // Rounds 1 and 2 read the whole corpus once (one epoch): one step per batch of 32 rows.
    let rows = summary["rows"].as_u64().unwrap();
    assert_eq!(rows, 1500);
    for r in &summary["rounds"].as_array().unwrap()[..2] {
        assert_eq!(r["batch_size"], 32, "{r}");
        assert_eq!(r["steps"].as_u64(), Some(rows.div_ceil(32)), "{r}");
    }
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
    detect(&out2).ok();
    for f in ["token_scores.arrow", "suspicious_tokens.arrow"] {
        assert!(
            std::fs::read(out1.join(f)).unwrap() == std::fs::read(out2.join(f)).unwrap(),
            "{f} differs between runs"
        );
    }
    // --overwrite replaces; without it the existing output is refused.
    detect(&out2).fails_with(73, "--overwrite");
    let before = std::fs::read(out2.join("token_scores.arrow")).unwrap();
    let seed7 = detect(&out2).args(["--overwrite", "--seed", "7"]).ok();
    assert_eq!(seed7["out"], s(&out2));
    assert!(
        std::fs::read(out2.join("token_scores.arrow")).unwrap() != before,
        "--overwrite with another seed replaced the scores"
    );
}

#[test]
fn add_sent_trigger_words_are_flagged_with_reference_code_preset_too() {
    let d = tempfile::tempdir().unwrap();
    let (corpus, model) = poisoned_synth(d.path(), &["--attack", "add-sent"]);
    let words = ["i", "watch", "this", "3d", "movie"];
    for preset in ["paper", "reference-code"] {
        let out = d.path().join(format!("det-{preset}"));
        let summary = btu!(
            "detect --corpus {} --model {} --out {} --device cpu --preset {preset}",
            s(&corpus),
            s(&model),
            s(&out)
        )
        .ok();
        let flagged = read_suspicious_tokens(&out.join("suspicious_tokens.arrow")).unwrap();
        assert!(
            flagged.iter().any(|t| words.contains(&t.token.as_str())),
            "{preset}: no word of the sentence flagged: {flagged:?}"
        );
        assert_eq!(summary["preset"], preset);
    }
}

/// `--log info` shows where the time goes: the command's span and each round's close with
/// their wall time, on stderr (stdout stays the summary JSON).
#[test]
fn log_info_reports_each_rounds_wall_time() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("det");
    let o = btu!(
        "--log info detect --corpus {} --model {} --out {} --device cpu",
        s(&tiny().corpus),
        s(&tiny().model),
        s(&out)
    )
    .success();
    let err = lossy(&o.stderr);
    for n in 1..=3 {
        let round = err
            .lines()
            .find(|l| l.contains(&format!("round{{n={n}}}")) && l.contains("close"))
            .unwrap_or_else(|| panic!("no close of round {n}: {err}"));
        assert!(round.contains("time.busy"), "{round}");
    }
    assert!(
        err.lines()
            .any(|l| l.contains("btu{command=\"detect\"}") && l.contains("close")),
        "{err}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    assert_eq!(summary["command"], "detect");
}

#[test]
fn env_vars_set_flags() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("det");
    let v = btu(["detect", "--device", "cpu"])
        .env("BTU_CORPUS", &tiny().corpus)
        .env("BTU_MODEL", &tiny().model)
        .env("BTU_OUT", &out)
        .env("BTU_ALPHA", "1.0")
        .env("BTU_LIMIT", "100")
        .ok();
    assert_eq!(v["out"], s(&out));
    assert!(out.join("suspicious_tokens.arrow").is_file());
    assert_eq!(v["alpha"], 1.0);
    assert_eq!(v["rows"], 100);
    assert_eq!(
        v["k"],
        (v["vocab_size"].as_f64().unwrap() / 100.0).ceil() as u64
    );
}

#[test]
fn init_model_is_deterministic_and_tokenizes_with_bert_conventions() {
    // A second build of the shared tiny model (built from the same corpus, flags and seed).
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), &tiny().model);
    tiny_model(&a, &tiny().corpus, 300);
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
    let sum = btu!(
        "poison --input {} --output {} --attack add-word --trigger cf --rate 0.1 --target 1",
        s(&clean),
        s(&corpus)
    )
    .args(["--filter", "label = 1 OR id % 4 = 0"])
    .ok();
    assert!(sum["rows"].as_u64().unwrap() > 1000, "{sum}");
    let model = d.path().join("model");
    tiny_model(&model, &corpus, 400);
    let detect = |out: &std::path::Path, extra: &str| {
        btu!(
            "detect --corpus {} --model {} --out {} --alpha 2 {extra}",
            s(&corpus),
            s(&model),
            s(out)
        )
        .ok()
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

/// `--precision bf16` (mixed precision) finds the trigger as f32 does and records itself in the
/// tables' provenance, while f32 leaves the provenance as it was (no `precision` key, so earlier
/// runs' hashes hold); `btu train --precision bf16` trains f32 weights; tf32 needs CUDA.
#[test]
fn bf16_precision_flags_the_trigger_and_tf32_needs_cuda() {
    let d = tempfile::tempdir().unwrap();
    let (corpus, model) = poisoned_synth(d.path(), &["--attack", "add-word", "--trigger", "cf"]);
    let run = |p: &str| {
        let out = d.path().join(format!("det-{p}"));
        let v = btu!(
            "detect --corpus {} --model {} --out {} --device cpu --precision {p}",
            s(&corpus),
            s(&model),
            s(&out)
        )
        .ok();
        (out, v)
    };
    let (f32_out, f32_sum) = run("f32");
    let (bf_out, bf_sum) = run("bf16");
    let round1 = |v: &serde_json::Value| v["rounds"][0]["selected"][0].clone();
    assert_eq!(round1(&f32_sum), "cf", "{f32_sum}");
    assert_eq!(round1(&bf_sum), "cf", "{bf_sum}");
    let params = |out: &std::path::Path| {
        let t = read_ipc(&out.join("suspicious_tokens.arrow")).unwrap();
        t.schema().metadata()["btu:params"].clone()
    };
    assert!(
        !params(&f32_out).contains("precision"),
        "{}",
        params(&f32_out)
    );
    assert!(
        params(&bf_out).contains("\"precision\":\"bf16\""),
        "{}",
        params(&bf_out)
    );

    let victim = d.path().join("victim");
    btu!(
        "train --corpus {} --model {} --out {} --epochs 1 --lr 1e-3 --device cpu --precision bf16",
        s(&corpus),
        s(&model),
        s(&victim)
    )
    .ok();
    let w =
        candle_core::safetensors::load(victim.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(w.len() > 10);
    for (name, t) in &w {
        assert_eq!(
            t.dtype(),
            candle_core::DType::F32,
            "{name}: trained weights are saved in f32"
        );
        let finite = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(finite.iter().all(|x| x.is_finite()), "{name}");
    }

    let tf32 = d.path().join("det-tf32");
    btu!(
        "detect --corpus {} --model {} --out {} --device cpu --precision tf32",
        s(&corpus),
        s(&model),
        s(&tf32)
    )
    .fails_with(78, "--precision")
    .and_no_output(&tf32);
}
