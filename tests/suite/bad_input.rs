//! Bad input: each case gives its documented exit code, a one-line error naming what failed,
//! and leaves no output behind.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{Field, Schema};

use crate::fixtures::tiny;
use crate::util::*;

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

/// `btu detect` of `corpus` with `model` into `out`, on the CPU unless `extra` names a device.
fn detect(corpus: &Path, model: &Path, out: &Path, extra: &[&str]) -> Btu {
    let b = btu([
        "detect",
        "--corpus",
        s(corpus),
        "--model",
        s(model),
        "--out",
        s(out),
    ]);
    let b = if extra.contains(&"--device") {
        b
    } else {
        b.args(["--device", "cpu"])
    };
    b.args(extra)
}

/// `detect` fails with `code` and `needle`, leaving neither `out` nor any staging entry in its
/// directory (when that is one).
fn refused(corpus: &Path, model: &Path, out: &Path, code: i32, needle: &str, extra: &[&str]) {
    let f = detect(corpus, model, out, extra)
        .fails_with(code, needle)
        .and_no_output(out);
    if let Some(dir) = out.parent().filter(|p| p.is_dir()) {
        f.and_no_leftovers(dir);
    }
}

#[test]
fn missing_corpus_file_is_66() {
    let f = tiny();
    let d = tempfile::tempdir().unwrap();
    refused(
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
    let f = tiny();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("fake.parquet");
    std::fs::write(&p, "id,text,label\n1,hello,0\n").unwrap();
    refused(
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
    let f = tiny();
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
    refused(
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
    let f = tiny();
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
    refused(
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
    let f = tiny();
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
    refused(
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
    refused(
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
    let f = tiny();
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
    refused(
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
    let f = tiny();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty.parquet");
    let b = btu::io::tables::corpus_batch(&[], &[]).unwrap();
    btu::io::tables::write_parquet(&p, &b, true).unwrap();
    refused(&p, &f.model, &d.path().join("out"), 65, "no rows", &[]);
    // A filter that keeps nothing is an empty corpus too.
    refused(
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
    let f = tiny();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.parquet");
    let b = btu::io::tables::corpus_batch(
        &["good film".into(), "bad film".into(), "odd film".into()],
        &[1, 0, 5],
    )
    .unwrap();
    btu::io::tables::write_parquet(&p, &b, true).unwrap();
    refused(
        &p,
        &f.model,
        &d.path().join("out"),
        65,
        "label 5 at row 2 is outside the model's 2 classes",
        &[],
    );
}

/// A copy of the tiny model's `files` only, in `dir/model`.
fn partial_model(dir: &Path, files: &[&str]) -> std::path::PathBuf {
    let m = dir.join("model");
    std::fs::create_dir(&m).unwrap();
    for name in files {
        std::fs::copy(tiny().model.join(name), m.join(name)).unwrap();
    }
    m
}

#[test]
fn model_without_weights_is_66() {
    let d = tempfile::tempdir().unwrap();
    let m = partial_model(d.path(), &["config.json", "tokenizer.json"]);
    let out = d.path().join("out");
    refused(&tiny().corpus, &m, &out, 66, "model.safetensors", &[]);
}

#[test]
fn model_without_tokenizer_is_66() {
    let d = tempfile::tempdir().unwrap();
    let m = partial_model(d.path(), &["config.json", "model.safetensors"]);
    let out = d.path().join("out");
    refused(&tiny().corpus, &m, &out, 66, "tokenizer.json", &[]);
}

#[test]
fn corrupt_weights_are_65() {
    let d = tempfile::tempdir().unwrap();
    let m = partial_model(d.path(), &["config.json", "tokenizer.json"]);
    std::fs::write(
        m.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
    )
    .unwrap();
    let out = d.path().join("out");
    refused(&tiny().corpus, &m, &out, 65, "corrupt safetensors", &[]);
}

#[test]
fn unwritable_output_is_73() {
    let f = tiny();
    let d = tempfile::tempdir().unwrap();
    let blocker = d.path().join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    refused(
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
    let f = tiny();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    detect(&f.corpus, &f.model, &out, &[])
        .fails_with(73, "--overwrite")
        .and_no_leftovers(d.path());
    let kept: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
    assert_eq!(kept.len(), 1, "nothing added to the existing output");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn bad_flags_are_usage_or_config_errors() {
    let f = tiny();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    for (flag, extra) in [
        ("--alpha", ["--alpha", "0"]),
        ("--filter", ["--filter", "no_such_col = 1"]),
        ("--device", ["--device", "tpu"]),
    ] {
        refused(&f.corpus, &f.model, &out, 78, flag, &extra);
    }
    btu(["detect", "--corpus", s(&f.corpus)]).exits(2);
}
