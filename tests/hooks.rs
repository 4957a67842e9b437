//! Hooks that run user code, hook-point patterns, and interventions during
//! generation: a hook does exactly what its closure says, stacks in order,
//! is checked for shape and dtype, and gives the same result over the cache
//! as in one pass over the whole sequence.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use deepscope::inspect::{Capture, HookCtx, Interventions, Points};
use deepscope::model::{GenerateOptions, HookPoint, Model};
use deepscope::Error;
use tch::{Device, Kind, Tensor};

fn model() -> Model {
    load_cpu(&case("v3_base").dir)
}

fn ids(n: i64, seed: i64) -> Vec<i64> {
    tch::manual_seed(seed);
    Vec::<i64>::try_from(Tensor::randint(128, [n], (Kind::Int64, Device::Cpu))).unwrap()
}

fn greedy(m: &Model, n: usize) -> GenerateOptions {
    let mut o = GenerateOptions::greedy(m, n);
    o.stop_tokens.clear();
    o
}

#[test]
fn an_identity_hook_everywhere_changes_nothing_and_sees_every_writable_point() {
    let m = model();
    let x = ids(12, 1);
    let base = m.trace(x.clone()).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let iv = Interventions::new().hook("*", move |ctx: &HookCtx, v| {
        log.lock().unwrap().push(ctx.point);
        Ok(v)
    });
    let t = m.trace_with(x, &Capture::default(), &iv).unwrap();
    assert_eq!(max_abs_diff(&t.logits, &base.logits), 0.0);
    let seen = seen.lock().unwrap().clone();
    let writable: Vec<HookPoint> = m.hook_points().into_iter().filter(|p| !p.is_read_only()).collect();
    // visited once each, in the order of the pass
    assert_eq!(seen, writable);
    assert!(seen.contains(&HookPoint::RouterLogits(1)) && seen.contains(&HookPoint::Pattern(2)));
    assert!(!seen.iter().any(|p| p.is_read_only()));
}

#[test]
fn a_hook_equals_patching_in_what_it_computes() {
    let m = model();
    let x = ids(10, 2);
    let point = HookPoint::CKv(2);
    let t = m.trace_with(x.clone(), &Capture::default().with(point), &Interventions::new()).unwrap();
    let halved = t.tensor(point).unwrap() * 0.5;
    let patched = m.trace_with(x.clone(), &Capture::default(), &Interventions::new().patch(point, &halved)).unwrap();
    let hooked = m
        .trace_with(x, &Capture::default().with(point), &Interventions::new().hook("blocks.2.attn.hook_c_kv", |_ctx, v| Ok(v * 0.5)))
        .unwrap();
    assert!(max_abs_diff(&hooked.logits, &patched.logits) <= 1e-6);
    assert!(max_abs_diff(hooked.tensor(point).unwrap(), &halved) <= 1e-7, "the capture records the value after the hook");
    assert!(max_abs_diff(&hooked.logits, &t.logits) > 1e-3, "halving c_kv must change the logits");
}

#[test]
fn hooks_stack_in_list_order() {
    let m = model();
    let x = ids(8, 3);
    let p = HookPoint::ResidMid(1);
    let plain = m.trace_with(x.clone(), &Capture::default().with(p), &Interventions::new()).unwrap();
    let v0 = plain.tensor(p).unwrap();
    let add_then_double = Interventions::new().hook(p, |_c, v| Ok(v + 1.0)).hook(p, |_c, v| Ok(v * 2.0));
    let double_then_add = Interventions::new().hook(p, |_c, v| Ok(v * 2.0)).hook(p, |_c, v| Ok(v + 1.0));
    let a = m.trace_with(x.clone(), &Capture::default().with(p), &add_then_double).unwrap();
    let b = m.trace_with(x, &Capture::default().with(p), &double_then_add).unwrap();
    assert!(max_abs_diff(a.tensor(p).unwrap(), &((v0 + 1.0) * 2.0)) <= 1e-5);
    assert!(max_abs_diff(b.tensor(p).unwrap(), &(v0 * 2.0 + 1.0)) <= 1e-5);
}

#[test]
fn a_hook_on_the_router_logits_changes_the_choice() {
    let m = model();
    let x = ids(16, 4);
    // -50 on the logits of every expert but 2 and 3 (group 1 of 4) and +50
    // on those two: sigmoid scores of 0 against 1. The bias only adds to the
    // choice score, and this fixture's bias spans less than 1, so 2 and 3 win
    // on every token. (With 2 and 3 left as they were, a token whose score
    // for expert 2 is under the bias gap to expert 0 would pick 0, and which
    // tokens those are depends on the last bits of the matmuls.)
    let plain = m.trace(ids(16, 4)).unwrap();
    let bias = plain.routing_of(1).unwrap().bias.as_ref().expect("layer 1 of v3_base has a correction bias").shallow_clone();
    let spread = (bias.max() - bias.min()).double_value(&[]);
    assert!(spread < 1.0, "the fixture's bias spread {spread} is under the score gap the hook makes");
    let iv = Interventions::new().hook("blocks.1.mlp.hook_router_logits", |_c, logits| {
        let bump = Tensor::full([logits.size()[1]], -50.0, (Kind::Float, logits.device())).index_fill(0, &Tensor::from_slice(&[2i64, 3]), 50.0);
        Ok(logits + bump)
    });
    let t = m.trace_with(x, &Capture::default(), &iv).unwrap();
    let r = t.routing_of(1).unwrap();
    let rows = Vec::<Vec<i64>>::try_from(&r.topk_indices.sort(1, false).0).unwrap();
    assert_eq!(rows, vec![vec![2, 3]; 16]);
    let before = Vec::<Vec<i64>>::try_from(&plain.routing_of(1).unwrap().topk_indices.sort(1, false).0).unwrap();
    assert!(before.iter().filter(|row| **row == [2, 3]).count() < 16, "experts 2 and 3 were not already everywhere");
    // the record shows the logits the choice was made on
    assert!(r.logits.select(1, 0).max().double_value(&[]) < -40.0);
}

#[test]
fn bad_hook_results_are_errors_that_name_the_point() {
    let m = model();
    let x = ids(6, 5);
    let run = |iv: Interventions| m.trace_with(x.clone(), &Capture::default(), &iv).unwrap_err();
    match run(Interventions::new().hook("blocks.1.hook_resid_post", |_c, v| Ok(v.narrow(1, 0, 2)))) {
        Error::HookShape { point, expected, found, .. } => {
            assert_eq!(point, "blocks.1.hook_resid_post");
            assert_eq!(expected, vec![1, 6, 64]);
            assert_eq!(found, vec![1, 2, 64]);
        }
        e => panic!("expected HookShape, got {e:?}"),
    }
    match run(Interventions::new().hook(HookPoint::AttnOut(0), |_c, v| Ok(v.to_kind(Kind::Double)))) {
        Error::HookDtype { point, expected, found, .. } => {
            assert_eq!(point, "blocks.0.hook_attn_out");
            assert_eq!((expected.as_str(), found.as_str()), ("Float", "Double"));
        }
        e => panic!("expected HookDtype, got {e:?}"),
    }
    // the closure's own error ends the pass unchanged
    match run(Interventions::new().hook("hook_embed", |_c, _v| Err(Error::Input("odd embedding".into())))) {
        Error::Input(m) => assert_eq!(m, "odd embedding"),
        e => panic!("expected the hook's error, got {e:?}"),
    }
    // a user closure that calls a fallible libtorch op with `?`
    let e = run(Interventions::new().hook("blocks.2.hook_mlp_out", |_c, v| Ok(v.f_matmul(&Tensor::ones([3, 3], (Kind::Float, Device::Cpu)))?)));
    assert!(matches!(e, Error::Torch(_)), "{e:?}");
    let msg = |iv: Interventions| run(iv).to_string();
    assert!(msg(Interventions::new().hook("blocks.1.mlp.hook_chosen_groups", |_c, v| Ok(v))).contains("read-only"));
    assert!(msg(Interventions::new().hook("blocks.1.mlp.experts.*", |_c, v| Ok(v))).contains("only read-only"));
    assert!(msg(Interventions::new().hook("blocks.9.*", |_c, v| Ok(v))).contains("matches no hook point"));
    assert!(msg(Interventions::new().hook("blocks.0.mlp.hook_router_logits", |_c, v| Ok(v))).contains("dense layer"));
    assert!(msg(Interventions::new().hook("blocks.[.x", |_c, v| Ok(v))).contains("not a valid hook-point pattern"));
    let v = Tensor::ones([7], (Kind::Float, Device::Cpu));
    match run(Interventions::new().add_vector("blocks.1.hook_resid_post", &v)) {
        Error::HookShape { expected, found, .. } => assert_eq!((expected, found), (vec![64], vec![7])),
        e => panic!("expected HookShape, got {e:?}"),
    }
}

#[test]
fn patterns_and_predicates_choose_the_points_captured() {
    let m = model();
    let x = ids(8, 6);
    let t = m.trace_with(x.clone(), &Capture::default().with_names(&["blocks.*.mlp.hook_router_logits"]).unwrap(), &Interventions::new()).unwrap();
    let kept: Vec<HookPoint> = t.tensors.keys().copied().collect();
    assert_eq!(kept, vec![HookPoint::RouterLogits(1), HookPoint::RouterLogits(2)]);
    assert_eq!(t.tensor(HookPoint::RouterLogits(2)).unwrap(), &t.routing_of(2).unwrap().logits);

    let layer1 = m.trace_with(x.clone(), &Capture::matching(|p| p.layer() == Some(1)), &Interventions::new()).unwrap();
    let want: Vec<HookPoint> = m.hook_points().into_iter().filter(|p| p.layer() == Some(1)).collect();
    assert_eq!(layer1.tensors.keys().copied().collect::<Vec<_>>().len(), want.len());
    assert!(want.iter().all(|p| layer1.tensors.contains_key(p)));
    assert!(layer1.tensors.contains_key(&HookPoint::ExpertOut(1, 7)));

    let none = m.trace_with(x, &Capture::default().with_names(&["blocks.*.hook_nothing"]).unwrap(), &Interventions::new()).unwrap_err();
    assert!(none.to_string().contains("cannot capture: `blocks.*.hook_nothing` matches no hook point"), "{none}");
    assert_eq!(Points::from("blocks.1.hook_resid_post").resolve(&m, true).unwrap(), vec![HookPoint::ResidPost(1)]);
}

#[test]
fn hook_context_tells_the_positions_of_each_pass() {
    let m = model();
    let prompt = ids(5, 7);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let iv = Interventions::new().hook(HookPoint::ResidPost(2), move |ctx, v| {
        let pos = ctx.position_ids(&v)?;
        assert_eq!(pos.size(), vec![1, ctx.tokens(), 1]);
        log.lock().unwrap().push((ctx.pass, ctx.positions.clone(), ctx.batch, ctx.layer));
        Ok(v)
    });
    let g = m.generate_with(prompt, &greedy(&m, 3), &Capture::none(), &iv).unwrap();
    assert_eq!(g.generation.tokens.len(), 3);
    assert_eq!(*seen.lock().unwrap(), vec![(0, 0..5, 1, Some(2)), (1, 5..6, 1, Some(2)), (2, 6..7, 1, Some(2))]);
}

#[test]
fn steering_during_generation_equals_the_same_steering_over_the_whole_sequence() {
    let m = model();
    let prompt = ids(6, 8);
    tch::manual_seed(9);
    let v = Tensor::randn([64], (Kind::Float, Device::Cpu)) * 4.0;
    let point = HookPoint::ResidPost(1);
    let capture = Capture::default().with(point).with(HookPoint::RouterScores(2));
    // from position 8 on: two positions into the generation
    let steer = Interventions::new()
        .add_vector_from("blocks.1.hook_resid_post", &v, 8)
        .hook("blocks.2.attn.hook_c_kv", |ctx, x| Ok(&x + &x * ctx.from_position(&x, 9)? * 0.25));
    let g = m.generate_with(prompt.clone(), &greedy(&m, 8), &capture, &steer).unwrap();
    let read: Vec<i64> = Vec::<i64>::try_from(g.trace.ids.select(0, 0)).unwrap();
    assert_eq!(read.len(), 6 + 8 - 1);
    assert_eq!(&read[..6], &prompt[..]);
    let full = m.trace_with(read.clone(), &capture, &steer).unwrap();
    assert!(max_abs_diff(&g.trace.logits, &full.logits) <= 1e-4, "logits");
    assert!(max_abs_diff(g.trace.tensor(point).unwrap(), full.tensor(point).unwrap()) <= 1e-4);
    for l in [1, 2] {
        let (a, b) = (g.trace.routing_of(l).unwrap(), full.routing_of(l).unwrap());
        assert_eq!(a.topk_indices, b.topk_indices, "layer {l} routing per generated token");
        assert!(max_abs_diff(&a.scores, &b.scores) <= 1e-5);
    }
    for l in 0..3 {
        assert!(max_abs_diff(g.trace.pattern(l).unwrap(), full.pattern(l).unwrap()) <= 1e-5, "pattern {l}");
    }
    for (p, s) in &full.stats {
        let s2 = g.trace.stats[p];
        assert!((s.rms - s2.rms).abs() <= 1e-4 * s.rms.max(1.0) && s.numel == s2.numel, "{p}");
    }
    // each generated token is the argmax of the logits before it
    let argmax = Vec::<i64>::try_from(g.trace.logits.select(0, 0).argmax(-1, false)).unwrap();
    assert_eq!(&argmax[5..], &g.generation.tokens[..]);

    // before position 8 nothing changed; from there on the steering shows
    let plain = m.trace_with(read, &capture, &Interventions::new()).unwrap();
    assert!(max_abs_diff(&plain.logits.narrow(1, 0, 8), &full.logits.narrow(1, 0, 8)) <= 1e-6);
    assert!(max_abs_diff(&plain.logits.narrow(1, 8, 5), &full.logits.narrow(1, 8, 5)) > 1e-2);
}

#[test]
fn forcing_an_expert_during_generation_shows_in_its_routing() {
    let m = model();
    let g = m.generate_with(ids(4, 10), &greedy(&m, 5), &Capture::routing_only(), &Interventions::new().force_experts(2, &[5])).unwrap();
    let r = g.trace.routing_of(2).unwrap();
    assert_eq!(r.topk_indices.size(), vec![8, 2]);
    assert!(Vec::<Vec<i64>>::try_from(&r.topk_indices).unwrap().iter().all(|row| row.contains(&5)));
    assert!(g.to_string().contains("5 new tokens after a 4-token prompt"));
    let e = m.generate_with(ids(4, 10), &greedy(&m, 0), &Capture::none(), &Interventions::new()).unwrap_err();
    assert!(e.to_string().contains("nothing to generate"));
}
