//! Shared by every module of the suite: the `btu` command builder, corpora made in code, visible
//! skips, and a real S3-compatible server (moto).

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// `btu!("detect --corpus {c} --out {o}")`: [`Btu`] for a command line given as a format string,
/// split on white space (for arguments without spaces, such as temp paths).
macro_rules! btu {
    ($($fmt:tt)+) => { $crate::util::Btu::line(&format!($($fmt)+)) };
}

/// One run of the built `btu` binary (with `--quiet`, without `BTU_SUMMARY` from the caller's
/// environment): arguments, environment and standard input, then one terminal method that runs
/// it and checks the outcome ([`Btu::ok`], [`Btu::fails_with`], ...).
#[must_use = "a Btu does nothing until a terminal method (ok, fails_with, run, ...) runs it"]
pub struct Btu {
    cmd: Command,
    shown: Vec<String>,
    stdin: Option<Vec<u8>>,
}

/// `btu(["detect", "--corpus", ...])`: see [`Btu`].
pub fn btu<I, S>(args: I) -> Btu
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Btu::new(args)
}

impl Btu {
    pub fn new<I, S>(args: I) -> Btu
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_btu"));
        cmd.arg("--quiet");
        cmd.env_remove("BTU_SUMMARY");
        Btu {
            cmd,
            shown: Vec::new(),
            stdin: None,
        }
        .args(args)
    }

    /// A command line split on white space.
    pub fn line(line: &str) -> Btu {
        Btu::new(line.split_whitespace())
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Btu {
        self.shown.push(arg.as_ref().to_string_lossy().into_owned());
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Btu
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Btu {
        self.cmd.env(key, value);
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Btu
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.cmd.envs(vars);
        self
    }

    /// Feed `bytes` on standard input (closed after them).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Btu {
        self.stdin = Some(bytes.into());
        self
    }

    /// Point the S3 client at an endpoint where nothing listens (a port closed again), with
    /// bounded retries: for the "store unreachable" cases.
    pub fn dead_store(self) -> Btu {
        let port = free_port(); // closed once its listener is dropped
        self.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
            .envs([
                ("AWS_ACCESS_KEY_ID", "x"),
                ("AWS_SECRET_ACCESS_KEY", "y"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ALLOW_HTTP", "true"),
                ("BTU_S3_MAX_RETRIES", "1"),
                ("BTU_S3_RETRY_TIMEOUT_S", "2"),
            ])
    }

    /// The command line, for messages.
    pub fn what(&self) -> String {
        format!("btu {}", self.shown.join(" "))
    }

    /// Run to the end and return the output, whatever the exit status.
    pub fn run(mut self) -> Output {
        let Some(input) = self.stdin.take() else {
            return self.cmd.output().expect("spawn btu");
        };
        let mut child = self
            .cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn btu");
        let mut pipe = child.stdin.take().unwrap();
        // Written from another thread so that a large output cannot block the input.
        let writer = std::thread::spawn(move || pipe.write_all(&input));
        let out = child.wait_with_output().expect("wait for btu");
        writer.join().unwrap().expect("write btu's standard input");
        out
    }

    /// Run; assert exit status 0 (else panic with the command line, exit code and stderr).
    pub fn success(self) -> Output {
        let what = self.what();
        let o = self.run();
        assert!(
            o.status.success(),
            "{what}\nfailed with {:?}; stderr:\n{}",
            o.status.code(),
            lossy(&o.stderr)
        );
        o
    }

    /// Run; assert success and return stdout parsed as JSON (the summary, or `sql`'s rows).
    pub fn ok(self) -> serde_json::Value {
        let what = self.what();
        let o = self.success();
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{what}\nstdout is not JSON ({e}):\n{}", lossy(&o.stdout)))
    }

    /// Run; assert exit status `code` only (usage errors from clap, several queries' errors).
    pub fn exits(self, code: i32) -> Output {
        let what = self.what();
        let o = self.run();
        assert_eq!(
            o.status.code(),
            Some(code),
            "{what}\nstderr:\n{}",
            lossy(&o.stderr)
        );
        o
    }

    /// Run; assert the documented failure: exit `code`, exactly one line on stderr,
    /// `error: ...` containing `needle`, nothing on stdout.
    pub fn fails_with(self, code: i32, needle: &str) -> Failure {
        let what = self.what();
        Failure::check(self.run(), what, code, needle)
    }

    /// Start it with stdout and stderr discarded (to be killed, or raced).
    pub fn spawn(mut self) -> Child {
        self.cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn btu")
    }

    /// Start it with stdout and stderr captured: finish with [`Failure::check`] or
    /// `wait_with_output`.
    pub fn spawn_piped(mut self) -> Child {
        self.cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn btu")
    }
}

/// A run that failed as documented (see [`Btu::fails_with`]); more checks chain on it.
pub struct Failure {
    pub output: Output,
    what: String,
}

impl Failure {
    /// The checks of [`Btu::fails_with`] on the output of a run described by `what`.
    pub fn check(output: Output, what: impl Into<String>, code: i32, needle: &str) -> Failure {
        let what = what.into();
        let err = lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{what}\nstderr:\n{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{what}\none line on stderr, got:\n{err}");
        assert!(lines[0].starts_with("error: "), "{what}\n{err}");
        assert!(
            lines[0].contains(needle),
            "{what}\n'{needle}' not in: {err}"
        );
        assert!(
            output.stdout.is_empty(),
            "{what}\nno summary on failure: {}",
            lossy(&output.stdout)
        );
        Failure { output, what }
    }

    /// The one line of stderr.
    pub fn stderr(&self) -> String {
        lossy(&self.output.stderr)
    }

    /// The run's output `path` is absent, and so is any staging entry of it
    /// (`.<name>.tmp-*` beside it).
    pub fn and_no_output(self, path: &Path) -> Failure {
        assert!(
            !path.exists(),
            "{}\noutput {} left behind",
            self.what,
            path.display()
        );
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
            let prefix = format!(".{}.tmp-", name.to_string_lossy());
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                assert!(
                    !n.starts_with(&prefix),
                    "{}\nstaging leftover {n}",
                    self.what
                );
            }
        }
        self
    }

    /// No temporary or staging entry at all in `dir` (see [`no_leftovers`]).
    pub fn and_no_leftovers(self, dir: &Path) -> Failure {
        no_leftovers(dir);
        self
    }
}

/// No temporary or staging (`.tmp-`) entries left in `dir`.
pub fn no_leftovers(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !name.contains(".tmp-"),
            "leftover {name} in {}",
            dir.display()
        );
    }
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command line split on white space (for arguments without spaces, such as temp paths).
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Write a synthetic labelled corpus of `n` rows.
pub fn synth_corpus(path: &Path, n: usize, seed: u64) {
    let (texts, labels) = btu::demo::synth::generate(n, seed);
    let batch = btu::io::tables::corpus_batch(&texts, &labels).unwrap();
    btu::io::tables::write_parquet(path, &batch, true).unwrap();
}

/// `batch` with one more column, `name` (not nullable).
pub fn with_column(
    batch: &arrow::array::RecordBatch,
    name: &str,
    column: arrow::array::ArrayRef,
) -> arrow::array::RecordBatch {
    let mut fields: Vec<arrow::datatypes::Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(arrow::datatypes::Field::new(
        name,
        column.data_type().clone(),
        false,
    ));
    let mut cols = batch.columns().to_vec();
    cols.push(column);
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
    arrow::array::RecordBatch::try_new(schema, cols).unwrap()
}

/// A tiny model trained on `corpus`: 1 layer, hidden 32, 256 positions.
pub fn tiny_model(dir: &Path, corpus: &Path, vocab: usize) {
    btu!(
        "init-model --out {} --corpus {} --vocab-size {vocab} --layers 1 --hidden 32 --heads 2 \
         --intermediate 64 --max-position 256",
        s(dir),
        s(corpus)
    )
    .ok();
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

/// The repository root (the tests' working directory).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------ skips

/// Where skips are recorded, one line each: `$BTU_TEST_SKIPS` (`make test` sets it, empties it
/// first and prints it after the run), else `skipped.txt` in cargo's temporary directory for
/// integration tests.
pub fn skips_file() -> PathBuf {
    std::env::var_os("BTU_TEST_SKIPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped.txt"))
}

/// The one way a test (or part of one) is skipped: `SKIPPED: <test>: <reason>` straight to file
/// descriptor 2, past the test harness's capture of passing tests' output, and appended to
/// [`skips_file`] so that `make test` counts it. The caller then returns.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("?")
        .to_string();
    let line = format!("SKIPPED: {test}: {reason}\n");
    {
        use std::os::fd::FromRawFd;
        // SAFETY: fd 2 is open for the whole process; ManuallyDrop keeps it from being closed.
        let mut err = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
        let _ = err.write_all(line.as_bytes());
    }
    let path = skips_file();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // One write of one short line to a file opened for appending: lines of parallel tests do
    // not interleave.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        panic!("cannot record the skip in {}: {e}", path.display());
    }
}

/// The shared datasets directory (../shared/datasets beside the repository, or BTU_DATASETS);
/// `None` (after [`skip`]) when absent.
pub fn datasets() -> Option<PathBuf> {
    let p = std::env::var_os("BTU_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/datasets"));
    if p.join("sst2/train.parquet").is_file() {
        Some(p)
    } else {
        skip(&format!(
            "real-data test: {} is absent (set BTU_DATASETS to the shared datasets)",
            p.display()
        ));
        None
    }
}

/// ONNX Runtime is found (`make setup` installs it into .venv); else [`skip`] with `what`.
pub fn have_ort(what: &str) -> bool {
    let found = btu::steps::eval::find_ort_library(None).is_ok();
    if !found {
        skip(&format!(
            "ONNX Runtime is absent (make setup installs it): {what}"
        ));
    }
    found
}

// -------------------------------------------------------------------------------------- moto

/// A port that was free a moment ago (its listener is closed on return).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The python of the .venv that `make setup` makes.
pub fn venv_python() -> PathBuf {
    root().join(".venv/bin/python")
}

/// A real S3-compatible server (moto, from the .venv that `make setup` makes) on 127.0.0.1 with
/// one bucket, stopped when dropped.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    bucket: String,
}

impl Moto {
    /// `None` (after [`skip`]) when moto is not installed.
    pub fn start(bucket: &str) -> Option<Moto> {
        let server = root().join(".venv/bin/moto_server");
        if !server.is_file() {
            skip(&format!(
                "{} is absent (make setup installs moto)",
                server.display()
            ));
            return None;
        }
        let port = free_port();
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let m = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_string(),
        };
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed().as_secs() < 60, "moto_server did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        m.boto3("c.create_bucket(Bucket=bucket)", &[]);
        Some(m)
    }

    /// Run `code` in python with `c` a boto3 client of this server and `bucket` its bucket;
    /// `args` are `sys.argv[1:]`.
    fn boto3(&self, code: &str, args: &[&str]) {
        self.boto3_out(code, args);
    }

    /// [`Moto::boto3`], returning what the code printed.
    fn boto3_out(&self, code: &str, args: &[&str]) -> Vec<u8> {
        let script = format!(
            "import boto3, sys\nc = boto3.client('s3', endpoint_url='{}', aws_access_key_id='testing', \
             aws_secret_access_key='secret-never-logged', region_name='us-east-1')\nbucket = '{}'\n{code}\n",
            self.endpoint, self.bucket
        );
        let o = Command::new(venv_python())
            .args(["-c", &script])
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("run the venv's python");
        assert!(o.status.success(), "boto3: {code}");
        o.stdout
    }

    /// The keys under `prefix` in this server's bucket, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.boto3_out(
            "r = c.list_objects_v2(Bucket=bucket, Prefix=sys.argv[1])\nfor o in r.get('Contents', []):\n    print(o['Key'])",
            &[prefix],
        );
        let mut keys: Vec<String> = lossy(&out).lines().map(String::from).collect();
        keys.sort();
        keys
    }

    /// The bytes of object `key`.
    pub fn get(&self, key: &str) -> Vec<u8> {
        self.boto3_out(
            "sys.stdout.buffer.write(c.get_object(Bucket=bucket, Key=sys.argv[1])['Body'].read())",
            &[key],
        )
    }

    /// Upload local files: `(key, path)` pairs, into this server's bucket.
    pub fn put(&self, objects: &[(String, &Path)]) {
        let mut args = Vec::new();
        for (key, path) in objects {
            args.push(key.as_str());
            args.push(s(path));
        }
        self.boto3(
            "a = sys.argv[1:]\nfor k, p in zip(a[::2], a[1::2]):\n    c.put_object(Bucket=bucket, Key=k, Body=open(p, 'rb').read())",
            &args,
        );
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

    /// `btu ARGS` with this server's environment.
    pub fn btu<I, S>(&self, args: I) -> Btu
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        btu(args).envs(self.env())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workflow file's `{{...}}` placeholders filled from `lookup` (panics on an unknown one).
pub fn fill_placeholders(arg: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let j = rest[i..].find("}}").expect("closed placeholder") + i;
        let key = rest[i + 2..j].trim();
        out.push_str(&lookup(key).unwrap_or_else(|| panic!("unknown placeholder {key} in {arg}")));
        rest = &rest[j + 2..];
    }
    out + rest
}

/// A `classes`-class topic corpus (up to 4 classes: sports, business, science, world) generated
/// in code: each sentence has 2-3 words of its label's topic, 3-6 neutral words and, in 30 % of
/// them, one word of another topic; deterministic for `seed`. Returns texts and labels.
pub fn topic_corpus(n: usize, classes: usize, seed: u64) -> (Vec<String>, Vec<i64>) {
    use rand::{Rng, SeedableRng};
    const TOPICS: [[&str; 10]; 4] = [
        [
            "match", "goal", "team", "coach", "season", "league", "player", "score", "stadium",
            "cup",
        ],
        [
            "market", "shares", "profit", "bank", "investor", "trade", "revenue", "stock",
            "merger", "economy",
        ],
        [
            "research",
            "space",
            "physics",
            "study",
            "scientists",
            "lab",
            "planet",
            "genome",
            "experiment",
            "climate",
        ],
        [
            "election",
            "minister",
            "war",
            "treaty",
            "government",
            "protest",
            "border",
            "capital",
            "summit",
            "president",
        ],
    ];
    const NEUTRAL: [&str; 15] = [
        "the", "a", "of", "in", "on", "and", "today", "new", "report", "after", "says", "week",
        "year", "more", "about",
    ];
    assert!((2..=4).contains(&classes));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut texts, mut labels) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let label = rng.random_range(0..classes);
        let mut words: Vec<&str> = (0..rng.random_range(2..=3))
            .map(|_| TOPICS[label][rng.random_range(0..10)])
            .collect();
        words.extend((0..rng.random_range(3..=6)).map(|_| NEUTRAL[rng.random_range(0..15)]));
        if rng.random_bool(0.3) {
            let other = (label + rng.random_range(1..classes)) % classes;
            words.push(TOPICS[other][rng.random_range(0..10)]);
        }
        for i in (1..words.len()).rev() {
            words.swap(i, rng.random_range(0..=i));
        }
        texts.push(words.join(" "));
        labels.push(label as i64);
    }
    (texts, labels)
}

/// The record of step `name` in a `btu defend` / `btu demo` summary (`{step, skipped, summary, ...}`).
pub fn step<'a>(m: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    m["steps"]
        .as_array()
        .expect("a defend summary")
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {m}"))
}

/// What a repair writes that two ways of making it must agree on byte for byte: detection's and
/// verification's tables, the masks, the repaired checkpoint, the recheck and its predictions.
/// One list, shared with `scripts/repair_flow_check.py`.
pub fn repair_outputs() -> impl Iterator<Item = &'static str> {
    include_str!("../../scripts/repair_outputs.txt")
        .lines()
        .filter(|l| !l.trim().is_empty())
}

/// The `name`/`value` pairs of an Argo `parameters` list (workflow arguments or a step's).
pub fn argo_parameters(list: &serde_yaml::Value) -> Vec<(String, String)> {
    list.as_sequence()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().into(),
                        p["value"].as_str().unwrap().into(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
