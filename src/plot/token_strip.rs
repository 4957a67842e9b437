//! Token strip: the text itself, each token on a background coloured by a
//! value (loss, activation, router score) or a category (the expert it was
//! routed to), with the exact value in a tooltip. HTML, since it is text.
//!
//! Tokens from byte-level BPE tokenizers (GPT-2 style, as DeepSeek's) are
//! written in a printable alphabet where a space is `Ġ` and a newline `Ċ`;
//! the strip decodes them back to the text they stand for.

use std::fmt::{self, Write as _};

use super::axis;
use super::heatmap::color_range;
use super::mime::{MimeBundle, MimeType};
use super::svg::escape;
use super::theme::{self, format_value, Colormap, Rgb};
use super::{PlotError, Result};

/// Most category chips listed in a categorical legend.
const MAX_LEGEND_CHIPS: usize = 32;

#[derive(Clone, Debug)]
enum Values {
    Continuous {
        values: Vec<f64>,
        colormap: Colormap,
        range: (f64, f64),
    },
    Categorical {
        categories: Vec<usize>,
        names: Option<Vec<String>>,
    },
}

/// The text with each token coloured by a value.
///
/// ```
/// use deepscope::plot::TokenStrip;
///
/// let tokens = ["The", "Ġcat", "Ġsat", "Ċ"];
/// let loss = [4.1, 2.3, 0.7, 1.2];
/// let strip = TokenStrip::new(tokens, &loss)?.value_name("loss").title("Loss per token");
/// let html = strip.to_html();
/// assert!(html.contains("> cat</span>"));
/// assert!(html.contains("loss: 2.3"));
/// # Ok::<(), deepscope::plot::PlotError>(())
/// ```
#[derive(Clone, Debug)]
pub struct TokenStrip {
    tokens: Vec<String>,
    values: Values,
    title: Option<String>,
    value_name: String,
    byte_level: bool,
}

impl TokenStrip {
    /// Tokens coloured by continuous `values` (one per token), viridis over
    /// their finite range.
    pub fn new<I, S, T>(tokens: I, values: &[T]) -> Result<TokenStrip>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
        T: Copy + Into<f64>,
    {
        let tokens = super::collect_labels(tokens);
        let values: Vec<f64> = values.iter().map(|&v| v.into()).collect();
        check_lengths(&tokens, values.len(), "values")?;
        let range = color_range(&values, Colormap::Viridis, None)?;
        Ok(TokenStrip {
            tokens,
            values: Values::Continuous {
                values,
                colormap: Colormap::Viridis,
                range,
            },
            title: None,
            value_name: "value".into(),
            byte_level: true,
        })
    }

    /// Tokens coloured by a category each (e.g. the top-1 expert), one
    /// distinct colour per category.
    pub fn categorical<I, S>(tokens: I, categories: &[usize]) -> Result<TokenStrip>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tokens = super::collect_labels(tokens);
        check_lengths(&tokens, categories.len(), "categories")?;
        Ok(TokenStrip {
            tokens,
            values: Values::Categorical {
                categories: categories.to_vec(),
                names: None,
            },
            title: None,
            value_name: "category".into(),
            byte_level: true,
        })
    }

    /// Names of the categories, indexed by category (e.g. "expert 0", ...).
    /// Ignored for a continuous strip.
    pub fn category_names<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        if let Values::Categorical { names: n, .. } = &mut self.values {
            *n = Some(super::collect_labels(names));
        }
        self
    }

    /// The colormap of a continuous strip; a diverging one centres on zero.
    pub fn colormap(mut self, colormap: Colormap) -> Self {
        if let Values::Continuous {
            values,
            colormap: c,
            range,
        } = &mut self.values
        {
            *c = colormap;
            // Recomputing cannot fail without a user range.
            if let Ok(r) = color_range(values.iter(), colormap, None) {
                *range = r;
            }
        }
        self
    }

    /// Fixes the value range of a continuous strip (values beyond are
    /// clamped), so strips can be compared.
    pub fn range(mut self, lo: f64, hi: f64) -> Result<Self> {
        if let Values::Continuous {
            values,
            colormap,
            range,
        } = &mut self.values
        {
            *range = color_range(values.iter(), *colormap, Some((lo, hi)))?;
        }
        Ok(self)
    }

    /// The title above the text.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// What the values are, e.g. "loss" or "expert" (tooltips and legend).
    pub fn value_name(mut self, name: impl Into<String>) -> Self {
        self.value_name = name.into();
        self
    }

    /// Whether tokens are decoded from byte-level BPE (`Ġ` -> space); on by
    /// default. Turn off to show tokens exactly as given.
    pub fn byte_level(mut self, on: bool) -> Self {
        self.byte_level = on;
        self
    }

    /// The tokens as given.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    fn shown(&self, token: &str) -> String {
        if self.byte_level {
            decode_byte_level(token)
        } else {
            token.to_string()
        }
    }

    fn color(&self, i: usize) -> Rgb {
        match &self.values {
            Values::Continuous {
                values,
                colormap,
                range,
            } => {
                let v = values[i];
                if v.is_finite() {
                    colormap.at((v - range.0) / (range.1 - range.0))
                } else {
                    theme::MISSING
                }
            }
            Values::Categorical { categories, .. } => theme::categorical(categories[i]),
        }
    }

    fn value_text(&self, i: usize) -> String {
        match &self.values {
            Values::Continuous { values, .. } => super::heatmap::describe_value(values[i]),
            Values::Categorical { categories, names } => {
                category_name(categories[i], names.as_deref())
            }
        }
    }

    /// The strip as HTML: inline styles only, so it cannot restyle the page
    /// it is shown in.
    pub fn to_html(&self) -> String {
        let mut html = String::new();
        let _ = write!(
            html,
            "<div style=\"font-family:{};font-size:14px;line-height:1.9;color:{};max-width:100%\">",
            theme::FONT_FAMILY,
            theme::TEXT
        );
        if let Some(t) = &self.title {
            let _ = write!(
                html,
                "<div style=\"font-size:15px;margin-bottom:4px\">{}</div>",
                escape(t)
            );
        }
        html.push_str("<div style=\"white-space:pre-wrap;word-break:break-word\">");
        for (i, token) in self.tokens.iter().enumerate() {
            let shown = self.shown(token);
            let fill = self.color(i);
            let tip = format!(
                "token {i}: {}\n{}: {}",
                show_whitespace(&shown),
                self.value_name,
                self.value_text(i)
            );
            let (text, breaks) = visible_text(&shown);
            let _ = write!(
                html,
                "<span title=\"{}\" style=\"background:{fill};color:{};border-radius:3px;padding:2px 1px;margin:0 1px 0 0\">{}</span>",
                escape(&tip),
                fill.text_on(),
                escape(&text)
            );
            for _ in 0..breaks {
                html.push_str("<br/>");
            }
        }
        html.push_str("</div>");
        html.push_str(&self.legend_html());
        html.push_str("</div>");
        html
    }

    fn legend_html(&self) -> String {
        let mut html = String::from(
            "<div style=\"font-size:11.5px;color:#5f5f5f;margin-top:6px;white-space:normal\">",
        );
        match &self.values {
            Values::Continuous {
                colormap,
                range,
                values,
            } => {
                let stops: Vec<String> = (0..=8)
                    .map(|k| colormap.at(k as f64 / 8.0).to_string())
                    .collect();
                let _ = write!(
                    html,
                    "{} {} <span style=\"display:inline-block;width:120px;height:10px;vertical-align:middle;\
                     background:linear-gradient(to right,{})\"></span> {}",
                    escape(&self.value_name),
                    escape(&format_value(range.0)),
                    stops.join(","),
                    escape(&format_value(range.1))
                );
                let missing = values.iter().filter(|v| !v.is_finite()).count();
                if missing > 0 {
                    let _ = write!(html, " · grey: {missing} NaN or infinite");
                }
            }
            Values::Categorical { categories, names } => {
                let mut seen: Vec<usize> = categories.clone();
                seen.sort_unstable();
                seen.dedup();
                let _ = write!(html, "{}: ", escape(&self.value_name));
                for &c in seen.iter().take(MAX_LEGEND_CHIPS) {
                    let _ = write!(
                        html,
                        "<span style=\"white-space:nowrap\"><span style=\"display:inline-block;width:10px;height:10px;\
                         background:{};vertical-align:middle;margin:0 3px 0 8px\"></span>{}</span> ",
                        theme::categorical(c),
                        escape(&category_name(c, names.as_deref()))
                    );
                }
                if seen.len() > MAX_LEGEND_CHIPS {
                    let _ = write!(html, " … {} more", seen.len() - MAX_LEGEND_CHIPS);
                }
            }
        }
        html.push_str("</div>");
        html
    }

    /// One line of description, e.g. "token strip, 12 tokens: loss 0.3..4.1".
    pub fn description(&self) -> String {
        let mut s = format!("token strip, {} tokens", self.tokens.len());
        if let Some(t) = &self.title {
            let _ = write!(s, ": {t}");
        }
        match &self.values {
            Values::Continuous { values, .. } => {
                if let Some((lo, hi)) = axis::finite_range(values) {
                    let _ = write!(
                        s,
                        " ({} {}..{})",
                        self.value_name,
                        format_value(lo),
                        format_value(hi)
                    );
                }
            }
            Values::Categorical { categories, .. } => {
                let mut c = categories.clone();
                c.sort_unstable();
                c.dedup();
                let _ = write!(s, " ({} distinct {})", c.len(), self.value_name);
            }
        }
        s
    }

    /// The MIME bundle: text/plain and text/html.
    pub fn mime_bundle(&self) -> MimeBundle {
        let mut b = MimeBundle::new();
        b.insert(MimeType::TextPlain, self.to_string());
        b.insert(MimeType::TextHtml, self.to_html());
        b
    }

    /// Shows the strip as the last expression of a notebook cell.
    pub fn evcxr_display(&self) {
        self.mime_bundle().evcxr_display();
    }
}

/// The description, then each token with its value: `The[4.1] cat[2.3]`.
impl fmt::Display for TokenStrip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.description())?;
        for (i, token) in self.tokens.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let value = match &self.values {
                Values::Continuous { values, .. } => format_value(values[i]),
                Values::Categorical { categories, .. } => categories[i].to_string(),
            };
            write!(f, "{}[{value}]", show_whitespace(&self.shown(token)))?;
        }
        Ok(())
    }
}

fn check_lengths(tokens: &[String], n: usize, what: &str) -> Result<()> {
    if tokens.is_empty() {
        return Err(PlotError::Empty("tokens".into()));
    }
    if n != tokens.len() {
        return Err(PlotError::length(what, tokens.len(), n, "tokens"));
    }
    Ok(())
}

fn category_name(c: usize, names: Option<&[String]>) -> String {
    names
        .and_then(|n| n.get(c))
        .cloned()
        .unwrap_or_else(|| c.to_string())
}

/// A token's text for the strip: a newline shows as "↵" and breaks the
/// line (returned as the number of breaks), a tab as "⇥".
fn visible_text(shown: &str) -> (String, usize) {
    let breaks = shown.matches('\n').count();
    let text: String = shown
        .chars()
        .map(|c| match c {
            '\n' => '↵',
            '\t' => '⇥',
            '\r' => '␍',
            c => c,
        })
        .collect();
    // An empty span would be invisible; give it a visible placeholder.
    if text.is_empty() {
        ("∅".into(), breaks)
    } else {
        (text, breaks)
    }
}

/// The byte GPT-2's byte-level alphabet maps `c` back to, if any. Printable
/// Latin-1 bytes stand for themselves; the other 68 bytes (controls, space,
/// DEL, NBSP, soft hyphen ...) were shifted to U+0100.. in byte order.
pub(crate) fn byte_of(c: char) -> Option<u8> {
    let cp = c as u32;
    match cp {
        0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff => Some(cp as u8),
        0x100..=0x120 => Some((cp - 0x100) as u8), // bytes 0..=32
        0x121..=0x142 => Some((cp - 0x121 + 127) as u8), // bytes 127..=160
        0x143 => Some(173),
        _ => None,
    }
}

/// Decodes a byte-level BPE token (`Ġthe` -> ` the`, `Ċ` -> newline,
/// `âĢĻ` -> `’`). Bytes that do not form UTF-8 on their own (a character
/// split across tokens) are written as `\xNN`. A token that is not in the
/// byte-level alphabet is returned as is, with SentencePiece's `▁` as a
/// space.
///
/// ```
/// use deepscope::plot::decode_byte_level;
/// assert_eq!(decode_byte_level("Ġcat"), " cat");
/// assert_eq!(decode_byte_level("Ċ"), "\n");
/// assert_eq!(decode_byte_level("âĢĻ"), "’");
/// assert_eq!(decode_byte_level("ä¸"), "\\xe4\\xb8");
/// assert_eq!(decode_byte_level("▁the"), " the");
/// ```
pub fn decode_byte_level(token: &str) -> String {
    let bytes: Option<Vec<u8>> = token.chars().map(byte_of).collect();
    let Some(bytes) = bytes else {
        return token.replace('▁', " ");
    };
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// A token as an axis label or tooltip shows it: decoded from byte-level
/// BPE, with whitespace made visible (`␣` for a space, `↵` for a newline,
/// `⇥` for a tab).
///
/// ```
/// use deepscope::plot::readable_token;
/// assert_eq!(readable_token("Ġthe"), "␣the");
/// assert_eq!(readable_token("ĊĊ"), "↵↵");
/// ```
pub fn readable_token(token: &str) -> String {
    show_whitespace(&decode_byte_level(token))
}

fn show_whitespace(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            ' ' => '␣',
            '\n' => '↵',
            '\t' => '⇥',
            '\r' => '␍',
            c => c,
        })
        .collect()
}
