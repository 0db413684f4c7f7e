//! Test helpers: private endpoints under a temp root and checks that nothing is left behind.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

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
        let root = tempfile::Builder::new().prefix("lapce-ai-test").tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let unique = format!("{name}-{}", std::process::id());
        let endpoint = Endpoint::in_root(&unique, root.path()).unwrap();
        Self { endpoint, root }
    }

    /// Shared-memory names of this endpoint still in /dev/shm.
    pub fn leftover_shm(&self) -> Vec<String> {
        let prefix = self.endpoint.shm_prefix();
        std::fs::read_dir("/dev/shm")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    /// Files (not directories) left in the rendezvous directory.
    pub fn leftover_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, out);
                    } else {
                        out.push(p);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(self.endpoint.dir(), &mut out);
        out
    }

    pub fn assert_clean(&self) {
        assert_eq!(self.leftover_shm(), Vec::<String>::new(), "shared memory left behind");
        assert_eq!(self.leftover_files(), Vec::<PathBuf>::new(), "files left in the rendezvous dir");
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
