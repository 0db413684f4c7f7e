//! Round trips in one process: handshake, ping/pong content and order, cleanup.

mod support;

use std::time::Duration;

use lapce_ai_transport::protocol::{MessageType, Ping, Pong};
use lapce_ai_transport::{Client, ClientOptions};
use support::TestEndpoint;

const T: Duration = Duration::from_secs(5);

#[test]
fn ping_pong_roundtrips_in_order_with_content_and_cleans_up() {
    let ep = TestEndpoint::new("rt");
    let server = support::serve_no_app(&ep);
    let mut client = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    assert!(
        ep.leftover_shm().is_empty(),
        "names must be unlinked once both sides mapped them"
    );
    for i in 0..10_000u64 {
        let payload: Vec<u8> = (0..64).map(|j| (i as u8).wrapping_add(j)).collect();
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
        assert_eq!(reply.id(), i + 1);
        let pong: Pong = reply.decode_owned().unwrap();
        assert_eq!(pong.nonce, i);
        assert_eq!(pong.payload, payload);
    }
    assert_eq!(server.connection_count(), 1);
    client.close();
    assert!(support::wait_until(2.0, || server.connection_count() == 0));
    server.shutdown();
    ep.assert_clean();
}
