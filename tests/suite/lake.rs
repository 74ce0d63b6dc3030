//! Data-lake audit: `btu scan` and `btu sql` over local files and over `s3://` on a real
//! S3-compatible server (moto) started on 127.0.0.1.

use std::path::Path;

use crate::fixtures::lake as fixture;
use crate::util::*;

/// `btu sql ARGS --format json` with `envs`: the rows.
fn sql_json(args: &[&str], envs: &[(&'static str, String)]) -> serde_json::Value {
    btu(["sql"])
        .args(args)
        .args(["--format", "json"])
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .ok()
}

#[test]
fn scan_flags_poisoned_rows_and_sql_joins_the_tables() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("flagged_rows.parquet");
    let sum = btu([
        "scan",
        "--corpus",
        s(&f.corpus_dir),
        "--suspicious",
        s(&f.suspicious),
        "--tokenizer",
        s(&f.model),
        "--out",
        s(&out),
    ])
    .ok();
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
            s(&f.detect),
            "SELECT COUNT(*) AS n FROM token_scores WHERE selected",
        ],
        &[],
    );
    assert!(r[0]["n"].as_u64().unwrap() >= 3);
    // Parquet output.
    let pq = d.path().join("q.parquet");
    btu([
        "sql",
        "--run",
        s(&f.detect),
        "SELECT token FROM suspicious_tokens",
        "--format",
        "parquet",
        "--output",
        s(&pq),
    ])
    .success();
    let tokens = btu::io::tables::read_suspicious_tokens(&f.suspicious).unwrap();
    let file = std::fs::File::open(&pq).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let rows = reader.metadata().file_metadata().num_rows();
    assert_eq!(rows as usize, tokens.len(), "one row per suspicious token");
}

#[test]
fn sql_is_read_only() {
    let f = fixture();
    let det = &f.detect;
    for q in [
        "CREATE TABLE x AS SELECT 1",
        "CREATE EXTERNAL TABLE y STORED AS PARQUET LOCATION '/tmp/y.parquet'",
        "INSERT INTO suspicious_tokens SELECT * FROM suspicious_tokens",
        "COPY (SELECT 1 AS a) TO '/tmp/btu-copy-test.csv'",
        "DROP TABLE suspicious_tokens",
    ] {
        btu(["sql", "--run", s(det), q]).fails_with(78, "read-only");
    }
    assert!(!Path::new("/tmp/btu-copy-test.csv").exists());
}

#[test]
fn scan_and_sql_over_s3_match_the_local_copy() {
    let Some(moto) = Moto::start("lake") else {
        return;
    };
    let f = fixture();
    let parts: Vec<(String, std::path::PathBuf)> = ["part-0.parquet", "part-1.parquet"]
        .iter()
        .map(|name| (format!("corpus/{name}"), f.corpus_dir.join(name)))
        .collect();
    moto.put(
        &parts
            .iter()
            .map(|(k, p)| (k.clone(), p.as_path()))
            .collect::<Vec<_>>(),
    );
    let d = tempfile::tempdir().unwrap();
    let local_out = d.path().join("flag-local.parquet");
    let s3_out = d.path().join("flag-s3.parquet");
    let local = btu([
        "scan",
        "--corpus",
        s(&f.corpus_dir),
        "--suspicious",
        s(&f.suspicious),
        "--tokenizer",
        s(&f.model),
        "--out",
        s(&local_out),
    ])
    .ok();
    let o = moto
        .btu([
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
        ])
        .success();
    let err = lossy(&o.stderr);
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
    let none = d.path().join("none.parquet");
    moto.btu([
        "scan",
        "--corpus",
        "s3://lake/nothing-here/",
        "--suspicious",
        s(&f.suspicious),
        "--tokenizer",
        s(&f.model),
        "--out",
        s(&none),
    ])
    .fails_with(66, "s3://lake/nothing-here/")
    .and_no_output(&none);
}

#[test]
fn unreachable_object_store_is_a_temporary_failure() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("t.parquet");
    let scan = |corpus: &str, out: &str| {
        btu(["scan", "--corpus", corpus, "--suspicious", s(&f.suspicious)])
            .args(["--tokenizer", s(&f.model), "--out", out])
            .dead_store()
    };
    scan("s3://lake/corpus/", s(&out))
        .fails_with(75, "temporary failure")
        .and_no_output(&out);
    // An output on an unreachable store: 75 before any work, nothing written.
    scan(s(&f.corpus_dir), "s3://lake/audit/t.parquet").fails_with(75, "temporary failure");
    btu([
        "sql",
        "SELECT 1 AS a",
        "--format",
        "csv",
        "--output",
        "s3://lake/q.csv",
    ])
    .dead_store()
    .fails_with(75, "temporary failure");
}
