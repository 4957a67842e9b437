//! How much memory a model may take, and on which devices its layers live.
//!
//! - [`MemoryBudget`]: `auto` (what is available, less a margin), `unlimited`,
//!   or a size such as `8GiB`; parsed from the CLI's `--memory-budget`.
//! - [`DeviceMap`]: one device, `auto`/`balanced` over every visible GPU, or an
//!   explicit layer range per device (`0-29=cuda:0,30-60=cuda:1`), in the
//!   spirit of accelerate's `device_map`.

use std::fmt;
use std::str::FromStr;

use tch::Device;

use crate::error::{Error, Result};

/// Memory a loaded model's weights may occupy on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryBudget {
    /// What the device has available now, less [`AUTO_MARGIN`] (on GPUs at
    /// least a tenth; never more than a quarter): everything resident when it
    /// fits, streaming otherwise.
    #[default]
    Auto,
    /// No limit: every weight resident (the load fails if memory runs out).
    Unlimited,
    /// The least the model loads with: norms and routers resident, every
    /// other weight read from disk at each use, no expert cache (rehearsing
    /// the worst case; tests).
    Minimum,
    /// At most this many bytes.
    Bytes(u64),
}

/// Memory left for activations, the KV cache, libtorch and everything else
/// when the budget is `auto`.
pub const AUTO_MARGIN: u64 = 2 << 30;

impl FromStr for MemoryBudget {
    type Err = Error;

    /// `auto`, `unlimited`/`none`, `minimum`, or a number with an optional unit: `B`,
    /// `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` (powers of 1024) or `KB`,
    /// `MB`, `GB`, `TB` (powers of 1000); case-insensitive, e.g. `8GiB`, `1.5g`.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        match lower.as_str() {
            "auto" => return Ok(MemoryBudget::Auto),
            "unlimited" | "none" | "inf" => return Ok(MemoryBudget::Unlimited),
            "minimum" | "min" => return Ok(MemoryBudget::Minimum),
            _ => {}
        }
        let bad = |why: &str| {
            Error::Input(format!(
                "memory budget `{s}` {why}: expected `auto`, `unlimited`, or a size such as 8GiB, 512MiB, 2.5G or 1000000"
            ))
        };
        let split = lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len());
        let (num, unit) = lower.split_at(split);
        if num.is_empty() {
            return Err(bad("does not start with a number"));
        }
        let value: f64 = num.parse().map_err(|_| bad("is not a number"))?;
        let scale: f64 = match unit.trim() {
            "" | "b" => 1.0,
            "k" | "kib" => 1024.0,
            "m" | "mib" => 1024f64.powi(2),
            "g" | "gib" => 1024f64.powi(3),
            "t" | "tib" => 1024f64.powi(4),
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            other => return Err(bad(&format!("has an unknown unit `{other}`"))),
        };
        let bytes = value * scale;
        if !bytes.is_finite() || bytes < 1.0 || bytes > 1e18 {
            return Err(bad("is out of range"));
        }
        Ok(MemoryBudget::Bytes(bytes.round() as u64))
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryBudget::Auto => write!(f, "auto"),
            MemoryBudget::Unlimited => write!(f, "unlimited"),
            MemoryBudget::Minimum => write!(f, "minimum"),
            MemoryBudget::Bytes(b) => write!(f, "{}", crate::stats::human_bytes(*b)),
        }
    }
}

impl MemoryBudget {
    /// The budget in bytes on `device` (`None`: unlimited; `Some(0)` for
    /// `Minimum`, which the plan turns into the least that loads).
    pub fn resolve(&self, device: Device) -> Result<Option<u64>> {
        match self {
            MemoryBudget::Unlimited => Ok(None),
            MemoryBudget::Minimum => Ok(Some(0)),
            MemoryBudget::Bytes(b) => Ok(Some(*b)),
            MemoryBudget::Auto => {
                let avail = available_memory(device)?;
                // a quarter of what is free at most, so a small machine still loads small models
                let margin = match device {
                    Device::Cpu => AUTO_MARGIN.min(avail / 4),
                    _ => AUTO_MARGIN.max(avail / 10).min(avail / 4),
                };
                Ok(Some(avail.saturating_sub(margin)))
            }
        }
    }
}

/// Memory available for new allocations on `device`: `MemAvailable` (capped
/// by a cgroup limit) for the CPU, the driver's free memory for a GPU.
pub fn available_memory(device: Device) -> Result<u64> {
    match device {
        Device::Cpu => host_available(),
        Device::Cuda(i) => cuda_free(i),
        other => Err(Error::Input(format!("cannot tell the free memory of {other:?}: pass a memory budget"))),
    }
}

fn host_available() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::io("/proc/meminfo", e))?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| Error::Input("/proc/meminfo has no MemAvailable line: pass a memory budget".into()))?;
    let mut avail = kib * 1024;
    // a container's limit, when it is tighter than the machine's memory
    if let (Ok(max), Ok(cur)) = (
        std::fs::read_to_string("/sys/fs/cgroup/memory.max"),
        std::fs::read_to_string("/sys/fs/cgroup/memory.current"),
    ) {
        if let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) {
            avail = avail.min(max.saturating_sub(cur));
        }
    }
    Ok(avail)
}

/// Free memory of GPU `index`, from the CUDA runtime libtorch has loaded.
fn cuda_free(index: usize) -> Result<u64> {
    type GetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    type SetDevice = unsafe extern "C" fn(i32) -> i32;
    type GetDevice = unsafe extern "C" fn(*mut i32) -> i32;
    let count = tch::Cuda::device_count().max(0) as usize;
    if index >= count {
        return Err(Error::Device(format!("cuda:{index}"), count));
    }
    let sym = |name: &[u8]| {
        // SAFETY: looking up a symbol by a NUL-terminated name in the process.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr() as *const libc::c_char) };
        (!p.is_null()).then_some(p)
    };
    let (Some(info), Some(set), Some(get)) = (sym(b"cudaMemGetInfo\0"), sym(b"cudaSetDevice\0"), sym(b"cudaGetDevice\0")) else {
        return Err(Error::Input(format!(
            "cannot ask the CUDA runtime how much memory cuda:{index} has free: pass a memory budget"
        )));
    };
    // SAFETY: the symbols are the CUDA runtime's, with these C signatures; the
    // current device is restored afterwards.
    unsafe {
        let (info, set, get): (GetInfo, SetDevice, GetDevice) =
            (std::mem::transmute(info), std::mem::transmute(set), std::mem::transmute(get));
        let mut previous = 0i32;
        get(&mut previous);
        set(index as i32);
        let (mut free, mut total) = (0usize, 0usize);
        let rc = info(&mut free, &mut total);
        set(previous);
        if rc != 0 {
            return Err(Error::Input(format!("cudaMemGetInfo failed on cuda:{index} (error {rc}): pass a memory budget")));
        }
        Ok(free as u64)
    }
}

/// Which device each decoder layer runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceMap {
    /// Every layer on the load's `device`.
    #[default]
    Single,
    /// One GPU when the model fits its budget, else `Balanced`.
    Auto,
    /// Contiguous layer ranges with about equal weight bytes on every visible GPU.
    Balanced,
    /// The device of each layer range, e.g. `0-29=cuda:0,30-60=cuda:1`.
    Explicit(Vec<(std::ops::RangeInclusive<usize>, Device)>),
}

impl FromStr for DeviceMap {
    type Err = Error;

    /// `single`, `auto`, `balanced`, or `A-B=DEVICE,...` (`A=DEVICE` for one layer).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "" | "single" | "none" => return Ok(DeviceMap::Single),
            "auto" => return Ok(DeviceMap::Auto),
            "balanced" => return Ok(DeviceMap::Balanced),
            _ => {}
        }
        let bad = |item: &str, why: String| {
            Error::Input(format!(
                "device map `{s}`: `{item}` {why} (expected auto, balanced, or layer ranges such as 0-29=cuda:0,30-60=cuda:1)"
            ))
        };
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (range, dev) = item.split_once('=').ok_or_else(|| bad(item, "has no `=DEVICE`".into()))?;
            let num = |x: &str| x.trim().parse::<usize>().map_err(|_| bad(item, format!("has `{x}` where a layer number belongs")));
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(range)?, num(range)?),
            };
            if a > b {
                return Err(bad(item, format!("is an empty range ({a} > {b})")));
            }
            out.push((a..=b, parse_device_name(dev.trim()).map_err(|e| bad(item, e))?));
        }
        if out.is_empty() {
            return Err(bad(s, "names no layer".into()));
        }
        Ok(DeviceMap::Explicit(out))
    }
}

/// `cpu`, `cuda`, `cuda:N` without checking that the device exists (plans
/// for machines other than this one).
pub fn parse_device_name(s: &str) -> std::result::Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("names an unknown device `{other}`")),
    }
}

/// The GPUs this machine has.
pub fn gpu_count() -> usize {
    tch::Cuda::device_count().max(0) as usize
}

/// Checks that `device` is one of `gpus` GPUs (or the CPU).
pub fn check_device(device: Device, gpus: usize) -> Result<()> {
    if let Device::Cuda(i) = device {
        let count = gpus;
        if i >= count {
            return Err(Error::Device(format!("cuda:{i}"), count));
        }
    }
    Ok(())
}

impl DeviceMap {
    /// The device of each of `layers` layers, given each layer's weight bytes,
    /// the main device and how many GPUs there are. Every named device must
    /// be among them.
    pub fn resolve(&self, main: Device, layer_bytes: &[u64], fits_one: bool, gpus: usize) -> Result<Vec<Device>> {
        let n = layer_bytes.len();
        let split = |count: usize| -> Vec<Device> {
            // contiguous ranges with about total/count bytes each
            let total: u64 = layer_bytes.iter().sum::<u64>().max(1);
            let mut acc = 0u64;
            layer_bytes
                .iter()
                .map(|b| {
                    let mid = acc + b / 2;
                    acc += b;
                    Device::Cuda(((mid as u128 * count as u128 / total as u128) as usize).min(count - 1))
                })
                .collect()
        };
        match self {
            DeviceMap::Single => {
                check_device(main, gpus)?;
                Ok(vec![main; n])
            }
            DeviceMap::Auto | DeviceMap::Balanced if gpus == 0 => Err(Error::Device(
                format!("{} device map", if *self == DeviceMap::Auto { "auto" } else { "balanced" }),
                0,
            )),
            DeviceMap::Auto if fits_one || gpus == 1 => Ok(vec![Device::Cuda(0); n]),
            DeviceMap::Auto | DeviceMap::Balanced => Ok(split(gpus)),
            DeviceMap::Explicit(ranges) => {
                let mut out: Vec<Option<Device>> = vec![None; n];
                for (range, dev) in ranges {
                    check_device(*dev, gpus)?;
                    if *range.end() >= n {
                        return Err(Error::Input(format!(
                            "device map names layer {} but the model has {n} layers (0-{})",
                            range.end(),
                            n.saturating_sub(1)
                        )));
                    }
                    for l in range.clone() {
                        out[l] = Some(*dev);
                    }
                }
                out.iter()
                    .enumerate()
                    .map(|(l, d)| d.ok_or_else(|| Error::Input(format!("device map gives no device for layer {l}"))))
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_binary_and_decimal_units() {
        let b = |s: &str| s.parse::<MemoryBudget>().unwrap();
        assert_eq!(b("8GiB"), MemoryBudget::Bytes(8 << 30));
        assert_eq!(b("8g"), MemoryBudget::Bytes(8 << 30));
        assert_eq!(b("512MiB"), MemoryBudget::Bytes(512 << 20));
        assert_eq!(b("1.5G"), MemoryBudget::Bytes(3 << 29));
        assert_eq!(b("2GB"), MemoryBudget::Bytes(2_000_000_000));
        assert_eq!(b(" 1000 "), MemoryBudget::Bytes(1000));
        assert_eq!(b("auto"), MemoryBudget::Auto);
        assert_eq!(b("Unlimited"), MemoryBudget::Unlimited);
        assert_eq!(b("minimum"), MemoryBudget::Minimum);
    }

    #[test]
    fn malformed_budgets_are_named_in_the_error() {
        for s in ["", "lots", "8 gigs", "-1G", "0", "1.2.3G", "G8", "1e3G", "NaN"] {
            let e = s.parse::<MemoryBudget>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{s}`")), "{s}: {e}");
        }
    }

    #[test]
    fn explicit_device_maps_cover_every_layer() {
        let m: DeviceMap = "0-1=cpu,2=cpu".parse().unwrap();
        assert_eq!(m.resolve(Device::Cpu, &[1, 1, 1], true, 0).unwrap(), vec![Device::Cpu; 3]);
        let gap = m.resolve(Device::Cpu, &[1, 1, 1, 1], true, 0).unwrap_err().to_string();
        assert!(gap.contains("layer 3"), "{gap}");
        let long = m.resolve(Device::Cpu, &[1, 1], true, 0).unwrap_err().to_string();
        assert!(long.contains("layer 2"), "{long}");
        for bad in ["0-3", "3-1=cpu", "x=cpu", "0-1=tpu"] {
            assert!(bad.parse::<DeviceMap>().is_err(), "{bad}");
        }
        // balanced over 4 GPUs: contiguous ranges of about equal bytes
        let b = DeviceMap::Balanced.resolve(Device::Cuda(0), &[10, 10, 10, 10, 10, 10, 10, 10], false, 4).unwrap();
        assert_eq!(b, [0, 0, 1, 1, 2, 2, 3, 3].map(Device::Cuda).to_vec());
        let skewed = DeviceMap::Balanced.resolve(Device::Cuda(0), &[1, 1, 1, 1, 1, 1, 30, 30], false, 2).unwrap();
        assert_eq!(skewed, [0, 0, 0, 0, 0, 0, 0, 1].map(Device::Cuda).to_vec());
        let e = DeviceMap::Auto.resolve(Device::Cuda(0), &[1, 1], false, 0).unwrap_err();
        assert!(matches!(e, Error::Device(..)), "{e}");
        assert!("0-1=cuda:2".parse::<DeviceMap>().unwrap().resolve(Device::Cpu, &[1, 1], true, 2).is_err());
    }
}
