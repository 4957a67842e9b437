//! Routing views of one trace: the router step by step for one token, and the
//! token x expert map of every MoE layer.

use std::fmt;

use serde::Serialize;
use tch::Tensor;

use super::trace::Trace;
use crate::error::{Error, IndexKind, Result};

/// How the router treated one token in one layer, step by step.
#[derive(Debug, Clone, Serialize)]
pub struct RouterStep {
    pub layer: usize,
    pub position: usize,
    pub token: String,
    /// `x W^T` per expert.
    pub logits: Vec<f32>,
    /// sigmoid / softmax of the logits.
    pub scores: Vec<f32>,
    /// The bias added for the choice (zeros when none).
    pub bias: Vec<f32>,
    /// The scores the choice was made on.
    pub choice: Vec<f32>,
    /// Group scores and the groups kept (group-limited routing).
    pub group_scores: Option<Vec<f32>>,
    pub chosen_groups: Option<Vec<i64>>,
    /// Chosen experts (best first) and their weights.
    pub experts: Vec<i64>,
    pub weights: Vec<f32>,
    /// Choice score of the k-th chosen expert minus the best one left out
    /// (among experts in kept groups); small margins mean fragile choices.
    pub margin: f32,
    /// Experts left out although their choice score beat the k-th chosen
    /// expert's: their group was not kept (group-limited routing only).
    pub outranked_by_group: Vec<i64>,
    /// What the router would have chosen without the bias.
    pub experts_without_bias: Option<Vec<i64>>,
    /// Whether the bias changed the chosen set.
    pub bias_changed_choice: bool,
}

impl Trace {
    /// The router step by step for the token at `position` (batch row 0) in
    /// MoE layer `layer`.
    pub fn router_step(&self, layer: usize, position: usize) -> Result<RouterStep> {
        self.router_step_at(layer, 0, position)
    }

    /// As [`Trace::router_step`], for batch row `row`.
    pub fn router_step_at(&self, layer: usize, row: usize, position: usize) -> Result<RouterStep> {
        let r = self.routing_of(layer)?;
        let (b, t) = (self.batch() as usize, self.seq_len() as usize);
        if row >= b {
            return Err(Error::Input(format!("batch row {row} out of range: the trace holds {b} x {t} tokens")));
        }
        Error::check_index(IndexKind::Position, position, t)?;
        let n = (row * t + position) as i64;
        let v32 = |x: &Tensor| -> Result<Vec<f32>> { Ok(Vec::<f32>::try_from(x.f_select(0, n)?)?) };
        let vi = |x: &Tensor| -> Result<Vec<i64>> { Ok(Vec::<i64>::try_from(x.f_select(0, n)?)?) };
        let e = r.num_experts() as usize;
        let choice = v32(&r.choice)?;
        let experts = vi(&r.topk_indices)?;
        let chosen_groups = r.chosen_groups.as_ref().map(vi).transpose()?;
        // allowed = experts in kept groups
        let per_group = e / r.settings.n_group.max(1) as usize;
        let allowed = |x: usize| match &chosen_groups {
            Some(g) => g.contains(&((x / per_group) as i64)),
            None => true,
        };
        let kth = experts.iter().map(|&x| choice[x as usize]).fold(f32::INFINITY, f32::min);
        let best_out = (0..e)
            .filter(|&x| allowed(x) && !experts.contains(&(x as i64)))
            .map(|x| choice[x])
            .fold(f32::NEG_INFINITY, f32::max);
        let outranked_by_group: Vec<i64> =
            (0..e).filter(|&x| !allowed(x) && choice[x] > kth).map(|x| x as i64).collect();
        let without = r.topk_without_bias.as_ref().map(vi).transpose()?;
        let changed = without.as_ref().is_some_and(|w| {
            let mut a = w.clone();
            let mut b2 = experts.clone();
            a.sort();
            b2.sort();
            a != b2
        });
        Ok(RouterStep {
            layer,
            position,
            token: self.tokens.get(row).and_then(|r| r.get(position)).cloned().unwrap_or_default(),
            logits: v32(&r.logits)?,
            scores: v32(&r.scores)?,
            bias: match &r.bias {
                Some(bias) => Vec::<f32>::try_from(bias)?,
                None => vec![0.0; e],
            },
            choice,
            group_scores: r.group_scores.as_ref().map(v32).transpose()?,
            chosen_groups,
            weights: v32(&r.topk_weights)?,
            experts,
            margin: kth - best_out,
            outranked_by_group,
            experts_without_bias: without,
            bias_changed_choice: changed,
        })
    }

    /// The token x expert routing weights of every MoE layer (batch row 0).
    pub fn routing_map(&self) -> Result<RoutingMap> {
        let t = self.seq_len();
        let mut layers = Vec::new();
        for r in self.routing.iter().flatten() {
            let w = r.weight_matrix()?.f_narrow(0, 0, t)?;
            layers.push((r.layer, Vec::<Vec<f32>>::try_from(&w)?));
        }
        if layers.is_empty() {
            return Err(Error::Input("no routing in this trace (dense model, or routing not captured)".into()));
        }
        Ok(RoutingMap {
            tokens: self.tokens.first().cloned().unwrap_or_default(),
            layers,
        })
    }
}

impl fmt::Display for RouterStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Router of layer {} for token {} ({})", self.layer, self.position, crate::plot::readable_token(&self.token))?;
        let top = |v: &[f32], n: usize| {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
            idx.iter().take(n).map(|&i| format!("e{i}={:.3}", v[i])).collect::<Vec<_>>().join(" ")
        };
        let k = self.experts.len();
        writeln!(f, "  1. scores (top {}):        {}", k + 2, top(&self.scores, k + 2))?;
        writeln!(f, "  2. score + bias (top {}):  {}", k + 2, top(&self.choice, k + 2))?;
        if let (Some(g), Some(c)) = (&self.group_scores, &self.chosen_groups) {
            let gs: Vec<String> = g.iter().enumerate().map(|(i, s)| format!("g{i}={s:.3}")).collect();
            writeln!(f, "  3. group scores:           {}  -> keep {:?}", gs.join(" "), c)?;
        }
        let chosen: Vec<String> = self.experts.iter().zip(&self.weights).map(|(e, w)| format!("e{e} (w {w:.3})")).collect();
        writeln!(f, "  4. top-{k}:                  {}", chosen.join(", "))?;
        writeln!(f, "     margin k-th vs next:    {:.4}", self.margin)?;
        if !self.outranked_by_group.is_empty() {
            let xs: Vec<String> = self.outranked_by_group.iter().map(|x| format!("e{x}")).collect();
            writeln!(f, "     left out, though above the k-th: {} (their group was not kept)", xs.join(", "))?;
        }
        match &self.experts_without_bias {
            Some(w) if self.bias_changed_choice => writeln!(f, "  5. without the bias:       {w:?}  (the bias changed the choice)"),
            Some(_) => writeln!(f, "  5. without the bias:       same experts"),
            None => writeln!(f, "  5. no bias in this router"),
        }
    }
}

/// Routing weights of every MoE layer, tokens x experts.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingMap {
    pub tokens: Vec<String>,
    /// (layer, weights \[T\]\[E\]).
    pub layers: Vec<(usize, Vec<Vec<f32>>)>,
}

impl fmt::Display for RoutingMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Routing of {} tokens in MoE layers {:?} (experts chosen per token)", self.tokens.len(), self.layers.iter().map(|l| l.0).collect::<Vec<_>>())?;
        for (i, tok) in self.tokens.iter().enumerate() {
            write!(f, "{:>4} {:<14}", i, crate::plot::readable_token(tok))?;
            for (_, w) in &self.layers {
                let chosen: Vec<String> = w[i].iter().enumerate().filter(|(_, &x)| x != 0.0).map(|(e, _)| e.to_string()).collect();
                write!(f, " | {:<12}", chosen.join(","))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
