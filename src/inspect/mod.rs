//! Inspection: captures, traces, routing views, corpus statistics,
//! interventions and comparisons.
//!
//! ```
//! use deepscope::prelude::*;
//! # fn main() -> deepscope::Result<()> {
//! let model = Model::load_default()?;
//! let t = model.trace("And God said, Let there be light")?;
//! println!("{}", t.router_step(1, 3)?);           // the router, step by step
//! let banned = Interventions::new().ban_experts(1, &[0, 1]);
//! let v = model.trace_with("And God said, Let there be light", &Capture::default(), &banned)?;
//! println!("{}", compare(&t, &v)?);                 // what banning changed
//! # Ok(()) }
//! ```

pub mod activations;
pub mod capture;
pub mod compare;
pub mod corpus;
pub mod display;
pub mod export;
pub mod generation;
pub mod import;
pub mod interventions;
pub mod mla;
pub mod playground;
pub mod points;
pub mod routing;
pub mod trace;

pub use activations::{histogram, massive_activations, ActivationReport, Histogram, LogitLens, MassiveActivation, SharedRouted};
pub use capture::{ActStats, Capture};
pub use compare::{compare, Comparison, PerplexityChange, RoutingChange};
pub use export::{ToJson, ToTensors};
pub use generation::TracedGeneration;
pub use import::{EplbOptions, EplbPlan, ImportOptions};
pub use corpus::{BiasReplay, CorpusRun, CorpusProgress, Imbalance, RoutingStats};
pub use interventions::{project_top_directions, HookCtx, HookFn, Intervention, Interventions, Layers};
pub use playground::{playground, Playground};
pub use points::Points;
pub use mla::{effective_rank, EffectiveRank, LatentBasis, LatentSpectra, PathCheck, RankRow, RankSweep, ScoreSplit};
pub use routing::{RouterStep, RoutingMap};
pub use trace::{to_ndarray, Input, RoutingRecord, Trace};
