//! DeepScope: look inside DeepSeek-style models (multi-head latent attention
//! and DeepSeekMoE) on libtorch.
//!
//! - [`model`]: the DeepSeek-V2/V3 family, loading Hugging Face checkpoints,
//!   with numerical parity to `transformers`.
//! - [`inspect`]: traces of a forward pass, routing views and statistics,
//!   interventions and comparisons.
//! - [`plot`]: charts (SVG/PNG) and tables that display themselves in Jupyter.
//! - [`stats`]: parameter counts and KV-cache arithmetic of a config.
//! - [`kernel`]: the Jupyter kernel (feature `kernel`) and the helpers cells use
//!   to display values and notice interrupts.
//! - [`train`]: training DeepSeek-V3-shaped models (the shipped default model).

pub mod error;
pub mod inspect;
pub mod interrupt;
pub mod kernel;
pub mod model;
pub mod plot;
pub mod stats;
pub mod train;

pub use error::{Error, IndexKind, Result};
pub use ndarray;
pub use serde_json;
pub use plotters;
pub use tch;

/// The names a notebook or script usually needs.
pub mod prelude {
    pub use crate::error::{Error, IndexKind, Result};
    pub use crate::inspect::{
        compare, playground, Capture, CorpusRun, EplbOptions, HookCtx, ImportOptions, Intervention, Interventions, Layers, Points, RoutingStats,
        ToJson, ToTensors, Trace, TracedGeneration,
    };
    pub use crate::plot::{Figure, MimeBundle, Table};
    pub use crate::model::{
        AttnImpl, Config, CustomRouter, ForwardOptions, GenerateOptions, HookPoint, LoadOptions, Model, RouterInput,
        Sampling, ScoringFunc,
    };
    pub use crate::kernel::cell::{
        check_interrupt, clear_output, html, input, markdown, password, show, svg, Interrupt, Progress, RichDisplay,
    };
    pub use crate::stats::{CacheFootprint, ParamCounts};
    /// Jupyter widgets: `widgets::IntSlider`, `widgets::interact`, ...
    pub use crate::kernel::widgets;
    pub use crate::kernel::widgets::interact;
    pub use tch::{Device, Kind, Tensor};
    /// The plotting crate, for charts of your own: `use plotters::prelude::*;`
    /// then [`Figure::from_plotters`].
    pub use plotters;
}
