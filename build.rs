//! Give every binary an rpath to the libtorch that torch-sys linked against, so
//! `target/release/deepscope` runs with no LD_LIBRARY_PATH set.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=DEEPSCOPE_LIBTORCH_LIB={dir}");
    }
}
