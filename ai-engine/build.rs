//! Build script: an engine built with `dynamic-backends` finds the ggml libraries shipped beside it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_DYNAMIC_BACKENDS").is_none() {
        return;
    }
    // libllama/libggml are linked dynamically and the `libggml-cpu-*` variants are loaded at run time; a
    // packaged engine carries them in its own folder, so the loader must look there (Windows always does).
    match std::env::var("CARGO_CFG_TARGET_OS").as_deref() {
        Ok("macos") => println!("cargo:rustc-link-arg-bins=-Wl,-rpath,@executable_path"),
        Ok("windows") | Err(_) => {}
        Ok(_) => println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN"),
    }
}
