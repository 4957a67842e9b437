//! A gallery for visual review: every chart type drawn from small synthetic
//! data (the shapes DeepSeek-style models produce), written as SVG and PNG,
//! with an `index.html` that shows them all inline (tooltips work there).
//!
//! Development tooling, not part of the library: `make gallery` runs this
//! example, which calls [`write_all`] with `target/gallery`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use deepscope::plot::{
    readable_token, AttentionGrid, BarChart, BarMode, Colormap, Figure, Heatmap, Histogram,
    LineChart, Markers, PlotError, Table, TokenStrip,
};

type Result<T> = std::result::Result<T, PlotError>;

/// `s` with the HTML special characters escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Writes `bytes` to `path`, naming the path when it fails.
fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|cause| PlotError::Io { path: path.to_path_buf(), cause })
}

/// Scale of the PNG files.
const PNG_SCALE: f32 = 2.0;

/// Writes one SVG and one PNG per chart, the HTML pieces (token strips,
/// table) and `index.html` into `dir` (created if missing). Returns the
/// paths written.
pub fn write_all(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|cause| PlotError::Io { path: dir.to_path_buf(), cause })?;
    let mut written = Vec::new();
    let mut index = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>DeepScope plot gallery</title></head>\
         <body style=\"font-family:DejaVu Sans, Verdana, sans-serif;margin:24px\">\n<h1>DeepScope plot gallery</h1>\n",
    );
    for (name, figure) in figures()? {
        for ext in ["svg", "png"] {
            let path = dir.join(format!("{name}.{ext}"));
            if ext == "png" {
                figure.save_png(&path, PNG_SCALE)?;
            } else {
                figure.save(&path)?;
            }
            written.push(path);
        }
        let _ = write!(
            index,
            "<h2 style=\"font-size:15px\">{name} <small style=\"color:#777\">— {}</small></h2>\n{}\n\
             <p><a href=\"{name}.png\">PNG</a></p>\n",
            escape(figure.description()),
            figure.to_html()
        );
    }
    for (name, html) in html_pieces()? {
        let path = dir.join(format!("{name}.html"));
        write(&path, html.as_bytes())?;
        written.push(path);
        let _ = write!(index, "<h2 style=\"font-size:15px\">{name}</h2>\n{html}\n");
    }
    let table = table();
    let txt = dir.join("table.txt");
    table.save(&txt)?;
    written.push(txt);
    let _ = write!(
        index,
        "<h2 style=\"font-size:15px\">table (plain text)</h2>\n<pre>{}</pre>\n",
        escape(&table.to_string())
    );
    index.push_str("</body></html>\n");
    let path = dir.join("index.html");
    write(&path, index.as_bytes())?;
    written.push(path);
    Ok(written)
}

/// Every chart of the gallery, by file name.
pub fn figures() -> Result<Vec<(&'static str, Figure)>> {
    let mut rng = Rng(0x5eed);
    let tokens = sample_tokens();
    let labels: Vec<String> = tokens.iter().map(|t| readable_token(t)).collect();
    let n_experts = 16;

    // Routing weights: each token picks 4 of 16 experts, weights sum to 1.
    let routing: Vec<Vec<f64>> = tokens
        .iter()
        .map(|_| {
            let mut row = vec![0.0; n_experts];
            let mut total = 0.0;
            for _ in 0..4 {
                let e = (rng.uniform() * n_experts as f64) as usize % n_experts;
                let w = 0.2 + rng.uniform();
                row[e] += w;
                total += w;
            }
            row.iter().map(|w| w / total).collect()
        })
        .collect();
    let expert_labels: Vec<String> = (0..n_experts).map(|e| format!("e{e}")).collect();
    let heatmap = Heatmap::new(&routing)
        .title("Routing weights, layer 3 (top-4 of 16 experts)")
        .x_labels(&expert_labels)
        .y_labels(&labels)
        .x_title("expert")
        .y_title("token")
        .value_name("routing weight")
        .render()?;

    // Expert load per layer: 26 layers x 64 experts, a few hot experts.
    let load: Vec<Vec<f64>> = (0..26)
        .map(|l| {
            (0..64)
                .map(|e| {
                    let hot = if (e * 7 + l) % 23 == 0 { 3.0 } else { 1.0 };
                    hot * (0.6 + 0.8 * rng.uniform()) / 64.0
                })
                .collect()
        })
        .collect();
    let heatmap_load = Heatmap::new(&load)
        .title("Expert load per layer (share of routed tokens)")
        .y_labels((1..=26).map(|l| format!("layer {l}")))
        .x_title("expert")
        .value_name("share")
        .colormap(Colormap::Magma)
        .render()?;

    // A signed matrix with values written in, and a NaN.
    let mut signed: Vec<Vec<f64>> = (0..10)
        .map(|i| {
            (0..10)
                .map(|j| ((i as f64 - j as f64) / 4.0).sin() * (1.0 + rng.normal() * 0.1))
                .collect()
        })
        .collect();
    signed[2][7] = f64::NAN;
    let heatmap_signed = Heatmap::new(&signed)
        .title("Change in routing logits after ablating head 5")
        .x_title("expert")
        .y_title("layer")
        .value_name("Δ logit")
        .colormap(Colormap::RdBu)
        .show_values(true)
        .render()?;

    // A large matrix: 160 positions x 96 positions, labels thinned.
    let many: Vec<String> = (0..160).map(|i| labels[i % labels.len()].clone()).collect();
    let large: Vec<Vec<f64>> = (0..160)
        .map(|i| {
            (0..96)
                .map(|j| ((i as f64) * 0.05).sin() * ((j as f64) * 0.11).cos() + 0.2 * rng.normal())
                .collect()
        })
        .collect();
    let heatmap_large = Heatmap::new(&large)
        .title("Activation of 96 MLA latent channels over 160 tokens")
        .y_labels(&many)
        .y_title("token")
        .x_title("c_kv channel")
        .value_name("activation")
        .colormap(Colormap::RdBu)
        .render()?;

    let layer_load: Vec<f64> = (0..n_experts)
        .map(|e| (1.0 + 0.6 * ((e * 5 % 7) as f64 - 3.0) / 3.0) / n_experts as f64)
        .collect();
    let bars = BarChart::new(&expert_labels)
        .series("load", &layer_load)
        .mean_line(true)
        .title("Expert load, layer 3 (share of routed tokens)")
        .x_title("expert")
        .y_title("share of tokens")
        .render()?;

    let experts8: Vec<String> = (0..8).map(|e| format!("expert {e}")).collect();
    let mut grouped = BarChart::new(&experts8)
        .title("Tokens per expert in three layers")
        .x_title("expert")
        .y_title("tokens")
        .mean_line(true);
    for layer in [1, 10, 20] {
        let counts: Vec<f64> = (0..8)
            .map(|_| (80.0 + 60.0 * rng.uniform()).round())
            .collect();
        grouped = grouped.series(format!("layer {layer}"), &counts);
    }
    let bars_grouped = grouped.render()?;

    let layers: Vec<String> = (1..=12).map(|l| l.to_string()).collect();
    let shared: Vec<f64> = (0..12).map(|_| 0.3 + 0.05 * rng.normal()).collect();
    let routed: Vec<f64> = (0..12).map(|l| 0.5 + 0.02 * l as f64).collect();
    let attn: Vec<f64> = (0..12).map(|_| 0.2 + 0.03 * rng.uniform()).collect();
    let bars_stacked = BarChart::new(&layers)
        .series("attention", &attn)
        .series("shared experts", &shared)
        .series("routed experts", &routed)
        .mode(BarMode::Stacked)
        .title("Update norm by sublayer")
        .x_title("layer")
        .y_title("‖Δh‖ / ‖h‖")
        .render()?;

    // Heavy-tailed activations: mostly normal, a few outliers.
    let acts: Vec<f64> = (0..20_000)
        .map(|i| {
            let z = rng.normal();
            if i % 200 == 0 {
                z * 12.0
            } else {
                z
            }
        })
        .collect();
    let histogram = Histogram::new(&acts)
        .title("MLP activations, layer 5")
        .x_title("activation")
        .render()?;
    let histogram_log = Histogram::new(&acts)
        .bins(60)
        .log_count(true)
        .title("MLP activations, layer 5 (log count shows the outliers)")
        .x_title("activation")
        .render()?;

    let n_layers = 27;
    let mean: Vec<f64> = (0..n_layers)
        .map(|l| 0.02 * l as f64 + 0.05 * rng.normal())
        .collect();
    let std: Vec<f64> = (0..n_layers).map(|l| 1.0 + 0.15 * l as f64).collect();
    let max: Vec<f64> = (0..n_layers)
        .map(|l| 2.0 + 0.4 * l as f64 + rng.uniform())
        .collect();
    let lines = LineChart::new()
        .series("mean", &mean)
        .series("std", &std)
        .series(
            "max |h| / 5",
            &max.iter().map(|m| m / 5.0).collect::<Vec<_>>(),
        )
        .title("Residual-stream statistics per layer")
        .x_title("layer")
        .y_title("value")
        .render()?;

    let spectrum = |decay: f64| -> Vec<f64> {
        (0..512)
            .map(|i| 10.0 * (-(i as f64) / decay).exp() + 1e-3)
            .collect()
    };
    let lines_spectrum = LineChart::new()
        .series("W_dkv (down-projection)", &spectrum(40.0))
        .series("W_uk (key up-projection)", &spectrum(90.0))
        .series("W_uv (value up-projection)", &spectrum(150.0))
        .y_log(true)
        .title("Singular values of the MLA projections, layer 0")
        .x_title("index")
        .y_title("singular value")
        .render()?;

    let steps: Vec<f64> = (1..=2000).map(f64::from).collect();
    let loss: Vec<f64> = steps
        .iter()
        .map(|&s| 2.0 + 8.0 / (1.0 + s / 50.0) + 0.15 * rng.normal())
        .collect();
    let loss_bal: Vec<f64> = steps
        .iter()
        .map(|&s| 2.1 + 8.0 / (1.0 + s / 45.0) + 0.15 * rng.normal())
        .collect();
    let lines_loss = LineChart::new()
        .series_xy("aux-loss-free", &steps, &loss)
        .series_xy("aux loss 0.01", &steps, &loss_bal)
        .x_log(true)
        .markers(Markers::Never)
        .title("Training loss")
        .x_title("step")
        .y_title("cross-entropy")
        .render()?;

    let t = 12;
    let heads: Vec<Vec<Vec<f64>>> = (0..8)
        .map(|h| {
            (0..t)
                .map(|q| {
                    let raw: Vec<f64> = (0..t)
                        .map(|k| {
                            if k > q {
                                0.0
                            } else {
                                let prev = if h % 3 == 0 && k + 1 == q { 4.0 } else { 0.0 };
                                let first = if h % 3 == 1 && k == 0 { 4.0 } else { 0.0 };
                                (prev + first + rng.uniform()).exp()
                            }
                        })
                        .collect();
                    let s: f64 = raw.iter().sum();
                    raw.iter().map(|v| v / s).collect()
                })
                .collect()
        })
        .collect();
    let attention = AttentionGrid::new(&heads)
        .tokens(&labels[..t])
        .range(0.0, 1.0)
        .title("Attention patterns, layer 0 (8 of 128 heads)")
        .render()?;

    // a user's own chart, drawn with plotters
    let plotters_chart = Figure::from_plotters(560, 340, |root| {
        use plotters::prelude::*;
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption("Expert load against router bias (plotters)", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(-0.3..0.3, 0.0..2.5)?;
        chart.configure_mesh().x_desc("router bias").y_desc("load / mean").draw()?;
        let points: Vec<(f64, f64)> = (0..64)
            .map(|e| ((((e * 37) % 64) as f64 / 64.0 - 0.5) * 0.5, 0.4 + ((e * 11) % 17) as f64 / 8.0))
            .collect();
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
        Ok(())
    })?;

    Ok(vec![
        ("heatmap", heatmap),
        ("heatmap_load", heatmap_load),
        ("heatmap_signed", heatmap_signed),
        ("heatmap_large", heatmap_large),
        ("bars", bars),
        ("bars_grouped", bars_grouped),
        ("bars_stacked", bars_stacked),
        ("histogram", histogram),
        ("histogram_log", histogram_log),
        ("lines", lines),
        ("lines_spectrum", lines_spectrum),
        ("lines_loss", lines_loss),
        ("attention_grid", attention),
        ("plotters", plotters_chart),
    ])
}

fn html_pieces() -> Result<Vec<(&'static str, String)>> {
    let tokens = sample_tokens();
    let loss: Vec<f64> = (0..tokens.len())
        .map(|i| 0.3 + 5.0 * (((i * 37) % 11) as f64 / 11.0).powi(2))
        .collect();
    let strip = TokenStrip::new(&tokens, &loss)?
        .value_name("loss (nats)")
        .title("Next-token loss");
    let experts: Vec<usize> = (0..tokens.len()).map(|i| (i * 7 + i / 3) % 12).collect();
    let strip_experts = TokenStrip::categorical(&tokens, &experts)?
        .category_names((0..64).map(|e| format!("expert {e}")))
        .value_name("top-1 expert, layer 3")
        .title("Top-1 routed expert per token");
    Ok(vec![
        ("token_strip", strip.to_html()),
        ("token_strip_experts", strip_experts.to_html()),
        ("table", table().to_html()),
    ])
}

fn table() -> Table {
    let mut table = Table::new([
        "layer",
        "experts",
        "max load",
        "min load",
        "imbalance",
        "note",
    ])
    .caption("Expert load per layer (share of routed tokens)");
    for l in 1..=6u32 {
        let max = 0.02 + 0.004 * f64::from(l);
        let min = 0.01 - 0.001 * f64::from(l);
        let note = match l {
            1 => "first MoE layer",
            3 => "<hot> expert 7 & 12",
            _ => "",
        };
        // Rows always match the six headers, so this cannot fail.
        let _ = table.add_row([
            l.into(),
            64.into(),
            max.into(),
            min.into(),
            (max / min).into(),
            note.into(),
        ]);
    }
    table
}

/// A sentence as a byte-level BPE tokenizer would split it.
fn sample_tokens() -> Vec<String> {
    [
        "The",
        "Ġmixture",
        "-of",
        "-ex",
        "perts",
        "Ġlayer",
        "Ġroutes",
        "Ġeach",
        "Ġtoken",
        "Ġto",
        "Ġ",
        "4",
        "Ġof",
        "Ġ",
        "64",
        "Ġexperts",
        ".",
        "Ċ",
        "Ġ<",
        "html",
        ">",
        "Ġ&",
        "Ġ\"",
        "quotes",
        "\"",
        "Ġcaf",
        "Ã©",
        "Ġ",
        "ä¸Ń",
        "æĸĩ",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A small deterministic generator (PCG-style LCG), so the gallery is the
/// same on every run without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box–Muller.
    fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-12);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}
