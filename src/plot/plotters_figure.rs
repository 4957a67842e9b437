//! Users' own charts drawn with `plotters`, the ecosystem's plotting crate,
//! as [`Figure`]s: inline display, `save` to SVG or PNG, PNG display, like
//! every built-in chart.
//!
//! plotters lays text out with a font it must be given. The `ab_glyph`
//! feature keeps it free of system font libraries; its font table is a
//! registry inside plotters, which [`Figure::from_plotters`] fills once
//! (guarded by a `Once`) with the DejaVu Sans font this crate embeds, under
//! the family names plotters' styles use: `sans-serif`, `serif`, `monospace`.

use plotters::coord::Shift;
use plotters::prelude::{DrawingArea, IntoDrawingArea, SVGBackend};
use plotters::style::FontStyle;

use super::figure::Figure;
use super::{theme, PlotError, Result};

/// The error a drawing closure returns: any error (plotters' own drawing
/// errors convert into it with `?`).
pub type DrawError = Box<dyn std::error::Error + Send + Sync>;

fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for family in ["sans-serif", "serif", "monospace"] {
            for style in [FontStyle::Normal, FontStyle::Bold, FontStyle::Italic, FontStyle::Oblique] {
                // the embedded font is a valid TrueType file (checked by a test)
                let _ = plotters::style::register_font(family, style, theme::EMBEDDED_FONT);
            }
        }
    });
}

impl Figure {
    /// Draws with plotters on a `width` x `height` px SVG canvas and returns
    /// the drawing as a figure, which displays inline and saves as SVG or
    /// PNG like every built-in chart.
    ///
    /// ```
    /// use deepscope::prelude::*;
    /// use plotters::prelude::*;
    ///
    /// let load = [0.9, 1.4, 0.7, 1.0];
    /// let fig = Figure::from_plotters(480, 300, |root| {
    ///     root.fill(&WHITE)?;
    ///     let mut chart = ChartBuilder::on(root)
    ///         .caption("expert load", ("sans-serif", 18))
    ///         .x_label_area_size(30)
    ///         .y_label_area_size(40)
    ///         .build_cartesian_2d(0..load.len() as i32, 0.0..1.6)?;
    ///     chart.configure_mesh().draw()?;
    ///     chart.draw_series(LineSeries::new(load.iter().enumerate().map(|(i, v)| (i as i32, *v)), &BLUE))?;
    ///     Ok(())
    /// })?;
    /// assert!(fig.to_svg().contains("expert load"));
    /// # Ok::<(), deepscope::Error>(())
    /// ```
    pub fn from_plotters<F>(width: u32, height: u32, draw: F) -> Result<Figure>
    where
        F: for<'a> FnOnce(&DrawingArea<SVGBackend<'a>, Shift>) -> std::result::Result<(), DrawError>,
    {
        if width == 0 || height == 0 {
            return Err(PlotError::InvalidArgument {
                name: "width x height".into(),
                message: format!("{width} x {height}: a figure needs at least 1 x 1 px"),
            });
        }
        register_fonts();
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
            draw(&root).map_err(|e| PlotError::Plotters(e.to_string()))?;
            root.present().map_err(|e| PlotError::Plotters(e.to_string()))?;
        }
        Ok(Figure::from_svg(svg, width as f64, height as f64, format!("plotters chart {width}x{height}"), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::prelude::*;

    #[test]
    fn a_plotters_chart_is_a_figure_with_text_and_pixels() {
        let fig = Figure::from_plotters(320, 200, |root| {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(root)
                .caption("load against bias", ("sans-serif", 16))
                .x_label_area_size(25)
                .y_label_area_size(30)
                .build_cartesian_2d(-1.0..1.0, 0.0..2.0)?;
            chart.configure_mesh().draw()?;
            chart.draw_series(PointSeries::of_element([(-0.5, 1.2), (0.3, 0.8)], 4, &RED, &|c, s, st| Circle::new(c, s, st.filled())))?;
            Ok(())
        })
        .unwrap();
        let svg = fig.to_svg();
        assert!(svg.contains("load against bias") && svg.contains("<circle"), "{}", &svg[..svg.len().min(500)]);
        assert_eq!(fig.to_string(), "plotters chart 320x200");
        let png = fig.to_png(1.0).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn a_failing_drawing_and_an_empty_canvas_are_errors() {
        let err = Figure::from_plotters(100, 100, |_| Err("no data for layer 7".into())).unwrap_err();
        assert!(err.to_string().contains("no data for layer 7"), "{err}");
        let err = Figure::from_plotters(0, 100, |_| Ok(())).unwrap_err();
        assert!(matches!(err, PlotError::InvalidArgument { .. }), "{err}");
    }
}
