//! Live configuration: inotify on the config file's folder; a fixed or changed file applies to the next
//! request, a broken edit keeps the last good configuration and is reported once.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use inotify::{Inotify, WatchMask};
use tokio_util::sync::CancellationToken;

use crate::config::EngineConfig;
use crate::engine::Engine;

/// Editors write in bursts (truncate, write, rename): reload once the folder has been quiet this long.
const SETTLE: Duration = Duration::from_millis(100);
/// How often to look again for a config folder that does not exist yet (or after a watch failed).
const RETRY: Duration = Duration::from_secs(1);

/// How the file is read: an explicit `--config` file must exist; the default one may be absent (defaults).
#[derive(Debug, Clone)]
pub struct WatchedConfig {
    pub file: PathBuf,
    pub explicit: bool,
}

impl WatchedConfig {
    /// The file `--config` names, else the default path; `None` without a home directory.
    pub fn new(explicit: Option<&Path>) -> Option<Self> {
        match explicit {
            Some(file) => Some(Self {
                file: absolute(file),
                explicit: true,
            }),
            None => EngineConfig::default_path().map(|file| Self {
                file,
                explicit: false,
            }),
        }
    }

    /// Reads the file (a missing default file gives the defaults).
    pub fn load(&self) -> Result<EngineConfig, String> {
        EngineConfig::load(self.explicit.then_some(self.file.as_path())).map_err(|e| e.to_string())
    }
}

fn absolute(file: &Path) -> PathBuf {
    std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf())
}

/// Reads the file again and applies it; a failure keeps what is in effect and is logged once per distinct
/// error (the error never contains a key: [`crate::config::ConfigError`] does not carry values).
pub fn reload(engine: &Engine, watched: &WatchedConfig) {
    match watched.load() {
        Ok(config) => {
            let had_error = engine.config_error().is_some();
            if engine.apply_config(config) || had_error {
                tracing::info!(file = %watched.file.display(), "engine configuration applied");
                // Build the new providers (and start loading a new local model) before the next keystroke.
                engine.warm_up();
            }
        }
        Err(error) => {
            if engine.config_error().as_deref() != Some(error.as_str()) {
                tracing::error!(
                    "{error} (the configuration in effect stays until the file is fixed)"
                );
            }
            engine.config_failed(error, true);
        }
    }
}

/// Watches `watched` until `stop`, reloading after each change. Runs on its own thread (blocking poll).
pub fn spawn(engine: Arc<Engine>, watched: WatchedConfig, stop: CancellationToken) {
    let spawned = std::thread::Builder::new()
        .name("ai-engine-config".into())
        .spawn(move || run(&engine, &watched, &stop));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the engine configuration; changes need a restart");
    }
}

fn run(engine: &Engine, watched: &WatchedConfig, stop: &CancellationToken) {
    let Some(folder) = watched.file.parent().map(Path::to_path_buf) else {
        return;
    };
    let name: Option<OsString> = watched.file.file_name().map(OsString::from);
    let mut buffer = [0u8; 4096];
    while !stop.is_cancelled() {
        // The folder may not exist yet (no ~/.config/lapce-ai before the user writes a config).
        let inotify = match watch(&folder) {
            Ok(inotify) => inotify,
            Err(_) => {
                std::thread::sleep(RETRY);
                continue;
            }
        };
        // A file written while the watch did not exist yet.
        reload(engine, watched);
        let mut inotify = inotify;
        loop {
            if stop.is_cancelled() {
                return;
            }
            if !wait_readable(&inotify, RETRY) {
                if !folder.is_dir() {
                    break; // the folder went away: watch again once it is back
                }
                continue;
            }
            let mut relevant = false;
            let mut folder_gone = false;
            match inotify.read_events(&mut buffer) {
                Ok(events) => {
                    for event in events {
                        if event.mask.intersects(
                            inotify::EventMask::DELETE_SELF
                                | inotify::EventMask::MOVE_SELF
                                | inotify::EventMask::IGNORED,
                        ) {
                            folder_gone = true;
                        }
                        if event.name.map(OsString::from) == name {
                            relevant = true;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading config watch events");
                    break;
                }
            }
            if relevant {
                // Let the editor finish its burst of writes, then read once.
                while wait_readable(&inotify, SETTLE) {
                    let _ = inotify.read_events(&mut buffer);
                }
                reload(engine, watched);
            }
            if folder_gone {
                reload(engine, watched);
                break;
            }
        }
    }
}

fn watch(folder: &Path) -> std::io::Result<Inotify> {
    let inotify = Inotify::init()?;
    inotify.watches().add(
        folder,
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MODIFY
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF,
    )?;
    Ok(inotify)
}

/// Waits up to `timeout` for events; true when some are ready.
fn wait_readable(inotify: &Inotify, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: inotify.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
    ready > 0 && fd.revents & libc::POLLIN != 0
}
