//! Interventions: values that change one forward pass. They are stacked in an
//! [`Interventions`] list passed to `Model::trace_with`; nothing is stored in
//! the model or in a global, so removing one from the list undoes it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{BiasEdit, CustomRouter, HookPoint, Model, RouterEdits, ScoringFunc};

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
    fn resolve(&self, model: &Model) -> Vec<usize> {
        match self {
            Layers::All => model.config.moe_layers(),
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

    /// Checks every intervention against `model` and compiles the routing
    /// ones into per-layer [`RouterEdits`].
    pub fn compile(&self, model: &Model) -> Result<Compiled> {
        let cfg = &model.config;
        let n_layers = cfg.num_hidden_layers;
        let mut edits: BTreeMap<usize, RouterEdits> = BTreeMap::new();
        let mut heads: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        let mut patches: Vec<(HookPoint, Tensor)> = Vec::new();
        let mut truncate: BTreeMap<usize, usize> = BTreeMap::new();
        let check_layer = |l: usize, what: &Intervention| -> Result<()> {
            if l >= n_layers {
                return Err(Error::Input(format!("{what}: layer {l} out of range (the model has {n_layers} layers)")));
            }
            Ok(())
        };
        for iv in &self.list {
            use Intervention::*;
            match iv {
                AblateHeads { layer, heads: hs } => {
                    check_layer(*layer, iv)?;
                    if let Some(h) = hs.iter().find(|&&h| h >= cfg.num_attention_heads) {
                        return Err(Error::Input(format!("{iv}: head {h} out of range ({} heads)", cfg.num_attention_heads)));
                    }
                    heads.entry(*layer).or_default().extend(hs.iter().map(|&h| h as i64));
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
                    patches.push((*point, value.shallow_clone()));
                }
                TruncateLatent { layers, rank } => {
                    if *rank > cfg.kv_lora_rank {
                        return Err(Error::Input(format!("{iv}: rank {rank} exceeds kv_lora_rank ({})", cfg.kv_lora_rank)));
                    }
                    let ls = match layers {
                        Layers::All => (0..n_layers).collect(),
                        other => other.resolve(model),
                    };
                    for l in ls {
                        check_layer(l, iv)?;
                        truncate.insert(l, *rank);
                    }
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
                                        Err(Error::Input(format!("{iv}: expert {x} out of range (layer {l} has {e} experts)")))
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
        Ok(Compiled { edits, heads, patches, truncate })
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
    pub edits: BTreeMap<usize, RouterEdits>,
    pub heads: BTreeMap<usize, Vec<i64>>,
    pub patches: Vec<(HookPoint, Tensor)>,
    pub truncate: BTreeMap<usize, usize>,
}

impl Compiled {
    /// Applies the value-level interventions at `point`.
    pub fn apply(&self, point: HookPoint, mut value: Tensor) -> Result<Tensor> {
        if let HookPoint::HeadOut(l) = point {
            if let Some(hs) = self.heads.get(&l) {
                // value [B, T, H, v]: zero the ablated heads
                let idx = Tensor::f_from_slice(hs)?.f_to_device(value.device())?;
                value = value.f_index_fill(2, &idx, 0.0)?;
            }
        }
        if let HookPoint::CKv(l) = point {
            if let Some(&r) = self.truncate.get(&l) {
                value = project_top_directions(&value, r)?;
            }
        }
        for (p, v) in &self.patches {
            if *p == point {
                if v.size() != value.size() {
                    return Err(Error::Input(format!(
                        "patch at {point}: the patch has shape {:?}, the activation {:?}",
                        v.size(),
                        value.size()
                    )));
                }
                value = v.f_to_kind(value.kind())?.f_to_device(value.device())?;
            }
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
