//! Charts and rich display: every result shows itself inline.
//!
//! This module knows nothing of the model. It takes plain data (slices,
//! `Vec<Vec<_>>` of `f32` or `f64`, labels as strings) and returns:
//!
//! - a [`Figure`] for charts: an SVG document (crisp, small, with a hover
//!   tooltip on every cell, bar and point) that can also be rasterised to
//!   PNG ([`Figure::to_png`]) and saved by extension ([`Figure::save`]);
//! - a [`Table`] (HTML with a plain-text fallback) and a [`TokenStrip`] (the
//!   text with each token coloured by a value, as HTML);
//! - a [`MimeBundle`] for each of them, which is what a Jupyter kernel sends,
//!   and the `evcxr_display` glue so that any of them shows itself when it
//!   is the last expression of a notebook cell.
//!
//! The charts share one theme ([`theme`]): perceptually uniform colormaps
//! ([`Colormap::Viridis`], [`Colormap::Magma`], and [`Colormap::RdBu`] for
//! signed values), one font (DejaVu Sans, embedded for PNG output so that
//! nothing depends on system fonts) and one set of sizes.
//!
//! | chart | builder | typical use |
//! |---|---|---|
//! | heatmap with colour bar | [`Heatmap`] | routing weights (tokens x experts), expert load (layers x experts) |
//! | bars: single, grouped, stacked | [`BarChart`] | expert load per layer with its mean |
//! | histogram, linear or log counts | [`Histogram`] | activations |
//! | lines, linear or log axes | [`LineChart`] | per-layer statistics, singular-value spectra, loss curves |
//! | one small heatmap per head | [`AttentionGrid`] | attention patterns |
//! | coloured text | [`TokenStrip`] | loss or routing choice per token |
//! | table | [`Table`] | any tabular summary |
//! | anything else, drawn with `plotters` | [`Figure::from_plotters`] | your own charts |
//!
//! Why the built-in views are not drawn with `plotters`: they need a hover
//! tooltip on every mark, colour bars with their scale, and one embedded font
//! for identical SVG and PNG output, none of which plotters offers. For every
//! other chart, plotters is the ecosystem's crate and first-class here:
//! [`Figure::from_plotters`] turns a plotters drawing into a [`Figure`], and
//! the prelude re-exports the `plotters` crate.
//!
//! ```
//! use deepscope::plot::{Colormap, Heatmap};
//!
//! let weights = vec![vec![0.7, 0.2, 0.1], vec![0.1, 0.1, 0.8]];
//! let fig = Heatmap::new(&weights)
//!     .title("Routing weights")
//!     .y_labels(["The", "cat"])
//!     .x_labels(["e0", "e1", "e2"])
//!     .x_title("expert")
//!     .y_title("token")
//!     .colormap(Colormap::Viridis)
//!     .render()?;
//! assert!(fig.to_svg().contains("<title>"));
//! assert_eq!(fig.to_string(), "heatmap 2x3: Routing weights (token x expert)");
//! # Ok::<(), deepscope::plot::PlotError>(())
//! ```

use std::path::PathBuf;

/// The builder setters of the charts, written once: each chart file lists
/// its own with their docs and keeps only what is particular to it. Entries
/// (each ends in `;`, doc comments allowed before it):
/// - `text f;` a caption, `f(impl Into<String>)` sets `Some(..)`: `title`
///   (say what is plotted), `note` (small text under it), `x_title` /
///   `y_title` (what each axis shows), `value_name`;
/// - `pair f(a, b);` two numbers, `f(a: f64, b: f64)` sets `Some((a, b))`:
///   ranges and sizes;
/// - `some f: T;` an optional value, `f(T)` sets `Some(..)`;
/// - `value f: T;` a value with a default, `f(T)` replaces it.
macro_rules! setters {
    ($t:ty { $($body:tt)* }) => {
        impl $t {
            setters!(@munch $($body)*);
        }
    };
    (@munch) => {};
    (@munch $(#[$doc:meta])* text $f:ident; $($rest:tt)*) => {
        $(#[$doc])*
        pub fn $f(mut self, text: impl Into<String>) -> Self {
            self.$f = Some(text.into());
            self
        }
        setters!(@munch $($rest)*);
    };
    (@munch $(#[$doc:meta])* pair $f:ident($a:ident, $b:ident); $($rest:tt)*) => {
        $(#[$doc])*
        pub fn $f(mut self, $a: f64, $b: f64) -> Self {
            self.$f = Some(($a, $b));
            self
        }
        setters!(@munch $($rest)*);
    };
    (@munch $(#[$doc:meta])* some $f:ident: $ty:ty; $($rest:tt)*) => {
        $(#[$doc])*
        pub fn $f(mut self, value: $ty) -> Self {
            self.$f = Some(value);
            self
        }
        setters!(@munch $($rest)*);
    };
    (@munch $(#[$doc:meta])* value $f:ident: $ty:ty; $($rest:tt)*) => {
        $(#[$doc])*
        pub fn $f(mut self, value: $ty) -> Self {
            self.$f = value;
            self
        }
        setters!(@munch $($rest)*);
    };
}

mod axis;
mod legend;
pub(crate) mod svg;

pub mod attention;
pub mod bars;
pub mod figure;
pub mod heatmap;
pub mod histogram;
pub mod lines;
pub mod mime;
pub mod plotters_figure;
pub mod table;
pub mod theme;
pub mod token_strip;

#[cfg(test)]
mod tests;

pub use attention::AttentionGrid;
pub use bars::{BarChart, BarMode};
pub use figure::{DisplayFormat, Figure};
pub use heatmap::Heatmap;
pub use histogram::{Bins, Histogram};
pub use lines::{LineChart, Markers};
pub use mime::{MimeBundle, MimeType};
pub use table::{Cell, Table};
pub use theme::{Colormap, Rgb};
pub use token_strip::{decode_byte_level, readable_token, TokenStrip};

/// Result alias of this module.
pub type Result<T, E = PlotError> = std::result::Result<T, E>;

/// What can go wrong when making a chart. Every variant names the argument
/// or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Two inputs that must have the same length do not.
    #[error("`{what}` has {found} entries, expected {expected} (to match {against})")]
    LengthMismatch {
        what: String,
        expected: usize,
        found: usize,
        against: String,
    },

    /// An input that needs at least one value has none.
    #[error("`{0}` is empty: nothing to plot")]
    Empty(String),

    /// An argument is out of its domain (a negative bin count, a range whose
    /// end is not above its start, ...).
    #[error("`{name}`: {message}")]
    InvalidArgument { name: String, message: String },

    /// The SVG could not be rasterised.
    #[error("cannot render the figure to pixels: {0}")]
    Render(String),

    /// The PNG encoder failed.
    #[error("cannot encode PNG: {0}")]
    Encode(String),

    /// A drawing made with plotters failed (its own error, or plotters').
    #[error("plotters drawing failed: {0}")]
    Plotters(String),

    /// `save` was given a path whose extension is neither `.svg` nor `.png`
    /// (nor `.html`/`.txt` for tables and token strips).
    #[error("cannot save to {path}: unknown extension, expected one of {expected}")]
    UnsupportedExtension { path: PathBuf, expected: String },

    /// Writing a file failed.
    #[error("cannot write {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl PlotError {
    pub(crate) fn length(
        what: impl Into<String>,
        expected: usize,
        found: usize,
        against: impl Into<String>,
    ) -> Self {
        PlotError::LengthMismatch {
            what: what.into(),
            expected,
            found,
            against: against.into(),
        }
    }

    pub(crate) fn invalid(name: impl Into<String>, message: impl Into<String>) -> Self {
        PlotError::InvalidArgument {
            name: name.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        PlotError::Io {
            path: path.into(),
            cause,
        }
    }
}

/// Collects labels from anything that iterates over string-likes
/// (`&[String]`, `Vec<&str>`, `["a", "b"]`, ...).
pub(crate) fn collect_labels<I, S>(labels: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    labels.into_iter().map(Into::into).collect()
}

/// Copies rows of `f32`/`f64` (or anything `Into<f64>`) into `Vec<Vec<f64>>`.
pub(crate) fn collect_rows<R, T>(rows: &[R]) -> Vec<Vec<f64>>
where
    R: AsRef<[T]>,
    T: Copy + Into<f64>,
{
    rows.iter()
        .map(|r| r.as_ref().iter().map(|&v| v.into()).collect())
        .collect()
}
