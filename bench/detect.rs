//! Detection benchmark: samples/s per round for a fixed configuration on CPU, printed as JSON.
//!
//!     cargo run --release --example bench_detect            # synthetic corpus, always available
//!     cargo run --release --example bench_detect -- sst2    # SST-2 train from ../shared/datasets
//!
//! Fixed config: model 2 layers x 128 hidden (4 heads, intermediate 512), vocabulary trained on
//! the corpus (8,000), preset `paper`, batch 32, max-len 128, seed 42, one epoch per round.

use std::path::{Path, PathBuf};
use std::time::Instant;

use btu::io::corpus::CorpusSpec;
use btu::progress::Hidden;

fn main() {
    let which = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "synthetic".into());
    let dir = tempfile::tempdir().expect("temp dir");
    let corpus: PathBuf = match which.as_str() {
        "sst2" => {
            let p =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/sst2/train.parquet");
            assert!(p.is_file(), "{} is absent", p.display());
            p
        }
        _ => {
            let p = dir.path().join("synthetic.parquet");
            let (t, l) = btu::demo::synth::generate(6920, 42);
            btu::io::tables::write_parquet(
                &p,
                &btu::io::tables::corpus_batch(&t, &l).unwrap(),
                true,
            )
            .unwrap();
            p
        }
    };
    let poisoned = dir.path().join("poisoned.parquet");
    btu::steps::poison::run(&btu::steps::poison::PoisonJob {
        run: btu::steps::RunOpts {
            device: "cpu".into(),
            ..btu::steps::RunOpts::new(poisoned.clone())
        },
        input: CorpusSpec::new(vec![corpus.display().to_string()]),
        params: btu::steps::poison::PoisonParams::new(btu::steps::poison::Attack::AddWord),
    })
    .expect("poison");
    let model = dir.path().join("model");
    btu::steps::init_model::run(&btu::steps::init_model::InitModelJob {
        run: btu::steps::RunOpts {
            device: "cpu".into(),
            ..btu::steps::RunOpts::new(model.clone())
        },
        corpus: Some(CorpusSpec {
            label_col: None,
            ..CorpusSpec::new(vec![poisoned.display().to_string()])
        }),
        tokenizer: None,
        size: btu::steps::init_model::ModelSize {
            vocab_size: 8000,
            layers: 2,
            hidden: 128,
            heads: 4,
            intermediate: 512,
            max_position: 512,
            num_labels: 2,
            ..Default::default()
        },
    })
    .expect("init-model");
    let t0 = Instant::now();
    let summary = btu::steps::detect::run(
        &btu::steps::detect::DetectJob {
            run: btu::steps::RunOpts {
                device: "cpu".into(),
                ..btu::steps::RunOpts::new(dir.path().join("detect"))
            },
            corpus: CorpusSpec::new(vec![poisoned.display().to_string()]),
            model,
            params: btu::steps::detect::DetectParams::default(),
        },
        &Hidden,
    )
    .expect("detect");
    let rounds: Vec<serde_json::Value> = summary
        .rounds
        .iter()
        .map(|r| serde_json::json!({"round": r.round, "arch": r.arch, "seconds": r.seconds, "samples_per_s": r.samples_per_s}))
        .collect();
    let out = serde_json::json!({
        "bench": "detect",
        "corpus": which,
        "rows": summary.rows,
        "model": "2x128 (4 heads, ffn 512), vocab 8000",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rounds": rounds,
        "total_seconds": t0.elapsed().as_secs_f64(),
        "trigger_flagged": summary.flagged.iter().any(|t| t.token == "cf"),
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
    }
}
