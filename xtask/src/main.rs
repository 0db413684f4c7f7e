//! `cargo xtask`: builds, installs and packages the lapce-ai volt; runs the demo and the whole test suite.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    about = "Build, install and package the lapce-ai volt; demo; tests"
)]
struct Cli {
    /// Cargo profile for the volt's binaries (`dist` = release without debug info).
    #[arg(long, global = true, default_value = PROFILE)]
    profile: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build everything and install the volt folder where Lapce loads plugins.
    Install {
        /// Volt folder to create (default: Lapce's plugin folder, `.../lapce-stable/plugins/lapce-ai`).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Do not fetch the default model.
        #[arg(long)]
        skip_model: bool,
    },
    /// Release artifacts: this platform's binary archive, the registry archive (`volts publish`
    /// layout, its wasm carrying the release URL and the archives' sha256) and `SHA256SUMS`.
    Package {
        /// Folder for the artifacts (default: `<target>/package`).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Only build and write this platform's binary archive.
        #[arg(long, conflicts_with = "registry_only")]
        platform_only: bool,
        /// Only write the registry archive and checksums, from the platform archives in the folder.
        #[arg(long)]
        registry_only: bool,
        /// Where the volt downloads the platform archives from (default: the GitHub release of this
        /// version, from volt.toml's `repository`).
        #[arg(long)]
        release_url: Option<String>,
    },
    /// Only build the wasm volt.
    Wasm,
    /// Install the volt (with the default model), then complete an example file without Lapce.
    Demo {
        /// Volt folder (default: Lapce's plugin folder).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Everything the tests need (wasm target, test model), then the whole test suite.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

mod package;
mod setup;
mod simd;

const VOLT_NAME: &str = "lapce-ai";
const WASM_TARGET: &str = "wasm32-wasip1";
const BRIDGE: &str = "lapce-ai-lsp";
const ENGINE: &str = "ai-engine";
/// Cargo profile of shipped artifacts (defined in `.cargo/config.toml`).
const PROFILE: &str = "dist";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = Workspace::locate(cli.profile)?;
    ws.set_up(&cli.command)?;
    match cli.command {
        Cmd::Demo { dir } => {
            let dir = match dir {
                Some(d) => d,
                None => default_plugin_dir()?,
            };
            ws.build_and_lay_out(&dir, Cpu::ThisMachine)?;
            println!("installed the lapce-ai volt in {}", dir.display());
            ensure_model(&ws, &dir);
            print_usage(&dir);
            demo(&ws, &dir)?;
        }
        Cmd::Test { args } => ws.test(&args)?,
        Cmd::Wasm => {
            let wasm = ws.build_wasm()?;
            println!("built {}", wasm.display());
        }
        Cmd::Install { dir, skip_model } => {
            let dir = match dir {
                Some(d) => d,
                None => default_plugin_dir()?,
            };
            ws.build_and_lay_out(&dir, Cpu::ThisMachine)?;
            println!("installed the lapce-ai volt in {}", dir.display());
            if !skip_model {
                ensure_model(&ws, &dir);
            }
            print_usage(&dir);
        }
        Cmd::Package {
            out_dir,
            platform_only,
            registry_only,
            release_url,
        } => {
            let out_dir = out_dir.unwrap_or_else(|| ws.target_dir.join("package"));
            if !registry_only {
                let archive = package::write_platform_archive(&ws, &out_dir)?;
                println!("wrote {}", archive.display());
            }
            if !platform_only {
                let release_url = match release_url {
                    Some(url) => url,
                    None => package::default_release_url(&ws.root)?,
                };
                let hashes = package::require_platform_archives(&out_dir)?;
                let wasm = ws.build_wasm_with(&[
                    (package::RELEASE_URL_ENV, release_url.as_str()),
                    (
                        package::ARCHIVE_SHA256_ENV,
                        package::hashes_env_value(&hashes).as_str(),
                    ),
                ])?;
                let registry = out_dir.join(package::registry_archive_name());
                package::write_registry_archive(
                    &ws.root.join("volt.toml"),
                    &wasm,
                    &ws.root.join("README.md"),
                    &ws.root.join("icon.svg"),
                    &registry,
                )?;
                println!(
                    "wrote {} (downloads from {release_url})",
                    registry.display()
                );
                let sums = package::write_checksums(&out_dir)?;
                println!("wrote {}", sums.display());
            }
        }
    }
    Ok(())
}

struct Workspace {
    root: PathBuf,
    target_dir: PathBuf,
    cargo: OsString,
    profile: String,
}

impl Workspace {
    fn locate(profile: String) -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent folder")?
            .to_path_buf();
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
            Some(t) => root.join(t),
            None => root.join("target"),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        Ok(Self {
            root,
            target_dir,
            cargo,
            profile,
        })
    }

    /// Installs what the command needs from the machine (wasm target, cmake, libclang) before building.
    fn set_up(&self, command: &Cmd) -> Result<()> {
        let needs = match command {
            Cmd::Wasm
            | Cmd::Package {
                registry_only: true,
                ..
            } => setup::Needs::Wasm,
            _ => setup::Needs::Everything,
        };
        setup::ensure(&self.root, needs)
    }

    /// The folder cargo writes `self.profile`'s artifacts to.
    fn profile_dir(&self) -> &str {
        match self.profile.as_str() {
            "dev" | "test" => "debug",
            "bench" => "release",
            other => other,
        }
    }

    /// The README's test command: the wasm target, the test model, then `cargo test --workspace`.
    fn test(&self, extra: &[String]) -> Result<()> {
        let model = self.script_output(
            "fetch-test-model.sh",
            &[],
            "the embedded-model tests need the model",
        )?;
        println!("test model: {model}");
        // The real-server tier (ai-engine/tests/real_llama_server.rs): llama-cpp-python built once into a cache.
        let server_python = self.script_output(
            "llama-server.sh",
            &[("LAPCE_AI_TEST_MODEL", model.as_str())],
            "the real llama.cpp server tests need llama-cpp-python[server]",
        )?;
        println!("llama.cpp server python: {server_python}");
        let mut args = vec!["test", "--workspace"];
        args.extend(extra.iter().map(String::as_str));
        let status = self
            .cargo_command(&args)
            .env("LAPCE_AI_TEST_MODEL", &model)
            .env("LAPCE_AI_LLAMA_SERVER_PYTHON", &server_python)
            .status()
            .context("running cargo test")?;
        if !status.success() {
            bail!("tests failed ({status})");
        }
        Ok(())
    }

    /// Runs `scripts/NAME` (progress on stderr) and returns the last line it printed on stdout (a path).
    fn script_output(&self, name: &str, envs: &[(&str, &str)], why: &str) -> Result<String> {
        let script = self.root.join("scripts").join(name);
        let output = Command::new("bash")
            .arg(&script)
            .envs(envs.iter().copied())
            .current_dir(&self.root)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!("{} failed ({}): {why}", script.display(), output.status);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        match stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) {
            Some(line) => Ok(line.to_owned()),
            None => bail!("{} printed nothing on stdout: {why}", script.display()),
        }
    }

    /// `cargo ARGS` in the workspace with its target folder, echoed as it will run.
    fn cargo_command(&self, args: &[&str]) -> Command {
        println!("$ cargo {}", args.join(" "));
        let mut command = Command::new(&self.cargo);
        command
            .args(args)
            .current_dir(&self.root)
            .env("CARGO_TARGET_DIR", &self.target_dir);
        command
    }

    fn cargo_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
        let status = self
            .cargo_command(args)
            .envs(env.iter().copied())
            .status()
            .context("running cargo")?;
        if !status.success() {
            bail!("cargo {} failed ({status})", args.join(" "));
        }
        Ok(())
    }

    /// The volt for a local install: no release URL or archive hashes (the binaries sit in `bin/`).
    fn build_wasm(&self) -> Result<PathBuf> {
        self.build_wasm_with(&[
            (package::RELEASE_URL_ENV, ""),
            (package::ARCHIVE_SHA256_ENV, ""),
        ])
    }

    /// The volt with build-time settings (`LAPCE_AI_RELEASE_URL`, `LAPCE_AI_ARCHIVE_SHA256`).
    fn build_wasm_with(&self, env: &[(&str, &str)]) -> Result<PathBuf> {
        self.cargo_with_env(
            &[
                "build",
                "--profile",
                &self.profile,
                "--target",
                WASM_TARGET,
                "-p",
                "lapce-ai-volt",
            ],
            env,
        )
        .context(format!(
            "building the volt (is the target installed? `rustup target add {WASM_TARGET}`)"
        ))?;
        Ok(self
            .target_dir
            .join(WASM_TARGET)
            .join(self.profile_dir())
            .join("lapce_ai_volt.wasm"))
    }

    /// Builds the bridge and the engine. For [`Cpu::Any`] the engine dispatches on the CPU at run time
    /// (`dynamic-backends`): the result lists the ggml libraries it loads, which must ship beside it.
    fn build_native(&self, cpu: Cpu) -> Result<NativeBuild> {
        let build = |package: &'static str| {
            vec![
                "build",
                "--profile",
                &self.profile,
                "-p",
                package,
                "--bin",
                package,
            ]
        };
        let libraries = match cpu {
            // Built for this machine: llama.cpp with every SIMD extension of this CPU (see `simd`).
            Cpu::ThisMachine => {
                let mut args = build(BRIDGE);
                args.extend(["-p", ENGINE, "--bin", ENGINE]);
                self.cargo_with_env(&args, &[("RUSTFLAGS", simd::native_rustflags().as_str())])?;
                Vec::new()
            }
            Cpu::Any => {
                self.cargo_with_env(&build(BRIDGE), &[])?;
                simd::remove_dangling_library_links(&self.target_dir.join(self.profile_dir()));
                // Its own invocation: `--features ai-engine/...` would name ai-engine's dev-dependency on
                // itself, not the package being built.
                let mut args = build(ENGINE);
                args.extend(["--features", simd::CPU_DISPATCH_FEATURE]);
                let out_dirs = self.cargo_build_script_outputs(&args, simd::LLAMA_SYS_CRATE)?;
                simd::runtime_libraries(&out_dirs)?
            }
        };
        let exe = std::env::consts::EXE_SUFFIX;
        let release = self.target_dir.join(self.profile_dir());
        Ok(NativeBuild {
            bridge: release.join(format!("{BRIDGE}{exe}")),
            engine: release.join(format!("{ENGINE}{exe}")),
            libraries,
        })
    }

    /// Runs a cargo build and returns the output folders of `crate_name`'s build script (from cargo's JSON
    /// messages: exact even when older builds of the crate sit in the target folder).
    fn cargo_build_script_outputs(&self, args: &[&str], crate_name: &str) -> Result<Vec<PathBuf>> {
        let output = self
            .cargo_command(args)
            .args(["--message-format", "json-render-diagnostics"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running cargo")?;
        if !output.status.success() {
            bail!("cargo {} failed ({})", args.join(" "), output.status);
        }
        let mut out_dirs = Vec::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let is_crate = message["package_id"].as_str().is_some_and(|id| {
                id.contains(&format!("{crate_name}@")) || id.starts_with(&format!("{crate_name} "))
            });
            if message["reason"] == "build-script-executed" && is_crate {
                if let Some(dir) = message["out_dir"].as_str() {
                    out_dirs.push(PathBuf::from(dir));
                }
            }
        }
        if out_dirs.is_empty() {
            bail!("cargo did not report the build output of {crate_name}");
        }
        Ok(out_dirs)
    }

    /// Builds and writes the volt folder: volt.toml, lapce-ai.wasm, icon, bin/<name>-<os>-<arch>.
    fn build_and_lay_out(&self, dir: &Path, cpu: Cpu) -> Result<()> {
        let wasm = self.build_wasm()?;
        let NativeBuild {
            bridge,
            engine,
            libraries,
        } = self.build_native(cpu)?;
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        copy_replacing(&self.root.join("volt.toml"), &dir.join("volt.toml"))?;
        copy_replacing(&self.root.join("icon.svg"), &dir.join("icon.svg"))?;
        copy_replacing(&wasm, &dir.join(format!("{VOLT_NAME}.wasm")))?;
        copy_replacing(&bridge, &bin.join(platform_name(BRIDGE)))?;
        copy_replacing(&engine, &bin.join(platform_name(ENGINE)))?;
        for (name, library) in &libraries {
            copy_replacing(library, &bin.join(name))?;
        }
        Ok(())
    }
}

/// The native binaries of one build, and the libraries the engine loads at run time (`(file name, file)`,
/// shipped in the same folder; empty when llama.cpp is linked in).
struct NativeBuild {
    bridge: PathBuf,
    engine: PathBuf,
    libraries: Vec<(String, PathBuf)>,
}

/// Which CPUs the native binaries must run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cpu {
    /// Only this machine (`install`, `demo`): llama.cpp uses every SIMD extension it has.
    ThisMachine,
    /// Any CPU of the target architecture (`package`).
    Any,
}

/// `name-<os>-<arch>[.exe]`, the names the volt and the bridge look for.
fn platform_name(name: &str) -> String {
    format!(
        "{name}-{}-{}{}",
        std::env::consts::OS,
        std::env::consts::ARCH,
        std::env::consts::EXE_SUFFIX
    )
}

/// Copies through a temporary file and renames, so a running binary is never overwritten in place.
fn copy_replacing(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("installing");
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("replacing {}", to.display()))?;
    Ok(())
}

/// Lapce's plugin folder for the stable build: its `ProjectDirs("dev", "lapce", "Lapce-Stable")` local
/// data folder plus `plugins` (on Windows that is Local AppData, not Roaming).
fn default_plugin_dir() -> Result<PathBuf> {
    use etcetera::BaseStrategy;
    let base = if cfg!(target_os = "macos") {
        etcetera::home_dir()
            .context("no home folder")?
            .join("Library/Application Support/dev.lapce.Lapce-Stable")
    } else if cfg!(windows) {
        windows_data_dir(
            std::env::var_os("LOCALAPPDATA").map(PathBuf::from),
            etcetera::home_dir().ok(),
        )
        .context("no Local AppData folder")?
    } else {
        etcetera::choose_base_strategy()
            .context("no XDG data folder")?
            .data_dir()
            .join("lapce-stable")
    };
    Ok(base.join("plugins").join(VOLT_NAME))
}

/// `%LOCALAPPDATA%\lapce\Lapce-Stable\data` (home's `AppData\Local` when the variable is unset).
fn windows_data_dir(local_app_data: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    let local = local_app_data
        .filter(|p| !p.as_os_str().is_empty())
        .or_else(|| home.map(|h| h.join("AppData").join("Local")))?;
    Some(local.join("lapce").join("Lapce-Stable").join("data"))
}

/// Makes sure the engine has its default model; failure is reported, not fatal.
fn ensure_model(ws: &Workspace, dir: &Path) {
    let engine = dir.join("bin").join(platform_name(ENGINE));
    println!("$ {} models pull", engine.display());
    let pulled = Command::new(&engine).args(["models", "pull"]).status();
    match pulled {
        Ok(s) if s.success() => {
            println!("the default model is present");
            return;
        }
        Ok(s) => println!("`ai-engine models pull` failed ({s})"),
        Err(err) => println!("cannot run {}: {err}", engine.display()),
    }
    let script = ws.root.join("scripts").join("fetch-test-model.sh");
    if script.is_file() {
        println!("$ bash {}", script.display());
        match Command::new("bash")
            .arg(&script)
            .current_dir(&ws.root)
            .status()
        {
            Ok(s) if s.success() => {
                println!("fetched the test model");
                return;
            }
            Ok(s) => println!("{} failed ({s})", script.display()),
            Err(err) => println!("cannot run {}: {err}", script.display()),
        }
    }
    println!(
        "warning: no model was installed. Completions need one: run `{} models pull` later, \
         or configure a remote provider profile for ai-engine.",
        engine.display()
    );
}

/// Completes `examples/fibonacci.py` with the installed engine (started on demand, like the bridge does).
fn demo(ws: &Workspace, dir: &Path) -> Result<()> {
    let engine = dir.join("bin").join(platform_name(ENGINE));
    let example = ws.root.join("examples").join("fibonacci.py");
    println!();
    println!(
        "$ {} complete --file {} --line 5 --column 12",
        engine.display(),
        example.display()
    );
    println!("--- {} (cursor after `return `) ---", example.display());
    print!(
        "{}",
        fs::read_to_string(&example).with_context(|| format!("reading {}", example.display()))?
    );
    println!("--- completion ---");
    let status = Command::new(&engine)
        .args(["complete", "--line", "5", "--column", "12", "--file"])
        .arg(&example)
        .status()
        .with_context(|| format!("running {}", engine.display()))?;
    if !status.success() {
        bail!("the demo completion failed ({status})");
    }
    println!("---");
    println!(
        "The engine keeps running for Lapce; stop it with `{} stop`.",
        engine.display()
    );
    Ok(())
}

fn print_usage(dir: &Path) {
    println!();
    println!(
        "Lapce loads every folder in its plugins directory on start; restart Lapce to use it."
    );
    println!(
        "For a folder outside it (development): lapce --plugin-path {}",
        dir.display()
    );
    println!("Enable ghost text in Lapce: editor.enable-inline-completion = true");
    println!("Settings go in settings.toml under [lapce-ai] (enabled, profile, debounce-ms, max-lines, ...).");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_plugins_live_in_local_app_data() {
        let dir =
            windows_data_dir(Some(PathBuf::from("L")), Some(PathBuf::from("H"))).expect("dir");
        assert_eq!(
            dir,
            Path::new("L")
                .join("lapce")
                .join("Lapce-Stable")
                .join("data")
        );
        let dir = windows_data_dir(None, Some(PathBuf::from("H"))).expect("dir");
        assert!(dir.starts_with(Path::new("H").join("AppData").join("Local")));
        assert!(!dir.to_string_lossy().contains("Roaming"));
        assert!(windows_data_dir(None, None).is_none());
    }
}
