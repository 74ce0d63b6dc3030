//! `btu defend` and `btu demo`: the whole pipeline, resumable and idempotent, with the
//! documented exit codes.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::fixtures::tiny;
use crate::util::*;

fn write_config(run: &Path, rows: usize) -> PathBuf {
    btu::demo::write_splits(&run.join("data"), rows, 42).unwrap();
    let mut cfg = btu::demo::config(run, 42, "cpu", btu::steps::defend::EvalBackend::Auto);
    cfg.train.epochs = 4;
    let path = run.with_extension("toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

const TABLES: [&str; 6] = [
    "detect/token_scores.arrow",
    "detect/suspicious_tokens.arrow",
    "repaired/dimension_masks.arrow",
    "repaired/model.safetensors",
    "eval-victim/predictions.parquet",
    "eval-repaired/predictions.parquet",
];

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn steps(m: &serde_json::Value) -> Vec<(String, bool)> {
    m["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_string(),
                s["skipped"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn demo_defence_cuts_the_attack_success_rate() {
    let o = btu(["demo", "--device", "cpu"]).success();
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (b, a) = (&m["without_defence"], &m["with_defence"]);
    let (asr_b, asr_a) = (b["asr"].as_f64().unwrap(), a["asr"].as_f64().unwrap());
    eprintln!(
        "demo: ASR {asr_b:.3} -> {asr_a:.3}, ACC {} -> {}",
        b["acc"], a["acc"]
    );
    assert!(asr_b > 0.9, "the demo's victim is backdoored: {asr_b}");
    assert!(
        asr_a < asr_b - 0.4,
        "defended ASR {asr_a} is not far below {asr_b}"
    );
    assert!(
        (a["acc"].as_f64().unwrap() - b["acc"].as_f64().unwrap()).abs() < 0.03,
        "clean accuracy kept"
    );
    assert!(m["flagged"].as_array().unwrap().iter().any(|t| t == "cf"));
    let table = String::from_utf8_lossy(&o.stderr);
    assert!(
        table.contains("without defence") && table.contains("with BTU"),
        "{table}"
    );
}

#[test]
fn killed_defend_resumes_without_redoing_completed_steps_and_ends_identical() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let cfg = write_config(&run, 4000);
    // Uninterrupted reference run, then moved aside so the resumed run uses the same paths.
    let first = btu(["defend", "--config", s(&cfg)]).ok();
    assert!(steps(&first).iter().all(|(_, skipped)| !skipped));
    let reference: Vec<Vec<u8>> = TABLES
        .iter()
        .map(|t| std::fs::read(run.join(t)).unwrap())
        .collect();
    // Idempotent: an unchanged rerun redoes nothing and touches no output.
    let before = mtime(&run.join("detect/token_scores.arrow"));
    let again = btu(["defend", "--config", s(&cfg)]).ok();
    assert!(
        steps(&again).iter().all(|(_, skipped)| *skipped),
        "{:?}",
        steps(&again)
    );
    assert_eq!(before, mtime(&run.join("detect/token_scores.arrow")));
    // A skipped step still says how long it took when it was computed.
    for (a, b) in first["steps"]
        .as_array()
        .unwrap()
        .iter()
        .zip(again["steps"].as_array().unwrap())
    {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(b["seconds"].as_f64(), Some(0.0));
        assert_eq!(b["computed_seconds"], a["seconds"], "{}", b["step"]);
    }
    // A changed detection parameter redoes detect and what follows, not what precedes.
    let changed = btu(["defend", "--config", s(&cfg), "--alpha", "0.5"]).ok();
    let st: std::collections::HashMap<_, _> = steps(&changed).into_iter().collect();
    assert!(st["poison"] && st["init-model"] && st["train"], "{st:?}");
    assert!(
        !st["detect"] && !st["unlearn"] && !st["eval-repaired"],
        "{st:?}"
    );

    // Start over in the same place, kill during training, rerun.
    for e in std::fs::read_dir(&run).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "data" {
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap()
            } else {
                std::fs::remove_file(&p).unwrap()
            }
        }
    }
    let mut child = btu(["defend", "--config", s(&cfg)]).spawn();
    let t0 = std::time::Instant::now();
    while !partial_dir(&run, "victim").is_some_and(|p| p.join("epoch-0/epoch.json").exists()) {
        assert!(
            t0.elapsed().as_secs() < 300,
            "training never completed an epoch"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!run.join("victim").exists(), "training was interrupted");
    let done = [
        "poison/train.parquet",
        "model/model.safetensors",
        "detect/token_scores.arrow",
        "detect/suspicious_tokens.arrow",
    ];
    let times: Vec<SystemTime> = done.iter().map(|f| mtime(&run.join(f))).collect();
    let resumed = btu(["defend", "--config", s(&cfg)]).ok();
    let st: std::collections::HashMap<_, _> = steps(&resumed).into_iter().collect();
    assert!(
        st["poison"] && st["init-model"] && st["detect"],
        "completed steps are not redone: {st:?}"
    );
    assert!(!st["train"]);
    let train = resumed["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "train")
        .unwrap();
    assert!(
        train["summary"]["resumed_from_epoch"].as_u64().unwrap() >= 2,
        "{}",
        train["summary"]
    );
    for (f, t) in done.iter().zip(&times) {
        assert_eq!(*t, mtime(&run.join(f)), "{f} was rewritten");
    }
    for (t, bytes) in TABLES.iter().zip(&reference) {
        assert!(
            std::fs::read(run.join(t)).unwrap() == *bytes,
            "{t} differs from the uninterrupted run"
        );
    }
    assert_eq!(resumed["with_defence"], first["with_defence"]);
}

#[test]
fn defend_exit_codes_per_class_of_failure() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    btu(["defend", "--no-such-flag"]).exits(2);
    btu(["defend", "--config", s(&root.join("missing.toml"))]).fails_with(66, "missing.toml");
    let bad = root.join("bad.toml");
    std::fs::write(
        &bad,
        "run = \"x\"\n[data]\ntrain = [\"a.parquet\"]\ntset = [\"typo\"]\n",
    )
    .unwrap();
    btu(["defend", "--config", s(&bad)]).fails_with(78, "tset");
    let partial = root.join("partial.toml");
    std::fs::write(
        &partial,
        format!(
            "run = \"{}\"\n[data]\ntrain = [\"a.parquet\"]\n",
            s(&root.join("r"))
        ),
    )
    .unwrap();
    btu(["defend", "--config", s(&partial)]).fails_with(78, "data.test");
    // Inputs: missing corpus (66), not Parquet (65).
    let (corpus, model) = (&tiny().corpus, &tiny().model);
    let common = ["--test", s(corpus), "--attack", "add-word"];
    let defend = |run: &Path, train: &str, model: &Path| {
        btu([
            "defend",
            "--run",
            s(run),
            "--train",
            train,
            "--model",
            s(model),
        ])
        .args(common)
    };
    let r1 = root.join("r1");
    defend(&r1, "/nonexistent/train.parquet", &root.join("nomodel"))
        .fails_with(66, "/nonexistent/train.parquet")
        .and_no_output(&r1);
    let fake = root.join("fake.parquet");
    std::fs::write(&fake, "not parquet").unwrap();
    let r2 = root.join("r2");
    defend(&r2, s(&fake), model)
        .fails_with(65, "not a Parquet file")
        .and_no_output(&r2);
    // Output: the run directory cannot be created (73).
    let file = root.join("a-file");
    std::fs::write(&file, "x").unwrap();
    defend(&file.join("run"), s(corpus), model).fails_with(73, "a-file");
    // Dry run: the plan, with the paths and settings it resolved, and nothing written.
    let r3 = root.join("r3");
    let plan = btu(["--dry-run"])
        .args([
            "defend",
            "--run",
            s(&r3),
            "--train",
            s(corpus),
            "--model",
            s(model),
        ])
        .args(common)
        .ok();
    assert_eq!(plan["command"], "defend", "{plan}");
    assert_eq!(
        plan["outputs"],
        serde_json::json!([
            s(&r3),
            s(&r3.join("metrics.json")),
            s(&r3.join("report.html"))
        ]),
        "{plan}"
    );
    let inputs: Vec<&str> = plan["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert_eq!(inputs, [s(corpus), s(corpus), s(model)], "{plan}");
    assert_eq!(plan["params"]["run"], s(&r3), "{plan}");
    assert_eq!(plan["params"]["poison"]["attack"], "add-word", "{plan}");
    assert!(!r3.exists());
}

#[test]
fn every_command_has_a_dry_run_that_touches_nothing() {
    let d = tempfile::tempdir().unwrap();
    let o = |n: &str| d.path().join(n).display().to_string();
    let cases: Vec<Vec<String>> = vec![
        vec![
            "init-model".into(),
            "--out".into(),
            o("m"),
            "--corpus".into(),
            o("c.parquet"),
        ],
        vec![
            "poison".into(),
            "--input".into(),
            o("c.parquet"),
            "--output".into(),
            o("p.parquet"),
            "--attack".into(),
            "add-word".into(),
        ],
        vec![
            "detect".into(),
            "--corpus".into(),
            o("c.parquet"),
            "--model".into(),
            o("m"),
            "--out".into(),
            o("d"),
        ],
        vec![
            "train".into(),
            "--corpus".into(),
            o("c.parquet"),
            "--model".into(),
            o("m"),
            "--out".into(),
            o("v"),
        ],
        vec![
            "unlearn".into(),
            "--checkpoint".into(),
            o("v"),
            "--reference".into(),
            o("m"),
            "--suspicious".into(),
            o("s.arrow"),
            "--out".into(),
            o("r"),
        ],
        vec![
            "apply-masks".into(),
            "--checkpoint".into(),
            o("v"),
            "--masks".into(),
            o("k.arrow"),
            "--out".into(),
            o("r"),
        ],
        vec![
            "export-onnx".into(),
            "--checkpoint".into(),
            o("v"),
            "--out".into(),
            o("x.onnx"),
        ],
        vec![
            "eval".into(),
            "--model".into(),
            o("x.onnx"),
            "--test".into(),
            o("c.parquet"),
            "--out".into(),
            o("e"),
        ],
        vec!["demo".into(), "--out".into(), o("demo")],
        vec!["schemas".into(), "--out".into(), o("schemas")],
        [
            "verify",
            "--checkpoint",
            &o("v"),
            "--suspicious",
            &o("s.arrow"),
        ]
        .into_iter()
        .chain(["--clean-corpus", &o("c.parquet"), "--out", &o("f")])
        .map(String::from)
        .collect(),
    ];
    for c in cases {
        let plan = btu(["--dry-run"]).args(&c).ok();
        assert_eq!(plan["command"], c[0], "{plan}");
        // The plan names the output the command line gave (or files in it), and nothing outside
        // the directory of the command line's paths.
        let flag = c
            .iter()
            .position(|a| a == "--out" || a == "--output")
            .unwrap();
        let out = &c[flag + 1];
        let outputs: Vec<&str> = plan["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert!(
            outputs.iter().any(|o| o.starts_with(out.as_str())),
            "{plan}"
        );
        assert!(
            outputs.iter().all(|o| Path::new(o).starts_with(d.path())),
            "{plan}"
        );
        // Every input it names is a path of the command line.
        for i in plan["inputs"].as_array().unwrap() {
            assert!(c.iter().any(|a| i == a), "{i} is not an argument: {plan}");
        }
        assert_eq!(
            plan["params"][c[flag].trim_start_matches("--")],
            out.as_str(),
            "{plan}"
        );
    }
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        0,
        "dry runs wrote something"
    );
}

/// A 4-class corpus (generated in code) through the whole experiment flow: the random model gets
/// as many classes as the labels need (its config says 2 by default), the backdoor goes to class
/// 3 and the defence removes it.
#[test]
fn defend_runs_on_a_four_class_corpus() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let data = run.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (test, test_l) = topic_corpus(600, 4, 2);
    let seen: std::collections::HashSet<&String> = test.iter().collect();
    let (clean, clean_l): (Vec<String>, Vec<i64>) = {
        let (t, l) = topic_corpus(600, 4, 3);
        t.into_iter()
            .zip(l)
            .filter(|(t, _)| !seen.contains(t))
            .unzip()
    };
    let (train, train_l) = topic_corpus(3000, 4, 1);
    for (name, t, l) in [
        ("train", &train, &train_l),
        ("test", &test, &test_l),
        ("clean", &clean, &clean_l),
    ] {
        let batch = btu::io::tables::corpus_batch(t, l).unwrap();
        btu::io::tables::write_parquet(&data.join(format!("{name}.parquet")), &batch, true)
            .unwrap();
    }
    let mut cfg = btu::demo::config(&run, 42, "cpu", btu::steps::defend::EvalBackend::Candle);
    cfg.poison.as_mut().unwrap().target = 3;
    assert_eq!(
        cfg.model.init.as_ref().unwrap().num_labels,
        2,
        "the default says 2"
    );
    let path = run.with_extension("toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let m = btu(["defend", "--config", s(&path)]).ok();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("victim/config.json")).unwrap()).unwrap();
    assert_eq!(config["num_labels"], 4, "{config}");
    let (b, a) = (&m["without_defence"], &m["with_defence"]);
    eprintln!("4 classes: {b} -> {a}, verified {}", m["verified"]);
    assert!(
        b["acc"].as_f64().unwrap() > 0.8,
        "the victim learned 4 topics: {b}"
    );
    assert!(
        b["asr"].as_f64().unwrap() > 0.9,
        "the victim is backdoored: {b}"
    );
    assert_eq!(m["verified"], serde_json::json!(["cf"]), "{m}");
    assert!(
        a["asr"].as_f64().unwrap() < 0.2,
        "the backdoor is gone: {a}"
    );
    assert!(
        a["acc"].as_f64().unwrap() >= b["acc"].as_f64().unwrap() - 0.02,
        "accuracy kept: {b} -> {a}"
    );
    // A model whose trained head has fewer classes than the labels is refused before any work.
    let other = d.path().join("two-class");
    let mut two = btu::demo::config(&other, 42, "cpu", btu::steps::defend::EvalBackend::Candle);
    two.data = cfg.data.clone();
    two.model.init = None;
    two.model.path = Some(crate::fixtures::victim().victim.clone());
    two.poison.as_mut().unwrap().target = 3;
    let path = other.with_extension("toml");
    std::fs::write(&path, toml::to_string(&two).unwrap()).unwrap();
    btu(["defend", "--config", s(&path)])
        .fails_with(65, "classification head has 2 classes")
        .and_no_output(&other);
}
