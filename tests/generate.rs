//! Generation over the compressed cache: greedy equals repeated full
//! forwards, sampling is seeded, stop tokens stop, the cache reports its size.

mod common;

use common::*;
use deepscope::model::{GenerateOptions, Sampling, StopReason};
use tch::Tensor;

#[test]
fn greedy_generation_equals_argmax_of_full_forwards() {
    for name in ["v3_base", "v2_group_limited"] {
        let model = load_cpu(&case(name).dir);
        let prompt = [3i64, 1, 4, 1, 5];
        let mut opts = GenerateOptions::greedy(&model, 8);
        opts.stop_tokens.clear();
        let g = model.generate(&prompt, &opts, |_| true).expect("generate");
        let mut seq = prompt.to_vec();
        for _ in 0..8 {
            let ids = Tensor::from_slice(&seq).unsqueeze(0);
            let logits = model.forward(&ids).expect("forward").logits;
            seq.push(logits.select(1, -1).argmax(-1, false).int64_value(&[0]));
        }
        assert_eq!(g.tokens, seq[prompt.len()..], "{name}");
        assert_eq!(g.cache_len, (prompt.len() + 8 - 1) as i64);
    }
}

#[test]
fn cache_bytes_are_the_latent_size_times_positions() {
    let model = load_cpu(&case("v3_base").dir);
    let mut opts = GenerateOptions::greedy(&model, 4);
    opts.stop_tokens.clear();
    let g = model.generate(&[1, 2, 3], &opts, |_| true).unwrap();
    let c = &model.config;
    let per_pos = (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 4; // f32
    assert_eq!(g.cache_bytes, per_pos * g.cache_len as usize);
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let model = load_cpu(&case("v3_base").dir);
    let run = |seed| {
        let mut opts = GenerateOptions::greedy(&model, 12);
        opts.stop_tokens.clear();
        opts.sampling = Sampling::TopP { temperature: 1.5, top_p: 0.95, seed };
        model.generate(&[7, 8], &opts, |_| true).unwrap().tokens
    };
    assert_eq!(run(1), run(1));
    assert!((0..5).any(|s| run(s + 2) != run(1)), "different seeds never changed the sample");
}

#[test]
fn stop_tokens_end_generation_and_callback_can_cancel() {
    let model = load_cpu(&case("v3_base").dir);
    let mut opts = GenerateOptions::greedy(&model, 8);
    opts.stop_tokens.clear();
    let free = model.generate(&[1, 2, 3], &opts, |_| true).unwrap();
    opts.stop_tokens = vec![free.tokens[2]];
    let stopped = model.generate(&[1, 2, 3], &opts, |_| true).unwrap();
    let first = free.tokens.iter().position(|t| *t == free.tokens[2]).unwrap();
    assert_eq!(stopped.tokens, free.tokens[..=first]);
    assert_eq!(stopped.stop, StopReason::StopToken(free.tokens[2]));
    opts.stop_tokens.clear();
    let mut seen = 0;
    let cancelled = model.generate(&[1, 2, 3], &opts, |_| { seen += 1; seen < 2 }).unwrap();
    assert_eq!(cancelled.stop, StopReason::Cancelled);
    assert_eq!(cancelled.tokens.len(), 2);
}

#[test]
fn bad_generation_input_is_rejected() {
    let model = load_cpu(&case("v3_base").dir);
    let opts = GenerateOptions::greedy(&model, 2);
    assert!(model.generate(&[], &opts, |_| true).unwrap_err().to_string().contains("empty"));
    let mut bad = opts.clone();
    bad.sampling = Sampling::TopP { temperature: 0.0, top_p: 0.9, seed: 0 };
    assert!(model.generate(&[1], &bad, |_| true).unwrap_err().to_string().contains("temperature"));
    let v = model.config.vocab_size as i64;
    assert!(model.generate(&[v], &opts, |_| true).unwrap_err().to_string().contains(&format!("token id {v}")));
}
