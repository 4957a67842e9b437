//! Activation statistics layer by layer: summary statistics per module,
//! histograms, massive activations, shared vs routed contributions of the MoE
//! blocks, and the logit lens.
//!
//! ```
//! use deepscope::prelude::*;
//! # fn main() -> deepscope::Result<()> {
//! let model = Model::load_default()?;
//! let report = model.activation_report("Blessed are the meek", 20.0)?;
//! println!("{report}");                                     // stats per module, massive activations
//! println!("{}", model.logit_lens("Blessed are the meek")?); // top next token after each layer
//! # Ok(()) }
//! ```

use std::fmt;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::capture::{ActStats, Capture};
use super::interventions::Interventions;
use super::trace::{Input, Trace};
use crate::error::{Error, Result};
use crate::model::{HookPoint, Model};

/// Statistics of every module output of a forward pass.
#[derive(Debug, Clone, Serialize)]
pub struct ActivationReport {
    /// (hook point name, statistics), in forward order.
    pub rows: Vec<(String, ActStats)>,
    pub massive: Vec<MassiveActivation>,
    /// Per MoE layer: mean L2 norm per token of the shared and the routed output.
    pub shared_vs_routed: Vec<SharedRouted>,
}

/// One residual-stream element far larger than the typical one.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct MassiveActivation {
    pub layer: usize,
    pub position: usize,
    pub dim: usize,
    pub value: f32,
    /// |value| / median |x| of that layer's residual stream.
    pub ratio_to_median: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SharedRouted {
    pub layer: usize,
    pub shared_norm: f64,
    pub routed_norm: f64,
    /// Mean cosine similarity of the two contributions per token.
    pub cosine: f64,
}

/// Counts of values in equal-width bins.
#[derive(Debug, Clone, Serialize)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

/// Finds elements of `x` [B, T, D] (batch row 0) with |x| above
/// `factor` times the median |x|, largest first.
pub fn massive_activations(x: &Tensor, layer: usize, factor: f64) -> Result<Vec<MassiveActivation>> {
    let x = x.f_select(0, 0)?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?; // [T, D]
    let abs = x.f_abs()?;
    let median = abs.f_flatten(0, -1)?.f_median()?.f_double_value(&[])?.max(1e-12);
    let mask = abs.f_gt(factor * median)?;
    let idx = mask.f_nonzero()?; // [K, 2]
    let rows = Vec::<Vec<i64>>::try_from(&idx)?;
    let mut out: Vec<MassiveActivation> = rows
        .iter()
        .map(|r| {
            let v = x.double_value(&[r[0], r[1]]) as f32;
            MassiveActivation { layer, position: r[0] as usize, dim: r[1] as usize, value: v, ratio_to_median: v.abs() as f64 / median }
        })
        .collect();
    out.sort_by(|a, b| b.ratio_to_median.total_cmp(&a.ratio_to_median));
    Ok(out)
}

/// Histogram of all elements of `x` in `bins` equal bins between its min and max.
pub fn histogram(x: &Tensor, bins: usize) -> Result<Histogram> {
    if bins == 0 {
        return Err(Error::Input("a histogram needs at least one bin".into()));
    }
    let x = x.f_flatten(0, -1)?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
    let (lo, hi) = (x.f_min()?.f_double_value(&[])?, x.f_max()?.f_double_value(&[])?);
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let width = (hi - lo) / bins as f64;
    // bin index of each value (the maximum falls in the last bin)
    let idx = x.f_sub_scalar(lo)?.f_div_scalar(width)?.f_floor()?.f_clamp(0.0, (bins - 1) as f64)?.f_to_kind(Kind::Int64)?;
    let counts = Vec::<i64>::try_from(idx.f_bincount(None::<Tensor>, bins as i64)?)?;
    Ok(Histogram {
        edges: (0..=bins).map(|i| lo + width * i as f64).collect(),
        counts: counts.into_iter().map(|c| c as u64).collect(),
    })
}

/// The most likely next tokens if the model stopped after each layer
/// (final norm + LM head applied to the residual stream), batch row 0.
#[derive(Debug, Clone, Serialize)]
pub struct LogitLens {
    pub tokens: Vec<String>,
    /// Per layer (after it), per position: the top token and its probability.
    pub resid: Vec<Vec<(String, f32)>>,
    /// Per MoE layer: the lens on the shared and on the routed contribution alone.
    pub shared: Vec<(usize, Vec<(String, f32)>)>,
    pub routed: Vec<(usize, Vec<(String, f32)>)>,
}

/// Position of a hook point within its layer, for forward ordering.
fn stage(p: &HookPoint) -> usize {
    use HookPoint::*;
    match p {
        ResidPre(_) => 0,
        AttnIn(_) => 1,
        QLatent(_) => 2,
        CKv(_) => 3,
        KPe(_) => 4,
        QPe(_) => 5,
        Pattern(_) => 6,
        HeadOut(_) => 7,
        AttnOut(_) => 8,
        ResidMid(_) => 9,
        MlpIn(_) => 10,
        RouterLogits(_) | RouterScores(_) | ChosenGroups(_) | TopkIndices(_) | TopkWeights(_) => 11,
        ExpertOut(..) => 12,
        SharedOut(_) => 13,
        MlpOut(_) => 14,
        ResidPost(_) => 15,
        Embed | FinalNorm | Logits => 16,
    }
}

impl Model {
    /// MoE layers that have shared experts.
    fn shared_layers(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&l| self.layers[l].moe().is_some_and(|m| m.shared_experts.is_some()))
            .collect()
    }

    fn lens(&self, h: &Tensor) -> Result<Vec<(String, f32)>> {
        let h = h.f_to_device(self.device)?.f_to_kind(self.kind)?;
        let h = self.norm.forward(&h.f_to_device(self.norm.weight.device())?)?.f_to_device(self.lm_head.device)?;
        let logits = self.lm_head.linear(&h)?.f_to_kind(Kind::Float)?;
        let probs = logits.f_softmax(-1, Kind::Float)?.f_select(0, 0)?; // [T, V]
        let (p, idx) = probs.f_max_dim(-1, false)?;
        let p = Vec::<f32>::try_from(p.f_to_device(Device::Cpu)?)?;
        let idx = Vec::<i64>::try_from(idx.f_to_device(Device::Cpu)?)?;
        let names = match &self.tokenizer {
            Some(t) => t.tokens(&idx).into_iter().zip(&idx).map(|(s, i)| s.unwrap_or_else(|| format!("#{i}"))).collect(),
            None => idx.iter().map(|i| format!("#{i}")).collect::<Vec<_>>(),
        };
        Ok(names.into_iter().zip(p).collect())
    }

    /// Traces `input` keeping every layer's residual stream and, for MoE
    /// layers with shared experts, the shared and the MLP output; returns the
    /// trace and those layers.
    fn trace_residuals(&self, input: impl Into<Input>, base: Capture) -> Result<(Trace, Vec<usize>)> {
        let shared = self.shared_layers();
        let mut capture = base;
        for &l in &shared {
            capture = capture.with(HookPoint::SharedOut(l)).with(HookPoint::MlpOut(l));
        }
        for l in 0..self.layers.len() {
            capture = capture.with(HookPoint::ResidPost(l));
        }
        Ok((self.trace_with(input, &capture, &Interventions::new())?, shared))
    }

    /// The shared experts' and the routed experts' contributions to MoE layer
    /// `l`'s output, each [B, T, D].
    fn shared_and_routed(&self, t: &Trace, l: usize) -> Result<(Tensor, Tensor)> {
        let shape = t.ids.size();
        let shared = t.tensor(HookPoint::SharedOut(l))?.f_view([shape[0], shape[1], self.config.hidden_size as i64])?;
        let routed = t.tensor(HookPoint::MlpOut(l))?.f_sub(&shared)?;
        Ok((shared, routed))
    }

    /// Logit lens over `input`.
    pub fn logit_lens(&self, input: impl Into<Input>) -> Result<LogitLens> {
        let (t, shared_layers) = self.trace_residuals(input, Capture::none())?;
        let _guard = tch::no_grad_guard();
        let mut out = LogitLens { tokens: t.tokens[0].clone(), resid: vec![], shared: vec![], routed: vec![] };
        for l in 0..self.layers.len() {
            out.resid.push(self.lens(t.tensor(HookPoint::ResidPost(l))?)?);
        }
        for l in shared_layers {
            let (shared, routed) = self.shared_and_routed(&t, l)?;
            out.shared.push((l, self.lens(&shared)?));
            out.routed.push((l, self.lens(&routed)?));
        }
        Ok(out)
    }

    /// Statistics of every module output, massive activations in the
    /// residual stream (|x| > `massive_factor` x median), and the shared vs
    /// routed split of each MoE block, over `input`.
    pub fn activation_report(&self, input: impl Into<Input>, massive_factor: f64) -> Result<ActivationReport> {
        let (t, shared_layers) = self.trace_residuals(input, Capture { stats: true, module_stats: true, ..Capture::none() })?;
        // forward order: embeddings, then layer by layer, then the end
        let mut ordered: Vec<(&HookPoint, &ActStats)> = t.stats.iter().collect();
        ordered.sort_by_key(|(p, _)| match p {
            HookPoint::Embed => (0, 0),
            other => match other.layer() {
                Some(l) => (l + 1, stage(other)),
                None => (usize::MAX, 0),
            },
        });
        let rows = ordered.into_iter().map(|(p, s)| (p.to_string(), *s)).collect();
        let mut massive = Vec::new();
        for l in 0..self.layers.len() {
            massive.extend(massive_activations(t.tensor(HookPoint::ResidPost(l))?, l, massive_factor)?);
        }
        let mut shared_vs_routed = Vec::new();
        for l in shared_layers {
            let (shared, routed) = self.shared_and_routed(&t, l)?;
            let (shared, routed) = (shared.f_to_kind(Kind::Double)?, routed.f_to_kind(Kind::Double)?);
            // per-token norms [B, T] and the cosine between the two contributions
            let norm = |x: &Tensor| -> Result<Tensor> { Ok(x.f_square()?.f_sum_dim_intlist(-1, false, Kind::Double)?.f_sqrt()?) };
            let (ns, nr) = (norm(&shared)?, norm(&routed)?);
            let cos = shared.f_mul(&routed)?.f_sum_dim_intlist(-1, false, Kind::Double)?.f_div(&ns.f_mul(&nr)?.f_clamp_min(1e-12)?)?;
            let mean = |x: &Tensor| -> Result<f64> { Ok(x.f_mean(Kind::Double)?.f_double_value(&[])?) };
            shared_vs_routed.push(SharedRouted { layer: l, shared_norm: mean(&ns)?, routed_norm: mean(&nr)?, cosine: mean(&cos)? });
        }
        Ok(ActivationReport { rows, massive, shared_vs_routed })
    }
}

impl fmt::Display for ActivationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<28} {:>9} {:>8} {:>8} {:>9} {:>9}", "module", "mean", "std", "rms", "max|x|", "kurtosis")?;
        for (name, s) in &self.rows {
            writeln!(f, "{:<28} {:>+9.4} {:>8.4} {:>8.4} {:>9.3} {:>9.2}", name, s.mean, s.std, s.rms, s.max_abs, s.kurtosis)?;
        }
        for s in &self.shared_vs_routed {
            writeln!(f, "layer {}: shared |x| {:.3}, routed |x| {:.3}, cosine {:+.3}", s.layer, s.shared_norm, s.routed_norm, s.cosine)?;
        }
        writeln!(f, "{} massive activation(s){}", self.massive.len(), match self.massive.first() {
            Some(m) => format!(", largest: layer {} position {} dim {} = {:.2} ({:.0}x median)", m.layer, m.position, m.dim, m.value, m.ratio_to_median),
            None => String::new(),
        })
    }
}

impl fmt::Display for LogitLens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Logit lens: top next token after each layer")?;
        for (pos, tok) in self.tokens.iter().enumerate() {
            // tokens as the charts show them (␣ for a space, ↵ for a newline)
            write!(f, "{:>4} {:<14}", pos, crate::plot::readable_token(tok))?;
            for layer in &self.resid {
                write!(f, " | {:<12}", crate::plot::readable_token(&layer[pos].0))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
