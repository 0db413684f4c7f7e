//! The engine side: singleton lock, start-up sweep, accepting slots (inotify) and serving them (reactor thread).

mod acceptor;
mod connection;
mod reactor;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use connection::{DisconnectReason, ServerConnection, StreamSender};

use crate::endpoint::Endpoint;
use crate::error::TransportError;
use crate::framing::ReceivedMessage;
use crate::lockfile::{HeldLock, TryLock};
use crate::protocol::frame::DEFAULT_MAX_MESSAGE_BYTES;
use crate::segment::{self, EnginePage, SlotSegment};

/// How the engine serves connections.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub server_name: String,
    /// Slots at or above this number are refused with a `SlotLimit` error.
    pub max_connections: u32,
    pub max_message_bytes: u32,
    /// Initial per-stream credit granted to each response stream.
    pub stream_window_bytes: u32,
    /// Longest busy-wait of the reactor before it sleeps.
    pub max_spin: Duration,
    /// How long an async send waits for a client that does not read.
    pub send_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            server_name: format!("lapce-ai transport {}", env!("CARGO_PKG_VERSION")),
            max_connections: crate::client::MAX_SLOTS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            stream_window_bytes: 256 * 1024,
            max_spin: Duration::from_micros(50),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// Application callbacks, called on the reactor thread: they must not block (hand work to other threads/tasks).
/// Transport messages (hello, ping, credit, goodbye) are handled before they reach the handler.
pub trait ServerHandler: Send + Sync + 'static {
    fn on_connect(&self, _connection: &Arc<ServerConnection>) {}
    fn on_message(&self, connection: &Arc<ServerConnection>, message: &ReceivedMessage<'_>);
    fn on_disconnect(&self, _connection: &Arc<ServerConnection>, _reason: &DisconnectReason) {}
}

struct Attach {
    slot: u32,
    segment: SlotSegment,
}

/// What the acceptor tells the reactor, in the order it happened: a client that attaches and dies before the
/// reactor looks must be attached and then detached, never the other way round.
enum InboxEvent {
    Attach(Attach),
    /// The holder of `slot` at `generation` is gone.
    Detach {
        slot: u32,
        generation: u64,
    },
}

#[derive(Default)]
struct Inbox {
    events: Vec<InboxEvent>,
}

pub(crate) struct Shared {
    endpoint: Endpoint,
    options: ServerOptions,
    page: EnginePage,
    handler: Arc<dyn ServerHandler>,
    inbox: Mutex<Inbox>,
    inbox_ready: AtomicBool,
    stop: AtomicBool,
    /// Slot -> generation the acceptor attached (or refused); the acceptor's view.
    attached: Mutex<HashMap<u32, u64>>,
    connections: AtomicUsize,
}

impl Shared {
    fn new(
        endpoint: &Endpoint,
        options: ServerOptions,
        page: EnginePage,
        handler: Arc<dyn ServerHandler>,
    ) -> Self {
        Self {
            endpoint: endpoint.clone(),
            options,
            page,
            handler,
            inbox: Mutex::new(Inbox::default()),
            inbox_ready: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            attached: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
        }
    }

    fn post(&self, f: impl FnOnce(&mut Inbox)) {
        let mut inbox = crate::util::lock(&self.inbox);
        f(&mut inbox);
        drop(inbox);
        self.inbox_ready.store(true, Ordering::SeqCst);
        // The shared page's flag is only a hint (any client can clear it; see `wait_forever_armed`): the
        // acceptor always wakes the reactor.
        self.page.bell().ring_always();
    }
}

#[cfg(test)]
impl Shared {
    /// The state a reactor shares, without its threads: for tests that drive reactor steps directly. The
    /// returned lock is the endpoint's engine.lock, which backs the engine page.
    fn for_test(
        endpoint: &Endpoint,
        handler: Arc<dyn ServerHandler>,
    ) -> Result<(Self, HeldLock), TransportError> {
        let (engine_lock, page) = take_endpoint(endpoint)?;
        let shared = Self::new(endpoint, ServerOptions::default(), page, handler);
        Ok((shared, engine_lock))
    }
}

/// A running engine endpoint. Dropping it shuts down: goodbye to every client, lock released, files removed.
pub struct Server {
    shared: Arc<Shared>,
    engine_lock: Option<HeldLock>,
    wake: Arc<OwnedFd>,
    acceptor: Option<JoinHandle<()>>,
    reactor: Option<JoinHandle<()>>,
}

impl Server {
    /// Becomes the engine of `endpoint`: fails at once if another engine holds the lock.
    pub fn bind(
        endpoint: &Endpoint,
        options: ServerOptions,
        handler: Arc<dyn ServerHandler>,
    ) -> Result<Self, TransportError> {
        let (engine_lock, page) = take_endpoint(endpoint)?;
        sweep_stale(endpoint);
        let inotify = acceptor::watch_slots(endpoint)?;
        // SAFETY: eventfd returns a new fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(TransportError::io(
                "creating eventfd",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: raw is a fresh fd we own.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let shared = Arc::new(Shared::new(endpoint, options, page, handler));
        let reactor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("lapce-ai-reactor".into())
                .spawn(move || reactor::run(&shared))
                .map_err(|e| TransportError::io("spawning the reactor thread", e))?
        };
        let acceptor = {
            let shared = Arc::clone(&shared);
            let wake = Arc::clone(&wake);
            std::thread::Builder::new()
                .name("lapce-ai-acceptor".into())
                .spawn(move || acceptor::run(&shared, inotify, &wake))
                .map_err(|e| TransportError::io("spawning the acceptor thread", e))?
        };
        shared.page.publish_incarnation();
        // Publishing the pid is the readiness signal clients wait for.
        segment::write_engine_pid(engine_lock.file())
            .map_err(|e| TransportError::io("writing engine.lock", e))?;
        tracing::info!(endpoint = endpoint.name(), dir = %endpoint.dir().display(), "engine endpoint ready");
        Ok(Self {
            shared,
            engine_lock: Some(engine_lock),
            wake,
            acceptor: Some(acceptor),
            reactor: Some(reactor),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    /// Connections that completed the handshake and are still open.
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Graceful shutdown (also on drop).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.engine_lock.is_none() {
            return;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe {
            libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
        self.shared.page.bell().ring_always();
        for handle in [self.reactor.take(), self.acceptor.take()]
            .into_iter()
            .flatten()
        {
            if handle.join().is_err() {
                tracing::error!("a transport thread panicked during shutdown");
            }
        }
        if let Some(lock) = self.engine_lock.take() {
            lock.remove();
        }
        let _ = std::fs::remove_dir(self.shared.endpoint.slots_dir());
        let _ = std::fs::remove_dir(self.shared.endpoint.dir());
        tracing::info!(
            endpoint = self.shared.endpoint.name(),
            "engine endpoint closed"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Becomes the endpoint's engine: its directories, engine.lock taken and its page mapped and reset, with this
/// engine's identity line written at once, so a client never reads a dead engine's line (perhaps of another
/// release) while this engine holds the lock. Clients still wait for the incarnation, published when ready.
fn take_endpoint(endpoint: &Endpoint) -> Result<(HeldLock, EnginePage), TransportError> {
    endpoint.ensure_dirs()?;
    let engine_lock = acquire_engine_lock(endpoint)?;
    let page = EnginePage::create(engine_lock.file())
        .map_err(|e| TransportError::io("mapping engine.lock", e))?;
    segment::write_engine_pid(engine_lock.file())
        .map_err(|e| TransportError::io("writing engine.lock", e))?;
    Ok((engine_lock, page))
}

/// Takes engine.lock. A client probing liveness holds a shared lock for a few microseconds, so a busy lock is
/// retried briefly before it is reported as a running engine.
fn acquire_engine_lock(endpoint: &Endpoint) -> Result<HeldLock, TransportError> {
    let path = endpoint.engine_lock_path();
    for attempt in 0..20 {
        match HeldLock::try_acquire(&path)
            .map_err(|e| TransportError::io(format!("locking {}", path.display()), e))?
        {
            TryLock::Acquired(lock) => return Ok(lock),
            TryLock::Busy => {
                // Back off 0.5, 1, 1.5 ... ms: only start-up pays this, and only when contended.
                std::thread::sleep(Duration::from_micros(500 * (attempt + 1)));
            }
        }
    }
    let pid = std::fs::File::open(&path)
        .and_then(|f| segment::EngineIdentity::read(&f))
        .ok()
        .and_then(segment::EngineIdentity::pid)
        .map_or_else(|| "unknown".to_owned(), |pid| pid.to_string());
    Err(TransportError::AlreadyRunning {
        endpoint: endpoint.name().to_owned(),
        pid,
    })
}

/// Removes slot lock files nobody holds (left by clients that crashed while no engine ran).
fn sweep_stale(endpoint: &Endpoint) {
    if let Ok(entries) = std::fs::read_dir(endpoint.slots_dir()) {
        for entry in entries.flatten() {
            if let Ok(Some(TryLock::Acquired(lock))) = HeldLock::try_acquire_existing(&entry.path())
            {
                lock.remove();
            }
        }
    }
}
