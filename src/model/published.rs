//! Published `config.json`s of real DeepSeek-family models (their
//! architectural fields), so that parameter counts, memory and KV-cache
//! arithmetic of the real models need no download.
//!
//! ```
//! use deepscope::model::published;
//! use deepscope::stats::CacheFootprint;
//! let v3 = published::deepseek_v3()?;
//! assert_eq!(CacheFootprint::of(&v3, 2).absorbed_elems, 576); // kv_lora_rank + qk_rope_head_dim
//! # Ok::<(), deepscope::Error>(())
//! ```
use super::config::Config;
use crate::error::Result;

/// DeepSeek-V3 (671B total, 37B active; 61 layers, 256 routed experts, FP8 weights).
pub const DEEPSEEK_V3_JSON: &str = r#"{
  "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
  "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128,
  "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
  "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
  "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
  "first_k_dense_replace": 3, "norm_topk_prob": true, "scoring_func": "sigmoid", "hidden_act": "silu",
  "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "tie_word_embeddings": false, "rope_theta": 10000,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "bos_token_id": 0, "eos_token_id": 1,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
}"#;

/// DeepSeek-V2-Lite (16B; the V2 architecture: softmax router, no q compression).
pub const DEEPSEEK_V2_LITE_JSON: &str = r#"{
  "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
  "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
  "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
  "q_lora_rank": null, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
  "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
  "first_k_dense_replace": 1, "norm_topk_prob": false, "scoring_func": "softmax", "hidden_act": "silu",
  "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": false
}"#;

/// Moonlight-16B-A3B: the V3 architecture with 64 experts in one group.
pub const MOONLIGHT_16B_A3B_JSON: &str = r#"{
  "model_type": "deepseek_v3", "vocab_size": 163840, "hidden_size": 2048, "intermediate_size": 11264,
  "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_nextn_predict_layers": 0, "num_attention_heads": 16,
  "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 2.446,
  "kv_lora_rank": 512, "q_lora_rank": null, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
  "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
  "first_k_dense_replace": 1, "norm_topk_prob": true, "scoring_func": "sigmoid", "hidden_act": "silu",
  "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 50000.0, "tie_word_embeddings": false,
  "bos_token_id": 163584, "eos_token_id": 163586
}"#;

/// DeepSeek-R1 (671B): the V3 architecture and config, trained further for reasoning.
pub const DEEPSEEK_R1_JSON: &str = DEEPSEEK_V3_JSON;

/// Kimi-K2-Instruct (about 1T total, 32B active): the V3 architecture with 384
/// routed experts in one group, 64 heads and one dense layer, FP8 weights.
pub const KIMI_K2_JSON: &str = r#"{
  "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
  "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 0, "num_attention_heads": 64,
  "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384, "routed_scaling_factor": 2.827,
  "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
  "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8, "moe_layer_freq": 1,
  "first_k_dense_replace": 1, "norm_topk_prob": true, "scoring_func": "sigmoid", "hidden_act": "silu",
  "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "tie_word_embeddings": false, "rope_theta": 50000.0,
  "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "bos_token_id": 163584, "eos_token_id": 163585,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
}"#;

pub fn deepseek_v3() -> Result<Config> {
    Config::from_json_str(DEEPSEEK_V3_JSON, "DeepSeek-V3/config.json")
}

pub fn deepseek_v2_lite() -> Result<Config> {
    Config::from_json_str(DEEPSEEK_V2_LITE_JSON, "DeepSeek-V2-Lite/config.json")
}

pub fn moonlight_16b_a3b() -> Result<Config> {
    Config::from_json_str(MOONLIGHT_16B_A3B_JSON, "Moonlight-16B-A3B/config.json")
}

pub fn deepseek_r1() -> Result<Config> {
    Config::from_json_str(DEEPSEEK_R1_JSON, "DeepSeek-R1/config.json")
}

pub fn kimi_k2() -> Result<Config> {
    Config::from_json_str(KIMI_K2_JSON, "Kimi-K2-Instruct/config.json")
}

/// (name, config) of every published config above.
pub fn all() -> Result<Vec<(&'static str, Config)>> {
    Ok(vec![
        ("DeepSeek-V2-Lite", deepseek_v2_lite()?),
        ("Moonlight-16B-A3B", moonlight_16b_a3b()?),
        ("DeepSeek-V3", deepseek_v3()?),
        ("DeepSeek-R1", deepseek_r1()?),
        ("Kimi-K2", kimi_k2()?),
    ])
}

/// The short names [`by_name`] takes.
pub const NAMES: [&str; 5] = ["deepseek-v3", "deepseek-r1", "kimi-k2", "deepseek-v2-lite", "moonlight-16b-a3b"];

/// A published config by short name (`deepseek-v3`, `deepseek-r1`, `kimi-k2`,
/// `deepseek-v2-lite`, `moonlight-16b-a3b`; case-insensitive), with the
/// dtype its non-FP8 weights are published in.
pub fn by_name(name: &str) -> Result<(Config, tch::Kind)> {
    let c = match name.to_ascii_lowercase().as_str() {
        "deepseek-v3" | "v3" => deepseek_v3()?,
        "deepseek-r1" | "r1" => deepseek_r1()?,
        "kimi-k2" | "k2" => kimi_k2()?,
        "deepseek-v2-lite" | "v2-lite" => deepseek_v2_lite()?,
        "moonlight-16b-a3b" | "moonlight" => moonlight_16b_a3b()?,
        other => {
            return Err(crate::error::Error::Input(format!(
                "no published config named `{other}` (known: {})",
                NAMES.join(", ")
            )))
        }
    };
    Ok((c, tch::Kind::BFloat16))
}
