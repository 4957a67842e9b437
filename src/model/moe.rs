//! DeepSeekMoE (arXiv:2401.06066): shared experts that see every token plus
//! fine-grained routed experts, `num_experts_per_tok` per token.
//!
//! Routers (the checkpoint's `mlp.gate`):
//! - V3 `noaux_tc`: `s = sigmoid(x W^T)`; choice on `s + e_score_correction_bias`;
//!   groups ranked by the sum of their two best biased scores; top-k inside the
//!   `topk_group` best groups; weights are the *unbiased* `s`.
//! - V2 `greedy` / `group_limited_greedy`: `s = softmax(x W^T)`; groups ranked
//!   by their best expert.
//!
//! then optional `norm_topk_prob` and `routed_scaling_factor`. Logits and
//! scores are computed in f32, as `transformers` does. Reference:
//! `DeepseekV3TopkRouter` / `DeepseekV2TopkRouter` in `transformers`.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use super::config::{Config, ScoringFunc, TopkMethod};
use super::routing::{BiasEdit, RouterEdits, RouterInput, RouterSettings};
use super::loader::LoadPath;
use super::hooks::{HookPoint, Hooks, NoHooks};
use super::gemv::{swiglu_sum_one_row, tasks_on_team, Simd, SwigluWeights};
use super::nn::{cpu_f32_no_grad, silu_times, Linear};
use super::stream::read_ahead;
use super::weight::{FetchJob, Packed, Weight};
use crate::error::{Error, IndexKind, Result};

/// A SwiGLU feed-forward block `down(silu(gate(x)) * up(x))`. Gate and up are
/// stacked into one [2I, D] matrix so one matmul computes both.
#[derive(Debug)]
pub struct Mlp {
    /// `[gate_proj; up_proj]` [2I, D]
    pub gate_up: Linear,
    pub down_proj: Linear,
    pub intermediate: i64,
}

impl Mlp {
    /// Loads `{gate,up,down}_proj` under `p`; gate and up become the stacked
    /// weight `gate_up_proj.weight`.
    pub fn load(p: &LoadPath, hidden: usize, inter: usize, bias: bool) -> Result<Mlp> {
        let weight = p.weight("gate_up_proj.weight")?;
        let bias_t = if bias {
            let i = [inter as i64];
            let kind = p.loader().kind();
            let g = p.small("gate_proj.bias", &i, kind)?;
            let u = p.small("up_proj.bias", &i, kind)?;
            Some(Tensor::f_cat(&[g, u], 0)?)
        } else {
            None
        };
        let gate_up = Linear { weight, bias: bias_t };
        let down_proj = Linear::load(&p.pp("down_proj"), hidden, bias)?;
        Ok(Mlp {
            gate_up,
            down_proj,
            intermediate: inter as i64,
        })
    }

    /// Both weights (for prefetching and accounting).
    pub fn weights(&self) -> [&Weight; 2] {
        [&self.gate_up.weight, &self.down_proj.weight]
    }

    /// A read job per weight still on disk (`None` for a resident one), in
    /// the order [`forward_fetched`](Self::forward_fetched) takes them.
    pub fn fetch_jobs(&self) -> Vec<Option<FetchJob>> {
        self.weights().iter().map(|w| w.fetch_job()).collect()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = one_row_swiglu_sum(x, &[(self, None)])? {
            return Ok(y);
        }
        self.forward_fetched(x, Vec::new())
    }

    /// The block's weights as [`swiglu_sum_one_row`] reads them, with
    /// `factor` on its output: both resident, f32 on the CPU, contiguous,
    /// without biases and nothing requiring a gradient; `None` otherwise.
    fn swiglu_weights(&self, factor: Option<f32>) -> Option<SwigluWeights<'_>> {
        if self.gate_up.bias.is_some() || self.down_proj.bias.is_some() {
            return None;
        }
        let (gu, down) = (self.gate_up.weight.as_ready()?, self.down_proj.weight.as_ready()?);
        let i = self.intermediate;
        let d = down.size().first().copied()?;
        let fits = |w: &Tensor, shape: [i64; 2]| cpu_f32_no_grad(w) && w.is_contiguous() && w.size() == shape;
        if !fits(gu, [2 * i, d]) || !fits(down, [d, i]) {
            return None;
        }
        let (i, d) = (i as usize, d as usize);
        // SAFETY: both are contiguous f32 CPU tensors of exactly these
        // element counts (checked above), owned by `self`'s weights, which
        // outlive the returned borrow and are not written while it lives
        // (nothing here takes `self` mutably)
        unsafe {
            Some(SwigluWeights {
                gate_up: std::slice::from_raw_parts(gu.data_ptr() as *const f32, 2 * i * d),
                down: std::slice::from_raw_parts(down.data_ptr() as *const f32, d * i),
                inter: i,
                factor,
            })
        }
    }

    /// The forward pass with weights already read on another thread
    /// (`[gate_up, down]` in the order of [`Mlp::weights`], see
    /// [`Weight::fetch_job`]).
    pub fn forward_fetched(&self, x: &Tensor, fetched: Vec<Option<Packed>>) -> Result<Tensor> {
        let mut fetched = fetched.into_iter();
        let (gu_w, down_w) = (fetched.next().flatten(), fetched.next().flatten());
        let gu = self.gate_up.weight.linear_fetched(x, gu_w, self.gate_up.bias.as_ref())?;
        let hidden = match swiglu_few_f32(&gu, self.intermediate)? {
            Some(h) => h,
            None => {
                let gate = gu.f_narrow(-1, 0, self.intermediate)?;
                let up = gu.f_narrow(-1, self.intermediate, self.intermediate)?;
                gate.f_silu()?.f_mul(&up)?
            }
        };
        self.down_proj.weight.linear_fetched(&hidden, down_w, self.down_proj.bias.as_ref())
    }

    /// `gate_proj.weight` [I, D] (a view into the stacked matrix when it is resident).
    pub fn gate_proj_weight(&self) -> Result<Tensor> {
        Ok(self.gate_up.weight.tensor()?.f_narrow(0, 0, self.intermediate)?)
    }

    /// `up_proj.weight` [I, D] (a view into the stacked matrix when it is resident).
    pub fn up_proj_weight(&self) -> Result<Tensor> {
        Ok(self.gate_up.weight.tensor()?.f_narrow(0, self.intermediate, self.intermediate)?)
    }
}

impl RouterOutput {
    /// The outputs of consecutive passes as one, rows joined in order (the
    /// bias is the first's: one router's bias does not change between passes).
    pub fn cat(parts: &[&RouterOutput]) -> Result<RouterOutput> {
        let first = parts.first().ok_or_else(|| Error::Input("no router outputs to join".into()))?;
        let cat = |f: &dyn Fn(&RouterOutput) -> &Tensor| -> Result<Tensor> { Ok(Tensor::f_cat(&parts.iter().map(|r| f(r)).collect::<Vec<_>>(), 0)?) };
        let cat_opt = |f: &dyn Fn(&RouterOutput) -> Option<&Tensor>| -> Result<Option<Tensor>> {
            let ts: Option<Vec<&Tensor>> = parts.iter().map(|r| f(r)).collect();
            Ok(ts.map(|ts| Tensor::f_cat(&ts, 0)).transpose()?)
        };
        Ok(RouterOutput {
            logits: cat(&|r| &r.logits)?,
            scores: cat(&|r| &r.scores)?,
            choice: cat(&|r| &r.choice)?,
            bias: first.bias.as_ref().map(|b| b.shallow_clone()),
            group_scores: cat_opt(&|r| r.group_scores.as_ref())?,
            chosen_groups: cat_opt(&|r| r.chosen_groups.as_ref())?,
            topk_indices: cat(&|r| &r.topk_indices)?,
            topk_weights: cat(&|r| &r.topk_weights)?,
        })
    }

    /// Detached copies on `device` (shallow where already there).
    pub fn to_device(&self, device: Device) -> Result<RouterOutput> {
        let to = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_device(device)?) };
        Ok(RouterOutput {
            logits: to(&self.logits)?,
            scores: to(&self.scores)?,
            choice: to(&self.choice)?,
            bias: self.bias.as_ref().map(to).transpose()?,
            group_scores: self.group_scores.as_ref().map(to).transpose()?,
            chosen_groups: self.chosen_groups.as_ref().map(to).transpose()?,
            topk_indices: to(&self.topk_indices)?,
            topk_weights: to(&self.topk_weights)?,
        })
    }
}

/// `mlp.gate`: a linear scorer [E, D] plus, for V3, `e_score_correction_bias`.
#[derive(Debug)]
pub struct Router {
    /// [E, D], kept in f32: routing is computed in f32.
    pub weight: Tensor,
    /// \[E\] f32; steers the choice only, never the weights.
    pub e_score_correction_bias: Option<Tensor>,
    pub settings: RouterSettings,
}

/// Everything the router decided for a batch of N tokens.
#[derive(Debug)]
pub struct RouterOutput {
    /// `x W^T` [N, E] f32.
    pub logits: Tensor,
    /// sigmoid or softmax of the logits [N, E] f32.
    pub scores: Tensor,
    /// The scores the choice was made on: `scores + bias`, banned experts at
    /// `-inf`, forced ones at `+inf` [N, E] f32 (before group masking).
    pub choice: Tensor,
    /// The bias that was added (`e_score_correction_bias` or its edit) \[E\].
    pub bias: Option<Tensor>,
    /// Per-group scores [N, G] (group-limited routing only).
    pub group_scores: Option<Tensor>,
    /// The groups kept [N, topk_group] (group-limited routing only).
    pub chosen_groups: Option<Tensor>,
    /// Chosen experts [N, k] i64, best first.
    pub topk_indices: Tensor,
    /// Their weights [N, k] f32 (after normalisation and scaling).
    pub topk_weights: Tensor,
}

/// The result of choosing experts from scores.
#[derive(Debug)]
pub struct Selection {
    pub choice: Tensor,
    pub group_scores: Option<Tensor>,
    pub chosen_groups: Option<Tensor>,
    pub indices: Tensor,
}

impl Router {
    pub fn load(p: &LoadPath, cfg: &Config) -> Result<Router> {
        let e = cfg.n_routed_experts as i64;
        let weight = p.small("weight", &[e, cfg.hidden_size as i64], Kind::Float)?;
        let e_score_correction_bias = match cfg.topk_method {
            TopkMethod::NoauxTc => Some(p.small("e_score_correction_bias", &[e], Kind::Float)?),
            _ => None,
        };
        Ok(Router {
            weight,
            e_score_correction_bias,
            settings: RouterSettings::from_config(cfg),
        })
    }

    pub fn num_experts(&self) -> i64 {
        self.weight.size()[0]
    }

    /// Routes `x` [N, D] as the checkpoint says.
    pub fn route(&self, x: &Tensor) -> Result<RouterOutput> {
        self.route_with(x, None, 0)
    }

    /// Routes `x` [N, D] with `edits` applied (layer is for messages).
    pub fn route_with(&self, x: &Tensor, edits: Option<&RouterEdits>, layer: usize) -> Result<RouterOutput> {
        self.route_hooked(x, edits, &mut NoHooks, layer)
    }

    /// Routes `x` [N, D] with `edits` applied; `hooks` see (and may replace)
    /// the logits and then the scores before the choice is made on them.
    pub fn route_hooked(&self, x: &Tensor, edits: Option<&RouterEdits>, hooks: &mut dyn Hooks, layer: usize) -> Result<RouterOutput> {
        let st = edits.and_then(|e| e.settings.as_ref()).unwrap_or(&self.settings);
        let e = self.num_experts();
        let logits = x.f_to_kind(Kind::Float)?.f_linear(&self.weight, None::<Tensor>)?; // [N, E]
        let logits = hooks.visit(HookPoint::RouterLogits(layer), logits)?;
        let scores = hooks.visit(HookPoint::RouterScores(layer), score(&logits, st.scoring)?)?;
        if let Some(custom) = edits.and_then(|e| e.custom.as_ref()) {
            let (idx, w) = custom.route(&RouterInput { x, logits: &logits, scores: &scores, settings: st, layer })?;
            let n = logits.size()[0];
            let (is, ws) = (idx.size(), w.size());
            if is.len() != 2 || is[0] != n || is[1] < 1 || is != ws {
                return Err(Error::Input(format!(
                    "layer {layer}: a custom router must return indices and weights of shape [{n}, k] with k >= 1, got {is:?} and {ws:?}"
                )));
            }
            let idx = idx.f_to_kind(Kind::Int64)?.f_to_device(logits.device())?;
            let w = w.f_to_device(logits.device())?;
            check_expert_ids(&idx, e, layer)?;
            return Ok(RouterOutput {
                choice: scores.shallow_clone(),
                logits,
                scores,
                bias: None,
                group_scores: None,
                chosen_groups: None,
                topk_indices: idx,
                topk_weights: w.f_to_kind(Kind::Float)?,
            });
        }
        let bias = match edits.map(|e| &e.bias) {
            None | Some(BiasEdit::Keep) => self.e_score_correction_bias.as_ref().map(|b| b.shallow_clone()),
            Some(BiasEdit::Zero) => None,
            Some(BiasEdit::Replace(b)) => {
                if b.size() != [e] {
                    return Err(Error::Input(format!("layer {layer}: a router bias must have shape [{e}], got {:?}", b.size())));
                }
                Some(b.f_to_kind(Kind::Float)?.f_to_device(logits.device())?)
            }
        };
        let (banned, forced) = edits.map_or((&[][..], &[][..]), |e| (&e.banned[..], &e.forced[..]));
        let sel = self.select(&scores, bias.as_ref(), st, banned, forced, layer)?;
        let topk_weights = match topk_weights_few_f32(&scores, &sel.indices, st)? {
            Some(w) => w,
            None => {
                let mut w = scores.f_gather(1, &sel.indices, false)?;
                if st.norm_topk_prob {
                    w = w.f_div(&w.f_sum_dim_intlist(-1, true, Kind::Float)?.f_add_scalar(1e-20)?)?;
                }
                w.f_mul_scalar(st.routed_scaling_factor)?
            }
        };
        Ok(RouterOutput {
            logits,
            scores,
            choice: sel.choice,
            bias,
            group_scores: sel.group_scores,
            chosen_groups: sel.chosen_groups,
            topk_indices: sel.indices,
            topk_weights,
        })
    }

    /// Chooses experts from `scores` [N, E]: adds `bias`, bans and forces,
    /// masks groups, takes the top-k (best first).
    pub fn select(
        &self,
        scores: &Tensor,
        bias: Option<&Tensor>,
        st: &RouterSettings,
        banned: &[i64],
        forced: &[i64],
        layer: usize,
    ) -> Result<Selection> {
        let e = self.num_experts();
        for &x in banned.iter().chain(forced) {
            if x < 0 || x >= e {
                return Err(Error::Input(format!("layer {layer}: expert {x} does not exist (the layer has {e} experts)")));
            }
        }
        if forced.len() as i64 > st.top_k {
            return Err(Error::Input(format!(
                "layer {layer}: {} experts forced but only {} are chosen per token",
                forced.len(),
                st.top_k
            )));
        }
        if let Some(x) = forced.iter().find(|x| banned.contains(x)) {
            return Err(Error::Input(format!("layer {layer}: expert {x} is both banned and forced")));
        }
        if st.top_k < 1 || st.top_k > e {
            return Err(Error::Input(format!("layer {layer}: top-k must be in 1..={e}, got {}", st.top_k)));
        }
        let grouped = self.check_groups(st, layer)?;
        if banned.is_empty() && forced.is_empty() {
            if let Some(sel) = select_few_f32(scores, bias, st, e, grouped)? {
                return Ok(sel);
            }
        }
        let mut choice = match bias {
            Some(b) => scores.f_add(b)?,
            None => scores.shallow_clone(),
        };
        let device = scores.device();
        if !banned.is_empty() {
            choice = choice.f_index_fill(1, &Tensor::f_from_slice(banned)?.f_to_device(device)?, f64::NEG_INFINITY)?;
        }
        if !forced.is_empty() {
            choice = choice.f_index_fill(1, &Tensor::f_from_slice(forced)?.f_to_device(device)?, f64::INFINITY)?;
        }
        let (mut masked, group_scores, chosen_groups) = self.mask_groups(&choice, st, layer)?;
        if !forced.is_empty() {
            // forced experts are chosen whatever their group's rank
            masked = masked.f_index_fill(1, &Tensor::f_from_slice(forced)?.f_to_device(device)?, f64::INFINITY)?;
        }
        let (best, indices) = masked.f_topk(st.top_k, -1, true, true)?; // [N, k]
        if any_neg_inf(&best)? {
            let per_group = self.num_experts() / st.n_group.max(1);
            return Err(Error::Input(format!(
                "layer {layer}: fewer than {} experts are left to choose ({} banned; group-limited routing allows {} groups x {} experts)",
                st.top_k,
                banned.len(),
                st.topk_group,
                per_group
            )));
        }
        Ok(Selection {
            choice,
            group_scores,
            chosen_groups,
            indices,
        })
    }

    /// Whether `st` routes by groups, checked against the layer's experts:
    /// `false` for greedy routing or a single group, an error when the
    /// experts cannot form `n_group` groups with `topk_group` kept.
    fn check_groups(&self, st: &RouterSettings, layer: usize) -> Result<bool> {
        if st.method == TopkMethod::Greedy || st.n_group <= 1 {
            return Ok(false);
        }
        let e = self.num_experts();
        if st.n_group > e || e % st.n_group != 0 || st.topk_group < 1 || st.topk_group > st.n_group {
            return Err(Error::Input(format!(
                "layer {layer}: {e} experts cannot form {} groups with {} kept",
                st.n_group, st.topk_group
            )));
        }
        Ok(true)
    }

    /// Ranks groups and hides the experts of all but the `topk_group` best
    /// (`-inf`, so they can never be chosen). Greedy routing passes through.
    /// Returns (masked scores, group scores, chosen groups).
    pub fn mask_groups(&self, choice: &Tensor, st: &RouterSettings, layer: usize) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        if !self.check_groups(st, layer)? {
            return Ok((choice.shallow_clone(), None, None));
        }
        let e = self.num_experts();
        let n = choice.size()[0];
        let per = e / st.n_group;
        let grouped = choice.f_view([n, st.n_group, per])?;
        let group_scores = match st.method {
            // sum of the two best experts of each group  [N, G]
            TopkMethod::NoauxTc => grouped.f_topk(2.min(per), -1, true, true)?.0.f_sum_dim_intlist(-1, false, Kind::Float)?,
            // the best expert of each group  [N, G]
            _ => grouped.f_amax(-1, false)?,
        };
        let (_, group_idx) = group_scores.f_topk(st.topk_group, -1, true, true)?;
        let keep = Tensor::f_zeros([n, st.n_group], (Kind::Bool, choice.device()))?
            .f_scatter_value(1, &group_idx, 1)?
            .f_unsqueeze(-1)?
            .f_expand([n, st.n_group, per], false)?
            .f_reshape([n, st.n_group * per])?;
        let masked = choice.f_masked_fill(&keep.f_logical_not()?, f64::NEG_INFINITY)?;
        Ok((masked, Some(group_scores), Some(group_idx)))
    }
}

/// sigmoid or softmax of router logits.
pub fn score(logits: &Tensor, scoring: ScoringFunc) -> Result<Tensor> {
    Ok(match scoring {
        ScoringFunc::Sigmoid => logits.f_sigmoid()?,
        ScoringFunc::Softmax => logits.f_softmax(-1, Kind::Float)?,
    })
}

/// Router scores (tokens x experts) up to which [`select_few_f32`] chooses
/// in one loop over values read back, instead of the ten or so libtorch
/// operations of [`Router::select`] (a decode step routes one token).
const ROUTER_FEW: usize = 4096;

/// [`Router::select`] without bans or forced experts, for a few tokens'
/// f32 scores on the CPU with nothing requiring a gradient: the same
/// choice, group scores, kept groups and top-k, computed on the values read
/// back. `None` (libtorch's operations decide) for any other input, and
/// wherever the outcome would depend on how libtorch orders equal values:
/// two equal values among the groups or experts kept and the first left
/// out, a NaN, or fewer than k experts left (libtorch's path reports it).
fn select_few_f32(scores: &Tensor, bias: Option<&Tensor>, st: &RouterSettings, e: i64, grouped: bool) -> Result<Option<Selection>> {
    let size = scores.size();
    let n = match size.as_slice() {
        [n, cols] if *cols == e => *n,
        _ => return Ok(None),
    };
    if scores.numel() > ROUTER_FEW || !cpu_f32_no_grad(scores) || bias.is_some_and(|b| !cpu_f32_no_grad(b) || b.size() != [e]) {
        return Ok(None);
    }
    let (eu, k) = (e as usize, st.top_k as usize);
    let mut choice = Vec::<f32>::try_from(scores.f_reshape([-1])?)?;
    if let Some(b) = bias {
        let b = Vec::<f32>::try_from(b)?;
        for row in choice.chunks_exact_mut(eu) {
            for (c, b) in row.iter_mut().zip(&b) {
                *c += b;
            }
        }
    }
    if choice.iter().any(|v| v.is_nan()) {
        return Ok(None);
    }
    let (g, tg) = if grouped { (st.n_group as usize, st.topk_group as usize) } else { (1, 1) };
    let per = eu / g;
    let (mut group_scores, mut kept_groups, mut indices) = (Vec::with_capacity(n as usize * g), Vec::new(), Vec::with_capacity(n as usize * k));
    let mut masked = vec![f32::NEG_INFINITY; eu];
    for row in choice.chunks_exact(eu) {
        if grouped {
            let first = group_scores.len();
            for group in row.chunks_exact(per) {
                group_scores.push(match st.method {
                    // the sum of the group's two best (its best alone when it has one expert)
                    TopkMethod::NoauxTc => best_two_sum(group),
                    _ => group.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                });
            }
            let Some(keep) = top_sorted(&group_scores[first..], tg) else {
                return Ok(None);
            };
            masked.fill(f32::NEG_INFINITY);
            for &grp in &keep {
                masked[grp * per..(grp + 1) * per].copy_from_slice(&row[grp * per..(grp + 1) * per]);
            }
            kept_groups.extend(keep.iter().map(|&i| i as i64));
        } else {
            masked.copy_from_slice(row);
        }
        match top_sorted(&masked, k) {
            Some(best) if masked[best[k - 1]] > f32::NEG_INFINITY => indices.extend(best.iter().map(|&i| i as i64)),
            _ => return Ok(None),
        }
    }
    let as_tensor = |v: &[f32], cols: usize| -> Result<Tensor> { Ok(Tensor::f_from_slice(v)?.f_view([n, cols as i64])?) };
    let (group_scores, chosen_groups) = if grouped {
        (Some(as_tensor(&group_scores, g)?), Some(Tensor::f_from_slice(&kept_groups)?.f_view([n, tg as i64])?))
    } else {
        (None, None)
    };
    Ok(Some(Selection {
        choice: as_tensor(&choice, eu)?,
        group_scores,
        chosen_groups,
        indices: Tensor::f_from_slice(&indices)?.f_view([n, k as i64])?,
    }))
}

/// A V3 group's score: the sum of its two best values (its only value for a
/// group of one), largest first as libtorch adds them.
fn best_two_sum(group: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in group {
        if v > a {
            (a, b) = (v, a);
        } else if v > b {
            b = v;
        }
    }
    if group.len() < 2 {
        a
    } else {
        a + b
    }
}

/// The positions of the `k` largest of `v` (no NaN), largest first, when no
/// two of them are equal and none equals the largest left out: then they are
/// what libtorch's `topk` returns, whatever order it gives equal values.
/// `None` otherwise.
fn top_sorted(v: &[f32], k: usize) -> Option<Vec<usize>> {
    if k == 0 || k > v.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_unstable_by(|&a, &b| v[b].total_cmp(&v[a]));
    if order[..(k + 1).min(v.len())].windows(2).any(|w| v[w[0]] == v[w[1]]) {
        return None;
    }
    order.truncate(k);
    Some(order)
}

/// The top-k weights (the chosen experts' scores, normalised when the
/// router says so, then scaled) of a few tokens' f32 scores on the CPU with
/// nothing requiring a gradient, computed on the values read back; `None`
/// for any other input (libtorch's operations compute them).
fn topk_weights_few_f32(scores: &Tensor, indices: &Tensor, st: &RouterSettings) -> Result<Option<Tensor>> {
    let (ss, is) = (scores.size(), indices.size());
    let (e, k) = match (ss.as_slice(), is.as_slice()) {
        ([n, e], [m, k]) if n == m && *k >= 1 => (*e as usize, *k as usize),
        _ => return Ok(None),
    };
    if scores.numel() > ROUTER_FEW || !cpu_f32_no_grad(scores) || indices.device() != Device::Cpu || indices.kind() != Kind::Int64 {
        return Ok(None);
    }
    let s = Vec::<f32>::try_from(scores.f_reshape([-1])?)?;
    let ids = Vec::<i64>::try_from(indices.f_reshape([-1])?)?;
    let scale = st.routed_scaling_factor as f32;
    let mut w = Vec::with_capacity(ids.len());
    for (row, ids) in s.chunks_exact(e).zip(ids.chunks_exact(k)) {
        let first = w.len();
        for &i in ids {
            match usize::try_from(i).ok().and_then(|i| row.get(i)) {
                Some(&v) => w.push(v),
                None => return Ok(None), // out of range: libtorch's gather reports it
            }
        }
        if st.norm_topk_prob {
            let sum = w[first..].iter().sum::<f32>() + 1e-20;
            w[first..].iter_mut().for_each(|v| *v /= sum);
        }
        w[first..].iter_mut().for_each(|v| *v *= scale);
    }
    Ok(Some(Tensor::f_from_slice(&w)?.f_view([is[0], is[1]])?))
}

/// Elements of `[gate | up]` up to which [`swiglu_few_f32`] computes in one loop.
const SWIGLU_FEW: usize = 16384;

/// `sum f_m mlp(x)` over `mlps` for one f32 row `x` on the CPU in one
/// pass ([`swiglu_sum_one_row`]), when every block's weights are resident
/// f32 ([`Mlp::swiglu_weights`]) and the CPU has AVX2 and FMA; `None`
/// otherwise. The output has `x`'s shape.
fn one_row_swiglu_sum(x: &Tensor, mlps: &[(&Mlp, Option<f32>)]) -> Result<Option<Tensor>> {
    let Some(simd) = Simd::detect() else {
        return Ok(None);
    };
    let d = x.size().last().copied().unwrap_or(0);
    if d == 0 || x.numel() != d as usize || !cpu_f32_no_grad(x) {
        return Ok(None);
    }
    let Some(weights) = mlps.iter().map(|(m, f)| m.swiglu_weights(*f)).collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    let x = x.f_contiguous()?;
    let out = x.f_empty_like()?;
    let d = d as usize;
    // SAFETY: `x` is a contiguous f32 CPU tensor of d elements (checked
    // above) and `out` a new one like it, written only here; both are alive
    // for the whole function
    let (xs, ys) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, d),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, d),
        )
    };
    Ok(swiglu_sum_one_row(simd, xs, &weights, ys).then_some(out))
}

/// `silu(gate) * up` from `gu` = `[..., gate | up]` (each `inter` wide) for
/// a few f32 rows on the CPU with nothing requiring a gradient (a decode
/// step), in one loop instead of four libtorch operations. `None` otherwise.
fn swiglu_few_f32(gu: &Tensor, inter: i64) -> Result<Option<Tensor>> {
    let size = gu.size();
    if size.last().copied() != Some(2 * inter) || inter < 1 || gu.numel() > SWIGLU_FEW {
        return Ok(None);
    }
    if !cpu_f32_no_grad(gu) {
        return Ok(None);
    }
    let gu = gu.f_contiguous()?;
    let mut out_size = size.clone();
    if let Some(last) = out_size.last_mut() {
        *last = inter;
    }
    let out = Tensor::f_empty(out_size.as_slice(), (Kind::Float, Device::Cpu))?;
    let (n, inter) = (gu.numel(), inter as usize);
    if n == 0 {
        return Ok(Some(out));
    }
    // SAFETY: `gu` is a contiguous f32 CPU tensor of n elements and `out` a
    // new one of n / 2, both alive for the whole function; `out` is written
    // only here.
    let (src, dst) = unsafe {
        (
            std::slice::from_raw_parts(gu.data_ptr() as *const f32, n),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n / 2),
        )
    };
    for (row, y) in src.chunks_exact(2 * inter).zip(dst.chunks_exact_mut(inter)) {
        let (gate, up) = row.split_at(inter);
        for ((y, g), u) in y.iter_mut().zip(gate).zip(up) {
            *y = silu_times(*g, *u);
        }
    }
    Ok(Some(out))
}

/// Elements up to which a check reads a tensor back whole (one copy) rather
/// than reducing it in libtorch (several operations, each costing more than
/// the copy at a decode step).
const READ_BACK: usize = 256;

/// Whether any of the top-k scores is `-inf` (fewer experts were left than k).
fn any_neg_inf(best: &Tensor) -> Result<bool> {
    if best.numel() <= READ_BACK && best.kind() == Kind::Float {
        return Ok(Vec::<f32>::try_from(best.f_reshape([-1])?)?.iter().any(|v| *v == f32::NEG_INFINITY));
    }
    Ok(best.f_isneginf()?.f_any()?.f_int64_value(&[])? != 0)
}

fn check_expert_ids(idx: &Tensor, e: i64, layer: usize) -> Result<()> {
    if idx.numel() == 0 {
        return Ok(());
    }
    let (lo, hi) = if idx.numel() <= READ_BACK && idx.kind() == Kind::Int64 {
        let ids = Vec::<i64>::try_from(idx.f_reshape([-1])?)?;
        (ids.iter().copied().min().unwrap_or(0), ids.iter().copied().max().unwrap_or(0))
    } else {
        (idx.f_min()?.f_int64_value(&[])?, idx.f_max()?.f_int64_value(&[])?)
    };
    if lo < 0 || hi >= e {
        return Err(Error::out_of_range(IndexKind::Expert, if lo < 0 { lo } else { hi }, e).in_context(format!("layer {layer}")));
    }
    Ok(())
}

/// Elements of one expert output up to which [`weighted_sum`] adds the
/// outputs in one loop.
const WEIGHTED_FEW: usize = 16384;

/// `sum_i w[i] ys[i]` for one token's expert outputs `ys` (each [1, D]) and
/// their weights `w` [k, 1], added in order. For f32 CPU tensors with
/// nothing requiring a gradient, one loop (the same products and sums in
/// the same order as libtorch's operations, so the same numbers) instead of
/// three operations per expert.
fn weighted_sum(ys: &[Tensor], w: &Tensor) -> Result<Tensor> {
    let d = ys.first().map_or(0, |y| y.numel());
    let few = d <= WEIGHTED_FEW
        && w.numel() == ys.len()
        && cpu_f32_no_grad(w)
        && ys.iter().all(|y| cpu_f32_no_grad(y) && y.size() == ys[0].size());
    if !few {
        let mut out: Option<Tensor> = None;
        for (i, y) in ys.iter().enumerate() {
            let y = y.f_mul(&w.f_narrow(0, i as i64, 1)?)?;
            out = Some(match out.take() {
                None => y,
                Some(o) => o.f_add(&y)?,
            });
        }
        return out.ok_or_else(|| Error::Input("no expert outputs to add".into()));
    }
    let w = Vec::<f32>::try_from(w.f_reshape([-1])?)?;
    let ys = ys.iter().map(|y| y.f_contiguous()).collect::<std::result::Result<Vec<_>, _>>()?;
    let out = ys[0].f_empty_like()?;
    // SAFETY: every tensor of `ys` is a contiguous f32 CPU tensor of d
    // elements (checked above), as is `out` (made like the first), all alive
    // for the whole function; `out` is new and written only here.
    let acc = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, d) };
    for (i, (y, wi)) in ys.iter().zip(&w).enumerate() {
        // SAFETY: as above, `y` holds d f32 values and is only read.
        let y = unsafe { std::slice::from_raw_parts(y.data_ptr() as *const f32, d) };
        if i == 0 {
            acc.iter_mut().zip(y).for_each(|(a, y)| *a = y * wi);
        } else {
            acc.iter_mut().zip(y).for_each(|(a, y)| *a += y * wi);
        }
    }
    Ok(out)
}

/// Routed experts + shared experts.
#[derive(Debug)]
pub struct Moe {
    pub gate: Router,
    pub experts: Vec<Mlp>,
    pub shared_experts: Option<Mlp>,
}

/// The MoE output with what the router did.
#[derive(Debug)]
pub struct MoeOutput {
    /// [B, T, D]
    pub output: Tensor,
    pub routing: RouterOutput,
}

impl Moe {
    pub fn load(p: &LoadPath, cfg: &Config) -> Result<Moe> {
        let gate = Router::load(&p.pp("gate"), cfg)?;
        let (d, im, bias) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.mlp_bias);
        let experts = (0..cfg.n_routed_experts)
            .map(|e| Mlp::load(&p.pp("experts").pp(e), d, im, bias))
            .collect::<Result<Vec<_>>>()?;
        let shared_experts = if cfg.n_shared_experts > 0 {
            Some(Mlp::load(&p.pp("shared_experts"), d, im * cfg.n_shared_experts, bias)?)
        } else {
            None
        };
        Ok(Moe {
            gate,
            experts,
            shared_experts,
        })
    }

    /// `x` [B, T, D] -> sum_k w_k expert_k(x) + shared(x).
    pub fn forward(&self, x: &Tensor) -> Result<MoeOutput> {
        self.forward_hooked(x, &mut NoHooks, 0)
    }

    /// The forward pass with hooks (layer `layer`): router edits, reads and
    /// replacements of the routing, per-expert and shared outputs.
    pub fn forward_hooked(&self, x: &Tensor, hooks: &mut dyn Hooks, layer: usize) -> Result<MoeOutput> {
        let shape = x.size();
        let d = *shape.last().unwrap_or(&0);
        let flat = x.f_reshape([-1, d])?; // [N, D]
        let routing = self.choose(&flat, hooks, layer)?;
        // one token, and no hook that wants the experts' own outputs
        let watched = || hooks.wants(HookPoint::SharedOut(layer)) || (0..self.experts.len()).any(|e| hooks.wants(HookPoint::ExpertOut(layer, e)));
        if flat.size().first() == Some(&1) && !watched() {
            if let Some(out) = self.one_token(&flat, &routing)? {
                return Ok(MoeOutput {
                    output: out.f_view(shape.as_slice())?,
                    routing,
                });
            }
        }
        let mut out = self.dispatch(&flat, &routing.topk_indices, &routing.topk_weights)?;
        for (e, expert) in self.experts.iter().enumerate() {
            if hooks.wants(HookPoint::ExpertOut(layer, e)) {
                // tokens routed to e, unweighted, zeros elsewhere  [N, D]
                let rows = routing.topk_indices.f_eq(e as i64)?.f_any_dim(1, false)?.f_nonzero()?.f_squeeze_dim(1)?;
                let y = flat.f_zeros_like()?.f_index_copy(0, &rows, &expert.forward(&flat.f_index_select(0, &rows)?)?)?;
                // read-only: the expert outputs already went into `out`
                let _ = hooks.visit(HookPoint::ExpertOut(layer, e), y)?;
            }
        }
        if let Some(shared) = &self.shared_experts {
            out = out.f_add(&hooks.visit(HookPoint::SharedOut(layer), shared.forward(&flat)?)?)?;
        }
        Ok(MoeOutput {
            output: out.f_view(shape.as_slice())?,
            routing,
        })
    }

    /// The router's choice for `flat` [N, D] with the layer's router edits and
    /// hooks (logits, scores, kept groups, top-k), checked: the first half of
    /// [`forward_hooked`](Self::forward_hooked), without running an expert.
    pub fn choose(&self, flat: &Tensor, hooks: &mut dyn Hooks, layer: usize) -> Result<RouterOutput> {
        let edits = hooks.router_edits(layer).cloned();
        let mut routing = self.gate.route_hooked(flat, edits.as_ref(), hooks, layer)?;
        // the kept groups are read-only: the choice is already made (change
        // the scores above, or replace the top-k below)
        if let Some(g) = &routing.chosen_groups {
            let _ = hooks.visit(HookPoint::ChosenGroups(layer), g.shallow_clone())?;
        }
        routing.topk_indices = hooks.visit(HookPoint::TopkIndices(layer), routing.topk_indices)?;
        routing.topk_weights = hooks.visit(HookPoint::TopkWeights(layer), routing.topk_weights)?;
        let (is, ws) = (routing.topk_indices.size(), routing.topk_weights.size());
        if is.len() != 2 || is[0] != flat.size()[0] || is[1] < 1 || is != ws {
            return Err(Error::Input(format!(
                "layer {layer}: top-k indices and weights must both be [{}, k] with k >= 1, got {is:?} and {ws:?}",
                flat.size()[0]
            )));
        }
        check_expert_ids(&routing.topk_indices, self.experts.len() as i64, layer)?;
        Ok(routing)
    }

    /// One token's routed experts, weighted, plus the shared experts, in
    /// one pass of [`swiglu_sum_one_row`] (a decode step on the CPU in f32
    /// with every chosen expert resident); `None` where that does not apply.
    fn one_token(&self, flat: &Tensor, routing: &RouterOutput) -> Result<Option<Tensor>> {
        let (idx, w) = (&routing.topk_indices, &routing.topk_weights);
        if flat.size().first() != Some(&1) || !cpu_f32_no_grad(w) || idx.device() != Device::Cpu || w.numel() > READ_BACK {
            return Ok(None);
        }
        let chosen = Vec::<i64>::try_from(idx.f_reshape([-1])?)?;
        let factors = Vec::<f32>::try_from(w.f_reshape([-1])?)?;
        let mut mlps: Vec<(&Mlp, Option<f32>)> = Vec::with_capacity(chosen.len() + 1);
        for (e, f) in chosen.iter().zip(&factors) {
            // ids were checked by `choose`
            let Some(m) = usize::try_from(*e).ok().and_then(|e| self.experts.get(e)) else {
                return Ok(None);
            };
            mlps.push((m, Some(*f)));
        }
        mlps.extend(self.shared_experts.as_ref().map(|m| (m, None)));
        one_row_swiglu_sum(flat, &mlps)
    }

    /// Runs each expert once on all the tokens routed to it: token slots are
    /// sorted by expert, each expert processes one contiguous slice, and the
    /// weighted results are scattered back with `index_add`.
    pub fn dispatch(&self, x: &Tensor, indices: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let (n, k) = (indices.size()[0], indices.size()[1]);
        if n == 1 {
            return self.dispatch_one(x, indices, weights);
        }
        let e = self.experts.len() as i64;
        let flat_idx = indices.f_reshape([n * k])?;
        let order = flat_idx.f_argsort_stable(true, 0, false)?; // slots grouped by expert
        let token_of = order.f_floor_divide_scalar(k)?; // [N*k] token of each slot
        let slot_w = weights.f_reshape([n * k])?.f_index_select(0, &order)?; // [N*k]
        let counts = Vec::<i64>::try_from(flat_idx.f_bincount(None::<Tensor>, e)?.f_to_device(Device::Cpu)?)?;
        let xs = x.f_index_select(0, &token_of)?; // [N*k, D]
        let chosen: Vec<usize> = counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(e, _)| e).collect();
        let slots = Slots { x, xs: &xs, weights: &slot_w, token_of: &token_of };
        if let Some(out) = self.dispatch_side_by_side(&slots, &chosen, &counts)? {
            return Ok(out);
        }
        // experts on disk are read by reader threads while the ones already read compute
        let jobs: Vec<Vec<Option<FetchJob>>> = chosen.iter().map(|&e| self.experts[e].fetch_jobs()).collect();
        let mut parts = Vec::with_capacity(chosen.len());
        let mut offset = 0;
        read_ahead(&jobs, |i, fetched| {
            let c = counts[chosen[i]];
            let seg = xs.f_narrow(0, offset, c)?;
            let w = slot_w.f_narrow(0, offset, c)?.f_unsqueeze(1)?;
            parts.push(self.experts[chosen[i]].forward_fetched(&seg, fetched)?.f_mul(&w)?.f_to_kind(x.kind())?);
            offset += c;
            Ok(())
        })?;
        let ys = Tensor::f_cat(&parts, 0)?; // [N*k, D]
        Ok(x.f_zeros_like()?.f_index_add(0, &token_of, &ys)?)
    }

    /// [`dispatch`](Self::dispatch)'s experts side by side on libtorch's
    /// OpenMP team ([`tasks_on_team`]): each member runs whole experts on
    /// its own thread, the libtorch operations inside on that thread alone,
    /// and adds their weighted outputs into an accumulator of its own; the
    /// accumulators are summed at the end. `None` (nothing computed) where
    /// that does not apply: not on the CPU, a gradient to record (a
    /// member's thread would not share the caller's grad mode), a chosen
    /// expert not resident as a plain tensor (a packed or streamed one
    /// reads through shared buffers), or no team for the tasks (fewer than
    /// two experts, one thread).
    ///
    /// Why: the bench model's experts see about 256 tokens each in a 4 x 256
    /// prefill, products small enough that splitting each over two threads
    /// leaves one waiting at every barrier and runs the operations between
    /// them on one thread; whole experts per thread keep both busy. Measured
    /// with `deepscope bench --profile` on a 2-core AMD EPYC, five
    /// interleaved runs each: the routed and shared experts of a 4 x 256
    /// prefill took a median of 47.6 ms against 52.9 ms one expert at a
    /// time. (The shared experts on the team as blocks of rows measured no
    /// better than their own two-thread products, and stay outside it.)
    fn dispatch_side_by_side(&self, s: &Slots, chosen: &[usize], counts: &[i64]) -> Result<Option<Tensor>> {
        let resident = |m: &Mlp| {
            let biases = [&m.gate_up.bias, &m.down_proj.bias];
            m.weights().iter().all(|w| w.as_ready().is_some_and(|t| !t.requires_grad())) && biases.iter().all(|b| b.as_ref().is_none_or(|b| !b.requires_grad()))
        };
        if s.x.device() != Device::Cpu || [s.x, s.xs, s.weights].iter().any(|t| t.requires_grad()) || !chosen.iter().all(|&e| resident(&self.experts[e])) {
            return Ok(None);
        }
        // (expert, first slot, slots) per task, slots in expert order as sorted
        let tasks: Vec<(usize, i64, i64)> = chosen
            .iter()
            .scan(0, |at, &e| {
                let c = counts[e];
                Some((e, std::mem::replace(at, *at + c), c))
            })
            .collect();
        let costs: Vec<usize> = tasks.iter().map(|t| t.2.max(0) as usize).collect();
        let members = (tch::get_num_threads().max(1) as usize).min(tasks.len());
        let accs: Vec<Mutex<Option<Result<Tensor>>>> = (0..members).map(|_| Mutex::new(None)).collect();
        let shared = ReadOnly((self, s));
        let job = |me: usize, task: usize| {
            let ReadOnly((moe, s)) = &shared;
            let Some(slot) = accs.get(me) else { return };
            let mut acc = slot.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(*acc, Some(Err(_))) {
                return;
            }
            let (e, first, n) = tasks[task];
            let added = (|| -> Result<Tensor> {
                let w = s.weights.f_narrow(0, first, n)?.f_unsqueeze(1)?;
                let y = moe.experts[e].forward_fetched(&s.xs.f_narrow(0, first, n)?, Vec::new())?.f_mul(&w)?.f_to_kind(s.x.kind())?;
                let mut sum = match acc.take() {
                    Some(Ok(t)) => t,
                    _ => s.x.f_zeros_like()?,
                };
                // in place: the returned handle is the same tensor
                Ok(sum.f_index_add_(0, &s.token_of.f_narrow(0, first, n)?, &y)?)
            })();
            *acc = Some(added);
        };
        if !tasks_on_team(&costs, &job) {
            return Ok(None);
        }
        let mut out: Option<Tensor> = None;
        for slot in accs {
            match slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(Ok(t)) => {
                    out = Some(match out {
                        None => t,
                        Some(mut o) => o.f_add_(&t)?,
                    })
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        out.map(Some).ok_or_else(|| Error::Input("no expert outputs to add".into()))
    }

    /// [`dispatch`](Self::dispatch) for one token (a decode step): its k
    /// experts in turn, each output weighted and summed, without the sort,
    /// counts and scatter that many tokens need.
    fn dispatch_one(&self, x: &Tensor, indices: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let k = indices.size()[1];
        let chosen = Vec::<i64>::try_from(indices.f_reshape([k])?.f_to_device(Device::Cpu)?)?;
        let w = weights.f_reshape([k, 1])?;
        let n_experts = self.experts.len() as i64;
        let experts = chosen
            .iter()
            .map(|&e| usize::try_from(e).ok().and_then(|i| self.experts.get(i)).ok_or_else(|| Error::out_of_range(IndexKind::Expert, e, n_experts)))
            .collect::<Result<Vec<&Mlp>>>()?;
        let jobs: Vec<Vec<Option<FetchJob>>> = experts.iter().map(|m| m.fetch_jobs()).collect();
        let mut ys = Vec::with_capacity(experts.len());
        read_ahead(&jobs, |i, fetched| {
            ys.push(experts[i].forward_fetched(x, fetched)?);
            Ok(())
        })?;
        if ys.is_empty() {
            return Ok(x.f_zeros_like()?);
        }
        Ok(weighted_sum(&ys, &w)?.f_to_kind(x.kind())?)
    }
}

/// What [`Moe::dispatch`] hands each expert: the tokens `x` [N, D], their
/// copies `xs` [N*k, D] sorted by expert, each copy's router weight
/// `weights` [N*k] and token `token_of` [N*k].
struct Slots<'a> {
    x: &'a Tensor,
    xs: &'a Tensor,
    weights: &'a Tensor,
    token_of: &'a Tensor,
}

/// Values the members of an OpenMP team only read.
struct ReadOnly<T>(T);
// SAFETY: the members only read through it: libtorch's operations read
// their input tensors without writing them (reference counts are atomic),
// and [`Moe::dispatch_side_by_side`] writes only to each member's own
// accumulator, behind a mutex
unsafe impl<T> Sync for ReadOnly<T> {}
