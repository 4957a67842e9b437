//! PyTorch `.pt` files read without Python: the zip archive `torch.save`
//! writes, its pickle, and the tensors it points to.
//!
//! Why our own reader: a tensor in a `.pt` file is a pickle *persistent id*
//! (a reference to a storage entry of the zip), which `serde-pickle` refuses,
//! and the one complete Rust reader (candle's) comes inside candle-core. What
//! `torch.save` writes for the records we read is a small part of pickle:
//! dicts, lists, tuples, numbers, strings, `OrderedDict` and
//! `torch._utils._rebuild_tensor_v2`. Nothing is executed: a global is a name,
//! and a call is a value ([`PyValue::Call`]) unless it is one of those two.
//! An opcode outside the subset is an error that names it and its offset.
//!
//! Tensor data is not loaded with the pickle: [`PtFile::read_ints`] reads
//! one integer tensor, [`PtFile::read_range`] a slice of one, and
//! [`PtFile::read_chunks`] streams a large one, so a 2 GB record is read in
//! bounded memory. Only integer tensors are read (routing records hold no
//! others). `torch.save` stores entries uncompressed; a compressed entry is
//! an error.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::bad;
use crate::error::{Error, Result};

/// A value of the pickle, with tensors as references into the archive.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    /// A dict (or `OrderedDict`), entries in pickle order.
    Dict(Vec<(PyValue, PyValue)>),
    /// A global name, `module.name`, never imported.
    Global(String, String),
    /// A call that was not run: the callable and its arguments.
    Call(Box<PyValue>, Box<PyValue>),
    /// A persistent id that is not a tensor storage.
    Persistent(Box<PyValue>),
    /// An object whose state was set (`BUILD`), not interpreted.
    Built(Box<PyValue>, Box<PyValue>),
    Tensor(TensorRef),
}

impl PyValue {
    /// The value of `key` in a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(entries) => entries.iter().find(|(k, _)| matches!(k, PyValue::Str(s) if s == key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string keys of a dict.
    pub fn keys(&self) -> Vec<String> {
        match self {
            PyValue::Dict(entries) => entries
                .iter()
                .filter_map(|(k, _)| match k {
                    PyValue::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// What kind of value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            PyValue::None => "None",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) => "int",
            PyValue::Float(_) => "float",
            PyValue::Str(_) => "str",
            PyValue::Bytes(_) => "bytes",
            PyValue::List(_) => "list",
            PyValue::Tuple(_) => "tuple",
            PyValue::Dict(_) => "dict",
            PyValue::Global(..) => "global",
            PyValue::Call(..) => "object",
            PyValue::Persistent(_) => "persistent id",
            PyValue::Built(..) => "object",
            PyValue::Tensor(_) => "tensor",
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            PyValue::Int(i) => Some(*i),
            PyValue::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            PyValue::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The items of a list or tuple.
    pub fn as_seq(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) => Some(v),
            _ => None,
        }
    }
}

/// The element types of PyTorch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtDtype {
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl PtDtype {
    fn of_storage(name: &str) -> Option<PtDtype> {
        Some(match name {
            "BoolStorage" => PtDtype::Bool,
            "ByteStorage" => PtDtype::U8,
            "CharStorage" => PtDtype::I8,
            "ShortStorage" => PtDtype::I16,
            "IntStorage" => PtDtype::I32,
            "LongStorage" => PtDtype::I64,
            "HalfStorage" => PtDtype::F16,
            "BFloat16Storage" => PtDtype::BF16,
            "FloatStorage" => PtDtype::F32,
            "DoubleStorage" => PtDtype::F64,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            PtDtype::Bool | PtDtype::U8 | PtDtype::I8 => 1,
            PtDtype::I16 | PtDtype::F16 | PtDtype::BF16 => 2,
            PtDtype::I32 | PtDtype::F32 => 4,
            PtDtype::I64 | PtDtype::F64 => 8,
        }
    }

    pub fn is_integer(self) -> bool {
        matches!(self, PtDtype::Bool | PtDtype::U8 | PtDtype::I8 | PtDtype::I16 | PtDtype::I32 | PtDtype::I64)
    }

    /// Element `i` of little-endian `bytes` as i64 (integer types only).
    fn int_at(self, bytes: &[u8], i: usize) -> i64 {
        let b = &bytes[i * self.size()..(i + 1) * self.size()];
        match self {
            PtDtype::Bool | PtDtype::U8 => b[0] as i64,
            PtDtype::I8 => b[0] as i8 as i64,
            PtDtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            PtDtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            _ => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        }
    }
}

impl fmt::Display for PtDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PtDtype::Bool => "bool",
            PtDtype::U8 => "uint8",
            PtDtype::I8 => "int8",
            PtDtype::I16 => "int16",
            PtDtype::I32 => "int32",
            PtDtype::I64 => "int64",
            PtDtype::F16 => "float16",
            PtDtype::BF16 => "bfloat16",
            PtDtype::F32 => "float32",
            PtDtype::F64 => "float64",
        })
    }
}

/// A tensor of the archive: its storage entry, offset, shape and strides
/// (in elements).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub dtype: PtDtype,
    /// The storage's key: the archive entry `<root>/data/<key>`.
    pub storage: String,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Elements (saturating: a shape whose product overflows is refused
    /// when the data is located).
    pub fn numel(&self) -> usize {
        self.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n)).unwrap_or(usize::MAX)
    }

    /// Whether the elements are stored row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }
}

/// An opened `.pt` file: the unpickled root value and where each storage
/// lies in the file.
pub struct PtFile {
    path: PathBuf,
    root: PyValue,
    /// storage key -> (byte offset of its data in the file, length in bytes)
    storages: HashMap<String, (u64, u64)>,
}

impl fmt::Debug for PtFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PtFile").field("path", &self.path).field("storages", &self.storages.len()).finish()
    }
}

impl PtFile {
    /// Opens a file written by `torch.save` (the zip format, PyTorch >= 1.6).
    pub fn open(path: impl AsRef<Path>) -> Result<PtFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut archive = zip::ZipArchive::new(file)
            .map_err(|e| bad(path, format!("not a PyTorch archive (torch.save writes a zip file; this one cannot be read as zip: {e})")))?;
        let mut pickle_name = None;
        let mut storages = HashMap::new();
        for i in 0..archive.len() {
            let entry = archive.by_index_raw(i).map_err(|e| bad(path, format!("zip entry {i}: {e}")))?;
            let name = entry.name().to_string();
            let Some((_, rest)) = name.split_once('/') else { continue };
            if rest == "data.pkl" {
                pickle_name = Some(name.clone());
            } else if let Some(key) = rest.strip_prefix("data/") {
                if entry.compression() != zip::CompressionMethod::Stored {
                    return Err(bad(path, format!("entry {name} is compressed ({}); torch.save stores tensor data uncompressed", entry.compression())));
                }
                let start = entry.data_start();
                let len = entry.size();
                storages.insert(key.to_string(), (start, len));
            }
        }
        let pickle_name = pickle_name.ok_or_else(|| bad(path, "no data.pkl in the archive: not a file written by torch.save"))?;
        let mut bytes = Vec::new();
        archive
            .by_name(&pickle_name)
            .and_then(|mut e| e.read_to_end(&mut bytes).map_err(zip::result::ZipError::from))
            .map_err(|e| bad(path, format!("cannot read {pickle_name}: {e}")))?;
        let root = unpickle(&bytes).map_err(|m| bad(path, format!("{pickle_name}: {m}")))?;
        let file_len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        for (key, &(start, len)) in &storages {
            if start + len > file_len {
                return Err(bad(path, format!("storage {key} ends at byte {} but the file has {file_len} bytes (truncated?)", start + len)));
            }
        }
        Ok(PtFile { path: path.to_path_buf(), root, storages })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The unpickled object (for a record: its dict).
    pub fn root(&self) -> &PyValue {
        &self.root
    }

    /// Where `t`'s first element lies in the file, once checked that its
    /// elements lie inside its storage and are contiguous.
    fn locate(&self, t: &TensorRef) -> Result<u64> {
        let &(start, len) = self
            .storages
            .get(&t.storage)
            .ok_or_else(|| bad(&self.path, format!("tensor data {} is not in the archive", t.storage)))?;
        if !t.is_contiguous() {
            return Err(bad(&self.path, format!("tensor of shape {:?} has strides {:?}: only contiguous tensors are read", t.shape, t.stride)));
        }
        let need = t.offset.checked_add(t.numel()).and_then(|n| n.checked_mul(t.dtype.size())).map_or(u64::MAX, |n| n as u64);
        if need > len {
            return Err(bad(&self.path, format!("tensor of shape {:?} needs {need} bytes of storage {}, which has {len}", t.shape, t.storage)));
        }
        Ok(start + (t.offset * t.dtype.size()) as u64)
    }

    /// All elements of an integer tensor, row-major.
    pub fn read_ints(&self, t: &TensorRef) -> Result<Vec<i64>> {
        let mut out = Vec::new();
        self.read_range(t, 0, t.numel(), &mut Vec::new(), &mut out)?;
        Ok(out)
    }

    /// Streams an integer tensor `chunk` elements at a time: `f(first, values)`
    /// gets the flat index of the chunk's first element and its values.
    /// Memory stays at one chunk whatever the tensor's size.
    pub fn read_chunks(&self, t: &TensorRef, chunk: usize, mut f: impl FnMut(usize, &[i64]) -> Result<()>) -> Result<()> {
        let (mut buf, mut vals) = (Vec::new(), Vec::new());
        let mut done = 0;
        while done < t.numel() {
            let n = chunk.max(1).min(t.numel() - done);
            self.read_range(t, done, n, &mut buf, &mut vals)?;
            f(done, &vals)?;
            done += n;
        }
        Ok(())
    }

    /// Elements `from .. from + count` (flat, row-major) of an integer tensor
    /// into `out`, through the byte buffer `buf` (both reused by the caller).
    pub fn read_range(&self, t: &TensorRef, from: usize, count: usize, buf: &mut Vec<u8>, out: &mut Vec<i64>) -> Result<()> {
        if !t.dtype.is_integer() {
            return Err(bad(&self.path, format!("expected an integer tensor, found {}", t.dtype)));
        }
        if from.checked_add(count).is_none_or(|end| end > t.numel()) {
            return Err(bad(&self.path, format!("elements {from}..{} of a tensor of {} elements", from.saturating_add(count), t.numel())));
        }
        let start = self.locate(t)?;
        let size = t.dtype.size();
        let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        f.seek(SeekFrom::Start(start + (from * size) as u64)).map_err(|e| Error::io(&self.path, e))?;
        buf.resize(count * size, 0);
        f.read_exact(buf).map_err(|e| Error::io(&self.path, e))?;
        out.clear();
        out.extend((0..count).map(|i| t.dtype.int_at(buf, i)));
        Ok(())
    }
}

/// The pickle virtual machine, for the subset described in the module doc.
fn unpickle(data: &[u8]) -> std::result::Result<PyValue, String> {
    let mut stack: Vec<PyValue> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, PyValue> = HashMap::new();
    let mut pos = 0usize;
    macro_rules! take {
        ($n:expr) => {{
            let n: usize = $n;
            if pos.checked_add(n).is_none_or(|end| end > data.len()) {
                return Err(format!("the pickle ends inside an opcode at byte {pos} (truncated?)"));
            }
            let s = &data[pos..pos + n];
            pos += n;
            s
        }};
    }
    // an unsigned little-endian integer of `w` bytes (lengths, memo keys)
    macro_rules! uint {
        ($w:expr) => {
            take!($w).iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64)
        };
    }
    macro_rules! pop {
        () => {
            stack.pop().ok_or_else(|| format!("pickle stack underflow at byte {pos}"))?
        };
    }
    fn since_mark(stack: &mut Vec<PyValue>, marks: &mut Vec<usize>, pos: usize) -> std::result::Result<Vec<PyValue>, String> {
        let m = marks.pop().ok_or_else(|| format!("no MARK before byte {pos}"))?;
        if m > stack.len() {
            return Err(format!("MARK beyond the stack at byte {pos}"));
        }
        Ok(stack.split_off(m))
    }
    fn line(data: &[u8], pos: &mut usize) -> std::result::Result<String, String> {
        let end = data[*pos..].iter().position(|&b| b == b'\n').ok_or_else(|| format!("unterminated line at byte {pos}"))?;
        let s = String::from_utf8_lossy(&data[*pos..*pos + end]).into_owned();
        *pos += end + 1;
        Ok(s)
    }
    fn utf8(b: &[u8], at: usize) -> std::result::Result<String, String> {
        String::from_utf8(b.to_vec()).map_err(|_| format!("string at byte {at} is not UTF-8"))
    }
    loop {
        let at = pos;
        let op = *take!(1).first().ok_or("empty pickle")?;
        match op {
            0x80 => {
                take!(1);
            } // PROTO
            0x95 => {
                take!(8);
            } // FRAME
            b'.' => return stack.pop().ok_or_else(|| "the pickle is empty".into()),
            b'(' => marks.push(stack.len()),
            b'0' => {
                pop!();
            }
            b'1' => {
                since_mark(&mut stack, &mut marks, at)?;
            }
            b'2' => {
                let top = stack.last().cloned().ok_or_else(|| format!("DUP on an empty stack at byte {at}"))?;
                stack.push(top);
            }
            b'}' => stack.push(PyValue::Dict(Vec::new())),
            b']' => stack.push(PyValue::List(Vec::new())),
            b')' => stack.push(PyValue::Tuple(Vec::new())),
            0x8f => stack.push(PyValue::List(Vec::new())), // EMPTY_SET, read as a list
            b't' => {
                let items = since_mark(&mut stack, &mut marks, at)?;
                stack.push(PyValue::Tuple(items));
            }
            b'l' => {
                let items = since_mark(&mut stack, &mut marks, at)?;
                stack.push(PyValue::List(items));
            }
            0x91 => {
                let items = since_mark(&mut stack, &mut marks, at)?;
                stack.push(PyValue::List(items)); // FROZENSET
            }
            b'd' => {
                let items = since_mark(&mut stack, &mut marks, at)?;
                stack.push(PyValue::Dict(pairs(items, at)?));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(format!("pickle stack underflow at byte {at}"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(PyValue::Tuple(items));
            }
            b'a' => {
                let v = pop!();
                match stack.last_mut() {
                    Some(PyValue::List(l)) => l.push(v),
                    _ => return Err(format!("APPEND to a non-list at byte {at}")),
                }
            }
            b'e' | 0x90 => {
                let items = since_mark(&mut stack, &mut marks, at)?;
                match stack.last_mut() {
                    Some(PyValue::List(l)) => l.extend(items),
                    _ => return Err(format!("APPENDS to a non-list at byte {at}")),
                }
            }
            b's' => {
                let v = pop!();
                let k = pop!();
                set_items(stack.last_mut(), vec![(k, v)], at)?;
            }
            b'u' => {
                let items = since_mark(&mut stack, &mut marks, at)?;
                set_items(stack.last_mut(), pairs(items, at)?, at)?;
            }
            b'N' => stack.push(PyValue::None),
            0x88 => stack.push(PyValue::Bool(true)),
            0x89 => stack.push(PyValue::Bool(false)),
            b'J' => {
                let b = take!(4);
                stack.push(PyValue::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64));
            }
            b'K' | b'M' => {
                let v = uint!(if op == b'K' { 1 } else { 2 });
                stack.push(PyValue::Int(v as i64));
            }
            0x8a | 0x8b => {
                let n = uint!(if op == 0x8a { 1 } else { 4 }) as usize;
                let b = take!(n);
                if n > 8 {
                    return Err(format!("integer of {n} bytes at byte {at} does not fit in 64 bits"));
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(PyValue::Int(v));
            }
            b'I' => {
                let s = line(data, &mut pos)?;
                stack.push(match s.as_str() {
                    "00" => PyValue::Bool(false),
                    "01" => PyValue::Bool(true),
                    _ => PyValue::Int(s.trim().parse().map_err(|_| format!("bad INT {s:?} at byte {at}"))?),
                });
            }
            b'G' => {
                let b = take!(8);
                stack.push(PyValue::Float(f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])));
            }
            b'X' | 0x8c | 0x8d | b'T' | b'U' | b'B' | b'C' | 0x8e => {
                // the width of the length: 1 byte (short forms), 8 (the 8 forms) or 4
                let n = uint!(match op {
                    0x8c | b'U' | b'C' => 1,
                    0x8d | 0x8e => 8,
                    _ => 4,
                }) as usize;
                let b = take!(n);
                stack.push(if matches!(op, b'B' | b'C' | 0x8e) { PyValue::Bytes(b.to_vec()) } else { PyValue::Str(utf8(b, at)?) });
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => uint!(1) as u32,
                    b'r' => uint!(4) as u32,
                    _ => memo.len() as u32,
                };
                let top = stack.last().cloned().ok_or_else(|| format!("PUT on an empty stack at byte {at}"))?;
                memo.insert(key, top);
            }
            b'h' | b'j' => {
                let key = uint!(if op == b'h' { 1 } else { 4 }) as u32;
                let v = memo.get(&key).cloned().ok_or_else(|| format!("memo {key} read before it was written, at byte {at}"))?;
                stack.push(v);
            }
            b'c' => {
                let module = line(data, &mut pos)?;
                let name = line(data, &mut pos)?;
                stack.push(PyValue::Global(module, name));
            }
            0x93 => {
                let name = pop!();
                let module = pop!();
                match (module, name) {
                    (PyValue::Str(m), PyValue::Str(n)) => stack.push(PyValue::Global(m, n)),
                    _ => return Err(format!("STACK_GLOBAL without two strings at byte {at}")),
                }
            }
            b'Q' => {
                let pid = pop!();
                stack.push(persistent(pid));
            }
            b'R' | 0x81 => {
                let args = pop!();
                let func = pop!();
                stack.push(reduce(func, args, at)?);
            }
            0x92 => {
                let _kwargs = pop!();
                let args = pop!();
                let cls = pop!();
                stack.push(reduce(cls, args, at)?);
            }
            b'b' => {
                let state = pop!();
                let obj = pop!();
                stack.push(match obj {
                    // an OrderedDict or a rebuilt tensor carry an empty or
                    // irrelevant state
                    o @ (PyValue::Dict(_) | PyValue::Tensor(_)) => o,
                    o => PyValue::Built(Box::new(o), Box::new(state)),
                });
            }
            _ => {
                return Err(format!(
                    "unknown pickle opcode 0x{op:02x} at byte {at}: DeepScope reads the part of pickle torch.save writes for dicts, lists, numbers, strings and tensors"
                ))
            }
        }
    }
}

fn pairs(items: Vec<PyValue>, at: usize) -> std::result::Result<Vec<(PyValue, PyValue)>, String> {
    if items.len() % 2 != 0 {
        return Err(format!("odd number of items for a dict at byte {at}"));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn set_items(target: Option<&mut PyValue>, items: Vec<(PyValue, PyValue)>, at: usize) -> std::result::Result<(), String> {
    match target {
        Some(PyValue::Dict(d)) => {
            for (k, v) in items {
                match d.iter_mut().find(|(x, _)| *x == k) {
                    Some(slot) => slot.1 = v,
                    None => d.push((k, v)),
                }
            }
            Ok(())
        }
        _ => Err(format!("SETITEM(S) on a non-dict at byte {at}")),
    }
}

/// `('storage', torch.IntStorage, key, location, numel)` is a tensor
/// storage; anything else stays a persistent id.
fn persistent(pid: PyValue) -> PyValue {
    if let PyValue::Tuple(items) = &pid {
        if let [PyValue::Str(tag), PyValue::Global(_, storage), PyValue::Str(key), ..] = items.as_slice() {
            if tag == "storage" {
                return PyValue::Persistent(Box::new(PyValue::Tuple(vec![PyValue::Str(storage.clone()), PyValue::Str(key.clone())])));
            }
        }
    }
    PyValue::Persistent(Box::new(pid))
}

fn ints(v: &PyValue, what: &str, at: usize) -> std::result::Result<Vec<usize>, String> {
    v.as_seq()
        .ok_or_else(|| format!("tensor {what} is a {} at byte {at}", v.kind()))?
        .iter()
        .map(|x| x.as_int().filter(|&i| i >= 0).map(|i| i as usize).ok_or_else(|| format!("tensor {what} holds a {} at byte {at}", x.kind())))
        .collect()
}

fn reduce(func: PyValue, args: PyValue, at: usize) -> std::result::Result<PyValue, String> {
    match &func {
        PyValue::Global(m, n) if m == "collections" && n == "OrderedDict" => return Ok(PyValue::Dict(Vec::new())),
        PyValue::Global(m, n) if m == "torch._utils" && (n == "_rebuild_tensor_v2" || n == "_rebuild_tensor") => {
            let a = args.as_seq().ok_or_else(|| format!("{n} without an argument tuple at byte {at}"))?;
            let [storage, offset, size, stride, ..] = a else {
                return Err(format!("{n} with {} arguments at byte {at}", a.len()));
            };
            let (dtype, key) = match storage {
                PyValue::Persistent(p) => match p.as_ref() {
                    PyValue::Tuple(t) => match t.as_slice() {
                        [PyValue::Str(s), PyValue::Str(k)] => {
                            (PtDtype::of_storage(s).ok_or_else(|| format!("tensor storage type {s} at byte {at} is not supported"))?, k.clone())
                        }
                        _ => return Err(format!("tensor storage at byte {at} is not a storage reference")),
                    },
                    _ => return Err(format!("tensor storage at byte {at} is not a storage reference")),
                },
                other => return Err(format!("tensor storage at byte {at} is a {}", other.kind())),
            };
            let offset = offset.as_int().filter(|&o| o >= 0).ok_or_else(|| format!("tensor storage offset at byte {at} is not an int"))? as usize;
            let shape = ints(size, "size", at)?;
            let stride = ints(stride, "stride", at)?;
            if shape.len() != stride.len() {
                return Err(format!("tensor at byte {at} has {} sizes and {} strides", shape.len(), stride.len()));
            }
            return Ok(PyValue::Tensor(TensorRef { dtype, storage: key, offset, shape, stride }));
        }
        _ => {}
    }
    Ok(PyValue::Call(Box::new(func), Box::new(args)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_written_pickle_reads_back() {
        // {'a': [1, -2, 300], 'b': (True, 'x')}, protocol 2
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b']', b'q', 1, b'(', b'K', 1, b'J'];
        p.extend((-2i32).to_le_bytes());
        p.extend([b'M', 44, 1, b'e', b'X', 1, 0, 0, 0, b'b', 0x88, b'X', 1, 0, 0, 0, b'x', 0x86, b'u', b'.']);
        let v = unpickle(&p).unwrap();
        assert_eq!(v.get("a"), Some(&PyValue::List(vec![PyValue::Int(1), PyValue::Int(-2), PyValue::Int(300)])));
        assert_eq!(v.get("b"), Some(&PyValue::Tuple(vec![PyValue::Bool(true), PyValue::Str("x".into())])));
        assert_eq!(v.keys(), vec!["a", "b"]);
    }

    #[test]
    fn unknown_opcodes_and_truncation_are_errors_that_say_where() {
        let e = unpickle(&[0x80, 2, 0xff]).unwrap_err();
        assert!(e.contains("0xff") && e.contains("byte 2"), "{e}");
        let e = unpickle(&[0x80, 2, b'J', 1, 2]).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn lengths_past_the_end_are_errors_not_panics() {
        // BINUNICODE8 with a length near 2^64
        let mut p = vec![0x80, 4, 0x8d];
        p.extend(u64::MAX.to_le_bytes());
        assert!(unpickle(&p).unwrap_err().contains("truncated"));
        let t = TensorRef { dtype: PtDtype::I32, storage: "0".into(), offset: 0, shape: vec![usize::MAX, 4], stride: vec![4, 1] };
        assert_eq!(t.numel(), usize::MAX);
    }

    #[test]
    fn long1_integers_are_signed() {
        assert_eq!(unpickle(&[0x8a, 1, 0xff, b'.']).unwrap(), PyValue::Int(-1));
        assert_eq!(unpickle(&[0x8a, 2, 0xff, 0x00, b'.']).unwrap(), PyValue::Int(255));
        let mut p = vec![0x8a, 8];
        p.extend(i64::MAX.to_le_bytes());
        p.push(b'.');
        assert_eq!(unpickle(&p).unwrap(), PyValue::Int(i64::MAX));
    }
}
