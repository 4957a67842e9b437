//! Number formats of checkpoints: `float8_e4m3fn` and bf16 conversions,
//! block-scaled FP8 dequantization on the CPU, and the fused FP8 product
//! ([`fp8_linear_cpu`]) for the few tokens of a routed expert or a decode step.
//!
//! Hand-written because libtorch's CPU conversion from FP8 is scalar:
//! measured here (torch 2.13, 2 threads) at 5.6 ns per element, 82 ms for
//! one 2048 x 7168 matrix, so dequantizing the experts a DeepSeek-V3 prefill
//! reads would take longer than reading them from disk. A branch-free decode
//! and one multiply per element, vectorised for the CPU found at run time and
//! spread over libtorch's intra-op thread count, computes the same products
//! (`f32(code) * scale` in f32, then the cast libtorch makes, round to
//! nearest even) an order of magnitude faster; the tests check it bit for
//! bit against libtorch. On GPUs libtorch's own
//! conversion is used.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// bf16 bits of `x`, rounded to nearest, ties to even.
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `float8_e4m3fn` code of `x`, rounded to nearest, ties to even; values at
/// or beyond the largest finite one (448) saturate to it.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return 0x7f; // NaN
    }
    if a >= 0x43e0_0000 {
        return sign | 0x7e; // >= 448
    }
    if a < 0x3c80_0000 {
        // below 2^-6: subnormal steps of 2^-9 (8 steps is the smallest normal, code 8)
        return sign | (f32::from_bits(a) * 512.0).round_ties_even() as u8;
    }
    let e = (a >> 23) as i32 - 127; // -6 ..= 8
    let m = a & 0x7f_ffff;
    let r = m + 0x7_ffff + ((m >> 20) & 1); // round the 23-bit mantissa to 3 bits
    let (e, m3) = if r >> 23 != 0 { (e + 1, 0) } else { (e, r >> 20) };
    if e > 8 || (e == 8 && m3 > 6) {
        return sign | 0x7e;
    }
    sign | (((e + 7) as u8) << 3) | m3 as u8
}

/// Block-scaled FP8 `w` [rows, cols] on the CPU times `scale` [ceil(rows/br),
/// ceil(cols/bc)], as `kind` (f32 or bf16; other dtypes through f32).
pub fn dequantize_fp8_cpu(w: &Tensor, scale: &Tensor, block: [i64; 2], kind: Kind) -> Result<Tensor> {
    let (rows, cols) = match w.size().as_slice() {
        [r, c] => (*r, *c),
        other => return Err(Error::Input(format!("FP8 weights must be 2-D, got shape {other:?}"))),
    };
    let [br, bc] = block;
    let (nbr, nbc) = ((rows + br - 1) / br, (cols + bc - 1) / bc);
    if scale.size() != [nbr, nbc] || w.kind() != Kind::Float8e4m3fn || w.device() != Device::Cpu || scale.device() != Device::Cpu {
        return Err(Error::Input(format!(
            "dequantize_fp8_cpu needs a CPU float8_e4m3fn [{rows}, {cols}] weight and [{nbr}, {nbc}] scales, got {:?} on {:?} and {:?}",
            w.kind(),
            w.device(),
            scale.size()
        )));
    }
    let w = w.f_contiguous()?;
    let s = scale.f_to_kind(Kind::Float)?.f_contiguous()?;
    let out_kind = if kind == Kind::BFloat16 { Kind::BFloat16 } else { Kind::Float };
    let out = Tensor::f_empty([rows, cols], (out_kind, Device::Cpu))?;
    let (rows, cols, br, bc) = (rows as usize, cols as usize, br as usize, bc as usize);
    let n = rows * cols;
    if n > 0 {
        // SAFETY: `w`, `s` and `out` are contiguous CPU tensors of exactly
        // these element counts and dtypes (checked or created above), alive
        // for the whole function; `out` is written only here.
        let (src, sc) = unsafe {
            (
                std::slice::from_raw_parts(w.data_ptr() as *const u8, n),
                std::slice::from_raw_parts(s.data_ptr() as *const f32, nbr as usize * nbc as usize),
            )
        };
        // a thread per million elements at most: spawning costs tens of microseconds
        let threads = (tch::get_num_threads().max(1) as usize).min(rows.div_ceil(br)).min(n.div_ceil(1 << 20)).max(1);
        // whole row blocks per thread
        let rows_per = rows.div_ceil(br).div_ceil(threads) * br;
        let nbc = nbc as usize;
        let shape = Shape { cols, br, bc, nbc };
        match out_kind {
            Kind::BFloat16 => {
                // SAFETY: as above; bf16 is two bytes per element
                let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut u16, n) };
                std::thread::scope(|scope| {
                    for (t, chunk) in dst.chunks_mut(rows_per * cols).enumerate() {
                        scope.spawn(move || fill_bf16(chunk, t * rows_per, src, sc, shape));
                    }
                });
            }
            _ => {
                // SAFETY: as above; f32 is four bytes per element
                let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n) };
                std::thread::scope(|scope| {
                    for (t, chunk) in dst.chunks_mut(rows_per * cols).enumerate() {
                        scope.spawn(move || fill_f32(chunk, t * rows_per, src, sc, shape));
                    }
                });
            }
        }
    }
    Ok(if out_kind == kind { out } else { out.f_to_kind(kind)? })
}

/// Largest number of input rows (tokens) for which [`fp8_linear_cpu`] is
/// used; more rows amortise a dequantized copy over a GEMM instead.
pub const FUSED_MAX_ROWS: i64 = 8;

/// `x W^T` for block-scaled FP8 `w` [n, k] (scales [ceil(n/br), ceil(k/bc)])
/// and `x` [.., k] on the CPU, without a dequantized copy of `w`: each
/// block of codes is decoded and scaled into registers (`f32(code) * scale`,
/// the dequantization's own products) and used at once by every row of `x`,
/// accumulating in f32 with fused multiply-adds. The weight is read once
/// per 4 rows of `x` and nothing is written but the [.., n] f32 result,
/// which is what makes it faster than a dequantize-then-matmul for the few
/// tokens a routed expert or a decode step sees: that path writes and
/// re-reads a bf16/f32 copy of every weight. The sums run in another order
/// than a GEMM's, so in f32 results agree with it to rounding (relative
/// 1e-6), not bit for bit; under a bf16 compute dtype the weights here are
/// the unrounded f32 products, where the GEMM path rounds them to bf16 first,
/// so the two differ at bf16 precision (the parity tests check top-k).
pub fn fp8_linear_cpu(x: &Tensor, w: &Tensor, scale: &Tensor, block: [i64; 2]) -> Result<Tensor> {
    let (n, k) = match w.size().as_slice() {
        [r, c] => (*r, *c),
        other => return Err(Error::Input(format!("FP8 weights must be 2-D, got shape {other:?}"))),
    };
    let [br, bc] = block;
    let (nbr, nbc) = ((n + br - 1) / br, (k + bc - 1) / bc);
    let xs = x.size();
    if scale.size() != [nbr, nbc] || w.kind() != Kind::Float8e4m3fn || xs.last() != Some(&k) || !fp8_linear_cpu_takes(x, w, scale, block) {
        return Err(Error::Input(format!(
            "fp8_linear_cpu needs a float8_e4m3fn [{n}, {k}] weight, [{nbr}, {nbc}] scales, blocks of at most {MAX_BLOCK} columns and an input [.., {k}], all on the CPU; got {:?} on {:?}, {:?} on {:?}, {block:?} and {xs:?} on {:?}",
            w.kind(),
            w.device(),
            scale.size(),
            scale.device(),
            x.device()
        )));
    }
    let m = xs[..xs.len() - 1].iter().product::<i64>();
    let xf = x.f_to_kind(Kind::Float)?.f_contiguous()?;
    let w = w.f_contiguous()?;
    let s = scale.f_to_kind(Kind::Float)?.f_contiguous()?;
    // computed as [n, m]: each thread owns whole output rows of W
    let out = Tensor::f_zeros([n, m], (Kind::Float, Device::Cpu))?;
    let (mu, nu, ku) = (m as usize, n as usize, k as usize);
    if mu > 0 && nu > 0 && ku > 0 {
        // SAFETY: `xf`, `w`, `s` and `out` are contiguous CPU tensors of
        // exactly these element counts and dtypes (checked or created
        // above), alive for the whole function; `out` is written only here.
        let (xv, src, sc, dst) = unsafe {
            (
                std::slice::from_raw_parts(xf.data_ptr() as *const f32, mu * ku),
                std::slice::from_raw_parts(w.data_ptr() as *const u8, nu * ku),
                std::slice::from_raw_parts(s.data_ptr() as *const f32, (nbr * nbc) as usize),
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, nu * mu),
            )
        };
        let g = Gemv { m: mu, k: ku, br: br as usize, bc: bc as usize, nbc: nbc as usize };
        // a thread per million weights at most: spawning costs tens of microseconds
        let threads = (tch::get_num_threads().max(1) as usize).min((nu * ku).div_ceil(1 << 20)).min(nu).max(1);
        let rows_per = nu.div_ceil(threads);
        if threads == 1 {
            fused_rows(dst, 0, xv, src, sc, g);
        } else {
            std::thread::scope(|scope| {
                for (t, chunk) in dst.chunks_mut(rows_per * mu).enumerate() {
                    scope.spawn(move || fused_rows(chunk, t * rows_per, xv, src, sc, g));
                }
            });
        }
    }
    let mut shape = xs[..xs.len() - 1].to_vec();
    shape.push(n);
    Ok(out.f_tr()?.f_contiguous()?.f_view(shape.as_slice())?)
}

/// Whether [`fp8_linear_cpu`] takes operands on these devices with these
/// blocks (all on the CPU, scale blocks of at most 256 columns); shapes and
/// dtypes it checks itself.
pub fn fp8_linear_cpu_takes(x: &Tensor, w: &Tensor, scale: &Tensor, block: [i64; 2]) -> bool {
    [x, w, scale].iter().all(|t| t.device() == Device::Cpu) && block[1] as usize <= MAX_BLOCK
}

/// Widest scale block [`fp8_linear_cpu`] accepts.
const MAX_BLOCK: usize = 256;
/// f32 lanes per accumulator: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// The geometry of one fused product: rows of `x`, columns, scale blocks.
#[derive(Clone, Copy)]
struct Gemv {
    m: usize,
    k: usize,
    br: usize,
    bc: usize,
    nbc: usize,
}

/// For each output row `n0..` of W (`dst` is [rows, m]), `tile(out, m0,
/// rows left, codes, scales)` over tiles of `x`'s rows until all `m` are
/// done: `out` is the row's `m` results, `codes` its FP8 codes, `scales` those
/// of its row block; `tile` returns how many rows it took.
#[inline(always)]
fn for_each_tile(dst: &mut [f32], n0: usize, src: &[u8], sc: &[f32], g: Gemv, mut tile: impl FnMut(&mut [f32], usize, usize, &[u8], &[f32]) -> usize) {
    for (i, out) in dst.chunks_mut(g.m).enumerate() {
        let r = n0 + i;
        let codes = &src[r * g.k..(r + 1) * g.k];
        let scales = &sc[(r / g.br) * g.nbc..(r / g.br + 1) * g.nbc];
        let mut m0 = 0;
        while m0 < g.m {
            m0 += tile(out, m0, g.m - m0, codes, scales);
        }
    }
}

/// Output rows `n0..` of W (`dst` is [rows, m]), a tile of up to 4 rows of
/// `x` at a time.
#[inline(always)]
fn fused_rows_with(dst: &mut [f32], n0: usize, x: &[f32], src: &[u8], sc: &[f32], g: Gemv, fma: impl Fn(f32, f32, f32) -> f32 + Copy) {
    for_each_tile(dst, n0, src, sc, g, |out, m0, left, codes, scales| match left {
        l if l >= 4 => tile::<4>(out, m0, x, codes, scales, g, fma),
        l if l >= 2 => tile::<2>(out, m0, x, codes, scales, g, fma),
        _ => tile::<1>(out, m0, x, codes, scales, g, fma),
    })
}

/// `out[m0..m0+T] = x[m0..m0+T] . w` for one row `w` of W (its codes and
/// the scales of its row block); returns `T`. Each group of 16 weights is
/// decoded and scaled once and used by the `T` rows. The portable form,
/// left to the compiler's vectorizer (AVX2 or the baseline); AVX-512 CPUs
/// take [`avx512::tile`].
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn tile<const T: usize>(out: &mut [f32], m0: usize, x: &[f32], codes: &[u8], scales: &[f32], g: Gemv, fma: impl Fn(f32, f32, f32) -> f32 + Copy) -> usize {
    let xs: [&[f32]; T] = std::array::from_fn(|t| &x[(m0 + t) * g.k..(m0 + t + 1) * g.k]);
    let mut acc = [[0f32; LANES]; T];
    let mut tail = [0f32; T];
    for (b, (cb, &s)) in codes.chunks(g.bc).zip(scales).enumerate() {
        let k0 = b * g.bc;
        let full = cb.len() / LANES * LANES;
        for j0 in (0..full).step_by(LANES) {
            let c: &[u8; LANES] = cb[j0..j0 + LANES].try_into().unwrap_or(&[0; LANES]);
            let wv: [f32; LANES] = std::array::from_fn(|j| decode(c[j]) * s);
            for t in 0..T {
                let xv: &[f32; LANES] = xs[t][k0 + j0..k0 + j0 + LANES].try_into().unwrap_or(&[0.0; LANES]);
                for j in 0..LANES {
                    acc[t][j] = fma(xv[j], wv[j], acc[t][j]);
                }
            }
        }
        for j in full..cb.len() {
            let wj = decode(cb[j]) * s;
            for t in 0..T {
                tail[t] = fma(xs[t][k0 + j], wj, tail[t]);
            }
        }
    }
    for t in 0..T {
        out[m0 + t] = acc[t].iter().sum::<f32>() + tail[t];
    }
    T
}

/// The fused product's inner loop written with AVX-512 intrinsics: the
/// compiler's vectorizer produced loops up to 6x slower from the portable
/// form as soon as it was unrolled for more accumulators (measured).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::{decode, for_each_tile, Gemv};
    use std::arch::x86_64::*;

    /// 16 FP8 codes at `p` decoded (as [`decode`]) and times `s`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn decode16(p: *const u8, s: __m512) -> __m512 {
        // SAFETY (caller): 16 bytes readable at `p`
        let c = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) });
        let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(c, _mm512_set1_epi32(0x80)));
        let em = _mm512_and_si512(c, _mm512_set1_epi32(0x7f));
        let normal = _mm512_add_epi32(_mm512_slli_epi32::<20>(em), _mm512_set1_epi32(120 << 23));
        let sub = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(1.0 / 512.0)));
        let mag = _mm512_mask_blend_epi32(_mm512_cmplt_epu32_mask(em, _mm512_set1_epi32(8)), normal, sub);
        let v = _mm512_castsi512_ps(_mm512_or_si512(mag, sign));
        let v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7f)), v, _mm512_set1_ps(f32::NAN));
        _mm512_mul_ps(v, s)
    }

    /// As the portable `tile`, with `T * U` accumulators: `U` groups of 16
    /// weights in flight so that enough independent multiply-add chains
    /// hide their latency.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x` holds rows `m0..m0+T` of `g.k` values,
    /// `codes` `g.k` bytes and `scales` one per `g.bc` columns.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const T: usize, const U: usize>(out: &mut [f32], m0: usize, x: &[f32], codes: &[u8], scales: &[f32], g: Gemv) -> usize {
        assert!(x.len() >= (m0 + T) * g.k && codes.len() >= g.k && out.len() >= m0 + T);
        let xp: [*const f32; T] = std::array::from_fn(|t| x[(m0 + t) * g.k..].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); U]; T];
        let mut tail = [0f32; T];
        let step = 16 * U;
        for (b, (cb, &s)) in codes[..g.k].chunks(g.bc).zip(scales).enumerate() {
            let k0 = b * g.bc;
            let full = cb.len() / step * step;
            let sv = _mm512_set1_ps(s);
            let mut j = 0;
            while j < full {
                for u in 0..U {
                    // SAFETY: j + 16u + 16 <= full <= cb.len(), and x's row t
                    // has g.k >= k0 + cb.len() values (asserted above)
                    unsafe {
                        let w = decode16(cb.as_ptr().add(j + 16 * u), sv);
                        for t in 0..T {
                            acc[t][u] = _mm512_fmadd_ps(_mm512_loadu_ps(xp[t].add(k0 + j + 16 * u)), w, acc[t][u]);
                        }
                    }
                }
                j += step;
            }
            for j in full..cb.len() {
                let wj = decode(cb[j]) * s;
                for t in 0..T {
                    tail[t] = x[(m0 + t) * g.k + k0 + j].mul_add(wj, tail[t]);
                }
            }
        }
        for t in 0..T {
            let mut v = acc[t][0];
            for u in 1..U {
                v = _mm512_add_ps(v, acc[t][u]);
            }
            out[m0 + t] = _mm512_reduce_add_ps(v) + tail[t];
        }
        T
    }

    /// Output rows `n0..` of W, as `fused_rows_with`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows(dst: &mut [f32], n0: usize, x: &[f32], src: &[u8], sc: &[f32], g: Gemv) {
        for_each_tile(dst, n0, src, sc, g, |out, m0, left, codes, scales| {
            // SAFETY: as this function's; the slices are in bounds
            unsafe {
                match left {
                    l if l >= 4 => tile::<4, 2>(out, m0, x, codes, scales, g),
                    l if l >= 2 => tile::<2, 4>(out, m0, x, codes, scales, g),
                    _ => tile::<1, 8>(out, m0, x, codes, scales, g),
                }
            }
        })
    }
}

/// [`avx512::rows`] when the CPU has AVX-512, else [`fused_rows_with`]
/// compiled for AVX2 with FMA when it has them (found at run time), else
/// for the baseline without FMA.
fn fused_rows(dst: &mut [f32], n0: usize, x: &[f32], src: &[u8], sc: &[f32], g: Gemv) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(dst: &mut [f32], n0: usize, x: &[f32], src: &[u8], sc: &[f32], g: Gemv) {
            fused_rows_with(dst, n0, x, src, sc, g, |a, b, c| a.mul_add(b, c))
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for
            return unsafe { avx512::rows(dst, n0, x, src, sc, g) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above
            return unsafe { avx2(dst, n0, x, src, sc, g) };
        }
    }
    fused_rows_with(dst, n0, x, src, sc, g, |a, b, c| a * b + c)
}

/// The geometry of one dequantization: columns, block size, scale columns.
#[derive(Clone, Copy)]
struct Shape {
    cols: usize,
    br: usize,
    bc: usize,
    nbc: usize,
}

/// The value of code `c`, branch-free so that the loops below vectorize:
/// normal codes become f32 bits directly (exponent + 120, mantissa << 20),
/// subnormal ones `m * 2^-9`.
#[inline(always)]
fn decode(c: u8) -> f32 {
    let c = c as u32;
    let sign = (c & 0x80) << 24;
    let em = c & 0x7f;
    let normal = f32::from_bits(sign | ((em << 20) + (120 << 23)));
    let sub = f32::from_bits((em as f32 * (1.0 / 512.0)).to_bits() | sign);
    let v = if em < 8 { sub } else { normal };
    if em == 0x7f {
        f32::NAN
    } else {
        v
    }
}

/// [`f32_to_bf16`] without a branch.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let r = ((b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        r
    }
}

/// Rows `r0..` of the output: `dst[i] = cast(decode(src[i]) * scale[block of i])`.
#[inline(always)]
fn fill_rows<T>(dst: &mut [T], r0: usize, src: &[u8], sc: &[f32], g: Shape, cast: impl Fn(f32) -> T) {
    for (i, row) in dst.chunks_mut(g.cols).enumerate() {
        let r = r0 + i;
        let codes = &src[r * g.cols..(r + 1) * g.cols];
        let scales = &sc[(r / g.br) * g.nbc..(r / g.br + 1) * g.nbc];
        for ((out, code), &s) in row.chunks_mut(g.bc).zip(codes.chunks(g.bc)).zip(scales) {
            for (o, &c) in out.iter_mut().zip(code) {
                *o = cast(decode(c) * s);
            }
        }
    }
}

/// The same loop compiled for AVX-512 or AVX2 when the CPU has them (found
/// at run time), else for the baseline.
macro_rules! dispatch {
    ($name:ident, $t:ty, $cast:expr) => {
        fn $name(dst: &mut [$t], r0: usize, src: &[u8], sc: &[f32], g: Shape) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512(dst: &mut [$t], r0: usize, src: &[u8], sc: &[f32], g: Shape) {
                    fill_rows(dst, r0, src, sc, g, $cast)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2(dst: &mut [$t], r0: usize, src: &[u8], sc: &[f32], g: Shape) {
                    fill_rows(dst, r0, src, sc, g, $cast)
                }
                if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU has the features the function is compiled for
                    return unsafe { avx512(dst, r0, src, sc, g) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: as above
                    return unsafe { avx2(dst, r0, src, sc, g) };
                }
            }
            fill_rows(dst, r0, src, sc, g, $cast)
        }
    };
}

dispatch!(fill_bf16, u16, bf16_bits);
dispatch!(fill_f32, f32, |x: f32| x);

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<f32> {
        let mut v: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.173).collect();
        v.extend((-200..200).map(|i| i as f32 * 1e-4));
        v.extend([448.0, 449.0, 464.0, 500.0, -1e6, 2f32.powi(-6), 2f32.powi(-9), 1.5 * 2f32.powi(-9), 0.0, -0.0, 1.0625, 1.1875, 0.0146, 240.0, 232.0]);
        v
    }

    #[test]
    fn fp8_encoding_matches_libtorch() {
        let v = samples();
        let ours: Vec<u8> = v.iter().map(|&x| f32_to_e4m3(x)).collect();
        let t = Tensor::from_slice(&v).clamp(-448.0, 448.0).to_kind(Kind::Float8e4m3fn);
        let mut theirs = vec![0u8; v.len()];
        t.view_dtype(Kind::Uint8).copy_data(&mut theirs, v.len());
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a, b, "{} -> ours {a:#04x}, libtorch {b:#04x}", v[i]);
        }
    }

    #[test]
    fn fp8_decoding_matches_libtorch_for_every_code() {
        let codes: Vec<u8> = (0..=255).collect();
        let t = Tensor::from_slice(&codes).view_dtype(Kind::Float8e4m3fn).to_kind(Kind::Float);
        let theirs = Vec::<f32>::try_from(&t).unwrap();
        for (c, b) in theirs.iter().enumerate() {
            let d = decode(c as u8);
            assert!(d.to_bits() == b.to_bits() || (d.is_nan() && b.is_nan()), "decode {c:#04x}: {d} vs {b}");
        }
        for x in [0.0f32, -0.0, 1.0, 3.0e38, f32::NAN, -f32::NAN, 1e-40, 65504.0, 0.1] {
            assert_eq!(bf16_bits(x), f32_to_bf16(x), "{x}");
        }
    }

    #[test]
    fn bf16_encoding_matches_libtorch() {
        let v = samples();
        let t = Tensor::from_slice(&v).to_kind(Kind::BFloat16);
        let mut theirs = vec![0i16; v.len()];
        t.view_dtype(Kind::Int16).copy_data(&mut theirs, v.len());
        for (i, &x) in v.iter().enumerate() {
            assert_eq!(f32_to_bf16(x), theirs[i] as u16, "{x}");
        }
    }

    #[test]
    fn fused_fp8_product_equals_dequantize_then_matmul() {
        // rows of x 1..=17 cover every tile size and the remainders; shapes
        // cover partial scale blocks in both directions and tails under 16 lanes
        for (n, k) in [(256, 384), (300, 130), (7, 5), (129, 200)] {
            let w = (Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 60.0).to_kind(Kind::Float8e4m3fn);
            let s = Tensor::rand([(n + 127) / 128, (k + 127) / 128], (Kind::Float, Device::Cpu)) + 0.01;
            let dense = super::super::weight::dequantize(&w, &s, [128, 128]).unwrap();
            for m in [1, 2, 3, 5, 8, 13, 17] {
                let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu));
                let want = x.to_kind(Kind::Double).linear(&dense.to_kind(Kind::Double), None::<Tensor>);
                let got = fp8_linear_cpu(&x, &w, &s, [128, 128]).unwrap();
                assert_eq!(got.size(), [m, n]);
                let scale = want.abs().max().double_value(&[]).max(1.0);
                let err = (got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]) / scale;
                assert!(err < 2e-6, "{n}x{k}, {m} rows: relative error {err}");
            }
            // leading dimensions are kept, bf16 inputs are read as f32
            let x = Tensor::randn([2, 3, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let got = fp8_linear_cpu(&x, &w, &s, [128, 128]).unwrap();
            assert_eq!(got.size(), [2, 3, n]);
            let want = x.to_kind(Kind::Float).linear(&dense, None::<Tensor>);
            assert!(got.allclose(&want, 1e-5, 1e-3, false));
        }
        // wrong shapes are an error, not a read out of bounds
        let w = Tensor::zeros([4, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::Float8e4m3fn);
        let s = Tensor::ones([1, 1], (Kind::Float, Device::Cpu));
        assert!(fp8_linear_cpu(&Tensor::zeros([2, 7], (Kind::Float, Device::Cpu)), &w, &s, [128, 128]).is_err());
        assert!(fp8_linear_cpu(&Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)), &w, &Tensor::ones([2, 1], (Kind::Float, Device::Cpu)), [128, 128]).is_err());
    }

    #[test]
    fn cpu_dequantization_equals_libtorch_bit_for_bit() {
        for (rows, cols) in [(256, 384), (300, 130), (576, 256), (7, 5)] {
            let w = (Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * 60.0).to_kind(Kind::Float8e4m3fn);
            let s = Tensor::rand([(rows + 127) / 128, (cols + 127) / 128], (Kind::Float, Device::Cpu));
            let want = super::super::weight::dequantize(&w, &s, [128, 128]).unwrap();
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                let got = dequantize_fp8_cpu(&w, &s, [128, 128], kind).unwrap();
                assert_eq!(got.kind(), kind);
                assert!(got.equal(&want.to_kind(kind)), "{rows}x{cols} {kind:?}");
            }
            // rows taken from the middle, as chunked products take them
            if rows >= 256 {
                let part = dequantize_fp8_cpu(&w.narrow(0, 128, 128), &s.narrow(0, 1, 1), [128, 128], Kind::Float).unwrap();
                assert!(part.equal(&want.narrow(0, 128, 128)));
            }
        }
    }
}
