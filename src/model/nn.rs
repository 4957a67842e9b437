//! The two basic blocks every other block is made of: a bias-optional linear
//! map and RMSNorm, each built from checkpoint names.

use tch::{Device, Kind, Tensor};

use super::loader::Checkpoint;
use crate::error::Result;

/// Where and in which dtype weights are placed.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub device: Device,
    pub kind: Kind,
}

/// `y = x W^T (+ b)`; `weight` is [out, in] as in the checkpoint.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` \[out, in\] and, when `bias`, `{prefix}.bias` \[out\].
    pub fn load(ck: &Checkpoint, prefix: &str, out: usize, inp: usize, bias: bool, p: Placement) -> Result<Linear> {
        let weight = ck.tensor(&format!("{prefix}.weight"), &[out as i64, inp as i64], p.kind, p.device)?;
        let bias = if bias {
            Some(ck.tensor(&format!("{prefix}.bias"), &[out as i64], p.kind, p.device)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// RMSNorm as in `transformers`: normalise in f32, cast back, then scale.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(ck: &Checkpoint, name: &str, dim: usize, eps: f64, p: Placement) -> Result<RmsNorm> {
        let weight = ck.tensor(&format!("{name}.weight"), &[dim as i64], p.kind, p.device)?;
        Ok(RmsNorm { weight, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let xf = x.f_to_kind(Kind::Float)?;
        let var = xf.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = xf.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(kind)?)?)
    }
}
