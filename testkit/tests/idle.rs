//! Idle clients cost nothing: an async client with nothing outstanding does not wake up to poll the engine.

mod support;

use std::time::Duration;

use lapce_ai_transport::{AsyncClient, ClientOptions};
use support::TestEndpoint;

/// Voluntary context switches of this process's client pump threads (each wake-up from a futex sleep is one).
fn pump_wakeups() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("lapce-ai-client") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_async_clients_do_not_poll_the_engine() {
    let ep = TestEndpoint::new("idleclients");
    let server = support::serve_no_app(&ep);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            AsyncClient::connect(&ep.endpoint, ClientOptions::default())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = pump_wakeups();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let wakeups = pump_wakeups() - before;
    // Polling every 20 ms would be ~200 wake-ups here; idle pumps sleep for seconds.
    assert!(wakeups <= 8, "{wakeups} pump wake-ups in 1 s of idleness");
    assert!(clients.iter().all(AsyncClient::check_alive));
    drop(clients);
    server.shutdown();
    ep.assert_clean();
}
