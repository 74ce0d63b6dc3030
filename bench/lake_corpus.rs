//! The corpus the scan benchmarks read (shared by bench_scan and bench_lake): SST-2 train text
//! (../shared/datasets) repeated to any number of rows, 10 % of them carrying `cf`, as Parquet
//! files (zstd) with row groups of a given size; a tokenizer made with init-model on it (so `cf`
//! is one token) and a suspicious_tokens table naming `cf`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use btu::io::corpus::CorpusSpec;

/// A generated corpus, its tokenizer and what to look for; removed when dropped.
pub struct BenchCorpus {
    pub dir: tempfile::TempDir,
    /// The directory of Parquet files.
    pub corpus: PathBuf,
    pub files: usize,
    pub bytes: u64,
    pub model: PathBuf,
    pub suspicious: PathBuf,
    pub generate_seconds: f64,
}

/// The release binary (CARGO_TARGET_DIR honoured), run as a child process so that its peak
/// resident memory is measured alone.
pub fn btu_bin() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/btu");
    assert!(
        bin.is_file(),
        "build the binary first: cargo build --release"
    );
    bin
}

/// SST-2 train's texts and labels.
fn sst2() -> (Vec<String>, Vec<i64>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sst2 = root.join("../shared/datasets/sst2/train.parquet");
    assert!(sst2.is_file(), "{} is absent", sst2.display());
    let (mut texts, mut labels) = (Vec::new(), Vec::new());
    btu::io::corpus::read_corpus(&CorpusSpec::new(vec![sst2.display().to_string()]), |b| {
        texts.extend(b.texts);
        labels.extend(b.labels.unwrap());
        Ok(())
    })
    .unwrap();
    (texts, labels)
}

/// `rows` rows in `files` files with row groups of `row_group` rows.
pub fn make(rows: usize, files: usize, row_group: usize) -> BenchCorpus {
    let (texts, labels) = sst2();
    let dir = tempfile::tempdir().unwrap();
    let t_gen = Instant::now();
    let per_file = rows.div_ceil(files);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("label", DataType::Int64, false),
        Field::new("poisoned", DataType::Boolean, false),
    ]));
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_max_row_group_row_count(Some(row_group))
        .build();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    let mut id = 0i64;
    for f in 0..files {
        let file = std::fs::File::create(corpus.join(format!("part-{f:02}.parquet"))).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props.clone()))
            .unwrap();
        let mut left = per_file.min(rows - id as usize);
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
    let generate_seconds = t_gen.elapsed().as_secs_f64();
    let bytes = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let model = dir.path().join("model");
    tokenizer(&corpus, &model);
    let suspicious = dir.path().join("suspicious_tokens.arrow");
    suspicious_cf(&model, &suspicious);
    BenchCorpus {
        dir,
        corpus,
        files,
        bytes,
        model,
        suspicious,
        generate_seconds,
    }
}

/// A small model whose WordPiece vocabulary is trained on the first file.
fn tokenizer(corpus: &Path, model: &Path) {
    let mut spec = CorpusSpec::new(vec![corpus.join("part-00.parquet").display().to_string()]);
    spec.label_col = None;
    spec.limit = Some(200_000);
    btu::steps::init_model::run(&btu::steps::init_model::InitModelJob {
        run: btu::steps::RunOpts {
            device: "cpu".into(),
            ..btu::steps::RunOpts::new(model.to_path_buf())
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
            ..Default::default()
        },
    })
    .unwrap();
}

/// A suspicious_tokens table naming `cf`.
fn suspicious_cf(model: &Path, path: &Path) {
    let tok = btu::model::tokenizer::BtuTokenizer::load(model).unwrap();
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
    btu::io::tables::write_ipc(
        path,
        &btu::io::tables::suspicious_tokens_batch(&sus, &meta).unwrap(),
        false,
    )
    .unwrap();
}

/// Wait for a child: (exit code, -1 if killed; peak RSS in MiB; CPU seconds), from wait4.
pub fn wait_rusage(child: &std::process::Child) -> (i32, f64, f64) {
    let mut status = 0i32;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `ru` are valid for the call.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (
        code,
        ru.ru_maxrss as f64 / 1024.0,
        secs(ru.ru_utime) + secs(ru.ru_stime),
    )
}
