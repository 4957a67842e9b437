use super::{attr, elements, labels, parse, tooltips, with_tooltip};
use crate::plot::{Colormap, Heatmap, PlotError};

fn small() -> Vec<Vec<f64>> {
    vec![
        vec![0.1, 0.2, 0.3, 0.4],
        vec![0.5, 0.6, 0.7, 0.8],
        vec![0.9, 1.0, 0.0, 0.25],
    ]
}

#[test]
fn heatmap_draws_one_cell_with_a_tooltip_per_value() {
    let fig = Heatmap::new(&small()).render().unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(with_tooltip(&doc, "rect").len(), 12);
}

#[test]
fn heatmap_tooltips_carry_labels_and_exact_values() {
    let fig = Heatmap::new(&small())
        .y_labels(["The", "cat", "sat"])
        .x_labels(["e0", "e1", "e2", "e3"])
        .y_title("token")
        .x_title("expert")
        .value_name("weight")
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let tips = tooltips(&doc);
    assert!(
        tips.contains(&"token 1: cat\nexpert 2: e2\nweight: 0.7".to_string()),
        "{tips:?}"
    );
    assert!(tips.contains(&"token 2: sat\nexpert 3: e3\nweight: 0.25".to_string()));
}

#[test]
fn heatmap_labels_every_row_and_column_when_they_fit() {
    let fig = Heatmap::new(&small())
        .y_labels(["The", "cat", "sat"])
        .x_labels(["e0", "e1", "e2", "e3"])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    for l in ["The", "cat", "sat", "e0", "e1", "e2", "e3"] {
        assert!(texts.iter().any(|t| t == l), "missing label {l}: {texts:?}");
    }
}

#[test]
fn heatmap_thins_row_labels_when_rows_are_many() {
    let rows: Vec<Vec<f64>> = (0..300).map(|i| vec![i as f64, 1.0]).collect();
    let names: Vec<String> = (0..300).map(|i| format!("tok{i}")).collect();
    let fig = Heatmap::new(&rows).y_labels(&names).render().unwrap();
    let doc = parse(fig.to_svg());
    let shown = labels(&doc).iter().filter(|t| t.starts_with("tok")).count();
    assert!(shown > 10 && shown < 300, "{shown} row labels shown");
    // Every cell still has its own tooltip with its full label.
    assert_eq!(with_tooltip(&doc, "rect").len(), 600);
    assert!(tooltips(&doc).iter().any(|t| t.contains("tok299")));
}

#[test]
fn heatmap_rotates_column_labels_that_do_not_fit_across() {
    let cols: Vec<f64> = (0..60).map(f64::from).collect();
    let names: Vec<String> = (0..60).map(|i| format!("expert {i}")).collect();
    let fig = Heatmap::new(&[cols]).x_labels(&names).render().unwrap();
    let doc = parse(fig.to_svg());
    let rotated = elements(&doc, "text")
        .iter()
        .filter(|t| {
            t.text().unwrap_or("").starts_with("expert ")
                && t.attribute("transform")
                    .is_some_and(|v| v.starts_with("rotate(-"))
        })
        .count();
    assert!(rotated > 0, "no rotated column labels");
}

#[test]
fn heatmap_colour_bar_has_tick_labels_over_the_range() {
    let fig = Heatmap::new(&small())
        .value_name("weight")
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    for t in ["0", "0.2", "0.4", "0.6", "0.8", "1", "weight"] {
        assert!(
            texts.iter().any(|l| l == t),
            "colour bar label {t} missing: {texts:?}"
        );
    }
}

#[test]
fn heatmap_draws_nan_and_infinite_cells_grey_and_says_so() {
    let fig = Heatmap::new(&[vec![0.0, f64::NAN], vec![f64::INFINITY, 1.0]])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let cells = with_tooltip(&doc, "rect");
    let grey: Vec<_> = cells
        .iter()
        .filter(|r| r.attribute("fill") == Some("#bdbdbd"))
        .collect();
    assert_eq!(grey.len(), 2);
    let tips = tooltips(&doc);
    assert!(tips
        .iter()
        .any(|t| t.ends_with("value: NaN (not a number)")));
    assert!(tips.iter().any(|t| t.ends_with("value: +inf (infinite)")));
    assert!(labels(&doc)
        .iter()
        .any(|t| t.contains("2 NaN or infinite values")));
}

#[test]
fn heatmap_of_constant_values_renders_with_finite_geometry() {
    let fig = Heatmap::new(&vec![vec![3.0f32; 4]; 2]).render().unwrap();
    assert!(!fig.to_svg().contains("NaN"));
    let doc = parse(fig.to_svg());
    for r in elements(&doc, "rect") {
        assert!(attr(&r, "width").is_finite() && attr(&r, "height").is_finite());
    }
}

#[test]
fn heatmap_centres_a_diverging_colormap_on_zero() {
    let fig = Heatmap::new(&[vec![-1.0, 3.0]])
        .colormap(Colormap::RdBu)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    assert!(
        texts.iter().any(|t| t == "-2") && texts.iter().any(|t| t == "2"),
        "{texts:?}"
    );
    // The range is [-3, 3]: 3 is the red end, -1 a third of the way from
    // the white middle towards blue.
    let cells = with_tooltip(&doc, "rect");
    assert_eq!(
        cells[1].attribute("fill"),
        Some(Colormap::RdBu.at(1.0).to_string().as_str())
    );
    assert_eq!(
        cells[0].attribute("fill"),
        Some(Colormap::RdBu.at(1.0 / 3.0).to_string().as_str())
    );
}

#[test]
fn heatmap_uses_a_fixed_range_when_given() {
    let fig = Heatmap::new(&[vec![0.5, 2.0]])
        .range(0.0, 1.0)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let cells = with_tooltip(&doc, "rect");
    assert_eq!(
        cells[0].attribute("fill"),
        Some(Colormap::Viridis.at(0.5).to_string().as_str())
    );
    // Beyond the range: clamped to the top colour, tooltip still exact.
    assert_eq!(cells[1].attribute("fill"), Some("#fde725"));
    assert!(tooltips(&doc)[1].ends_with("value: 2"));
}

#[test]
fn heatmap_rejects_ragged_rows_naming_the_row() {
    let err = Heatmap::new(&[vec![1.0, 2.0], vec![3.0]])
        .render()
        .unwrap_err();
    assert!(
        matches!(&err, PlotError::LengthMismatch { what, expected: 2, found: 1, .. } if what == "values[1]"),
        "{err}"
    );
}

#[test]
fn heatmap_rejects_a_label_count_that_does_not_match_naming_the_argument() {
    let err = Heatmap::new(&small())
        .x_labels(["a", "b"])
        .render()
        .unwrap_err();
    assert!(
        matches!(&err, PlotError::LengthMismatch { what, expected: 4, found: 2, .. } if what == "x_labels"),
        "{err}"
    );
    let err = Heatmap::new(&small()).y_labels(["a"]).render().unwrap_err();
    assert!(
        err.to_string()
            .contains("`y_labels` has 1 entries, expected 3"),
        "{err}"
    );
}

#[test]
fn heatmap_rejects_empty_data() {
    let empty: Vec<Vec<f64>> = vec![];
    assert!(matches!(
        Heatmap::new(&empty).render(),
        Err(PlotError::Empty(_))
    ));
    assert!(matches!(
        Heatmap::new(&[Vec::<f64>::new()]).render(),
        Err(PlotError::Empty(_))
    ));
}

#[test]
fn heatmap_rejects_an_inverted_or_non_finite_range() {
    let err = Heatmap::new(&small()).range(1.0, 0.0).render().unwrap_err();
    assert!(matches!(&err, PlotError::InvalidArgument { name, .. } if name == "range"));
    assert!(Heatmap::new(&small())
        .range(0.0, f64::NAN)
        .render()
        .is_err());
}

#[test]
fn heatmap_from_flat_checks_the_shape() {
    let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let fig = Heatmap::from_flat(&data, 2, 3).unwrap().render().unwrap();
    assert_eq!(fig.to_string(), "heatmap 2x3");
    assert!(matches!(
        Heatmap::from_flat(&data, 4, 2),
        Err(PlotError::LengthMismatch { .. })
    ));
}

#[test]
fn heatmap_writes_values_in_cells_when_asked() {
    let fig = Heatmap::new(&[vec![0.125, 0.5]])
        .show_values(true)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    assert!(
        texts.iter().any(|t| t == "0.125") && texts.iter().any(|t| t == "0.500"),
        "{texts:?}"
    );
}

#[test]
fn heatmap_description_names_shape_title_and_axes() {
    let fig = Heatmap::new(&small())
        .title("routing weights")
        .y_title("tokens")
        .x_title("experts")
        .render()
        .unwrap();
    assert_eq!(
        fig.to_string(),
        "heatmap 3x4: routing weights (tokens x experts)"
    );
    assert_eq!(fig.title(), Some("routing weights"));
}

#[test]
fn heatmap_leaves_tooltips_out_of_very_large_matrices_unless_asked() {
    let rows = vec![vec![0.5f32; 200]; 150];
    let fig = Heatmap::new(&rows).render().unwrap();
    assert!(!fig.to_svg().contains("<title>"));
    let fig = Heatmap::new(&rows[..10]).tooltips(false).render().unwrap();
    assert!(!fig.to_svg().contains("<title>"));
}
