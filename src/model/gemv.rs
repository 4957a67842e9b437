//! `x W^T` in f32 for the one to four rows of a decode step on the CPU, in
//! a hand-written loop.
//!
//! Why our own loop rather than libtorch's `linear`: at a decode step the
//! product is a matrix-vector one over a small weight (the bench model's
//! are 16 to 4096 rows of 96 to 1024 columns), and libtorch's path to its
//! BLAS (dispatch, shape checks, output allocation, the BLAS call's own
//! set-up) costs as much as reading the weight. This loop reads each weight
//! row once for all of `x`'s rows, with four independent multiply-add
//! chains per row so that the loads, not the adds, bound it. One row of `x`
//! over a weight of 64Ki elements or more is shared with libtorch's own
//! OpenMP threads (see [`Omp`]); smaller ones run on the calling thread.
//! CPUs without AVX2 and FMA, and every other case (more
//! rows, another dtype, a gradient to record), take libtorch's `linear`.
//!
//! The sums run in another order than a BLAS GEMM's, so results agree with
//! libtorch to f32 rounding (relative 1e-6), not bit for bit.

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use super::nn::cpu_f32_no_grad;
use crate::error::Result;

/// Rows of `x` up to which [`linear_few_f32`] computes the product.
pub const GEMV_MAX_ROWS: usize = 4;

/// Weight elements per thread when threads must be spawned for the product
/// (no OpenMP runtime found): below this it runs on the calling thread.
const PER_THREAD: usize = 1 << 20;

/// Weight elements from which one row's product is shared with libtorch's
/// OpenMP threads (256 KiB of f32).
const PER_TEAM: usize = 1 << 16;

/// libtorch's OpenMP runtime (GNU `libgomp`, or another that offers its
/// entry points, as LLVM's and Intel's do), found at run time.
///
/// Why libtorch's threads and not a pool of our own: between libtorch's
/// operations its OpenMP workers spin waiting for the next parallel region,
/// on the same cores a pool of ours would need, so a second pool would
/// compete with them; handing them our rows costs about what starting one
/// of libtorch's own parallel loops costs. Without such a runtime the rows
/// stay on the calling thread (or spawned threads for large weights).
#[derive(Clone, Copy)]
struct Omp {
    parallel: unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint),
    team: unsafe extern "C" fn() -> c_int,
    me: unsafe extern "C" fn() -> c_int,
}

/// The entry points, looked up once (they do not change while the process
/// runs).
fn omp() -> Option<Omp> {
    static OMP: OnceLock<Option<Omp>> = OnceLock::new();
    *OMP.get_or_init(|| {
        let find = |name: &CStr| {
            // SAFETY: looks a symbol up in the objects already loaded
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (parallel, team, me) = (find(c"GOMP_parallel")?, find(c"omp_get_num_threads")?, find(c"omp_get_thread_num")?);
        // SAFETY: these are the GNU OpenMP ABI's signatures of the three
        // functions (libgomp's `GOMP_parallel(fn, data, num_threads, flags)`)
        unsafe {
            Some(Omp {
                parallel: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint)>(parallel),
                team: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(team),
                me: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(me),
            })
        }
    })
}

/// One product shared by an OpenMP team: each member takes its share of
/// the weight's rows.
struct TeamJob<'a> {
    out: *mut f32,
    x: &'a [f32],
    w: &'a [f32],
    k: usize,
    omp: Omp,
}

impl Omp {
    /// `out = w x` for one row `x` on up to `threads` threads.
    fn run(self, out: &mut [f32], x: &[f32], w: &[f32], k: usize, threads: usize) {
        let job = TeamJob { out: out.as_mut_ptr(), x, w, k, omp: self };
        // SAFETY: `job` outlives the call (GOMP_parallel returns when the
        // whole team has finished); each member writes its own rows of `out`
        unsafe { (self.parallel)(team_member, &job as *const TeamJob as *mut c_void, threads as c_uint, 0) };
    }
}

/// What each thread of the team runs: rows `[t * per, (t + 1) * per)` for
/// member `t` of a team of the size the runtime actually gave.
extern "C" fn team_member(data: *mut c_void) {
    // SAFETY: `data` is the `TeamJob` that `Omp::run` passed, alive until
    // the region ends
    let job = unsafe { &*(data as *const TeamJob) };
    // SAFETY: called inside the parallel region the runtime started
    let (size, me) = unsafe { ((job.omp.team)().max(1) as usize, (job.omp.me)().max(0) as usize) };
    let rows = job.w.len() / job.k;
    let per = rows.div_ceil(size);
    let (r0, r1) = ((me * per).min(rows), ((me + 1) * per).min(rows));
    if r0 < r1 {
        // SAFETY: rows r0..r1 of `out` (one value each) belong to this
        // member alone and lie inside it (`out` has `rows` values)
        let out = unsafe { std::slice::from_raw_parts_mut(job.out.add(r0), r1 - r0) };
        products(out, job.x, &job.w[r0 * job.k..r1 * job.k], 1, job.k);
    }
}

/// `x W^T (+ b)` for f32 `x` [.., k] with at most [`GEMV_MAX_ROWS`] rows and
/// a contiguous f32 `w` [n, k], all on the CPU with nothing requiring a
/// gradient, on a CPU with AVX2 and FMA; `None` otherwise (the caller takes
/// libtorch's `linear`).
pub(crate) fn linear_few_f32(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !has_avx2_fma() {
        return Ok(None);
    }
    let xs = x.size();
    let (n, k) = match w.size().as_slice() {
        [n, k] => (*n, *k),
        _ => return Ok(None),
    };
    if xs.last() != Some(&k) || k == 0 || n == 0 {
        return Ok(None);
    }
    let m = x.numel() / k as usize;
    if m == 0 || m > GEMV_MAX_ROWS || !cpu_f32_no_grad(x) || !cpu_f32_no_grad(w) || !w.is_contiguous() {
        return Ok(None);
    }
    if let Some(b) = bias {
        if !cpu_f32_no_grad(b) || b.size() != [n] {
            return Ok(None);
        }
    }
    let x = x.f_contiguous()?;
    let bias = bias.map(|b| b.f_contiguous()).transpose()?;
    let mut shape = xs[..xs.len() - 1].to_vec();
    shape.push(n);
    let out = Tensor::f_empty(shape.as_slice(), (Kind::Float, Device::Cpu))?;
    let (nu, ku) = (n as usize, k as usize);
    // SAFETY: `x`, `w`, `bias` and `out` are contiguous f32 CPU tensors of
    // exactly these element counts (checked or created above), alive for the
    // whole function; `out` is new and written only here.
    let (xv, wv, bv, dst) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, m * ku),
            std::slice::from_raw_parts(w.data_ptr() as *const f32, nu * ku),
            bias.as_ref().map(|b| std::slice::from_raw_parts(b.data_ptr() as *const f32, nu)),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, m * nu),
        )
    };
    let threads = tch::get_num_threads().max(1) as usize;
    let shared = m == 1 && threads > 1 && nu * ku >= PER_TEAM;
    match omp().filter(|_| shared) {
        // [1, n] is the layout `products` writes: straight into the output
        Some(omp) => omp.run(dst, xv, wv, ku, threads),
        None if m == 1 => {
            let threads = threads.min((nu * ku).div_ceil(PER_THREAD)).min(nu);
            let per = nu.div_ceil(threads);
            if threads <= 1 {
                products(dst, xv, wv, 1, ku);
            } else {
                std::thread::scope(|scope| {
                    for (d, w) in dst.chunks_mut(per).zip(wv.chunks(per * ku)) {
                        scope.spawn(move || products(d, xv, w, 1, ku));
                    }
                });
            }
        }
        None => {
            // [n, m] per weight row, then transposed into [m, n]
            let mut rows = vec![0f32; nu * m];
            products(&mut rows, xv, wv, m, ku);
            for (r, dots) in rows.chunks_exact(m).enumerate() {
                for (i, d) in dots.iter().enumerate() {
                    dst[i * nu + r] = *d;
                }
            }
        }
    }
    if let Some(b) = bv {
        for row in dst.chunks_exact_mut(nu) {
            row.iter_mut().zip(b).for_each(|(d, b)| *d += b);
        }
    }
    Ok(Some(out))
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[r * m + i] = x_i . w_r` for every row `w_r` of `w` [r, k] and `x_i`
/// of `x` [m, k]. Only called after [`has_avx2_fma`].
fn products(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller checked that the CPU has AVX2 and FMA
        unsafe {
            match m {
                1 => avx2::rows::<1>(out, x, w, k),
                2 => avx2::rows::<2>(out, x, w, k),
                3 => avx2::rows::<3>(out, x, w, k),
                _ => avx2::rows::<4>(out, x, w, k),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        for (r, wr) in w.chunks_exact(k).enumerate() {
            for i in 0..m {
                out[r * m + i] = x[i * k..(i + 1) * k].iter().zip(wr).map(|(a, b)| a * b).sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the eight lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// [`super::products`] for `T` rows of `x`: per weight row, four
    /// accumulators of eight lanes per row of `x`, 32 columns a step, then
    /// eight at a time, then one.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows<const T: usize>(out: &mut [f32], x: &[f32], w: &[f32], k: usize) {
        assert!(x.len() >= T * k && w.len() % k == 0 && out.len() >= w.len() / k * T);
        let (k32, k8) = (k / 32 * 32, k / 8 * 8);
        for (r, wr) in w.chunks_exact(k).enumerate() {
            let wp = wr.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); 4]; T];
            let mut j = 0;
            while j < k32 {
                for u in 0..4 {
                    // SAFETY: j + 8u + 8 <= k32 <= k: inside row r of w and
                    // row t of x (asserted above)
                    unsafe {
                        let wv = _mm256_loadu_ps(wp.add(j + 8 * u));
                        for t in 0..T {
                            acc[t][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(t * k + j + 8 * u)), wv, acc[t][u]);
                        }
                    }
                }
                j += 32;
            }
            while j < k8 {
                // SAFETY: j + 8 <= k8 <= k, as above
                unsafe {
                    let wv = _mm256_loadu_ps(wp.add(j));
                    for t in 0..T {
                        acc[t][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(t * k + j)), wv, acc[t][0]);
                    }
                }
                j += 8;
            }
            for t in 0..T {
                let [a0, a1, a2, a3] = acc[t];
                let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
                for c in k8..k {
                    s = x[t * k + c].mul_add(wr[c], s);
                }
                out[r * T + t] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]).max(1.0);
        (a - b).abs().max().double_value(&[]) / scale
    }

    /// Every row count up to four, columns around the 8- and 32-wide steps
    /// (and not a multiple of either), with and without a bias, with a batch
    /// dimension, and a weight large enough to be split over threads: the
    /// same values as libtorch's `linear` to f32 rounding.
    #[test]
    fn few_row_products_equal_libtorch_linear() {
        if !has_avx2_fma() {
            assert!(linear_few_f32(&Tensor::ones([1, 8], (Kind::Float, Device::Cpu)), &Tensor::ones([2, 8], (Kind::Float, Device::Cpu)), None).unwrap().is_none());
            return;
        }
        tch::manual_seed(3);
        let cpu = (Kind::Float, Device::Cpu);
        for &(n, k) in &[(1i64, 1i64), (5, 7), (64, 8), (3, 31), (300, 32), (17, 33), (192, 96), (96, 256), (40, 1000), (2100, 512)] {
            for m in 1..=GEMV_MAX_ROWS as i64 {
                for with_bias in [false, true] {
                    let x = Tensor::randn([m, k], cpu);
                    let w = Tensor::randn([n, k], cpu);
                    let b = with_bias.then(|| Tensor::randn([n], cpu));
                    let want = x.linear(&w, b.as_ref());
                    let got = linear_few_f32(&x, &w, b.as_ref()).unwrap().expect("taken");
                    assert_eq!(got.size(), [m, n]);
                    let d = max_rel_diff(&got, &want);
                    assert!(d <= 1e-5, "[{m}, {k}] x [{n}, {k}]^T, bias {with_bias}: off by {d:e}");
                    let got3 = linear_few_f32(&x.unsqueeze(0), &w, b.as_ref()).unwrap().expect("taken");
                    assert_eq!(got3.size(), [1, m, n]);
                    assert!(got3.squeeze_dim(0).equal(&got));
                }
            }
        }
    }

    /// What it does not take goes to libtorch: more rows, a gradient to
    /// record, another dtype, a transposed weight, a mismatched bias.
    #[test]
    fn other_products_are_left_to_libtorch() {
        let cpu = (Kind::Float, Device::Cpu);
        let (x, w) = (Tensor::randn([1, 16], cpu), Tensor::randn([8, 16], cpu));
        let none = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| linear_few_f32(x, w, b).unwrap().is_none();
        assert!(none(&Tensor::randn([GEMV_MAX_ROWS as i64 + 1, 16], cpu), &w, None));
        assert!(none(&x.copy().set_requires_grad(true), &w, None));
        assert!(none(&x, &w.copy().set_requires_grad(true), None));
        assert!(none(&x.to_kind(Kind::Double), &w.to_kind(Kind::Double), None));
        assert!(none(&x, &Tensor::randn([16, 8], cpu).tr(), None));
        assert!(none(&x, &w, Some(&Tensor::randn([7], cpu))));
        assert!(none(&x, &Tensor::randn([8, 15], cpu), None));
    }
}
