//! vLLM's EPLB state. vLLM keeps expert load in memory only
//! (`vllm.distributed.eplb.EplbModelState`) and has no dump of its own, so
//! the format read here is that state's fields saved as they are, with
//! `torch.save` or safetensors:
//! - `expert_load_window` int32 `[window, moe_layers, physical]` (summed over
//!   the window, as vLLM does before rebalancing), or `expert_load_pass`
//!   `[moe_layers, physical]` when there is no window;
//! - `physical_to_logical_map` int64 `[moe_layers, physical]`.
//!
//! vLLM counts MoE layers only; they are mapped to decoder layers through
//! the config.

use std::path::Path;

use safetensors::SafeTensors;

use super::torch_pt::{PtFile, PyValue};
use super::{bad, check_dims, source_of, ImportOptions, PhysMap, Shape};
use crate::error::{Error, Result};
use crate::inspect::corpus::RoutingStats;

/// An integer tensor read from either format: shape and values.
struct Ints {
    shape: Vec<usize>,
    values: Vec<i64>,
}

fn from_pt(file: &PtFile, key: &str) -> Result<Option<Ints>> {
    match file.root().get(key) {
        None => Ok(None),
        Some(PyValue::Tensor(t)) => Ok(Some(Ints { shape: t.shape.clone(), values: file.read_ints(t)? })),
        Some(v) => Err(bad(file.path(), format!("`{key}` is a {}, expected a tensor", v.kind()))),
    }
}

fn from_safetensors(path: &Path, st: &SafeTensors, key: &str) -> Result<Option<Ints>> {
    let Ok(view) = st.tensor(key) else { return Ok(None) };
    let data = view.data();
    let values: Vec<i64> = match view.dtype() {
        safetensors::Dtype::I32 => data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect(),
        safetensors::Dtype::I64 => data.chunks_exact(8).map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])).collect(),
        d => return Err(bad(path, format!("`{key}` has dtype {d:?}, expected int32 or int64"))),
    };
    Ok(Some(Ints { shape: view.shape().to_vec(), values }))
}

pub(super) fn read_states(paths: &[&Path], shape: &Shape, _options: &ImportOptions) -> Result<RoutingStats> {
    if paths.is_empty() {
        return Err(Error::Input("no vLLM EPLB state files given".into()));
    }
    let m = shape.moe_layers.len();
    let mut stats = RoutingStats { num_experts: shape.experts, ..RoutingStats::default() };
    for &path in paths {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let (load, map, keys) = if is_safetensors {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, format!("not a readable safetensors file: {e}")))?;
            let load = match from_safetensors(path, &st, "expert_load_window")? {
                Some(w) => Some(w),
                None => from_safetensors(path, &st, "expert_load_pass")?,
            };
            (load, from_safetensors(path, &st, "physical_to_logical_map")?, st.names().into_iter().map(String::from).collect::<Vec<_>>())
        } else {
            let file = PtFile::open(path)?;
            let load = match from_pt(&file, "expert_load_window")? {
                Some(w) => Some(w),
                None => from_pt(&file, "expert_load_pass")?,
            };
            (load, from_pt(&file, "physical_to_logical_map")?, file.root().keys())
        };
        let (Some(load), Some(map)) = (load, map) else {
            return Err(bad(
                path,
                format!("not a vLLM EPLB state: the keys are {keys:?}, expected `expert_load_window` or `expert_load_pass`, and `physical_to_logical_map`"),
            ));
        };
        check_dims(path, "physical_to_logical_map", &map.shape, &[(m, "MoE layers"), (usize::MAX, "physical experts")], &[0])?;
        let physical = map.shape[1];
        check_dims(path, "expert load", &load.shape, &[(m, "MoE layers"), (physical, "physical experts")], &[0, 1])?;
        let map = PhysMap::new(path, map.values, m, physical, shape.experts)?;
        for (row, &layer) in shape.moe_layers.iter().enumerate() {
            let mut logical = vec![0u64; shape.experts];
            for step in load.values.chunks(m * physical) {
                for (p, &c) in step[row * physical..(row + 1) * physical].iter().enumerate() {
                    if c < 0 {
                        return Err(bad(path, format!("MoE layer {row} (decoder layer {layer}): negative load {c} for physical expert {p}")));
                    }
                    if let Some(e) = map.logical(row, p as i64) {
                        logical[e as usize] += c as u64;
                    }
                }
            }
            stats.add_load(layer, &logical);
        }
    }
    stats.tokens = shape.tokens_in(&stats);
    stats.source = Some(source_of("vLLM EPLB state", paths));
    Ok(stats)
}
