//! Attention-pattern grid: one small heatmap per head (queries down, keys
//! across), sharing one colour scale, so heads can be compared at a glance.

use super::axis::{self, Area};
use super::figure::{describe, Figure};
use super::heatmap::{color_range, draw_cells, labels_or_index, matrix_shape, CellNames};
use super::legend::ColorBar;
use super::svg::{Anchor, Svg, TextStyle};
use super::theme::{self, Colormap};
use super::{collect_labels, collect_rows, PlotError, Result};

/// Space between panels, px.
const GAP: f64 = 14.0;
/// Height of a panel's "head h" caption, px.
const CAPTION: f64 = 16.0;
/// Most panels in one row.
const MAX_COLUMNS: usize = 8;
/// Above this many cells in all, tooltips are left out unless asked for.
const AUTO_TOOLTIP_CELLS: usize = 65_536;

/// An attention-grid builder. `heads[h][q][k]` is how much query position
/// `q` attends to key position `k` in head `h`.
///
/// ```
/// use deepscope::plot::AttentionGrid;
///
/// // Two heads over three tokens, causal.
/// let heads = vec![
///     vec![vec![1.0, 0.0, 0.0], vec![0.5, 0.5, 0.0], vec![0.2, 0.3, 0.5]],
///     vec![vec![1.0, 0.0, 0.0], vec![0.9, 0.1, 0.0], vec![0.8, 0.1, 0.1]],
/// ];
/// let fig = AttentionGrid::new(&heads)
///     .tokens(["The", "cat", "sat"])
///     .title("Attention, layer 0")
///     .render()?;
/// assert_eq!(fig.to_string(), "attention grid 2 heads x 3x3: Attention, layer 0 (query x key)");
/// # Ok::<(), deepscope::plot::PlotError>(())
/// ```
#[derive(Clone, Debug)]
pub struct AttentionGrid {
    heads: Vec<Vec<Vec<f64>>>,
    tokens: Option<Vec<String>>,
    head_labels: Option<Vec<String>>,
    columns: Option<usize>,
    title: Option<String>,
    note: Option<String>,
    value_name: Option<String>,
    colormap: Colormap,
    range: Option<(f64, f64)>,
    cell_size: Option<f64>,
    tooltips: Option<bool>,
}

setters!(AttentionGrid {
    /// What is plotted, above the chart.
    text title;
    /// A line of small text under the title.
    text note;
    /// What the values are (default "attention"): labels the colour bar and
    /// the tooltips, e.g. "score" for pre-softmax scores.
    text value_name;
    /// Panels per row (default: 4 up to 8 heads, then 8).
    some columns: usize;
    /// The colormap (default viridis).
    value colormap: Colormap;
    /// Fixes the colour range (default: the data's range over all heads;
    /// `range(0.0, 1.0)` for probabilities compares across layers).
    pair range(lo, hi);
    /// Cell size in px (default: panels of about 160 px).
    some cell_size: f64;
    /// Turns the per-cell tooltips on or off (default: on up to 65,536 cells).
    some tooltips: bool;
});

impl AttentionGrid {
    /// A grid of `heads`, each a matrix of queries x keys (`f32` or `f64`).
    pub fn new<H, R, T>(heads: &[H]) -> AttentionGrid
    where
        H: AsRef<[R]>,
        R: AsRef<[T]>,
        T: Copy + Into<f64>,
    {
        AttentionGrid {
            heads: heads.iter().map(|h| collect_rows(h.as_ref())).collect(),
            tokens: None,
            head_labels: None,
            columns: None,
            title: None,
            note: None,
            value_name: None,
            colormap: Colormap::Viridis,
            range: None,
            cell_size: None,
            tooltips: None,
        }
    }

    /// A grid from a row-major buffer `[n_heads, n_queries, n_keys]` (as a
    /// tensor's data comes out).
    pub fn from_flat<T: Copy + Into<f64>>(
        data: &[T],
        n_heads: usize,
        n_queries: usize,
        n_keys: usize,
    ) -> Result<AttentionGrid> {
        let expected = n_heads
            .checked_mul(n_queries)
            .and_then(|v| v.checked_mul(n_keys));
        if expected != Some(data.len()) {
            return Err(PlotError::length(
                "data",
                expected.unwrap_or(usize::MAX),
                data.len(),
                format!("{n_heads} heads x {n_queries} queries x {n_keys} keys"),
            ));
        }
        if n_keys == 0 || n_queries == 0 {
            return Err(PlotError::Empty("data".into()));
        }
        let heads: Vec<Vec<&[T]>> = data
            .chunks(n_queries * n_keys)
            .map(|h| h.chunks(n_keys).collect())
            .collect();
        Ok(AttentionGrid::new(&heads))
    }

    /// The tokens at the key positions. When there are fewer queries than
    /// keys (decoding with a cache), the queries are the last tokens.
    pub fn tokens<I: IntoIterator<Item = S>, S: Into<String>>(mut self, tokens: I) -> Self {
        self.tokens = Some(collect_labels(tokens));
        self
    }

    /// Captions of the panels (default "head 0", "head 1", ...).
    pub fn head_labels<I: IntoIterator<Item = S>, S: Into<String>>(mut self, labels: I) -> Self {
        self.head_labels = Some(collect_labels(labels));
        self
    }

    /// Draws the grid.
    pub fn render(&self) -> Result<Figure> {
        let n_heads = self.heads.len();
        if n_heads == 0 {
            return Err(PlotError::Empty("heads".into()));
        }
        let (nq, nk) = matrix_shape(&self.heads[0], "heads[0]")?;
        for (h, head) in self.heads.iter().enumerate() {
            let name = format!("heads[{h}]");
            let (q, k) = matrix_shape(head, &name)?;
            if q != nq {
                return Err(PlotError::length(name, nq, q, "the queries of heads[0]"));
            }
            if k != nk {
                return Err(PlotError::length(
                    format!("{name}[0]"),
                    nk,
                    k,
                    "the keys of heads[0]",
                ));
            }
        }
        let key_labels = labels_or_index(&self.tokens, nk, "tokens", "key positions")?;
        if nq > nk {
            return Err(PlotError::invalid(
                "heads",
                format!("{nq} queries but only {nk} keys"),
            ));
        }
        let query_labels: Vec<String> = key_labels[nk - nq..].to_vec();
        let captions = match &self.head_labels {
            Some(l) if l.len() != n_heads => {
                return Err(PlotError::length("head_labels", n_heads, l.len(), "heads"))
            }
            Some(l) => l.clone(),
            None => (0..n_heads).map(|h| format!("head {h}")).collect(),
        };
        let columns = match self.columns {
            Some(0) => return Err(PlotError::invalid("columns", "must be at least 1")),
            Some(c) => c.min(n_heads),
            // 4 columns up to 8 heads (2 rows), then 8 (16 heads in 2 rows).
            None if n_heads <= 4 => n_heads,
            None if n_heads <= 8 => 4,
            None => MAX_COLUMNS,
        };
        let rows = n_heads.div_ceil(columns);
        let cell = match self.cell_size {
            Some(c) if !(c.is_finite() && c > 0.0) => {
                return Err(PlotError::invalid(
                    "cell_size",
                    format!("must be positive, got {c}"),
                ))
            }
            Some(c) => c,
            None => (160.0 / nk.max(nq) as f64).clamp(1.0, 10.0),
        };
        let (lo, hi) = color_range(
            self.heads.iter().flatten().flatten(),
            self.colormap,
            self.range,
        )?;

        let (pw, ph) = (cell * nk as f64, cell * nq as f64);
        let x_layout = axis::layout_x_band(&key_labels, cell);
        let y_layout = axis::layout_y_band(&query_labels, cell);
        let bar = ColorBar {
            cmap: self.colormap,
            lo,
            hi,
            label: Some(self.value_name.as_deref().unwrap_or("attention")),
        };
        let missing = self
            .heads
            .iter()
            .flatten()
            .flatten()
            .filter(|v| !v.is_finite())
            .count();
        let subtitle = match (self.note.clone(), missing) {
            (n, 0) => n,
            (None, m) => Some(format!("grey: {m} NaN or infinite values")),
            (Some(n), m) => Some(format!("{n} · grey: {m} NaN or infinite values")),
        };
        let title = self.title.as_deref();
        let top = theme::PAD + axis::title_height(title, subtitle.as_deref());
        let left = theme::PAD
            + axis::left_margin(y_layout.extent, Some("query")).max(x_layout.left_overhang(cell));
        // When the last row is not full, the panels above its gaps carry
        // key labels too, and need room for them.
        let ragged = !n_heads.is_multiple_of(columns);
        let row_gap = GAP
            + if rows > 1 && ragged {
                x_layout.extent + 8.0
            } else {
                0.0
            };
        let grid = Area {
            x: left,
            y: top,
            w: columns as f64 * pw + (columns - 1) as f64 * GAP,
            h: rows as f64 * (CAPTION + ph) + (rows - 1) as f64 * row_gap,
        };
        let width = (grid.right() + bar.width() + theme::PAD)
            .max(2.0 * theme::PAD + axis::title_width(title, subtitle.as_deref()))
            .ceil();
        let height =
            (grid.bottom() + axis::bottom_margin(x_layout.extent, Some("key")) + theme::PAD)
                .max(top + 60.0 + theme::PAD)
                .ceil();

        let description = describe(
            "attention grid",
            Some(format!("{n_heads} heads x {nq}x{nk}")),
            title,
            Some("query x key".into()),
        );
        let mut svg = Svg::new(width, height, &description);
        axis::draw_title(&mut svg, title, subtitle.as_deref());
        let tooltips = self
            .tooltips
            .unwrap_or(n_heads * nq * nk <= AUTO_TOOLTIP_CELLS);
        for (h, head) in self.heads.iter().enumerate() {
            let (r, c) = (h / columns, h % columns);
            let area = Area {
                x: grid.x + c as f64 * (pw + GAP),
                y: grid.y + r as f64 * (CAPTION + ph + row_gap) + CAPTION,
                w: pw,
                h: ph,
            };
            svg.text(
                area.x + pw / 2.0,
                area.y - CAPTION / 2.0,
                &captions[h],
                TextStyle::new(theme::TICK_SIZE).anchor(Anchor::Middle),
            );
            let names = CellNames {
                row: "query",
                col: "key",
                value: self.value_name.as_deref().unwrap_or("attention"),
                row_labels: Some(&query_labels),
                col_labels: Some(&key_labels),
                prefix: Some(&captions[h]),
            };
            draw_cells(
                &mut svg,
                area,
                head,
                self.colormap,
                (lo, hi),
                tooltips.then_some(&names),
                false,
            );
            svg.rect_outline(area.x, area.y, area.w, area.h, theme::AXIS, 0.6);
            if c == 0 {
                axis::draw_y_band(&mut svg, area, &y_layout, None);
            }
            if h + columns >= n_heads {
                axis::draw_x_band(&mut svg, area, &x_layout, None);
            }
        }
        let last_row = Area {
            y: grid.bottom() - ph,
            h: ph,
            ..grid
        };
        axis::draw_x_title(&mut svg, last_row, x_layout.extent, "key");
        axis::draw_y_title(&mut svg, grid, y_layout.extent, "query");
        bar.draw(
            &mut svg,
            Area {
                y: grid.y + CAPTION,
                h: grid.h - CAPTION,
                ..grid
            },
        );
        Ok(svg.into_figure(self.title.clone()))
    }
}
