use super::{labels, parse, tooltips, with_tooltip};
use crate::plot::{Histogram, PlotError};

#[test]
fn histogram_counts_every_finite_value_once() {
    let values: Vec<f64> = (0..1000).map(|i| (i as f64 * 0.7).sin()).collect();
    let bins = Histogram::new(&values).bins(13).compute().unwrap();
    assert_eq!(bins.counts.len(), 13);
    assert_eq!(bins.edges.len(), 14);
    assert_eq!(bins.counts.iter().sum::<u64>(), 1000);
}

#[test]
fn histogram_puts_the_maximum_in_the_last_bin() {
    let bins = Histogram::new(&[0.0, 0.5, 1.0]).bins(2).compute().unwrap();
    assert_eq!(bins.counts, vec![1, 2]);
}

#[test]
fn histogram_draws_a_bar_per_non_empty_bin_with_its_interval_and_count() {
    let fig = Histogram::new(&[0.0, 0.1, 0.2, 0.9, 1.0])
        .bins(4)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    // Bins [0,.25) [.25,.5) [.5,.75) [.75,1]: counts 3, 0, 0, 2.
    assert_eq!(with_tooltip(&doc, "rect").len(), 2);
    let tips = tooltips(&doc);
    assert_eq!(tips, vec!["[0, 0.25): 3 (60.0%)", "[0.75, 1]: 2 (40.0%)"]);
}

#[test]
fn histogram_log_count_axis_labels_decades() {
    let mut values = vec![0.0; 5000];
    values.push(10.0);
    let fig = Histogram::new(&values)
        .bins(10)
        .log_count(true)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let texts = labels(&doc);
    for t in ["1", "10", "100", "1000", "count (log)"] {
        assert!(texts.contains(&t.to_string()), "{t} missing from {texts:?}");
    }
    // The lone outlier still shows as a bar.
    assert_eq!(with_tooltip(&doc, "rect").len(), 2);
    assert!(fig.to_string().ends_with("(log count)"));
}

#[test]
fn histogram_reports_non_finite_and_out_of_range_values() {
    let fig = Histogram::new(&[0.0, 0.5, 1.0, 7.0, f64::NAN, f64::NEG_INFINITY])
        .range(0.0, 1.0)
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let note = labels(&doc)
        .into_iter()
        .find(|t| t.starts_with("n = "))
        .unwrap();
    assert!(
        note.contains("1 outside range") && note.contains("2 NaN or infinite skipped"),
        "{note}"
    );
}

#[test]
fn histogram_of_constant_values_renders() {
    let fig = Histogram::new(&[2.5f32; 10]).render().unwrap();
    let doc = parse(fig.to_svg());
    assert!(!with_tooltip(&doc, "rect").is_empty());
    assert!(!fig.to_svg().contains("NaN"));
}

#[test]
fn histogram_chooses_a_bin_count_by_itself() {
    let values: Vec<f64> = (0..10_000).map(|i| ((i * 7919) % 10_007) as f64).collect();
    let bins = Histogram::new(&values).compute().unwrap();
    assert!(
        (5..=100).contains(&bins.counts.len()),
        "{}",
        bins.counts.len()
    );
}

#[test]
fn histogram_rejects_empty_all_nan_zero_bins_and_bad_ranges() {
    let empty: [f64; 0] = [];
    assert!(matches!(
        Histogram::new(&empty).render(),
        Err(PlotError::Empty(_))
    ));
    assert!(
        matches!(Histogram::new(&[f64::NAN]).render(), Err(PlotError::InvalidArgument { name, .. }) if name == "values")
    );
    assert!(
        matches!(Histogram::new(&[1.0]).bins(0).render(), Err(PlotError::InvalidArgument { name, .. }) if name == "bins")
    );
    assert!(
        matches!(Histogram::new(&[1.0]).range(2.0, 2.0).render(), Err(PlotError::InvalidArgument { name, .. }) if name == "range")
    );
}
