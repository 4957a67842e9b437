use super::{elements, parse};
use crate::plot::token_strip::byte_of;
use crate::plot::{decode_byte_level, readable_token, Colormap, MimeType, PlotError, TokenStrip};

#[test]
fn strip_has_one_coloured_span_per_token_with_its_value() {
    let strip = TokenStrip::new(["a", "b", "c"], &[0.0, 0.5, 1.0])
        .unwrap()
        .value_name("loss");
    let html = strip.to_html();
    let doc = parse(&html);
    let spans: Vec<_> = elements(&doc, "span")
        .into_iter()
        .filter(|s| s.attribute("title").is_some())
        .collect();
    assert_eq!(spans.len(), 3);
    // XML parsing normalises the newline in the attribute to a space.
    assert_eq!(spans[1].attribute("title"), Some("token 1: b loss: 0.5"));
    assert!(spans[0]
        .attribute("style")
        .unwrap()
        .contains(&format!("background:{}", Colormap::Viridis.at(0.0))));
    assert!(spans[2]
        .attribute("style")
        .unwrap()
        .contains("background:#fde725"));
}

#[test]
fn strip_shows_byte_level_tokens_as_the_text_they_encode() {
    let strip = TokenStrip::new(["Hello", "Ġworld", "Ċ", "Next"], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let html = strip.to_html();
    assert!(html.contains("> world</span>"), "{html}");
    // A newline shows as ↵ and breaks the line.
    assert!(html.contains(">↵</span><br/>"), "{html}");
    assert!(!html.contains('Ġ'));
    let raw = strip.byte_level(false).to_html();
    assert!(raw.contains(">Ġworld</span>"));
}

#[test]
fn strip_escapes_markup_in_tokens() {
    let strip =
        TokenStrip::new(["<script>", "&amp;", "\"q\"", "'"], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let html = strip.to_html();
    assert!(!html.contains("<script>"));
    assert!(
        html.contains("&lt;script&gt;")
            && html.contains("&amp;amp;")
            && html.contains("&quot;q&quot;")
            && html.contains("&#39;")
    );
    let doc = parse(&html);
    let texts: Vec<_> = elements(&doc, "span")
        .iter()
        .filter_map(|s| s.text())
        .map(str::to_string)
        .collect();
    assert!(texts.contains(&"<script>".to_string()) && texts.contains(&"&amp;".to_string()));
}

#[test]
fn categorical_strip_colours_by_category_and_lists_them() {
    let strip = TokenStrip::categorical(["x", "y", "z"], &[3, 7, 3])
        .unwrap()
        .category_names((0..8).map(|e| format!("expert {e}")))
        .value_name("top-1 expert");
    let html = strip.to_html();
    let doc = parse(&html);
    let spans: Vec<_> = elements(&doc, "span")
        .into_iter()
        .filter(|s| s.attribute("title").is_some())
        .collect();
    assert_eq!(spans[0].attribute("style"), spans[2].attribute("style"));
    assert_ne!(spans[0].attribute("style"), spans[1].attribute("style"));
    assert!(spans[1]
        .attribute("title")
        .unwrap()
        .ends_with("top-1 expert: expert 7"));
    assert!(html.contains("expert 3") && html.contains("expert 7"));
    assert_eq!(
        strip.description(),
        "token strip, 3 tokens (2 distinct top-1 expert)"
    );
}

#[test]
fn strip_greys_nan_values() {
    let strip = TokenStrip::new(["a", "b"], &[1.0, f64::NAN]).unwrap();
    let html = strip.to_html();
    assert!(html.contains("background:#bdbdbd"));
    assert!(html.contains("NaN (not a number)"));
}

#[test]
fn strip_rejects_mismatched_lengths_and_no_tokens() {
    let err = TokenStrip::new(["a", "b"], &[1.0]).unwrap_err();
    assert!(
        matches!(&err, PlotError::LengthMismatch { what, expected: 2, found: 1, .. } if what == "values"),
        "{err}"
    );
    let none: [&str; 0] = [];
    assert!(matches!(
        TokenStrip::new(none, &[0.0f64; 0]),
        Err(PlotError::Empty(_))
    ));
    assert!(TokenStrip::new(["a"], &[1.0])
        .unwrap()
        .range(1.0, 1.0)
        .is_err());
}

#[test]
fn strip_plain_text_lists_tokens_with_values() {
    let strip = TokenStrip::new(["The", "Ġcat"], &[0.5, 2.0])
        .unwrap()
        .value_name("loss");
    assert_eq!(
        strip.to_string(),
        "token strip, 2 tokens (loss 0.5..2)\nThe[0.5] ␣cat[2]"
    );
    let bundle = strip.mime_bundle();
    assert!(bundle.get(MimeType::TextHtml).is_some() && bundle.get(MimeType::TextPlain).is_some());
}

#[test]
fn byte_level_alphabet_covers_every_byte_exactly_once() {
    let mut seen = [0u32; 256];
    for c in (0u32..0x200).filter_map(char::from_u32) {
        if let Some(b) = byte_of(c) {
            seen[b as usize] += 1;
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
}

#[test]
fn byte_level_decoding_handles_multibyte_and_split_characters() {
    assert_eq!(decode_byte_level("Ġcaf"), " caf");
    assert_eq!(decode_byte_level("Ã©"), "é");
    assert_eq!(decode_byte_level("ä¸Ń"), "中");
    assert_eq!(decode_byte_level("ä¸"), "\\xe4\\xb8");
    assert_eq!(decode_byte_level("ĉ"), "\t");
    assert_eq!(readable_token("ĠĠĉĊ"), "␣␣⇥↵");
    // Not byte-level (a CJK character as is): unchanged.
    assert_eq!(decode_byte_level("中文"), "中文");
}
