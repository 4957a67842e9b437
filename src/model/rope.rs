//! Decoupled rotary position embedding (RoPE) for the `q_pe` / `k_pe` parts.
//!
//! Frequencies follow `transformers`' `compute_default_rope_parameters` and
//! `_compute_yarn_parameters` (YaRN, arXiv:2309.00071). Rotated vectors come out
//! in "rotate-half" layout `[x1', x2']`; for interleaved storage
//! (`rope_interleave`, and always for V2) the pairs `(x0, x1), (x2, x3)...` are
//! rotated, as DeepSeek stores them. Dot products `q_pe . k_pe` do not depend
//! on the output layout as long as queries and keys share it.

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use super::config::{yarn_get_mscale, Config, RopeScaling};
use super::nn::cpu_f32_no_grad;
use crate::error::Result;

/// Elements up to which [`Rope::apply`] rotates f32 on the CPU in one loop.
pub const FEW_ELEMENTS: usize = 8192;

#[derive(Debug)]
pub struct Rope {
    /// [rope/2] f32.
    pub inv_freq: Tensor,
    /// YaRN's factor on cos and sin (1 for plain RoPE).
    pub attention_scaling: f64,
    pub interleave: bool,
}

/// cos and sin for a run of positions: each [T, rope/2], model dtype.
#[derive(Debug)]
pub struct RopeAngles {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeAngles {
    /// The same angles on `device` (layers split across GPUs).
    pub fn to_device(&self, device: Device) -> Result<RopeAngles> {
        Ok(RopeAngles { cos: self.cos.f_to_device(device)?, sin: self.sin.f_to_device(device)? })
    }
}

impl Rope {
    pub fn new(cfg: &Config, device: Device) -> Result<Rope> {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        // inv_freq_i = base^(-2i/dim), i = 0..dim/2
        let pos_freqs: Vec<f64> = (0..dim / 2)
            .map(|i| base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let (inv, scaling) = match &cfg.rope_scaling {
            RopeScaling::Default => (pos_freqs.iter().map(|p| 1.0 / p).collect::<Vec<_>>(), 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let attention = match attention_factor {
                    Some(a) => *a,
                    None => match (mscale, mscale_all_dim) {
                        (Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                            yarn_get_mscale(*factor, *m) / yarn_get_mscale(*factor, *ma)
                        }
                        _ => yarn_get_mscale(*factor, 1.0),
                    },
                };
                let orig = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    dim as f64 * (orig / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim as f64 - 1.0);
                let span = if low == high { 0.001 } else { high - low };
                let inv = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        // ramp in f32 as transformers computes it
                        let ramp = (((i as f32) - low as f32) / span as f32).clamp(0.0, 1.0) as f64;
                        let extrapolation = 1.0 - ramp;
                        let inv_extra = 1.0 / p;
                        let inv_inter = 1.0 / (factor * p);
                        inv_inter * (1.0 - extrapolation) + inv_extra * extrapolation
                    })
                    .collect();
                (inv, attention)
            }
        };
        let inv32: Vec<f32> = inv.iter().map(|&v| v as f32).collect();
        Ok(Rope {
            inv_freq: Tensor::f_from_slice(&inv32)?.f_to_device(device)?,
            attention_scaling: scaling,
            interleave: cfg.rope_interleave,
        })
    }

    /// Angles for positions `start .. start + len`.
    pub fn angles(&self, start: i64, len: i64, kind: Kind) -> Result<RopeAngles> {
        let device = self.inv_freq.device();
        let pos = Tensor::f_arange_start(start, start + len, (Kind::Float, device))?;
        let freqs = pos.f_unsqueeze(1)?.f_mul(&self.inv_freq.f_unsqueeze(0)?)?; // [T, rope/2]
        let cos = freqs.f_cos()?.f_mul_scalar(self.attention_scaling)?.f_to_kind(kind)?;
        let sin = freqs.f_sin()?.f_mul_scalar(self.attention_scaling)?.f_to_kind(kind)?;
        Ok(RopeAngles { cos, sin })
    }

    /// Rotates `x` [..., T, rope] by `angles` ([T, rope/2]).
    pub fn apply(&self, x: &Tensor, angles: &RopeAngles) -> Result<Tensor> {
        if let Some(y) = self.apply_few_f32(x, angles)? {
            return Ok(y);
        }
        let d = *x.size().last().unwrap_or(&0);
        let (x1, x2) = if self.interleave {
            (x.f_slice(-1, 0, d, 2)?, x.f_slice(-1, 1, d, 2)?)
        } else {
            (x.f_narrow(-1, 0, d / 2)?, x.f_narrow(-1, d / 2, d / 2)?)
        };
        let (c, s) = (&angles.cos, &angles.sin);
        let first = x1.f_mul(c)?.f_sub(&x2.f_mul(s)?)?;
        let second = x2.f_mul(c)?.f_add(&x1.f_mul(s)?)?;
        Ok(Tensor::f_cat(&[first, second], -1)?)
    }

    /// [`apply`](Self::apply) for at most [`FEW_ELEMENTS`] f32 elements on
    /// the CPU with nothing requiring a gradient (a decode step's queries and
    /// key), in one loop instead of nine libtorch operations: the same
    /// products and sums in the same order. `None` otherwise.
    fn apply_few_f32(&self, x: &Tensor, angles: &RopeAngles) -> Result<Option<Tensor>> {
        let size = x.size();
        let (t, d) = match size.as_slice() {
            [.., t, d] if *d % 2 == 0 && *d > 0 => (*t, *d),
            _ => return Ok(None),
        };
        let (c, s) = (&angles.cos, &angles.sin);
        let half = d / 2;
        if x.numel() > FEW_ELEMENTS || !cpu_f32_no_grad(x) || !cpu_f32_no_grad(c) || !cpu_f32_no_grad(s) || c.size() != [t, half] || s.size() != [t, half] || !c.is_contiguous() || !s.is_contiguous() {
            return Ok(None);
        }
        let x = x.f_contiguous()?;
        let out = x.f_empty_like()?;
        let (n, t, d, half) = (x.numel(), t as usize, d as usize, half as usize);
        if n == 0 {
            return Ok(Some(out));
        }
        // SAFETY: contiguous f32 CPU tensors of n (x, out) and t * half
        // (cos, sin) elements, checked or made above and alive for the whole
        // function; `out` is new and written only here.
        let (xs, cs, ss, ys) = unsafe {
            (
                std::slice::from_raw_parts(x.data_ptr() as *const f32, n),
                std::slice::from_raw_parts(c.data_ptr() as *const f32, t * half),
                std::slice::from_raw_parts(s.data_ptr() as *const f32, t * half),
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
            )
        };
        for (r, (row, dst)) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)).enumerate() {
            let pos = (r % t) * half;
            for i in 0..half {
                let (x1, x2) = if self.interleave { (row[2 * i], row[2 * i + 1]) } else { (row[i], row[i + half]) };
                let (cv, sv) = (cs[pos + i], ss[pos + i]);
                dst[i] = x1 * cv - x2 * sv;
                dst[i + half] = x2 * cv + x1 * sv;
            }
        }
        Ok(Some(out))
    }
}
