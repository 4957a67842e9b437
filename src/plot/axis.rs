//! Scales, ticks and the furniture around a plot area: axes with their
//! labels and the title block. Shared by every chart so that they all look
//! alike. Colour bars and legends are in `legend.rs`.

use super::svg::{Anchor, Stroke, Svg, TextStyle};
use super::theme::{self, text_width, truncate_to_width, Rgb};

/// Length of tick marks, px.
pub(crate) const TICK_LEN: f64 = 4.0;
/// Space between a tick and its label, px.
pub(crate) const TICK_GAP: f64 = 3.0;
/// Space between tick labels and the axis title, px.
pub(crate) const TITLE_GAP: f64 = 8.0;
/// Longest a categorical label may be before it is cut with "…", px.
pub(crate) const MAX_LABEL_PX: f64 = 150.0;

/// The rectangle data are drawn in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Area {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Area {
    pub fn right(&self) -> f64 {
        self.x + self.w
    }
    pub fn bottom(&self) -> f64 {
        self.y + self.h
    }
}

/// One tick: where and what it says.
#[derive(Clone, Debug)]
pub(crate) struct Tick {
    pub value: f64,
    pub label: String,
}

/// A numeric scale from data to the unit interval.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scale {
    Linear {
        lo: f64,
        hi: f64,
    },
    /// Bounds are positive; maps log10 linearly.
    Log {
        lo: f64,
        hi: f64,
    },
}

impl Scale {
    /// A linear scale over [lo, hi]; a zero-width range is widened so that
    /// constant data still have somewhere to sit.
    pub fn linear(lo: f64, hi: f64) -> Scale {
        let (lo, hi) = widen(lo, hi);
        Scale::Linear { lo, hi }
    }

    /// A log scale over [lo, hi], both positive.
    pub fn log(lo: f64, hi: f64) -> Scale {
        // Bounds kept 600 decades apart at most, so tick arithmetic stays
        // finite whatever the data.
        let lo = if lo.is_finite() {
            lo.clamp(1e-300, 1e299)
        } else {
            1e-300
        };
        let hi = if hi.is_finite() { hi.min(1e300) } else { 1e300 };
        let hi = if hi > lo { hi } else { lo * 10.0 };
        Scale::Log { lo, hi }
    }

    /// A linear scale whose ends are extended to multiples of a nice step
    /// (for count and value axes).
    pub fn linear_nice(lo: f64, hi: f64, target: usize) -> Scale {
        let (lo, hi) = widen(lo, hi);
        let step = nice_step((hi - lo) / target.max(1) as f64);
        // The tolerance keeps a bound that is already a multiple of the
        // step (such as 0) where it is.
        Scale::Linear {
            lo: (lo / step + 1e-9).floor() * step,
            hi: (hi / step - 1e-9).ceil() * step,
        }
    }

    /// Where `v` falls, 0 at `lo` and 1 at `hi` (outside for values beyond);
    /// `None` when it cannot be placed (NaN, infinite, non-positive on log).
    pub fn frac(&self, v: f64) -> Option<f64> {
        if !v.is_finite() {
            return None;
        }
        match *self {
            Scale::Linear { lo, hi } => Some((v - lo) / (hi - lo)),
            Scale::Log { lo, hi } => {
                (v > 0.0).then(|| (v.log10() - lo.log10()) / (hi.log10() - lo.log10()))
            }
        }
    }

    pub fn bounds(&self) -> (f64, f64) {
        match *self {
            Scale::Linear { lo, hi } | Scale::Log { lo, hi } => (lo, hi),
        }
    }

    /// About `target` ticks inside the range, at round values.
    pub fn ticks(&self, target: usize) -> Vec<Tick> {
        match *self {
            Scale::Linear { lo, hi } => linear_ticks(lo, hi, target),
            Scale::Log { lo, hi } => log_ticks(lo, hi),
        }
    }
}

fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if !(hi - lo).is_finite() {
        // A span beyond f64 (data near ±1.8e308): keep it representable.
        return (lo.max(-1e307), hi.min(1e307));
    }
    if hi > lo {
        return (lo, hi);
    }
    let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
    (lo - pad, hi + pad)
}

/// 1, 2, 2.5 or 5 times a power of ten, the smallest not below `raw`.
pub(crate) fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 2.5 {
        2.5
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * p
}

fn linear_ticks(lo: f64, hi: f64, target: usize) -> Vec<Tick> {
    let step = nice_step((hi - lo) / target.max(1) as f64);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    if last.saturating_sub(first) > 1000 {
        // Only when the range has no room for round values (lo and hi a few
        // ulps apart at a huge magnitude): better no ticks than a million.
        return Vec::new();
    }
    (first..=last)
        .map(|k| {
            let value = k as f64 * step;
            Tick {
                value,
                label: theme::format_tick(value, step),
            }
        })
        .collect()
}

fn log_ticks(lo: f64, hi: f64) -> Vec<Tick> {
    let (a, b) = (lo.log10(), hi.log10());
    let first = (a - 1e-9).ceil() as i32;
    let last = (b + 1e-9).floor() as i32;
    let decades = (last - first + 1).max(0);
    let mut values: Vec<f64> = Vec::new();
    if decades >= 2 {
        // Every k-th power so that no more than about 8 ticks remain.
        let every = ((decades as f64) / 8.0).ceil().max(1.0) as i32;
        let mut e = first;
        while e <= last {
            values.push(10f64.powi(e));
            e += every;
        }
    } else {
        // Less than two decades: 1, 2, 5 in each one the range touches.
        for e in (a.floor() as i32)..=(b.ceil() as i32) {
            for m in [1.0, 2.0, 5.0] {
                let v = m * 10f64.powi(e);
                if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                    values.push(v);
                }
            }
        }
    }
    values
        .into_iter()
        .map(|v| Tick {
            value: v,
            label: log_label(v),
        })
        .collect()
}

fn log_label(v: f64) -> String {
    if (1e-3..1e5).contains(&v) {
        theme::format_value(v)
    } else {
        let e = v.log10().floor() as i32;
        let m = v / 10f64.powi(e);
        if (m - 1.0).abs() < 1e-9 {
            format!("1e{e}")
        } else {
            format!("{}e{e}", m.round())
        }
    }
}

/// How a row of categorical labels is shown: every `step`-th label, at
/// `rotate` degrees, needing `extent` px perpendicular to the axis.
pub(crate) struct BandLabels {
    pub labels: Vec<String>,
    /// Width of the widest label, px.
    pub max_w: f64,
    pub step: usize,
    pub rotate: f64,
    pub extent: f64,
}

/// Lays out categorical labels under an x axis whose bands are `band` px.
pub(crate) fn layout_x_band(labels: &[String], band: f64) -> BandLabels {
    let size = theme::TICK_SIZE;
    let shown: Vec<String> = labels
        .iter()
        .map(|l| truncate_to_width(l, size, MAX_LABEL_PX))
        .collect();
    let max_w = shown
        .iter()
        .map(|l| text_width(l, size))
        .fold(0.0, f64::max);
    let band = band.max(1e-6);
    let line = size * 1.25;
    let step_horizontal = ((max_w + 6.0) / band).ceil().max(1.0) as usize;
    let (step, rotate, extent) = if step_horizontal == 1 {
        (1, 0.0, size * 1.2)
    } else {
        // Rotated labels are spaced by band * sin(angle) across their length.
        let step_45 = (line / (band * std::f64::consts::FRAC_1_SQRT_2))
            .ceil()
            .max(1.0) as usize;
        if step_45 == 1 && max_w <= 90.0 {
            (1, -45.0, max_w * std::f64::consts::FRAC_1_SQRT_2 + size)
        } else {
            let step = (line / band).ceil().max(1.0) as usize;
            // Only every step-th label is drawn: measure those.
            let shown_w = shown
                .iter()
                .step_by(step)
                .map(|l| text_width(l, size))
                .fold(0.0, f64::max);
            (step, -90.0, shown_w + 2.0)
        }
    };
    BandLabels {
        labels: shown,
        max_w,
        step,
        rotate,
        extent,
    }
}

impl BandLabels {
    /// How far the first label reaches left of the plot area (rotated or
    /// wide labels under an x axis), px.
    pub fn left_overhang(&self, band: f64) -> f64 {
        if self.rotate == -45.0 {
            self.max_w * std::f64::consts::FRAC_1_SQRT_2 - band / 2.0
        } else if self.rotate == 0.0 {
            self.labels
                .first()
                .map_or(0.0, |l| text_width(l, theme::TICK_SIZE) / 2.0 - band / 2.0)
        } else {
            0.0
        }
        .max(0.0)
    }

    /// How far the last label reaches right of the plot area, px.
    pub fn right_overhang(&self, band: f64) -> f64 {
        if self.rotate == 0.0 {
            self.labels
                .last()
                .map_or(0.0, |l| text_width(l, theme::TICK_SIZE) / 2.0 - band / 2.0)
                .max(0.0)
        } else {
            0.0
        }
    }
}

/// Lays out categorical labels beside a y axis whose bands are `band` px.
pub(crate) fn layout_y_band(labels: &[String], band: f64) -> BandLabels {
    let size = theme::TICK_SIZE;
    let shown: Vec<String> = labels
        .iter()
        .map(|l| truncate_to_width(l, size, MAX_LABEL_PX))
        .collect();
    let step = ((size * 1.15) / band.max(1e-6)).ceil().max(1.0) as usize;
    let max_w = shown
        .iter()
        .step_by(step)
        .map(|l| text_width(l, size))
        .fold(0.0, f64::max);
    BandLabels {
        labels: shown,
        max_w,
        step,
        rotate: 0.0,
        extent: max_w,
    }
}

/// Width taken by the labels of a numeric y axis.
pub(crate) fn numeric_labels_width(ticks: &[Tick]) -> f64 {
    ticks
        .iter()
        .map(|t| text_width(&t.label, theme::TICK_SIZE))
        .fold(0.0, f64::max)
}

/// Space needed left of the plot area for y tick labels `extent` px wide
/// and an optional axis title.
pub(crate) fn left_margin(extent: f64, title: Option<&str>) -> f64 {
    TICK_LEN + TICK_GAP + extent + title.map_or(0.0, |_| TITLE_GAP + theme::AXIS_TITLE_SIZE)
}

/// Space needed below the plot area for x tick labels `extent` px tall and
/// an optional axis title.
pub(crate) fn bottom_margin(extent: f64, title: Option<&str>) -> f64 {
    TICK_LEN + TICK_GAP + extent + title.map_or(0.0, |_| TITLE_GAP + theme::AXIS_TITLE_SIZE)
}

/// Height of the title block (title and subtitle lines), 0 when neither.
pub(crate) fn title_height(title: Option<&str>, subtitle: Option<&str>) -> f64 {
    let mut h = 0.0;
    if title.is_some() {
        h += theme::TITLE_SIZE * 1.4;
    }
    if subtitle.is_some() {
        h += theme::SUBTITLE_SIZE * 1.45;
    }
    if h > 0.0 {
        h + 6.0
    } else {
        0.0
    }
}

/// Width the title block needs.
pub(crate) fn title_width(title: Option<&str>, subtitle: Option<&str>) -> f64 {
    let t = title.map_or(0.0, |t| text_width(t, theme::TITLE_SIZE));
    let s = subtitle.map_or(0.0, |s| text_width(s, theme::SUBTITLE_SIZE));
    t.max(s)
}

/// Draws the title and subtitle at the top left.
pub(crate) fn draw_title(svg: &mut Svg, title: Option<&str>, subtitle: Option<&str>) {
    let mut y = theme::PAD;
    if let Some(t) = title {
        svg.text(
            theme::PAD,
            y + theme::TITLE_SIZE * 0.6,
            t,
            TextStyle::new(theme::TITLE_SIZE).color(Rgb(0x11, 0x11, 0x11)),
        );
        y += theme::TITLE_SIZE * 1.4;
    }
    if let Some(s) = subtitle {
        svg.text(
            theme::PAD,
            y + theme::SUBTITLE_SIZE * 0.6,
            s,
            TextStyle::new(theme::SUBTITLE_SIZE).color(theme::MUTED_TEXT),
        );
    }
}

/// Draws a numeric y axis on the left of `area`: line, ticks, labels, light
/// horizontal grid lines when `grid`, and the rotated title.
pub(crate) fn draw_y_numeric(
    svg: &mut Svg,
    area: Area,
    scale: &Scale,
    ticks: &[Tick],
    title: Option<&str>,
    grid: bool,
) {
    let style = TextStyle::new(theme::TICK_SIZE).anchor(Anchor::End);
    for t in ticks {
        let Some(f) = scale.frac(t.value) else {
            continue;
        };
        let y = area.bottom() - f * area.h;
        if grid && f > 1e-6 {
            svg.line(area.x, y, area.right(), y, Stroke::solid(theme::GRID, 1.0));
        }
        svg.line(
            area.x - TICK_LEN,
            y,
            area.x,
            y,
            Stroke::solid(theme::AXIS, 1.0),
        );
        svg.text(area.x - TICK_LEN - TICK_GAP, y, &t.label, style);
    }
    svg.line(
        area.x,
        area.y,
        area.x,
        area.bottom(),
        Stroke::solid(theme::AXIS, 1.0),
    );
    if let Some(title) = title {
        let extent = numeric_labels_width(ticks);
        draw_y_title(svg, area, extent, title);
    }
}

/// Draws a numeric x axis under `area`, with light vertical grid lines when
/// `grid`.
pub(crate) fn draw_x_numeric(
    svg: &mut Svg,
    area: Area,
    scale: &Scale,
    ticks: &[Tick],
    title: Option<&str>,
    grid: bool,
) {
    let style = TextStyle::new(theme::TICK_SIZE).anchor(Anchor::Middle);
    let y0 = area.bottom();
    for t in ticks {
        let Some(f) = scale.frac(t.value) else {
            continue;
        };
        let x = area.x + f * area.w;
        if grid && f > 1e-6 && f < 1.0 - 1e-6 {
            svg.line(x, area.y, x, y0, Stroke::solid(theme::GRID, 1.0));
        }
        svg.line(x, y0, x, y0 + TICK_LEN, Stroke::solid(theme::AXIS, 1.0));
        svg.text(
            x,
            y0 + TICK_LEN + TICK_GAP + theme::TICK_SIZE * 0.6,
            &t.label,
            style,
        );
    }
    svg.line(
        area.x,
        y0,
        area.right(),
        y0,
        Stroke::solid(theme::AXIS, 1.0),
    );
    if let Some(title) = title {
        draw_x_title(svg, area, theme::TICK_SIZE * 1.2, title);
    }
}

/// Draws categorical labels under `area`, one band per label.
pub(crate) fn draw_x_band(svg: &mut Svg, area: Area, layout: &BandLabels, title: Option<&str>) {
    let n = layout.labels.len();
    let band = area.w / n.max(1) as f64;
    let y0 = area.bottom();
    let base = TextStyle::new(theme::TICK_SIZE).rotate(layout.rotate);
    let style = if layout.rotate == 0.0 {
        base.anchor(Anchor::Middle)
    } else {
        base.anchor(Anchor::End)
    };
    for (i, label) in layout.labels.iter().enumerate().step_by(layout.step) {
        let x = area.x + (i as f64 + 0.5) * band;
        svg.line(x, y0, x, y0 + TICK_LEN, Stroke::solid(theme::AXIS, 1.0));
        let y = if layout.rotate == 0.0 {
            y0 + TICK_LEN + TICK_GAP + theme::TICK_SIZE * 0.6
        } else {
            y0 + TICK_LEN + TICK_GAP
        };
        svg.text(x, y, label, style);
    }
    svg.line(
        area.x,
        y0,
        area.right(),
        y0,
        Stroke::solid(theme::AXIS, 1.0),
    );
    if let Some(title) = title {
        draw_x_title(svg, area, layout.extent, title);
    }
}

/// Draws categorical labels left of `area`, one band per label, top down.
pub(crate) fn draw_y_band(svg: &mut Svg, area: Area, layout: &BandLabels, title: Option<&str>) {
    let n = layout.labels.len();
    let band = area.h / n.max(1) as f64;
    let style = TextStyle::new(theme::TICK_SIZE).anchor(Anchor::End);
    for (i, label) in layout.labels.iter().enumerate().step_by(layout.step) {
        let y = area.y + (i as f64 + 0.5) * band;
        svg.line(
            area.x - TICK_LEN,
            y,
            area.x,
            y,
            Stroke::solid(theme::AXIS, 1.0),
        );
        svg.text(area.x - TICK_LEN - TICK_GAP, y, label, style);
    }
    if let Some(title) = title {
        draw_y_title(svg, area, layout.extent, title);
    }
}

pub(crate) fn draw_x_title(svg: &mut Svg, area: Area, label_extent: f64, title: &str) {
    let y = area.bottom()
        + TICK_LEN
        + TICK_GAP
        + label_extent
        + TITLE_GAP
        + theme::AXIS_TITLE_SIZE * 0.5;
    svg.text(
        area.x + area.w / 2.0,
        y,
        title,
        TextStyle::new(theme::AXIS_TITLE_SIZE).anchor(Anchor::Middle),
    );
}

pub(crate) fn draw_y_title(svg: &mut Svg, area: Area, label_extent: f64, title: &str) {
    let x = area.x - TICK_LEN - TICK_GAP - label_extent - TITLE_GAP - theme::AXIS_TITLE_SIZE * 0.5;
    svg.text(
        x,
        area.y + area.h / 2.0,
        title,
        TextStyle::new(theme::AXIS_TITLE_SIZE)
            .anchor(Anchor::Middle)
            .rotate(-90.0),
    );
}

/// Finite minimum and maximum of `values`, `None` when there is no finite
/// value.
pub(crate) fn finite_range<'a>(values: impl IntoIterator<Item = &'a f64>) -> Option<(f64, f64)> {
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, &v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}
