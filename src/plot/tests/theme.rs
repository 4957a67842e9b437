use crate::plot::theme::{categorical, format_value, Colormap, Rgb};

#[test]
fn viridis_runs_from_dark_purple_to_yellow() {
    assert_eq!(Colormap::Viridis.at(0.0), Rgb(0x44, 0x01, 0x54));
    assert_eq!(Colormap::Viridis.at(1.0), Rgb(0xfd, 0xe7, 0x25));
    // Out of range clamps; NaN is the missing-value grey.
    assert_eq!(Colormap::Viridis.at(-3.0), Colormap::Viridis.at(0.0));
    assert_eq!(Colormap::Viridis.at(7.0), Colormap::Viridis.at(1.0));
    assert_eq!(Colormap::Viridis.at(f64::NAN), Rgb(0xbd, 0xbd, 0xbd));
}

#[test]
fn sequential_maps_get_brighter_monotonically() {
    for cmap in [Colormap::Viridis, Colormap::Magma] {
        let lum: Vec<f64> = (0..=100)
            .map(|i| cmap.at(i as f64 / 100.0).luminance())
            .collect();
        assert!(
            lum.windows(2).all(|w| w[1] >= w[0] - 1e-3),
            "{cmap:?} is not monotone in luminance"
        );
    }
}

#[test]
fn diverging_map_is_white_in_the_middle_and_symmetric_in_lightness() {
    let mid = Colormap::RdBu.at(0.5);
    assert!(mid.luminance() > 0.9, "{mid}");
    for t in [0.1, 0.25, 0.4] {
        let (lo, hi) = (
            Colormap::RdBu.at(0.5 - t).luminance(),
            Colormap::RdBu.at(0.5 + t).luminance(),
        );
        assert!((lo - hi).abs() < 0.12, "t={t}: {lo} vs {hi}");
    }
    // Negative is blue, positive red.
    let (neg, pos) = (Colormap::RdBu.at(0.0), Colormap::RdBu.at(1.0));
    assert!(neg.2 > neg.0 && pos.0 > pos.2);
    assert!(Colormap::RdBu.is_diverging() && !Colormap::Viridis.is_diverging());
}

#[test]
fn categorical_colours_are_distinct_for_many_categories() {
    let colours: std::collections::HashSet<Rgb> = (0..64).map(categorical).collect();
    assert_eq!(colours.len(), 64);
}

#[test]
fn text_on_a_colour_is_black_or_white_whichever_reads_better() {
    assert_eq!(Colormap::Viridis.at(0.0).text_on(), Rgb(255, 255, 255));
    assert_eq!(Colormap::Viridis.at(1.0).text_on(), Rgb(0, 0, 0));
}

#[test]
fn values_are_written_with_four_significant_digits() {
    assert_eq!(format_value(0.0), "0");
    assert_eq!(format_value(3.0), "3");
    assert_eq!(format_value(-1234567.0), "-1234567");
    assert_eq!(format_value(0.123456), "0.1235");
    assert_eq!(format_value(12.3456), "12.35");
    assert_eq!(format_value(0.5), "0.5");
    assert_eq!(format_value(2.5e-5), "2.500e-5");
    assert_eq!(format_value(1.5e7 + 0.5), "1.500e7");
    assert_eq!(format_value(f64::INFINITY), "+inf");
    assert_eq!(format_value(f64::NEG_INFINITY), "-inf");
}

#[test]
fn rgb_prints_as_hex() {
    assert_eq!(Rgb(0, 0x72, 0xb2).to_string(), "#0072b2");
}
