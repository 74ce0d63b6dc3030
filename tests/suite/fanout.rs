//! A lake audit spread over a workflow engine, on a real S3-compatible server (moto): `btu scan
//! --plan` lists the shards, `--shard I/N` scans one, each writes its table to the object store,
//! `btu sql` merges them; and the other object-store outputs (detect, sql).

use std::fs::File;
use std::path::Path;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use crate::fixtures::lake as fixture;
use crate::util::*;

/// Rewrite the Parquet file `src` into `dst` with row groups of `rows` rows, its rows `copies`
/// times over.
fn regroup(src: &Path, dst: &Path, rows: usize, copies: usize) {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(src).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows))
        .build();
    let mut w =
        ArrowWriter::try_new(File::create(dst).unwrap(), batches[0].schema(), Some(props)).unwrap();
    for _ in 0..copies {
        for b in &batches {
            w.write(b).unwrap();
        }
    }
    w.close().unwrap();
}

/// The lake fixture's two parts regrouped (`rows` per row group, `copies` times over) and
/// uploaded under `prefix`.
fn upload_corpus(moto: &Moto, dir: &Path, prefix: &str, rows: usize, copies: usize) {
    let f = fixture();
    let mut objects = Vec::new();
    for part in ["part-0.parquet", "part-1.parquet"] {
        let local = dir.join(format!("{prefix}-{part}"));
        regroup(&f.corpus_dir.join(part), &local, rows, copies);
        objects.push((format!("{prefix}/{part}"), local));
    }
    moto.put(
        &objects
            .iter()
            .map(|(k, p)| (k.clone(), p.as_path()))
            .collect::<Vec<_>>(),
    );
}

/// A moto server holding the lake fixture's corpus under `prefix/` (see [`upload_corpus`]),
/// and the temporary directory of the local copies; `None` (a visible skip) without moto.
fn s3_lake(prefix: &str, rows: usize, copies: usize) -> Option<(Moto, tempfile::TempDir)> {
    let moto = Moto::start("lake")?;
    let d = tempfile::tempdir().unwrap();
    upload_corpus(&moto, d.path(), prefix, rows, copies);
    Some((moto, d))
}

/// `btu scan` of `corpus` with the lake fixture's suspicious tokens, plus `extra` flags.
fn scan(moto: &Moto, corpus: &str, out: &str, extra: &[&str]) -> Btu {
    let f = fixture();
    moto.btu([
        "scan",
        "--corpus",
        corpus,
        "--suspicious",
        s(&f.suspicious),
        "--tokenizer",
        s(&f.model),
        "--out",
        out,
    ])
    .args(extra)
}

/// The rows of a flagged_rows table (a glob of several allowed), in (source, row) order.
fn flagged(moto: &Moto, table: &str) -> serde_json::Value {
    moto.btu([
        "sql",
        "--table",
        &format!("f={table}"),
        "SELECT source, row, id, label, tokens, token_ids, hits FROM f ORDER BY source, row",
        "--format",
        "json",
    ])
    .ok()
}

#[test]
fn sharded_scans_on_s3_together_equal_the_whole_scan() {
    let Some((moto, _d)) = s3_lake("corpus", 150, 1) else {
        return;
    };
    let corpus = "s3://lake/corpus/";
    let whole = scan(&moto, corpus, "s3://lake/audit/whole.parquet", &[]).ok();
    assert_eq!(whole["rows_scanned"], 2000);
    let plan = moto
        .btu(["scan", "--corpus", corpus, "--plan", "--shards", "3"])
        .ok();
    let items = plan.as_array().expect("the plan is a JSON array");
    assert_eq!(items.len(), 3);
    let planned: u64 = items.iter().map(|i| i["rows"].as_u64().unwrap()).sum();
    assert_eq!(planned, 2000, "{plan}");
    let mut scanned = 0;
    let mut flagged_rows = 0;
    for item in items {
        let shard = item["shard"].as_str().unwrap();
        let out = format!("s3://lake/audit/shards/shard-{}.parquet", item["index"]);
        let sum = scan(&moto, corpus, &out, &["--shard", shard]).ok();
        assert_eq!(sum["rows_scanned"], item["rows"], "{shard}");
        assert_eq!(sum["corpus"]["shard"], shard);
        scanned += sum["rows_scanned"].as_u64().unwrap();
        flagged_rows += sum["rows_flagged"].as_u64().unwrap();
    }
    assert_eq!(scanned, 2000);
    assert_eq!(flagged_rows, whole["rows_flagged"].as_u64().unwrap());
    // Merged by btu sql into one object, row for row the whole scan's.
    moto.btu([
        "sql",
        "--table",
        "f=s3://lake/audit/shards/*.parquet",
        "SELECT * FROM f ORDER BY source, row",
        "--format",
        "parquet",
        "--output",
        "s3://lake/audit/merged.parquet",
    ])
    .success();
    let a = flagged(&moto, "s3://lake/audit/whole.parquet");
    assert_eq!(
        a.as_array().unwrap().len() as u64,
        whole["rows_flagged"].as_u64().unwrap()
    );
    assert_eq!(a, flagged(&moto, "s3://lake/audit/merged.parquet"));
    assert_eq!(a, flagged(&moto, "s3://lake/audit/shards/*.parquet"));
    // The objects are there; an existing one is refused without --overwrite, before any work.
    assert!(moto
        .keys("audit/")
        .contains(&"audit/shards/shard-2.parquet".to_string()));
    scan(&moto, corpus, "s3://lake/audit/whole.parquet", &[])
        .fails_with(73, "s3://lake/audit/whole.parquet");
    // More shards than row groups: the extra shards are empty tables with the same schema.
    let many = moto
        .btu(["scan", "--corpus", corpus, "--plan", "--shards", "40"])
        .ok();
    let empty = many
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["rows"] == 0)
        .expect("an empty shard among 40 of 14 row groups");
    let sum = scan(
        &moto,
        corpus,
        "s3://lake/audit/empty.parquet",
        &["--shard", empty["shard"].as_str().unwrap()],
    )
    .ok();
    assert_eq!(sum["rows_scanned"], 0);
    let union = moto
        .btu([
            "sql",
            "--table",
            "e=s3://lake/audit/empty.parquet",
            "--table",
            "w=s3://lake/audit/whole.parquet",
            "SELECT COUNT(*) AS n FROM (SELECT * FROM e UNION ALL SELECT * FROM w)",
            "--format",
            "json",
        ])
        .ok();
    assert_eq!(union[0]["n"], whole["rows_flagged"], "same schema, no rows");
}

#[test]
fn a_killed_shard_leaves_no_object_and_its_rerun_writes_the_same_bytes() {
    // 120,000 rows: long enough a scan to kill it on the way even when it has both cores (60,000
    // rows once finished within the 700 ms).
    let Some((moto, _d)) = s3_lake("big", 2000, 60) else {
        return;
    };
    let corpus = "s3://lake/big/";
    let key = "audit/shard-1.parquet";
    let url = format!("s3://lake/{key}");
    let first = scan(
        &moto,
        corpus,
        "s3://lake/audit/reference.parquet",
        &["--shard", "1/2"],
    )
    .ok();
    assert!(first["rows_scanned"].as_u64().unwrap() > 20_000);
    let mut child = scan(&moto, corpus, &url, &["--shard", "1/2"]).spawn();
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the scan finished before it could be killed; make the corpus bigger"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !moto.keys("audit/").contains(&key.to_string()),
        "a killed scan left an object"
    );
    // The workflow's retry: the same command again.
    scan(&moto, corpus, &url, &["--shard", "1/2"]).success();
    assert_eq!(moto.get(key), moto.get("audit/reference.parquet"));
    // And a rerun with --overwrite (a retry after the upload) writes the same bytes again.
    scan(&moto, corpus, &url, &["--shard", "1/2", "--overwrite"]).success();
    assert_eq!(moto.get(key), moto.get("audit/reference.parquet"));
}

#[test]
fn detect_and_sql_write_to_s3_and_other_commands_refuse_it() {
    let Some(moto) = Moto::start("lake") else {
        return;
    };
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let detect = |out: &str, extra: &[&str]| {
        let model = ["--model", s(&f.model), "--device", "cpu", "--out", out];
        moto.btu(["detect", "--corpus", s(&f.corpus_dir)])
            .args(model)
            .args(extra)
    };
    let local = d.path().join("detect");
    detect(s(&local), &[]).success();
    detect("s3://lake/runs/detect", &[]).success();
    assert_eq!(
        moto.keys("runs/detect/"),
        [
            "runs/detect/_SUCCESS",
            "runs/detect/summary.json",
            "runs/detect/suspicious_tokens.arrow",
            "runs/detect/token_scores.arrow"
        ]
    );
    for table in ["token_scores.arrow", "suspicious_tokens.arrow"] {
        assert_eq!(
            moto.get(&format!("runs/detect/{table}")),
            std::fs::read(local.join(table)).unwrap(),
            "{table}: the object is the local run's file"
        );
    }
    detect("s3://lake/runs/detect", &[]).fails_with(73, "s3://lake/runs/detect");
    // A leftover of an older output goes when it is replaced.
    moto.put(&[(
        "runs/detect/stale.arrow".into(),
        local.join("summary.json").as_path(),
    )]);
    detect("s3://lake/runs/detect", &["--overwrite"]).success();
    assert!(!moto
        .keys("runs/detect/")
        .contains(&"runs/detect/stale.arrow".to_string()));
    // A query result bigger than one upload part (8 MiB) goes up in parts, byte for byte.
    let q = "SELECT value, repeat('x', 200) AS pad FROM generate_series(1, 60000) AS t(value)";
    let local_csv = d.path().join("big.csv");
    for out in [s(&local_csv), "s3://lake/q/big.csv"] {
        moto.btu(["sql", q, "--format", "csv", "--output", out])
            .success();
    }
    let remote = moto.get("q/big.csv");
    assert!(remote.len() > 10 << 20, "{} bytes", remote.len());
    assert_eq!(remote, std::fs::read(&local_csv).unwrap());
    // Commands whose outputs later steps read back write local files only.
    moto.btu([
        "train",
        "--corpus",
        s(&f.corpus_dir),
        "--model",
        s(&f.model),
    ])
    .args(["--out", "s3://lake/models/tiny"])
    .fails_with(78, "writes local files only");
    // --shard cannot be combined with a row count over the whole corpus; a shard must exist.
    let local_out = d.path().join("flagged.parquet");
    scan(
        &moto,
        s(&f.corpus_dir),
        s(&local_out),
        &["--shard", "0/2", "--limit", "5"],
    )
    .fails_with(78, "--limit")
    .and_no_output(&local_out);
    scan(&moto, s(&f.corpus_dir), s(&local_out), &["--shard", "2/2"]).exits(2);
    // No bucket key: nothing to name the output.
    moto.btu([
        "sql",
        "SELECT 1 AS a",
        "--format",
        "csv",
        "--output",
        "s3://lake",
    ])
    .fails_with(78, "name an object key");
}

/// Run a fan-out's command lines on the S3 server, as the workflow engine would: `plan` (its
/// stdout is the shard list), the scan command lines `scans` makes of that list, then `merge`;
/// the merged table (`merged`) must equal an unsharded scan of `corpus` row for row.
fn run_fanout(
    moto: &Moto,
    corpus: &str,
    plan: &[String],
    scans: impl Fn(&[serde_json::Value]) -> Vec<Vec<String>>,
    merge: &[String],
    merged: &str,
) {
    let list = moto.btu(plan).ok();
    let items = list.as_array().expect("the plan step prints a JSON array");
    assert!(items.len() > 1, "{list}");
    for args in scans(items) {
        moto.btu(&args).success();
    }
    moto.btu(merge).success();
    let whole = format!("{}-whole.parquet", merged.trim_end_matches(".parquet"));
    scan(moto, corpus, &whole, &[]).success();
    let a = flagged(moto, &whole);
    assert!(!a.as_array().unwrap().is_empty());
    assert_eq!(
        a,
        flagged(moto, merged),
        "the merged fan-out differs from one scan"
    );
}

/// Where the test runs a workflow's parameters: the corpus on the S3 server, the lake fixture's
/// tokens and tokenizer, 3 shards, outputs under `out`.
fn test_params(out: &str) -> impl Fn(&str) -> Option<String> + '_ {
    let f = fixture();
    move |name: &str| {
        Some(match name {
            "corpus" => "s3://lake/corpus/".into(),
            "tokenizer" => s(&f.model).into(),
            "suspicious" => s(&f.suspicious).into(),
            "shards" => "3".into(),
            "out" => out.into(),
            _ => return None,
        })
    }
}

#[test]
fn the_argo_fan_out_runs_on_s3_and_equals_one_scan() {
    let Some((moto, d)) = s3_lake("corpus", 150, 1) else {
        return;
    };
    let text = std::fs::read_to_string(root().join("pipelines/argo/btu-scan-fanout.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let templates = doc["spec"]["templates"].as_sequence().unwrap();
    let template = |name: &str| {
        templates
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no template {name}"))
    };
    // The fan-out: scan runs once per item of plan's output, with the item's shard and index.
    let steps = template("audit")["steps"].as_sequence().unwrap();
    let scan_step = &steps[1][0];
    assert_eq!(scan_step["withParam"], "{{steps.plan.outputs.result}}");
    let item_params = crate::util::argo_parameters(&scan_step["arguments"]["parameters"]);
    assert_eq!(
        item_params,
        [
            ("shard".to_string(), "{{item.shard}}".to_string()),
            ("index".to_string(), "{{item.index}}".to_string())
        ]
    );
    let summary = d.path().join("summary.json");
    let params = test_params("s3://lake/argo");
    let args = |name: &str, item: Option<&serde_json::Value>| -> Vec<String> {
        let t = template(name);
        assert_eq!(
            t["retryStrategy"]["expression"], "asInt(lastRetry.exitCode) == 75",
            "{name} retries only temporary failures"
        );
        t["container"]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| {
                let a = a.as_str().unwrap();
                if a == "/work/suspicious_tokens.arrow" {
                    return params("suspicious").unwrap(); // the input artifact's path
                }
                if a == "/tmp/summary.json" {
                    return s(&summary).into();
                }
                fill_placeholders(a, &|k| {
                    if let Some(p) = k.strip_prefix("workflow.parameters.") {
                        return params(p);
                    }
                    let item = item?;
                    k.strip_prefix("inputs.parameters.")
                        .map(|p| item[p].to_string().trim_matches('"').to_string())
                })
            })
            .collect()
    };
    run_fanout(
        &moto,
        "s3://lake/corpus/",
        &args("plan", None),
        |items| items.iter().map(|i| args("scan", Some(i))).collect(),
        &args("merge", None),
        "s3://lake/argo/flagged_rows.parquet",
    );
    assert_eq!(moto.keys("argo/shards/").len(), 3);
}

#[test]
fn the_airflow_fan_out_runs_on_s3_and_equals_one_scan() {
    let Some((moto, _d)) = s3_lake("corpus", 150, 1) else {
        return;
    };
    let dags = root().join("pipelines/airflow");
    // The DAG module's own literals and its scan_arguments(item), read with plain python (the
    // DAG itself needs Airflow; pipelines::airflow_dags_import_with_airflow imports it).
    let python = |code: &str, input: &str| -> serde_json::Value {
        let o = std::process::Command::new("python3")
            .args(["-c", code])
            .current_dir(&dags)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(input.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(o.status.success());
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let lits = python(
        "import json, btu_scan_fanout as m\nprint(json.dumps({'plan': m.PLAN + m.COMMON, 'merge': m.MERGE + m.COMMON}))",
        "",
    );
    let params = test_params("s3://lake/airflow");
    let render = |args: &serde_json::Value| -> Vec<String> {
        args.as_array()
            .unwrap()
            .iter()
            .map(|a| {
                fill_placeholders(a.as_str().unwrap(), &|k| params(k.strip_prefix("params.")?))
            })
            .collect()
    };
    run_fanout(
        &moto,
        "s3://lake/corpus/",
        &render(&lits["plan"]),
        |items| {
            let mapped = python(
                "import json, sys, btu_scan_fanout as m\nprint(json.dumps([m.scan_arguments(i) for i in json.load(sys.stdin)]))",
                &serde_json::to_string(items).unwrap(),
            );
            mapped.as_array().unwrap().iter().map(render).collect()
        },
        &render(&lits["merge"]),
        "s3://lake/airflow/flagged_rows.parquet",
    );
    assert_eq!(moto.keys("airflow/shards/").len(), 3);
}
