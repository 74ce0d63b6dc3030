//! `btu train`, `btu unlearn`, `btu apply-masks` on a synthetic corpus: byte-identity of
//! untouched tensors, mask tables, resume after SIGKILL, and the documented errors.

use std::path::Path;

use btu::model::checkpoint::{read_safetensors, safetensors_bytes, RawTensor};

use crate::fixtures::trained as fixture;
use crate::util::*;

fn word(t: &std::collections::BTreeMap<String, RawTensor>) -> String {
    t.keys()
        .find(|k| k.ends_with("embeddings.word_embeddings.weight"))
        .unwrap()
        .clone()
}

#[test]
fn unlearn_changes_only_word_embeddings_and_apply_masks_replays_it() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The trigger's embedding repaired with the released code's threshold, into `out`.
    let unlearn = |out: &std::path::Path| {
        btu([
            "unlearn",
            "--checkpoint",
            s(&f.ckpt),
            "--reference",
            s(&f.model),
            "--suspicious",
            s(&f.detect.join("suspicious_tokens.arrow")),
            "--out",
            s(out),
            "--threshold",
            "frobenius",
        ])
        .ok()
    };
    let out = root.join("unlearned-a");
    let sum = unlearn(&out);
    assert!(sum["dimensions_replaced"].as_u64().unwrap() > 0, "{sum}");
    let before = read_safetensors(&f.ckpt.join("model.safetensors")).unwrap();
    let after = read_safetensors(&out.join("model.safetensors")).unwrap();
    let w = word(&before.tensors);
    assert_eq!(
        before.tensors.keys().collect::<Vec<_>>(),
        after.tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &before.tensors {
        if name == &w {
            assert!(
                t.data != after.tensors[name].data,
                "word embeddings repaired"
            );
        } else {
            assert!(t == &after.tensors[name], "{name} must be byte-identical");
        }
    }
    assert_eq!(
        std::fs::read(f.ckpt.join("config.json")).unwrap(),
        std::fs::read(out.join("config.json")).unwrap()
    );
    assert!(out.join("tokenizer.json").is_file());
    // The mask table: one row per replaced dimension, with the documented metadata.
    let masks = btu::io::tables::read_ipc(&out.join("dimension_masks.arrow")).unwrap();
    assert_eq!(
        masks.num_rows() as u64,
        sum["dimensions_replaced"].as_u64().unwrap()
    );
    let meta = masks.schema().metadata().clone();
    assert_eq!(meta["btu:threshold_rule"], "frobenius");
    assert_eq!(meta["btu:replacement"], "trained-pad");
    assert_eq!(meta["btu:pad_token_id"], "0");
    // Every metadata key the committed schema documents is written.
    let (_, _, keys) = btu::io::tables::all_schemas()
        .into_iter()
        .find(|t| t.0 == "dimension_masks")
        .unwrap();
    for k in keys {
        assert!(
            meta.contains_key(k),
            "{k} missing from dimension_masks: {meta:?}"
        );
    }
    assert!(
        (meta["btu:threshold"].parse::<f64>().unwrap() - sum["threshold"].as_f64().unwrap()).abs()
            < 1e-12
    );
    // Replaying the masks onto the trained checkpoint gives the same word embeddings.
    let replay = root.join("replayed");
    btu([
        "apply-masks",
        "--checkpoint",
        s(&f.ckpt),
        "--masks",
        s(&out.join("dimension_masks.arrow")),
        "--out",
        s(&replay),
    ])
    .ok();
    let r = read_safetensors(&replay.join("model.safetensors")).unwrap();
    for (name, t) in &after.tensors {
        assert!(t == &r.tensors[name], "{name}");
    }
    // Unlearning is deterministic: same inputs, same tensors and table bytes.
    let again = root.join("unlearned-b");
    unlearn(&again);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("dimension_masks.arrow")).unwrap(),
        std::fs::read(again.join("dimension_masks.arrow")).unwrap()
    );
}

#[test]
fn clean_tuning_refuses_overlap_with_the_evaluation_split_and_runs_otherwise() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let sus = f.detect.join("suspicious_tokens.arrow");
    let out = root.join("tuned-overlap");
    btu([
        "unlearn",
        "--checkpoint",
        s(&f.ckpt),
        "--reference",
        s(&f.model),
        "--suspicious",
        s(&sus),
        "--out",
        s(&out),
        "--clean-corpus",
        s(&f.corpus),
        "--eval-split",
        s(&f.corpus),
        "--device",
        "cpu",
    ])
    .fails_with(78, "evaluation split")
    .and_no_output(&out);
    let clean = root.join("heldout.parquet");
    synth_corpus(&clean, 200, 99);
    let out = root.join("tuned");
    let sum = btu([
        "unlearn",
        "--checkpoint",
        s(&f.ckpt),
        "--reference",
        s(&f.model),
        "--suspicious",
        s(&sus),
        "--out",
        s(&out),
        "--clean-corpus",
        s(&clean),
        "--eval-split",
        s(&f.corpus),
        "--clean-epochs",
        "1",
        "--clean-lr",
        "1e-4",
        "--device",
        "cpu",
    ])
    .ok();
    assert_eq!(sum["clean_tuning"]["rows"], 200);
    let cut = root.join("cut-only");
    btu([
        "unlearn",
        "--checkpoint",
        s(&f.ckpt),
        "--reference",
        s(&f.model),
        "--suspicious",
        s(&sus),
        "--out",
        s(&cut),
    ])
    .ok();
    let a = read_safetensors(&out.join("model.safetensors")).unwrap();
    let b = read_safetensors(&cut.join("model.safetensors")).unwrap();
    assert!(
        a.tensors
            .keys()
            .any(|k| a.tensors[k].data != b.tensors[k].data),
        "clean tuning changed the weights"
    );
}

#[test]
fn mismatched_models_corrupt_files_and_nan_weights_are_refused() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let sus = f.detect.join("suspicious_tokens.arrow");
    let out = root.join("never");
    // A reference with another vocabulary.
    let other_vocab = root.join("ref-vocab");
    tiny_model(&other_vocab, &f.corpus, 150);
    btu([
        "unlearn",
        "--checkpoint",
        s(&f.ckpt),
        "--reference",
        s(&other_vocab),
        "--suspicious",
        s(&sus),
        "--out",
        s(&out),
    ])
    .fails_with(65, "vocabulary")
    .and_no_output(&out);
    // A reference with another hidden size.
    let other_hidden = root.join("ref-hidden");
    btu([
        "init-model",
        "--out",
        s(&other_hidden),
        "--corpus",
        s(&f.corpus),
        "--vocab-size",
        "400",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--intermediate",
        "32",
    ])
    .ok();
    btu([
        "unlearn",
        "--checkpoint",
        s(&f.ckpt),
        "--reference",
        s(&other_hidden),
        "--suspicious",
        s(&sus),
        "--out",
        s(&out),
    ])
    .fails_with(65, "hidden size")
    .and_no_output(&out);
    // Masks onto a checkpoint with another vocabulary.
    let unl = root.join("for-masks");
    btu([
        "unlearn",
        "--checkpoint",
        s(&f.ckpt),
        "--reference",
        s(&f.model),
        "--suspicious",
        s(&sus),
        "--out",
        s(&unl),
    ])
    .ok();
    btu([
        "apply-masks",
        "--checkpoint",
        s(&other_vocab),
        "--masks",
        s(&unl.join("dimension_masks.arrow")),
        "--out",
        s(&out),
    ])
    .fails_with(65, "vocabular")
    .and_no_output(&out);
    btu([
        "apply-masks",
        "--checkpoint",
        s(&other_hidden),
        "--masks",
        s(&unl.join("dimension_masks.arrow")),
        "--out",
        s(&out),
    ])
    .fails_with(65, "hidden size")
    .and_no_output(&out);
    // Corrupt safetensors.
    let corrupt = root.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    for n in ["config.json", "tokenizer.json"] {
        std::fs::copy(f.ckpt.join(n), corrupt.join(n)).unwrap();
    }
    let bytes = std::fs::read(f.ckpt.join("model.safetensors")).unwrap();
    std::fs::write(corrupt.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    btu([
        "unlearn",
        "--checkpoint",
        s(&corrupt),
        "--reference",
        s(&f.model),
        "--suspicious",
        s(&sus),
        "--out",
        s(&out),
    ])
    .fails_with(65, "corrupt safetensors")
    .and_no_output(&out);
    // NaN in the word embeddings.
    let nan = root.join("nan");
    std::fs::create_dir_all(&nan).unwrap();
    for n in ["config.json", "tokenizer.json"] {
        std::fs::copy(f.ckpt.join(n), nan.join(n)).unwrap();
    }
    let mut file = read_safetensors(&f.ckpt.join("model.safetensors")).unwrap();
    let w = word(&file.tensors);
    file.tensors.get_mut(&w).unwrap().data[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(nan.join("model.safetensors"), safetensors_bytes(&file)).unwrap();
    btu([
        "unlearn",
        "--checkpoint",
        s(&nan),
        "--reference",
        s(&f.model),
        "--suspicious",
        s(&sus),
        "--out",
        s(&out),
    ])
    .fails_with(65, "NaN")
    .and_no_output(&out);
    btu([
        "eval",
        "--model",
        s(&nan),
        "--test",
        s(&f.corpus),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ])
    .fails_with(65, "NaN")
    .and_no_output(&out);
}

#[test]
fn train_resumes_after_sigkill_with_identical_result() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let big = root.join("big.parquet");
    synth_corpus(&big, 4000, 5);
    let train = |out: &Path| {
        btu([
            "train",
            "--corpus",
            s(&big),
            "--model",
            s(&f.model),
            "--out",
            s(out),
            "--epochs",
            "4",
            "--lr",
            "1e-3",
            "--device",
            "cpu",
        ])
    };
    let straight = root.join("straight");
    train(&straight).ok();
    let killed = root.join("killed");
    let mut child = train(&killed).spawn();
    let t0 = std::time::Instant::now();
    while !partial_dir(root, "killed").is_some_and(|p| p.join("epoch-0/epoch.json").exists()) {
        assert!(t0.elapsed().as_secs() < 120, "first epoch never completed");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.exists(),
        "a killed run leaves no checkpoint that looks complete"
    );
    let sum = train(&killed).ok();
    let resumed = sum["resumed_from_epoch"]
        .as_u64()
        .expect("the rerun resumed");
    assert!((2..=4).contains(&resumed), "{sum}");
    assert!(
        std::fs::read(straight.join("model.safetensors")).unwrap()
            == std::fs::read(killed.join("model.safetensors")).unwrap(),
        "resumed run ends with the same bytes"
    );
    assert!(
        partial_dir(root, "killed").is_none(),
        "partial state removed after success"
    );
}

/// A suspicious_tokens table naming `tokens` (by the model's vocabulary), majority label 1.
fn candidates(path: &Path, model: &Path, tokens: &[&str]) {
    let tok = btu::model::tokenizer::BtuTokenizer::load(model).unwrap();
    let rows: Vec<btu::io::tables::SuspiciousToken> = tokens
        .iter()
        .map(|t| btu::io::tables::SuspiciousToken {
            token_id: tok
                .inner()
                .token_to_id(t)
                .unwrap_or_else(|| panic!("{t} in vocabulary")),
            token: t.to_string(),
            rounds: vec![1],
            best_rank: 1,
            max_distance: 1.0,
            occurrences: 1,
            documents: 1,
            majority_label: Some(1),
            label_share: Some(1.0),
        })
        .collect();
    let meta = btu::io::tables::TableMeta {
        command: "detect".into(),
        params: serde_json::json!({}),
        model_sha256: String::new(),
        corpus_fingerprint: None,
        extra: vec![],
    };
    let b = btu::io::tables::suspicious_tokens_batch(&rows, &meta).unwrap();
    btu::io::tables::write_ipc(path, &b, true).unwrap();
}

#[test]
fn verify_keeps_the_trigger_rejects_a_frequent_clean_word_and_unlearn_and_scan_use_it() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let d = root.join("verify");
    std::fs::create_dir_all(&d).unwrap();
    let held_out = d.join("held-out.parquet");
    synth_corpus(&held_out, 600, 99);
    let sus = d.join("candidates.arrow");
    candidates(&sus, &f.model, &["cf", "the"]);
    let verify = |out: &Path| {
        btu!(
            "verify --checkpoint {} --suspicious {} --clean-corpus {} --out {} --rows 150",
            s(&f.ckpt),
            s(&sus),
            s(&held_out),
            s(out)
        )
        .ok()
    };
    let (v1, v2) = (d.join("v1"), d.join("v2"));
    let sum = verify(&v1);
    verify(&v2);
    // To an object store: the same table, uploaded once complete.
    if let Some(moto) = Moto::start("lake") {
        moto.btu([
            "verify",
            "--checkpoint",
            s(&f.ckpt),
            "--suspicious",
            s(&sus),
        ])
        .args(["--clean-corpus", s(&held_out), "--rows", "150"])
        .args(["--out", "s3://lake/verify"])
        .success();
        assert_eq!(
            moto.get("verify/token_effects.arrow"),
            std::fs::read(v1.join("token_effects.arrow")).unwrap()
        );
        assert!(moto
            .keys("verify/")
            .contains(&"verify/_SUCCESS".to_string()));
    }
    assert_eq!(sum["verified"], serde_json::json!(["cf"]), "{sum}");
    let effects = btu::io::tables::read_token_effects(&v1.join("token_effects.arrow")).unwrap();
    let (cf, the) = (&effects[0], &effects[1]);
    assert_eq!(
        (cf.candidate.as_str(), the.candidate.as_str()),
        ("cf", "the")
    );
    assert!(
        cf.rows == 150 && cf.flip_rate > 0.8 && cf.ci_low >= 0.5,
        "{cf:?}"
    );
    assert!(!the.verified && the.flip_rate < 0.3, "{the:?}");
    // A candidate that cannot pass stops after the screen's rows; the trigger is tried on all.
    assert_eq!(
        the.rows as usize,
        btu::steps::verify::SCREEN_ROWS,
        "{the:?}"
    );
    // The control (other clean words at the same places) flips few rows; the trigger's own
    // effect beyond it is large. A candidate below the verification bound has no control.
    let ctl = cf.control_flip_rate().expect("cf's control is measured");
    assert!(ctl < 0.3 && cf.excess_ci_low.unwrap() > 0.5, "{cf:?}");
    assert_eq!(
        (the.control_flips, the.excess_ci_low),
        (None, None),
        "{the:?}"
    );
    let table = |p: &Path| std::fs::read(p.join("token_effects.arrow")).unwrap();
    assert_eq!(table(&v1), table(&v2), "reruns give the same bytes");
    // Unlearn repairs the verified trigger only, its whole row.
    let out = d.join("repaired");
    let u = btu!(
        "unlearn --checkpoint {} --reference {} --suspicious {} --effects {} --out {}",
        s(&f.ckpt),
        s(&f.model),
        s(&sus),
        s(&v1.join("token_effects.arrow")),
        s(&out)
    )
    .ok();
    assert_eq!(
        (u["tokens"].as_u64(), u["repaired"].as_bool()),
        (Some(1), Some(true)),
        "{u}"
    );
    assert_eq!(u["dimensions_replaced"], u["hidden_size"], "{u}");
    // --unverified reference-row also gives `the` (not verified) its pre-trained row back; the
    // trigger's row is the same as without the option.
    let gentle = d.join("repaired-gentle");
    btu!(
        "unlearn --checkpoint {} --reference {} --suspicious {} --effects {} --out {} --unverified reference-row",
        s(&f.ckpt),
        s(&f.model),
        s(&sus),
        s(&v1.join("token_effects.arrow")),
        s(&gentle)
    ).ok();
    let rows = |dir: &Path, id: u32| {
        let t = read_safetensors(&dir.join("model.safetensors")).unwrap();
        let w = &t.tensors[&word(&t.tensors)];
        let h = w.shape[1];
        let f: Vec<f32> = w
            .data
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        f[id as usize * h..(id as usize + 1) * h].to_vec()
    };
    let tok = btu::model::tokenizer::BtuTokenizer::load(&f.model).unwrap();
    let (cf_id, the_id) = (tok.id("cf").unwrap(), tok.id("the").unwrap());
    assert_eq!(
        rows(&gentle, the_id),
        rows(&f.model, the_id),
        "the: reference row"
    );
    assert_ne!(
        rows(&f.ckpt, the_id),
        rows(&f.model, the_id),
        "the moved in training"
    );
    assert_eq!(
        rows(&gentle, cf_id),
        rows(&out, cf_id),
        "cf: repaired as before"
    );
    assert_eq!(
        rows(&out, the_id),
        rows(&f.ckpt, the_id),
        "keep (default) leaves the"
    );
    // The repaired model no longer flips on the trigger.
    let re = btu!(
        "verify --checkpoint {} --recheck {} --clean-corpus {} --out {} --rows 150",
        s(&out),
        s(&v1.join("token_effects.arrow")),
        s(&held_out),
        s(&d.join("recheck"))
    )
    .ok();
    assert_eq!(
        re["candidates"], 1,
        "only the verified trigger is rechecked: {re}"
    );
    assert_eq!(re["trigger_found"], false, "{re}");
    let after =
        btu::io::tables::read_token_effects(&d.join("recheck/token_effects.arrow")).unwrap();
    assert!(after[0].flip_rate < 0.2, "{:?}", after[0]);
    // Scan flags the rows of the verified trigger only: every flagged row was poisoned.
    let scan = btu!(
        "scan --corpus {} --suspicious {} --effects {} --tokenizer {} --out {}",
        s(&f.corpus),
        s(&sus),
        s(&v1.join("token_effects.arrow")),
        s(&f.model),
        s(&d.join("flagged.parquet"))
    )
    .ok();
    assert_eq!(scan["poisoned"]["precision"].as_f64(), Some(1.0), "{scan}");
    assert_eq!(scan["poisoned"]["recall"].as_f64(), Some(1.0), "{scan}");
}

#[test]
fn verify_builds_the_add_sent_phrase_from_the_corpus_and_verifies_it() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    synth_corpus(&p("clean.parquet"), 1500, 5);
    synth_corpus(&p("held-out.parquet"), 400, 6);
    let (c, m) = (p("poisoned.parquet"), p("model"));
    btu!(
        "poison --input {} --output {} --attack add-sent --rate 0.1 --target 1",
        s(&p("clean.parquet")),
        s(&c)
    )
    .ok();
    tiny_model(&m, &c, 400);
    let (det, victim, ver) = (p("detect"), p("victim"), p("verify"));
    let (cs, ms) = (s(&c), s(&m));
    btu!(
        "detect --corpus {cs} --model {ms} --out {} --alpha 2",
        s(&det)
    )
    .ok();
    btu!(
        "train --corpus {cs} --model {ms} --out {} --epochs 2 --lr 1e-3",
        s(&victim)
    )
    .ok();
    let sum = btu!(
        "verify --checkpoint {} --suspicious {} --clean-corpus {} --corpus {cs} --out {}",
        s(&victim),
        s(&det.join("suspicious_tokens.arrow")),
        s(&p("held-out.parquet")),
        s(&ver)
    )
    .ok();
    let effects = btu::io::tables::read_token_effects(&ver.join("token_effects.arrow")).unwrap();
    let phrase = effects
        .iter()
        .find(|e| e.candidate == "i watch this 3d movie")
        .unwrap_or_else(|| panic!("no phrase candidate: {sum}"));
    assert!(phrase.verified && phrase.flip_rate > 0.9, "{phrase:?}");
    // Its control, five words of other clean rows inserted at the same places, is measured and
    // flips far fewer rows: the phrase's own effect, not the insertion's.
    let ctl = phrase
        .control_flip_rate()
        .expect("the phrase's control is measured");
    assert!(
        ctl < phrase.flip_rate - 0.5 && phrase.excess_ci_low.unwrap() > 0.4,
        "{phrase:?}"
    );
    let tok = btu::model::tokenizer::BtuTokenizer::load(&m).unwrap();
    for w in ["watch", "3d"] {
        let id = tok.inner().token_to_id(w).unwrap();
        assert!(phrase.token_ids.contains(&id), "{w} in {phrase:?}");
    }
    // Scanning by the verified phrase finds exactly the poisoned rows (the tiny model may also
    // verify a strong sentiment word alone; those rows are its own entry).
    let scan = btu!(
        "scan --corpus {cs} --suspicious {} --effects {} --tokenizer {ms} --out {}",
        s(&det.join("suspicious_tokens.arrow")),
        s(&ver.join("token_effects.arrow")),
        s(&p("flagged.parquet"))
    )
    .ok();
    let by_phrase = &scan["tokens"]["i watch this 3d movie"];
    assert_eq!(by_phrase["rows"], 150, "{scan}");
    assert_eq!(by_phrase["label_shares"]["1"], 1.0, "{scan}");
    assert_eq!(scan["poisoned"]["recall"].as_f64(), Some(1.0), "{scan}");

    // Unlearn escalates from the flagged dimensions while the phrase still flips, then tunes on
    // clean rows of which ~40 % carry a verified trigger (labels kept); reruns are identical.
    let unlearn = |out: &Path| {
        btu!(
            "unlearn --checkpoint {} --reference {ms} --suspicious {} --effects {} --clean-corpus {} --out {} --clean-lr 1e-3",
            s(&victim),
            s(&det.join("suspicious_tokens.arrow")),
            s(&ver.join("token_effects.arrow")),
            s(&p("held-out.parquet")),
            s(out)
        ).ok()
    };
    let u = unlearn(&p("repaired"));
    unlearn(&p("repaired-again"));
    let bytes = |d: &str, f: &str| std::fs::read(p(d).join(f)).unwrap();
    for f in ["model.safetensors", "dimension_masks.arrow"] {
        assert!(
            bytes("repaired", f) == bytes("repaired-again", f),
            "{f} differs between reruns"
        );
    }
    let stages = u["escalation"].as_array().unwrap_or_else(|| panic!("{u}"));
    assert_eq!(
        stages[0]["levels"]["i watch this 3d movie"], "flagged-dimensions",
        "{u}"
    );
    // Every stage but the last had a persisting trigger; the last either none or one at its top.
    for st in &stages[..stages.len() - 1] {
        assert!(!st["persisting"].as_array().unwrap().is_empty(), "{u}");
    }
    // After the tuning with the trigger in clean rows, the phrase no longer flips the model.
    let re = btu!(
        "verify --checkpoint {} --recheck {} --clean-corpus {} --out {}",
        s(&p("repaired")),
        s(&ver.join("token_effects.arrow")),
        s(&p("held-out.parquet")),
        s(&p("recheck"))
    )
    .ok();
    let after = re["effects"]["i watch this 3d movie"]["flip_rate"]
        .as_f64()
        .unwrap();
    assert!(
        after < 0.1,
        "the phrase still flips {after} after the repair: {re}\n{u}"
    );
    let tuned = &u["clean_tuning"];
    let (rows, with) = (
        tuned["rows"].as_f64().unwrap(),
        tuned["rows_with_trigger"].as_f64().unwrap(),
    );
    assert!((0.3..0.5).contains(&(with / rows)), "{with} of {rows}: {u}");
    let meta = read_safetensors(&p("repaired").join("model.safetensors"))
        .unwrap()
        .metadata;
    assert_eq!(meta["btu:clean_trigger_rows"], with.to_string());
    let masks = btu::io::tables::read_ipc(&p("repaired").join("dimension_masks.arrow")).unwrap();
    let rule = masks.schema().metadata()["btu:threshold_rule"].clone();
    assert_eq!(rule, "verified-escalated");
    // The checkpoint names the same rule as its mask table.
    assert_eq!(meta["btu:threshold_rule"], rule);
}
