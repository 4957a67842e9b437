//! The two basic blocks every other block is made of: a bias-optional linear
//! map and RMSNorm, each built from checkpoint names.

use tch::{Kind, Tensor};

use super::loader::LoadPath;
use super::weight::Weight;
use crate::error::Result;

/// `y = x W^T (+ b)`; `weight` is [out, in] as in the checkpoint, stored
/// however the plan placed it (see [`Weight`]).
#[derive(Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` \[out, in\] and, when `bias`, `bias` \[out\] under `p`.
    pub fn load(p: &LoadPath, out: usize, bias: bool) -> Result<Linear> {
        let weight = p.weight("weight")?;
        let bias = if bias { Some(p.small("bias", &[out as i64], p.loader().kind())?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.linear_with_bias(x, self.bias.as_ref())
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        self.weight.shape[0]
    }
}

/// RMSNorm as in `transformers`: normalise in f32, cast back, then scale.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(p: &LoadPath, dim: usize, eps: f64) -> Result<RmsNorm> {
        let weight = p.small("weight", &[dim as i64], p.loader().kind())?;
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
