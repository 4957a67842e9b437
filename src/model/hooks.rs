//! Named places in the forward pass where values can be read or replaced.
//!
//! Names print and parse in TransformerLens style (`blocks.3.mlp.hook_topk_indices`).
//! The model calls a [`Hooks`] implementation at each point; with no hooks
//! (the plain forward) nothing is recorded and nothing is cloned.

use std::fmt;
use std::str::FromStr;

use tch::Tensor;

use super::routing::RouterEdits;
use crate::error::{Error, Result};

/// A place in the forward pass. Layer-scoped points carry the layer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// Token embeddings [B, T, D].
    Embed,
    /// Residual stream entering layer L [B, T, D].
    ResidPre(usize),
    /// `input_layernorm` output, the attention input [B, T, D].
    AttnIn(usize),
    /// Normalised query latent `q_a_layernorm(q_a_proj(x))` [B, T, q_lora] (low-rank q only).
    QLatent(usize),
    /// Normalised KV latent `c_kv` of the new tokens [B, T, kv_lora].
    CKv(usize),
    /// Rotated shared key `k_pe` of the new tokens [B, T, rope].
    KPe(usize),
    /// Rotated query position part `q_pe` [B, H, T, rope].
    QPe(usize),
    /// Attention probabilities [B, H, T, S].
    Pattern(usize),
    /// Per-head attention output before `o_proj` [B, T, H, v].
    HeadOut(usize),
    /// Attention block output after `o_proj` [B, T, D].
    AttnOut(usize),
    /// Residual stream after attention [B, T, D].
    ResidMid(usize),
    /// `post_attention_layernorm` output, the MLP / MoE input [B, T, D].
    MlpIn(usize),
    /// Router logits `x W^T` [N, E].
    RouterLogits(usize),
    /// Router scores (sigmoid / softmax) [N, E].
    RouterScores(usize),
    /// Indices of the groups kept [N, topk_group].
    ChosenGroups(usize),
    /// Chosen experts [N, k].
    TopkIndices(usize),
    /// Their weights [N, k].
    TopkWeights(usize),
    /// Output of routed expert E for every token, unweighted, zeros where the
    /// expert was not chosen [N, D].
    ExpertOut(usize, usize),
    /// Shared experts' output [N, D].
    SharedOut(usize),
    /// MLP / MoE block output [B, T, D].
    MlpOut(usize),
    /// Residual stream leaving layer L [B, T, D].
    ResidPost(usize),
    /// Final norm output [B, T, D].
    FinalNorm,
    /// Logits [B, T, V].
    Logits,
}

impl HookPoint {
    pub fn layer(&self) -> Option<usize> {
        use HookPoint::*;
        match *self {
            Embed | FinalNorm | Logits => None,
            ResidPre(l) | AttnIn(l) | QLatent(l) | CKv(l) | KPe(l) | QPe(l) | Pattern(l) | HeadOut(l) | AttnOut(l)
            | ResidMid(l) | MlpIn(l) | RouterLogits(l) | RouterScores(l) | ChosenGroups(l) | TopkIndices(l)
            | TopkWeights(l) | SharedOut(l) | MlpOut(l) | ResidPost(l) => Some(l),
            ExpertOut(l, _) => Some(l),
        }
    }

    /// Points whose value can be read but not replaced (see [`Hooks::visit`]).
    pub fn is_read_only(&self) -> bool {
        matches!(self, HookPoint::ChosenGroups(_) | HookPoint::ExpertOut(..))
    }

    /// Where the token positions run in this point's tensor.
    pub fn layout(&self) -> Layout {
        use HookPoint::*;
        match self {
            QPe(_) | Pattern(_) => Layout::BatchHeadTime,
            RouterLogits(_) | RouterScores(_) | ChosenGroups(_) | TopkIndices(_) | TopkWeights(_) | ExpertOut(..) | SharedOut(_) => {
                Layout::Rows
            }
            _ => Layout::BatchTime,
        }
    }

    /// True for points that only exist in MoE layers.
    pub fn is_moe(&self) -> bool {
        use HookPoint::*;
        matches!(
            self,
            RouterLogits(_) | RouterScores(_) | ChosenGroups(_) | TopkIndices(_) | TopkWeights(_) | ExpertOut(..) | SharedOut(_)
        )
    }
}

/// How a hook point's tensor is laid out over the batch and the positions of
/// a pass (B sequences of T new tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[B, T, ...]`: the residual stream, module outputs, latents, logits.
    BatchTime,
    /// `[B, H, T, ...]`: per-head queries and attention patterns.
    BatchHeadTime,
    /// `[N, ...]` with `N = B * T`, row `b * T + t`: the router and experts.
    Rows,
}

impl Layout {
    /// The dimension that runs over positions.
    pub fn time_dim(self) -> i64 {
        match self {
            Layout::BatchTime => 1,
            Layout::BatchHeadTime => 2,
            Layout::Rows => 0,
        }
    }
}

/// What one forward pass covers: `batch` sequences of `tokens` new tokens
/// that start at position `past` (the cached length; 0 without a cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PassInfo {
    pub batch: i64,
    pub past: i64,
    pub tokens: i64,
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use HookPoint::*;
        match *self {
            Embed => write!(f, "hook_embed"),
            FinalNorm => write!(f, "ln_final.hook_normalized"),
            Logits => write!(f, "hook_logits"),
            ExpertOut(l, e) => write!(f, "blocks.{l}.mlp.experts.{e}.hook_out"),
            _ => {
                let l = self.layer().unwrap_or(0);
                let name = match *self {
                    ResidPre(_) => "hook_resid_pre",
                    AttnIn(_) => "attn.hook_in",
                    QLatent(_) => "attn.hook_q_latent",
                    CKv(_) => "attn.hook_c_kv",
                    KPe(_) => "attn.hook_k_pe",
                    QPe(_) => "attn.hook_q_pe",
                    Pattern(_) => "attn.hook_pattern",
                    HeadOut(_) => "attn.hook_z",
                    AttnOut(_) => "hook_attn_out",
                    ResidMid(_) => "hook_resid_mid",
                    MlpIn(_) => "mlp.hook_in",
                    RouterLogits(_) => "mlp.hook_router_logits",
                    RouterScores(_) => "mlp.hook_router_scores",
                    ChosenGroups(_) => "mlp.hook_chosen_groups",
                    TopkIndices(_) => "mlp.hook_topk_indices",
                    TopkWeights(_) => "mlp.hook_topk_weights",
                    SharedOut(_) => "mlp.hook_shared_out",
                    MlpOut(_) => "hook_mlp_out",
                    ResidPost(_) => "hook_resid_post",
                    _ => unreachable!("handled above"),
                };
                write!(f, "blocks.{l}.{name}")
            }
        }
    }
}

impl FromStr for HookPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<HookPoint> {
        use HookPoint::*;
        let bad = || Error::Input(format!("`{s}` is not a hook point (e.g. blocks.3.mlp.hook_topk_indices, hook_embed, hook_logits)"));
        match s {
            "hook_embed" => return Ok(Embed),
            "ln_final.hook_normalized" => return Ok(FinalNorm),
            "hook_logits" => return Ok(Logits),
            _ => {}
        }
        let rest = s.strip_prefix("blocks.").ok_or_else(bad)?;
        let (l, name) = rest.split_once('.').ok_or_else(bad)?;
        let l: usize = l.parse().map_err(|_| bad())?;
        if let Some(e) = name.strip_prefix("mlp.experts.").and_then(|r| r.strip_suffix(".hook_out")) {
            return Ok(ExpertOut(l, e.parse().map_err(|_| bad())?));
        }
        Ok(match name {
            "hook_resid_pre" => ResidPre(l),
            "attn.hook_in" => AttnIn(l),
            "attn.hook_q_latent" => QLatent(l),
            "attn.hook_c_kv" => CKv(l),
            "attn.hook_k_pe" => KPe(l),
            "attn.hook_q_pe" => QPe(l),
            "attn.hook_pattern" => Pattern(l),
            "attn.hook_z" => HeadOut(l),
            "hook_attn_out" => AttnOut(l),
            "hook_resid_mid" => ResidMid(l),
            "mlp.hook_in" => MlpIn(l),
            "mlp.hook_router_logits" => RouterLogits(l),
            "mlp.hook_router_scores" => RouterScores(l),
            "mlp.hook_chosen_groups" => ChosenGroups(l),
            "mlp.hook_topk_indices" => TopkIndices(l),
            "mlp.hook_topk_weights" => TopkWeights(l),
            "mlp.hook_shared_out" => SharedOut(l),
            "hook_mlp_out" => MlpOut(l),
            "hook_resid_post" => ResidPost(l),
            _ => return Err(bad()),
        })
    }
}

/// What the model asks of whoever observes or edits a forward pass. Every
/// method has a do-nothing default, so an implementation overrides only what
/// it needs.
pub trait Hooks {
    /// Called once before each forward pass, with what it covers.
    fn begin_pass(&mut self, pass: PassInfo) {
        let _ = pass;
    }

    /// Called with the value at `point`; returns the value the forward pass
    /// continues with (the same tensor, or a replacement of the same shape).
    /// Read-only points, whose returned value is ignored: `ChosenGroups`
    /// (the choice is made before it is visited) and `ExpertOut` (only
    /// visited when wanted, after the experts' outputs are summed).
    fn visit(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        let _ = point;
        Ok(value)
    }

    /// Whether `point` will be visited at all: points whose value costs extra
    /// to produce (attention patterns, per-expert outputs) are only computed
    /// when wanted.
    fn wants(&self, point: HookPoint) -> bool {
        let _ = point;
        false
    }

    /// Changes to the router of MoE layer `layer`.
    fn router_edits(&self, layer: usize) -> Option<&RouterEdits> {
        let _ = layer;
        None
    }
}

/// Observes nothing, changes nothing: the plain forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}
