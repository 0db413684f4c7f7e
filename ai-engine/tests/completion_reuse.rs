//! Engine-level tests of typing through an in-flight generation and of caching line-limited completions,
//! with a provider whose streams the test feeds piece by piece.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ai_engine::config::{EngineConfig, ProfileConfig, ProviderKind};
use ai_engine::engine::{Engine, EngineError, ProviderFactory, TextSink};
use ai_engine::provider::{GenerationEvent, GenerationRequest, Provider, ProviderError};
use futures::stream::BoxStream;
use futures::StreamExt;
use lapce_ai_transport::protocol::{CompletionMode, CompletionRequest, FinishReason};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

type Feed = mpsc::UnboundedSender<Result<String, ProviderError>>;

/// A provider whose every stream is fed by the test through the [`Feed`] it receives for that call.
struct FedProvider {
    calls: AtomicUsize,
    feeds: Mutex<VecDeque<mpsc::UnboundedReceiver<Result<String, ProviderError>>>>,
}

impl Provider for FedProvider {
    fn kind(&self) -> &str {
        "fed"
    }
    fn model(&self) -> &str {
        "fed-model"
    }
    fn supports_native_fim(&self) -> bool {
        true
    }
    fn generate(
        &self,
        _request: GenerationRequest,
    ) -> BoxStream<'static, Result<GenerationEvent, ProviderError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let feed = self.feeds.lock().unwrap().pop_front();
        let Some(receiver) = feed else {
            return futures::stream::iter([Err(ProviderError::Server(
                "the test prepared no stream for this call".into(),
            ))])
            .boxed();
        };
        futures::stream::unfold(receiver, |mut receiver| async move {
            let item = receiver.recv().await?;
            Some((item.map(GenerationEvent::Text), receiver))
        })
        .boxed()
    }
}

struct Harness {
    engine: Arc<Engine>,
    provider: Arc<FedProvider>,
}

impl Harness {
    fn new() -> Harness {
        let provider = Arc::new(FedProvider {
            calls: AtomicUsize::new(0),
            feeds: Mutex::new(VecDeque::new()),
        });
        let mut config = EngineConfig::default();
        config.profiles.insert(
            "fed".into(),
            ProfileConfig::new("fed", ProviderKind::OpenAiCompletions, "fed-model"),
        );
        config.completion_profile = "fed".into();
        config.chat_profile = "fed".into();
        let shared = Arc::clone(&provider);
        let factory: ProviderFactory =
            Arc::new(move |_profile: &ProfileConfig| Ok(Arc::clone(&shared) as Arc<dyn Provider>));
        Harness {
            engine: Engine::new(config, factory, "completion-reuse-test"),
            provider,
        }
    }

    /// Prepares the stream of the next provider call; the returned sender feeds it (drop it to end it).
    fn next_stream(&self) -> Feed {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.provider.feeds.lock().unwrap().push_back(receiver);
        sender
    }

    fn calls(&self) -> usize {
        self.provider.calls.load(Ordering::SeqCst)
    }

    /// Starts a completion in its own task; returns what it shows so far, its cancel token and its result.
    fn start(&self, request: CompletionRequest) -> Running {
        let (shown_sender, shown) = watch::channel(String::new());
        let cancel = CancellationToken::new();
        let engine = Arc::clone(&self.engine);
        let token = cancel.clone();
        let task = tokio::spawn(async move {
            let mut sink = WatchSink(shown_sender);
            let outcome = engine.complete(request, &mut sink, &token).await;
            let shown = sink.0.borrow().clone();
            (shown, outcome)
        });
        Running {
            shown,
            cancel,
            task,
        }
    }
}

struct WatchSink(watch::Sender<String>);

impl TextSink for WatchSink {
    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.0.send_modify(|shown| shown.push_str(text));
        Ok(())
    }
}

type CompletionResult = (String, Result<ai_engine::engine::Outcome, EngineError>);

struct Running {
    shown: watch::Receiver<String>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<CompletionResult>,
}

impl Running {
    async fn wait_until_shown(&mut self, text: &str) {
        let reached = tokio::time::timeout(
            Duration::from_secs(5),
            self.shown.wait_for(|shown| shown == text),
        )
        .await
        .map(|waited| waited.is_ok());
        assert_eq!(
            reached,
            Ok(true),
            "{text:?} was never shown (shown: {:?})",
            *self.shown.borrow()
        );
    }

    async fn result(self) -> CompletionResult {
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the completion ends")
            .expect("the completion task does not panic")
    }
}

const PREFIX: &str = "fn main() {\n    let values = vec![1, 2, 3];\n    let total = ";
const SUFFIX: &str = ";\n    println!(\"{total}\");\n}\n";

fn request(typed: &str) -> CompletionRequest {
    CompletionRequest {
        language_id: "rust".into(),
        file_path: "/work/src/main.rs".into(),
        prefix: format!("{PREFIX}{typed}"),
        suffix: SUFFIX.into(),
        mode: CompletionMode::Auto,
        max_lines: 8,
        ..CompletionRequest::default()
    }
}

async fn wait_closed(feed: &Feed, what: &str) {
    tokio::time::timeout(Duration::from_secs(5), feed.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}: the provider stream was never dropped"));
}

#[tokio::test]
async fn typing_through_a_cancelled_request_reuses_its_generation() {
    let harness = Harness::new();
    let feed = harness.next_stream();
    let mut first = harness.start(request(""));
    feed.send(Ok("values.".into())).unwrap();
    first.wait_until_shown("values.").await;
    // The user types `val`: the bridge cancels the first request, then (after its debounce) asks again.
    first.cancel.cancel();
    let (shown, outcome) = first.result().await;
    assert_eq!(shown, "values.");
    assert_eq!(outcome.unwrap().finish_reason, FinishReason::Cancelled);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = harness.start(request("val"));
    // The rest of what was streamed comes at once, and new text keeps coming from the same provider call.
    second.wait_until_shown("ues.").await;
    feed.send(Ok("iter().sum::<i32>()".into())).unwrap();
    second.wait_until_shown("ues.iter().sum::<i32>()").await;
    drop(feed);
    let (shown, outcome) = second.result().await;
    assert_eq!(shown, "ues.iter().sum::<i32>()");
    assert_eq!(outcome.unwrap().finish_reason, FinishReason::Stop);
    assert_eq!(
        harness.calls(),
        1,
        "the second request made no provider call"
    );
    assert_eq!(
        harness
            .engine
            .metrics
            .reused_generations
            .load(Ordering::SeqCst),
        1
    );
    // Finished: the completion is cached, and typing further through it is a cache hit.
    let third = harness.start(request("values.iter()"));
    let (shown, outcome) = third.result().await;
    assert_eq!(shown, ".sum::<i32>()");
    assert_eq!(outcome.unwrap().finish_reason, FinishReason::Cached);
    assert_eq!(harness.calls(), 1);
}

#[tokio::test]
async fn typing_something_else_starts_a_new_generation_and_cancels_the_orphan() {
    let harness = Harness::new();
    let first_feed = harness.next_stream();
    let second_feed = harness.next_stream();
    let mut first = harness.start(request(""));
    first_feed.send(Ok("values.".into())).unwrap();
    first.wait_until_shown("values.").await;
    first.cancel.cancel();
    let (_, cancelled) = first.result().await;
    assert_eq!(cancelled.unwrap().finish_reason, FinishReason::Cancelled);
    // `vaX` is not what the generation streamed.
    let mut second = harness.start(request("vaX"));
    wait_closed(&first_feed, "the orphan of the same document").await;
    second_feed.send(Ok(" + 1".into())).unwrap();
    second.wait_until_shown(" + 1").await;
    drop(second_feed);
    let (shown, _) = second.result().await;
    assert_eq!(shown, " + 1");
    assert_eq!(harness.calls(), 2);
    assert_eq!(
        harness
            .engine
            .metrics
            .reused_generations
            .load(Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn an_orphan_nobody_adopts_is_cancelled_after_the_grace_period() {
    let harness = Harness::new();
    let feed = harness.next_stream();
    let mut first = harness.start(request(""));
    feed.send(Ok("values.".into())).unwrap();
    first.wait_until_shown("values.").await;
    first.cancel.cancel();
    let (_, cancelled) = first.result().await;
    assert_eq!(cancelled.unwrap().finish_reason, FinishReason::Cancelled);
    assert!(
        !feed.is_closed(),
        "the generation waits for a request to adopt it"
    );
    wait_closed(&feed, "an orphan after its grace period").await;
    // A cancelled generation is never served: the same request again calls the provider.
    let next_feed = harness.next_stream();
    let mut again = harness.start(request("val"));
    next_feed.send(Ok("ue".into())).unwrap();
    again.wait_until_shown("ue").await;
    drop(next_feed);
    let (shown, _) = again.result().await;
    assert_eq!(shown, "ue");
    assert_eq!(harness.calls(), 2);
}

#[tokio::test]
async fn a_failed_generation_is_never_reused() {
    let harness = Harness::new();
    let feed = harness.next_stream();
    let mut first = harness.start(request(""));
    feed.send(Ok("values.".into())).unwrap();
    first.wait_until_shown("values.").await;
    feed.send(Err(ProviderError::Server("boom".into())))
        .unwrap();
    let (_, outcome) = first.result().await;
    assert!(matches!(outcome, Err(EngineError::Provider(_))));
    let next_feed = harness.next_stream();
    let mut second = harness.start(request("val"));
    next_feed.send(Ok("ue".into())).unwrap();
    second.wait_until_shown("ue").await;
    drop(next_feed);
    let (shown, outcome) = second.result().await;
    assert_eq!(shown, "ue");
    assert!(outcome.is_ok());
    assert_eq!(harness.calls(), 2);
}

#[tokio::test]
async fn a_completion_cut_at_max_lines_is_truncated_and_cached_per_mode_and_limit() {
    let harness = Harness::new();
    let block = |max_lines: u32, mode: CompletionMode| CompletionRequest {
        language_id: "rust".into(),
        file_path: "/work/src/lib.rs".into(),
        prefix: "fn counts() -> Vec<u32> {\n    ".into(),
        suffix: String::new(),
        mode,
        max_lines,
        ..CompletionRequest::default()
    };
    let feed = harness.next_stream();
    let first = harness.start(block(2, CompletionMode::MultiLine));
    feed.send(Ok(
        "let mut a = Vec::new();\n    a.push(1);\n    a.push(2);\n".into(),
    ))
    .unwrap();
    let (shown, outcome) = first.result().await;
    assert_eq!(shown, "let mut a = Vec::new();\n    a.push(1);");
    assert_eq!(outcome.unwrap().finish_reason, FinishReason::Truncated);
    wait_closed(&feed, "a generation cut at max_lines").await;
    // The same request is a cache hit.
    let (shown, outcome) = harness
        .start(block(2, CompletionMode::MultiLine))
        .result()
        .await;
    assert_eq!(shown, "let mut a = Vec::new();\n    a.push(1);");
    assert_eq!(outcome.unwrap().finish_reason, FinishReason::Cached);
    assert_eq!(harness.calls(), 1);
    // Another line limit or another mode is not.
    for (max_lines, mode) in [(3, CompletionMode::MultiLine), (2, CompletionMode::Auto)] {
        let feed = harness.next_stream();
        let running = harness.start(block(max_lines, mode));
        feed.send(Ok("return vec![1];".into())).unwrap();
        drop(feed);
        let (shown, outcome) = running.result().await;
        assert_eq!(shown, "return vec![1];");
        assert_eq!(outcome.unwrap().finish_reason, FinishReason::Stop);
    }
    assert_eq!(harness.calls(), 3);
}
