//! Writing models in the Hugging Face layout (`config.json`,
//! `model.safetensors`, `generation_config.json`) so that both DeepScope and
//! `transformers` load them, and creating a freshly initialised one.

use std::path::Path;

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{Config, RopeScaling};
use crate::model::Model;

/// `config.json` for `cfg` (`model_type: deepseek_v3` / `deepseek_v2`).
pub fn config_json(cfg: &Config, kind: Kind) -> serde_json::Value {
    let rope = match &cfg.rope_scaling {
        RopeScaling::Default => json!({"rope_type": "default", "rope_theta": cfg.rope_theta}),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            attention_factor,
            truncate,
        } => json!({
            "rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": factor,
            "original_max_position_embeddings": original_max_position_embeddings,
            "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": mscale, "mscale_all_dim": mscale_all_dim,
            "attention_factor": attention_factor, "truncate": truncate,
        }),
    };
    let v3 = cfg.family == crate::model::Family::V3;
    json!({
        "architectures": [if v3 { "DeepseekV3ForCausalLM" } else { "DeepseekV2ForCausalLM" }],
        "model_type": if v3 { "deepseek_v3" } else { "deepseek_v2" },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": match cfg.scoring_func { crate::model::ScoringFunc::Sigmoid => "sigmoid", _ => "softmax" },
        "topk_method": match cfg.topk_method {
            crate::model::TopkMethod::NoauxTc => "noaux_tc",
            crate::model::TopkMethod::Greedy => "greedy",
            crate::model::TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
        },
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "rope_interleave": cfg.rope_interleave,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids.first(),
        "pad_token_id": cfg.pad_token_id,
        "num_nextn_predict_layers": 0,
        "torch_dtype": if kind == Kind::BFloat16 { "bfloat16" } else if kind == Kind::Half { "float16" } else { "float32" },
    })
}

/// Every weight of `model` under its checkpoint name, stacked gate/up
/// matrices split back into `gate_proj` and `up_proj`.
pub fn hf_state_dict(model: &Model) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, t) in model.named_weights() {
        if let Some(prefix) = name.strip_suffix(".gate_up_proj.weight") {
            let half = t.size()[0] / 2;
            out.push((format!("{prefix}.gate_proj.weight"), t.f_narrow(0, 0, half)?));
            out.push((format!("{prefix}.up_proj.weight"), t.f_narrow(0, half, half)?));
        } else if let Some(prefix) = name.strip_suffix(".gate_up_proj.bias") {
            let half = t.size()[0] / 2;
            out.push((format!("{prefix}.gate_proj.bias"), t.f_narrow(0, 0, half)?));
            out.push((format!("{prefix}.up_proj.bias"), t.f_narrow(0, half, half)?));
        } else {
            out.push((name, t.shallow_clone()));
        }
    }
    Ok(out)
}

/// Writes `model` to `dir` in the Hugging Face layout. Weights are stored in
/// `kind` (f32 or bf16), `e_score_correction_bias` always in f32.
pub fn save_model(model: &Model, dir: &Path, kind: Kind) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<(String, Tensor)> = hf_state_dict(model)?
        .into_iter()
        .map(|(n, t)| {
            let k = if n.ends_with("e_score_correction_bias") { Kind::Float } else { kind };
            let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(k)?.f_contiguous()?;
            Ok((n, t))
        })
        .collect::<Result<_>>()?;
    write_atomically(&dir.join("model.safetensors"), |tmp| Ok(Tensor::write_safetensors(&tensors, tmp)?))?;
    write_config(&model.config, dir, kind)
}

/// Writes `config.json` and `generation_config.json`.
pub fn write_config(cfg: &Config, dir: &Path, kind: Kind) -> Result<()> {
    let config = serde_json::to_string_pretty(&config_json(cfg, kind)).map_err(|e| Error::Input(e.to_string()))?;
    let path = dir.join("config.json");
    std::fs::write(&path, config + "\n").map_err(|e| Error::io(&path, e))?;
    let generation = json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids.first(),
        "pad_token_id": cfg.pad_token_id,
        "do_sample": true, "temperature": 0.8, "top_p": 0.95,
    });
    let path = dir.join("generation_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&generation).unwrap_or_default() + "\n")
        .map_err(|e| Error::io(&path, e))
}

/// Writes through a temporary file and renames, so an interrupted save never
/// leaves a truncated file behind.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Checkpoint names and shapes of a model with config `cfg`.
pub fn weight_shapes(cfg: &Config) -> Vec<(String, Vec<i64>)> {
    let i = |x: usize| x as i64;
    let (d, h, v) = (i(cfg.hidden_size), i(cfg.num_attention_heads), i(cfg.vocab_size));
    let qk = i(cfg.qk_head_dim());
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut push = |n: &str, s: Vec<i64>| out.push((format!("{p}.{n}"), s));
        push("input_layernorm.weight", vec![d]);
        push("post_attention_layernorm.weight", vec![d]);
        let ab = cfg.attention_bias;
        match cfg.q_lora_rank {
            None => push("self_attn.q_proj.weight", vec![h * qk, d]),
            Some(r) => {
                push("self_attn.q_a_proj.weight", vec![i(r), d]);
                if ab {
                    push("self_attn.q_a_proj.bias", vec![i(r)]);
                }
                push("self_attn.q_a_layernorm.weight", vec![i(r)]);
                push("self_attn.q_b_proj.weight", vec![h * qk, i(r)]);
            }
        }
        push("self_attn.kv_a_proj_with_mqa.weight", vec![i(cfg.kv_lora_rank + cfg.qk_rope_head_dim), d]);
        if ab {
            push("self_attn.kv_a_proj_with_mqa.bias", vec![i(cfg.kv_lora_rank + cfg.qk_rope_head_dim)]);
            push("self_attn.o_proj.bias", vec![d]);
        }
        push("self_attn.kv_a_layernorm.weight", vec![i(cfg.kv_lora_rank)]);
        push("self_attn.kv_b_proj.weight", vec![h * i(cfg.qk_nope_head_dim + cfg.v_head_dim), i(cfg.kv_lora_rank)]);
        push("self_attn.o_proj.weight", vec![d, h * i(cfg.v_head_dim)]);
        let mb = cfg.mlp_bias;
        let mut mlp = |prefix: String, inter: i64| {
            push(&format!("{prefix}.gate_proj.weight"), vec![inter, d]);
            push(&format!("{prefix}.up_proj.weight"), vec![inter, d]);
            push(&format!("{prefix}.down_proj.weight"), vec![d, inter]);
            if mb {
                push(&format!("{prefix}.gate_proj.bias"), vec![inter]);
                push(&format!("{prefix}.up_proj.bias"), vec![inter]);
                push(&format!("{prefix}.down_proj.bias"), vec![d]);
            }
        };
        if cfg.is_moe_layer(l) {
            let im = i(cfg.moe_intermediate_size);
            for e in 0..cfg.n_routed_experts {
                mlp(format!("mlp.experts.{e}"), im);
            }
            if cfg.n_shared_experts > 0 {
                mlp("mlp.shared_experts".into(), im * i(cfg.n_shared_experts));
            }
            push("mlp.gate.weight", vec![i(cfg.n_routed_experts), d]);
            if cfg.topk_method == crate::model::TopkMethod::NoauxTc {
                push("mlp.gate.e_score_correction_bias", vec![i(cfg.n_routed_experts)]);
            }
        } else {
            mlp("mlp".into(), i(cfg.intermediate_size));
        }
    }
    out.push(("model.norm.weight".into(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, d]));
    }
    out
}

/// Writes a freshly initialised checkpoint for `cfg` to `dir`: norms 1,
/// router bias 0, other matrices N(0, std) with `std = init_std`, output
/// projections (`o_proj`, `down_proj`) scaled by `1/sqrt(2 * layers)`.
pub fn init_checkpoint(cfg: &Config, dir: &Path, init_std: f64, seed: i64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tch::manual_seed(seed);
    let depth_scale = (2.0 * cfg.num_hidden_layers as f64).sqrt().recip();
    let tensors: Vec<(String, Tensor)> = weight_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let opts = (Kind::Float, Device::Cpu);
            let t = if name.ends_with("norm.weight") {
                Tensor::f_ones(&shape, opts)?
            } else if name.ends_with("e_score_correction_bias") || name.ends_with(".bias") {
                Tensor::f_zeros(&shape, opts)?
            } else {
                let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                    init_std * depth_scale
                } else {
                    init_std
                };
                Tensor::f_randn(&shape, opts)?.f_mul_scalar(std)?
            };
            Ok((name, t))
        })
        .collect::<Result<_>>()?;
    write_atomically(&dir.join("model.safetensors"), |tmp| Ok(Tensor::write_safetensors(&tensors, tmp)?))?;
    write_config(cfg, dir, Kind::Float)
}
