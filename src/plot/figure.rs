//! A rendered chart: an SVG document with its size and a one-line
//! description, convertible to PNG and savable by extension.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use resvg::{tiny_skia, usvg};

use super::mime::{MimeBundle, MimeType};
use super::theme;
use super::{PlotError, Result};

/// How a figure shows itself in a notebook.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DisplayFormat {
    /// Inline SVG (hover tooltips work) plus `image/svg+xml`.
    Svg,
    /// A PNG at `scale` times the figure's size in px.
    Png { scale: f32 },
}

/// A chart, rendered. Made by the chart builders ([`super::Heatmap`],
/// [`super::BarChart`], ...).
///
/// - [`Figure::to_svg`] is the document; each data mark carries a `<title>`
///   tooltip with its exact value and labels.
/// - [`Figure::to_png`] rasterises it with `resvg` using the embedded font,
///   so the PNG looks the same as the SVG on any machine.
/// - [`Figure::save`] writes `.svg` or `.png` by extension.
/// - In a notebook, a figure as the last expression of a cell shows itself
///   ([`Figure::evcxr_display`]); [`Figure::as_png`] switches that to PNG.
#[derive(Clone, Debug)]
pub struct Figure {
    svg: String,
    width: f64,
    height: f64,
    description: String,
    title: Option<String>,
    format: DisplayFormat,
}

impl Figure {
    /// Wraps an SVG document of `width` x `height` px. `description` is the
    /// one-line text face, such as "heatmap 12x16: routing weights".
    pub fn from_svg(
        svg: String,
        width: f64,
        height: f64,
        description: impl Into<String>,
        title: Option<String>,
    ) -> Figure {
        Figure {
            svg,
            width,
            height,
            description: description.into(),
            title,
            format: DisplayFormat::Svg,
        }
    }

    /// The SVG document.
    pub fn to_svg(&self) -> &str {
        &self.svg
    }

    /// Width in px (CSS pixels; the PNG at scale 1 has this many columns).
    pub fn width(&self) -> f64 {
        self.width
    }

    /// Height in px.
    pub fn height(&self) -> f64 {
        self.height
    }

    /// The title, when the chart was given one.
    pub fn title(&self) -> Option<&str> {
        self.title.as_deref()
    }

    /// The one-line description (also the `Display` form).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// This figure, shown in notebooks as a PNG at `scale` times its size
    /// (2.0 is sharp on high-density screens) instead of SVG.
    pub fn as_png(mut self, scale: f32) -> Figure {
        self.format = DisplayFormat::Png { scale };
        self
    }

    /// How the figure shows itself in a notebook.
    pub fn display_format(&self) -> DisplayFormat {
        self.format
    }

    /// Rasterises the figure to PNG bytes at `scale` times its size.
    /// Text is set in the embedded DejaVu Sans: no system font is needed.
    pub fn to_png(&self, scale: f32) -> Result<Vec<u8>> {
        if !(scale.is_finite() && scale > 0.0 && scale <= 16.0) {
            return Err(PlotError::invalid(
                "scale",
                format!("must be in (0, 16], got {scale}"),
            ));
        }
        let mut fontdb = usvg::fontdb::Database::new();
        fontdb.load_font_source(usvg::fontdb::Source::Binary(Arc::new(theme::EMBEDDED_FONT)));
        fontdb.set_sans_serif_family(theme::EMBEDDED_FAMILY);
        let options = usvg::Options {
            font_family: theme::EMBEDDED_FAMILY.to_string(),
            fontdb: Arc::new(fontdb),
            ..usvg::Options::default()
        };
        let tree = usvg::Tree::from_str(&self.svg, &options)
            .map_err(|e| PlotError::Render(e.to_string()))?;
        let size = tree.size();
        let w = (size.width() * scale).ceil() as u32;
        let h = (size.height() * scale).ceil() as u32;
        let mut pixmap = tiny_skia::Pixmap::new(w.max(1), h.max(1))
            .ok_or_else(|| PlotError::Render(format!("cannot allocate a {w}x{h} pixel image")))?;
        pixmap.fill(tiny_skia::Color::WHITE);
        resvg::render(
            &tree,
            tiny_skia::Transform::from_scale(scale, scale),
            &mut pixmap.as_mut(),
        );
        pixmap
            .encode_png()
            .map_err(|e| PlotError::Encode(e.to_string()))
    }

    /// Writes the figure to `path`: SVG for `.svg`, PNG at scale 2 for
    /// `.png` (use [`Figure::save_png`] to choose the scale).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        match extension(path).as_deref() {
            Some("svg") => write(path, self.svg.as_bytes()),
            Some("png") => self.save_png(path, 2.0),
            _ => Err(PlotError::UnsupportedExtension {
                path: path.to_path_buf(),
                expected: ".svg, .png".into(),
            }),
        }
    }

    /// Writes a PNG at `scale` times the figure's size.
    pub fn save_png(&self, path: impl AsRef<Path>, scale: f32) -> Result<()> {
        let png = self.to_png(scale)?;
        write(path.as_ref(), &png)
    }

    /// The figure as `<div>` HTML: the SVG inline, so tooltips work in
    /// JupyterLab (which shows `image/svg+xml` through an `<img>`).
    pub fn to_html(&self) -> String {
        // a figure made with `as_png` (a large heatmap, whose SVG would be
        // megabytes) is embedded as an image; the SVG if encoding fails
        if let DisplayFormat::Png { scale } = self.format {
            if let Ok(png) = self.to_png(scale) {
                return format!(
                    "<div style=\"max-width:100%;overflow-x:auto\"><img width=\"{:.0}\" height=\"{:.0}\" alt=\"{}\" src=\"data:image/png;base64,{}\"/></div>",
                    self.width,
                    self.height,
                    crate::plot::svg::escape(self.title().unwrap_or("chart")),
                    base64::engine::general_purpose::STANDARD.encode(png)
                );
            }
        }
        format!(
            "<div style=\"max-width:100%;overflow-x:auto\">{}</div>",
            self.svg.trim_end()
        )
    }

    /// The MIME bundle a kernel sends: `text/plain` always; then
    /// `text/html` (inline SVG) and `image/svg+xml`, or `image/png` (base64)
    /// for a figure made with [`Figure::as_png`]. Should PNG encoding fail,
    /// the SVG is sent instead and the text says why.
    pub fn mime_bundle(&self) -> MimeBundle {
        let mut bundle = MimeBundle::new();
        if let DisplayFormat::Png { scale } = self.format {
            match self.to_png(scale) {
                Ok(png) => {
                    bundle.insert(MimeType::TextPlain, self.description.clone());
                    bundle.insert(
                        MimeType::ImagePng,
                        base64::engine::general_purpose::STANDARD.encode(png),
                    );
                    return bundle;
                }
                Err(e) => {
                    bundle.insert(
                        MimeType::TextPlain,
                        format!("{} ({e}; showing SVG)", self.description),
                    );
                }
            }
        } else {
            bundle.insert(MimeType::TextPlain, self.description.clone());
        }
        bundle.insert(MimeType::TextHtml, self.to_html());
        bundle.insert(MimeType::ImageSvg, self.svg.clone());
        bundle
    }

    /// Prints the MIME bundle in evcxr's `EVCXR_BEGIN_CONTENT` convention,
    /// which is how a value displays itself as the last expression of a
    /// notebook cell.
    pub fn evcxr_display(&self) {
        self.mime_bundle().evcxr_display();
    }
}

/// The one-line description, e.g. `heatmap 12x16: routing weights (tokens x experts)`.
impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

pub(crate) fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| PlotError::io(path, e))
}

/// "kind RxC: title (y x x)" — the description charts give their figures.
pub(crate) fn describe(
    kind: &str,
    shape: Option<String>,
    title: Option<&str>,
    axes: Option<String>,
) -> String {
    let mut s = kind.to_string();
    if let Some(shape) = shape {
        s.push(' ');
        s.push_str(&shape);
    }
    if let Some(t) = title {
        s.push_str(": ");
        s.push_str(t);
    }
    if let Some(a) = axes {
        s.push_str(" (");
        s.push_str(&a);
        s.push(')');
    }
    s
}
