//! Labels are user data: tokens can be anything, including markup and bytes.

use super::{decode_png, labels, parse, tooltips};
use crate::plot::{BarChart, Heatmap, LineChart};

const NASTY: [&str; 8] = [
    "<b>",
    "a&b",
    "\"q\"",
    "it's",
    "Ġthe",
    "Ċ",
    "日本",
    "x</text><svg>",
];

#[test]
fn heatmap_labels_with_markup_quotes_and_non_ascii_round_trip_through_xml() {
    let fig = Heatmap::new(&[vec![1.0; 8]])
        .x_labels(NASTY)
        .y_labels(["<row & \"1\">"])
        .title("<title> & more")
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    for l in NASTY {
        assert!(texts.iter().any(|t| t == l), "label {l:?} lost: {texts:?}");
    }
    assert!(texts.contains(&"<title> & more".to_string()));
    assert!(tooltips(&doc)
        .iter()
        .any(|t| t.contains("column 7: x</text><svg>")));
    assert!(tooltips(&doc)
        .iter()
        .all(|t| t.starts_with("row 0: <row & \"1\">")));
}

#[test]
fn control_characters_become_visible_symbols_and_keep_the_xml_valid() {
    let fig = BarChart::new(["nul\u{0}", "bell\u{7}", "esc\u{1b}"])
        .series("s\u{1}", &[1.0, 2.0, 3.0])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    assert!(texts.contains(&"nul\u{2400}".to_string()), "{texts:?}");
    assert!(texts.contains(&"esc\u{241b}".to_string()));
}

#[test]
fn series_names_and_titles_are_escaped_in_line_charts() {
    let fig = LineChart::new()
        .series("<a> & \"b\"", &[1.0, 2.0])
        .series("c", &[2.0, 1.0])
        .title("x < y")
        .x_title("&")
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    assert!(
        texts.contains(&"<a> & \"b\"".to_string())
            && texts.contains(&"x < y".to_string())
            && texts.contains(&"&".to_string())
    );
    // The accessible name on the root is escaped too.
    assert_eq!(
        doc.root_element().attribute("aria-label"),
        Some("line chart 2 series x 2 points: x < y")
    );
}

#[test]
fn special_labels_render_to_png() {
    let fig = Heatmap::new(&[vec![1.0; 8]])
        .x_labels(NASTY)
        .render()
        .unwrap();
    let (w, h, _) = decode_png(&fig.to_png(1.0).unwrap());
    assert!(w > 0 && h > 0);
}

#[test]
fn very_long_labels_are_shortened_on_the_axis_but_kept_in_tooltips() {
    let long = "a".repeat(200);
    let fig = Heatmap::new(&[vec![1.0]])
        .y_labels([long.clone()])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert!(labels(&doc)
        .iter()
        .any(|t| t.ends_with('…') && t.len() < 100));
    assert!(tooltips(&doc)[0].contains(&long));
}

#[test]
fn extreme_magnitudes_neither_panic_nor_hang() {
    use crate::plot::{BarMode, Histogram};
    let huge = [f64::MAX, -f64::MAX, 1e-310, 0.0];
    LineChart::new().series("s", &huge).render().unwrap();
    LineChart::new()
        .series("s", &huge)
        .y_log(true)
        .render()
        .unwrap();
    Histogram::new(&huge).render().unwrap();
    Histogram::new(&huge).log_count(true).render().unwrap();
    BarChart::new(["a", "b", "c", "d"])
        .series("x", &huge)
        .series("y", &huge)
        .mode(BarMode::Stacked)
        .render()
        .unwrap();
    Heatmap::new(&[huge]).render().unwrap();
    let tiny_span = [1e300, 1e300 * (1.0 + f64::EPSILON)];
    LineChart::new().series("s", &tiny_span).render().unwrap();
    Heatmap::new(&[tiny_span]).render().unwrap();
}
