//! Tests of the plot module: every chart is rendered from small data, its
//! SVG parsed as XML and its marks, labels and tooltips counted; PNGs are
//! decoded and checked for content.

mod attention;
mod bars;
mod escaping;
mod figure;
mod heatmap;
mod histogram;
mod lines;
mod mime;
mod table;
mod theme;
mod token_strip;

use roxmltree::{Document, Node};

/// Parses an SVG or XHTML string, failing the test with the parser's
/// message when it is not well-formed XML.
pub(super) fn parse(xml: &str) -> Document<'_> {
    match Document::parse(xml) {
        Ok(doc) => doc,
        Err(e) => panic!("not well-formed XML: {e}\n{}", &xml[..xml.len().min(2000)]),
    }
}

/// Elements named `tag`.
pub(super) fn elements<'a, 'i>(doc: &'a Document<'i>, tag: &str) -> Vec<Node<'a, 'i>> {
    doc.descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == tag)
        .collect()
}

/// Elements named `tag` that carry a `<title>` tooltip.
pub(super) fn with_tooltip<'a, 'i>(doc: &'a Document<'i>, tag: &str) -> Vec<Node<'a, 'i>> {
    elements(doc, tag)
        .into_iter()
        .filter(|n| n.children().any(|c| c.tag_name().name() == "title"))
        .collect()
}

/// The text of every `<title>` (tooltips).
pub(super) fn tooltips(doc: &Document<'_>) -> Vec<String> {
    elements(doc, "title")
        .iter()
        .map(|n| n.text().unwrap_or("").to_string())
        .collect()
}

/// The text of every `<text>` element (labels).
pub(super) fn labels(doc: &Document<'_>) -> Vec<String> {
    elements(doc, "text")
        .iter()
        .map(|n| n.text().unwrap_or("").to_string())
        .collect()
}

/// A numeric attribute.
pub(super) fn attr(node: &Node<'_, '_>, name: &str) -> f64 {
    node.attribute(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("<{}> has no numeric `{name}`", node.tag_name().name()))
}

/// Decodes a PNG; returns (width, height, RGBA pixels).
pub(super) fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("PNG frame");
    buf.truncate(info.buffer_size());
    assert_eq!(info.color_type, png::ColorType::Rgba, "resvg writes RGBA");
    (info.width, info.height, buf)
}

/// Fraction of pixels that are not white, and how many distinct colours
/// the image has: a blank image has 0 and 1.
pub(super) fn ink(rgba: &[u8]) -> (f64, usize) {
    let mut colours = std::collections::HashSet::new();
    let mut inked = 0usize;
    for px in rgba.chunks_exact(4) {
        if px[..3] != [255, 255, 255] {
            inked += 1;
        }
        if colours.len() < 10_000 {
            colours.insert([px[0], px[1], px[2]]);
        }
    }
    (inked as f64 / (rgba.len() / 4) as f64, colours.len())
}

/// A fresh directory under the system temp dir, for tests that write files.
pub(super) fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("deepscope-plot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}
