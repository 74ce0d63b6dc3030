//! `btu relabel`: the labels of a corpus tested against clean references. A dirty-label attack
//! without a trigger token (rows of class 0 labelled 1, their texts untouched) must be found, its
//! target named and mostly its rows relabelled, reading each row in its neighbourhood in the
//! suspect (the model trained on the corpus) or alone; a clean corpus must pass untouched.

use std::path::Path;

use arrow::array::{Array, BooleanArray, Float64Array, Int64Array};

use crate::util::*;

/// Rows of the training corpus (synthetic, seed 11) and of the clean corpus (seed 12).
const ROWS: usize = 900;
const CLEAN_ROWS: usize = 300;

/// Write the training corpus with `flip` of its rows of class 0 labelled 1 (every `1/flip`-th
/// such row), and a `poisoned` column saying which.
fn corpus(path: &Path, flip: f64) -> usize {
    let (texts, mut labels) = btu::demo::synth::generate(ROWS, 11);
    let mut poisoned = vec![false; ROWS];
    let mut zeros = 0usize;
    for i in 0..ROWS {
        if labels[i] == 0 {
            zeros += 1;
            if flip > 0.0 && (zeros as f64 * flip).fract() < flip {
                labels[i] = 1;
                poisoned[i] = true;
            }
        }
    }
    let base = btu::io::tables::corpus_batch(&texts, &labels).unwrap();
    let flags = std::sync::Arc::new(BooleanArray::from(poisoned.clone()));
    let batch = with_column(&base, "poisoned", flags);
    btu::io::tables::write_parquet(path, &batch, true).unwrap();
    poisoned.iter().filter(|&&p| p).count()
}

/// The setting every test here shares: a tiny model made from the clean rows, the clean rows.
struct Setting {
    _dir: tempfile::TempDir,
    clean: std::path::PathBuf,
    model: std::path::PathBuf,
    root: std::path::PathBuf,
}

fn setting() -> Setting {
    let d = tempfile::tempdir().unwrap();
    let clean = d.path().join("clean.parquet");
    synth_corpus(&clean, CLEAN_ROWS, 12);
    let model = d.path().join("model");
    tiny_model(&model, &clean, 300);
    Setting {
        root: d.path().to_path_buf(),
        clean,
        model,
        _dir: d,
    }
}

/// The suspect: the tiny model trained on `corpus` (3 epochs at 1e-3, as the demo's victim).
fn suspect(st: &Setting, corpus: &Path) -> std::path::PathBuf {
    let out = st.root.join("suspect");
    btu!(
        "train --model {} --corpus {} --out {} --epochs 3 --lr 1e-3 --batch-size 8 --device cpu",
        s(&st.model),
        s(corpus),
        s(&out)
    )
    .ok();
    out
}

/// `btu relabel` of `corpus` into `out` (the tiny model learns at 1e-3, as the demo's victim),
/// with `how`: `--suspect DIR` or `--neighbours 0`.
fn relabel(st: &Setting, corpus: &Path, out: &Path, how: &str) -> serde_json::Value {
    btu!(
        "relabel --corpus {} --clean-corpus {} --model {} --out {} --reference-lr 1e-3 --reference-epochs 10 --batch-size 8 --device cpu {how}",
        s(corpus),
        s(&st.clean),
        s(&st.model),
        s(out)
    )
    .ok()
}

fn column<T: Array + Clone + 'static>(path: &Path, name: &str) -> T {
    let batches = btu::io::tables::read_parquet(path).unwrap();
    assert_eq!(batches.len(), 1, "one batch");
    batches[0]
        .column_by_name(name)
        .unwrap_or_else(|| panic!("{name} in {}", path.display()))
        .as_any()
        .downcast_ref::<T>()
        .unwrap()
        .clone()
}

/// Found and relabelled reading each row in its neighbourhood in the suspect (the default) and
/// alone (`--neighbours 0`): the same target, each rule as documented, same bytes on a rerun.
#[test]
fn a_class_filled_by_flipped_labels_is_found_and_mostly_its_flipped_rows_relabelled() {
    let st = setting();
    let poisoned_corpus = st.root.join("poisoned.parquet");
    let n_poisoned = corpus(&poisoned_corpus, 0.3);
    let with_suspect = format!("--suspect {}", s(&suspect(&st, &poisoned_corpus)));
    for (name, how) in [("alone", "--neighbours 0"), ("hood", with_suspect.as_str())] {
        let out = st.root.join(name);
        let m = relabel(&st, &poisoned_corpus, &out, how);
        check_relabelled(&m, &out.join("relabelled.parquet"), n_poisoned);
        let hood = column::<Float64Array>(&out.join("relabelled.parquet"), "neighbourhood_doubt");
        let doubt = column::<Float64Array>(&out.join("relabelled.parquet"), "doubt");
        let same = (0..ROWS)
            .filter(|&i| hood.value(i) == doubt.value(i))
            .count();
        if name == "alone" {
            assert!(m["suspect"].is_null(), "{m}");
            assert_eq!(same, ROWS, "read alone, a row's neighbourhood is the row");
        } else {
            assert!(m["suspect"].is_string(), "{m}");
            assert!(
                same < ROWS - 100,
                "the target's rows are averaged ({same} equal)"
            );
        }
        // The same seed gives the same bytes.
        let again = st.root.join(format!("{name}2"));
        relabel(&st, &poisoned_corpus, &again, how);
        assert_eq!(
            std::fs::read(out.join("relabelled.parquet")).unwrap(),
            std::fs::read(again.join("relabelled.parquet")).unwrap(),
            "{name}"
        );
    }
}

/// The target found, most of its flipped rows relabelled and few others, the target rows whose
/// neighbourhood's doubt reaches `min_doubt` relabelled (the most doubted of them when more reach
/// it than twice the estimate of the poisoned rows), only to class 0.
fn check_relabelled(m: &serde_json::Value, file: &Path, n_poisoned: usize) {
    assert_eq!(m["target"], 1, "{m}");
    let z1 = m["classes"][1]["z"].as_f64().unwrap();
    assert!(z1 >= 3.29, "class 1's z {z1}: {m}");
    assert!(m["reference_accuracy"].as_f64().unwrap() > 0.8, "{m}");
    let relabelled = column::<BooleanArray>(file, "relabelled");
    let poisoned = column::<BooleanArray>(file, "poisoned");
    let label = column::<Int64Array>(file, "label");
    let before = column::<Int64Array>(file, "label_before");
    assert_eq!(relabelled.len(), ROWS);
    let hits = (0..ROWS)
        .filter(|&i| relabelled.value(i) && poisoned.value(i))
        .count();
    let flagged = (0..ROWS).filter(|&i| relabelled.value(i)).count();
    assert_eq!(flagged, m["relabelled"].as_u64().unwrap() as usize);
    assert!(
        hits as f64 >= 0.7 * n_poisoned as f64,
        "{hits} of {n_poisoned} poisoned rows relabelled"
    );
    assert!(
        hits as f64 >= 0.6 * flagged as f64,
        "precision {hits}/{flagged}"
    );
    let doubt = column::<Float64Array>(file, "doubt");
    let hood = column::<Float64Array>(file, "neighbourhood_doubt");
    let min_doubt = m["params"]["min_doubt"].as_f64().unwrap();
    for i in 0..ROWS {
        assert!((0.0..=1.0).contains(&doubt.value(i)), "row {i}");
        assert!((0.0..=1.0).contains(&hood.value(i)), "row {i}");
        // Two classes: a target row is relabelled only when the references doubt its
        // neighbourhood enough; the other classes' rows are read alone.
        if before.value(i) == 1 {
            assert!(
                !relabelled.value(i) || hood.value(i) >= min_doubt,
                "row {i}"
            );
        } else {
            assert_eq!(hood.value(i), doubt.value(i), "row {i}");
        }
        // Only target rows change, and only to another class.
        if relabelled.value(i) {
            assert_eq!((before.value(i), label.value(i)), (1, 0), "row {i}");
        } else {
            assert_eq!(before.value(i), label.value(i), "row {i}");
        }
    }
    let estimate = m["estimated_poisoned"].as_f64().unwrap();
    eprintln!("{n_poisoned} poisoned, estimated {estimate:.1}, {flagged} relabelled");
    let cap = (estimate * 2.0).ceil() as usize;
    let reach: Vec<usize> = (0..ROWS)
        .filter(|&i| before.value(i) == 1 && hood.value(i) >= min_doubt)
        .collect();
    assert_eq!(
        flagged,
        reach.len().min(cap),
        "{} reach min_doubt, cap {cap}",
        reach.len()
    );
    let lowest_in = (0..ROWS)
        .filter(|&i| relabelled.value(i))
        .map(|i| hood.value(i))
        .fold(f64::INFINITY, f64::min);
    let highest_out = reach
        .iter()
        .filter(|&&i| !relabelled.value(i))
        .map(|&i| hood.value(i))
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(lowest_in >= highest_out, "the most doubted are kept");
}

#[test]
fn a_clean_corpus_passes_and_nothing_is_relabelled() {
    let st = setting();
    let clean_corpus = st.root.join("train.parquet");
    corpus(&clean_corpus, 0.0);
    let out = st.root.join("r");
    let m = relabel(&st, &clean_corpus, &out, "--neighbours 0");
    // References that learned the task (the test is no test otherwise).
    assert!(m["reference_accuracy"].as_f64().unwrap() > 0.8, "{m}");
    assert!(m["target"].is_null(), "{m}");
    assert_eq!(m["relabelled"], 0);
    for c in m["classes"].as_array().unwrap() {
        assert!(c["z"].as_f64().unwrap() < 3.29, "{c}");
    }
    assert!(out.join("summary.json").is_file());
    assert!(!out.join("relabelled.parquet").exists());
}

#[test]
fn too_few_clean_rows_are_refused_before_any_work() {
    let st = setting();
    let few = st.root.join("few.parquet");
    synth_corpus(&few, 10, 5);
    let out = st.root.join("r");
    btu!(
        "relabel --corpus {} --clean-corpus {} --model {} --out {} --neighbours 0",
        s(&st.clean),
        s(&few),
        s(&st.model),
        s(&out)
    )
    .fails_with(78, "--clean-corpus")
    .and_no_output(&out);
    btu!(
        "relabel --corpus {} --clean-corpus {} --model {} --out {} --min-z=0",
        s(&st.clean),
        s(&st.clean),
        s(&st.model),
        s(&out)
    )
    .fails_with(78, "--min-z")
    .and_no_output(&out);
    // Neighbourhoods are read in the suspect: without one, refused unless rows are read alone.
    btu!(
        "relabel --corpus {} --clean-corpus {} --model {} --out {}",
        s(&st.clean),
        s(&st.clean),
        s(&st.model),
        s(&out)
    )
    .fails_with(78, "--suspect")
    .and_no_output(&out);
    for doubt in ["0", "1", "NaN", "-0.5"] {
        btu!(
            "relabel --corpus {} --clean-corpus {} --model {} --out {} --min-doubt={doubt}",
            s(&st.clean),
            s(&st.clean),
            s(&st.model),
            s(&out)
        )
        .fails_with(78, "--min-doubt")
        .and_no_output(&out);
    }
}

/// Corpus files with different columns cannot make one relabelled file: refused (65) from their
/// footers before any reference is trained (one line on stderr: no relabelling warning came
/// first), nothing written.
#[test]
fn corpus_files_with_different_columns_are_refused() {
    let st = setting();
    let whole = st.root.join("poisoned.parquet");
    corpus(&whole, 0.3);
    let batch = btu::io::tables::read_parquet(&whole).unwrap().remove(0);
    let (a, b) = (st.root.join("a.parquet"), st.root.join("b.parquet"));
    let half = batch.num_rows() / 2;
    btu::io::tables::write_parquet(&a, &batch.slice(0, half), true).unwrap();
    let rest = batch.slice(half, batch.num_rows() - half);
    let extra = rest.column_by_name("text").unwrap().clone();
    btu::io::tables::write_parquet(&b, &with_column(&rest, "note", extra), true).unwrap();
    let out = st.root.join("r");
    btu!(
        "relabel --corpus {} {} --clean-corpus {} --model {} --out {} --reference-lr 1e-3 --reference-epochs 10 --batch-size 8 --device cpu --neighbours 0",
        s(&a),
        s(&b),
        s(&st.clean),
        s(&st.model),
        s(&out)
    )
    .fails_with(65, "different columns")
    .and_no_output(&out);
}

/// The suspect is checked before any reference is trained: one with NaN weights (65, naming
/// the tensor) or with another vocabulary than --model (65) is refused, nothing written.
#[test]
fn a_suspect_unfit_for_neighbourhoods_is_refused_before_any_work() {
    let st = setting();
    let nan = st.root.join("nan-suspect");
    std::fs::create_dir(&nan).unwrap();
    for f in std::fs::read_dir(&st.model).unwrap().flatten() {
        std::fs::copy(f.path(), nan.join(f.file_name())).unwrap();
    }
    let file = nan.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let name = w
        .keys()
        .find(|k| k.ends_with("LayerNorm.weight"))
        .unwrap()
        .clone();
    let t = &w[&name];
    let bad = (t.ones_like().unwrap() * f64::NAN).unwrap();
    w.insert(name.clone(), bad);
    candle_core::safetensors::save(&w, &file).unwrap();
    let other = st.root.join("other-vocab");
    tiny_model(&other, &st.clean, 120);
    let out = st.root.join("r");
    for (suspect, says) in [(&nan, name.as_str()), (&other, "vocab")] {
        btu!(
            "relabel --corpus {} --clean-corpus {} --model {} --suspect {} --out {}",
            s(&st.clean),
            s(&st.clean),
            s(&st.model),
            s(suspect),
            s(&out)
        )
        .fails_with(65, says)
        .and_no_output(&out);
    }
}
