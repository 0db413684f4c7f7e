//! Engine test helpers: a scripted OpenAI-compatible SSE server on 127.0.0.1 and an `ai-engine serve` process.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use lapce_ai_engine_testkit::{fake_config, FakeOpenAi, Script};
use lapce_ai_transport::Endpoint;

/// A private rendezvous root + endpoint + config directory for one test.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub endpoint: Endpoint,
}

impl Sandbox {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ai-engine-test")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let root = dir.path().join("run");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let endpoint = Endpoint::in_root(&format!("{name}-{}", std::process::id()), &root).unwrap();
        Self { dir, endpoint }
    }

    /// Writes an engine.toml (mode 0600) and returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("engine.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// An `ai-engine` command with this sandbox's rendezvous root, endpoint and XDG dirs.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ai-engine"));
        command
            .env("LAPCE_AI_RUNTIME_DIR", self.endpoint.root())
            .env("LAPCE_AI_LOG", "warn")
            .env("LAPCE_AI_ENDPOINT", self.endpoint.name())
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"));
        command
    }

    /// `ai-engine --no-start status ARGS`: what the status command says about this sandbox (never starts an
    /// engine), whatever it exits with.
    pub fn status(&self, args: &[&str]) -> std::process::Output {
        self.command()
            .args(["--no-start", "status"])
            .args(args)
            .output()
            .unwrap()
    }

    /// `ai-engine status --json` against this sandbox's running engine (never starts one).
    pub fn status_json(&self) -> serde_json::Value {
        let output = self.status(&["--json"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Starts `ai-engine serve --config FILE` and waits until it serves.
    pub fn serve(&self, config: &Path) -> Engine {
        let child = self
            .command()
            .arg("--config")
            .arg(config)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        lapce_ai_transport::wait_for_engine(&self.endpoint, Duration::from_secs(20))
            .expect("engine did not start");
        Engine { child }
    }

    /// Nothing of this endpoint is left in /dev/shm or the rendezvous directory.
    pub fn assert_clean(&self) {
        lapce_ai_testkit::assert_endpoint_clean(&self.endpoint);
    }
}

/// A running engine process, killed on drop if still alive.
pub struct Engine {
    pub child: Child,
}

impl Engine {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait: the engine shuts down gracefully.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
