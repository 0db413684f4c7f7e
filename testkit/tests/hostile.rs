//! A hostile peer writing garbage frames and impossible ring indices: only its own connection suffers.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lapce_ai_testkit::{ScriptedHandler, ScriptedPeer};
use lapce_ai_transport::protocol::frame::FRAME_HEADER_LEN;
use lapce_ai_transport::protocol::{
    self, ErrorCode, ErrorMessage, FrameHeader, MessageType, Ping, Pong,
};
use lapce_ai_transport::{Client, ClientOptions, Server, ServerOptions, TransportError};
use support::{ping, TestEndpoint};

const T: Duration = Duration::from_secs(5);
/// The protocol version a well-formed frame carries.
const V: u8 = protocol::PROTOCOL_VERSION;

fn frame(message_type: u16, version: u8, id: u64, payload: &[u8]) -> Vec<u8> {
    fragment(message_type, version, 0, id, payload)
}

fn fragment(message_type: u16, version: u8, flags: u8, id: u64, payload: &[u8]) -> Vec<u8> {
    let mut header = FrameHeader::new(message_type, flags, payload.len() as u32, id);
    header.version = version;
    let mut head = [0u8; FRAME_HEADER_LEN];
    header.encode_into(payload, &mut head);
    [head.as_slice(), payload].concat()
}

fn expect_error(client: &mut Client, id: u64, code: ErrorCode) {
    let reply = client.recv(T).unwrap();
    assert_eq!(reply.message_type(), Some(MessageType::ErrorMessage));
    assert_eq!(
        reply.id(),
        id,
        "the error frame carries the offending message id"
    );
    let error: ErrorMessage = reply.decode_owned().unwrap();
    assert_eq!(error.code, code, "{}", error.message);
}

fn expect_closed(client: &mut Client) {
    // The engine may say goodbye first; then the connection reports closed.
    for _ in 0..3 {
        match client.recv(T) {
            Ok(m) if m.message_type() == Some(MessageType::Goodbye) => continue,
            Err(TransportError::Closed(_)) => return,
            other => panic!("expected the connection to be closed, got {other:?}"),
        }
    }
    panic!("connection was not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_only_closes_the_offender() {
    let ep = TestEndpoint::new("hostile");
    let peer = ScriptedPeer::new(tokio::runtime::Handle::current());
    let server = Server::bind(
        &ep.endpoint,
        ServerOptions::default(),
        Arc::new(ScriptedHandler(Arc::clone(&peer))),
    )
    .unwrap();
    tokio::task::spawn_blocking(move || {
        let mut good = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();

        // Recoverable: unknown type, unknown version, undecodable payloads -> error frames, connection stays.
        let mut bad = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
        bad.hostile_write_record(&frame(999, V, 41, b"hello"));
        expect_error(&mut bad, 41, ErrorCode::UnknownMessageType);
        bad.hostile_write_record(&frame(MessageType::Ping.code(), 9, 42, b""));
        expect_error(&mut bad, 42, ErrorCode::VersionMismatch);
        bad.hostile_write_record(&frame(MessageType::Ping.code(), V, 43, &[0xff; 13]));
        expect_error(&mut bad, 43, ErrorCode::InvalidPayload);
        bad.hostile_write_record(&frame(
            MessageType::CompletionRequest.code(),
            V,
            44,
            &[0xee; 64],
        ));
        expect_error(&mut bad, 44, ErrorCode::InvalidPayload);
        ping(&mut bad, 45);
        ping(&mut good, 1);

        // Fatal: bad magic.
        let mut garbage = frame(
            MessageType::Ping.code(),
            V,
            50,
            &protocol::encode(&Ping {
                nonce: 1,
                payload: vec![],
            })
            .unwrap(),
        );
        garbage[0] = b'X';
        bad.hostile_write_record(&garbage);
        expect_closed(&mut bad);
        ping(&mut good, 2);

        // Fatal: bad CRC.
        let mut evil = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
        let mut corrupt = frame(
            MessageType::Ping.code(),
            V,
            60,
            &protocol::encode(&Ping {
                nonce: 1,
                payload: vec![1; 8],
            })
            .unwrap(),
        );
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0x40;
        evil.hostile_write_record(&corrupt);
        expect_closed(&mut evil);
        ping(&mut good, 3);

        // Fatal: a record too short for a frame header.
        let mut short = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
        short.hostile_write_record(b"LAPC");
        expect_closed(&mut short);

        // Fatal: impossible ring indices (beyond capacity, then backwards).
        let mut liar = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
        liar.hostile_set_tail(u64::MAX / 2);
        expect_closed(&mut liar);
        let mut rewinder = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
        ping(&mut rewinder, 9);
        rewinder.hostile_set_tail(0);
        ping(&mut good, 4);

        assert!(
            peer.violations.load(Ordering::Acquire) >= 4,
            "every fatal case was a protocol violation"
        );
        for _ in 0..100 {
            ping(&mut good, 5);
        }
        for client in [good, bad, evil, short, liar, rewinder] {
            client.close();
        }
        assert!(support::wait_until(5.0, || server.connection_count() == 0));
        server.shutdown();
        ep.assert_clean();
    })
    .await
    .unwrap();
}

/// An engine handler that panics on one message type (a bug reachable by one client's input).
struct PanicsOnCancel;

impl lapce_ai_transport::server::ServerHandler for PanicsOnCancel {
    fn on_message(
        &self,
        _connection: &Arc<lapce_ai_transport::server::ServerConnection>,
        message: &lapce_ai_transport::ReceivedMessage<'_>,
    ) {
        if message.message_type() == Some(MessageType::Cancel) {
            panic!("handler bug triggered by a cancel");
        }
    }
}

#[test]
fn a_panicking_handler_closes_only_the_connection_it_served() {
    let ep = TestEndpoint::new("handlerpanic");
    let server = Server::bind(
        &ep.endpoint,
        ServerOptions::default(),
        Arc::new(PanicsOnCancel),
    )
    .unwrap();
    let mut good = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    let mut victim = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    ping(&mut good, 1);
    ping(&mut victim, 2);
    victim
        .send(3, &protocol::Cancel { request_id: 3 }, T)
        .unwrap();
    let goodbye = victim.recv(T).unwrap();
    assert_eq!(goodbye.message_type(), Some(MessageType::Goodbye));
    let goodbye: protocol::Goodbye = goodbye.decode_owned().unwrap();
    assert!(
        goodbye.reason.contains("handler bug triggered by a cancel"),
        "{}",
        goodbye.reason
    );
    expect_closed(&mut victim);
    // The reactor survived: the other connection and new ones keep working.
    for nonce in 10..20 {
        ping(&mut good, nonce);
    }
    let mut later = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    ping(&mut later, 30);
    assert_eq!(server.connection_count(), 2);
    drop((good, victim, later));
    server.shutdown();
    ep.assert_clean();
}

/// Fragmented messages a peer starts and never finishes are bounded (count and bytes); an abandoned one whose
/// id is reused does not poison the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_fragments_are_bounded_and_an_abandoned_one_does_not_poison_its_id() {
    use lapce_ai_transport::framing::MAX_PARTIAL_MESSAGES;
    use lapce_ai_transport::protocol::frame::{FLAG_CONTINUATION, FLAG_MORE_FRAGMENTS};
    const MAX_MESSAGE: u32 = 32 * 1024;
    let ep = TestEndpoint::new("partials");
    let peer = ScriptedPeer::new(tokio::runtime::Handle::current());
    let server = Server::bind(
        &ep.endpoint,
        ServerOptions {
            max_message_bytes: MAX_MESSAGE,
            ..ServerOptions::default()
        },
        Arc::new(ScriptedHandler(Arc::clone(&peer))),
    )
    .unwrap();
    tokio::task::spawn_blocking(move || {
        let mut good = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
        let ping_payload = protocol::encode(&Ping {
            nonce: 77,
            payload: vec![1; 8],
        })
        .unwrap();
        let ping_type = MessageType::Ping.code();

        // Abandoned: the first half of message 5 never gets its continuation; id 5 is then reused whole.
        let mut reuser = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
        reuser.hostile_write_record(&fragment(
            ping_type,
            V,
            FLAG_MORE_FRAGMENTS,
            5,
            &ping_payload[..8],
        ));
        reuser.hostile_write_record(&frame(ping_type, V, 5, &ping_payload));
        let pong: Pong = reuser.recv(T).unwrap().decode_owned().unwrap();
        assert_eq!(pong.nonce, 77);
        // ... and a fragmented message still reassembles after that.
        reuser.hostile_write_record(&fragment(
            ping_type,
            V,
            FLAG_MORE_FRAGMENTS,
            6,
            &ping_payload[..8],
        ));
        reuser.hostile_write_record(&fragment(
            ping_type,
            V,
            FLAG_CONTINUATION,
            6,
            &ping_payload[8..],
        ));
        let pong: Pong = reuser.recv(T).unwrap().decode_owned().unwrap();
        assert_eq!(pong.nonce, 77);
        ping(&mut good, 1);

        // Too many outstanding: the connection is closed, the good one stays.
        let mut hoarder = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
        for id in 0..=MAX_PARTIAL_MESSAGES as u64 {
            hoarder.hostile_write_record(&fragment(
                ping_type,
                V,
                FLAG_MORE_FRAGMENTS,
                100 + id,
                &[0; 64],
            ));
        }
        expect_closed(&mut hoarder);
        ping(&mut good, 2);

        // Too many bytes held across unfinished messages (each one under the limit): closed as well.
        // Rings large enough for each unfinished piece to go in one record.
        let wide = ClientOptions {
            client_to_server_ring_bytes: 64 * 1024,
            ..ClientOptions::default()
        };
        let mut grower = Client::connect(&ep.endpoint, wide).unwrap();
        let chunk = vec![0u8; (MAX_MESSAGE / 3 + 1024) as usize];
        for id in 0..3 {
            grower.hostile_write_record(&fragment(
                ping_type,
                V,
                FLAG_MORE_FRAGMENTS,
                300 + id,
                &chunk,
            ));
        }
        expect_closed(&mut grower);
        ping(&mut good, 3);
        drop((good, reuser, hoarder, grower));
    })
    .await
    .unwrap();
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
}
