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
//! OpenMP threads (see `Omp`); smaller ones run on the calling thread.
//! CPUs without AVX2 and FMA, and every other case (more
//! rows, another dtype, a gradient to record), take libtorch's `linear`.
//!
//! `swiglu_sum_one_row` runs a decode step's whole feed-forward block
//! (the chosen experts, weighted, and the shared experts; or a dense MLP)
//! on these loops in two team regions instead of one per product, and
//! `Simd` hands the loops to the attention step in `mla.rs`.
//!
//! The sums run in another order than a BLAS GEMM's, so results agree with
//! libtorch to f32 rounding (relative 1e-6), not bit for bit.

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use super::nn::{cpu_f32_no_grad, silu_times};
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

impl Omp {
    /// Runs `job(member, team_size)` on every member of a team of up to
    /// `threads` threads (the calling thread among them) and returns when
    /// all have finished.
    fn team(self, threads: usize, job: &(dyn Fn(usize, usize) + Sync)) {
        let call = TeamCall { job, omp: self };
        // SAFETY: `call` outlives the region (GOMP_parallel returns when the
        // whole team has finished) and is only read by the members
        unsafe { (self.parallel)(team_member, &call as *const TeamCall as *mut c_void, threads as c_uint, 0) };
    }
}

/// What [`Omp::team`] hands each member of the team.
struct TeamCall<'a> {
    job: &'a (dyn Fn(usize, usize) + Sync),
    omp: Omp,
}

/// What each thread of the team runs: the job, told which member it is of a
/// team of the size the runtime actually gave.
extern "C" fn team_member(data: *mut c_void) {
    // SAFETY: `data` is the `TeamCall` that `Omp::team` passed, alive until
    // the region ends
    let call = unsafe { &*(data as *const TeamCall) };
    // SAFETY: called inside the parallel region the runtime started
    let (size, me) = unsafe { ((call.omp.team)().max(1) as usize, (call.omp.me)().max(0) as usize) };
    (call.job)(me.min(size - 1), size);
}

/// libtorch's intra-op thread count, and its OpenMP team for a product
/// over `elements` weight elements when there is more than one thread and
/// the weight is large enough to share ([`PER_TEAM`]).
fn threads_for(elements: usize) -> (usize, Option<Omp>) {
    let threads = tch::get_num_threads().max(1) as usize;
    (threads, omp().filter(|_| threads > 1 && elements >= PER_TEAM))
}

/// Runs `job(member, task)` once for every task `0..costs.len()` on
/// libtorch's OpenMP team, each member taking whole tasks in turn; `false`
/// (nothing run) where there is no team to share them: one intra-op thread,
/// fewer than two tasks, or no OpenMP runtime found.
///
/// Tasks go to members by [`assign_tasks`] for the team size the runtime
/// actually gave (a call from inside another parallel region gets a team
/// of one, which then runs them all). A member runs its tasks on its own
/// thread, so the libtorch operations a job calls see that they are inside
/// a parallel region and run on that thread alone, their BLAS products
/// included: the work is shared by tasks, not inside each operation.
pub(crate) fn tasks_on_team(costs: &[usize], job: &(dyn Fn(usize, usize) + Sync)) -> bool {
    let threads = tch::get_num_threads().max(1) as usize;
    let Some(omp) = omp().filter(|_| threads > 1 && costs.len() > 1) else {
        return false;
    };
    omp.team(threads.min(costs.len()), &|me, size| {
        for (task, member) in assign_tasks(costs, size).into_iter().enumerate() {
            if member == me {
                job(me, task);
            }
        }
    });
    true
}

/// The member of `size` that runs each task: the costliest task first,
/// each to the member with the least cost so far (the lowest-numbered on a
/// tie), so that the members finish close together.
pub(crate) fn assign_tasks(costs: &[usize], size: usize) -> Vec<usize> {
    let size = size.max(1);
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&t| std::cmp::Reverse(costs[t]));
    let mut load = vec![0usize; size];
    let mut member = vec![0usize; costs.len()];
    for t in order {
        let m = (0..size).min_by_key(|&m| (load[m], m)).unwrap_or(0);
        load[m] += costs[t];
        member[t] = m;
    }
    member
}

/// Member `me`'s share `[r0, r1)` of `rows` rows split over `size` members.
fn share(rows: usize, me: usize, size: usize) -> (usize, usize) {
    let per = rows.div_ceil(size);
    ((me * per).min(rows), ((me + 1) * per).min(rows))
}

/// An output that the members of a team write at disjoint places.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: members write disjoint ranges of the memory (each user says why)
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// Values `[at, at + n)`.
    ///
    /// # Safety
    /// The range lies inside the memory, and no other member touches it
    /// while the slice lives.
    unsafe fn part<'a>(self, at: usize, n: usize) -> &'a mut [f32] {
        // SAFETY: as the caller promises
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), n) }
    }

    /// The first `n` values, read only.
    ///
    /// # Safety
    /// They lie inside the memory, and no member writes them while the
    /// slice lives.
    unsafe fn read<'a>(self, n: usize) -> &'a [f32] {
        // SAFETY: as the caller promises
        unsafe { std::slice::from_raw_parts(self.0, n) }
    }
}

/// One SwiGLU MLP for [`swiglu_sum_one_row`]: the stacked `[gate; up]`
/// weight `[2I, D]` and `down` `[D, I]`, row-major f32, and the factor on
/// its output in the sum (`None`: added as it is, as a shared expert's).
pub(crate) struct SwigluWeights<'a> {
    pub gate_up: &'a [f32],
    pub down: &'a [f32],
    pub inter: usize,
    pub factor: Option<f32>,
}

/// `out = sum_e f_e down_e(silu(gate_e x) * up_e x)` for one f32 row `x`
/// `[D]`, the terms added in the order given (a decode step's routed
/// experts in the router's order, then the shared experts; or a dense MLP
/// alone), each product as [`linear_few_f32`] computes it and the sum as the
/// MoE layer's weighted sum does. `false` (nothing written) where it does
/// not apply: shapes that do not fit, or weights large enough to want more
/// threads than the calling one when no OpenMP runtime was found.
///
/// Why one pass for all of them: taken one linear at a time, a decode
/// step's MoE layer is ten products, five activations, the weighted sum
/// and the shared expert's addition, each allocating its output, and ten
/// parallel regions for the larger products. Here the team runs two
/// regions: every member computes its share of all the hidden
/// activations, then its share of the output rows over every MLP.
pub(crate) fn swiglu_sum_one_row(simd: Simd, x: &[f32], mlps: &[SwigluWeights], out: &mut [f32]) -> bool {
    let d = x.len();
    let fits = |m: &SwigluWeights| m.inter > 0 && m.gate_up.len() == 2 * m.inter * d && m.down.len() == d * m.inter;
    if d == 0 || out.len() != d || mlps.is_empty() || !mlps.iter().all(fits) {
        return false;
    }
    let elements: usize = mlps.iter().map(|m| 3 * m.inter * d).sum();
    let (threads, team) = threads_for(elements);
    if team.is_none() && threads > 1 && elements > PER_THREAD {
        return false;
    }
    // where each MLP's hidden activations start in one buffer
    let starts: Vec<usize> = mlps.iter().scan(0, |at, m| Some(std::mem::replace(at, *at + m.inter))).collect();
    let total: usize = mlps.iter().map(|m| m.inter).sum();
    let mut hidden = vec![0f32; total];
    let (hid, dst) = (Shared(hidden.as_mut_ptr()), Shared(out.as_mut_ptr()));
    // member `me` of `size`: its share of all the hidden rows, across MLPs
    let activations = |me: usize, size: usize| {
        let (r0, r1) = share(total, me, size);
        let mut up = Vec::new();
        for (m, &start) in mlps.iter().zip(&starts) {
            let (i0, i1) = (r0.max(start) - start, r1.min(start + m.inter).saturating_sub(start));
            if i0 >= i1 {
                continue;
            }
            // SAFETY: hidden rows start+i0 .. start+i1 lie in [r0, r1), this
            // member's share of the `total` values
            let gate = unsafe { hid.part(start + i0, i1 - i0) };
            simd.products(gate, x, &m.gate_up[i0 * d..i1 * d], 1, d);
            up.resize(i1 - i0, 0.0);
            simd.products(&mut up, x, &m.gate_up[(m.inter + i0) * d..(m.inter + i1) * d], 1, d);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = silu_times(*g, *u);
            }
        }
    };
    // member `me` of `size`: its share of the output rows, over every MLP
    let outputs = |me: usize, size: usize| {
        let (j0, j1) = share(d, me, size);
        if j0 >= j1 {
            return;
        }
        // SAFETY: output rows j0..j1 (inside its d) are this member's alone;
        // the hidden activations were all written before this phase began
        // and are only read in it
        let (acc, hidden) = unsafe { (dst.part(j0, j1 - j0), hid.read(total)) };
        let mut y = vec![0f32; j1 - j0];
        for (e, (m, &start)) in mlps.iter().zip(&starts).enumerate() {
            simd.products(&mut y, &hidden[start..start + m.inter], &m.down[j0 * m.inter..j1 * m.inter], 1, m.inter);
            for (a, y) in acc.iter_mut().zip(&y) {
                let term = m.factor.map_or(*y, |f| y * f);
                *a = if e == 0 { term } else { *a + term };
            }
        }
    };
    match team {
        Some(omp) => {
            omp.team(threads, &activations);
            omp.team(threads, &outputs);
        }
        None => {
            activations(0, 1);
            outputs(0, 1);
        }
    }
    true
}

/// `x W^T (+ b)` for f32 `x` [.., k] with at most [`GEMV_MAX_ROWS`] rows and
/// a contiguous f32 `w` [n, k], all on the CPU with nothing requiring a
/// gradient, on a CPU with AVX2 and FMA; `None` otherwise (the caller takes
/// libtorch's `linear`).
pub(crate) fn linear_few_f32(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some(simd) = Simd::detect() else {
        return Ok(None);
    };
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
    let (threads, team) = threads_for(nu * ku);
    match team.filter(|_| m == 1) {
        // [1, n] is the layout `products` writes: straight into the output
        Some(omp) => {
            let out = Shared(dst.as_mut_ptr());
            omp.team(threads, &|me, size| {
                let (r0, r1) = share(nu, me, size);
                if r0 < r1 {
                    // SAFETY: rows r0..r1 of the output (one value each, inside
                    // its nu) are this member's alone
                    let out = unsafe { out.part(r0, r1 - r0) };
                    simd.products(out, xv, &wv[r0 * ku..r1 * ku], 1, ku);
                }
            });
        }
        None if m == 1 => {
            let threads = threads.min((nu * ku).div_ceil(PER_THREAD)).min(nu);
            let per = nu.div_ceil(threads);
            if threads <= 1 {
                simd.products(dst, xv, wv, 1, ku);
            } else {
                std::thread::scope(|scope| {
                    for (d, w) in dst.chunks_mut(per).zip(wv.chunks(per * ku)) {
                        scope.spawn(move || simd.products(d, xv, w, 1, ku));
                    }
                });
            }
        }
        None => {
            // [n, m] per weight row, then transposed into [m, n]
            let mut rows = vec![0f32; nu * m];
            simd.products(&mut rows, xv, wv, m, ku);
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

/// Proof that the CPU has AVX2 and FMA: what the hand-written loops of
/// this module need. Only [`Simd::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Simd(SimdToken);

/// What a [`Simd`] holds: nothing where one can exist, an uninhabited type
/// where none can (so that no code path needs a run-time "unreachable").
#[cfg(target_arch = "x86_64")]
type SimdToken = ();
#[cfg(not(target_arch = "x86_64"))]
type SimdToken = std::convert::Infallible;

impl Simd {
    /// `Some` on a CPU with AVX2 and FMA.
    pub(crate) fn detect() -> Option<Simd> {
        #[cfg(target_arch = "x86_64")]
        {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Simd(()))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// `out[r * m + i] = x_i . w_r` for every row `w_r` of `w` [r, k] and
    /// `x_i` of `x` [m, k], `m` from 1 to [`GEMV_MAX_ROWS`].
    pub(crate) fn products(self, out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Simd` exists only where the CPU has AVX2 and FMA
        unsafe {
            match m {
                1 => avx2::rows::<1>(out, x, w, k),
                2 => avx2::rows::<2>(out, x, w, k),
                3 => avx2::rows::<3>(out, x, w, k),
                _ => avx2::rows::<4>(out, x, w, k),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (out, x, w, m, k);
            match self.0 {}
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

    /// [`super::Simd::products`] for `T` rows of `x`: per weight row, four
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

    /// Every task goes to exactly one member, the costliest first, each to
    /// the least loaded; a team of one (or of none) takes everything.
    #[test]
    fn tasks_go_to_the_least_loaded_member() {
        let costs = [256, 300, 10, 180, 250, 255, 40, 900];
        let members = assign_tasks(&costs, 2);
        assert_eq!(members.len(), costs.len());
        let load = |m: usize| costs.iter().zip(&members).filter(|(_, &k)| k == m).map(|(c, _)| c).sum::<usize>();
        assert_eq!(load(0) + load(1), costs.iter().sum::<usize>());
        assert_eq!(members[7], 0, "the costliest task goes first, to member 0");
        assert!(load(0).abs_diff(load(1)) < 20, "loads {} and {}: not balanced", load(0), load(1));
        assert_eq!(assign_tasks(&[5, 4, 3, 3, 3, 2], 2), vec![0, 1, 1, 0, 1, 0], "an even split of 20");
        assert!(assign_tasks(&costs, 1).iter().all(|&m| m == 0));
        assert!(assign_tasks(&costs, 0).iter().all(|&m| m == 0));
        assert_eq!(assign_tasks(&[5, 5, 5], 3), vec![0, 1, 2], "ties keep task order");
        assert!(assign_tasks(&[], 2).is_empty());
    }

    /// Run on the team, every task runs once, on the member it was assigned
    /// to; with fewer than two tasks nothing runs and the caller is told so.
    #[test]
    fn tasks_on_team_run_each_task_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let costs = [7usize, 3, 9, 1, 4];
        let runs: Vec<AtomicUsize> = costs.iter().map(|_| AtomicUsize::new(0)).collect();
        let ran_by: Vec<AtomicUsize> = costs.iter().map(|_| AtomicUsize::new(usize::MAX)).collect();
        let ran = tasks_on_team(&costs, &|me, t| {
            runs[t].fetch_add(1, Ordering::SeqCst);
            ran_by[t].store(me, Ordering::SeqCst);
        });
        if ran {
            assert!(runs.iter().all(|r| r.load(Ordering::SeqCst) == 1));
            let size = ran_by.iter().map(|m| m.load(Ordering::SeqCst)).max().unwrap_or(0) + 1;
            let expected = assign_tasks(&costs, size);
            assert!(ran_by.iter().zip(&expected).all(|(m, &e)| m.load(Ordering::SeqCst) == e));
        } else {
            assert!(tch::get_num_threads() < 2 || omp().is_none(), "no team with {} threads", tch::get_num_threads());
            assert!(runs.iter().all(|r| r.load(Ordering::SeqCst) == 0));
        }
        assert!(!tasks_on_team(&[1], &|_, _| panic!("a single task is left to the caller")));
    }

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
        if Simd::detect().is_none() {
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

    /// Several SwiGLU MLPs on one row, weighted or not, small and large
    /// enough for the team: the same sum as libtorch's products, activation
    /// and weighted additions, to f32 rounding; shapes that do not fit are
    /// refused without writing.
    #[test]
    fn one_row_swiglu_sums_equal_libtorch_operations() {
        let Some(simd) = Simd::detect() else { return };
        tch::manual_seed(5);
        let cpu = (Kind::Float, Device::Cpu);
        let d = 96i64;
        for inters in [vec![8i64], vec![40, 40, 24], vec![700, 64, 300, 1000]] {
            let x = Tensor::randn([d], cpu);
            let blocks: Vec<(Tensor, Tensor, Option<f32>)> = inters
                .iter()
                .enumerate()
                .map(|(e, &i)| (Tensor::randn([2 * i, d], cpu), Tensor::randn([d, i], cpu), (e + 1 < inters.len()).then_some(0.25 * (e + 1) as f32)))
                .collect();
            let mut want: Option<Tensor> = None;
            for ((gu, down, f), &i) in blocks.iter().zip(&inters) {
                let g = x.unsqueeze(0).linear::<Tensor>(gu, None);
                let h = g.narrow(-1, 0, i).silu() * g.narrow(-1, i, i);
                let y = h.linear::<Tensor>(down, None).squeeze_dim(0);
                let y = f.map_or(y.shallow_clone(), |f| &y * f as f64);
                want = Some(want.map_or(y.shallow_clone(), |w| w + &y));
            }
            let want = want.unwrap();
            // SAFETY: contiguous f32 CPU tensors made above, alive to the end
            let slice = |t: &Tensor| unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) };
            let weights: Vec<SwigluWeights> =
                blocks.iter().zip(&inters).map(|((gu, down, f), &i)| SwigluWeights { gate_up: slice(gu), down: slice(down), inter: i as usize, factor: *f }).collect();
            let mut out = vec![0f32; d as usize];
            assert!(swiglu_sum_one_row(simd, slice(&x), &weights, &mut out), "{inters:?}: refused");
            let got = Tensor::from_slice(&out);
            let d_rel = max_rel_diff(&got, &want);
            assert!(d_rel <= 1e-5, "{inters:?}: off by {d_rel:e}");
            // a row of the wrong width, and no output room: refused, untouched
            let mut short = vec![7f32; d as usize - 1];
            assert!(!swiglu_sum_one_row(simd, slice(&x), &weights, &mut short));
            assert!(short.iter().all(|v| *v == 7.0));
            assert!(!swiglu_sum_one_row(simd, &slice(&x)[1..], &weights, &mut out));
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
