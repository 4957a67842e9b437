//! The checkpoint layout of a config: every tensor name and shape, and how the
//! model groups them into weights. One record serves loading, planning
//! ([`super::plan`]), writing random checkpoints ([`super::synth`]) and
//! training's checkpoint writer.

use tch::Kind;

use super::config::{Config, TopkMethod};

/// Checkpoint names and shapes of a model with config `cfg` (no FP8 scales,
/// no multi-token-prediction layers), in the order the model reads them.
pub fn weight_shapes(cfg: &Config) -> Vec<(String, Vec<i64>)> {
    weight_specs(cfg)
        .into_iter()
        .flat_map(|s| {
            let shape = s.source_shape();
            s.sources.into_iter().map(move |n| (n, shape.clone()))
        })
        .collect()
}

/// What a weight belongs to: the unit of residency decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// `model.embed_tokens`: only the rows of the input tokens are read.
    Embed,
    /// Norms, routers, `e_score_correction_bias`, biases: small, read every
    /// pass, always resident.
    Small(Option<usize>),
    /// The attention projections of a layer.
    Attention(usize),
    /// A dense layer's MLP.
    DenseMlp(usize),
    /// A MoE layer's shared experts.
    SharedExperts(usize),
    /// Routed expert (layer, expert).
    Expert(usize, usize),
    /// `lm_head`, read in full every pass.
    LmHead,
}

impl Unit {
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Unit::Embed | Unit::LmHead => None,
            Unit::Small(l) => l,
            Unit::Attention(l) | Unit::DenseMlp(l) | Unit::SharedExperts(l) | Unit::Expert(l, _) => Some(l),
        }
    }

    /// A short name for tables: `attention`, `routed experts`, ...
    pub fn label(&self) -> &'static str {
        match self {
            Unit::Embed => "embed_tokens",
            Unit::Small(_) => "norms, routers, biases",
            Unit::Attention(_) => "attention",
            Unit::DenseMlp(_) => "dense MLP",
            Unit::SharedExperts(_) => "shared experts",
            Unit::Expert(..) => "routed experts",
            Unit::LmHead => "lm_head",
        }
    }
}

/// One weight as the model holds it: one checkpoint tensor, or two stacked
/// along rows (`gate_proj` and `up_proj` become `gate_up_proj`).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightSpec {
    /// The model's name (`...gate_up_proj.weight` for a stacked pair).
    pub name: String,
    /// Checkpoint tensors, stacked in this order.
    pub sources: Vec<String>,
    /// Shape of the whole (stacked) weight.
    pub shape: Vec<i64>,
    pub unit: Unit,
    /// A projection matrix: may be stored as FP8, may stay packed or on disk.
    /// Norms, routers and biases are not.
    pub matrix: bool,
}

impl WeightSpec {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Shape of each source tensor (stacked sources split the rows evenly).
    pub fn source_shape(&self) -> Vec<i64> {
        let mut s = self.shape.clone();
        if let Some(r) = s.first_mut() {
            *r /= self.sources.len().max(1) as i64;
        }
        s
    }

    /// Bytes of the checkpoint tensors behind this weight stored as `st`
    /// (each source with its own block scales).
    pub fn stored_bytes(&self, st: Stored) -> u64 {
        st.bytes(&self.source_shape()) * self.sources.len() as u64
    }
}

/// How a weight is stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Plain(Kind),
    /// FP8 e4m3 with f32 scales per `[rows, cols]` block.
    Fp8([i64; 2]),
}

impl Stored {
    /// Bytes of a `shape` weight stored this way (scales included).
    pub fn bytes(&self, shape: &[i64]) -> u64 {
        let n: i64 = shape.iter().product();
        match *self {
            Stored::Plain(k) => n.max(0) as u64 * k.elt_size_in_bytes() as u64,
            Stored::Fp8([br, bc]) => {
                let rows = shape.first().copied().unwrap_or(1);
                let cols = shape.get(1).copied().unwrap_or(1);
                let scales = ((rows + br - 1) / br) * ((cols + bc - 1) / bc);
                n.max(0) as u64 + 4 * scales.max(0) as u64
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Stored::Plain(Kind::BFloat16) => "bf16".into(),
            Stored::Plain(Kind::Half) => "f16".into(),
            Stored::Plain(Kind::Float) => "f32".into(),
            Stored::Plain(k) => format!("{k:?}"),
            Stored::Fp8(_) => "FP8".into(),
        }
    }
}

/// The weights of a model with config `cfg`, grouped as the model holds them.
pub fn weight_specs(cfg: &Config) -> Vec<WeightSpec> {
    let i = |x: usize| x as i64;
    let (d, h, v) = (i(cfg.hidden_size), i(cfg.num_attention_heads), i(cfg.vocab_size));
    let qk = i(cfg.qk_head_dim());
    let mut out = Vec::new();
    let one = |name: String, shape: Vec<i64>, unit: Unit, matrix: bool| WeightSpec {
        sources: vec![name.clone()],
        name,
        shape,
        unit,
        matrix,
    };
    out.push(one("model.embed_tokens.weight".into(), vec![v, d], Unit::Embed, true));
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let small = Unit::Small(Some(l));
        let attn = Unit::Attention(l);
        out.push(one(format!("{p}.input_layernorm.weight"), vec![d], small, false));
        out.push(one(format!("{p}.post_attention_layernorm.weight"), vec![d], small, false));
        let ab = cfg.attention_bias;
        match cfg.q_lora_rank {
            None => out.push(one(format!("{p}.self_attn.q_proj.weight"), vec![h * qk, d], attn, true)),
            Some(r) => {
                out.push(one(format!("{p}.self_attn.q_a_proj.weight"), vec![i(r), d], attn, true));
                if ab {
                    out.push(one(format!("{p}.self_attn.q_a_proj.bias"), vec![i(r)], small, false));
                }
                out.push(one(format!("{p}.self_attn.q_a_layernorm.weight"), vec![i(r)], small, false));
                out.push(one(format!("{p}.self_attn.q_b_proj.weight"), vec![h * qk, i(r)], attn, true));
            }
        }
        let kv_a = i(cfg.kv_lora_rank + cfg.qk_rope_head_dim);
        out.push(one(format!("{p}.self_attn.kv_a_proj_with_mqa.weight"), vec![kv_a, d], attn, true));
        if ab {
            out.push(one(format!("{p}.self_attn.kv_a_proj_with_mqa.bias"), vec![kv_a], small, false));
            out.push(one(format!("{p}.self_attn.o_proj.bias"), vec![d], small, false));
        }
        out.push(one(format!("{p}.self_attn.kv_a_layernorm.weight"), vec![i(cfg.kv_lora_rank)], small, false));
        let kv_b = vec![h * i(cfg.qk_nope_head_dim + cfg.v_head_dim), i(cfg.kv_lora_rank)];
        out.push(one(format!("{p}.self_attn.kv_b_proj.weight"), kv_b, attn, true));
        out.push(one(format!("{p}.self_attn.o_proj.weight"), vec![d, h * i(cfg.v_head_dim)], attn, true));
        let mb = cfg.mlp_bias;
        let mut mlp = |prefix: String, inter: i64, unit: Unit| {
            out.push(WeightSpec {
                name: format!("{prefix}.gate_up_proj.weight"),
                sources: vec![format!("{prefix}.gate_proj.weight"), format!("{prefix}.up_proj.weight")],
                shape: vec![2 * inter, d],
                unit,
                matrix: true,
            });
            out.push(one(format!("{prefix}.down_proj.weight"), vec![d, inter], unit, true));
            if mb {
                let bias = Unit::Small(Some(l));
                out.push(one(format!("{prefix}.gate_proj.bias"), vec![inter], bias, false));
                out.push(one(format!("{prefix}.up_proj.bias"), vec![inter], bias, false));
                out.push(one(format!("{prefix}.down_proj.bias"), vec![d], bias, false));
            }
        };
        if cfg.is_moe_layer(l) {
            let im = i(cfg.moe_intermediate_size);
            for e in 0..cfg.n_routed_experts {
                mlp(format!("{p}.mlp.experts.{e}"), im, Unit::Expert(l, e));
            }
            if cfg.n_shared_experts > 0 {
                mlp(format!("{p}.mlp.shared_experts"), im * i(cfg.n_shared_experts), Unit::SharedExperts(l));
            }
            out.push(one(format!("{p}.mlp.gate.weight"), vec![i(cfg.n_routed_experts), d], small, false));
            if cfg.topk_method == TopkMethod::NoauxTc {
                out.push(one(format!("{p}.mlp.gate.e_score_correction_bias"), vec![i(cfg.n_routed_experts)], small, false));
            }
        } else {
            mlp(format!("{p}.mlp"), i(cfg.intermediate_size), Unit::DenseMlp(l));
        }
    }
    out.push(one("model.norm.weight".into(), vec![d], Unit::Small(None), false));
    if !cfg.tie_word_embeddings {
        out.push(one("lm_head.weight".into(), vec![v, d], Unit::LmHead, true));
    }
    out
}

/// How the published checkpoint of `cfg` stores `spec` when nothing but the
/// config is known: FP8 for the projections of a `quantization_config`
/// checkpoint (not embeddings, `lm_head` or routers), `e_score_correction_bias`
/// in f32, the rest in `dtype` (the config's `torch_dtype`, usually bf16).
pub fn assumed_storage(cfg: &Config, spec: &WeightSpec, dtype: Kind) -> Stored {
    if spec.name.ends_with("e_score_correction_bias") {
        return Stored::Plain(Kind::Float);
    }
    match &cfg.quantization {
        Some(q) if spec.matrix && !matches!(spec.unit, Unit::Embed | Unit::LmHead) => {
            Stored::Fp8([q.weight_block_size[0] as i64, q.weight_block_size[1] as i64])
        }
        _ => Stored::Plain(dtype),
    }
}
