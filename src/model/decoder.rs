//! One pre-norm decoder layer: `h += attn(norm(h)); h += ffn(norm(h))`, where
//! the feed-forward block is a dense SwiGLU for the first
//! `first_k_dense_replace` layers and DeepSeekMoE after them.

use tch::Tensor;

use super::config::Config;
use super::loader::Checkpoint;
use super::hooks::{HookPoint, Hooks};
use super::mla::{AttnImpl, LatentCache, Mla};
use super::moe::{Mlp, Moe, RouterOutput};
use super::nn::{Placement, RmsNorm};
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
    pub fn load(ck: &Checkpoint, index: usize, cfg: &Config, p: Placement) -> Result<DecoderLayer> {
        let prefix = format!("model.layers.{index}");
        let d = cfg.hidden_size;
        let mlp = if cfg.is_moe_layer(index) {
            FeedForward::Moe(Moe::load(ck, &format!("{prefix}.mlp"), cfg, p)?)
        } else {
            FeedForward::Dense(Mlp::load(
                ck,
                &format!("{prefix}.mlp"),
                d,
                cfg.intermediate_size,
                cfg.mlp_bias,
                p,
            )?)
        };
        Ok(DecoderLayer {
            index,
            input_layernorm: RmsNorm::load(ck, &format!("{prefix}.input_layernorm"), d, cfg.rms_norm_eps, p)?,
            self_attn: Mla::load(ck, &format!("{prefix}.self_attn"), cfg, p)?,
            post_attention_layernorm: RmsNorm::load(
                ck,
                &format!("{prefix}.post_attention_layernorm"),
                d,
                cfg.rms_norm_eps,
                p,
            )?,
            mlp,
        })
    }

    pub fn moe(&self) -> Option<&Moe> {
        match &self.mlp {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        h: &Tensor,
        rope: &Rope,
        angles: &RopeAngles,
        cache: Option<&mut LatentCache>,
        attn: AttnImpl,
        hooks: &mut dyn Hooks,
    ) -> Result<LayerOutput> {
        use HookPoint::*;
        let l = self.index;
        let h = hooks.visit(ResidPre(l), h.shallow_clone())?;
        let normed = hooks.visit(AttnIn(l), self.input_layernorm.forward(&h)?)?;
        let a = self.self_attn.forward(&normed, rope, angles, cache, attn, hooks, l)?;
        let a = hooks.visit(AttnOut(l), a)?;
        let h = hooks.visit(ResidMid(l), h.f_add(&a)?)?;
        let normed = hooks.visit(MlpIn(l), self.post_attention_layernorm.forward(&h)?)?;
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
