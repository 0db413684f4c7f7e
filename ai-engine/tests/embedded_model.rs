//! Embedded model tests against the real SmolLM2-135M GGUF: run `scripts/fetch-test-model.sh` first.
#![cfg(feature = "embedded")]

use std::path::PathBuf;
use std::time::Duration;

use ai_engine::models::default_entry;
use ai_engine::provider::embedded::{EmbeddedOptions, EmbeddedProvider, RequestMetrics};
use ai_engine::provider::{
    ChatRole, ChatTurn, GenerationEvent, GenerationRequest, Prompt, Provider, ProviderError,
    StopReason, TokenUsage,
};
use futures::stream::BoxStream;
use futures::StreamExt;

/// Tests share the two CPU cores: run them one at a time so timings mean something.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LIMIT: Duration = Duration::from_secs(120);

fn model_path() -> PathBuf {
    let file = default_entry().file_name;
    let path = match std::env::var_os("LAPCE_AI_TEST_MODEL").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let dir = std::env::var_os("LAPCE_AI_TEST_MODEL_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".cache/lapce-ai/models"))
                })
                .expect("HOME is not set; set LAPCE_AI_TEST_MODEL");
            dir.join(file)
        }
    };
    assert!(
        path.is_file(),
        "test model not found at {}: run scripts/fetch-test-model.sh (or set LAPCE_AI_TEST_MODEL to the GGUF file)",
        path.display()
    );
    path
}

async fn provider() -> EmbeddedProvider {
    let p = EmbeddedProvider::new(model_path(), EmbeddedOptions::default());
    let info = tokio::time::timeout(LIMIT, p.wait_loaded())
        .await
        .expect("model load timed out")
        .expect("model loads");
    assert!(info.n_params > 100_000_000, "{info:?}");
    p
}

fn raw(prompt: &str, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        prompt: Prompt::Raw(prompt.to_string()),
        max_tokens,
        temperature: 0.0,
        stop: Vec::new(),
        extra_context: Vec::new(),
        completion: None,
    }
}

struct Output {
    text: String,
    reason: StopReason,
    usage: TokenUsage,
}

async fn collect(
    mut stream: BoxStream<'static, Result<GenerationEvent, ProviderError>>,
) -> Result<Output, ProviderError> {
    let mut text = String::new();
    let run = async {
        while let Some(item) = stream.next().await {
            match item? {
                GenerationEvent::Text(t) => text.push_str(&t),
                GenerationEvent::Finished { reason, usage } => {
                    return Ok::<_, ProviderError>((reason, usage));
                }
            }
        }
        panic!("stream ended without Finished");
    };
    let (reason, usage) = tokio::time::timeout(LIMIT, run)
        .await
        .expect("generation timed out")?;
    Ok(Output {
        text,
        reason,
        usage,
    })
}

async fn metrics(rx: tokio::sync::oneshot::Receiver<RequestMetrics>) -> RequestMetrics {
    tokio::time::timeout(LIMIT, rx)
        .await
        .expect("metrics timed out")
        .expect("metrics sent")
}

#[tokio::test]
async fn loads_and_greedy_completion_is_deterministic() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    assert_eq!(p.kind(), "embedded");
    assert_eq!(p.model(), "SmolLM2-135M-Instruct.Q4_1");
    assert!(!p.supports_native_fim(), "SmolLM2 has no FIM tokens");
    assert!(p.count_tokens("def fibonacci(n):").is_some_and(|n| n > 2));

    let prompt = "def fibonacci(n):\n";
    let first = collect(p.generate(raw(prompt, 32))).await.expect("first");
    let second = collect(p.generate(raw(prompt, 32))).await.expect("second");
    println!("completion: {:?}", first.text);
    assert!(!first.text.trim().is_empty(), "empty completion");
    assert_eq!(
        first.text, second.text,
        "temperature 0 must be deterministic"
    );
    assert!(first.usage.prompt_tokens > 3);
    assert!(first.usage.completion_tokens > 0 && first.usage.completion_tokens <= 32);
    // A different request in between, then the same prompt again: still identical.
    collect(p.generate(raw("import os\n", 4)))
        .await
        .expect("other");
    let third = collect(p.generate(raw(prompt, 32))).await.expect("third");
    assert_eq!(first.text, third.text);
}

#[tokio::test]
async fn max_tokens_and_stop_strings() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let prompt = "# A list of the numbers from 1 to 50, one per line\n1\n2\n3\n4\n";
    let out = collect(p.generate(raw(prompt, 5))).await.expect("length");
    assert_eq!(out.reason, StopReason::Length);
    assert_eq!(out.usage.completion_tokens, 5);

    let mut request = raw(prompt, 40);
    request.stop = vec!["\n".to_string()];
    let out = collect(p.generate(request)).await.expect("stop");
    assert_eq!(out.reason, StopReason::Stop);
    assert!(
        !out.text.contains('\n'),
        "stop string leaked: {:?}",
        out.text
    );
    assert!(out.usage.completion_tokens < 40);
}

#[tokio::test]
async fn cancel_mid_stream_then_next_request_works() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let (mut stream, rx) =
        p.generate_with_metrics(raw("Write a long story about a dragon.\n", 200));
    let first = tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("first token timed out");
    assert!(
        matches!(first, Some(Ok(GenerationEvent::Text(_)))),
        "{first:?}"
    );
    drop(stream);
    let m = metrics(rx).await;
    println!("cancelled after {} generated tokens", m.generated_tokens);
    assert!(m.cancelled, "{m:?}");
    // The worker checks before every decode step; the slack covers the test task's wake-up delay
    // on a busy machine (each token takes a few milliseconds).
    assert!(
        m.generated_tokens < 100,
        "decoding did not stop promptly: {m:?}"
    );

    let out = collect(p.generate(raw("def add(a, b):\n", 16)))
        .await
        .expect("after cancel");
    assert!(out.usage.completion_tokens > 0);
}

#[tokio::test]
async fn cancelled_queued_request_is_skipped() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let (busy, busy_rx) = p.generate_with_metrics(raw("Count to one hundred:\n1, 2,", 48));
    let (queued, queued_rx) = p.generate_with_metrics(raw("def skipped():\n", 48));
    drop(queued);
    let out = collect(busy).await.expect("busy completes");
    assert!(out.usage.completion_tokens > 0);
    let m = metrics(queued_rx).await;
    assert!(m.cancelled, "{m:?}");
    assert_eq!(
        m.generated_tokens, 0,
        "a cancelled queued request must not decode"
    );
    assert_eq!(m.prompt_tokens, 0);
    assert!(!metrics(busy_rx).await.cancelled);
}

fn long_source() -> String {
    let mut s = String::from("import math\nimport sys\n\n");
    for i in 0..24 {
        s.push_str(&format!(
            "def area_{i}(radius):\n    \"\"\"Area of circle number {i}.\"\"\"\n    return math.pi * radius * radius + {i}\n\n"
        ));
    }
    s
}

#[tokio::test]
async fn prefix_reuse_makes_the_next_keystroke_fast() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let source = long_source();
    let n = p.count_tokens(&source).expect("loaded");
    assert!((500..900).contains(&n), "prompt has {n} tokens");

    let (s1, rx1) = p.generate_with_metrics(raw(&source, 8));
    collect(s1).await.expect("cold");
    let cold = metrics(rx1).await;

    let typed = format!("{source}def vol");
    let (s2, rx2) = p.generate_with_metrics(raw(&typed, 8));
    collect(s2).await.expect("warm");
    let warm = metrics(rx2).await;

    let ttft1 = cold.ttft.expect("ttft1");
    let ttft2 = warm.ttft.expect("ttft2");
    println!(
        "cold: {} prompt tokens, {} reused, ttft {:?}; warm: {} prompt tokens, {} reused, ttft {:?}",
        cold.prompt_tokens, cold.reused_tokens, ttft1, warm.prompt_tokens, warm.reused_tokens, ttft2
    );
    assert_eq!(cold.reused_tokens, 0);
    assert!(
        warm.reused_tokens as f64 > 0.9 * warm.prompt_tokens as f64,
        "reused {} of {}",
        warm.reused_tokens,
        warm.prompt_tokens
    );
    assert!(
        ttft2 < ttft1,
        "warm ttft {ttft2:?} not below cold {ttft1:?}"
    );
    assert_eq!(p.last_metrics(), Some(warm));
}

#[tokio::test]
async fn concurrent_requests_are_queued_fairly() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let (a, ma) = p.generate_with_metrics(raw("def is_prime(n):\n", 24));
    let (b, mb) = p.generate_with_metrics(raw("class Stack:\n", 24));
    let (ra, rb) = tokio::join!(collect(a), collect(b));
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert!(ra.usage.completion_tokens > 0 && rb.usage.completion_tokens > 0);
    let (ma, mb) = (metrics(ma).await, metrics(mb).await);
    // FIFO: b waited for a to finish.
    assert!(
        mb.queue_wait >= ma.total.saturating_sub(ma.queue_wait) / 2,
        "{ma:?} {mb:?}"
    );
}

#[tokio::test]
async fn fim_and_chat_prompts() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    // No FIM tokens: the prefix alone is completed.
    let fim = GenerationRequest {
        prompt: Prompt::FillInTheMiddle {
            prefix: "def square(x):\n    return".to_string(),
            suffix: "\n\nprint(square(3))\n".to_string(),
        },
        max_tokens: 8,
        temperature: 0.0,
        stop: vec![],
        extra_context: vec![],
        completion: None,
    };
    let out = collect(p.generate(fim)).await.expect("fim");
    assert!(out.usage.completion_tokens > 0);

    let chat = GenerationRequest {
        prompt: Prompt::Chat {
            system: Some("You are a helpful assistant.".to_string()),
            messages: vec![ChatTurn {
                role: ChatRole::User,
                content: "Say hello.".to_string(),
            }],
        },
        max_tokens: 16,
        temperature: 0.7,
        stop: vec![],
        extra_context: vec![],
        completion: None,
    };
    let out = collect(p.generate(chat)).await.expect("chat");
    println!("chat: {:?}", out.text);
    assert!(!out.text.trim().is_empty());
}

#[tokio::test]
async fn long_prompt_keeps_its_tail() {
    let _serial = SERIAL.lock().await;
    let p = EmbeddedProvider::new(
        model_path(),
        EmbeddedOptions {
            context_tokens: 256,
            ..EmbeddedOptions::default()
        },
    );
    let (s, rx) = p.generate_with_metrics(raw(&long_source(), 16));
    collect(s).await.expect("truncated prompt completes");
    let m = metrics(rx).await;
    assert!(m.truncated_tokens > 0, "{m:?}");
    assert!(m.prompt_tokens + 16 <= 256, "{m:?}");
}

#[tokio::test]
async fn load_failures_are_errors_not_panics() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("garbage.gguf");
    std::fs::write(&bad, b"this is not a gguf file").expect("write");
    let p = EmbeddedProvider::new(&bad, EmbeddedOptions::default());
    for _ in 0..2 {
        match collect(p.generate(raw("x", 4))).await {
            Err(ProviderError::ModelLoad(m)) => assert!(m.contains("garbage.gguf"), "{m}"),
            other => panic!("expected ModelLoad, got {:?}", other.map(|o| o.text)),
        }
    }
    assert!(matches!(
        p.wait_loaded().await,
        Err(ProviderError::ModelLoad(_))
    ));

    let p = EmbeddedProvider::new(dir.path().join("absent.gguf"), EmbeddedOptions::default());
    match collect(p.generate(raw("x", 4))).await {
        Err(ProviderError::ModelMissing(m)) => assert!(m.contains("ai-engine models pull"), "{m}"),
        other => panic!("expected ModelMissing, got {:?}", other.map(|o| o.text)),
    }
}
