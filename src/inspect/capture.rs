//! What a traced forward pass records: the [`Capture`] spec, and the
//! activation statistics it can compute on the fly without keeping tensors.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::points::{glob_of, Points};
use crate::error::Result;
use crate::model::{HookPoint, Model};

/// What to record during a forward pass. The default records routing,
/// attention patterns and activation statistics; full tensors only for the
/// hook points named in `tensors` and those `matching` chooses.
#[derive(Debug, Clone)]
pub struct Capture {
    /// Router decisions of every MoE layer (logits, scores, groups, top-k,
    /// the counterfactual choice without bias).
    pub routing: bool,
    /// Attention probabilities of every layer (switches attention to the
    /// explicit path, which costs a little more than the fused one).
    pub patterns: bool,
    /// Summary statistics of the residual stream (embeddings and the output
    /// of every layer).
    pub stats: bool,
    /// Statistics of every module output too (attention and MLP/MoE outputs,
    /// shared experts, `c_kv`); used by `Model::activation_report`.
    pub module_stats: bool,
    /// Hook points whose full tensors are kept.
    pub tensors: BTreeSet<HookPoint>,
    /// More points whose tensors are kept: globs over names and predicates,
    /// resolved against the model when the pass starts.
    pub matching: Vec<Points>,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            routing: true,
            patterns: true,
            stats: true,
            module_stats: false,
            tensors: BTreeSet::new(),
            matching: Vec::new(),
        }
    }
}

impl Capture {
    /// Records nothing but logits: the cost of a plain forward pass.
    pub fn none() -> Capture {
        Capture {
            routing: false,
            patterns: false,
            stats: false,
            module_stats: false,
            tensors: BTreeSet::new(),
            matching: Vec::new(),
        }
    }

    /// Only the routing (what corpus statistics need).
    pub fn routing_only() -> Capture {
        Capture {
            routing: true,
            ..Capture::none()
        }
    }

    /// Also keep the full tensor at `point`.
    pub fn with(mut self, point: HookPoint) -> Capture {
        self.tensors.insert(point);
        self
    }

    /// Also keep the full tensors at every point named
    /// (`blocks.1.attn.hook_c_kv`) or matched by a glob (`blocks.*.mlp.hook_router_logits`,
    /// `blocks.3.*`: see [`Points`]).
    pub fn with_names(mut self, names: &[&str]) -> Result<Capture> {
        for n in names {
            match glob_of(n)? {
                Some(_) => self.matching.push(Points::from(*n)),
                None => {
                    self.tensors.insert(n.parse()?);
                }
            }
        }
        Ok(self)
    }

    /// The default capture plus the full tensors at every point `f` accepts:
    /// `Capture::matching(|p| matches!(p, HookPoint::RouterLogits(_)))` keeps
    /// every router's logits, `Capture::matching(|p| p.layer() == Some(3))`
    /// all of layer 3.
    pub fn matching(f: impl Fn(HookPoint) -> bool + Send + Sync + 'static) -> Capture {
        Capture::default().with_matching(f)
    }

    /// Also keep the full tensors at every point `f` accepts.
    pub fn with_matching(mut self, f: impl Fn(HookPoint) -> bool + Send + Sync + 'static) -> Capture {
        self.matching.push(Points::matching(f));
        self
    }

    /// Every point whose full tensor `model`'s pass keeps: the named ones
    /// (each must exist in the model) and those the patterns choose.
    pub fn points(&self, model: &Model) -> Result<BTreeSet<HookPoint>> {
        let mut all = BTreeSet::new();
        for p in &self.tensors {
            model.check_hook_point(*p).map_err(|e| e.in_context(format!("cannot capture {p}")))?;
            all.insert(*p);
        }
        for m in &self.matching {
            all.extend(m.resolve(model, false).map_err(|e| e.in_context("cannot capture"))?);
        }
        Ok(all)
    }

    /// Whether statistics are taken at `point`.
    pub fn stats_at(&self, point: HookPoint) -> bool {
        use HookPoint::*;
        (self.stats && matches!(point, Embed | ResidPost(_)))
            || (self.module_stats && matches!(point, Embed | AttnOut(_) | MlpOut(_) | ResidPost(_) | SharedOut(_) | CKv(_)))
    }
}

/// Summary statistics of one activation tensor (over every element).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActStats {
    pub mean: f64,
    pub std: f64,
    pub rms: f64,
    pub max_abs: f64,
    /// Excess kurtosis (0 for a Gaussian); heavy tails show as large values.
    pub kurtosis: f64,
    /// Fraction of elements with |x - mean| > 6 std.
    pub outlier_fraction: f64,
    pub numel: i64,
}

impl ActStats {
    /// Statistics of `t`, computed on its device in f32 with one transfer
    /// of six numbers at the end.
    pub fn of(t: &Tensor) -> Result<ActStats> {
        let x = t.f_detach()?.f_to_kind(Kind::Float)?.f_flatten(0, -1)?;
        let numel = x.numel() as i64;
        // few passes: mean, then centred powers; min/max in one op
        let mean_t = x.f_mean(Kind::Float)?;
        let c2 = x.f_sub(&mean_t)?.f_square()?;
        let var_t = c2.f_mean(Kind::Float)?;
        let m4_t = c2.f_square()?.f_mean(Kind::Float)?;
        let outl_t = c2.f_gt_tensor(&var_t.f_mul_scalar(36.0)?)?.f_mean(Kind::Float)?; // |x - mean| > 6 std
        let (lo, hi) = x.f_aminmax(None::<i64>, false)?;
        let v = Vec::<f64>::try_from(
            Tensor::f_stack(&[mean_t, var_t, m4_t, outl_t, lo, hi], 0)?.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?,
        )?;
        let (mean, var, m4, outliers) = (v[0], v[1].max(0.0), v[2], v[3]);
        let (std, rms, max_abs) = (var.sqrt(), (var + mean * mean).sqrt(), v[4].abs().max(v[5].abs()));
        Ok(ActStats {
            mean,
            std,
            rms,
            max_abs,
            kurtosis: if var > 0.0 { m4 / (var * var) - 3.0 } else { 0.0 },
            outlier_fraction: if std > 0.0 { outliers } else { 0.0 },
            numel,
        })
    }
}

impl fmt::Display for ActStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mean {:+.4} std {:.4} rms {:.4} max|x| {:.3} kurtosis {:.2} outliers {:.2}%",
            self.mean,
            self.std,
            self.rms,
            self.max_abs,
            self.kurtosis,
            100.0 * self.outlier_fraction
        )
    }
}
