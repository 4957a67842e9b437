//! Keys to a chart's encoding: the colour bar beside heatmaps and the
//! legend of series beside bar and line charts.

use super::axis::{
    numeric_labels_width, Area, Scale, Tick, MAX_LABEL_PX, TICK_GAP, TICK_LEN, TITLE_GAP,
};
use super::svg::{Anchor, Stroke, Svg, TextStyle};
use super::theme::{self, text_width, truncate_to_width, Colormap, Rgb};

/// A vertical colour bar for `cmap` over [lo, hi].
pub(crate) struct ColorBar<'a> {
    pub cmap: Colormap,
    pub lo: f64,
    pub hi: f64,
    pub label: Option<&'a str>,
}

const BAR_GAP: f64 = 18.0;
const BAR_WIDTH: f64 = 12.0;
const BAR_STEPS: usize = 64;

impl ColorBar<'_> {
    fn ticks(&self) -> Vec<Tick> {
        Scale::linear(self.lo, self.hi).ticks(5)
    }

    /// Width it takes right of the plot area.
    pub fn width(&self) -> f64 {
        BAR_GAP
            + BAR_WIDTH
            + TICK_LEN
            + TICK_GAP
            + numeric_labels_width(&self.ticks())
            + self
                .label
                .map_or(0.0, |_| TITLE_GAP + theme::AXIS_TITLE_SIZE)
    }

    /// Draws it beside `area`, as tall as the area (at most 320 px).
    pub fn draw(&self, svg: &mut Svg, area: Area) {
        let x = area.right() + BAR_GAP;
        let h = area.h.clamp(60.0, 320.0);
        let y = area.y;
        let step_h = h / BAR_STEPS as f64;
        for i in 0..BAR_STEPS {
            // Top is the high end; overlap by half a pixel to avoid seams.
            let t = 1.0 - (i as f64 + 0.5) / BAR_STEPS as f64;
            svg.rect(
                x,
                y + i as f64 * step_h,
                BAR_WIDTH,
                step_h + 0.5,
                self.cmap.at(t),
                None,
            );
        }
        svg.rect_outline(x, y, BAR_WIDTH, h, theme::AXIS, 0.6);
        let scale = Scale::linear(self.lo, self.hi);
        let ticks = self.ticks();
        let style = TextStyle::new(theme::TICK_SIZE);
        for t in &ticks {
            let Some(f) = scale.frac(t.value) else {
                continue;
            };
            let ty = y + h - f * h;
            svg.line(
                x + BAR_WIDTH,
                ty,
                x + BAR_WIDTH + TICK_LEN,
                ty,
                Stroke::solid(theme::AXIS, 1.0),
            );
            svg.text(x + BAR_WIDTH + TICK_LEN + TICK_GAP, ty, &t.label, style);
        }
        if let Some(label) = self.label {
            let lx = x
                + BAR_WIDTH
                + TICK_LEN
                + TICK_GAP
                + numeric_labels_width(&ticks)
                + TITLE_GAP
                + theme::AXIS_TITLE_SIZE * 0.5;
            svg.text(
                lx,
                y + h / 2.0,
                label,
                TextStyle::new(theme::AXIS_TITLE_SIZE)
                    .anchor(Anchor::Middle)
                    .rotate(-90.0),
            );
        }
    }
}

/// How a legend entry's swatch looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Swatch {
    Block,
    Line,
    DashedLine,
}

/// One legend entry.
pub(crate) struct LegendEntry {
    pub name: String,
    pub color: Rgb,
    pub swatch: Swatch,
}

const LEGEND_GAP: f64 = 16.0;
const LEGEND_ROW: f64 = 18.0;
const SWATCH: f64 = 14.0;

/// Width a legend needs right of the plot area.
pub(crate) fn legend_width(entries: &[LegendEntry]) -> f64 {
    if entries.is_empty() {
        return 0.0;
    }
    let names = entries
        .iter()
        .map(|e| {
            text_width(
                &truncate_to_width(&e.name, theme::TICK_SIZE, MAX_LABEL_PX),
                theme::TICK_SIZE,
            )
        })
        .fold(0.0, f64::max);
    LEGEND_GAP + SWATCH + 6.0 + names
}

/// Height a legend needs.
pub(crate) fn legend_height(entries: &[LegendEntry]) -> f64 {
    entries.len() as f64 * LEGEND_ROW
}

/// Draws the legend right of `area`, top aligned.
pub(crate) fn draw_legend(svg: &mut Svg, area: Area, entries: &[LegendEntry]) {
    let x = area.right() + LEGEND_GAP;
    for (i, e) in entries.iter().enumerate() {
        let cy = area.y + (i as f64 + 0.5) * LEGEND_ROW;
        match e.swatch {
            Swatch::Block => svg.rect(x, cy - 5.0, SWATCH, 10.0, e.color, None),
            Swatch::Line => svg.line(x, cy, x + SWATCH, cy, Stroke::solid(e.color, 2.0)),
            Swatch::DashedLine => svg.line(x, cy, x + SWATCH, cy, Stroke::dashed(e.color, 1.5)),
        }
        let name = truncate_to_width(&e.name, theme::TICK_SIZE, MAX_LABEL_PX);
        svg.text(
            x + SWATCH + 6.0,
            cy,
            &name,
            TextStyle::new(theme::TICK_SIZE),
        );
    }
}
