//! How a router is configured and changed: its settings (separate from its
//! weights, so a variant can run on the same weights) and the edits an
//! intervention makes for one forward pass. Both the MoE block, which obeys
//! them, and the hooks, which hand them over, read this file; neither imports
//! the other for it.

use tch::Tensor;

use super::config::{Config, ScoringFunc, TopkMethod};
use crate::error::Result;

/// The router's settings, separate from its weights so a variant can be tried
/// on the same weights.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    pub scoring: ScoringFunc,
    pub method: TopkMethod,
    pub top_k: i64,
    pub n_group: i64,
    pub topk_group: i64,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
}

impl RouterSettings {
    pub fn from_config(cfg: &Config) -> RouterSettings {
        RouterSettings {
            scoring: cfg.scoring_func,
            method: cfg.topk_method,
            top_k: cfg.num_experts_per_tok as i64,
            n_group: cfg.n_group as i64,
            topk_group: cfg.topk_group as i64,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor,
        }
    }
}

/// What happens to `e_score_correction_bias` in an edited router.
#[derive(Debug, Default)]
pub enum BiasEdit {
    #[default]
    Keep,
    /// Route as if the bias were zero.
    Zero,
    /// Use this bias \[E\] instead.
    Replace(Tensor),
}

impl Clone for BiasEdit {
    fn clone(&self) -> Self {
        match self {
            BiasEdit::Keep => BiasEdit::Keep,
            BiasEdit::Zero => BiasEdit::Zero,
            BiasEdit::Replace(t) => BiasEdit::Replace(t.shallow_clone()),
        }
    }
}

/// Inputs a custom router sees.
pub struct RouterInput<'a> {
    /// Router input [N, D] (the MoE block's normalised input).
    pub x: &'a Tensor,
    /// `x W^T` [N, E] f32, from the checkpoint's gate.
    pub logits: &'a Tensor,
    /// The configured scores of those logits [N, E] f32.
    pub scores: &'a Tensor,
    pub settings: &'a RouterSettings,
    pub layer: usize,
}

/// A user-written router: returns `(indices [N, k] i64, weights [N, k])`.
/// Any `Fn(&RouterInput) -> Result<(Tensor, Tensor)>` is one.
pub trait CustomRouter: Send + Sync {
    fn route(&self, input: &RouterInput) -> Result<(Tensor, Tensor)>;
}

impl<F> CustomRouter for F
where
    F: Fn(&RouterInput) -> Result<(Tensor, Tensor)> + Send + Sync,
{
    fn route(&self, input: &RouterInput) -> Result<(Tensor, Tensor)> {
        self(input)
    }
}

/// Changes to one layer's router, applied for one forward pass.
#[derive(Clone, Default)]
pub struct RouterEdits {
    /// Replacement settings (top-k, groups, scoring, normalisation, scale).
    pub settings: Option<RouterSettings>,
    pub bias: BiasEdit,
    /// Experts that may never be chosen.
    pub banned: Vec<i64>,
    /// Experts chosen for every token.
    pub forced: Vec<i64>,
    /// Replaces the whole selection.
    pub custom: Option<std::sync::Arc<dyn CustomRouter>>,
}

impl std::fmt::Debug for RouterEdits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterEdits")
            .field("settings", &self.settings)
            .field("bias", &self.bias)
            .field("banned", &self.banned)
            .field("forced", &self.forced)
            .field("custom", &self.custom.as_ref().map(|_| "<router>"))
            .finish()
    }
}
