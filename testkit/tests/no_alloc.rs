//! The steady-state round trip (client send + recv, engine reactor ping/pong) makes no heap allocation.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapce_ai_transport::protocol::{ArchivedPong, Ping, Pong};
use lapce_ai_transport::{Client, ClientOptions, Server, ServerOptions};

struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn steady_state_round_trip_does_not_allocate() {
    let ep = support::TestEndpoint::new("noalloc");
    let server = Server::bind(
        &ep.endpoint,
        ServerOptions::default(),
        Arc::new(support::NoApp),
    )
    .unwrap();
    let mut client = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    let t = Duration::from_secs(5);
    let ping = Ping {
        nonce: 0,
        payload: vec![42; 64],
    };
    let round_trip = |client: &mut Client, nonce: u64| {
        client.send(nonce, &ping, t).unwrap();
        let reply = client.recv(t).unwrap();
        let pong: &ArchivedPong = reply.decode::<Pong>().unwrap();
        assert_eq!(pong.payload.len(), 64);
    };
    for i in 0..1000 {
        round_trip(&mut client, i);
    }
    COUNTING.store(true, Ordering::SeqCst);
    for i in 0..10_000 {
        round_trip(&mut client, i);
    }
    COUNTING.store(false, Ordering::SeqCst);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst);
    assert_eq!(
        allocations, 0,
        "{allocations} heap allocations in 10000 round trips"
    );
    // The counter itself works: one deliberate allocation is seen.
    COUNTING.store(true, Ordering::SeqCst);
    let probe = std::hint::black_box(Box::new(1u64));
    COUNTING.store(false, Ordering::SeqCst);
    drop(probe);
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 1);
    client.close();
    server.shutdown();
    ep.assert_clean();
}
