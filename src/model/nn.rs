//! The two basic blocks every other block is made of: a bias-optional linear
//! map and RMSNorm, each built from checkpoint names.

use tch::{Device, Kind, Tensor};

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

/// Whether `t` is f32 on the CPU with no gradient to record: what the
/// one-loop decode-step paths (here, in `rope` and in `moe`) need before
/// they read its data directly.
pub(crate) fn cpu_f32_no_grad(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && !t.requires_grad()
}

/// SwiGLU's `silu(g) * u` for one pair of values, as the one-loop decode
/// paths (`moe`'s activation, `gemv`'s whole feed-forward block) compute it.
#[inline]
pub(crate) fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// Rows up to which [`RmsNorm`] computes an f32 norm on the CPU in one loop.
pub const FEW_ROWS: usize = 8;

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
        if let Some(y) = self.few_rows_f32(x)? {
            return Ok(y);
        }
        let kind = x.kind();
        let xf = x.f_to_kind(Kind::Float)?;
        let var = xf.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = xf.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(kind)?)?)
    }

    /// The same norm for at most [`FEW_ROWS`] rows of a contiguous f32 CPU
    /// tensor with nothing requiring a gradient (a decode step), computed in
    /// one loop instead of eight libtorch operations: at a decode step each
    /// operation costs more in dispatch than in arithmetic. `None` otherwise.
    fn few_rows_f32(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let w = &self.weight;
        let d = w.numel();
        if d == 0 || x.size().last().copied() != Some(d as i64) || x.numel() > FEW_ROWS * d || !cpu_f32_no_grad(x) || !cpu_f32_no_grad(w) || !w.is_contiguous() {
            return Ok(None);
        }
        // a slice of a wider row (the latent part of kv_a_proj's output)
        let x = &x.f_contiguous()?;
        let n = x.numel();
        let out = x.f_empty_like()?;
        if n == 0 {
            return Ok(Some(out));
        }
        // SAFETY: `x`, `w` and `out` are contiguous f32 CPU tensors of n, d
        // and n elements (checked above, `out` made like `x`), alive for the
        // whole function; `out` is new and written only here.
        let (xs, ws, ys) = unsafe {
            (
                std::slice::from_raw_parts(x.data_ptr() as *const f32, n),
                std::slice::from_raw_parts(w.data_ptr() as *const f32, d),
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
            )
        };
        for (row, dst) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (mean + self.eps as f32).sqrt();
            for ((y, v), g) in dst.iter_mut().zip(row).zip(ws) {
                *y = g * (v * r);
            }
        }
        Ok(Some(out))
    }
}
