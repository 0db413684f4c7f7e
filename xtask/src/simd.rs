//! SIMD for the CPU the engine runs on: host-CPU llama.cpp for source installs, CPU variants for shipped builds.
//!
//! llama-cpp-sys-2 builds llama.cpp with `GGML_NATIVE` only when `RUSTFLAGS` holds `-C target-cpu=native`;
//! otherwise it enables only the Rust target's features (baseline x86-64: no AVX2, FMA, F16C). `cargo xtask
//! install` and `demo` build for this machine, so they add that flag. `cargo xtask package` builds for any CPU
//! instead, with the engine's `dynamic-backends` feature: one `libggml-cpu-*` per CPU generation, shipped
//! beside the engine ([`runtime_libraries`]), the best of which ggml loads at start.

use std::path::PathBuf;

use anyhow::Result;

/// The RUSTFLAGS for a build that runs on this machine only: the caller's flags plus `-C target-cpu=native`.
pub fn native_rustflags() -> String {
    let current = std::env::var("RUSTFLAGS").unwrap_or_default();
    if current.contains("target-cpu=") {
        return current;
    }
    format!("{current} -C target-cpu=native").trim().to_string()
}

/// The cargo feature of an engine that picks its CPU variant at run time.
pub const CPU_DISPATCH_FEATURE: &str = "dynamic-backends";
/// The crate whose build script compiles llama.cpp.
pub const LLAMA_SYS_CRATE: &str = "llama-cpp-sys-2";

/// The libraries the engine links (a dynamic-backends build links them as shared libraries).
const LINKED_LIBRARIES: [&str; 3] = ["ggml-base", "ggml", "llama"];

/// The llama.cpp/ggml libraries a `dynamic-backends` engine loads, as `(file name, file)`, from
/// llama-cpp-sys-2's build output folders: the linked ones from `lib/` (found through the engine's rpath)
/// and every backend from `backends/` (one `libggml-cpu-*` per CPU generation, loaded from the engine's
/// folder). The volt installs plain files only, so a linked library is shipped as one file under the name the
/// loader asks for (its soname, `libllama.so.0`: the target of the `libllama.so` link).
pub fn runtime_libraries(out_dirs: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    let (prefix, suffix, lib_folder) = match std::env::consts::OS {
        "windows" => ("", ".dll", "bin"),
        "macos" => ("lib", ".dylib", "lib"),
        _ => ("lib", ".so", "lib"),
    };
    let mut libraries: Vec<(String, PathBuf)> = Vec::new();
    for out_dir in out_dirs {
        for name in LINKED_LIBRARIES {
            let link = out_dir
                .join(lib_folder)
                .join(format!("{prefix}{name}{suffix}"));
            let Ok(file) = std::fs::canonicalize(&link) else {
                continue;
            };
            let soname = std::fs::read_link(&link)
                .ok()
                .and_then(|target| Some(target.file_name()?.to_string_lossy().into_owned()))
                .unwrap_or_else(|| format!("{prefix}{name}{suffix}"));
            libraries.push((soname, file));
        }
        let Ok(backends) = std::fs::read_dir(out_dir.join("backends")) else {
            continue;
        };
        for entry in backends.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}ggml-")) && name.ends_with(suffix) {
                libraries.push((name, entry.path()));
            }
        }
    }
    libraries.sort();
    libraries.dedup_by(|a, b| a.0 == b.0);
    let has = |wanted: &str| libraries.iter().any(|(name, _)| name.contains(wanted));
    if !has(&format!("{prefix}ggml-cpu-")) || !has(&format!("{prefix}llama")) {
        anyhow::bail!(
            "the {CPU_DISPATCH_FEATURE} build left no llama library or no ggml CPU variants in {}",
            out_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(libraries)
}

/// Removes links to llama.cpp/ggml libraries in `profile_dir` and its `deps/` that lead nowhere.
/// llama-cpp-sys-2 hard-links the `libllama.so -> libllama.so.0` links of its build into those folders, where
/// they dangle; a later build of the crate with other features sees no file there, tries to link again and
/// fails with "File exists".
pub fn remove_dangling_library_links(profile_dir: &std::path::Path) {
    for dir in [profile_dir.to_path_buf(), profile_dir.join("deps")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with("libllama") || name.starts_with("libggml");
            let dangling = path.is_symlink() && !path.exists();
            if ours && dangling {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
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
    fn cpu_variants_and_linked_libraries_are_shipped_under_their_load_names() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("out");
        let (lib, backends) = (out.join("lib"), out.join("backends"));
        std::fs::create_dir_all(&lib).expect("mkdir");
        std::fs::create_dir_all(&backends).expect("mkdir");
        std::fs::write(lib.join("libllama.so.0.0.7000"), b"llama").expect("write");
        std::os::unix::fs::symlink("libllama.so.0.0.7000", lib.join("libllama.so.0")).expect("ln");
        std::os::unix::fs::symlink("libllama.so.0", lib.join("libllama.so")).expect("ln");
        std::fs::write(lib.join("libggml-base.so"), b"base").expect("write");
        std::fs::write(lib.join("libllama-common.so"), b"x").expect("write");
        std::fs::write(lib.join("libllama.a"), b"x").expect("write");
        std::fs::write(backends.join("README"), b"x").expect("write");
        std::fs::write(backends.join("libggml-cpu-haswell.so"), b"haswell").expect("write");
        std::fs::write(backends.join("libggml-cpu-x64.so"), b"x64").expect("write");
        let shipped = runtime_libraries(std::slice::from_ref(&out)).expect("libraries");
        let names: Vec<&str> = shipped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "libggml-base.so",
                "libggml-cpu-haswell.so",
                "libggml-cpu-x64.so",
                "libllama.so.0"
            ]
        );
        // The soname is shipped with the bytes of the file its links lead to.
        assert_eq!(std::fs::read(&shipped[3].1).expect("read"), b"llama");
        // A build without CPU variants is an error, not a package that cannot pick one.
        std::fs::remove_dir_all(&backends).expect("rm");
        let error = runtime_libraries(&[out]).expect_err("no variants");
        assert!(
            error.to_string().contains("no ggml CPU variants"),
            "{error}"
        );
    }

    #[test]
    fn only_dangling_links_to_our_libraries_are_removed() {
        let dir = tempfile::tempdir().expect("tmp");
        let profile = dir.path();
        std::fs::create_dir(profile.join("deps")).expect("mkdir");
        std::fs::write(profile.join("libggml.so.0"), b"x").expect("write");
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, profile.join(name)).expect("ln");
        };
        link("libllama.so.0", "libllama.so"); // dangling, ours
        link("libggml.so.0", "libggml.so"); // resolves
        link("libfoo.so.1", "libfoo.so"); // dangling, not ours
        std::os::unix::fs::symlink("libggml-base.so.0", profile.join("deps/libggml-base.so"))
            .expect("ln");
        remove_dangling_library_links(profile);
        assert!(!profile.join("libllama.so").is_symlink());
        assert!(!profile.join("deps/libggml-base.so").is_symlink());
        assert!(profile.join("libggml.so").exists());
        assert!(profile.join("libfoo.so").is_symlink());
    }
}
