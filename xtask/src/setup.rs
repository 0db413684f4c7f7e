//! Prerequisites the xtask sets up itself: the wasm target (through rustup), cmake and libclang.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::WASM_TARGET;

/// What the build needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Only the volt (wasm32-wasip1 target).
    Wasm,
    /// The volt and the native binaries (llama.cpp needs cmake and libclang).
    Everything,
}

/// Makes sure the machine can build what `needs` says, installing what it can and otherwise
/// stopping with the one command to run.
pub fn ensure(root: &Path, needs: Needs) -> Result<()> {
    ensure_wasm_target(root)?;
    if needs == Needs::Everything {
        ensure_native_tools()?;
    }
    Ok(())
}

/// Adds the wasm target through rustup when the active toolchain lacks it.
fn ensure_wasm_target(root: &Path) -> Result<()> {
    let listed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root)
        .output();
    let installed = match listed {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            if sysroot_has_target(root) {
                return Ok(());
            }
            bail!(
                "the Rust target {WASM_TARGET} is missing and rustup is not available to add it; \
                 install Rust from https://rustup.rs, then run `rustup target add {WASM_TARGET}`"
            );
        }
    };
    if target_listed(&installed, WASM_TARGET) {
        return Ok(());
    }
    println!("$ rustup target add {WASM_TARGET}");
    let status = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .current_dir(root)
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("`rustup target add {WASM_TARGET}` failed ({status}); run it by hand and retry");
    }
    Ok(())
}

/// Whether `rustup target list --installed` output names `target`.
fn target_listed(installed: &str, target: &str) -> bool {
    installed.lines().any(|line| line.trim() == target)
}

/// Without rustup: does the toolchain's sysroot carry the target's standard library?
fn sysroot_has_target(root: &Path) -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    Command::new(rustc)
        .args(["--print", "sysroot"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| {
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
                .join("lib/rustlib")
                .join(WASM_TARGET)
                .is_dir()
        })
        .unwrap_or(false)
}

/// Debian/Ubuntu packages that provide cmake and libclang.
const APT_PACKAGES: [&str; 2] = ["cmake", "libclang-dev"];

/// cmake and libclang (llama.cpp's build and bindgen): apt-get as root on Debian/Ubuntu, otherwise stop
/// with the command to run.
fn ensure_native_tools() -> Result<()> {
    let missing = missing_native_tools();
    if missing.is_empty() {
        return Ok(());
    }
    let debian = Path::new("/etc/debian_version").is_file();
    match install_plan(&missing, debian, running_as_root()) {
        InstallPlan::AptGet => {
            let packages = APT_PACKAGES.join(" ");
            println!(
                "{} missing: $ apt-get install -y {packages}",
                missing.join(" and ")
            );
            for args in [
                vec!["update", "-qq"],
                [&["install", "-y", "-qq"][..], &APT_PACKAGES[..]].concat(),
            ] {
                let status = Command::new("apt-get")
                    .args(&args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()
                    .context("running apt-get")?;
                if !status.success() {
                    bail!("`apt-get {}` failed ({status})", args.join(" "));
                }
            }
            let still = missing_native_tools();
            if !still.is_empty() {
                bail!("{} still missing after apt-get", still.join(" and "));
            }
            Ok(())
        }
        InstallPlan::Tell(command) => bail!(
            "{} missing (the embedded llama.cpp model needs them); run:\n    {command}\nthen retry",
            missing.join(" and ")
        ),
    }
}

/// How missing tools get installed.
#[derive(Debug, PartialEq, Eq)]
enum InstallPlan {
    AptGet,
    /// Stop and tell the user this command.
    Tell(String),
}

fn install_plan(missing: &[&str], debian: bool, root: bool) -> InstallPlan {
    if debian && root {
        return InstallPlan::AptGet;
    }
    if debian {
        return InstallPlan::Tell(format!(
            "sudo apt-get install -y {}",
            APT_PACKAGES.join(" ")
        ));
    }
    let names = missing
        .iter()
        .map(|m| {
            if *m == "libclang" {
                "clang (libclang)"
            } else {
                m
            }
        })
        .collect::<Vec<_>>()
        .join(" and ");
    InstallPlan::Tell(format!(
        "install {names} with your system's package manager"
    ))
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn missing_native_tools() -> Vec<&'static str> {
    let mut missing = Vec::new();
    let cmake = Command::new("cmake").arg("--version").output();
    if !matches!(cmake, Ok(out) if out.status.success()) {
        missing.push("cmake");
    }
    if find_libclang().is_none() {
        missing.push("libclang");
    }
    missing
}

/// Where bindgen (clang-sys) would find libclang: `LIBCLANG_PATH`, `llvm-config --libdir`, the usual
/// system folders.
fn find_libclang() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("LIBCLANG_PATH") {
        dirs.push(dir.into());
    }
    if let Ok(out) = Command::new("llvm-config").arg("--libdir").output() {
        if out.status.success() {
            dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
        }
    }
    for parent in [
        "/usr/lib",
        "/usr/lib64",
        "/usr/local/lib",
        "/opt/homebrew/opt/llvm/lib",
    ] {
        let parent = Path::new(parent);
        dirs.push(parent.to_owned());
        if let Ok(entries) = std::fs::read_dir(parent) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("llvm") {
                    dirs.push(entry.path().join("lib"));
                } else if name.ends_with("-linux-gnu") {
                    dirs.push(entry.path());
                }
            }
        }
    }
    dirs.into_iter().find_map(|dir| libclang_in(&dir))
}

fn libclang_in(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let library = name.starts_with("libclang")
            && !name.starts_with("libclang-cpp")
            && (name.contains(".so") || name.ends_with(".dylib") || name.ends_with(".dll"));
        library.then(|| entry.path())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_list_is_matched_by_whole_lines() {
        let installed = "x86_64-unknown-linux-gnu\nwasm32-wasip1\n";
        assert!(target_listed(installed, "wasm32-wasip1"));
        assert!(!target_listed("wasm32-wasip1-threads\n", "wasm32-wasip1"));
        assert!(!target_listed("", "wasm32-wasip1"));
    }

    #[test]
    fn root_on_debian_installs_others_are_told_one_command() {
        assert_eq!(install_plan(&["cmake"], true, true), InstallPlan::AptGet);
        assert_eq!(
            install_plan(&["cmake", "libclang"], true, false),
            InstallPlan::Tell("sudo apt-get install -y cmake libclang-dev".into())
        );
        let InstallPlan::Tell(other) = install_plan(&["libclang"], false, true) else {
            panic!("a non-Debian system is told what to install");
        };
        assert!(other.contains("libclang"), "{other}");
    }

    #[test]
    fn libclang_is_found_in_a_folder() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(libclang_in(dir.path()).is_none());
        std::fs::write(dir.path().join("libclang-cpp.so.14"), b"").expect("write");
        assert!(
            libclang_in(dir.path()).is_none(),
            "libclang-cpp is not libclang"
        );
        std::fs::write(dir.path().join("libclang-14.so.1"), b"").expect("write");
        assert!(libclang_in(dir.path()).is_some());
    }
}
