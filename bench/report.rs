//! Report benchmark: wall time and size of `btu report` on a run directory, printed as JSON.
//!
//!     cargo run --release --example bench_report [-- RUN_DIR [REPEATS]]
//!
//! Default run: runs/default/sst2-addword (SST-2 Add-Word with MiniLM, made by
//! `btu defend --config pipelines/default/sst2-addword.toml`). Each repeat renders the whole
//! page, document frequencies included (the detection corpus is read and tokenized again).

use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let run = PathBuf::from(args.next().unwrap_or("runs/default/sst2-addword".into()));
    let repeats: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    assert!(
        run.join("detect/token_scores.arrow").is_file(),
        "{} is not a defend run",
        run.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..repeats {
        let t0 = Instant::now();
        let r = btu::steps::report::run(&btu::steps::report::ReportJob {
            dir: run.clone(),
            scans: Vec::new(),
            tokenizer: None,
            run: btu::steps::RunOpts {
                overwrite: true,
                ..btu::steps::RunOpts::new(dir.path().join("report.html"))
            },
        })
        .expect("report");
        times.push(t0.elapsed().as_secs_f64());
        last = Some(r);
    }
    times.sort_by(f64::total_cmp);
    let r = last.expect("one repeat");
    println!(
        "{}",
        serde_json::json!({
            "bench": "report",
            "run": run,
            "repeats": repeats,
            "seconds_median": times[times.len() / 2],
            "seconds_max": times[times.len() - 1],
            "bytes": r.bytes,
            "sections": r.sections,
            "documents_unavailable": r.documents_unavailable,
        })
    );
}
