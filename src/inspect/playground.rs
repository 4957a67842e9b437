//! The router playground: controls for every routing intervention, and a
//! live view of what they change.
//!
//! [`playground`] traces a text once unmodified, then again whenever a
//! control moves, with the interventions the controls describe, and redraws
//! in place: the routing map of the modified pass, the router's step for a
//! chosen token, and [`compare`] against the unmodified pass (KL, top-1
//! agreement, loss, how many tokens changed experts per layer).
//!
//! ```
//! use deepscope::prelude::*;
//! use deepscope::kernel::widgets::AsWidget;
//! # fn main() -> deepscope::Result<()> {
//! let pg = playground(Model::load_default()?, "And God said, Let there be light")?;
//! pg.top_k.set_value(2)?;                  // what a user's slider does
//! assert!(pg.view.output().text().contains("top-1 agreement"));
//! # Ok(()) }
//! ```
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::inspect::{compare, Capture, Interventions, Layers, Trace};
use crate::kernel::cell::RichDisplay;
use crate::kernel::widgets::{interact, AsWidget, Checkbox, Dropdown, FloatSlider, HBox, IntSlider, Interactive, SelectMultiple, VBox, Widget};
use crate::model::{Model, ScoringFunc};
use crate::plot::{MimeBundle, MimeType};

/// The controls and the live view of [`playground`]. Each control is public,
/// so a cell (or a test) can read or move it as a user would.
#[derive(Clone, Debug)]
pub struct Playground {
    /// The MoE layer whose router step is shown and, unless
    /// `every_layer`, the one layer the interventions apply to.
    pub layer: Dropdown,
    pub every_layer: Checkbox,
    /// Experts per token (the model's `num_experts_per_tok` at first).
    pub top_k: IntSlider,
    /// How many groups the experts are split into (`n_group`; the
    /// divisors of the expert count).
    pub groups: Dropdown,
    /// Groups kept per token (`topk_group`).
    pub groups_kept: IntSlider,
    /// `e_score_correction_bias` times this (1: as trained; 0: no bias).
    pub bias_scale: FloatSlider,
    pub banned: SelectMultiple,
    pub forced: SelectMultiple,
    pub scoring: Dropdown,
    /// The token whose router step is shown.
    pub position: IntSlider,
    /// The function behind the view: its output area and redraw times.
    pub view: Interactive,
    /// What displays: the settings in a column, the two expert lists beside
    /// it, the output below.
    root: VBox,
}

impl AsWidget for Playground {
    fn widget(&self) -> &Widget {
        self.root.widget()
    }
}

impl RichDisplay for Playground {
    fn mime_bundle(&self) -> MimeBundle {
        self.root.mime_bundle()
    }
}

impl Playground {
    /// Shows the controls and the view inline (evcxr's display hook).
    pub fn evcxr_display(&self) {
        self.root.evcxr_display();
    }

    /// Closes every control and the view: the frontend removes them, and
    /// once this value is dropped too, the model it holds is freed (each
    /// playground keeps its own model until then).
    pub fn close(&self) {
        self.layer.close();
        self.every_layer.close();
        self.top_k.close();
        self.groups.close();
        self.groups_kept.close();
        self.bias_scale.close();
        self.banned.close();
        self.forced.close();
        self.scoring.close();
        self.position.close();
        self.view.close();
        self.root.close();
    }
}

/// The state the redraws share: the model and the unmodified trace.
struct Bench {
    model: Model,
    baseline: Trace,
    text: String,
    moe_layers: Vec<usize>,
}

/// Builds the playground on `model` (which it keeps while the controls
/// live: load a second copy to go on using one elsewhere) and `text`.
pub fn playground(model: Model, text: &str) -> Result<Playground> {
    let cfg = model.config.clone();
    let moe_layers = cfg.moe_layers();
    if moe_layers.is_empty() {
        return Err(Error::Input("the playground needs a model with MoE layers; this one has none".into()));
    }
    let baseline = model.trace(text)?;
    let t = baseline.seq_len();
    if t < 2 {
        return Err(Error::Input(format!("the playground needs a text of at least 2 tokens; {text:?} has {t}")));
    }
    let e = cfg.n_routed_experts;
    let experts: Vec<String> = (0..e).map(|i| format!("e{i}")).collect();
    let expert_refs: Vec<&str> = experts.iter().map(String::as_str).collect();
    let layer_names: Vec<String> = moe_layers.iter().map(|l| format!("layer {l}")).collect();
    let layer_refs: Vec<&str> = layer_names.iter().map(String::as_str).collect();
    let scoring_index = match cfg.scoring_func {
        ScoringFunc::Sigmoid => 0,
        ScoringFunc::Softmax => 1,
    };
    let layer = Dropdown::new("layer", &layer_refs, 0)?;
    let every_layer = Checkbox::new("every MoE layer", false);
    let top_k = IntSlider::new("top-k", cfg.num_experts_per_tok as i64, 1, e as i64)?.continuous_update(false);
    let divisors: Vec<String> = (1..=e).filter(|d| e % d == 0).map(|d| d.to_string()).collect();
    let divisor_refs: Vec<&str> = divisors.iter().map(String::as_str).collect();
    let n_group = cfg.n_group.max(1);
    let groups = Dropdown::new("groups", &divisor_refs, divisors.iter().position(|d| *d == n_group.to_string()).unwrap_or(0))?;
    // up to every expert its own group; more kept than there are groups is an error shown in place
    let groups_kept = IntSlider::new("groups kept", cfg.topk_group.clamp(1, e) as i64, 1, e as i64)?.continuous_update(false);
    let bias_scale = FloatSlider::new("bias ×", 1.0, 0.0, 3.0, 0.25)?.continuous_update(false);
    let banned = SelectMultiple::new("ban", &expert_refs, &[])?;
    let forced = SelectMultiple::new("force", &expert_refs, &[])?;
    let scoring = Dropdown::new("scoring", &["sigmoid", "softmax"], scoring_index)?;
    let position = IntSlider::new("token", t - 1, 0, t - 1)?.continuous_update(false);

    let bench = Arc::new(Mutex::new(Bench { model, baseline, text: text.to_string(), moe_layers }));
    let controls = (
        layer.clone(),
        every_layer.clone(),
        top_k.clone(),
        groups.clone(),
        groups_kept.clone(),
        bias_scale.clone(),
        banned.clone(),
        forced.clone(),
        scoring.clone(),
        position.clone(),
    );
    let layer_of = layer.clone();
    let view = interact(controls, move |(_, every, k, n_groups, kept, scale, ban, force, scoring, pos)| -> Result<MimeBundle> {
        let b = bench.lock().map_err(|_| Error::Input("an earlier redraw of the playground panicked; build it again".into()))?;
        let l = b.moe_layers.get(layer_of.index()).copied().unwrap_or(b.moe_layers[0]);
        let at: Layers = if every { Layers::Some(b.moe_layers.clone()) } else { Layers::One(l) };
        let cfg = &b.model.config;
        let mut iv = Interventions::new();
        let mut what: Vec<String> = Vec::new();
        if k as usize != cfg.num_experts_per_tok {
            iv = iv.top_k(at.clone(), k as usize);
            what.push(format!("top-{k}"));
        }
        let n_groups: usize = n_groups.parse().unwrap_or(cfg.n_group);
        if n_groups != cfg.n_group.max(1) || kept as usize != cfg.topk_group {
            iv = iv.groups(at.clone(), n_groups, kept as usize);
            what.push(format!("keep {kept} of {n_groups} groups"));
        }
        if scale != 1.0 {
            iv = scaled_bias(iv, &b.baseline, &at, scale)?;
            what.push(format!("bias × {scale}"));
        }
        let names = |xs: &[usize]| xs.iter().map(|x| format!("e{x}")).collect::<Vec<_>>().join(", ");
        if !ban.is_empty() {
            iv = iv.ban_experts(at.clone(), &ban);
            what.push(format!("ban {}", names(&ban)));
        }
        if !force.is_empty() {
            iv = iv.force_experts(at.clone(), &force);
            what.push(format!("force {}", names(&force)));
        }
        let wanted = if scoring == "softmax" { ScoringFunc::Softmax } else { ScoringFunc::Sigmoid };
        if wanted != cfg.scoring_func {
            iv = iv.scoring(at.clone(), wanted);
            what.push(format!("{scoring} scoring"));
        }
        let variant = b.model.trace_with(b.text.as_str(), &Capture::default(), &iv)?;
        let p = pos.clamp(0, variant.seq_len() - 1) as usize;
        let step = variant.router_step(l, p)?;
        let change = compare(&b.baseline, &variant)?;
        let summary = if what.is_empty() {
            "No intervention: the controls are at the model's own settings.".to_string()
        } else {
            format!("{} on {}, against the unmodified model:", what.join("; "), if every { "every MoE layer".to_string() } else { format!("layer {l}") })
        };
        Ok(stack(&[text_bundle(&summary), change.mime_bundle(), variant.routing_map()?.mime_bundle(), step.mime_bundle()]))
    })?;
    let settings = VBox::new(&[&layer, &every_layer, &top_k, &groups, &groups_kept, &bias_scale, &scoring, &position]);
    let lists = HBox::new(&[&settings, &banned, &forced]);
    let root = VBox::new(&[&lists, view.output()]);
    Ok(Playground { layer, every_layer, top_k, groups, groups_kept, bias_scale, banned, forced, scoring, position, view, root })
}

/// The trained bias of each layer in `at`, times `scale`.
fn scaled_bias(mut iv: Interventions, baseline: &Trace, at: &Layers, scale: f64) -> Result<Interventions> {
    let layers: Vec<usize> = match at {
        Layers::One(l) => vec![*l],
        Layers::Some(ls) => ls.clone(),
        Layers::All => baseline.routing.iter().flatten().map(|r| r.layer).collect(),
    };
    for l in layers {
        let Some(bias) = baseline.routing.get(l).and_then(|r| r.as_ref()).and_then(|r| r.bias.as_ref()) else {
            return Err(Error::Input(format!("layer {l} has no e_score_correction_bias to scale (a V2-style router)")));
        };
        let v: Vec<f32> = Vec::<f32>::try_from(bias.f_to_kind(tch::Kind::Float)?.f_flatten(0, -1)?)?;
        let scaled: Vec<f32> = v.iter().map(|x| x * scale as f32).collect();
        iv = iv.bias(l, &scaled);
    }
    Ok(iv)
}

fn text_bundle(text: &str) -> MimeBundle {
    let mut b = MimeBundle::new();
    b.insert(MimeType::TextPlain, text);
    b.insert(MimeType::TextHtml, format!("<p>{}</p>", crate::plot::svg::escape(text)));
    b
}

/// One bundle showing several: their HTML (or SVG, or PNG) one below the
/// other, and their text joined by blank lines.
fn stack(parts: &[MimeBundle]) -> MimeBundle {
    let mut html = String::new();
    let mut text = Vec::new();
    for p in parts {
        if let Some(t) = p.get(MimeType::TextPlain) {
            text.push(t.to_string());
        }
        if let Some(h) = p.get(MimeType::TextHtml) {
            html.push_str(&format!("<div>{h}</div>"));
        } else if let Some(s) = p.get(MimeType::ImageSvg) {
            html.push_str(&format!("<div>{s}</div>"));
        } else if let Some(png) = p.get(MimeType::ImagePng) {
            html.push_str(&format!("<div><img src=\"data:image/png;base64,{png}\"/></div>"));
        }
    }
    let mut b = MimeBundle::new();
    b.insert(MimeType::TextPlain, text.join("\n\n"));
    b.insert(MimeType::TextHtml, html);
    b
}
