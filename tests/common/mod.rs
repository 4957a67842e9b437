//! Shared helpers of the integration tests: where the reference fixtures are
//! and how to read them. Fixtures are written by `tests/gen_fixtures.py`
//! (transformers, offline); `make test` generates them first.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use deepscope::model::{LoadOptions, Model};
use tch::{Device, Kind, Tensor};

/// The fixture root: `$DEEPSCOPE_FIXTURES`, else `target/fixtures`.
pub fn fixtures() -> PathBuf {
    let root = std::env::var_os("DEEPSCOPE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    assert!(
        root.join("manifest.json").exists(),
        "no reference fixtures in {}: run `make fixtures` (or `make test`)",
        root.display()
    );
    root
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub moe_layers: Vec<usize>,
}

/// Every case listed in the manifest.
pub fn cases() -> Vec<Case> {
    let root = fixtures();
    let text = std::fs::read_to_string(root.join("manifest.json")).expect("manifest.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    json["cases"]
        .as_array()
        .expect("cases array")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            dir: root.join(c["name"].as_str().expect("name")),
            moe_layers: c["moe_layers"]
                .as_array()
                .expect("moe_layers")
                .iter()
                .map(|l| l.as_u64().expect("layer") as usize)
                .collect(),
        })
        .collect()
}

pub fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("fixture case {name} not in manifest"))
}

/// `reference.safetensors` of a case.
pub fn reference(case: &Case) -> HashMap<String, Tensor> {
    read(&case.dir.join("reference.safetensors"))
}

pub fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn load_cpu(dir: &Path) -> Model {
    Model::load(
        dir,
        LoadOptions::new(Device::Cpu, Kind::Float),
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Copies a fixture checkpoint into a fresh temporary directory.
pub fn copy_case(case: &Case, tag: &str) -> Scratch {
    let dst = Scratch::temp(&format!("deepscope-test-{}-{}", case.name, tag), "");
    std::fs::create_dir_all(&*dst).expect("temp dir");
    for entry in std::fs::read_dir(&case.dir).expect("case dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    dst
}

/// A file or folder in the temp dir that a test writes, removed when it goes
/// out of scope, also when the test fails.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `TMP/{stem}-{pid}{ext}`, with anything already there removed.
    pub fn temp(stem: &str, ext: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("{stem}-{}{ext}", std::process::id()));
        let s = Scratch(path);
        s.remove();
        s
    }

    fn remove(&self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.remove();
    }
}
