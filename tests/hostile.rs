//! Hostile input and faults (docs/reliability.md): every reproduction of the probe that once
//! panicked, exited 0 with garbage, or lost or mixed up work, plus SIGKILL at several points of
//! each long-running command. Each case gets its documented exit code, one line on stderr, no
//! summary on stdout, and no output that looks complete.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, DictionaryArray, Int32Array, Int64Array, RecordBatch};
use arrow::array::{Float32Array, StringArray};
use arrow::datatypes::{DataType, Field, Int32Type, Schema};
use btu::model::checkpoint::{read_safetensors, safetensors_bytes, RawTensor};
use common::*;

/// `btu` with a command line given as a format string (arguments split on white space).
macro_rules! ok {
    ($($fmt:tt)+) => { run_ok(&words(&format!($($fmt)+))) };
}

/// `btu` fails with exit `$code` and one stderr line containing `$needle`.
macro_rules! fails {
    ($code:expr, $needle:expr, $($fmt:tt)+) => {
        fails_with(&run(&words(&format!($($fmt)+))), $code, $needle)
    };
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    corpus: PathBuf,
    model: PathBuf,
    victim: PathBuf,
    detect: PathBuf,
    unlearned: PathBuf,
}

impl Fixture {
    /// The paths as strings: (corpus, model, victim, suspicious_tokens.arrow).
    fn paths(&self) -> (&str, &str, &str, String) {
        let sus = self.detect.join("suspicious_tokens.arrow");
        (
            s(&self.corpus),
            s(&self.model),
            s(&self.victim),
            sus.display().to_string(),
        )
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let clean = root.join("clean.parquet");
        synth_corpus(&clean, 600, 3);
        let (cl, c, m) = (s(&clean), root.join("poisoned.parquet"), root.join("model"));
        ok!("poison --input {cl} --output {} --attack add-word --rate 0.1 --target 1", s(&c));
        tiny_model(&m, &c, 300);
        let (det, victim, unl) = (root.join("detect"), root.join("victim"), root.join("unlearned"));
        let (cs, ms) = (s(&c), s(&m));
        ok!("detect --corpus {cs} --model {ms} --out {} --device cpu --alpha 2", s(&det));
        ok!("train --corpus {cs} --model {ms} --out {} --epochs 1 --lr 1e-3", s(&victim));
        let sus = det.join("suspicious_tokens.arrow");
        ok!(
            "unlearn --checkpoint {} --reference {ms} --suspicious {} --out {} --threshold frobenius",
            s(&victim),
            s(&sus),
            s(&unl)
        );
        Fixture {
            _dir: dir,
            root,
            corpus: c,
            model: m,
            victim,
            detect: det,
            unlearned: unl,
        }
    })
}

/// A fresh directory inside the fixture's root.
fn scratch(name: &str) -> PathBuf {
    let d = fixture().root.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The documented failure: exit `code`, exactly one stderr line `error: ...` containing
/// `needle`, nothing on stdout.
fn fails_with(o: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.is_empty(), "no summary on failure: {out}");
}

/// No temporary or staging entries left in `dir`.
fn no_leftovers(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !name.contains(".tmp-"),
            "leftover {name} in {}",
            dir.display()
        );
    }
}

fn write_batch(path: &Path, cols: Vec<(&str, ArrayRef)>) {
    let fields: Vec<Field> = cols
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    let arrays = cols.into_iter().map(|(_, a)| a).collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

// ---------------------------------------------------------------- panics that were exit 101

#[test]
fn parquet_footer_pointing_before_the_file_is_65_for_every_reader() {
    let f = fixture();
    let (_, m, _, sus) = f.paths();
    let d = scratch("footer");
    let bad = d.join("bad.parquet");
    let mut bytes = b"PAR1".to_vec();
    bytes.extend(vec![0u8; 500]);
    bytes.extend(1000u32.to_le_bytes());
    bytes.extend(b"PAR1");
    std::fs::write(&bad, bytes).unwrap();
    let (b, o, po) = (s(&bad), d.join("out"), d.join("out.parquet"));
    let (o, po) = (s(&o), s(&po));
    fails!(65, "footer", "detect --corpus {b} --model {m} --out {o}");
    fails!(
        65,
        "footer",
        "poison --input {b} --output {po} --attack add-word"
    );
    fails!(
        65,
        "footer",
        "scan --corpus {b} --suspicious {sus} --tokenizer {m} --out {po}"
    );
    fails!(65, "footer", "sql --table c={b} SELECT");
    assert!(
        std::fs::read_dir(&d).unwrap().count() == 1,
        "nothing but the input"
    );
}

#[test]
fn invalid_bucket_names_and_endpoints_are_78_not_panics() {
    let f = fixture();
    let d = scratch("bucket");
    let out = d.join("out");
    let (m, o) = (s(&f.model), s(&out));
    let bad_bucket = [
        "detect",
        "--model",
        m,
        "--out",
        o,
        "--corpus",
        "s3://bad bucket/c.parquet",
    ];
    fails_with(&run(&bad_bucket), 78, "bucket");
    let sql = [
        "sql",
        "--table",
        "t=s3://bad bucket/t.arrow",
        "SELECT * FROM t",
    ];
    fails_with(&run(&sql), 78, "bucket");
    let s3 = words("detect --corpus s3://lake/c.parquet --model")
        .into_iter()
        .chain([m, "--out", o])
        .collect::<Vec<_>>();
    let with_env = |env: &[(&str, &str)]| {
        let mut c = btu();
        c.envs(env.iter().copied());
        c.args(&s3).output().unwrap()
    };
    fails_with(
        &with_env(&[("AWS_ENDPOINT_URL", "not a url")]),
        78,
        "AWS_ENDPOINT_URL",
    );
    let env = [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("BTU_S3_MAX_RETRIES", "abc"),
    ];
    fails_with(&with_env(&env), 78, "BTU_S3_MAX_RETRIES");
    assert!(!out.exists());
}

// ------------------------------------------------------- exit 0 with NaN or meaningless output

#[test]
fn non_finite_or_absurd_learning_rates_are_refused_before_any_work() {
    let f = fixture();
    let (c, m, v, sus) = f.paths();
    let d = scratch("lr");
    let out = d.join("out");
    let o = s(&out);
    for lr in ["NaN", "inf", "1e30", "0", "-1"] {
        fails!(
            78,
            "--lr",
            "train --corpus {c} --model {m} --out {o} --lr={lr}"
        );
        fails!(
            78,
            "--lr",
            "detect --corpus {c} --model {m} --out {o} --lr={lr}"
        );
    }
    let detect = format!("detect --corpus {c} --model {m} --out {o}");
    fails!(78, "--weight-decay", "{detect} --weight-decay NaN");
    fails!(78, "--epochs", "{detect} --epochs 0");
    fails!(78, "--batch-size", "{detect} --batch-size 0");
    fails!(78, "--max-len", "{detect} --max-len 0");
    fails!(78, "--max-len", "{detect} --max-len 1");
    let unlearn = format!("unlearn --checkpoint {v} --reference {m} --suspicious {sus} --out {o}");
    fails!(
        78,
        "--clean-lr",
        "{unlearn} --clean-corpus {c} --clean-lr NaN"
    );
    assert!(!out.exists());
    assert!(
        partial_dir(&d, "out").is_none(),
        "a refused train leaves no resume state"
    );
    no_leftovers(&d);
}

#[test]
fn defend_refuses_bad_values_before_its_first_step() {
    let f = fixture();
    let (c, m, _, _) = f.paths();
    let d = scratch("defend-values");
    let run_dir = d.join("run");
    let r = s(&run_dir);
    let base = format!("defend --run {r} --train {c} --test {c} --model {m} --attack add-word");
    for (flag, needle) in [
        ("--lr NaN", "train.lr"),
        ("--alpha 0", "detect.alpha"),
        ("--epochs 0", "train.epochs"),
        ("--rate 2", "poison.rate"),
        ("--target 5", "poison.target"),
    ] {
        fails!(78, needle, "{base} {flag}");
        assert!(!run_dir.exists(), "{flag}: no step ran");
    }
}

#[test]
fn a_corpus_of_empty_texts_flags_nothing_and_fails() {
    let f = fixture();
    let d = scratch("empty-texts");
    let corpus = d.join("empty.parquet");
    let texts: Vec<String> = vec![String::new(); 50];
    let labels: Vec<i64> = (0..50).map(|i| i % 2).collect();
    let batch = btu::io::tables::corpus_batch(&texts, &labels).unwrap();
    btu::io::tables::write_parquet(&corpus, &batch, true).unwrap();
    let (e, m, out) = (s(&corpus), s(&f.model), d.join("out"));
    fails!(
        65,
        "empty",
        "detect --corpus {e} --model {m} --out {}",
        s(&out)
    );
    assert!(!out.exists());
}

#[test]
fn targets_and_rewrite_columns_outside_the_data_are_refused() {
    let f = fixture();
    let (c, _, v, _) = f.paths();
    let d = scratch("targets");
    let out = d.join("out.parquet");
    let o = s(&out);
    let eval = format!("eval --model {v} --test {c} --out {o}");
    fails!(78, "--target", "{eval} --target 5 --backend candle");
    fails!(78, "--repeats", "{eval} --attack add-word --repeats 0");
    let poison = format!("poison --input {c} --output {o}");
    fails!(78, "--target", "{poison} --attack add-word --target 5");
    fails!(
        65,
        "rewrite column 'id'",
        "{poison} --attack rewrite --rewrite-col id"
    );
    // An attack without what it inserts measured nothing (ASR null) and exited 0.
    fails!(78, "--rewrite-col", "{eval} --attack rewrite");
    let mut empty = words(&eval);
    empty.extend(["--attack", "add-sent", "--sentence", " "]);
    fails_with(&run(&empty), 78, "--sentence");
    assert!(!out.exists());
}

#[test]
fn defend_poisoning_flags_without_poisoning_are_refused() {
    let f = fixture();
    let (c, m, ..) = f.paths();
    let d = scratch("no-poison");
    let run_dir = d.join("run");
    let run = s(&run_dir);
    // --rate once did nothing at all when the run poisons nothing.
    fails!(
        78,
        "--rate",
        "defend --run {run} --train {c} --test {c} --model {m} --rate 0.2"
    );
    fails!(
        78,
        "--trigger",
        "defend --run {run} --train {c} --test {c} --model {m} --trigger mb"
    );
    assert!(!d.join("run").exists());
}

#[test]
fn demo_overwrite_replaces_only_an_earlier_demo_run() {
    let d = scratch("demo-out");
    let keep = d.join("precious.txt");
    std::fs::write(&keep, "mine").unwrap();
    // `--out DIR --overwrite` once removed whatever DIR was (`--out .` removed the working dir).
    fails!(
        78,
        "not a btu demo run",
        "demo --out {} --overwrite --rows 200",
        s(&d)
    );
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "mine");
}

#[test]
fn a_file_named_twice_is_read_once() {
    let f = fixture();
    let (c, ..) = f.paths();
    let d = scratch("twice");
    let (p1, p2) = (d.join("p.parquet"), d.join("p2.parquet"));
    let o = s(&p1);
    let once = ok!("poison --input {c} --output {o} --attack add-word --rate 0.1");
    let o2 = s(&p2);
    let twice = ok!(
        "poison --input {c} {} {c} --output {o2} --attack add-word --rate 0.1",
        s(&f.corpus.with_file_name("clean.parquet"))
    );
    let clean_rows = 600;
    assert_eq!(
        twice["rows"].as_u64().unwrap(),
        once["rows"].as_u64().unwrap() + clean_rows,
        "{twice}"
    );
}

#[test]
fn max_len_beyond_the_position_table_is_78_on_both_backends() {
    let f = fixture();
    let (c, m, v, _) = f.paths();
    let d = scratch("maxlen");
    let (out, onnx) = (d.join("out"), d.join("m.onnx"));
    let (o, x) = (s(&out), s(&onnx));
    // tiny_model has 256 positions.
    fails!(
        78,
        "256 positions",
        "eval --model {v} --test {c} --out {o} --max-len 600 --backend candle"
    );
    fails!(
        78,
        "256 positions",
        "train --corpus {c} --model {m} --out {o} --max-len 600"
    );
    ok!("export-onnx --checkpoint {v} --out {x}");
    if btu::steps::eval::find_ort_library(None).is_err() {
        skipped("SKIPPED: ONNX Runtime is absent (make setup installs it): max_len on ort");
        return;
    }
    fails!(
        78,
        "256 positions",
        "eval --model {x} --test {c} --out {o} --max-len 600"
    );
    assert!(!out.exists());
}

/// Rewrite a checkpoint's tensors with `edit`, into a new model directory.
fn edited_checkpoint(
    name: &str,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, RawTensor>),
) -> PathBuf {
    let f = fixture();
    let ckpt = scratch(name).join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(f.victim.join(file), ckpt.join(file)).unwrap();
    }
    let mut st = read_safetensors(&f.victim.join("model.safetensors")).unwrap();
    edit(&mut st.tensors);
    std::fs::write(ckpt.join("model.safetensors"), safetensors_bytes(&st)).unwrap();
    ckpt
}

#[test]
fn a_classifier_head_of_the_wrong_shape_is_65_not_a_random_head() {
    let c = s(&fixture().corpus);
    let ckpt = edited_checkpoint("head", |t| {
        for (name, shape) in [("classifier.weight", 2), ("classifier.bias", 1)] {
            let x = t.get_mut(name).unwrap();
            x.shape[0] = 3;
            x.data = vec![0u8; x.shape.iter().product::<usize>() * 4];
            assert_eq!(x.shape.len(), shape);
        }
    });
    let (k, out) = (s(&ckpt), ckpt.with_file_name("out"));
    let o = s(&out);
    fails!(
        65,
        "classifier head",
        "eval --model {k} --test {c} --out {o} --backend candle"
    );
    fails!(
        65,
        "classifier head",
        "export-onnx --checkpoint {k} --out {o}/m.onnx"
    );
    assert!(!out.exists());
}

#[test]
fn a_loss_that_becomes_nan_stops_training_with_65_and_no_state() {
    let c = s(&fixture().corpus);
    // A head whose (finite) biases are f32::MAX apart: the loss of every row labelled 1 is
    // infinite from the first step.
    let ckpt = edited_checkpoint("diverge", |t| {
        let b = t.get_mut("classifier.bias").unwrap();
        b.data = [f32::MAX, -f32::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
    });
    let d = ckpt.parent().unwrap().to_path_buf();
    let (k, out) = (s(&ckpt), d.join("out"));
    fails!(
        65,
        "diverged",
        "train --corpus {c} --model {k} --out {} --epochs 1",
        s(&out)
    );
    assert!(!out.exists());
    let partial = partial_dir(&d, "out");
    assert!(
        partial.is_none(),
        "no resume state behind a run that completed no epoch"
    );
    no_leftovers(&d);
}

#[test]
fn nan_in_a_mask_table_is_65_and_writes_no_checkpoint() {
    let f = fixture();
    let d = scratch("nan-masks");
    let batch = btu::io::tables::read_ipc(&f.unlearned.join("dimension_masks.arrow")).unwrap();
    let n = batch.num_rows();
    assert!(n > 0, "the fixture replaced some dimensions");
    let mut cols = batch.columns().to_vec();
    cols[batch.schema().index_of("written").unwrap()] =
        Arc::new(Float32Array::from(vec![f32::NAN; n]));
    let masks = d.join("masks.arrow");
    let bad = RecordBatch::try_new(batch.schema(), cols).unwrap();
    btu::io::tables::write_ipc(&masks, &bad, true).unwrap();
    let (v, k, out) = (s(&f.victim), s(&masks), d.join("out"));
    fails!(
        65,
        "written",
        "apply-masks --checkpoint {v} --masks {k} --out {}",
        s(&out)
    );
    assert!(!out.exists());
    no_leftovers(&d);
}

#[test]
fn init_model_sizes_that_make_no_model_are_78() {
    let c = s(&fixture().corpus);
    let out = scratch("init").join("m");
    let o = s(&out);
    for flag in [
        "--hidden",
        "--max-position",
        "--num-labels",
        "--layers",
        "--heads",
    ] {
        fails!(
            78,
            flag,
            "init-model --out {o} --corpus {c} --vocab-size 200 {flag} 0"
        );
    }
    assert!(!out.exists());
}

#[test]
fn duplicate_column_names_are_65_and_dictionary_text_is_read() {
    let d = scratch("columns");
    let dup = d.join("dup.parquet");
    let texts = Arc::new(StringArray::from(vec!["a good film", "a bad film"]));
    let labels = Arc::new(Int64Array::from(vec![1, 0]));
    write_batch(
        &dup,
        vec![("text", texts.clone()), ("text", texts), ("label", labels)],
    );
    let out = d.join("out.parquet");
    let o = s(&out);
    fails!(
        65,
        "appears more than once",
        "poison --input {} --output {o} --attack add-word",
        s(&dup)
    );
    // Dictionary-encoded text (as many writers store low-cardinality strings) is text.
    let dict = d.join("dict.parquet");
    let keys = Int32Array::from((0..40).map(|i| i % 2).collect::<Vec<_>>());
    let values = StringArray::from(vec!["a good film", "a bad film"]);
    let text = DictionaryArray::<Int32Type>::try_new(keys, Arc::new(values)).unwrap();
    assert!(matches!(text.data_type(), DataType::Dictionary(_, _)));
    let labels = Int64Array::from((0..40).map(|i| i % 2).collect::<Vec<i64>>());
    write_batch(
        &dict,
        vec![("text", Arc::new(text)), ("label", Arc::new(labels))],
    );
    let sum = ok!(
        "poison --input {} --output {o} --attack add-word --rate 0.2",
        s(&dict)
    );
    assert_eq!(sum["rows"].as_u64(), Some(40), "{sum}");
}

// ------------------------------------------------------------------ lost or mixed-up work

#[test]
fn concurrent_writers_of_one_new_output_have_exactly_one_winner() {
    let c = s(&fixture().corpus);
    let d = scratch("race");
    let o = d.join("poisoned.parquet");
    let line = format!(
        "poison --input {c} --output {} --attack add-word --seed",
        s(&o)
    );
    let spawn = |i: usize| {
        let mut args = words(&line);
        let seed = i.to_string();
        args.push(&seed);
        btu()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let children: Vec<_> = (0..6).map(spawn).collect();
    let codes: Vec<i32> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap())
        .collect();
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 1, "{codes:?}");
    assert!(codes.iter().all(|&c| c == 0 || c == 73), "{codes:?}");
    no_leftovers(&d);
}

/// Start `args`, wait until `ready()` holds, then SIGKILL it.
fn kill_when(args: &[&str], ready: impl Fn() -> bool) {
    let mut child = btu()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ready() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{args:?} ended ({st}) before the point to kill it");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{args:?} never got there"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn train_runs_with_other_seeds_on_one_out_keep_their_own_resume_state() {
    let m = s(&fixture().model);
    let d = scratch("seeds");
    let big = d.join("big.parquet");
    synth_corpus(&big, 3000, 9);
    let (out, straight) = (d.join("ckpt"), d.join("straight"));
    let (c, o) = (s(&big), s(&out));
    let train = |out: &str, seed: u32, epochs: u32| {
        format!("train --corpus {c} --model {m} --out {out} --epochs {epochs} --lr 1e-3 --seed {seed} --overwrite")
    };
    ok!("{}", train(s(&straight), 1, 3));
    // Seed 1 is killed after its first epoch.
    let epoch_done = || {
        std::fs::read_dir(&d).unwrap().flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with(".ckpt.partial-") && e.path().join("epoch-0/epoch.json").exists()
        })
    };
    kill_when(&words(&train(o, 1, 3)), epoch_done);
    // Seed 2 runs to the end on the same --out: it must not touch seed 1's state.
    let two = ok!("{}", train(o, 2, 3));
    assert!(
        two["resumed_from_epoch"].is_null(),
        "seed 2 started from scratch: {two}"
    );
    assert!(
        epoch_done(),
        "seed 1's completed epoch survived seed 2's run"
    );
    // Seed 1 resumes from its own epoch and ends with the bytes of an uninterrupted seed-1 run.
    let one = ok!("{}", train(o, 1, 3));
    assert!(
        one["resumed_from_epoch"].as_u64().is_some_and(|e| e >= 2),
        "{one}"
    );
    let weights = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert!(
        weights(&out) == weights(&straight),
        "resumed seed-1 run equals the straight one"
    );
    // An identical run while one holds the state is refused, not interleaved.
    let long = train(o, 3, 40);
    let mut first = btu()
        .args(words(&long))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while partial_dir(&d, "ckpt").is_none_or(|p| !p.join("state.json").exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the first run never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = run(&words(&long));
    first.kill().unwrap();
    first.wait().unwrap();
    fails_with(&second, 73, "another btu train");
}

#[test]
fn exports_into_one_folder_keep_their_own_tokenizers() {
    let f = fixture();
    let d = scratch("exports");
    // A second model with another vocabulary.
    let other_corpus = d.join("other.parquet");
    synth_corpus(&other_corpus, 300, 77);
    let other = d.join("other-model");
    tiny_model(&other, &other_corpus, 150);
    let (a, b) = (d.join("onnx/a.onnx"), d.join("onnx/b.onnx"));
    ok!("export-onnx --checkpoint {} --out {}", s(&f.victim), s(&a));
    let read = |name: &str| std::fs::read(d.join("onnx").join(name)).unwrap();
    let shared = read("tokenizer.json");
    ok!(
        "export-onnx --checkpoint {} --out {} --overwrite",
        s(&other),
        s(&b)
    );
    assert!(
        read("tokenizer.json") == shared,
        "b did not replace a's tokenizer"
    );
    assert!(read("a.tokenizer.json") == shared, "a has its own copy");
    assert!(
        read("b.tokenizer.json") != shared,
        "b has its own tokenizer"
    );
    if btu::steps::eval::find_ort_library(None).is_err() {
        skipped("SKIPPED: ONNX Runtime is absent (make setup installs it): eval of both exports");
        return;
    }
    for (model, corpus) in [(&a, &f.corpus), (&b, &other_corpus)] {
        let e = model.with_extension("eval");
        let sum = ok!(
            "eval --model {} --test {} --out {}",
            s(model),
            s(corpus),
            s(&e)
        );
        assert!(sum["acc"].as_f64().is_some(), "{sum}");
    }
}

#[test]
fn unwritable_outputs_fail_before_training_and_leftovers_of_killed_runs_go() {
    let (c, m, _, sus) = fixture().paths();
    let d = scratch("unwritable");
    let t0 = Instant::now();
    let o = "/proc/btu-cannot-write-here";
    fails!(
        73,
        o,
        "train --corpus {c} --model {m} --out {o} --epochs 50"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "refused at the start, not after 50 epochs"
    );
    // A temporary file a killed scan left (its process is gone) is removed by the next run.
    let out = d.join("flagged.parquet");
    let stale = d.join(".flagged.parquet.tmp-4999999-abcdef");
    std::fs::write(&stale, b"half a file").unwrap();
    ok!(
        "scan --corpus {c} --suspicious {sus} --tokenizer {m} --out {}",
        s(&out)
    );
    assert!(!stale.exists(), "stale temp file removed");
    no_leftovers(&d);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o044,
            0o044,
            "readable by group and others (mode {mode:o})"
        );
    }
}

#[test]
fn defend_checks_clean_overlap_first_and_can_drop_it() {
    let (c, m, _, _) = fixture().paths();
    let d = scratch("overlap");
    // The first 100 rows of the corpus the fixture poisoned (90 % of them unchanged by poisoning).
    let test = d.join("test.parquet");
    let (texts, labels) = btu::demo::synth::generate(600, 3);
    let b = btu::io::tables::corpus_batch(&texts[..100], &labels[..100]).unwrap();
    btu::io::tables::write_parquet(&test, &b, true).unwrap();
    let run_dir = d.join("run");
    let (r, t) = (s(&run_dir), s(&test));
    let line = format!(
        "defend --run {r} --train {c} --test {t} --clean {c} --model {m} --attack add-word \
         --epochs 1 --lr 1e-3 --clean-epochs 1 --clean-lr 1e-4 --backend candle --device cpu"
    );
    let t0 = Instant::now();
    fails!(78, "--drop-overlap", "{line}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "refused before training"
    );
    assert!(!run_dir.join("detect").exists(), "no step ran");
    let sum = ok!("{line} --drop-overlap");
    let dropped = &sum["clean_rows_dropped"];
    assert!(dropped.as_u64().is_some_and(|n| n > 0), "{dropped}");
}

// ---------------------------------------------------------------------- SIGKILL and rerun

/// Kill the command `make(out)` at several points, check that whatever it left under `out` is
/// either absent or complete (the bytes of an uninterrupted run), rerun it with `--overwrite`,
/// and compare `files` with the uninterrupted run's.
fn killed_rerun_gives_same_bytes(name: &str, make: impl Fn(&Path) -> String, files: &[&str]) {
    let d = scratch(name);
    let (straight, killed) = (d.join("straight"), d.join("killed"));
    ok!("{}", make(&straight));
    let same = |f: &str| std::fs::read(straight.join(f)).ok() == std::fs::read(killed.join(f)).ok();
    for delay_ms in [30u64, 150, 400] {
        let line = make(&killed);
        let mut child = btu()
            .args(words(&line))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        for f in files {
            let whole = !killed.join(f).exists() || same(f);
            assert!(
                whole,
                "{name}: {f} left incomplete by a kill at {delay_ms} ms"
            );
        }
        ok!("{line} --overwrite");
        for f in files {
            assert!(
                same(f),
                "{name}: {f} differs after a kill at {delay_ms} ms and a rerun"
            );
        }
        no_leftovers(&d);
        if killed.is_dir() {
            no_leftovers(&killed);
        }
    }
}

#[test]
fn sigkill_then_rerun_gives_the_same_bytes_for_every_long_command() {
    let (c, m, v, sus) = fixture().paths();
    let dir = |out: &Path| {
        std::fs::create_dir_all(out).unwrap();
        s(out).to_string()
    };
    killed_rerun_gives_same_bytes(
        "kill-detect",
        |o| format!("detect --corpus {c} --model {m} --out {} --alpha 2", s(o)),
        &["token_scores.arrow", "suspicious_tokens.arrow"],
    );
    killed_rerun_gives_same_bytes(
        "kill-train",
        |o| {
            format!(
                "train --corpus {c} --model {m} --out {} --epochs 2 --lr 1e-3",
                s(o)
            )
        },
        &["model.safetensors", "config.json"],
    );
    killed_rerun_gives_same_bytes(
        "kill-unlearn",
        |o| {
            format!(
                "unlearn --checkpoint {v} --reference {m} --suspicious {sus} --out {} \
                 --threshold frobenius --clean-corpus {c} --clean-epochs 1 --clean-lr 1e-4",
                s(o)
            )
        },
        &["model.safetensors", "dimension_masks.arrow"],
    );
    killed_rerun_gives_same_bytes(
        "kill-scan",
        |o| {
            format!(
                "scan --corpus {c} --suspicious {sus} --tokenizer {m} --out {}/f.parquet",
                dir(o)
            )
        },
        &["f.parquet"],
    );
    killed_rerun_gives_same_bytes(
        "kill-export",
        |o| format!("export-onnx --checkpoint {v} --out {}/m.onnx", dir(o)),
        &["m.onnx", "m.tokenizer.json"],
    );
}

// ------------------------------------------------------------------- object store faults

#[test]
fn a_store_that_dies_mid_read_is_75_and_writes_nothing() {
    let Some(moto) = Moto::start("lake") else {
        return;
    };
    let (_, m, _, sus) = fixture().paths();
    let d = scratch("s3-dies");
    // Many objects, so that the scan is still reading when the server goes.
    let part = d.join("part.parquet");
    synth_corpus(&part, 400, 1);
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let script = format!(
        "import boto3,sys\nc=boto3.client('s3', endpoint_url='{}', aws_access_key_id='testing', \
         aws_secret_access_key='x', region_name='us-east-1')\nb=open(sys.argv[1],'rb').read()\n\
         for i in range(60): c.put_object(Bucket='lake', Key=f'corpus/p{{i:03}}.parquet', Body=b)",
        moto.endpoint
    );
    let status = std::process::Command::new(&py)
        .args(["-c", &script, s(&part)])
        .status();
    assert!(status.unwrap().success());
    let out = d.join("flagged.parquet");
    let mut c = btu();
    c.envs(moto.env());
    c.envs([
        ("BTU_S3_MAX_RETRIES", "1"),
        ("BTU_S3_RETRY_TIMEOUT_S", "3"),
        ("BTU_S3_CONNECT_TIMEOUT_S", "1"),
    ]);
    let line = format!(
        "scan --corpus s3://lake/corpus/ --suspicious {sus} --tokenizer {m} --out {}",
        s(&out)
    );
    let child = c
        .args(words(&line))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(moto); // the server stops
    let o = child.wait_with_output().unwrap();
    fails_with(&o, 75, "retry");
    assert!(!out.exists(), "nothing written");
    no_leftovers(&d);
}
