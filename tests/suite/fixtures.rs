//! Models, corpora and runs that several tests read, each built once per test process (on first
//! use, behind a `OnceLock`) in this process's fixture directory, `suite-<pid>` in cargo's
//! temporary directory for integration tests, which is removed when the process exits (and,
//! should a process be killed, by the next one).
//!
//! Tests only read a fixture: they write into their own temporary directories, and copy a model
//! before they change it. Every fixture is complete before any test sees it, so tests do not
//! depend on each other's order and run safely on parallel threads.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::util::*;

static ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_root() {
    if let Some(d) = ROOT.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// This process's fixture directory.
fn root() -> &'static Path {
    ROOT.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(base).unwrap();
        // Directories of earlier test processes that are gone (killed before they could clean up).
        for e in std::fs::read_dir(base).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("suite-")
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let d = base.join(format!("suite-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        // SAFETY: registers a plain function that only removes a directory; it runs at exit.
        unsafe { libc::atexit(remove_root) };
        d
    })
}

/// A fresh directory `name` for one fixture.
fn fixture_dir(name: &str) -> PathBuf {
    let d = root().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A clean synthetic corpus of 200 rows and a tiny model trained on it (vocabulary 300): for
/// tests that need some valid model and corpus (bad input, refused flags, dry runs, a second
/// vocabulary).
pub struct Tiny {
    pub corpus: PathBuf,
    pub model: PathBuf,
}

impl Tiny {
    pub const ROWS: usize = 200;
}

pub fn tiny() -> &'static Tiny {
    static F: OnceLock<Tiny> = OnceLock::new();
    F.get_or_init(|| {
        let d = fixture_dir("tiny");
        let corpus = d.join("corpus.parquet");
        synth_corpus(&corpus, Tiny::ROWS, 1);
        let model = d.join("model");
        tiny_model(&model, &corpus, 300);
        Tiny { corpus, model }
    })
}

/// Module `hostile`: 600 clean rows (seed 3), poisoned with Add-Word (rate 0.1, target 1), a
/// tiny model on them, its detection (alpha 2), a victim trained one epoch, and the victim
/// unlearned (frobenius threshold).
pub struct Victim {
    /// The clean corpus the poisoned one was made from.
    pub clean: PathBuf,
    /// The poisoned corpus.
    pub corpus: PathBuf,
    pub model: PathBuf,
    pub victim: PathBuf,
    pub detect: PathBuf,
    pub unlearned: PathBuf,
}

impl Victim {
    pub const CLEAN_ROWS: usize = 600;
    pub const SEED: u64 = 3;

    /// The paths as strings: (corpus, model, victim, suspicious_tokens.arrow).
    pub fn paths(&self) -> (&str, &str, &str, String) {
        let sus = self.detect.join("suspicious_tokens.arrow");
        (
            s(&self.corpus),
            s(&self.model),
            s(&self.victim),
            sus.display().to_string(),
        )
    }
}

pub fn victim() -> &'static Victim {
    static F: OnceLock<Victim> = OnceLock::new();
    F.get_or_init(|| {
        let root = fixture_dir("victim");
        let clean = root.join("clean.parquet");
        synth_corpus(&clean, Victim::CLEAN_ROWS, Victim::SEED);
        let (c, m) = (root.join("poisoned.parquet"), root.join("model"));
        btu!(
            "poison --input {} --output {} --attack add-word --rate 0.1 --target 1",
            s(&clean),
            s(&c)
        )
        .ok();
        tiny_model(&m, &c, 300);
        let (det, victim, unl) = (root.join("detect"), root.join("victim"), root.join("unlearned"));
        let (cs, ms) = (s(&c), s(&m));
        btu!("detect --corpus {cs} --model {ms} --out {} --device cpu --alpha 2", s(&det)).ok();
        btu!("train --corpus {cs} --model {ms} --out {} --epochs 1 --lr 1e-3", s(&victim)).ok();
        let sus = det.join("suspicious_tokens.arrow");
        btu!(
            "unlearn --checkpoint {} --reference {ms} --suspicious {} --out {} --threshold frobenius",
            s(&victim),
            s(&sus),
            s(&unl)
        )
        .ok();
        Victim {
            clean,
            corpus: c,
            model: m,
            victim,
            detect: det,
            unlearned: unl,
        }
    })
}

/// Module `unlearn`: 1500 clean rows (seed 21) poisoned with Add-Word `cf` (rate 0.1, target 1),
/// a tiny model (vocabulary 400), its detection (alpha 1), and a checkpoint trained two epochs
/// that has learned the backdoor.
pub struct Trained {
    pub corpus: PathBuf,
    pub model: PathBuf,
    pub ckpt: PathBuf,
    pub detect: PathBuf,
}

pub fn trained() -> &'static Trained {
    static F: OnceLock<Trained> = OnceLock::new();
    F.get_or_init(|| {
        let root = fixture_dir("trained");
        let clean = root.join("clean.parquet");
        synth_corpus(&clean, 1500, 21);
        let corpus = root.join("poisoned.parquet");
        btu!(
            "poison --input {} --output {} --attack add-word --rate 0.1 --target 1",
            s(&clean),
            s(&corpus)
        )
        .ok();
        let model = root.join("model");
        tiny_model(&model, &corpus, 400);
        let (detect, ckpt) = (root.join("detect"), root.join("ckpt"));
        let (cs, ms) = (s(&corpus), s(&model));
        btu!(
            "detect --corpus {cs} --model {ms} --out {} --device cpu --alpha 1",
            s(&detect)
        )
        .ok();
        btu!(
            "train --corpus {cs} --model {ms} --out {} --epochs 2 --lr 1e-3 --device cpu",
            s(&ckpt)
        )
        .ok();
        Trained {
            corpus,
            model,
            ckpt,
            detect,
        }
    })
}

/// Module `lake`: 2000 clean rows (seed 31) poisoned with Add-Word (rate 0.1) into two files of
/// 1000 rows (`corpus/part-0.parquet`, `corpus/part-1.parquet`), a tiny model on them and its
/// detection.
pub struct Lake {
    pub corpus_dir: PathBuf,
    pub model: PathBuf,
    pub detect: PathBuf,
    pub suspicious: PathBuf,
}

pub fn lake() -> &'static Lake {
    static F: OnceLock<Lake> = OnceLock::new();
    F.get_or_init(|| {
        let root = fixture_dir("lake");
        let clean = root.join("clean.parquet");
        synth_corpus(&clean, 2000, 31);
        let corpus_dir = root.join("corpus");
        std::fs::create_dir(&corpus_dir).unwrap();
        let poison = |part: &str, filter: &str, extra: &[&str]| {
            btu([
                "poison",
                "--input",
                s(&clean),
                "--output",
                s(&corpus_dir.join(part)),
                "--attack",
                "add-word",
                "--rate",
                "0.1",
                "--filter",
                filter,
            ])
            .args(extra)
            .ok()
        };
        poison("part-0.parquet", "id < 1000", &[]);
        poison("part-1.parquet", "id >= 1000", &["--seed", "7"]);
        let model = root.join("model");
        tiny_model(&model, &corpus_dir, 400);
        let detect = root.join("detect");
        btu!(
            "detect --corpus {} --model {} --out {} --device cpu",
            s(&corpus_dir),
            s(&model),
            s(&detect)
        )
        .ok();
        Lake {
            suspicious: detect.join("suspicious_tokens.arrow"),
            corpus_dir,
            model,
            detect,
        }
    })
}

/// Module `onnx`: 400 clean rows (seed 8), a 2-layer model (hidden 32, 4 heads, 128 positions)
/// trained three epochs, and its ONNX export (with `tokenizer.json` beside it).
pub struct Onnx {
    pub corpus: PathBuf,
    /// The trained checkpoint.
    pub model: PathBuf,
    pub onnx: PathBuf,
}

pub fn onnx() -> &'static Onnx {
    static F: OnceLock<Onnx> = OnceLock::new();
    F.get_or_init(|| {
        let root = fixture_dir("onnx");
        let corpus = root.join("c.parquet");
        synth_corpus(&corpus, 400, 8);
        let model = root.join("model");
        btu!(
            "init-model --out {} --corpus {} --vocab-size 300 --layers 2 --hidden 32 --heads 4 \
             --intermediate 64 --max-position 128",
            s(&model),
            s(&corpus)
        )
        .ok();
        // Train a little so the weights are not all at initialisation.
        let ckpt = root.join("ckpt");
        btu!(
            "train --corpus {} --model {} --out {} --epochs 3 --lr 3e-3 --device cpu",
            s(&corpus),
            s(&model),
            s(&ckpt)
        )
        .ok();
        let onnx = root.join("export/model.onnx");
        let sum = btu!("export-onnx --checkpoint {} --out {}", s(&ckpt), s(&onnx)).ok();
        assert_eq!(sum["opset"], 17);
        Onnx {
            corpus,
            model: ckpt,
            onnx,
        }
    })
}

/// Modules `defend` and `pipelines`: a 4-class topic corpus generated in code (train 2,400 rows,
/// test 400, clean 500 sharing no text with test) through the experiment flow of `btu defend`
/// (the demo's method, a random model from `[model.init]`, Add-Word `cf` to class 3): its run
/// holds the base model (`model/`), the backdoored victim (`victim/`) and the poisoned corpus
/// (`poison/train.parquet`), which the repair-flow tests take as a user's.
pub struct FourClass {
    /// `train.parquet`, `test.parquet`, `clean.parquet`.
    pub data: PathBuf,
    /// The experiment's configuration.
    pub config: btu::steps::defend::DefendConfig,
    /// The experiment's run directory.
    pub run: PathBuf,
    /// Its `metrics.json`.
    pub metrics: serde_json::Value,
}

impl FourClass {
    /// A config for these splits in run directory `run`: the demo's method, backdoor to class 3,
    /// no model yet.
    pub fn config_for(data: &Path, run: &Path) -> btu::steps::defend::DefendConfig {
        let mut cfg = btu::demo::config(run, 42, "cpu", btu::steps::defend::EvalBackend::Auto);
        for (split, name) in [
            (&mut cfg.data.train, "train"),
            (&mut cfg.data.test, "test"),
            (&mut cfg.data.clean, "clean"),
        ] {
            *split = vec![data.join(format!("{name}.parquet")).display().to_string()];
        }
        cfg.model.init = None;
        cfg.poison.as_mut().unwrap().target = 3;
        cfg
    }
}

pub fn four_class() -> &'static FourClass {
    static F: OnceLock<FourClass> = OnceLock::new();
    F.get_or_init(|| {
        let d = fixture_dir("four-class");
        let data = d.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let (test, test_l) = topic_corpus(400, 4, 2);
        let seen: std::collections::HashSet<&String> = test.iter().collect();
        let (clean, clean_l): (Vec<String>, Vec<i64>) = {
            let (t, l) = topic_corpus(500, 4, 3);
            t.into_iter()
                .zip(l)
                .filter(|(t, _)| !seen.contains(t))
                .unzip()
        };
        let (train, train_l) = topic_corpus(2400, 4, 1);
        for (name, t, l) in [
            ("train", &train, &train_l),
            ("test", &test, &test_l),
            ("clean", &clean, &clean_l),
        ] {
            let batch = btu::io::tables::corpus_batch(t, l).unwrap();
            btu::io::tables::write_parquet(&data.join(format!("{name}.parquet")), &batch, true)
                .unwrap();
        }
        let run = d.join("experiment");
        let mut config = FourClass::config_for(&data, &run);
        config.model.init =
            btu::demo::config(&run, 42, "cpu", btu::steps::defend::EvalBackend::Auto)
                .model
                .init;
        let path = d.join("experiment.toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        let metrics = btu(["defend", "--config", s(&path)]).ok();
        FourClass {
            data,
            config,
            run,
            metrics,
        }
    })
}
