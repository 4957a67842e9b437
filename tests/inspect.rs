//! Inspection: traces record what the model used, interventions change
//! exactly what they claim, statistics add up, bad input is refused clearly.

mod common;

use common::*;
use deepscope::inspect::{compare, ActStats, Capture, Interventions, RoutingStats};
use deepscope::model::{ForwardOptions, HookPoint, Model, RouterInput};
use tch::{Device, Kind, Tensor};

fn model() -> Model {
    load_cpu(&case("v3_base").dir)
}

fn ids(n: i64, seed: i64) -> Vec<i64> {
    tch::manual_seed(seed);
    Vec::<i64>::try_from(Tensor::randint(128, [n], (Kind::Int64, Device::Cpu))).unwrap()
}

#[test]
fn hook_point_names_round_trip() {
    use HookPoint::*;
    let points = [
        Embed, ResidPre(2), AttnIn(1), QLatent(1), CKv(0), KPe(3), QPe(1), Pattern(2), HeadOut(1), AttnOut(0), ResidMid(1),
        MlpIn(2), RouterLogits(1), RouterScores(1), ChosenGroups(2), TopkIndices(1), TopkWeights(2), ExpertOut(1, 7),
        SharedOut(2), MlpOut(1), ResidPost(0), FinalNorm, Logits,
    ];
    for p in points {
        let name = p.to_string();
        assert_eq!(name.parse::<HookPoint>().unwrap(), p, "{name}");
    }
    assert_eq!(TopkIndices(3).to_string(), "blocks.3.mlp.hook_topk_indices");
    assert!("blocks.x.mlp.hook_in".parse::<HookPoint>().is_err());
    assert!("blocks.1.mlp.hook_nothing".parse::<HookPoint>().is_err());
}

#[test]
fn routing_captures_equal_what_the_model_used() {
    let m = model();
    let x = ids(20, 1);
    let plain = m.forward_with(&Tensor::from_slice(&x).unsqueeze(0), None, ForwardOptions::default()).unwrap();
    let t = m.trace(x.clone()).unwrap();
    assert!(max_abs_diff(&t.logits, &plain.logits) <= 1e-4, "tracing changed the logits");
    for l in m.config.moe_layers() {
        let used = plain.routing[l].as_ref().unwrap();
        let rec = t.routing_of(l).unwrap();
        assert!(rec.topk_indices.equal(&used.topk_indices), "layer {l}");
        assert!(rec.topk_weights.allclose(&used.topk_weights, 1e-6, 1e-6, false));
        let step = t.router_step(l, 5).unwrap();
        assert_eq!(step.experts, Vec::<i64>::try_from(rec.topk_indices.get(5)).unwrap());
        assert!(step.margin >= 0.0, "margin {}", step.margin);
    }
    assert!(t.patterns.iter().all(|p| p.is_some()));
    assert!(t.stats.contains_key(&HookPoint::ResidPost(0)));
}

#[test]
fn counterfactual_top_k_equals_a_run_with_the_bias_zeroed() {
    let m = model();
    let x = ids(40, 2);
    let t = m.trace(x.clone()).unwrap();
    let mut changed_any = false;
    for l in m.config.moe_layers() {
        // zero the bias of this layer only: everything upstream stays as it was
        let zeroed = m.trace_with(x.clone(), &Capture::default(), &Interventions::new().zero_bias(l)).unwrap();
        let cf = t.routing_of(l).unwrap().topk_without_bias.as_ref().expect("V3 router has a bias");
        assert!(cf.equal(&zeroed.routing_of(l).unwrap().topk_indices), "layer {l}");
        changed_any |= !cf.equal(&t.routing_of(l).unwrap().topk_indices);
        for pos in 0..40 {
            let s = t.router_step(l, pos).unwrap();
            let mut a = s.experts.clone();
            let mut b = s.experts_without_bias.clone().unwrap();
            a.sort();
            b.sort();
            assert_eq!(s.bias_changed_choice, a != b);
        }
    }
    assert!(changed_any, "the fixture's non-zero bias should change some choice");
}

#[test]
fn banned_experts_get_no_load_and_forced_experts_are_always_chosen() {
    let m = model();
    let x = ids(30, 3);
    let layer = m.config.moe_layers()[0];
    let banned = m.trace_with(x.clone(), &Capture::default(), &Interventions::new().ban_experts(layer, &[0, 5])).unwrap();
    let load = banned.routing_of(layer).unwrap().load().unwrap();
    assert_eq!((load[0], load[5]), (0, 0), "load {load:?}");
    let forced = m.trace_with(x.clone(), &Capture::default(), &Interventions::new().force_experts(layer, &[3])).unwrap();
    let rows = Vec::<Vec<i64>>::try_from(&forced.routing_of(layer).unwrap().topk_indices).unwrap();
    assert!(rows.iter().all(|r| r.contains(&3)));
    // the layer's other choices are the unbanned ranking: chosen weights stay positive
    assert!(banned.routing_of(layer).unwrap().topk_weights.min().double_value(&[]) > 0.0);
}

#[test]
fn forced_experts_win_even_outside_the_kept_groups() {
    let m = model(); // 8 experts in 4 groups, 2 groups kept, top-2
    let layer = m.config.moe_layers()[0];
    let t = m.trace_with(ids(30, 15), &Capture::default(), &Interventions::new().force_experts(layer, &[0, 6]).force_experts(deepscope::inspect::Layers::All, &[0])).unwrap();
    let rows = Vec::<Vec<i64>>::try_from(&t.routing_of(layer).unwrap().topk_indices).unwrap();
    assert!(rows.iter().all(|r| r.contains(&0) && r.contains(&6)), "{rows:?}");
    // the scores can be replaced: the choice is made on the patched ones
    let scores = Tensor::zeros([4, 8], (Kind::Float, Device::Cpu)).index_fill(1, &Tensor::from_slice(&[4i64, 5]), 1.0);
    let p = m.trace_with(ids(4, 15), &Capture::default(), &Interventions::new().patch(HookPoint::RouterScores(layer), &scores)).unwrap();
    let rows = Vec::<Vec<i64>>::try_from(&p.routing_of(layer).unwrap().topk_indices.sort(1, false).0).unwrap();
    assert_eq!(rows, vec![vec![4, 5]; 4]);
    // the kept groups cannot: the choice is made before they are visited
    let err = m.trace_with(ids(4, 15), &Capture::default(), &Interventions::new().patch(HookPoint::ChosenGroups(layer), &Tensor::zeros([4, 2], (Kind::Int64, Device::Cpu)))).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}

#[test]
fn top_k_and_custom_routers_change_the_routing_as_asked() {
    let m = model();
    let x = ids(16, 4);
    let layer = m.config.moe_layers()[0];
    let t = m.trace_with(x.clone(), &Capture::default(), &Interventions::new().top_k(layer, 3)).unwrap();
    assert_eq!(t.routing_of(layer).unwrap().topk_indices.size()[1], 3);
    // a user-written router: always experts 6 and 7, equal weights
    let router = |input: &RouterInput| -> deepscope::Result<(Tensor, Tensor)> {
        let n = input.logits.size()[0];
        let idx = Tensor::from_slice(&[6i64, 7]).unsqueeze(0).expand([n, 2], false).contiguous();
        Ok((idx, Tensor::full([n, 2], 0.5, (Kind::Float, Device::Cpu))))
    };
    let c = m.trace_with(x, &Capture::default(), &Interventions::new().router(layer, router)).unwrap();
    let load = c.routing_of(layer).unwrap().load().unwrap();
    assert_eq!(load.iter().sum::<i64>(), load[6] + load[7]);
    assert_eq!(load[6], 16);
}

#[test]
fn patching_a_run_into_itself_changes_nothing() {
    let m = model();
    let x = ids(12, 5);
    for point in [HookPoint::ResidMid(1), HookPoint::CKv(2), HookPoint::TopkWeights(1), HookPoint::Pattern(0)] {
        let t = m.trace_with(x.clone(), &Capture::default().with(point), &Interventions::new()).unwrap();
        let patched = m
            .trace_with(x.clone(), &Capture::default(), &Interventions::new().patch(point, t.tensor(point).unwrap()))
            .unwrap();
        assert!(max_abs_diff(&t.logits, &patched.logits) <= 1e-5, "{point}");
    }
}

#[test]
fn patching_from_another_run_moves_the_output_toward_it() {
    let m = model();
    let (a, b) = (ids(12, 6), ids(12, 7));
    let point = HookPoint::ResidPost(2);
    let tb = m.trace_with(b, &Capture::default().with(point), &Interventions::new()).unwrap();
    let patched = m.trace_with(a, &Capture::default(), &Interventions::new().patch(point, tb.tensor(point).unwrap())).unwrap();
    // the last layer's residual fully determines the logits
    assert!(max_abs_diff(&patched.logits, &tb.logits) <= 1e-4);
}

#[test]
fn head_ablation_and_latent_truncation_do_what_they_say() {
    let m = model();
    let x = ids(10, 8);
    let h = m.config.num_attention_heads;
    let all: Vec<usize> = (0..h).collect();
    let t = m
        .trace_with(x.clone(), &Capture::default().with(HookPoint::AttnOut(1)).with(HookPoint::HeadOut(1)), &Interventions::new().ablate_heads(1, &all))
        .unwrap();
    assert_eq!(t.tensor(HookPoint::AttnOut(1)).unwrap().abs().max().double_value(&[]), 0.0);
    let one = m.trace_with(x.clone(), &Capture::default().with(HookPoint::HeadOut(1)), &Interventions::new().ablate_heads(1, &[1])).unwrap();
    let z = one.tensor(HookPoint::HeadOut(1)).unwrap(); // [B, T, H, v]
    assert_eq!(z.select(2, 1).abs().max().double_value(&[]), 0.0);
    assert!(z.select(2, 0).abs().max().double_value(&[]) > 0.0);

    let base = m.trace(x.clone()).unwrap();
    let full = m.trace_with(x.clone(), &Capture::default(), &Interventions::new().truncate_latent(deepscope::inspect::Layers::All, m.config.kv_lora_rank)).unwrap();
    assert!(max_abs_diff(&full.logits, &base.logits) <= 1e-4, "full rank must change nothing");
    let zero = m
        .trace_with(x, &Capture::default().with(HookPoint::CKv(1)), &Interventions::new().truncate_latent(1, 0))
        .unwrap();
    assert_eq!(zero.tensor(HookPoint::CKv(1)).unwrap().abs().max().double_value(&[]), 0.0);
}

#[test]
fn activation_statistics_equal_a_direct_computation() {
    let m = model();
    let p = HookPoint::MlpOut(1);
    let capture = Capture { module_stats: true, ..Capture::default() }.with(p);
    let t = m.trace_with(ids(20, 9), &capture, &Interventions::new()).unwrap();
    assert!(m.trace(ids(20, 9)).unwrap().stats.keys().all(|p| matches!(p, HookPoint::Embed | HookPoint::ResidPost(_))));
    let direct = ActStats::of(t.tensor(p).unwrap()).unwrap();
    assert_eq!(t.stats[&p], direct);
    let v = t.tensor(p).unwrap().to_kind(Kind::Double);
    let std = (&v - v.mean(Kind::Double)).square().mean(Kind::Double).sqrt().double_value(&[]);
    assert!((direct.mean - v.mean(Kind::Double).double_value(&[])).abs() < 1e-5 * std);
    assert!((direct.std - std).abs() < 1e-5 * std);
    assert!((direct.max_abs - v.abs().max().double_value(&[])).abs() < 1e-6 * direct.max_abs);
    let rms = v.square().mean(Kind::Double).sqrt().double_value(&[]);
    assert!((direct.rms - rms).abs() < 1e-5 * rms);
}

#[test]
fn corpus_statistics_equal_the_sum_of_their_parts() {
    let m = model();
    let traces: Vec<_> = (0..4).map(|s| m.trace_with(ids(25, 10 + s), &Capture::routing_only(), &Interventions::new()).unwrap()).collect();
    let mut all = RoutingStats::default();
    let (mut a, mut b) = (RoutingStats::default(), RoutingStats::default());
    for (i, t) in traces.iter().enumerate() {
        all.add(t).unwrap();
        if i < 2 { a.add(t).unwrap() } else { b.add(t).unwrap() }
    }
    // counts and the fixed-point weight mass are exact integers, so every
    // grouping and order of the same traces gives identical statistics
    let mut b_then_a = b.clone();
    b_then_a.merge(&a).unwrap();
    a.merge(&b).unwrap();
    assert_eq!(a, all);
    assert_eq!(b_then_a, all);
    let mut reversed = RoutingStats::default();
    traces.iter().rev().for_each(|t| reversed.add(t).unwrap());
    assert_eq!(reversed, all);
    // the mass is the sum of the routing weights (f64 accumulation, tolerance 1e-12 relative)
    let layer0 = m.config.moe_layers()[0];
    let mut direct_mass = vec![0f64; all.num_experts];
    for t in &traces {
        let r = t.routing_of(layer0).unwrap();
        let idx = Vec::<Vec<i64>>::try_from(&r.topk_indices).unwrap();
        let w = Vec::<Vec<f32>>::try_from(&r.topk_weights).unwrap();
        for (row, ws) in idx.iter().zip(&w) {
            row.iter().zip(ws).for_each(|(&e, &x)| direct_mass[e as usize] += x as f64);
        }
    }
    for (got, want) in all.weight_mass(layer0).unwrap().iter().zip(&direct_mass) {
        assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "mass {got} vs {want}");
    }
    let layer = m.config.moe_layers()[0];
    let direct: i64 = traces.iter().map(|t| t.routing_of(layer).unwrap().load().unwrap()[2]).sum();
    assert_eq!(all.load[&layer][2] as i64, direct);
    assert_eq!(all.tokens, 100);
    let imb = all.imbalance(layer).unwrap();
    assert!(imb.max_over_mean >= 1.0 && imb.normalized_entropy <= 1.0 + 1e-12);
    let co = all.coactivation(layer).unwrap();
    assert!(co.iter().enumerate().all(|(i, r)| r[i] == 1.0 || all.load[&layer][i] == 0));
    let agreement = all.layer_agreement(m.config.moe_layers()[0], m.config.moe_layers()[1]).unwrap();
    assert!((0.0..=1.0).contains(&agreement));
    let path = Scratch::temp("deepscope-stats", ".json");
    all.save(&path).unwrap();
    assert_eq!(RoutingStats::load_from(&path).unwrap(), all);
}

#[test]
fn bias_replay_evens_out_the_load() {
    let m = model();
    let layer = m.config.moe_layers()[0];
    let t = m.trace_with(ids(400, 11), &Capture::routing_only(), &Interventions::new()).unwrap();
    let replay = m.replay_bias_balancing(&t, layer, 0.02, 200).unwrap();
    let first = replay.max_over_mean[0];
    let tail: f64 = replay.max_over_mean[180..].iter().sum::<f64>() / 20.0;
    assert!(tail < first, "max/mean {first} -> {tail}");
    // the range of the last steps brackets every one of them, and the display names it when it moves
    let (lo, hi) = replay.settled_range(20);
    assert!(replay.max_over_mean[180..].iter().all(|&v| lo <= v && v <= hi));
    assert_eq!(replay.to_string().contains("the last 20 steps move between"), hi > lo);
}

#[test]
fn compare_sees_no_change_in_a_rerun_and_a_change_after_a_ban() {
    let m = model();
    let x = ids(15, 12);
    let a = m.trace(x.clone()).unwrap();
    let same = compare(&a, &m.trace(x.clone()).unwrap()).unwrap();
    assert!(same.mean_kl < 1e-9 && same.top1_agreement == 1.0);
    assert!(same.routing.values().all(|r| r.changed_fraction == 0.0));
    let layer = m.config.moe_layers()[0];
    let top: Vec<usize> = {
        let load = a.routing_of(layer).unwrap().load().unwrap();
        let mut idx: Vec<usize> = (0..load.len()).collect();
        idx.sort_by_key(|&i| -load[i]);
        idx[..2].to_vec()
    };
    let b = m.trace_with(x, &Capture::default(), &Interventions::new().ban_experts(layer, &top)).unwrap();
    let c = compare(&a, &b).unwrap();
    assert!(c.mean_kl > 0.0);
    assert!(c.routing[&layer].changed_fraction > 0.0);
}

#[test]
fn traces_export_to_safetensors_and_json() {
    let m = model();
    let t = m.trace_with(ids(8, 13), &Capture::default().with(HookPoint::CKv(1)), &Interventions::new()).unwrap();
    let path = Scratch::temp("deepscope-trace", ".safetensors");
    t.save_safetensors(&path).unwrap();
    let back: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path).unwrap().into_iter().collect();
    for key in ["input_ids", "hook_logits", "blocks.1.mlp.hook_topk_indices", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_c_kv"] {
        assert!(back.contains_key(key), "{key} missing");
    }
    assert!(back["blocks.1.attn.hook_c_kv"].equal(t.tensor(HookPoint::CKv(1)).unwrap()));
    let arr = deepscope::inspect::to_ndarray(&t.routing_of(1).unwrap().topk_weights).unwrap();
    assert_eq!(arr.shape(), &[8, 2]);
    let json = t.to_json().unwrap();
    assert_eq!(json["routing"]["1"]["topk_indices"].as_array().unwrap().len(), 8);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let m = model();
    let x = ids(6, 14);
    let run = |iv: Interventions| m.trace_with(x.clone(), &Capture::default(), &iv).unwrap_err().to_string();
    assert!(run(Interventions::new().ban_experts(9, &[0])).contains("layer 9 out of range"));
    assert!(run(Interventions::new().ban_experts(1, &[8])).contains("expert 8 out of range"));
    assert!(run(Interventions::new().ban_experts(0, &[1])).contains("dense layer"));
    assert!(run(Interventions::new().force_experts(1, &[1, 2, 3])).contains("forced"));
    assert!(run(Interventions::new().truncate_latent(1, 10_000)).contains("kv_lora_rank"));
    assert!(run(Interventions::new().ablate_heads(1, &[99])).contains("head 99"));
    let wrong = Tensor::zeros([1, 2, 3], (Kind::Float, Device::Cpu));
    assert!(run(Interventions::new().patch(HookPoint::ResidMid(1), &wrong)).contains("shape"));
    let t = m.trace(x.clone()).unwrap();
    assert!(t.router_step(0, 0).unwrap_err().to_string().contains("dense layer"));
    assert!(t.router_step(7, 0).unwrap_err().to_string().contains("out of range"));
    assert!(t.router_step(1, 99).unwrap_err().to_string().contains("out of range"));
    // out-of-range indices are a variant callers can match, naming what and how many
    use deepscope::{Error, IndexKind};
    let err = |iv: Interventions| m.trace_with(x.clone(), &Capture::default(), &iv).unwrap_err();
    assert!(matches!(t.router_step(7, 0).unwrap_err(), Error::OutOfRange { kind: IndexKind::Layer, index: 7, len: 3, .. }));
    assert!(matches!(t.router_step(1, 99).unwrap_err(), Error::OutOfRange { kind: IndexKind::Position, index: 99, len: 6, .. }));
    assert!(matches!(err(Interventions::new().ban_experts(1, &[8])), Error::OutOfRange { kind: IndexKind::Expert, index: 8, len: 8, .. }));
    assert!(matches!(err(Interventions::new().ablate_heads(1, &[99])), Error::OutOfRange { kind: IndexKind::Head, index: 99, .. }));
    assert!(matches!(err(Interventions::new().hook("blocks.7.hook_resid_post", |_c, v| Ok(v))), Error::OutOfRange { kind: IndexKind::Layer, index: 7, .. }));
    assert!(matches!(err(Interventions::new().patch(HookPoint::ResidMid(1), &wrong)), Error::HookShape { .. }));
    assert!(m.latent_spectra(9).is_err_and(|e| matches!(e, Error::OutOfRange { kind: IndexKind::Layer, .. })));
    assert!(t.tensor(HookPoint::CKv(1)).unwrap_err().to_string().contains("was not captured"));
    assert!(m.trace("").unwrap_err().to_string().contains("empty"));
    assert!(m.trace(Vec::<i64>::new()).unwrap_err().to_string().contains("empty"));
    assert!(m.trace(vec![1, 500]).unwrap_err().to_string().contains("token id 500"));
    assert!(m.trace_with(x, &Capture::default().with(HookPoint::TopkIndices(0)), &Interventions::new()).unwrap_err().to_string().contains("dense"));
}

#[test]
fn router_steps_name_the_experts_their_group_left_out() {
    let m = model(); // 8 experts in 4 groups of 2, 2 groups kept, top-2
    let t = m.trace(ids(40, 21)).unwrap();
    let mut seen = 0;
    for p in 0..40 {
        let s = t.router_step(1, p).unwrap();
        let kept = s.chosen_groups.clone().unwrap();
        let kth = s.experts.iter().map(|&x| s.choice[x as usize]).fold(f32::INFINITY, f32::min);
        let want: Vec<i64> = (0..8).filter(|&x| !kept.contains(&(x / 2)) && s.choice[x as usize] > kth).collect();
        assert_eq!(s.outranked_by_group, want, "token {p}");
        seen += want.len();
        if !want.is_empty() {
            assert!(s.to_string().contains("their group was not kept"));
        }
    }
    assert!(seen > 0, "over 40 random tokens some expert should lose with its group");
}
