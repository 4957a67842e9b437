//! The DeepSeek-V2/V3 network on libtorch, one file per block, in reading order.

pub mod config;
pub mod decoder;
pub mod generate;
pub mod hooks;
pub mod loader;
pub mod mla;
#[allow(clippy::module_inception)]
pub mod model;
pub mod moe;
pub mod nn;
pub mod published;
pub mod rope;
pub mod tokenizer;

pub use config::{Config, Family, RopeScaling, ScoringFunc, TopkMethod};
pub use generate::{GenerateOptions, Generation, Sampling, StopReason};
pub use mla::AttnImpl;
pub use model::{parse_device, parse_dtype, ForwardOptions, ForwardOutput, KvCache, LoadOptions, Model};
pub use hooks::{HookPoint, Hooks, NoHooks};
pub use moe::{BiasEdit, CustomRouter, RouterEdits, RouterInput, RouterOutput, RouterSettings};
pub use tokenizer::Tokenizer;
