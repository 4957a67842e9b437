use super::{attr, elements, labels, parse, tooltips, with_tooltip};
use crate::plot::{BarChart, BarMode, PlotError};

#[test]
fn bar_chart_draws_one_bar_with_a_tooltip_per_value() {
    let fig = BarChart::new(["e0", "e1", "e2"])
        .series("", &[1.0, 2.0, 3.0])
        .x_title("expert")
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(with_tooltip(&doc, "rect").len(), 3);
    assert!(tooltips(&doc).contains(&"expert e1\nvalue: 2".to_string()));
    assert_eq!(fig.to_string(), "bar chart 3 bars");
}

#[test]
fn taller_values_get_taller_bars() {
    let fig = BarChart::new(["a", "b"])
        .series("n", &[1.0, 4.0])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let bars = with_tooltip(&doc, "rect");
    let (h1, h2) = (attr(&bars[0], "height"), attr(&bars[1], "height"));
    assert!((h2 / h1 - 4.0).abs() < 0.05, "{h1} {h2}");
}

#[test]
fn grouped_bars_draw_every_series_in_every_category_with_a_legend() {
    let fig = BarChart::new(["e0", "e1", "e2", "e3"])
        .series("layer 1", &[1, 2, 3, 4].map(f64::from))
        .series("layer 2", &[4, 3, 2, 1].map(f64::from))
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(with_tooltip(&doc, "rect").len(), 8);
    let texts = labels(&doc);
    assert!(texts.contains(&"layer 1".to_string()) && texts.contains(&"layer 2".to_string()));
    assert!(tooltips(&doc).contains(&"category e3\nlayer 2: 1".to_string()));
    assert_eq!(fig.to_string(), "grouped bar chart 4 categories x 2 series");
}

#[test]
fn stacked_bars_sit_on_top_of_each_other_and_show_the_total() {
    let fig = BarChart::new(["a"])
        .series("shared", &[1.0])
        .series("routed", &[2.0])
        .mode(BarMode::Stacked)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let bars = with_tooltip(&doc, "rect");
    assert_eq!(bars.len(), 2);
    let bottom_of_second = attr(&bars[1], "y") + attr(&bars[1], "height");
    assert!((bottom_of_second - attr(&bars[0], "y")).abs() < 0.02);
    assert!(tooltips(&doc)[1].ends_with("total: 3"));
}

#[test]
fn mean_line_is_drawn_at_the_mean_and_labelled() {
    let fig = BarChart::new(["a", "b", "c", "d"])
        .series("load", &[1.0, 2.0, 3.0, 6.0])
        .mean_line(true)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert!(labels(&doc).contains(&"mean: 3".to_string()));
    let dashed: Vec<_> = elements(&doc, "line")
        .into_iter()
        .filter(|l| l.attribute("stroke-dasharray").is_some())
        .collect();
    assert_eq!(dashed.len(), 1);
    // The mean line is level with the top of the bar whose value is 3.
    let bar_c = &with_tooltip(&doc, "rect")[2];
    assert!((attr(&dashed[0], "y1") - attr(bar_c, "y")).abs() < 0.02);
}

#[test]
fn grouped_means_are_listed_in_the_legend() {
    let fig = BarChart::new(["a", "b"])
        .series("x", &[1.0, 3.0])
        .series("y", &[2.0, 2.0])
        .mean_line(true)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    assert!(
        texts.contains(&"mean, x: 2".to_string()) && texts.contains(&"mean, y: 2".to_string()),
        "{texts:?}"
    );
}

#[test]
fn negative_values_hang_below_the_zero_line() {
    let fig = BarChart::new(["up", "down"])
        .series("Δ", &[2.0, -1.0])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let bars = with_tooltip(&doc, "rect");
    let zero_y = attr(&bars[0], "y") + attr(&bars[0], "height");
    assert!(
        (attr(&bars[1], "y") - zero_y).abs() < 0.02,
        "negative bar starts at zero"
    );
    assert!(
        labels(&doc).iter().any(|t| t.starts_with('-')),
        "axis shows negative ticks"
    );
}

#[test]
fn bars_skip_nan_values_and_say_so() {
    let fig = BarChart::new(["a", "b"])
        .series("n", &[1.0, f64::NAN])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(with_tooltip(&doc, "rect").len(), 1);
    assert!(labels(&doc)
        .iter()
        .any(|t| t.contains("1 NaN or infinite value not drawn")));
}

#[test]
fn bars_reject_a_series_of_the_wrong_length_naming_it() {
    let err = BarChart::new(["a", "b", "c"])
        .series("layer 4", &[1.0, 2.0])
        .render()
        .unwrap_err();
    assert!(
        matches!(&err, PlotError::LengthMismatch { what, expected: 3, found: 2, .. } if what == "series `layer 4`"),
        "{err}"
    );
}

#[test]
fn bars_reject_no_categories_or_no_series() {
    let none: [&str; 0] = [];
    assert!(
        matches!(BarChart::new(none).series("x", &[0.0f64; 0]).render(), Err(PlotError::Empty(w)) if w == "categories")
    );
    assert!(matches!(BarChart::new(["a"]).render(), Err(PlotError::Empty(w)) if w == "series"));
}

#[test]
fn all_zero_bars_still_render_an_axis() {
    let fig = BarChart::new(["a", "b"])
        .series("n", &[0.0, 0.0])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert!(labels(&doc).contains(&"1".to_string()));
    assert!(!fig.to_svg().contains("NaN"));
}
