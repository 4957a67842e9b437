//! Where every weight of a model will live, decided before anything is loaded.
//!
//! A [`Plan`] places each weight ([`super::layout::WeightSpec`]) in a tier:
//! - **ready**: compute dtype on its device (today's fully resident form);
//! - **packed**: its checkpoint form (FP8 + scales, or bf16 under f32) on its
//!   device, converted per use;
//! - **host**: packed in host memory, copied to its GPU per use;
//! - **disk**: left in the files, read per use (routed experts through an LRU
//!   cache).
//!
//! When everything fits the budget, everything is resident (FP8 stays FP8
//! unless `dequantize`). Otherwise the plan streams, in this order of
//! priority for the budget, which is the order of bytes read per token saved
//! per byte held:
//! 1. norms, routers and biases (small, read every pass): always resident;
//! 2. a reserve for the largest weight read at once plus its converted chunk;
//! 3. attention, dense MLPs and shared experts, layer by layer, then `lm_head`
//!    (each read in full by every pass);
//! 4. the routed experts (each read by k/E of the tokens): all resident if
//!    they fit, else the rest of the budget becomes their LRU cache;
//! 5. `embed_tokens` stays on disk (a pass reads only its tokens' rows).
//!
//! The plan is computed from the config alone (`deepscope plan`,
//! [`Plan::for_config`]) or from a checkpoint's headers
//! ([`Model::load`](super::Model::load) follows exactly the plan it prints).

use std::fmt;

use serde::Serialize;
use tch::{Device, Kind};

use super::budget::{DeviceMap, MemoryBudget};
use super::config::Config;
use super::layout::{assumed_storage, weight_specs, Stored, Unit, WeightSpec};
use super::weight::CHUNK_BYTES;
use crate::error::{Error, Result};
use crate::stats::human_bytes;

/// Where one weight lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Tier {
    Ready,
    Packed,
    Host,
    Disk,
}

impl Tier {
    pub fn label(&self) -> &'static str {
        match self {
            Tier::Ready => "resident",
            Tier::Packed => "resident, packed",
            Tier::Host => "host memory",
            Tier::Disk => "disk",
        }
    }
}

/// The tier and device of one weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub tier: Tier,
    pub device: Device,
    /// Routed experts off the device: kept in the device's LRU cache after use.
    pub cached: bool,
}

/// What the plan depends on besides the weights (the memory parts of
/// [`LoadOptions`](super::LoadOptions)).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    pub device: Device,
    pub kind: Kind,
    pub memory_budget: MemoryBudget,
    /// Host memory for weights offloaded from a GPU (ignored on the CPU).
    pub host_budget: MemoryBudget,
    pub dequantize: bool,
    pub device_map: DeviceMap,
    /// GPUs to plan for (`None`: the ones this machine has), so a plan for a
    /// bigger machine can be made on a smaller one (with explicit budgets).
    pub gpus: Option<usize>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            memory_budget: MemoryBudget::Auto,
            host_budget: MemoryBudget::Auto,
            dequantize: false,
            device_map: DeviceMap::Single,
            gpus: None,
        }
    }
}

/// The budget of one device and how the plan spends it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevicePlan {
    #[serde(serialize_with = "ser_device")]
    pub device: Device,
    /// `None`: unlimited.
    pub budget: Option<u64>,
    /// Bytes of the weights resident on the device.
    pub resident: u64,
    /// Bytes kept free for the weight being read and its converted chunk.
    pub reserve: u64,
    /// Bytes of the routed-expert LRU cache (0 when experts are resident).
    pub cache_capacity: u64,
    /// Some weights of this device are read per use.
    pub streaming: bool,
}

fn ser_device<S: serde::Serializer>(d: &Device, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}").to_lowercase())
}

/// Bytes one pass reads from each tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TierBytes {
    /// From resident memory on the compute devices.
    pub device: u64,
    /// Copied from host memory to a GPU.
    pub host: u64,
    /// Read from the checkpoint files.
    pub disk: u64,
}

/// Where every weight will live. See the module doc.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: Config,
    pub kind: Kind,
    pub specs: Vec<WeightSpec>,
    pub stored: Vec<Stored>,
    pub placements: Vec<Placement>,
    pub devices: Vec<DevicePlan>,
    /// Host memory used by offloaded weights (GPU plans only).
    pub host_resident: u64,
    pub layer_devices: Vec<Device>,
    /// FP8 weights expanded to the compute dtype at load.
    pub dequantize: bool,
    /// `lm_head` is the embedding matrix (`tie_word_embeddings`, no `lm_head.weight`).
    pub tied: bool,
    /// Weight name -> index into `specs`.
    index: std::collections::HashMap<String, usize>,
}

impl Plan {
    /// The plan for the published checkpoint of `cfg` (storage assumed from
    /// the config: FP8 under `quantization_config`, else `dtype`).
    pub fn for_config(cfg: &Config, dtype: Kind, opts: &PlanOptions) -> Result<Plan> {
        let specs = weight_specs(cfg);
        let stored = specs.iter().map(|s| assumed_storage(cfg, s, dtype)).collect();
        Plan::new(cfg, specs, stored, opts)
    }

    /// The plan for `specs` stored as `stored` (one entry per spec).
    pub fn new(cfg: &Config, specs: Vec<WeightSpec>, stored: Vec<Stored>, opts: &PlanOptions) -> Result<Plan> {
        let n_layers = cfg.num_hidden_layers;
        let kind = opts.kind;
        // a tied lm_head reads the whole embedding every pass
        let tied = !specs.iter().any(|s| s.unit == Unit::LmHead);
        let every_pass = |u: Unit| matches!(u, Unit::Attention(_) | Unit::DenseMlp(_) | Unit::SharedExperts(_) | Unit::LmHead) || (tied && u == Unit::Embed);
        // the fully resident form of each weight
        let resident_bytes = |i: usize, streaming: bool| -> (Tier, u64) { resident_form(&specs[i], stored[i], kind, opts.dequantize, streaming) };
        let mut layer_bytes = vec![0u64; n_layers];
        for (i, s) in specs.iter().enumerate() {
            if let Some(l) = s.unit.layer() {
                layer_bytes[l] += resident_bytes(i, false).1;
            }
        }
        let total: u64 = (0..specs.len()).map(|i| resident_bytes(i, false).1).sum();
        let fits_main = match opts.memory_budget.resolve(opts.device) {
            Ok(b) => b.is_none_or(|b| total <= b),
            Err(_) => false,
        };
        let gpus = opts.gpus.unwrap_or_else(super::budget::gpu_count);
        let layer_devices = opts.device_map.resolve(opts.device, &layer_bytes, fits_main, gpus)?;
        let device_of = |s: &WeightSpec| -> Device {
            match s.unit {
                Unit::Embed => layer_devices.first().copied().unwrap_or(opts.device),
                Unit::LmHead | Unit::Small(None) => layer_devices.last().copied().unwrap_or(opts.device),
                u => u.layer().and_then(|l| layer_devices.get(l).copied()).unwrap_or(opts.device),
            }
        };
        let mut devices: Vec<Device> = Vec::new();
        for d in specs.iter().map(device_of) {
            if !devices.contains(&d) {
                devices.push(d);
            }
        }
        let mut placements: Vec<Placement> =
            specs.iter().enumerate().map(|(i, s)| Placement { tier: resident_bytes(i, false).0, device: device_of(s), cached: false }).collect();
        let host_budget = opts.host_budget.resolve(Device::Cpu)?;
        let mut host_left = host_budget.unwrap_or(u64::MAX);
        let mut host_resident = 0u64;
        let mut device_plans = Vec::new();
        for &dev in &devices {
            let budget = opts.memory_budget.resolve(dev)?;
            let mine: Vec<usize> = (0..specs.len()).filter(|&i| placements[i].device == dev).collect();
            let all: u64 = mine.iter().map(|&i| resident_bytes(i, false).1).sum();
            if budget.is_none_or(|b| all <= b) {
                device_plans.push(DevicePlan { device: dev, budget, resident: all, reserve: 0, cache_capacity: 0, streaming: false });
                continue;
            }
            let minimum = opts.memory_budget == MemoryBudget::Minimum;
            let mut budget_bytes = budget.unwrap_or(u64::MAX);
            // streaming: compact forms, small weights first, then the reserve
            for &i in &mine {
                placements[i].tier = resident_bytes(i, true).0;
            }
            let small: u64 = mine.iter().filter(|&&i| !specs[i].matrix).map(|&i| resident_bytes(i, true).1).sum();
            let reserves = Reserve::new(&specs, &stored, &mine, tied);
            let none = vec![false; specs.len()];
            let (largest_i, largest, chunk) = reserves.need(&none, None);
            if minimum {
                budget_bytes = small + largest + chunk;
            }
            if budget_bytes < small + largest + chunk {
                let s = &specs[largest_i];
                return Err(Error::BudgetTooSmall {
                    device: format!("{dev:?}").to_lowercase(),
                    budget: budget_bytes,
                    needed: small + largest + chunk,
                    tensor: s.sources.join(" + "),
                    tensor_bytes: largest,
                });
            }
            let offload = |i: usize, host_left: &mut u64, host_resident: &mut u64, p: &mut Placement| {
                let b = specs[i].stored_bytes(stored[i]);
                if dev != Device::Cpu && b <= *host_left {
                    *host_left -= b;
                    *host_resident += b;
                    p.tier = Tier::Host;
                } else {
                    p.tier = Tier::Disk;
                }
            };
            // The reserve is for the largest weight still read whole: each
            // weight made resident may shrink it, and what it frees is room.
            let mut on_device = none;
            let reserve_without = |on_device: &[bool], skip: Option<usize>| -> u64 {
                let (_, largest, rest) = reserves.need(on_device, skip);
                largest + rest
            };
            let mut resident = small;
            // every-pass weights in layer order, lm_head last
            let mut dense: Vec<usize> = mine.iter().copied().filter(|&i| every_pass(specs[i].unit)).collect();
            dense.sort_by_key(|&i| (matches!(specs[i].unit, Unit::LmHead | Unit::Embed), specs[i].unit.layer()));
            for i in dense {
                let b = resident_bytes(i, true).1;
                if !minimum && resident + b + reserve_without(&on_device, Some(i)) <= budget_bytes {
                    resident += b;
                    on_device[i] = true;
                } else {
                    offload(i, &mut host_left, &mut host_resident, &mut placements[i]);
                }
            }
            let experts: Vec<usize> = mine.iter().copied().filter(|&i| matches!(specs[i].unit, Unit::Expert(..))).collect();
            let expert_bytes: u64 = experts.iter().map(|&i| resident_bytes(i, true).1).sum();
            let mut with_experts = on_device.clone();
            experts.iter().for_each(|&i| with_experts[i] = true);
            let mut cache_capacity = 0;
            let reserve = if !minimum && resident + expert_bytes + reserve_without(&with_experts, None) <= budget_bytes {
                resident += expert_bytes;
                reserve_without(&with_experts, None)
            } else {
                let r = reserve_without(&on_device, None);
                cache_capacity = budget_bytes.saturating_sub(resident + r);
                for &i in &experts {
                    offload(i, &mut host_left, &mut host_resident, &mut placements[i]);
                    placements[i].cached = true;
                }
                r
            };
            if !tied {
                for &i in &mine {
                    if specs[i].unit == Unit::Embed {
                        placements[i].tier = Tier::Disk;
                    }
                }
            }
            let budget = Some(budget_bytes);
            device_plans.push(DevicePlan { device: dev, budget, resident, reserve, cache_capacity, streaming: true });
        }
        let index = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Ok(Plan {
            config: cfg.clone(),
            kind,
            specs,
            stored,
            placements,
            devices: device_plans,
            host_resident,
            layer_devices,
            dequantize: opts.dequantize,
            tied,
            index,
        })
    }

    /// Some weight is read per use.
    pub fn streaming(&self) -> bool {
        self.devices.iter().any(|d| d.streaming)
    }

    /// Bytes of the whole checkpoint as stored.
    pub fn stored_bytes(&self) -> u64 {
        self.specs.iter().zip(&self.stored).map(|(s, st)| s.stored_bytes(*st)).sum()
    }

    /// Bytes resident on the compute devices.
    pub fn resident_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.resident).sum()
    }

    /// The smallest budget with which the model loads on `device` (every
    /// matrix on disk, no expert cache).
    pub fn minimum_budget(&self, device: Device) -> u64 {
        let mine: Vec<usize> = (0..self.specs.len()).filter(|&i| self.placements[i].device == device).collect();
        let small: u64 = mine
            .iter()
            .filter(|&&i| !self.specs[i].matrix)
            .map(|&i| resident_form(&self.specs[i], self.stored[i], self.kind, false, true).1)
            .sum();
        let (_, largest, rest) = Reserve::new(&self.specs, &self.stored, &mine, self.tied).need(&vec![false; self.specs.len()], None);
        small + largest + rest
    }

    /// Bytes a pass over `tokens` new tokens reads from each tier, assuming
    /// uniform routing (each expert of a layer chosen by k/E of the tokens)
    /// and, for `cache_hits: false`, that no expert is in the cache.
    pub fn traffic(&self, tokens: u64, cache_hits: bool) -> TierBytes {
        let cfg = &self.config;
        let (e, k) = (cfg.n_routed_experts.max(1) as f64, cfg.num_experts_per_tok as f64);
        // expected distinct experts per MoE layer for `tokens` tokens
        let distinct = e * (1.0 - (1.0 - k / e).powf(tokens as f64));
        let mut out = TierBytes::default();
        let mut offloaded_experts = vec![0f64; self.devices.len()];
        for (i, (s, p)) in self.specs.iter().zip(&self.placements).enumerate() {
            let di = self.devices.iter().position(|d| d.device == p.device).unwrap_or(0);
            if p.cached {
                offloaded_experts[di] += 1.0;
            }
            let held = match p.tier {
                Tier::Ready | Tier::Packed => self.resident_of(i),
                Tier::Host | Tier::Disk => s.stored_bytes(self.stored[i]),
            };
            let b = match s.unit {
                // only the rows of the pass's tokens (unless it is also the lm_head)
                Unit::Embed if !self.tied => held / s.shape[0].max(1) as u64 * tokens,
                Unit::Expert(..) => (held as f64 * distinct / e) as u64,
                _ => held,
            };
            match p.tier {
                Tier::Ready | Tier::Packed => out.device += b,
                Tier::Host => out.host += b,
                Tier::Disk => out.disk += b,
            }
        }
        if cache_hits {
            // a cache holding C bytes of the N bytes of offloaded experts
            // serves C/N of the lookups when every expert is used alike
            for d in &self.devices {
                let (disk, host) = self.expert_read_bytes(d.device, distinct / e);
                let total = self.expert_read_bytes(d.device, 1.0);
                let all = (total.0 + total.1) as f64;
                if all == 0.0 || d.cache_capacity == 0 {
                    continue;
                }
                let hit = (d.cache_capacity as f64 / all).min(1.0);
                let (sd, sh) = ((disk as f64 * hit) as u64, (host as f64 * hit) as u64);
                out.disk -= sd.min(out.disk);
                out.host -= sh.min(out.host);
                out.device += sd + sh;
            }
        }
        out
    }

    /// (disk, host) bytes of offloaded experts on `device` a pass reads when
    /// each expert is used with probability `p`.
    fn expert_read_bytes(&self, device: Device, p: f64) -> (u64, u64) {
        let (mut disk, mut host) = (0f64, 0f64);
        for (i, (s, pl)) in self.specs.iter().zip(&self.placements).enumerate() {
            if pl.cached && pl.device == device {
                let b = s.stored_bytes(self.stored[i]) as f64 * p;
                if pl.tier == Tier::Host {
                    host += b
                } else {
                    disk += b
                }
            }
        }
        (disk as u64, host as u64)
    }

    fn resident_of(&self, i: usize) -> u64 {
        let streaming = self.devices.iter().find(|d| d.device == self.placements[i].device).is_some_and(|d| d.streaming);
        resident_form(&self.specs[i], self.stored[i], self.kind, self.dequantize, streaming).1
    }

    /// The placement of the weight named `name` (model name, e.g. `...gate_up_proj.weight`).
    pub fn placement_of(&self, name: &str) -> Option<(usize, Placement)> {
        self.index.get(name).map(|&i| (i, self.placements[i]))
    }

    /// One row per group of weights with the same part, tier and device:
    /// (part, layers, count, stored bytes, bytes in memory, where).
    pub fn rows(&self) -> Vec<PlanRow> {
        let mut rows: Vec<PlanRow> = Vec::new();
        for (i, (s, p)) in self.specs.iter().zip(&self.placements).enumerate() {
            let mem = match p.tier {
                Tier::Ready | Tier::Packed => self.resident_of(i),
                Tier::Host => s.stored_bytes(self.stored[i]),
                Tier::Disk => 0,
            };
            let place = self.place_label(p, self.stored[i]);
            let layer = s.unit.layer();
            let count_unit = match s.unit {
                Unit::Expert(l, e) => Some((l, e)),
                _ => None,
            };
            let key_part = s.unit.label();
            if let Some(r) = rows.iter_mut().find(|r| r.part == key_part && r.place == place && r.device == p.device) {
                r.stored += s.stored_bytes(self.stored[i]);
                r.memory += mem;
                if let Some(l) = layer {
                    r.layers.push(l);
                }
                if let Some(x) = count_unit {
                    if !r.units.contains(&x) {
                        r.units.push(x);
                    }
                }
                continue;
            }
            rows.push(PlanRow {
                part: key_part,
                layers: layer.into_iter().collect(),
                units: count_unit.into_iter().collect(),
                stored: s.stored_bytes(self.stored[i]),
                memory: mem,
                place,
                device: p.device,
            });
        }
        rows
    }

    fn place_label(&self, p: &Placement, stored: Stored) -> String {
        match p.tier {
            Tier::Ready => format!("resident {}", kind_name(self.kind)),
            Tier::Packed => format!("resident {}", stored.name()),
            Tier::Host => format!("host memory ({})", stored.name()),
            Tier::Disk if p.cached => "disk + expert cache".to_string(),
            Tier::Disk => "disk".to_string(),
        }
    }
}

impl Plan {
    /// The plan as JSON: devices, one row per part, bytes per token per tier.
    pub fn to_json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "part": r.part, "layers": r.layer_text(), "count": r.units.len(), "stored_bytes": r.stored,
                    "memory_bytes": r.memory, "device": format!("{:?}", r.device).to_lowercase(), "where": r.place,
                })
            })
            .collect();
        let per = |t: u64, hits: bool| {
            let b = self.traffic(t, hits);
            serde_json::json!({"disk": b.disk / t, "host": b.host / t, "device": b.device / t})
        };
        serde_json::json!({
            "layers": self.config.num_hidden_layers,
            "compute_dtype": kind_name(self.kind),
            "stored_bytes": self.stored_bytes(),
            "resident_bytes": self.resident_bytes(),
            "host_resident_bytes": self.host_resident,
            "streaming": self.streaming(),
            "devices": self.devices,
            "rows": rows,
            "bytes_per_token": {
                "decode_no_cache_hits": per(1, false),
                "decode_uniform_cache": per(1, true),
                "prefill_32": per(32, false),
            },
        })
    }
}

/// One line of a plan table.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    pub part: &'static str,
    pub layers: Vec<usize>,
    /// Routed experts (layer, expert) in the row.
    pub units: Vec<(usize, usize)>,
    pub stored: u64,
    pub memory: u64,
    pub place: String,
    pub device: Device,
}

impl PlanRow {
    /// `3`, `0-2`, `3, 5-7`, or empty.
    pub fn layer_text(&self) -> String {
        let mut ls = self.layers.clone();
        ls.sort_unstable();
        ls.dedup();
        let mut parts: Vec<String> = Vec::new();
        let mut i = 0;
        while i < ls.len() {
            let mut j = i;
            while j + 1 < ls.len() && ls[j + 1] == ls[j] + 1 {
                j += 1;
            }
            parts.push(if i == j { ls[i].to_string() } else { format!("{}-{}", ls[i], ls[j]) });
            i = j + 1;
        }
        parts.join(", ")
    }
}

/// What reading weights whole needs beyond the resident ones: the largest
/// weight still read at once, room for converting one chunk of it (an f32
/// chunk and its cast), and the experts the reader threads hold ahead of
/// their use. A streamed embedding is read a row at a time, so it counts only
/// when it is also the (tied) `lm_head`. The candidates are sorted once, so
/// that asking again as weights become resident costs little.
struct Reserve {
    /// (stored bytes, index), largest first.
    bytes: Vec<(u64, usize)>,
    /// (f32 chunk bytes, index), largest first.
    chunks: Vec<(u64, usize)>,
    /// Routed-expert weights among the candidates.
    experts: Vec<usize>,
    /// Bytes the reader threads may hold while experts stream.
    ahead: u64,
}

impl Reserve {
    fn new(specs: &[WeightSpec], stored: &[Stored], mine: &[usize], tied: bool) -> Reserve {
        let whole: Vec<usize> = mine.iter().copied().filter(|&i| specs[i].matrix && (tied || specs[i].unit != Unit::Embed)).collect();
        let mut bytes: Vec<(u64, usize)> = whole.iter().map(|&i| (specs[i].stored_bytes(stored[i]), i)).collect();
        let mut chunks: Vec<(u64, usize)> = whole.iter().map(|&i| ((specs[i].numel().max(0) as u64 * 4).min(CHUNK_BYTES as u64), i)).collect();
        bytes.sort_unstable_by(|a, b| b.cmp(a));
        chunks.sort_unstable_by(|a, b| b.cmp(a));
        let experts: Vec<usize> = whole.iter().copied().filter(|&i| matches!(specs[i].unit, Unit::Expert(..))).collect();
        let mut per_expert: std::collections::HashMap<Unit, u64> = Default::default();
        for &i in &experts {
            *per_expert.entry(specs[i].unit).or_default() += specs[i].stored_bytes(stored[i]);
        }
        let readers = (super::stream::READERS * (super::stream::READ_AHEAD + 1)) as u64;
        Reserve { bytes, chunks, experts, ahead: per_expert.values().copied().max().unwrap_or(0) * readers }
    }

    /// (index of the largest weight read whole, its bytes, the rest of the
    /// reserve) when the weights marked in `resident` (and `skip`) are not read.
    fn need(&self, resident: &[bool], skip: Option<usize>) -> (usize, u64, u64) {
        let streamed = |i: usize| !resident[i] && Some(i) != skip;
        let first = |v: &[(u64, usize)]| v.iter().copied().find(|&(_, i)| streamed(i));
        let (largest, largest_i) = first(&self.bytes).unwrap_or((0, 0));
        let chunk = first(&self.chunks).map_or(0, |c| c.0);
        // experts stream all or none
        let ahead = if self.experts.iter().any(|&i| streamed(i)) { self.ahead } else { 0 };
        (largest_i, largest, 2 * chunk + ahead)
    }
}

/// The in-memory form of a resident weight: (tier, bytes).
fn resident_form(s: &WeightSpec, stored: Stored, kind: Kind, dequantize: bool, streaming: bool) -> (Tier, u64) {
    let n = s.numel().max(0) as u64;
    if !s.matrix {
        // routers and e_score_correction_bias stay f32
        let f32_small = s.name.ends_with("mlp.gate.weight") || s.name.ends_with("e_score_correction_bias");
        let k = if f32_small { Kind::Float } else { kind };
        return (Tier::Ready, n * k.elt_size_in_bytes() as u64);
    }
    match stored {
        Stored::Fp8(_) if !dequantize => (Tier::Packed, s.stored_bytes(stored)),
        Stored::Plain(k) if streaming && k.elt_size_in_bytes() < kind.elt_size_in_bytes() => (Tier::Packed, s.stored_bytes(stored)),
        _ => (Tier::Ready, n * kind.elt_size_in_bytes() as u64),
    }
}

pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Float8e4m3fn => "FP8",
        _ => "other",
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "Plan: {} layers ({} MoE, {} routed experts each), compute {}, {} stored",
            c.num_hidden_layers,
            c.moe_layers().len(),
            c.n_routed_experts,
            kind_name(self.kind),
            human_bytes(self.stored_bytes())
        )?;
        writeln!(f, "{:<24} {:>8} {:>7} {:>11} {:>11}  {:<10} where", "part", "layers", "count", "stored", "in memory", "device")?;
        for r in self.rows() {
            let count = if r.units.is_empty() { String::new() } else { r.units.len().to_string() };
            writeln!(
                f,
                "{:<24} {:>8} {:>7} {:>11} {:>11}  {:<10} {}",
                r.part,
                r.layer_text(),
                count,
                human_bytes(r.stored),
                human_bytes(r.memory),
                format!("{:?}", r.device).to_lowercase(),
                r.place
            )?;
        }
        for d in &self.devices {
            let budget = d.budget.map_or("unlimited".to_string(), human_bytes);
            write!(
                f,
                "{}: budget {budget}, weights resident {}",
                format!("{:?}", d.device).to_lowercase(),
                human_bytes(d.resident)
            )?;
            if d.streaming {
                write!(f, ", reserve {} for the weight being read, expert cache {}", human_bytes(d.reserve), human_bytes(d.cache_capacity))?;
            }
            writeln!(f, "{}", if d.streaming { " (streaming)" } else { " (everything resident)" })?;
        }
        if self.host_resident > 0 {
            writeln!(f, "host memory: {} of offloaded weights", human_bytes(self.host_resident))?;
        }
        let per = |t: u64, hits: bool| {
            let b = self.traffic(t, hits);
            (b.disk / t, b.host / t, b.device / t)
        };
        let (d1, h1, m1) = per(1, false);
        let (d1c, _, _) = per(1, true);
        let (d32, h32, _) = per(32, false);
        writeln!(
            f,
            "per decoded token: {} from disk with no expert-cache hits, about {} with a uniformly used cache; {} from host memory; {} from resident memory",
            human_bytes(d1),
            human_bytes(d1c),
            human_bytes(h1),
            human_bytes(m1)
        )?;
        write!(f, "per token of a 32-token prefill: {} from disk, {} from host memory", human_bytes(d32), human_bytes(h32))
    }
}
