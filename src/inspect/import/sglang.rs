//! SGLang's expert-distribution dumps and per-request routed experts.
//!
//! The structures, from SGLang's `srt/eplb/expert_distribution.py` and
//! `srt/layers/moe/routed_experts_capturer.py`:
//! - `stat` / `stat_approx`: `{rank, logical_count, average_utilization_rate_over_window}`,
//!   `logical_count` int32 `[passes, num_hidden_layers, experts]` (a ring
//!   buffer: unused rows are zero, which adds nothing).
//! - `per_pass` / `per_token`: `{records: [...], last_physical_to_logical_map [layers, physical]}`;
//!   a record has `forward_pass_id`, `rank`, `gatherer_key` and either
//!   `global_physical_count` `[layers, physical]` or `topk_ids_of_layer`
//!   int32 `[layers, tokens, 8]` (physical ids, `-1` for empty slots, dense
//!   layers and padding) with `input_ids` and `positions`.
//! - routed experts: base64 of int32 `[prompt + output - 1, layers, top-k]`,
//!   zeros in dense layers (skipped through the config), physical ids. A
//!   response carries no physical-to-logical map, so the ids are read as
//!   logical: right when the engine runs without redundant experts; with
//!   them, an id past the model's experts is an error that names it.
//! - stat records also come as JSON, `{"logical_count": [...]}` with 2 or 3
//!   dimensions (the form SGLang's `--init-expert-location` reads).
//!
//! Under plain tensor parallelism every rank records the same tokens; a
//! record whose pass id and contents equal one already read (from another
//! rank's file) is counted once, and the source says how many were skipped.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;

use base64::Engine;

use super::torch_pt::{PtFile, PyValue, TensorRef};
use super::{bad, check_dims, source_of, ImportOptions, PhysMap, Shape};
use crate::error::{Error, Result};
use crate::inspect::corpus::{count_choices, count_transitions, RoutingStats};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Stat,
    PerPass,
    PerToken,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Stat => "stat",
            Mode::PerPass => "per_pass",
            Mode::PerToken => "per_token",
        }
    }
}

fn mode_of(file: &PtFile) -> Result<Mode> {
    let root = file.root();
    if root.get("logical_count").is_some() {
        return Ok(Mode::Stat);
    }
    if let Some(records) = root.get("records") {
        let records = records.as_seq().ok_or_else(|| bad(file.path(), format!("`records` is a {}, expected a list", records.kind())))?;
        return Ok(match records.first() {
            Some(r) if r.get("topk_ids_of_layer").is_some() => Mode::PerToken,
            Some(r) if r.get("global_physical_count").is_some() => Mode::PerPass,
            Some(r) => {
                return Err(bad(
                    file.path(),
                    format!("a record has keys {:?}, expected `global_physical_count` (per_pass) or `topk_ids_of_layer` (per_token)", r.keys()),
                ))
            }
            None => Mode::PerPass, // an empty dump: nothing to add
        });
    }
    Err(bad(
        file.path(),
        format!(
            "not an SGLang expert-distribution dump: the keys are {:?}, expected `logical_count` (mode stat) or `records` (modes per_pass, per_token)",
            root.keys()
        ),
    ))
}

fn tensor<'a>(file: &PtFile, v: &'a PyValue, what: &str) -> Result<&'a TensorRef> {
    match v.get(what) {
        Some(PyValue::Tensor(t)) => Ok(t),
        Some(other) => Err(bad(file.path(), format!("`{what}` is a {}, expected a tensor", other.kind()))),
        None => Err(bad(file.path(), format!("no `{what}` (keys: {:?})", v.keys()))),
    }
}

/// Checks that dense layers carry no counts.
fn check_dense(file: &Path, shape: &Shape, layer: usize, count: u64) -> Result<()> {
    if count > 0 && !shape.is_moe(layer) {
        return Err(bad(
            file,
            format!(
                "layer {layer} is dense in the config (MoE layers: {}..) but the record routes {count} token-slots there: is the config the model that was served?",
                shape.moe_layers.first().copied().unwrap_or(0)
            ),
        ));
    }
    Ok(())
}

fn new_stats(shape: &Shape) -> RoutingStats {
    RoutingStats { num_experts: shape.experts, ..RoutingStats::default() }
}

pub(super) fn read_dumps(paths: &[&Path], shape: &Shape, options: &ImportOptions) -> Result<RoutingStats> {
    if paths.is_empty() {
        return Err(Error::Input("no SGLang dump files given".into()));
    }
    let mut stats = new_stats(shape);
    let mut mode: Option<(Mode, &Path)> = None;
    let mut seen = HashSet::new();
    let mut skipped = 0usize;
    for &path in paths {
        if path.extension().is_some_and(|e| e == "json") {
            // the JSON form SGLang's --init-expert-location also reads: {"logical_count": [[[..]]]}
            if let Some((first, p)) = mode.filter(|(m, _)| *m != Mode::Stat) {
                return Err(bad(path, format!("is a stat record but {} is a {} dump; import each mode on its own", p.display(), first.name())));
            }
            mode = Some((Mode::Stat, path));
            read_stat_json(path, shape, &mut stats)?;
            continue;
        }
        let file = PtFile::open(path)?;
        let m = mode_of(&file)?;
        match mode {
            Some((first, p)) if first != m => {
                return Err(bad(path, format!("is a {} dump but {} is a {} dump; import each mode on its own", m.name(), p.display(), first.name())))
            }
            _ => mode = Some((m, path)),
        }
        match m {
            Mode::Stat => read_stat(&file, shape, &mut stats)?,
            Mode::PerPass | Mode::PerToken => skipped += read_records(&file, m, shape, options, &mut stats, &mut seen)?,
        }
    }
    let m = mode.map_or(Mode::Stat, |(m, _)| m);
    if m != Mode::PerToken {
        stats.tokens = shape.tokens_in(&stats);
    }
    let mut source = source_of(&format!("SGLang {} dump", m.name()), paths);
    if skipped > 0 {
        source.push_str(&format!("; {skipped} records equal to one of another rank counted once"));
    }
    stats.source = Some(source);
    Ok(stats)
}

fn read_stat(file: &PtFile, shape: &Shape, stats: &mut RoutingStats) -> Result<()> {
    let t = tensor(file, file.root(), "logical_count")?;
    check_dims(file.path(), "logical_count", &t.shape, &[(shape.layers, "layers"), (shape.experts, "experts")], &[0, 1])?;
    let (l, e) = (shape.layers, shape.experts);
    let mut sum = vec![0u64; l * e];
    file.read_chunks(t, l * e, |_, row| {
        for (s, &x) in sum.iter_mut().zip(row) {
            if x < 0 {
                return Err(bad(file.path(), format!("`logical_count` holds a negative count {x}")));
            }
            *s += x as u64;
        }
        Ok(())
    })?;
    for layer in 0..l {
        let counts = &sum[layer * e..(layer + 1) * e];
        check_dense(file.path(), shape, layer, counts.iter().sum())?;
        if shape.is_moe(layer) {
            stats.add_load(layer, counts);
        }
    }
    Ok(())
}

fn read_stat_json(path: &Path, shape: &Shape, stats: &mut RoutingStats) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|cause| Error::Json { path: path.to_path_buf(), cause })?;
    let lc = v.get("logical_count").ok_or_else(|| {
        let keys: Vec<&String> = v.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        bad(path, format!("not an SGLang expert-distribution record: the keys are {keys:?}, expected `logical_count`"))
    })?;
    // [passes, layers, experts] or [layers, experts]
    let passes: Vec<&serde_json::Value> = match lc.get(0).and_then(|x| x.get(0)).map(|x| x.is_array()) {
        Some(true) => lc.as_array().map(|a| a.iter().collect()).unwrap_or_default(),
        _ => vec![lc],
    };
    let mut sum = vec![0u64; shape.layers * shape.experts];
    for (i, pass) in passes.iter().enumerate() {
        let rows = pass.as_array().filter(|r| r.len() == shape.layers).ok_or_else(|| {
            bad(path, format!("`logical_count` pass {i} has {} layers, expected {} for this config", pass.as_array().map_or(0, |r| r.len()), shape.layers))
        })?;
        for (l, row) in rows.iter().enumerate() {
            let row = row.as_array().filter(|r| r.len() == shape.experts).ok_or_else(|| {
                bad(path, format!("`logical_count` pass {i}, layer {l}: expected {} experts", shape.experts))
            })?;
            for (e, x) in row.iter().enumerate() {
                let c = x.as_u64().ok_or_else(|| bad(path, format!("`logical_count` pass {i}, layer {l}, expert {e}: {x} is not a count")))?;
                sum[l * shape.experts + e] += c;
            }
        }
    }
    for layer in 0..shape.layers {
        let counts = &sum[layer * shape.experts..(layer + 1) * shape.experts];
        check_dense(path, shape, layer, counts.iter().sum())?;
        if shape.is_moe(layer) {
            stats.add_load(layer, counts);
        }
    }
    Ok(())
}

fn hash_of(items: &[&PyValue], extra: &[i64]) -> u64 {
    let mut h = DefaultHasher::new();
    for v in items {
        format!("{v:?}").hash(&mut h);
    }
    extra.hash(&mut h);
    h.finish()
}

fn ints_of(file: &PtFile, v: Option<&PyValue>, what: &str) -> Result<Option<Vec<i64>>> {
    match v {
        None | Some(PyValue::None) => Ok(None),
        Some(PyValue::Tensor(t)) => Ok(Some(file.read_ints(t)?)),
        Some(v) => v
            .as_seq()
            .ok_or_else(|| bad(file.path(), format!("`{what}` is a {}, expected a list of ints", v.kind())))?
            .iter()
            .map(|x| x.as_int().ok_or_else(|| bad(file.path(), format!("`{what}` holds a {}", x.kind()))))
            .collect::<Result<Vec<_>>>()
            .map(Some),
    }
}

/// Reads a per_pass or per_token file; returns how many records were
/// skipped as duplicates of another rank's.
fn read_records(file: &PtFile, mode: Mode, shape: &Shape, options: &ImportOptions, stats: &mut RoutingStats, seen: &mut HashSet<u64>) -> Result<usize> {
    let root = file.root();
    let records = root.get("records").and_then(|r| r.as_seq()).unwrap_or(&[]);
    let map_t = tensor(file, root, "last_physical_to_logical_map")?;
    check_dims(file.path(), "last_physical_to_logical_map", &map_t.shape, &[(shape.layers, "layers"), (usize::MAX, "physical experts")], &[0])?;
    let physical = *map_t.shape.last().unwrap_or(&0);
    let map = PhysMap::new(file.path(), file.read_ints(map_t)?, shape.layers, physical, shape.experts)?;
    let mut skipped = 0;
    for (i, rec) in records.iter().enumerate() {
        let in_record = |e: Error| e.in_context(format!("record {i}"));
        match mode {
            Mode::PerPass => {
                let t = tensor(file, rec, "global_physical_count").map_err(in_record)?;
                check_dims(file.path(), "global_physical_count", &t.shape, &[(shape.layers, "layers"), (physical, "physical experts")], &[0]).map_err(in_record)?;
                let counts = file.read_ints(t).map_err(in_record)?;
                if !seen.insert(hash_of(&[rec.get("forward_pass_id").unwrap_or(&PyValue::None)], &counts)) {
                    skipped += 1;
                    continue;
                }
                for layer in 0..shape.layers {
                    let mut logical = vec![0u64; shape.experts];
                    for (p, &c) in counts[layer * physical..(layer + 1) * physical].iter().enumerate() {
                        if c < 0 {
                            return Err(in_record(bad(file.path(), format!("layer {layer}: negative count {c} for physical expert {p}"))));
                        }
                        if let Some(e) = map.logical(layer, p as i64) {
                            logical[e as usize] += c as u64;
                        }
                    }
                    check_dense(file.path(), shape, layer, logical.iter().sum()).map_err(in_record)?;
                    if shape.is_moe(layer) {
                        stats.add_load(layer, &logical);
                    }
                }
            }
            Mode::PerToken => {
                let t = tensor(file, rec, "topk_ids_of_layer").map_err(in_record)?;
                check_dims(file.path(), "topk_ids_of_layer", &t.shape, &[(shape.layers, "layers"), (usize::MAX, "tokens"), (usize::MAX, "slots")], &[0])
                    .map_err(in_record)?;
                let ids = ints_of(file, rec.get("input_ids"), "input_ids").map_err(in_record)?;
                let n = t.shape[1];
                if let Some(ids) = &ids {
                    if ids.len() != n {
                        return Err(in_record(bad(file.path(), format!("{} input_ids for {n} tokens of topk_ids_of_layer", ids.len()))));
                    }
                }
                let key = hash_of(
                    &[rec.get("forward_pass_id").unwrap_or(&PyValue::None), rec.get("positions").unwrap_or(&PyValue::None)],
                    ids.as_deref().unwrap_or(&[]),
                );
                if ids.is_some() && !seen.insert(key) {
                    skipped += 1;
                    continue;
                }
                read_token_record(file, t, ids.as_deref(), &map, shape, options, stats).map_err(in_record)?;
            }
            Mode::Stat => unreachable!("stat dumps have no records"),
        }
    }
    Ok(skipped)
}

/// The accumulators of one MoE layer, borrowed from the statistics so that
/// layers can be counted on different threads.
struct LayerJob<'a> {
    layer: usize,
    load: &'a mut Vec<u64>,
    co: &'a mut Vec<u64>,
    te: Option<&'a mut HashMap<i64, Vec<u32>>>,
    /// The transitions from the previous MoE layer into this one.
    trans: Option<(usize, &'a mut Vec<u64>)>,
}

/// Streams one per-token record `[layers, n, slots]`: a chunk of tokens is
/// read layer by layer (dense layers checked, physical ids mapped), then its
/// MoE layers are counted in parallel, each thread on its own layers.
fn read_token_record(
    file: &PtFile,
    t: &TensorRef,
    ids: Option<&[i64]>,
    map: &PhysMap,
    shape: &Shape,
    options: &ImportOptions,
    stats: &mut RoutingStats,
) -> Result<()> {
    let (n, slots) = (t.shape[1], t.shape[2]);
    let e = stats.num_experts;
    let chunk = options.chunk_tokens.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(shape.moe_layers.len()).max(1);
    for &l in &shape.moe_layers {
        stats.load.entry(l).or_insert_with(|| vec![0; e]);
        stats.coactivation.entry(l).or_insert_with(|| vec![0; e * e]);
        if ids.is_some() && options.token_layers.contains(&l) {
            stats.token_expert.entry(l).or_default();
        }
    }
    for pair in shape.moe_layers.windows(2) {
        stats.transitions.entry(format!("{}-{}", pair[0], pair[1])).or_insert_with(|| vec![0; e * e]);
    }
    let mut buf = Vec::new();
    let mut layers: Vec<Vec<i64>> = vec![Vec::new(); shape.layers];
    let mut start = 0;
    while start < n {
        let c = chunk.min(n - start);
        for (layer, cur) in layers.iter_mut().enumerate() {
            file.read_range(t, (layer * n + start) * slots, c * slots, &mut buf, cur)?;
            if shape.is_moe(layer) {
                map.map_choices(file.path(), layer, layer, cur)?;
            } else {
                check_dense(file.path(), shape, layer, cur.iter().filter(|&&x| x >= 0).count() as u64)?;
            }
        }
        if let Some(&first) = shape.moe_layers.first() {
            // tokens with at least one expert (padding has none)
            stats.tokens += layers[first].chunks(slots).filter(|r| r.iter().any(|&x| x >= 0)).count() as u64;
        }
        let tok = ids.map(|ids| &ids[start..start + c]);
        let mut loads: HashMap<usize, &mut Vec<u64>> = stats.load.iter_mut().map(|(k, v)| (*k, v)).collect();
        let mut cos: HashMap<usize, &mut Vec<u64>> = stats.coactivation.iter_mut().map(|(k, v)| (*k, v)).collect();
        let mut tes: HashMap<usize, &mut HashMap<i64, Vec<u32>>> = stats.token_expert.iter_mut().map(|(k, v)| (*k, v)).collect();
        let mut trs: HashMap<&str, &mut Vec<u64>> = stats.transitions.iter_mut().map(|(k, v)| (k.as_str(), v)).collect();
        let mut buckets: Vec<Vec<LayerJob>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, &l) in shape.moe_layers.iter().enumerate() {
            let prev = i.checked_sub(1).map(|j| shape.moe_layers[j]);
            let (Some(load), Some(co)) = (loads.remove(&l), cos.remove(&l)) else { continue };
            let trans = prev.and_then(|p| trs.remove(format!("{p}-{l}").as_str()).map(|t| (p, t)));
            let te = if options.token_layers.contains(&l) { tes.remove(&l) } else { None };
            buckets[i % threads].push(LayerJob { layer: l, load, co, te, trans });
        }
        let layers = &layers;
        std::thread::scope(|scope| {
            for jobs in buckets {
                scope.spawn(move || {
                    for job in jobs {
                        let cur = &layers[job.layer];
                        count_choices(job.load, job.co, job.te, cur, slots, tok, e);
                        if let Some((p, tr)) = job.trans {
                            count_transitions(tr, &layers[p], cur, slots, e);
                        }
                    }
                });
            }
        });
        start += c;
    }
    Ok(())
}

/// One request's routed experts and, when known, its token ids.
struct Routed {
    b64: String,
    ids: Option<Vec<i64>>,
    at: String,
}

fn routed_from_json(v: &serde_json::Value, at: String, out: &mut Vec<Routed>) -> std::result::Result<(), String> {
    match v {
        serde_json::Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                routed_from_json(x, format!("{at}[{i}]"), out)?;
            }
            Ok(())
        }
        serde_json::Value::Object(o) => {
            let meta = o.get("meta_info").unwrap_or(v);
            let b64 = meta
                .get("routed_experts")
                .or_else(|| o.get("sglext").and_then(|s| s.get("routed_experts")))
                .and_then(|x| x.as_str())
                .ok_or_else(|| format!("{at}: no meta_info.routed_experts (was the request sent with return_routed_experts: true?)"))?;
            let ints = |k: &str| o.get(k).and_then(|x| x.as_array()).map(|a| a.iter().filter_map(|x| x.as_i64()).collect::<Vec<i64>>());
            let ids = match (ints("input_ids"), ints("output_ids")) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                (a, _) => a,
            };
            out.push(Routed { b64: b64.to_string(), ids, at });
            Ok(())
        }
        _ => Err(format!("{at}: a {}, expected a response object", if v.is_string() { "string" } else { "value" })),
    }
}

pub(super) fn read_routed_experts(paths: &[&Path], shape: &Shape, options: &ImportOptions) -> Result<RoutingStats> {
    if paths.is_empty() {
        return Err(Error::Input("no routed-experts files given".into()));
    }
    let mut stats = new_stats(shape);
    let (l, k) = (shape.layers, shape.top_k);
    let identity = PhysMap::identity(l, shape.experts);
    let mut requests = 0;
    for &path in paths {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut items = Vec::new();
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') || trimmed.starts_with('[') {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) => routed_from_json(&v, "response".into(), &mut items).map_err(|m| bad(path, m))?,
                Err(_) => {
                    // JSON lines
                    for (i, line) in text.lines().enumerate().filter(|(_, s)| !s.trim().is_empty()) {
                        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(path, format!("line {}: not JSON: {e}", i + 1)))?;
                        routed_from_json(&v, format!("line {}", i + 1), &mut items).map_err(|m| bad(path, m))?;
                    }
                }
            }
        } else {
            for (i, line) in text.lines().enumerate().filter(|(_, s)| !s.trim().is_empty()) {
                items.push(Routed { b64: line.trim().to_string(), ids: None, at: format!("line {}", i + 1) });
            }
        }
        for r in items {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(r.b64.as_bytes())
                .map_err(|e| bad(path, format!("{}: routed_experts is not base64: {e}", r.at)))?;
            if bytes.len() % 4 != 0 || (bytes.len() / 4) % (l * k) != 0 {
                return Err(bad(
                    path,
                    format!("{}: routed_experts holds {} bytes, not a whole number of int32 [tokens, {l} layers, top-k {k}] rows for this config", r.at, bytes.len()),
                ));
            }
            let n = bytes.len() / 4 / (l * k);
            let vals: Vec<i64> = bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect();
            let ids = r.ids.as_ref().map(|ids| &ids[..ids.len().min(n)]).filter(|ids| ids.len() == n);
            let mut prev: Option<(usize, Vec<i64>)> = None;
            for &layer in &shape.moe_layers {
                let mut cur: Vec<i64> = (0..n).flat_map(|t| vals[(t * l + layer) * k..(t * l + layer) * k + k].iter().copied()).collect();
                identity.map_choices(path, layer, layer, &mut cur).map_err(|e| e.in_context(&r.at))?;
                let tok = if options.token_layers.contains(&layer) { ids } else { None };
                stats.add_choices(layer, &cur, k, tok)?;
                if let Some((pl, pv)) = &prev {
                    stats.add_transitions(*pl, layer, pv, &cur, k);
                }
                prev = Some((layer, cur));
            }
            stats.tokens += n as u64;
            requests += 1;
        }
    }
    stats.source = Some(format!("{}, {requests} requests", source_of("SGLang routed experts", paths)));
    Ok(stats)
}
