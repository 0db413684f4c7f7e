//! Streams through the async client: 64 MiB through a 64 KiB ring, interleaving, credit isolation, cancel,
//! fragmented large messages and the size limit.

mod support;

use std::sync::Arc;
use std::time::Duration;

use lapce_ai_testkit::{scripted_request, ScriptedHandler, ScriptedPeer};
use lapce_ai_transport::protocol::{FinishReason, StatusReply, StatusRequest};
use lapce_ai_transport::{
    AsyncClient, ClientOptions, ResponseStream, Server, ServerOptions, StreamEvent, TransportError,
};
use support::TestEndpoint;

fn start(ep: &TestEndpoint) -> (Server, Arc<ScriptedPeer>) {
    let peer = ScriptedPeer::new(tokio::runtime::Handle::current());
    let server = Server::bind(
        &ep.endpoint,
        ServerOptions::default(),
        Arc::new(ScriptedHandler(Arc::clone(&peer))),
    )
    .unwrap();
    (server, peer)
}

async fn connect(ep: &TestEndpoint) -> AsyncClient {
    // 64 KiB rings: the tests' names and fragment sizes (16 KiB) assume them.
    let options = ClientOptions {
        client_to_server_ring_bytes: 64 * 1024,
        server_to_client_ring_bytes: 64 * 1024,
        ..ClientOptions::default()
    };
    AsyncClient::connect(&ep.endpoint, options).await.unwrap()
}

/// Reads a stream to its end, checking every chunk equals `expect`; returns (chunks, finish reason).
async fn drain(stream: &mut ResponseStream, expect: &str) -> (u32, FinishReason) {
    let mut chunks = 0;
    loop {
        match stream
            .next()
            .await
            .expect("stream ended without a terminal event")
            .unwrap()
        {
            StreamEvent::Chunk { sequence, text } => {
                assert_eq!(sequence, chunks);
                assert_eq!(text, expect, "chunk {sequence} content");
                chunks += 1;
            }
            StreamEvent::End(end) => {
                assert_eq!(end.chunks, chunks);
                assert!(
                    stream.next().await.is_none(),
                    "nothing after the terminal event"
                );
                return (chunks, end.finish_reason);
            }
        }
    }
}

async fn shutdown(server: Server, client: AsyncClient, ep: &TestEndpoint) {
    drop(client);
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
    ep.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_stream_through_a_64_kib_ring() {
    let ep = TestEndpoint::new("big");
    let (server, _peer) = start(&ep);
    let client = connect(&ep).await;
    // 64 KiB chunks are larger than a fragment (16 KiB), so every chunk is fragmented and reassembled.
    let chunk: String = (0..64 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut stream = client
        .request(&scripted_request(&chunk, 1024, None))
        .await
        .unwrap();
    let (chunks, reason) = drain(&mut stream, &chunk).await;
    assert_eq!(chunks, 1024);
    assert_eq!(reason, FinishReason::Stop);
    drop(stream);
    shutdown(server, client, &ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_interleave_and_each_arrives_intact() {
    let ep = TestEndpoint::new("interleave");
    let (server, _peer) = start(&ep);
    let client = connect(&ep).await;
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let text = format!("stream-{i}-").repeat(1 + i as usize * 50);
            let mut stream = client
                .request(&scripted_request(&text, 300, None))
                .await
                .unwrap();
            drain(&mut stream, &text).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), (300, FinishReason::Stop));
    }
    shutdown(server, client, &ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_stream_does_not_starve_another() {
    let ep = TestEndpoint::new("credit");
    let (server, _peer) = start(&ep);
    let client = connect(&ep).await;
    // Stream A is never read: it may only run ahead by its credit window (256 KiB).
    let hog_text = "h".repeat(8 * 1024);
    let hog = client
        .request(&scripted_request(&hog_text, 100_000, None))
        .await
        .unwrap();
    let text = "b".repeat(4 * 1024);
    let mut other = client
        .request(&scripted_request(&text, 2000, None))
        .await
        .unwrap();
    let drained = tokio::time::timeout(Duration::from_secs(60), drain(&mut other, &text)).await;
    assert_eq!(
        drained.expect("stream B starved behind stream A"),
        (2000, FinishReason::Stop)
    );
    drop(hog); // cancels A
    drop(other);
    shutdown(server, client, &ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_stream_ends_with_cancelled() {
    let ep = TestEndpoint::new("cancel");
    let (server, _peer) = start(&ep);
    let client = connect(&ep).await;
    let mut stream = client
        .request(&scripted_request(
            "tick",
            1_000_000,
            Some(Duration::from_micros(200)),
        ))
        .await
        .unwrap();
    for expected in 0..5 {
        match stream.next().await.unwrap().unwrap() {
            StreamEvent::Chunk { sequence, .. } => assert_eq!(sequence, expected),
            other => panic!("unexpected {other:?}"),
        }
    }
    stream.cancel().await.unwrap();
    let mut terminal = None;
    while let Some(event) = stream.next().await {
        if let StreamEvent::End(end) = event.unwrap() {
            terminal = Some(end);
        }
    }
    let end = terminal.expect("a cancelled stream still ends with a terminal frame");
    assert_eq!(end.finish_reason, FinishReason::Cancelled);
    assert!(end.chunks < 1_000_000);
    // The connection is still fine afterwards.
    let status: StatusReply = client.call(&StatusRequest {}).await.unwrap();
    assert_eq!(status.connections, 1);
    drop(stream);
    shutdown(server, client, &ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_fragmented_both_ways_and_oversize_is_refused() {
    let ep = TestEndpoint::new("large");
    let (server, _peer) = start(&ep);
    let client = connect(&ep).await;
    let text: String = (0..4 * 1024 * 1024)
        .map(|i| char::from(b'0' + (i % 10) as u8))
        .collect();
    // Both directions wait for ring space many times; each wait must end when the peer releases space (a
    // missed wake-up stalls until an idle liveness tick, 30 s; a saturated machine alone takes up to ~15 s).
    let started = std::time::Instant::now();
    let mut stream = client
        .request(&scripted_request(&text, 2, None))
        .await
        .unwrap();
    assert_eq!(drain(&mut stream, &text).await, (2, FinishReason::Stop));
    drop(stream);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "4 MiB each way took {:?}",
        started.elapsed()
    );
    let too_big = "x".repeat(17 * 1024 * 1024);
    let err = client
        .request(&scripted_request(&too_big, 1, None))
        .await
        .err()
        .expect("over the 16 MiB limit");
    assert!(
        matches!(err, TransportError::MessageTooLarge { .. }),
        "{err}"
    );
    assert!(client.is_alive());
    shutdown(server, client, &ep).await;
}
