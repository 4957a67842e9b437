//! Routing records of SGLang and vLLM, written by tests/gen_routing_records.py
//! with `torch.save` in the engines' own structures (DeepSeek-V3's shape, 32
//! redundant experts), read back into `RoutingStats` with exactly the totals
//! Python computed; bad files are errors that name the file and the fault;
//! EPLB plans keep their invariants and even out the GPUs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use deepscope::inspect::import::{EplbOptions, ImportOptions, PtFile, PyValue};
use deepscope::inspect::RoutingStats;
use deepscope::model::{published, Config};
use deepscope::Error;
use serde_json::Value;

fn dir() -> PathBuf {
    common::fixtures().join("records")
}

fn expected() -> Value {
    let p = dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e} (run make fixtures)", p.display()))).unwrap()
}

fn v3() -> Config {
    published::by_name("deepseek-v3").unwrap().0
}

fn files(sub: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir().join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// Tokens and the load of every MoE layer equal Python's.
fn check_load(stats: &RoutingStats, want: &Value, what: &str) {
    assert_eq!(stats.tokens, want["tokens"].as_u64().unwrap(), "{what}: tokens");
    let load: BTreeMap<usize, Vec<u64>> = want["load"].as_object().unwrap().iter().map(|(k, v)| (k.parse().unwrap(), u64s(v))).collect();
    assert_eq!(stats.load, load, "{what}: load per layer");
    assert_eq!(stats.num_experts, 256);
}

/// Co-activation, transitions and per-token counts equal Python's.
fn check_per_token(stats: &RoutingStats, want: &Value, what: &str) {
    let co = &want["coactivation"];
    let layer = co["layer"].as_u64().unwrap() as usize;
    assert_eq!(stats.coactivation[&layer], u64s(&co["counts"]), "{what}: co-activation of layer {layer}");
    let tr = &want["transitions"];
    assert_eq!(stats.transitions[tr["pair"].as_str().unwrap()], u64s(&tr["counts"]), "{what}: transitions");
    let te = &stats.token_expert[&layer];
    let want_te = want["token_expert"].as_object().unwrap();
    assert_eq!(te.len(), want_te.len(), "{what}: distinct tokens of layer {layer}");
    for (tok, counts) in want_te {
        let got: Vec<u64> = te[&tok.parse::<i64>().unwrap()].iter().map(|&x| x as u64).collect();
        assert_eq!(got, u64s(counts), "{what}: token {tok}");
    }
    // every MoE layer has counts; only the asked layer keeps tokens
    assert_eq!(stats.layers(), v3().moe_layers());
    assert_eq!(stats.token_expert.keys().copied().collect::<Vec<_>>(), vec![layer]);
}

#[test]
fn the_expected_totals_were_written_for_deepseek_v3s_shape() {
    let e = expected();
    let cfg = v3();
    assert_eq!(e["shape"]["layers"].as_u64().unwrap() as usize, cfg.num_hidden_layers);
    assert_eq!(e["shape"]["first_dense"].as_u64().unwrap() as usize, cfg.first_k_dense_replace);
    assert_eq!(e["shape"]["experts"].as_u64().unwrap() as usize, cfg.n_routed_experts);
    assert_eq!(e["shape"]["top_k"].as_u64().unwrap() as usize, cfg.num_experts_per_tok);
}

#[test]
fn sglang_per_token_dumps_of_several_ranks_give_pythons_totals() {
    let e = expected();
    let opts = ImportOptions::default().token_layers([3]);
    let stats = RoutingStats::from_sglang(&files("sglang_per_token"), &v3(), &opts).unwrap();
    check_load(&stats, &e["sglang_per_token"], "per_token");
    check_per_token(&stats, &e["sglang_per_token"], "per_token");
    let src = stats.source.clone().unwrap();
    assert!(src.contains("per_token") && src.contains("1 records equal to one of another rank counted once"), "{src}");
    // chunking does not change a count
    let small = RoutingStats::from_sglang(&files("sglang_per_token"), &v3(), &ImportOptions { chunk_tokens: 5, ..opts }).unwrap();
    assert_eq!(small, stats);
    // imported counts have no routing weights, and say so
    let err = stats.weight_mass(3).unwrap_err().to_string();
    assert!(err.contains("no routing weights") && err.contains("SGLang"), "{err}");
}

#[test]
fn sglang_per_pass_and_stat_dumps_give_pythons_load() {
    let e = expected();
    let per_pass = RoutingStats::from_sglang(&files("sglang_per_pass"), &v3(), &ImportOptions::default()).unwrap();
    check_load(&per_pass, &e["sglang_per_pass"], "per_pass");
    assert!(per_pass.coactivation.is_empty(), "per-pass counts have no per-token pairs");
    let stat = RoutingStats::from_sglang(&files("sglang_stat"), &v3(), &ImportOptions::default()).unwrap();
    check_load(&stat, &e["sglang_stat"], "stat");
    // the JSON form
    let json = RoutingStats::from_sglang(&[dir().join("sglang_stat.json")], &v3(), &ImportOptions::default()).unwrap();
    check_load(&json, &e["sglang_stat.json"], "stat JSON");
    // one dump at a time sums to the same as both together
    let mut parts = RoutingStats::default();
    for f in files("sglang_stat") {
        parts.merge(&RoutingStats::from_sglang(&[f], &v3(), &ImportOptions::default()).unwrap()).unwrap();
    }
    assert_eq!(parts.load, stat.load);
}

#[test]
fn routed_experts_in_json_json_lines_and_base64_lines_agree() {
    let e = expected();
    let opts = ImportOptions::default().token_layers([3]);
    let json = RoutingStats::from_routed_experts(&[dir().join("routed_experts.json")], &v3(), &opts).unwrap();
    check_load(&json, &e["routed_experts"], "routed experts");
    check_per_token(&json, &e["routed_experts"], "routed experts");
    // token ids shown as text by a tokenizer (the tiny model's: ids past its vocabulary show as #id)
    let tok = deepscope::model::tokenizer::Tokenizer::from_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/deepscope-tiny/tokenizer.json")).unwrap();
    let busiest = (0..256).max_by_key(|&x| json.load[&3][x]).unwrap();
    let ids = json.top_tokens(3, busiest, 5).unwrap();
    let texts = json.top_token_strings(3, busiest, 5, &tok).unwrap();
    assert_eq!(ids.len(), texts.len());
    for ((id, c, sh), (text, c2, sh2)) in ids.iter().zip(&texts) {
        assert_eq!((c, sh), (c2, sh2));
        match tok.tokens(&[*id])[0].as_ref() {
            Some(t) => assert_eq!(*text, deepscope::plot::readable_token(t)),
            None => assert_eq!(*text, format!("#{id}")),
        }
    }
    let lines = RoutingStats::from_routed_experts(&[dir().join("routed_experts.jsonl")], &v3(), &opts).unwrap();
    assert_eq!(lines.load, json.load);
    assert_eq!(lines.token_expert, json.token_expert);
    // without token ids, the same load and pairs and no per-token counts
    let b64 = RoutingStats::from_routed_experts(&[dir().join("routed_experts.b64")], &v3(), &opts).unwrap();
    assert_eq!((b64.load.clone(), b64.coactivation.clone(), b64.transitions.clone()), (json.load.clone(), json.coactivation.clone(), json.transitions.clone()));
    assert!(b64.token_expert.values().all(|m| m.is_empty()));
}

#[test]
fn vllm_eplb_state_in_torch_and_safetensors_files_gives_pythons_load() {
    let e = expected();
    let pt = RoutingStats::from_vllm(&[dir().join("vllm_state.pt")], &v3(), &ImportOptions::default()).unwrap();
    check_load(&pt, &e["vllm_state.pt"], "vllm .pt");
    let st = RoutingStats::from_vllm(&[dir().join("vllm_state.safetensors")], &v3(), &ImportOptions::default()).unwrap();
    check_load(&st, &e["vllm_state.safetensors"], "vllm .safetensors");
}

#[test]
fn the_pickle_reader_sees_the_engines_structures() {
    let f = PtFile::open(&files("sglang_per_token")[0]).unwrap();
    assert_eq!(f.root().keys(), vec!["records", "last_physical_to_logical_map"]);
    let rec = &f.root().get("records").unwrap().as_seq().unwrap()[0];
    assert_eq!(rec.get("gatherer_key"), Some(&PyValue::Str("primary".into())));
    assert_eq!(rec.get("extend_seq_lens").and_then(|v| v.as_seq()).map(|s| s.len()), Some(1));
    let t = rec.get("topk_ids_of_layer").and_then(|v| v.as_tensor()).unwrap();
    assert_eq!((t.shape[0], t.shape[2]), (61, 8));
    let map = f.root().get("last_physical_to_logical_map").and_then(|v| v.as_tensor()).unwrap();
    let m = f.read_ints(map).unwrap();
    assert_eq!(m.len(), 61 * 288);
    // every logical expert appears in every layer's map
    for row in m.chunks(288) {
        let mut seen = vec![false; 256];
        row.iter().for_each(|&x| seen[x as usize] = true);
        assert!(seen.iter().all(|&s| s));
    }
}

fn bad_record(r: deepscope::Result<RoutingStats>) -> (PathBuf, String) {
    match r {
        Err(Error::BadRecord { file, message }) => (file, message),
        Err(e) => panic!("expected BadRecord, got {e:?}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn bad_records_are_errors_that_name_the_file_and_the_fault() {
    let cfg = v3();
    let o = ImportOptions::default();
    let bad = dir().join("bad");
    let (file, m) = bad_record(RoutingStats::from_sglang(&[bad.join("truncated.pt")], &cfg, &o));
    assert_eq!(file, bad.join("truncated.pt"));
    assert!(m.contains("not a PyTorch archive"), "{m}");
    let (_, m) = bad_record(RoutingStats::from_sglang(&[bad.join("opcode.pt")], &cfg, &o));
    assert!(m.contains("unknown pickle opcode 0xff"), "{m}");
    let (_, m) = bad_record(RoutingStats::from_sglang(&[bad.join("v2_lite_shaped_stat.pt")], &cfg, &o));
    assert!(m.contains("logical_count") && m.contains("[2, 27, 64]") && m.contains("layers=61") && m.contains("experts=256"), "{m}");
    let (_, m) = bad_record(RoutingStats::from_sglang(&[bad.join("dense_layer_counts.pt")], &cfg, &o));
    assert!(m.contains("layer 0 is dense"), "{m}");
    // a file of another engine, and mixed modes
    let (_, m) = bad_record(RoutingStats::from_sglang(&[dir().join("vllm_state.pt")], &cfg, &o));
    assert!(m.contains("not an SGLang expert-distribution dump") && m.contains("expert_load_window"), "{m}");
    let mixed = [files("sglang_stat")[0].clone(), files("sglang_per_token")[0].clone()];
    let (file, m) = bad_record(RoutingStats::from_sglang(&mixed, &cfg, &o));
    assert_eq!(file, mixed[1]);
    assert!(m.contains("per_token") && m.contains("stat"), "{m}");
    let (_, m) = bad_record(RoutingStats::from_vllm(&files("sglang_stat")[..1], &cfg, &o));
    assert!(m.contains("not a vLLM EPLB state"), "{m}");
    // the right file for another model
    let (lite, _) = published::by_name("deepseek-v2-lite").unwrap();
    let (_, m) = bad_record(RoutingStats::from_vllm(&[dir().join("vllm_state.pt")], &lite, &o));
    assert!(m.contains("physical_to_logical_map") && m.contains("MoE layers=26"), "{m}");
    let (_, m) = bad_record(RoutingStats::from_routed_experts(&[dir().join("routed_experts.json")], &lite, &o));
    assert!(m.contains("not a whole number of int32"), "{m}");
    // a response without routed experts, and a missing file
    let scratch = std::env::temp_dir().join(format!("deepscope-import-{}.json", std::process::id()));
    std::fs::write(&scratch, r#"{"text": "hi", "meta_info": {"id": "x"}}"#).unwrap();
    let (_, m) = bad_record(RoutingStats::from_routed_experts(&[&scratch], &cfg, &o));
    let _ = std::fs::remove_file(&scratch);
    assert!(m.contains("return_routed_experts"), "{m}");
    assert!(matches!(RoutingStats::from_sglang(&[Path::new("/nonexistent/dump.pt")], &cfg, &o), Err(Error::Io { .. })));
}

#[test]
fn eplb_plans_place_every_expert_and_even_out_the_gpus() {
    let stats = RoutingStats::from_sglang(&files("sglang_per_token"), &v3(), &ImportOptions::default()).unwrap();
    // DeepSeek-V3's prefill deployment: 4 nodes x 8 GPUs, 8 groups, 32 redundant experts
    let plan = stats.eplb(EplbOptions::new(32).nodes(4).groups(8).redundant(32)).unwrap();
    assert!(plan.hierarchical);
    assert_eq!(plan.layers.len(), 58);
    for (l, p) in &plan.layers {
        assert_eq!(p.phy2log.len(), 288);
        assert_eq!(p.count.iter().sum::<usize>(), 288, "layer {l}");
        assert!(p.count.iter().all(|&c| c >= 1), "layer {l}: every expert is placed");
        for e in 0..256 {
            let slots = p.slots_of(e);
            assert_eq!(slots.len(), p.count[e]);
            assert_eq!(slots.iter().map(|&q| p.replica[q]).collect::<Vec<_>>(), (0..p.count[e]).collect::<Vec<_>>());
        }
        // hierarchical: an expert's replicas stay on the node of its group
        for e in 0..256 {
            let nodes: std::collections::BTreeSet<usize> = p.slots_of(e).iter().map(|&q| q / 72).collect();
            assert_eq!(nodes.len(), 1, "layer {l}: expert {e} spans nodes");
        }
        let total: f64 = stats.load[l].iter().sum::<u64>() as f64;
        assert!((p.gpu_load.iter().sum::<f64>() - total).abs() < 1e-6 * total.max(1.0), "load is conserved");
        assert!(p.balance() <= p.balance_static() + 1e-9, "layer {l}: the plan is no worse than the static placement");
    }
    assert!(plan.mean_balance() < plan.mean_balance_static());
    // the global policy when the groups do not split over the nodes
    assert!(!stats.eplb(EplbOptions::new(6).nodes(3).groups(8).redundant(8)).unwrap().hierarchical);
    // a plan that cannot be made
    let err = stats.eplb(EplbOptions::new(7)).unwrap_err().to_string();
    assert!(err.contains("256 experts + 0 redundant = 256 do not split evenly over 7 GPUs"), "{err}");
    // a typo of a few digits is refused at once rather than planned for hours
    let err = stats.eplb(EplbOptions::new(1).redundant(99_999_999)).unwrap_err().to_string();
    assert!(err.contains("99999999 redundant experts is more than 7 per expert"), "{err}");
    assert!(stats.eplb(EplbOptions::new(8).redundant(7 * 256)).is_ok(), "up to 8 physical experts per logical one");
    let text = plan.to_string();
    assert!(text.contains("hierarchical") && text.contains("busiest GPU / mean"), "{text}");
}

#[test]
fn eplb_plans_equal_sglangs_own_implementation() {
    let e = expected();
    let cases = e["eplb"].as_array().expect("expected.json has the EPLB reference (make fixtures passes --sglang-wheel)");
    assert!(!cases.is_empty());
    let stats = RoutingStats::from_sglang(&files("sglang_per_token"), &v3(), &ImportOptions::default()).unwrap();
    let moe = v3().moe_layers();
    for c in cases {
        let n = |k: &str| c[k].as_u64().unwrap() as usize;
        let opts = EplbOptions::new(n("gpus")).nodes(n("nodes")).groups(n("groups")).redundant(n("redundant"));
        let plan = stats.eplb(opts).unwrap();
        for (i, l) in moe.iter().enumerate() {
            let p = &plan.layers[l];
            let count: Vec<usize> = c["count"][i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            assert_eq!(p.count, count, "{opts:?}, layer {l}: replicas per expert");
            let want: Vec<f64> = c["gpu_load"][i].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            for (g, (a, b)) in p.gpu_load.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{opts:?}, layer {l}, GPU {g}: load {a} vs SGLang's {b}");
            }
        }
    }
}

#[test]
fn imported_statistics_and_plans_draw_like_a_local_run() {
    use deepscope::plot::MimeType;
    let stats = RoutingStats::from_sglang(&files("sglang_per_token"), &v3(), &ImportOptions::default()).unwrap();
    // 58 layers x 256 experts: a heatmap of load over the layer mean, not 14,848 bars
    let fig = stats.load_figure().unwrap();
    assert!(fig.to_svg().contains("load / mean") && fig.to_svg().contains("layer 60"));
    let html = stats.mime_bundle().get(MimeType::TextHtml).unwrap().to_string();
    // as a PNG: its SVG, with 14,848 cells, would be megabytes in the notebook
    assert!(html.contains("data:image/png;base64,") && html.contains("Load imbalance"), "the bundle holds the chart and the table");
    assert!(html.len() < 400_000, "{} bytes", html.len());
    let plan = stats.eplb(EplbOptions::new(32).nodes(4).groups(8).redundant(32)).unwrap();
    let b = plan.mime_bundle();
    assert!(b.get(MimeType::TextPlain).unwrap().contains("EPLB plan"));
    let html = b.get(MimeType::TextHtml).unwrap();
    assert!(html.contains("static placement") && html.contains("EPLB plan") && html.contains("experts replicated"), "chart and table");
    let layer = plan.layer_figure(3).unwrap();
    assert!(layer.to_svg().contains("GPU 31"));
    assert!(plan.layer_figure(0).is_err(), "layer 0 is dense: no plan");
}
