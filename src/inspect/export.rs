//! Export of inspection results: JSON for everything that is plain data
//! ([`ToJson`], for any `Serialize` value), safetensors for the numeric
//! results ([`ToTensors`]): spectra, effective ranks, score splits, rank
//! sweeps, activation reports, histograms.
//!
//! ```
//! use deepscope::prelude::*;
//! use deepscope::inspect::export::{ToJson, ToTensors};
//! # fn main() -> deepscope::Result<()> {
//! let model = Model::load_default()?;
//! let spectra = model.latent_spectra(1)?;
//! let json = spectra.to_json()?;                     // {"layer": 1, "w_uk": [[...]], ...}
//! assert_eq!(json["layer"], 1);
//! let dir = std::env::temp_dir().join("deepscope-export-doc");
//! std::fs::create_dir_all(&dir).map_err(|e| deepscope::Error::Io { path: dir.clone(), cause: e })?;
//! spectra.save_safetensors(dir.join("spectra.safetensors"))?; // w_uk [H, r], w_uv [H, r]
//! # Ok(()) }
//! ```
use std::path::Path;

use serde::Serialize;
use tch::{Kind, Tensor};

use super::activations::{ActivationReport, Histogram};
use super::mla::{EffectiveRank, LatentSpectra, RankSweep, ScoreSplit};
use crate::error::{Error, Result};

/// JSON for any serialisable result.
pub trait ToJson {
    fn to_json(&self) -> Result<serde_json::Value>;

    /// Writes pretty JSON to `path`.
    fn save_json(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(&self.to_json()?).map_err(|e| Error::Json { path: path.to_path_buf(), cause: e })?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

impl<T: Serialize> ToJson for T {
    fn to_json(&self) -> Result<serde_json::Value> {
        serde_json::to_value(self).map_err(|e| Error::Json { path: "<value>".into(), cause: e })
    }
}

/// Named tensors of a numeric result, and a safetensors file of them.
pub trait ToTensors {
    fn tensors(&self) -> Result<Vec<(String, Tensor)>>;

    fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> =
            self.tensors()?.into_iter().map(|(n, t)| Ok((n, t.f_contiguous()?))).collect::<Result<_>>()?;
        Ok(Tensor::write_safetensors(&tensors, path.as_ref())?)
    }
}

fn matrix(rows: &[Vec<f32>]) -> Result<Tensor> {
    let width = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != width) {
        return Err(Error::Input("rows of different lengths cannot form a matrix".into()));
    }
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::f_from_slice(&flat)?.f_reshape([rows.len() as i64, width as i64])?)
}

fn f64s(v: impl IntoIterator<Item = f64>) -> Result<Tensor> {
    let v: Vec<f64> = v.into_iter().collect();
    Ok(Tensor::f_from_slice(&v)?)
}

impl ToTensors for LatentSpectra {
    /// `w_uk` [heads, rank] and `w_uv` [heads, rank] singular values.
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("w_uk".into(), matrix(&self.w_uk)?), ("w_uv".into(), matrix(&self.w_uv)?)])
    }
}

impl ToTensors for EffectiveRank {
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("singular_values".into(), Tensor::f_from_slice(&self.singular_values)?),
            ("entropy_rank".into(), f64s([self.entropy_rank])?),
            ("rank90".into(), Tensor::f_from_slice(&[self.rank90 as i64])?),
            ("rank99".into(), Tensor::f_from_slice(&[self.rank99 as i64])?),
        ])
    }
}

impl ToTensors for ScoreSplit {
    /// `content` and `position` [B, H, T, T].
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("content".into(), self.content.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?),
            ("position".into(), self.position.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?),
        ])
    }
}

impl ScoreSplit {
    /// Layer and both parts as nested lists (batch row 0: `[H][T][T]`).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let part = |t: &Tensor| -> Result<Vec<Vec<Vec<f32>>>> {
            Ok(Vec::<Vec<Vec<f32>>>::try_from(t.f_select(0, 0)?.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?)?)
        };
        Ok(serde_json::json!({ "layer": self.layer, "content": part(&self.content)?, "position": part(&self.position)? }))
    }
}

impl ToTensors for RankSweep {
    /// One vector per column of the sweep, indexed like `rank`.
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let col = |f: fn(&super::mla::RankRow) -> f64| f64s(self.rows.iter().map(f));
        Ok(vec![
            ("rank".into(), Tensor::f_from_slice(&self.rows.iter().map(|r| r.rank as i64).collect::<Vec<_>>())?),
            ("mean_kl".into(), col(|r| r.mean_kl)?),
            ("top1_agreement".into(), col(|r| r.top1_agreement)?),
            ("next_token_accuracy".into(), col(|r| r.next_token_accuracy)?),
            ("mean_loss".into(), col(|r| r.mean_loss)?),
        ])
    }
}

impl ToTensors for ActivationReport {
    /// Per hook point `<name>.stats` = [mean, std, rms, max_abs, kurtosis,
    /// outlier_fraction]; `massive` [N, 4] = (layer, position, dim, value);
    /// `shared_vs_routed` [L, 4] = (layer, shared_norm, routed_norm, cosine).
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, s) in &self.rows {
            out.push((format!("{name}.stats"), f64s([s.mean, s.std, s.rms, s.max_abs, s.kurtosis, s.outlier_fraction])?));
        }
        let massive: Vec<Vec<f32>> =
            self.massive.iter().map(|m| vec![m.layer as f32, m.position as f32, m.dim as f32, m.value]).collect();
        out.push(("massive".into(), if massive.is_empty() { Tensor::f_zeros([0, 4], (Kind::Float, tch::Device::Cpu))? } else { matrix(&massive)? }));
        let sr: Vec<Vec<f32>> = self
            .shared_vs_routed
            .iter()
            .map(|s| vec![s.layer as f32, s.shared_norm as f32, s.routed_norm as f32, s.cosine as f32])
            .collect();
        out.push(("shared_vs_routed".into(), if sr.is_empty() { Tensor::f_zeros([0, 4], (Kind::Float, tch::Device::Cpu))? } else { matrix(&sr)? }));
        Ok(out)
    }
}

impl ToTensors for Histogram {
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("edges".into(), f64s(self.edges.iter().copied())?),
            ("counts".into(), Tensor::f_from_slice(&self.counts.iter().map(|&c| c as i64).collect::<Vec<_>>())?),
        ])
    }
}
