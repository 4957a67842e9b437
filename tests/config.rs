//! Reading `config.json`: defaults, RoPE variants, router enums, rejected
//! combinations, and the arithmetic derived from a config.

use deepscope::model::{Config, Family, RopeScaling, ScoringFunc, TopkMethod};
use deepscope::stats::{CacheFootprint, ParamCounts};
use deepscope::Error;
// The published configs ship with the library (deepscope::model::published).
use deepscope::model::published::{DEEPSEEK_V2_LITE_JSON as DEEPSEEK_V2_LITE, DEEPSEEK_V3_JSON as DEEPSEEK_V3};

fn parse(text: &str) -> Result<Config, Error> {
    Config::from_json_str(text, "config.json")
}

fn with(base: &str, key: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
    v[key] = value;
    v.to_string()
}

#[test]
fn deepseek_v3_config_reads_every_field() {
    let c = parse(DEEPSEEK_V3).unwrap();
    assert_eq!(c.family, Family::V3);
    assert_eq!((c.scoring_func, c.topk_method), (ScoringFunc::Sigmoid, TopkMethod::NoauxTc));
    assert_eq!((c.n_group, c.topk_group, c.num_experts_per_tok), (8, 4, 8));
    assert_eq!(c.q_lora_rank, Some(1536));
    assert!(c.rope_interleave, "V3 default");
    assert_eq!(c.moe_layers().len(), 58);
    assert_eq!(c.quantization.as_ref().unwrap().weight_block_size, [128, 128]);
    match c.rope_scaling {
        RopeScaling::Yarn { factor, original_max_position_embeddings, .. } => {
            assert_eq!((factor, original_max_position_embeddings), (40.0, 4096))
        }
        other => panic!("expected YaRN, got {other:?}"),
    }
    // softmax scale: 192^-0.5 * (0.1 * 1.0 * ln 40 + 1)^2
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((c.softmax_scale() - 192f64.powf(-0.5) * m * m).abs() < 1e-12);
}

#[test]
fn deepseek_v3_cache_is_576_elements_against_40960_naive() {
    let c = CacheFootprint::of(&parse(DEEPSEEK_V3).unwrap(), 2);
    assert_eq!((c.absorbed_elems, c.naive_elems, c.mha_elems), (576, 40_960, 32_768));
    let (a, n, _) = c.bytes_per_token();
    assert_eq!(a, 576 * 61 * 2); // 68.6 KiB
    assert!((n as f64 / (1024.0 * 1024.0) - 4.77).abs() < 0.01, "naive {n} B");
}

#[test]
fn deepseek_v3_has_671b_parameters_37b_active() {
    let p = ParamCounts::of(&parse(DEEPSEEK_V3).unwrap());
    assert!((p.total as f64 / 671e9 - 1.0).abs() < 0.01, "total {}", p.total);
    assert!((p.active_per_token as f64 / 37e9 - 1.0).abs() < 0.03, "active {}", p.active_per_token);
}

#[test]
fn deepseek_v2_lite_has_15_7b_parameters_2_4b_active() {
    let c = parse(DEEPSEEK_V2_LITE).unwrap();
    assert_eq!(c.family, Family::V2);
    assert_eq!(c.q_lora_rank, None);
    assert_eq!(c.topk_method, TopkMethod::Greedy);
    assert!(c.rope_interleave, "V2 rotates interleaved pairs");
    let p = ParamCounts::of(&c);
    assert!((p.total as f64 / 15.7e9 - 1.0).abs() < 0.01, "total {}", p.total);
    assert!((p.active_per_token as f64 / 2.4e9 - 1.0).abs() < 0.03, "active {}", p.active_per_token);
}

#[test]
fn transformers_5_rope_parameters_are_read() {
    let text = with(
        DEEPSEEK_V3,
        "rope_parameters",
        serde_json::json!({"rope_type": "default", "rope_theta": 50000.0}),
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.rope_theta, 50000.0);
    assert_eq!(c.rope_scaling, RopeScaling::Default);
}

fn field_of(err: Error) -> String {
    match err {
        Error::Config { field, .. } => field,
        other => panic!("expected a Config error, got {other}"),
    }
}

#[test]
fn invalid_combinations_are_rejected_naming_the_field() {
    let bad = [
        (with(DEEPSEEK_V3, "model_type", "llama".into()), "model_type"),
        (with(DEEPSEEK_V3, "scoring_func", "softmax".into()), "topk_method"),
        (with(DEEPSEEK_V3, "topk_method", "greedy".into()), "topk_method"),
        (with(DEEPSEEK_V3, "topk_method", "best".into()), "topk_method"),
        (with(DEEPSEEK_V3, "n_group", 7.into()), "n_group"),
        (with(DEEPSEEK_V3, "topk_group", 9.into()), "topk_group"),
        (with(DEEPSEEK_V3, "num_experts_per_tok", 300.into()), "num_experts_per_tok"),
        (with(DEEPSEEK_V3, "qk_rope_head_dim", 63.into()), "qk_rope_head_dim"),
        (with(DEEPSEEK_V3, "num_key_value_heads", 8.into()), "num_key_value_heads"),
        (with(DEEPSEEK_V3, "hidden_act", "gelu".into()), "hidden_act"),
        (with(DEEPSEEK_V3, "first_k_dense_replace", 62.into()), "first_k_dense_replace"),
        (with(DEEPSEEK_V3, "hidden_size", serde_json::Value::Null), "hidden_size"),
        (with(DEEPSEEK_V3, "rope_scaling", serde_json::json!({"type": "linear", "factor": 2})), "rope_scaling.rope_type"),
        (with(DEEPSEEK_V2_LITE, "scoring_func", "sigmoid".into()), "topk_method"),
        (with(DEEPSEEK_V2_LITE, "quantization_config", serde_json::json!({"quant_method": "gptq"})), "quantization_config.quant_method"),
    ];
    for (text, field) in bad {
        let err = parse(&text).expect_err(field);
        let msg = err.to_string();
        assert_eq!(field_of(err), field, "{msg}");
    }
}

#[test]
fn noaux_tc_groups_must_hold_two_experts() {
    let text = with(&with(DEEPSEEK_V3, "n_group", 256.into()), "topk_group", 8.into());
    assert_eq!(field_of(parse(&text).unwrap_err()), "n_group");
}
