//! Routing statistics over a corpus: accumulators fed trace by trace
//! (`add`, `merge`), so they stream in bounded memory, can be saved and
//! resumed, and equal the sum of their parts.
//!
//! Every accumulator is an exact integer, so statistics are *order
//! independent*: adding traces in any order, merging parts in any grouping
//! (a resumed run, shards counted on different machines) gives bit-identical
//! results. Counts are integers by nature; the routing weight mass is summed
//! in fixed point ([`MASS_SCALE`] units of 2^-64 in an `i128`) rather than in
//! `f64`, whose sums depend on the order of the additions. Each f32 weight of
//! magnitude >= 2^-40 is exactly representable on that grid (smaller ones are
//! rounded by < 2^-65, the same way whatever the order), and the total may
//! reach 2^63 before the sum reports an overflow.
//!
//! ```
//! use deepscope::prelude::*;
//! # fn main() -> deepscope::Result<()> {
//! let model = Model::load_default()?;
//! let docs = ["In the beginning God created the heaven and the earth.", "A fool and his money are soon parted."];
//! let mut stats = RoutingStats::default();
//! model.routing_stats(&docs, &mut stats, CorpusRun::default())?;
//! let layer = stats.layers()[0];
//! println!("{}", stats.imbalance(layer)?.max_over_mean);
//! println!("{:?}", stats.top_tokens(layer, 0, 5)?);      // what expert 0 takes most
//! let t = model.trace(docs[0])?;
//! println!("{}", model.replay_bias_balancing(&t, layer, 0.01, 50)?);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::capture::Capture;
use super::interventions::{Compiled, Interventions};
use super::trace::{Probe, Trace};
use crate::model::{ForwardOptions, Until};
use crate::error::{Error, IndexKind, Result};
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::plot::readable_token;

/// Expert usage of every MoE layer over everything added so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingStats {
    pub num_experts: usize,
    /// Tokens seen (each routed once per MoE layer).
    pub tokens: u64,
    /// Documents fully processed (for resuming a corpus run).
    pub docs_done: u64,
    /// Per layer: tokens routed to each expert \[E\].
    pub load: BTreeMap<usize, Vec<u64>>,
    /// Per layer: total routing weight given to each expert \[E\], in fixed
    /// point (units of 2^-64, see the module doc); read it as f64 with
    /// [`RoutingStats::weight_mass`].
    pub weight_mass_q64: BTreeMap<usize, Vec<i128>>,
    /// Per layer: how often experts i and j were chosen for the same token \[E*E\].
    pub coactivation: BTreeMap<usize, Vec<u64>>,
    /// Per layer: (token id, expert) -> count.
    pub token_expert: BTreeMap<usize, HashMap<i64, Vec<u32>>>,
    /// Per consecutive MoE layer pair (a, b): expert of a x expert of b counts \[E*E\].
    pub transitions: BTreeMap<String, Vec<u64>>,
    /// Where the counts came from when they were not counted here: the
    /// engine, mode and files of an imported record (see
    /// [`crate::inspect::import`]). `None` for a local corpus run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// How unevenly the experts of one layer are used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Imbalance {
    pub max_over_mean: f64,
    /// Coefficient of variation of the load (std / mean).
    pub cv: f64,
    /// Entropy of the load distribution in bits (log2 E when perfectly even).
    pub entropy_bits: f64,
    /// Entropy divided by log2 E (1 = perfectly even).
    pub normalized_entropy: f64,
}

impl RoutingStats {
    /// Adds every token of `trace` (all batch rows).
    pub fn add(&mut self, trace: &Trace) -> Result<()> {
        let records: Vec<_> = trace.routing.iter().flatten().collect();
        if records.is_empty() {
            return Err(Error::Input("the trace has no routing (trace with Capture::default() or Capture::routing_only())".into()));
        }
        let parts: Vec<_> = records.iter().map(|r| (r.layer, &r.topk_indices, &r.topk_weights)).collect();
        self.add_routing(&trace.ids, &parts, records[0].num_experts() as usize)
    }

    /// Adds the tokens `ids` [B, T] routed as `parts`: per MoE layer, in
    /// layer order, (layer, top-k indices [B*T, k], top-k weights [B*T, k])
    /// over `e` experts.
    fn add_routing(&mut self, ids: &Tensor, parts: &[(usize, &Tensor, &Tensor)], e: usize) -> Result<()> {
        let ids = Vec::<i64>::try_from(ids.f_flatten(0, -1)?)?;
        if self.num_experts == 0 {
            self.num_experts = e;
        } else if self.num_experts != e {
            return Err(Error::Input(format!("these statistics count {} experts, the trace has {e}", self.num_experts)));
        }
        self.tokens += ids.len() as u64;
        // the same counting as an imported record's, plus the weights
        let mut prev: Option<(usize, Vec<i64>)> = None;
        for &(layer, indices, weights) in parts {
            let k = indices.size().get(1).copied().unwrap_or(1).max(1) as usize;
            let choices = Vec::<i64>::try_from(indices.f_flatten(0, -1)?.f_to_device(tch::Device::Cpu)?)?;
            let weights = Vec::<f32>::try_from(weights.f_flatten(0, -1)?.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?)?;
            self.add_choices(layer, &choices, k, Some(&ids))?;
            let mass = self.weight_mass_q64.entry(layer).or_insert_with(|| vec![0; e]);
            for (&x, &wx) in choices.iter().zip(&weights).filter(|(&x, _)| x >= 0) {
                let q = to_fixed(wx).ok_or_else(|| {
                    Error::Input(format!("layer {layer}: routing weight {wx} of expert {x} cannot be summed (not finite, or |w| >= 2^63)"))
                })?;
                mass[x as usize] = checked_mass_add(mass[x as usize], q, layer)?;
            }
            if let Some((pl, pc)) = &prev {
                self.add_transitions(*pl, layer, pc, &choices, k);
            }
            prev = Some((layer, choices));
        }
        Ok(())
    }

    /// Adds `n` tokens' choices in MoE layer `layer`: `choices` is `[n, k]`
    /// row-major, `-1` for an empty slot; `ids` (when given) are the tokens'
    /// ids, counted per expert for [`RoutingStats::top_tokens`].
    /// Co-activation counts every pair of experts chosen for a token.
    pub(crate) fn add_choices(&mut self, layer: usize, choices: &[i64], k: usize, ids: Option<&[i64]>) -> Result<()> {
        let e = self.num_experts;
        if let Some(&x) = choices.iter().find(|&&x| x >= 0 && x as usize >= e) {
            return Err(Error::Input(format!("layer {layer}: expert id {x} out of range (the record has {e} experts)")));
        }
        let load = self.load.entry(layer).or_insert_with(|| vec![0; e]);
        let co = self.coactivation.entry(layer).or_insert_with(|| vec![0; e * e]);
        let te = ids.map(|_| self.token_expert.entry(layer).or_default());
        count_choices(load, co, te, choices, k, ids, e);
        Ok(())
    }

    /// Adds the pairs of experts chosen for the same tokens in consecutive
    /// MoE layers `a` and `b` (`[n, k]` each, `-1` for an empty slot).
    pub(crate) fn add_transitions(&mut self, a: usize, b: usize, ca: &[i64], cb: &[i64], k: usize) {
        let e = self.num_experts;
        let t = self.transitions.entry(format!("{a}-{b}")).or_insert_with(|| vec![0; e * e]);
        count_transitions(t, ca, cb, k, e);
    }

    /// Adds per-expert token counts of `layer` (a record without per-token
    /// choices).
    pub(crate) fn add_load(&mut self, layer: usize, counts: &[u64]) {
        let load = self.load.entry(layer).or_insert_with(|| vec![0; counts.len()]);
        load.iter_mut().zip(counts).for_each(|(x, y)| *x += y);
    }

    /// Adds the counts of `other` (statistics of another part of the corpus).
    pub fn merge(&mut self, other: &RoutingStats) -> Result<()> {
        if self.num_experts == 0 {
            self.num_experts = other.num_experts;
        }
        if other.num_experts != 0 && other.num_experts != self.num_experts {
            return Err(Error::Input(format!("cannot merge statistics of {} and {} experts", self.num_experts, other.num_experts)));
        }
        self.tokens += other.tokens;
        self.docs_done += other.docs_done;
        self.source = match (self.source.take(), &other.source) {
            (Some(a), Some(b)) if a != *b => Some(format!("{a}; {b}")),
            (a, b) => a.or_else(|| b.clone()),
        };
        fn add_u64(a: &mut BTreeMap<usize, Vec<u64>>, b: &BTreeMap<usize, Vec<u64>>) {
            for (k, v) in b {
                let t = a.entry(*k).or_insert_with(|| vec![0; v.len()]);
                t.iter_mut().zip(v).for_each(|(x, y)| *x += y);
            }
        }
        add_u64(&mut self.load, &other.load);
        add_u64(&mut self.coactivation, &other.coactivation);
        for (k, v) in &other.weight_mass_q64 {
            let t = self.weight_mass_q64.entry(*k).or_insert_with(|| vec![0; v.len()]);
            for (x, y) in t.iter_mut().zip(v) {
                *x = checked_mass_add(*x, *y, *k)?;
            }
        }
        for (k, v) in &other.transitions {
            let t = self.transitions.entry(k.clone()).or_insert_with(|| vec![0; v.len()]);
            t.iter_mut().zip(v).for_each(|(x, y)| *x += y);
        }
        for (l, m) in &other.token_expert {
            let te = self.token_expert.entry(*l).or_default();
            for (tok, counts) in m {
                let t = te.entry(*tok).or_insert_with(|| vec![0; counts.len()]);
                t.iter_mut().zip(counts).for_each(|(x, y)| *x += y);
            }
        }
        Ok(())
    }

    /// Total routing weight given to each expert of `layer` \[E\] (the exact
    /// fixed-point sum, rounded once to f64).
    pub fn weight_mass(&self, layer: usize) -> Result<Vec<f64>> {
        if self.load.contains_key(&layer) && !self.weight_mass_q64.contains_key(&layer) {
            return Err(Error::Input(format!(
                "layer {layer}: these statistics have no routing weights ({} records expert choices only)",
                self.source.as_deref().unwrap_or("the record")
            )));
        }
        let q = self
            .weight_mass_q64
            .get(&layer)
            .ok_or_else(|| Error::Input(format!("no statistics for layer {layer}; MoE layers seen: {:?}", self.layers())))?;
        Ok(q.iter().map(|&x| x as f64 / MASS_SCALE).collect())
    }

    /// MoE layers with statistics.
    pub fn layers(&self) -> Vec<usize> {
        self.load.keys().copied().collect()
    }

    fn layer_load(&self, layer: usize) -> Result<&Vec<u64>> {
        self.load
            .get(&layer)
            .ok_or_else(|| Error::Input(format!("no statistics for layer {layer}; MoE layers seen: {:?}", self.layers())))
    }

    /// Load imbalance of `layer`.
    pub fn imbalance(&self, layer: usize) -> Result<Imbalance> {
        let load = self.layer_load(layer)?;
        let n = load.len() as f64;
        let total: f64 = load.iter().map(|&x| x as f64).sum();
        let mean = total / n;
        let var = load.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let entropy: f64 = load
            .iter()
            .filter(|&&x| x > 0)
            .map(|&x| {
                let p = x as f64 / total;
                -p * p.log2()
            })
            .sum();
        Ok(Imbalance {
            max_over_mean: load.iter().copied().max().unwrap_or(0) as f64 / mean.max(1e-12),
            cv: var.sqrt() / mean.max(1e-12),
            entropy_bits: entropy,
            normalized_entropy: entropy / n.log2().max(1e-12),
        })
    }

    /// Co-activation of `layer` as conditional frequencies: entry (i, j) is
    /// P(j chosen | i chosen); the diagonal is 1 for used experts.
    pub fn coactivation(&self, layer: usize) -> Result<Vec<Vec<f64>>> {
        let e = self.num_experts;
        let co = self
            .coactivation
            .get(&layer)
            .ok_or_else(|| Error::Input(format!("no statistics for layer {layer}")))?;
        Ok((0..e)
            .map(|i| {
                let d = co[i * e + i].max(1) as f64;
                (0..e).map(|j| co[i * e + j] as f64 / d).collect()
            })
            .collect())
    }

    /// The tokens expert `expert` of `layer` takes most: (token id, count,
    /// share of that token's occurrences routed to the expert), by count.
    pub fn top_tokens(&self, layer: usize, expert: usize, n: usize) -> Result<Vec<(i64, u32, f64)>> {
        Error::check_index(IndexKind::Expert, expert, self.num_experts)?;
        let te = self
            .token_expert
            .get(&layer)
            .ok_or_else(|| Error::Input(format!("no statistics for layer {layer}")))?;
        let mut v: Vec<(i64, u32, f64)> = te
            .iter()
            .filter(|(_, c)| c[expert] > 0)
            .map(|(&tok, c)| {
                // each occurrence of a token is routed to k experts: share = count / occurrences
                let occurrences = c.iter().map(|&x| x as f64).sum::<f64>() / self.k_of(layer).max(1.0);
                (tok, c[expert], c[expert] as f64 / occurrences.max(1.0))
            })
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        Ok(v)
    }

    /// [`RoutingStats::top_tokens`] with each token shown as text by
    /// `tokenizer` (byte-level tokens made readable: `␣` for a space, `↵`
    /// for a newline): for imported records, whose ids come without text.
    pub fn top_token_strings(&self, layer: usize, expert: usize, n: usize, tokenizer: &Tokenizer) -> Result<Vec<(String, u32, f64)>> {
        Ok(self
            .top_tokens(layer, expert, n)?
            .into_iter()
            .map(|(id, count, share)| {
                let text = tokenizer.tokens(&[id]).into_iter().next().flatten().map_or_else(|| format!("#{id}"), |t| readable_token(&t));
                (text, count, share)
            })
            .collect())
    }

    fn k_of(&self, layer: usize) -> f64 {
        let total: u64 = self.load.get(&layer).map_or(0, |l| l.iter().sum());
        total as f64 / self.tokens.max(1) as f64
    }

    /// How much the choice in MoE layer `b` is predictable from layer `a`:
    /// normalised mutual information between one expert chosen in `a` and one
    /// chosen in `b` for the same token, over all k_a x k_b pairs (0 =
    /// independent; with k > 1 the maximum is below 1, so compare values
    /// between layer pairs or runs rather than against 1).
    pub fn layer_agreement(&self, a: usize, b: usize) -> Result<f64> {
        let t = self
            .transitions
            .get(&format!("{a}-{b}"))
            .ok_or_else(|| Error::Input(format!("no transition statistics for layers {a} -> {b} (consecutive MoE layers only)")))?;
        let e = self.num_experts;
        let total: f64 = t.iter().map(|&x| x as f64).sum();
        let pa: Vec<f64> = (0..e).map(|i| (0..e).map(|j| t[i * e + j] as f64).sum::<f64>() / total).collect();
        let pb: Vec<f64> = (0..e).map(|j| (0..e).map(|i| t[i * e + j] as f64).sum::<f64>() / total).collect();
        let mut mi = 0.0;
        for i in 0..e {
            for j in 0..e {
                let p = t[i * e + j] as f64 / total;
                if p > 0.0 {
                    mi += p * (p / (pa[i] * pb[j])).log2();
                }
            }
        }
        let h = |p: &[f64]| -> f64 { p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.log2()).sum() };
        Ok(mi / (h(&pa) * h(&pb)).sqrt().max(1e-12))
    }

    /// Saves to JSON (resume by loading and passing it back to the corpus run).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string(self).map_err(|e| Error::Input(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    pub fn load_from(path: impl AsRef<Path>) -> Result<RoutingStats> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|cause| Error::Json { path: path.to_path_buf(), cause })
    }
}

/// The valid expert ids of one row (`-1` and ids past `e` left out).
fn valid_of<'b>(row: &[i64], e: usize, buf: &'b mut [usize; 256]) -> &'b [usize] {
    let mut n = 0;
    for &x in row.iter().take(buf.len()) {
        if x >= 0 && (x as usize) < e {
            buf[n] = x as usize;
            n += 1;
        }
    }
    &buf[..n]
}

/// Counts one layer's choices `[n, k]` into its load, co-activation and
/// (with `ids`) per-token accumulators. The callers check the ids first.
pub(crate) fn count_choices(
    load: &mut [u64],
    co: &mut [u64],
    mut te: Option<&mut HashMap<i64, Vec<u32>>>,
    choices: &[i64],
    k: usize,
    ids: Option<&[i64]>,
    e: usize,
) {
    let mut buf = [0usize; 256];
    for (t, row) in choices.chunks(k.max(1)).enumerate() {
        let v = valid_of(row, e, &mut buf);
        for &x in v {
            load[x] += 1;
            let base = x * e;
            for &y in v {
                co[base + y] += 1;
            }
        }
        if v.is_empty() {
            continue; // padding: no expert, no token count
        }
        if let (Some(te), Some(&tok)) = (te.as_deref_mut(), ids.and_then(|i| i.get(t))) {
            let c = te.entry(tok).or_insert_with(|| vec![0; e]);
            for &x in v {
                c[x] += 1;
            }
        }
    }
}

/// Counts the expert pairs of the same tokens in two consecutive layers.
pub(crate) fn count_transitions(t: &mut [u64], ca: &[i64], cb: &[i64], k: usize, e: usize) {
    let (mut ba, mut bb) = ([0usize; 256], [0usize; 256]);
    for (ra, rb) in ca.chunks(k.max(1)).zip(cb.chunks(k.max(1))) {
        let (va, vb) = (valid_of(ra, e, &mut ba), valid_of(rb, e, &mut bb));
        for &x in va {
            let base = x * e;
            for &y in vb {
                t[base + y] += 1;
            }
        }
    }
}

/// One unit of [`RoutingStats::weight_mass_q64`] is `1 / MASS_SCALE` = 2^-64.
pub const MASS_SCALE: f64 = 18_446_744_073_709_551_616.0; // 2^64

/// `w` on the 2^-64 grid (exact for |w| >= 2^-40, the nearest point below
/// that); `None` when it is not finite or |w| >= 2^63.
fn to_fixed(w: f32) -> Option<i128> {
    let x = (w as f64) * MASS_SCALE; // exact: a power-of-two scale
    (x.is_finite() && x.abs() < 2f64.powi(127)).then(|| x.round() as i128)
}

fn checked_mass_add(a: i128, b: i128, layer: usize) -> Result<i128> {
    a.checked_add(b)
        .ok_or_else(|| Error::Input(format!("layer {layer}: the routing weight mass overflows 2^63")))
}

impl fmt::Display for RoutingStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(src) => writeln!(f, "Routing statistics over {} tokens, {} experts, from {src}", self.tokens, self.num_experts)?,
            None => writeln!(f, "Routing statistics over {} tokens ({} documents), {} experts", self.tokens, self.docs_done, self.num_experts)?,
        }
        writeln!(f, "{:>6} {:>9} {:>7} {:>13}", "layer", "max/mean", "cv", "entropy/max")?;
        for l in self.layers() {
            if let Ok(i) = self.imbalance(l) {
                writeln!(f, "{:>6} {:>9.3} {:>7.3} {:>13.3}", l, i.max_over_mean, i.cv, i.normalized_entropy)?;
            }
        }
        Ok(())
    }
}

/// Progress of a corpus run.
#[derive(Debug, Clone, Copy)]
pub struct CorpusProgress {
    pub docs_done: u64,
    pub docs_total: u64,
    pub tokens: u64,
}

/// Options of [`Model::routing_stats`].
pub struct CorpusRun<'a> {
    /// Tokens per window (documents are split into windows; attention does
    /// not cross a window's edge).
    pub window: usize,
    /// Windows per forward pass, taken in order across documents (1: one
    /// window per pass). Shorter windows are right-padded; the padding is not
    /// counted and, attention being causal, changes no real token. With
    /// interventions every window runs alone, so a hook always sees batch 1,
    /// as in [`Model::trace_with`].
    pub batch: usize,
    pub interventions: Interventions,
    pub progress: Option<&'a mut dyn FnMut(CorpusProgress)>,
    /// Polled before each forward pass; `true` stops the run with
    /// `Error::Interrupted`, leaving the statistics of completed documents.
    pub cancel: Option<&'a dyn Fn() -> bool>,
}

impl Default for CorpusRun<'_> {
    fn default() -> Self {
        CorpusRun {
            window: 256,
            batch: 4,
            interventions: Interventions::new(),
            progress: None,
            cancel: None,
        }
    }
}

impl Model {
    /// Streams `docs` through the model, adding their routing to `stats`.
    /// Documents already counted (`stats.docs_done`) are skipped, so calling
    /// again with the same statistics resumes an interrupted run.
    pub fn routing_stats(&self, docs: &[&str], stats: &mut RoutingStats, run: CorpusRun) -> Result<()> {
        let ids = docs.iter().skip(stats.docs_done as usize).map(|d| self.encode(d)).collect::<Result<Vec<_>>>()?;
        self.routing_stats_of_ids(&ids, docs.len() as u64, stats, run)
    }

    /// [`routing_stats`](Self::routing_stats) on documents already turned
    /// into token ids: `docs` are the documents not yet counted (those after
    /// `stats.docs_done`), `total` the whole run's document count (for
    /// progress). Each pass stops once the last MoE layer's router has
    /// chosen ([`Until::LastRouter`]: no logits, no experts in that layer)
    /// and records only the top-k choice and weights.
    pub fn routing_stats_of_ids(&self, docs: &[Vec<i64>], total: u64, stats: &mut RoutingStats, mut run: CorpusRun) -> Result<()> {
        if run.window == 0 {
            return Err(Error::Input("the window must hold at least one token".into()));
        }
        let batch = if run.interventions.is_empty() { run.batch.max(1) } else { 1 };
        let compiled = run.interventions.compile(self)?;
        let interrupt = crate::interrupt::Interrupt::new();
        // documents whose windows are not all counted yet, in order, with the
        // number of windows each still waits for; `base` is the first one's index
        let mut flight: VecDeque<(RoutingStats, usize)> = VecDeque::new();
        let mut base = 0;
        let mut queue: Vec<(usize, &[i64])> = Vec::with_capacity(batch);
        let mut finish = |flight: &mut VecDeque<(RoutingStats, usize)>, base: &mut usize, run: &mut CorpusRun| -> Result<()> {
            while flight.front().is_some_and(|(_, left)| *left == 0) {
                if let Some((mut part, _)) = flight.pop_front() {
                    part.docs_done = 1;
                    stats.merge(&part)?;
                    *base += 1;
                    if let Some(p) = run.progress.as_deref_mut() {
                        p(CorpusProgress { docs_done: stats.docs_done, docs_total: total, tokens: stats.tokens });
                    }
                }
            }
            Ok(())
        };
        for (d, ids) in docs.iter().enumerate() {
            let windows: Vec<&[i64]> = ids.chunks(run.window).collect();
            flight.push_back((RoutingStats::default(), windows.len()));
            for w in windows {
                queue.push((d, w));
                if queue.len() == batch {
                    self.routing_pass(&mut queue, &compiled, &mut flight, base, run.cancel, &interrupt)?;
                }
            }
            finish(&mut flight, &mut base, &mut run)?;
        }
        if !queue.is_empty() {
            self.routing_pass(&mut queue, &compiled, &mut flight, base, run.cancel, &interrupt)?;
            finish(&mut flight, &mut base, &mut run)?;
        }
        Ok(())
    }

    /// One pass over the queued `windows` (document index, tokens), each a
    /// row, right-padded to the longest (causal attention: the padding comes
    /// after every real token, so it changes none of them; it is not
    /// counted), after polling `cancel` and the interrupt. Each window's
    /// routing goes to its document's part in `flight`, whose first entry is
    /// document `base`; the queue is emptied.
    fn routing_pass(
        &self,
        queue: &mut Vec<(usize, &[i64])>,
        compiled: &Compiled,
        flight: &mut VecDeque<(RoutingStats, usize)>,
        base: usize,
        cancel: Option<&dyn Fn() -> bool>,
        interrupt: &crate::interrupt::Interrupt,
    ) -> Result<()> {
        if cancel.is_some_and(|c| c()) {
            return Err(Error::Interrupted);
        }
        interrupt.check()?;
        let windows = std::mem::take(queue);
        let len = windows.iter().map(|(_, w)| w.len()).max().unwrap_or(0);
        let rows = windows.len();
        let mut flat = vec![0i64; rows * len];
        for (r, (_, w)) in windows.iter().enumerate() {
            flat[r * len..r * len + w.len()].copy_from_slice(w);
        }
        let x = Tensor::f_from_slice(&flat)?.f_view([rows as i64, len as i64])?;
        let capture = Capture::none();
        let mut probe = Probe::new(self, &capture, compiled, false)?;
        let out = self.forward_hooked(&x, None, ForwardOptions { until: Until::LastRouter, ..Default::default() }, &mut probe)?;
        let routed: Vec<_> = out.routing.iter().enumerate().filter_map(|(l, r)| r.as_ref().map(|r| (l, r))).collect();
        let Some((_, first)) = routed.first() else {
            return Err(Error::Input("the model has no MoE layer, so there is no routing to count".into()));
        };
        let e = first.scores.size()[1] as usize;
        for (r, (d, w)) in windows.iter().enumerate() {
            let (start, n) = ((r * len) as i64, w.len() as i64);
            let rows_of = |t: &Tensor| t.f_narrow(0, start, n);
            let parts = routed
                .iter()
                .map(|(l, o)| Ok((*l, rows_of(&o.topk_indices)?, rows_of(&o.topk_weights)?)))
                .collect::<Result<Vec<_>>>()?;
            let parts: Vec<_> = parts.iter().map(|(l, i, wt)| (*l, i, wt)).collect();
            let (part, left) = flight.get_mut(d - base).ok_or_else(|| Error::Input(format!("document {d} is not in flight")))?;
            part.add_routing(&x.f_select(0, r as i64)?.f_narrow(0, 0, n)?, &parts, e)?;
            *left -= 1;
        }
        Ok(())
    }
}

/// One replay of DeepSeek-V3's auxiliary-loss-free balancing on recorded
/// router scores: after each step, `b_i += gamma * sign(mean_load - load_i)`.
#[derive(Debug, Clone, Serialize)]
pub struct BiasReplay {
    pub layer: usize,
    pub gamma: f64,
    /// max/mean expert load at each step (before that step's update).
    pub max_over_mean: Vec<f64>,
    /// Expert loads at each step.
    pub loads: Vec<Vec<i64>>,
    /// The bias after the last step.
    pub final_bias: Vec<f32>,
}

impl Model {
    /// Replays the bias update rule on the router scores of `trace` (MoE layer
    /// `layer`), starting from zero bias: each step routes every recorded token
    /// with the current bias, measures the load, and updates the bias.
    pub fn replay_bias_balancing(&self, trace: &Trace, layer: usize, gamma: f64, steps: usize) -> Result<BiasReplay> {
        let r = trace.routing_of(layer)?;
        let gate = &self.layers[layer].moe().ok_or_else(|| Error::Input(format!("layer {layer} is dense")))?.gate;
        let e = r.num_experts();
        let mut bias = Tensor::f_zeros([e], (Kind::Float, tch::Device::Cpu))?;
        let (mut history, mut loads) = (Vec::new(), Vec::new());
        for _ in 0..steps {
            let sel = gate.select(&r.scores, Some(&bias), &r.settings, &[], &[], layer)?;
            let load = sel.indices.f_flatten(0, -1)?.f_bincount(None::<Tensor>, e)?.f_to_kind(Kind::Float)?;
            let mean = load.f_mean(Kind::Float)?;
            history.push(load.f_max()?.f_double_value(&[])? / mean.f_double_value(&[])?.max(1e-12));
            loads.push(Vec::<i64>::try_from(load.f_to_kind(Kind::Int64)?)?);
            bias = bias.f_add(&mean.f_sub(&load)?.f_sign()?.f_mul_scalar(gamma)?)?;
        }
        Ok(BiasReplay { layer, gamma, max_over_mean: history, loads, final_bias: Vec::<f32>::try_from(&bias)? })
    }
}

impl BiasReplay {
    /// The lowest and highest max/mean load over the last `steps` steps: a
    /// fixed-step rule ends near balance moving between values (often a
    /// two-step cycle) rather than at one.
    pub fn settled_range(&self, steps: usize) -> (f64, f64) {
        let tail = &self.max_over_mean[self.max_over_mean.len().saturating_sub(steps)..];
        tail.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
    }
}

impl fmt::Display for BiasReplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = self.max_over_mean.first().copied().unwrap_or(0.0);
        let last = self.max_over_mean.last().copied().unwrap_or(0.0);
        write!(
            f,
            "Bias balancing replay, layer {}, gamma {}: max/mean load {:.3} -> {:.3} over {} steps",
            self.layer,
            self.gamma,
            first,
            last,
            self.max_over_mean.len()
        )?;
        // a fixed step cannot settle exactly: say when the end still moves
        let (lo, hi) = self.settled_range(20);
        if hi > lo {
            write!(f, "; the last {} steps move between {lo:.3} and {hi:.3}", self.max_over_mean.len().min(20))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights whose f64 sum depends on the order of the additions.
    fn awkward_weights() -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..2000)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                // magnitudes 21 decades apart: more than an f64 mantissa holds
                match i % 7 {
                    0 => u * 1e12,
                    1 => u * 1e-9,
                    _ => u * 2.5,
                }
            })
            .collect()
    }

    #[test]
    fn fixed_point_mass_is_the_same_in_any_order() {
        let w = awkward_weights();
        let fixed = |ws: &mut dyn Iterator<Item = &f32>| ws.fold(0i128, |a, &x| a + to_fixed(x).unwrap());
        let float = |ws: &mut dyn Iterator<Item = &f32>| ws.fold(0f64, |a, &x| a + x as f64);
        let forward = fixed(&mut w.iter());
        assert_eq!(forward, fixed(&mut w.iter().rev()));
        assert_eq!(forward, fixed(&mut w.iter().step_by(2).chain(w.iter().skip(1).step_by(2))));
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        assert_eq!(forward, fixed(&mut sorted.iter()));
        assert_eq!(forward, fixed(&mut sorted.iter().rev()));
        // the plain f64 sums of the same values differ in their last bits,
        // which is why the mass is not summed in f64
        let (f, r) = (float(&mut sorted.iter()), float(&mut sorted.iter().rev()));
        assert_ne!(f.to_bits(), r.to_bits(), "pick weights whose f64 sums depend on order");
        let f = float(&mut w.iter());
        // and the fixed-point sum is as accurate as f64 accumulation
        let exact = forward as f64 / MASS_SCALE;
        assert!((exact - f).abs() <= 1e-12 * f.abs(), "{exact} vs {f}");
    }

    #[test]
    fn fixed_point_rejects_what_it_cannot_sum() {
        assert_eq!(to_fixed(1.0), Some(1i128 << 64));
        assert_eq!(to_fixed(-0.5), Some(-(1i128 << 63)));
        assert_eq!(to_fixed(f32::NAN), None);
        assert_eq!(to_fixed(f32::INFINITY), None);
        assert_eq!(to_fixed(2f32.powi(63)), None);
        assert!(checked_mass_add(i128::MAX, 1, 3).unwrap_err().to_string().contains("layer 3"));
    }

    #[test]
    fn weight_mass_survives_a_json_round_trip_exactly() {
        let mut s = RoutingStats::default();
        s.weight_mass_q64.insert(1, vec![i128::MAX - 7, -3, 1 << 100]);
        let back: RoutingStats = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
