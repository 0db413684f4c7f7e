//! An engine of another lapce-ai release on the endpoint (an upgrade left the old daemon running): a client says
//! so at once instead of timing out, and a client that may start engines replaces an older one (never a newer
//! one: two releases would otherwise replace each other's engines forever).

mod support;

use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapce_ai_transport::protocol::{StatusReply, StatusRequest};
use lapce_ai_transport::segment::RENDEZVOUS_VERSION;
use lapce_ai_transport::{
    Client, ClientOptions, Endpoint, EngineStarter, ReconnectingClient, TransportError,
};
use support::{Peer, TestEndpoint};

#[test]
fn a_client_meeting_an_engine_of_another_release_says_so_at_once() {
    for version in [
        None,
        Some(RENDEZVOUS_VERSION - 1),
        Some(RENDEZVOUS_VERSION + 1),
    ] {
        let ep = TestEndpoint::new("oldengine");
        let mut old = Peer::old_engine(&ep, version);
        let asked = Instant::now();
        let err = Client::connect(&ep.endpoint, ClientOptions::default())
            .err()
            .expect("an engine of another release cannot be connected to");
        let waited = asked.elapsed();
        match &err {
            TransportError::IncompatibleEngine {
                pid,
                version: found,
                ..
            } => {
                assert_eq!(*pid, old.pid() as u32);
                assert_eq!(*found, version);
            }
            other => panic!("expected IncompatibleEngine, got {other}"),
        }
        let text = err.to_string();
        let which = if version > Some(RENDEZVOUS_VERSION) {
            "newer lapce-ai release"
        } else {
            "older lapce-ai release"
        };
        assert!(
            text.contains(which) && text.contains("ai-engine stop"),
            "{text}"
        );
        assert!(
            waited < Duration::from_secs(1),
            "took {waited:?}: the client waited instead of refusing"
        );
        old.kill9();
        let _ = std::fs::remove_file(ep.endpoint.engine_lock_path());
        ep.assert_clean();
    }
}

/// A dead engine's identity line of another release, read while a new engine holds the lock but has not
/// written its own yet, is not mistaken for a running old engine.
#[test]
fn a_stale_identity_line_is_not_taken_for_a_running_engine() {
    use lapce_ai_transport::lockfile::{HeldLock, TryLock};
    let ep = TestEndpoint::new("staleline");
    ep.endpoint.ensure_dirs().unwrap();
    let TryLock::Acquired(lock) = HeldLock::try_acquire(&ep.endpoint.engine_lock_path()).unwrap()
    else {
        panic!("engine.lock is free");
    };
    lock.file().set_len(4096).unwrap();
    // Pid 1 never holds this lock: the line is a leftover.
    lapce_ai_transport::segment::write_identity_line(lock.file(), "1 rendezvous=2").unwrap();
    let err = Client::connect(&ep.endpoint, ClientOptions::default())
        .err()
        .expect("nobody serves yet");
    assert!(matches!(err, TransportError::NoServer(_)), "{err}");
    lock.remove();
    ep.assert_clean();
}

/// The bridge's client may start engines: it stops the old one (SIGTERM; it cannot read a Shutdown message),
/// starts the current one and is served by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_starts_engines_replaces_one_of_another_release() {
    let ep = TestEndpoint::new("replace");
    let mut old = Peer::old_engine(&ep, None);
    let started: Arc<Mutex<Option<Peer>>> = Arc::new(Mutex::new(None));
    let starter: EngineStarter = {
        let started = Arc::clone(&started);
        let ep_root = ep.root.path().to_owned();
        let name = ep.endpoint.name().to_owned();
        Arc::new(move |endpoint: &Endpoint| {
            assert_eq!(endpoint.name(), name);
            assert_eq!(endpoint.root(), ep_root);
            let server = Peer::server_in(endpoint);
            *started.lock().unwrap() = Some(server);
            Ok(())
        })
    };
    let client = ReconnectingClient::new(
        ep.endpoint.clone(),
        ClientOptions::default(),
        Some(starter),
        Duration::from_secs(10),
    );
    let connection = client.client().await.unwrap();
    let status: StatusReply = connection.call(&StatusRequest {}).await.unwrap();
    let new_pid = started.lock().unwrap().as_ref().map(Peer::pid).unwrap();
    assert_eq!(
        status.engine_pid, new_pid as u32,
        "served by the new engine"
    );
    let exit = old.child.wait().unwrap();
    assert_eq!(
        exit.signal(),
        Some(libc::SIGTERM),
        "the old engine was stopped with SIGTERM: {exit:?}"
    );
    drop(connection);
    drop(client);
    let server = started.lock().unwrap().take().unwrap();
    tokio::task::spawn_blocking(move || assert!(server.stop_gracefully().success()))
        .await
        .unwrap();
    ep.assert_clean();
}

/// An older client that may start engines leaves a newer engine alone and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_starts_engines_leaves_a_newer_one_running() {
    let ep = TestEndpoint::new("newer");
    let mut newer = Peer::old_engine(&ep, Some(RENDEZVOUS_VERSION + 1));
    let starter: EngineStarter =
        Arc::new(|_: &Endpoint| panic!("no engine may be started while a newer one runs"));
    let client = ReconnectingClient::new(
        ep.endpoint.clone(),
        ClientOptions::default(),
        Some(starter),
        Duration::from_secs(2),
    );
    let err = client
        .client()
        .await
        .err()
        .expect("a newer engine cannot serve this client");
    assert!(
        matches!(err, TransportError::IncompatibleEngine { version: Some(v), .. } if v == RENDEZVOUS_VERSION + 1),
        "{err}"
    );
    assert!(err.to_string().contains("update this plugin"), "{err}");
    assert!(
        newer.child.try_wait().unwrap().is_none(),
        "the newer engine must keep running"
    );
    drop(client);
    newer.kill9();
    let _ = std::fs::remove_file(ep.endpoint.engine_lock_path());
    ep.assert_clean();
}

/// An old engine that ignores SIGTERM is killed once the grace period has passed; the lock is then free.
#[test]
fn an_old_engine_that_ignores_sigterm_is_killed_after_the_grace_period() {
    use lapce_ai_transport::reconnect::stop_incompatible_engine;
    let ep = TestEndpoint::new("stuckold");
    let mut old = Peer::old_engine_with(&ep, None, &["--ignore-sigterm"]);
    let pid = old.pid() as u32;
    let asked = Instant::now();
    stop_incompatible_engine(&ep.endpoint, pid).unwrap();
    let exit = old.child.wait().unwrap();
    assert_eq!(exit.signal(), Some(libc::SIGKILL), "{exit:?}");
    assert!(
        asked.elapsed() >= Duration::from_secs(5),
        "SIGKILL came before the grace period: {:?}",
        asked.elapsed()
    );
    assert!(
        !lapce_ai_transport::lockfile::path_is_locked(&ep.endpoint.engine_lock_path()).unwrap()
    );
    // A pid that does not hold the lock is never signalled.
    stop_incompatible_engine(&ep.endpoint, std::process::id()).unwrap();
    let _ = std::fs::remove_file(ep.endpoint.engine_lock_path());
    ep.assert_clean();
}
