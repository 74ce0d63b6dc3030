//! Lake benchmark: `btu scan` over 10 M generated rows in several Parquet files, on local disk and
//! on a local S3-compatible server (moto, from the .venv `make setup` makes), as 1 process and as
//! 2 shards (`--shard 0/2`, `--shard 1/2`) running side by side: rows/s and each process's peak
//! RSS, printed as JSON.
//!
//!     cargo build --release && cargo run --release --example bench_lake [-- ROWS]
//!
//! Outputs go where the corpus is (local files; `s3://` objects). Both layouts must flag the same
//! rows. moto keeps objects in memory: 10 M rows need ~1 GB of it.

#[path = "lake_corpus.rs"]
mod lake_corpus;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

/// A moto server on a free port, killed when dropped.
struct Moto(Child, String);

impl Moto {
    fn start() -> Moto {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let server = root.join(".venv/bin/moto_server");
        assert!(
            server.is_file(),
            "{} is absent: run make setup",
            server.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        for (k, v) in [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "bench"),
            ("AWS_SECRET_ACCESS_KEY", "bench"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ] {
            // SAFETY: set before any other thread of this program reads the environment.
            unsafe { std::env::set_var(k, v) };
        }
        Moto(child, endpoint)
    }

    /// Create the bucket and upload the corpus's files under `corpus/`.
    fn upload(&self, corpus: &Path) -> f64 {
        let create = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{}/bench", self.1)])
            .status()
            .unwrap();
        assert!(create.success(), "create bucket");
        let t0 = Instant::now();
        let mut files: Vec<_> = std::fs::read_dir(corpus)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            btu::io::store::put(
                &format!("s3://bench/corpus/{name}"),
                std::fs::read(&f).unwrap(),
            )
            .unwrap();
        }
        t0.elapsed().as_secs_f64()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Scan `corpus` as the given shards (none: one unsharded process), all at once; outputs named
/// after `out` (`{out}-{i}.parquet`).
fn run(c: &lake_corpus::BenchCorpus, corpus: &str, out: &str, shards: usize) -> Value {
    let t0 = Instant::now();
    let children: Vec<(Child, std::path::PathBuf)> = (0..shards)
        .map(|i| {
            let summary = c.dir.path().join(format!("summary-{shards}-{i}.json"));
            let _ = std::fs::remove_file(&summary);
            let mut cmd = Command::new(lake_corpus::btu_bin());
            cmd.args(["--quiet", "scan", "--corpus", corpus, "--overwrite"])
                .arg("--suspicious")
                .arg(&c.suspicious)
                .arg("--tokenizer")
                .arg(&c.model)
                .args(["--out", &format!("{out}-{shards}-{i}.parquet")])
                .arg("--summary")
                .arg(&summary)
                .stdout(Stdio::null());
            if shards > 1 {
                cmd.args(["--shard", &format!("{i}/{shards}")]);
            }
            (cmd.spawn().unwrap(), summary)
        })
        .collect();
    let mut processes = Vec::new();
    let (mut rows, mut flagged) = (0u64, 0u64);
    for (child, summary) in &children {
        let (code, peak, cpu) = lake_corpus::wait_rusage(child);
        assert_eq!(code, 0, "btu scan failed");
        let s: Value = serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
        rows += s["rows_scanned"].as_u64().unwrap();
        flagged += s["rows_flagged"].as_u64().unwrap();
        processes.push(json!({"rows": s["rows_scanned"], "seconds": s["seconds"], "peak_rss_mib": peak, "cpu_seconds": cpu}));
    }
    let wall = t0.elapsed().as_secs_f64();
    json!({"shards": shards, "rows": rows, "rows_flagged": flagged, "wall_seconds": wall,
           "rows_per_s": rows as f64 / wall, "processes": processes})
}

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let c = lake_corpus::make(rows, 8, 250_000);
    let local = c.corpus.display().to_string();
    let out = c.dir.path().join("flagged").display().to_string();
    let mut results = vec![run(&c, &local, &out, 1), run(&c, &local, &out, 2)];
    let moto = Moto::start();
    let upload_seconds = moto.upload(&c.corpus);
    for shards in [1, 2] {
        results.push(run(&c, "s3://bench/corpus/", "s3://bench/flagged", shards));
    }
    let flagged: Vec<&Value> = results.iter().map(|r| &r["rows_flagged"]).collect();
    assert!(
        flagged.windows(2).all(|w| w[0] == w[1]),
        "layouts flagged different rows: {flagged:?}"
    );
    let label = [
        "local, 1 process",
        "local, 2 shards",
        "s3, 1 process",
        "s3, 2 shards",
    ];
    let result = json!({
        "bench": "lake",
        "rows": rows,
        "files": c.files,
        "row_group_rows": 250_000,
        "corpus_bytes": c.bytes,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "generate_seconds": c.generate_seconds,
        "upload_seconds": upload_seconds,
        "runs": label.iter().zip(&results).map(|(l, r)| json!({"layout": l, "result": r})).collect::<Vec<_>>(),
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(&result).unwrap());
    }
    drop(moto);
}
