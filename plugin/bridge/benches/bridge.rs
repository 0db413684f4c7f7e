//! Bridge benchmark: LSP request to LSP response through bridge + transport + engine (instant provider), next
//! to the engine alone over the transport; and engine requests per typed burst with and without debounce.
//!
//! Run: `cargo bench -p lapce-ai-lsp --bench bridge` (add `-- --json` for one JSON object).

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_engine::engine::Engine;
use lapce_ai_engine_testkit::{instant_engine_parts, serve_engine};
use lapce_ai_transport::protocol::{CompletionMode, CompletionRequest};
use lapce_ai_transport::{AsyncClient, ClientOptions, Endpoint, StreamEvent};
use serde_json::json;
use support::{items, Client};

const T: Duration = Duration::from_secs(10);

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The engine alone: completion requests over the transport from an in-process client.
async fn engine_alone(endpoint: &Endpoint, iterations: usize) -> Vec<Duration> {
    let client = AsyncClient::connect(endpoint, ClientOptions::default())
        .await
        .expect("connect");
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let request = CompletionRequest {
            language_id: "rust".into(),
            prefix: format!("fn main() {{\n    let total = {i};\n    let doubled = "),
            suffix: "\n}\n".into(),
            mode: CompletionMode::Auto,
            ..CompletionRequest::default()
        };
        let started = Instant::now();
        let mut stream = client.request(&request).await.expect("request");
        while let Some(event) = stream.next().await {
            if let StreamEvent::End(_) = event.expect("stream") {
                break;
            }
        }
        samples.push(started.elapsed());
    }
    samples
}

/// Starts a bridge connected to `endpoint` with the given debounce base.
fn bridge(root: &std::path::Path, endpoint: &Endpoint, debounce_ms: u64) -> (Client, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut client = Client::spawn_in(
        dir,
        &[("LAPCE_AI_RUNTIME_DIR", root.as_os_str().to_owned())],
    );
    client.initialize(Some(
        json!({ "endpoint": endpoint.name(), "debounce-ms": debounce_ms }),
    ));
    let uri = client.uri("main.rs");
    client.open(
        &uri,
        "rust",
        "fn main() {\n    let total = 21;\n    let doubled = \n}\n",
    );
    (client, uri)
}

fn main() {
    let json_output = std::env::args().any(|a| a == "--json");
    let quick = std::env::args().any(|a| a == "--quick");
    let iterations = if quick { 200 } else { 2000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let endpoint = Endpoint::in_root("bridge-bench", root.path()).expect("endpoint");
    let (config, factory) = instant_engine_parts("total * 2;");
    let engine = Engine::new(config, factory, endpoint.name());
    let server =
        serve_engine(&endpoint, Arc::clone(&engine), runtime.handle().clone()).expect("bind");

    let mut alone = runtime.block_on(engine_alone(&endpoint, iterations));

    // Through the bridge: each iteration types one character (so the context changes and the engine's cache
    // cannot answer) and asks for a completion, exactly as Lapce does after a keystroke.
    let (mut lsp, uri) = bridge(root.path(), &endpoint, 0);
    let mut through = Vec::with_capacity(iterations);
    let line = 2u32;
    let mut column = "    let doubled = ".len() as u32;
    for i in 0..iterations {
        let ch = char::from(b'a' + (i % 26) as u8);
        lsp.change(
            &uri,
            i as i32 + 1,
            (line, column),
            (line, column),
            &ch.to_string(),
        );
        column += 1;
        let started = Instant::now();
        let id = lsp.inline(&uri, (line, column), 1);
        let response = lsp.response(id, T);
        through.push(started.elapsed());
        assert!(response.get("result").is_some(), "{response}");
        if i == 0 {
            assert!(!items(&response).is_empty() || column > 0, "{response}");
        }
    }
    drop(lsp);

    // Engine requests per typed burst: 30 keystrokes 40 ms apart, an inline request after each.
    let burst = |debounce_ms: u64| {
        let (mut lsp, uri) = bridge(root.path(), &endpoint, debounce_ms);
        let before = engine.metrics.requests.load(Ordering::Relaxed);
        let mut column = "    let doubled = ".len() as u32;
        let mut last = 0;
        for i in 0..30 {
            lsp.change(&uri, i + 1, (line, column), (line, column), "x");
            column += 1;
            last = lsp.inline(&uri, (line, column), 2);
            std::thread::sleep(Duration::from_millis(40));
        }
        let _ = lsp.response(last, T);
        std::thread::sleep(Duration::from_millis(200));
        engine.metrics.requests.load(Ordering::Relaxed) - before
    };
    let without_debounce = burst(0);
    let with_debounce = burst(150);
    server.shutdown();

    let (a50, a99) = (percentile(&mut alone, 0.5), percentile(&mut alone, 0.99));
    let (b50, b99) = (
        percentile(&mut through, 0.5),
        percentile(&mut through, 0.99),
    );
    if json_output {
        println!(
            "{}",
            json!({
                "engine_alone_p50_us": us(a50), "engine_alone_p99_us": us(a99),
                "bridge_p50_us": us(b50), "bridge_p99_us": us(b99),
                "bridge_added_p50_us": us(b50.saturating_sub(a50)),
                "burst_keystrokes": 30,
                "engine_requests_without_debounce": without_debounce,
                "engine_requests_with_debounce": with_debounce,
            })
        );
        return;
    }
    println!("bridge benchmark ({iterations} completions per row; instant provider)");
    println!(
        "{:<52} {:>10} {:>10} {:>12}",
        "measurement", "p50", "p99", "target"
    );
    println!(
        "{:<52} {:>8.1}us {:>8.1}us {:>12}",
        "engine alone (transport client -> engine)",
        us(a50),
        us(a99),
        ""
    );
    println!(
        "{:<52} {:>8.1}us {:>8.1}us {:>12}",
        "LSP request -> response (bridge + transport + engine)",
        us(b50),
        us(b99),
        "p50 < 1 ms"
    );
    println!(
        "{:<52} {:>10}",
        "engine requests for 30 keystrokes, no debounce", without_debounce
    );
    println!(
        "{:<52} {:>10}",
        "engine requests for 30 keystrokes, debounce 150 ms", with_debounce
    );
}
