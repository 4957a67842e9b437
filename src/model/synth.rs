//! Random checkpoints with the real dimensions and the real storage layout,
//! to rehearse loading, planning and streaming without a download.
//!
//! [`synth`] writes `config.json` and safetensors shards listed in
//! `model.safetensors.index.json`, as the published DeepSeek-V3 checkpoint
//! does: FP8 e4m3 projections with 128x128 f32 `weight_scale_inv`, bf16
//! embeddings, norms and routers, f32 `e_score_correction_bias` (or every
//! matrix in bf16 / f32). No multi-token-prediction layer and no tokenizer are
//! written.
//!
//! It never holds more than one tensor in memory: each shard is written by the
//! `safetensors` crate from lazy views whose bytes are generated when the
//! writer asks for them, in the order it writes them. Values are uniform with
//! the standard deviation of a freshly initialised layer (`1/sqrt(fan_in)`,
//! embeddings 1), from a generator seeded per tensor by name, so a tensor's
//! values depend only on the seed and its name. FP8 and bf16 are encoded here
//! (round to nearest, ties to even, as libtorch does; checked against it in
//! the tests) so generation cannot fail halfway through a file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use safetensors::tensor::{Dtype, View};
use tch::Kind;

use super::config::{Config, Fp8Quantization};
use super::dtype::{f32_to_bf16, f32_to_e4m3};
use super::layout::{assumed_storage, weight_specs, Stored};
use crate::error::{Error, Result};

/// How the matrices of a synthetic checkpoint are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDtype {
    /// FP8 e4m3 with 128x128 block scales (DeepSeek-V3's published form).
    Fp8,
    Bf16,
    F32,
}

impl std::str::FromStr for SynthDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp8" => Ok(SynthDtype::Fp8),
            "bf16" => Ok(SynthDtype::Bf16),
            "f32" => Ok(SynthDtype::F32),
            other => Err(Error::Input(format!("checkpoint dtype `{other}` is unknown (expected fp8, bf16 or f32)"))),
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Keep only the first N layers (`None`: all).
    pub layers: Option<usize>,
    pub dtype: SynthDtype,
    pub seed: u64,
    /// Largest shard file, in bytes.
    pub shard_bytes: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions { layers: None, dtype: SynthDtype::Fp8, seed: 0, shard_bytes: 4 << 30 }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub dir: PathBuf,
    pub config: Config,
    pub shards: Vec<PathBuf>,
    pub tensors: usize,
    pub bytes: u64,
}

/// The config a synthetic checkpoint of `cfg` gets: cut to `opts.layers`,
/// no MTP layers, `quantization_config` only for FP8.
pub fn synth_config(cfg: &Config, opts: &SynthOptions) -> Result<Config> {
    let mut c = cfg.clone();
    if let Some(n) = opts.layers {
        if n == 0 || n > cfg.num_hidden_layers {
            return Err(Error::Input(format!("--layers must be in 1..={}, got {n}", cfg.num_hidden_layers)));
        }
        c.num_hidden_layers = n;
        c.first_k_dense_replace = c.first_k_dense_replace.min(n);
    }
    c.num_nextn_predict_layers = 0;
    c.quantization = match opts.dtype {
        SynthDtype::Fp8 => Some(cfg.quantization.clone().unwrap_or(Fp8Quantization { weight_block_size: [128, 128] })),
        _ => None,
    };
    Ok(c)
}

/// One tensor to write: name, dtype, shape, and how to make its bytes.
struct Planned {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    fill: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    /// Uniform values with this standard deviation, encoded as the dtype.
    Uniform(f32),
    /// Every value this one.
    Constant(f32),
    /// FP8 codes of uniform values with std 1 times 64 (the block scales hold the rest).
    Fp8Codes,
    /// Block scales: `std / 64` times a factor in [0.5, 1.5].
    Scales(f32),
}

struct Lazy<'a> {
    t: &'a Planned,
    seed: u64,
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.t.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(generate(self.t, self.seed))
    }
    fn data_len(&self) -> usize {
        self.t.shape.iter().product::<usize>() * self.t.dtype.bitsize() / 8
    }
}

/// Writes a random checkpoint shaped like `cfg` to `out` (created; existing
/// files of the same names are replaced). `progress` is called after each shard.
pub fn synth(cfg: &Config, out: &Path, opts: &SynthOptions, mut progress: impl FnMut(&Path, u64, u64)) -> Result<SynthReport> {
    let c = synth_config(cfg, opts)?;
    let tensors = planned_tensors(&c, opts.dtype);
    let size = |t: &Planned| t.shape.iter().product::<usize>() as u64 * t.dtype.bitsize() as u64 / 8;
    let total: u64 = tensors.iter().map(size).sum();
    // group in order into shards of at most shard_bytes (a bigger tensor gets its own)
    let mut groups: Vec<Vec<&Planned>> = vec![vec![]];
    let mut used = 0u64;
    for t in &tensors {
        let b = size(t);
        if used + b > opts.shard_bytes.max(1) && !groups.last().is_some_and(|g| g.is_empty()) {
            groups.push(vec![]);
            used = 0;
        }
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
        used += b;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    let mut shards = Vec::new();
    let mut written = 0u64;
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let path = out.join(&file);
        let tmp = out.join(format!("{file}.tmp"));
        let views: Vec<(String, Lazy)> = group.iter().map(|t| (t.name.clone(), Lazy { t, seed: opts.seed })).collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::tensor::serialize_to_file(views, Some(meta), &tmp).map_err(|e| Error::BadCheckpointFile { file: tmp.clone(), message: e.to_string() })?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        for t in group {
            weight_map.insert(t.name.clone(), file.clone());
            written += size(t);
        }
        progress(&path, written, total);
        shards.push(path);
    }
    let index = serde_json::json!({"metadata": {"total_size": total, "generator": format!("deepscope synth, seed {}", opts.seed)}, "weight_map": weight_map});
    write_json(&out.join("model.safetensors.index.json"), &index)?;
    let mut config = c.to_hf_json(if opts.dtype == SynthDtype::F32 { Kind::Float } else { Kind::BFloat16 });
    if let Some(q) = &c.quantization {
        config["quantization_config"] = serde_json::json!({
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": q.weight_block_size,
        });
    }
    write_json(&out.join("config.json"), &config)?;
    Ok(SynthReport { dir: out.to_path_buf(), config: c, shards, tensors: tensors.len(), bytes: total })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Input(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Every tensor of the checkpoint, in the layout's order, FP8 weights followed
/// by their scales.
fn planned_tensors(c: &Config, dtype: SynthDtype) -> Vec<Planned> {
    let plain = match dtype {
        SynthDtype::F32 => Kind::Float,
        _ => Kind::BFloat16,
    };
    let st = |k: Kind| if k == Kind::Float { Dtype::F32 } else { Dtype::BF16 };
    let mut out = Vec::new();
    for spec in weight_specs(c) {
        let stored = assumed_storage(c, &spec, plain);
        let shape: Vec<usize> = spec.source_shape().iter().map(|&d| d as usize).collect();
        let rows = shape[0];
        for src in &spec.sources {
            let shape = shape.clone();
            let fan_in = shape.get(1).copied().unwrap_or(1).max(1) as f32;
            let std = if spec.name == "model.embed_tokens.weight" { 1.0 } else { fan_in.powf(-0.5) };
            let fill = if src.ends_with("norm.weight") {
                Fill::Constant(1.0)
            } else if src.ends_with("e_score_correction_bias") {
                Fill::Uniform(0.02)
            } else if src.ends_with(".bias") {
                Fill::Constant(0.0)
            } else {
                Fill::Uniform(std)
            };
            match stored {
                Stored::Fp8([br, bc]) => {
                    let scale_shape = vec![rows.div_ceil(br as usize), shape[1].div_ceil(bc as usize)];
                    out.push(Planned { name: src.clone(), dtype: Dtype::F8_E4M3, shape, fill: Fill::Fp8Codes });
                    out.push(Planned { name: format!("{src}_scale_inv"), dtype: Dtype::F32, shape: scale_shape, fill: Fill::Scales(std) });
                }
                Stored::Plain(k) => out.push(Planned { name: src.clone(), dtype: st(k), shape, fill }),
            }
        }
    }
    out
}

/// FNV-1a of the name, mixed with the seed: each tensor its own stream.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Elements per independently seeded block: blocks are generated in
/// parallel, and the bytes do not depend on the number of threads.
const BLOCK: usize = 1 << 20;

fn generate(t: &Planned, seed: u64) -> Vec<u8> {
    let n: usize = t.shape.iter().product();
    let esize = t.dtype.bitsize() / 8;
    let mut out = vec![0u8; n * esize];
    let base = tensor_seed(seed, &t.name);
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let mut work: Vec<Vec<(usize, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, chunk) in out.chunks_mut(BLOCK * esize).enumerate() {
        work[i % threads].push((i, chunk));
    }
    std::thread::scope(|scope| {
        for blocks in work {
            scope.spawn(move || {
                for (i, chunk) in blocks {
                    fill_block(chunk, t.dtype, t.fill, base ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                }
            });
        }
    });
    out
}

fn fill_block(dst: &mut [u8], dtype: Dtype, fill: Fill, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    // uniform on [-sqrt(3), sqrt(3)): standard deviation 1
    const SQRT3: f32 = 1.732_050_8;
    let mut unit = move || ((rng.next_u32() >> 8) as f32 * (2.0 / 16_777_216.0) - 1.0) * SQRT3;
    let mut value = move || match fill {
        Fill::Uniform(std) => unit() * std,
        Fill::Constant(c) => c,
        Fill::Fp8Codes => unit() * 64.0,
        Fill::Scales(std) => std / 64.0 * (1.0 + unit() / (2.0 * SQRT3)),
    };
    match dtype {
        Dtype::F8_E4M3 => dst.iter_mut().for_each(|b| *b = f32_to_e4m3(value())),
        Dtype::BF16 => dst.chunks_exact_mut(2).for_each(|b| b.copy_from_slice(&f32_to_bf16(value()).to_le_bytes())),
        _ => dst.chunks_exact_mut(4).for_each(|b| b.copy_from_slice(&value().to_le_bytes())),
    }
}
