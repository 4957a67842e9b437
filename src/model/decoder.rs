//! One pre-norm decoder layer: `h += attn(norm(h)); h += ffn(norm(h))`, where
//! the feed-forward block is a dense SwiGLU for the first
//! `first_k_dense_replace` layers and DeepSeekMoE after them.

use tch::{Device, Tensor};

use super::config::Config;
use super::loader::LoadPath;
use super::hooks::{HookPoint, Hooks};
use super::mla::{AttnImpl, LatentCache, Mla};
use super::moe::{Mlp, Moe, RouterOutput};
use super::nn::RmsNorm;
use super::rope::{Rope, RopeAngles};
use crate::error::Result;

/// The feed-forward half of a layer.
#[derive(Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub index: usize,
    /// Where the layer's weights and computation live.
    pub device: Device,
    pub input_layernorm: RmsNorm,
    pub self_attn: Mla,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
}

/// A layer's output and what it recorded.
#[derive(Debug)]
pub struct LayerOutput {
    /// Residual stream after the layer [B, T, D].
    pub hidden: Tensor,
    pub routing: Option<RouterOutput>,
}

impl DecoderLayer {
    /// Loads layer `index` from `layers`, the path `model.layers`.
    pub fn load(layers: &LoadPath, index: usize, cfg: &Config) -> Result<DecoderLayer> {
        let p = layers.pp(index);
        let d = cfg.hidden_size;
        let mlp = if cfg.is_moe_layer(index) {
            FeedForward::Moe(Moe::load(&p.pp("mlp"), cfg)?)
        } else {
            FeedForward::Dense(Mlp::load(&p.pp("mlp"), d, cfg.intermediate_size, cfg.mlp_bias)?)
        };
        Ok(DecoderLayer {
            index,
            device: p.loader().device_of_layer(Some(index)),
            input_layernorm: RmsNorm::load(&p.pp("input_layernorm"), d, cfg.rms_norm_eps)?,
            self_attn: Mla::load(&p.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(&p.pp("post_attention_layernorm"), d, cfg.rms_norm_eps)?,
            mlp,
        })
    }

    /// The projection weights every pass reads: attention, the dense MLP or
    /// the shared experts (not the routed experts).
    pub fn every_pass_weights(&self) -> Vec<&super::weight::Weight> {
        let mut w = self.self_attn.weights();
        match &self.mlp {
            FeedForward::Dense(m) => w.extend(m.weights()),
            FeedForward::Moe(m) => w.extend(m.shared_experts.iter().flat_map(|s| s.weights())),
        }
        w
    }

    /// Every projection weight of the layer, routed experts included.
    pub fn weights(&self) -> Vec<&super::weight::Weight> {
        let mut w = self.every_pass_weights();
        if let Some(m) = self.moe() {
            w.extend(m.experts.iter().flat_map(|e| e.weights()));
        }
        w
    }

    /// The layer's small tensors: norms, router, `e_score_correction_bias`, biases.
    pub fn small_tensors(&self) -> Vec<&Tensor> {
        let a = &self.self_attn;
        let mut t = vec![&self.input_layernorm.weight, &self.post_attention_layernorm.weight, &a.kv_a_layernorm.weight];
        if let super::mla::QProj::LowRank { a: qa, norm, .. } = &a.q {
            t.push(&norm.weight);
            t.extend(qa.bias.as_ref());
        }
        t.extend(a.kv_a_proj_with_mqa.bias.as_ref());
        t.extend(a.o_proj.bias.as_ref());
        let mlps: Vec<&Mlp> = match &self.mlp {
            FeedForward::Dense(m) => vec![m],
            FeedForward::Moe(m) => {
                t.push(&m.gate.weight);
                t.extend(m.gate.e_score_correction_bias.as_ref());
                m.experts.iter().chain(m.shared_experts.as_ref()).collect()
            }
        };
        for m in mlps {
            t.extend(m.gate_up.bias.as_ref());
            t.extend(m.down_proj.bias.as_ref());
        }
        t
    }

    /// Asks for the layer's streamed weights to be read ahead (not the routed
    /// experts: the router has not chosen them yet).
    pub fn prefetch(&self) {
        self.every_pass_weights().iter().for_each(|w| w.prefetch());
    }

    pub fn moe(&self) -> Option<&Moe> {
        match &self.mlp {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }

    /// The layer on `h` [B, T, D]. With `route_only` and an MoE layer, it
    /// stops once the router has chosen: no expert runs, and `hidden` is the
    /// residual stream after attention (`ResidMid`), not after the layer.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        h: &Tensor,
        rope: &Rope,
        angles: &RopeAngles,
        cache: Option<&mut LatentCache>,
        attn: AttnImpl,
        hooks: &mut dyn Hooks,
        route_only: bool,
    ) -> Result<LayerOutput> {
        use HookPoint::*;
        let l = self.index;
        let h = hooks.visit(ResidPre(l), h.shallow_clone())?;
        let normed = hooks.visit(AttnIn(l), self.input_layernorm.forward(&h)?)?;
        let a = self.self_attn.forward(&normed, rope, angles, cache, attn, hooks, l)?;
        let a = hooks.visit(AttnOut(l), a)?;
        let h = hooks.visit(ResidMid(l), h.f_add(&a)?)?;
        let normed = hooks.visit(MlpIn(l), self.post_attention_layernorm.forward(&h)?)?;
        if let (true, FeedForward::Moe(m)) = (route_only, &self.mlp) {
            let d = normed.size().last().copied().unwrap_or(0);
            let routing = m.choose(&normed.f_reshape([-1, d])?, hooks, l)?;
            return Ok(LayerOutput { hidden: h, routing: Some(routing) });
        }
        let (f, routing) = match &self.mlp {
            FeedForward::Dense(m) => (m.forward(&normed)?, None),
            FeedForward::Moe(m) => {
                let o = m.forward_hooked(&normed, hooks, l)?;
                (o.output, Some(o.routing))
            }
        };
        let f = hooks.visit(MlpOut(l), f)?;
        Ok(LayerOutput {
            hidden: hooks.visit(ResidPost(l), h.f_add(&f)?)?,
            routing,
        })
    }
}
