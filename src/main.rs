//! The `btu` binary: parse flags, set up logging and progress on stderr, run the library, print
//! the summary JSON on stdout, and turn errors into the documented exit codes.

use std::io::Write;
use std::process::ExitCode;

use btu::cli::{execute, Cli};
use btu::progress::Progress;
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

struct StderrProgress;

impl Progress for StderrProgress {
    fn bar(&self, label: &str, total: u64) -> ProgressBar {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}) {msg}",
            )
            .expect("valid template"),
        );
        b.set_prefix(label.to_string());
        b
    }
}

/// Keep the first panic's message (and location) instead of printing it, so a panic anywhere in
/// a step becomes the documented one-line error and exit 70, never exit 101.
fn catch_panics() -> &'static std::sync::Mutex<Option<String>> {
    static FIRST: std::sync::OnceLock<std::sync::Mutex<Option<String>>> =
        std::sync::OnceLock::new();
    let first = FIRST.get_or_init(Default::default);
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut m) = FIRST.get_or_init(Default::default).lock() {
            m.get_or_insert(format!("{what}{at}"));
        }
    }));
    first
}

fn main() -> ExitCode {
    btu::device::keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.global.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Spans (the command, defend's steps, detection rounds, epochs, rechecks) log their wall
    // time when they close: `--log info` (or debug) shows where the time goes.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let progress: Box<dyn Progress> = if cli.global.quiet {
        Box::new(btu::progress::Hidden)
    } else {
        Box::new(StderrProgress)
    };
    let mut stdout = std::io::stdout();
    let panic_message = catch_panics();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _command = tracing::info_span!("btu", command = cli.command.name()).entered();
        execute(&cli, progress.as_ref(), &mut stdout)
    }))
    .unwrap_or_else(|_| {
        let msg = panic_message
            .lock()
            .ok()
            .and_then(|m| m.clone())
            .unwrap_or_else(|| "a step panicked".into());
        Err(btu::BtuError::internal(msg))
    });
    match result {
        Ok(summary) => {
            let text = serde_json::to_string_pretty(&summary).expect("summary serializes");
            let target = if cli.global.dry_run {
                None
            } else {
                cli.global.summary.clone()
            }
            .or_else(|| {
                if cli.global.dry_run {
                    return None;
                }
                let xcom = std::path::Path::new("/airflow/xcom");
                xcom.is_dir().then(|| xcom.join("return.json"))
            });
            if let Some(p) = target {
                if let Err(e) = btu::io::output::write_file_atomic(&p, true, |f| {
                    f.write_all(text.as_bytes())
                        .map_err(|e| btu::BtuError::io(&p, e))
                }) {
                    eprintln!("error: {e}");
                    return ExitCode::from(e.exit_code());
                }
            }
            if let Some(table) = summary.get("table").and_then(|t| t.as_str()) {
                eprint!("{table}");
            }
            // `btu sql` prints query results on stdout; its summary goes to --summary only.
            if !matches!(cli.command, btu::cli::Command::Sql(_)) || cli.global.dry_run {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line: what failed and what to do (wrapped errors may carry newlines).
            let msg = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("error: {msg}");
            ExitCode::from(e.exit_code())
        }
    }
}
