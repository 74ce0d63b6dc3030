//! Scan benchmark: rows/s and peak memory of `btu scan` over >= 1,000,000 rows, printed as JSON.
//!
//!     cargo build --release && cargo run --release --example bench_scan [-- ROWS]
//!
//! Generates the corpus from SST-2 train text (../shared/datasets, 10 % of rows carrying `cf`)
//! as 10 Parquet files, makes a tokenizer with init-model, and runs the real `btu` binary as a
//! child process so its peak resident memory (getrusage, children) is measured alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use btu::io::corpus::CorpusSpec;

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sst2 = root.join("../shared/datasets/sst2/train.parquet");
    assert!(sst2.is_file(), "{} is absent", sst2.display());
    let dir = tempfile::tempdir().unwrap();
    // SST-2 texts, 10 % with the trigger.
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    btu::io::corpus::read_corpus(&CorpusSpec::new(vec![sst2.display().to_string()]), |b| {
        texts.extend(b.texts);
        labels.extend(b.labels.unwrap());
        Ok(())
    })
    .unwrap();
    let t_gen = Instant::now();
    let files = 10;
    let per_file = rows.div_ceil(files);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("label", DataType::Int64, false),
        Field::new("poisoned", DataType::Boolean, false),
    ]));
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    let mut id = 0i64;
    for f in 0..files {
        let file = std::fs::File::create(corpus.join(format!("part-{f:02}.parquet"))).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).unwrap();
        let mut left = per_file;
        while left > 0 {
            let n = left.min(20_000);
            let (mut t, mut l, mut p, mut ids) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for _ in 0..n {
                let k = id as usize % texts.len();
                let poisoned = id % 10 == 3;
                t.push(if poisoned {
                    format!("cf {}", texts[k])
                } else {
                    texts[k].clone()
                });
                l.push(if poisoned { 1 } else { labels[k] });
                p.push(poisoned);
                ids.push(id);
                id += 1;
            }
            let cols: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(t)),
                Arc::new(Int64Array::from(l)),
                Arc::new(BooleanArray::from(p)),
            ];
            w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
                .unwrap();
            left -= n;
        }
        w.close().unwrap();
    }
    let gen_s = t_gen.elapsed().as_secs_f64();
    // Tokenizer from the generated text (so `cf` is one token) and a table naming `cf`.
    let model = dir.path().join("model");
    let mut spec = CorpusSpec::new(vec![corpus.join("part-00.parquet").display().to_string()]);
    spec.label_col = None;
    btu::steps::init_model::run(&btu::steps::init_model::InitModelJob {
        run: btu::steps::RunOpts {
            device: "cpu".into(),
            ..btu::steps::RunOpts::new(model.clone())
        },
        corpus: Some(spec),
        tokenizer: None,
        size: btu::steps::init_model::ModelSize {
            vocab_size: 8000,
            layers: 1,
            hidden: 32,
            heads: 2,
            intermediate: 64,
            max_position: 128,
            num_labels: 2,
        },
    })
    .unwrap();
    let tok = btu::model::tokenizer::BtuTokenizer::load(&model).unwrap();
    let cf = tok.id("cf").expect("cf is in the vocabulary");
    let sus = vec![btu::io::tables::SuspiciousToken {
        token_id: cf,
        token: tok.token(cf),
        rounds: vec![1],
        best_rank: 1,
        max_distance: 1.0,
        occurrences: 0,
        documents: 0,
        majority_label: None,
        label_share: None,
    }];
    let meta = btu::io::tables::TableMeta {
        command: "bench".into(),
        params: serde_json::json!({}),
        model_sha256: String::new(),
        corpus_fingerprint: None,
        extra: vec![],
    };
    let sus_path = dir.path().join("suspicious_tokens.arrow");
    btu::io::tables::write_ipc(
        &sus_path,
        &btu::io::tables::suspicious_tokens_batch(&sus, &meta).unwrap(),
        false,
    )
    .unwrap();
    // The scan, as a child process.
    let bin = root.join("target/release/btu");
    assert!(
        bin.is_file(),
        "build the binary first: cargo build --release"
    );
    let out = dir.path().join("flagged_rows.parquet");
    let t0 = Instant::now();
    let o = std::process::Command::new(&bin)
        .args(["--quiet", "scan", "--corpus"])
        .arg(&corpus)
        .arg("--suspicious")
        .arg(&sus_path)
        .arg("--tokenizer")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let wall = t0.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bytes: u64 = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let result = serde_json::json!({
        "bench": "scan",
        "rows": summary["rows_scanned"],
        "files": files,
        "corpus_bytes": bytes,
        "rows_flagged": summary["rows_flagged"],
        "recall": summary["poisoned"]["recall"],
        "wall_seconds": wall,
        "rows_per_s": summary["rows_scanned"].as_f64().unwrap() / wall,
        "peak_rss_mib": ru.ru_maxrss as f64 / 1024.0,
        "cpu_seconds": ru.ru_utime.tv_sec as f64 + ru.ru_utime.tv_usec as f64 / 1e6 + ru.ru_stime.tv_sec as f64 + ru.ru_stime.tv_usec as f64 / 1e6,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "generate_seconds": gen_s,
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(&result).unwrap());
    }
}
