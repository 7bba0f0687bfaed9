//! PNG line charts (plotters, bitmap backend). Text needs a TrueType font:
//! `WEFT_PLOT_FONT`, else DejaVu Sans or Liberation Sans from the usual
//! system paths; without one the chart is skipped with a message, and the
//! tables are still written.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
pub use plotters::prelude::SeriesLabelPosition;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let env = std::env::var("WEFT_PLOT_FONT").ok();
        let paths = env.iter().map(String::as_str).chain(FONT_PATHS);
        for p in paths {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps fonts for the life of the process
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draws `series` (name, points) as lines with markers into `path`; with
/// `y_max`, the y axis stops there and higher points are clipped.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    y_max: Option<f64>,
    legend: SeriesLabelPosition,
) -> Result<()> {
    if !font_ready() {
        eprintln!(
            "no TrueType font found (set WEFT_PLOT_FONT); skipping {}",
            path.display()
        );
        return Ok(());
    }
    let pts = series.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if let Some(m) = y_max {
        y1 = y1.min(m);
    }
    // start at zero unless every value sits far from it (utilities do)
    let y0 = if y0 >= 0.0 && y0 < 0.5 * y1 {
        0.0
    } else {
        y0 - (y1 - y0).abs() * 0.05
    };
    let series: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, v)| (n.clone(), v.iter().map(|&(x, y)| (x, y.min(y1))).collect()))
        .collect();
    if !x0.is_finite() {
        return Ok(());
    }
    let span = (x1 - x0).max(1e-9);
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            x0 - span * 0.02..x1 + span * 0.02,
            y0..y1 + (y1 - y0).abs() * 0.08 + 1e-9,
        )
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, v)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(v.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(v.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(legend)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Draws grouped bars into `path`: one group per entry of `groups`, one bar
/// per series in each group; with `y_max`, taller bars are clipped there.
pub fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[&str],
    series: &[(String, Vec<f64>)],
    y_max: Option<f64>,
) -> Result<()> {
    if !font_ready() {
        eprintln!(
            "no TrueType font found (set WEFT_PLOT_FONT); skipping {}",
            path.display()
        );
        return Ok(());
    }
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max);
    let top = y_max.map_or(top, |m| top.min(m)) * 1.1 + 1e-9;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..n, 0.0..top)
        .map_err(|e| err(&e))?;
    let labels: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x: &f64| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < labels.len() {
                labels[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    let k = series.len().max(1) as f64;
    let width = 0.8 / k;
    for (si, (name, v)) in series.iter().enumerate() {
        let c = COLORS[si % COLORS.len()];
        let rects = v.iter().enumerate().map(|(g, &y)| {
            let x0 = g as f64 + 0.1 + si as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.9, y.min(top))], c.filled())
        });
        chart
            .draw_series(rects)
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
