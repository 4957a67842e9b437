//! Comparing a baseline run with a variant (same tokens, different
//! interventions): how far the predictions moved and which routing changed.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use tch::{Kind, Tensor};

use super::capture::Capture;
use super::interventions::Interventions;
use super::trace::Trace;
use crate::error::{Error, Result};
use crate::model::Model;

/// Routing differences in one MoE layer.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RoutingChange {
    /// Fraction of tokens whose set of experts changed.
    pub changed_fraction: f64,
    /// Mean Jaccard similarity of the expert sets (1 = identical).
    pub mean_jaccard: f64,
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    /// KL(baseline || variant) of the next-token distributions per token \[B*T\] (nats).
    pub kl: Vec<f64>,
    pub mean_kl: f64,
    /// Fraction of positions whose most likely next token is the same.
    pub top1_agreement: f64,
    /// Next-token loss change (variant - baseline) per position [B*(T-1)], nats.
    pub loss_delta: Vec<f64>,
    pub mean_loss_baseline: f64,
    pub mean_loss_variant: f64,
    pub routing: BTreeMap<usize, RoutingChange>,
}

/// Compares two traces of the same tokens.
pub fn compare(baseline: &Trace, variant: &Trace) -> Result<Comparison> {
    if baseline.ids.size() != variant.ids.size() || !baseline.ids.equal(&variant.ids) {
        return Err(Error::Input("compare needs two traces of the same tokens".into()));
    }
    let lp = baseline.logits.f_log_softmax(-1, Kind::Double)?;
    let lq = variant.logits.f_log_softmax(-1, Kind::Double)?;
    let kl = lp.f_exp()?.f_mul(&lp.f_sub(&lq)?)?.f_sum_dim_intlist(-1, false, Kind::Double)?.f_flatten(0, -1)?;
    let agree = baseline
        .logits
        .f_argmax(-1, false)?
        .f_eq_tensor(&variant.logits.f_argmax(-1, false)?)?
        .f_to_kind(Kind::Double)?
        .f_mean(Kind::Double)?
        .f_double_value(&[])?;
    let (mut loss_delta, mut lb, mut lv) = (vec![], 0.0, 0.0);
    if baseline.seq_len() >= 2 {
        let b = baseline.loss()?.f_to_kind(Kind::Double)?;
        let v = variant.loss()?.f_to_kind(Kind::Double)?;
        loss_delta = Vec::<f64>::try_from(v.f_sub(&b)?.f_flatten(0, -1)?)?;
        lb = b.f_mean(Kind::Double)?.f_double_value(&[])?;
        lv = v.f_mean(Kind::Double)?.f_double_value(&[])?;
    }
    let mut routing = BTreeMap::new();
    for (rb, rv) in baseline.routing.iter().zip(&variant.routing) {
        let (Some(rb), Some(rv)) = (rb, rv) else { continue };
        let a = Vec::<Vec<i64>>::try_from(&rb.topk_indices)?;
        let b = Vec::<Vec<i64>>::try_from(&rv.topk_indices)?;
        let (mut changed, mut jac) = (0usize, 0.0);
        for (x, y) in a.iter().zip(&b) {
            let inter = x.iter().filter(|e| y.contains(e)).count();
            let union = x.len() + y.len() - inter;
            if inter != x.len() || x.len() != y.len() {
                changed += 1;
            }
            jac += inter as f64 / union.max(1) as f64;
        }
        let n = a.len().max(1) as f64;
        routing.insert(rb.layer, RoutingChange { changed_fraction: changed as f64 / n, mean_jaccard: jac / n });
    }
    let kl = Vec::<f64>::try_from(&kl)?;
    Ok(Comparison {
        mean_kl: kl.iter().sum::<f64>() / kl.len().max(1) as f64,
        kl,
        top1_agreement: agree,
        loss_delta,
        mean_loss_baseline: lb,
        mean_loss_variant: lv,
        routing,
    })
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "mean KL {:.4} nats, top-1 agreement {:.1}%, loss {:.4} -> {:.4} ({:+.4})",
            self.mean_kl,
            100.0 * self.top1_agreement,
            self.mean_loss_baseline,
            self.mean_loss_variant,
            self.mean_loss_variant - self.mean_loss_baseline
        )?;
        for (l, c) in &self.routing {
            writeln!(f, "  layer {l}: {:.1}% of tokens routed differently (mean Jaccard {:.3})", 100.0 * c.changed_fraction, c.mean_jaccard)?;
        }
        Ok(())
    }
}

/// Perplexity of the model with and without interventions over documents.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PerplexityChange {
    pub tokens: u64,
    pub baseline: f64,
    pub variant: f64,
}

impl fmt::Display for PerplexityChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "perplexity {:.3} -> {:.3} ({:+.2}%) over {} tokens",
            self.baseline,
            self.variant,
            100.0 * (self.variant / self.baseline - 1.0),
            self.tokens
        )
    }
}

impl Model {
    /// Perplexity over `docs` (each split into windows of `window` tokens) with
    /// and without `interventions`.
    pub fn perplexity_change(&self, docs: &[&str], interventions: &Interventions, window: usize) -> Result<PerplexityChange> {
        if window < 2 {
            return Err(Error::Input("the window must hold at least two tokens".into()));
        }
        let (mut nb, mut nv, mut n) = (0.0, 0.0, 0u64);
        let none = Interventions::new();
        let interrupt = crate::interrupt::Interrupt::new();
        for doc in docs {
            let ids = self.encode(doc)?;
            for chunk in ids.chunks(window).filter(|c| c.len() >= 2) {
                interrupt.check()?;
                let b = self.trace_with(chunk, &Capture::none(), &none)?.loss()?;
                let v = self.trace_with(chunk, &Capture::none(), interventions)?.loss()?;
                nb += b.f_sum(Kind::Double)?.f_double_value(&[])?;
                nv += v.f_sum(Kind::Double)?.f_double_value(&[])?;
                n += b.numel() as u64;
            }
        }
        if n == 0 {
            return Err(Error::Input("no document has two or more tokens".into()));
        }
        Ok(PerplexityChange { tokens: n, baseline: (nb / n as f64).exp(), variant: (nv / n as f64).exp() })
    }
}

/// Per-token KL as a tensor, for users who want to plot it.
pub fn kl_tensor(c: &Comparison) -> Tensor {
    Tensor::from_slice(&c.kl)
}
