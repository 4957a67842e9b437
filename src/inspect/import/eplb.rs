//! Expert-parallel load balancing: where a serving engine would put each
//! expert, and its replicas, given the loads a record measured.
//!
//! This is the algorithm of DeepSeek's EPLB (github.com/deepseek-ai/EPLB),
//! which SGLang and vLLM also use, written from its description:
//! - **Hierarchical** (when the expert groups divide evenly among the
//!   nodes): pack the expert groups onto nodes so that node loads are even
//!   (greedy: heaviest group first, onto the lightest node with room);
//!   within each node, add redundant replicas one at a time to the expert
//!   with the highest load per replica; then pack the node's replicas onto
//!   its GPUs the same greedy way, each replica carrying its expert's load
//!   divided by the expert's replica count.
//! - **Global** (otherwise): the same with one group and one node.
//!
//! Ties go to the lowest index (the first expert among equal loads, the
//! first GPU among equally loaded ones), so a plan is deterministic.
//!
//! The decisions use the reference's arithmetic (SGLang's copy of it): the
//! loads rounded to f32 (`weight.float()`), loads per replica divided in
//! f32, pack loads summed in f64; so the replica counts and per-GPU loads
//! are the ones SGLang computes, which the test checks against SGLang's
//! own code. The loads reported are summed
//! in f64. The balance is the ratio of the busiest GPU's load to the mean,
//! before (each GPU holding a contiguous block of `experts / gpus` experts,
//! the static placement) and after.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::error::{Error, Result};

/// Most physical experts per logical one a plan may have: each redundant
/// slot is one greedy step over all experts, so an absurd count (a typo of a
/// few digits) would run for hours instead of failing.
pub const MAX_REPLICAS_PER_EXPERT: usize = 8;

/// The shape of the deployment to plan for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EplbOptions {
    /// GPUs in all.
    pub gpus: usize,
    /// Nodes (machines); the GPUs are split evenly among them.
    pub nodes: usize,
    /// Expert groups of the router (`n_group`; 8 for DeepSeek-V3). With
    /// `groups % nodes == 0` the plan is hierarchical, otherwise global.
    pub groups: usize,
    /// Redundant experts in all: the plan places `experts + redundant`
    /// physical experts (DeepSeek-V3's serving used 32 in prefill).
    pub redundant: usize,
}

impl EplbOptions {
    /// `gpus` GPUs on one node, one group, no redundant experts.
    pub fn new(gpus: usize) -> EplbOptions {
        EplbOptions { gpus, nodes: 1, groups: 1, redundant: 0 }
    }

    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    pub fn groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    pub fn redundant(mut self, redundant: usize) -> Self {
        self.redundant = redundant;
        self
    }

    fn check(&self, experts: usize) -> Result<()> {
        let replicas = experts + self.redundant;
        let fail = |m: String| Err(Error::Input(format!("EPLB plan for {experts} experts: {m}")));
        if self.gpus == 0 || self.nodes == 0 || self.groups == 0 {
            return fail("gpus, nodes and groups must be at least 1".into());
        }
        if experts == 0 {
            return fail("there are no experts".into());
        }
        if self.redundant > MAX_REPLICAS_PER_EXPERT.saturating_sub(1).saturating_mul(experts) {
            return fail(format!(
                "{} redundant experts is more than {} per expert; a plan is refused beyond {MAX_REPLICAS_PER_EXPERT} physical experts per logical one (deployments use about 1.1 to 1.3)",
                self.redundant,
                MAX_REPLICAS_PER_EXPERT - 1
            ));
        }
        if self.gpus % self.nodes != 0 {
            return fail(format!("{} GPUs do not split evenly over {} nodes", self.gpus, self.nodes));
        }
        if replicas % self.gpus != 0 {
            return fail(format!("{experts} experts + {} redundant = {replicas} do not split evenly over {} GPUs", self.redundant, self.gpus));
        }
        if experts % self.groups != 0 {
            return fail(format!("{experts} experts do not split into {} groups", self.groups));
        }
        if self.groups % self.nodes == 0 && (experts % self.nodes != 0 || replicas % self.nodes != 0) {
            return fail(format!("{replicas} physical experts do not split evenly over {} nodes", self.nodes));
        }
        Ok(())
    }
}

/// The plan for one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerPlan {
    /// Physical slot -> logical expert; GPU `g` holds slots
    /// `g * per_gpu .. (g + 1) * per_gpu`.
    pub phy2log: Vec<usize>,
    /// Which replica of its expert each slot is (0 for the first).
    pub replica: Vec<usize>,
    /// Replicas of each logical expert (>= 1).
    pub count: Vec<usize>,
    /// Load each GPU carries under the plan.
    pub gpu_load: Vec<f64>,
    /// Load each GPU carries with the static placement and no replicas.
    pub gpu_load_static: Vec<f64>,
}

impl LayerPlan {
    /// Busiest GPU over the mean, under the plan.
    pub fn balance(&self) -> f64 {
        max_over_mean(&self.gpu_load)
    }

    /// Busiest GPU over the mean, with the static placement.
    pub fn balance_static(&self) -> f64 {
        max_over_mean(&self.gpu_load_static)
    }

    /// The expert with the most replicas (the lowest index among equals)
    /// and its count.
    pub fn most_replicated(&self) -> (usize, usize) {
        self.count.iter().enumerate().max_by_key(|(i, &c)| (c, std::cmp::Reverse(*i))).map_or((0, 0), |(e, &c)| (e, c))
    }

    /// The physical slots of logical expert `e`, by replica.
    pub fn slots_of(&self, e: usize) -> Vec<usize> {
        let mut v: Vec<(usize, usize)> =
            self.phy2log.iter().enumerate().filter(|(_, &l)| l == e).map(|(q, _)| (self.replica[q], q)).collect();
        v.sort();
        v.into_iter().map(|(_, q)| q).collect()
    }
}

fn max_over_mean(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    if mean <= 0.0 {
        return 1.0;
    }
    v.iter().cloned().fold(0.0, f64::max) / mean
}

/// An EPLB plan for every MoE layer of a record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EplbPlan {
    pub options: EplbOptions,
    pub experts: usize,
    /// Whether the hierarchical policy was used (else the global one).
    pub hierarchical: bool,
    pub layers: BTreeMap<usize, LayerPlan>,
}

impl EplbPlan {
    /// Plans every layer of `loads` (layer -> load per logical expert).
    pub fn new(loads: &BTreeMap<usize, Vec<f64>>, options: EplbOptions) -> Result<EplbPlan> {
        let experts = loads.values().next().map_or(0, |l| l.len());
        options.check(experts)?;
        let hierarchical = options.groups % options.nodes == 0;
        let mut layers = BTreeMap::new();
        for (&l, w) in loads {
            if w.len() != experts {
                return Err(Error::Input(format!("EPLB plan: layer {l} has {} experts, the first layer {experts}", w.len())));
            }
            if let Some(bad) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
                return Err(Error::Input(format!("EPLB plan: layer {l} has a load of {bad}; loads must be finite and >= 0")));
            }
            let (groups, nodes) = if hierarchical { (options.groups, options.nodes) } else { (1, 1) };
            let w32: Vec<f32> = w.iter().map(|&x| x as f32).collect();
            let (phy2log, replica, count) = rebalance_hierarchical(&w32, experts + options.redundant, groups, nodes, options.gpus);
            let per_gpu = phy2log.len() / options.gpus;
            let gpu_load = (0..options.gpus)
                .map(|g| phy2log[g * per_gpu..(g + 1) * per_gpu].iter().map(|&e| w[e] / count[e] as f64).sum())
                .collect();
            // static placement: contiguous blocks of experts, no replicas
            // (only defined when the experts split evenly over the GPUs)
            let gpu_load_static = if experts % options.gpus == 0 {
                let per = experts / options.gpus;
                (0..options.gpus).map(|g| w[g * per..(g + 1) * per].iter().sum()).collect()
            } else {
                Vec::new()
            };
            layers.insert(l, LayerPlan { phy2log, replica, count, gpu_load, gpu_load_static });
        }
        Ok(EplbPlan { options, experts, hierarchical, layers })
    }

    /// Mean over layers of the busiest GPU's load over the mean load.
    pub fn mean_balance(&self) -> f64 {
        self.layers.values().map(|p| p.balance()).sum::<f64>() / self.layers.len().max(1) as f64
    }

    /// The same for the static placement (NaN when the experts do not split
    /// evenly over the GPUs).
    pub fn mean_balance_static(&self) -> f64 {
        if self.layers.values().any(|p| p.gpu_load_static.is_empty()) {
            return f64::NAN;
        }
        self.layers.values().map(|p| p.balance_static()).sum::<f64>() / self.layers.len().max(1) as f64
    }

    pub fn layer(&self, layer: usize) -> Result<&LayerPlan> {
        self.layers
            .get(&layer)
            .ok_or_else(|| Error::Input(format!("no plan for layer {layer}; MoE layers planned: {:?}", self.layers.keys().collect::<Vec<_>>())))
    }
}

impl fmt::Display for EplbPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "EPLB plan ({}): {} experts + {} redundant on {} GPUs, {} node(s), {} group(s)",
            if self.hierarchical { "hierarchical" } else { "global" },
            self.experts,
            o.redundant,
            o.gpus,
            o.nodes,
            o.groups
        )?;
        writeln!(f, "busiest GPU / mean: static {:.3}, planned {:.3} (mean over {} layers)", self.mean_balance_static(), self.mean_balance(), self.layers.len())?;
        writeln!(f, "{:>6} {:>8} {:>8} {:>14}", "layer", "static", "planned", "most replicas")?;
        for (l, p) in &self.layers {
            let (e, c) = p.most_replicated();
            writeln!(f, "{:>6} {:>8.3} {:>8.3} {:>14}", l, p.balance_static(), p.balance(), format!("e{e} x{c}"))?;
        }
        Ok(())
    }
}

/// Greedy balanced packing of one row of weights into `packs` packs of
/// equal item count: heaviest first, each onto the lightest pack with room.
/// Returns (pack of each item, position within its pack).
fn balanced_packing(weight: &[f32], packs: usize) -> (Vec<usize>, Vec<usize>) {
    let n = weight.len();
    let per_pack = n / packs;
    if per_pack == 1 {
        return ((0..n).collect(), vec![0; n]);
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
    let (mut pack_of, mut rank_in) = (vec![0; n], vec![0; n]);
    // the reference sums the packs in Python floats (f64) of the f32 weights
    let (mut pack_weight, mut pack_items) = (vec![0.0f64; packs], vec![0usize; packs]);
    for item in order {
        let pack = (0..packs)
            .filter(|&p| pack_items[p] < per_pack)
            .min_by(|&a, &b| pack_weight[a].total_cmp(&pack_weight[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        pack_of[item] = pack;
        rank_in[item] = pack_items[pack];
        pack_weight[pack] += weight[item] as f64;
        pack_items[pack] += 1;
    }
    (pack_of, rank_in)
}

/// `physical` slots for the experts of `weight`: each expert once, then each
/// extra slot to the expert with the highest load per replica. Returns
/// (expert of each slot, replica number of each slot, replicas per expert).
fn replicate(weight: &[f32], physical: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let m = weight.len();
    let mut phy2log: Vec<usize> = (0..m).collect();
    let mut rank = vec![0; m];
    let mut count = vec![1usize; m];
    for _ in m..physical {
        let best = (0..m)
            .max_by(|&a, &b| (weight[a] / count[a] as f32).total_cmp(&(weight[b] / count[b] as f32)).then(b.cmp(&a)))
            .unwrap_or(0);
        phy2log.push(best);
        rank.push(count[best]);
        count[best] += 1;
    }
    (phy2log, rank, count)
}

fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// The hierarchical policy for one layer (global when groups = nodes = 1).
fn rebalance_hierarchical(weight: &[f32], physical: usize, groups: usize, nodes: usize, gpus: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let experts = weight.len();
    let group_size = experts / groups;
    let groups_per_node = groups / nodes;
    let per_gpu = physical / gpus;
    let per_node_log = experts / nodes;
    let per_node_phy = physical / nodes;
    // 1. expert groups onto nodes
    let group_load: Vec<f32> = (0..groups).map(|g| weight[g * group_size..(g + 1) * group_size].iter().sum()).collect();
    let (gpack, grank) = balanced_packing(&group_load, nodes);
    // logical expert -> its index in node-major order
    let log2mlog: Vec<usize> = (0..experts).map(|e| (gpack[e / group_size] * groups_per_node + grank[e / group_size]) * group_size + e % group_size).collect();
    let mlog2log = inverse(&log2mlog);
    let mut pphy2log = Vec::with_capacity(physical);
    let mut pphy_rank = Vec::with_capacity(physical);
    let mut mlog_count = vec![0usize; experts];
    for n in 0..nodes {
        // 2. replicas within the node
        let node_load: Vec<f32> = (0..per_node_log).map(|i| weight[mlog2log[n * per_node_log + i]]).collect();
        let (phy2mlog, rank, count) = replicate(&node_load, per_node_phy);
        for (i, c) in count.iter().enumerate() {
            mlog_count[n * per_node_log + i] = *c;
        }
        // 3. the node's replicas onto its GPUs
        let phy_load: Vec<f32> = phy2mlog.iter().map(|&i| node_load[i] / count[i] as f32).collect();
        let (pack, rank_in) = balanced_packing(&phy_load, gpus / nodes);
        let phy2pphy: Vec<usize> = pack.iter().zip(&rank_in).map(|(p, r)| p * per_gpu + r).collect();
        let pphy2phy = inverse(&phy2pphy);
        for &p in &pphy2phy {
            pphy2log.push(mlog2log[n * per_node_log + phy2mlog[p]]);
            pphy_rank.push(rank[p]);
        }
    }
    let count = (0..experts).map(|e| mlog_count[log2mlog[e]]).collect();
    (pphy2log, pphy_rank, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_puts_the_heaviest_first_on_the_lightest_pack() {
        // 6, 5, 4, 3, 2, 1 into 2 packs of 3: 6->A, 5->B, 4->B (9), 3->A (9), 2->A? A full? no: A has 2
        let (pack, rank) = balanced_packing(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2);
        let load = |p| (0..6).filter(|&i| pack[i] == p).map(|i| i as f64 + 1.0).sum::<f64>();
        assert_eq!(load(0) + load(1), 21.0);
        assert!((load(0) - load(1)).abs() <= 1.0);
        for p in 0..2 {
            let mut r: Vec<usize> = (0..6).filter(|&i| pack[i] == p).map(|i| rank[i]).collect();
            r.sort();
            assert_eq!(r, vec![0, 1, 2]);
        }
    }

    #[test]
    fn replicas_go_to_the_highest_load_per_replica() {
        let (phy2log, rank, count) = replicate(&[10.0, 1.0, 4.0], 6);
        // 10 -> x2 (5 each), then 5 vs 4 -> 0 again (3.33), then 4 -> 2
        assert_eq!(phy2log, vec![0, 1, 2, 0, 0, 2]);
        assert_eq!(rank, vec![0, 0, 0, 1, 2, 1]);
        assert_eq!(count, vec![3, 1, 2]);
    }
}
