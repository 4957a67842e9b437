//! DeepScope: look inside DeepSeek-style models (multi-head latent attention
//! and DeepSeekMoE) on libtorch.
//!
//! - [`model`]: the DeepSeek-V2/V3 family, loading Hugging Face checkpoints,
//!   with numerical parity to `transformers`.
//! - [`inspect`]: traces of a forward pass, routing views and statistics,
//!   interventions and comparisons.
//! - [`plot`]: charts (SVG/PNG) and tables that display themselves in Jupyter.
//! - [`stats`]: parameter counts and KV-cache arithmetic of a config.
//! - [`train`]: training DeepSeek-V3-shaped models (the shipped default model).

pub mod error;
pub mod inspect;
pub mod model;
pub mod plot;
pub mod stats;
pub mod train;

pub use error::{Error, Result};
pub use ndarray;
pub use tch;

/// The names a notebook or script usually needs.
pub mod prelude {
    pub use crate::error::{Error, Result};
    pub use crate::inspect::{compare, Capture, CorpusRun, Intervention, Interventions, Layers, RoutingStats, Trace};
    pub use crate::plot::{Figure, MimeBundle, Table};
    pub use crate::model::{
        AttnImpl, Config, CustomRouter, ForwardOptions, GenerateOptions, HookPoint, LoadOptions, Model, RouterInput,
        Sampling, ScoringFunc,
    };
    pub use crate::stats::{CacheFootprint, ParamCounts};
    pub use tch::{Device, Kind, Tensor};
}
