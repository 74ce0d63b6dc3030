//! Bad input: each case gives its documented exit code, a one-line error naming what failed,
//! and leaves no output behind.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{Field, Schema};
use common::*;

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    corpus: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.parquet");
        synth_corpus(&corpus, 200, 1);
        let model = dir.path().join("model");
        tiny_model(&model, &corpus, 300);
        Fixture {
            model,
            corpus,
            _dir: dir,
        }
    })
}

fn write_batch(path: &Path, cols: Vec<(&str, ArrayRef, bool)>) {
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, a, nullable)| Field::new(*n, a.data_type().clone(), *nullable))
            .collect::<Vec<_>>(),
    ));
    let batch =
        RecordBatch::try_new(schema, cols.into_iter().map(|(_, a, _)| a).collect()).unwrap();
    btu::io::tables::write_parquet(path, &batch, true).unwrap();
}

/// Run detect with `corpus`/`model` and check exit code, message and that `out` is absent.
fn expect_failure(
    corpus: &Path,
    model: &Path,
    out: &Path,
    code: i32,
    needle: &str,
    extra: &[&str],
) {
    let mut args = vec![
        "detect",
        "--corpus",
        s(corpus),
        "--model",
        s(model),
        "--out",
        s(out),
    ];
    if !extra.contains(&"--device") {
        args.extend_from_slice(&["--device", "cpu"]);
    }
    args.extend_from_slice(extra);
    let o = run(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {stderr}");
    assert!(o.stdout.is_empty(), "no summary on failure");
    if !(code == 73 && out.exists()) {
        assert!(!out.exists(), "output {} left behind", out.display());
    }
    // No staging directories either.
    if let Some(parent) = out.parent().filter(|p| p.is_dir()) {
        for e in std::fs::read_dir(parent).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            assert!(!name.contains(".tmp-"), "staging leftover {name}");
        }
    }
}

#[test]
fn missing_corpus_file_is_66() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    expect_failure(
        &d.path().join("nope.parquet"),
        &f.model,
        &d.path().join("out"),
        66,
        "nope.parquet",
        &[],
    );
}

#[test]
fn not_parquet_is_65() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("fake.parquet");
    std::fs::write(&p, "id,text,label\n1,hello,0\n").unwrap();
    expect_failure(
        &p,
        &f.model,
        &d.path().join("out"),
        65,
        "not a Parquet file",
        &[],
    );
}

#[test]
fn missing_text_column_is_65() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.parquet");
    write_batch(
        &p,
        vec![
            (
                "sentence",
                Arc::new(StringArray::from(vec!["a good film"])) as ArrayRef,
                false,
            ),
            (
                "label",
                Arc::new(Int64Array::from(vec![1])) as ArrayRef,
                false,
            ),
        ],
    );
    expect_failure(
        &p,
        &f.model,
        &d.path().join("out"),
        65,
        "missing text column 'text'",
        &[],
    );
}

#[test]
fn missing_label_column_is_65() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.parquet");
    write_batch(
        &p,
        vec![(
            "text",
            Arc::new(StringArray::from(vec!["a good film"])) as ArrayRef,
            false,
        )],
    );
    expect_failure(
        &p,
        &f.model,
        &d.path().join("out"),
        65,
        "missing label column 'label'",
        &[],
    );
}

#[test]
fn wrong_column_type_is_65() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.parquet");
    write_batch(
        &p,
        vec![
            (
                "text",
                Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
                false,
            ),
            (
                "label",
                Arc::new(Int64Array::from(vec![1, 0])) as ArrayRef,
                false,
            ),
        ],
    );
    expect_failure(
        &p,
        &f.model,
        &d.path().join("out"),
        65,
        "text column 'text' has type Int64",
        &[],
    );
    let p2 = d.path().join("c2.parquet");
    write_batch(
        &p2,
        vec![
            (
                "text",
                Arc::new(StringArray::from(vec!["good", "bad"])) as ArrayRef,
                false,
            ),
            (
                "label",
                Arc::new(StringArray::from(vec!["pos", "neg"])) as ArrayRef,
                false,
            ),
        ],
    );
    expect_failure(
        &p2,
        &f.model,
        &d.path().join("out"),
        65,
        "label column 'label' has type",
        &[],
    );
}

#[test]
fn null_texts_are_65() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.parquet");
    write_batch(
        &p,
        vec![
            (
                "text",
                Arc::new(StringArray::from(vec![Some("good"), None, Some("bad")])) as ArrayRef,
                true,
            ),
            (
                "label",
                Arc::new(Int64Array::from(vec![1, 0, 0])) as ArrayRef,
                false,
            ),
        ],
    );
    expect_failure(
        &p,
        &f.model,
        &d.path().join("out"),
        65,
        "null at row 1",
        &[],
    );
}

#[test]
fn empty_corpus_is_65() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty.parquet");
    let b = btu::io::tables::corpus_batch(&[], &[]).unwrap();
    btu::io::tables::write_parquet(&p, &b, true).unwrap();
    expect_failure(&p, &f.model, &d.path().join("out"), 65, "no rows", &[]);
    // A filter that keeps nothing is an empty corpus too.
    expect_failure(
        &f.corpus,
        &f.model,
        &d.path().join("out"),
        65,
        "no rows",
        &["--filter", "label > 5"],
    );
}

#[test]
fn label_outside_head_classes_is_65() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.parquet");
    let b = btu::io::tables::corpus_batch(
        &["good film".into(), "bad film".into(), "odd film".into()],
        &[1, 0, 5],
    )
    .unwrap();
    btu::io::tables::write_parquet(&p, &b, true).unwrap();
    expect_failure(
        &p,
        &f.model,
        &d.path().join("out"),
        65,
        "label 5 at row 2 is outside the model's 2 classes",
        &[],
    );
}

#[test]
fn model_without_weights_is_66() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(f.model.join(name), m.join(name)).unwrap();
    }
    expect_failure(
        &f.corpus,
        &m,
        &d.path().join("out"),
        66,
        "model.safetensors",
        &[],
    );
}

#[test]
fn model_without_tokenizer_is_66() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(f.model.join(name), m.join(name)).unwrap();
    }
    expect_failure(
        &f.corpus,
        &m,
        &d.path().join("out"),
        66,
        "tokenizer.json",
        &[],
    );
}

#[test]
fn corrupt_weights_are_65() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(f.model.join(name), m.join(name)).unwrap();
    }
    std::fs::write(
        m.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
    )
    .unwrap();
    expect_failure(
        &f.corpus,
        &m,
        &d.path().join("out"),
        65,
        "corrupt safetensors",
        &[],
    );
}

#[test]
fn unwritable_output_is_73() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let blocker = d.path().join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    expect_failure(
        &f.corpus,
        &f.model,
        &blocker.join("out"),
        73,
        "cannot create output",
        &[],
    );
}

#[test]
fn existing_output_is_73_and_untouched() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    expect_failure(&f.corpus, &f.model, &out, 73, "--overwrite", &[]);
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn bad_flags_are_usage_or_config_errors() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    expect_failure(
        &f.corpus,
        &f.model,
        &d.path().join("out"),
        78,
        "--alpha",
        &["--alpha", "0"],
    );
    expect_failure(
        &f.corpus,
        &f.model,
        &d.path().join("out"),
        78,
        "--filter",
        &["--filter", "no_such_col = 1"],
    );
    expect_failure(
        &f.corpus,
        &f.model,
        &d.path().join("out"),
        78,
        "--device",
        &["--device", "tpu"],
    );
    let o = run(&["detect", "--corpus", s(&f.corpus)]);
    assert_eq!(o.status.code(), Some(2));
}
