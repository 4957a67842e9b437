//! A small SVG writer: every mark is an element we write ourselves, so each
//! cell, bar and point can carry a `<title>` (the browser's hover tooltip).
//!
//! The output uses presentation attributes only, no `<style>` and no `id`s,
//! so that several figures inlined in one HTML page cannot interfere.

use std::fmt::Write;

use super::theme::{self, Rgb};

/// Escapes text for XML character data and attribute values. Characters
/// XML 1.0 forbids (C0 controls other than tab, newline and carriage return)
/// become their visible Control Pictures (U+2400 + code), so a token that is
/// a raw control byte still shows as something.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {
                out.push(char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'))
            }
            '\u{7f}' => out.push('\u{2421}'),
            '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A coordinate with at most two decimals and no trailing zeros.
pub(crate) fn num(v: f64) -> String {
    if !v.is_finite() {
        return "0".into();
    }
    let r = (v * 100.0).round() / 100.0;
    if r == r.trunc() {
        format!("{r:.0}")
    } else {
        let s = format!("{r:.2}");
        s.trim_end_matches('0').to_string()
    }
}

/// Horizontal anchor of a text element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn as_str(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

/// How a text element is set. `y` passed with it is the vertical centre of
/// the text (we shift to the baseline ourselves rather than rely on
/// `dominant-baseline`, which renderers treat differently).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TextStyle {
    pub size: f64,
    pub anchor: Anchor,
    pub color: Rgb,
    /// Degrees, clockwise, about the anchor point.
    pub rotate: f64,
    /// A white outline under the glyphs, so text stays readable over marks.
    pub halo: bool,
}

impl TextStyle {
    pub fn new(size: f64) -> Self {
        TextStyle {
            size,
            anchor: Anchor::Start,
            color: theme::TEXT,
            rotate: 0.0,
            halo: false,
        }
    }
    pub fn halo(mut self) -> Self {
        self.halo = true;
        self
    }
    pub fn anchor(mut self, anchor: Anchor) -> Self {
        self.anchor = anchor;
        self
    }
    pub fn color(mut self, color: Rgb) -> Self {
        self.color = color;
        self
    }
    pub fn rotate(mut self, degrees: f64) -> Self {
        self.rotate = degrees;
        self
    }
}

/// Line dash patterns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dash {
    Solid,
    Dashed,
}

/// How a line is drawn.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stroke {
    pub color: Rgb,
    pub width: f64,
    pub dash: Dash,
}

impl Stroke {
    pub fn solid(color: Rgb, width: f64) -> Stroke {
        Stroke {
            color,
            width,
            dash: Dash::Solid,
        }
    }
    pub fn dashed(color: Rgb, width: f64) -> Stroke {
        Stroke {
            color,
            width,
            dash: Dash::Dashed,
        }
    }
}

/// An SVG document being written.
pub(crate) struct Svg {
    buf: String,
    width: f64,
    height: f64,
    label: String,
}

impl Svg {
    /// Opens a document of `width` x `height` px on a white background.
    /// `label` becomes the accessible name (`aria-label`).
    pub fn new(width: f64, height: f64, label: &str) -> Svg {
        let mut buf = String::with_capacity(16 * 1024);
        let (w, h) = (num(width), num(height));
        let _ = write!(
            buf,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\" font-family=\"{}\">\n\
             <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>\n",
            escape(label),
            theme::FONT_FAMILY
        );
        Svg { buf, width, height, label: label.to_string() }
    }

    /// A filled rectangle, with an optional hover tooltip.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: Rgb, tooltip: Option<&str>) {
        let _ = write!(
            self.buf,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{fill}\"",
            num(x),
            num(y),
            num(w.max(0.0)),
            num(h.max(0.0))
        );
        self.close_with_tooltip("rect", tooltip);
    }

    /// A rectangle outline.
    pub fn rect_outline(&mut self, x: f64, y: f64, w: f64, h: f64, stroke: Rgb, width: f64) {
        let _ = writeln!(
            self.buf,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{}\"/>",
            num(x),
            num(y),
            num(w),
            num(h),
            num(width)
        );
    }

    /// A straight line.
    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: Stroke) {
        let _ = write!(
            self.buf,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"{}\"",
            num(x1),
            num(y1),
            num(x2),
            num(y2),
            stroke.color,
            num(stroke.width)
        );
        if stroke.dash == Dash::Dashed {
            self.buf.push_str(" stroke-dasharray=\"5 3\"");
        }
        self.buf.push_str("/>\n");
    }

    /// A line through `points`, with an optional tooltip (the series name).
    pub fn polyline(
        &mut self,
        points: &[(f64, f64)],
        stroke: Rgb,
        width: f64,
        tooltip: Option<&str>,
    ) {
        let mut pts = String::with_capacity(points.len() * 12);
        for (i, (x, y)) in points.iter().enumerate() {
            if i > 0 {
                pts.push(' ');
            }
            let _ = write!(pts, "{},{}", num(*x), num(*y));
        }
        let _ = write!(
            self.buf,
            "<polyline points=\"{pts}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{}\" \
             stroke-linejoin=\"round\" stroke-linecap=\"round\"",
            num(width)
        );
        self.close_with_tooltip("polyline", tooltip);
    }

    /// A circle; `visible: false` makes an invisible hover target.
    pub fn circle(
        &mut self,
        cx: f64,
        cy: f64,
        r: f64,
        fill: Rgb,
        visible: bool,
        tooltip: Option<&str>,
    ) {
        let _ = write!(
            self.buf,
            "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{fill}\"",
            num(cx),
            num(cy),
            num(r)
        );
        if visible {
            self.buf
                .push_str(" stroke=\"#ffffff\" stroke-width=\"0.8\"");
        } else {
            self.buf.push_str(" fill-opacity=\"0\"");
        }
        self.close_with_tooltip("circle", tooltip);
    }

    /// Text centred vertically on `y` (see [`TextStyle`]).
    pub fn text(&mut self, x: f64, y: f64, text: &str, style: TextStyle) {
        // For DejaVu Sans, the middle of lowercase-and-digits sits about
        // 0.35 em above the baseline.
        let shift = 0.35 * style.size;
        let (bx, by) = if style.rotate == 0.0 {
            (x, y + shift)
        } else {
            // Shift along the rotated "down" direction.
            let a = style.rotate.to_radians();
            (x - shift * a.sin(), y + shift * a.cos())
        };
        let _ = write!(
            self.buf,
            "<text x=\"{}\" y=\"{}\" font-size=\"{}\" fill=\"{}\"",
            num(bx),
            num(by),
            num(style.size),
            style.color
        );
        if style.anchor != Anchor::Start {
            let _ = write!(self.buf, " text-anchor=\"{}\"", style.anchor.as_str());
        }
        if style.rotate != 0.0 {
            let _ = write!(
                self.buf,
                " transform=\"rotate({} {} {})\"",
                num(style.rotate),
                num(bx),
                num(by)
            );
        }
        if style.halo {
            self.buf.push_str(
                " stroke=\"#ffffff\" stroke-width=\"3\" stroke-linejoin=\"round\" paint-order=\"stroke\"",
            );
        }
        let _ = writeln!(self.buf, " xml:space=\"preserve\">{}</text>", escape(text));
    }

    /// Opens a group with fixed presentation attributes (written by us,
    /// never from user data), e.g. `shape-rendering="crispEdges"`.
    pub fn group(&mut self, attrs: &'static str) {
        let _ = writeln!(self.buf, "<g {attrs}>");
    }

    /// Opens a group carrying a tooltip for everything inside it.
    pub fn group_with_tooltip(&mut self, tooltip: &str) {
        let _ = writeln!(self.buf, "<g><title>{}</title>", escape(tooltip));
    }

    /// Closes the innermost group.
    pub fn end_group(&mut self) {
        self.buf.push_str("</g>\n");
    }

    fn close_with_tooltip(&mut self, element: &str, tooltip: Option<&str>) {
        match tooltip {
            Some(t) => {
                let _ = writeln!(self.buf, "><title>{}</title></{element}>", escape(t));
            }
            None => self.buf.push_str("/>\n"),
        }
    }

    /// Closes the document.
    pub fn finish(mut self) -> String {
        self.buf.push_str("</svg>\n");
        self.buf
    }

    /// Closes the document as a [`Figure`] of its size, described by its
    /// label, under `title`: the last step of every chart's `render`.
    pub fn into_figure(self, title: Option<String>) -> crate::plot::Figure {
        let (width, height, label) = (self.width, self.height, self.label.clone());
        crate::plot::Figure::from_svg(self.finish(), width, height, label, title)
    }
}
