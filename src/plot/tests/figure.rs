use super::{decode_png, ink, scratch_dir};
use crate::plot::{AttentionGrid, BarChart, Heatmap, Histogram, LineChart, PlotError};

#[test]
fn png_of_every_chart_type_decodes_at_the_requested_scale_and_is_not_blank() {
    let figures = [
        Heatmap::new(&[vec![0.0, 1.0], vec![0.5, 0.25]])
            .title("heatmap")
            .render()
            .unwrap(),
        BarChart::new(["a", "b"])
            .series("n", &[1.0, 2.0])
            .title("bars")
            .render()
            .unwrap(),
        Histogram::new(&[0.0, 1.0, 1.0, 2.0])
            .title("histogram")
            .render()
            .unwrap(),
        LineChart::new()
            .series("s", &[1.0, 3.0, 2.0])
            .title("lines")
            .render()
            .unwrap(),
        AttentionGrid::new(&[vec![vec![1.0, 0.0], vec![0.5, 0.5]]])
            .title("attention")
            .render()
            .unwrap(),
    ];
    for fig in figures {
        let png = fig.to_png(2.0).unwrap();
        let (w, h, rgba) = decode_png(&png);
        assert_eq!(w, (fig.width() * 2.0).ceil() as u32, "{fig}");
        assert_eq!(h, (fig.height() * 2.0).ceil() as u32, "{fig}");
        let (inked, colours) = ink(&rgba);
        assert!(
            inked > 0.02 && colours > 20,
            "{fig}: {inked} inked, {colours} colours"
        );
    }
}

#[test]
fn png_text_is_drawn_without_system_fonts() {
    // A figure that is only a title: any ink comes from the embedded font.
    let fig = BarChart::new(["a"])
        .series("n", &[0.0])
        .title("Title text")
        .render()
        .unwrap();
    let png = fig.to_png(1.0).unwrap();
    let (w, _, rgba) = decode_png(&png);
    // The title's band: top 30 px, left half.
    let band: Vec<u8> = rgba
        .chunks_exact(4 * w as usize)
        .take(30)
        .flat_map(|row| row[..(w as usize / 2) * 4].to_vec())
        .collect();
    let (inked, _) = ink(&band);
    assert!(inked > 0.01, "no title glyphs rendered ({inked})");
}

#[test]
fn to_png_rejects_a_non_positive_scale() {
    let fig = Heatmap::new(&[vec![1.0]]).render().unwrap();
    assert!(
        matches!(fig.to_png(0.0), Err(PlotError::InvalidArgument { name, .. }) if name == "scale")
    );
    assert!(fig.to_png(f32::NAN).is_err());
}

#[test]
fn save_writes_svg_or_png_by_extension() {
    let dir = scratch_dir("figure");
    let fig = Heatmap::new(&[vec![1.0, 2.0]]).render().unwrap();
    fig.save(dir.join("f.svg")).unwrap();
    fig.save(dir.join("f.PNG")).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("f.svg")).unwrap(),
        fig.to_svg()
    );
    let png = std::fs::read(dir.join("f.PNG")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let err = fig.save(dir.join("f.jpg")).unwrap_err();
    assert!(matches!(err, PlotError::UnsupportedExtension { .. }));
    assert!(err.to_string().contains(".svg, .png"));
    let err = fig.save(dir.join("missing-dir").join("f.svg")).unwrap_err();
    assert!(matches!(err, PlotError::Io { .. }));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn svg_declares_its_size_and_uses_no_ids_or_stylesheets() {
    let fig = Heatmap::new(&[vec![1.0, 2.0]]).render().unwrap();
    let svg = fig.to_svg();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.contains(&format!("width=\"{}\"", fig.width())));
    // Several figures inlined in one page must not clash or restyle it.
    assert!(!svg.contains(" id=") && !svg.contains("<style"));
}

