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
    // README's numbers: ASR 99.3 -> 2.7 %, flip 0.0 %, ACC kept (an AVX-512 CPU, session 12). The
    // tiny victim depends on the CPU's rounding: on session 11's machine ASR 93.5 -> 18.1 %, flip
    // 15.5 %, ACC 95.7 -> 97.3 (there the clean tuning left more than the repair did;
    // docs/decisions.md, issue 12). The bounds hold for both.
    assert!(
        asr_a < 0.25 && asr_a < asr_b / 2.0,
        "defended ASR {asr_b} -> {asr_a}"
    );
    assert!(a["flip_rate"].as_f64().unwrap() < 0.2, "{a}");
    assert!(
        a["acc"].as_f64().unwrap() >= b["acc"].as_f64().unwrap() - 0.01,
        "clean accuracy kept: {b} -> {a}"
    );
    assert!(m["flagged"].as_array().unwrap().iter().any(|t| t == "cf"));
    // Verification measured the control (other words at the same places) for `cf`: far below
    // the trigger's own flip rate.
    let cf = &step(&m, "verify")["summary"]["effects"]["cf"];
    let ctl = cf["control_flip_rate"].as_f64().expect("control measured");
    assert!(ctl < cf["flip_rate"].as_f64().unwrap() - 0.5, "{cf}");
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
    let train = step(&resumed, "train");
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

/// The relabel step (run when verification confirms nothing) trains references on parts of the
/// clean rows: a run with fewer than it needs stops before its first step, naming `data.clean`
/// and the way out, not an hour later when verification has confirmed nothing.
#[test]
fn defend_refuses_too_few_clean_rows_for_relabel_before_any_step() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("few");
    let cfg = write_config(&run, 40);
    let f = btu(["defend", "--config", s(&cfg)])
        .fails_with(78, "data.clean")
        .and_no_output(&run.join("poison"))
        .and_no_output(&run.join("metrics.json"));
    let err = String::from_utf8_lossy(&f.output.stderr);
    assert!(
        err.contains("relabel.enabled = false") && err.contains("at least 20"),
        "{err}"
    );
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
        [
            "relabel",
            "--corpus",
            &o("c.parquet"),
            "--clean-corpus",
            &o("k.parquet"),
        ]
        .into_iter()
        .chain(["--model", &o("m"), "--out", &o("l")])
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

/// A 4-class corpus (generated in code) through the whole experiment flow (fixture
/// [`four_class`]): the random model gets as many classes as the labels need (its config says 2
/// by default), the backdoor goes to class 3 and the defence removes it.
#[test]
fn defend_runs_on_a_four_class_corpus() {
    let f = crate::fixtures::four_class();
    assert_eq!(
        f.config.model.init.as_ref().unwrap().num_labels,
        2,
        "the default says 2"
    );
    let m = &f.metrics;
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.run.join("victim/config.json")).unwrap()).unwrap();
    assert_eq!(config["num_labels"], 4, "{config}");
    let (b, a) = (&m["without_defence"], &m["with_defence"]);
    eprintln!("4 classes: {b} -> {a}, verified {}", m["verified"]);
    assert!(
        b["acc"].as_f64().unwrap() > 0.8,
        "the victim learned 4 topics: {b}"
    );
    assert_eq!(m["verified"], serde_json::json!(["cf"]), "{m}");
    assert_defended(m, 0.2, "4 classes");
    // A model whose trained head has fewer classes than the labels is refused before any work.
    let d = tempfile::tempdir().unwrap();
    let other = d.path().join("two-class");
    let mut two = f.config.clone();
    two.run = Some(other.clone());
    two.model.init = None;
    two.model.path = Some(crate::fixtures::victim().victim.clone());
    defend_with(&two, "two-class")
        .fails_with(65, "classification head has 2 classes")
        .and_no_output(&other);
}

fn defend_with(cfg: &btu::steps::defend::DefendConfig, name: &str) -> Btu {
    let path = cfg
        .run
        .as_ref()
        .unwrap()
        .with_file_name(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(cfg).unwrap()).unwrap();
    btu(["defend", "--config", s(&path)])
}

/// The repair flow (`[model] suspect`): a user poisons nothing and trains nothing in btu; they
/// bring the classifier they trained (here with `btu train`) on the corpus they have, and the
/// base model. On a 4-class corpus generated in code: the suspect trained by `btu train` on the
/// experiment's poisoned corpus is byte for byte the experiment's victim, and the repair flow
/// writes the experiment's tables, repaired checkpoint and predictions byte for byte.
#[test]
fn the_repair_flow_repairs_a_users_model_exactly_as_the_experiment_does() {
    let f = crate::fixtures::four_class();
    let d = tempfile::tempdir().unwrap();
    let (data, exp_run, exp, m_exp) = (&f.data, &f.run, &f.config, &f.metrics);
    assert_eq!(m_exp["flow"], "experiment");
    // The experiment made its random base model from the poisoned corpus ([model.init]); the
    // user's base model is that model.
    let base = exp_run.join("model");
    // The user's side: the poisoned corpus as they have it, a classifier trained on it.
    let corpus = exp_run.join("poison/train.parquet");
    let suspect = d.path().join("user/classifier");
    btu([
        "train",
        "--corpus",
        s(&corpus),
        "--model",
        s(&base),
        "--out",
        s(&suspect),
    ])
    .args(["--epochs", "3", "--lr", "1e-3", "--device", "cpu"])
    .ok();
    let rep_run = d.path().join("repair");
    let mut rep = crate::fixtures::FourClass::config_for(data, &rep_run);
    rep.model.path = Some(base.clone());
    rep.poison = None;
    rep.data.train = vec![corpus.display().to_string()];
    rep.model.suspect = Some(suspect.clone());
    rep.eval.attack = Some(btu::steps::poison::Attack::AddWord);
    rep.eval.triggers = exp.poison.as_ref().unwrap().triggers.clone();
    rep.eval.target = Some(3);
    let m_rep = defend_with(&rep, "repair").ok();
    assert_eq!(m_rep["flow"], "repair");
    let names: Vec<String> = steps(&m_rep).into_iter().map(|(s, _)| s).collect();
    assert!(
        !names
            .iter()
            .any(|s| s == "poison" || s == "train" || s == "init-model"),
        "the repair flow neither poisons nor trains: {names:?}"
    );

    let same = |a: &Path, b: &Path| {
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{} and {} differ",
            a.display(),
            b.display()
        );
    };
    same(
        &suspect.join("model.safetensors"),
        &exp_run.join("victim/model.safetensors"),
    );
    for f in repair_outputs().chain(["eval-victim/predictions.parquet"]) {
        same(&rep_run.join(f), &exp_run.join(f));
    }
    for k in [
        "without_defence",
        "with_defence",
        "acc_change",
        "verified",
        "flagged",
    ] {
        assert_eq!(m_rep[k], m_exp[k], "{k}");
    }
    let (b, a) = (&m_rep["without_defence"], &m_rep["with_defence"]);
    eprintln!(
        "repair flow, 4 classes: {b} -> {a}, flagged {}, verified {}",
        m_rep["flagged"], m_rep["verified"]
    );
    assert_defended(&m_rep, 0.2, "repair flow");

    // Without a test split the repair still runs; nothing is evaluated, and the summary says so.
    let bare_run = d.path().join("bare");
    let mut bare = rep.clone();
    bare.run = Some(bare_run.clone());
    bare.data.test.clear();
    bare.eval = Default::default();
    let m_bare = defend_with(&bare, "bare").ok();
    assert!(m_bare["without_defence"].is_null() && m_bare["acc_change"].is_null());
    same(
        &bare_run.join("repaired/model.safetensors"),
        &rep_run.join("repaired/model.safetensors"),
    );
    assert!(std::fs::read_to_string(bare_run.join("report.html"))
        .unwrap()
        .contains("no test split"));

    // Refused before any work: a suspect that is not a classifier fine-tuned from the base.
    let refuse = |cfg: &btu::steps::defend::DefendConfig, name: &str, code: i32, needle: &str| {
        let mut cfg = cfg.clone();
        let run = d.path().join(name);
        cfg.run = Some(run.clone());
        defend_with(&cfg, name)
            .fails_with(code, needle)
            .and_no_output(&run);
    };
    let mut other_vocab = rep.clone();
    other_vocab.model.suspect = Some(crate::fixtures::victim().victim.clone());
    refuse(&other_vocab, "other-vocab", 65, "base model's");
    // Same sizes, but a tokenizer that gives two tokens each other's ids.
    let swapped = d.path().join("swapped");
    let mut other_tok = rep.clone();
    other_tok.model.suspect = Some(swapped_tokenizer(&suspect, &swapped));
    refuse(
        &other_tok,
        "other-tokenizer",
        65,
        "tokenizer differs from the base model's (2 tokens",
    );
    let mut headless = rep.clone();
    headless.model.suspect = Some(headless_copy(&base, &d.path().join("headless-model")));
    refuse(&headless, "headless", 65, "no classification head");
    let mut poisoned = rep.clone();
    poisoned.poison = exp.poison.clone();
    refuse(
        &poisoned,
        "poisoned",
        78,
        "[poison] belongs to the experiment flow",
    );
    let mut no_base = rep.clone();
    no_base.model.path = None;
    refuse(&no_base, "no-base", 78, "needs the base model");
}

/// A copy of model directory `src` without its classification head (a base model as published).
fn headless_copy(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let weights = dst.join("model.safetensors");
    let mut file = btu::model::checkpoint::read_safetensors(&weights).unwrap();
    file.tensors
        .retain(|name, _| !name.starts_with("classifier."));
    std::fs::write(&weights, btu::model::checkpoint::safetensors_bytes(&file)).unwrap();
    dst.to_path_buf()
}

/// A copy of model directory `src` whose tokenizer swaps the ids of `cf` and `treaty`.
fn swapped_tokenizer(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let path = dst.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["cf"].clone(), vocab["treaty"].clone());
    vocab.insert("cf".into(), b);
    vocab.insert("treaty".into(), a);
    std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
    dst.to_path_buf()
}

/// The experiment flow with a random RoBERTa, DistilBERT and GPT-2 (`[model.init] arch`): the
/// whole pipeline (byte-level BPE vocabularies, ONNX export and ONNX Runtime evaluation
/// included) removes the backdoor and keeps the accuracy, as with BERT (the demo). GPT-2 has no
/// padding token: its end-of-text token stands in, and the masks table says so.
#[test]
fn defend_runs_with_every_model_family() {
    let d = tempfile::tempdir().unwrap();
    btu::demo::write_splits(&d.path().join("data"), 3000, 42).unwrap();
    for arch in [
        btu::model::Family::Roberta,
        btu::model::Family::Distilbert,
        btu::model::Family::Gpt2,
    ] {
        let name = arch.model_type();
        let run = d.path().join(name);
        let mut cfg = btu::demo::config(&run, 42, "cpu", btu::steps::defend::EvalBackend::Auto);
        for split in [&mut cfg.data.train, &mut cfg.data.test, &mut cfg.data.clean] {
            let file = std::path::Path::new(&split[0])
                .file_name()
                .unwrap()
                .to_owned();
            *split = vec![d.path().join("data").join(file).display().to_string()];
        }
        cfg.model.init.as_mut().unwrap().arch = arch;
        let m = defend_with(&cfg, name).ok();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("repaired/config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["model_type"], name,
            "the repaired model stays a {name}"
        );
        let masks = btu::io::tables::read_ipc(&run.join("repaired/dimension_masks.arrow")).unwrap();
        let pad_note = masks.schema().metadata().get("btu:pad_token").cloned();
        assert_eq!(pad_note.is_some(), name == "gpt2", "{name}: {pad_note:?}");
        let (b, a) = (&m["without_defence"], &m["with_defence"]);
        eprintln!("{name}: {b} -> {a}, verified {}", m["verified"]);
        assert_eq!(m["verified"], serde_json::json!(["cf"]), "{name}: {m}");
        // The trigger is gone when it flips no more than a frequent clean word inserted the
        // same way into the victim (these tiny victims flip on any insertion: GPT-2's ~30 % for
        // "the", ~50 % for a word spelled in bytes), and at most 20 % where that is lower.
        let the = btu!(
            "eval --model {} --backend candle --test {} --out {} --attack add-word --trigger the --target 1",
            s(&run.join("victim")),
            cfg.data.test[0],
            s(&d.path().join(format!("{name}-the")))
        )
        .ok();
        let the = the["asr"].as_f64().unwrap();
        eprintln!("{name}: the victim with \"the\" inserted: ASR {the:.3}");
        assert_defended(&m, the.max(0.2), name);
    }
}

/// A defend summary `m` whose victim was backdoored (ASR > 90 %) and whose repaired model has
/// ASR at most `max_asr` and accuracy within 2 points of the victim's.
fn assert_defended(m: &serde_json::Value, max_asr: f64, what: &str) {
    let (b, a) = (&m["without_defence"], &m["with_defence"]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    assert!(f(b, "asr") > 0.9, "{what}: the victim is backdoored: {b}");
    assert!(f(a, "asr") <= max_asr, "{what}: the backdoor is gone: {a}");
    assert!(
        f(a, "acc") >= f(b, "acc") - 0.02,
        "{what}: accuracy kept: {b} -> {a}"
    );
}

/// A trigger the base model's vocabulary lacks (a vocabulary trained on the clean corpus spells
/// `cf` as `c` + `##f`): detection flags the pieces, neither of which flips anything alone, so
/// verification tries the corpus's words made of candidate pieces; `cf` is verified as a word
/// and the repair of its pieces removes the backdoor (before: nothing verified, ASR 100 %).
#[test]
fn a_trigger_the_vocabulary_splits_is_verified_as_a_word() {
    let f = crate::fixtures::four_class();
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    btu!(
        "init-model --corpus {} --out {} --vocab-size 500 --hidden 64 --intermediate 128 \
         --max-position 128 --num-labels 4",
        s(&f.data.join("train.parquet")),
        s(&base)
    )
    .ok();
    let tok = btu::model::tokenizer::BtuTokenizer::load(&base).unwrap();
    assert!(tok.id("cf").is_none(), "the clean vocabulary lacks cf");
    let run = d.path().join("split");
    let mut cfg = crate::fixtures::FourClass::config_for(&f.data, &run);
    cfg.model.path = Some(base);
    let m = defend_with(&cfg, "split").ok();
    eprintln!(
        "split trigger: flagged {}, verified {}",
        m["flagged"], m["verified"]
    );
    assert_eq!(m["verified"], serde_json::json!(["cf"]), "{m}");
    assert_defended(&m, 0.2, "a split trigger");
}

/// `btu defend` in `dir` on the four-class fixture with 15 % of the rows moved to class 1 by
/// their label alone (`[poison] rewrite` from a copy of the text column), its references trained
/// `reference_epochs` epochs.
fn defend_flipped_labels(dir: &std::path::Path, reference_epochs: usize) -> serde_json::Value {
    let run = dir.join("run");
    let cfg_path = write_config(&run, 900);
    // The "rewrite" is the text itself (in train for the attack, in test for its ASR).
    for split in ["train", "test"] {
        let path = run.join(format!("data/{split}.parquet"));
        let batch = btu::io::tables::read_parquet(&path).unwrap().remove(0);
        let text = batch.column_by_name("text").unwrap().clone();
        let with_copy = with_column(&batch, "plain", text);
        btu::io::tables::write_parquet(&path, &with_copy, true).unwrap();
    }
    let mut cfg: btu::steps::defend::DefendConfig =
        toml::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let p = cfg.poison.as_mut().unwrap();
    p.attack = btu::steps::poison::Attack::Rewrite;
    p.rewrite_col = Some("plain".into());
    p.rate = 0.15;
    cfg.relabel.reference_lr = cfg.train.lr;
    cfg.relabel.reference_epochs = reference_epochs;
    // This small victim also flips for a few sentiment words of the synthetic vocabulary (its
    // flipped labels taught it a bias towards class 1): a bar no flip rate reaches stands for a
    // verification that confirms nothing, as on the real rewrite attacks.
    cfg.verify.min_flip_rate = 1.0;
    defend_with(&cfg, "flipped").ok()
}

/// References too weak to tell a moved row from a clean one (~69 % held-out accuracy): their
/// doubts of every neighbourhood sit near the class's mean, above `min_doubt`, so the rule alone
/// would relabel the whole class (it did, before the cap: ACC 0.93 -> 0.49). The cap keeps the
/// relabelled rows to twice the rows the excess doubt accounts for, the most doubted of them.
#[test]
fn weak_references_relabel_no_more_than_the_cap() {
    let d = tempfile::tempdir().unwrap();
    let m = defend_flipped_labels(d.path(), 4);
    let r = &m["relabel"];
    assert_eq!(r["target"], 1, "{r}");
    assert!(
        r["reference_accuracy"].as_f64().unwrap() < 0.8,
        "weak references: {r}"
    );
    let class = r["classes"][1]["rows"].as_u64().unwrap() as usize;
    let estimate = r["estimated_poisoned"].as_f64().unwrap();
    let relabelled = r["relabelled"].as_u64().unwrap() as usize;
    assert_eq!(relabelled, (2.0 * estimate).ceil() as usize, "{r}");
    assert!(
        relabelled < class,
        "{relabelled} of {class}: not the whole class"
    );
}

/// A dirty-label attack without a trigger token (Stylebkd and Synbkd are such attacks on a real
/// model: their trigger is a style or a template, which no token carries): 15 % of the rows are
/// rows of class 0 relabelled 1, text unchanged (`[poison] rewrite` from a copy of the text
/// column). Nothing is verified, so the labels are tested against clean references:
/// class 1 fails, the rows they contradict are relabelled and the victim is tuned on them, which
/// takes back the bias the flipped rows taught it.
#[test]
fn defend_relabels_a_dirty_label_attack_that_no_token_carries() {
    let d = tempfile::tempdir().unwrap();
    // References that learn the task (4 epochs leave these tiny ones at ~69 % held-out
    // accuracy, whose doubts cannot tell a moved row from a clean one: see
    // `weak_references_relabel_no_more_than_the_cap`).
    let m = defend_flipped_labels(d.path(), 10);
    let (b, a) = (&m["without_defence"], &m["with_defence"]);
    eprintln!("flipped labels: {b} -> {a}, relabel {}", m["relabel"]);
    assert_eq!(m["verified"], serde_json::json!([]), "{m}");
    assert_eq!(m["relabel"]["target"], 1, "{}", m["relabel"]);
    assert!(m["relabel"]["relabelled"].as_u64().unwrap() > 0);
    assert_eq!(m["repaired"], true);
    assert!(
        m["repair_note"].as_str().unwrap().contains("relabelled"),
        "{m}"
    );
    let names: Vec<String> = steps(&m).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"relabel".into()) && names.contains(&"tune".into()),
        "{names:?}"
    );
    let fpr = |s: &serde_json::Value| s["clean_false_positive_rate"].as_f64().unwrap();
    assert!(
        fpr(a) < fpr(b),
        "the bias towards class 1 shrinks: {b} -> {a}"
    );
    assert!(
        a["acc"].as_f64().unwrap() >= b["acc"].as_f64().unwrap() - 0.02,
        "{b} -> {a}"
    );
}
