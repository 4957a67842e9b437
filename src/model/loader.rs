//! Reading weights from safetensors checkpoints: one `model.safetensors` or
//! shards listed in `model.safetensors.index.json`.
//!
//! Files are memory-mapped. Each tensor is copied once, from the mapping into a
//! libtorch tensor of the requested dtype, and the mapped pages it came from are
//! released straight away, so peak memory stays near the size of the weights.
//! FP8 (`float8_e4m3fn`) weights with a `weight_scale_inv` companion are kept
//! FP8 ([`Checkpoint::packed`]) or dequantized on load ([`Checkpoint::tensor`]).
//!
//! A [`Loader`] builds each weight the way a [`Plan`] places it: ready,
//! packed, in host memory, or left on disk as a [`TensorRef`] for the
//! [`Streamer`].

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use tch::{Device, Kind, Tensor};

use super::layout::Stored;
use super::plan::{Plan, Tier};
use super::stream::{Streamer, TensorRef};
use super::weight::{Mapped, Packed, Part, Store, Weight};
use crate::error::{Error, Result};

/// Margin released around each tensor read (covers the kernel's fault-around).
const FAULT_AROUND: usize = 1 << 20;

/// One memory-mapped safetensors file and its header.
struct ShardFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl ShardFile {
    fn open(path: &Path) -> Result<ShardFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is mapped read-only and private; DeepScope never
        // writes to checkpoint files while a model is loading.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::BadCheckpointFile {
                file: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(ShardFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }
}

/// The weights of a checkpoint directory, read tensor by tensor.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<ShardFile>,
    /// Tensor name -> index into `files`.
    location: HashMap<String, usize>,
    /// Names already read, to report the unexpected rest.
    used: RefCell<BTreeSet<String>>,
    /// FP8 block size when the checkpoint is block-quantized.
    fp8_block: Option<[usize; 2]>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or every shard named by
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: impl AsRef<Path>, fp8_block: Option<[usize; 2]>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index.exists() {
            shard_paths(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::NoWeights { dir });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = ShardFile::open(p)?;
            for name in f.tensors.keys() {
                location.insert(name.clone(), i);
            }
            files.push(f);
        }
        Ok(Checkpoint {
            dir,
            files,
            location,
            used: RefCell::new(BTreeSet::new()),
            fp8_block,
        })
    }

    /// Opens one safetensors file on its own (not a model directory).
    pub fn open_file(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let f = ShardFile::open(path)?;
        let location = f.tensors.keys().map(|n| (n.clone(), 0)).collect();
        Ok(Checkpoint {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            files: vec![f],
            location,
            used: RefCell::new(BTreeSet::new()),
            fp8_block: None,
        })
    }


    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Every tensor name in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.location.keys()
    }

    /// Reads tensor `name`, checks it has shape `shape`, converts it to `kind`
    /// on `device`. FP8 weights are dequantized with their `weight_scale_inv`.
    pub fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        self.with_checked(name, shape, |stored| Ok(stored.f_to_device_(device, kind, false, true)?))
    }

    /// Reads tensor `name` (shape `shape`) straight into `dst`, a view of a
    /// larger tensor, converting dtype and device on the way.
    pub fn tensor_into(&self, name: &str, shape: &[i64], dst: &mut Tensor) -> Result<()> {
        self.with_checked(name, shape, |stored| Ok(dst.f_copy_(stored)?))
    }

    /// Checks the shape, then calls `f` with the stored values (FP8 already
    /// dequantized to f32). The tensor `f` sees may borrow the mapped file, so
    /// `f` must copy what it keeps.
    fn with_checked<R>(&self, name: &str, shape: &[i64], f: impl FnOnce(&Tensor) -> Result<R>) -> Result<R> {
        let (_, file, info) = self.checked(name, shape)?;
        if info.dtype == Dtype::F8_E4M3 {
            let scale_name = format!("{}_scale_inv", name);
            let fp8 = self.with_view(name, file, info, |v| Ok(v.f_to_device_(Device::Cpu, v.kind(), false, true)?))?;
            return f(&self.dequantize_fp8(name, &fp8, &scale_name, shape)?);
        }
        self.with_view(name, file, info, f)
    }

    /// Tensor `name` exactly as stored (dtype and shape), on the CPU.
    pub fn raw(&self, name: &str) -> Result<Tensor> {
        let (file, info) = self.info(name)?;
        self.with_view(name, file, info, |v| Ok(v.f_to_device_(Device::Cpu, v.kind(), false, true)?))
    }

    /// Like [`Checkpoint::tensor`], but `Ok(None)` when the name is absent.
    pub fn optional(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.tensor(name, shape, kind, device).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The shard files, in the order [`TensorRef::file`] indexes them.
    pub fn file_paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    /// How tensor `name` is stored: FP8 (with its scales) or a plain dtype.
    pub fn stored(&self, name: &str) -> Result<Stored> {
        let (file, info) = self.info(name)?;
        match info.dtype {
            Dtype::F8_E4M3 => {
                let [br, bc] = self.fp8_block.unwrap_or([128, 128]);
                Ok(Stored::Fp8([br as i64, bc as i64]))
            }
            d => kind_of(d).map(Stored::Plain).ok_or_else(|| Error::UnsupportedDtype {
                name: name.to_string(),
                file: file.path.clone(),
                dtype: format!("{d:?}"),
            }),
        }
    }

    /// Where tensor `name` (shape `shape`) and, for FP8, its scales are in the
    /// files; checks shape and dtype, and counts both as read.
    pub fn locate(&self, name: &str, shape: &[i64]) -> Result<TensorRef> {
        let (i, file, info) = self.checked(name, shape)?;
        let kind = self.kind_checked(name, file, info)?;
        let scale = if info.dtype == Dtype::F8_E4M3 {
            let scale_name = format!("{name}_scale_inv");
            let block = self.fp8_block_i64();
            let scale_shape = self.scale_shape(name, shape)?;
            // read in their stored dtype and converted to f32 at use, as at load
            let s = self.locate(&scale_name, &scale_shape).map_err(|e| self.scale_error(e, name, &scale_name))?;
            Some((Box::new(s), block))
        } else {
            None
        };
        self.used.borrow_mut().insert(name.to_string());
        Ok(TensorRef {
            name: name.to_string(),
            file: i,
            offset: (file.data_start + info.data_offsets.0) as u64,
            shape: shape.to_vec(),
            kind,
            scale,
        })
    }

    /// Tensor `name` in its stored form, copied into CPU memory: FP8 stays
    /// FP8 (with its f32 scales), other dtypes stay as stored.
    pub fn packed(&self, name: &str, shape: &[i64]) -> Result<Part> {
        let (_, file, info) = self.checked(name, shape)?;
        let own = |v: &Tensor| Ok(v.f_to_device_(Device::Cpu, v.kind(), false, true)?);
        if info.dtype == Dtype::F8_E4M3 {
            let scale_name = format!("{name}_scale_inv");
            let scale_shape = self.scale_shape(name, shape)?;
            let w = self.with_view(name, file, info, own)?;
            let scale_inv = self
                .tensor(&scale_name, &scale_shape, Kind::Float, Device::Cpu)
                .map_err(|e| self.scale_error(e, name, &scale_name))?;
            return Ok(Part::Fp8 { w, scale_inv, block: self.fp8_block_i64() });
        }
        Ok(Part::Plain(self.with_view(name, file, info, own)?))
    }

    fn fp8_block_i64(&self) -> [i64; 2] {
        let [br, bc] = self.fp8_block.unwrap_or([128, 128]);
        [br as i64, bc as i64]
    }

    fn scale_shape(&self, name: &str, shape: &[i64]) -> Result<[i64; 2]> {
        let [br, bc] = self.fp8_block_i64();
        match shape {
            [r, c] => Ok([ceil_div(*r, br), ceil_div(*c, bc)]),
            _ => {
                let (file, info) = self.info(name)?;
                Err(Error::UnsupportedDtype {
                    name: name.to_string(),
                    file: file.path.clone(),
                    dtype: format!("{:?} with {} dimensions (FP8 weights must be 2-D)", info.dtype, info.shape.len()),
                })
            }
        }
    }

    fn scale_error(&self, e: Error, name: &str, scale_name: &str) -> Error {
        match e {
            Error::MissingTensor { dir, .. } => Error::MissingTensor {
                name: format!("{scale_name} (the block scales of FP8 weight `{name}`)"),
                dir,
            },
            other => other,
        }
    }

    /// File index, file and header of `name`, after checking its shape.
    fn checked(&self, name: &str, shape: &[i64]) -> Result<(usize, &ShardFile, &TensorInfo)> {
        let i = *self.location.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        })?;
        let (file, info) = self.info(name)?;
        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if found != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                file: file.path.clone(),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok((i, file, info))
    }

    fn kind_checked(&self, name: &str, file: &ShardFile, info: &TensorInfo) -> Result<Kind> {
        kind_of(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            name: name.to_string(),
            file: file.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })
    }

    fn info(&self, name: &str) -> Result<(&ShardFile, &TensorInfo)> {
        let missing = || Error::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        };
        let file = &self.files[*self.location.get(name).ok_or_else(missing)?];
        let info = file.tensors.get(name).ok_or_else(missing)?;
        Ok((file, info))
    }

    /// Calls `f` with a CPU tensor over the stored bytes (borrowing the
    /// mapping when it is aligned for the dtype, else a copy), then releases
    /// the mapped pages.
    fn with_view<R>(&self, name: &str, file: &ShardFile, info: &TensorInfo, f: impl FnOnce(&Tensor) -> Result<R>) -> Result<R> {
        let kind = kind_of(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            name: name.to_string(),
            file: file.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (begin, end) = info.data_offsets;
        let start = file.data_start + begin;
        let bytes = &file.mmap[start..file.data_start + end];
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let elt = kind.elt_size_in_bytes();
        let result = if (bytes.as_ptr() as usize).is_multiple_of(elt) {
            let mut strides = vec![1i64; shape.len()];
            for i in (0..shape.len().saturating_sub(1)).rev() {
                strides[i] = strides[i + 1] * shape[i + 1];
            }
            // SAFETY: `bytes` holds exactly numel * elt bytes (checked by
            // safetensors' header validation), is aligned for `kind`, and
            // outlives `view`, which is dropped before this function returns;
            // `f` copies what it keeps.
            let view = unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &strides, kind, Device::Cpu)? };
            f(&view)
        } else {
            f(&Tensor::f_from_data_size(bytes, &shape, kind)?)
        };
        // Release the pages just read. The kernel maps file pages in windows
        // ("fault-around") that reach into the neighbouring tensors, so release
        // a margin around the range too; pages still needed later are simply
        // read again from the page cache.
        let lo = start.saturating_sub(FAULT_AROUND);
        let hi = (file.data_start + end + FAULT_AROUND).min(file.mmap.len());
        // SAFETY: the mapping is private and read-only: dropping its pages only
        // means a later read faults them in again from the file.
        unsafe {
            let _ = file.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, lo, hi - lo);
        }
        self.used.borrow_mut().insert(name.to_string());
        result
    }

    /// `w = fp8 * scale_inv`, one scale per `block` rows x cols.
    fn dequantize_fp8(&self, name: &str, fp8: &Tensor, scale_name: &str, shape: &[i64]) -> Result<Tensor> {
        let scale_shape = self.scale_shape(name, shape)?;
        let scale = self
            .tensor(scale_name, &scale_shape, Kind::Float, Device::Cpu)
            .map_err(|e| self.scale_error(e, name, scale_name))?;
        super::dtype::dequantize_fp8_cpu(fp8, &scale, self.fp8_block_i64(), Kind::Float)
    }

    /// Names that were never read. Tensors of layers `>= num_layers`
    /// (multi-token-prediction modules) are returned apart, to be skipped.
    pub fn unread(&self, num_layers: usize) -> (Vec<String>, Vec<String>) {
        let used = self.used.borrow();
        let mut unexpected = Vec::new();
        let mut extra_layers = Vec::new();
        let mut names: Vec<&String> = self.location.keys().collect();
        names.sort();
        for name in names {
            if used.contains(name.as_str()) {
                continue;
            }
            if layer_index(name).is_some_and(|l| l >= num_layers) {
                extra_layers.push(name.clone());
            } else if name.ends_with("rotary_emb.inv_freq") {
                // Older checkpoints saved the RoPE buffer; it is recomputed.
            } else {
                unexpected.push(name.clone());
            }
        }
        (unexpected, extra_layers)
    }
}

/// Dequantizes block-scaled FP8: `fp8` is [rows, cols], `scale` is
/// [ceil(rows/br), ceil(cols/bc)]; returns f32 [rows, cols].
pub fn dequantize_blocks(fp8: &Tensor, scale: &Tensor, block: [usize; 2]) -> Result<Tensor> {
    super::weight::dequantize(fp8, scale, [block[0] as i64, block[1] as i64])
}

fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// `model.layers.N.` -> N.
fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::F8_E4M3 => Kind::Float8e4m3fn,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The shard files named in an index's `weight_map`, in first-seen order.
fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|cause| Error::Json {
        path: index.to_path_buf(),
        cause,
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::BadCheckpointFile {
            file: index.to_path_buf(),
            message: "no `weight_map` object".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| Error::BadCheckpointFile {
            file: index.to_path_buf(),
            message: format!("weight_map entry for `{tensor}` is not a file name"),
        })?;
        if seen.insert(file.to_string()) {
            out.push(dir.join(file));
        }
    }
    Ok(out)
}

/// Builds each weight of a model the way its [`Plan`] places it, and
/// records every tensor it hands out under the name it was asked for: the
/// one place names are spelled ([`Model::named_weights`](super::Model::named_weights),
/// training's parameter list and the checkpoint writer read the record).
pub struct Loader<'a> {
    pub ck: &'a Checkpoint,
    pub plan: &'a Plan,
    /// Present when some weight stays on disk or in host memory.
    pub streamer: Option<Arc<Streamer>>,
    record: RefCell<Vec<NamedTensor>>,
}

/// A tensor of the model under its checkpoint name: the tensor itself
/// (sharing storage with the model's), or why it is not a plain tensor (a
/// weight kept packed in FP8 or left in the checkpoint files).
#[derive(Debug)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: std::result::Result<Tensor, String>,
}

impl<'a> Loader<'a> {
    pub fn new(ck: &'a Checkpoint, plan: &'a Plan, streamer: Option<Arc<Streamer>>) -> Loader<'a> {
        Loader { ck, plan, streamer, record: RefCell::new(Vec::new()) }
    }

    /// Every tensor handed out so far, in load order.
    pub fn into_record(self) -> Vec<NamedTensor> {
        self.record.into_inner()
    }

    fn remember(&self, name: &str, tensor: std::result::Result<Tensor, String>) {
        self.record.borrow_mut().push(NamedTensor { name: name.to_string(), tensor });
    }

    /// The weight the model calls `name` (e.g. `...mlp.experts.3.gate_up_proj.weight`).
    pub fn weight(&self, name: &str) -> Result<Weight> {
        let (i, p) = self.plan.placement_of(name).ok_or_else(|| Error::MissingTensor {
            name: format!("{name} (not in the model's layout)"),
            dir: self.ck.dir().to_path_buf(),
        })?;
        let spec = &self.plan.specs[i];
        let kind = self.plan.kind;
        let part_shape = spec.source_shape();
        let rows = part_shape[0];
        let store = match p.tier {
            Tier::Ready if spec.sources.len() == 1 => Store::Ready(self.ck.tensor(&spec.sources[0], &spec.shape, kind, p.device)?),
            Tier::Ready => {
                // read each source straight into its rows of the stacked matrix
                let w = Tensor::f_empty(spec.shape.as_slice(), (kind, p.device))?;
                for (j, src) in spec.sources.iter().enumerate() {
                    self.ck.tensor_into(src, &part_shape, &mut w.f_narrow(0, j as i64 * rows, rows)?)?;
                }
                Store::Ready(w)
            }
            Tier::Packed => {
                let parts = spec
                    .sources
                    .iter()
                    .map(|src| self.ck.packed(src, &part_shape)?.to_device(p.device))
                    .collect::<Result<Vec<_>>>()?;
                Store::Packed(Arc::new(Packed::new(parts)))
            }
            Tier::Host | Tier::Disk => {
                let streamer = self.streamer.clone().ok_or_else(|| Error::Input(format!("weight `{name}` is planned off the device but the model has no streamer")))?;
                let parts = spec.sources.iter().map(|src| self.ck.locate(src, &part_shape)).collect::<Result<Vec<_>>>()?;
                let host = if p.tier == Tier::Host {
                    let packed = spec.sources.iter().map(|src| self.ck.packed(src, &part_shape)).collect::<Result<Vec<_>>>()?;
                    Some(Arc::new(Packed::new(packed)))
                } else {
                    None
                };
                Store::Mapped(Mapped { parts, streamer, cached: p.cached, host })
            }
        };
        let w = Weight { name: name.to_string(), shape: spec.shape.clone(), kind, device: p.device, store };
        self.remember(name, w.as_ready().map(|t| t.shallow_clone()).ok_or_else(|| w.why_not_ready()));
        Ok(w)
    }

    /// A small weight (norm, router, bias) as a plain tensor of `kind` on its device.
    pub fn small(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let device = self.plan.placement_of(name).map_or(self.device_of_layer(None), |(_, p)| p.device);
        let t = self.ck.tensor(name, shape, kind, device)?;
        self.remember(name, Ok(t.shallow_clone()));
        Ok(t)
    }


    /// The root of the checkpoint's name tree.
    pub fn root(&self) -> LoadPath<'_, 'a> {
        LoadPath { ld: self, prefix: String::new() }
    }

    /// The compute dtype.
    pub fn kind(&self) -> Kind {
        self.plan.kind
    }

    /// The device of layer `l` (`None`: the last layer's, where the head is).
    pub fn device_of_layer(&self, l: Option<usize>) -> Device {
        let d = &self.plan.layer_devices;
        match l {
            Some(l) => d.get(l).copied(),
            None => d.last().copied(),
        }
        .unwrap_or(Device::Cpu)
    }
}

/// A place in the checkpoint's name tree, such as `model.layers.3.self_attn`,
/// in the spirit of tch's `nn::Path` and candle's `VarBuilder::pp`: a block
/// loads its tensors by their own short names (`weight`, `bias`) and the
/// path spells the rest once, so each name is written in one place.
#[derive(Clone)]
pub struct LoadPath<'l, 'a> {
    ld: &'l Loader<'a>,
    prefix: String,
}

impl<'l, 'a> LoadPath<'l, 'a> {
    /// The path one level down: `model` -> `model.layers`.
    pub fn pp(&self, segment: impl std::fmt::Display) -> LoadPath<'l, 'a> {
        let prefix = if self.prefix.is_empty() { segment.to_string() } else { format!("{}.{segment}", self.prefix) };
        LoadPath { ld: self.ld, prefix }
    }

    /// The full checkpoint name of `leaf` under this path.
    pub fn name(&self, leaf: &str) -> String {
        self.pp(leaf).prefix
    }

    /// The weight `leaf` under this path (see [`Loader::weight`]).
    pub fn weight(&self, leaf: &str) -> Result<Weight> {
        self.ld.weight(&self.name(leaf))
    }

    /// The small tensor `leaf` under this path (see [`Loader::small`]).
    pub fn small(&self, leaf: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        self.ld.small(&self.name(leaf), shape, kind)
    }

    /// The loader: compute dtype, devices.
    pub fn loader(&self) -> &'l Loader<'a> {
        self.ld
    }
}
