//! The DeepSeek-V2/V3 network on libtorch, one file per block, in reading order.

pub mod budget;
pub mod config;
pub mod decoder;
pub mod dtype;
pub mod gemv;
pub mod generate;
pub mod hooks;
pub mod layout;
pub mod loader;
pub mod mla;
#[allow(clippy::module_inception)]
pub mod model;
pub mod moe;
pub mod nn;
pub mod plan;
pub mod published;
pub mod rope;
pub mod routing;
pub mod stream;
pub mod synth;
pub mod tokenizer;
pub mod weight;

pub use budget::{DeviceMap, MemoryBudget};
pub use config::{Config, Family, RopeScaling, ScoringFunc, TopkMethod};
pub use plan::{Plan, PlanOptions, Tier};
pub use stream::{ForwardCost, Traffic};
pub use weight::Weight;
pub use generate::{GenerateOptions, Generation, Sampling, StopReason};
pub use mla::AttnImpl;
pub use model::{parse_device, parse_dtype, ForwardOptions, ForwardOutput, KvCache, LoadOptions, Model, Until};
pub use hooks::{HookPoint, Hooks, Layout, NoHooks, PassInfo};
pub use moe::RouterOutput;
pub use routing::{BiasEdit, CustomRouter, RouterEdits, RouterInput, RouterSettings};
pub use tokenizer::Tokenizer;
