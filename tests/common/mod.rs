//! Helpers shared by the integration tests: run the real binary, make corpora in code.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `btu` binary.
pub fn btu() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_btu"));
    c.arg("--quiet");
    c.env_remove("BTU_SUMMARY");
    c
}

/// Run and return output, with stderr shown on failure.
pub fn run(args: &[&str]) -> Output {
    let out = btu().args(args).output().expect("spawn btu");
    out
}

/// A command line split on white space (for arguments without spaces, such as temp paths).
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Run, assert success, return stdout parsed as JSON.
pub fn run_ok(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "btu {:?} failed with {:?}\nstderr:\n{}",
        args,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is the summary JSON")
}

/// Write a synthetic labelled corpus of `n` rows.
pub fn synth_corpus(path: &Path, n: usize, seed: u64) {
    let (texts, labels) = btu::demo::synth::generate(n, seed);
    let batch = btu::io::tables::corpus_batch(&texts, &labels).unwrap();
    btu::io::tables::write_parquet(path, &batch, true).unwrap();
}

/// Report a skipped test where CI's log shows it: straight to file descriptor 2, past the test
/// harness's capture of passing tests' output (an absent dependency is a visible skip).
pub fn skipped(msg: &str) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: fd 2 is open for the whole process; ManuallyDrop keeps it from being closed.
    let mut err = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
    let _ = writeln!(err, "{msg}");
}

/// The shared datasets directory (../shared/datasets beside the repository, or BTU_DATASETS).
pub fn datasets() -> Option<PathBuf> {
    let p = std::env::var_os("BTU_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets"));
    if p.join("sst2/train.parquet").is_file() {
        Some(p)
    } else {
        skipped(&format!(
            "SKIPPED: real-data test: {} is absent (set BTU_DATASETS to the shared datasets)",
            p.display()
        ));
        None
    }
}

/// The resume state `btu train` keeps for output `name` in `dir` (`.<name>.partial-<run hash>`).
pub fn partial_dir(dir: &Path, name: &str) -> Option<PathBuf> {
    let prefix = format!(".{name}.partial-");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny model trained on `corpus`: 1 layer, hidden 32.
pub fn tiny_model(dir: &Path, corpus: &Path, vocab: usize) {
    run_ok(&[
        "init-model",
        "--out",
        s(dir),
        "--corpus",
        s(corpus),
        "--vocab-size",
        &vocab.to_string(),
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--intermediate",
        "64",
        "--max-position",
        "256",
    ]);
}

/// `btu` pointed at an S3 endpoint where nothing listens (a port closed again), with bounded
/// retries: for the "store unreachable" cases.
pub fn btu_with_dead_store() -> Command {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed once dropped
    let mut c = btu();
    c.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
    c.envs([
        ("AWS_ACCESS_KEY_ID", "x"),
        ("AWS_SECRET_ACCESS_KEY", "y"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
        ("BTU_S3_MAX_RETRIES", "1"),
        ("BTU_S3_RETRY_TIMEOUT_S", "2"),
    ]);
    c
}

/// A real S3-compatible server (moto, from the .venv that `make setup` makes) on 127.0.0.1,
/// stopped when dropped. `None` (with a SKIPPED note) when moto is not installed.
pub struct Moto {
    child: std::process::Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start(bucket: &str) -> Option<Moto> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let server = root.join(".venv/bin/moto_server");
        if !server.is_file() {
            skipped(&format!(
                "SKIPPED: {} is absent (make setup installs moto)",
                server.display()
            ));
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed().as_secs() < 60, "moto_server did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let m = Moto { child, endpoint };
        let py = root.join(".venv/bin/python");
        let script = format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', aws_access_key_id='testing', aws_secret_access_key='secret-never-logged', region_name='us-east-1').create_bucket(Bucket='{bucket}')",
            m.endpoint
        );
        let ok = std::process::Command::new(py)
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(ok.success(), "create bucket");
        Some(m)
    }

    /// The AWS_* variables that point a client at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "secret-never-logged".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Run btu with this server's environment.
    pub fn btu(&self, args: &[&str]) -> Output {
        let mut c = btu();
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c.args(args).output().expect("spawn btu")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
