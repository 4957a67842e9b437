//! Tables: HTML for notebooks, aligned plain text everywhere else.

use std::fmt::{self, Write as _};
use std::path::Path;

use super::figure::{extension, write};
use super::mime::{MimeBundle, MimeType};
use super::svg::escape;
use super::theme::{self, format_value};
use super::{PlotError, Result};

/// Rows shown before "… N more rows" (change with [`Table::max_rows`]).
const DEFAULT_MAX_ROWS: usize = 200;

/// One table cell: its text and, for numbers, the value (numbers are
/// right-aligned).
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    text: String,
    value: Option<f64>,
}

impl Cell {
    /// A number written with exactly `decimals` decimals.
    pub fn number(value: f64, decimals: usize) -> Cell {
        let text = if value.is_finite() {
            format!("{value:.decimals$}")
        } else {
            format_value(value)
        };
        Cell {
            text,
            value: Some(value),
        }
    }

    /// A text cell.
    pub fn text(text: impl Into<String>) -> Cell {
        Cell {
            text: text.into(),
            value: None,
        }
    }

    /// What the cell says.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The number, for numeric cells.
    pub fn value(&self) -> Option<f64> {
        self.value
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::text(s)
    }
}
impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::text(s)
    }
}
impl From<&String> for Cell {
    fn from(s: &String) -> Cell {
        Cell::text(s.clone())
    }
}
impl From<f64> for Cell {
    fn from(v: f64) -> Cell {
        Cell {
            text: format_value(v),
            value: Some(v),
        }
    }
}
impl From<f32> for Cell {
    fn from(v: f32) -> Cell {
        Cell::from(f64::from(v))
    }
}
macro_rules! cell_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Cell {
            fn from(v: $t) -> Cell {
                Cell { text: v.to_string(), value: Some(v as f64) }
            }
        }
    )*};
}
cell_from_int!(i32, i64, u32, u64, usize);
impl From<bool> for Cell {
    fn from(v: bool) -> Cell {
        Cell::text(if v { "yes" } else { "no" })
    }
}

/// A table with a header row and an optional caption.
///
/// ```
/// use deepscope::plot::Table;
///
/// let mut table = Table::new(["layer", "experts", "max load"]).caption("Expert load");
/// table.add_row([1.into(), 64.into(), 0.031.into()])?;
/// table.add_row([2.into(), 64.into(), 0.125.into()])?;
/// assert!(table.to_html().contains("<th"));
/// assert_eq!(table.to_string().lines().nth(4).unwrap(), "    2       64     0.125");
/// # Ok::<(), deepscope::plot::PlotError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<Cell>>,
    caption: Option<String>,
    max_rows: Option<usize>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(headers: I) -> Table {
        Table {
            headers: super::collect_labels(headers),
            ..Table::default()
        }
    }

    /// A table from headers and rows, each row one cell per header.
    pub fn from_rows<I, S, R, C>(headers: I, rows: R) -> Result<Table>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
        R: IntoIterator,
        R::Item: IntoIterator<Item = C>,
        C: Into<Cell>,
    {
        let mut table = Table::new(headers);
        if table.headers.is_empty() {
            return Err(PlotError::Empty("headers".into()));
        }
        for row in rows {
            table.add_row(row.into_iter().map(Into::into))?;
        }
        Ok(table)
    }

    /// Appends a row; it must have one cell per header. Write mixed rows as
    /// `[name.into(), count.into(), share.into()]`.
    pub fn add_row<R: IntoIterator<Item = Cell>>(&mut self, cells: R) -> Result<&mut Self> {
        let row: Vec<Cell> = cells.into_iter().collect();
        if row.len() != self.headers.len() {
            return Err(PlotError::length(
                format!("row {}", self.rows.len()),
                self.headers.len(),
                row.len(),
                "headers",
            ));
        }
        self.rows.push(row);
        Ok(self)
    }

    /// A caption shown above the table.
    pub fn caption(mut self, caption: impl Into<String>) -> Self {
        self.caption = Some(caption.into());
        self
    }

    /// Shows at most `n` rows, then "… N more rows" (default 200).
    pub fn max_rows(mut self, n: usize) -> Self {
        self.max_rows = Some(n);
        self
    }

    pub fn headers(&self) -> &[String] {
        &self.headers
    }

    pub fn rows(&self) -> &[Vec<Cell>] {
        &self.rows
    }

    fn shown_rows(&self) -> (&[Vec<Cell>], usize) {
        let n = self
            .max_rows
            .unwrap_or(DEFAULT_MAX_ROWS)
            .min(self.rows.len());
        (&self.rows[..n], self.rows.len() - n)
    }

    /// Whether column `j` holds only numbers (right-aligned).
    fn numeric_column(&self, j: usize) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r[j].value.is_some())
    }

    /// The table as HTML with inline styles (they cannot leak into the page).
    pub fn to_html(&self) -> String {
        let mut html = String::new();
        let _ = write!(
            html,
            "<table style=\"border-collapse:collapse;font-family:{};font-size:13px;color:{};font-variant-numeric:tabular-nums\">",
            theme::FONT_FAMILY,
            theme::TEXT
        );
        if let Some(c) = &self.caption {
            let _ = write!(
                html,
                "<caption style=\"caption-side:top;text-align:left;font-size:14px;padding:0 0 6px 0\">{}</caption>",
                escape(c)
            );
        }
        let align = |j: usize| {
            if self.numeric_column(j) {
                "right"
            } else {
                "left"
            }
        };
        html.push_str("<thead><tr>");
        for (j, h) in self.headers.iter().enumerate() {
            let _ = write!(
                html,
                "<th style=\"text-align:{};padding:4px 10px;border-bottom:1px solid #555555;font-weight:600\">{}</th>",
                align(j),
                escape(h)
            );
        }
        html.push_str("</tr></thead><tbody>");
        let (rows, hidden) = self.shown_rows();
        for (i, row) in rows.iter().enumerate() {
            let bg = if i % 2 == 1 {
                "background:#f6f6f6;"
            } else {
                ""
            };
            let _ = write!(html, "<tr style=\"{bg}\">");
            for (j, cell) in row.iter().enumerate() {
                let _ = write!(
                    html,
                    "<td style=\"text-align:{};padding:3px 10px\">{}</td>",
                    align(j),
                    escape(&cell.text)
                );
            }
            html.push_str("</tr>");
        }
        if hidden > 0 {
            let _ = write!(
                html,
                "<tr><td colspan=\"{}\" style=\"padding:3px 10px;color:#5f5f5f\">… {hidden} more row{}</td></tr>",
                self.headers.len().max(1),
                if hidden == 1 { "" } else { "s" }
            );
        }
        html.push_str("</tbody></table>");
        html
    }

    /// The MIME bundle: text/plain and text/html.
    pub fn mime_bundle(&self) -> MimeBundle {
        let mut b = MimeBundle::new();
        b.insert(MimeType::TextPlain, self.to_string());
        b.insert(MimeType::TextHtml, self.to_html());
        b
    }

    /// Shows the table as the last expression of a notebook cell.
    pub fn evcxr_display(&self) {
        self.mime_bundle().evcxr_display();
    }

    /// Writes `.html` or `.txt` by extension.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        match extension(path).as_deref() {
            Some("html") | Some("htm") => write(path, self.to_html().as_bytes()),
            Some("txt") => write(path, self.to_string().as_bytes()),
            _ => Err(PlotError::UnsupportedExtension {
                path: path.to_path_buf(),
                expected: ".html, .txt".into(),
            }),
        }
    }
}

/// Columns in a monospace font: caption, headers, a rule, the rows.
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = &self.caption {
            writeln!(f, "{c}")?;
        }
        let (rows, hidden) = self.shown_rows();
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|j| {
                rows.iter()
                    .map(|r| display_width(&r[j].text))
                    .chain(std::iter::once(display_width(&self.headers[j])))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| -> String {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(j, text)| pad(text, widths[j], self.numeric_column(j)))
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        writeln!(
            f,
            "{}",
            line(self.headers.iter().map(String::as_str).collect())
        )?;
        let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        write!(f, "{}", rule.join("  "))?;
        for row in rows {
            write!(f, "\n{}", line(row.iter().map(Cell::as_str).collect()))?;
        }
        if hidden > 0 {
            write!(
                f,
                "\n… {hidden} more row{}",
                if hidden == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}

/// Columns a string takes in a terminal: two for wide (CJK) characters.
fn display_width(s: &str) -> usize {
    s.chars()
        .map(|c| if theme::is_wide(c as u32) { 2 } else { 1 })
        .sum()
}

fn pad(text: &str, width: usize, right: bool) -> String {
    let fill = " ".repeat(width.saturating_sub(display_width(text)));
    if right {
        format!("{fill}{text}")
    } else {
        format!("{text}{fill}")
    }
}
