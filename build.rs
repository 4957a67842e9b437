//! Link-time settings for every binary and test of the crate:
//! - an rpath to the libtorch that torch-sys linked against, so
//!   `target/release/deepscope` runs with no LD_LIBRARY_PATH set;
//! - `libtorch_cuda` kept as a dependency even though no symbol of it is used
//!   directly (the linker's --as-needed would drop it and CUDA would then
//!   never be seen at run time).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=DEEPSCOPE_LIBTORCH_LIB={dir}");
        if Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
