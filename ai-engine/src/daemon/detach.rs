//! `serve --detach`: re-runs the engine as a session leader with its logs in the XDG state directory.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapce_ai_transport::{wait_for_engine, Endpoint};

/// Where a detached engine writes its log.
pub fn log_path(endpoint: &Endpoint) -> PathBuf {
    let base = directories::BaseDirs::new()
        .and_then(|d| d.state_dir().map(Path::to_owned))
        .or_else(|| directories::BaseDirs::new().map(|d| d.data_local_dir().to_owned()))
        .unwrap_or_else(std::env::temp_dir);
    base.join("lapce-ai")
        .join(format!("engine-{}.log", endpoint.name()))
}

/// Outcome of a detach attempt.
pub enum Detached {
    Started { pid: u32, log: PathBuf },
    AlreadyRunning,
}

/// Starts `current_exe serve` in a new session and waits until it serves the endpoint (or fails).
pub fn spawn_detached(
    endpoint: &Endpoint,
    config: Option<&Path>,
    idle_exit: Option<&str>,
) -> Result<Detached, String> {
    if lapce_ai_transport::Client::connect(
        endpoint,
        lapce_ai_transport::ClientOptions {
            client_name: "ai-engine detach probe".into(),
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .is_ok()
    {
        return Ok(Detached::AlreadyRunning);
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let log = log_path(endpoint);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("cannot open the log {}: {e}", log.display()))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| format!("cannot open the log {}: {e}", log.display()))?;
    let mut command = Command::new(exe);
    command.args(["serve", "--endpoint", endpoint.name()]);
    if let Some(idle_exit) = idle_exit {
        command.args(["--idle-exit", idle_exit]);
    }
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .env(
            lapce_ai_transport::endpoint::RUNTIME_DIR_ENV,
            endpoint.root(),
        )
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our session and terminal.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start the engine: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if wait_for_engine(endpoint, Duration::from_millis(100)).is_ok() {
            return Ok(Detached::Started {
                pid: child.id(),
                log,
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = tail_of(&log, 5);
            if tail.contains("already running") {
                return Ok(Detached::AlreadyRunning);
            }
            return Err(format!(
                "the engine exited ({status}) before it was ready:\n{tail}"
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the engine did not become ready within 30 s; see {}",
                log.display()
            ));
        }
    }
}

fn tail_of(path: &Path, lines: usize) -> String {
    let Ok(file) = std::fs::File::open(path) else {
        return String::new();
    };
    let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
