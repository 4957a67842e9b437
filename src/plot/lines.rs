//! Line charts: per-layer statistics, singular-value spectra (log axis),
//! loss curves; several series with a legend.

use super::axis::{self, Area, Scale};
use super::figure::{describe, Figure};
use super::legend::{self, LegendEntry, Swatch};
use super::svg::Svg;
use super::theme::{self, format_value};
use super::{PlotError, Result};

/// Series longer than this get no per-point hover targets (the SVG would
/// grow by ~100 bytes a point); the line itself still names the series.
const MAX_HOVER_POINTS: usize = 1000;
/// With [`Markers::Auto`], series up to this long show their points.
const AUTO_MARKER_POINTS: usize = 50;

/// Whether points are drawn as dots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Markers {
    /// Dots when every series has at most 50 points.
    #[default]
    Auto,
    Always,
    Never,
}

#[derive(Clone, Debug)]
struct Series {
    name: String,
    xs: Vec<f64>,
    ys: Vec<f64>,
}

/// A line-chart builder.
///
/// ```
/// use deepscope::plot::LineChart;
///
/// let spectrum: Vec<f64> = (0..64).map(|i| (-(i as f64) / 8.0).exp()).collect();
/// let fig = LineChart::new()
///     .series("W_dkv", &spectrum)
///     .y_log(true)
///     .title("Singular values of W_dkv, layer 0")
///     .x_title("index")
///     .y_title("singular value")
///     .render()?;
/// assert!(fig.to_svg().contains("<polyline"));
/// # Ok::<(), deepscope::plot::PlotError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct LineChart {
    series: Vec<Series>,
    x_log: bool,
    y_log: bool,
    markers: Markers,
    title: Option<String>,
    note: Option<String>,
    x_title: Option<String>,
    y_title: Option<String>,
    size: Option<(f64, f64)>,
}

setters!(LineChart {
    /// What is plotted, above the chart.
    text title;
    /// A line of small text under the title.
    text note;
    /// What the x axis shows.
    text x_title;
    /// What the y axis shows.
    text y_title;
    /// A logarithmic x axis.
    value x_log: bool;
    /// A logarithmic y axis (spectra, losses). Points at or below zero are
    /// left out and counted under the title.
    value y_log: bool;
    /// Whether points are drawn as dots (default: when few).
    value markers: Markers;
    /// Size of the plot area in px (default 560 x 320).
    pair size(width, height);
});

impl LineChart {
    pub fn new() -> LineChart {
        LineChart::default()
    }

    /// Adds a series drawn at x = 0, 1, 2, ... (layers, steps, indices).
    pub fn series<T: Copy + Into<f64>>(mut self, name: impl Into<String>, ys: &[T]) -> Self {
        let ys: Vec<f64> = ys.iter().map(|&v| v.into()).collect();
        self.series.push(Series {
            name: name.into(),
            xs: (0..ys.len()).map(|i| i as f64).collect(),
            ys,
        });
        self
    }

    /// Adds a series with its own x values (same length as `ys`).
    pub fn series_xy<X: Copy + Into<f64>, T: Copy + Into<f64>>(
        mut self,
        name: impl Into<String>,
        xs: &[X],
        ys: &[T],
    ) -> Self {
        self.series.push(Series {
            name: name.into(),
            xs: xs.iter().map(|&v| v.into()).collect(),
            ys: ys.iter().map(|&v| v.into()).collect(),
        });
        self
    }

    fn drawable(&self, x: f64, y: f64) -> bool {
        x.is_finite() && y.is_finite() && (!self.x_log || x > 0.0) && (!self.y_log || y > 0.0)
    }

    /// Draws the chart.
    pub fn render(&self) -> Result<Figure> {
        if self.series.is_empty() {
            return Err(PlotError::Empty("series".into()));
        }
        for s in &self.series {
            if s.ys.is_empty() {
                return Err(PlotError::Empty(format!("series `{}`", s.name)));
            }
            if s.xs.len() != s.ys.len() {
                return Err(PlotError::length(
                    format!("x of series `{}`", s.name),
                    s.ys.len(),
                    s.xs.len(),
                    "its y values",
                ));
            }
        }
        if let Some((w, h)) = self.size {
            if !(w.is_finite() && h.is_finite() && w > 0.0 && h > 0.0) {
                return Err(PlotError::invalid(
                    "size",
                    format!("must be positive, got {w} x {h}"),
                ));
            }
        }
        let points = || {
            self.series
                .iter()
                .flat_map(|s| s.xs.iter().copied().zip(s.ys.iter().copied()))
                .filter(|&(x, y)| self.drawable(x, y))
        };
        let total: usize = self.series.iter().map(|s| s.ys.len()).sum();
        let dropped = total - points().count();
        let (Some((x_lo, x_hi)), Some((y_lo, y_hi))) = (
            axis::finite_range(&points().map(|p| p.0).collect::<Vec<_>>()),
            axis::finite_range(&points().map(|p| p.1).collect::<Vec<_>>()),
        ) else {
            return Err(PlotError::invalid(
                "series",
                "no point can be drawn (all are NaN, infinite, or not positive on a log axis)",
            ));
        };
        let x_scale = if self.x_log {
            Scale::log(x_lo, x_hi)
        } else {
            Scale::linear(x_lo, x_hi)
        };
        let y_scale = if self.y_log {
            // Out to whole decades, so the ends carry labels.
            Scale::log(
                10f64.powf(y_lo.log10().floor()),
                10f64.powf(y_hi.log10().ceil()),
            )
        } else {
            // The data's range plus 5% each side, as most plotting tools do:
            // rounding out to whole ticks can waste half the height.
            let pad = 0.05 * (y_hi - y_lo);
            Scale::linear(y_lo - pad, y_hi + pad)
        };
        let x_ticks = x_scale.ticks(6);
        let y_ticks = y_scale.ticks(5);

        let legend: Vec<LegendEntry> = if self.series.len() > 1 {
            self.series
                .iter()
                .enumerate()
                .map(|(k, s)| LegendEntry {
                    name: s.name.clone(),
                    color: theme::categorical(k),
                    swatch: Swatch::Line,
                })
                .collect()
        } else {
            Vec::new()
        };
        let subtitle = match (self.note.clone(), dropped_note(dropped)) {
            (Some(n), Some(d)) => Some(format!("{n} · {d}")),
            (n, d) => n.or(d),
        };
        let title = self.title.as_deref();
        let (pw, ph) = self.size.unwrap_or((560.0, 320.0));
        let top = theme::PAD + axis::title_height(title, subtitle.as_deref());
        let left = theme::PAD
            + axis::left_margin(
                axis::numeric_labels_width(&y_ticks),
                self.y_title.as_deref(),
            );
        let area = Area {
            x: left,
            y: top,
            w: pw,
            h: ph,
        };
        let half_label = x_ticks
            .last()
            .map_or(0.0, |t| theme::text_width(&t.label, theme::TICK_SIZE) / 2.0);
        let right = legend::legend_width(&legend).max(half_label) + theme::PAD;
        let width = (area.right() + right)
            .max(2.0 * theme::PAD + axis::title_width(title, subtitle.as_deref()))
            .ceil();
        let height = (area.bottom()
            + axis::bottom_margin(theme::TICK_SIZE * 1.2, self.x_title.as_deref())
            + theme::PAD)
            .max(top + legend::legend_height(&legend) + theme::PAD)
            .ceil();

        let longest = self.series.iter().map(|s| s.ys.len()).max().unwrap_or(0);
        let axes = match (self.x_log, self.y_log) {
            (false, false) => None,
            (true, false) => Some("log x".to_string()),
            (false, true) => Some("log y".to_string()),
            (true, true) => Some("log x, log y".to_string()),
        };
        let description = describe(
            "line chart",
            Some(format!("{} series x {longest} points", self.series.len())),
            title,
            axes,
        );
        let mut svg = Svg::new(width, height, &description);
        axis::draw_title(&mut svg, title, subtitle.as_deref());
        axis::draw_y_numeric(
            &mut svg,
            area,
            &y_scale,
            &y_ticks,
            self.y_title.as_deref(),
            true,
        );
        axis::draw_x_numeric(
            &mut svg,
            area,
            &x_scale,
            &x_ticks,
            self.x_title.as_deref(),
            true,
        );
        let to_px = |x: f64, y: f64| {
            (
                area.x + x_scale.frac(x).unwrap_or(0.0) * area.w,
                area.bottom() - y_scale.frac(y).unwrap_or(0.0) * area.h,
            )
        };
        let show_markers = match self.markers {
            Markers::Always => true,
            Markers::Never => false,
            Markers::Auto => longest <= AUTO_MARKER_POINTS,
        };
        let x_name = self.x_title.as_deref().unwrap_or("x");
        let y_name = self.y_title.as_deref().unwrap_or("y");
        for (k, s) in self.series.iter().enumerate() {
            let color = theme::categorical(k);
            // Break the line where a point cannot be drawn.
            let mut segment: Vec<(f64, f64)> = Vec::new();
            for (&x, &y) in s.xs.iter().zip(&s.ys) {
                if self.drawable(x, y) {
                    segment.push(to_px(x, y));
                } else {
                    flush(&mut svg, &mut segment, color, &s.name);
                }
            }
            flush(&mut svg, &mut segment, color, &s.name);
            let hover = s.ys.len() <= MAX_HOVER_POINTS;
            if !(hover || show_markers) {
                continue;
            }
            for (&x, &y) in s.xs.iter().zip(&s.ys) {
                if !self.drawable(x, y) {
                    continue;
                }
                let (px, py) = to_px(x, y);
                let tip = hover.then(|| {
                    format!(
                        "{}\n{x_name}: {}\n{y_name}: {}",
                        s.name,
                        format_value(x),
                        format_value(y)
                    )
                });
                let r = if show_markers { 3.0 } else { 4.0 };
                svg.circle(px, py, r, color, show_markers, tip.as_deref());
            }
        }
        legend::draw_legend(&mut svg, area, &legend);
        Ok(svg.into_figure(self.title.clone()))
    }
}

fn flush(svg: &mut Svg, segment: &mut Vec<(f64, f64)>, color: theme::Rgb, name: &str) {
    if segment.len() >= 2 {
        svg.polyline(segment, color, 2.0, Some(name));
    }
    segment.clear();
}

fn dropped_note(dropped: usize) -> Option<String> {
    (dropped > 0).then(|| {
        format!(
            "{dropped} point{} not drawn (NaN, infinite, or not positive on a log axis)",
            if dropped == 1 { "" } else { "s" }
        )
    })
}
