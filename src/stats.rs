//! Arithmetic on a [`Config`]: parameter counts and KV-cache size, computed
//! from the shapes alone (no weights needed, so it works for DeepSeek-V3 too).

use std::fmt;

use crate::model::config::{Config, TopkMethod};

/// Parameter counts of a model, from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Everything the checkpoint holds for the main stack (MTP layers excluded).
    pub total: u64,
    /// What one token computes with: all but the routed experts it is not
    /// sent to and the input embedding table (a row lookup, not a matmul; when
    /// tied to the LM head it counts once, as the head). This is the
    /// convention behind DeepSeek's published "activated" figures (V3: 37B).
    pub active_per_token: u64,
    pub embedding: u64,
    pub lm_head: u64,
    pub attention: u64,
    pub dense_mlp: u64,
    pub routed_experts: u64,
    pub shared_experts: u64,
    pub routers: u64,
    pub norms: u64,
}

impl ParamCounts {
    pub fn of(cfg: &Config) -> ParamCounts {
        let u = |x: usize| x as u64;
        let (d, h, v) = (u(cfg.hidden_size), u(cfg.num_attention_heads), u(cfg.vocab_size));
        let (nope, rope, vd, kvl) = (
            u(cfg.qk_nope_head_dim),
            u(cfg.qk_rope_head_dim),
            u(cfg.v_head_dim),
            u(cfg.kv_lora_rank),
        );
        let ab = cfg.attention_bias as u64;
        let q = match cfg.q_lora_rank {
            None => d * h * (nope + rope),
            Some(r) => {
                let r = u(r);
                d * r + ab * r + r * h * (nope + rope)
            }
        };
        let attn_layer = q + d * (kvl + rope) + ab * (kvl + rope) + kvl * h * (nope + vd) + h * vd * d + ab * d;
        let attn_norms = kvl + cfg.q_lora_rank.map_or(0, u);
        let mb = cfg.mlp_bias as u64;
        let swiglu = |inter: u64| 3 * d * inter + mb * (2 * inter + d);
        let n_moe = u(cfg.moe_layers().len());
        let n_dense = u(cfg.num_hidden_layers) - n_moe;
        let e = u(cfg.n_routed_experts);
        let expert = swiglu(u(cfg.moe_intermediate_size));
        let router = e * d + if cfg.topk_method == TopkMethod::NoauxTc { e } else { 0 };
        let shared = if cfg.n_shared_experts > 0 {
            swiglu(u(cfg.moe_intermediate_size * cfg.n_shared_experts))
        } else {
            0
        };
        let layers = u(cfg.num_hidden_layers);
        let embedding = v * d;
        let lm_head = if cfg.tie_word_embeddings { 0 } else { v * d };
        let attention = layers * attn_layer;
        let dense_mlp = n_dense * swiglu(u(cfg.intermediate_size));
        let routed_experts = n_moe * e * expert;
        let shared_experts = n_moe * shared;
        let routers = n_moe * router;
        let norms = layers * (2 * d + attn_norms) + d;
        let total = embedding + lm_head + attention + dense_mlp + routed_experts + shared_experts + routers + norms;
        let idle = n_moe * (e - u(cfg.num_experts_per_tok).min(e)) * expert;
        ParamCounts {
            total,
            active_per_token: total - idle - if cfg.tie_word_embeddings { 0 } else { embedding },
            embedding,
            lm_head,
            attention,
            dense_mlp,
            routed_experts,
            shared_experts,
            routers,
            norms,
        }
    }
}

impl fmt::Display for ParamCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} parameters, {} active per token",
            human_count(self.total),
            human_count(self.active_per_token)
        )
    }
}

/// KV-cache size per token, for MLA and the layouts it is compared with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheFootprint {
    /// Elements per token per layer that absorbed MLA caches: `kv_lora + rope`.
    pub absorbed_elems: u64,
    /// Per-head keys and values expanded from the latent:
    /// `H*(nope+rope) + H*v`: what an implementation that caches expanded
    /// per-head keys and values holds (transformers 5.23 caches the latent
    /// and re-expands it at every step instead).
    pub naive_elems: u64,
    /// Plain multi-head attention with the same heads and head dim
    /// `qk_nope_head_dim`: `2*H*nope`.
    pub mha_elems: u64,
    /// One key/value head of the model's own head dims: `nope + rope + v`
    /// (a key of `nope + rope`, a value of `v`).
    pub kv_head_elems: u64,
    /// `v_head_dim`, the per-head dimension the DeepSeek-V2 paper compares
    /// with (`2 * n_groups * d_h` for GQA).
    pub head_dim: u64,
    pub layers: u64,
    pub bytes_per_elem: u64,
}

impl CacheFootprint {
    pub fn of(cfg: &Config, bytes_per_elem: usize) -> CacheFootprint {
        let h = cfg.num_attention_heads as u64;
        let (nope, rope, v) = (
            cfg.qk_nope_head_dim as u64,
            cfg.qk_rope_head_dim as u64,
            cfg.v_head_dim as u64,
        );
        CacheFootprint {
            absorbed_elems: cfg.kv_lora_rank as u64 + rope,
            naive_elems: h * (nope + rope) + h * v,
            mha_elems: 2 * h * nope,
            kv_head_elems: nope + rope + v,
            head_dim: v,
            layers: cfg.num_hidden_layers as u64,
            bytes_per_elem: bytes_per_elem as u64,
        }
    }

    /// Bytes per token over all layers: `(absorbed, naive, mha)`.
    pub fn bytes_per_token(&self) -> (u64, u64, u64) {
        let k = self.layers * self.bytes_per_elem;
        (self.absorbed_elems * k, self.naive_elems * k, self.mha_elems * k)
    }

    /// How many times smaller the absorbed cache is than the naive one.
    pub fn naive_ratio(&self) -> f64 {
        self.naive_elems as f64 / self.absorbed_elems as f64
    }

    pub fn mha_ratio(&self) -> f64 {
        self.mha_elems as f64 / self.absorbed_elems as f64
    }

    /// Elements per token per layer of grouped-query attention with
    /// `kv_heads` key/value heads of the model's own head dims (1: multi-query
    /// attention; every head: multi-head attention, the naive figure).
    pub fn grouped_elems(&self, kv_heads: u64) -> u64 {
        kv_heads * self.kv_head_elems
    }

    /// How many GQA groups cache as much as MLA, in the DeepSeek-V2 paper's
    /// terms (GQA caches `2 * n_groups * d_h` per token and layer):
    /// `(kv_lora + rope) / (2 * d_h)`.
    pub fn gqa_groups_equivalent(&self) -> f64 {
        self.absorbed_elems as f64 / (2 * self.head_dim) as f64
    }
}

impl fmt::Display for CacheFootprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, n, m) = self.bytes_per_token();
        write!(
            f,
            "KV cache per token: MLA absorbed {} ({} elems/layer), naive {} ({:.1}x), MHA {} ({:.1}x)",
            human_bytes(a),
            self.absorbed_elems,
            human_bytes(n),
            self.naive_ratio(),
            human_bytes(m),
            self.mha_ratio()
        )
    }
}

/// `1234567` -> `1.23M`.
pub fn human_count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// Bytes in binary units (`68.6 KiB`).
pub fn human_bytes(n: u64) -> String {
    let x = n as f64;
    const K: f64 = 1024.0;
    if x >= K * K * K {
        format!("{:.2} GiB", x / (K * K * K))
    } else if x >= K * K {
        format!("{:.2} MiB", x / (K * K))
    } else if x >= K {
        format!("{:.1} KiB", x / K)
    } else {
        format!("{n} B")
    }
}
