//! The two basic blocks every other block is made of: a bias-optional linear
//! map and RMSNorm, each built from checkpoint names.

use tch::{Kind, Tensor};

use super::loader::Loader;
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
    /// Loads `{prefix}.weight` \[out, in\] and, when `bias`, `{prefix}.bias` \[out\].
    pub fn load(ld: &Loader, prefix: &str, out: usize, bias: bool) -> Result<Linear> {
        let weight = ld.weight(&format!("{prefix}.weight"))?;
        let bias = if bias { Some(ld.small(&format!("{prefix}.bias"), &[out as i64], ld.kind())?) } else { None };
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
    pub fn load(ld: &Loader, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let weight = ld.small(&format!("{name}.weight"), &[dim as i64], ld.kind())?;
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
