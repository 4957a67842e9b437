//! Routing records of serving engines, read into the same [`RoutingStats`]
//! a local corpus run produces, and the expert placement DeepSeek's EPLB
//! would make from them.
//!
//! When routing questions outgrow one machine, the model already runs on a
//! distributed engine. DeepScope reads what the engine records rather than
//! run the model itself:
//!
//! | engine | what | read by |
//! |---|---|---|
//! | SGLang | `--expert-distribution-recorder-mode stat` / `stat_approx`: one `.pt` per dump, `logical_count` int32 `[passes, layers, experts]` | [`RoutingStats::from_sglang`] |
//! | SGLang | mode `per_pass`: one `.pt` per rank, `records[*].global_physical_count` `[layers, physical]` | [`RoutingStats::from_sglang`] |
//! | SGLang | mode `per_token`: one `.pt` per rank, `records[*].topk_ids_of_layer` int32 `[layers, tokens, 8]` (physical ids, `-1` empty) and `input_ids` | [`RoutingStats::from_sglang`] |
//! | SGLang | `return_routed_experts`: `meta_info.routed_experts`, base64 of int32 `[prompt + output - 1, layers, top-k]` | [`RoutingStats::from_routed_experts`] |
//! | vLLM | EPLB state saved from `EplbModelState` (`expert_load_window` or `expert_load_pass`, `physical_to_logical_map`) | [`RoutingStats::from_vllm`] |
//!
//! Layers are the model's decoder layers, as in a local run: SGLang's
//! records count every decoder layer (dense ones empty), vLLM's only MoE
//! layers, which are mapped back through the config. Physical experts
//! (replicas) are mapped to logical ones through the record's
//! physical-to-logical map. Several files (ranks, dumps) are summed.
//!
//! What each kind gives: load per layer and expert from every kind;
//! co-activation, layer-to-layer transitions and per-token counts only from
//! per-token kinds (`per_token`, routed experts); routing *weights* from
//! none, so [`RoutingStats::weight_mass`] is an error on imported counts.
//!
//! Memory: per-token records are read in chunks of
//! [`ImportOptions::chunk_tokens`] tokens, so a multi-GB record is read in
//! bounded memory, and the layers of a chunk are counted on all cores; what grows is the statistics (E x E counts per
//! layer and, for the layers in [`ImportOptions::token_layers`], one count
//! vector per distinct token id).
//!
//! ```no_run
//! use deepscope::prelude::*;
//! use deepscope::inspect::import::{EplbOptions, ImportOptions};
//! # fn main() -> deepscope::Result<()> {
//! let (cfg, _) = deepscope::model::published::by_name("deepseek-v3")?;
//! let stats = RoutingStats::from_sglang(&["dump/expert_distribution_recorder_1.pt"], &cfg, &ImportOptions::default())?;
//! println!("{stats}");                                    // imbalance per layer
//! let plan = stats.eplb(EplbOptions::new(32).nodes(4).groups(8).redundant(32))?;
//! println!("{plan}");                                     // busiest GPU / mean, before and after
//! # Ok(()) }
//! ```

pub mod eplb;
mod sglang;
pub mod torch_pt;
mod vllm;

use std::collections::BTreeMap;
use std::path::Path;

pub use eplb::{EplbOptions, EplbPlan, LayerPlan};
pub use torch_pt::{PtDtype, PtFile, PyValue, TensorRef};

use super::corpus::RoutingStats;
use crate::error::{Error, Result};
use crate::model::Config;

/// Options of the record readers.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportOptions {
    /// Decoder layers for which per-token expert counts are kept
    /// ([`RoutingStats::top_tokens`]). Empty by default: at 256 experts
    /// that is a 1 KiB vector per distinct token id and layer.
    pub token_layers: Vec<usize>,
    /// Tokens read at a time from a per-token record, in every layer (8192:
    /// 61 layers x 8 slots x 8 bytes x 8192 = 32 MB at DeepSeek-V3's shape).
    pub chunk_tokens: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { token_layers: Vec::new(), chunk_tokens: 8192 }
    }
}

impl ImportOptions {
    /// Keeps per-token counts for `layers`.
    pub fn token_layers(mut self, layers: impl IntoIterator<Item = usize>) -> Self {
        self.token_layers = layers.into_iter().collect();
        self
    }
}

/// What the readers need to know of the model.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub layers: usize,
    pub moe_layers: Vec<usize>,
    pub experts: usize,
    pub top_k: usize,
}

impl Shape {
    pub fn of(cfg: &Config) -> Result<Shape> {
        if cfg.n_routed_experts == 0 {
            return Err(Error::Input("the config has no routed experts, so no routing record fits it".into()));
        }
        Ok(Shape { layers: cfg.num_hidden_layers, moe_layers: cfg.moe_layers(), experts: cfg.n_routed_experts, top_k: cfg.num_experts_per_tok })
    }

    pub fn is_moe(&self, layer: usize) -> bool {
        self.moe_layers.binary_search(&layer).is_ok()
    }

    /// Tokens behind a record of counts only: every token takes `top_k`
    /// slots of the first MoE layer.
    pub fn tokens_in(&self, stats: &RoutingStats) -> u64 {
        self.moe_layers.first().and_then(|l| stats.load.get(l)).map_or(0, |v| v.iter().sum::<u64>() / self.top_k.max(1) as u64)
    }
}

/// Checks the trailing dimensions of a tensor's `shape` (`usize::MAX`: any
/// size); `extra` lists how many leading dimensions may come before them.
pub(crate) fn check_dims(file: &Path, what: &str, shape: &[usize], expected: &[(usize, &str)], extra: &[usize]) -> Result<()> {
    let lead = shape.len().saturating_sub(expected.len());
    if shape.len() < expected.len() || !extra.contains(&lead) || shape[lead..].iter().zip(expected).any(|(&f, &(e, _))| e != usize::MAX && f != e) {
        let names: Vec<String> = expected.iter().map(|(e, n)| if *e == usize::MAX { n.to_string() } else { format!("{n}={e}") }).collect();
        return Err(bad(file, format!("`{what}` has shape {shape:?}, expected [.., {}] for this config", names.join(", "))));
    }
    Ok(())
}

/// A physical-to-logical expert map `[layers, physical]`, checked.
pub(crate) struct PhysMap {
    pub physical: usize,
    map: Vec<i64>,
}

impl PhysMap {
    pub fn new(file: &Path, map: Vec<i64>, layers: usize, physical: usize, experts: usize) -> Result<PhysMap> {
        if map.len() != layers * physical {
            return Err(bad(file, format!("the physical-to-logical map has {} entries, expected {layers} x {physical}", map.len())));
        }
        if let Some((i, &x)) = map.iter().enumerate().find(|(_, &x)| x < 0 || x as usize >= experts) {
            return Err(bad(file, format!("the physical-to-logical map sends physical expert {} of layer {} to {x}, outside 0..{experts}", i % physical, i / physical)));
        }
        Ok(PhysMap { physical, map })
    }

    /// The identity (no redundant experts).
    pub fn identity(layers: usize, experts: usize) -> PhysMap {
        PhysMap { physical: experts, map: (0..layers).flat_map(|_| 0..experts as i64).collect() }
    }

    /// Logical expert of physical expert `p` in row `row` of the map.
    pub fn logical(&self, row: usize, p: i64) -> Option<i64> {
        if p < 0 || p as usize >= self.physical {
            return None;
        }
        self.map.get(row * self.physical + p as usize).copied()
    }

    /// Maps physical ids in place (-1 stays -1); an id past the map is an error.
    pub fn map_choices(&self, file: &Path, row: usize, layer: usize, choices: &mut [i64]) -> Result<()> {
        for c in choices.iter_mut().filter(|c| **c >= 0) {
            *c = self.logical(row, *c).ok_or_else(|| {
                bad(file, format!("layer {layer}: physical expert {c} is past the map's {} physical experts", self.physical))
            })?;
        }
        Ok(())
    }
}

pub(crate) fn bad(file: &Path, message: impl Into<String>) -> Error {
    Error::BadRecord { file: file.to_path_buf(), message: message.into() }
}

fn source_of(kind: &str, paths: &[&Path]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())).collect();
    let shown = if names.len() > 3 { format!("{}, ... ({} files)", names[..2].join(", "), names.len()) } else { names.join(", ") };
    format!("{kind} ({shown})")
}

impl RoutingStats {
    /// Reads SGLang expert-distribution dumps (any mode; one file per dump,
    /// or per rank in the `per_pass` / `per_token` modes) and sums them.
    /// Files of different modes cannot be mixed.
    pub fn from_sglang(paths: &[impl AsRef<Path>], cfg: &Config, options: &ImportOptions) -> Result<RoutingStats> {
        let paths: Vec<&Path> = paths.iter().map(|p| p.as_ref()).collect();
        sglang::read_dumps(&paths, &Shape::of(cfg)?, options)
    }

    /// Reads SGLang's per-request routed experts (`return_routed_experts`):
    /// JSON files holding a response, a list of responses or one response
    /// per line (each with `meta_info.routed_experts`, and `input_ids` /
    /// `output_ids` when the tokens are wanted), or text files of one
    /// base64 string per line.
    pub fn from_routed_experts(paths: &[impl AsRef<Path>], cfg: &Config, options: &ImportOptions) -> Result<RoutingStats> {
        let paths: Vec<&Path> = paths.iter().map(|p| p.as_ref()).collect();
        sglang::read_routed_experts(&paths, &Shape::of(cfg)?, options)
    }

    /// Reads vLLM EPLB state saved with `torch.save` or safetensors: a dict
    /// with `expert_load_window` `[window, moe_layers, physical]` or
    /// `expert_load_pass` `[moe_layers, physical]`, and
    /// `physical_to_logical_map` `[moe_layers, physical]` (the names of
    /// `vllm.distributed.eplb.EplbModelState`'s fields).
    pub fn from_vllm(paths: &[impl AsRef<Path>], cfg: &Config, options: &ImportOptions) -> Result<RoutingStats> {
        let paths: Vec<&Path> = paths.iter().map(|p| p.as_ref()).collect();
        vllm::read_states(&paths, &Shape::of(cfg)?, options)
    }

    /// The expert placement DeepSeek's EPLB would compute from this load,
    /// layer by layer, and the per-GPU balance before and after.
    pub fn eplb(&self, options: EplbOptions) -> Result<EplbPlan> {
        if self.load.is_empty() {
            return Err(Error::Input("no expert load to plan from (the statistics are empty)".into()));
        }
        let loads: BTreeMap<usize, Vec<f64>> = self.load.iter().map(|(&l, v)| (l, v.iter().map(|&x| x as f64).collect())).collect();
        EplbPlan::new(&loads, options)
    }
}
