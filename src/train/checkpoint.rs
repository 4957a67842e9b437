//! Writing models in the Hugging Face layout (`config.json`,
//! `model.safetensors`, `generation_config.json`) so that both DeepScope and
//! `transformers` load them, and creating a freshly initialised one.

use std::path::Path;

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::Model;

/// `config.json` for `cfg` (`model_type: deepseek_v3` / `deepseek_v2`), for
/// plain (not FP8) weights stored in `kind`.
pub fn config_json(cfg: &Config, kind: Kind) -> serde_json::Value {
    cfg.to_hf_json(kind)
}

/// Every weight of `model` under its checkpoint name, stacked gate/up
/// matrices split back into `gate_proj` and `up_proj`.
pub fn hf_state_dict(model: &Model) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, t) in model.named_weights()? {
        if let Some(prefix) = name.strip_suffix(".gate_up_proj.weight") {
            let half = t.size()[0] / 2;
            out.push((format!("{prefix}.gate_proj.weight"), t.f_narrow(0, 0, half)?));
            out.push((format!("{prefix}.up_proj.weight"), t.f_narrow(0, half, half)?));
        } else if let Some(prefix) = name.strip_suffix(".gate_up_proj.bias") {
            let half = t.size()[0] / 2;
            out.push((format!("{prefix}.gate_proj.bias"), t.f_narrow(0, 0, half)?));
            out.push((format!("{prefix}.up_proj.bias"), t.f_narrow(0, half, half)?));
        } else {
            out.push((name, t.shallow_clone()));
        }
    }
    Ok(out)
}

/// Writes `model` to `dir` in the Hugging Face layout. Weights are stored in
/// `kind` (f32 or bf16), `e_score_correction_bias` always in f32.
pub fn save_model(model: &Model, dir: &Path, kind: Kind) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<(String, Tensor)> = hf_state_dict(model)?
        .into_iter()
        .map(|(n, t)| {
            let k = if n.ends_with("e_score_correction_bias") { Kind::Float } else { kind };
            let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(k)?.f_contiguous()?;
            Ok((n, t))
        })
        .collect::<Result<_>>()?;
    write_atomically(&dir.join("model.safetensors"), |tmp| Ok(Tensor::write_safetensors(&tensors, tmp)?))?;
    write_config(&model.config, dir, kind)
}

/// Writes `config.json` and `generation_config.json`.
pub fn write_config(cfg: &Config, dir: &Path, kind: Kind) -> Result<()> {
    let config = serde_json::to_string_pretty(&config_json(cfg, kind)).map_err(|e| Error::Input(e.to_string()))?;
    let path = dir.join("config.json");
    std::fs::write(&path, config + "\n").map_err(|e| Error::io(&path, e))?;
    let generation = json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids.first(),
        "pad_token_id": cfg.pad_token_id,
        "do_sample": true, "temperature": 0.8, "top_p": 0.95,
    });
    let path = dir.join("generation_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&generation).unwrap_or_default() + "\n")
        .map_err(|e| Error::io(&path, e))
}

/// Writes through a temporary file and renames, so an interrupted save never
/// leaves a truncated file behind.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub use crate::model::layout::weight_shapes;

/// Writes a freshly initialised checkpoint for `cfg` to `dir`: norms 1,
/// router bias 0, other matrices N(0, std) with `std = init_std`, output
/// projections (`o_proj`, `down_proj`) scaled by `1/sqrt(2 * layers)`.
pub fn init_checkpoint(cfg: &Config, dir: &Path, init_std: f64, seed: i64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tch::manual_seed(seed);
    let depth_scale = (2.0 * cfg.num_hidden_layers as f64).sqrt().recip();
    let tensors: Vec<(String, Tensor)> = weight_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let opts = (Kind::Float, Device::Cpu);
            let t = if name.ends_with("norm.weight") {
                Tensor::f_ones(&shape, opts)?
            } else if name.ends_with("e_score_correction_bias") || name.ends_with(".bias") {
                Tensor::f_zeros(&shape, opts)?
            } else {
                let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                    init_std * depth_scale
                } else {
                    init_std
                };
                Tensor::f_randn(&shape, opts)?.f_mul_scalar(std)?
            };
            Ok((name, t))
        })
        .collect::<Result<_>>()?;
    write_atomically(&dir.join("model.safetensors"), |tmp| Ok(Tensor::write_safetensors(&tensors, tmp)?))?;
    write_config(cfg, dir, Kind::Float)
}
