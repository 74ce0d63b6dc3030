//! `btu report`: the demo run's page rendered by headless Chromium (Debian's package, installed
//! by `make setup`), its DOM checked for the flagged tokens and the numbers of the run; a
//! detect-only directory; bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{btu, skip};

/// Headless Chromium, if installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|c| {
            let out = Command::new("sh")
                .args(["-c", &format!("command -v {c}")])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

/// The DOM after Chromium has parsed and laid out the page.
fn dump_dom(chrome: &Path, page: &Path) -> String {
    let out = Command::new(chrome)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pct(v: &serde_json::Value) -> String {
    format!("{:.2} %", 100.0 * v.as_f64().expect("a rate"))
}

#[test]
fn demo_report_renders_in_chromium_with_the_runs_tokens_and_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let demo = btu(["demo", "--device", "cpu", "--out"]).arg(&run).ok();
    // btu defend writes the report as its last step.
    let page = run.join("report.html");
    assert!(page.exists(), "defend's report step wrote no report.html");
    let flagged = btu([
        "scan",
        "--corpus",
        run.join("poison/train.parquet").to_str().unwrap(),
        "--suspicious",
        run.join("detect/suspicious_tokens.arrow").to_str().unwrap(),
        "--tokenizer",
        run.join("model").to_str().unwrap(),
        "--out",
        dir.path().join("flagged.parquet").to_str().unwrap(),
    ])
    .ok();
    let out = dir.path().join("page.html");
    let r = btu(["report", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .arg("--scan")
        .arg(dir.path().join("flagged.parquet"))
        .ok();
    assert_eq!(r["documents_unavailable"], serde_json::Value::Null, "{r}");
    let sections: Vec<&str> = r["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "summary",
        "outcome",
        "detection",
        "verification",
        "repair",
        "time",
        "scans",
        "provenance",
    ] {
        assert!(sections.contains(&s), "section {s} missing: {sections:?}");
    }
    let bytes = std::fs::metadata(&out).unwrap().len();
    assert!(bytes < 2_000_000, "the page is {bytes} bytes");
    let html = std::fs::read_to_string(&out).unwrap();
    // Self-contained: nothing to fetch, nothing to run.
    for needle in ["<script", "<link", " src=", "url(", "@import", "<iframe"] {
        assert!(!html.contains(needle), "the page has {needle}");
    }
    let Some(chrome) = chromium() else {
        return skip("chromium is not installed (make setup installs Debian's package)");
    };
    let dom = dump_dom(&chrome, &out);
    // The flagged tokens, as the run's summary names them.
    let tokens = demo["flagged"].as_array().unwrap();
    assert!(!tokens.is_empty());
    let list = dom
        .split("id=\"flagged\"")
        .nth(1)
        .expect("flagged list")
        .split("</ul>")
        .next()
        .unwrap();
    for t in tokens {
        assert!(
            list.contains(&format!("<li>{}</li>", t.as_str().unwrap())),
            "{t} not in {list}"
        );
    }
    // The numbers, as the run's summary has them.
    let cell = |id: &str| {
        let tail = dom
            .split(&format!("data-metric=\"{id}\">"))
            .nth(1)
            .unwrap_or_else(|| panic!("{id} missing"));
        tail.split(['<', ' ']).next().unwrap().to_string() + " %"
    };
    assert_eq!(cell("acc-before"), pct(&demo["without_defence"]["acc"]));
    assert_eq!(cell("acc-after"), pct(&demo["with_defence"]["acc"]));
    assert_eq!(cell("asr-before"), pct(&demo["without_defence"]["asr"]));
    assert_eq!(cell("asr-after"), pct(&demo["with_defence"]["asr"]));
    // Verification's table shows cf's control (other words at the same places) as measured.
    let verify = crate::util::step(&demo, "verify");
    let control = pct(&verify["summary"]["effects"]["cf"]["control_flip_rate"]);
    let cf_row = dom
        .split("<h2>Verification</h2>")
        .nth(1)
        .expect("verification section")
        .split("<tr><td>cf</td>")
        .nth(1)
        .expect("cf's row")
        .split("</tr>")
        .next()
        .unwrap();
    assert!(cf_row.contains(&control), "{control} not in {cf_row}");
    // Figures: three rounds' scatter and bars, verification, repair, time.
    let figures = dom.matches("<svg").count();
    assert!(figures >= 9, "{figures} figures");
    // The scan's rows per token, as scan counted them.
    let scans = dom
        .split("<section id=\"scans\">")
        .nth(1)
        .unwrap()
        .split("</section>")
        .next()
        .unwrap();
    for (token, t) in flagged["tokens"].as_object().unwrap() {
        let row = scans
            .split(&format!("<tr><td>{token}</td>"))
            .nth(1)
            .unwrap_or_else(|| panic!("{token} not in the scans table"))
            .split("</tr>")
            .next()
            .unwrap();
        // Its rows per label add up to the rows scan flagged for it.
        let per_label: u64 = row
            .split("<td class=\"num\">")
            .skip(1)
            .map(|c| c.split("</td>").next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(per_label, t["rows"].as_u64().unwrap(), "{token}: {row}");
    }
}

#[test]
fn a_detect_directory_renders_without_the_later_sections() {
    let t = crate::fixtures::tiny();
    let dir = tempfile::tempdir().unwrap();
    let det = dir.path().join("detect");
    btu(["detect", "--corpus"])
        .arg(&t.corpus)
        .arg("--model")
        .arg(&t.model)
        .arg("--out")
        .arg(&det)
        .ok();
    let out = dir.path().join("r.html");
    let r = btu(["report", "--tokenizer"])
        .arg(&t.model)
        .arg("--run")
        .arg(&det)
        .arg("--out")
        .arg(&out)
        .ok();
    assert_eq!(
        r["sections"],
        serde_json::json!(["summary", "detection", "provenance"])
    );
    assert_eq!(r["documents_unavailable"], serde_json::Value::Null, "{r}");
    let html = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        6,
        "scatter and bars for each of three rounds"
    );
    // Without a tokenizer the frequencies are unknown and the page says why.
    let out2 = dir.path().join("r2.html");
    let r = btu(["report", "--run"])
        .arg(&det)
        .arg("--out")
        .arg(&out2)
        .ok();
    assert!(
        r["documents_unavailable"]
            .as_str()
            .unwrap()
            .contains("tokenizer"),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(&out2)
            .unwrap()
            .matches("<svg")
            .count(),
        3
    );
}

#[test]
fn report_bad_input_names_the_flag_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.html");
    btu(["report", "--run"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .fails_with(66, "token_scores.arrow")
        .and_no_output(&out);
    let txt = dir.path().join("r.txt");
    btu(["report", "--run"])
        .arg(dir.path())
        .arg("--out")
        .arg(&txt)
        .fails_with(78, "--out")
        .and_no_output(&txt);
}
