//! Real scale on small fixtures: FP8 kept FP8, weights streamed under a
//! memory budget, the expert cache, plans, device maps, synthetic
//! checkpoints, and the errors of each.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use deepscope::model::layout::Unit;
use deepscope::model::plan::{Plan, PlanOptions, Tier};
use deepscope::model::synth::{synth, SynthOptions};
use deepscope::model::{AttnImpl, Config, DeviceMap, ForwardOptions, LoadOptions, MemoryBudget, Model};
use deepscope::Error;
use tch::{Device, Kind, Tensor};

fn opts(kind: Kind) -> LoadOptions {
    LoadOptions::new(Device::Cpu, kind)
}

fn load(dir: &Path, o: LoadOptions) -> Model {
    Model::load(dir, o).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// The smallest budget the model loads with on the CPU: every matrix streams.
fn minimum_budget(dir: &Path, kind: Kind) -> u64 {
    let plan = Model::plan(dir, &opts(kind).with_budget(MemoryBudget::Unlimited)).unwrap();
    plan.minimum_budget(Device::Cpu)
}

fn topk_sets(out: &deepscope::model::ForwardOutput) -> Vec<Option<Tensor>> {
    out.routing.iter().map(|r| r.as_ref().map(|r| r.topk_indices.sort(-1, false).0)).collect()
}

#[test]
fn streaming_every_matrix_gives_the_resident_logits_and_routing() {
    for case in cases() {
        let r = reference(&case);
        let ids = &r["input_ids"];
        let resident = load(&case.dir, opts(Kind::Float).with_budget(MemoryBudget::Unlimited));
        assert!(!resident.plan.streaming() && resident.streamer.is_none(), "{}", case.name);
        let streamed = load(&case.dir, opts(Kind::Float).with_budget(MemoryBudget::Minimum));
        assert_eq!(streamed.plan.devices[0].budget, Some(minimum_budget(&case.dir, Kind::Float)));
        // the tiny budget leaves every expert and every dense layer on disk
        for (s, p) in streamed.plan.specs.iter().zip(&streamed.plan.placements) {
            if s.matrix {
                assert_eq!(p.tier, Tier::Disk, "{}: {} is {:?}", case.name, s.name, p.tier);
            }
        }
        assert_eq!(streamed.plan.devices[0].cache_capacity, 0);
        for attn in [AttnImpl::Naive, AttnImpl::Absorbed, AttnImpl::Auto] {
            let f = ForwardOptions { attn, ..Default::default() };
            let a = resident.forward_with(ids, None, f).unwrap();
            let b = streamed.forward_with(ids, None, f).unwrap();
            let d = max_abs_diff(&a.logits, &b.logits);
            assert!(d <= 1e-5, "{} {attn:?}: streamed logits differ by {d:e}", case.name);
            for (l, (x, y)) in topk_sets(&a).iter().zip(topk_sets(&b)).enumerate() {
                if let (Some(x), Some(y)) = (x, y) {
                    assert!(x.equal(&y), "{} layer {l}: different experts", case.name);
                }
            }
            assert_eq!(a.cost.traffic.disk_bytes, 0);
            let t = b.cost.traffic;
            assert!(t.disk_bytes > 0 && t.disk_reads > 0, "{}: {t:?}", case.name);
            assert!(t.expert_misses > 0 && t.expert_hits == 0, "{}: no cache, so no hits: {t:?}", case.name);
        }
    }
}

#[test]
fn fp8_kept_fp8_equals_dequantizing_at_load() {
    let case = case("v3_fp8");
    let ids = reference(&case)["input_ids"].shallow_clone();
    let kept = load(&case.dir, opts(Kind::Float));
    let expanded = load(&case.dir, LoadOptions { dequantize: true, ..opts(Kind::Float) });
    let o_proj = &kept.layers[0].self_attn.o_proj.weight;
    assert_eq!(o_proj.store_name(), "packed FP8");
    assert_eq!(expanded.layers[0].self_attn.o_proj.weight.store_name(), "ready");
    // one byte per parameter (plus scales) instead of four
    let (a, b) = (o_proj.resident_bytes(), expanded.layers[0].self_attn.o_proj.weight.resident_bytes());
    assert!(a * 3 < b, "FP8 {a} bytes vs f32 {b}");
    assert!(kept.weight_bytes() < expanded.weight_bytes());
    for attn in [AttnImpl::Naive, AttnImpl::Absorbed, AttnImpl::Auto] {
        let f = ForwardOptions { attn, ..Default::default() };
        let x = kept.forward_with(&ids, None, f).unwrap();
        let y = expanded.forward_with(&ids, None, f).unwrap();
        let d = max_abs_diff(&x.logits, &y.logits);
        assert!(d <= 1e-5, "{attn:?}: {d:e}");
        for (p, q) in topk_sets(&x).iter().zip(topk_sets(&y)) {
            if let (Some(p), Some(q)) = (p, q) {
                assert!(p.equal(&q));
            }
        }
    }
    // and the FP8 checkpoint streamed, in bf16: the same experts
    let kept16 = load(&case.dir, opts(Kind::BFloat16));
    let expanded16 = load(&case.dir, LoadOptions { dequantize: true, ..opts(Kind::BFloat16) });
    let streamed16 = load(&case.dir, opts(Kind::BFloat16).with_budget(MemoryBudget::Minimum));
    let want = topk_sets(&expanded16.forward(&ids).unwrap());
    for m in [&kept16, &streamed16] {
        for (p, q) in topk_sets(&m.forward(&ids).unwrap()).iter().zip(&want) {
            if let (Some(p), Some(q)) = (p, q) {
                assert!(p.equal(q), "bf16: different experts");
            }
        }
    }
}

#[test]
fn the_expert_cache_stays_within_its_budget_and_counts_hits_misses_and_evictions() {
    let case = case("v3_base");
    let full = Model::plan(&case.dir, &opts(Kind::Float).with_budget(MemoryBudget::Unlimited)).unwrap();
    let expert_bytes: u64 = full
        .specs
        .iter()
        .zip(&full.stored)
        .filter(|(s, _)| matches!(s.unit, Unit::Expert(..)))
        .map(|(s, st)| s.stored_bytes(*st))
        .sum();
    let dense_bytes: u64 = full
        .specs
        .iter()
        .zip(&full.stored)
        .filter(|(s, _)| s.matrix && !matches!(s.unit, Unit::Expert(..) | Unit::Embed))
        .map(|(s, st)| s.stored_bytes(*st))
        .sum();
    // room for every dense weight and a third of the experts
    let budget = full.minimum_budget(Device::Cpu) + dense_bytes + expert_bytes / 3;
    let m = load(&case.dir, opts(Kind::Float).with_budget(MemoryBudget::Bytes(budget)));
    let d = &m.plan.devices[0];
    assert!(d.streaming && d.cache_capacity > 0 && d.cache_capacity < expert_bytes, "{d:?}");
    for (s, p) in m.plan.specs.iter().zip(&m.plan.placements) {
        match s.unit {
            Unit::Expert(..) => assert!(p.tier == Tier::Disk && p.cached, "{}", s.name),
            Unit::Attention(_) | Unit::DenseMlp(_) | Unit::SharedExperts(_) | Unit::LmHead => {
                assert!(matches!(p.tier, Tier::Ready | Tier::Packed), "{} is {:?}", s.name, p.tier)
            }
            _ => {}
        }
    }
    let ids = Tensor::randint(m.config.vocab_size as i64, [2, 24], (Kind::Int64, Device::Cpu));
    let first = m.forward(&ids).unwrap().cost;
    let t = first.traffic;
    // more experts than fit: the first pass keeps what fits, evicting nothing of its own
    assert!(t.expert_misses > 0 && t.expert_evictions == 0, "{t:?}");
    let (used, cap, kept) = m.streamer.as_ref().unwrap().cache_usage(Device::Cpu);
    assert!(used <= cap && kept > 0, "cache holds {used} of {cap}");
    // the same pass again finds the weights the first one kept, less those
    // its own misses displaced (least recently used first)
    let again_all = m.forward(&ids).unwrap().cost.traffic;
    assert!(again_all.expert_hits > 0, "{again_all:?}");
    assert!(again_all.expert_hits + again_all.expert_evictions >= kept as u64, "{again_all:?}, {kept} kept");
    // other tokens: the least recently used of an earlier pass make room
    let other = Tensor::randint(m.config.vocab_size as i64, [2, 24], (Kind::Int64, Device::Cpu));
    let t2 = m.forward(&other).unwrap().cost.traffic;
    assert!(t2.expert_evictions > 0, "{t2:?}");
    // one token's experts fit: the second pass over it hits the cache
    let one = ids.narrow(0, 0, 1).narrow(1, 0, 1);
    m.forward(&one).unwrap();
    let again = m.forward(&one).unwrap().cost.traffic;
    assert!(again.expert_hits > 0 && again.expert_misses == 0, "{again:?}");
    // only the token's embedding row is read again (embeddings stay on disk when streaming)
    let row = m.config.hidden_size as u64 * 4;
    assert_eq!(again.disk_bytes, row, "every other weight of a repeated token was in memory");
    // cumulative counters are the sum of the passes
    assert!(m.traffic().expert_misses >= t.expert_misses);
    assert!(first.to_string().contains("evictions"));
    assert!(first.to_string().contains("hits"));
}

#[test]
fn budgets_too_small_or_malformed_and_missing_devices_are_clear_errors() {
    let case = case("v3_base");
    let min = minimum_budget(&case.dir, Kind::Float);
    let err = Model::load(&case.dir, opts(Kind::Float).with_budget(MemoryBudget::Bytes(min - 1))).unwrap_err();
    match &err {
        Error::BudgetTooSmall { tensor, tensor_bytes, budget, needed, device } => {
            assert!(tensor.starts_with("model."), "{tensor}");
            assert!(*tensor_bytes > 0 && *needed == min && *budget == min - 1 && device == "cpu");
        }
        other => panic!("expected BudgetTooSmall, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("too small") && msg.contains("alone takes"), "{msg}");
    for bad in ["8 gigs", "-1G", "", "0"] {
        let e = bad.parse::<MemoryBudget>().unwrap_err().to_string();
        assert!(e.contains(&format!("`{bad}`")), "{e}");
    }
    let gpus = tch::Cuda::device_count();
    let missing = format!("0-1=cpu,2-3=cuda:{}", gpus + 3);
    let map: DeviceMap = missing.parse().unwrap();
    let e = Model::load(&case.dir, LoadOptions { device_map: map, ..opts(Kind::Float) }).unwrap_err();
    assert!(matches!(e, Error::Device(..)), "got {e}");
    assert!(e.to_string().contains(&format!("cuda:{}", gpus + 3)), "{e}");
}

#[test]
fn layers_split_across_devices_give_the_same_logits() {
    let case = case("v3_base");
    let ids = reference(&case)["input_ids"].shallow_clone();
    let single = load_cpu(&case.dir);
    let n = single.layers.len();
    let map: DeviceMap = format!("0-1=cpu,2-{}=cpu", n - 1).parse().unwrap();
    let split = load(&case.dir, LoadOptions { device_map: map, ..opts(Kind::Float) });
    assert_eq!(split.plan.layer_devices, vec![Device::Cpu; n]);
    let d = max_abs_diff(&single.forward(&ids).unwrap().logits, &split.forward(&ids).unwrap().logits);
    assert_eq!(d, 0.0);
    let short: DeviceMap = "0-1=cpu".parse().unwrap();
    let e = Model::load(&case.dir, LoadOptions { device_map: short, ..opts(Kind::Float) }).unwrap_err();
    assert!(e.to_string().contains("no device for layer 2"), "{e}");
}

#[test]
fn plans_of_published_models_place_experts_last_and_count_the_real_bytes() {
    let v3 = deepscope::model::published::deepseek_v3().unwrap();
    let everything = Plan::for_config(&v3, Kind::BFloat16, &PlanOptions { memory_budget: MemoryBudget::Unlimited, kind: Kind::BFloat16, ..Default::default() }).unwrap();
    // 671B parameters, nearly all FP8: about 680 GB as published (without the MTP layer)
    let stored = everything.stored_bytes() as f64;
    let params = deepscope::stats::ParamCounts::of(&v3).total as f64;
    assert!((650e9..700e9).contains(&stored), "{stored:e}");
    assert!(stored > params && stored < 1.02 * params, "{stored:e} bytes for {params:e} parameters");
    assert!(!everything.streaming());
    let eight = Plan::for_config(&v3, Kind::BFloat16, &PlanOptions { memory_budget: "8GiB".parse().unwrap(), kind: Kind::BFloat16, ..Default::default() }).unwrap();
    let d = &eight.devices[0];
    assert!(d.streaming && d.resident + d.reserve <= 8 << 30, "{d:?}");
    assert!(eight.minimum_budget(Device::Cpu) < 8 << 30);
    for (s, p) in eight.specs.iter().zip(&eight.placements) {
        match s.unit {
            Unit::Expert(..) => assert_eq!(p.tier, Tier::Disk),
            Unit::Embed => assert_eq!(p.tier, Tier::Disk),
            Unit::Small(_) => assert_eq!(p.tier, Tier::Ready),
            _ => {}
        }
    }
    // a decoded token reads at most 8 experts per MoE layer from disk, plus the streamed dense weights
    let per = eight.traffic(1, false);
    let expert = 3 * 2048 * 7168 + 4 * 3 * 16 * 56;
    let dense_on_disk: u64 = eight
        .specs
        .iter()
        .zip(&eight.placements)
        .zip(&eight.stored)
        .filter(|((s, p), _)| p.tier == Tier::Disk && !matches!(s.unit, Unit::Expert(..) | Unit::Embed))
        .map(|((s, _), st)| s.stored_bytes(*st))
        .sum();
    let moe = v3.moe_layers().len() as u64;
    assert!(per.disk <= dense_on_disk + moe * 8 * expert as u64 + 7168 * 2, "{per:?}");
    assert!(per.disk >= dense_on_disk + moe * 7 * expert as u64, "{per:?}");
    for (name, c) in deepscope::model::published::all().unwrap() {
        let p = Plan::for_config(&c, Kind::BFloat16, &PlanOptions { memory_budget: "24GiB".parse().unwrap(), kind: Kind::BFloat16, ..Default::default() });
        assert!(p.is_ok(), "{name}: {:?}", p.err());
        assert!(p.unwrap().to_string().contains("per decoded token"), "{name}");
    }
    let k2 = deepscope::model::published::kimi_k2().unwrap();
    assert_eq!((k2.n_routed_experts, k2.n_group, k2.num_attention_heads), (384, 1, 64));
}

/// A model of a few hundred MB in the V3 layout: 1 dense + 3 MoE layers of 64 experts.
const SMALL_V3: &str = r#"{
  "model_type": "deepseek_v3", "vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 4096,
  "moe_intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
  "n_shared_experts": 1, "n_routed_experts": 64, "routed_scaling_factor": 2.5, "kv_lora_rank": 256,
  "q_lora_rank": 384, "qk_rope_head_dim": 32, "v_head_dim": 64, "qk_nope_head_dim": 64, "topk_method": "noaux_tc",
  "n_group": 8, "topk_group": 4, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "norm_topk_prob": true,
  "scoring_func": "sigmoid", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000,
  "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}
}"#;

fn small_synth(tag: &str) -> (PathBuf, Config) {
    let cfg = Config::from_json_str(SMALL_V3, "small-v3/config.json").unwrap();
    let dir = std::env::temp_dir().join(format!("deepscope-synth-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = SynthOptions { shard_bytes: 96 << 20, seed: 7, ..Default::default() };
    synth(&cfg, &dir, &opts, |_, _, _| {}).unwrap();
    (dir, cfg)
}

#[test]
fn synthetic_checkpoints_have_the_published_layout_and_load() {
    let (dir, cfg) = small_synth("layout");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let shards: std::collections::BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    assert!(shards.len() >= 3, "{shards:?}");
    let total = index["metadata"]["total_size"].as_u64().unwrap();
    let on_disk: u64 = shards.iter().map(|s| std::fs::metadata(dir.join(s)).unwrap().len()).sum();
    assert!(on_disk >= total && on_disk < total + (1 << 20) * shards.len() as u64);
    let ck = deepscope::model::loader::Checkpoint::open(&dir, Some([128, 128])).unwrap();
    let raw = ck.raw("model.layers.2.mlp.experts.5.down_proj.weight").unwrap();
    assert_eq!(raw.kind(), Kind::Float8e4m3fn);
    assert_eq!(ck.raw("model.layers.2.mlp.experts.5.down_proj.weight_scale_inv").unwrap().size(), vec![8, 4]);
    assert_eq!(ck.raw("model.embed_tokens.weight").unwrap().kind(), Kind::BFloat16);
    assert_eq!(ck.raw("model.layers.1.mlp.gate.weight").unwrap().kind(), Kind::BFloat16);
    assert_eq!(ck.raw("model.layers.1.mlp.gate.e_score_correction_bias").unwrap().kind(), Kind::Float);
    // dequantized weights have the planned spread
    let w = ck.tensor("model.layers.2.mlp.experts.5.gate_proj.weight", &[512, 1024], Kind::Float, Device::Cpu).unwrap();
    let std = w.std(true).double_value(&[]);
    assert!((std - 1024f64.powf(-0.5)).abs() < 0.2 * 1024f64.powf(-0.5), "std {std}");
    // the same seed writes the same bytes; the config reads back
    assert_eq!(Config::from_dir(&dir).unwrap().num_hidden_layers, cfg.num_hidden_layers);
    let (again, _) = small_synth("layout-again");
    let a = std::fs::read(dir.join(shards.iter().next().unwrap())).unwrap();
    let b = std::fs::read(again.join(shards.iter().next().unwrap())).unwrap();
    assert!(a == b, "same seed, different bytes");
    // the plan from the headers is the plan from the config
    let from_headers = Model::plan(&dir, &opts(Kind::Float).with_budget("128MiB".parse().unwrap())).unwrap();
    let from_config = Plan::for_config(&cfg, Kind::BFloat16, &PlanOptions { memory_budget: "128MiB".parse().unwrap(), ..Default::default() }).unwrap();
    assert_eq!(from_headers.rows(), from_config.rows());
    let m = load(&dir, opts(Kind::Float).with_budget("128MiB".parse().unwrap()));
    let ids = Tensor::randint(8192, [1, 8], (Kind::Int64, Device::Cpu));
    let out = m.forward(&ids).unwrap();
    assert!(out.logits.isfinite().all().int64_value(&[]) == 1);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&again);
}

/// Peak resident memory of a separate process, which loads the synthetic
/// model under a budget and runs a prefill and decode steps.
#[test]
fn peak_resident_memory_stays_within_the_budget_plus_the_documented_overhead() {
    let (dir, _) = small_synth("rss");
    let budget: u64 = 96 << 20;
    let out = Command::new(env!("CARGO_BIN_EXE_deepscope"))
        .args(["bench-stream", "--model"])
        .arg(&dir)
        .args(["--device", "cpu", "--memory-budget", "96MiB", "--prompt-len", "16", "--decode", "4", "--threads", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stored = j["stored_bytes"].as_u64().unwrap();
    assert!(stored > 3 * budget, "the model ({stored}) must be far larger than the budget");
    assert_eq!(j["streaming"], true);
    let base = j["baseline_rss_bytes"].as_u64().unwrap();
    let peak = j["peak_rss_bytes"].as_u64().unwrap();
    // environment.md documents this overhead: activations, the KV cache,
    // allocator slack beyond the weights the budget covers
    let overhead: u64 = 192 << 20;
    assert!(peak <= base + budget + overhead, "peak {} MiB over a baseline of {} MiB (budget 96 MiB)", (peak - base) >> 20, base >> 20);
    assert!(j["decode_expert_misses"].as_f64().unwrap() > 0.0);
    assert!(j["prefill_disk_bytes"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plans_for_gpus_offload_experts_to_host_memory_and_split_layers() {
    let v3 = deepscope::model::published::deepseek_v3().unwrap();
    let gpu = |budget: &str, host: &str, map: &str, gpus: usize| PlanOptions {
        device: Device::Cuda(0),
        kind: Kind::BFloat16,
        memory_budget: budget.parse().unwrap(),
        host_budget: host.parse().unwrap(),
        device_map: map.parse().unwrap(),
        gpus: Some(gpus),
        ..Default::default()
    };
    // one 80 GiB GPU and a host with 1 TiB: dense weights on the GPU, experts in host memory
    let one = Plan::for_config(&v3, Kind::BFloat16, &gpu("80GiB", "1TiB", "single", 1)).unwrap();
    let d = &one.devices[0];
    assert_eq!(d.device, Device::Cuda(0));
    assert!(d.streaming && d.cache_capacity > 0);
    for (s, p) in one.specs.iter().zip(&one.placements) {
        if let Unit::Expert(..) = s.unit {
            assert!(p.tier == Tier::Host && p.cached, "{} is {:?}", s.name, p.tier);
        }
    }
    let per = one.traffic(1, false);
    assert!(per.host > 0 && per.disk < per.host, "{per:?}");
    assert!(one.host_resident > 600_000_000_000, "{}", one.host_resident);
    // a host too small for every expert: the rest stays on disk
    let small_host = Plan::for_config(&v3, Kind::BFloat16, &gpu("80GiB", "256GiB", "single", 1)).unwrap();
    let tiers: std::collections::BTreeSet<String> =
        small_host.specs.iter().zip(&small_host.placements).filter(|(s, _)| matches!(s.unit, Unit::Expert(..))).map(|(_, p)| format!("{:?}", p.tier)).collect();
    assert_eq!(tiers, ["Disk", "Host"].map(String::from).into_iter().collect());
    assert!(small_host.host_resident <= 256 << 30);
    // eight GPUs, balanced: contiguous layer ranges, one budget each
    let eight = Plan::for_config(&v3, Kind::BFloat16, &gpu("140GiB", "1TiB", "balanced", 8)).unwrap();
    assert_eq!(eight.devices.len(), 8);
    assert!(eight.layer_devices.windows(2).all(|w| matches!((w[0], w[1]), (Device::Cuda(a), Device::Cuda(b)) if b == a || b == a + 1)));
    assert!(eight.devices.iter().all(|d| d.budget == Some(140 << 30) && d.resident <= 140 << 30));
    // naming a GPU beyond the count is an error, as in a load
    let e = Plan::for_config(&v3, Kind::BFloat16, &gpu("80GiB", "1TiB", "0-60=cuda:3", 2)).unwrap_err();
    assert!(matches!(e, Error::Device(..)), "{e}");
}
