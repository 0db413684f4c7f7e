//! `cargo xtask package` ships an engine that runs on any CPU of the platform: llama.cpp's CPU backend comes
//! as one `libggml-cpu-*` library per CPU generation beside the engine, and the unpacked engine, started through
//! a link as the shell finds it and with no help from the build tree, loads the best one for this CPU and
//! completes with the test model.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use common::*;

/// Puts this build's own engine (llama.cpp linked in) back in `target/debug` when the test ends: the package
/// build in the same profile replaced it with the runtime-dispatch one, which other tests must not pick up.
struct RestoreDebugEngine;

impl Drop for RestoreDebugEngine {
    fn drop(&mut self) {
        let _lock = cargo_lock();
        let _ = cargo()
            .args(["build", "-q", "-p", "ai-engine", "--bin", "ai-engine"])
            .status();
    }
}

/// An engine started from the unpacked archive, in its own rendezvous folder and endpoint; stopped on drop.
struct UnpackedEngine {
    exe: PathBuf,
    home: tempfile::TempDir,
}

impl UnpackedEngine {
    fn command(&self) -> Command {
        let mut command = Command::new(&self.exe);
        command
            // Nothing from the build tree: the libraries must come from the engine's own folder.
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("DYLD_LIBRARY_PATH")
            .env("LAPCE_AI_RUNTIME_DIR", self.home.path().join("run"))
            .env("LAPCE_AI_ENDPOINT", "package-cpu-variants")
            .env("LAPCE_AI_LOG", "warn")
            .env("XDG_STATE_HOME", self.home.path().join("state"))
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("XDG_CACHE_HOME", self.home.path().join("cache"))
            .arg("--config")
            .arg(self.home.path().join("engine.toml"));
        command
    }

    fn run(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the unpacked engine");
        if let Some(mut input) = child.stdin.take() {
            use std::io::Write;
            input.write_all(stdin.as_bytes()).expect("stdin");
        }
        child.wait_with_output().expect("engine output")
    }
}

impl Drop for UnpackedEngine {
    fn drop(&mut self) {
        let _ = self.command().arg("stop").output();
    }
}

fn test_model() -> PathBuf {
    let path = std::env::var_os("LAPCE_AI_TEST_MODEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| {
                PathBuf::from(home).join(".cache/lapce-ai/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            })
        })
        .expect("HOME or LAPCE_AI_TEST_MODEL");
    assert!(
        path.is_file(),
        "test model missing at {}: run scripts/fetch-test-model.sh",
        path.display()
    );
    path
}

fn unpack(archive: &Path, into: &Path) -> Vec<String> {
    let file = std::fs::File::open(archive).expect("archive");
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    tar.set_preserve_permissions(true);
    let mut names = Vec::new();
    for entry in tar.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        assert_eq!(
            entry.header().entry_type(),
            tar::EntryType::Regular,
            "the volt installs plain files only"
        );
        names.push(entry.path().expect("path").to_string_lossy().into_owned());
        entry.unpack_in(into).expect("unpack");
    }
    names
}

#[cfg(target_os = "linux")]
#[test]
fn packaged_engine_loads_the_best_cpu_variant_from_its_own_folder() {
    let _restore = RestoreDebugEngine;
    let out = tempfile::tempdir().expect("tempdir");
    // The test checks the layout and the loading, not the optimisation: the test build's profile.
    xtask(
        "dev",
        &[
            "package".as_ref(),
            "--platform-only".as_ref(),
            "--out-dir".as_ref(),
            out.path().as_os_str(),
        ],
    );
    let archive = out.path().join(format!(
        "lapce-ai-{}-{}-{}.tar.gz",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    ));
    let home = tempfile::tempdir().expect("tempdir");
    let names = unpack(&archive, home.path());
    let variants: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_prefix("bin/libggml-cpu-")?.strip_suffix(".so"))
        .collect();
    // x86-64 builds x64 (baseline) up to sapphirerapids; other architectures their own list.
    assert!(variants.len() >= 4, "{names:#?}");
    for linked in [
        "bin/libllama.so.0",
        "bin/libggml.so.0",
        "bin/libggml-base.so.0",
    ] {
        assert!(names.iter().any(|n| n == linked), "{linked} in {names:#?}");
    }

    let run = home.path().join("run");
    std::fs::create_dir(&run).expect("run dir");
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    std::fs::write(
        home.path().join("engine.toml"),
        format!(
            "completion_profile = \"local\"\n\n[profiles.local]\nkind = \"embedded\"\nmodel_path = {:?}\nthreads = 2\n",
            test_model().display().to_string()
        ),
    )
    .expect("config");
    // Started as the bridge links it for the shell (`~/.local/bin/ai-engine`): through a link in another folder.
    let link = home.path().join("local-bin");
    std::fs::create_dir(&link).expect("link dir");
    std::os::unix::fs::symlink(
        home.path().join("bin").join(engine_name()),
        link.join("ai-engine"),
    )
    .expect("link the engine");
    let engine = UnpackedEngine {
        exe: link.join("ai-engine"),
        home,
    };
    let completed = engine.run(&["complete"], "def add(a, b):\n    return<|cursor|>");
    assert!(
        completed.status.success(),
        "complete failed:\n{}",
        String::from_utf8_lossy(&completed.stderr)
    );
    let status = engine.run(&["--no-start", "status", "--json"], "");
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let cpu = status["local_model"]["cpu"].as_str().unwrap_or_default();
    let loaded = cpu
        .strip_prefix("CPU ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default();
    assert!(
        variants.contains(&loaded),
        "status shows {cpu:?}; shipped {variants:?}"
    );
    // The best variant for this CPU, not the baseline: this machine has AVX2 (checked from the kernel).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo.contains(" avx2") {
        assert!(
            !["x64", "sse42", "sandybridge", "ivybridge"].contains(&loaded),
            "{loaded} on a CPU with AVX2"
        );
    }
}
