//! `btu report`: one self-contained HTML page about a run for a person to read: which tokens
//! moved and how far they stand from the rest, what verification confirmed, what the repair
//! replaced, ACC / ASR / flip rate before and after with 95 % intervals, the time each step
//! took, scans, and the provenance. Figures are inline SVG; no script, no network; light and
//! dark mode; printable.

mod data;
mod page;
mod plots;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
pub use data::RunData;

/// `btu defend`'s `[report]` table.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportParams {
    /// Write `report.html` into the run directory at the end (default true).
    pub enabled: bool,
}

impl Default for ReportParams {
    fn default() -> Self {
        ReportParams { enabled: true }
    }
}

/// Inputs of `btu report`.
pub struct ReportJob {
    /// The run directory (`btu defend`'s, or a `btu detect` output directory).
    pub dir: PathBuf,
    /// `flagged_rows` files from `btu scan` to include.
    pub scans: Vec<PathBuf>,
    /// Tokenizer for document frequencies when the run directory has none.
    pub tokenizer: Option<PathBuf>,
    /// The HTML file, and whether it may replace one.
    pub run: crate::steps::RunOpts,
}

/// `btu report`'s result.
#[derive(Debug, Clone, Serialize)]
pub struct ReportReport {
    /// `report`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The HTML file.
    pub out: PathBuf,
    /// Its size.
    pub bytes: usize,
    /// The sections it has, in order.
    pub sections: Vec<String>,
    /// The tokens detection flagged.
    pub flagged: Vec<String>,
    /// Why document frequencies are missing (the scatter is then drawn against rank).
    pub documents_unavailable: Option<String>,
    /// Wall time.
    pub seconds: f64,
}

/// `btu report`.
pub fn run(job: &ReportJob) -> Result<ReportReport> {
    let t0 = Instant::now();
    if job.run.out.extension().is_none_or(|e| e != "html") {
        return Err(crate::BtuError::config(
            "--out",
            format!("{} should end in .html", job.run.out.display()),
        ));
    }
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    let data = RunData::load(&job.dir, &job.scans, job.tokenizer.as_deref())?;
    let (html, sections) = page::render(&data)?;
    crate::io::output::write_file_atomic(&job.run.out, job.run.overwrite, |f| {
        use std::io::Write;
        f.write_all(html.as_bytes())
            .map_err(|e| crate::BtuError::io(&job.run.out, e))
    })?;
    let flagged: BTreeSet<String> = data.suspicious.iter().map(|s| s.token.clone()).collect();
    Ok(ReportReport {
        command: "report".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        bytes: html.len(),
        sections,
        flagged: flagged.into_iter().collect(),
        documents_unavailable: data.documents.as_ref().err().cloned(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
