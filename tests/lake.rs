//! Data-lake audit: `btu scan` and `btu sql` over local files and over `s3://` on a real
//! S3-compatible server (moto) started on 127.0.0.1.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    corpus_dir: PathBuf,
    model: PathBuf,
    suspicious: PathBuf,
}

/// A poisoned synthetic corpus split into two files, a tiny model, and its detection.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let clean = root.join("clean.parquet");
        synth_corpus(&clean, 2000, 31);
        let corpus_dir = root.join("corpus");
        std::fs::create_dir(&corpus_dir).unwrap();
        run_ok(&[
            "poison",
            "--input",
            s(&clean),
            "--output",
            s(&corpus_dir.join("part-0.parquet")),
            "--attack",
            "add-word",
            "--rate",
            "0.1",
            "--filter",
            "id < 1000",
        ]);
        run_ok(&[
            "poison",
            "--input",
            s(&clean),
            "--output",
            s(&corpus_dir.join("part-1.parquet")),
            "--attack",
            "add-word",
            "--rate",
            "0.1",
            "--filter",
            "id >= 1000",
            "--seed",
            "7",
        ]);
        let model = root.join("model");
        tiny_model(&model, &corpus_dir, 400);
        let det = root.join("detect");
        run_ok(&[
            "detect",
            "--corpus",
            s(&corpus_dir),
            "--model",
            s(&model),
            "--out",
            s(&det),
            "--device",
            "cpu",
        ]);
        Fixture {
            _dir: dir,
            root,
            corpus_dir,
            model,
            suspicious: det.join("suspicious_tokens.arrow"),
        }
    })
}

fn sql_json(args: &[&str], envs: &[(&'static str, String)]) -> serde_json::Value {
    let mut c = btu();
    c.arg("sql").args(args).args(["--format", "json"]);
    for (k, v) in envs {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn scan_flags_poisoned_rows_and_sql_joins_the_tables() {
    let f = fixture();
    let out = f.root.join("flagged_rows.parquet");
    let sum = run_ok(&[
        "scan",
        "--corpus",
        s(&f.corpus_dir),
        "--suspicious",
        s(&f.suspicious),
        "--tokenizer",
        s(&f.model),
        "--out",
        s(&out),
    ]);
    assert_eq!(sum["rows_scanned"], 2000);
    let q = &sum["poisoned"];
    assert_eq!(q["poisoned_rows"], 200);
    assert!(q["recall"].as_f64().unwrap() >= 0.95, "{q}");
    assert!(sum["tokens"]["cf"]["rows"].as_u64().unwrap() >= 200);
    assert_eq!(sum["tokens"]["cf"]["label_shares"]["1"], 1.0);
    // The documented join: which suspicious token flags how many rows, with its label share.
    let rows = sql_json(
        &[
            "--table", &format!("flagged_rows={}", out.display()),
            "--table", &format!("suspicious_tokens={}", f.suspicious.display()),
            "SELECT t.token, COUNT(*) AS rows, AVG(CAST(f.label AS DOUBLE)) AS share_label_1 FROM flagged_rows f JOIN suspicious_tokens t ON array_has(f.token_ids, t.token_id) GROUP BY t.token ORDER BY rows DESC, t.token",
        ],
        &[],
    );
    let cf = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["token"] == "cf")
        .expect("cf row");
    assert_eq!(cf["rows"], sum["tokens"]["cf"]["rows"]);
    assert_eq!(cf["share_label_1"], 1.0);
    // Every flagged row names its file and row; rows carry the corpus id.
    let check = sql_json(
        &[
            "--table",
            &format!("f={}", out.display()),
            "SELECT COUNT(*) AS n, COUNT(DISTINCT source) AS files, MIN(hits) AS min_hits FROM f",
        ],
        &[],
    );
    assert_eq!(check[0]["n"], sum["rows_flagged"]);
    assert_eq!(check[0]["files"], 2);
    assert!(check[0]["min_hits"].as_u64().unwrap() >= 1);
    // --run registers an output directory's tables under their own names.
    let r = sql_json(
        &[
            "--run",
            s(&f.root.join("detect")),
            "SELECT COUNT(*) AS n FROM token_scores WHERE selected",
        ],
        &[],
    );
    assert!(r[0]["n"].as_u64().unwrap() >= 3);
    // Parquet output.
    let pq = f.root.join("q.parquet");
    let o = btu()
        .args([
            "sql",
            "--run",
            s(&f.root.join("detect")),
            "SELECT token FROM suspicious_tokens",
            "--format",
            "parquet",
            "--output",
            s(&pq),
        ])
        .output()
        .unwrap();
    assert!(o.status.success() && pq.is_file());
}

#[test]
fn sql_is_read_only() {
    let f = fixture();
    let det = f.root.join("detect");
    for q in [
        "CREATE TABLE x AS SELECT 1",
        "CREATE EXTERNAL TABLE y STORED AS PARQUET LOCATION '/tmp/y.parquet'",
        "INSERT INTO suspicious_tokens SELECT * FROM suspicious_tokens",
        "COPY (SELECT 1 AS a) TO '/tmp/btu-copy-test.csv'",
        "DROP TABLE suspicious_tokens",
    ] {
        let o = btu().args(["sql", "--run", s(&det), q]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{q}: {err}");
        assert!(err.contains("read-only"), "{q}: {err}");
    }
    assert!(!Path::new("/tmp/btu-copy-test.csv").exists());
}

#[test]
fn scan_and_sql_over_s3_match_the_local_copy() {
    let Some(moto) = Moto::start("lake") else {
        return;
    };
    let f = fixture();
    for name in ["part-0.parquet", "part-1.parquet"] {
        for (k, v) in moto.env() {
            // The library's store reads AWS_* from the environment of this test process.
            std::env::set_var(k, v);
        }
        btu::io::store::put(
            &format!("s3://lake/corpus/{name}"),
            std::fs::read(f.corpus_dir.join(name)).unwrap(),
        )
        .unwrap();
    }
    let local_out = f.root.join("flag-local.parquet");
    let s3_out = f.root.join("flag-s3.parquet");
    let local = run_ok(&[
        "scan",
        "--corpus",
        s(&f.corpus_dir),
        "--suspicious",
        s(&f.suspicious),
        "--tokenizer",
        s(&f.model),
        "--out",
        s(&local_out),
    ]);
    let o = moto.btu(&[
        "scan",
        "--corpus",
        "s3://lake/corpus/",
        "--suspicious",
        s(&f.suspicious),
        "--tokenizer",
        s(&f.model),
        "--out",
        s(&s3_out),
        "--log",
        "debug",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let remote: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["rows_scanned", "rows_flagged", "tokens", "poisoned"] {
        assert_eq!(local[k], remote[k], "{k}");
    }
    assert!(remote["corpus"]["files"][0]["path"]
        .as_str()
        .unwrap()
        .starts_with("s3://lake/corpus/"));
    // Credentials appear neither in logs nor in outputs.
    assert!(!err.contains("secret-never-logged"));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("secret-never-logged"));
    let q = "SELECT regexp_replace(source, '.*/', '') AS file, row, label, tokens, hits FROM f ORDER BY file, row";
    let a = sql_json(&["--table", &format!("f={}", local_out.display()), q], &[]);
    let b = sql_json(&["--table", &format!("f={}", s3_out.display()), q], &[]);
    assert_eq!(a, b);
    // SQL straight over the lake equals SQL over the local copy.
    let q = "SELECT label, poisoned, COUNT(*) AS n FROM c GROUP BY label, poisoned ORDER BY label, poisoned";
    let a = sql_json(
        &["--table", &format!("c={}", f.corpus_dir.display()), q],
        &[],
    );
    let b = sql_json(&["--table", "c=s3://lake/corpus/", q], &moto.env());
    assert_eq!(a, b);
    let b = sql_json(
        &["--table", "c=s3://lake/corpus/part-*.parquet", q],
        &moto.env(),
    );
    assert_eq!(a, b);
    // A missing object is "input missing" (66).
    let o = moto.btu(&[
        "scan",
        "--corpus",
        "s3://lake/nothing-here/",
        "--suspicious",
        s(&f.suspicious),
        "--tokenizer",
        s(&f.model),
        "--out",
        s(&f.root.join("none.parquet")),
    ]);
    assert_eq!(
        o.status.code(),
        Some(66),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn unreachable_object_store_is_a_temporary_failure() {
    let f = fixture();
    let o = btu_with_dead_store()
        .args([
            "scan",
            "--corpus",
            "s3://lake/corpus/",
            "--suspicious",
            s(&f.suspicious),
            "--tokenizer",
            s(&f.model),
            "--out",
            s(&f.root.join("t.parquet")),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(75), "{err}");
    assert!(err.contains("temporary failure"), "{err}");
    assert!(!f.root.join("t.parquet").exists());
}
