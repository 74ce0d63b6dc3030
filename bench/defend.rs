//! Defence benchmark: where the wall time of `btu defend` goes, step by step, and the share of
//! verification (the `verify` and `verify-repaired` steps plus the escalation's rechecks inside
//! `unlearn`), printed as JSON.
//!
//!     cargo run --release --example bench_defend                 # the embedded demo, run here
//!     cargo run --release --example bench_defend -- A.json B.json # summaries of earlier runs
//!
//! Steps reused from an earlier run (`skipped`) count with the time they took when computed.

use serde_json::{json, Value};

/// Seconds per step of a `btu defend` summary (computed time for reused steps).
fn step_seconds(summary: &Value) -> Vec<(String, f64)> {
    summary["steps"]
        .as_array()
        .expect("a btu defend summary has steps")
        .iter()
        .map(|s| {
            let secs = s["computed_seconds"]
                .as_f64()
                .or_else(|| s["seconds"].as_f64())
                .unwrap_or(0.0);
            (s["step"].as_str().unwrap_or("?").to_string(), secs)
        })
        .collect()
}

/// Seconds the escalation's rechecks took inside `unlearn`: the stages' own `seconds`, or, for
/// summaries written before stages were timed, an upper bound (unlearn's total minus the clean
/// tuning, which also counts reading and writing the checkpoint).
fn recheck_seconds(summary: &Value) -> f64 {
    summary["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["step"] == "unlearn")
        .map(|s| {
            let u = &s["summary"];
            let Some(stages) = u["escalation"].as_array() else {
                return 0.0;
            };
            if stages.iter().all(|st| st["seconds"].is_f64()) {
                return stages.iter().filter_map(|st| st["seconds"].as_f64()).sum();
            }
            let total = u["seconds"].as_f64().unwrap_or(0.0);
            let tuning: f64 = u["clean_tuning"]["epochs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["seconds"].as_f64())
                .sum();
            (total - tuning).max(0.0)
        })
        .sum()
}

fn report(name: &str, summary: &Value) -> Value {
    let steps = step_seconds(summary);
    let total: f64 = steps.iter().map(|s| s.1).sum();
    let verify: f64 = steps
        .iter()
        .filter(|s| s.0.starts_with("verify"))
        .map(|s| s.1)
        .sum::<f64>()
        + recheck_seconds(summary);
    json!({
        "run": name,
        "total_seconds": total,
        "verification_seconds": verify,
        "verification_share": if total > 0.0 { verify / total } else { 0.0 },
        "steps": steps.iter().map(|(n, s)| json!({"step": n, "seconds": s})).collect::<Vec<_>>(),
    })
}

fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    let runs: Vec<Value> = if files.is_empty() {
        let m = btu::demo::run(
            &btu::demo::DemoJob {
                out: None,
                overwrite: false,
                rows: 2000,
                seed: 42,
                device: "cpu".into(),
                backend: btu::steps::defend::EvalBackend::Candle,
            },
            &btu::progress::Hidden,
        )
        .expect("the demo runs");
        vec![report(
            "demo",
            &serde_json::to_value(&m).expect("serializes"),
        )]
    } else {
        files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{f}: {e}"));
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
                report(f, &v)
            })
            .collect()
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"bench": "defend", "runs": runs})).unwrap()
    );
}
