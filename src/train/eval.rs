//! Held-out evaluation: bits per byte per domain, a unigram baseline over the
//! same tokenizer, expert-load balance, and how differently each domain is
//! routed (Jensen-Shannon divergence between per-domain expert-choice
//! distributions, per MoE layer).

use std::collections::BTreeMap;

use serde::Serialize;
use tch::{Kind, Tensor};

use super::corpus::Domain;
use super::data::{eval_windows, TokenDoc};
use crate::error::Result;
use crate::model::{AttnImpl, ForwardOptions, Model};

#[derive(Debug, Clone, Default, Serialize)]
pub struct DomainScore {
    /// Sum of -log2 p over scored tokens.
    pub bits: f64,
    pub tokens: usize,
    pub bytes: usize,
}

impl DomainScore {
    pub fn bits_per_byte(&self) -> f64 {
        self.bits / self.bytes.max(1) as f64
    }
    /// Mean cross-entropy in nats per token.
    pub fn loss(&self) -> f64 {
        self.bits * std::f64::consts::LN_2 / self.tokens.max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub per_domain: BTreeMap<String, DomainScore>,
    /// Per MoE layer: how many times each expert was chosen, per domain.
    pub expert_counts: BTreeMap<usize, BTreeMap<String, Vec<f64>>>,
}

impl EvalReport {
    /// max/mean expert load per MoE layer over all held-out tokens.
    pub fn load_max_over_mean(&self) -> BTreeMap<usize, f64> {
        self.expert_counts
            .iter()
            .map(|(&l, per)| {
                let n = per.values().next().map_or(0, |v| v.len());
                let total: Vec<f64> = (0..n).map(|e| per.values().map(|v| v[e]).sum()).collect();
                let mean = total.iter().sum::<f64>() / n.max(1) as f64;
                (l, total.iter().cloned().fold(0.0, f64::max) / mean.max(1e-12))
            })
            .collect()
    }

    /// max/mean expert load per MoE layer within each domain's held-out text.
    pub fn load_max_over_mean_by_domain(&self) -> BTreeMap<String, BTreeMap<usize, f64>> {
        let mut out: BTreeMap<String, BTreeMap<usize, f64>> = BTreeMap::new();
        for (&l, per) in &self.expert_counts {
            for (d, counts) in per {
                out.entry(d.clone()).or_default().insert(l, max_over_mean(counts));
            }
        }
        out
    }

    /// max/mean expert load per MoE layer when the domains are mixed in the
    /// proportions `weights` (e.g. their shares of the training tokens): each
    /// domain's load distribution weighted, then summed.
    pub fn load_max_over_mean_weighted(&self, weights: &BTreeMap<String, f64>) -> BTreeMap<usize, f64> {
        self.expert_counts
            .iter()
            .map(|(&l, per)| {
                let n = per.values().next().map_or(0, |v| v.len());
                let mut mix = vec![0.0; n];
                for (d, counts) in per {
                    let w = weights.get(d).copied().unwrap_or(0.0);
                    let total: f64 = counts.iter().sum::<f64>().max(1e-12);
                    mix.iter_mut().zip(counts).for_each(|(m, c)| *m += w * c / total);
                }
                (l, max_over_mean(&mix))
            })
            .collect()
    }

    /// Jensen-Shannon divergence (bits) between the expert-choice
    /// distributions of each pair of domains, per MoE layer.
    pub fn domain_jsd(&self) -> BTreeMap<usize, BTreeMap<String, f64>> {
        self.expert_counts
            .iter()
            .map(|(&l, per)| {
                let names: Vec<&String> = per.keys().collect();
                let mut out = BTreeMap::new();
                for i in 0..names.len() {
                    for j in i + 1..names.len() {
                        let d = jensen_shannon(&per[names[i]], &per[names[j]]);
                        out.insert(format!("{}-{}", names[i], names[j]), d);
                    }
                }
                (l, out)
            })
            .collect()
    }
}

fn max_over_mean(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    v.iter().cloned().fold(0.0, f64::max) / mean.max(1e-12)
}

/// JSD in bits between two count vectors (normalised here).
pub fn jensen_shannon(a: &[f64], b: &[f64]) -> f64 {
    let (sa, sb) = (a.iter().sum::<f64>().max(1e-12), b.iter().sum::<f64>().max(1e-12));
    let kl = |p: &[f64], sp: f64, m: &[f64]| -> f64 {
        p.iter()
            .zip(m)
            .map(|(&x, &mm)| {
                let px = x / sp;
                if px > 0.0 {
                    px * (px / mm).log2()
                } else {
                    0.0
                }
            })
            .sum()
    };
    let m: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| 0.5 * (x / sa + y / sb)).collect();
    0.5 * kl(a, sa, &m) + 0.5 * kl(b, sb, &m)
}

/// Scores `docs` with `model`: windows of `seq` tokens overlapping by half,
/// every text token (not `<|bos|>`) scored once with at least `seq/2` tokens
/// of context (or all there is).
pub fn evaluate(model: &Model, docs: &[TokenDoc], seq: usize) -> Result<EvalReport> {
    if seq < 2 {
        return Err(crate::error::Error::Input(format!("evaluation windows need at least 2 tokens, got {seq}")));
    }
    let _guard = tch::no_grad_guard();
    let mut per_domain: BTreeMap<String, DomainScore> = BTreeMap::new();
    let mut expert_counts: BTreeMap<usize, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let opts = ForwardOptions { attn: AttnImpl::Auto, ..Default::default() };
    for doc in docs {
        let name = doc.domain.name().to_string();
        let score = per_domain.entry(name.clone()).or_default();
        score.bytes += doc.bytes;
        for (start, len, first) in eval_windows(doc.ids.len(), seq) {
            let ids = Tensor::f_from_slice(&doc.ids[start..start + len])?.f_unsqueeze(0)?;
            let out = model.forward_with(&ids, None, opts)?;
            let logp = out.logits.f_select(0, 0)?.f_to_kind(Kind::Float)?.f_log_softmax(-1, Kind::Float)?; // [len, V]
            // target at relative position j is predicted at j-1
            let targets = ids.f_select(0, 0)?.f_narrow(0, first as i64, (len - first) as i64)?;
            let pred = logp.f_narrow(0, first as i64 - 1, (len - first) as i64)?;
            let nll = pred.f_gather(1, &targets.f_unsqueeze(1)?.f_to_device(pred.device())?, false)?.f_sum(Kind::Double)?;
            score.bits -= nll.f_double_value(&[])? / std::f64::consts::LN_2;
            score.tokens += len - first;
            // routing of the scored positions
            for (l, r) in out.routing.iter().enumerate() {
                let Some(r) = r else { continue };
                let e = r.scores.size()[1];
                // inputs whose next-token predictions were scored
                let chosen = r.topk_indices.f_narrow(0, first as i64 - 1, (len - first) as i64)?;
                let counts = Vec::<f64>::try_from(
                    chosen.f_flatten(0, -1)?.f_bincount(None::<Tensor>, e)?.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?,
                )?;
                let slot = expert_counts.entry(l).or_default().entry(name.clone()).or_insert_with(|| vec![0.0; e as usize]);
                for (s, c) in slot.iter_mut().zip(counts) {
                    *s += c;
                }
            }
        }
    }
    Ok(EvalReport { per_domain, expert_counts })
}

/// Bits per byte of a unigram model (token frequencies of `train_ids`,
/// add-one smoothed over `vocab`) on `docs` (text tokens only).
pub fn unigram_bits_per_byte(train_ids: &[i64], vocab: usize, docs: &[TokenDoc]) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for &t in train_ids {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let (mut bits, mut bytes) = (0.0, 0usize);
    for d in docs {
        bytes += d.bytes;
        // skip <|bos|>; score text tokens and <|eos|> exactly as `evaluate` scores all but bos
        for &t in &d.ids[1..] {
            bits -= (counts.get(t as usize).copied().unwrap_or(1.0) / total).log2();
        }
    }
    bits / bytes.max(1) as f64
}

/// Domains present in `docs`, for reports.
pub fn domains_of(docs: &[TokenDoc]) -> Vec<Domain> {
    let mut d: Vec<Domain> = docs.iter().map(|x| x.domain).collect();
    d.sort();
    d.dedup();
    d
}
