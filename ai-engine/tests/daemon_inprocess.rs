//! The daemon in-process with injected providers: a panicking provider and a missing model are errors for
//! that request only; the daemon keeps serving.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ai_engine::config::{EngineConfig, ProfileConfig};
use ai_engine::engine::{Engine, ProviderFactory};
use ai_engine::provider::http::EventStream;
use ai_engine::provider::{GenerationRequest, Provider, ProviderError};
use lapce_ai_engine_testkit::{instant_engine_parts, serve_engine, FnProvider, InstantProvider};
use lapce_ai_transport::protocol::{CompletionRequest, ErrorCode, FinishReason};
use lapce_ai_transport::{
    AsyncClient, ClientOptions, Endpoint, Server, StreamEvent, TransportError,
};

async fn outcome(
    client: &AsyncClient,
    prefix: &str,
) -> Result<(String, FinishReason), TransportError> {
    let request = CompletionRequest {
        prefix: prefix.into(),
        ..CompletionRequest::default()
    };
    let mut stream = client.request(&request).await?;
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event? {
            StreamEvent::Chunk { text: t, .. } => text.push_str(&t),
            StreamEvent::End(end) => return Ok((text, end.finish_reason)),
        }
    }
    unreachable!("streams always end with a terminal event")
}

/// The daemon's handler over an engine with `factory`'s providers, served in this process.
fn serve(endpoint: &Endpoint, config: EngineConfig, factory: ProviderFactory) -> Server {
    let engine = Engine::new(config, factory, "inprocess");
    serve_engine(endpoint, engine, tokio::runtime::Handle::current()).unwrap()
}

fn endpoint(root: &tempfile::TempDir) -> Endpoint {
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    Endpoint::in_root("inprocess", root.path()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_provider_fails_one_request_not_the_daemon() {
    let root = tempfile::tempdir().unwrap();
    let endpoint = endpoint(&root);
    let (config, _) = instant_engine_parts("");
    // Panics on every other request.
    let calls = AtomicUsize::new(0);
    let flaky = Arc::new(FnProvider(move |request: GenerationRequest| {
        if calls.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            panic!("provider bug triggered by {:?}", request.max_tokens);
        }
        InstantProvider { text: "ok".into() }.generate(request)
    }));
    let factory: ProviderFactory =
        Arc::new(move |_p: &ProfileConfig| Ok(Arc::clone(&flaky) as Arc<dyn Provider>));
    let server = serve(&endpoint, config, factory);
    let client = AsyncClient::connect(&endpoint, ClientOptions::default())
        .await
        .unwrap();
    for round in 0..3 {
        match outcome(&client, &format!("x{round} = ")).await {
            Err(TransportError::Remote { code, message }) => {
                assert_eq!(code, ErrorCode::Internal);
                assert!(message.contains("provider bug"), "{message}");
            }
            other => panic!("round {round}: expected the panic as an error, got {other:?}"),
        }
        assert_eq!(
            outcome(&client, &format!("y{round} = ")).await.unwrap().0,
            "ok"
        );
    }
    drop(client);
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_is_an_actionable_error() {
    let root = tempfile::tempdir().unwrap();
    let endpoint = endpoint(&root);
    let (config, _) = instant_engine_parts("");
    let factory: ProviderFactory = Arc::new(|_p: &ProfileConfig| {
        Err(ProviderError::ModelMissing(
            "no model file; run `ai-engine models pull`".into(),
        ))
    });
    let server = serve(&endpoint, config, factory);
    let client = AsyncClient::connect(&endpoint, ClientOptions::default())
        .await
        .unwrap();
    match outcome(&client, "a = ").await {
        Err(TransportError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::ModelMissing);
            assert!(message.contains("ai-engine models pull"), "{message}");
        }
        other => panic!("expected ModelMissing, got {other:?}"),
    }
    assert!(client.is_alive());
    drop(client);
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
}

/// One connection cannot pile up unbounded work in the engine: past the per-connection limit a request is
/// refused with `Busy` (and a message that says what to do), while other connections carry on, and a place
/// freed by a cancel can be used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_limited_per_connection() {
    use ai_engine::daemon::MAX_IN_FLIGHT_PER_CONNECTION;
    let root = tempfile::tempdir().unwrap();
    let endpoint = endpoint(&root);
    let (config, _) = instant_engine_parts("");
    // Holds every request whose prompt mentions `hold` open forever; answers the rest at once.
    let holds_some = Arc::new(FnProvider(|request: GenerationRequest| {
        if format!("{:?}", request.prompt).contains("hold") {
            Box::pin(futures::stream::pending()) as EventStream
        } else {
            InstantProvider { text: "ok".into() }.generate(request)
        }
    }));
    let factory: ProviderFactory =
        Arc::new(move |_p: &ProfileConfig| Ok(Arc::clone(&holds_some) as Arc<dyn Provider>));
    let server = serve(&endpoint, config, factory);
    let greedy = AsyncClient::connect(&endpoint, ClientOptions::default())
        .await
        .unwrap();
    let other = AsyncClient::connect(&endpoint, ClientOptions::default())
        .await
        .unwrap();
    let mut held = Vec::new();
    for i in 0..MAX_IN_FLIGHT_PER_CONNECTION {
        let request = CompletionRequest {
            prefix: format!("hold{i} = "),
            ..CompletionRequest::default()
        };
        held.push(greedy.request(&request).await.unwrap());
    }
    // The next one on the same connection is refused, however cheap it would be ...
    match outcome(&greedy, "x = ").await {
        Err(TransportError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::Busy);
            assert!(
                message.contains(&format!("limit {MAX_IN_FLIGHT_PER_CONNECTION}")),
                "{message}"
            );
        }
        other => panic!("expected Busy past the limit, got {other:?}"),
    }
    // ... while another connection is served.
    assert_eq!(outcome(&other, "y = ").await.unwrap().0, "ok");
    // Cancelling one frees its place.
    let first = held.remove(0);
    first.cancel().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match outcome(&greedy, "z = ").await {
            Ok((text, _)) => {
                assert_eq!(text, "ok");
                break;
            }
            Err(TransportError::Remote {
                code: ErrorCode::Busy,
                ..
            }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => panic!("a cancelled request's place was not freed: {e}"),
        }
    }
    drop(first);
    drop(held);
    drop((greedy, other));
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
}
