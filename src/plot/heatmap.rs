//! Heatmap: a matrix as coloured cells with labelled axes and a colour bar.
//!
//! For routing weights (tokens x experts), expert load (layers x experts),
//! attention of one head (queries x keys), or any matrix up to a few hundred
//! cells per axis: labels are thinned and rotated to stay readable, and
//! every cell's tooltip gives its row, column and exact value.

use super::axis::{self, Area};
use super::figure::{describe, Figure};
use super::legend::ColorBar;
use super::svg::{Anchor, Svg, TextStyle};
use super::theme::{self, format_value, Colormap};
use super::{collect_labels, collect_rows, PlotError, Result};

/// Above this many cells, tooltips are left out unless asked for: each one
/// costs about 80 bytes of SVG (20,000 cells: about 3 MB in all).
const AUTO_TOOLTIP_CELLS: usize = 20_000;

/// A heatmap builder. Rows go top to bottom, columns left to right.
///
/// ```
/// use deepscope::plot::Heatmap;
///
/// // Expert load per layer: 2 layers x 4 experts.
/// let load = vec![vec![0.30f32, 0.20, 0.25, 0.25], vec![0.10, 0.40, 0.30, 0.20]];
/// let fig = Heatmap::new(&load)
///     .title("Expert load")
///     .y_title("layer")
///     .x_title("expert")
///     .value_name("share of tokens")
///     .render()?;
/// assert!(fig.to_svg().contains("share of tokens: 0.4"));
/// # Ok::<(), deepscope::plot::PlotError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Heatmap {
    values: Vec<Vec<f64>>,
    x_labels: Option<Vec<String>>,
    y_labels: Option<Vec<String>>,
    title: Option<String>,
    note: Option<String>,
    x_title: Option<String>,
    y_title: Option<String>,
    value_name: Option<String>,
    colormap: Colormap,
    range: Option<(f64, f64)>,
    show_values: bool,
    cell_size: Option<(f64, f64)>,
    tooltips: Option<bool>,
}

setters!(Heatmap {
    /// What is plotted, above the chart.
    text title;
    /// A line of small text under the title.
    text note;
    /// What the x axis shows.
    text x_title;
    /// What the y axis shows.
    text y_title;
    /// What the values are, e.g. "routing weight": labels the colour bar
    /// and the tooltips.
    text value_name;
    /// The colormap; a diverging one ([`Colormap::RdBu`]) centres on zero.
    value colormap: Colormap;
    /// Fixes the value range of the colours (values beyond are clamped).
    /// By default it is the data's finite range, symmetric about zero for a
    /// diverging colormap.
    pair range(lo, hi);
    /// Writes each value in its cell (for small matrices).
    value show_values: bool;
    /// Fixes the cell size in px instead of fitting the matrix to about
    /// 720 x 520 px.
    pair cell_size(width, height);
    /// Turns the per-cell tooltips on or off. By default they are on up to
    /// 20,000 cells.
    some tooltips: bool;
});

impl Heatmap {
    /// A heatmap of `rows` (each row one slice of `f32` or `f64`).
    pub fn new<R, T>(rows: &[R]) -> Heatmap
    where
        R: AsRef<[T]>,
        T: Copy + Into<f64>,
    {
        Heatmap {
            values: collect_rows(rows),
            x_labels: None,
            y_labels: None,
            title: None,
            note: None,
            x_title: None,
            y_title: None,
            value_name: None,
            colormap: Colormap::Viridis,
            range: None,
            show_values: false,
            cell_size: None,
            tooltips: None,
        }
    }

    /// A heatmap of a row-major buffer of `n_rows * n_cols` values (as a
    /// tensor's data comes out).
    pub fn from_flat<T: Copy + Into<f64>>(
        data: &[T],
        n_rows: usize,
        n_cols: usize,
    ) -> Result<Heatmap> {
        if n_rows.checked_mul(n_cols) != Some(data.len()) {
            return Err(PlotError::length(
                "data",
                n_rows.saturating_mul(n_cols),
                data.len(),
                format!("{n_rows} rows x {n_cols} columns"),
            ));
        }
        if n_cols == 0 {
            return Err(PlotError::Empty("data".into()));
        }
        let rows: Vec<&[T]> = data.chunks(n_cols).collect();
        Ok(Heatmap::new(&rows))
    }

    /// Labels of the columns (one per column).
    pub fn x_labels<I: IntoIterator<Item = S>, S: Into<String>>(mut self, labels: I) -> Self {
        self.x_labels = Some(collect_labels(labels));
        self
    }

    /// Labels of the rows (one per row).
    pub fn y_labels<I: IntoIterator<Item = S>, S: Into<String>>(mut self, labels: I) -> Self {
        self.y_labels = Some(collect_labels(labels));
        self
    }

    /// Draws the heatmap.
    pub fn render(&self) -> Result<Figure> {
        let (n_rows, n_cols) = matrix_shape(&self.values, "values")?;
        let x_labels = labels_or_index(&self.x_labels, n_cols, "x_labels", "columns of `values`")?;
        let y_labels = labels_or_index(&self.y_labels, n_rows, "y_labels", "rows of `values`")?;
        if let Some((w, h)) = self.cell_size {
            if !(w.is_finite() && h.is_finite() && w > 0.0 && h > 0.0) {
                return Err(PlotError::invalid(
                    "cell_size",
                    format!("must be positive, got {w} x {h}"),
                ));
            }
        }
        let (lo, hi) = color_range(self.values.iter().flatten(), self.colormap, self.range)?;

        let (cw, ch) = self.cell_size.unwrap_or_else(|| fit_cells(n_rows, n_cols));
        let x_layout = axis::layout_x_band(&x_labels, cw);
        let y_layout = axis::layout_y_band(&y_labels, ch);
        let bar = ColorBar {
            cmap: self.colormap,
            lo,
            hi,
            label: self.value_name.as_deref(),
        };
        let missing = self
            .values
            .iter()
            .flatten()
            .filter(|v| !v.is_finite())
            .count();
        let subtitle = subtitle(self.note.as_deref(), missing);

        let title = self.title.as_deref();
        let top = theme::PAD + axis::title_height(title, subtitle.as_deref());
        let left = theme::PAD
            + axis::left_margin(y_layout.extent, self.y_title.as_deref())
                .max(x_layout.left_overhang(cw));
        let area = Area {
            x: left,
            y: top,
            w: cw * n_cols as f64,
            h: ch * n_rows as f64,
        };
        let right = bar.width().max(x_layout.right_overhang(cw)) + theme::PAD;
        let bottom = axis::bottom_margin(x_layout.extent, self.x_title.as_deref()) + theme::PAD;
        let width = (area.right() + right)
            .max(2.0 * theme::PAD + axis::title_width(title, subtitle.as_deref()))
            .ceil();
        let height = (area.bottom() + bottom).max(top + 60.0 + theme::PAD).ceil();

        let description = describe(
            "heatmap",
            Some(format!("{n_rows}x{n_cols}")),
            title,
            axes_phrase(self.y_title.as_deref(), self.x_title.as_deref()),
        );
        let mut svg = Svg::new(width, height, &description);
        axis::draw_title(&mut svg, title, subtitle.as_deref());
        let tooltips = self
            .tooltips
            .unwrap_or(n_rows * n_cols <= AUTO_TOOLTIP_CELLS);
        let names = CellNames {
            row: self.y_title.as_deref().unwrap_or("row"),
            col: self.x_title.as_deref().unwrap_or("column"),
            value: self.value_name.as_deref().unwrap_or("value"),
            row_labels: self.y_labels.as_deref(),
            col_labels: self.x_labels.as_deref(),
            prefix: None,
        };
        draw_cells(
            &mut svg,
            area,
            &self.values,
            self.colormap,
            (lo, hi),
            tooltips.then_some(&names),
            self.show_values,
        );
        axis::draw_x_band(&mut svg, area, &x_layout, self.x_title.as_deref());
        axis::draw_y_band(&mut svg, area, &y_layout, self.y_title.as_deref());
        bar.draw(&mut svg, area);
        Ok(svg.into_figure(self.title.clone()))
    }
}

/// Fits the cells of an `n_rows x n_cols` matrix to about 720 x 520 px,
/// keeping them within 2.5:1 of square and at most 36 x 28 px.
fn fit_cells(n_rows: usize, n_cols: usize) -> (f64, f64) {
    let mut cw = (720.0 / n_cols as f64).min(36.0);
    let mut ch = (520.0 / n_rows as f64).min(28.0);
    if cw > 2.5 * ch {
        cw = 2.5 * ch;
    }
    if ch > 2.5 * cw {
        ch = 2.5 * cw;
    }
    (cw.max(1.0), ch.max(1.0))
}

/// Checks that `values` is a non-empty rectangle; returns (rows, columns).
pub(crate) fn matrix_shape(values: &[Vec<f64>], name: &str) -> Result<(usize, usize)> {
    let n_rows = values.len();
    let n_cols = values.first().map_or(0, Vec::len);
    if n_rows == 0 || n_cols == 0 {
        return Err(PlotError::Empty(name.to_string()));
    }
    if let Some((i, row)) = values.iter().enumerate().find(|(_, r)| r.len() != n_cols) {
        return Err(PlotError::length(
            format!("{name}[{i}]"),
            n_cols,
            row.len(),
            format!("{name}[0]"),
        ));
    }
    Ok((n_rows, n_cols))
}

/// The given labels (checked against `n`) or "0".."n-1".
pub(crate) fn labels_or_index(
    labels: &Option<Vec<String>>,
    n: usize,
    name: &str,
    against: &str,
) -> Result<Vec<String>> {
    match labels {
        Some(l) if l.len() != n => Err(PlotError::length(name, n, l.len(), against)),
        Some(l) => Ok(l.clone()),
        None => Ok((0..n).map(|i| i.to_string()).collect()),
    }
}

/// The colour range: `range` when given (checked), else the finite range
/// of the values, made symmetric about zero for a diverging map.
pub(crate) fn color_range<'a>(
    values: impl IntoIterator<Item = &'a f64>,
    cmap: Colormap,
    range: Option<(f64, f64)>,
) -> Result<(f64, f64)> {
    if let Some((lo, hi)) = range {
        if !(lo.is_finite() && hi.is_finite() && hi > lo) {
            return Err(PlotError::invalid(
                "range",
                format!("needs finite lo < hi, got ({lo}, {hi})"),
            ));
        }
        return Ok((lo, hi));
    }
    let (lo, hi) = axis::finite_range(values).unwrap_or((0.0, 1.0));
    if cmap.is_diverging() {
        let m = lo.abs().max(hi.abs());
        let m = if m > 0.0 { m } else { 1.0 };
        return Ok((-m, m));
    }
    Ok(axis::Scale::linear(lo, hi).bounds())
}

fn subtitle(note: Option<&str>, missing: usize) -> Option<String> {
    let missing = (missing > 0).then(|| {
        format!(
            "grey: {missing} NaN or infinite value{}",
            if missing == 1 { "" } else { "s" }
        )
    });
    match (note, missing) {
        (Some(n), Some(m)) => Some(format!("{n} · {m}")),
        (Some(n), None) => Some(n.to_string()),
        (None, m) => m,
    }
}

/// "token x expert" from the axis titles.
pub(crate) fn axes_phrase(rows: Option<&str>, cols: Option<&str>) -> Option<String> {
    match (rows, cols) {
        (Some(r), Some(c)) => Some(format!("{r} x {c}")),
        (Some(r), None) => Some(format!("{r} x column")),
        (None, Some(c)) => Some(format!("row x {c}")),
        (None, None) => None,
    }
}

/// What a cell's tooltip calls its row, column and value.
pub(crate) struct CellNames<'a> {
    pub row: &'a str,
    pub col: &'a str,
    pub value: &'a str,
    pub row_labels: Option<&'a [String]>,
    pub col_labels: Option<&'a [String]>,
    /// A first line, such as "head 3".
    pub prefix: Option<&'a str>,
}

impl CellNames<'_> {
    fn tooltip(&self, i: usize, j: usize, v: f64) -> String {
        let mut s = String::new();
        if let Some(p) = self.prefix {
            s.push_str(p);
            s.push('\n');
        }
        push_axis_line(&mut s, self.row, i, self.row_labels);
        s.push('\n');
        push_axis_line(&mut s, self.col, j, self.col_labels);
        s.push('\n');
        s.push_str(self.value);
        s.push_str(": ");
        s.push_str(&describe_value(v));
        s
    }
}

fn push_axis_line(s: &mut String, name: &str, i: usize, labels: Option<&[String]>) {
    s.push_str(name);
    s.push(' ');
    s.push_str(&i.to_string());
    if let Some(label) = labels.and_then(|l| l.get(i)) {
        s.push_str(": ");
        s.push_str(label);
    }
}

/// A value for a tooltip, saying so when it is not a number.
pub(crate) fn describe_value(v: f64) -> String {
    if v.is_nan() {
        "NaN (not a number)".into()
    } else if v.is_infinite() {
        format!("{} (infinite)", format_value(v))
    } else {
        format_value(v)
    }
}

/// Draws the cells of `values` in `area`, colour from `cmap` over `range`,
/// grey for non-finite values; with tooltips when `names` is given.
pub(crate) fn draw_cells(
    svg: &mut Svg,
    area: Area,
    values: &[Vec<f64>],
    cmap: Colormap,
    range: (f64, f64),
    names: Option<&CellNames<'_>>,
    show_values: bool,
) {
    let n_rows = values.len();
    let n_cols = values.first().map_or(0, Vec::len);
    let cw = area.w / n_cols.max(1) as f64;
    let ch = area.h / n_rows.max(1) as f64;
    let (lo, hi) = range;
    svg.group("shape-rendering=\"crispEdges\"");
    for (i, row) in values.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let fill = if v.is_finite() {
                cmap.at((v - lo) / (hi - lo))
            } else {
                theme::MISSING
            };
            let tooltip = names.map(|n| n.tooltip(i, j, v));
            svg.rect(
                area.x + j as f64 * cw,
                area.y + i as f64 * ch,
                cw,
                ch,
                fill,
                tooltip.as_deref(),
            );
        }
    }
    svg.end_group();
    if show_values {
        let size = theme::CELL_TEXT_SIZE.min(ch * 0.7);
        for (i, row) in values.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let fill = if v.is_finite() {
                    cmap.at((v - lo) / (hi - lo))
                } else {
                    theme::MISSING
                };
                let text = short_value(v);
                if theme::text_width(&text, size) > cw - 2.0 {
                    continue;
                }
                svg.text(
                    area.x + (j as f64 + 0.5) * cw,
                    area.y + (i as f64 + 0.5) * ch,
                    &text,
                    TextStyle::new(size)
                        .anchor(Anchor::Middle)
                        .color(fill.text_on()),
                );
            }
        }
    }
}

/// A value in three significant digits, for writing inside a cell.
fn short_value(v: f64) -> String {
    if !v.is_finite() {
        return format_value(v);
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (0.01..1000.0).contains(&a) {
        let decimals = (2 - a.log10().floor() as i32).clamp(0, 3) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v:.1e}")
    }
}
