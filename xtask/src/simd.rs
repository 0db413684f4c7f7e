//! SIMD for the CPU the engine runs on: host-CPU llama.cpp for source installs, CPU variants for shipped builds.
//!
//! llama-cpp-sys-2 builds llama.cpp with `GGML_NATIVE` only when `RUSTFLAGS` holds `-C target-cpu=native`;
//! otherwise it enables only the Rust target's features (baseline x86-64: no AVX2, FMA, F16C). `cargo xtask
//! install` and `demo` build for this machine, so they add that flag. It only changes the `dist` profile's
//! build: the tests' `dev` build is untouched. Shipped builds use the engine's `dynamic-backends` feature
//! instead (one `libggml-cpu-*` per CPU generation, picked at run time); [`ship_cpu_variants`] copies them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The RUSTFLAGS for a build that runs on this machine only: the caller's flags plus `-C target-cpu=native`.
pub fn native_rustflags() -> String {
    let current = std::env::var("RUSTFLAGS").unwrap_or_default();
    if current.contains("target-cpu=") {
        return current;
    }
    format!("{current} -C target-cpu=native").trim().to_string()
}

/// Copies the ggml shared libraries of a `dynamic-backends` build (`libllama`, `libggml*`, and every
/// `libggml-cpu-*` variant) from `profile_dir` (e.g. `target/dist`) and its build output into `bin`.
// Not called yet: `cargo xtask package` is being rewritten; it calls this after a `dynamic-backends` build.
#[cfg_attr(not(test), allow(dead_code))]
pub fn ship_cpu_variants(profile_dir: &Path, bin: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut consider = |dir: &Path| -> Result<()> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let shared =
                name.ends_with(".so") || name.ends_with(".dylib") || name.ends_with(".dll");
            if shared && (name.contains("ggml") || name.contains("llama")) {
                let to = bin.join(&name);
                std::fs::copy(entry.path(), &to).with_context(|| {
                    format!("copying {} to {}", entry.path().display(), to.display())
                })?;
                found.push(to);
            }
        }
        Ok(())
    };
    consider(profile_dir)?;
    let build = profile_dir.join("build");
    if let Ok(entries) = std::fs::read_dir(&build) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("llama-cpp-sys-2-")
            {
                consider(&entry.path().join("out").join("backends"))?;
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_flag_is_added_once() {
        let flags = native_rustflags();
        assert!(flags.contains("target-cpu="), "{flags}");
        assert_eq!(flags.matches("target-cpu=").count(), 1);
    }

    #[test]
    fn cpu_variants_and_ggml_libraries_are_shipped() {
        let dir = tempfile::tempdir().expect("tmp");
        let profile = dir.path().join("dist");
        let backends = profile.join("build/llama-cpp-sys-2-abc/out/backends");
        std::fs::create_dir_all(&backends).expect("mkdir");
        std::fs::write(profile.join("libllama.so"), b"x").expect("write");
        std::fs::write(profile.join("libother.so"), b"x").expect("write");
        std::fs::write(backends.join("libggml-cpu-haswell.so"), b"x").expect("write");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        let mut shipped: Vec<String> = ship_cpu_variants(&profile, &bin)
            .expect("ship")
            .iter()
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .collect();
        shipped.sort();
        assert_eq!(shipped, ["libggml-cpu-haswell.so", "libllama.so"]);
    }
}
