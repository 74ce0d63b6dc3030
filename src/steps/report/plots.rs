//! The report's figures as inline SVG (plotters' SVG backend; no fonts or browser needed).
//! Backgrounds are transparent so the page's colours show through; the page inverts the figures
//! in dark mode.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::error::{BtuError, Result};
use crate::io::tables::{DimensionMask, TokenEffect, TokenScore};

const GREY: RGBColor = RGBColor(120, 120, 120);
const BLUE: RGBColor = RGBColor(31, 119, 180);
const RED: RGBColor = RGBColor(214, 39, 40);
const FONT: &str = "sans-serif";

fn err(e: impl std::fmt::Debug) -> BtuError {
    BtuError::internal(format!("drawing a figure: {e:?}"))
}

/// Draw into an SVG string of `w` x `h` pixels.
fn svg(
    w: u32,
    h: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// Cells of the density grid behind the scatter (the cloud of unremarkable tokens).
const GRID: (usize, usize) = (48, 30);
/// Tokens drawn as points (the largest movements).
const POINTS: usize = 150;

/// One detection round: movement against document frequency (log scale), the cloud as a
/// density grid, the largest movements as points, the flagged tokens labelled, the cut-off
/// (the smallest movement still selected) as a dashed line.
pub fn round_scatter(
    round: u8,
    scores: &[TokenScore],
    documents: &HashMap<u32, u64>,
    flagged: &BTreeSet<u32>,
) -> Result<String> {
    let pts: Vec<(f64, f64, &TokenScore)> = scores
        .iter()
        .filter_map(|s| {
            let d = *documents.get(&s.token_id)?;
            Some((d as f64, s.distance as f64, s))
        })
        .collect();
    let x_max = pts.iter().map(|p| p.0).fold(10.0, f64::max) * 1.5;
    let y_max = pts.iter().map(|p| p.1).fold(1e-9, f64::max) * 1.08;
    let cut = scores
        .iter()
        .filter(|s| s.selected)
        .map(|s| s.distance as f64)
        .fold(f64::INFINITY, f64::min);
    svg(760, 420, |root| {
        let mut c = ChartBuilder::on(root)
            .caption(
                format!("Round {round}: movement against document frequency"),
                (FONT, 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0.8f64..x_max).log_scale(), 0f64..y_max)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc("documents containing the token (log scale)")
            .y_desc("embedding movement (L2)")
            .light_line_style(WHITE.mix(0.0))
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .draw()
            .map_err(err)?;
        // Density grid of everything not drawn as a point.
        let (gx, gy) = GRID;
        let lx = |x: f64| (x / 0.8).ln() / (x_max / 0.8).ln();
        let mut cells: BTreeMap<(usize, usize), u32> = BTreeMap::new();
        for (x, y, _) in pts.iter().skip(POINTS) {
            let i = ((lx(*x) * gx as f64) as usize).min(gx - 1);
            let j = ((y / y_max * gy as f64) as usize).min(gy - 1);
            *cells.entry((i, j)).or_default() += 1;
        }
        let peak = cells.values().copied().max().unwrap_or(1) as f64;
        let ex = |i: usize| 0.8 * (x_max / 0.8).powf(i as f64 / gx as f64);
        c.draw_series(cells.iter().map(|(&(i, j), &n)| {
            let a = 0.12 + 0.6 * (n as f64).ln_1p() / peak.ln_1p();
            let (y0, y1) = (
                j as f64 * y_max / gy as f64,
                (j + 1) as f64 * y_max / gy as f64,
            );
            Rectangle::new([(ex(i), y0), (ex(i + 1), y1)], GREY.mix(a).filled())
        }))
        .map_err(err)?;
        c.draw_series(pts.iter().take(POINTS).map(|(x, y, s)| {
            let colour = if s.selected { RED } else { BLUE };
            Circle::new((*x, *y), 3, colour.mix(0.8).filled())
        }))
        .map_err(err)?;
        c.draw_series(
            pts.iter()
                .filter(|(_, _, s)| s.selected || flagged.contains(&s.token_id))
                .take(30)
                .map(|(x, y, s)| {
                    Text::new(
                        s.token.clone(),
                        (*x * 1.08, *y),
                        (FONT, 13).into_font().color(&RED),
                    )
                }),
        )
        .map_err(err)?;
        if cut.is_finite() {
            c.draw_series(DashedLineSeries::new(
                [(0.8, cut), (x_max, cut)],
                6,
                4,
                RED.stroke_width(1),
            ))
            .map_err(err)?;
        }
        Ok(())
    })
}

/// A chart with `x` numeric and `n` named rows on y (row `i` labelled `label(i)`), its mesh
/// drawn.
type RowChart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::ranged1d::SegmentedCoord<plotters::coord::types::RangedCoordi32>,
    >,
>;

fn row_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    x_desc: &str,
    n: i32,
    label: impl Fn(i32) -> String,
) -> Result<RowChart<'a, 'b>> {
    let mut c = ChartBuilder::on(root)
        .caption(title, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(170)
        .build_cartesian_2d(x, (0..n).into_segmented())
        .map_err(err)?;
    c.configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE.mix(0.0))
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .x_desc(x_desc)
        .y_labels(n as usize + 1)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => label(*i),
            _ => String::new(),
        })
        .draw()
        .map_err(err)?;
    Ok(c)
}

/// One horizontal bar.
struct Bar {
    label: String,
    value: f64,
    /// Drawn in red.
    marked: bool,
    /// A whisker from low to high.
    ci: Option<(f64, f64)>,
}

/// Horizontal bars, in the order given (top to bottom); optional whiskers and a vertical
/// reference line.
fn hbars(title: &str, x_desc: &str, bars: &[Bar], x_max: f64, line: Option<f64>) -> Result<String> {
    let n = bars.len().max(1) as i32;
    let h = 130 + 24 * n as u32;
    svg(760, h, |root| {
        let label = |i: i32| {
            bars.get((n - 1 - i) as usize)
                .map(|b| b.label.clone())
                .unwrap_or_default()
        };
        let mut c = row_chart(root, title, 0f64..x_max, x_desc, n, label)?;
        c.draw_series(bars.iter().enumerate().map(|(k, b)| {
            let i = n - 1 - k as i32;
            let colour = if b.marked { RED } else { BLUE };
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (b.value, SegmentValue::Exact(i + 1)),
                ],
                colour.mix(0.75).filled(),
            );
            r.set_margin(3, 3, 0, 0);
            r
        }))
        .map_err(err)?;
        c.draw_series(bars.iter().enumerate().filter_map(|(k, b)| {
            let (lo, hi) = b.ci?;
            let i = n - 1 - k as i32;
            Some(PathElement::new(
                vec![
                    (lo, SegmentValue::CenterOf(i)),
                    (hi, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            ))
        }))
        .map_err(err)?;
        if let Some(x) = line {
            c.draw_series(DashedLineSeries::new(
                [(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
                6,
                4,
                RED.stroke_width(1),
            ))
            .map_err(err)?;
        }
        Ok(())
    })
}

/// A round's top `k` movements as bars (selected tokens in red).
pub fn top_bars(round: u8, scores: &[TokenScore], k: usize) -> Result<String> {
    let bars: Vec<_> = scores
        .iter()
        .take(k)
        .map(|s| Bar {
            label: s.token.clone(),
            value: s.distance as f64,
            marked: s.selected,
            ci: None,
        })
        .collect();
    let x_max = bars.iter().map(|b| b.value).fold(1e-9, f64::max) * 1.05;
    hbars(
        &format!("Round {round}: the {} largest movements", bars.len()),
        "embedding movement (L2); red: selected",
        &bars,
        x_max,
        None,
    )
}

/// Flip rate per verified candidate with its 95 % interval; the verification bound dashed.
pub fn effect_bars(effects: &[TokenEffect], bound: Option<f64>) -> Result<String> {
    let mut e: Vec<&TokenEffect> = effects.iter().collect();
    e.sort_by(|a, b| {
        b.flip_rate
            .total_cmp(&a.flip_rate)
            .then(a.candidate.cmp(&b.candidate))
    });
    let bars: Vec<_> = e
        .iter()
        .take(40)
        .map(|e| Bar {
            label: e.candidate.clone(),
            value: e.flip_rate as f64,
            marked: e.verified,
            ci: Some((e.ci_low as f64, e.ci_high as f64)),
        })
        .collect();
    hbars(
        "Verification: how often inserting the candidate flips the suspect model",
        "flip rate with 95 % Wilson interval; red: verified trigger; dashed: the bound",
        &bars,
        1.0,
        bound,
    )
}

/// Per repaired token, the deltas (trained - reference) of the replaced dimensions.
pub fn mask_strips(masks: &[DimensionMask]) -> Result<String> {
    let mut by: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for m in masks {
        by.entry(m.token.as_str()).or_default().push(m.delta as f64);
    }
    let rows: Vec<(&str, Vec<f64>)> = by.into_iter().collect();
    let n = rows.len().max(1) as i32;
    let lim = masks
        .iter()
        .map(|m| (m.delta as f64).abs())
        .fold(1e-9, f64::max)
        * 1.1;
    svg(760, 130 + 28 * n as u32, |root| {
        let label = |i: i32| {
            rows.get(i as usize)
                .map(|(t, d)| format!("{t} ({})", d.len()))
                .unwrap_or_default()
        };
        let mut c = row_chart(
            root,
            "Repair: the replaced dimensions' deltas per token",
            -lim..lim,
            "trained - reference, one point per replaced dimension",
            n,
            label,
        )?;
        for (i, (_, deltas)) in rows.iter().enumerate() {
            c.draw_series(deltas.iter().map(|d| {
                Circle::new(
                    (*d, SegmentValue::CenterOf(i as i32)),
                    2,
                    RED.mix(0.5).filled(),
                )
            }))
            .map_err(err)?;
        }
        Ok(())
    })
}

/// Wall time per step.
pub fn step_times(seconds: &[(String, f64)]) -> Result<String> {
    let bars: Vec<_> = seconds
        .iter()
        .map(|(s, t)| Bar {
            label: s.clone(),
            value: *t,
            marked: false,
            ci: None,
        })
        .collect();
    let x_max = bars.iter().map(|b| b.value).fold(1e-3, f64::max) * 1.05;
    hbars("Wall time per step", "seconds", &bars, x_max, None)
}
