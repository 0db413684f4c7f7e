//! Staying connected: wait for an engine to become ready, start one if allowed, reconnect after it restarts.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::{Inotify, WatchMask};

use crate::async_client::{AsyncClient, ResponseStream};
use crate::client::{ClientOptions, EngineLink};
use crate::endpoint::Endpoint;
use crate::error::TransportError;
use crate::protocol::Message;

/// Blocks until an engine of this release serves `endpoint` (its lock is held and its page published) or
/// `timeout` passes; then the error says whether none ran or one of another release did. Event-driven: inotify
/// on the rendezvous directory wakes it when the engine writes its pid.
pub fn wait_for_engine(endpoint: &Endpoint, timeout: Duration) -> Result<(), TransportError> {
    endpoint.ensure_dirs()?;
    let inotify = Inotify::init().map_err(|e| TransportError::io("initialising inotify", e))?;
    inotify
        .watches()
        .add(
            endpoint.dir(),
            WatchMask::CREATE | WatchMask::MODIFY | WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO,
        )
        .map_err(|e| TransportError::io(format!("watching {}", endpoint.dir().display()), e))?;
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 4096];
    let mut inotify = inotify;
    loop {
        let last = match EngineLink::open(endpoint) {
            Ok(_) => return Ok(()),
            Err(e @ TransportError::IncompatibleEngine { .. }) => e,
            Err(_) => TransportError::NoServer(endpoint.name().to_owned()),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(last);
        }
        // Events wake us at once; the bounded sleep only guards against a missed event.
        let wait = (deadline - now).min(Duration::from_millis(250));
        let mut fd = libc::pollfd {
            fd: inotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, wait.as_millis() as libc::c_int) };
        let _ = inotify.read_events(&mut buffer);
    }
}

/// How long an engine of another release gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Stops the engine of another release that holds `endpoint` (see [`TransportError::IncompatibleEngine`]): it
/// cannot understand a `Shutdown` message, so it gets SIGTERM (SIGKILL if it still holds the lock after
/// [`STOP_GRACE`]), and only once `/proc/locks` confirms that `pid` holds the endpoint's engine.lock. Returns when
/// the lock is free.
pub fn stop_incompatible_engine(endpoint: &Endpoint, pid: u32) -> Result<(), TransportError> {
    let path = endpoint.engine_lock_path();
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TransportError::io(format!("opening {}", path.display()), e)),
    };
    for (signal, wait) in [
        (libc::SIGTERM, STOP_GRACE),
        (libc::SIGKILL, Duration::from_secs(2)),
    ] {
        // Before each signal: `pid` must still hold the lock (else it stopped, and its pid may be reused).
        let holder = crate::lockfile::exclusive_holder(&file)
            .map_err(|e| TransportError::io("reading /proc/locks", e))?;
        if holder != Some(pid) {
            return Ok(());
        }
        tracing::warn!(
            endpoint = endpoint.name(),
            pid,
            signal,
            "stopping an engine of another lapce-ai release"
        );
        // SAFETY: plain kill(2) on a pid that holds this user's engine lock right now.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(TransportError::io(
                    format!("stopping the engine of another release (pid {pid})"),
                    err,
                ));
            }
        }
        if crate::lockfile::wait_until_released(&path, wait) {
            return Ok(());
        }
    }
    Err(TransportError::Timeout(
        "waiting for the engine of another release to stop",
    ))
}

/// Starts an engine for an endpoint (e.g. spawns `ai-engine serve --detach`). Called at most once per attempt.
pub type EngineStarter = Arc<dyn Fn(&Endpoint) -> std::io::Result<()> + Send + Sync>;

/// A client that reconnects by itself: after the engine dies it waits for the next one and reconnects as soon
/// as it is ready (in the background), and on demand it can start an engine.
pub struct ReconnectingClient {
    endpoint: Endpoint,
    options: ClientOptions,
    starter: Option<EngineStarter>,
    /// How long one request waits for an engine to appear.
    ready_timeout: Duration,
    current: Arc<tokio::sync::Mutex<Option<AsyncClient>>>,
    connected: Arc<tokio::sync::Notify>,
    watcher: tokio::task::JoinHandle<()>,
}

impl ReconnectingClient {
    /// Must be created inside a tokio runtime.
    pub fn new(
        endpoint: Endpoint,
        options: ClientOptions,
        starter: Option<EngineStarter>,
        ready_timeout: Duration,
    ) -> Self {
        let current: Arc<tokio::sync::Mutex<Option<AsyncClient>>> =
            Arc::new(tokio::sync::Mutex::new(None));
        let connected = Arc::new(tokio::sync::Notify::new());
        let watcher = tokio::spawn(watch_and_reconnect(
            endpoint.clone(),
            options.clone(),
            Arc::clone(&current),
            Arc::clone(&connected),
        ));
        Self {
            endpoint,
            options,
            starter,
            ready_timeout,
            current,
            connected,
            watcher,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The live connection, connecting (and starting the engine if allowed) when there is none.
    pub async fn client(&self) -> Result<AsyncClient, TransportError> {
        let mut current = self.current.lock().await;
        if let Some(client) = current.as_ref().filter(|c| c.check_alive()) {
            return Ok(client.clone());
        }
        *current = None;
        let client = self.connect_fresh().await?;
        *current = Some(client.clone());
        self.connected.notify_one();
        Ok(client)
    }

    /// The connection if one is up right now (no connecting).
    pub async fn current(&self) -> Option<AsyncClient> {
        self.current
            .lock()
            .await
            .as_ref()
            .filter(|c| c.is_alive())
            .cloned()
    }

    async fn connect_fresh(&self) -> Result<AsyncClient, TransportError> {
        let deadline = Instant::now() + self.ready_timeout;
        let mut started = false;
        let mut replaced = false;
        loop {
            match AsyncClient::connect(&self.endpoint, self.options.clone()).await {
                Ok(client) => return Ok(client),
                Err(
                    TransportError::NoServer(_)
                    | TransportError::ServerGone(_)
                    | TransportError::Closed(_),
                ) if Instant::now() < deadline => {
                    if !started {
                        if let Some(starter) = &self.starter {
                            started = true;
                            let starter = Arc::clone(starter);
                            let endpoint = self.endpoint.clone();
                            tokio::task::spawn_blocking(move || starter(&endpoint))
                                .await
                                .map_err(|e| TransportError::Closed(e.to_string()))?
                                .map_err(|e| TransportError::io("starting the engine", e))?;
                        }
                    }
                    let endpoint = self.endpoint.clone();
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    tokio::task::spawn_blocking(move || wait_for_engine(&endpoint, remaining))
                        .await
                        .map_err(|e| TransportError::Closed(e.to_string()))??;
                }
                Err(TransportError::IncompatibleEngine { pid, version, .. })
                    if self.starter.is_some()
                        && !replaced
                        && version.is_none_or(|v| v < crate::segment::RENDEZVOUS_VERSION) =>
                {
                    // This client may start engines: replace an older one (an upgrade left it running). A newer
                    // one stays: two releases replacing each other's engines would never settle.
                    replaced = true;
                    let endpoint = self.endpoint.clone();
                    tokio::task::spawn_blocking(move || stop_incompatible_engine(&endpoint, pid))
                        .await
                        .map_err(|e| TransportError::Closed(e.to_string()))??;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a request on the live connection (connecting first if needed). If the engine turns out to be gone
    /// before the request could be sent, it is sent once more on a fresh connection.
    pub async fn request<M: Message>(&self, message: &M) -> Result<ResponseStream, TransportError> {
        match self.client().await?.request(message).await {
            Err(TransportError::ServerGone(_) | TransportError::Closed(_)) => {
                self.client().await?.request(message).await
            }
            other => other,
        }
    }
}

impl Drop for ReconnectingClient {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// How long one blocking wait of the background reconnect lasts before it yields back to the runtime.
const WATCH_SLICE: Duration = Duration::from_secs(1);

/// Background task: whenever the current connection fails, wait for the next engine and reconnect at once.
async fn watch_and_reconnect(
    endpoint: Endpoint,
    options: ClientOptions,
    current: Arc<tokio::sync::Mutex<Option<AsyncClient>>>,
    connected: Arc<tokio::sync::Notify>,
) {
    loop {
        let client = current.lock().await.clone().filter(AsyncClient::is_alive);
        let Some(client) = client else {
            // Nothing to watch until a connection exists.
            connected.notified().await;
            continue;
        };
        client.failed().await;
        drop(client);
        // Wait for the next engine in short blocking slices: a runtime shutting down never waits long for us.
        loop {
            let waiting_for = endpoint.clone();
            let ready =
                tokio::task::spawn_blocking(move || wait_for_engine(&waiting_for, WATCH_SLICE))
                    .await;
            if matches!(ready, Ok(Ok(()))) {
                break;
            }
        }
        let mut slot = current.lock().await;
        if slot.as_ref().is_some_and(AsyncClient::is_alive) {
            continue;
        }
        match AsyncClient::connect(&endpoint, options.clone()).await {
            Ok(fresh) => {
                tracing::info!(endpoint = endpoint.name(), "reconnected to the engine");
                *slot = Some(fresh);
            }
            Err(e) => {
                tracing::debug!(error = %e, "reconnect attempt failed");
                *slot = None;
            }
        }
    }
}
