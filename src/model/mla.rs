//! Multi-head latent attention (MLA), DeepSeek-V2 paper section 2.1.
//!
//! ```text
//! q             = q_b(norm(q_a(x)))  or  q_proj(x)      per head [nope | rope]
//! [c_kv | k_pe] = kv_a_proj_with_mqa(x);  c_kv = kv_a_layernorm(c_kv)
//! [k_nope | v]  = kv_b_proj(c_kv) per head;  k_pe is one head shared by all
//! score         = (q_nope . k_nope + q_pe . k_pe) * softmax_scale, causal
//! out           = o_proj(concat_h(softmax(score) @ v))
//! ```
//! Two mathematically equal paths:
//! - **naive**: expand every cached `c_kv` into per-head `k_nope` and `v`
//!   (what `transformers` computes);
//! - **absorbed**: fold `W_UK` into the query (`q_lat = q_nope W_UK`) and `W_UV`
//!   into the output, so attention runs on `c_kv` itself (DeepSeek's own
//!   inference code, `attn_impl = "absorb"`).
//!
//! Both read the same compressed cache: only `c_kv` and `k_pe` are stored.
//! [`AttnImpl::Auto`] (the default) picks, per call, whichever of the two does
//! fewer multiply-adds for the shapes at hand: the naive path for a prompt
//! (expanding S keys once is cheaper than scoring T x S pairs over the
//! 2*kv_lora + rope wide latent), the absorbed path for decode steps; the
//! split vLLM and SGLang make between prefill and decode.
//!
//! On the CPU, attention is computed explicitly (scores, mask, softmax in
//! f32, values), a block of queries at a time ([`CPU_QUERY_BLOCK`] at most,
//! and few enough that the score block stays under [`CPU_SCORE_BLOCK`]
//! elements). A block scores only the keys up to its last query, and its scale
//! and causal mask ride on the score product (`baddbmm` with a 0 / -inf bias),
//! which took the bench model's attention from 15.7 to about 11 ms for a
//! 4 x 256 prefill (`make bench-profile`). libtorch's fused CPU kernel was measured
//! slower at MLA's head widths: at V2-Lite's shapes (4 x 256 tokens, 16
//! heads), 107 ms against 33 ms in bf16 for the absorbed form (head width
//! 576) and 29 ms against 11 ms for the naive one (`make bench-real` keeps
//! the whole-model figures). CUDA keeps the fused kernel. A decode step on the
//! absorbed path (one query per sequence) takes [`Mla::absorbed_step`]'s
//! batched products over the cache as stored, heads as rows, or, for a
//! small model in f32, [`Mla::absorbed_step_few_f32`]'s loops.
//! Reference: `transformers/models/deepseek_v3/modeling_deepseek_v3.py`.

use tch::{Device, Kind, Tensor};

use super::config::Config;
use super::hooks::{HookPoint, Hooks};
use super::loader::LoadPath;
use super::gemv::Simd;
use super::nn::{cpu_f32_no_grad, Linear, RmsNorm};
use super::rope::{Rope, RopeAngles};
use crate::error::{Error, Result};

/// Which of the two equal attention computations to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnImpl {
    /// Per-head keys and values expanded from `c_kv` (as `transformers`).
    Naive,
    /// `W_UK` / `W_UV` absorbed; attention over the latent `c_kv`.
    Absorbed,
    /// Per call, whichever of the two does fewer multiply-adds
    /// ([`Mla::cheaper_path`]): naive for prompts, absorbed for decode steps.
    #[default]
    Auto,
}

/// Largest score block (batch x heads x queries x keys) the CPU attention
/// computes at once: 2^25 f32 elements, 128 MiB.
pub const CPU_SCORE_BLOCK: i64 = 1 << 25;

/// Most queries per block of the CPU attention. Each block scores only the
/// keys up to its last query, so smaller blocks skip more of the causal upper
/// triangle but call more, smaller products. For the bench model's 4 x 256
/// prefill on 2 threads the attention took 10.9 ms with blocks of 64, 11.3 ms
/// with 128 and 12.0 ms with one block of 256 (median of three runs each).
pub const CPU_QUERY_BLOCK: i64 = 64;

/// Multiply-adds up to which an f32 decode step's attention on the CPU runs
/// in [`Mla::absorbed_step_few_f32`]'s loops (on one thread) rather than in
/// libtorch's products.
pub const FEW_STEP_MACS: i64 = 1 << 18;

impl std::str::FromStr for AttnImpl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "naive" => Ok(AttnImpl::Naive),
            "absorbed" | "absorb" => Ok(AttnImpl::Absorbed),
            "auto" => Ok(AttnImpl::Auto),
            other => Err(Error::Input(format!(
                "attention path `{other}` is unknown (expected `naive`, `absorbed` or `auto`)"
            ))),
        }
    }
}

/// How queries are projected.
#[derive(Debug)]
pub enum QProj {
    /// `q_proj` [H*(nope+rope), D] (`q_lora_rank: null`, e.g. V2-Lite).
    Full(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// What one layer keeps per token: the normalised latent and the rotated
/// shared key. `[B, S, kv_lora]` and `[B, S, rope]`.
#[derive(Debug)]
pub struct LatentCache {
    pub c_kv: Tensor,
    pub k_pe: Tensor,
}

impl LatentCache {
    /// Cached positions.
    pub fn len(&self) -> i64 {
        // an empty cache holds 1-D placeholders
        match self.c_kv.size().as_slice() {
            [_, s, _] => *s,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the two tensors.
    pub fn bytes(&self) -> usize {
        let b = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        b(&self.c_kv) + b(&self.k_pe)
    }
}

#[derive(Debug)]
pub struct Mla {
    pub q: QProj,
    /// [kv_lora + rope, D]
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    /// [H*(nope+v), kv_lora]
    pub kv_b_proj: Linear,
    /// [D, H*v]
    pub o_proj: Linear,
    pub num_heads: i64,
    pub nope: i64,
    pub rope: i64,
    pub v: i64,
    pub kv_lora: i64,
    pub softmax_scale: f64,
}

impl Mla {
    pub fn load(p: &LoadPath, cfg: &Config) -> Result<Mla> {
        let h = cfg.num_attention_heads;
        let bias = cfg.attention_bias;
        let q = match cfg.q_lora_rank {
            None => QProj::Full(Linear::load(&p.pp("q_proj"), h * cfg.qk_head_dim(), false)?),
            Some(r) => QProj::LowRank {
                a: Linear::load(&p.pp("q_a_proj"), r, bias)?,
                norm: RmsNorm::load(&p.pp("q_a_layernorm"), r, cfg.rms_norm_eps)?,
                b: Linear::load(&p.pp("q_b_proj"), h * cfg.qk_head_dim(), false)?,
            },
        };
        let kv_a_proj_with_mqa = Linear::load(&p.pp("kv_a_proj_with_mqa"), cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias)?;
        let kv_a_layernorm = RmsNorm::load(&p.pp("kv_a_layernorm"), cfg.kv_lora_rank, cfg.rms_norm_eps)?;
        let kv_b_proj = Linear::load(&p.pp("kv_b_proj"), h * (cfg.qk_nope_head_dim + cfg.v_head_dim), false)?;
        let o_proj = Linear::load(&p.pp("o_proj"), cfg.hidden_size, bias)?;
        Ok(Mla {
            q,
            kv_a_proj_with_mqa,
            kv_a_layernorm,
            kv_b_proj,
            o_proj,
            num_heads: h as i64,
            nope: cfg.qk_nope_head_dim as i64,
            rope: cfg.qk_rope_head_dim as i64,
            v: cfg.v_head_dim as i64,
            kv_lora: cfg.kv_lora_rank as i64,
            softmax_scale: cfg.softmax_scale(),
        })
    }

    /// `W_UK` [H, nope, kv_lora] and `W_UV` [H, v, kv_lora] per head: views of
    /// `kv_b_proj`'s weight, whose rows are grouped per head as
    /// [k_nope (nope rows) | v (v rows)]. Views, not copies: an edit of the
    /// weight (training, interventions) reaches both attention paths.
    pub fn absorbed_weights(&self) -> Result<(Tensor, Tensor)> {
        let per_head = self.kv_b_proj.weight.tensor()?.f_view([self.num_heads, self.nope + self.v, self.kv_lora])?;
        Ok((per_head.f_narrow(1, 0, self.nope)?, per_head.f_narrow(1, self.nope, self.v)?))
    }

    /// `W_UK` per head [H, nope, kv_lora].
    pub fn w_uk(&self) -> Result<Tensor> {
        Ok(self.absorbed_weights()?.0)
    }

    /// `W_UV` per head [H, v, kv_lora].
    pub fn w_uv(&self) -> Result<Tensor> {
        Ok(self.absorbed_weights()?.1)
    }

    /// Every projection weight of the block (for prefetching).
    pub fn weights(&self) -> Vec<&super::weight::Weight> {
        let mut w = vec![&self.kv_a_proj_with_mqa.weight, &self.kv_b_proj.weight, &self.o_proj.weight];
        match &self.q {
            QProj::Full(l) => w.push(&l.weight),
            QProj::LowRank { a, b, .. } => w.extend([&a.weight, &b.weight]),
        }
        w
    }

    /// Which exact path does fewer multiply-adds for `t` new queries over `s`
    /// keys. Naive: expand `s` latents into per-head keys and values, then
    /// `t x s` pairs of width `nope + rope + v`. Absorbed: fold `W_UK` into `t`
    /// queries and `W_UV` into `t` outputs, then `t x s` pairs of width
    /// `2 kv_lora + rope`. `Naive` and `Absorbed` are returned as they are.
    pub fn cheaper_path(&self, attn: AttnImpl, t: i64, s: i64) -> AttnImpl {
        if attn != AttnImpl::Auto {
            return attn;
        }
        let (h, l) = (self.num_heads, self.kv_lora);
        let naive = s * l * h * (self.nope + self.v) + t * s * h * (self.nope + self.rope + self.v);
        let absorbed = t * h * l * (self.nope + self.v) + t * s * h * (2 * l + self.rope);
        if naive < absorbed {
            AttnImpl::Naive
        } else {
            AttnImpl::Absorbed
        }
    }

    /// Queries split into `(q_nope [B,H,T,nope], q_pe [B,H,T,rope])`, `q_pe` rotated.
    pub fn queries(&self, x: &Tensor, rope: &Rope, angles: &RopeAngles, hooks: &mut dyn Hooks, layer: usize) -> Result<(Tensor, Tensor)> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let q = match &self.q {
            QProj::Full(l) => l.forward(x)?,
            QProj::LowRank { a, norm, b } => {
                let latent = hooks.visit(HookPoint::QLatent(layer), norm.forward(&a.forward(x)?)?)?;
                b.forward(&latent)?
            }
        };
        let q = q
            .f_view([b, t, self.num_heads, self.nope + self.rope])?
            .f_transpose(1, 2)?; // [B, H, T, nope+rope]
        let q_nope = q.f_narrow(-1, 0, self.nope)?;
        let q_pe = hooks.visit(HookPoint::QPe(layer), rope.apply(&q.f_narrow(-1, self.nope, self.rope)?, angles)?)?;
        Ok((q_nope, q_pe))
    }

    /// The new tokens' latents: `(c_kv [B,T,kv_lora], k_pe [B,T,rope])`, normed and rotated.
    pub fn latents(&self, x: &Tensor, rope: &Rope, angles: &RopeAngles, hooks: &mut dyn Hooks, layer: usize) -> Result<(Tensor, Tensor)> {
        let ckv = self.kv_a_proj_with_mqa.forward(x)?; // [B, T, kv_lora + rope]
        let c_kv = hooks.visit(HookPoint::CKv(layer), self.kv_a_layernorm.forward(&ckv.f_narrow(-1, 0, self.kv_lora)?)?)?;
        let k_pe = hooks.visit(HookPoint::KPe(layer), rope.apply(&ckv.f_narrow(-1, self.kv_lora, self.rope)?, angles)?)?;
        Ok((c_kv, k_pe))
    }

    /// Attention for `x` [B, T, D] whose first token sits at position
    /// `cache.len()` (0 without a cache). Appends the new latents to `cache`.
    /// Returns the output [B, T, D]. The attention pattern is computed
    /// explicitly (and passed to `hooks`) only when `hooks` wants it.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        angles: &RopeAngles,
        cache: Option<&mut LatentCache>,
        attn: AttnImpl,
        hooks: &mut dyn Hooks,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (q_nope, q_pe) = self.queries(x, rope, angles, hooks, layer)?;
        let (new_ckv, new_kpe) = self.latents(x, rope, angles, hooks, layer)?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (c_kv, k_pe) = match cache {
            Some(c) if !c.is_empty() => {
                c.c_kv = Tensor::f_cat(&[&c.c_kv, &new_ckv], 1)?;
                c.k_pe = Tensor::f_cat(&[&c.k_pe, &new_kpe], 1)?;
                (c.c_kv.shallow_clone(), c.k_pe.shallow_clone())
            }
            Some(c) => {
                c.c_kv = new_ckv.shallow_clone();
                c.k_pe = new_kpe.shallow_clone();
                (new_ckv, new_kpe)
            }
            None => (new_ckv, new_kpe),
        };
        let attn = self.cheaper_path(attn, t, c_kv.size()[1]);
        let absorbed = match attn {
            AttnImpl::Absorbed => Some(self.absorbed_weights()?),
            _ => None,
        };
        let wants_pattern = hooks.wants(HookPoint::Pattern(layer));
        let heads = match &absorbed {
            Some((w_uk, w_uv)) if t == 1 && !wants_pattern && x.device() == Device::Cpu => {
                match self.absorbed_step_few_f32(&q_nope, &q_pe, &c_kv, &k_pe, w_uk, w_uv)? {
                    Some(heads) => heads,
                    None => per_head_outputs(&self.absorbed_step(&q_nope, &q_pe, &c_kv, &k_pe, w_uk)?, w_uv)?,
                }
            }
            _ => {
                let (q, k, v) = self.operands(&q_nope, &q_pe, &c_kv, &k_pe, absorbed.as_ref().map(|w| &w.0))?;
                let o = if wants_pattern {
                    self.explicit_attention(&q, &k, &v, past, hooks, layer)?
                } else if q.device().is_cuda() {
                    // Absorbed: one shared latent "head" of keys and values.
                    self.fused_attention(&q, &k, &v, past, attn == AttnImpl::Absorbed)?
                } else {
                    self.blocked_attention(&q, &k, &v, past, CPU_SCORE_BLOCK)?
                };
                match &absorbed {
                    None => o, // [B, H, T, v]
                    Some((_, w_uv)) => per_head_outputs(&o, w_uv)?,
                }
            }
        };
        // [B, H, T, v] -> [B, T, H, v] -> concat heads -> o_proj
        let heads = hooks.visit(HookPoint::HeadOut(layer), heads.f_transpose(1, 2)?)?;
        self.o_proj.forward(&heads.f_reshape([b, t, self.num_heads * self.v])?)
    }

    /// The absorbed path for one new query per sequence (a decode step) on
    /// the CPU: with a single query the heads are the rows of one product
    /// per sequence, so the scores are `q_pe k_pe^T` and `q_lat c_kv^T` as
    /// two batched products over the cache as it is stored (no per-head
    /// operands, no concatenated keys: the general path copies the whole
    /// cache into them at every step), then the softmax in f32 and one
    /// product with `c_kv`. `q_nope` `[B, H, 1, nope]`, `q_pe` `[B, H, 1, rope]`,
    /// `c_kv` `[B, S, kv_lora]`, `k_pe` `[B, S, rope]`; returns the latent
    /// output `[B, H, 1, kv_lora]` (before `W_UV`). No mask: the query is the
    /// last position and sees every key.
    pub fn absorbed_step(&self, q_nope: &Tensor, q_pe: &Tensor, c_kv: &Tensor, k_pe: &Tensor, w_uk: &Tensor) -> Result<Tensor> {
        let q_lat = q_nope.f_matmul(&w_uk.f_unsqueeze(0)?)?.f_squeeze_dim(2)?; // [B, H, kv_lora]
        let position = q_pe.f_squeeze_dim(2)?.f_bmm(&k_pe.f_transpose(1, 2)?)?; // [B, H, S]
        let scores = position.f_baddbmm(&q_lat, &c_kv.f_transpose(1, 2)?, self.softmax_scale, self.softmax_scale)?;
        let probs = scores.f_softmax(-1, Kind::Float)?.f_to_kind(c_kv.kind())?;
        Ok(probs.f_bmm(c_kv)?.f_unsqueeze(2)?)
    }

    /// [`absorbed_step`](Self::absorbed_step) and the `W_UV` product after
    /// it, for f32 on the CPU when the whole step is at most
    /// [`FEW_STEP_MACS`] multiply-adds (a small model's decode step): per
    /// sequence and head, `q_lat = q_nope W_UK`, the scores over the cache as
    /// stored, the softmax, `o_lat = p c_kv` and `o_lat W_UV^T`, in plain
    /// loops over the tensors' memory. Returns the per-head outputs
    /// `[B, H, 1, v]`, or `None` where it does not apply (the caller takes
    /// the libtorch path).
    ///
    /// Why loops rather than libtorch: the libtorch path is about fifteen
    /// operations (products, transposes, softmax, output allocations), each
    /// costing a few microseconds of dispatch, for a step of tens of
    /// thousands of multiply-adds at the bench model's shapes. The sums run
    /// in another order than libtorch's, so results agree to f32 rounding.
    #[allow(clippy::too_many_arguments)]
    pub fn absorbed_step_few_f32(&self, q_nope: &Tensor, q_pe: &Tensor, c_kv: &Tensor, k_pe: &Tensor, w_uk: &Tensor, w_uv: &Tensor) -> Result<Option<Tensor>> {
        let Some(simd) = Simd::detect() else {
            return Ok(None);
        };
        if ![q_nope, q_pe, c_kv, k_pe, w_uk, w_uv].iter().all(|t| cpu_f32_no_grad(t)) {
            return Ok(None);
        }
        let (h, nope, rope, v, l) = (self.num_heads, self.nope, self.rope, self.v, self.kv_lora);
        let (b, s) = match c_kv.size().as_slice() {
            [b, s, c] if *c == l => (*b, *s),
            _ => return Ok(None),
        };
        let shapes_fit = q_nope.size() == [b, h, 1, nope]
            && q_pe.size() == [b, h, 1, rope]
            && k_pe.size() == [b, s, rope]
            && w_uk.size() == [h, nope, l]
            && w_uv.size() == [h, v, l];
        // per-head weight rows are whole rows of kv_b_proj's weight
        let rows_whole = |w: &Tensor| w.stride()[1..] == [l, 1];
        let macs = b * h * (nope * l + s * (2 * l + rope) + v * l);
        if !shapes_fit || !rows_whole(w_uk) || !rows_whole(w_uv) || q_nope.stride()[3] != 1 || [b, s, nope, rope, v, l].contains(&0) || macs > FEW_STEP_MACS {
            return Ok(None);
        }
        let (q_pe, c_kv, k_pe) = (q_pe.f_contiguous()?, c_kv.f_contiguous()?, k_pe.f_contiguous()?);
        let out = Tensor::f_empty([b, h, 1, v], (Kind::Float, Device::Cpu))?;
        let [b, h, nope, rope, v, l, s] = [b, h, nope, rope, v, l, s].map(|d| d as usize);
        let (qs, uks, uvs) = (q_nope.stride(), w_uk.stride()[0] as usize, w_uv.stride()[0] as usize);
        let (qb, qh) = (qs[0] as usize, qs[1] as usize);
        // the elements a strided view reaches: from its first to its last
        let span = |dims: &[(usize, usize)], row: usize| dims.iter().map(|(n, st)| (n - 1) * st).sum::<usize>() + row;
        // SAFETY: q_nope, w_uk and w_uv are f32 CPU views (checked above)
        // whose elements all lie within `span` values of their first one
        // (sizes and strides as checked); q_pe, c_kv, k_pe are contiguous
        // f32 CPU tensors of these sizes, and `out` is new, contiguous and
        // written only here. All stay alive for the whole function.
        let (qn, wk, wv, qp, ckv, kpe, dst) = unsafe {
            (
                std::slice::from_raw_parts(q_nope.data_ptr() as *const f32, span(&[(b, qb), (h, qh)], nope)),
                std::slice::from_raw_parts(w_uk.data_ptr() as *const f32, span(&[(h, uks)], nope * l)),
                std::slice::from_raw_parts(w_uv.data_ptr() as *const f32, span(&[(h, uvs)], v * l)),
                std::slice::from_raw_parts(q_pe.data_ptr() as *const f32, b * h * rope),
                std::slice::from_raw_parts(c_kv.data_ptr() as *const f32, b * s * l),
                std::slice::from_raw_parts(k_pe.data_ptr() as *const f32, b * s * rope),
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, b * h * v),
            )
        };
        let scale = self.softmax_scale as f32;
        let (mut q_lat, mut o_lat) = (vec![0f32; l], vec![0f32; l]);
        let (mut content, mut position) = (vec![0f32; s], vec![0f32; s]);
        for bi in 0..b {
            let (ckv_b, kpe_b) = (&ckv[bi * s * l..(bi + 1) * s * l], &kpe[bi * s * rope..(bi + 1) * s * rope]);
            for hi in 0..h {
                // q_lat = q_nope W_UK: the query's weighted sum of W_UK's rows
                let q = &qn[bi * qb + hi * qh..][..nope];
                let w = &wk[hi * uks..][..nope * l];
                q_lat.fill(0.0);
                for (a, row) in q.iter().zip(w.chunks_exact(l)) {
                    q_lat.iter_mut().zip(row).for_each(|(o, w)| *o += a * w);
                }
                simd.products(&mut content, &q_lat, ckv_b, 1, l);
                simd.products(&mut position, &qp[(bi * h + hi) * rope..][..rope], kpe_b, 1, rope);
                // scores as baddbmm forms them, then a softmax
                let mut top = f32::NEG_INFINITY;
                for (c, p) in content.iter_mut().zip(&position) {
                    *c = scale * p + scale * *c;
                    top = top.max(*c);
                }
                let mut total = 0.0f32;
                for c in content.iter_mut() {
                    *c = (*c - top).exp();
                    total += *c;
                }
                // o_lat = p c_kv
                o_lat.fill(0.0);
                for (p, row) in content.iter().zip(ckv_b.chunks_exact(l)) {
                    let p = p / total;
                    o_lat.iter_mut().zip(row).for_each(|(o, c)| *o += p * c);
                }
                simd.products(&mut dst[(bi * h + hi) * v..][..v], &o_lat, &wv[hi * uvs..][..v * l], 1, l);
            }
        }
        Ok(Some(out))
    }

    /// Per-head keys [B, H, S, nope] and values [B, H, S, v] expanded from the latent.
    fn expand_kv(&self, c_kv: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, s) = (c_kv.size()[0], c_kv.size()[1]);
        let kv = self
            .kv_b_proj
            .forward(c_kv)?
            .f_view([b, s, self.num_heads, self.nope + self.v])?
            .f_transpose(1, 2)?; // [B, H, S, nope+v]
        Ok((kv.f_narrow(-1, 0, self.nope)?, kv.f_narrow(-1, self.nope, self.v)?))
    }

    /// Queries `[q_nope | q_pe]`, keys `[k_nope | k_pe]` and values `v` per head
    /// (naive, no `w_uk`), or queries `[q_nope W_UK | q_pe]`, keys `[c_kv | k_pe]` and values
    /// `c_kv` as one shared head (absorbed): either way `q . k` is the content
    /// score plus the position score.
    fn operands(&self, q_nope: &Tensor, q_pe: &Tensor, c_kv: &Tensor, k_pe: &Tensor, w_uk: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
        let k_pe_h = k_pe.f_unsqueeze(1)?; // [B, 1, S, rope], shared by all heads
        Ok(match w_uk {
            None => {
                let (k_nope, v) = self.expand_kv(c_kv)?;
                let sz = k_nope.size();
                let k_pe = k_pe_h.f_expand([sz[0], sz[1], sz[2], self.rope], false)?;
                (Tensor::f_cat(&[q_nope, q_pe], -1)?, Tensor::f_cat(&[&k_nope, &k_pe], -1)?, v)
            }
            Some(w_uk) => {
                let q_lat = q_nope.f_matmul(&w_uk.f_unsqueeze(0)?)?; // [B, H, T, kv_lora]
                let c_kv_h = c_kv.f_unsqueeze(1)?; // [B, 1, S, kv_lora]
                (Tensor::f_cat(&[&q_lat, q_pe], -1)?, Tensor::f_cat(&[&c_kv_h, &k_pe_h], -1)?, c_kv_h)
            }
        })
    }

    /// Attention through libtorch's fused `scaled_dot_product_attention` on
    /// the [`operands`](Self::operands); the probabilities are never
    /// materialised. `shared_kv`: one key/value head for all query heads.
    fn fused_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: i64, shared_kv: bool) -> Result<Tensor> {
        let t = q.size()[2];
        let (mask, causal) = if t == 1 {
            (None, false)
        } else if past == 0 {
            (None, true)
        } else {
            // true = may attend: query i (absolute past+i) sees keys j <= past+i
            let m = Tensor::f_ones([t, past + t], (tch::Kind::Bool, q.device()))?.f_tril(past)?;
            (Some(m), false)
        };
        Ok(Tensor::f_scaled_dot_product_attention(q, k, v, mask.as_ref(), 0.0, causal, self.softmax_scale, shared_kv)?)
    }

    /// Causal attention of queries `q` [B, H, T, d] whose first sits at
    /// position `past`, over keys `k` [B, H or 1, past + T, d] and values `v`
    /// [B, H or 1, past + T, dv], computed explicitly (scores, mask, softmax in
    /// f32, values; see the module doc for why on the CPU). Queries go a block
    /// at a time: at most [`CPU_QUERY_BLOCK`], and few enough that no score
    /// block exceeds `max_scores` elements (at least one query per block).
    /// A block scores only the keys up to its last query, so most of the
    /// causal upper triangle is never computed. Returns [B, H, T, dv].
    pub fn blocked_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: i64, max_scores: i64) -> Result<Tensor> {
        let qs = q.size();
        let (b, h, t) = (qs[0], qs[1], qs[2]);
        let s = k.size()[2];
        if s != past + t {
            return Err(Error::Input(format!("attention: {s} keys for {t} queries after {past} cached positions")));
        }
        let block = (max_scores / (b * h * s).max(1)).clamp(1, t.clamp(1, CPU_QUERY_BLOCK));
        let mut outs = Vec::with_capacity(((t + block - 1) / block) as usize);
        let mut start = 0;
        while start < t {
            let n = block.min(t - start);
            let keys = past + start + n; // the block's last query sees these
            let (qb, kb, vb) = if n == t {
                (q.shallow_clone(), k.shallow_clone(), v.shallow_clone())
            } else {
                (q.f_narrow(2, start, n)?, k.f_narrow(2, 0, keys)?, v.f_narrow(2, 0, keys)?)
            };
            outs.push(self.block_probs(&qb, &kb, past + start)?.f_to_kind(q.kind())?.f_matmul(&vb)?);
            start += n;
        }
        Ok(if outs.len() == 1 { outs.remove(0) } else { Tensor::f_cat(&outs, 2)? })
    }

    /// Attention probabilities (f32) [B, H, n, S] of queries `q` [B, H, n, d],
    /// the first at absolute position `first`, over keys `k` [B, H or 1, S, d]
    /// with S = `first + n` (the block's last query sees every key). Per-head
    /// keys take one `baddbmm`: the scale and the causal mask (an additive
    /// 0 / -inf bias) ride on the matrix product instead of two more passes
    /// over the scores.
    fn block_probs(&self, q: &Tensor, k: &Tensor, first: i64) -> Result<Tensor> {
        let (b, h, n, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
        let (kh, s) = (k.size()[1], k.size()[2]);
        if n == 1 || kh != h {
            return self.causal_probs(q, &k.f_transpose(-1, -2)?, first);
        }
        // query first + i sees keys j <= first + i
        let bias = Tensor::f_zeros([n, s], (q.kind(), q.device()))?
            .f_masked_fill(&Tensor::f_ones([n, s], (Kind::Bool, q.device()))?.f_triu(first + 1)?, f64::NEG_INFINITY)?;
        let kt = k.f_reshape([b * h, s, d])?.f_transpose(1, 2)?;
        let scores = bias.f_baddbmm(&q.f_reshape([b * h, n, d])?, &kt, 1.0, self.softmax_scale)?;
        Ok(scores.f_softmax(-1, Kind::Float)?.f_view([b, h, n, s])?)
    }

    /// Attention probabilities (f32) of queries `q` [B, H, n, d], the first
    /// at absolute position `first`, over keys `kt` [B, H or 1, d, S]
    /// (transposed): scaled scores, the causal mask (query `first + i` sees
    /// keys `j <= first + i`), softmax. A single query over its whole past
    /// needs no mask.
    fn causal_probs(&self, q: &Tensor, kt: &Tensor, first: i64) -> Result<Tensor> {
        let (n, s) = (q.size()[2], kt.size()[3]);
        // content and RoPE parts in one matmul
        let scores = q.f_matmul(kt)?.f_mul_scalar(self.softmax_scale)?.f_to_kind(Kind::Float)?;
        let scores = if n > 1 || first + 1 < s {
            let mask = Tensor::f_ones([n, s], (Kind::Bool, q.device()))?.f_triu(first + 1)?;
            scores.f_masked_fill(&mask, f64::NEG_INFINITY)?
        } else {
            scores
        };
        Ok(scores.f_softmax(-1, Kind::Float)?)
    }

    /// Attention with the probabilities computed explicitly and passed
    /// through `hooks` (which may replace them) before they weight the values.
    fn explicit_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: i64, hooks: &mut dyn Hooks, layer: usize) -> Result<Tensor> {
        // all queries as one block: the scale and causal mask ride on the score product
        let probs = hooks.visit(HookPoint::Pattern(layer), self.block_probs(q, k, past)?)?;
        Ok(probs.f_to_kind(q.kind())?.f_matmul(v)?)
    }
}

/// The per-head outputs `[B, H, T, v]` from the absorbed path's latent
/// outputs `o_lat` `[B, H, T, kv_lora]` through `W_UV` `[H, v, kv_lora]`.
fn per_head_outputs(o_lat: &Tensor, w_uv: &Tensor) -> Result<Tensor> {
    Ok(o_lat.f_matmul(&w_uv.f_transpose(-1, -2)?.f_unsqueeze(0)?)?)
}
