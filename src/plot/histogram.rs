//! Histogram: how values are distributed (activations, router scores,
//! weights), with a linear or a logarithmic count axis for heavy tails.

use super::axis::{self, Area, Scale};
use super::figure::{describe, Figure};
use super::svg::Svg;
use super::theme::{self, format_value};
use super::{PlotError, Result};

/// Most bins chosen automatically.
const MAX_AUTO_BINS: usize = 100;
/// Most bins one may ask for (each is an SVG element).
const MAX_BINS: usize = 10_000;

/// A histogram builder.
///
/// ```
/// use deepscope::plot::Histogram;
///
/// let activations: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin()).collect();
/// let fig = Histogram::new(&activations)
///     .bins(20)
///     .log_count(true)
///     .title("MLP activations, layer 2")
///     .x_title("activation")
///     .render()?;
/// assert!(fig.to_string().starts_with("histogram 20 bins"));
/// # Ok::<(), deepscope::plot::PlotError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Histogram {
    values: Vec<f64>,
    bins: Option<usize>,
    range: Option<(f64, f64)>,
    log_count: bool,
    title: Option<String>,
    note: Option<String>,
    x_title: Option<String>,
    y_title: Option<String>,
    size: Option<(f64, f64)>,
}

/// Counted bins: edges (`bins + 1` of them) and counts.
#[derive(Clone, Debug, PartialEq)]
pub struct Bins {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
    /// Finite values outside the range.
    pub outside: u64,
    /// NaN and infinite values.
    pub non_finite: u64,
}

setters!(Histogram {
    /// What is plotted, above the chart.
    text title;
    /// A line of small text under the title.
    text note;
    /// What the x axis shows.
    text x_title;
    /// What the y axis shows.
    text y_title;
    /// The number of bins (default: Freedman–Diaconis, at most 100).
    some bins: usize;
    /// The binned range (default: the finite minimum to maximum). Values
    /// outside are counted and reported under the title.
    pair range(lo, hi);
    /// A logarithmic count axis, for heavy-tailed distributions.
    value log_count: bool;
    /// Size of the plot area in px (default 560 x 300).
    pair size(width, height);
});

impl Histogram {
    /// A histogram of `values` (`f32` or `f64`).
    pub fn new<T: Copy + Into<f64>>(values: &[T]) -> Histogram {
        Histogram {
            values: values.iter().map(|&v| v.into()).collect(),
            bins: None,
            range: None,
            log_count: false,
            title: None,
            note: None,
            x_title: None,
            y_title: None,
            size: None,
        }
    }

    /// Counts the values into bins, as the chart will draw them.
    pub fn compute(&self) -> Result<Bins> {
        if self.values.is_empty() {
            return Err(PlotError::Empty("values".into()));
        }
        let finite: Vec<f64> = self
            .values
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        if finite.is_empty() {
            return Err(PlotError::invalid(
                "values",
                format!("none of the {} values is finite", self.values.len()),
            ));
        }
        let (lo, hi) = match self.range {
            Some((lo, hi)) if !(lo.is_finite() && hi.is_finite() && hi > lo) => {
                return Err(PlotError::invalid(
                    "range",
                    format!("needs finite lo < hi, got ({lo}, {hi})"),
                ))
            }
            Some(r) => r,
            None => {
                let (lo, hi) = axis::finite_range(&finite).unwrap_or((0.0, 1.0));
                if hi > lo {
                    (lo, hi)
                } else {
                    (lo - 0.5, hi + 0.5)
                }
            }
        };
        let bins = match self.bins {
            Some(b) if !(1..=MAX_BINS).contains(&b) => {
                return Err(PlotError::invalid(
                    "bins",
                    format!("must be 1 to {MAX_BINS}, got {b}"),
                ))
            }
            Some(b) => b,
            None => auto_bins(&finite, lo, hi),
        };
        let width = (hi - lo) / bins as f64;
        let edges: Vec<f64> = (0..=bins).map(|i| lo + i as f64 * width).collect();
        let mut counts = vec![0u64; bins];
        let mut outside = 0;
        for &v in &finite {
            if v < lo || v > hi {
                outside += 1;
                continue;
            }
            // The last bin is closed: hi itself falls in it.
            let i = (((v - lo) / width) as usize).min(bins - 1);
            counts[i] += 1;
        }
        Ok(Bins {
            edges,
            counts,
            outside,
            non_finite: (self.values.len() - finite.len()) as u64,
        })
    }

    /// Draws the histogram.
    pub fn render(&self) -> Result<Figure> {
        let bins = self.compute()?;
        if let Some((w, h)) = self.size {
            if !(w.is_finite() && h.is_finite() && w > 0.0 && h > 0.0) {
                return Err(PlotError::invalid(
                    "size",
                    format!("must be positive, got {w} x {h}"),
                ));
            }
        }
        let n_bins = bins.counts.len();
        let (lo, hi) = (bins.edges[0], bins.edges[n_bins]);
        let max_count = bins.counts.iter().copied().max().unwrap_or(0).max(1) as f64;
        let y_scale = if self.log_count {
            // From 0.5 so that a bin of one still shows.
            Scale::log(0.5, 10f64.powf(max_count.log10().ceil()).max(10.0))
        } else {
            Scale::linear_nice(0.0, max_count, 5)
        };
        let y_ticks: Vec<_> = y_scale
            .ticks(5)
            .into_iter()
            .filter(|t| t.value >= 1.0 || !self.log_count)
            .collect();
        let x_scale = Scale::linear(lo, hi);
        let x_ticks = x_scale.ticks(6);

        let subtitle = self.summary(&bins);
        let y_title = self.y_title.clone().unwrap_or_else(|| {
            if self.log_count {
                "count (log)".into()
            } else {
                "count".into()
            }
        });
        let title = self.title.as_deref();
        let (pw, ph) = self.size.unwrap_or((560.0, 300.0));
        let top = theme::PAD + axis::title_height(title, Some(&subtitle));
        let left =
            theme::PAD + axis::left_margin(axis::numeric_labels_width(&y_ticks), Some(&y_title));
        let area = Area {
            x: left,
            y: top,
            w: pw,
            h: ph,
        };
        // Room for half of the last tick label.
        let right = theme::PAD
            + x_ticks
                .last()
                .map_or(0.0, |t| theme::text_width(&t.label, theme::TICK_SIZE) / 2.0);
        let width = (area.right() + right)
            .max(2.0 * theme::PAD + axis::title_width(title, Some(&subtitle)))
            .ceil();
        let height = (area.bottom()
            + axis::bottom_margin(theme::TICK_SIZE * 1.2, self.x_title.as_deref())
            + theme::PAD)
            .ceil();

        let description = describe(
            "histogram",
            Some(format!("{n_bins} bins")),
            title,
            self.log_count.then(|| "log count".to_string()),
        );
        let mut svg = Svg::new(width, height, &description);
        axis::draw_title(&mut svg, title, Some(&subtitle));
        axis::draw_y_numeric(&mut svg, area, &y_scale, &y_ticks, Some(&y_title), true);
        let total: u64 = bins.counts.iter().sum();
        let bin_w = area.w / n_bins as f64;
        let gap = if bin_w >= 4.0 { 0.5 } else { 0.0 };
        for (i, &count) in bins.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let f = y_scale.frac(count as f64).unwrap_or(0.0).clamp(0.0, 1.0);
            let (a, b) = (bins.edges[i], bins.edges[i + 1]);
            let close = if i + 1 == n_bins { "]" } else { ")" };
            let tip = format!(
                "[{}, {}{close}: {count} ({:.1}%)",
                format_value(a),
                format_value(b),
                100.0 * count as f64 / total.max(1) as f64
            );
            let y = area.bottom() - f * area.h;
            // Bars rise from the axis floor (0, or 0.5 on a log axis).
            let h = f * area.h;
            svg.rect(
                area.x + i as f64 * bin_w + gap,
                y,
                bin_w - 2.0 * gap,
                h,
                theme::categorical(0),
                Some(&tip),
            );
        }
        axis::draw_x_numeric(
            &mut svg,
            area,
            &x_scale,
            &x_ticks,
            self.x_title.as_deref(),
            false,
        );
        Ok(svg.into_figure(self.title.clone()))
    }

    /// "n = 1000 · mean 0.01 · std 0.98 · 3 outside range · 2 NaN/inf skipped"
    fn summary(&self, bins: &Bins) -> String {
        let finite: Vec<f64> = self
            .values
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        let n = finite.len() as f64;
        let mean = finite.iter().sum::<f64>() / n;
        let var = finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let mut parts = Vec::new();
        if let Some(note) = &self.note {
            parts.push(note.clone());
        }
        parts.push(format!("n = {}", finite.len()));
        parts.push(format!("mean {}", format_value(mean)));
        parts.push(format!("std {}", format_value(var.sqrt())));
        if bins.outside > 0 {
            parts.push(format!("{} outside range", bins.outside));
        }
        if bins.non_finite > 0 {
            parts.push(format!("{} NaN or infinite skipped", bins.non_finite));
        }
        parts.join(" · ")
    }
}

/// Freedman–Diaconis bin count (width 2 IQR / n^(1/3)); Sturges' rule when
/// the interquartile range is zero; between 1 and 100.
fn auto_bins(finite: &[f64], lo: f64, hi: f64) -> usize {
    let n = finite.len();
    let mut sorted: Vec<f64> = finite.to_vec();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| sorted[((n - 1) as f64 * p).round() as usize];
    let iqr = q(0.75) - q(0.25);
    let bins = if iqr > 0.0 {
        let h = 2.0 * iqr / (n as f64).cbrt();
        ((hi - lo) / h).ceil()
    } else {
        (n as f64).log2().ceil() + 1.0
    };
    (bins as usize).clamp(1, MAX_AUTO_BINS)
}
