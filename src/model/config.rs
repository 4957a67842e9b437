//! `config.json` of a DeepSeek-V2 / V3 checkpoint, read as Hugging Face writes it.
//!
//! The JSON is read into [`RawConfig`] (every field optional, names exactly as
//! in the file), then validated into [`Config`], where strings have become enums
//! and defaults follow `transformers`' `DeepseekV2Config` / `DeepseekV3Config`.
//! Invalid combinations are rejected with the field at fault.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which reference implementation the checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// `model_type: deepseek_v2` (DeepSeek-V2, V2-Lite).
    V2,
    /// `model_type: deepseek_v3` (DeepSeek-V3, R1, Moonlight).
    V3,
}

/// How router logits become per-expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScoringFunc {
    /// `sigmoid(logits)`, DeepSeek-V3.
    Sigmoid,
    /// `softmax(logits)` over all routed experts, DeepSeek-V2.
    Softmax,
}

/// How the top-k experts are chosen from the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopkMethod {
    /// V3: bias-corrected scores, groups ranked by the sum of their two best
    /// experts, top-k inside the `topk_group` best groups.
    NoauxTc,
    /// V2: plain top-k over all experts.
    Greedy,
    /// V2: groups ranked by their best expert, top-k inside the best groups.
    GroupLimitedGreedy,
}

/// RoPE frequency schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq_i = theta^(-2i/d)`.
    Default,
    /// YaRN (arXiv:2309.00071) as `transformers` computes it for DeepSeek.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

/// Block-wise FP8 quantization of a checkpoint (`quantization_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fp8Quantization {
    /// `[rows, cols]` of one scale block, `[128, 128]` for DeepSeek-V3.
    pub weight_block_size: [usize; 2],
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: queries come from one `q_proj` (V2-Lite); otherwise from the
    /// low-rank `q_a_proj -> q_a_layernorm -> q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// q_pe / k_pe stored as interleaved pairs (always so for V2).
    pub rope_interleave: bool,
    pub max_position_embeddings: usize,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// Multi-token-prediction layers stored after the main stack (skipped).
    pub num_nextn_predict_layers: usize,
    pub quantization: Option<Fp8Quantization>,
}

/// `config.json` as written on disk; every field optional.
#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub n_routed_experts: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub first_k_dense_replace: Option<usize>,
    pub moe_layer_freq: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub routed_scaling_factor: Option<f64>,
    pub scoring_func: Option<String>,
    pub topk_method: Option<String>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub rope_interleave: Option<bool>,
    pub max_position_embeddings: Option<usize>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<i64>,
    pub num_nextn_predict_layers: Option<usize>,
    pub quantization_config: Option<serde_json::Value>,
}

impl Config {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Config> {
        Config::from_file(dir.as_ref().join("config.json"))
    }

    /// Reads and validates one `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_json_str(&text, path)
    }

    /// Parses config JSON text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let raw: RawConfig = serde_json::from_str(text).map_err(|cause| Error::Json {
            path: path.to_path_buf(),
            cause,
        })?;
        raw.validate(path)
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// True when layer `layer` has a DeepSeekMoE block (else a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq.max(1))
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    /// `softmax_scale`: `(nope + rope)^-0.5`, times `m^2` for YaRN with
    /// `mscale_all_dim` (`m = 0.1 * mscale_all_dim * ln(factor) + 1`).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            RopeScaling::Yarn {
                factor,
                mscale_all_dim: Some(m_all),
                ..
            } if *m_all != 0.0 => {
                let m = yarn_get_mscale(*factor, *m_all);
                base * m * m
            }
            _ => base,
        }
    }
}

impl Config {
    /// `config.json` in the Hugging Face layout (`model_type: deepseek_v3` /
    /// `deepseek_v2`) for plain weights stored in `kind`; no
    /// `quantization_config` and no multi-token-prediction layers.
    pub fn to_hf_json(&self, kind: tch::Kind) -> serde_json::Value {
        use serde_json::json;
        use tch::Kind;
        let rope = match &self.rope_scaling {
            RopeScaling::Default => json!({"rope_type": "default", "rope_theta": self.rope_theta}),
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
                "rope_type": "yarn", "rope_theta": self.rope_theta, "factor": factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": mscale, "mscale_all_dim": mscale_all_dim,
                "attention_factor": attention_factor, "truncate": truncate,
            }),
        };
        let v3 = self.family == Family::V3;
        json!({
            "architectures": [if v3 { "DeepseekV3ForCausalLM" } else { "DeepseekV2ForCausalLM" }],
            "model_type": if v3 { "deepseek_v3" } else { "deepseek_v2" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "first_k_dense_replace": self.first_k_dense_replace,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "scoring_func": match self.scoring_func { ScoringFunc::Sigmoid => "sigmoid", _ => "softmax" },
            "topk_method": match self.topk_method {
                TopkMethod::NoauxTc => "noaux_tc",
                TopkMethod::Greedy => "greedy",
                TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            },
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_interleave": self.rope_interleave,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "pad_token_id": self.pad_token_id,
            "num_nextn_predict_layers": 0,
            "torch_dtype": if kind == Kind::BFloat16 { "bfloat16" } else if kind == Kind::Half { "float16" } else { "float32" },
        })
    }
}

/// YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` (1 when scale <= 1).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RawConfig {
    /// Applies the `transformers` defaults of the family, converts strings to
    /// enums and rejects invalid combinations.
    pub fn validate(self, path: &Path) -> Result<Config> {
        let err = |field: &str, msg: String| Error::config(path, field, msg);
        let family = match self.model_type.as_deref() {
            // Kimi-K2 is the V3 architecture under its own name
            Some("deepseek_v3") | Some("kimi_k2") => Family::V3,
            Some("deepseek_v2") => Family::V2,
            Some(other) => {
                return Err(err(
                    "model_type",
                    format!("`{other}` is not supported (expected `deepseek_v3`, `kimi_k2` or `deepseek_v2`)"),
                ))
            }
            None => return Err(err("model_type", "missing".into())),
        };
        let v3 = family == Family::V3;
        let req = |v: Option<usize>, field: &str| -> Result<usize> {
            match v {
                Some(0) => Err(err(field, "must be > 0".into())),
                Some(v) => Ok(v),
                None => Err(err(field, "missing".into())),
            }
        };
        let vocab_size = req(self.vocab_size, "vocab_size")?;
        let hidden_size = req(self.hidden_size, "hidden_size")?;
        let num_hidden_layers = req(self.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = req(self.num_attention_heads, "num_attention_heads")?;
        let kv_lora_rank = req(self.kv_lora_rank, "kv_lora_rank")?;
        let qk_nope_head_dim = req(self.qk_nope_head_dim, "qk_nope_head_dim")?;
        let qk_rope_head_dim = req(self.qk_rope_head_dim, "qk_rope_head_dim")?;
        let v_head_dim = req(self.v_head_dim, "v_head_dim")?;
        let intermediate_size = req(self.intermediate_size, "intermediate_size")?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(err(
                "qk_rope_head_dim",
                format!("must be even (RoPE rotates pairs), got {qk_rope_head_dim}"),
            ));
        }
        if let Some(kv) = self.num_key_value_heads {
            if kv != num_attention_heads {
                return Err(err(
                    "num_key_value_heads",
                    format!("MLA needs num_key_value_heads == num_attention_heads ({num_attention_heads}), got {kv}"),
                ));
            }
        }
        if let Some(0) = self.q_lora_rank {
            return Err(err("q_lora_rank", "must be > 0 or null".into()));
        }
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" {
                return Err(err(
                    "hidden_act",
                    format!("only `silu` (SwiGLU experts) is supported, got `{act}`"),
                ));
            }
        }

        let n_routed_experts = self.n_routed_experts.unwrap_or(if v3 { 256 } else { 64 });
        let n_shared_experts = self.n_shared_experts.unwrap_or(if v3 { 1 } else { 2 });
        let num_experts_per_tok = self.num_experts_per_tok.unwrap_or(if v3 { 8 } else { 0 });
        let moe_intermediate_size = self
            .moe_intermediate_size
            .unwrap_or(if v3 { 2048 } else { 1407 });
        let first_k_dense_replace = self.first_k_dense_replace.unwrap_or(if v3 { 3 } else { 0 });
        let moe_layer_freq = self.moe_layer_freq.unwrap_or(1);
        if moe_layer_freq == 0 {
            return Err(err("moe_layer_freq", "must be > 0".into()));
        }
        if first_k_dense_replace > num_hidden_layers {
            return Err(err(
                "first_k_dense_replace",
                format!("{first_k_dense_replace} exceeds num_hidden_layers ({num_hidden_layers})"),
            ));
        }

        let scoring_func = match self.scoring_func.as_deref() {
            None => {
                if v3 {
                    ScoringFunc::Sigmoid
                } else {
                    ScoringFunc::Softmax
                }
            }
            Some("sigmoid") => ScoringFunc::Sigmoid,
            Some("softmax") => ScoringFunc::Softmax,
            Some(s) => {
                return Err(err(
                    "scoring_func",
                    format!("`{s}` is not supported (expected `sigmoid` or `softmax`)"),
                ))
            }
        };
        let topk_method = match self.topk_method.as_deref() {
            None => {
                if v3 {
                    TopkMethod::NoauxTc
                } else {
                    TopkMethod::Greedy
                }
            }
            Some("noaux_tc") => TopkMethod::NoauxTc,
            Some("greedy") => TopkMethod::Greedy,
            Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
            Some(s) => {
                return Err(err(
                    "topk_method",
                    format!("`{s}` is not supported (expected `noaux_tc`, `greedy` or `group_limited_greedy`)"),
                ))
            }
        };
        match (family, scoring_func, topk_method) {
            (Family::V3, ScoringFunc::Sigmoid, TopkMethod::NoauxTc) => {}
            (Family::V3, _, _) => {
                return Err(err(
                    "topk_method",
                    "deepseek_v3 routes with scoring_func `sigmoid` and topk_method `noaux_tc`".into(),
                ))
            }
            (Family::V2, ScoringFunc::Softmax, TopkMethod::Greedy | TopkMethod::GroupLimitedGreedy) => {}
            (Family::V2, _, _) => {
                return Err(err(
                    "topk_method",
                    "deepseek_v2 routes with scoring_func `softmax` and topk_method `greedy` or `group_limited_greedy`".into(),
                ))
            }
        }
        let n_group = self.n_group.unwrap_or(1);
        let topk_group = self.topk_group.unwrap_or(1);
        let any_moe = n_routed_experts > 0 && first_k_dense_replace < num_hidden_layers;
        if any_moe {
            if num_experts_per_tok == 0 || num_experts_per_tok > n_routed_experts {
                return Err(err(
                    "num_experts_per_tok",
                    format!("must be in 1..={n_routed_experts} (n_routed_experts), got {num_experts_per_tok}"),
                ));
            }
            if moe_intermediate_size == 0 {
                return Err(err("moe_intermediate_size", "must be > 0".into()));
            }
            if n_group == 0 || !n_routed_experts.is_multiple_of(n_group) {
                return Err(err(
                    "n_group",
                    format!("n_routed_experts ({n_routed_experts}) must split evenly into n_group ({n_group}) groups"),
                ));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(err(
                    "topk_group",
                    format!("must be in 1..={n_group} (n_group), got {topk_group}"),
                ));
            }
            let grouped = topk_method != TopkMethod::Greedy;
            let per_group = n_routed_experts / n_group;
            if grouped && topk_group * per_group < num_experts_per_tok {
                return Err(err(
                    "topk_group",
                    format!(
                        "{topk_group} group(s) of {per_group} experts cannot supply num_experts_per_tok ({num_experts_per_tok}) experts"
                    ),
                ));
            }
            if topk_method == TopkMethod::NoauxTc && per_group < 2 {
                return Err(err(
                    "n_group",
                    format!("noaux_tc scores a group by its two best experts; groups of {per_group} are too small"),
                ));
            }
        }

        let (rope_theta, rope_scaling) = parse_rope(&self, path)?;
        let max_position_embeddings = self
            .max_position_embeddings
            .unwrap_or(if v3 { 4096 } else { 2048 });
        let eos_token_ids = match &self.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
            Some(other) => {
                return Err(err(
                    "eos_token_id",
                    format!("expected an integer or a list of integers, got {other}"),
                ))
            }
        };
        let quantization = parse_quantization(self.quantization_config.as_ref(), path)?;

        Ok(Config {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            moe_intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
            n_routed_experts,
            n_shared_experts,
            num_experts_per_tok,
            n_group,
            topk_group,
            first_k_dense_replace,
            moe_layer_freq,
            norm_topk_prob: self.norm_topk_prob.unwrap_or(v3),
            routed_scaling_factor: self
                .routed_scaling_factor
                .unwrap_or(if v3 { 2.5 } else { 1.0 }),
            scoring_func,
            topk_method,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            // V2's reference rotates consecutive pairs (complex multiply): interleaved.
            rope_interleave: if v3 {
                self.rope_interleave.unwrap_or(true)
            } else {
                true
            },
            max_position_embeddings,
            attention_bias: self.attention_bias.unwrap_or(false),
            mlp_bias: !v3 && self.mlp_bias.unwrap_or(false),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id: self.bos_token_id,
            eos_token_ids,
            pad_token_id: self.pad_token_id,
            num_nextn_predict_layers: self.num_nextn_predict_layers.unwrap_or(0),
            quantization,
        })
    }
}

/// Reads `rope_parameters` (transformers 5) or the older top-level `rope_theta`
/// plus `rope_scaling`.
fn parse_rope(raw: &RawConfig, path: &Path) -> Result<(f64, RopeScaling)> {
    let (field, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
        (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_parameters", None),
    };
    let err = |key: &str, msg: String| Error::config(path, format!("{field}.{key}"), msg);
    let obj = match params {
        None => None,
        Some(serde_json::Value::Object(o)) => Some(o),
        Some(other) => {
            return Err(Error::config(
                path,
                field,
                format!("expected an object, got {other}"),
            ))
        }
    };
    let num = |key: &str| -> Result<Option<f64>> {
        match obj.and_then(|o| o.get(key)) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| err(key, format!("expected a number, got {v}"))),
        }
    };
    let rope_theta = num("rope_theta")?.or(raw.rope_theta).unwrap_or(10000.0);
    if rope_theta <= 0.0 {
        return Err(err("rope_theta", format!("must be > 0, got {rope_theta}")));
    }
    let kind = obj
        .and_then(|o| o.get("rope_type").or_else(|| o.get("type")))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "yarn" => {
            let max_pos = raw.max_position_embeddings.unwrap_or(4096);
            let original = num("original_max_position_embeddings")?
                .map(|v| v as usize)
                .unwrap_or(max_pos);
            let factor = match num("factor")? {
                Some(f) => f,
                None => max_pos as f64 / original as f64,
            };
            if factor <= 0.0 {
                return Err(err("factor", format!("must be > 0, got {factor}")));
            }
            let truncate = obj
                .and_then(|o| o.get("truncate"))
                .and_then(|v| v.as_bool())
                .unwrap_or(true);
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                // transformers: `get("beta_fast") or 32`, so 0 also means the default.
                beta_fast: num("beta_fast")?.filter(|v| *v != 0.0).unwrap_or(32.0),
                beta_slow: num("beta_slow")?.filter(|v| *v != 0.0).unwrap_or(1.0),
                mscale: num("mscale")?,
                mscale_all_dim: num("mscale_all_dim")?,
                attention_factor: num("attention_factor")?,
                truncate,
            }
        }
        other => {
            return Err(err(
                "rope_type",
                format!("`{other}` is not supported (expected `default` or `yarn`)"),
            ))
        }
    };
    Ok((rope_theta, scaling))
}

fn parse_quantization(q: Option<&serde_json::Value>, path: &Path) -> Result<Option<Fp8Quantization>> {
    let Some(q) = q.filter(|q| !q.is_null()) else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(|v| v.as_str()).unwrap_or("");
    if method != "fp8" {
        return Err(Error::config(
            path,
            "quantization_config.quant_method",
            format!("`{method}` is not supported (only block-wise `fp8`)"),
        ));
    }
    let block = match q.get("weight_block_size") {
        None | Some(serde_json::Value::Null) => [128, 128],
        Some(v) => {
            let dims: Vec<usize> = v
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect())
                .unwrap_or_default();
            match dims.as_slice() {
                [r, c] if *r > 0 && *c > 0 => [*r, *c],
                _ => {
                    return Err(Error::config(
                        path,
                        "quantization_config.weight_block_size",
                        format!("expected two positive integers, got {v}"),
                    ))
                }
            }
        }
    };
    Ok(Some(Fp8Quantization {
        weight_block_size: block,
    }))
}
