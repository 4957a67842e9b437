//! Weights that know how they are stored, in the spirit of mistral.rs's
//! `QuantMethod`: a block asks a [`Weight`] for its product with an input
//! (`linear`), its rows (`embedding`) or the whole matrix (`tensor`), and
//! never cares where the numbers live.
//!
//! Three stores:
//! - **ready**: a tensor in the compute dtype on the compute device, exactly
//!   what every block held before weights had stores (the fast path);
//! - **packed**: the checkpoint's own compact form kept in memory: block-scaled
//!   FP8 (`float8_e4m3fn` + f32 `weight_scale_inv`, one byte per parameter)
//!   or bf16 under an f32 compute dtype. It is converted at the point of use,
//!   a bounded chunk of rows at a time ([`CHUNK_BYTES`]), never into a full
//!   copy of the model;
//! - **mapped**: still in the checkpoint files. Each use reads it through the
//!   model's [`Streamer`](super::stream::Streamer), which counts the bytes and
//!   keeps routed experts in an LRU cache within the memory budget.
//!
//! Dequantization is `w = fp8 * scale_inv` per 128x128 block, computed in f32
//! and then cast to the compute dtype: the same arithmetic, in the same
//! order, as dequantizing at load, so both give bit-identical weights. A
//! product with few input rows on the CPU skips the dequantized copy
//! ([`fp8_linear_cpu`](super::dtype::fp8_linear_cpu)): in f32 the same
//! weights with sums in another order, so equal to rounding; under bf16 the
//! weights are not rounded to bf16 first, so equal to bf16 precision.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::stream::{Streamer, TensorRef};
use crate::error::{Error, Result};

/// Largest f32 temporary one dequantized or converted chunk of a weight may
/// take (a bf16 compute dtype adds its cast, half as large); larger weights
/// are applied chunk by chunk.
pub const CHUNK_BYTES: usize = 16 << 20;

/// One row segment of a weight in its checkpoint form.
#[derive(Debug)]
pub enum Part {
    /// Stored values (bf16, f16 or f32) `[rows, cols]` or `[n]`.
    Plain(Tensor),
    /// Block-scaled FP8: `w` [rows, cols] `float8_e4m3fn`, `scale_inv`
    /// [ceil(rows/br), ceil(cols/bc)] f32.
    Fp8 { w: Tensor, scale_inv: Tensor, block: [i64; 2] },
}

impl Part {
    pub fn rows(&self) -> i64 {
        match self {
            Part::Plain(t) => t.size().first().copied().unwrap_or(0),
            Part::Fp8 { w, .. } => w.size()[0],
        }
    }

    /// Bytes held (scales included).
    pub fn bytes(&self) -> usize {
        match self {
            Part::Plain(t) => tensor_bytes(t),
            Part::Fp8 { w, scale_inv, .. } => tensor_bytes(w) + tensor_bytes(scale_inv),
        }
    }

    /// Rows `r0 .. r0 + n` as `kind` on `device`. For FP8, `r0` must start a
    /// scale block (chunks are whole blocks).
    pub fn rows_as(&self, r0: i64, n: i64, kind: Kind, device: Device) -> Result<Tensor> {
        match self {
            Part::Plain(t) => Ok(t.f_narrow(0, r0, n)?.f_to_device(device)?.f_to_kind(kind)?),
            Part::Fp8 { w, scale_inv, block } => {
                let [br, _] = *block;
                let (w, s) = (w.f_narrow(0, r0, n)?, scale_inv.f_narrow(0, r0 / br, ceil_div(n, br))?);
                match (w.device(), device) {
                    (Device::Cpu, Device::Cpu) => super::dtype::dequantize_fp8_cpu(&w, &s, *block, kind),
                    _ => Ok(dequantize(&w.f_to_device(device)?, &s.f_to_device(device)?, *block)?.f_to_kind(kind)?),
                }
            }
        }
    }

    fn row_step(&self) -> i64 {
        match self {
            Part::Plain(_) => 1,
            Part::Fp8 { block, .. } => block[0],
        }
    }

    fn cols(&self) -> i64 {
        match self {
            Part::Plain(t) => t.size().get(1).copied().unwrap_or(1),
            Part::Fp8 { w, .. } => w.size()[1],
        }
    }

    /// Moves the stored bytes to `device` (no conversion).
    pub fn to_device(&self, device: Device) -> Result<Part> {
        Ok(match self {
            Part::Plain(t) => Part::Plain(t.f_to_device(device)?),
            Part::Fp8 { w, scale_inv, block } => Part::Fp8 {
                w: w.f_to_device(device)?,
                scale_inv: scale_inv.f_to_device(device)?,
                block: *block,
            },
        })
    }
}

/// A weight in checkpoint form: row segments stacked in order (e.g. `gate_proj`
/// then `up_proj` of one expert).
#[derive(Debug)]
pub struct Packed {
    pub parts: Vec<Part>,
    /// Memory the parts' tensors were read into (streamed weights): mapped
    /// anonymously, outside malloc's heap, so that dropping a weight returns
    /// its pages at once. Declared after `parts`, so it is dropped after them.
    memory: Vec<memmap2::MmapMut>,
    /// Where `memory` goes back to when this is dropped.
    pool: Option<Arc<super::stream::BufferPool>>,
}

impl Drop for Packed {
    fn drop(&mut self) {
        // the tensors view `memory`: they go first
        self.parts.clear();
        if let Some(pool) = &self.pool {
            pool.give(std::mem::take(&mut self.memory));
        }
    }
}

// SAFETY: a Packed is never changed after it is made: its tensors are only
// read (views, conversions and products create new tensors), and libtorch's
// reference counts are atomic, so sharing one between threads (the expert
// cache, the reader thread's results) is sound. tch marks Tensor !Sync
// because a tensor can be written in place; these never are.
unsafe impl Sync for Packed {}

impl Packed {
    pub fn new(parts: Vec<Part>) -> Packed {
        Packed { parts, memory: Vec::new(), pool: None }
    }

    /// Parts whose tensors view `memory`, which returns to `pool` when this
    /// is dropped (see [`Packed::memory`]).
    pub(crate) fn with_memory(parts: Vec<Part>, memory: Vec<memmap2::MmapMut>, pool: Arc<super::stream::BufferPool>) -> Packed {
        Packed { parts, memory, pool: Some(pool) }
    }

    /// True when the parts view memory this value owns: tensors taken from
    /// them must be copied before they outlive it.
    pub fn borrows_memory(&self) -> bool {
        !self.memory.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.parts.iter().map(Part::bytes).sum()
    }

    /// `x W^T`, converting at most [`CHUNK_BYTES`] of `W` at a time. A weight
    /// that fits one chunk is converted whole and applied in one product, the
    /// same product a ready weight computes.
    pub fn linear(&self, x: &Tensor, kind: Kind, device: Device) -> Result<Tensor> {
        self.linear_in_chunks(x, kind, device, CHUNK_BYTES)
    }

    fn linear_in_chunks(&self, x: &Tensor, kind: Kind, device: Device, chunk_bytes: usize) -> Result<Tensor> {
        if let Some(y) = self.fused_fp8(x, kind, device)? {
            return Ok(y);
        }
        let numel: i64 = self.parts.iter().map(|p| p.rows() * p.cols()).sum();
        if numel as usize * 4 <= chunk_bytes {
            return Ok(x.f_linear(&self.dense(kind, device)?, None::<Tensor>)?);
        }
        let mut outs = Vec::new();
        for part in &self.parts {
            let (rows, cols) = (part.rows(), part.cols());
            for (r0, n) in chunks(rows, cols, part.row_step(), chunk_bytes) {
                let w = part.rows_as(r0, n, kind, device)?;
                outs.push(x.f_linear(&w, None::<Tensor>)?);
            }
        }
        cat_last(outs)
    }

    /// `x W^T` straight from the FP8 codes ([`fp8_linear_cpu`](super::dtype::fp8_linear_cpu)),
    /// when every part is FP8 on the CPU, the product is computed there and
    /// `x` has at most [`FUSED_MAX_ROWS`](super::dtype::FUSED_MAX_ROWS) rows.
    fn fused_fp8(&self, x: &Tensor, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let cols = x.size().last().copied().unwrap_or(0);
        let rows = if cols > 0 { x.numel() as i64 / cols } else { 0 };
        if device != Device::Cpu || rows == 0 || rows > super::dtype::FUSED_MAX_ROWS {
            return Ok(None);
        }
        let mut outs = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            match part {
                Part::Fp8 { w, scale_inv, block } if super::dtype::fp8_linear_cpu_takes(x, w, scale_inv, *block) => {
                    outs.push(super::dtype::fp8_linear_cpu(x, w, scale_inv, *block)?)
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(cat_last(outs)?.f_to_kind(kind)?))
    }

    /// The whole matrix as `kind` on `device`.
    pub fn dense(&self, kind: Kind, device: Device) -> Result<Tensor> {
        let parts = self
            .parts
            .iter()
            .map(|p| p.rows_as(0, p.rows(), kind, device))
            .collect::<Result<Vec<_>>>()?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap_or_else(|| Tensor::new()));
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// Rows `ids` (any shape of i64) as `kind` on `device`: `[..ids, cols]`.
    pub fn gather(&self, ids: &Tensor, kind: Kind, device: Device) -> Result<Tensor> {
        match self.parts.as_slice() {
            [Part::Plain(t)] => {
                let flat = ids.f_flatten(0, -1)?.f_to_device(t.device())?;
                let rows = t.f_index_select(0, &flat)?.f_to_device(device)?.f_to_kind(kind)?;
                let mut shape = ids.size();
                shape.push(t.size()[1]);
                Ok(rows.f_view(shape.as_slice())?)
            }
            _ => Ok(Tensor::f_embedding(&self.dense(kind, device)?, &ids.f_to_device(device)?, -1, false, false)?),
        }
    }
}

/// Where a weight lives now.
#[derive(Debug)]
pub enum Store {
    /// The compute dtype on the compute device.
    Ready(Tensor),
    /// Checkpoint form in memory (on the compute device, or on the host when
    /// the compute device is a GPU); converted per use.
    Packed(Arc<Packed>),
    /// In the checkpoint files, read per use through the streamer.
    Mapped(Mapped),
}

/// A weight left in the checkpoint files.
#[derive(Debug, Clone)]
pub struct Mapped {
    /// The checkpoint tensors stacked along rows.
    pub parts: Vec<TensorRef>,
    pub streamer: Arc<Streamer>,
    /// Routed experts: kept in the streamer's LRU cache after a read.
    pub cached: bool,
    /// A copy in host memory to take instead of the files (GPU offload).
    pub host: Option<Arc<Packed>>,
}

/// The checkpoint tensors of one weight and the streamer that reads them,
/// for a read on another thread ([`read_ahead`](super::stream::read_ahead)).
#[derive(Debug, Clone)]
pub struct FetchJob {
    pub parts: Vec<TensorRef>,
    pub streamer: Arc<Streamer>,
}

/// What a weight is for, to group residency decisions and statistics.
#[derive(Debug)]
pub struct Weight {
    /// Checkpoint name (`...gate_up_proj.weight` for the stacked pair).
    pub name: String,
    /// Shape of the whole weight.
    pub shape: Vec<i64>,
    /// Compute dtype and device.
    pub kind: Kind,
    pub device: Device,
    pub store: Store,
}

impl Weight {
    /// `x W^T` (no bias) for `x` [.., in] -> [.., out].
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_with_bias(x, None)
    }

    /// `x W^T + b`: one fused product when the weight is ready, as before
    /// weights had stores.
    pub fn linear_with_bias(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.linear_fetched(x, None, bias)
    }

    /// Embedding rows for `ids` [B, T] -> [B, T, cols].
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.store {
            Store::Ready(w) => Ok(Tensor::f_embedding(w, ids, -1, false, false)?),
            Store::Packed(p) => p.gather(ids, self.kind, self.device),
            Store::Mapped(m) => m.streamer.gather_rows(self, m, ids),
        }
    }

    /// The whole weight in compute form (a shallow copy when ready).
    pub fn tensor(&self) -> Result<Tensor> {
        match &self.store {
            Store::Ready(w) => Ok(w.shallow_clone()),
            Store::Packed(p) => p.dense(self.kind, self.device),
            Store::Mapped(m) => {
                let p = m.streamer.fetch(self, m)?;
                let t = p.dense(self.kind, self.device)?;
                // a dense form in the stored dtype may view the read buffer,
                // which goes when `p` does
                if !p.borrows_memory() {
                    return Ok(t);
                }
                let mut owned = t.f_empty_like()?;
                owned.f_copy_(&t)?;
                Ok(owned)
            }
        }
    }

    /// The resident compute tensor, when the weight is ready (what training
    /// and saving need); `None` for packed and mapped weights.
    pub fn as_ready(&self) -> Option<&Tensor> {
        match &self.store {
            Store::Ready(t) => Some(t),
            _ => None,
        }
    }

    /// Like [`Weight::as_ready`], with an error naming the weight.
    pub fn ready_or_err(&self) -> Result<&Tensor> {
        self.as_ready().ok_or_else(|| Error::Input(self.why_not_ready()))
    }

    /// Why [`ready_or_err`](Self::ready_or_err) fails for this weight.
    pub fn why_not_ready(&self) -> String {
        format!(
            "weight `{}` is {} and not a plain tensor: load the model fully resident (no memory budget, --dequantize) for this",
            self.name,
            self.store_name()
        )
    }

    /// Bytes this weight holds in memory now (mapped ones: 0, or their host copy).
    pub fn resident_bytes(&self) -> usize {
        match &self.store {
            Store::Ready(t) => tensor_bytes(t),
            Store::Packed(p) => p.bytes(),
            Store::Mapped(m) => m.host.as_ref().map_or(0, |h| h.bytes()),
        }
    }

    /// `ready`, `packed FP8`, `packed bf16`, `mapped`, ...
    pub fn store_name(&self) -> String {
        match &self.store {
            Store::Ready(_) => "ready".into(),
            Store::Packed(p) => match p.parts.first() {
                Some(Part::Fp8 { .. }) => "packed FP8".into(),
                Some(Part::Plain(t)) => format!("packed {:?}", t.kind()),
                None => "packed".into(),
            },
            Store::Mapped(m) if m.host.is_some() => "offloaded to host memory".into(),
            Store::Mapped(_) => "mapped (streamed from disk)".into(),
        }
    }

    /// Another handle on the same weight (tied embeddings).
    pub fn share(&self, name: impl Into<String>) -> Weight {
        let store = match &self.store {
            Store::Ready(t) => Store::Ready(t.shallow_clone()),
            Store::Packed(p) => Store::Packed(p.clone()),
            Store::Mapped(m) => Store::Mapped(m.clone()),
        };
        Weight { name: name.into(), shape: self.shape.clone(), kind: self.kind, device: self.device, store }
    }

    /// The read another thread can do for this weight ahead of its use:
    /// `Some` for a weight on disk, computed on the CPU and not in the
    /// expert cache.
    pub fn fetch_job(&self) -> Option<FetchJob> {
        match &self.store {
            Store::Mapped(m) if m.host.is_none() && self.device == Device::Cpu && !m.streamer.is_cached(self) => {
                Some(FetchJob { parts: m.parts.clone(), streamer: m.streamer.clone() })
            }
            _ => None,
        }
    }

    /// `x W^T + b`, with a mapped weight taken from `fetched` when a
    /// [`FetchJob`] has read it (counted and cached as a read of this
    /// weight), else from the streamer.
    pub fn linear_fetched(&self, x: &Tensor, fetched: Option<Packed>, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = match (&self.store, fetched) {
            (Store::Ready(w), _) => {
                if let Some(y) = super::gemv::linear_few_f32(x, w, bias)? {
                    return Ok(y);
                }
                return Ok(x.f_linear(w, bias)?);
            }
            (Store::Packed(p), _) => p.linear(x, self.kind, self.device)?,
            (Store::Mapped(m), Some(p)) => m.streamer.adopt(self, m, p).linear(x, self.kind, self.device)?,
            (Store::Mapped(m), None) => m.streamer.fetch(self, m)?.linear(x, self.kind, self.device)?,
        };
        Ok(match bias {
            Some(b) => y.f_add(b)?,
            None => y,
        })
    }

    /// Hints the operating system to start reading a mapped weight now.
    pub fn prefetch(&self) {
        if let Store::Mapped(m) = &self.store {
            m.streamer.prefetch(self, m);
        }
    }

}

/// `w` [rows, cols] FP8 times its block scales `s` [ceil(rows/br), ceil(cols/bc)],
/// in f32: every element is `f32(w) * s[block]`. One f32 temporary, the
/// result: each scale is broadcast over its block through a view, partial
/// edge blocks included, and multiplied in place.
pub fn dequantize(w: &Tensor, s: &Tensor, block: [i64; 2]) -> Result<Tensor> {
    let (rows, cols) = match w.size().as_slice() {
        [r, c] => (*r, *c),
        other => return Err(Error::Input(format!("FP8 weights must be 2-D, got shape {other:?}"))),
    };
    let [br, bc] = block;
    let (nbr, nbc) = (ceil_div(rows, br), ceil_div(cols, bc));
    if s.size() != [nbr, nbc] {
        return Err(Error::Input(format!(
            "FP8 block scales have shape {:?}, a [{rows}, {cols}] weight in {br}x{bc} blocks needs [{nbr}, {nbc}]",
            s.size()
        )));
    }
    let out = w.f_to_kind(Kind::Float)?;
    let s = s.f_to_kind(Kind::Float)?;
    // (first row or column, whole blocks, block length): the full blocks, then a partial one
    let split = |n: i64, b: i64| [(0, n / b, b), ((n / b) * b, (n % b != 0) as i64, n % b)];
    for (r0, nr, rl) in split(rows, br) {
        for (c0, nc, cl) in split(cols, bc) {
            if nr == 0 || nc == 0 {
                continue;
            }
            let mut region = out.f_narrow(0, r0, nr * rl)?.f_narrow(1, c0, nc * cl)?.f_view([nr, rl, nc, cl])?;
            let scale = s.f_narrow(0, r0 / br, nr)?.f_narrow(1, c0 / bc, nc)?.f_view([nr, 1, nc, 1])?;
            let _ = region.f_mul_(&scale)?;
        }
    }
    Ok(out)
}

/// Row chunks `(start, len)` of a [rows, cols] weight whose f32 form stays
/// within [`CHUNK_BYTES`]; starts are multiples of `step`.
pub fn chunks(rows: i64, cols: i64, step: i64, chunk_bytes: usize) -> Vec<(i64, i64)> {
    let row_bytes = (cols.max(1) as usize) * 4;
    let fit = ((chunk_bytes / row_bytes.max(1)) as i64).max(1);
    let n = ((fit / step) * step).max(step);
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let len = n.min(rows - r0);
        out.push((r0, len));
        r0 += len;
    }
    out
}

fn cat_last(mut outs: Vec<Tensor>) -> Result<Tensor> {
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Ok(Tensor::f_cat(&outs, -1)?)
}

pub fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

pub fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_once_in_whole_blocks() {
        let c = chunks(1000, 7168, 128, CHUNK_BYTES);
        assert_eq!(c.iter().map(|x| x.1).sum::<i64>(), 1000);
        assert!(c.iter().all(|&(r0, _)| r0 % 128 == 0));
        assert!(c.iter().all(|&(_, n)| n as usize * 7168 * 4 <= CHUNK_BYTES));
        // a row larger than the chunk budget still makes progress
        assert_eq!(chunks(3, 1 << 25, 1, CHUNK_BYTES), vec![(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn dequantize_matches_the_repeat_interleave_formula() {
        for (rows, cols) in [(256, 384), (200, 130), (576, 256), (100, 60), (128, 200)] {
            let w = (Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * 50.0).to_kind(Kind::Float8e4m3fn);
            let s = Tensor::rand([ceil_div(rows, 128), ceil_div(cols, 128)], (Kind::Float, Device::Cpu));
            let want = w.to_kind(Kind::Float)
                * s.repeat_interleave_self_int(128, Some(0), None::<i64>)
                    .repeat_interleave_self_int(128, Some(1), None::<i64>)
                    .narrow(0, 0, rows)
                    .narrow(1, 0, cols);
            let got = dequantize(&w, &s, [128, 128]).unwrap();
            assert!(got.equal(&want), "{rows}x{cols}");
        }
    }

    #[test]
    fn packed_linear_in_chunks_equals_one_matmul() {
        let w = Tensor::randn([2 * 128 + 64, 96], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let x = Tensor::randn([3, 96], (Kind::Float, Device::Cpu));
        let p = Packed::new(vec![Part::Plain(w.narrow(0, 0, 128)), Part::Plain(w.narrow(0, 128, 192))]);
        let want = x.linear(&w.to_kind(Kind::Float), None::<Tensor>);
        let whole = p.linear(&x, Kind::Float, Device::Cpu).unwrap();
        assert!(whole.equal(&want), "one product, as a ready weight");
        // 96 f32 columns are 384 bytes a row: chunks of 10 rows
        let chunked = p.linear_in_chunks(&x, Kind::Float, Device::Cpu, 3840).unwrap();
        assert!((chunked - want).abs().max().double_value(&[]) < 1e-5);
        // FP8 in chunks of whole 128-row blocks, one of them partial
        let w8 = (Tensor::randn([300, 256], (Kind::Float, Device::Cpu)) * 40.0).to_kind(Kind::Float8e4m3fn);
        let s8 = Tensor::rand([3, 2], (Kind::Float, Device::Cpu));
        let p8 = Packed::new(vec![Part::Fp8 { w: w8.shallow_clone(), scale_inv: s8.shallow_clone(), block: [128, 128] }]);
        // 12 rows: more than the fused product takes, so dequantized chunks
        let x8 = Tensor::randn([12, 256], (Kind::Float, Device::Cpu));
        let want8 = x8.linear(&dequantize(&w8, &s8, [128, 128]).unwrap(), None::<Tensor>);
        let got8 = p8.linear_in_chunks(&x8, Kind::Float, Device::Cpu, 128 * 256 * 4).unwrap();
        assert!((got8 - &want8).abs().max().double_value(&[]) < 1e-4);
        // 5 rows: the fused product, straight from the codes, in any chunk size
        let x5 = x8.narrow(0, 0, 5);
        assert!(p8.fused_fp8(&x5, Kind::Float, Device::Cpu).unwrap().is_some());
        assert!(p8.fused_fp8(&x8, Kind::Float, Device::Cpu).unwrap().is_none());
        let got5 = p8.linear_in_chunks(&x5, Kind::Float, Device::Cpu, 128 * 256 * 4).unwrap();
        // another summation order than the GEMM's: equal to f32 rounding
        let want5 = want8.narrow(0, 0, 5);
        let rel = (got5 - &want5).abs().max().double_value(&[]) / want5.abs().max().double_value(&[]);
        assert!(rel < 1e-6, "relative difference {rel}");
    }
}
