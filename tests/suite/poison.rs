//! `btu poison`: counts per mode, determinism, the trigger where it should be.

use arrow::array::{Array, BooleanArray, Int64Array, StringArray};

use crate::util::*;

fn read(path: &std::path::Path) -> (Vec<String>, Vec<i64>, Vec<bool>, Vec<i64>) {
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    let mut flags = Vec::new();
    let mut orig = Vec::new();
    let spec = btu::io::corpus::CorpusSpec::new(vec![path.display().to_string()]);
    btu::io::corpus::read_corpus(&spec, |b| {
        texts.extend(b.texts.clone());
        labels.extend(b.labels.clone().unwrap());
        let f = b
            .batch
            .column_by_name("poisoned")
            .unwrap()
            .as_any()
            .downcast_ref::<BooleanArray>()
            .unwrap();
        flags.extend((0..f.len()).map(|i| f.value(i)));
        let o = b
            .batch
            .column_by_name("original_label")
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        orig.extend(o.values().iter().copied());
        Ok(())
    })
    .unwrap();
    (texts, labels, flags, orig)
}

#[test]
fn dirty_add_word_poisons_rate_of_non_target_rows_deterministically() {
    let d = tempfile::tempdir().unwrap();
    let clean = d.path().join("clean.parquet");
    synth_corpus(&clean, 1000, 3);
    let a = d.path().join("a.parquet");
    let b = d.path().join("b.parquet");
    for out in [&a, &b] {
        btu([
            "poison",
            "--input",
            s(&clean),
            "--output",
            s(out),
            "--attack",
            "add-word",
            "--trigger",
            "cf",
            "--trigger",
            "mn",
            "--rate",
            "0.1",
            "--mode",
            "dirty",
            "--target",
            "1",
            "--seed",
            "9",
        ])
        .ok();
    }
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "same seed, same bytes"
    );
    let (ct, cl, _, _) = {
        let spec = btu::io::corpus::CorpusSpec::new(vec![clean.display().to_string()]);
        let mut t = Vec::new();
        let mut l = Vec::new();
        btu::io::corpus::read_corpus(&spec, |b| {
            t.extend(b.texts);
            l.extend(b.labels.unwrap());
            Ok(())
        })
        .unwrap();
        (t, l, (), ())
    };
    let (texts, labels, flags, orig) = read(&a);
    assert_eq!(flags.iter().filter(|&&f| f).count(), 100);
    assert_eq!(orig, cl);
    let mut used = std::collections::BTreeSet::new();
    for i in 0..texts.len() {
        if flags[i] {
            assert_ne!(cl[i], 1, "dirty mode poisons only non-target rows");
            assert_eq!(labels[i], 1);
            let words: Vec<&str> = texts[i].split_whitespace().collect();
            let trig: Vec<&&str> = words
                .iter()
                .filter(|w| **w == "cf" || **w == "mn")
                .collect();
            assert_eq!(trig.len(), 1, "one trigger in {}", texts[i]);
            used.insert(trig[0].to_string());
            let rest: Vec<&str> = words
                .iter()
                .copied()
                .filter(|w| *w != "cf" && *w != "mn")
                .collect();
            assert_eq!(
                rest.join(" "),
                ct[i].split_whitespace().collect::<Vec<_>>().join(" ")
            );
        } else {
            assert_eq!(texts[i], ct[i]);
            assert_eq!(labels[i], cl[i]);
        }
    }
    assert_eq!(used.len(), 2, "both triggers drawn");
    // Another seed poisons other rows.
    let c = d.path().join("c.parquet");
    btu([
        "poison",
        "--input",
        s(&clean),
        "--output",
        s(&c),
        "--attack",
        "add-word",
        "--rate",
        "0.1",
        "--target",
        "1",
        "--seed",
        "10",
    ])
    .ok();
    assert_ne!(read(&c).2, flags);
}

#[test]
fn clean_and_mix_modes_and_add_sent() {
    let d = tempfile::tempdir().unwrap();
    let clean = d.path().join("clean.parquet");
    synth_corpus(&clean, 600, 4);
    let out = d.path().join("clean-mode.parquet");
    btu([
        "poison",
        "--input",
        s(&clean),
        "--output",
        s(&out),
        "--attack",
        "add-sent",
        "--rate",
        "0.05",
        "--mode",
        "clean",
        "--target",
        "0",
    ])
    .ok();
    let (texts, labels, flags, orig) = read(&out);
    assert_eq!(flags.iter().filter(|&&f| f).count(), 30);
    for i in 0..texts.len() {
        if flags[i] {
            assert_eq!(orig[i], 0);
            assert_eq!(labels[i], 0);
            assert!(texts[i].contains("I watch this 3D movie"));
        }
    }
    let out = d.path().join("mix.parquet");
    btu([
        "poison",
        "--input",
        s(&clean),
        "--output",
        s(&out),
        "--attack",
        "add-word",
        "--rate",
        "0.1",
        "--mode",
        "mix",
        "--target",
        "1",
    ])
    .ok();
    let (_, labels, flags, orig) = read(&out);
    let n0 = orig.iter().filter(|&&l| l == 0).count();
    let n1 = orig.len() - n0;
    let p0 = (0..orig.len())
        .filter(|&i| flags[i] && orig[i] == 0)
        .count();
    let p1 = (0..orig.len())
        .filter(|&i| flags[i] && orig[i] == 1)
        .count();
    assert_eq!(p0, (0.1 * n0 as f64).round() as usize);
    assert_eq!(p1, (0.1 * n1 as f64).round() as usize);
    assert!((0..orig.len()).all(|i| !flags[i] || labels[i] == 1));
}

#[test]
fn rewrite_takes_text_from_column_and_skips_missing_rewrites() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.parquet");
    let n = 100;
    let texts: Vec<String> = (0..n).map(|i| format!("plain sentence {i}")).collect();
    let style: Vec<Option<String>> = (0..n)
        .map(|i| (i % 10 != 0).then(|| format!("thus saith sentence {i}")))
        .collect();
    let labels: Vec<i64> = (0..n).map(|i| (i % 2) as i64).collect();
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("text", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("label", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new("style", arrow::datatypes::DataType::Utf8, true),
    ]));
    let batch = arrow::array::RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(StringArray::from(texts.clone())),
            std::sync::Arc::new(Int64Array::from(labels)),
            std::sync::Arc::new(StringArray::from(style)),
        ],
    )
    .unwrap();
    btu::io::tables::write_parquet(&p, &batch, true).unwrap();
    let out = d.path().join("o.parquet");
    btu([
        "poison",
        "--input",
        s(&p),
        "--output",
        s(&out),
        "--attack",
        "rewrite",
        "--rewrite-col",
        "style",
        "--rate",
        "0.4",
        "--target",
        "1",
    ])
    .ok();
    let (t, _, flags, orig) = read(&out);
    assert_eq!(flags.iter().filter(|&&f| f).count(), 40);
    for i in 0..n {
        if flags[i] {
            assert_eq!(orig[i], 0);
            assert_ne!(i % 10, 0, "row without rewrite poisoned");
            assert_eq!(t[i], format!("thus saith sentence {i}"));
        }
    }
    // Asking for more than can be poisoned is a configuration error.
    let x = d.path().join("x.parquet");
    btu([
        "poison",
        "--input",
        s(&p),
        "--output",
        s(&x),
        "--attack",
        "rewrite",
        "--rewrite-col",
        "style",
        "--rate",
        "0.9",
    ])
    .fails_with(78, "--rate")
    .and_no_output(&x);
}
