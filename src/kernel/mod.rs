//! The DeepScope Jupyter kernel.
//!
//! - [`cell`]: what code inside a cell uses (display helpers, progress bars,
//!   the interrupt check) and [`cell_error`] (errors returned through `?`).
//!   Always compiled: cells load the library with default features off.
//! - [`widgets`]: Jupyter widgets (sliders, drop-downs, output areas) with
//!   Rust callbacks, and `interact`; also always compiled.
//! - With the `kernel` feature: the connection file and message signing
//!   (`connection`), framing (`wire`), typed messages (`messages`), the
//!   channel loops (`server`), running cells with evcxr (`exec`), magics,
//!   `is_complete` (`completeness`), history and the kernelspec (`install`).
pub mod cell;
pub mod cell_error;
pub mod widgets;

#[cfg(feature = "kernel")]
pub mod completeness;
#[cfg(feature = "kernel")]
pub mod connection;
#[cfg(feature = "kernel")]
mod comms;
#[cfg(feature = "kernel")]
mod exec;
#[cfg(feature = "kernel")]
pub mod history;
#[cfg(feature = "kernel")]
pub mod install;
#[cfg(feature = "kernel")]
pub mod magics;
#[cfg(feature = "kernel")]
pub mod messages;
#[cfg(feature = "kernel")]
mod server;
#[cfg(feature = "kernel")]
pub mod wire;

#[cfg(feature = "kernel")]
pub use server::{prebuild, run_kernel, KernelOptions};
