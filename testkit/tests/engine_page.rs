//! The engine page in engine.lock, which every client of the user maps: a peer that rewrites it delays no one
//! else, and its slot bitmap gives O(1) connects without ever being trusted.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapce_ai_transport::{Client, ClientOptions};
use support::{map_engine_page, ping, TestEndpoint};

/// A peer that keeps writing `armed = 0` (and, later, garbage sequence numbers and slot bits) into the shared
/// engine page. The reactor must still wake for a well-behaved client: it sleeps between that client's pings,
/// and the client waits up to a second before it would re-check (so a lost wake-up shows as a slow ping).
#[test]
fn a_peer_that_rewrites_the_engine_page_keeps_no_one_waiting() {
    let ep = TestEndpoint::new("pagescribble");
    let server = support::serve_no_app(&ep);
    let options = ClientOptions {
        liveness_interval: Duration::from_secs(1),
        ..ClientOptions::default()
    };
    let mut good = Client::connect(&ep.endpoint, options.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let scribble_sequence = Arc::new(AtomicBool::new(false));
    let hostile = {
        let (file, page) = map_engine_page(&ep);
        let stop = Arc::clone(&stop);
        let scribble_sequence = Arc::clone(&scribble_sequence);
        std::thread::spawn(move || {
            let _file = file;
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                if scribble_sequence.load(Ordering::Relaxed) {
                    let bits = if n.is_multiple_of(2) { u64::MAX } else { 0 };
                    page.hostile_write(0, Some(n.wrapping_mul(2_654_435_761)), Some(bits));
                } else {
                    page.hostile_write(0, None, None);
                }
                std::hint::spin_loop();
            }
        })
    };
    // The reactor goes to sleep between pings (its spin is 50 us); every ping must still be answered at once.
    let mut slowest = Duration::ZERO;
    for nonce in 0..40 {
        std::thread::sleep(Duration::from_millis(2));
        slowest = slowest.max(ping(&mut good, nonce));
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a ping waited {slowest:?}: the reactor slept through a wake-up"
    );
    // Now garbage sequence numbers and a bitmap flipping between all-taken and all-free as well: connects fall
    // back to a scan, and round trips keep working (a lost wake-up costs at most one liveness interval).
    scribble_sequence.store(true, Ordering::Relaxed);
    let mut late = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    assert_ne!(late.slot(), good.slot());
    for nonce in 100..140 {
        std::thread::sleep(Duration::from_millis(1));
        ping(&mut good, nonce);
        ping(&mut late, nonce);
    }
    stop.store(true, Ordering::Relaxed);
    hostile.join().unwrap();
    assert_eq!(server.connection_count(), 2);
    drop((good, late));
    server.shutdown();
    ep.assert_clean();
}

/// A connecting client takes the slot the engine page's bitmap calls free instead of scanning from slot 0,
/// and a bitmap that lies costs only probes: never a slot someone holds.
#[test]
fn connect_takes_the_hinted_slot_and_survives_a_lying_bitmap() {
    let ep = TestEndpoint::new("slothint");
    let server = support::serve_no_app(&ep);
    let mut first = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    assert_eq!(first.slot(), 0);
    let (_file, page) = map_engine_page(&ep);
    // Mark slots 1..200 taken although they are free: the next client must go straight to 200.
    for slot in 1..200 {
        page.mark_slot(slot, true);
    }
    let mut hinted = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    assert_eq!(hinted.slot(), 200, "the client did not follow the bitmap");
    // A bitmap that says everything is free (slot 0 and 200 are held): probes, repairs, and a free slot.
    page.hostile_write(0, None, Some(0));
    let mut third = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    assert!(![0, 200].contains(&third.slot()), "got {}", third.slot());
    // All taken: no hint at all, the full scan finds a free slot.
    page.hostile_write(0, None, Some(u64::MAX));
    let mut fourth = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    assert!(![0, 200, third.slot()].contains(&fourth.slot()));
    for (i, client) in [&mut first, &mut hinted, &mut third, &mut fourth]
        .into_iter()
        .enumerate()
    {
        ping(client, i as u64);
    }
    // Closing clears the slot's bit: a reconnect gets the same low slot again.
    page.hostile_write(0, None, Some(0));
    let slot = third.slot();
    drop(third);
    let again = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    assert!(again.slot() <= slot);
    drop((first, hinted, fourth, again));
    server.shutdown();
    ep.assert_clean();
}

/// Every connection of a process shares one mapping of engine.lock.
#[test]
fn connections_of_one_process_share_one_engine_mapping() {
    let ep = TestEndpoint::new("onemapping");
    let server = support::serve_no_app(&ep);
    let clients: Vec<Client> = (0..5)
        .map(|_| Client::connect(&ep.endpoint, ClientOptions::default()).unwrap())
        .collect();
    let lock_path = ep.endpoint.engine_lock_path();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mappings = maps
        .lines()
        .filter(|line| line.ends_with(lock_path.to_str().unwrap()))
        .count();
    // The engine (in this process too) maps it once; the five clients share one more.
    assert_eq!(mappings, 2, "{maps}");
    drop(clients);
    server.shutdown();
    ep.assert_clean();
}

/// Connecting clients tell the reactor about their slot through the shared engine page (a hint bit and the
/// page's sleep flag). A peer that keeps wiping both must not keep anyone from connecting: after one liveness
/// interval without an answer, a client announces again and touches its lock file, which the acceptor's inotify
/// watch sees whatever the page says.
#[test]
fn a_peer_that_wipes_announcements_delays_a_connect_by_at_most_a_few_liveness_intervals() {
    let ep = TestEndpoint::new("announcewipe");
    let server = support::serve_no_app(&ep);
    let stop = Arc::new(AtomicBool::new(false));
    let hostile = {
        let (file, page) = map_engine_page(&ep);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let _file = file;
            while !stop.load(Ordering::Relaxed) {
                page.hostile_write_announced(0);
                page.hostile_write(0, None, None);
                std::hint::spin_loop();
            }
        })
    };
    let options = ClientOptions {
        liveness_interval: Duration::from_millis(20),
        connect_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(
            Client::connect(&ep.endpoint, options.clone()).expect("connect despite the wiper"),
        );
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    hostile.join().unwrap();
    assert!(
        took < Duration::from_secs(2),
        "5 connects took {took:?} with the announcements wiped"
    );
    for (nonce, client) in clients.iter_mut().enumerate() {
        ping(client, nonce as u64);
    }
    assert_eq!(server.connection_count(), 5);
    drop(clients);
    server.shutdown();
    ep.assert_clean();
}
