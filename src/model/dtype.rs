//! Number formats of checkpoints: `float8_e4m3fn` and bf16 conversions, and
//! block-scaled FP8 dequantization on the CPU.
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
    if scale.size() != [nbr, nbc] || w.kind() != Kind::Float8e4m3fn || w.device() != Device::Cpu {
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
