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

/// An engine endpoint served in this process by [`NoApp`], with default options.
pub fn serve_no_app(ep: &TestEndpoint) -> lapce_ai_transport::Server {
    lapce_ai_transport::Server::bind(&ep.endpoint, Default::default(), Arc::new(NoApp)).unwrap()
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
        Self::spawn_with(ep, &[role])
    }

    fn spawn_with(ep: &TestEndpoint, role_and_args: &[&str]) -> Self {
        Self::spawn_in(&ep.endpoint, role_and_args)
    }

    fn spawn_in(endpoint: &lapce_ai_transport::Endpoint, role_and_args: &[&str]) -> Self {
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_transport-peer"))
            .args(["--endpoint", endpoint.name(), "--root"])
            .arg(endpoint.root())
            .args(role_and_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning transport-peer");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Self { child, stdout }
    }

    /// Starts a scripted server process and waits for its `ready` line.
    pub fn server(ep: &TestEndpoint) -> Self {
        Self::server_in(&ep.endpoint)
    }

    /// [`Peer::server`] for an endpoint given by itself (for engine starters).
    pub fn server_in(endpoint: &lapce_ai_transport::Endpoint) -> Self {
        let mut peer = Self::spawn_in(endpoint, &["serve"]);
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

    /// Starts a client process that connects, pings and disconnects in a loop; returns once it started.
    pub fn connect_loop(ep: &TestEndpoint) -> Self {
        let mut peer = Self::spawn(ep, "connect-loop");
        assert_eq!(peer.read_line().trim(), "connecting");
        peer
    }

    /// Starts a process that becomes `uid` and creates a sealed slot segment; returns it with the segment's
    /// announcement (pid, memfd number, generation).
    pub fn foreign_segment(
        ep: &TestEndpoint,
        uid: u32,
    ) -> (Self, lapce_ai_transport::segment::Announcement) {
        let mut peer = Self::spawn_with(ep, &["foreign-segment", "--uid", &uid.to_string()]);
        let line = peer.read_line();
        let fields: Vec<&str> = line.split_whitespace().collect();
        let ["segment", pid, memfd, generation] = fields[..] else {
            panic!("foreign-segment said {line:?}");
        };
        let announcement = lapce_ai_transport::segment::Announcement::new(
            generation.parse().unwrap(),
            pid.parse().unwrap(),
            memfd.parse().unwrap(),
        );
        (peer, announcement)
    }

    /// Starts a process that holds the endpoint's engine.lock as an engine of another release would
    /// (`version`: its rendezvous version, `None` for releases before the field); returns once it holds it.
    pub fn old_engine(ep: &TestEndpoint, version: Option<u32>) -> Self {
        Self::old_engine_with(ep, version, &[])
    }

    /// [`Peer::old_engine`] with more of its flags (`--ignore-sigterm`).
    pub fn old_engine_with(ep: &TestEndpoint, version: Option<u32>, flags: &[&str]) -> Self {
        let version = version.map(|v| v.to_string());
        let mut args = vec!["old-engine"];
        if let Some(v) = &version {
            args.extend(["--version", v]);
        }
        args.extend(flags);
        let mut peer = Self::spawn_with(ep, &args);
        assert_eq!(peer.read_line().trim(), "ready");
        peer
    }

    /// Writes `line` to the peer's stdin and returns its one-line answer.
    pub fn ask(&mut self, line: &str) -> String {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("the peer's stdin");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        self.read_line().trim().to_owned()
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

/// A well-behaved client doing round trips on its own thread until stopped: proves that what a test does to
/// other connections leaves this one working throughout.
pub struct Survivor {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Survivor {
    /// Connects, then pings in a loop (a failed round trip panics the thread, which [`Survivor::finish`]
    /// reports).
    pub fn start(ep: &TestEndpoint) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut client =
            lapce_ai_transport::Client::connect(&ep.endpoint, Default::default()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut round_trips = 0;
                while !stop.load(Ordering::Acquire) {
                    ping(&mut client, round_trips);
                    round_trips += 1;
                    if round_trips.is_multiple_of(64) {
                        // Leave the CPU to the processes under test now and then.
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                }
                client.close();
                round_trips
            })
        };
        Self { stop, thread }
    }

    /// Stops the round trips and returns how many there were; fails the test if any failed.
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let round_trips = match self.thread.join() {
            Ok(n) => n,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        assert!(
            round_trips > 0,
            "the well-behaved client made no round trip"
        );
        round_trips
    }
}

/// Acts as a client that announces `announcement` in `slot` (holding the slot's lock, as a client does) and
/// rings the engine; returns once the engine's reactor has looked at it, with the slot lock still held.
pub fn announce_by_hand(
    ep: &TestEndpoint,
    slot: u32,
    announcement: lapce_ai_transport::segment::Announcement,
) -> lapce_ai_transport::lockfile::HeldLock {
    use lapce_ai_transport::lockfile::{HeldLock, TryLock};
    let TryLock::Acquired(lock) = HeldLock::try_acquire(&ep.endpoint.slot_lock_path(slot)).unwrap()
    else {
        panic!("slot {slot} is taken");
    };
    announce_in_file(ep, slot, lock.file(), announcement);
    lock
}

/// Writes `announcement` into `file` (slot `slot`'s lock file, locked by the caller), sets the slot's bit in the
/// engine page and rings; returns once the reactor has taken the bit.
pub fn announce_in_file(
    ep: &TestEndpoint,
    slot: u32,
    file: &std::fs::File,
    announcement: lapce_ai_transport::segment::Announcement,
) {
    use std::os::unix::fs::FileExt;
    file.write_all_at(&announcement.encode(), 0).unwrap();
    let (_engine_file, page) = map_engine_page(ep);
    page.announce(slot);
    page.bell().ring_always();
    assert!(
        wait_until(5.0, || !page.is_announced(slot)),
        "the engine never looked at slot {slot}"
    );
}

/// A slot segment as a connecting client leaves it: 4 KiB rings and a `Hello` waiting in the client's ring.
pub fn segment_with_hello(generation: u64) -> lapce_ai_transport::segment::SlotSegment {
    use lapce_ai_transport::framing::FrameSender;
    use lapce_ai_transport::protocol::{self, Hello, MessageType};
    let segment = lapce_ai_transport::segment::SlotSegment::create(4096, 4096, generation).unwrap();
    // SAFETY: these are the segment's only client ends; the producer is dropped before the segment.
    let (producer, _consumer) = unsafe { segment.client_ends() }.unwrap();
    let hello = protocol::encode(&Hello {
        protocol_version: protocol::PROTOCOL_VERSION,
        client_to_server_ring_bytes: 4096,
        server_to_client_ring_bytes: 4096,
        generation,
        client_pid: std::process::id(),
        client_name: "by hand".into(),
    })
    .unwrap();
    let mut progress = 0;
    assert!(FrameSender::new(producer)
        .try_send(MessageType::Hello.code(), 0, &hello, &mut progress)
        .unwrap());
    segment
}

/// Maps the engine's shared page the way a client does (read-write), as a peer that may also rewrite it.
pub fn map_engine_page(
    ep: &TestEndpoint,
) -> (std::fs::File, lapce_ai_transport::segment::EnginePage) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ep.endpoint.engine_lock_path())
        .unwrap();
    let page = lapce_ai_transport::segment::EnginePage::open(&file)
        .unwrap()
        .expect("a full page");
    (file, page)
}
