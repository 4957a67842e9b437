//! `deepscope install`: writes the `deepscope` kernelspec.
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};

/// Where the kernelspec goes.
#[derive(Debug, Clone)]
pub enum InstallTarget {
    /// `~/.local/share/jupyter` (or `$JUPYTER_DATA_DIR`).
    User,
    /// The active virtual environment (`$VIRTUAL_ENV`), else the venv the
    /// binary was built against.
    SysPrefix,
    /// `DIR/share/jupyter`.
    Prefix(PathBuf),
}

pub const KERNEL_NAME: &str = "deepscope";
pub const DISPLAY_NAME: &str = "Rust (DeepScope)";

/// The source tree the binary was built from: where cells find the library
/// (`DEEPSCOPE_SRC` overrides it).
pub fn source_dir() -> PathBuf {
    std::env::var_os("DEEPSCOPE_SRC").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The Python venv whose PyPI torch provides libtorch (`DEEPSCOPE_VENV`
/// overrides the one the binary was built against).
pub fn venv_dir() -> Option<PathBuf> {
    std::env::var_os("DEEPSCOPE_VENV")
        .map(PathBuf::from)
        .or_else(|| option_env!("DEEPSCOPE_BUILD_VENV").filter(|s| !s.is_empty()).map(PathBuf::from))
}

fn data_dir(target: &InstallTarget) -> Result<PathBuf> {
    Ok(match target {
        InstallTarget::Prefix(dir) => dir.join("share").join("jupyter"),
        InstallTarget::SysPrefix => {
            let prefix = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from).or_else(venv_dir).ok_or_else(|| {
                Error::Kernel("--sys-prefix: no virtual environment (VIRTUAL_ENV unset, none known at build time)".into())
            })?;
            prefix.join("share").join("jupyter")
        }
        InstallTarget::User => match std::env::var_os("JUPYTER_DATA_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let home = std::env::var_os("HOME").ok_or_else(|| Error::Kernel("--user: HOME is not set".into()))?;
                PathBuf::from(home).join(".local").join("share").join("jupyter")
            }
        },
    })
}

/// The kernelspec JSON for this executable.
pub fn kernel_json(exe: &Path) -> serde_json::Value {
    let mut env = serde_json::Map::new();
    env.insert("LIBTORCH_USE_PYTORCH".into(), json!("1"));
    env.insert("DEEPSCOPE_SRC".into(), json!(source_dir().display().to_string()));
    if let Some(venv) = venv_dir() {
        env.insert("DEEPSCOPE_VENV".into(), json!(venv.display().to_string()));
    }
    if let Some(cache) = std::env::var_os("DEEPSCOPE_CACHE_DIR") {
        env.insert("DEEPSCOPE_CACHE_DIR".into(), json!(PathBuf::from(cache).display().to_string()));
    }
    json!({
        "argv": [exe.display().to_string(), "kernel", "--connection-file", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "rust",
        "interrupt_mode": "message",
        "env": env,
        "metadata": { "debugger": false },
    })
}

/// Writes `<data dir>/kernels/deepscope/` and returns that directory.
pub fn install(target: &InstallTarget) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::Kernel(format!("cannot find this executable: {e}")))?;
    let dir = data_dir(target)?.join("kernels").join(KERNEL_NAME);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let spec = kernel_json(&exe);
    let path = dir.join("kernel.json");
    let text = serde_json::to_string_pretty(&spec).map_err(|e| Error::Kernel(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    for logo in ["logo-32x32.png", "logo-64x64.png", "logo-svg.svg"] {
        let src = source_dir().join("kernelspec").join(logo);
        if src.exists() {
            std::fs::copy(&src, dir.join(logo)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(dir)
}
