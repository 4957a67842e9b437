//! `Model::trace`: one forward pass that returns a [`Trace`] holding what a
//! [`Capture`] asked for, with [`Interventions`] applied.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::capture::{ActStats, Capture};
use super::interventions::{Compiled, HookCtx, Interventions};
use crate::error::{Error, IndexKind, Result};
use crate::model::{Config, ForwardOptions, HookPoint, Hooks, Model, PassInfo, RouterEdits, RouterOutput, RouterSettings};

/// What to run: text (needs the model's tokenizer), one sequence of ids, or
/// a [B, T] batch.
#[derive(Debug)]
pub enum Input {
    Text(String),
    Ids(Vec<i64>),
    Batch(Tensor),
}

impl From<&str> for Input {
    fn from(s: &str) -> Self {
        Input::Text(s.to_string())
    }
}
impl From<String> for Input {
    fn from(s: String) -> Self {
        Input::Text(s)
    }
}
impl From<Vec<i64>> for Input {
    fn from(v: Vec<i64>) -> Self {
        Input::Ids(v)
    }
}
impl From<&[i64]> for Input {
    fn from(v: &[i64]) -> Self {
        Input::Ids(v.to_vec())
    }
}
impl From<&Tensor> for Input {
    fn from(t: &Tensor) -> Self {
        Input::Batch(t.shallow_clone())
    }
}

impl Input {
    /// Token ids [B, T] on the CPU.
    pub fn ids(&self, model: &Model) -> Result<Tensor> {
        let ids = match self {
            Input::Text(s) => {
                if s.is_empty() {
                    return Err(Error::Input("the text is empty".into()));
                }
                Tensor::f_from_slice(&model.encode(s)?)?.f_unsqueeze(0)?
            }
            Input::Ids(v) => Tensor::f_from_slice(v)?.f_unsqueeze(0)?,
            Input::Batch(t) => t.f_to_device(Device::Cpu)?,
        };
        model.check_ids(&ids)?;
        Ok(ids.f_to_kind(Kind::Int64)?)
    }
}

/// A tensor as an `ndarray` array of f32 (for analysis outside libtorch).
pub fn to_ndarray(t: &Tensor) -> Result<ndarray::ArrayD<f32>> {
    let t = t.f_detach()?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    Ok((&t).try_into()?)
}

/// One MoE layer's routing as decided in a traced pass: the router's own
/// [`RouterOutput`] (each field documented there with its shape; here on the
/// CPU, with N = B*T rows, or one row per token read in a generation) plus
/// what a trace adds. The output's fields read through the record:
/// `record.topk_indices` is `record.output.topk_indices`.
#[derive(Debug)]
pub struct RoutingRecord {
    pub layer: usize,
    /// The settings the router ran with: the model's, or an intervention's.
    pub settings: RouterSettings,
    /// What the router decided: logits, scores, choice scores, bias, group
    /// scores and kept groups, top-k indices and weights.
    pub output: RouterOutput,
    /// The top-k the same router would have chosen with no bias [N, k] i64
    /// (routers with a bias and no custom router; `None` otherwise).
    pub topk_without_bias: Option<Tensor>,
}

impl std::ops::Deref for RoutingRecord {
    type Target = RouterOutput;
    fn deref(&self) -> &RouterOutput {
        &self.output
    }
}

impl RoutingRecord {
    pub fn num_experts(&self) -> i64 {
        self.scores.size()[1]
    }

    /// Dense [N, E] matrix of routing weights (0 where not chosen).
    pub fn weight_matrix(&self) -> Result<Tensor> {
        let n = self.topk_indices.size()[0];
        Ok(Tensor::f_zeros([n, self.num_experts()], (Kind::Float, Device::Cpu))?.f_scatter(1, &self.topk_indices, &self.topk_weights)?)
    }

    /// Tokens routed to each expert \[E\].
    pub fn load(&self) -> Result<Vec<i64>> {
        Ok(Vec::<i64>::try_from(self.topk_indices.f_flatten(0, -1)?.f_bincount(None::<Tensor>, self.num_experts())?)?)
    }
}

/// Everything one traced forward pass recorded.
#[derive(Debug)]
pub struct Trace {
    pub ids: Tensor,
    /// Token strings per batch row (vocabulary entries, or `#id` without a tokenizer).
    pub tokens: Vec<Vec<String>>,
    /// [B, T, V] f32 on the CPU.
    pub logits: Tensor,
    /// Per layer (None for dense layers or when routing was not captured).
    pub routing: Vec<Option<RoutingRecord>>,
    /// Per layer attention probabilities [B, H, T, T].
    pub patterns: Vec<Option<Tensor>>,
    pub stats: BTreeMap<HookPoint, ActStats>,
    pub tensors: BTreeMap<HookPoint, Tensor>,
    pub config: Config,
    /// Descriptions of the interventions applied.
    pub interventions: Vec<String>,
    /// Time and weight traffic of the pass (disk reads, expert-cache hits
    /// and misses when weights stream).
    pub cost: crate::model::ForwardCost,
}

/// The [`Hooks`] of a traced run: applies interventions, records captures.
/// A run is one pass (a trace) or several over a growing cache (a
/// generation); what each pass records is joined along the token axis at
/// the end, so a generation's trace has the shapes of a trace of the whole
/// sequence.
pub(crate) struct Probe<'a> {
    model: &'a Model,
    capture: &'a Capture,
    compiled: &'a Compiled,
    /// Points whose full tensors are kept.
    keep: BTreeSet<HookPoint>,
    /// Statistics are taken when the run ends, from the joined tensors,
    /// instead of during each pass (a run of several passes).
    joined_stats: bool,
    info: PassInfo,
    pass: usize,
    patterns: Vec<Vec<Tensor>>,
    stats: BTreeMap<HookPoint, ActStats>,
    stat_parts: BTreeMap<HookPoint, Vec<Tensor>>,
    tensors: BTreeMap<HookPoint, Vec<Tensor>>,
    logits: Vec<Tensor>,
    routing: Vec<Vec<RoutingRecord>>,
    cost: Option<crate::model::ForwardCost>,
}

impl<'a> Probe<'a> {
    pub(crate) fn new(model: &'a Model, capture: &'a Capture, compiled: &'a Compiled, joined_stats: bool) -> Result<Probe<'a>> {
        let n = model.layers.len();
        Ok(Probe {
            model,
            capture,
            compiled,
            keep: capture.points(model)?,
            joined_stats,
            info: PassInfo::default(),
            pass: 0,
            patterns: (0..n).map(|_| Vec::new()).collect(),
            stats: BTreeMap::new(),
            stat_parts: BTreeMap::new(),
            tensors: BTreeMap::new(),
            logits: Vec::new(),
            routing: (0..n).map(|_| Vec::new()).collect(),
            cost: None,
        })
    }

    /// Takes what a pass returned: its logits, routing and cost.
    pub(crate) fn end_pass(&mut self, out: &crate::model::ForwardOutput) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.logits.push(out.logits.f_detach()?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?);
        if self.capture.routing {
            for (l, r) in out.routing.iter().enumerate() {
                if let Some(r) = r {
                    let rec = self.model.routing_record(l, r, self.compiled.edits.get(&l))?;
                    self.routing[l].push(rec);
                }
            }
        }
        self.cost = Some(match &self.cost {
            Some(c) => c.then(&out.cost),
            None => out.cost.clone(),
        });
        self.pass += 1;
        Ok(())
    }

    /// The trace of the run over `ids` (every token that went through the model).
    pub(crate) fn finish(mut self, ids: Tensor, interventions: &Interventions) -> Result<Trace> {
        let _guard = tch::no_grad_guard();
        let total = ids.size()[1];
        for (p, parts) in std::mem::take(&mut self.stat_parts) {
            self.stats.insert(p, ActStats::of(&join(p, parts, total)?)?);
        }
        let patterns = std::mem::take(&mut self.patterns)
            .into_iter()
            .enumerate()
            .map(|(l, parts)| if parts.is_empty() { Ok(None) } else { join(HookPoint::Pattern(l), parts, total).map(Some) })
            .collect::<Result<Vec<_>>>()?;
        let tensors = std::mem::take(&mut self.tensors).into_iter().map(|(p, parts)| Ok((p, join(p, parts, total)?))).collect::<Result<_>>()?;
        let routing = std::mem::take(&mut self.routing).into_iter().map(|parts| join_routing(parts)).collect::<Result<Vec<_>>>()?;
        let logits = cat_parts(std::mem::take(&mut self.logits), 1)?;
        let tokens = token_strings(self.model, &ids)?;
        Ok(Trace {
            logits,
            ids,
            tokens,
            routing,
            patterns,
            stats: self.stats,
            tensors,
            config: self.model.config.clone(),
            interventions: interventions.list.iter().map(|i| i.to_string()).collect(),
            cost: self.cost.unwrap_or_default(),
        })
    }
}

/// The parts a run's passes recorded at `point`, joined along the token
/// axis; attention patterns (`[B, H, t, S]`, S growing pass by pass) are
/// padded with zeros on the right to the `total` keys first, which is where
/// a causal pattern is zero anyway.
fn join(point: HookPoint, mut parts: Vec<Tensor>, total: i64) -> Result<Tensor> {
    if let (HookPoint::Pattern(_), true) = (point, parts.len() > 1) {
        parts = parts
            .into_iter()
            .map(|p| {
                let s = p.size()[3];
                Ok(if s < total { p.f_constant_pad_nd([0, total - s])? } else { p })
            })
            .collect::<Result<_>>()?;
    }
    cat_parts(parts, point.layout().time_dim())
}

/// `parts` joined along `dim`; a single part is returned as it is, so a
/// one-pass trace copies nothing.
fn cat_parts(mut parts: Vec<Tensor>, dim: i64) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Ok(Tensor::f_cat(&parts, dim)?)
}

/// One MoE layer's routing records, pass by pass, as one record.
fn join_routing(mut parts: Vec<RoutingRecord>) -> Result<Option<RoutingRecord>> {
    if parts.len() <= 1 {
        return Ok(parts.pop());
    }
    let without: Option<Vec<Tensor>> = parts.iter().map(|r| r.topk_without_bias.as_ref().map(|t| t.shallow_clone())).collect();
    let output = RouterOutput::cat(&parts.iter().map(|r| &r.output).collect::<Vec<_>>())?;
    Ok(Some(RoutingRecord {
        layer: parts[0].layer,
        settings: parts[0].settings.clone(),
        output,
        topk_without_bias: without.map(|ts| cat_parts(ts, 0)).transpose()?,
    }))
}

impl Hooks for Probe<'_> {
    fn begin_pass(&mut self, info: PassInfo) {
        self.info = info;
    }

    fn wants(&self, point: HookPoint) -> bool {
        match point {
            HookPoint::Pattern(_) => self.capture.patterns || self.keep.contains(&point) || self.compiled.touches(point),
            _ => self.keep.contains(&point),
        }
    }

    fn router_edits(&self, layer: usize) -> Option<&RouterEdits> {
        self.compiled.edits.get(&layer)
    }

    fn visit(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        let value = if self.compiled.touches(point) { self.compiled.apply(&HookCtx::new(point, self.info, self.pass), value)? } else { value };
        if self.capture.stats_at(point) {
            if self.joined_stats {
                self.stat_parts.entry(point).or_default().push(value.f_detach()?.f_copy()?);
            } else {
                self.stats.insert(point, ActStats::of(&value)?);
            }
        }
        if let HookPoint::Pattern(l) = point {
            if self.capture.patterns {
                if let Some(slot) = self.patterns.get_mut(l) {
                    slot.push(value.f_detach()?.f_to_device(Device::Cpu)?);
                }
            }
        }
        if self.keep.contains(&point) {
            self.tensors.entry(point).or_default().push(value.f_detach()?.f_to_device(Device::Cpu)?.f_copy()?);
        }
        Ok(value)
    }
}

trait DeepCopy {
    fn f_copy(&self) -> Result<Tensor>;
}
impl DeepCopy for Tensor {
    fn f_copy(&self) -> Result<Tensor> {
        Ok(self.f_to_device_(self.device(), self.kind(), false, true)?)
    }
}

impl Model {
    /// Runs `input` once with the default [`Capture`] (routing, attention
    /// patterns, activation statistics) and no interventions.
    pub fn trace(&self, input: impl Into<Input>) -> Result<Trace> {
        self.trace_with(input, &Capture::default(), &Interventions::new())
    }

    /// Runs `input` once, recording what `capture` asks for, with
    /// `interventions` applied.
    pub fn trace_with(&self, input: impl Into<Input>, capture: &Capture, interventions: &Interventions) -> Result<Trace> {
        let input = input.into();
        let ids = input.ids(self)?;
        let compiled = interventions.compile(self)?;
        let mut probe = Probe::new(self, capture, &compiled, false)?;
        let out = self.forward_hooked(&ids, None, ForwardOptions::default(), &mut probe)?;
        probe.end_pass(&out)?;
        probe.finish(ids, interventions)
    }

    fn routing_record(&self, layer: usize, r: &RouterOutput, edits: Option<&RouterEdits>) -> Result<RoutingRecord> {
        let gate = &self.layers[layer].moe().ok_or_else(|| Error::Input(format!("layer {layer} is dense")))?.gate;
        let settings = edits.and_then(|e| e.settings.clone()).unwrap_or_else(|| gate.settings.clone());
        let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_device(Device::Cpu)?) };
        let topk_without_bias = match (&r.bias, edits.and_then(|e| e.custom.as_ref())) {
            (Some(_), None) => {
                let (banned, forced) = edits.map_or((&[][..], &[][..]), |e| (&e.banned[..], &e.forced[..]));
                Some(cpu(&gate.select(&r.scores, None, &settings, banned, forced, layer)?.indices)?)
            }
            _ => None,
        };
        Ok(RoutingRecord { layer, settings, output: r.to_device(Device::Cpu)?, topk_without_bias })
    }
}

fn token_strings(model: &Model, ids: &Tensor) -> Result<Vec<Vec<String>>> {
    let rows = Vec::<Vec<i64>>::try_from(ids)?;
    Ok(rows
        .iter()
        .map(|row| match &model.tokenizer {
            Some(t) => t
                .tokens(row)
                .into_iter()
                .zip(row)
                .map(|(s, id)| s.unwrap_or_else(|| format!("#{id}")))
                .collect(),
            None => row.iter().map(|id| format!("#{id}")).collect(),
        })
        .collect())
}

impl Trace {
    pub fn batch(&self) -> i64 {
        self.ids.size()[0]
    }

    pub fn seq_len(&self) -> i64 {
        self.ids.size()[1]
    }

    /// The captured tensor at `point`.
    pub fn tensor(&self, point: HookPoint) -> Result<&Tensor> {
        self.tensors.get(&point).ok_or_else(|| {
            Error::Input(format!("{point} was not captured: trace with Capture::default().with(\"{point}\".parse()?)"))
        })
    }

    /// The captured tensor at a named point (`blocks.1.attn.hook_c_kv`).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensor(name.parse()?)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        Error::check_index(IndexKind::Layer, layer, self.config.num_hidden_layers)
    }

    /// Routing of MoE layer `layer`.
    pub fn routing_of(&self, layer: usize) -> Result<&RoutingRecord> {
        self.check_layer(layer)?;
        if !self.config.is_moe_layer(layer) {
            return Err(Error::Input(format!(
                "layer {layer} is a dense layer; MoE layers are {:?}",
                self.config.moe_layers()
            )));
        }
        self.routing[layer]
            .as_ref()
            .ok_or_else(|| Error::Input("routing was not captured: trace with Capture::default()".into()))
    }

    /// Attention probabilities of `layer` [B, H, T, T].
    pub fn pattern(&self, layer: usize) -> Result<&Tensor> {
        self.check_layer(layer)?;
        self.patterns[layer]
            .as_ref()
            .ok_or_else(|| Error::Input("attention patterns were not captured: trace with Capture::default()".into()))
    }

    /// Next-token loss per position [B, T-1] (nats).
    pub fn loss(&self) -> Result<Tensor> {
        let t = self.seq_len();
        if t < 2 {
            return Err(Error::Input("a loss needs at least two tokens".into()));
        }
        let logp = self.logits.f_narrow(1, 0, t - 1)?.f_log_softmax(-1, Kind::Float)?;
        let targets = self.ids.f_narrow(1, 1, t - 1)?.f_unsqueeze(-1)?;
        Ok(logp.f_gather(-1, &targets, false)?.f_squeeze_dim(-1)?.f_neg()?)
    }

    /// Every recorded tensor under its hook name, for export.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("input_ids".to_string(), self.ids.shallow_clone()), ("hook_logits".to_string(), self.logits.shallow_clone())];
        for r in self.routing.iter().flatten() {
            let l = r.layer;
            let mut push = |p: HookPoint, t: &Tensor| out.push((p.to_string(), t.shallow_clone()));
            push(HookPoint::RouterLogits(l), &r.logits);
            push(HookPoint::RouterScores(l), &r.scores);
            push(HookPoint::TopkIndices(l), &r.topk_indices);
            push(HookPoint::TopkWeights(l), &r.topk_weights);
            if let Some(g) = &r.chosen_groups {
                push(HookPoint::ChosenGroups(l), g);
            }
            if let Some(b) = &r.bias {
                out.push((format!("blocks.{l}.mlp.e_score_correction_bias"), b.shallow_clone()));
            }
            if let Some(c) = &r.topk_without_bias {
                out.push((format!("blocks.{l}.mlp.topk_indices_without_bias"), c.shallow_clone()));
            }
        }
        for (l, p) in self.patterns.iter().enumerate() {
            if let Some(p) = p {
                out.push((HookPoint::Pattern(l).to_string(), p.shallow_clone()));
            }
        }
        for (p, t) in &self.tensors {
            if !out.iter().any(|(n, _)| *n == p.to_string()) {
                out.push((p.to_string(), t.shallow_clone()));
            }
        }
        Ok(out)
    }

    /// Writes every recorded tensor to a safetensors file (names as hook
    /// points), readable from Python with `safetensors.torch.load_file`.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .named_tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.f_contiguous()?)))
            .collect::<Result<_>>()?;
        Ok(Tensor::write_safetensors(&tensors, path.as_ref())?)
    }

    /// Tokens, routing (top-k per token and layer), statistics and
    /// interventions as JSON.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let mut routing = serde_json::Map::new();
        for r in self.routing.iter().flatten() {
            routing.insert(
                r.layer.to_string(),
                serde_json::json!({
                    "topk_indices": Vec::<Vec<i64>>::try_from(&r.topk_indices)?,
                    "topk_weights": Vec::<Vec<f32>>::try_from(&r.topk_weights)?,
                    "topk_without_bias": r.topk_without_bias.as_ref().map(Vec::<Vec<i64>>::try_from).transpose()?,
                    "load": r.load()?,
                }),
            );
        }
        let stats: serde_json::Map<String, serde_json::Value> = self
            .stats
            .iter()
            .map(|(p, s)| (p.to_string(), serde_json::to_value(s).unwrap_or_default()))
            .collect();
        Ok(serde_json::json!({
            "input_ids": Vec::<Vec<i64>>::try_from(&self.ids)?,
            "tokens": self.tokens,
            "routing": routing,
            "stats": stats,
            "interventions": self.interventions,
            "captured": self.tensors.keys().map(|p| p.to_string()).collect::<Vec<_>>(),
        }))
    }

    pub fn save_json(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string(&self.to_json()?).map_err(|e| Error::Input(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let moe = self.routing.iter().flatten().count();
        write!(
            f,
            "Trace: {} x {} tokens, {} layers ({} MoE routings recorded), {} attention patterns, {} statistics, {} tensors",
            self.batch(),
            self.seq_len(),
            self.config.num_hidden_layers,
            moe,
            self.patterns.iter().flatten().count(),
            self.stats.len(),
            self.tensors.len()
        )?;
        if !self.interventions.is_empty() {
            write!(f, "; interventions: {}", self.interventions.join("; "))?;
        }
        if self.cost.traffic.disk_reads + self.cost.traffic.host_to_device_bytes > 0 {
            write!(f, "; cost: {}", self.cost)?;
        }
        Ok(())
    }
}
