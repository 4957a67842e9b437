//! Reading weights from the checkpoint files while the model runs, under a
//! memory budget.
//!
//! A [`Streamer`] owns open handles on the checkpoint's safetensors files.
//! Weights the plan leaves on disk ([`Store::Mapped`](super::weight::Store))
//! are read at each use with large positioned reads (`pread`) into fresh
//! tensors, used, and dropped; routed experts are kept afterwards in an LRU
//! cache whose size the plan fixed, so a hot expert is read once. Every read
//! is counted ([`Traffic`]): bytes, reads, seconds spent loading, cache hits,
//! misses and evictions.
//!
//! Why `pread` and not the memory mapping the loader uses for resident
//! weights: pages of a mapping that a pass touched stay in the process's
//! resident set until released, so the budget would depend on the kernel's
//! fault-around and readahead; a read into memory we own makes the bytes in
//! memory exactly the bytes we hold. Large reads go to anonymous mappings
//! (see `read_tensor`), so a dropped weight returns its pages at once.
//!
//! Overlap: the routed experts a MoE layer chose are read by reader threads
//! ([`READERS`], [`read_ahead`]) while the layer computes the ones already
//! read ([`Streamer::adopt`]); the time a pass counts as loading is the time
//! its computation waited for them. `posix_fadvise`
//! hints start reads further ahead (`WILLNEED`: the next layer's weights, the
//! next experts) and, on request, drop what was read from the page cache
//! (`DONTNEED`), which makes a checkpoint on this machine behave like one
//! larger than its RAM (benchmarks measure disk reads, not page-cache copies).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::weight::{FetchJob, Mapped, Packed, Part, Weight};
use crate::error::{Error, Result};

/// Anonymous mappings of read buffers kept for the next reads of the same
/// size: a fresh mapping costs the kernel zeroing every page (measured here:
/// a quarter of the CPU time of a DeepSeek-V3-shaped prefill), a reused one
/// nothing. Bounded: beyond `limit` bytes plus what the CPU expert cache
/// may still take (`spare`), returned buffers are unmapped, so buffers held
/// here and weights held in the cache stay within the plan's cache and
/// reserve together.
#[derive(Debug, Default)]
pub struct BufferPool {
    free: Mutex<Vec<memmap2::MmapMut>>,
    limit: AtomicU64,
    spare: AtomicU64,
}

impl BufferPool {
    /// A buffer of exactly `bytes`, reused when one is free.
    fn take(&self, bytes: usize) -> std::io::Result<memmap2::MmapMut> {
        if let Ok(mut free) = self.free.lock() {
            if let Some(i) = free.iter().position(|m| m.len() == bytes) {
                return Ok(free.swap_remove(i));
            }
        }
        memmap2::MmapMut::map_anon(bytes)
    }

    /// Bytes of buffers this pool may hold: `limit + spare`.
    fn room(&self) -> usize {
        (self.limit.load(Ordering::Relaxed) + self.spare.load(Ordering::Relaxed)) as usize
    }

    /// Takes buffers back, keeping at most [`BufferPool::room`] bytes in all.
    pub fn give(&self, regions: Vec<memmap2::MmapMut>) {
        let limit = self.room();
        if let Ok(mut free) = self.free.lock() {
            let mut held: usize = free.iter().map(|m| m.len()).sum();
            for r in regions {
                if held + r.len() <= limit {
                    held += r.len();
                    free.push(r);
                }
            }
        }
    }

    /// Maps buffers of `sizes` (in turn) up to `bytes` in all and touches
    /// every page, on 2 threads, so that the reads that later fill the expert
    /// cache find their memory ready. Why: first touching fresh anonymous
    /// memory makes the kernel zero it, which took 35-45% of the CPU time of
    /// a cold DeepSeek-V3-shaped prefill here (`perf`, `clear_page_erms`
    /// under `pread`), on the same 2 cores that compute; at load the disk is
    /// the bottleneck and the CPU mostly waits.
    fn prefault(&self, sizes: &[usize], bytes: usize) -> usize {
        let bytes = bytes.saturating_sub(self.held());
        let mut plan = Vec::new();
        let mut total = 0;
        'fill: loop {
            let mut added = false;
            for &n in sizes {
                if n == 0 || total + n > bytes {
                    continue;
                }
                total += n;
                plan.push(n);
                added = true;
                if plan.len() >= 1 << 20 {
                    break 'fill;
                }
            }
            if !added {
                break;
            }
        }
        // best effort: a thread stops at its first failed mapping and keeps
        // what it made; reads map their own buffers as before
        let made: Vec<Vec<memmap2::MmapMut>> = std::thread::scope(|scope| {
            let handles: Vec<_> = [0usize, 1]
                .into_iter()
                .map(|t| {
                    let mine: Vec<usize> = plan.iter().skip(t).step_by(2).copied().collect();
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        for n in mine {
                            let Ok(mut m) = memmap2::MmapMut::map_anon(n) else { break };
                            for i in (0..n).step_by(4096) {
                                m[i] = 0;
                            }
                            out.push(m);
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
        });
        let mut done = 0;
        for bufs in made {
            done += bufs.iter().map(|m| m.len()).sum::<usize>();
            if let Ok(mut free) = self.free.lock() {
                free.extend(bufs);
            }
        }
        done
    }

    /// Unmaps held buffers beyond [`BufferPool::room`] (the cache took room).
    fn trim(&self) {
        let limit = self.room();
        let extra: Vec<memmap2::MmapMut> = match self.free.lock() {
            Ok(mut free) => {
                let mut held: usize = free.iter().map(|m| m.len()).sum();
                let mut out = Vec::new();
                while held > limit {
                    match free.pop() {
                        Some(m) => {
                            held -= m.len();
                            out.push(m);
                        }
                        None => break,
                    }
                }
                out
            }
            Err(_) => Vec::new(),
        };
        drop(extra);
    }

    /// Bytes held for reuse.
    pub fn held(&self) -> usize {
        self.free.lock().map(|f| f.iter().map(|m| m.len()).sum()).unwrap_or(0)
    }
}

/// `path` opened for direct I/O (`None` where the file system refuses).
fn open_direct(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// Reads at least this large go to their own anonymous mapping.
const MAPPED_READ_MIN: usize = 1 << 20;

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Where one checkpoint tensor's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Checkpoint name.
    pub name: String,
    /// Index into the streamer's files.
    pub file: usize,
    /// Absolute byte offset in that file.
    pub offset: u64,
    pub shape: Vec<i64>,
    /// Stored dtype.
    pub kind: Kind,
    /// FP8 weights: their `weight_scale_inv` and the block size.
    pub scale: Option<(Box<TensorRef>, [i64; 2])>,
}

impl TensorRef {
    /// Bytes of the stored values (scales not included).
    pub fn len(&self) -> u64 {
        self.shape.iter().product::<i64>().max(0) as u64 * self.kind.elt_size_in_bytes() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes with the scales.
    pub fn total_len(&self) -> u64 {
        self.len() + self.scale.as_ref().map_or(0, |(s, _)| s.len())
    }
}

/// Cumulative weight traffic of a model (see [`Streamer::traffic`]); the
/// difference of two snapshots is the traffic between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Traffic {
    /// Bytes read from the checkpoint files.
    pub disk_bytes: u64,
    /// Positioned reads issued.
    pub disk_reads: u64,
    /// Bytes copied from host memory to a GPU (offloaded weights).
    pub host_to_device_bytes: u64,
    /// Seconds spent bringing weights in (reads, copies), out of the pass.
    pub load_seconds: f64,
    /// Routed-expert weights found in the cache. Each expert is two weights
    /// (`gate_up_proj`, `down_proj`), each looked up once per pass that uses
    /// the expert.
    pub expert_hits: u64,
    /// Routed-expert weights that had to be read.
    pub expert_misses: u64,
    /// Routed-expert weights dropped from the cache to make room.
    pub expert_evictions: u64,
}

impl Traffic {
    /// `self - earlier`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            disk_bytes: self.disk_bytes - earlier.disk_bytes,
            disk_reads: self.disk_reads - earlier.disk_reads,
            host_to_device_bytes: self.host_to_device_bytes - earlier.host_to_device_bytes,
            load_seconds: self.load_seconds - earlier.load_seconds,
            expert_hits: self.expert_hits - earlier.expert_hits,
            expert_misses: self.expert_misses - earlier.expert_misses,
            expert_evictions: self.expert_evictions - earlier.expert_evictions,
        }
    }

    /// `self + later`: the traffic of two stretches of work together.
    pub fn plus(&self, later: &Traffic) -> Traffic {
        Traffic {
            disk_bytes: self.disk_bytes + later.disk_bytes,
            disk_reads: self.disk_reads + later.disk_reads,
            host_to_device_bytes: self.host_to_device_bytes + later.host_to_device_bytes,
            load_seconds: self.load_seconds + later.load_seconds,
            expert_hits: self.expert_hits + later.expert_hits,
            expert_misses: self.expert_misses + later.expert_misses,
            expert_evictions: self.expert_evictions + later.expert_evictions,
        }
    }

    /// Hits / lookups (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let n = self.expert_hits + self.expert_misses;
        if n == 0 {
            0.0
        } else {
            self.expert_hits as f64 / n as f64
        }
    }
}

/// The cost of one forward pass: time, and what it cost in weight traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ForwardCost {
    /// Tokens in the pass (batch x sequence).
    pub tokens: u64,
    /// Wall time of the pass.
    pub seconds: f64,
    /// Weights brought in during the pass.
    pub traffic: Traffic,
    /// Weight bytes in memory after the pass (expert cache included).
    pub resident_bytes: u64,
    /// Bytes of the expert cache after the pass.
    pub cache_bytes: u64,
}

impl ForwardCost {
    /// Seconds not spent bringing weights in.
    pub fn compute_seconds(&self) -> f64 {
        (self.seconds - self.traffic.load_seconds).max(0.0)
    }

    /// The cost of this pass followed by `later` (tokens, time and traffic
    /// added; memory as after `later`).
    pub fn then(&self, later: &ForwardCost) -> ForwardCost {
        ForwardCost {
            tokens: self.tokens + later.tokens,
            seconds: self.seconds + later.seconds,
            traffic: self.traffic.plus(&later.traffic),
            resident_bytes: later.resident_bytes,
            cache_bytes: later.cache_bytes,
        }
    }

    /// Bytes read from disk per token.
    pub fn disk_bytes_per_token(&self) -> f64 {
        self.traffic.disk_bytes as f64 / self.tokens.max(1) as f64
    }
}

impl std::fmt::Display for ForwardCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::stats::human_bytes;
        let t = &self.traffic;
        write!(
            f,
            "{} tokens in {:.3} s ({:.3} s loading weights, {:.3} s computing); read {} from disk in {} reads",
            self.tokens,
            self.seconds,
            t.load_seconds,
            self.compute_seconds(),
            human_bytes(t.disk_bytes),
            t.disk_reads
        )?;
        if t.host_to_device_bytes > 0 {
            write!(f, ", copied {} from host memory", human_bytes(t.host_to_device_bytes))?;
        }
        if t.expert_hits + t.expert_misses > 0 {
            write!(
                f,
                "; expert cache {} hits, {} misses ({:.0}% hits), {} evictions",
                t.expert_hits,
                t.expert_misses,
                100.0 * t.hit_rate(),
                t.expert_evictions
            )?;
        }
        write!(f, "; {} of weights in memory", human_bytes(self.resident_bytes))
    }
}

#[derive(Debug, Default)]
struct Counters {
    disk_bytes: AtomicU64,
    disk_reads: AtomicU64,
    h2d_bytes: AtomicU64,
    load_ns: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

/// A least-recently-used cache of packed weights, bounded in bytes, that
/// never evicts for a pass what the same pass already used.
///
/// Plain LRU fails exactly when it matters: a prefill that touches more
/// experts than fit, repeated, evicts each expert just before it is needed
/// again (0 hits). Here an entry used in the current pass is protected; when
/// nothing older is left to evict, the new weight is used and not kept. A
/// repeated pass then finds everything the earlier one kept, and decoding
/// (a few experts per pass) still evicts the least recently used.
#[derive(Debug, Default)]
struct Lru {
    capacity: usize,
    used: usize,
    clock: u64,
    /// The current pass (see [`Streamer::begin_pass`]).
    pass: u64,
    /// key -> (weight, bytes, last use, pass of last use)
    entries: HashMap<String, (Arc<Packed>, usize, u64, u64)>,
    /// Entries evicted by the last inserts, dropped by the caller once the
    /// buffer pool knows the room they leave (see [`BufferPool::give`]).
    evicted: Vec<Arc<Packed>>,
}

impl Lru {
    fn get(&mut self, key: &str) -> Option<Arc<Packed>> {
        self.clock += 1;
        let (clock, pass) = (self.clock, self.pass);
        self.entries.get_mut(key).map(|e| {
            e.2 = clock;
            e.3 = pass;
            e.0.clone()
        })
    }

    /// Inserts, evicting the least recently used entries of earlier passes;
    /// returns the number evicted. An entry that does not fit (larger than
    /// the cache, or the cache full of this pass's entries) is not kept.
    fn insert(&mut self, key: &str, value: Arc<Packed>, bytes: usize) -> u64 {
        if bytes > self.capacity {
            return 0;
        }
        let mut evicted = 0;
        while self.used + bytes > self.capacity {
            let pass = self.pass;
            let Some(oldest) = self.entries.iter().filter(|(_, e)| e.3 < pass).min_by_key(|(_, e)| e.2).map(|(k, _)| k.clone()) else {
                return evicted; // everything cached is in use by this pass
            };
            if let Some((p, b, _, _)) = self.entries.remove(&oldest) {
                self.used -= b;
                evicted += 1;
                self.evicted.push(p);
            }
        }
        self.clock += 1;
        if let Some((p, old, _, _)) = self.entries.insert(key.to_string(), (value, bytes, self.clock, self.pass)) {
            self.used -= old;
            self.evicted.push(p);
        }
        self.used += bytes;
        evicted
    }
}

/// Whether `r` starts, within its page, at a multiple of its element size:
/// an `O_DIRECT` read puts the page's start at the buffer's, so the tensor
/// can view the buffer only then.
fn starts_aligned(r: &TensorRef) -> bool {
    (r.offset % 4096).is_multiple_of(r.kind.elt_size_in_bytes() as u64)
}

/// The buffer an `O_DIRECT` read of `bytes` takes: whole pages, and one more
/// for the tensor's offset within its first page, so that every tensor of a
/// size takes the same buffer size, whatever its offset (reuse in the pool).
fn direct_buffer_bytes(bytes: usize) -> usize {
    bytes.next_multiple_of(4096) + 4096
}

/// Open checkpoint files, the expert caches (one per device) and the traffic
/// counters of one loaded model.
#[derive(Debug)]
pub struct Streamer {
    files: Vec<(PathBuf, File)>,
    /// The same files opened with `O_DIRECT` where the file system allows it.
    direct: Vec<Option<File>>,
    pool: Arc<BufferPool>,
    caches: Mutex<HashMap<Device, Lru>>,
    counters: Counters,
    drop_page_cache: bool,
}

impl Streamer {
    /// Opens `paths` (the checkpoint's shards, in the order [`TensorRef::file`] indexes).
    pub fn open(paths: &[PathBuf], drop_page_cache: bool) -> Result<Streamer> {
        let files = paths
            .iter()
            .map(|p| Ok((p.clone(), File::open(p).map_err(|e| Error::io(p, e))?)))
            .collect::<Result<Vec<_>>>()?;
        let direct = paths.iter().map(|p| open_direct(p)).collect();
        Ok(Streamer {
            files,
            direct,
            pool: Arc::new(BufferPool::default()),
            caches: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            drop_page_cache,
        })
    }

    /// Starts a forward pass: what the cache holds from now on is protected
    /// from eviction until the next pass (see [`Lru`]).
    pub fn begin_pass(&self) {
        if let Ok(mut c) = self.caches.lock() {
            c.values_mut().for_each(|l| l.pass += 1);
        }
    }

    /// Ends a forward pass: the memory of the weights read and dropped during
    /// it goes back to the operating system. glibc keeps freed blocks below
    /// its mmap threshold (which grows to 32 MiB) in its arenas, so without
    /// this the resident set grows past the budget by whatever the pass read
    /// (measured: 3.4 GiB over an 8 GiB budget streaming the V2-Lite shape).
    pub fn end_pass(&self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory to the system
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// Fills the buffer pool, up to the CPU expert cache's capacity, with
    /// ready (touched) buffers of the sizes reads of `refs` take; returns the
    /// bytes mapped. See [`BufferPool::prefault`].
    pub fn prefault_cache(&self, refs: &[&TensorRef]) -> usize {
        let (used, capacity, _) = self.cache_usage(Device::Cpu);
        // one entry per read, so the mix of sizes follows the mix of reads
        let sizes: Vec<usize> = refs.iter().filter_map(|r| self.buffer_bytes(r)).collect();
        self.pool.prefault(&sizes, capacity.saturating_sub(used))
    }

    /// The size of the pooled buffer a read of `r` takes (`None`: a small
    /// tensor read into an ordinary one).
    fn buffer_bytes(&self, r: &TensorRef) -> Option<usize> {
        let bytes = r.len() as usize;
        if bytes < MAPPED_READ_MIN {
            return None;
        }
        let direct = self.direct_file(r).is_some() && starts_aligned(r);
        Some(if direct { direct_buffer_bytes(bytes) } else { bytes })
    }

    /// The `O_DIRECT` handle a read of `r` goes through, when its file has
    /// one and `r` is large enough to take a mapped buffer.
    fn direct_file(&self, r: &TensorRef) -> Option<&File> {
        self.direct.get(r.file).and_then(Option::as_ref).filter(|_| r.len() as usize >= MAPPED_READ_MIN)
    }

    /// Sets how many bytes of read buffers are kept for reuse (part of the
    /// plan's reserve).
    pub fn set_pool_limit(&self, bytes: usize) {
        self.pool.limit.store(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes of read buffers kept for reuse.
    pub fn pooled_bytes(&self) -> usize {
        self.pool.held()
    }

    /// Sets the byte capacity of the expert cache on `device`.
    pub fn set_cache_capacity(&self, device: Device, bytes: usize) {
        if let Ok(mut c) = self.caches.lock() {
            let lru = c.entry(device).or_default();
            lru.capacity = bytes;
            if device == Device::Cpu {
                self.pool.spare.store(bytes.saturating_sub(lru.used) as u64, Ordering::Relaxed);
            }
        }
    }

    /// `(bytes held, capacity, entries)` of the expert cache on `device`.
    pub fn cache_usage(&self, device: Device) -> (usize, usize, usize) {
        self.caches
            .lock()
            .ok()
            .and_then(|c| c.get(&device).map(|l| (l.used, l.capacity, l.entries.len())))
            .unwrap_or((0, 0, 0))
    }

    /// Bytes held by every expert cache.
    pub fn cached_bytes(&self) -> usize {
        self.caches.lock().map(|c| c.values().map(|l| l.used).sum()).unwrap_or(0)
    }

    /// The cumulative traffic so far.
    pub fn traffic(&self) -> Traffic {
        let c = &self.counters;
        Traffic {
            disk_bytes: c.disk_bytes.load(Ordering::Relaxed),
            disk_reads: c.disk_reads.load(Ordering::Relaxed),
            host_to_device_bytes: c.h2d_bytes.load(Ordering::Relaxed),
            load_seconds: c.load_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            expert_hits: c.hits.load(Ordering::Relaxed),
            expert_misses: c.misses.load(Ordering::Relaxed),
            expert_evictions: c.evictions.load(Ordering::Relaxed),
        }
    }

    /// Whether `w` is in the expert cache of its device now.
    pub fn is_cached(&self, w: &Weight) -> bool {
        self.caches.lock().map(|c| c.get(&w.device).is_some_and(|l| l.entries.contains_key(&w.name))).unwrap_or(false)
    }

    /// Reads checkpoint tensors into CPU memory (any thread); counts the
    /// bytes, not the time (the callers count the time they wait).
    fn read_parts(&self, refs: &[TensorRef]) -> Result<Packed> {
        let mut memory = Vec::new();
        let parts = refs.iter().map(|r| self.read_part(r, &mut memory)).collect::<Result<Vec<_>>>()?;
        Ok(Packed::with_memory(parts, memory, self.pool.clone()))
    }

    /// Asks the operating system to start reading `refs` and their scales.
    fn advise_parts(&self, refs: &[TensorRef]) {
        for r in refs {
            self.advise(r, libc::POSIX_FADV_WILLNEED);
            if let Some((s, _)) = &r.scale {
                self.advise(s, libc::POSIX_FADV_WILLNEED);
            }
        }
    }

    /// Takes a weight read by [`read_ahead`]: counted as a cache miss of a
    /// routed expert and kept in the cache, as [`Streamer::fetch`] does.
    pub fn adopt(&self, w: &Weight, m: &Mapped, p: Packed) -> Arc<Packed> {
        if m.cached {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
        }
        self.keep(w, m, Arc::new(p))
    }

    /// Puts a weight just read into its device's expert cache (routed
    /// experts only) and returns it.
    fn keep(&self, w: &Weight, m: &Mapped, packed: Arc<Packed>) -> Arc<Packed> {
        if m.cached {
            let bytes = packed.bytes();
            let mut dropped = Vec::new();
            if let Ok(mut c) = self.caches.lock() {
                let lru = c.entry(w.device).or_default();
                let evicted = lru.insert(&w.name, packed.clone(), bytes);
                self.counters.evictions.fetch_add(evicted, Ordering::Relaxed);
                dropped = std::mem::take(&mut lru.evicted);
                if w.device == Device::Cpu {
                    self.pool.spare.store(lru.capacity.saturating_sub(lru.used) as u64, Ordering::Relaxed);
                }
            }
            // their buffers go back to the pool, which now knows the room left;
            // buffers it held for room the cache has now taken are unmapped
            drop(dropped);
            self.pool.trim();
        }
        packed
    }

    /// The weight in packed form on its compute device: from the expert cache,
    /// the host copy, or the files.
    pub fn fetch(&self, w: &Weight, m: &Mapped) -> Result<Arc<Packed>> {
        if m.cached {
            let hit = self.caches.lock().ok().and_then(|mut c| c.entry(w.device).or_default().get(&w.name));
            if let Some(p) = hit {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(p);
            }
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
        }
        let started = Instant::now();
        let packed = match &m.host {
            None if w.device == Device::Cpu => self.read_parts(&m.parts)?,
            // to a GPU: from the host copy, or from the files through host
            // memory (whose buffers go back to the pool after the copy)
            host => {
                let read;
                let src = match host {
                    Some(h) => {
                        self.counters.h2d_bytes.fetch_add(h.bytes() as u64, Ordering::Relaxed);
                        h.as_ref()
                    }
                    None => {
                        read = self.read_parts(&m.parts)?;
                        &read
                    }
                };
                Packed::new(src.parts.iter().map(|p| p.to_device(w.device)).collect::<Result<Vec<_>>>()?)
            }
        };
        self.counters.load_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(self.keep(w, m, Arc::new(packed)))
    }

    /// Embedding rows `ids` [B, T] of a mapped weight, reading only those rows.
    pub fn gather_rows(&self, w: &Weight, m: &Mapped, ids: &Tensor) -> Result<Tensor> {
        let single_plain = matches!(m.parts.as_slice(), [r] if r.scale.is_none() && r.shape.len() == 2);
        if !single_plain || m.host.is_some() {
            return self.fetch(w, m)?.gather(ids, w.kind, w.device);
        }
        let r = &m.parts[0];
        let cols = r.shape[1];
        let ids_cpu = ids.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
        let flat = Vec::<i64>::try_from(ids_cpu.f_flatten(0, -1)?)?;
        let mut unique = flat.clone();
        unique.sort_unstable();
        unique.dedup();
        let started = Instant::now();
        let rows = Tensor::f_empty([unique.len() as i64, cols], (r.kind, Device::Cpu))?;
        let row_bytes = cols as u64 * r.kind.elt_size_in_bytes() as u64;
        for (i, &id) in unique.iter().enumerate() {
            if id < 0 || id >= r.shape[0] {
                let position = flat.iter().position(|&x| x == id).unwrap_or(0);
                return Err(Error::TokenOutOfRange { id, position, vocab_size: r.shape[0] as usize });
            }
            let row = rows.f_select(0, i as i64)?;
            let offset = r.offset + id as u64 * row_bytes;
            self.read_into(r.file, offset, &row, &r.name)?;
            if self.drop_page_cache {
                self.advise_range(r.file, offset, row_bytes, libc::POSIX_FADV_DONTNEED);
            }
        }
        self.counters.load_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        // position of each id in `unique`
        let pos: Vec<i64> = flat.iter().map(|id| unique.binary_search(id).unwrap_or(0) as i64).collect();
        let picked = rows.f_index_select(0, &Tensor::f_from_slice(&pos)?)?;
        let mut shape = ids.size();
        shape.push(cols);
        Ok(picked.f_view(shape.as_slice())?.f_to_device(w.device)?.f_to_kind(w.kind)?)
    }

    /// Asks the operating system to start reading `w` (unless it is cached).
    pub fn prefetch(&self, w: &Weight, m: &Mapped) {
        if m.host.is_none() && !(m.cached && self.is_cached(w)) {
            self.advise_parts(&m.parts);
        }
    }

    fn advise(&self, r: &TensorRef, advice: libc::c_int) {
        // a tensor read with O_DIRECT bypasses the page cache: filling it ahead would read it twice
        if advice == libc::POSIX_FADV_WILLNEED && self.direct_file(r).is_some() {
            return;
        }
        self.advise_range(r.file, r.offset, r.len(), advice);
    }

    fn advise_range(&self, file: usize, offset: u64, len: u64, advice: libc::c_int) {
        if len == 0 {
            return; // a length of 0 would mean "to the end of the file"
        }
        if let Some((_, f)) = self.files.get(file) {
            // SAFETY: a plain system call on an open descriptor; it only hints.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), offset as libc::off_t, len as libc::off_t, advice);
            }
        }
    }

    /// Reads one checkpoint tensor (and its scales) into CPU memory; large
    /// buffers are mapped anonymously and pushed to `memory`, which the
    /// returned part's tensors view.
    fn read_part(&self, r: &TensorRef, memory: &mut Vec<memmap2::MmapMut>) -> Result<Part> {
        let w = self.read_tensor(r, memory)?;
        Ok(match &r.scale {
            None => Part::Plain(w),
            Some((s, block)) => Part::Fp8 { w, scale_inv: self.read_tensor(s, memory)?, block: *block },
        })
    }

    /// Why not a plain libtorch tensor: its memory comes from malloc, whose
    /// heap fragments when weights of many sizes are read, cached and
    /// evicted, so the resident set drifts above the budget (measured: 3.4 GiB
    /// over 8 GiB streaming the V2-Lite shape). An anonymous mapping returns
    /// its pages to the system when dropped.
    fn read_tensor(&self, r: &TensorRef, memory: &mut Vec<memmap2::MmapMut>) -> Result<Tensor> {
        let bytes = r.len() as usize;
        if bytes >= MAPPED_READ_MIN {
            if let Some(t) = self.read_direct(r, memory)? {
                return Ok(t);
            }
        }
        let t = if bytes >= MAPPED_READ_MIN {
            let mut region = self.pool.take(bytes).map_err(|e| Error::io(&self.files[r.file].0, e))?;
            let strides = contiguous_strides(&r.shape);
            // SAFETY: `region` holds exactly `bytes` = numel * element size,
            // is page-aligned, and is kept in the Packed that holds the tensor
            // (dropped after it); tensors taken from it are copied first
            // (Weight::tensor).
            let t = unsafe { Tensor::f_from_blob(region.as_mut_ptr(), &r.shape, &strides, r.kind, Device::Cpu)? };
            memory.push(region);
            t
        } else {
            Tensor::f_empty(r.shape.as_slice(), (r.kind, Device::Cpu))?
        };
        self.read_into(r.file, r.offset, &t, &r.name)?;
        if self.drop_page_cache {
            self.advise(r, libc::POSIX_FADV_DONTNEED);
        }
        Ok(t)
    }

    /// Reads a large tensor with `O_DIRECT`: straight from the disk into a
    /// page-aligned buffer, without the page cache's copy (a CPU's worth of
    /// memcpy per gigabyte streamed) and without evicting anything from it.
    /// The aligned range around the tensor is read; the tensor starts
    /// inside it. `Ok(None)` when this read cannot go direct (no `O_DIRECT`
    /// handle, a start not aligned for the dtype, or the file system refuses).
    fn read_direct(&self, r: &TensorRef, memory: &mut Vec<memmap2::MmapMut>) -> Result<Option<Tensor>> {
        const ALIGN: u64 = 4096;
        let Some(f) = self.direct_file(r) else { return Ok(None) };
        let bytes = r.len() as usize;
        let start = r.offset & !(ALIGN - 1);
        let lead = (r.offset - start) as usize;
        if !starts_aligned(r) {
            return Ok(None);
        }
        let total = direct_buffer_bytes(bytes);
        let path = &self.files[r.file].0;
        let mut region = self.pool.take(total).map_err(|e| Error::io(path, e))?;
        let mut done = 0usize;
        while done < lead + bytes {
            match f.read_at(&mut region[done..total], start + done as u64) {
                Ok(0) => {
                    return Err(Error::Io {
                        path: path.clone(),
                        cause: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("reading tensor `{}`: the file ends early", r.name)),
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // e.g. EINVAL: this file system does not do direct I/O after all
                Err(_) if done == 0 => {
                    self.pool.give(vec![region]);
                    return Ok(None);
                }
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        self.counters.disk_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters.disk_reads.fetch_add(1, Ordering::Relaxed);
        let strides = contiguous_strides(&r.shape);
        // SAFETY: `region` holds `lead + bytes` bytes read from the file, the
        // tensor's `bytes` start at `lead` (aligned for its dtype, checked
        // above), and the region is kept in the Packed that holds the tensor
        // (dropped after it); tensors taken from it are copied first.
        let t = unsafe { Tensor::f_from_blob(region.as_mut_ptr().add(lead), &r.shape, &strides, r.kind, Device::Cpu)? };
        memory.push(region);
        Ok(Some(t))
    }

    /// Fills the contiguous CPU tensor `dst` with the bytes at `offset`.
    fn read_into(&self, file: usize, offset: u64, dst: &Tensor, name: &str) -> Result<()> {
        let (path, f) = self
            .files
            .get(file)
            .ok_or_else(|| Error::Input(format!("tensor `{name}` refers to checkpoint file #{file}, which is not open")))?;
        let n = dst.numel() * dst.kind().elt_size_in_bytes();
        if n == 0 {
            return Ok(());
        }
        // SAFETY: `dst` is a contiguous CPU tensor this function's caller
        // created and owns; its storage holds exactly `n` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst.data_ptr() as *mut u8, n) };
        f.read_exact_at(buf, offset).map_err(|e| Error::Io {
            path: path.clone(),
            cause: std::io::Error::new(e.kind(), format!("reading tensor `{name}` ({n} bytes at offset {offset}): {e}")),
        })?;
        self.counters.disk_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.counters.disk_reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Threads reading the chosen experts of a MoE layer from disk while the
/// computation goes on: two keep a disk's queue busier than one.
pub const READERS: usize = 2;

/// Items each reader may have read and not yet handed over; with the one it
/// is reading, `READERS * (READ_AHEAD + 1)` items can be in memory ahead of
/// their use (the plan's reserve counts them).
pub const READ_AHEAD: usize = 1;

/// Items whose reads are requested from the operating system (into the page
/// cache, not counted in the process's memory) ahead of the readers.
const ADVISE_AHEAD: usize = 4;

/// Calls `compute(i, weights)` for each item of `jobs` in order (a routed
/// expert: the reads of its weights, `None` for a weight that needs none),
/// with the reads done by [`READERS`] threads ahead of the computation. The
/// time `compute` waits for a read counts as loading time of its streamer.
/// Without any read to do, no thread is started.
pub fn read_ahead(jobs: &[Vec<Option<FetchJob>>], mut compute: impl FnMut(usize, Vec<Option<Packed>>) -> Result<()>) -> Result<()> {
    let streamer = |i: usize| jobs.get(i).and_then(|js| js.iter().flatten().next()).map(|j| j.streamer.clone());
    let Some(first) = (0..jobs.len()).find_map(streamer) else {
        return (0..jobs.len()).try_for_each(|i| compute(i, jobs[i].iter().map(|_| None).collect()));
    };
    let advise = |i: usize| jobs.get(i).into_iter().flatten().flatten().for_each(|j| j.streamer.advise_parts(&j.parts));
    std::thread::scope(|scope| -> Result<()> {
        // reader r reads items r, r + READERS, ...
        let receivers: Vec<std::sync::mpsc::Receiver<Result<Vec<Option<Packed>>>>> = (0..READERS)
            .map(|r| {
                let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
                scope.spawn(move || {
                    for i in (r..jobs.len()).step_by(READERS) {
                        // the disk works on later items while this one is read
                        advise(i + ADVISE_AHEAD);
                        let read = jobs[i].iter().map(|j| j.as_ref().map(|j| j.streamer.read_parts(&j.parts)).transpose()).collect();
                        if tx.send(read).is_err() {
                            break; // the computation stopped
                        }
                    }
                });
                rx
            })
            .collect();
        (0..ADVISE_AHEAD).for_each(advise);
        for i in 0..jobs.len() {
            let waited = Instant::now();
            let read = receivers[i % READERS].recv().map_err(|_| Error::Input("the expert reader stopped".into()))??;
            let s = streamer(i).unwrap_or_else(|| first.clone());
            s.counters.load_ns.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
            compute(i, read)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(n: i64) -> Arc<Packed> {
        Arc::new(Packed::new(vec![Part::Plain(Tensor::zeros([n], (Kind::Uint8, Device::Cpu)))]))
    }

    #[test]
    fn the_buffer_pool_is_filled_ahead_and_holds_no_more_than_its_room() {
        let pool = BufferPool::default();
        // sizes in turn while they fit: 4096 + 8192 + 4096 + 4096 = 20480
        assert_eq!(pool.prefault(&[4096, 8192], 20480), 20480);
        // what the pool holds counts: nothing more fits
        assert_eq!(pool.prefault(&[4096], 20480), 0);
        assert_eq!(pool.held(), 20480);
        let b = pool.take(8192).unwrap();
        assert_eq!((b.len(), pool.held()), (8192, 12288));
        // nothing left for it: limit 8192, no room in the cache
        pool.limit.store(8192, Ordering::Relaxed);
        pool.give(vec![b]);
        assert_eq!(pool.held(), 12288);
        // room left in the cache lets the pool keep it
        pool.spare.store(16384, Ordering::Relaxed);
        pool.give(vec![pool.take(4096).unwrap(), memmap2::MmapMut::map_anon(8192).unwrap()]);
        assert_eq!(pool.held(), 20480);
        // the cache takes room: the pool gives back what no longer fits
        pool.spare.store(4096, Ordering::Relaxed);
        pool.trim();
        assert!(pool.held() <= 8192 + 4096, "{}", pool.held());
        // every tensor of a size takes one buffer size, whatever its offset
        assert_eq!(direct_buffer_bytes(14_680_064), 14_680_064 + 4096);
        assert_eq!(direct_buffer_bytes(1000), 8192);
    }

    #[test]
    fn lru_keeps_the_recently_used_within_its_capacity() {
        let mut lru = Lru { capacity: 300, ..Default::default() };
        assert_eq!(lru.insert("a", packed(100), 100), 0);
        assert_eq!(lru.insert("b", packed(100), 100), 0);
        assert_eq!(lru.insert("c", packed(100), 100), 0);
        // within the pass that cached them, the three are protected: d is not kept
        assert_eq!(lru.insert("d", packed(100), 100), 0);
        assert!(lru.get("d").is_none());
        lru.pass += 1;
        assert!(lru.get("a").is_some()); // a is now the most recent
        assert_eq!(lru.insert("d", packed(100), 100), 1); // evicts b
        assert!(lru.get("b").is_none());
        assert!(lru.get("a").is_some() && lru.get("c").is_some() && lru.get("d").is_some());
        assert_eq!(lru.used, 300);
        assert_eq!(lru.insert("huge", packed(400), 400), 0, "larger than the cache: not kept");
        assert!(lru.get("huge").is_none());
        lru.pass += 1;
        assert_eq!(lru.insert("e", packed(250), 250), 3);
        assert_eq!((lru.used, lru.entries.len()), (250, 1));
    }
}
