//! Drawing a run's curves: stacked panels (training loss, learning rate, evaluations) against
//! the step, one line per stage. SVG only, whose text the viewer renders: no font is needed.
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// A named line of (step, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Default)]
pub struct Curves {
    pub loss: Vec<Series>,
    pub lr: Vec<Series>,
    pub evals: Vec<Series>,
}

pub fn draw_svg(curves: &Curves, out: &Path) -> Result<()> {
    let panels: Vec<(&str, &str, &[Series])> = [
        ("training loss", "loss", &curves.loss),
        ("learning rate", "lr", &curves.lr),
        ("evaluations", "metric", &curves.evals),
    ]
    .into_iter()
    .filter(|(_, _, s)| !s.is_empty())
    .map(|(title, y, s)| (title, y, s.as_slice()))
    .collect();
    let root = SVGBackend::new(out, (800, 260 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    for (area, (title, y_desc, series)) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let points = || series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(span(points().map(|p| p.0), 0.0), span(points().map(|p| p.1), 0.05))
            .map_err(plot_error)?;
        // A learning rate is 1e-5 to 1e-3: fixed decimals would print it as 0.0.
        let y_label = |v: &f64| if y_desc == "lr" { format!("{v:.1e}") } else { format!("{v:.3}") };
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_desc("step")
            .y_desc(y_desc)
            // Steps are whole numbers, but ticks over a short run fall between them.
            .x_label_formatter(&|v| format!("{}", (v * 100.0).round() / 100.0))
            .y_label_formatter(&y_label)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(plot_error)?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            // Evaluations are few: a marker on each keeps a lone point visible.
            let marker = if title == "evaluations" || s.points.len() == 1 { 3 } else { 0 };
            let line = LineSeries::new(s.points.iter().copied().filter(|p| p.1.is_finite()), color.stroke_width(2));
            chart
                .draw_series(line.point_size(marker))
                .map_err(plot_error)?
                .label(&s.name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            // Losses fall and metrics rise: the legend goes where the lines end up least.
            .position(if title == "evaluations" {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)
}

/// The range of `values`, padded by `pad` of its width (a flat line gets half its value either
/// side, so a constant learning rate keeps its sign).
fn span(values: impl Iterator<Item = f64>, pad: f64) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    match hi - lo {
        w if w > 0.0 => lo - pad * w..hi + pad * w,
        0.0 => {
            let half = if lo == 0.0 { 0.5 } else { lo.abs() / 2.0 };
            lo - half..hi + half
        }
        _ => 0.0..1.0,
    }
}

/// plotters' errors borrow their backend's error type; anyhow needs an owned one.
fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}
