//! Rich display of every inspection object: charts and tables from
//! [`crate::plot`], bundled with the plain-text `Display` so a notebook shows
//! the chart and a terminal the text. Each type gets `mime_bundle()` and
//! `evcxr_display()` (the method evcxr calls on a cell's last expression).

use crate::error::Result;
use crate::model::plan::Plan;
use crate::model::ForwardCost;
use crate::stats::human_bytes;
use crate::plot::{
    readable_token, AttentionGrid, BarChart, BarMode, Cell, Colormap, Figure, Heatmap, LineChart, MimeBundle, MimeType,
    Table, TokenStrip,
};

use super::activations::{ActivationReport, LogitLens};
use super::compare::Comparison;
use super::corpus::{BiasReplay, RoutingStats};
use super::import::EplbPlan;
use super::mla::{EffectiveRank, LatentSpectra, RankSweep, ScoreSplit};
use super::routing::{RouterStep, RoutingMap};
use super::trace::Trace;

/// Text plus HTML made of the given parts; an error in drawing shows as text
/// instead of breaking the display.
fn bundle(text: String, parts: Vec<Result<String>>) -> MimeBundle {
    let mut html = String::new();
    for p in parts {
        match p {
            Ok(h) => html.push_str(&h),
            Err(e) => html.push_str(&format!("<pre>cannot draw: {}</pre>", crate::plot::svg::escape(&e.to_string()))),
        }
    }
    let mut b = MimeBundle::new();
    b.insert(MimeType::TextPlain, text);
    b.insert(MimeType::TextHtml, html);
    b
}

fn fig_html(f: Result<Figure>) -> Result<String> {
    f.map(|f| f.to_html())
}

macro_rules! rich_display {
    ($($t:ty),*) => {$(
        impl $t {
            /// Shows this value inline in a notebook (evcxr's display hook).
            pub fn evcxr_display(&self) {
                self.mime_bundle().evcxr_display();
            }
        }
        impl crate::kernel::cell::RichDisplay for $t {
            fn mime_bundle(&self) -> MimeBundle {
                <$t>::mime_bundle(self)
            }
        }
    )*};
}

rich_display!(
    Trace, RoutingMap, RouterStep, RoutingStats, BiasReplay, Comparison, RankSweep, LatentSpectra, EffectiveRank,
    ScoreSplit, ActivationReport, LogitLens, EplbPlan
);

fn expert_labels(n: usize) -> Vec<String> {
    (0..n).map(|e| format!("e{e}")).collect()
}

fn readable(tokens: &[String]) -> Vec<String> {
    tokens.iter().map(|t| readable_token(t)).collect()
}

impl RoutingMap {
    /// One heatmap per MoE layer: tokens x experts, coloured by routing weight.
    pub fn figures(&self) -> Result<Vec<Figure>> {
        self.layers
            .iter()
            .map(|(l, w)| {
                let e = w.first().map_or(0, |r| r.len());
                Ok(Heatmap::new(w)
                    .title(format!("Routing weights, layer {l} (tokens x experts)"))
                    .x_labels(expert_labels(e))
                    .y_labels(readable(&self.tokens))
                    .x_title("expert")
                    .y_title("token")
                    .value_name("weight")
                    .render()?)
            })
            .collect()
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        let parts = match self.figures() {
            Ok(fs) => fs.into_iter().map(|f| Ok(f.to_html())).collect(),
            Err(e) => vec![Err(e)],
        };
        bundle(self.to_string(), parts)
    }
}

impl Trace {
    /// Attention patterns of `layer`, one small heatmap per head (batch row 0).
    pub fn attention_figure(&self, layer: usize) -> Result<Figure> {
        let p = self.pattern(layer)?.select(0, 0); // [H, T, T]
        let heads = Vec::<Vec<Vec<f32>>>::try_from(&p)?;
        Ok(AttentionGrid::new(&heads)
            .tokens(readable(&self.tokens[0]))
            .head_labels((0..heads.len()).map(|h| format!("head {h}")))
            .title(format!("Attention patterns, layer {layer} (queries x keys)"))
            .render()?)
    }

    /// The text with each token coloured by its top-1 expert in `layer`.
    pub fn routing_strip(&self, layer: usize) -> Result<TokenStrip> {
        let r = self.routing_of(layer)?;
        let t = self.seq_len();
        let top1 = Vec::<i64>::try_from(r.topk_indices.narrow(0, 0, t).select(1, 0))?;
        let cats: Vec<usize> = top1.iter().map(|&x| x as usize).collect();
        Ok(TokenStrip::categorical(self.tokens[0].clone(), &cats)?
            .category_names(expert_labels(r.num_experts() as usize))
            .title(format!("Top-1 expert per token, layer {layer}")))
    }

    /// The text with each token coloured by its next-token loss (the first
    /// token has none).
    pub fn loss_strip(&self) -> Result<TokenStrip> {
        let loss = Vec::<f32>::try_from(self.loss()?.select(0, 0))?;
        Ok(TokenStrip::new(self.tokens[0][1..].to_vec(), &loss)?
            .value_name("loss (nats)")
            .title("Next-token loss per token"))
    }

    /// What the pass cost: time, weights read from disk or copied from host
    /// memory, expert-cache hits and misses.
    pub fn cost_table(&self) -> Result<Table> {
        cost_table(&self.cost)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        let mut parts = vec![Ok(format!("<p><b>{}</b></p>", crate::plot::svg::escape(&self.to_string())))];
        if self.cost.traffic.disk_reads + self.cost.traffic.host_to_device_bytes > 0 {
            parts.push(self.cost_table().map(|t| t.to_html()));
        }
        let moe: Vec<usize> = self.routing.iter().flatten().map(|r| r.layer).collect();
        if let Some(&last) = moe.last() {
            parts.push(self.routing_strip(last).map(|s| s.to_html()));
        }
        if !moe.is_empty() {
            match self.routing_map().and_then(|m| m.figures()) {
                Ok(fs) => parts.extend(fs.into_iter().map(|f| Ok(f.to_html()))),
                Err(e) => parts.push(Err(e)),
            }
        }
        bundle(self.to_string(), parts)
    }
}

impl RouterStep {
    /// Scores and choice scores of every expert, chosen ones listed. The
    /// bias is drawn centred (its mean subtracted from every expert): adding
    /// one constant to every choice score changes no choice, and a raw V3
    /// bias is often one large offset that would dwarf the scores.
    pub fn figure(&self) -> Result<Figure> {
        let e = self.scores.len();
        let chosen: Vec<String> = self.experts.iter().map(|x| format!("e{x}")).collect();
        let mean_bias = self.bias.iter().map(|&b| b as f64).sum::<f64>() / e.max(1) as f64;
        let centred: Vec<f32> =
            self.choice.iter().map(|v| if v.is_finite() { (*v as f64 - mean_bias) as f32 } else { 0.0 }).collect();
        let mut note = format!("chosen: {}; margin {:.4}", chosen.join(", "), self.margin);
        if mean_bias != 0.0 {
            note.push_str(&format!("; mean bias {mean_bias:+.3} subtracted"));
        }
        if !self.outranked_by_group.is_empty() {
            let xs: Vec<String> = self.outranked_by_group.iter().map(|x| format!("e{x}")).collect();
            note.push_str(&format!("; {} left out with their group", xs.join(", ")));
        }
        Ok(BarChart::new(expert_labels(e))
            .series("score", &self.scores)
            .series("score + bias - mean bias (choice)", &centred)
            .mode(BarMode::Grouped)
            .title(format!("Router, layer {}, token {} {:?}", self.layer, self.position, readable_token(&self.token)))
            .note(note)
            .x_title("expert")
            .y_title("score")
            .render()?)
    }

    pub fn table(&self) -> Result<Table> {
        let mut t = Table::new(["expert", "weight", "score", "bias", "choice score"]);
        for (x, w) in self.experts.iter().zip(&self.weights) {
            let i = *x as usize;
            t.add_row([format!("e{x}").into(), Cell::number(*w as f64, 4), Cell::number(self.scores[i] as f64, 4), Cell::number(self.bias[i] as f64, 4), Cell::number(self.choice[i] as f64, 4)])?;
        }
        Ok(t.caption(format!("Chosen experts, layer {} token {}", self.layer, self.position)))
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![fig_html(self.figure()), self.table().map(|t| t.to_html())])
    }
}

impl RoutingStats {
    /// Expert load of every MoE layer: one group of bars per expert with the
    /// mean for a few layers and experts; for more (a served model's 58 x
    /// 256), a heatmap of each expert's load over its layer's mean.
    pub fn load_figure(&self) -> Result<Figure> {
        if self.load.len() > 6 || self.num_experts > 64 {
            let rows: Vec<Vec<f64>> = self
                .load
                .values()
                .map(|load| {
                    let mean = load.iter().sum::<u64>() as f64 / load.len().max(1) as f64;
                    load.iter().map(|&x| x as f64 / mean.max(1e-12)).collect()
                })
                .collect();
            return Ok(Heatmap::new(&rows)
                .y_labels(self.load.keys().map(|l| format!("layer {l}")))
                .title(format!("Expert load over {} tokens (load / layer mean)", self.tokens))
                .note(self.source.clone().unwrap_or_default())
                .x_title("expert")
                .y_title("MoE layer")
                .value_name("load / mean")
                .render()?
                .as_png(1.0));
        }
        let mut chart = BarChart::new(expert_labels(self.num_experts)).mode(BarMode::Grouped).mean_line(true);
        for (l, load) in &self.load {
            let v: Vec<f64> = load.iter().map(|&x| x as f64).collect();
            chart = chart.series(format!("layer {l}"), &v);
        }
        Ok(chart
            .title(format!("Expert load over {} tokens", self.tokens))
            .x_title("expert")
            .y_title("tokens routed")
            .render()?)
    }

    /// P(j chosen | i chosen) in `layer`.
    pub fn coactivation_figure(&self, layer: usize) -> Result<Figure> {
        let m = self.coactivation(layer)?;
        Ok(Heatmap::new(&m)
            .x_labels(expert_labels(self.num_experts))
            .y_labels(expert_labels(self.num_experts))
            .x_title("expert j")
            .y_title("expert i")
            .value_name("P(j | i)")
            .title(format!("Expert co-activation, layer {layer}"))
            .render()?)
    }

    pub fn imbalance_table(&self) -> Result<Table> {
        let mut t = Table::new(["layer", "max/mean", "CV", "entropy (bits)", "entropy / max"]);
        for l in self.layers() {
            let i = self.imbalance(l)?;
            t.add_row([l.into(), Cell::number(i.max_over_mean, 3), Cell::number(i.cv, 3), Cell::number(i.entropy_bits, 3), Cell::number(i.normalized_entropy, 3)])?;
        }
        Ok(t.caption(format!("Load imbalance over {} tokens", self.tokens)))
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![fig_html(self.load_figure()), self.imbalance_table().map(|t| t.to_html())])
    }
}

impl EplbPlan {
    /// Busiest GPU over the mean load, per layer: the static placement and
    /// the plan.
    pub fn figure(&self) -> Result<Figure> {
        let layers: Vec<f64> = self.layers.keys().map(|&l| l as f64).collect();
        let mut chart = LineChart::new();
        if self.layers.values().all(|p| !p.gpu_load_static.is_empty()) {
            chart = chart.series_xy("static placement", &layers, &self.layers.values().map(|p| p.balance_static()).collect::<Vec<_>>());
        }
        Ok(chart
            .series_xy("EPLB plan", &layers, &self.layers.values().map(|p| p.balance()).collect::<Vec<_>>())
            .title(format!("Busiest GPU / mean, {} GPUs, {} redundant experts", self.options.gpus, self.options.redundant))
            .x_title("MoE layer")
            .y_title("max / mean GPU load")
            .render()?)
    }

    /// Load of each GPU in `layer`, static placement against the plan.
    pub fn layer_figure(&self, layer: usize) -> Result<Figure> {
        let p = self.layer(layer)?;
        let mut chart = BarChart::new((0..p.gpu_load.len()).map(|g| format!("GPU {g}"))).mode(BarMode::Grouped).mean_line(true);
        if !p.gpu_load_static.is_empty() {
            chart = chart.series("static placement", &p.gpu_load_static);
        }
        Ok(chart.series("EPLB plan", &p.gpu_load).title(format!("Load per GPU, layer {layer}")).x_title("GPU").y_title("tokens").render()?)
    }

    pub fn table(&self) -> Result<Table> {
        let mut t = Table::new(["layer", "static max/mean", "planned max/mean", "experts replicated", "most replicas"]);
        for (l, p) in &self.layers {
            let (e, c) = p.most_replicated();
            t.add_row([
                (*l).into(),
                Cell::number(p.balance_static(), 3),
                Cell::number(p.balance(), 3),
                p.count.iter().filter(|&&c| c > 1).count().into(),
                Cell::text(format!("e{e} x{c}")),
            ])?;
        }
        Ok(t.caption(format!(
            "EPLB ({}): {} experts + {} redundant on {} GPUs in {} node(s)",
            if self.hierarchical { "hierarchical" } else { "global" },
            self.experts,
            self.options.redundant,
            self.options.gpus,
            self.options.nodes
        )))
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![fig_html(self.figure()), self.table().map(|t| t.to_html())])
    }
}

impl BiasReplay {
    pub fn figure(&self) -> Result<Figure> {
        Ok(LineChart::new()
            .series("max / mean load", &self.max_over_mean)
            .title(format!("Aux-loss-free balancing replay, layer {} (gamma {})", self.layer, self.gamma))
            .x_title("step")
            .y_title("max / mean expert load")
            .render()?)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![fig_html(self.figure())])
    }
}

impl Comparison {
    pub fn table(&self) -> Result<Table> {
        let mut t = Table::new(["layer", "tokens routed differently", "mean Jaccard"]);
        for (l, c) in &self.routing {
            t.add_row([(*l).into(), Cell::text(format!("{:.1}%", 100.0 * c.changed_fraction)), Cell::number(c.mean_jaccard, 3)])?;
        }
        Ok(t.caption(format!(
            "mean KL {:.4} nats, top-1 agreement {:.1}%, loss {:.4} -> {:.4}",
            self.mean_kl,
            100.0 * self.top1_agreement,
            self.mean_loss_baseline,
            self.mean_loss_variant
        )))
    }

    /// KL(baseline || variant) per token position.
    pub fn figure(&self) -> Result<Figure> {
        Ok(LineChart::new().series("KL", &self.kl).title("KL divergence per token").x_title("position").y_title("nats").render()?)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![self.table().map(|t| t.to_html()), fig_html(self.figure())])
    }
}

impl RankSweep {
    pub fn figure(&self) -> Result<Figure> {
        let ranks: Vec<f64> = self.rows.iter().map(|r| r.rank as f64).collect();
        Ok(LineChart::new()
            .series_xy("top-1 agreement", &ranks, &self.rows.iter().map(|r| r.top1_agreement).collect::<Vec<_>>())
            .series_xy("next-token accuracy", &ranks, &self.rows.iter().map(|r| r.next_token_accuracy).collect::<Vec<_>>())
            .title(match self.basis_tokens {
                None => format!("Truncating c_kv (kv_lora_rank {}), in-sample directions", self.kv_lora_rank),
                Some(n) => format!("Truncating c_kv (kv_lora_rank {}), directions fitted on {n} other tokens", self.kv_lora_rank),
            })
            .x_title("rank kept")
            .y_title("fraction")
            .render()?)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![fig_html(self.figure())])
    }
}

impl LatentSpectra {
    pub fn figure(&self) -> Result<Figure> {
        let mut c = LineChart::new().y_log(true);
        for (h, s) in self.w_uk.iter().enumerate() {
            c = c.series(format!("W_UK head {h}"), s);
        }
        for (h, s) in self.w_uv.iter().enumerate() {
            c = c.series(format!("W_UV head {h}"), s);
        }
        Ok(c.title(format!("Singular values of W_UK and W_UV, layer {}", self.layer)).x_title("index").y_title("singular value").render()?)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![fig_html(self.figure())])
    }
}

impl EffectiveRank {
    pub fn figure(&self) -> Result<Figure> {
        Ok(LineChart::new()
            .series("singular value", &self.singular_values)
            .y_log(true)
            .title(format!("Spectrum of c_kv: {self}"))
            .x_title("index")
            .y_title("singular value")
            .render()?)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![fig_html(self.figure())])
    }
}

impl ScoreSplit {
    /// Content and position parts for every head (batch row 0).
    pub fn figures(&self) -> Result<Vec<Figure>> {
        let mut out = Vec::new();
        for (name, t) in [("content (q_nope . k_nope)", &self.content), ("RoPE part (q_pe . k_pe)", &self.position)] {
            let heads = Vec::<Vec<Vec<f32>>>::try_from(&t.select(0, 0))?;
            out.push(
                AttentionGrid::new(&heads)
                    .colormap(Colormap::RdBu)
                    .value_name("pre-softmax score part")
                    .title(format!("Attention score part: {name}, layer {}", self.layer))
                    .render()?,
            );
        }
        Ok(out)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        let parts = match self.figures() {
            Ok(fs) => fs.into_iter().map(|f| Ok(f.to_html())).collect(),
            Err(e) => vec![Err(e)],
        };
        bundle(format!("score split of layer {}: content {:?}, RoPE part {:?}", self.layer, self.content.size(), self.position.size()), parts)
    }
}

impl std::fmt::Display for ScoreSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "score split of layer {}: content and RoPE parts {:?}", self.layer, self.content.size())
    }
}

impl ActivationReport {
    pub fn table(&self) -> Result<Table> {
        let mut t = Table::new(["module", "mean", "std", "rms", "max |x|", "kurtosis", "outliers"]);
        for (n, s) in &self.rows {
            t.add_row([
                n.as_str().into(),
                Cell::number(s.mean, 4),
                Cell::number(s.std, 4),
                Cell::number(s.rms, 4),
                Cell::number(s.max_abs, 3),
                Cell::number(s.kurtosis, 2),
                Cell::text(format!("{:.2}%", 100.0 * s.outlier_fraction)),
            ])?;
        }
        Ok(t.caption("Activation statistics per module"))
    }

    /// RMS of the residual stream after each layer.
    pub fn figure(&self) -> Result<Figure> {
        let rms: Vec<f64> = self.rows.iter().filter(|(n, _)| n.ends_with("hook_resid_post")).map(|(_, s)| s.rms).collect();
        let max: Vec<f64> = self.rows.iter().filter(|(n, _)| n.ends_with("hook_resid_post")).map(|(_, s)| s.max_abs).collect();
        Ok(LineChart::new()
            .series("rms", &rms)
            .series("max |x|", &max)
            .y_log(true)
            .title("Residual stream after each layer")
            .x_title("layer")
            .render()?)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![fig_html(self.figure()), self.table().map(|t| t.to_html())])
    }
}

impl LogitLens {
    pub fn table(&self) -> Result<Table> {
        let mut headers = vec!["position".to_string(), "token".to_string()];
        headers.extend((0..self.resid.len()).map(|l| format!("after layer {l}")));
        let mut t = Table::new(headers);
        for (pos, tok) in self.tokens.iter().enumerate() {
            let mut row: Vec<Cell> = vec![pos.into(), readable_token(tok).into()];
            for layer in &self.resid {
                let (s, p) = &layer[pos];
                row.push(Cell::text(format!("{} ({:.0}%)", readable_token(s), 100.0 * p)));
            }
            t.add_row(row)?;
        }
        Ok(t.caption("Logit lens: most likely next token if the model stopped after each layer"))
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![self.table().map(|t| t.to_html())])
    }
}

impl crate::model::Model {
    /// What this model is: source, architecture, parameter counts, cache per token.
    pub fn summary(&self) -> Result<Table> {
        let cfg = &self.config;
        let p = crate::stats::ParamCounts::of(cfg);
        let c = crate::stats::CacheFootprint::of(cfg, self.kind.elt_size_in_bytes());
        let moe = cfg.moe_layers();
        let mut t = Table::new(["", ""]);
        let mut row = |k: &str, v: String| t.add_row([k.into(), v.into()]).map(|_| ());
        row("checkpoint", self.dir.display().to_string())?;
        row("family", format!("{:?}", cfg.family))?;
        row("device, dtype", format!("{:?}, {:?}", self.device, self.kind))?;
        row(
            "layers",
            format!("{} ({} dense, {} MoE), hidden {}, vocab {}", cfg.num_hidden_layers, cfg.num_hidden_layers - moe.len(), moe.len(), cfg.hidden_size, cfg.vocab_size),
        )?;
        row(
            "attention",
            format!("MLA, {} heads, kv_lora_rank {}, qk_rope {}", cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim),
        )?;
        row(
            "experts",
            format!("{} routed (top-{}) + {} shared, {} groups", cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.n_group),
        )?;
        row("parameters", format!("{:.2}M total, {:.2}M active per token", p.total as f64 / 1e6, p.active_per_token as f64 / 1e6))?;
        row(
            "KV cache / token / layer",
            format!("{} elements (MLA, absorbed) vs {} (plain MHA)", c.absorbed_elems, c.mha_elems),
        )?;
        let plan = &self.plan;
        row(
            "weights",
            format!(
                "{} stored, {} in memory now{}",
                human_bytes(plan.stored_bytes()),
                human_bytes(self.weight_bytes() as u64),
                if plan.streaming() { " (streaming under the memory budget: see model.plan)" } else { " (all resident)" }
            ),
        )?;
        if let Some(s) = &self.streamer {
            for d in plan.devices.iter().filter(|d| d.cache_capacity > 0) {
                let (used, cap, n) = s.cache_usage(d.device);
                row("expert cache", format!("{n} experts, {} of {} on {:?}", human_bytes(used as u64), human_bytes(cap as u64), d.device))?;
            }
            let tr = self.traffic();
            row(
                "weight traffic so far",
                format!(
                    "{} read from disk in {} reads ({:.2} s), {} copied from host; expert cache {} hits / {} misses, {} evictions",
                    human_bytes(tr.disk_bytes),
                    tr.disk_reads,
                    tr.load_seconds,
                    human_bytes(tr.host_to_device_bytes),
                    tr.expert_hits,
                    tr.expert_misses,
                    tr.expert_evictions
                ),
            )?;
        }
        Ok(t.caption("DeepScope model"))
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![self.summary().map(|t| t.to_html())])
    }

    /// Shows the summary table inline in a notebook.
    pub fn evcxr_display(&self) {
        self.mime_bundle().evcxr_display();
    }
}

impl std::fmt::Display for crate::model::Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cfg = &self.config;
        let p = crate::stats::ParamCounts::of(cfg);
        write!(
            f,
            "Model {} ({:?}): {} layers, {} routed experts top-{}, {:.2}M params ({:.2}M active), on {:?}",
            self.dir.display(),
            cfg.family,
            cfg.num_hidden_layers,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            p.total as f64 / 1e6,
            p.active_per_token as f64 / 1e6,
            self.device
        )
    }
}

impl crate::kernel::cell::RichDisplay for crate::model::Model {
    fn mime_bundle(&self) -> MimeBundle {
        crate::model::Model::mime_bundle(self)
    }
}

/// A pass's cost as a two-column table.
fn cost_table(c: &ForwardCost) -> Result<Table> {
    let t_ = &c.traffic;
    let mut t = Table::new(["", ""]);
    let mut row = |k: &str, v: String| t.add_row([k.into(), v.into()]).map(|_| ());
    row("tokens", c.tokens.to_string())?;
    row("time", format!("{:.3} s: {:.3} s loading weights, {:.3} s computing", c.seconds, t_.load_seconds, c.compute_seconds()))?;
    row("read from disk", format!("{} in {} reads ({} per token)", human_bytes(t_.disk_bytes), t_.disk_reads, human_bytes(c.disk_bytes_per_token() as u64)))?;
    if t_.host_to_device_bytes > 0 {
        row("copied from host memory", human_bytes(t_.host_to_device_bytes))?;
    }
    row(
        "expert cache",
        format!("{} hits, {} misses ({:.0}% hits), {} evictions; {} held", t_.expert_hits, t_.expert_misses, 100.0 * t_.hit_rate(), t_.expert_evictions, human_bytes(c.cache_bytes)),
    )?;
    row("weights in memory", human_bytes(c.resident_bytes))?;
    Ok(t.caption("Cost of the pass"))
}

impl Plan {
    /// Where each part of the model lives: one row per part, tier and device.
    pub fn table(&self) -> Result<Table> {
        let mut t = Table::new(["part", "layers", "count", "stored", "in memory", "device", "where"]);
        for r in self.rows() {
            t.add_row([
                r.part.into(),
                r.layer_text().into(),
                if r.units.is_empty() { String::new() } else { r.units.len().to_string() }.into(),
                human_bytes(r.stored).into(),
                human_bytes(r.memory).into(),
                format!("{:?}", r.device).to_lowercase().into(),
                r.place.clone().into(),
            ])?;
        }
        let per = self.traffic(1, false);
        let cached = self.traffic(1, true);
        let budgets: Vec<String> = self
            .devices
            .iter()
            .map(|d| {
                format!(
                    "{:?}: budget {}, {} resident{}",
                    d.device,
                    d.budget.map_or("unlimited".into(), human_bytes),
                    human_bytes(d.resident),
                    if d.streaming { format!(", expert cache {}", human_bytes(d.cache_capacity)) } else { String::new() }
                )
            })
            .collect();
        Ok(t.caption(format!(
            "Plan ({}): per decoded token {} from disk with no cache hits, about {} with a uniformly used cache",
            budgets.join("; "),
            human_bytes(per.disk),
            human_bytes(cached.disk)
        )))
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![self.table().map(|t| t.to_html())])
    }

    /// Shows the plan table inline in a notebook.
    pub fn evcxr_display(&self) {
        self.mime_bundle().evcxr_display();
    }
}

impl crate::kernel::cell::RichDisplay for Plan {
    fn mime_bundle(&self) -> MimeBundle {
        Plan::mime_bundle(self)
    }
}

impl ForwardCost {
    pub fn table(&self) -> Result<Table> {
        cost_table(self)
    }

    pub fn mime_bundle(&self) -> MimeBundle {
        bundle(self.to_string(), vec![self.table().map(|t| t.to_html())])
    }

    /// Shows the cost table inline in a notebook.
    pub fn evcxr_display(&self) {
        self.mime_bundle().evcxr_display();
    }
}

impl crate::kernel::cell::RichDisplay for ForwardCost {
    fn mime_bundle(&self) -> MimeBundle {
        ForwardCost::mime_bundle(self)
    }
}
