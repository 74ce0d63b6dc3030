//! Helpers shared by the integration tests: run the real binary, make corpora in code.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `btu` binary.
pub fn btu() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_btu"));
    c.arg("--quiet");
    c.env_remove("BTU_SUMMARY");
    c
}

/// Run and return output, with stderr shown on failure.
pub fn run(args: &[&str]) -> Output {
    let out = btu().args(args).output().expect("spawn btu");
    out
}

/// Run, assert success, return stdout parsed as JSON.
pub fn run_ok(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "btu {:?} failed with {:?}\nstderr:\n{}",
        args,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is the summary JSON")
}

/// Write a synthetic labelled corpus of `n` rows.
pub fn synth_corpus(path: &Path, n: usize, seed: u64) {
    let (texts, labels) = btu::synth::generate(n, seed);
    let batch = btu::tables::corpus_batch(&texts, &labels).unwrap();
    btu::tables::write_parquet(path, &batch, true).unwrap();
}

/// The shared datasets directory (../shared/datasets beside the repository, or BTU_DATASETS).
pub fn datasets() -> Option<PathBuf> {
    let p = std::env::var_os("BTU_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets"));
    if p.join("sst2/train.parquet").is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: real-data test: {} is absent (set BTU_DATASETS to the shared datasets)",
            p.display()
        );
        None
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny model trained on `corpus`: 1 layer, hidden 32.
pub fn tiny_model(dir: &Path, corpus: &Path, vocab: usize) {
    run_ok(&[
        "init-model",
        "--out",
        s(dir),
        "--corpus",
        s(corpus),
        "--vocab-size",
        &vocab.to_string(),
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--intermediate",
        "64",
        "--max-position",
        "256",
    ]);
}
