//! Link-time settings for every binary and test of the crate:
//! - the interrupt counters exported from the `deepscope` executable;
//! - an rpath to the libtorch that torch-sys linked against, so
//!   `target/release/deepscope` runs with no LD_LIBRARY_PATH set;
//! - `libtorch_cuda` kept as a dependency of `deepscope`, the tests and the
//!   examples even though no symbol of it is used directly (the linker's
//!   --as-needed would drop it and CUDA would then never be seen at run time).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    // The kernel finds the venv whose torch it was built against (for the
    // cells' own build of tch) and the executable exports the interrupt
    // counters that library code in cells looks up with dlsym.
    if let Ok(venv) = std::env::var("VIRTUAL_ENV") {
        println!("cargo:rustc-env=DEEPSCOPE_BUILD_VENV={venv}");
    }
    for sym in ["deepscope_interrupt_count", "deepscope_interrupt_seen"] {
        println!("cargo:rustc-link-arg-bin=deepscope=-Wl,--export-dynamic-symbol={sym}");
    }
    // ... and tch's C API (torch-sys's `at*` functions and its error slot).
    // Cells link the library as a Rust dylib (src/kernel/exec.rs,
    // CellLinking), whose export list holds Rust symbols only; a cell that
    // instantiates a generic tch call (e.g. `Tensor::argmax`) calls the C
    // function itself and found it nowhere ("undefined symbol: atg_argmax").
    // The runner is this executable, so its copy serves every cell; a call
    // and the error read after it bind to the same copy.
    for sym in ["at*", "get_and_reset_last_err"] {
        println!("cargo:rustc-link-arg-bin=deepscope=-Wl,--export-dynamic-symbol={sym}");
    }
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=DEEPSCOPE_LIBTORCH_LIB={dir}");
        if Path::new(&dir).join("libtorch_cuda.so").exists() {
            // not for `deepscope-rustc`, which uses no libtorch at all and
            // is started once per compiler call (src/bin/deepscope-rustc.rs)
            let arg = "-Wl,--no-as-needed,-ltorch_cuda,--as-needed";
            println!("cargo:rustc-link-arg-bin=deepscope={arg}");
            for kind in ["tests", "examples"] {
                println!("cargo:rustc-link-arg-{kind}={arg}");
            }
        }
    }
}
