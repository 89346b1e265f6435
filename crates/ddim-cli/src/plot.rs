//! Line charts as PNG files with plotters: several named lines of (x, y) points, a title, axis
//! labels and an optional log x axis, alone or as panels of one image (`ddim eval`'s metrics
//! against steps; a training loss curve). Text uses the DejaVu Sans subset embedded in the
//! binary (`assets/fonts/`), registered with plotters' `ab_glyph` backend: no system font lookup.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::combinators::{LogCoord, WithKeyPoints};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;

/// Printable ASCII of DejaVu Sans; see `assets/fonts/LICENSE-DejaVu.txt`.
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-ASCII.ttf");
const FAMILY: &str = "sans-serif";

/// matplotlib's `tab10` colours, one per line, repeating after ten.
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// One named line.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// The points, in drawing order; points that are not finite (or x ≤ 0 on a log axis) are
    /// left out.
    pub points: Vec<(f64, f64)>,
}

/// A chart of lines.
#[derive(Clone, Debug, PartialEq)]
pub struct LineChart {
    /// Above the chart.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Beside the y axis.
    pub y_label: String,
    /// A logarithmic x axis.
    pub log_x: bool,
    /// A logarithmic y axis.
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
}

/// Writes `chart` as a `width × height` PNG (atomically).
pub fn save_line_chart(path: &Path, chart: &LineChart, size: (u32, u32)) -> Result<()> {
    save_panels(path, std::slice::from_ref(chart), 1, size)
}

/// Writes `charts` as panels of one PNG, `columns` to a row, each panel `panel` pixels.
pub fn save_panels(
    path: &Path,
    charts: &[LineChart],
    columns: usize,
    panel: (u32, u32),
) -> Result<()> {
    register_font()?;
    if charts.is_empty() || columns == 0 {
        return Err(anyhow!("a plot needs at least one chart and one column"));
    }
    let columns = columns.min(charts.len());
    let rows = charts.len().div_ceil(columns);
    let (w, h) = (panel.0 * columns as u32, panel.1 * rows as u32);
    if !(100..=20_000).contains(&panel.0) || !(100..=20_000).contains(&panel.1) {
        return Err(anyhow!(
            "plot panels of {}×{} pixels: each side must be 100 to 20000",
            panel.0,
            panel.1
        ));
    }
    let mut buffer = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let areas = root.split_evenly((rows, columns));
        for (area, chart) in areas.iter().zip(charts) {
            draw_chart(area, chart)?;
        }
        root.present().map_err(draw_error)?;
    }
    let image = image::RgbImage::from_raw(w, h, buffer)
        .ok_or_else(|| anyhow!("plot buffer of the wrong size"))?;
    ddim::image_io::save_png(&image::DynamicImage::ImageRgb8(image), path)?;
    Ok(())
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded DejaVu Sans font could not be read"));
    });
    result
}

fn draw_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_chart(area: &Area<'_>, chart: &LineChart) -> Result<()> {
    let lines: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|&(x, y)| {
                    x.is_finite()
                        && y.is_finite()
                        && (!chart.log_x || x > 0.0)
                        && (!chart.log_y || y > 0.0)
                })
                .collect()
        })
        .collect();
    let all = || lines.iter().flatten();
    let Some(x) = span(all().map(|p| p.0)) else {
        // Nothing to draw: the title and a note.
        area.titled(&chart.title, (FAMILY, 20))
            .map_err(draw_error)?
            .draw_text(
                "no finite values",
                &(FAMILY, 16).into_text_style(area),
                (20, 20),
            )
            .map_err(draw_error)?;
        return Ok(());
    };
    let y = span(all().map(|p| p.1)).unwrap_or((1.0, 1.0));
    let (x0, x1) = if chart.log_x {
        widen_log(x)
    } else {
        widen(x, 0.0)
    };
    // Headroom above the lines for the legend in the upper right corner.
    let legend_rows = chart.series.iter().filter(|s| !s.name.is_empty()).count() as f64;
    let (y0, y1) = if chart.log_y {
        let (y0, y1) = widen_log(y);
        (y0, y1 * (y1 / y0).powf(0.07 * legend_rows))
    } else {
        let (y0, y1) = widen(y, 0.05);
        (y0, y1 + (y1 - y0) * 0.07 * legend_rows)
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&chart.title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(64);
    match (chart.log_x, chart.log_y) {
        (false, false) => draw_lines(
            &mut builder
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(draw_error)?,
            chart,
            &lines,
        ),
        (true, false) => draw_lines(
            &mut builder
                .build_cartesian_2d(log_axis(x0, x1), y0..y1)
                .map_err(draw_error)?,
            chart,
            &lines,
        ),
        (false, true) => draw_lines(
            &mut builder
                .build_cartesian_2d(x0..x1, log_axis(y0, y1))
                .map_err(draw_error)?,
            chart,
            &lines,
        ),
        (true, true) => draw_lines(
            &mut builder
                .build_cartesian_2d(log_axis(x0, x1), log_axis(y0, y1))
                .map_err(draw_error)?,
            chart,
            &lines,
        ),
    }
}

/// A log axis over [lo, hi] (lo > 0) with ticks at 1, 2 and 5 times powers of ten, or at its
/// ends when fewer than two of those fall inside.
fn log_axis(lo: f64, hi: f64) -> WithKeyPoints<LogCoord<f64>> {
    let mut ticks = log_ticks(lo, hi);
    if ticks.len() < 2 {
        ticks = vec![lo, hi];
    }
    (lo..hi).log_scale().with_key_points(ticks)
}

fn draw_lines<'a, X, Y>(
    c: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    chart: &LineChart,
    lines: &[Vec<(f64, f64)>],
) -> Result<()>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    c.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .y_label_formatter(&|v| short_number(*v))
        .x_label_formatter(&|v| short_number(*v))
        .light_line_style(RGBColor(246, 246, 246))
        .draw()
        .map_err(draw_error)?;
    for (i, (series, points)) in chart.series.iter().zip(lines).enumerate() {
        let (r, g, b) = COLORS[i % COLORS.len()];
        let color = RGBColor(r, g, b);
        let style = color.stroke_width(2);
        c.draw_series(LineSeries::new(points.iter().copied(), style))
            .map_err(draw_error)?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        // Markers where points are few enough to see one by one (a metric per step count).
        if points.len() <= 50 {
            c.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(draw_error)?;
        }
    }
    if chart.series.iter().any(|s| !s.name.is_empty()) {
        c.configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(draw_error)?;
    }
    Ok(())
}

/// The smallest and largest value, if any.
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// The range padded by `pad` of its length, and opened up when it is a single value.
fn widen((lo, hi): (f64, f64), pad: f64) -> (f64, f64) {
    if hi > lo {
        let d = (hi - lo) * pad;
        (lo - d, hi + d)
    } else {
        let d = (lo.abs() * 0.1).max(1e-3);
        (lo - d, hi + d)
    }
}

/// A log range opened up by a factor 1.3 at each end (a factor 2 around a single value).
fn widen_log((lo, hi): (f64, f64)) -> (f64, f64) {
    if hi > lo {
        (lo / 1.3, hi * 1.3)
    } else {
        (lo / 2.0, hi * 2.0)
    }
}

/// Ticks at 1, 2 and 5 times the powers of ten in [lo, hi] (lo > 0): 2, 5, 10, 20, ... 1000.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    if !(lo > 0.0 && hi.is_finite()) || last - first > 30 {
        return Vec::new();
    }
    (first..=last)
        .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
        .filter(|v| (lo..=hi).contains(v))
        .collect()
}

/// Tick labels without float noise: 0.30000000000000004 -> 0.3, 1000 -> 1000, 1.5e-5 -> 1.5e-5.
fn short_number(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(log_x: bool, series: Vec<Series>) -> LineChart {
        LineChart {
            title: "FD (pixels)".into(),
            x_label: "steps".into(),
            y_label: "FD".into(),
            log_x,
            log_y: false,
            series,
        }
    }

    #[test]
    fn charts_render_to_png_including_degenerate_ones() {
        let dir = std::env::temp_dir().join(format!("ddim-plot-test-{}", std::process::id()));
        let lines = vec![
            Series {
                name: "eta = 0".into(),
                points: vec![(10.0, 30.0), (100.0, 12.0), (1000.0, 8.0)],
            },
            Series {
                name: "eta = 1".into(),
                points: vec![(10.0, 60.0), (100.0, f64::NAN), (1000.0, 9.0)],
            },
        ];
        let path = dir.join("a.png");
        save_line_chart(&path, &chart(true, lines.clone()), (640, 420)).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 420));
        // something other than white was drawn, including the first line's colour
        let (r, g, b) = COLORS[0];
        assert!(img.pixels().any(|p| p.0 == [r, g, b]));

        // one point, no points, log axis with x = 0, as panels
        let degenerate = [
            chart(
                true,
                vec![Series {
                    name: "one".into(),
                    points: vec![(5.0, 1.0)],
                }],
            ),
            chart(false, vec![]),
            chart(
                true,
                vec![Series {
                    name: "zero".into(),
                    points: vec![(0.0, 1.0)],
                }],
            ),
            chart(false, lines.clone()),
            LineChart {
                log_y: true,
                ..chart(true, lines)
            },
        ];
        let path = dir.join("b.png");
        save_panels(&path, &degenerate, 2, (300, 200)).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (600, 600));
        assert!(save_panels(&path, &[], 2, (300, 200)).is_err());
        assert!(save_panels(&path, &degenerate, 2, (10, 200)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn log_ticks_are_one_two_five() {
        assert_eq!(log_ticks(1.5, 26.0), [2.0, 5.0, 10.0, 20.0]);
        assert_eq!(
            log_ticks(7.0, 1300.0),
            [10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        );
        assert!(log_ticks(0.0, 10.0).is_empty());
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(short_number(0.30000000000000004), "0.3");
        assert_eq!(short_number(1000.0), "1000");
        assert_eq!(short_number(-2.5), "-2.5");
        assert_eq!(short_number(1.5e-5), "1.5e-5");
        assert_eq!(short_number(0.0), "0");
    }
}
