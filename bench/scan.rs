//! Scan benchmark: rows/s and peak memory of `btu scan` over >= 1,000,000 rows, printed as JSON.
//!
//!     cargo build --release && cargo run --release --example bench_scan [-- ROWS]
//!
//! The corpus (bench/lake_corpus.rs): SST-2 train text, 10 % of rows carrying `cf`, as 10 Parquet
//! files; the real `btu` binary runs as a child process so its peak resident memory is measured
//! alone. bench_lake measures shards and object stores at 10 M rows.

#[path = "lake_corpus.rs"]
mod lake_corpus;

use std::time::Instant;

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let c = lake_corpus::make(rows, 10, 1 << 20);
    let out = c.dir.path().join("flagged_rows.parquet");
    let t0 = Instant::now();
    #[allow(clippy::zombie_processes)] // reaped by wait4 in wait_rusage
    let child = std::process::Command::new(lake_corpus::btu_bin())
        .args(["--quiet", "scan", "--corpus"])
        .arg(&c.corpus)
        .arg("--suspicious")
        .arg(&c.suspicious)
        .arg("--tokenizer")
        .arg(&c.model)
        .arg("--out")
        .arg(&out)
        .arg("--summary")
        .arg(c.dir.path().join("summary.json"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (status, peak_mib, cpu) = lake_corpus::wait_rusage(&child);
    let wall = t0.elapsed().as_secs_f64();
    assert_eq!(status, 0, "btu scan failed");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.dir.path().join("summary.json")).unwrap()).unwrap();
    let result = serde_json::json!({
        "bench": "scan",
        "rows": summary["rows_scanned"],
        "files": c.files,
        "corpus_bytes": c.bytes,
        "rows_flagged": summary["rows_flagged"],
        "recall": summary["poisoned"]["recall"],
        "wall_seconds": wall,
        "rows_per_s": summary["rows_scanned"].as_f64().unwrap() / wall,
        "peak_rss_mib": peak_mib,
        "cpu_seconds": cpu,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "generate_seconds": c.generate_seconds,
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(&result).unwrap());
    }
}
