//! The rustc wrapper of the DeepScope kernel's cells: the patched evcxr runs
//! it as cargo's `RUSTC_WRAPPER` (`EVCXR_RUSTC_WRAPPER_PATH`, set in
//! `src/kernel/exec.rs`) for every compiler call of a cell's build.
//!
//! Why a separate program: evcxr's default wrapper is the kernel executable
//! itself, which links libtorch (with its CUDA libraries); the dynamic loader
//! alone took 0.37 s and 500 MiB per call on the 2-core machine, and a kernel
//! start makes about ten such calls. This program links only evcxr's wrapper
//! code.

fn main() {
    // In the wrapper role (EVCXR_RUSTC_WRAPPER set) this never returns.
    evcxr::runtime_hook();
    eprintln!("deepscope-rustc: the DeepScope kernel runs this as evcxr's rustc wrapper; it does nothing on its own");
    std::process::exit(2);
}
