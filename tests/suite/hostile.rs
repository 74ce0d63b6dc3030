//! Hostile input and faults (docs/reliability.md): every reproduction of the probe that once
//! panicked, exited 0 with garbage, or lost or mixed up work, plus SIGKILL at several points of
//! each long-running command. Each case gets its documented exit code, one line on stderr, no
//! summary on stdout, and no output that looks complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, DictionaryArray, Int32Array, Int64Array, RecordBatch};
use arrow::array::{Float32Array, StringArray};
use arrow::datatypes::{DataType, Field, Int32Type, Schema};
use btu::model::checkpoint::{read_safetensors, safetensors_bytes, RawTensor};
use tempfile::TempDir;

use crate::fixtures::{tiny, victim as fixture, Tiny, Victim};
use crate::util::*;

/// A fresh directory of the test's own.
fn scratch() -> TempDir {
    tempfile::tempdir().unwrap()
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
    let tmp = scratch();
    let d = tmp.path();
    let bad = d.join("bad.parquet");
    let mut bytes = b"PAR1".to_vec();
    bytes.extend(vec![0u8; 500]);
    bytes.extend(1000u32.to_le_bytes());
    bytes.extend(b"PAR1");
    std::fs::write(&bad, bytes).unwrap();
    let (b, o, po) = (s(&bad), d.join("out"), d.join("out.parquet"));
    let (o, po) = (s(&o), s(&po));
    btu!("detect --corpus {b} --model {m} --out {o}").fails_with(65, "footer");
    btu!("poison --input {b} --output {po} --attack add-word").fails_with(65, "footer");
    btu!("scan --corpus {b} --suspicious {sus} --tokenizer {m} --out {po}")
        .fails_with(65, "footer");
    btu!("sql --table c={b} SELECT").fails_with(65, "footer");
    assert!(
        std::fs::read_dir(d).unwrap().count() == 1,
        "nothing but the input"
    );
}

#[test]
fn invalid_bucket_names_and_endpoints_are_78_not_panics() {
    let f = fixture();
    let tmp = scratch();
    let d = tmp.path();
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
    btu(bad_bucket).fails_with(78, "bucket");
    let sql = [
        "sql",
        "--table",
        "t=s3://bad bucket/t.arrow",
        "SELECT * FROM t",
    ];
    btu(sql).fails_with(78, "bucket");
    let s3 = words("detect --corpus s3://lake/c.parquet --model")
        .into_iter()
        .chain([m, "--out", o])
        .collect::<Vec<_>>();
    btu(&s3)
        .env("AWS_ENDPOINT_URL", "not a url")
        .fails_with(78, "AWS_ENDPOINT_URL");
    btu(&s3)
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("BTU_S3_MAX_RETRIES", "abc")
        .fails_with(78, "BTU_S3_MAX_RETRIES");
    assert!(!out.exists());
}

// ------------------------------------------------------- exit 0 with NaN or meaningless output

#[test]
fn non_finite_or_absurd_learning_rates_are_refused_before_any_work() {
    let f = fixture();
    let (c, m, v, sus) = f.paths();
    let tmp = scratch();
    let d = tmp.path();
    let out = d.join("out");
    let o = s(&out);
    for lr in ["NaN", "inf", "1e30", "0", "-1"] {
        btu!("train --corpus {c} --model {m} --out {o} --lr={lr}").fails_with(78, "--lr");
        btu!("detect --corpus {c} --model {m} --out {o} --lr={lr}").fails_with(78, "--lr");
    }
    let detect = format!("detect --corpus {c} --model {m} --out {o}");
    btu!("{detect} --weight-decay NaN").fails_with(78, "--weight-decay");
    btu!("{detect} --epochs 0").fails_with(78, "--epochs");
    btu!("{detect} --batch-size 0").fails_with(78, "--batch-size");
    btu!("{detect} --max-len 0").fails_with(78, "--max-len");
    btu!("{detect} --max-len 1").fails_with(78, "--max-len");
    let unlearn = format!("unlearn --checkpoint {v} --reference {m} --suspicious {sus} --out {o}");
    btu!("{unlearn} --clean-corpus {c} --clean-lr NaN").fails_with(78, "--clean-lr");
    for rate in ["NaN", "0", "1.5"] {
        btu!("{unlearn} --min-flip-rate={rate}").fails_with(78, "--min-flip-rate");
    }
    assert!(!out.exists());
    assert!(
        partial_dir(d, "out").is_none(),
        "a refused train leaves no resume state"
    );
    no_leftovers(d);
}

#[test]
fn defend_refuses_bad_values_before_its_first_step() {
    let f = fixture();
    let (c, m, _, _) = f.paths();
    let tmp = scratch();
    let d = tmp.path();
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
        btu!("{base} {flag}").fails_with(78, needle);
        assert!(!run_dir.exists(), "{flag}: no step ran");
    }
}

#[test]
fn a_corpus_of_empty_texts_flags_nothing_and_fails() {
    let f = fixture();
    let tmp = scratch();
    let d = tmp.path();
    let corpus = d.join("empty.parquet");
    let texts: Vec<String> = vec![String::new(); 50];
    let labels: Vec<i64> = (0..50).map(|i| i % 2).collect();
    let batch = btu::io::tables::corpus_batch(&texts, &labels).unwrap();
    btu::io::tables::write_parquet(&corpus, &batch, true).unwrap();
    let (e, m, out) = (s(&corpus), s(&f.model), d.join("out"));
    btu!("detect --corpus {e} --model {m} --out {}", s(&out)).fails_with(65, "empty");
    assert!(!out.exists());
}

#[test]
fn targets_and_rewrite_columns_outside_the_data_are_refused() {
    let f = fixture();
    let (c, _, v, _) = f.paths();
    let tmp = scratch();
    let d = tmp.path();
    let out = d.join("out.parquet");
    let o = s(&out);
    let eval = format!("eval --model {v} --test {c} --out {o}");
    btu!("{eval} --target 5 --backend candle").fails_with(78, "--target");
    btu!("{eval} --attack add-word --repeats 0").fails_with(78, "--repeats");
    let poison = format!("poison --input {c} --output {o}");
    btu!("{poison} --attack add-word --target 5").fails_with(78, "--target");
    btu!("{poison} --attack rewrite --rewrite-col id").fails_with(65, "rewrite column 'id'");
    // An attack without what it inserts measured nothing (ASR null) and exited 0.
    btu!("{eval} --attack rewrite").fails_with(78, "--rewrite-col");
    Btu::line(&eval)
        .args(["--attack", "add-sent", "--sentence", " "])
        .fails_with(78, "--sentence");
    assert!(!out.exists());
}

#[test]
fn defend_poisoning_flags_without_poisoning_are_refused() {
    let f = fixture();
    let (c, m, ..) = f.paths();
    let tmp = scratch();
    let d = tmp.path();
    let run_dir = d.join("run");
    let run = s(&run_dir);
    // --rate once did nothing at all when the run poisons nothing.
    btu!("defend --run {run} --train {c} --test {c} --model {m} --rate 0.2")
        .fails_with(78, "--rate");
    btu!("defend --run {run} --train {c} --test {c} --model {m} --trigger mb")
        .fails_with(78, "--trigger");
    assert!(!d.join("run").exists());
}

#[test]
fn demo_overwrite_replaces_only_an_earlier_demo_run() {
    let tmp = scratch();
    let d = tmp.path();
    let keep = d.join("precious.txt");
    std::fs::write(&keep, "mine").unwrap();
    // `--out DIR --overwrite` once removed whatever DIR was (`--out .` removed the working dir).
    btu!("demo --out {} --overwrite --rows 200", s(d)).fails_with(78, "not a btu demo run");
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "mine");
}

#[test]
fn a_file_named_twice_is_read_once() {
    let f = fixture();
    let (c, ..) = f.paths();
    let tmp = scratch();
    let d = tmp.path();
    let (p1, p2) = (d.join("p.parquet"), d.join("p2.parquet"));
    let o = s(&p1);
    let once = btu!("poison --input {c} --output {o} --attack add-word --rate 0.1").ok();
    let o2 = s(&p2);
    let twice = btu!(
        "poison --input {c} {} {c} --output {o2} --attack add-word --rate 0.1",
        s(&f.clean)
    )
    .ok();
    assert_eq!(
        twice["rows"].as_u64().unwrap(),
        once["rows"].as_u64().unwrap() + Victim::CLEAN_ROWS as u64,
        "{twice}"
    );
}

#[test]
fn max_len_beyond_the_position_table_is_78_on_both_backends() {
    let f = fixture();
    let (c, m, v, _) = f.paths();
    let tmp = scratch();
    let d = tmp.path();
    let (out, onnx) = (d.join("out"), d.join("m.onnx"));
    let (o, x) = (s(&out), s(&onnx));
    // tiny_model has 256 positions.
    btu!("eval --model {v} --test {c} --out {o} --max-len 600 --backend candle")
        .fails_with(78, "256 positions");
    btu!("train --corpus {c} --model {m} --out {o} --max-len 600").fails_with(78, "256 positions");
    btu!("export-onnx --checkpoint {v} --out {x}").ok();
    if !have_ort("max_len on ort") {
        return;
    }
    btu!("eval --model {x} --test {c} --out {o} --max-len 600").fails_with(78, "256 positions");
    assert!(!out.exists());
}

/// Copy the victim and rewrite its tensors with `edit`: the directory `ckpt` in a new scratch
/// directory.
fn edited_checkpoint(
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, RawTensor>),
) -> (TempDir, PathBuf) {
    let f = fixture();
    let tmp = scratch();
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(f.victim.join(file), ckpt.join(file)).unwrap();
    }
    let mut st = read_safetensors(&f.victim.join("model.safetensors")).unwrap();
    edit(&mut st.tensors);
    std::fs::write(ckpt.join("model.safetensors"), safetensors_bytes(&st)).unwrap();
    (tmp, ckpt)
}

#[test]
fn a_classifier_head_of_the_wrong_shape_is_65_not_a_random_head() {
    let c = s(&fixture().corpus);
    let (_tmp, ckpt) = edited_checkpoint(|t| {
        for (name, shape) in [("classifier.weight", 2), ("classifier.bias", 1)] {
            let x = t.get_mut(name).unwrap();
            x.shape[0] = 3;
            x.data = vec![0u8; x.shape.iter().product::<usize>() * 4];
            assert_eq!(x.shape.len(), shape);
        }
    });
    let (k, out) = (s(&ckpt), ckpt.with_file_name("out"));
    let o = s(&out);
    btu!("eval --model {k} --test {c} --out {o} --backend candle")
        .fails_with(65, "classifier head");
    btu!("export-onnx --checkpoint {k} --out {o}/m.onnx").fails_with(65, "classifier head");
    assert!(!out.exists());
}

#[test]
fn a_loss_that_becomes_nan_stops_training_with_65_and_no_state() {
    let c = s(&fixture().corpus);
    // A head whose (finite) biases are f32::MAX apart: the loss of every row labelled 1 is
    // infinite from the first step.
    let (_tmp, ckpt) = edited_checkpoint(|t| {
        let b = t.get_mut("classifier.bias").unwrap();
        b.data = [f32::MAX, -f32::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
    });
    let d = ckpt.parent().unwrap();
    let (k, out) = (s(&ckpt), d.join("out"));
    btu!(
        "train --corpus {c} --model {k} --out {} --epochs 1",
        s(&out)
    )
    .fails_with(65, "diverged")
    .and_no_output(&out);
    let partial = partial_dir(d, "out");
    assert!(
        partial.is_none(),
        "no resume state behind a run that completed no epoch"
    );
    no_leftovers(d);
}

#[test]
fn nan_in_a_mask_table_is_65_and_writes_no_checkpoint() {
    let f = fixture();
    let tmp = scratch();
    let d = tmp.path();
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
    btu!("apply-masks --checkpoint {v} --masks {k} --out {}", s(&out)).fails_with(65, "written");
    assert!(!out.exists());
    no_leftovers(d);
}

#[test]
fn init_model_sizes_that_make_no_model_are_78() {
    let c = s(&fixture().corpus);
    let tmp = scratch();
    let out = tmp.path().join("m");
    let o = s(&out);
    for flag in [
        "--hidden",
        "--max-position",
        "--num-labels",
        "--layers",
        "--heads",
    ] {
        btu!("init-model --out {o} --corpus {c} --vocab-size 200 {flag} 0").fails_with(78, flag);
    }
    assert!(!out.exists());
}

#[test]
fn duplicate_column_names_are_65_and_dictionary_text_is_read() {
    let tmp = scratch();
    let d = tmp.path();
    let dup = d.join("dup.parquet");
    let texts = Arc::new(StringArray::from(vec!["a good film", "a bad film"]));
    let labels = Arc::new(Int64Array::from(vec![1, 0]));
    write_batch(
        &dup,
        vec![("text", texts.clone()), ("text", texts), ("label", labels)],
    );
    let out = d.join("out.parquet");
    let o = s(&out);
    btu!("poison --input {} --output {o} --attack add-word", s(&dup))
        .fails_with(65, "appears more than once");
    // Dictionary-encoded text (as many writers store low-cardinality strings) is text.
    let dict = d.join("dict.parquet");
    let keys = Int32Array::from((0..40).map(|i| i % 2).collect::<Vec<_>>());
    let values = StringArray::from(vec!["a good film", "a bad film"]);
    let text = DictionaryArray::<Int32Type>::try_new(keys, Arc::new(values)).unwrap();
    let labels = Int64Array::from((0..40).map(|i| i % 2).collect::<Vec<i64>>());
    write_batch(
        &dict,
        vec![("text", Arc::new(text)), ("label", Arc::new(labels))],
    );
    // The file really holds dictionary-encoded text (its Arrow schema is kept in the file).
    let file = std::fs::File::open(&dict).unwrap();
    let schema = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .schema()
        .clone();
    let stored = schema.field_with_name("text").unwrap().data_type();
    assert!(matches!(stored, DataType::Dictionary(_, _)), "{stored}");
    let sum = btu!(
        "poison --input {} --output {o} --attack add-word --rate 0.2",
        s(&dict)
    )
    .ok();
    assert_eq!(sum["rows"].as_u64(), Some(40), "{sum}");
}

// ------------------------------------------------------------------ lost or mixed-up work

#[test]
fn concurrent_writers_of_one_new_output_have_exactly_one_winner() {
    let c = s(&fixture().corpus);
    let tmp = scratch();
    let d = tmp.path();
    let o = d.join("poisoned.parquet");
    let line = format!(
        "poison --input {c} --output {} --attack add-word --seed",
        s(&o)
    );
    let spawn = |i: usize| Btu::line(&line).arg(i.to_string()).spawn();
    let children: Vec<_> = (0..6).map(spawn).collect();
    let codes: Vec<i32> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap())
        .collect();
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 1, "{codes:?}");
    assert!(codes.iter().all(|&c| c == 0 || c == 73), "{codes:?}");
    no_leftovers(d);
}

/// Start `line`, wait until `ready()` holds, then SIGKILL it.
fn kill_when(line: &str, ready: impl Fn() -> bool) {
    let mut child = Btu::line(line).spawn();
    let t0 = Instant::now();
    while !ready() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{line} ended ({st}) before the point to kill it");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{line} never got there"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn train_runs_with_other_seeds_on_one_out_keep_their_own_resume_state() {
    let m = s(&fixture().model);
    let tmp = scratch();
    let d = tmp.path();
    let big = d.join("big.parquet");
    synth_corpus(&big, 3000, 9);
    let (out, straight) = (d.join("ckpt"), d.join("straight"));
    let (c, o) = (s(&big), s(&out));
    let train = |out: &str, seed: u32, epochs: u32| {
        format!("train --corpus {c} --model {m} --out {out} --epochs {epochs} --lr 1e-3 --seed {seed} --overwrite")
    };
    btu!("{}", train(s(&straight), 1, 3)).ok();
    // Seed 1 is killed after its first epoch.
    let epoch_done = || {
        std::fs::read_dir(d).unwrap().flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with(".ckpt.partial-") && e.path().join("epoch-0/epoch.json").exists()
        })
    };
    kill_when(&train(o, 1, 3), epoch_done);
    // Seed 2 runs to the end on the same --out: it must not touch seed 1's state.
    let two = btu!("{}", train(o, 2, 3)).ok();
    assert!(
        two["resumed_from_epoch"].is_null(),
        "seed 2 started from scratch: {two}"
    );
    assert!(
        epoch_done(),
        "seed 1's completed epoch survived seed 2's run"
    );
    // Seed 1 resumes from its own epoch and ends with the bytes of an uninterrupted seed-1 run.
    let one = btu!("{}", train(o, 1, 3)).ok();
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
    let mut first = Btu::line(&long).spawn();
    let t0 = Instant::now();
    while partial_dir(d, "ckpt").is_none_or(|p| !p.join("state.json").exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the first run never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = Btu::line(&long).run();
    first.kill().unwrap();
    first.wait().unwrap();
    Failure::check(second, &long, 73, "another btu train");
}

#[test]
fn exports_into_one_folder_keep_their_own_tokenizers() {
    let f = fixture();
    let tmp = scratch();
    let d = tmp.path();
    // A second model with another vocabulary.
    let (other, other_corpus) = (&tiny().model, &tiny().corpus);
    let (a, b) = (d.join("onnx/a.onnx"), d.join("onnx/b.onnx"));
    btu!("export-onnx --checkpoint {} --out {}", s(&f.victim), s(&a)).ok();
    let read = |name: &str| std::fs::read(d.join("onnx").join(name)).unwrap();
    let shared = read("tokenizer.json");
    btu!(
        "export-onnx --checkpoint {} --out {} --overwrite",
        s(other),
        s(&b)
    )
    .ok();
    assert!(
        read("tokenizer.json") == shared,
        "b did not replace a's tokenizer"
    );
    assert!(read("a.tokenizer.json") == shared, "a has its own copy");
    assert!(
        read("b.tokenizer.json") != shared,
        "b has its own tokenizer"
    );
    if !have_ort("eval of both exports") {
        return;
    }
    // Each export evaluates with its own tokenizer on its own corpus.
    for (model, corpus, rows) in [
        (&a, &f.corpus, Victim::CLEAN_ROWS),
        (&b, other_corpus, Tiny::ROWS),
    ] {
        let e = model.with_extension("eval");
        let sum = btu!(
            "eval --model {} --test {} --out {}",
            s(model),
            s(corpus),
            s(&e)
        )
        .ok();
        assert_eq!(sum["rows"].as_u64(), Some(rows as u64), "{sum}");
        assert!(
            sum["acc"]
                .as_f64()
                .is_some_and(|a| (0.0..=1.0).contains(&a)),
            "{sum}"
        );
    }
}

#[test]
fn unwritable_outputs_fail_before_training_and_leftovers_of_killed_runs_go() {
    let (c, m, _, sus) = fixture().paths();
    let tmp = scratch();
    let d = tmp.path();
    let t0 = Instant::now();
    let o = "/proc/btu-cannot-write-here";
    btu!("train --corpus {c} --model {m} --out {o} --epochs 50").fails_with(73, o);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "refused at the start, not after 50 epochs"
    );
    // A temporary file a killed scan left (its process is gone) is removed by the next run.
    let out = d.join("flagged.parquet");
    let stale = d.join(".flagged.parquet.tmp-4999999-abcdef");
    std::fs::write(&stale, b"half a file").unwrap();
    btu!(
        "scan --corpus {c} --suspicious {sus} --tokenizer {m} --out {}",
        s(&out)
    )
    .ok();
    assert!(!stale.exists(), "stale temp file removed");
    no_leftovers(d);
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
    let tmp = scratch();
    let d = tmp.path();
    // The first 100 rows of the corpus the fixture poisoned (90 % of them unchanged by poisoning).
    let test = d.join("test.parquet");
    let (texts, labels) = btu::demo::synth::generate(Victim::CLEAN_ROWS, Victim::SEED);
    let b = btu::io::tables::corpus_batch(&texts[..100], &labels[..100]).unwrap();
    btu::io::tables::write_parquet(&test, &b, true).unwrap();
    let run_dir = d.join("run");
    let (r, t) = (s(&run_dir), s(&test));
    let line = format!(
        "defend --run {r} --train {c} --test {t} --clean {c} --model {m} --attack add-word \
         --epochs 1 --lr 1e-3 --clean-epochs 1 --clean-lr 1e-4 --backend candle --device cpu"
    );
    let t0 = Instant::now();
    btu!("{line}").fails_with(78, "--drop-overlap");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "refused before training"
    );
    assert!(!run_dir.join("detect").exists(), "no step ran");
    let sum = btu!("{line} --drop-overlap").ok();
    let dropped = &sum["clean_rows_dropped"];
    assert!(dropped.as_u64().is_some_and(|n| n > 0), "{dropped}");
}

// ---------------------------------------------------------------------- SIGKILL and rerun

/// Kill the command `make(out)` at several points, check that whatever it left under `out` is
/// either absent or complete (the bytes of an uninterrupted run), rerun it with `--overwrite`,
/// and compare `files` with the uninterrupted run's.
fn killed_rerun_gives_same_bytes(name: &str, make: impl Fn(&Path) -> String, files: &[&str]) {
    let tmp = scratch();
    let d = tmp.path();
    let (straight, killed) = (d.join("straight"), d.join("killed"));
    btu!("{}", make(&straight)).ok();
    let same = |f: &str| std::fs::read(straight.join(f)).ok() == std::fs::read(killed.join(f)).ok();
    for delay_ms in [30u64, 150, 400] {
        let line = make(&killed);
        let mut child = Btu::line(&line).spawn();
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
        btu!("{line} --overwrite").ok();
        for f in files {
            assert!(
                same(f),
                "{name}: {f} differs after a kill at {delay_ms} ms and a rerun"
            );
        }
        no_leftovers(d);
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
    let tmp = scratch();
    let d = tmp.path();
    // Many objects, so that the scan is still reading when the server goes.
    let part = d.join("part.parquet");
    synth_corpus(&part, 400, 1);
    let objects: Vec<(String, &Path)> = (0..60)
        .map(|i| (format!("corpus/p{i:03}.parquet"), part.as_path()))
        .collect();
    moto.put(&objects);
    let out = d.join("flagged.parquet");
    let line = format!(
        "scan --corpus s3://lake/corpus/ --suspicious {sus} --tokenizer {m} --out {}",
        s(&out)
    );
    let child = Btu::line(&line)
        .envs(moto.env())
        .envs([
            ("BTU_S3_MAX_RETRIES", "1"),
            ("BTU_S3_RETRY_TIMEOUT_S", "3"),
            ("BTU_S3_CONNECT_TIMEOUT_S", "1"),
        ])
        .spawn_piped();
    std::thread::sleep(Duration::from_millis(300));
    drop(moto); // the server stops
    let o = child.wait_with_output().unwrap();
    Failure::check(o, line, 75, "retry").and_no_output(&out);
    no_leftovers(d);
}
