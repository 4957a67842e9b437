//! The one theme every chart uses: colormaps, the categorical palette, the
//! font and its sizes, and how numbers are written.
//!
//! The colormaps are perceptually uniform: equal steps in value look like
//! equal steps in colour, and they stay ordered in greyscale. Each is 33
//! anchors sampled evenly from the published map and interpolated linearly
//! in sRGB between them.

use std::fmt;

/// The font every chart names. DejaVu Sans is embedded for PNG output; in a
/// browser the SVG falls back to Verdana or Arial when it is not installed.
pub const FONT_FAMILY: &str = "DejaVu Sans, Verdana, Arial, sans-serif";
/// The family name inside the embedded font file.
pub(crate) const EMBEDDED_FAMILY: &str = "DejaVu Sans";
/// DejaVu Sans 2.37 (Bitstream Vera licence, see LICENSE-DejaVuSans.txt).
pub(crate) const EMBEDDED_FONT: &[u8] = include_bytes!("DejaVuSans.ttf");

/// Font size of a chart's title, in px.
pub const TITLE_SIZE: f64 = 15.0;
/// Font size of the line under the title (counts, notes), in px.
pub const SUBTITLE_SIZE: f64 = 11.5;
/// Font size of axis titles, in px.
pub const AXIS_TITLE_SIZE: f64 = 12.0;
/// Font size of tick labels, legend entries and colour-bar labels, in px.
pub const TICK_SIZE: f64 = 11.0;
/// Font size of values written inside heatmap cells, in px.
pub const CELL_TEXT_SIZE: f64 = 10.0;
/// Space around the figure, in px.
pub const PAD: f64 = 12.0;

/// Colour of titles and labels.
pub const TEXT: Rgb = Rgb(0x22, 0x22, 0x22);
/// Colour of subtitles and notes.
pub const MUTED_TEXT: Rgb = Rgb(0x5f, 0x5f, 0x5f);
/// Colour of axis lines and ticks.
pub const AXIS: Rgb = Rgb(0x55, 0x55, 0x55);
/// Colour of grid lines.
pub const GRID: Rgb = Rgb(0xe6, 0xe6, 0xe6);
/// Colour of NaN and infinite values in heatmaps.
pub const MISSING: Rgb = Rgb(0xbd, 0xbd, 0xbd);
/// Colour of reference lines (the mean in a bar chart).
pub const REFERENCE: Rgb = Rgb(0xc0, 0x39, 0x2b);

/// An sRGB colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    fn from_hex(hex: u32) -> Rgb {
        Rgb((hex >> 16) as u8, (hex >> 8) as u8, hex as u8)
    }

    /// Relative luminance (WCAG), in [0, 1].
    pub fn luminance(self) -> f64 {
        fn lin(c: u8) -> f64 {
            let c = f64::from(c) / 255.0;
            if c <= 0.04045 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        }
        0.2126 * lin(self.0) + 0.7152 * lin(self.1) + 0.0722 * lin(self.2)
    }

    /// Black or white, whichever reads better on this colour.
    pub fn text_on(self) -> Rgb {
        // 0.179 is where black and white have equal contrast against the colour.
        if self.luminance() > 0.179 {
            Rgb(0, 0, 0)
        } else {
            Rgb(0xff, 0xff, 0xff)
        }
    }

    fn lerp(a: Rgb, b: Rgb, t: f64) -> Rgb {
        let mix = |x: u8, y: u8| (f64::from(x) + (f64::from(y) - f64::from(x)) * t).round() as u8;
        Rgb(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
    }
}

/// `#rrggbb`.
impl fmt::Display for Rgb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

/// A continuous colormap.
///
/// ```
/// use deepscope::plot::{Colormap, Rgb};
/// assert_eq!(Colormap::Viridis.at(0.0), Rgb(0x44, 0x01, 0x54));
/// assert_eq!(Colormap::Viridis.at(1.0).to_string(), "#fde725");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Colormap {
    /// Sequential, dark blue to yellow (matplotlib's default). For
    /// non-negative values: weights, probabilities, loads.
    #[default]
    Viridis,
    /// Sequential, black to light yellow. An alternative for dense maps.
    Magma,
    /// Diverging, blue (negative) through white (zero) to red (positive):
    /// ColorBrewer's RdBu, reversed. For signed values; charts centre it on 0.
    RdBu,
}

impl Colormap {
    /// The colour at `t` in [0, 1] (clamped). NaN gives the missing-value grey.
    pub fn at(self, t: f64) -> Rgb {
        if t.is_nan() {
            return MISSING;
        }
        let anchors = self.anchors();
        let x = t.clamp(0.0, 1.0) * (anchors.len() - 1) as f64;
        let i = (x.floor() as usize).min(anchors.len() - 2);
        Rgb::lerp(
            Rgb::from_hex(anchors[i]),
            Rgb::from_hex(anchors[i + 1]),
            x - i as f64,
        )
    }

    /// Whether this map has a neutral middle, so that charts should centre
    /// their value range on zero.
    pub fn is_diverging(self) -> bool {
        matches!(self, Colormap::RdBu)
    }

    /// Name as written in legends and descriptions.
    pub fn name(self) -> &'static str {
        match self {
            Colormap::Viridis => "viridis",
            Colormap::Magma => "magma",
            Colormap::RdBu => "RdBu",
        }
    }

    fn anchors(self) -> &'static [u32; 33] {
        match self {
            Colormap::Viridis => &VIRIDIS,
            Colormap::Magma => &MAGMA,
            Colormap::RdBu => &RDBU_R,
        }
    }
}

// Viridis and magma by Stéfan van der Walt and Nathaniel Smith (CC0), 33
// evenly spaced samples of matplotlib's 256-entry tables.
const VIRIDIS: [u32; 33] = [
    0x440154, 0x470d60, 0x48186a, 0x482374, 0x472d7b, 0x453781, 0x424086, 0x3e4989, 0x3b528b,
    0x375b8d, 0x33638d, 0x2f6b8e, 0x2c728e, 0x297a8e, 0x26828e, 0x23898e, 0x21918c, 0x1f988b,
    0x1fa088, 0x22a785, 0x28ae80, 0x32b67a, 0x3fbc73, 0x4ec36b, 0x5ec962, 0x70cf57, 0x84d44b,
    0x98d83e, 0xaddc30, 0xc2df23, 0xd8e219, 0xece51b, 0xfde725,
];
const MAGMA: [u32; 33] = [
    0x000004, 0x030312, 0x0a0822, 0x130d34, 0x1d1147, 0x29115a, 0x36106b, 0x440f76, 0x51127c,
    0x5d177f, 0x6a1c81, 0x762181, 0x832681, 0x902a81, 0x9c2e7f, 0xaa337d, 0xb73779, 0xc43c75,
    0xd0416f, 0xdc4869, 0xe75263, 0xef5d5e, 0xf56b5c, 0xf9795d, 0xfc8961, 0xfd9869, 0xfea772,
    0xfeb67c, 0xfec488, 0xfed395, 0xfde2a3, 0xfcf0b2, 0xfcfdbf,
];
// ColorBrewer RdBu by Cynthia Brewer (Apache-2.0 style licence), reversed so
// that negative is blue; 33 samples of matplotlib's interpolation.
const RDBU_R: [u32; 33] = [
    0x053061, 0x0e4179, 0x175290, 0x1f63a8, 0x2a71b2, 0x3480b9, 0x3f8ec0, 0x529dc8, 0x6bacd1,
    0x84bcd9, 0x9bc9e0, 0xaed3e6, 0xc2ddec, 0xd4e6f1, 0xe0ecf3, 0xecf2f5, 0xf7f6f6, 0xf9eee7,
    0xfbe5d8, 0xfddcc9, 0xfbccb4, 0xf8bb9e, 0xf5aa89, 0xee9677, 0xe48066, 0xdb6b55, 0xd05548,
    0xc53e3d, 0xba2832, 0xab162a, 0x930e26, 0x7c0722, 0x67001f,
];

/// Okabe and Ito's colour-blind-safe palette (yellow moved last: it is
/// faint on white).
const CATEGORICAL: [u32; 8] = [
    0x0072b2, 0xe69f00, 0x009e73, 0xd55e00, 0x56b4e9, 0xcc79a7, 0x7f7f7f, 0xf0e442,
];

/// The colour of series or category `i`: the eight Okabe-Ito colours, then
/// hues spaced by the golden angle so that many categories (experts) stay
/// distinguishable.
pub fn categorical(i: usize) -> Rgb {
    if i < CATEGORICAL.len() {
        return Rgb::from_hex(CATEGORICAL[i]);
    }
    let hue = ((i - CATEGORICAL.len()) as f64 * 137.507_764) % 360.0;
    let lightness = [0.45, 0.6, 0.35][(i / 7) % 3];
    hsl(hue, 0.65, lightness)
}

fn hsl(h: f64, s: f64, l: f64) -> Rgb {
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let hp = h / 60.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    let to = |v: f64| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    Rgb(to(r), to(g), to(b))
}

/// Advance widths of DejaVu Sans for U+0020..=U+007E, in font units (2048
/// per em), read from the embedded font. Used to lay out labels.
const ASCII_ADVANCE: [u16; 95] = [
    651, 821, 942, 1716, 1303, 1946, 1597, 563, 799, 799, 1024, 1716, 651, 739, 651, 690, 1303,
    1303, 1303, 1303, 1303, 1303, 1303, 1303, 1303, 1303, 690, 690, 1716, 1716, 1716, 1087, 2048,
    1401, 1405, 1430, 1577, 1294, 1178, 1587, 1540, 604, 604, 1343, 1141, 1767, 1532, 1612, 1235,
    1612, 1423, 1300, 1251, 1499, 1401, 2025, 1403, 1251, 1403, 799, 690, 799, 1716, 1024, 1024,
    1255, 1300, 1126, 1300, 1260, 721, 1300, 1298, 569, 569, 1186, 569, 1995, 1298, 1253, 1300,
    1300, 842, 1067, 803, 1298, 1212, 1675, 1212, 1212, 1075, 1303, 690, 1303, 1716,
];

/// Estimated width in px of `text` set in DejaVu Sans at `size` px: exact
/// for ASCII, an em for wide (CJK) characters, 0.65 em for the rest.
pub(crate) fn text_width(text: &str, size: f64) -> f64 {
    let units: f64 = text
        .chars()
        .map(|c| {
            let cp = c as u32;
            if (0x20..=0x7e).contains(&cp) {
                f64::from(ASCII_ADVANCE[(cp - 0x20) as usize])
            } else if is_wide(cp) {
                2048.0
            } else {
                1330.0
            }
        })
        .sum();
    units / 2048.0 * size
}

/// Whether a code point is East Asian wide (two columns, about an em).
pub(crate) fn is_wide(cp: u32) -> bool {
    matches!(cp,
        0x1100..=0x115f | 0x2e80..=0xa4cf | 0xac00..=0xd7a3 | 0xf900..=0xfaff
        | 0xfe30..=0xfe4f | 0xff00..=0xff60 | 0xffe0..=0xffe6 | 0x1f300..=0x1faff
        | 0x20000..=0x3fffd)
}

/// Shortens `text` to at most `max_px` wide at `size`, ending in "…".
pub(crate) fn truncate_to_width(text: &str, size: f64, max_px: f64) -> String {
    if text_width(text, size) <= max_px {
        return text.to_string();
    }
    let budget = max_px - text_width("…", size);
    let mut out = String::new();
    let mut used = 0.0;
    for c in text.chars() {
        let mut buf = [0u8; 4];
        let w = text_width(c.encode_utf8(&mut buf), size);
        if used + w > budget {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
}

/// A value as a tooltip or table shows it: integers in full, otherwise four
/// significant digits, scientific notation when very small or large, and
/// `NaN`/`+inf`/`-inf` spelled out.
///
/// ```
/// use deepscope::plot::theme::format_value;
/// assert_eq!(format_value(0.123456), "0.1235");
/// assert_eq!(format_value(42.0), "42");
/// assert_eq!(format_value(1.5e-6), "1.500e-6");
/// assert_eq!(format_value(f64::NAN), "NaN");
/// ```
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+inf" } else { "-inf" }.into();
    }
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.3e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    trim_zeros(format!("{v:.decimals$}"))
}

/// A tick label at `v` on an axis whose ticks are `step` apart: as many
/// decimals as the step needs, scientific notation for extreme magnitudes.
pub(crate) fn format_tick(v: f64, step: f64) -> String {
    if v == 0.0 || v.abs() < step.abs() * 1e-9 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-4..1e6).contains(&a) {
        let s = format!("{v:.2e}");
        // 1.00e6 -> 1e6, 2.50e-5 -> 2.5e-5
        return match s.split_once('e') {
            Some((m, e)) => format!("{}e{}", trim_zeros(m.to_string()), e),
            None => s,
        };
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize + usize::from(is_half_step(step))
    };
    let s = format!("{v:.decimals$}");
    if decimals > 0 {
        trim_zeros(s)
    } else {
        s
    }
}

/// Steps like 0.25 or 0.025 need one decimal more than their magnitude says.
fn is_half_step(step: f64) -> bool {
    let m = step / 10f64.powf(step.log10().floor());
    (m - 2.5).abs() < 1e-9
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}
