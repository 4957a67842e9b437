//! Interventions: values that change one forward pass. They are stacked in an
//! [`Interventions`] list passed to `Model::trace_with` or to
//! `Model::generate_with` (every pass of a generation); nothing is stored in the model or in a global, so removing one from the
//! list undoes it. The value-level ones (head ablation, latent truncation,
//! patches, added vectors and user hooks) apply in list order at each point.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use super::points::Points;
use crate::error::{Error, IndexKind, Result};
use crate::model::{BiasEdit, CustomRouter, HookPoint, Layout, Model, PassInfo, RouterEdits, ScoringFunc};

/// User code run at hook points (see [`Interventions::hook`]). Behind a
/// mutex so a hook may keep state (`FnMut`) and an [`Interventions`] list
/// can still be sent to another thread; clones of a list share the hook.
pub type HookFn = Arc<Mutex<dyn FnMut(&HookCtx, Tensor) -> Result<Tensor> + Send>>;

/// What a hook is told about the value it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookCtx {
    pub point: HookPoint,
    /// The point's layer (`None` for the embedding, final norm and logits).
    pub layer: Option<usize>,
    /// Sequences in the batch.
    pub batch: i64,
    /// Absolute positions of the pass's tokens: `0..T` in a trace; in a
    /// generation `0..P` for the prompt, then `P+n-1..P+n` for the pass that
    /// reads the n-th new token.
    pub positions: Range<i64>,
    /// Which forward pass: 0 in a trace; in a generation 0 is the prompt.
    pub pass: usize,
}

impl HookCtx {
    pub fn new(point: HookPoint, info: PassInfo, pass: usize) -> HookCtx {
        HookCtx { point, layer: point.layer(), batch: info.batch, positions: info.past..info.past + info.tokens, pass }
    }

    /// Tokens in this pass (per sequence).
    pub fn tokens(&self) -> i64 {
        self.positions.end - self.positions.start
    }

    /// The absolute position of every entry of `value` (the value at this
    /// point) along its token axis, i64, shaped to broadcast against it:
    /// `[1, T, 1]` for `[B, T, D]`, `[1, 1, T, 1]` for `[B, H, T, S]`,
    /// `[N, 1]` for the router's `[N, E]` rows.
    pub fn position_ids(&self, value: &Tensor) -> Result<Tensor> {
        let t = self.tokens();
        let pos = Tensor::f_arange_start(self.positions.start, self.positions.end, (Kind::Int64, value.device()))?;
        let layout = self.point.layout();
        let (d, len, pos) = match layout {
            Layout::Rows => (0, self.batch * t, pos.f_repeat([self.batch])?),
            _ => (layout.time_dim() as usize, t, pos),
        };
        let size = value.size();
        if size.get(d) != Some(&len) {
            return Err(Error::HookShape {
                point: self.point.to_string(),
                what: format!("the value (dimension {d} should run over the {len} positions)"),
                expected: vec![len],
                found: size,
            });
        }
        let mut shape = vec![1i64; size.len()];
        shape[d] = len;
        Ok(pos.f_view(shape.as_slice())?)
    }

    /// 1 where the position is at least `from`, 0 before it, in `value`'s
    /// dtype and shaped to broadcast against it: `x + v * ctx.from_position(&x, 10)?`
    /// adds `v` from token 10 on.
    pub fn from_position(&self, value: &Tensor, from: i64) -> Result<Tensor> {
        Ok(self.position_ids(value)?.f_ge(from)?.f_to_kind(value.kind())?)
    }
}

/// Which layers an intervention applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layers {
    /// Every layer it can apply to (the MoE layers for routing changes).
    All,
    One(usize),
    Some(Vec<usize>),
}

impl From<usize> for Layers {
    fn from(l: usize) -> Self {
        Layers::One(l)
    }
}

impl Layers {
    /// For routing changes: `All` is the MoE layers.
    fn resolve(&self, model: &Model) -> Vec<usize> {
        match self {
            Layers::All => model.config.moe_layers(),
            other => other.resolve_attention(model),
        }
    }

    /// For attention (latent) changes: `All` is every layer.
    fn resolve_attention(&self, model: &Model) -> Vec<usize> {
        match self {
            Layers::All => (0..model.config.num_hidden_layers).collect(),
            Layers::One(l) => vec![*l],
            Layers::Some(v) => v.clone(),
        }
    }
}

/// One change to a forward pass.
pub enum Intervention {
    /// These experts are never chosen.
    BanExperts { layers: Layers, experts: Vec<usize> },
    /// These experts are chosen for every token.
    ForceExperts { layers: Layers, experts: Vec<usize> },
    /// Choose `k` experts per token instead of `num_experts_per_tok`.
    SetTopK { layers: Layers, k: usize },
    /// Change the group-limited routing: `n_group` groups, `topk_group` kept.
    SetGroups { layers: Layers, n_group: usize, topk_group: usize },
    /// Route with this `e_score_correction_bias` \[E\].
    SetBias { layers: Layers, bias: Vec<f32> },
    /// Route as if `e_score_correction_bias` were zero.
    ZeroBias { layers: Layers },
    /// Score router logits with sigmoid or softmax.
    SetScoring { layers: Layers, scoring: ScoringFunc },
    /// Replace the router's selection with user code.
    CustomRouter { layers: Layers, router: Arc<dyn CustomRouter> },
    /// Zero the output of attention heads (before `o_proj`).
    AblateHeads { layer: usize, heads: Vec<usize> },
    /// Replace the value at a hook point with one from another run (same
    /// shape, e.g. `trace.tensor(point)` of a run with `Capture::with(point)`).
    Patch { point: HookPoint, value: Tensor },
    /// Project `c_kv` onto its top-`rank` right singular directions (over the
    /// tokens of this forward pass) before attention and the cache.
    TruncateLatent { layers: Layers, rank: usize },
    /// Project `c_kv` of `layers` onto fixed directions: `projections` holds
    /// one `[kv_lora, kv_lora]` projection per layer of the basis's model
    /// (from [`LatentBasis::projection`](super::mla::LatentBasis::projection)).
    ProjectLatent { layers: Layers, rank: usize, projections: Vec<Tensor> },
    /// Add `vector` (as long as the value's last dimension) at the chosen
    /// points, at positions `from_position` and later: a steering vector.
    AddVector { points: Points, vector: Tensor, from_position: i64 },
    /// Run user code at the chosen points: it gets the value and returns
    /// the value the pass continues with (same shape and dtype).
    Hook { points: Points, f: HookFn },
}

impl Clone for Intervention {
    fn clone(&self) -> Self {
        use Intervention::*;
        match self {
            BanExperts { layers, experts } => BanExperts { layers: layers.clone(), experts: experts.clone() },
            ForceExperts { layers, experts } => ForceExperts { layers: layers.clone(), experts: experts.clone() },
            SetTopK { layers, k } => SetTopK { layers: layers.clone(), k: *k },
            SetGroups { layers, n_group, topk_group } => SetGroups { layers: layers.clone(), n_group: *n_group, topk_group: *topk_group },
            SetBias { layers, bias } => SetBias { layers: layers.clone(), bias: bias.clone() },
            ZeroBias { layers } => ZeroBias { layers: layers.clone() },
            SetScoring { layers, scoring } => SetScoring { layers: layers.clone(), scoring: *scoring },
            CustomRouter { layers, router } => CustomRouter { layers: layers.clone(), router: router.clone() },
            AblateHeads { layer, heads } => AblateHeads { layer: *layer, heads: heads.clone() },
            Patch { point, value } => Patch { point: *point, value: value.shallow_clone() },
            TruncateLatent { layers, rank } => TruncateLatent { layers: layers.clone(), rank: *rank },
            ProjectLatent { layers, rank, projections } => {
                ProjectLatent { layers: layers.clone(), rank: *rank, projections: projections.iter().map(|p| p.shallow_clone()).collect() }
            }
            AddVector { points, vector, from_position } => {
                AddVector { points: points.clone(), vector: vector.shallow_clone(), from_position: *from_position }
            }
            Hook { points, f } => Hook { points: points.clone(), f: f.clone() },
        }
    }
}

impl fmt::Debug for Intervention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Intervention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Intervention::*;
        let l = |x: &Layers| match x {
            Layers::All => "all layers".to_string(),
            Layers::One(l) => format!("layer {l}"),
            Layers::Some(v) => format!("layers {v:?}"),
        };
        match self {
            BanExperts { layers, experts } => write!(f, "ban experts {experts:?} in {}", l(layers)),
            ForceExperts { layers, experts } => write!(f, "force experts {experts:?} in {}", l(layers)),
            SetTopK { layers, k } => write!(f, "top-{k} routing in {}", l(layers)),
            SetGroups { layers, n_group, topk_group } => write!(f, "{n_group} groups, keep {topk_group}, in {}", l(layers)),
            SetBias { layers, .. } => write!(f, "replaced router bias in {}", l(layers)),
            ZeroBias { layers } => write!(f, "zero router bias in {}", l(layers)),
            SetScoring { layers, scoring } => write!(f, "{scoring:?} scoring in {}", l(layers)),
            CustomRouter { layers, .. } => write!(f, "custom router in {}", l(layers)),
            AblateHeads { layer, heads } => write!(f, "ablate heads {heads:?} in layer {layer}"),
            Patch { point, .. } => write!(f, "patch {point}"),
            TruncateLatent { layers, rank } => write!(f, "truncate c_kv to rank {rank} in {}", l(layers)),
            ProjectLatent { layers, rank, .. } => write!(f, "project c_kv onto {rank} fixed directions in {}", l(layers)),
            AddVector { points, from_position: 0, .. } => write!(f, "add a vector at {points}"),
            AddVector { points, from_position, .. } => write!(f, "add a vector at {points} from position {from_position}"),
            Hook { points, .. } => write!(f, "hook at {points}"),
        }
    }
}

/// A stack of interventions applied together to a forward pass.
#[derive(Clone, Default, Debug)]
pub struct Interventions {
    pub list: Vec<Intervention>,
}

impl Interventions {
    pub fn new() -> Interventions {
        Interventions::default()
    }

    pub fn push(mut self, i: Intervention) -> Interventions {
        self.list.push(i);
        self
    }

    /// Removes and returns intervention `index`.
    pub fn remove(&mut self, index: usize) -> Result<Intervention> {
        if index >= self.list.len() {
            return Err(Error::Input(format!("no intervention {index}: the stack holds {}", self.list.len())));
        }
        Ok(self.list.remove(index))
    }

    /// How many interventions are listed.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn ban_experts(self, layers: impl Into<Layers>, experts: &[usize]) -> Interventions {
        self.push(Intervention::BanExperts { layers: layers.into(), experts: experts.to_vec() })
    }
    pub fn force_experts(self, layers: impl Into<Layers>, experts: &[usize]) -> Interventions {
        self.push(Intervention::ForceExperts { layers: layers.into(), experts: experts.to_vec() })
    }
    pub fn top_k(self, layers: impl Into<Layers>, k: usize) -> Interventions {
        self.push(Intervention::SetTopK { layers: layers.into(), k })
    }
    pub fn groups(self, layers: impl Into<Layers>, n_group: usize, topk_group: usize) -> Interventions {
        self.push(Intervention::SetGroups { layers: layers.into(), n_group, topk_group })
    }
    pub fn bias(self, layers: impl Into<Layers>, bias: &[f32]) -> Interventions {
        self.push(Intervention::SetBias { layers: layers.into(), bias: bias.to_vec() })
    }
    pub fn zero_bias(self, layers: impl Into<Layers>) -> Interventions {
        self.push(Intervention::ZeroBias { layers: layers.into() })
    }
    pub fn scoring(self, layers: impl Into<Layers>, scoring: ScoringFunc) -> Interventions {
        self.push(Intervention::SetScoring { layers: layers.into(), scoring })
    }
    pub fn router(self, layers: impl Into<Layers>, router: impl CustomRouter + 'static) -> Interventions {
        self.push(Intervention::CustomRouter { layers: layers.into(), router: Arc::new(router) })
    }
    pub fn ablate_heads(self, layer: usize, heads: &[usize]) -> Interventions {
        self.push(Intervention::AblateHeads { layer, heads: heads.to_vec() })
    }
    pub fn patch(self, point: HookPoint, value: &Tensor) -> Interventions {
        self.push(Intervention::Patch { point, value: value.shallow_clone() })
    }
    pub fn truncate_latent(self, layers: impl Into<Layers>, rank: usize) -> Interventions {
        self.push(Intervention::TruncateLatent { layers: layers.into(), rank })
    }

    /// Projects `c_kv` of `layers` onto the top `rank` directions of a fixed
    /// `basis` fitted on calibration text ([`Model::latent_basis`]): the same
    /// directions for every input, unlike [`truncate_latent`](Self::truncate_latent).
    pub fn project_latent(self, layers: impl Into<Layers>, basis: &super::mla::LatentBasis, rank: usize) -> Result<Interventions> {
        let projections = (0..basis.directions.len()).map(|l| basis.projection(l, rank)).collect::<Result<Vec<_>>>()?;
        Ok(self.push(Intervention::ProjectLatent { layers: layers.into(), rank, projections }))
    }

    /// Runs `f` at `points` (a [`HookPoint`], a name, a glob such as
    /// `blocks.*.hook_resid_post`, or [`Points::matching`]): it gets a
    /// [`HookCtx`] and the value, and returns the value the pass continues
    /// with, of the same shape and dtype (on any device):
    /// `Interventions::new().hook("blocks.2.attn.hook_c_kv", |_ctx, x| Ok(x * 0.5))`.
    /// Several hooks stack in list order; an `Err` from `f` ends the pass with
    /// that error. Patterns skip read-only points (the kept groups and the
    /// per-expert outputs). Hooks also run in every pass of a generation.
    pub fn hook(self, points: impl Into<Points>, f: impl FnMut(&HookCtx, Tensor) -> Result<Tensor> + Send + 'static) -> Interventions {
        self.push(Intervention::Hook { points: points.into(), f: Arc::new(Mutex::new(f)) })
    }

    /// Adds `vector` (as long as the value's last dimension, e.g. `[D]` for
    /// the residual stream) at `points`, at every position.
    pub fn add_vector(self, points: impl Into<Points>, vector: &Tensor) -> Interventions {
        self.add_vector_from(points, vector, 0)
    }

    /// Adds `vector` at `points` from position `from_position` on: in a
    /// generation, steering that starts at a chosen token.
    pub fn add_vector_from(self, points: impl Into<Points>, vector: &Tensor, from_position: i64) -> Interventions {
        self.push(Intervention::AddVector { points: points.into(), vector: vector.shallow_clone(), from_position })
    }

    /// Checks every intervention against `model` and compiles the routing
    /// ones into per-layer [`RouterEdits`].
    pub fn compile(&self, model: &Model) -> Result<Compiled> {
        let cfg = &model.config;
        let n_layers = cfg.num_hidden_layers;
        let mut edits: BTreeMap<usize, RouterEdits> = BTreeMap::new();
        let mut ops: Vec<ValueOp> = Vec::new();
        let check_layer = |l: usize, what: &Intervention| -> Result<()> {
            Error::check_index(IndexKind::Layer, l, n_layers).map_err(|e| e.in_context(what))
        };
        for iv in &self.list {
            use Intervention::*;
            match iv {
                AblateHeads { layer, heads: hs } => {
                    check_layer(*layer, iv)?;
                    if let Some(&h) = hs.iter().find(|&&h| h >= cfg.num_attention_heads) {
                        return Err(Error::out_of_range(IndexKind::Head, h, cfg.num_attention_heads).in_context(iv));
                    }
                    let heads = hs.iter().map(|&h| h as i64).collect();
                    ops.push(ValueOp { points: [HookPoint::HeadOut(*layer)].into(), action: Action::AblateHeads(heads) });
                }
                Patch { point, value } => {
                    if let Some(l) = point.layer() {
                        check_layer(l, iv)?;
                    }
                    if point.is_read_only() {
                        return Err(Error::Input(format!(
                            "{iv}: {point} is read-only (the routing is decided before it); change the router with an intervention, or patch the top-k indices/weights"
                        )));
                    }
                    ops.push(ValueOp { points: [*point].into(), action: Action::Patch(value.shallow_clone()) });
                }
                TruncateLatent { layers, rank } => {
                    if *rank > cfg.kv_lora_rank {
                        return Err(Error::Input(format!("{iv}: rank {rank} exceeds kv_lora_rank ({})", cfg.kv_lora_rank)));
                    }
                    let mut points = BTreeSet::new();
                    for l in layers.resolve_attention(model) {
                        check_layer(l, iv)?;
                        points.insert(HookPoint::CKv(l));
                    }
                    ops.push(ValueOp { points, action: Action::TruncateLatent(*rank) });
                }
                ProjectLatent { layers, projections, .. } => {
                    let d = cfg.kv_lora_rank as i64;
                    if projections.len() != n_layers {
                        return Err(Error::Input(format!("{iv}: the latent basis has {} layers, this model {n_layers}: it is another model's", projections.len())));
                    }
                    for l in layers.resolve_attention(model) {
                        check_layer(l, iv)?;
                        let p = &projections[l];
                        if p.size() != [d, d] {
                            return Err(Error::Input(format!("{iv}: layer {l}'s projection is {:?}, this model's latent wants [{d}, {d}]", p.size())));
                        }
                        ops.push(ValueOp { points: [HookPoint::CKv(l)].into(), action: Action::Project(p.shallow_clone()) });
                    }
                }
                AddVector { points, vector, from_position } => {
                    let chosen = points.resolve(model, true).map_err(|e| e.in_context(iv))?;
                    if let Some(p) = chosen.iter().find(|p| matches!(p, HookPoint::TopkIndices(_))) {
                        return Err(Error::Input(format!("{iv}: {p} holds expert indices; add to the router logits or scores instead")));
                    }
                    if vector.dim() != 1 {
                        return Err(Error::Input(format!("{iv}: the vector must be 1-D (one entry per feature), got shape {:?}", vector.size())));
                    }
                    ops.push(ValueOp {
                        points: chosen.into_iter().collect(),
                        action: Action::AddVector { vector: vector.shallow_clone(), from: *from_position },
                    });
                }
                Hook { points, f } => {
                    let chosen = points.resolve(model, true).map_err(|e| e.in_context(iv))?;
                    ops.push(ValueOp { points: chosen.into_iter().collect(), action: Action::Hook(f.clone()) });
                }
                routing => {
                    let layers = match routing {
                        BanExperts { layers, .. }
                        | ForceExperts { layers, .. }
                        | SetTopK { layers, .. }
                        | SetGroups { layers, .. }
                        | SetBias { layers, .. }
                        | ZeroBias { layers }
                        | SetScoring { layers, .. }
                        | CustomRouter { layers, .. } => layers.resolve(model),
                        _ => unreachable!("non-routing interventions handled above"),
                    };
                    for l in layers {
                        check_layer(l, iv)?;
                        let moe = model.layers[l].moe().ok_or_else(|| {
                            Error::Input(format!("{iv}: layer {l} is a dense layer (MoE layers: {:?})", cfg.moe_layers()))
                        })?;
                        let e = moe.gate.num_experts() as usize;
                        let ed = edits.entry(l).or_default();
                        let mut settings = ed.settings.clone().unwrap_or_else(|| moe.gate.settings.clone());
                        let check_experts = |xs: &[usize]| -> Result<Vec<i64>> {
                            xs.iter()
                                .map(|&x| {
                                    if x < e {
                                        Ok(x as i64)
                                    } else {
                                        Err(Error::out_of_range(IndexKind::Expert, x, e).in_context(iv))
                                    }
                                })
                                .collect()
                        };
                        match routing {
                            BanExperts { experts, .. } => ed.banned.extend(check_experts(experts)?),
                            ForceExperts { experts, .. } => ed.forced.extend(check_experts(experts)?),
                            SetTopK { k, .. } => {
                                if *k == 0 || *k > e {
                                    return Err(Error::Input(format!("{iv}: k = {k}, but it must be in 1..={e}")));
                                }
                                settings.top_k = *k as i64;
                            }
                            SetGroups { n_group, topk_group, .. } => {
                                if *n_group == 0 || !e.is_multiple_of(*n_group) || *topk_group == 0 || topk_group > n_group {
                                    return Err(Error::Input(format!(
                                        "{iv}: n_group {n_group} / topk_group {topk_group} invalid: n_group must divide {e} and 1 <= topk_group <= n_group"
                                    )));
                                }
                                settings.n_group = *n_group as i64;
                                settings.topk_group = *topk_group as i64;
                                if settings.method == crate::model::TopkMethod::Greedy && *n_group > 1 {
                                    settings.method = crate::model::TopkMethod::GroupLimitedGreedy;
                                }
                            }
                            SetBias { bias, .. } => {
                                if bias.len() != e {
                                    return Err(Error::Input(format!("{iv}: bias has {} entries, layer {l} has {e} experts", bias.len())));
                                }
                                ed.bias = BiasEdit::Replace(Tensor::f_from_slice(bias)?.f_to_device(model.layers[l].device)?);
                            }
                            ZeroBias { .. } => ed.bias = BiasEdit::Zero,
                            SetScoring { scoring, .. } => settings.scoring = *scoring,
                            CustomRouter { router, .. } => ed.custom = Some(router.clone()),
                            _ => {}
                        }
                        ed.settings = Some(settings);
                    }
                }
            }
        }
        for ed in edits.values_mut() {
            for v in [&mut ed.banned, &mut ed.forced] {
                v.sort_unstable();
                v.dedup();
            }
        }
        Ok(Compiled { edits, ops })
    }
}



impl fmt::Display for Interventions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.list.is_empty() {
            return write!(f, "no interventions");
        }
        for (i, iv) in self.list.iter().enumerate() {
            writeln!(f, "{i}: {iv}")?;
        }
        Ok(())
    }
}

/// Interventions checked against a model, ready for a forward pass.
pub struct Compiled {
    /// Router changes per MoE layer.
    pub edits: BTreeMap<usize, RouterEdits>,
    /// Value-level changes, in list order.
    ops: Vec<ValueOp>,
}

/// One value-level change and the points it applies at.
struct ValueOp {
    points: BTreeSet<HookPoint>,
    action: Action,
}

enum Action {
    /// Zero these heads of `[B, T, H, v]`.
    AblateHeads(Vec<i64>),
    TruncateLatent(usize),
    /// Multiply by a fixed `[d, d]` projection.
    Project(Tensor),
    Patch(Tensor),
    AddVector { vector: Tensor, from: i64 },
    Hook(HookFn),
}

impl Compiled {
    /// Whether any change applies at `point` (so a pass computes points that
    /// cost extra, such as attention patterns, when they are changed).
    pub fn touches(&self, point: HookPoint) -> bool {
        self.ops.iter().any(|op| op.points.contains(&point))
    }

    /// Applies the value-level interventions at `ctx.point`, in list order.
    pub fn apply(&self, ctx: &HookCtx, mut value: Tensor) -> Result<Tensor> {
        let point = ctx.point;
        for op in self.ops.iter().filter(|op| op.points.contains(&point)) {
            value = match &op.action {
                Action::AblateHeads(hs) => {
                    let idx = Tensor::f_from_slice(hs)?.f_to_device(value.device())?;
                    value.f_index_fill(2, &idx, 0.0)?
                }
                Action::TruncateLatent(r) => project_top_directions(&value, *r)?,
                Action::Project(p) => value.f_matmul(&p.f_to_kind(value.kind())?.f_to_device(value.device())?)?,
                Action::Patch(v) => {
                    if v.size() != value.size() {
                        return Err(Error::HookShape { point: point.to_string(), what: "the patch".into(), expected: value.size(), found: v.size() });
                    }
                    v.f_to_kind(value.kind())?.f_to_device(value.device())?
                }
                Action::AddVector { vector, from } => {
                    let last = value.size().last().copied().unwrap_or(0);
                    if vector.size() != [last] {
                        return Err(Error::HookShape { point: point.to_string(), what: "the added vector".into(), expected: vec![last], found: vector.size() });
                    }
                    let v = vector.f_to_kind(value.kind())?.f_to_device(value.device())?;
                    if ctx.positions.start >= *from {
                        value.f_add(&v)?
                    } else if ctx.positions.end <= *from {
                        value
                    } else {
                        value.f_add(&v.f_mul(&ctx.from_position(&value, *from)?)?)?
                    }
                }
                Action::Hook(f) => {
                    let (size, kind, device) = (value.size(), value.kind(), value.device());
                    let mut f = f.lock().map_err(|_| Error::Input(format!("the hook at {point} panicked in an earlier call; build the interventions again")))?;
                    let out = (*f)(ctx, value)?;
                    if out.size() != size {
                        return Err(Error::HookShape { point: point.to_string(), what: "the hook's result".into(), expected: size, found: out.size() });
                    }
                    if out.kind() != kind {
                        return Err(Error::HookDtype { point: point.to_string(), what: "the hook's result".into(), expected: format!("{kind:?}"), found: format!("{:?}", out.kind()) });
                    }
                    if out.device() != device { out.f_to_device(device)? } else { out }
                }
            };
        }
        Ok(value)
    }
}

/// Projects `x` [..., d] onto the span of its top-`rank` right singular
/// vectors (computed over all leading positions).
pub fn project_top_directions(x: &Tensor, rank: usize) -> Result<Tensor> {
    let size = x.size();
    let d = *size.last().unwrap_or(&0);
    if rank as i64 >= d {
        return Ok(x.shallow_clone());
    }
    let flat = x.f_reshape([-1, d])?.f_to_kind(Kind::Float)?;
    if rank == 0 {
        return Ok(x.f_zeros_like()?);
    }
    let (_, _, v) = flat.f_svd(true, true)?; // v [d, min(N, d)], columns = right singular vectors
    let r = (rank as i64).min(v.size()[1]);
    let v = v.f_narrow(1, 0, r)?; // [d, r]
    let projected = flat.f_matmul(&v)?.f_matmul(&v.f_transpose(0, 1)?)?;
    Ok(projected.f_reshape(size.as_slice())?.f_to_kind(x.kind())?)
}
