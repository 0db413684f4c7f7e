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
    /// Build everything and write the volt folder as a `.tar.gz`.
    Package {
        /// Archive to write (default: `<target>/lapce-ai-<version>-<os>-<arch>.tar.gz`).
        #[arg(long)]
        out: Option<PathBuf>,
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
        Cmd::Package { out } => {
            let staging = ws.target_dir.join("volt").join(VOLT_NAME);
            if staging.exists() {
                fs::remove_dir_all(&staging)
                    .with_context(|| format!("clearing {}", staging.display()))?;
            }
            ws.build_and_lay_out(&staging, Cpu::Any)?;
            let out = out.unwrap_or_else(|| {
                ws.target_dir.join(format!(
                    "{VOLT_NAME}-{}-{}-{}.tar.gz",
                    env!("CARGO_PKG_VERSION"),
                    std::env::consts::OS,
                    std::env::consts::ARCH
                ))
            });
            write_tar_gz(&staging, &out)?;
            println!("wrote {}", out.display());
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
        let rustup = Command::new("rustup")
            .args(["target", "add", WASM_TARGET])
            .status();
        if !matches!(rustup, Ok(s) if s.success()) {
            println!("note: `rustup target add {WASM_TARGET}` did not succeed; the volt tests need that target");
        }
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
        println!("$ cargo {}", args.join(" "));
        let status = Command::new(&self.cargo)
            .args(&args)
            .current_dir(&self.root)
            .env("CARGO_TARGET_DIR", &self.target_dir)
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

    fn cargo(&self, args: &[&str]) -> Result<()> {
        self.cargo_with_env(args, &[])
    }

    fn cargo_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
        println!("$ cargo {}", args.join(" "));
        let status = Command::new(&self.cargo)
            .args(args)
            .current_dir(&self.root)
            .env("CARGO_TARGET_DIR", &self.target_dir)
            .envs(env.iter().copied())
            .status()
            .context("running cargo")?;
        if !status.success() {
            bail!("cargo {} failed ({status})", args.join(" "));
        }
        Ok(())
    }

    fn build_wasm(&self) -> Result<PathBuf> {
        self.cargo(&[
            "build",
            "--profile",
            &self.profile,
            "--target",
            WASM_TARGET,
            "-p",
            "lapce-ai-volt",
        ])
        .context(format!(
            "building the volt (is the target installed? `rustup target add {WASM_TARGET}`)"
        ))?;
        Ok(self
            .target_dir
            .join(WASM_TARGET)
            .join(self.profile_dir())
            .join("lapce_ai_volt.wasm"))
    }

    fn build_native(&self, cpu: Cpu) -> Result<(PathBuf, PathBuf)> {
        // Built for this machine: llama.cpp with every SIMD extension of this CPU (see `simd`).
        let native = simd::native_rustflags();
        let env: &[(&str, &str)] = match cpu {
            Cpu::ThisMachine => &[("RUSTFLAGS", native.as_str())],
            Cpu::Any => &[],
        };
        self.cargo_with_env(
            &[
                "build",
                "--profile",
                &self.profile,
                "-p",
                BRIDGE,
                "--bin",
                BRIDGE,
                "-p",
                ENGINE,
                "--bin",
                ENGINE,
            ],
            env,
        )?;
        let exe = std::env::consts::EXE_SUFFIX;
        let release = self.target_dir.join(self.profile_dir());
        Ok((
            release.join(format!("{BRIDGE}{exe}")),
            release.join(format!("{ENGINE}{exe}")),
        ))
    }

    /// Builds and writes the volt folder: volt.toml, lapce-ai.wasm, icon, bin/<name>-<os>-<arch>.
    fn build_and_lay_out(&self, dir: &Path, cpu: Cpu) -> Result<()> {
        let wasm = self.build_wasm()?;
        let (bridge, engine) = self.build_native(cpu)?;
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        copy_replacing(&self.root.join("volt.toml"), &dir.join("volt.toml"))?;
        copy_replacing(&self.root.join("icon.svg"), &dir.join("icon.svg"))?;
        copy_replacing(&wasm, &dir.join(format!("{VOLT_NAME}.wasm")))?;
        copy_replacing(&bridge, &bin.join(platform_name(BRIDGE)))?;
        copy_replacing(&engine, &bin.join(platform_name(ENGINE)))?;
        Ok(())
    }
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

/// Lapce's plugin folder for the stable build.
fn default_plugin_dir() -> Result<PathBuf> {
    use etcetera::BaseStrategy;
    let base = if cfg!(target_os = "macos") {
        etcetera::home_dir()
            .context("no home folder")?
            .join("Library/Application Support/dev.lapce.Lapce-Stable")
    } else if cfg!(windows) {
        etcetera::choose_base_strategy()
            .context("no data folder")?
            .data_dir()
            .join("lapce/Lapce-Stable/data")
    } else {
        etcetera::choose_base_strategy()
            .context("no XDG data folder")?
            .data_dir()
            .join("lapce-stable")
    };
    Ok(base.join("plugins").join(VOLT_NAME))
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

/// Writes `dir`'s contents (not the folder itself) as a gzipped tar, as Lapce unpacks volts.
fn write_tar_gz(dir: &Path, out: &Path) -> Result<()> {
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(true);
    tar.append_dir_all(".", dir)
        .with_context(|| format!("archiving {}", dir.display()))?;
    tar.into_inner()?.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_has_the_volt_files_at_its_root() {
        let dir = tempfile::tempdir().expect("tmp");
        let volt = dir.path().join("volt");
        fs::create_dir_all(volt.join("bin")).expect("mkdir");
        fs::write(volt.join("volt.toml"), "name = \"lapce-ai\"\n").expect("write");
        fs::write(volt.join("bin").join(platform_name(BRIDGE)), b"x").expect("write");
        let out = dir.path().join("out.tar.gz");
        write_tar_gz(&volt, &out).expect("archive");
        let file = fs::File::open(&out).expect("open");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let names: Vec<String> = archive
            .entries()
            .expect("entries")
            .filter_map(|e| Some(e.ok()?.path().ok()?.to_string_lossy().into_owned()))
            .collect();
        let clean: Vec<String> = names
            .iter()
            .map(|n| n.trim_start_matches("./").to_owned())
            .collect();
        assert!(clean.contains(&"volt.toml".to_owned()), "{names:?}");
        assert!(
            clean.contains(&format!("bin/{}", platform_name(BRIDGE))),
            "{names:?}"
        );
        let unpacked = dir.path().join("unpacked");
        let file = fs::File::open(&out).expect("open");
        tar::Archive::new(flate2::read::GzDecoder::new(file))
            .unpack(&unpacked)
            .expect("unpack");
        assert!(unpacked.join("volt.toml").is_file());
    }
}
