//! Test helpers: private endpoints under a temp root and checks that nothing is left behind.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use lapce_ai_testkit as testing;
use lapce_ai_transport::server::{ServerConnection, ServerHandler};
use lapce_ai_transport::{Endpoint, ReceivedMessage};

/// A private endpoint in its own temp root; on drop asserts that no shared memory of it is left.
pub struct TestEndpoint {
    pub endpoint: Endpoint,
    pub root: tempfile::TempDir,
}

impl TestEndpoint {
    pub fn new(name: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::Builder::new()
            .prefix("lapce-ai-test")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let unique = format!("{name}-{}", std::process::id());
        let endpoint = Endpoint::in_root(&unique, root.path()).unwrap();
        Self { endpoint, root }
    }

    /// Shared-memory names of this endpoint still in /dev/shm.
    pub fn leftover_shm(&self) -> Vec<String> {
        testing::shm_names_with_prefix(&self.endpoint.shm_prefix())
    }

    /// Files (not directories) left in the rendezvous directory.
    pub fn leftover_files(&self) -> Vec<PathBuf> {
        testing::files_below(self.endpoint.dir())
    }

    pub fn assert_clean(&self) {
        testing::assert_endpoint_clean(&self.endpoint);
    }
}

/// A handler that ignores application messages (ping/pong is answered by the transport).
pub struct NoApp;

impl ServerHandler for NoApp {
    fn on_message(&self, _c: &Arc<ServerConnection>, _m: &ReceivedMessage<'_>) {}
}

/// Waits until `f` holds, up to `secs` seconds (polling; test-only).
pub fn wait_until(secs: f64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    f()
}

/// A child process (the `transport-peer` binary) killed and reaped on drop.
pub struct Peer {
    pub child: std::process::Child,
    pub stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Peer {
    fn spawn(ep: &TestEndpoint, role: &str) -> Self {
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_transport-peer"))
            .args(["--endpoint", ep.endpoint.name(), "--root"])
            .arg(ep.endpoint.root())
            .arg(role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning transport-peer");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Self { child, stdout }
    }

    /// Starts a scripted server process and waits for its `ready` line.
    pub fn server(ep: &TestEndpoint) -> Self {
        let mut peer = Self::spawn(ep, "serve");
        let line = peer.read_line();
        assert!(line.starts_with("ready"), "server said {line:?}");
        peer
    }

    /// Starts a client process streaming forever; returns once it received its first chunk.
    pub fn streaming_client(ep: &TestEndpoint) -> Self {
        let mut peer = Self::spawn(ep, "stream-forever");
        let line = peer.read_line();
        assert_eq!(line.trim(), "streaming");
        peer
    }

    pub fn read_line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Closes stdin (a server then shuts down gracefully) and waits for exit.
    pub fn stop_gracefully(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One ping/pong round trip with a 64-byte payload; returns how long it took.
pub fn ping(client: &mut lapce_ai_transport::Client, nonce: u64) -> std::time::Duration {
    use lapce_ai_transport::protocol::{Ping, Pong};
    let timeout = std::time::Duration::from_secs(5);
    let start = std::time::Instant::now();
    client
        .send(
            nonce,
            &Ping {
                nonce,
                payload: vec![7; 64],
            },
            timeout,
        )
        .unwrap();
    let pong: Pong = client.recv(timeout).unwrap().decode_owned().unwrap();
    assert_eq!(pong.nonce, nonce);
    start.elapsed()
}
