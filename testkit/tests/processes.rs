//! Two real processes: round trips, kill -9 of either side, reconnection, 1000 connections, the singleton.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapce_ai_testkit::{scripted_request, ScriptedHandler, ScriptedPeer};
use lapce_ai_transport::protocol::{MessageType, Ping, Pong, StatusReply, StatusRequest};
use lapce_ai_transport::{
    AsyncClient, Client, ClientOptions, ReconnectingClient, Server, ServerOptions, StreamEvent,
    TransportError,
};
use support::{Peer, TestEndpoint};

const T: Duration = Duration::from_secs(10);
/// Bounds for crash detection. The design target is 100 ms (liveness probe every 20 ms, inotify ~1 ms);
/// tests allow more because CI machines are shared and noisy. `transport-bench` measures the real numbers.
const DETECT: Duration = Duration::from_millis(1000);

#[test]
fn cross_process_roundtrips_are_all_delivered_in_order() {
    let ep = TestEndpoint::new("xproc");
    let server = Peer::server(&ep);
    let mut client = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    for i in 0..20_000u64 {
        let payload = i.to_le_bytes().repeat(8);
        client
            .send(
                i + 1,
                &Ping {
                    nonce: i,
                    payload: payload.clone(),
                },
                T,
            )
            .unwrap();
        let reply = client.recv(T).unwrap();
        assert_eq!(reply.message_type(), Some(MessageType::Pong));
        let pong: Pong = reply.decode_owned().unwrap();
        assert_eq!((reply.id(), pong.nonce, pong.payload), (i + 1, i, payload));
    }
    client.close();
    assert!(server.stop_gracefully().success());
    ep.assert_clean();
}

#[test]
fn a_second_engine_on_the_same_endpoint_is_refused_naming_the_pid() {
    let ep = TestEndpoint::new("single");
    let server = Peer::server(&ep);
    let err = Server::bind(
        &ep.endpoint,
        ServerOptions::default(),
        Arc::new(support::NoApp),
    )
    .err()
    .expect("second engine must fail");
    let text = err.to_string();
    assert!(
        matches!(err, TransportError::AlreadyRunning { .. }),
        "{text}"
    );
    assert!(text.contains(&server.pid().to_string()), "{text}");
    assert!(server.stop_gracefully().success());
    ep.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_streaming_client_frees_its_slot_and_spares_others() {
    let ep = TestEndpoint::new("killclient");
    let peer = ScriptedPeer::new(tokio::runtime::Handle::current());
    let server = Server::bind(
        &ep.endpoint,
        ServerOptions::default(),
        Arc::new(ScriptedHandler(Arc::clone(&peer))),
    )
    .unwrap();
    let survivor = AsyncClient::connect(&ep.endpoint, ClientOptions::default())
        .await
        .unwrap();
    let mut survivor_stream = survivor
        .request(&scripted_request(
            "s",
            400,
            Some(Duration::from_micros(500)),
        ))
        .await
        .unwrap();
    let mut victim = Peer::streaming_client(&ep);
    assert_eq!(server.connection_count(), 2);
    let killed = Instant::now();
    victim.kill9();
    while server.connection_count() != 1 {
        assert!(
            killed.elapsed() < DETECT,
            "client death not noticed within {DETECT:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let noticed = killed.elapsed();
    assert_eq!(peer.client_gone.load(Ordering::Acquire), 1);
    // The dead client's slot file and memory are gone; the survivor's stream completes untouched.
    let mut chunks = 0;
    while let Some(event) = survivor_stream.next().await {
        match event.unwrap() {
            StreamEvent::Chunk { .. } => chunks += 1,
            StreamEvent::End(end) => assert_eq!(end.chunks, 400),
        }
    }
    assert_eq!(chunks, 400);
    let files = ep.leftover_files();
    assert_eq!(
        files.len(),
        2,
        "only engine.lock and the survivor's slot remain: {files:?}"
    );
    println!("client death noticed after {noticed:?}");
    drop(survivor_stream);
    drop(survivor);
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
    ep.assert_clean();
}

/// Many clients killed at once: the kernel queues each IN_CLOSE_WRITE before it drops the flock, so the
/// acceptor's first probe can find a lock still held; it must probe again rather than miss the death.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_death_is_noticed_when_many_clients_are_killed_at_once() {
    let ep = TestEndpoint::new("killmany");
    let peer = ScriptedPeer::new(tokio::runtime::Handle::current());
    let server = Server::bind(
        &ep.endpoint,
        ServerOptions::default(),
        Arc::new(ScriptedHandler(Arc::clone(&peer))),
    )
    .unwrap();
    const VICTIMS: usize = 16;
    let mut victims: Vec<Peer> = (0..VICTIMS).map(|_| Peer::streaming_client(&ep)).collect();
    assert_eq!(server.connection_count(), VICTIMS);
    let killed = Instant::now();
    for victim in &mut victims {
        victim.kill9();
    }
    while server.connection_count() != 0 {
        assert!(
            killed.elapsed() < DETECT,
            "{} of {VICTIMS} client deaths not noticed within {DETECT:?}",
            server.connection_count()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(peer.client_gone.load(Ordering::Acquire), VICTIMS as u64);
    println!("{VICTIMS} deaths noticed after {:?}", killed.elapsed());
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
    ep.assert_clean();
}

/// Clients killed at arbitrary points of connecting (slot claimed, segment created, announced, answered or not):
/// every one's connection closes, its slot file goes, and a well-behaved client keeps doing round trips.
#[test]
fn clients_killed_while_connecting_leave_nothing_behind() {
    let ep = TestEndpoint::new("killconnect");
    let server = support::serve_no_app(&ep);
    let survivor = support::Survivor::start(&ep);
    // A fixed sequence of kill delays from 0 to 3 ms (a connect takes tens of microseconds), so the kills fall
    // at every stage of a handshake across the victims.
    let mut delay = 0x2545_f491_u64;
    for _ in 0..24 {
        let mut victim = Peer::connect_loop(&ep);
        delay = delay
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_micros((delay >> 33) % 3000));
        victim.kill9();
    }
    let killed = Instant::now();
    let settled = support::wait_until(DETECT.as_secs_f64(), || {
        server.connection_count() == 1 && ep.leftover_files().len() == 2
    });
    assert!(
        settled,
        "after {:?}: {} connections (1 expected), files {:?} (engine.lock and the survivor's slot expected)",
        killed.elapsed(),
        server.connection_count(),
        ep.leftover_files()
    );
    let round_trips = survivor.finish();
    println!("{round_trips} round trips while 24 connecting clients were killed");
    server.shutdown();
    ep.assert_clean();
}

/// A dying process's files are closed (the engine's inotify watch sees IN_CLOSE_WRITE) before the kernel drops
/// its flock, so the engine's first look can find the slot still locked. Played here in that order: the
/// announcement's writable descriptor is closed while another descriptor still holds the lock, which is released
/// a little later with no event the engine watches. The engine must look again and close the connection.
#[test]
fn a_death_whose_close_event_precedes_the_lock_release_is_noticed() {
    use std::os::fd::AsRawFd;
    let ep = TestEndpoint::new("closefirst");
    let server = support::serve_no_app(&ep);
    let survivor = support::Survivor::start(&ep);
    let generation = 0xc105_e0f1_u64;
    let segment = support::segment_with_hello(generation);
    let slot = 902;
    let path = ep.endpoint.slot_lock_path(slot);
    let writable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    // The lock is held through a read-only descriptor, whose close the engine does not watch.
    let holder = std::fs::File::open(&path).unwrap();
    // SAFETY: plain flock on an fd this test owns.
    assert_eq!(
        unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    support::announce_in_file(
        &ep,
        slot,
        &writable,
        lapce_ai_transport::segment::Announcement::new(
            generation,
            std::process::id(),
            segment.memfd_number().unwrap(),
        ),
    );
    assert!(support::wait_until(5.0, || server.connection_count() == 2));
    // The close event first, while the lock is still held ...
    drop(writable);
    std::thread::sleep(Duration::from_millis(10));
    // ... then the lock goes, silently.
    drop(holder);
    let released = Instant::now();
    assert!(
        support::wait_until(DETECT.as_secs_f64(), || server.connection_count() == 1),
        "the client's death was missed: {} connections {:?} after its lock was released",
        server.connection_count(),
        released.elapsed()
    );
    println!(
        "death noticed {:?} after the lock was released",
        released.elapsed()
    );
    survivor.finish();
    drop(segment);
    let _ = std::fs::remove_file(&path);
    server.shutdown();
    ep.assert_clean();
}

/// An engine killed and restarted between two liveness checks locks the same engine.lock inode; a client of the
/// dead one must still learn that its engine is gone (incarnation number), not wait on a connection nobody serves.
#[test]
fn a_client_of_a_killed_engine_is_not_fooled_by_its_restart() {
    let ep = TestEndpoint::new("restartfool");
    let mut first = Peer::server(&ep);
    let mut client = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    client
        .send(
            1,
            &Ping {
                nonce: 1,
                payload: vec![],
            },
            T,
        )
        .unwrap();
    let _: Pong = client.recv(T).unwrap().decode_owned().unwrap();
    first.kill9();
    let second = Peer::server(&ep);
    // The old connection's engine is gone even though engine.lock is held again.
    let asked = Instant::now();
    let _ = client.send(
        2,
        &Ping {
            nonce: 2,
            payload: vec![],
        },
        T,
    );
    let Err(err) = client.recv(T) else {
        panic!("the dead engine cannot answer");
    };
    assert!(matches!(err, TransportError::ServerGone(_)), "{err}");
    assert!(
        asked.elapsed() < DETECT,
        "noticed after {:?}",
        asked.elapsed()
    );
    drop(client);
    // A fresh client reaches the new engine.
    let mut fresh = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    fresh
        .send(
            3,
            &Ping {
                nonce: 3,
                payload: vec![],
            },
            T,
        )
        .unwrap();
    let pong: Pong = fresh.recv(T).unwrap().decode_owned().unwrap();
    assert_eq!(pong.nonce, 3);
    drop(fresh);
    assert!(second.stop_gracefully().success());
    ep.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_engine_fails_pending_requests_and_reconnect_follows_a_restart() {
    let ep = TestEndpoint::new("killserver");
    let mut server = Peer::server(&ep);
    let client = ReconnectingClient::new(ep.endpoint.clone(), ClientOptions::default(), None, T);
    let mut stream = client
        .request(&scripted_request(
            "p",
            u32::MAX,
            Some(Duration::from_millis(1)),
        ))
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await.unwrap().unwrap(),
        StreamEvent::Chunk { .. }
    ));
    let killed = Instant::now();
    server.kill9();
    let failure = loop {
        match tokio::time::timeout(DETECT, stream.next())
            .await
            .expect("pending request hung after engine death")
        {
            Some(Ok(StreamEvent::Chunk { .. })) => continue,
            Some(Err(e)) => break e,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    let noticed = killed.elapsed();
    assert!(
        matches!(failure, TransportError::ServerGone(_)),
        "{failure}"
    );
    assert!(noticed < DETECT);
    drop(stream);

    // Restart the engine: the reconnecting client is back without being asked.
    let restarted = Peer::server(&ep);
    let ready = Instant::now();
    let reconnected = loop {
        if let Some(c) = client.current().await {
            break c;
        }
        assert!(
            ready.elapsed() < DETECT,
            "no reconnect within {DETECT:?} of the engine being ready"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let reconnect_after = ready.elapsed();
    let status: StatusReply = reconnected.call(&StatusRequest {}).await.unwrap();
    assert_eq!(status.engine_pid, restarted.pid() as u32);
    println!(
        "engine death noticed after {noticed:?}; reconnected {reconnect_after:?} after restart"
    );
    drop(reconnected);
    drop(client);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(restarted.stop_gracefully().success());
    ep.assert_clean();
}

#[test]
fn a_thousand_concurrent_connections_lose_nothing() {
    raise_fd_limit();
    let ep = TestEndpoint::new("thousand");
    let server = Peer::server(&ep);
    let options = ClientOptions {
        client_to_server_ring_bytes: 16 * 1024,
        server_to_client_ring_bytes: 16 * 1024,
        ..ClientOptions::default()
    };
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let endpoint = ep.endpoint.clone();
            let options = options.clone();
            std::thread::spawn(move || {
                let mut clients: Vec<Client> = (0..250)
                    .map(|_| Client::connect(&endpoint, options.clone()).unwrap())
                    .collect();
                let mut delivered = 0u64;
                for round in 0..20u64 {
                    for (i, client) in clients.iter_mut().enumerate() {
                        let nonce = (t << 40) | (round << 20) | i as u64;
                        client
                            .send(
                                nonce,
                                &Ping {
                                    nonce,
                                    payload: nonce.to_le_bytes().to_vec(),
                                },
                                T,
                            )
                            .unwrap();
                    }
                    for (i, client) in clients.iter_mut().enumerate() {
                        let nonce = (t << 40) | (round << 20) | i as u64;
                        let pong: Pong = client.recv(T).unwrap().decode_owned().unwrap();
                        assert_eq!(pong.nonce, nonce);
                        assert_eq!(pong.payload, nonce.to_le_bytes());
                        delivered += 1;
                    }
                }
                let slots: std::collections::HashSet<u32> =
                    clients.iter().map(Client::slot).collect();
                assert_eq!(slots.len(), 250);
                delivered
            })
        })
        .collect();
    let delivered: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(delivered, 1000 * 20);
    assert!(server.stop_gracefully().success());
    ep.assert_clean();
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}
