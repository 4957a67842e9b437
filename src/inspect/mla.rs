//! What multi-head latent attention keeps: cache accounting, the spectra of
//! the per-head up-projections `W_UK` / `W_UV`, the effective rank of the
//! cached latent `c_kv`, the split of attention scores into content
//! (`q_nope . k_nope`) and position (`q_pe . k_pe`) parts, a rank-truncation
//! experiment, and the naive-vs-absorbed equality check.
//!
//! ```
//! use deepscope::prelude::*;
//! # fn main() -> deepscope::Result<()> {
//! let model = Model::load_default()?;
//! println!("{}", model.cache_footprint(2));                  // bytes per token: absorbed vs naive vs MHA
//! // the truncation basis is the SVD over this pass's tokens: use a text longer than the ranks
//! let text = "And the LORD spake unto Moses, saying, Speak unto the children of Israel, and say unto them, \
//!             When any man of you bring an offering unto the LORD, ye shall bring your offering of the cattle, \
//!             even of the herd, and of the flock. If his offering be a burnt sacrifice of the herd, \
//!             let him offer a male without blemish: he shall offer it of his own voluntary will.";
//! println!("{}", model.latent_effective_rank(text, 1)?);     // how many directions c_kv uses
//! println!("{}", model.rank_truncation(text, &[64, 16, 4, 0])?);
//! println!("{}", model.attention_path_check(text)?);        // naive == absorbed
//! # Ok(()) }
//! ```

use std::fmt;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::capture::Capture;
use super::compare::compare;
use super::interventions::{Interventions, Layers};
use super::trace::Input;
use crate::error::{Error, IndexKind, Result};
use crate::model::{AttnImpl, ForwardOptions, HookPoint, Model, NoHooks};
use crate::stats::CacheFootprint;

/// Singular values of each head's `W_UK` [nope, kv_lora] and `W_UV` [v, kv_lora].
#[derive(Debug, Clone, Serialize)]
pub struct LatentSpectra {
    pub layer: usize,
    /// Per head, descending.
    pub w_uk: Vec<Vec<f32>>,
    pub w_uv: Vec<Vec<f32>>,
}

/// How many directions of a matrix carry its energy.
#[derive(Debug, Clone, Serialize)]
pub struct EffectiveRank {
    /// Descending singular values.
    pub singular_values: Vec<f32>,
    /// exp(entropy of the normalised singular values) (Roy & Vetterli).
    pub entropy_rank: f64,
    /// Directions needed for 90% / 99% of the squared norm.
    pub rank90: usize,
    pub rank99: usize,
}

/// Attention scores of one layer split into their two parts (pre-softmax,
/// scaled by `softmax_scale`, causal positions only; future ones are 0).
#[derive(Debug)]
pub struct ScoreSplit {
    pub layer: usize,
    /// `q_nope . k_nope * scale` [B, H, T, T].
    pub content: Tensor,
    /// `q_pe . k_pe * scale` [B, H, T, T]: the RoPE part. `q_pe` and
    /// `k_pe` are projections of the tokens rotated by their positions, so
    /// this part depends on content as well as on relative position.
    pub position: Tensor,
}

/// One row of a rank-truncation sweep.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RankRow {
    pub rank: usize,
    /// Mean KL(full || truncated) of the next-token distributions (nats).
    pub mean_kl: f64,
    /// Fraction of positions whose most likely next token is unchanged.
    pub top1_agreement: f64,
    /// Next-token accuracy against the actual next tokens.
    pub next_token_accuracy: f64,
    pub mean_loss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RankSweep {
    pub kv_lora_rank: usize,
    pub rows: Vec<RankRow>,
    /// Where the directions came from: `None` when each pass used its own
    /// tokens' directions (in-sample); `Some(n)` for a fixed [`LatentBasis`]
    /// fitted on `n` tokens of calibration text.
    pub basis_tokens: Option<i64>,
}

/// Per layer, the right singular vectors of `c_kv` over the tokens of a
/// calibration text, strongest first: a fixed basis in which to truncate the
/// latents of other text ([`Model::rank_truncation_in`],
/// [`Interventions::project_latent`]), the out-of-sample counterpart of
/// [`Interventions::truncate_latent`].
#[derive(Debug)]
pub struct LatentBasis {
    /// Per layer `[kv_lora_rank, kv_lora_rank]`, one direction per column.
    pub directions: Vec<Tensor>,
    /// Per layer, the singular values (strongest first).
    pub singular_values: Vec<Vec<f32>>,
    /// Calibration tokens the basis was fitted on.
    pub tokens: i64,
}

impl LatentBasis {
    /// The projection onto layer `layer`'s top `rank` directions,
    /// `[kv_lora_rank, kv_lora_rank]` (the identity at full rank).
    pub fn projection(&self, layer: usize, rank: usize) -> Result<Tensor> {
        let v = self.directions.get(layer).ok_or_else(|| Error::out_of_range(crate::error::IndexKind::Layer, layer, self.directions.len()))?;
        let d = v.size()[0];
        if rank as i64 > d {
            return Err(Error::Input(format!("rank {rank} exceeds the latent's {d} dimensions")));
        }
        let top = v.f_narrow(1, 0, rank as i64)?;
        Ok(top.f_matmul(&top.f_transpose(0, 1)?)?)
    }
}

/// Naive and absorbed attention on the same input.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PathCheck {
    pub max_abs_logit_diff: f64,
    pub max_abs_logit: f64,
    /// Relative tolerance for the model's dtype (1e-4 for f32, 3e-2 for bf16/f16).
    pub tolerance: f64,
}

impl PathCheck {
    pub fn equal(&self) -> bool {
        self.max_abs_logit_diff <= self.tolerance * self.max_abs_logit.max(1.0)
    }
}

pub fn effective_rank(x: &Tensor) -> Result<EffectiveRank> {
    let d = *x.size().last().unwrap_or(&0);
    let flat = x.f_reshape([-1, d])?.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
    let (_, s, _) = flat.f_svd(true, false)?;
    let sv = Vec::<f64>::try_from(&s)?;
    let total: f64 = sv.iter().sum();
    let entropy: f64 = sv.iter().filter(|&&v| v > 0.0).map(|&v| {
        let p = v / total;
        -p * p.ln()
    }).sum();
    let energy: Vec<f64> = sv.iter().map(|v| v * v).collect();
    let e_total: f64 = energy.iter().sum();
    let rank_for = |frac: f64| {
        let mut acc = 0.0;
        for (i, e) in energy.iter().enumerate() {
            acc += e;
            if acc >= frac * e_total {
                return i + 1;
            }
        }
        energy.len()
    };
    Ok(EffectiveRank {
        singular_values: sv.iter().map(|&v| v as f32).collect(),
        entropy_rank: if total > 0.0 { entropy.exp() } else { 0.0 },
        rank90: rank_for(0.90),
        rank99: rank_for(0.99),
    })
}

impl Model {
    fn check_layer(&self, layer: usize) -> Result<()> {
        Error::check_index(IndexKind::Layer, layer, self.layers.len())
    }

    /// KV-cache size per token of this model (`bytes_per_elem`: 2 for bf16).
    pub fn cache_footprint(&self, bytes_per_elem: usize) -> CacheFootprint {
        CacheFootprint::of(&self.config, bytes_per_elem)
    }

    /// Singular values of every head's `W_UK` and `W_UV` in `layer`.
    pub fn latent_spectra(&self, layer: usize) -> Result<LatentSpectra> {
        self.check_layer(layer)?;
        let a = &self.layers[layer].self_attn;
        let svals = |w: &Tensor| -> Result<Vec<Vec<f32>>> {
            let (_, s, _) = w.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_svd(true, false)?; // s [H, min]
            Ok(Vec::<Vec<f32>>::try_from(&s)?)
        };
        let (w_uk, w_uv) = a.absorbed_weights()?;
        Ok(LatentSpectra { layer, w_uk: svals(&w_uk)?, w_uv: svals(&w_uv)? })
    }

    /// Effective rank of the cached latent `c_kv` of `layer` over `input`.
    pub fn latent_effective_rank(&self, input: impl Into<Input>, layer: usize) -> Result<EffectiveRank> {
        self.check_layer(layer)?;
        let t = self.trace_with(input, &Capture::none().with(HookPoint::CKv(layer)), &Interventions::new())?;
        effective_rank(t.tensor(HookPoint::CKv(layer))?)
    }

    /// The pre-softmax attention scores of `layer` split into the content
    /// part and the RoPE part; their sum is the full score.
    pub fn score_split(&self, input: impl Into<Input>, layer: usize) -> Result<ScoreSplit> {
        self.check_layer(layer)?;
        let input = input.into();
        let t = self.trace_with(&input.ids(self)?, &Capture::none().with(HookPoint::AttnIn(layer)), &Interventions::new())?;
        let x = t.tensor(HookPoint::AttnIn(layer))?.f_to_device(self.device)?.f_to_kind(self.kind)?;
        let _guard = tch::no_grad_guard();
        let a = &self.layers[layer].self_attn;
        let len = x.size()[1];
        let angles = self.rope.angles(0, len, self.kind)?;
        let (q_nope, q_pe) = a.queries(&x, &self.rope, &angles, &mut NoHooks, layer)?;
        let (c_kv, k_pe) = a.latents(&x, &self.rope, &angles, &mut NoHooks, layer)?;
        let q_lat = q_nope.f_matmul(&a.w_uk()?.f_unsqueeze(0)?)?; // [B, H, T, kv_lora]
        let content = q_lat.f_matmul(&c_kv.f_unsqueeze(1)?.f_transpose(-1, -2)?)?;
        let position = q_pe.f_matmul(&k_pe.f_unsqueeze(1)?.f_transpose(-1, -2)?)?;
        let keep = Tensor::f_ones([len, len], (Kind::Float, self.device))?.f_tril(0)?;
        let finish = |s: Tensor| -> Result<Tensor> {
            Ok(s.f_mul_scalar(a.softmax_scale)?.f_to_kind(Kind::Float)?.f_mul(&keep)?.f_to_device(Device::Cpu)?)
        };
        Ok(ScoreSplit { layer, content: finish(content)?, position: finish(position)? })
    }

    /// Projects every layer's `c_kv` onto its top-r singular directions for
    /// each `r` in `ranks` and reports how the predictions degrade. The
    /// directions come from this input's own tokens, so a rank at or above the
    /// number of tokens loses nothing: use inputs longer than the ranks.
    pub fn rank_truncation(&self, input: impl Into<Input>, ranks: &[usize]) -> Result<RankSweep> {
        self.rank_sweep(input.into(), ranks, None, |r| Ok(Interventions::new().truncate_latent(Layers::All, r)))
    }

    /// [`rank_truncation`](Self::rank_truncation) with every layer's `c_kv`
    /// projected onto the top-r directions of a fixed `basis` (fitted on
    /// other text with [`latent_basis`](Self::latent_basis)): what a cache of
    /// r numbers per token would keep on text it was not fitted to.
    pub fn rank_truncation_in(&self, input: impl Into<Input>, ranks: &[usize], basis: &LatentBasis) -> Result<RankSweep> {
        self.rank_sweep(input.into(), ranks, Some(basis.tokens), |r| Ok(Interventions::new().project_latent(Layers::All, basis, r)?))
    }

    /// Fits a [`LatentBasis`]: traces each of `inputs`, stacks every layer's
    /// `c_kv` rows over all their tokens, and keeps the right singular
    /// vectors. Use more calibration tokens than `kv_lora_rank`.
    pub fn latent_basis<I: Into<Input>>(&self, inputs: impl IntoIterator<Item = I>) -> Result<LatentBasis> {
        let n_layers = self.config.num_hidden_layers;
        let capture = (0..n_layers).fold(Capture::none(), |c, l| c.with(HookPoint::CKv(l)));
        let mut rows: Vec<Vec<Tensor>> = (0..n_layers).map(|_| Vec::new()).collect();
        let mut tokens = 0;
        for input in inputs {
            let t = self.trace_with(input, &capture, &Interventions::new())?;
            for (l, r) in rows.iter_mut().enumerate() {
                let c = t.tensor(HookPoint::CKv(l))?;
                let d = *c.size().last().unwrap_or(&0);
                r.push(c.f_reshape([-1, d])?.f_to_kind(Kind::Double)?);
            }
            tokens += t.ids.numel() as i64;
        }
        if tokens == 0 {
            return Err(Error::Input("a latent basis needs at least one calibration token".into()));
        }
        let (mut directions, mut singular_values) = (Vec::new(), Vec::new());
        for r in rows {
            let (_, s, v) = Tensor::f_cat(&r, 0)?.f_svd(true, true)?; // v [d, min(N, d)]
            directions.push(v.f_to_kind(Kind::Float)?);
            singular_values.push(Vec::<f32>::try_from(s.f_to_kind(Kind::Float)?)?);
        }
        let short = directions.iter().any(|v| v.size()[1] < v.size()[0]);
        if short {
            return Err(Error::Input(format!(
                "{tokens} calibration tokens span fewer directions than the latent's {}: use more text",
                self.config.kv_lora_rank
            )));
        }
        Ok(LatentBasis { directions, singular_values, tokens })
    }

    fn rank_sweep(&self, input: Input, ranks: &[usize], basis_tokens: Option<i64>, variant: impl Fn(usize) -> Result<Interventions>) -> Result<RankSweep> {
        let ids = input.ids(self)?;
        let full = self.trace_with(&ids, &Capture::none(), &Interventions::new())?;
        let mut rows = Vec::new();
        let interrupt = crate::interrupt::Interrupt::new();
        for &r in ranks {
            interrupt.check()?;
            let t = self.trace_with(&ids, &Capture::none(), &variant(r)?)?;
            let c = compare(&full, &t)?;
            let len = ids.size()[1];
            let acc = if len >= 2 {
                t.logits
                    .f_narrow(1, 0, len - 1)?
                    .f_argmax(-1, false)?
                    .f_eq_tensor(&ids.f_narrow(1, 1, len - 1)?)?
                    .f_to_kind(Kind::Double)?
                    .f_mean(Kind::Double)?
                    .f_double_value(&[])?
            } else {
                f64::NAN
            };
            rows.push(RankRow { rank: r, mean_kl: c.mean_kl, top1_agreement: c.top1_agreement, next_token_accuracy: acc, mean_loss: c.mean_loss_variant });
        }
        Ok(RankSweep { kv_lora_rank: self.config.kv_lora_rank, rows, basis_tokens })
    }

    /// Runs `input` through the naive and the absorbed attention paths.
    pub fn attention_path_check(&self, input: impl Into<Input>) -> Result<PathCheck> {
        let ids = input.into().ids(self)?;
        let run = |attn| self.forward_with(&ids, None, ForwardOptions { attn, ..Default::default() });
        let (n, a) = (run(AttnImpl::Naive)?.logits, run(AttnImpl::Absorbed)?.logits);
        Ok(PathCheck {
            max_abs_logit_diff: n.f_sub(&a)?.f_abs()?.f_max()?.f_double_value(&[])?,
            max_abs_logit: n.f_abs()?.f_max()?.f_double_value(&[])?,
            tolerance: if self.kind == Kind::Float || self.kind == Kind::Double { 1e-4 } else { 3e-2 },
        })
    }
}

impl fmt::Display for EffectiveRank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "effective rank {:.1} of {} (90% energy in {}, 99% in {} directions)",
            self.entropy_rank,
            self.singular_values.len(),
            self.rank90,
            self.rank99
        )
    }
}

impl fmt::Display for LatentSpectra {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "W_UK / W_UV singular values, layer {} (largest, smallest per head)", self.layer)?;
        for (h, (k, v)) in self.w_uk.iter().zip(&self.w_uv).enumerate() {
            let ends = |s: &Vec<f32>| format!("{:.3} .. {:.3}", s.first().unwrap_or(&0.0), s.last().unwrap_or(&0.0));
            writeln!(f, "  head {h}: W_UK {}   W_UV {}", ends(k), ends(v))?;
        }
        Ok(())
    }
}

impl fmt::Display for RankSweep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.basis_tokens {
            None => writeln!(f, "c_kv rank truncation (kv_lora_rank {}; directions of this text's own tokens: in-sample)", self.kv_lora_rank)?,
            Some(n) => writeln!(f, "c_kv rank truncation (kv_lora_rank {}; fixed directions fitted on {n} calibration tokens)", self.kv_lora_rank)?,
        }
        writeln!(f, "{:>6} {:>10} {:>8} {:>9} {:>8}", "rank", "mean KL", "top-1", "accuracy", "loss")?;
        for r in &self.rows {
            writeln!(f, "{:>6} {:>10.4} {:>7.1}% {:>8.1}% {:>8.3}", r.rank, r.mean_kl, 100.0 * r.top1_agreement, 100.0 * r.next_token_accuracy, r.mean_loss)?;
        }
        Ok(())
    }
}

impl fmt::Display for PathCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "naive vs absorbed attention: max |logit difference| {:.2e} (logits up to {:.2}): {}",
            self.max_abs_logit_diff,
            self.max_abs_logit,
            if self.equal() { "equal" } else { "DIFFERENT" }
        )
    }
}
