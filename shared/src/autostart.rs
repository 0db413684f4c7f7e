//! Finding and starting the `ai-engine` daemon on demand; shared by the CLI and the editor bridge.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::endpoint::{Endpoint, RUNTIME_DIR_ENV};
use crate::reconnect::EngineStarter;

/// Environment variable naming the engine binary explicitly.
pub const ENGINE_PATH_ENV: &str = "LAPCE_AI_ENGINE";

/// The engine binary: `explicit`, else `$LAPCE_AI_ENGINE`, else `ai-engine` (or `ai-engine-<os>-<arch>`) next
/// to the running executable, else `ai-engine` on `PATH`.
pub fn locate_engine(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return Some(path.to_owned());
    }
    if let Some(path) = std::env::var_os(ENGINE_PATH_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let names = [
        "ai-engine".to_owned(),
        format!(
            "ai-engine-{}-{}",
            std::env::consts::OS,
            std::env::consts::ARCH
        ),
    ];
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
    {
        for name in &names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("ai-engine"))
            .find(|candidate| candidate.is_file())
    })
}

/// Runs `<engine> [extra args] serve --detach --endpoint <name>` (same rendezvous root) and waits for it to
/// daemonize. `extra_args` are global engine options such as `--config FILE`.
pub fn start_engine_detached(
    engine: &Path,
    extra_args: &[OsString],
    endpoint: &Endpoint,
) -> std::io::Result<()> {
    tracing::info!(engine = %engine.display(), endpoint = endpoint.name(), "starting the engine");
    let status = Command::new(engine)
        .args(extra_args)
        .args(["serve", "--detach", "--endpoint", endpoint.name()])
        .env(RUNTIME_DIR_ENV, endpoint.root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if status.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&status.stderr);
        Err(std::io::Error::other(format!(
            "{} serve --detach failed ({}): {}",
            engine.display(),
            status.status,
            stderr.trim()
        )))
    }
}

/// An [`EngineStarter`] that starts `engine` detached with `extra_args`.
pub fn starter(engine: PathBuf, extra_args: Vec<OsString>) -> EngineStarter {
    Arc::new(move |endpoint: &Endpoint| start_engine_detached(&engine, &extra_args, endpoint))
}
