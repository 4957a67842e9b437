use super::{elements, labels, parse, tooltips, with_tooltip};
use crate::plot::{LineChart, Markers, PlotError};

#[test]
fn line_chart_draws_a_line_per_series_and_a_legend() {
    let fig = LineChart::new()
        .series("mean", &[1.0, 2.0, 3.0])
        .series("max", &[2.0, 4.0, 8.0])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(with_tooltip(&doc, "polyline").len(), 2);
    let texts = labels(&doc);
    assert!(texts.contains(&"mean".to_string()) && texts.contains(&"max".to_string()));
    assert_eq!(fig.to_string(), "line chart 2 series x 3 points");
}

#[test]
fn line_points_carry_their_exact_x_and_y() {
    let fig = LineChart::new()
        .series_xy("loss", &[10.0, 20.0], &[2.5, 1.25])
        .x_title("step")
        .y_title("loss")
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(with_tooltip(&doc, "circle").len(), 2);
    assert!(tooltips(&doc).contains(&"loss\nstep: 20\nloss: 1.25".to_string()));
}

#[test]
fn log_y_axis_is_labelled_in_decades() {
    let sv: Vec<f64> = (0..30).map(|i| 10f64.powf(1.0 - i as f64 / 10.0)).collect();
    let fig = LineChart::new()
        .series("σ", &sv)
        .y_log(true)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    for t in ["0.01", "0.1", "1", "10"] {
        assert!(texts.contains(&t.to_string()), "{t} missing from {texts:?}");
    }
    assert!(fig.to_string().ends_with("(log y)"));
}

#[test]
fn nan_breaks_the_line_into_segments() {
    let fig = LineChart::new()
        .series("s", &[1.0, 2.0, f64::NAN, 3.0, 4.0])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(elements(&doc, "polyline").len(), 2);
    assert!(labels(&doc)
        .iter()
        .any(|t| t.starts_with("1 point not drawn")));
}

#[test]
fn log_axis_leaves_out_non_positive_points_and_says_so() {
    let fig = LineChart::new()
        .series("s", &[1.0, 0.0, -1.0, 10.0])
        .y_log(true)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(with_tooltip(&doc, "circle").len(), 2);
    assert!(labels(&doc)
        .iter()
        .any(|t| t.starts_with("2 points not drawn")));
}

#[test]
fn long_series_have_no_markers_but_keep_their_line() {
    let ys: Vec<f64> = (0..5000).map(|i| (i as f64).sqrt()).collect();
    let fig = LineChart::new().series("loss", &ys).render().unwrap();
    let doc = parse(fig.to_svg());
    assert!(elements(&doc, "circle").is_empty());
    assert_eq!(with_tooltip(&doc, "polyline").len(), 1);
}

#[test]
fn markers_can_be_forced_off_while_points_keep_hover_targets() {
    let fig = LineChart::new()
        .series("s", &[1.0, 2.0])
        .markers(Markers::Never)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let circles = with_tooltip(&doc, "circle");
    assert_eq!(circles.len(), 2);
    assert!(circles
        .iter()
        .all(|c| c.attribute("fill-opacity") == Some("0")));
}

#[test]
fn line_chart_rejects_mismatched_x_naming_the_series() {
    let err = LineChart::new()
        .series_xy("loss", &[1.0, 2.0, 3.0], &[1.0, 2.0])
        .render()
        .unwrap_err();
    assert!(
        matches!(&err, PlotError::LengthMismatch { what, expected: 2, found: 3, .. } if what == "x of series `loss`"),
        "{err}"
    );
}

#[test]
fn line_chart_rejects_no_series_empty_series_and_nothing_drawable() {
    assert!(matches!(LineChart::new().render(), Err(PlotError::Empty(w)) if w == "series"));
    let empty: [f64; 0] = [];
    assert!(
        matches!(LineChart::new().series("a", &empty).render(), Err(PlotError::Empty(w)) if w == "series `a`")
    );
    assert!(matches!(
        LineChart::new()
            .series("a", &[-1.0, 0.0])
            .y_log(true)
            .render(),
        Err(PlotError::InvalidArgument { .. })
    ));
}

#[test]
fn single_point_and_constant_series_render() {
    let fig = LineChart::new().series("one", &[5.0]).render().unwrap();
    assert!(!fig.to_svg().contains("NaN"));
    assert_eq!(with_tooltip(&parse(fig.to_svg()), "circle").len(), 1);
    let fig = LineChart::new()
        .series("flat", &[2.0, 2.0, 2.0])
        .render()
        .unwrap();
    assert!(!fig.to_svg().contains("NaN"));
}
