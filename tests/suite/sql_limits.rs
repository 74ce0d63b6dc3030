//! `btu sql` on hostile input: `--timeout`, `--memory-limit`, streamed results, queries from
//! standard input, and an unreachable object store. Every test runs the real binary.

use std::time::{Duration, Instant};

use crate::util::*;

/// A query that never finishes: a filtered cross join of a million rows with a million rows.
const RUNAWAY: &str = "SELECT count(*) AS n FROM generate_series(1, 1000000) a, generate_series(1, 1000000) b WHERE a.value + b.value < 0";

/// An aggregation with two million groups: far more than a megabyte of hash table.
const BIG_GROUP_BY: &str =
    "SELECT count(*) AS groups FROM (SELECT value, count(*) AS c FROM generate_series(1, 2000000) GROUP BY value)";

/// `btu sql ARGS`.
fn sql(args: &[&str]) -> Btu {
    btu(["sql"]).args(args)
}

/// Standard output of a successful `btu sql ARGS`.
fn sql_out(args: &[&str]) -> String {
    lossy(&sql(args).success().stdout)
}

#[test]
fn timeout_stops_a_runaway_query() {
    let t0 = Instant::now();
    let failed = sql(&["--timeout", "2", RUNAWAY]).fails_with(78, "--timeout");
    let took = t0.elapsed();
    let line = failed.stderr();
    assert!(line.contains("raise --timeout"), "{line}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(
        took >= Duration::from_secs(2),
        "stopped before the timeout: {took:?}"
    );
    // A query within its time runs.
    let out = sql_out(&["--timeout", "30", "--format", "csv", "SELECT 1 + 1 AS two"]);
    assert_eq!(out, "two\n2\n");
}

#[test]
fn a_timed_out_output_file_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("r.parquet");
    sql(&[
        "--timeout",
        "1",
        "--format",
        "parquet",
        "--output",
        s(&out),
        RUNAWAY,
    ])
    .fails_with(78, "--timeout");
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        0,
        "no output, no staging file"
    );
}

#[test]
fn memory_limit_exceeded_is_a_configuration_error() {
    let line = sql(&["--memory-limit", "1M", "--format", "csv", BIG_GROUP_BY])
        .fails_with(78, "exceeds --memory-limit 1M")
        .stderr();
    assert!(line.contains("raise it or narrow the query"), "{line}");
    // Sorting does not spill around the limit either.
    sql(&[
        "--memory-limit",
        "1M",
        "--format",
        "csv",
        "SELECT value FROM generate_series(1, 2000000) ORDER BY value % 7, value DESC",
    ])
    .fails_with(78, "--memory-limit");
    // Within the default limit the same aggregation runs.
    assert_eq!(
        sql_out(&["--format", "csv", BIG_GROUP_BY]),
        "groups\n2000000\n"
    );
}

#[test]
fn table_format_holds_its_result_within_the_memory_limit_and_csv_streams() {
    let q = "SELECT value FROM generate_series(1, 300000)";
    let line = sql(&["--memory-limit", "1M", "--format", "table", q])
        .fails_with(78, "--format csv")
        .stderr();
    assert!(line.contains("--output"), "{line}");
    // The same result streams as CSV under the same limit: header once, every row in order.
    let out = sql_out(&["--memory-limit", "1M", "--format", "csv", q]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 300_001);
    assert_eq!(lines[0], "value");
    assert_eq!(lines.iter().filter(|l| **l == "value").count(), 1);
    assert_eq!(lines[1], "1");
    assert_eq!(lines[300_000], "300000");
    // A small result still prints as a table.
    let out = sql_out(&["--memory-limit", "1M", "SELECT 7 AS seven"]);
    assert!(out.contains("| seven |"), "{out}");
}

#[test]
fn json_streams_a_valid_array_and_an_empty_result_is_empty() {
    // Several batches (DataFusion's batches hold 8192 rows) make one JSON array.
    let v = sql(&[
        "--format",
        "json",
        "SELECT value FROM generate_series(1, 20000)",
    ])
    .ok();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 20_000);
    assert_eq!(a[19_999]["value"], 20_000);
    let empty = "SELECT value FROM generate_series(1, 3) WHERE value > 5";
    assert_eq!(sql_out(&["--format", "json", empty]), "[]\n");
    // An empty CSV result keeps its header.
    assert_eq!(sql_out(&["--format", "csv", empty]), "value\n");
}

#[test]
fn parquet_and_arrow_outputs_stream_into_place() {
    let d = tempfile::tempdir().unwrap();
    let q = "SELECT value, value % 3 AS m FROM generate_series(1, 100000)";
    let pq = d.path().join("sub/r.parquet");
    sql(&[
        "--format",
        "parquet",
        "--output",
        s(&pq),
        "--memory-limit",
        "1M",
        q,
    ])
    .success();
    let arrow = d.path().join("r.arrow");
    sql(&["--format", "arrow", "--output", s(&arrow), q]).success();
    let b = btu::io::tables::read_ipc(&arrow).unwrap();
    assert_eq!(b.num_rows(), 100_000);
    let out = sql_out(&[
        "--format",
        "csv",
        "--table",
        &format!("p={}", pq.display()),
        "SELECT count(*) AS n, sum(value) AS s, sum(m) AS sm FROM p",
    ]);
    assert_eq!(out, "n,s,sm\n100000,5000050000,100000\n");
    // An existing output is refused without --overwrite.
    sql(&["--format", "arrow", "--output", s(&arrow), q]).fails_with(73, "--overwrite");
    // Only the outputs are left: no staging files.
    let mut names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["r.arrow", "sub"]);
    assert_eq!(std::fs::read_dir(d.path().join("sub")).unwrap().count(), 1);
}

#[test]
fn stdin_runs_every_query_and_fails_with_the_first_failure() {
    let input = "SELECT 1 AS a;\nCREATE TABLE x AS SELECT 1;\nSELECT 2 AS b;\nSELECT no_such_column FROM generate_series(1, 2);\nSELECT 3 AS c;\n";
    let o = sql(&["--format", "csv"]).stdin(input).exits(78);
    let err = lossy(&o.stderr);
    // The other queries' results are all there, in order.
    assert_eq!(lossy(&o.stdout), "a\n1\nb\n2\nc\n3\n");
    // Both failures are logged; the final line is the first one.
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("error: ") && last.contains("read-only"),
        "{err}"
    );
    assert!(err.contains("no_such_column"), "{err}");
    // With every query fine the run succeeds.
    let o = sql(&["--format", "csv"])
        .stdin("SELECT 1 AS a;\nSELECT 2 AS b;\n")
        .success();
    assert_eq!(lossy(&o.stdout), "a\n1\nb\n2\n");
}

#[test]
fn stdin_runs_a_last_query_without_semicolon_and_splits_only_real_semicolons() {
    let csv = |input: &str| lossy(&sql(&["--format", "csv"]).stdin(input).success().stdout);
    assert_eq!(
        csv("SELECT 1 AS a;\n  SELECT 41 + 1\n  AS answer"),
        "a\n1\nanswer\n42\n"
    );
    // Blank and comment-only leftovers are not queries; two queries on a line are two; a ';'
    // inside a string or a comment ends nothing.
    assert_eq!(
        csv("SELECT 1 AS x; SELECT 'a;b' AS s; -- the end;\n\n   \n-- only a comment\n"),
        "x\n1\ns\na;b\n"
    );
    assert_eq!(
        csv("SELECT 'multi;\nline' AS s;\n"),
        "s\n\"multi;\nline\"\n"
    );
}

#[test]
fn bad_limits_are_configuration_errors() {
    for bad in ["0", "-1", "abc", "nan", "inf", ""] {
        sql(&[&format!("--timeout={bad}"), "SELECT 1"]).fails_with(78, "--timeout");
    }
    for bad in ["0", "abc", "12X", "-5M", "M", "0.1"] {
        sql(&[&format!("--memory-limit={bad}"), "SELECT 1"]).fails_with(78, "--memory-limit");
    }
    for good in ["512M", "1.5G", "1048576", "64k", "2GiB"] {
        sql(&["--memory-limit", good, "--timeout", "0.5e2", "SELECT 1"]).success();
    }
}

#[test]
fn unreachable_object_store_arrow_table_is_a_temporary_failure() {
    btu([
        "sql",
        "--table",
        "t=s3://lake/tables/suspicious_tokens.arrow",
        "SELECT count(*) FROM t",
    ])
    .dead_store()
    .fails_with(75, "temporary failure");
}
