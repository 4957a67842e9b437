//! MIME bundles: what a Jupyter kernel sends in `display_data` and
//! `execute_result` (the `data` dict), and evcxr's display convention.

use std::fmt::Write as _;
use std::io::Write as _;

use serde::ser::{Serialize, SerializeMap, Serializer};

/// The media types our values show themselves as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MimeType {
    /// `text/plain`: the one-line or aligned-text face.
    TextPlain,
    /// `text/html`: tables, token strips, figures with live tooltips.
    TextHtml,
    /// `image/svg+xml`.
    ImageSvg,
    /// `image/png`, carried as base64 text.
    ImagePng,
    /// `application/json`.
    Json,
    /// `text/markdown`.
    TextMarkdown,
    /// `application/vnd.jupyter.widget-view+json`: a Jupyter widget's view
    /// (its model id), see [`crate::kernel::widgets`].
    WidgetView,
}

impl MimeType {
    /// The wire name, e.g. `image/svg+xml`.
    pub fn as_str(self) -> &'static str {
        match self {
            MimeType::TextPlain => "text/plain",
            MimeType::TextHtml => "text/html",
            MimeType::ImageSvg => "image/svg+xml",
            MimeType::ImagePng => "image/png",
            MimeType::Json => "application/json",
            MimeType::TextMarkdown => "text/markdown",
            MimeType::WidgetView => "application/vnd.jupyter.widget-view+json",
        }
    }
}

impl std::fmt::Display for MimeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for MimeType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// An ordered map from media type to content: several representations of
/// one value, richest last. Binary content (PNG) is held as base64.
///
/// ```
/// use deepscope::plot::{MimeBundle, MimeType};
///
/// let mut bundle = MimeBundle::new();
/// bundle.insert(MimeType::TextPlain, "3 experts");
/// bundle.insert(MimeType::TextHtml, "<b>3</b> experts");
/// assert_eq!(bundle.to_json()["text/html"], "<b>3</b> experts");
/// assert!(bundle.to_evcxr_string().starts_with("EVCXR_BEGIN_CONTENT text/plain\n3 experts\nEVCXR_END_CONTENT\n"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MimeBundle {
    entries: Vec<(MimeType, String)>,
}

impl MimeBundle {
    /// An empty bundle.
    pub fn new() -> MimeBundle {
        MimeBundle::default()
    }

    /// Sets the content for `mime`, replacing any earlier one in place.
    pub fn insert(&mut self, mime: MimeType, content: impl Into<String>) -> &mut Self {
        let content = content.into();
        match self.entries.iter_mut().find(|(m, _)| *m == mime) {
            Some(entry) => entry.1 = content,
            None => self.entries.push((mime, content)),
        }
        self
    }

    /// The content for `mime`.
    pub fn get(&self, mime: MimeType) -> Option<&str> {
        self.entries
            .iter()
            .find(|(m, _)| *m == mime)
            .map(|(_, c)| c.as_str())
    }

    /// The media types held, in order.
    pub fn mime_types(&self) -> impl Iterator<Item = MimeType> + '_ {
        self.entries.iter().map(|(m, _)| *m)
    }

    /// (media type, content) pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (MimeType, &str)> + '_ {
        self.entries.iter().map(|(m, c)| (*m, c.as_str()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The Jupyter `data` dict: `{"text/plain": "...", "image/png": "<base64>", ...}`.
    /// `application/json` content is embedded as JSON when it parses.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (mime, content) in &self.entries {
            map.insert(mime.as_str().to_string(), entry_value(*mime, content));
        }
        serde_json::Value::Object(map)
    }

    /// The bundle in evcxr's convention: for each representation,
    /// `EVCXR_BEGIN_CONTENT <mime>\n<content>\nEVCXR_END_CONTENT\n`.
    pub fn to_evcxr_string(&self) -> String {
        let mut out = String::new();
        for (mime, content) in &self.entries {
            let _ = write!(
                out,
                "EVCXR_BEGIN_CONTENT {mime}\n{}\nEVCXR_END_CONTENT\n",
                content.trim_end_matches('\n')
            );
        }
        out
    }

    /// Prints [`MimeBundle::to_evcxr_string`] to stdout in one write, where
    /// the evcxr kernel picks it up as the cell's rich output.
    pub fn evcxr_display(&self) {
        let text = self.to_evcxr_string();
        let mut out = std::io::stdout().lock();
        // A closed stdout leaves nothing to display to; not worth a panic.
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// Serialises as the Jupyter `data` dict, keys in bundle order.
impl Serialize for MimeBundle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.entries.len()))?;
        for (mime, content) in &self.entries {
            map.serialize_entry(mime.as_str(), &entry_value(*mime, content))?;
        }
        map.end()
    }
}

/// JSON content embedded as JSON when it parses; everything else a string.
fn entry_value(mime: MimeType, content: &str) -> serde_json::Value {
    match mime {
        MimeType::Json | MimeType::WidgetView => serde_json::from_str(content)
            .unwrap_or_else(|_| serde_json::Value::String(content.to_string())),
        _ => serde_json::Value::String(content.to_string()),
    }
}
