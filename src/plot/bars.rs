//! Bar charts: one value per category (expert load of one layer, with its
//! mean), several series side by side (grouped) or on top of each other
//! (stacked).

use super::axis::{self, Area, Scale};
use super::figure::{describe, Figure};
use super::legend::{self, LegendEntry, Swatch};
use super::svg::{Anchor, Stroke, Svg, TextStyle};
use super::theme::{self, format_value};
use super::{collect_labels, PlotError, Result};

/// How several series share a category.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BarMode {
    /// Side by side.
    #[default]
    Grouped,
    /// On top of each other (negative values stack downwards from zero).
    Stacked,
}

/// A bar-chart builder.
///
/// ```
/// use deepscope::plot::BarChart;
///
/// let load = [0.15, 0.10, 0.05, 0.20, 0.12, 0.08, 0.18, 0.12];
/// let fig = BarChart::new((0..8).map(|e| format!("e{e}")))
///     .series("layer 3", &load)
///     .mean_line(true)
///     .title("Expert load, layer 3")
///     .x_title("expert")
///     .y_title("share of tokens")
///     .render()?;
/// assert!(fig.to_svg().contains("mean: 0.125"));
/// # Ok::<(), deepscope::plot::PlotError>(())
/// ```
#[derive(Clone, Debug)]
pub struct BarChart {
    categories: Vec<String>,
    series: Vec<(String, Vec<f64>)>,
    mode: BarMode,
    mean_line: bool,
    references: Vec<(f64, String)>,
    title: Option<String>,
    note: Option<String>,
    x_title: Option<String>,
    y_title: Option<String>,
    size: Option<(f64, f64)>,
}

setters!(BarChart {
    /// What is plotted, above the chart.
    text title;
    /// A line of small text under the title.
    text note;
    /// What the x axis shows.
    text x_title;
    /// What the y axis shows.
    text y_title;
    /// Grouped (default) or stacked.
    value mode: BarMode;
    /// Draws a dashed line at the mean: of each series when grouped, of the
    /// totals when stacked. For expert load, the mean is the perfectly
    /// balanced load.
    value mean_line: bool;
    /// Size of the plot area in px (default: about 560 x 300).
    pair size(width, height);
});

impl BarChart {
    /// A chart with one band per category, in order.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(categories: I) -> BarChart {
        BarChart {
            categories: collect_labels(categories),
            series: Vec::new(),
            mode: BarMode::Grouped,
            mean_line: false,
            references: Vec::new(),
            title: None,
            note: None,
            x_title: None,
            y_title: None,
            size: None,
        }
    }

    /// Adds a series: one value per category.
    pub fn series<T: Copy + Into<f64>>(mut self, name: impl Into<String>, values: &[T]) -> Self {
        self.series
            .push((name.into(), values.iter().map(|&v| v.into()).collect()));
        self
    }

    /// Draws a labelled horizontal line at `value` (a target, a capacity).
    pub fn reference_line(mut self, value: f64, label: impl Into<String>) -> Self {
        self.references.push((value, label.into()));
        self
    }

    /// Draws the chart.
    pub fn render(&self) -> Result<Figure> {
        let n = self.categories.len();
        if n == 0 {
            return Err(PlotError::Empty("categories".into()));
        }
        if self.series.is_empty() {
            return Err(PlotError::Empty("series".into()));
        }
        for (name, values) in &self.series {
            if values.len() != n {
                return Err(PlotError::length(
                    format!("series `{name}`"),
                    n,
                    values.len(),
                    "categories",
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
        let stacked = self.mode == BarMode::Stacked && self.series.len() > 1;
        let means = self.means(stacked);

        // Value extent: bars always start at zero.
        let (mut lo, mut hi) = (0.0f64, 0.0f64);
        for c in 0..n {
            if stacked {
                let (neg, pos) = self.stack_extent(c);
                lo = lo.min(neg);
                hi = hi.max(pos);
            } else {
                for (_, values) in &self.series {
                    if values[c].is_finite() {
                        lo = lo.min(values[c]);
                        hi = hi.max(values[c]);
                    }
                }
            }
        }
        for &(v, _) in self.references.iter().filter(|(v, _)| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if hi <= lo {
            hi = lo + 1.0;
        }
        let scale = Scale::linear_nice(lo, hi, 5);
        let ticks = scale.ticks(5);

        let (pw, ph) = self
            .size
            .unwrap_or_else(|| ((560.0 / n as f64).clamp(3.0, 56.0) * n as f64, 300.0));
        let pw = pw.max(120.0);
        let band = pw / n as f64;
        let x_layout = axis::layout_x_band(&self.categories, band);
        let mut legend: Vec<LegendEntry> = Vec::new();
        if self.series.len() > 1 {
            for (k, (name, _)) in self.series.iter().enumerate() {
                legend.push(LegendEntry {
                    name: name.clone(),
                    color: theme::categorical(k),
                    swatch: Swatch::Block,
                });
            }
        }
        // Several means would crowd each other as line labels: list them in
        // the legend instead.
        if means.len() > 1 {
            for (k, m) in means.iter().enumerate() {
                if let Some(m) = m {
                    legend.push(LegendEntry {
                        name: format!("mean, {}: {}", self.series[k].0, format_value(*m)),
                        color: theme::categorical(k),
                        swatch: Swatch::DashedLine,
                    });
                }
            }
        }
        let missing = self
            .series
            .iter()
            .flat_map(|(_, v)| v)
            .filter(|v| !v.is_finite())
            .count();
        let subtitle = note_with_missing(self.note.as_deref(), missing);
        let title = self.title.as_deref();
        let top = theme::PAD + axis::title_height(title, subtitle.as_deref());
        let left = theme::PAD
            + axis::left_margin(axis::numeric_labels_width(&ticks), self.y_title.as_deref())
                .max(x_layout.left_overhang(band));
        let area = Area {
            x: left,
            y: top,
            w: pw,
            h: ph,
        };
        let right = legend::legend_width(&legend).max(x_layout.right_overhang(band)) + theme::PAD;
        let width = (area.right() + right)
            .max(2.0 * theme::PAD + axis::title_width(title, subtitle.as_deref()))
            .ceil();
        let height = (area.bottom()
            + axis::bottom_margin(x_layout.extent, self.x_title.as_deref())
            + theme::PAD)
            .max(top + legend::legend_height(&legend) + theme::PAD)
            .ceil();

        let kind = match (self.series.len(), stacked) {
            (1, _) => "bar chart",
            (_, true) => "stacked bar chart",
            (_, false) => "grouped bar chart",
        };
        let shape = if self.series.len() == 1 {
            format!("{n} bars")
        } else {
            format!("{n} categories x {} series", self.series.len())
        };
        let description = describe(kind, Some(shape), title, None);
        let mut svg = Svg::new(width, height, &description);
        axis::draw_title(&mut svg, title, subtitle.as_deref());
        axis::draw_y_numeric(
            &mut svg,
            area,
            &scale,
            &ticks,
            self.y_title.as_deref(),
            true,
        );
        let y_of = |v: f64| area.bottom() - scale.frac(v).unwrap_or(0.0) * area.h;
        self.draw_bars(&mut svg, area, band, stacked, &y_of);
        if lo < 0.0 {
            svg.line(
                area.x,
                y_of(0.0),
                area.right(),
                y_of(0.0),
                Stroke::solid(theme::AXIS, 1.0),
            );
        }
        for (k, mean) in means.iter().enumerate() {
            if let Some(m) = mean {
                if means.len() > 1 {
                    let label = format!("mean, {}: {}", self.series[k].0, format_value(*m));
                    reference(
                        &mut svg,
                        area,
                        y_of(*m),
                        theme::categorical(k),
                        &label,
                        false,
                    );
                } else {
                    let label = format!("mean: {}", format_value(*m));
                    reference(&mut svg, area, y_of(*m), theme::REFERENCE, &label, true);
                }
            }
        }
        for (v, label) in self.references.iter().filter(|(v, _)| v.is_finite()) {
            reference(
                &mut svg,
                area,
                y_of(*v),
                theme::AXIS,
                &format!("{label}: {}", format_value(*v)),
                true,
            );
        }
        axis::draw_x_band(&mut svg, area, &x_layout, self.x_title.as_deref());
        legend::draw_legend(&mut svg, area, &legend);
        Ok(svg.into_figure(self.title.clone()))
    }

    fn means(&self, stacked: bool) -> Vec<Option<f64>> {
        if !self.mean_line {
            return Vec::new();
        }
        let mean = |vals: &mut dyn Iterator<Item = f64>| {
            let (s, c) = vals
                .filter(|v| v.is_finite())
                .fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
            (c > 0).then(|| s / c as f64)
        };
        if stacked {
            let totals = (0..self.categories.len()).map(|c| {
                self.series
                    .iter()
                    .map(|(_, v)| v[c])
                    .filter(|v| v.is_finite())
                    .sum()
            });
            vec![mean(&mut totals.into_iter())]
        } else {
            self.series
                .iter()
                .map(|(_, v)| mean(&mut v.iter().copied()))
                .collect()
        }
    }

    /// (sum of negatives, sum of positives) of category `c`.
    fn stack_extent(&self, c: usize) -> (f64, f64) {
        self.series
            .iter()
            .map(|(_, v)| v[c])
            .filter(|v| v.is_finite())
            .fold((0.0, 0.0), |(neg, pos), v| {
                if v < 0.0 {
                    (neg + v, pos)
                } else {
                    (neg, pos + v)
                }
            })
    }

    fn draw_bars(
        &self,
        svg: &mut Svg,
        area: Area,
        band: f64,
        stacked: bool,
        y_of: &dyn Fn(f64) -> f64,
    ) {
        let k = self.series.len();
        // Leave a gap between categories only when bands are wide enough.
        let inner = if band >= 6.0 { band * 0.8 } else { band };
        let bar_w = if stacked { inner } else { inner / k as f64 };
        let category_name = self.x_title.as_deref().unwrap_or("category");
        for c in 0..self.categories.len() {
            let x0 = area.x + c as f64 * band + (band - inner) / 2.0;
            let (mut neg, mut pos) = (0.0, 0.0);
            let total: f64 = self
                .series
                .iter()
                .map(|(_, v)| v[c])
                .filter(|v| v.is_finite())
                .sum();
            for (s, (name, values)) in self.series.iter().enumerate() {
                let v = values[c];
                if !v.is_finite() {
                    continue;
                }
                let (base, top) = if stacked {
                    let base = if v < 0.0 { neg } else { pos };
                    if v < 0.0 {
                        neg += v;
                    } else {
                        pos += v;
                    }
                    (base, base + v)
                } else {
                    (0.0, v)
                };
                let (y1, y2) = (y_of(base), y_of(top));
                let x = if stacked { x0 } else { x0 + s as f64 * bar_w };
                let mut tip = format!("{category_name} {}", self.categories[c]);
                if k > 1 || !name.is_empty() {
                    tip.push_str(&format!("\n{name}: {}", format_value(v)));
                } else {
                    tip.push_str(&format!("\nvalue: {}", format_value(v)));
                }
                if stacked {
                    tip.push_str(&format!("\ntotal: {}", format_value(total)));
                }
                // A hairline gap between adjacent bars keeps them apart.
                let gap = if bar_w >= 4.0 && (k > 1 || band >= 6.0) {
                    0.5
                } else {
                    0.0
                };
                svg.rect(
                    x + gap,
                    y1.min(y2),
                    bar_w - 2.0 * gap,
                    (y1 - y2).abs(),
                    theme::categorical(s),
                    Some(&tip),
                );
            }
        }
    }
}

/// A dashed horizontal line across `area` at `y` whose tooltip is `label`,
/// also written at its right end when `labelled`.
fn reference(svg: &mut Svg, area: Area, y: f64, color: theme::Rgb, label: &str, labelled: bool) {
    svg.group_with_tooltip(label);
    svg.line(area.x, y, area.right(), y, Stroke::dashed(color, 1.5));
    svg.end_group();
    if labelled {
        svg.text(
            area.right() - 4.0,
            y - theme::TICK_SIZE * 0.75,
            label,
            TextStyle::new(theme::TICK_SIZE)
                .anchor(Anchor::End)
                .color(color)
                .halo(),
        );
    }
}

pub(crate) fn note_with_missing(note: Option<&str>, missing: usize) -> Option<String> {
    let m = (missing > 0).then(|| {
        format!(
            "{missing} NaN or infinite value{} not drawn",
            if missing == 1 { "" } else { "s" }
        )
    });
    match (note, m) {
        (Some(n), Some(m)) => Some(format!("{n} · {m}")),
        (Some(n), None) => Some(n.to_string()),
        (None, m) => m,
    }
}
