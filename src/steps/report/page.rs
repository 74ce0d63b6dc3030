//! The report's HTML: one section per part of the run that exists, each a short function.

use std::collections::BTreeSet;
use std::fmt::Write;

use serde_json::Value;

use super::data::{EvalCounts, RunData};
use super::plots;
use crate::error::Result;

const STYLE: &str = r#"
:root { color-scheme: light dark; --fg: #1b1b1b; --bg: #ffffff; --muted: #666; --rule: #ddd; --bad: #c62828; --good: #2e7d32; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e6e6; --bg: #161616; --muted: #a0a0a0; --rule: #3a3a3a; --bad: #ef6c6c; --good: #7bc67e; }
  svg { filter: invert(1) hue-rotate(180deg); }
}
@media print { svg { filter: none; } section { break-inside: avoid; } :root { --fg: #000; --bg: #fff; } }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); max-width: 980px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid var(--rule); padding-bottom: 0.2em; margin-top: 2em; }
.muted { color: var(--muted); } .bad { color: var(--bad); font-weight: 600; } .good { color: var(--good); font-weight: 600; }
table { border-collapse: collapse; margin: 0.8em 0; } th, td { padding: 0.25em 0.7em; border-bottom: 1px solid var(--rule); text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; word-break: break-all; font-size: 12px; border: 1px solid var(--rule); padding: 0.6em; }
figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
ul.tokens li { display: inline-block; margin-right: 0.6em; padding: 0 0.4em; border: 1px solid var(--rule); font-family: monospace; }
"#;

/// HTML-escape text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.2} %", 100.0 * v))
}

/// The page and the ids of its sections.
pub fn render(d: &RunData) -> Result<(String, Vec<String>)> {
    let mut sections: Vec<(&str, String)> = vec![("summary", summary(d))];
    if let Some(s) = outcome(d) {
        sections.push(("outcome", s));
    }
    sections.push(("detection", detection(d)?));
    if let Some(s) = verification(d)? {
        sections.push(("verification", s));
    }
    if let Some(s) = repair(d)? {
        sections.push(("repair", s));
    }
    if let Some(s) = timing(d)? {
        sections.push(("time", s));
    }
    if !d.scans.is_empty() {
        sections.push(("scans", scans(d)));
    }
    sections.push(("provenance", provenance(d)));
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>btu report: {}</title><style>{STYLE}</style></head><body>\n<h1>btu report</h1><p class=\"muted\">{} &middot; btu {}</p>\n",
        esc(&d.dir.display().to_string()),
        esc(&d.dir.display().to_string()),
        crate::VERSION
    );
    for (id, body) in &sections {
        let _ = writeln!(html, "<section id=\"{id}\">{body}</section>");
    }
    html.push_str("</body></html>\n");
    Ok((
        html,
        sections.iter().map(|(id, _)| id.to_string()).collect(),
    ))
}

/// What a reader needs first: flagged, verified, and the effect of the repair.
fn summary(d: &RunData) -> String {
    let flagged: Vec<String> = d.suspicious.iter().map(|s| esc(&s.token)).collect();
    let mut s =
        format!(
        "<p>Detection flagged <b>{}</b> token(s):</p><ul class=\"tokens\" id=\"flagged\">{}</ul>",
        flagged.len(),
        flagged.iter().map(|t| format!("<li>{t}</li>")).collect::<String>()
    );
    if let Some((effects, _)) = &d.effects {
        let v: Vec<String> = effects
            .iter()
            .filter(|e| e.verified)
            .map(|e| esc(&e.candidate))
            .collect();
        let _ = write!(
            s,
            "<p>Verification confirmed {}: <span id=\"verified\">{}</span></p>",
            if v.is_empty() {
                "no trigger".to_string()
            } else {
                format!("{} trigger(s)", v.len())
            },
            v.join(", ")
        );
    }
    if let Some(m) = &d.summary {
        s += &relabel_line(&m["relabel"]);
        if let Some(note) = m["repair_note"].as_str() {
            let _ = write!(s, "<p class=\"bad\">{}</p>", esc(note));
        }
    }
    s
}

/// The labels' test against clean references, one sentence per class ("" when it did not run).
fn relabel_line(r: &Value) -> String {
    let Some(classes) = r["classes"].as_array() else {
        return String::new();
    };
    let per_class: Vec<String> = classes
        .iter()
        .map(|c| {
            format!(
                "class {}: doubt {:.3} on {} training rows, {:.3} on {} clean rows (z {:.2})",
                c["label"],
                c["doubt"].as_f64().unwrap_or(f64::NAN),
                c["rows"],
                c["clean_doubt"].as_f64().unwrap_or(f64::NAN),
                c["clean_rows"],
                c["z"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    let verdict = match r["target"].as_i64() {
        Some(t) => format!("class {t} fails: {} rows relabelled", r["relabelled"]),
        None => "no class fails".to_string(),
    };
    format!(
        "<p>The training labels against clean references (held-out accuracy {:.1} %): <span id=\"relabel\">{}</span>; {}.</p>",
        100.0 * r["reference_accuracy"].as_f64().unwrap_or(f64::NAN),
        verdict,
        esc(&per_class.join("; "))
    )
}

fn wilson(k: u64, n: u64) -> Option<(f64, f64)> {
    (n > 0).then(|| crate::steps::verify::wilson(k as u32, n as u32))
}

/// One metric row: victim and repaired value, each with its 95 % interval where counted.
fn metric_row(
    name: &str,
    id: &str,
    before: Option<f64>,
    after: Option<f64>,
    ci: impl Fn(&EvalCounts) -> Option<(u64, u64)>,
    evals: &(Option<EvalCounts>, Option<EvalCounts>),
) -> String {
    let cell = |v: Option<f64>, c: &Option<EvalCounts>, which: &str| {
        let interval = c
            .as_ref()
            .and_then(&ci)
            .and_then(|(k, n)| wilson(k, n))
            .map_or(String::new(), |(lo, hi)| {
                format!(
                    " <span class=\"muted\">[{:.2}, {:.2}]</span>",
                    100.0 * lo,
                    100.0 * hi
                )
            });
        format!(
            "<td class=\"num\" data-metric=\"{id}-{which}\">{}{interval}</td>",
            pct(v)
        )
    };
    format!(
        "<tr><th>{name}</th>{}{}</tr>",
        cell(before, &evals.0, "before"),
        cell(after, &evals.1, "after")
    )
}

/// Before/after scores with intervals, the paired ACC change and the rechecks.
fn outcome(d: &RunData) -> Option<String> {
    let m = d.summary.as_ref()?;
    let (b, a) = (&m["without_defence"], &m["with_defence"]);
    let f = |v: &Value, k: &str| v[k].as_f64();
    if b.is_null() {
        return Some(format!(
            "<h2>Outcome</h2><p>Not evaluated: the run had no test split.</p>{}",
            residual(m)
        ));
    }
    let mut s = String::from("<h2>Outcome</h2><table><tr><th></th><th class=\"num\">without defence</th><th class=\"num\">with defence</th></tr>");
    // name, the cells' data-metric id, the summary's key, the counts behind an interval.
    type Counts = fn(&EvalCounts) -> Option<(u64, u64)>;
    let rows: [(&str, &str, &str, Counts); 5] = [
        ("clean accuracy (ACC)", "acc", "acc", |c| Some(c.acc)),
        ("attack success (ASR)", "asr", "asr", |c| Some(c.asr)),
        ("flip rate", "flip", "flip_rate", |c| c.flip),
        (
            "clean false-positive rate",
            "fpr",
            "clean_false_positive_rate",
            |_| None,
        ),
        (
            "clean false-negative rate",
            "fnr",
            "clean_false_negative_rate",
            |_| None,
        ),
    ];
    for (name, id, key, counts) in rows {
        s += &metric_row(name, id, f(b, key), f(a, key), counts, &d.evals);
    }
    s += "</table><p class=\"muted\">Brackets: 95 % Wilson intervals, in percent, from the evaluation's predictions.</p>";
    let c = &m["acc_change"];
    if let (Some(delta), Some(lo), Some(hi)) = (
        c["delta"].as_f64(),
        c["ci_low"].as_f64(),
        c["ci_high"].as_f64(),
    ) {
        let _ = write!(
            s,
            "<p>Paired ACC change on the same {} rows: <b data-metric=\"acc-change\">{:+.2}</b> points (95 % interval {:+.2} to {:+.2}).</p>",
            c["rows"], 100.0 * delta, 100.0 * lo, 100.0 * hi
        );
    }
    s += &residual(m);
    Some(s)
}

/// The verified triggers rechecked on the repaired model, as a table ("" without verification).
fn residual(m: &Value) -> String {
    let mut s = String::new();
    if let Some(r) = m["residual"].as_object() {
        s += "<p>Verified triggers on the repaired model (other words: the flip rate of other clean words inserted at the same places, measured for a residual above the bound):</p><table><tr><th>trigger</th><th class=\"num\">flip rate</th><th class=\"num\">other words</th><th class=\"num\">rows</th><th>still a trigger</th></tr>";
        for (t, v) in r {
            let still = v["still_a_trigger"].as_bool() == Some(true);
            let _ = write!(
                s,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"{}\">{}</td></tr>",
                esc(t),
                pct(v["flip_rate"].as_f64()),
                pct(v["control_flip_rate"].as_f64()),
                v["rows"],
                if still { "bad" } else { "good" },
                if still { "yes" } else { "no" }
            );
        }
        s += "</table>";
    }
    s
}

/// Per round: the scatter (or why not), the top bars; then the flagged tokens' table.
fn detection(d: &RunData) -> Result<String> {
    let flagged: BTreeSet<u32> = d.suspicious.iter().map(|s| s.token_id).collect();
    let mut s = String::from("<h2>Detection</h2>");
    if let Err(why) = &d.documents {
        let _ = write!(
            s,
            "<p class=\"muted\">No movement-against-frequency plots: {}.</p>",
            esc(why)
        );
    }
    for (round, scores) in &d.rounds {
        if let Ok(docs) = &d.documents {
            let _ = write!(
                s,
                "<figure>{}</figure>",
                plots::round_scatter(*round, scores, docs, &flagged)?
            );
        }
        let _ = write!(
            s,
            "<figure>{}</figure>",
            plots::top_bars(*round, scores, 20)?
        );
    }
    s += "<table id=\"flagged-table\"><tr><th>token</th><th>rounds</th><th class=\"num\">best rank</th><th class=\"num\">max movement</th><th class=\"num\">documents</th><th class=\"num\">majority label</th><th class=\"num\">its share</th></tr>";
    for t in &d.suspicious {
        let rounds: Vec<String> = t.rounds.iter().map(|r| r.to_string()).collect();
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.4}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&t.token),
            rounds.join(", "),
            t.best_rank,
            t.max_distance,
            t.documents,
            t.majority_label.map_or("–".into(), |l| l.to_string()),
            pct(t.label_share.map(|x| x as f64))
        );
    }
    s += "</table>";
    Ok(s)
}

/// Flip rate per candidate, and the table.
fn verification(d: &RunData) -> Result<Option<String>> {
    let Some((effects, bound)) = &d.effects else {
        return Ok(None);
    };
    let mut s = String::from("<h2>Verification</h2>");
    if effects.is_empty() {
        s += "<p>No candidate was tried.</p>";
        return Ok(Some(s));
    }
    let _ = write!(
        s,
        "<figure>{}</figure>",
        plots::effect_bars(effects, *bound)?
    );
    s += "<p>Other words: the flip rate when words of other clean rows are inserted at the same places instead (measured for candidates that pass the bound); a high one means the model flips for any insertion.</p>";
    s += "<table><tr><th>candidate</th><th class=\"num\">rows</th><th class=\"num\">flips</th><th class=\"num\">flip rate</th><th class=\"num\">95 % interval</th><th class=\"num\">other words</th><th>explained by clean data</th><th>verified</th></tr>";
    for e in effects {
        let _ = write!(
            s,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.2} – {:.2}</td><td class=\"num\">{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(&e.candidate),
            e.rows,
            e.flips,
            pct(Some(e.flip_rate as f64)),
            100.0 * e.ci_low,
            100.0 * e.ci_high,
            pct(e.control_flip_rate().map(f64::from)),
            if e.explained { "yes" } else { "no" },
            if e.verified { "bad" } else { "muted" },
            if e.verified { "trigger" } else { "no" }
        );
    }
    s += "</table>";
    Ok(Some(s))
}

/// What the repair replaced.
fn repair(d: &RunData) -> Result<Option<String>> {
    let Some(masks) = &d.masks else {
        return Ok(None);
    };
    let mut s = String::from("<h2>Repair</h2>");
    if masks.is_empty() {
        s += "<p>The repair replaced no embedding value.</p>";
        return Ok(Some(s));
    }
    let tokens: BTreeSet<&str> = masks.iter().map(|m| m.token.as_str()).collect();
    let _ = write!(
        s,
        "<p>{} embedding value(s) of {} token(s) replaced.</p><figure>{}</figure>",
        masks.len(),
        tokens.len(),
        plots::mask_strips(masks)?
    );
    Ok(Some(s))
}

/// Wall time per step when it was computed (from `btu defend`'s summary; a step reused from an
/// earlier attempt counts the time it took then).
fn timing(d: &RunData) -> Result<Option<String>> {
    let Some(steps) = d.summary.as_ref().and_then(|m| m["steps"].as_array()) else {
        return Ok(None);
    };
    let mut t: Vec<(String, f64)> = steps
        .iter()
        .filter_map(|s| {
            let secs = s["computed_seconds"].as_f64().or(s["seconds"].as_f64())?;
            Some((s["step"].as_str()?.to_string(), secs))
        })
        .collect();
    t.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = t.iter().map(|x| x.1).sum();
    Ok(Some(format!(
        "<h2>Time</h2><p>The steps took <b>{total:.1} s</b> together when computed (this run: {} s, reusing steps done earlier).</p><figure>{}</figure>",
        d.summary.as_ref().and_then(|m| m["seconds"].as_f64()).map_or("–".into(), |t| format!("{t:.1}")),
        plots::step_times(&t)?
    )))
}

/// Flagged rows per token and label for each scan.
fn scans(d: &RunData) -> String {
    let mut s = String::from("<h2>Scans</h2>");
    for (path, counts) in &d.scans {
        let labels: BTreeSet<Option<i64>> = counts.keys().map(|k| k.1).collect();
        let tokens: BTreeSet<&str> = counts.keys().map(|k| k.0.as_str()).collect();
        let name = |l: &Option<i64>| l.map_or("no label".into(), |l| format!("label {l}"));
        let _ = write!(
            s,
            "<p>{}: flagged rows per token and label</p><table><tr><th>token</th>{}</tr>",
            esc(&path.display().to_string()),
            labels
                .iter()
                .map(|l| format!("<th class=\"num\">{}</th>", name(l)))
                .collect::<String>()
        );
        for t in tokens {
            let cells: String = labels
                .iter()
                .map(|l| {
                    let n = counts.get(&(t.to_string(), *l)).copied().unwrap_or(0);
                    format!("<td class=\"num\">{n}</td>")
                })
                .collect();
            let _ = write!(s, "<tr><td>{}</td>{cells}</tr>", esc(t));
        }
        s += "</table>";
    }
    s
}

/// Version, model, corpus and parameters.
fn provenance(d: &RunData) -> String {
    let meta = |k: &str| d.detect_meta.get(k).map_or("–".to_string(), |v| esc(v));
    let fp: Value = d
        .detect_meta
        .get("btu:corpus_fingerprint")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let mut s = format!(
        "<h2>Provenance</h2><table><tr><th>btu that wrote the tables</th><td>{}</td></tr><tr><th>model sha256 (detection)</th><td><code>{}</code></td></tr><tr><th>corpus rows</th><td>{}</td></tr><tr><th>corpus content sha256</th><td><code>{}</code></td></tr><tr><th>corpus files</th><td>{}</td></tr></table>",
        meta("btu:version"),
        meta("btu:model_sha256"),
        fp["rows"],
        esc(fp["content_sha256"].as_str().unwrap_or("–")),
        fp["files"]
            .as_array()
            .map(|f| f.iter().filter_map(|x| x["path"].as_str()).map(esc).collect::<Vec<_>>().join("<br>"))
            .unwrap_or_default()
    );
    let pretty = |v: &Value| esc(&serde_json::to_string_pretty(v).unwrap_or_default());
    let _ = write!(
        s,
        "<p>Detection parameters</p><pre>{}</pre>",
        pretty(&d.detect_params())
    );
    if let Some(cfg) = d
        .summary
        .as_ref()
        .map(|m| &m["config"])
        .filter(|c| !c.is_null())
    {
        let _ = write!(s, "<p>Run configuration</p><pre>{}</pre>", pretty(cfg));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels' test reads as one sentence; without it, nothing.
    #[test]
    fn the_relabel_line_names_the_failing_class() {
        assert_eq!(relabel_line(&Value::Null), "");
        let r = serde_json::json!({
            "reference_accuracy": 0.806, "target": 1, "relabelled": 1299,
            "classes": [
                {"label": 0, "rows": 2330, "doubt": 0.291, "clean_rows": 356, "clean_doubt": 0.290, "z": 0.06},
                {"label": 1, "rows": 3898, "doubt": 0.388, "clean_rows": 335, "clean_doubt": 0.333, "z": 4.06}
            ]
        });
        let line = relabel_line(&r);
        assert!(
            line.contains("class 1 fails: 1299 rows relabelled"),
            "{line}"
        );
        assert!(
            line.contains("80.6 %") && line.contains("(z 4.06)"),
            "{line}"
        );
        let clean = serde_json::json!({"reference_accuracy": 0.8, "target": null, "relabelled": 0, "classes": []});
        assert!(relabel_line(&clean).contains("no class fails"));
    }
}
