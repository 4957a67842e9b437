//! Numerical parity with `transformers` on every generated case: logits,
//! routing decisions, both attention paths.

mod common;

use common::*;
use deepscope::model::{AttnImpl, ForwardOptions, HookPoint, Hooks};
use tch::{Kind, Tensor};

const LOGIT_TOL: f64 = 1e-4;

fn run(case: &Case, attn: AttnImpl) -> (deepscope::model::ForwardOutput, std::collections::HashMap<String, Tensor>) {
    let model = load_cpu(&case.dir);
    let r = reference(case);
    let out = model
        .forward_with(&r["input_ids"], None, ForwardOptions { attn, ..Default::default() })
        .expect("forward");
    (out, r)
}

#[test]
fn logits_match_transformers_on_every_case_and_both_attention_paths() {
    for case in cases() {
        for attn in [AttnImpl::Naive, AttnImpl::Absorbed, AttnImpl::Auto] {
            let (out, r) = run(&case, attn);
            let d = max_abs_diff(&out.logits, &r["logits"]);
            assert!(d <= LOGIT_TOL, "{} {attn:?}: logits differ by {d:e}", case.name);
        }
    }
}

#[test]
fn routing_top_k_sets_and_weights_match_transformers() {
    for case in cases() {
        let (out, r) = run(&case, AttnImpl::Absorbed);
        assert!(!case.moe_layers.is_empty(), "{} has no MoE layer", case.name);
        for &l in &case.moe_layers {
            let routing = out.routing[l].as_ref().unwrap_or_else(|| panic!("{}: layer {l} has no routing", case.name));
            let (sorted, order) = routing.topk_indices.sort(-1, false);
            let weights = routing.topk_weights.gather(1, &order, false);
            let want = &r[&format!("layers.{l}.topk_indices")];
            assert!(sorted.equal(want), "{} layer {l}: different experts chosen", case.name);
            let d = max_abs_diff(&weights, &r[&format!("layers.{l}.topk_weights")]);
            assert!(d <= 1e-4, "{} layer {l}: routing weights differ by {d:e}", case.name);
            let d = max_abs_diff(&routing.logits, &r[&format!("layers.{l}.router_logits")]);
            assert!(d <= 1e-4, "{} layer {l}: router logits differ by {d:e}", case.name);
        }
    }
}

#[test]
fn naive_and_absorbed_attention_agree() {
    for case in cases() {
        let (naive, _) = run(&case, AttnImpl::Naive);
        let (absorbed, _) = run(&case, AttnImpl::Absorbed);
        let d = max_abs_diff(&naive.logits, &absorbed.logits);
        assert!(d <= 1e-5, "{}: naive vs absorbed differ by {d:e}", case.name);
    }
}

#[test]
fn cached_decoding_equals_a_full_forward() {
    for case in cases() {
        let model = load_cpu(&case.dir);
        let ids = reference(&case)["input_ids"].shallow_clone();
        let t = ids.size()[1];
        let full = model.forward(&ids).expect("full").logits;
        for attn in [AttnImpl::Naive, AttnImpl::Absorbed, AttnImpl::Auto] {
            let opts = ForwardOptions { attn, ..Default::default() };
            // a prefill chunk, then one token at a time
            let split = t / 2;
            let mut cache = model.new_cache();
            let mut parts = vec![model
                .forward_with(&ids.narrow(1, 0, split), Some(&mut cache), opts)
                .expect("prefill")
                .logits];
            for i in split..t {
                parts.push(model.forward_with(&ids.narrow(1, i, 1), Some(&mut cache), opts).expect("step").logits);
            }
            assert_eq!(cache.len(), t);
            let stepped = Tensor::cat(&parts, 1);
            let d = max_abs_diff(&stepped, &full);
            assert!(d <= 1e-4, "{} {attn:?}: cached decode differs from full forward by {d:e}", case.name);
        }
    }
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let case = case("v3_base");
    let r = reference(&case);
    let model = deepscope::model::Model::load(
        &case.dir,
        deepscope::model::LoadOptions::new(tch::Device::Cpu, Kind::BFloat16),
    )
    .expect("load bf16");
    let out = model.forward(&r["input_ids"]).expect("forward");
    assert_eq!(out.logits.kind(), Kind::BFloat16);
    let d = max_abs_diff(&out.logits, &r["logits"]);
    let scale = r["logits"].abs().max().double_value(&[]);
    assert!(d <= 0.05 * scale.max(1.0), "bf16 logits off by {d} (scale {scale})");
}

/// bf16 decode steps (the absorbed single-query path in bf16) stay as close
/// to the f32 reference as a bf16 full forward does.
#[test]
fn bf16_cached_decoding_stays_close_to_f32() {
    let case = case("v3_base");
    let r = reference(&case);
    let model = deepscope::model::Model::load(&case.dir, deepscope::model::LoadOptions::new(tch::Device::Cpu, Kind::BFloat16)).expect("load bf16");
    let ids = r["input_ids"].shallow_clone();
    let t = ids.size()[1];
    let opts = ForwardOptions { attn: AttnImpl::Absorbed, ..Default::default() };
    let mut cache = model.new_cache();
    let mut parts = vec![model.forward_with(&ids.narrow(1, 0, 1), Some(&mut cache), opts).expect("first").logits];
    for i in 1..t {
        parts.push(model.forward_with(&ids.narrow(1, i, 1), Some(&mut cache), opts).expect("step").logits);
    }
    let stepped = Tensor::cat(&parts, 1);
    assert_eq!(stepped.kind(), Kind::BFloat16);
    let d = max_abs_diff(&stepped, &r["logits"]);
    let scale = r["logits"].abs().max().double_value(&[]);
    assert!(d <= 0.05 * scale.max(1.0), "bf16 decode steps off by {d} (scale {scale})");
}

/// Collects attention patterns (which switches attention to the explicit path).
struct Patterns(Vec<Tensor>);

impl Hooks for Patterns {
    fn wants(&self, point: HookPoint) -> bool {
        matches!(point, HookPoint::Pattern(_))
    }
    fn visit(&mut self, point: HookPoint, value: Tensor) -> deepscope::Result<Tensor> {
        if let HookPoint::Pattern(_) = point {
            self.0.push(value.shallow_clone());
        }
        Ok(value)
    }
}

#[test]
fn explicit_attention_probabilities_give_the_same_logits_and_are_causal() {
    for name in ["v3_base", "v2_group_limited"] {
        let case = case(name);
        let model = load_cpu(&case.dir);
        let ids = reference(&case)["input_ids"].shallow_clone();
        let t = ids.size()[1];
        for attn in [AttnImpl::Naive, AttnImpl::Absorbed, AttnImpl::Auto] {
            let opts = ForwardOptions { attn, ..Default::default() };
            let fused = model.forward_with(&ids, None, opts).unwrap();
            let mut patterns = Patterns(vec![]);
            let explicit = model.forward_hooked(&ids, None, opts, &mut patterns).unwrap();
            let d = max_abs_diff(&fused.logits, &explicit.logits);
            assert!(d <= 1e-4, "{name} {attn:?}: {d:e}");
            assert_eq!(patterns.0.len(), model.layers.len());
            for p in &patterns.0 {
                assert_eq!(p.size()[2..], [t, t]);
                let row_sums = p.sum_dim_intlist(-1, false, Kind::Float);
                assert!(max_abs_diff(&row_sums, &row_sums.ones_like()) <= 1e-5);
                let future = p.triu(1).abs().max().double_value(&[]);
                assert_eq!(future, 0.0, "{name}: attention to future positions");
            }
        }
    }
}

#[test]
fn auto_runs_prompts_naive_and_decode_steps_absorbed() {
    let case = &cases()[0];
    let model = load_cpu(&case.dir);
    let mla = &model.layers[0].self_attn;
    let (s, l, h) = (mla.kv_lora, mla.nope + mla.v, mla.num_heads);
    // one new query over a long cache: absorbing costs one fold per query, expanding costs every key
    assert_eq!(mla.cheaper_path(AttnImpl::Auto, 1, 512), AttnImpl::Absorbed);
    // a prompt: T x S pairs dominate, and a naive pair is narrower than a latent one
    assert_eq!(mla.cheaper_path(AttnImpl::Auto, 512, 512), AttnImpl::Naive, "kv_lora {s}, nope+v {l}, heads {h}");
    // an explicit choice is kept
    assert_eq!(mla.cheaper_path(AttnImpl::Naive, 1, 512), AttnImpl::Naive);
    assert_eq!(mla.cheaper_path(AttnImpl::Absorbed, 512, 512), AttnImpl::Absorbed);
}

#[test]
fn attention_in_query_blocks_equals_one_block_and_the_fused_kernel() {
    let case = &cases()[0];
    let model = load_cpu(&case.dir);
    let mla = &model.layers[0].self_attn;
    tch::manual_seed(7);
    let (b, h, past, t, d, dv) = (2, mla.num_heads, 5, 11, 24, 16);
    for shared in [false, true] {
        let kh = if shared { 1 } else { h };
        let q = Tensor::randn([b, h, t, d], (Kind::Float, tch::Device::Cpu));
        let k = Tensor::randn([b, kh, past + t, d], (Kind::Float, tch::Device::Cpu));
        let v = Tensor::randn([b, kh, past + t, dv], (Kind::Float, tch::Device::Cpu));
        let whole = mla.blocked_attention(&q, &k, &v, past, i64::MAX).unwrap();
        // 3 queries a block: 4 blocks, the last one short
        let blocks = mla.blocked_attention(&q, &k, &v, past, 3 * b * h * (past + t)).unwrap();
        assert_eq!(whole.size(), [b, h, t, dv]);
        assert!(max_abs_diff(&whole, &blocks) <= 1e-6, "shared {shared}");
        let mask = Tensor::ones([t, past + t], (Kind::Bool, tch::Device::Cpu)).tril(past);
        let fused = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, mla.softmax_scale, shared);
        assert!(max_abs_diff(&whole, &fused) <= 1e-5, "shared {shared}: {:e}", max_abs_diff(&whole, &fused));
    }
    // keys that do not line up with the queries are an error, not a wrong answer
    let q = Tensor::randn([1, h, 4, d], (Kind::Float, tch::Device::Cpu));
    let k = Tensor::randn([1, h, 6, d], (Kind::Float, tch::Device::Cpu));
    let err = mla.blocked_attention(&q, &k, &k, 0, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("6 keys for 4 queries"), "{err}");
}

/// A decode step's norms, rotations and SwiGLU run in one loop each on the
/// CPU (f32, a few rows, no gradient); a tensor that requires a gradient
/// takes libtorch's operations. Both must give the same numbers, for
/// contiguous and strided inputs, on every case (interleaved RoPE or not).
#[test]
fn decode_step_loops_equal_libtorch_operations() {
    use deepscope::model::decoder::FeedForward;
    let cpu = (Kind::Float, tch::Device::Cpu);
    for case in cases() {
        let model = load_cpu(&case.dir);
        let layer = &model.layers[0];
        let d = model.config.hidden_size as i64;
        tch::manual_seed(11);
        let with_grad = |x: &Tensor| x.copy().set_requires_grad(true);
        // RMSNorm: 6 rows, then a strided slice of wider rows
        let norm = &layer.input_layernorm;
        let x = Tensor::randn([2, 3, d], cpu);
        let wide = Tensor::randn([2, 3, d + 5], cpu);
        for x in [x, wide.narrow(-1, 2, d)] {
            let (fast, slow) = (norm.forward(&x).unwrap(), norm.forward(&with_grad(&x)).unwrap());
            assert!(slow.requires_grad() && !fast.requires_grad(), "{}: the gradient path was not taken", case.name);
            let diff = max_abs_diff(&fast, &slow.detach());
            assert!(diff <= 1e-6, "{}: RMSNorm differs by {diff:e}", case.name);
        }
        // RoPE on a decode step's queries [1, H, 1, rope] (a strided view) and two positions
        let (h, r) = (model.config.num_attention_heads as i64, model.config.qk_rope_head_dim as i64);
        for t in [1, 2] {
            let angles = model.rope.angles(7, t, Kind::Float).unwrap();
            let q = Tensor::randn([1, t, h, r + 3], cpu).transpose(1, 2).narrow(-1, 3, r);
            let (fast, slow) = (model.rope.apply(&q, &angles).unwrap(), model.rope.apply(&with_grad(&q), &angles).unwrap());
            assert!(slow.requires_grad() && !fast.requires_grad());
            assert_eq!(fast.size(), [1, h, t, r]);
            let diff = max_abs_diff(&fast, &slow.detach());
            assert!(diff <= 1e-6, "{}: RoPE differs by {diff:e} at {t} positions", case.name);
        }
        // SwiGLU of the dense MLP on one token, against silu(gate) * up in libtorch
        if let FeedForward::Dense(mlp) = &layer.mlp {
            let x = Tensor::randn([1, 1, d], cpu);
            let gu = mlp.gate_up.forward(&x).unwrap();
            let i = mlp.intermediate;
            let hidden = gu.narrow(-1, 0, i).silu() * gu.narrow(-1, i, i);
            let slow = mlp.down_proj.forward(&hidden).unwrap();
            let fast = mlp.forward(&x).unwrap();
            let diff = max_abs_diff(&fast, &slow);
            assert!(diff <= 1e-5 * (1.0 + slow.abs().max().double_value(&[])), "{}: MLP differs by {diff:e}", case.name);
        }
    }
}

/// A feed-forward block's fast path on `x` (nothing requiring a gradient)
/// against the same input with a gradient to record, which takes libtorch's
/// operations one at a time: the same experts, the same output to 1e-5
/// relative, and the gradient path really taken (packed FP8 weights take
/// neither fast path nor autograd).
fn feed_forward_equals_the_gradient_path(layer: &deepscope::model::decoder::DecoderLayer, x: &Tensor, what: &str) {
    use deepscope::model::decoder::FeedForward;
    let slow_x = x.copy().set_requires_grad(true);
    let (fast, slow) = match &layer.mlp {
        FeedForward::Moe(m) => {
            let (f, s) = (m.forward(x).unwrap(), m.forward(&slow_x).unwrap());
            assert!(f.routing.topk_indices.equal(&s.routing.topk_indices), "{what}: other experts");
            (f.output, s.output)
        }
        FeedForward::Dense(m) => (m.forward(x).unwrap(), m.forward(&slow_x).unwrap()),
    };
    let ready = layer.weights().iter().all(|w| w.as_ready().is_some());
    assert!(!fast.requires_grad() && (slow.requires_grad() || !ready), "{what}: the gradient path was not taken");
    assert_eq!(fast.size(), x.size(), "{what}");
    let diff = max_abs_diff(&fast, &slow.detach());
    let scale = slow.abs().max().double_value(&[]);
    assert!(diff <= 1e-5 * (1.0 + scale), "{what}: off by {diff:e} (scale {scale})");
}

/// One token's MoE layer (routed experts weighted, then the shared experts)
/// and a dense MLP run in one pass of loops on the CPU (f32, no gradient):
/// the same output as libtorch's operations, which a token that requires a
/// gradient takes, on every case and layer.
#[test]
fn one_token_feed_forward_in_one_pass_equals_libtorch_operations() {
    let cpu = (Kind::Float, tch::Device::Cpu);
    for case in cases() {
        let model = load_cpu(&case.dir);
        let d = model.config.hidden_size as i64;
        tch::manual_seed(19);
        for (l, layer) in model.layers.iter().enumerate() {
            for x in [Tensor::randn([1, 1, d], cpu), Tensor::randn([1, d], cpu) * 40.0] {
                feed_forward_equals_the_gradient_path(layer, &x, &format!("{} layer {l}", case.name));
            }
        }
    }
}

/// A prompt's routed experts run side by side on libtorch's threads, whole
/// experts per thread (`Moe::dispatch`, two threads, nothing requiring a
/// gradient): the same output as one expert at a time (the path a gradient
/// takes), on every case and MoE layer, for a batch of prompts and for two
/// tokens (the fewest that are not a decode step).
#[test]
fn experts_side_by_side_equal_one_expert_at_a_time() {
    use deepscope::model::decoder::FeedForward;
    let cpu = (Kind::Float, tch::Device::Cpu);
    let threads = tch::get_num_threads();
    tch::set_num_threads(2);
    for case in cases() {
        let model = load_cpu(&case.dir);
        let d = model.config.hidden_size as i64;
        tch::manual_seed(23);
        for (l, layer) in model.layers.iter().enumerate() {
            if !matches!(layer.mlp, FeedForward::Moe(_)) {
                continue;
            }
            for x in [Tensor::randn([3, 40, d], cpu), Tensor::randn([1, 2, d], cpu) * 10.0] {
                feed_forward_equals_the_gradient_path(layer, &x, &format!("{} layer {l}, {:?}", case.name, x.size()));
            }
        }
    }
    tch::set_num_threads(threads);
}

/// A small model's decode-step attention on the absorbed path runs in one
/// pass of loops on the CPU (f32, no gradient): the same per-head outputs as
/// libtorch's products (`absorbed_step`, then `W_UV`), for two sequences,
/// a strided `q_nope` (as the query projection leaves it), caches of one and
/// of many positions, on every case. A gradient to record takes libtorch.
#[test]
fn absorbed_decode_step_loops_equal_libtorch_products() {
    let cpu = (Kind::Float, tch::Device::Cpu);
    for case in cases() {
        let model = load_cpu(&case.dir);
        let mla = &model.layers[0].self_attn;
        let (h, nope, rope, l) = (mla.num_heads, mla.nope, mla.rope, mla.kv_lora);
        let (w_uk, w_uv) = mla.absorbed_weights().unwrap();
        tch::manual_seed(17);
        for s in [1, 9, 40] {
            let q = Tensor::randn([2, 1, h, nope + rope], cpu).transpose(1, 2); // [2, H, 1, nope + rope]
            let (q_nope, q_pe) = (q.narrow(-1, 0, nope), q.narrow(-1, nope, rope).contiguous());
            let (c_kv, k_pe) = (Tensor::randn([2, s, l], cpu), Tensor::randn([2, s, rope], cpu));
            let slow = mla.absorbed_step(&q_nope, &q_pe, &c_kv, &k_pe, &w_uk).unwrap().matmul(&w_uv.transpose(-1, -2).unsqueeze(0));
            let what = format!("{}, {s} cached positions", case.name);
            let fast = mla.absorbed_step_few_f32(&q_nope, &q_pe, &c_kv, &k_pe, &w_uk, &w_uv).unwrap();
            let Some(fast) = fast else {
                // only a CPU without AVX2 and FMA leaves it to libtorch
                #[cfg(target_arch = "x86_64")]
                assert!(!std::arch::is_x86_feature_detected!("avx2") || !std::arch::is_x86_feature_detected!("fma"), "{what}: not taken");
                continue;
            };
            assert_eq!(fast.size(), slow.size(), "{what}");
            let diff = max_abs_diff(&fast, &slow);
            assert!(diff <= 1e-5 * (1.0 + slow.abs().max().double_value(&[])), "{what}: off by {diff:e}");
            let grad = q_pe.copy().set_requires_grad(true);
            assert!(mla.absorbed_step_few_f32(&q_nope, &grad, &c_kv, &k_pe, &w_uk, &w_uv).unwrap().is_none(), "{what}: a gradient was dropped");
        }
    }
}

/// A few tokens' routing on the CPU (f32, no gradient) is chosen in one loop
/// over the scores read back; scores that require a gradient take
/// libtorch's operations. Both must choose the same experts in the same
/// order, with the same choice values, group scores and kept groups, for
/// every router kind (V3's biased groups, V2's greedy and group-limited),
/// including rows where equal values leave the order to libtorch; and one
/// token's expert outputs, weighted and added in one loop, equal libtorch's
/// products and sums exactly.
#[test]
fn few_token_routing_equals_libtorch_operations() {
    use deepscope::model::decoder::FeedForward;
    let cpu = (Kind::Float, tch::Device::Cpu);
    for case in cases() {
        let model = load_cpu(&case.dir);
        let d = model.config.hidden_size as i64;
        tch::manual_seed(13);
        for (l, layer) in model.layers.iter().enumerate() {
            let FeedForward::Moe(moe) = &layer.mlp else { continue };
            let gate = &moe.gate;
            // one token, three tokens, and a token whose scores are all equal
            for x in [Tensor::randn([1, d], cpu), Tensor::randn([3, d], cpu), Tensor::cat(&[Tensor::randn([1, d], cpu), Tensor::zeros([1, d], cpu)], 0)] {
                let fast = gate.route(&x).unwrap();
                let slow = gate.route(&x.copy().set_requires_grad(true)).unwrap();
                assert!(slow.topk_weights.requires_grad() && !fast.topk_weights.requires_grad(), "{} layer {l}: the gradient path was not taken", case.name);
                let what = format!("{} layer {l}, {} tokens", case.name, x.size()[0]);
                assert!(fast.topk_indices.equal(&slow.topk_indices), "{what}: other experts {} vs {}", fast.topk_indices, slow.topk_indices);
                assert!(fast.choice.equal(&slow.choice.detach()), "{what}: choice values differ");
                for (f, s) in [(&fast.group_scores, &slow.group_scores), (&fast.chosen_groups, &slow.chosen_groups)] {
                    match (f, s) {
                        (Some(f), Some(s)) => assert!(f.equal(&s.detach()), "{what}: groups differ: {f} vs {s}"),
                        (None, None) => {}
                        _ => panic!("{what}: group scores in one path only"),
                    }
                }
                let diff = max_abs_diff(&fast.topk_weights, &slow.topk_weights.detach());
                assert!(diff <= 1e-6, "{what}: weights differ by {diff:e}");
                if x.size()[0] == 1 {
                    // one token's experts weighted and added in one loop: the same numbers
                    let (idx, w) = (&fast.topk_indices, &fast.topk_weights);
                    let fast = moe.dispatch(&x, idx, w).unwrap();
                    let slow = moe.dispatch(&x, idx, &w.copy().set_requires_grad(true)).unwrap();
                    assert!(slow.requires_grad() && !fast.requires_grad());
                    assert!(fast.equal(&slow.detach()), "{what}: expert outputs added differently");
                }
            }
        }
    }
}

#[test]
fn a_pass_that_stops_early_routes_every_layer_as_a_whole_pass_does() {
    use deepscope::model::Until;
    for case in cases() {
        let model = load_cpu(&case.dir);
        let ids = &reference(&case)["input_ids"];
        let whole = model.forward_with(ids, None, ForwardOptions::default()).unwrap();
        for until in [Until::LastLayer, Until::LastRouter] {
            let out = model.forward_with(ids, None, ForwardOptions { until, ..Default::default() }).unwrap();
            let (b, t) = (ids.size()[0], ids.size()[1]);
            assert_eq!(out.logits.size(), [b, t, 0], "{} {until:?}", case.name);
            assert_eq!(out.routing.len(), model.layers.len());
            for (l, (a, w)) in out.routing.iter().zip(&whole.routing).enumerate() {
                match (a, w) {
                    (Some(a), Some(w)) => {
                        assert!(a.topk_indices.equal(&w.topk_indices), "{} {until:?} layer {l}: other experts", case.name);
                        assert!(max_abs_diff(&a.topk_weights, &w.topk_weights) <= 1e-6, "{} {until:?} layer {l}", case.name);
                    }
                    (None, None) => {}
                    _ => panic!("{} {until:?} layer {l}: routing present in one pass only", case.name),
                }
            }
        }
    }
}
