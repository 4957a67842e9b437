//! DeepScope: look inside DeepSeek-style models (multi-head latent attention
//! and DeepSeekMoE) on libtorch.
//!
//! - [`model`]: the DeepSeek-V2/V3 family, loading Hugging Face checkpoints,
//!   with numerical parity to `transformers`.
//! - [`stats`]: parameter counts and KV-cache arithmetic of a config.
//! - [`train`]: training DeepSeek-V3-shaped models (the shipped default model).

pub mod error;
pub mod model;
pub mod stats;
pub mod train;

pub use error::{Error, Result};

/// The names a notebook or script usually needs.
pub mod prelude {
    pub use crate::error::{Error, Result};
    pub use crate::model::{
        AttnImpl, Config, ForwardOptions, GenerateOptions, LoadOptions, Model, Sampling,
    };
    pub use crate::stats::{CacheFootprint, ParamCounts};
    pub use tch::{Device, Kind, Tensor};
}
