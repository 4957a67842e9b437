use super::{elements, parse, scratch_dir};
use crate::plot::{Cell, MimeType, PlotError, Table};

fn load_table() -> Table {
    Table::from_rows(
        ["layer", "experts", "max load"],
        [[1.0, 64.0, 0.031], [12.0, 256.0, 0.125]],
    )
    .unwrap()
    .caption("Expert load")
}

#[test]
fn table_html_has_a_header_cell_per_column_and_a_cell_per_value() {
    let html = load_table().to_html();
    let doc = parse(&html);
    assert_eq!(elements(&doc, "th").len(), 3);
    assert_eq!(elements(&doc, "td").len(), 6);
    assert_eq!(elements(&doc, "caption")[0].text(), Some("Expert load"));
    // Numeric columns are right-aligned.
    assert!(elements(&doc, "td")[2]
        .attribute("style")
        .unwrap()
        .contains("text-align:right"));
}

#[test]
fn table_plain_text_aligns_columns_and_right_aligns_numbers() {
    let text = load_table().to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "Expert load");
    assert_eq!(lines[1], "layer  experts  max load");
    assert_eq!(lines[2], "-----  -------  --------");
    assert_eq!(lines[3], "    1       64     0.031");
    assert_eq!(lines[4], "   12      256     0.125");
}

#[test]
fn table_mixes_text_and_number_cells() {
    let mut t = Table::new(["name", "count"]);
    t.add_row([Cell::from("shared"), Cell::from(2usize)])
        .unwrap();
    t.add_row(["routed".into(), Cell::number(1.0 / 3.0, 2)])
        .unwrap();
    assert_eq!(t.rows()[1][1].as_str(), "0.33");
    // "count" is wider than its values, which right-align under it.
    assert_eq!(t.to_string().lines().nth(3), Some("routed   0.33"));
}

#[test]
fn table_escapes_markup_and_keeps_wide_characters_aligned() {
    let mut t = Table::new(["token", "n"]);
    t.add_row(["<b>&\"".into(), 1.into()]).unwrap();
    t.add_row(["中文".into(), 2.into()]).unwrap();
    let html = t.to_html();
    assert!(html.contains("&lt;b&gt;&amp;&quot;"));
    let doc = parse(&html);
    assert_eq!(elements(&doc, "td")[0].text(), Some("<b>&\""));
    let text = t.to_string();
    let lines: Vec<&str> = text.lines().collect();
    // Wide characters take two columns: "中文" lines up with "<b>&\"".
    assert_eq!(lines[2], "<b>&\"  1");
    assert_eq!(lines[3], "中文   2");
}

#[test]
fn table_rejects_a_row_of_the_wrong_length_naming_it() {
    let mut t = Table::new(["a", "b"]);
    t.add_row(["x".into(), "y".into()]).unwrap();
    let err = t.add_row(["only".into()]).unwrap_err();
    assert!(
        matches!(&err, PlotError::LengthMismatch { what, expected: 2, found: 1, .. } if what == "row 1"),
        "{err}"
    );
    let none: [&str; 0] = [];
    let rows: Vec<Vec<f64>> = vec![];
    assert!(matches!(
        Table::from_rows(none, rows),
        Err(PlotError::Empty(_))
    ));
}

#[test]
fn long_tables_are_cut_with_a_count_of_the_rest() {
    let rows: Vec<[usize; 1]> = (0..10).map(|i| [i]).collect();
    let t = Table::from_rows(["i"], rows).unwrap().max_rows(3);
    assert!(t.to_string().ends_with("… 7 more rows"));
    assert!(t.to_html().contains("… 7 more rows"));
    assert_eq!(t.rows().len(), 10, "the data is all kept");
}

#[test]
fn table_bundle_has_plain_text_and_html() {
    let b = load_table().mime_bundle();
    assert_eq!(
        b.mime_types().collect::<Vec<_>>(),
        vec![MimeType::TextPlain, MimeType::TextHtml]
    );
}

#[test]
fn table_saves_html_or_text_by_extension() {
    let dir = scratch_dir("table");
    let t = load_table();
    t.save(dir.join("t.html")).unwrap();
    t.save(dir.join("t.txt")).unwrap();
    assert!(std::fs::read_to_string(dir.join("t.html"))
        .unwrap()
        .starts_with("<table"));
    assert!(std::fs::read_to_string(dir.join("t.txt"))
        .unwrap()
        .starts_with("Expert load"));
    assert!(matches!(
        t.save(dir.join("t.pdf")),
        Err(PlotError::UnsupportedExtension { .. })
    ));
    let _ = std::fs::remove_dir_all(dir);
}
