use base64::Engine as _;

use super::{decode_png, parse};
use crate::plot::{Heatmap, MimeBundle, MimeType};

fn figure() -> crate::plot::Figure {
    Heatmap::new(&[vec![1.0, 2.0]]).title("t").render().unwrap()
}

#[test]
fn figure_bundle_has_text_inline_html_and_svg() {
    let fig = figure();
    let b = fig.mime_bundle();
    assert_eq!(
        b.mime_types().collect::<Vec<_>>(),
        vec![MimeType::TextPlain, MimeType::TextHtml, MimeType::ImageSvg]
    );
    assert_eq!(b.get(MimeType::TextPlain), Some("heatmap 1x2: t"));
    assert_eq!(b.get(MimeType::ImageSvg), Some(fig.to_svg()));
    // The HTML holds the SVG inline (so tooltips work) and is well-formed.
    let html = b.get(MimeType::TextHtml).unwrap();
    assert!(html.contains("<svg"));
    parse(html);
}

#[test]
fn png_figure_bundle_carries_a_base64_png() {
    let b = figure().as_png(1.0).mime_bundle();
    assert_eq!(
        b.mime_types().collect::<Vec<_>>(),
        vec![MimeType::TextPlain, MimeType::ImagePng]
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b.get(MimeType::ImagePng).unwrap())
        .unwrap();
    let (w, h, _) = decode_png(&bytes);
    assert!(w > 50 && h > 50);
}

#[test]
fn a_png_figure_in_html_is_an_image_not_its_svg() {
    let fig = figure().as_png(1.0);
    let html = fig.to_html();
    assert!(!html.contains("<svg"), "{html}");
    let b64 = html.split("data:image/png;base64,").nth(1).unwrap().split('"').next().unwrap();
    let (w, h, _) = decode_png(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap());
    assert_eq!((w as f64, h as f64), (fig.width().ceil(), fig.height().ceil()));
    parse(&html);
}

#[test]
fn bundle_serialises_to_the_jupyter_data_dict() {
    let mut b = MimeBundle::new();
    b.insert(MimeType::TextPlain, "x")
        .insert(MimeType::Json, "{\"a\": 1}");
    let json = b.to_json();
    assert_eq!(json["text/plain"], "x");
    assert_eq!(json["application/json"]["a"], 1);
    assert_eq!(serde_json::to_value(&b).unwrap(), json);
    // Keys keep the bundle's order when serialised directly.
    assert_eq!(
        serde_json::to_string(&b).unwrap(),
        "{\"text/plain\":\"x\",\"application/json\":{\"a\":1}}"
    );
}

#[test]
fn evcxr_output_wraps_each_representation() {
    let mut b = MimeBundle::new();
    b.insert(MimeType::TextPlain, "3 experts\n");
    b.insert(MimeType::TextHtml, "<b>3</b>");
    assert_eq!(
        b.to_evcxr_string(),
        "EVCXR_BEGIN_CONTENT text/plain\n3 experts\nEVCXR_END_CONTENT\n\
         EVCXR_BEGIN_CONTENT text/html\n<b>3</b>\nEVCXR_END_CONTENT\n"
    );
}

#[test]
fn inserting_a_mime_type_again_replaces_it_in_place() {
    let mut b = MimeBundle::new();
    b.insert(MimeType::TextPlain, "a");
    b.insert(MimeType::TextHtml, "b");
    b.insert(MimeType::TextPlain, "c");
    assert_eq!(b.len(), 2);
    assert_eq!(
        b.iter().collect::<Vec<_>>(),
        vec![(MimeType::TextPlain, "c"), (MimeType::TextHtml, "b")]
    );
}

#[test]
fn evcxr_display_of_every_displayable_type_compiles_and_runs() {
    // Printing goes to the test's captured stdout.
    figure().evcxr_display();
    crate::plot::Table::new(["a"]).evcxr_display();
    crate::plot::TokenStrip::new(["a"], &[1.0])
        .unwrap()
        .evcxr_display();
}
