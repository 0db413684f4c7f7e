//! Embedded model tests against the real SmolLM2-135M GGUF: run `scripts/fetch-test-model.sh` first.
#![cfg(feature = "embedded")]

use std::path::PathBuf;
use std::time::Duration;

use ai_engine::models::fallback_entry;
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
    let file = fallback_entry().file_name;
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
            middle_start: None,
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

/// A distinct ~600-token Python file per `seed`.
fn document(seed: usize) -> String {
    let mut s = format!("# document {seed}\nimport math\n\n");
    for i in 0..22 {
        s.push_str(&format!(
            "def f{seed}_{i}(r):\n    \"\"\"Value {i} of document {seed}.\"\"\"\n    return math.pi * r * {i} + {seed}\n\n"
        ));
    }
    s
}

async fn run(p: &EmbeddedProvider, request: GenerationRequest) -> RequestMetrics {
    let (s, rx) = p.generate_with_metrics(request);
    collect(s).await.expect("completes");
    metrics(rx).await
}

#[tokio::test]
async fn each_document_keeps_its_own_kv_sequence() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let (a, b, c) = (document(1), document(2), document(3));
    for doc in [&a, &b, &c] {
        let m = run(&p, raw(doc, 2)).await;
        assert!(m.reused_tokens <= 1, "a new document starts cold: {m:?}");
    }
    // Returning to A after B and C: its sequence is still there.
    let back = run(&p, raw(&format!("{a}def g"), 2)).await;
    assert!(
        back.reused_tokens as f64 > 0.9 * back.prompt_tokens as f64,
        "{back:?}"
    );
    // A fifth document evicts the least recently used one (B), not A.
    let (d, e) = (document(4), document(5));
    run(&p, raw(&d, 2)).await;
    run(&p, raw(&e, 2)).await;
    let a_again = run(&p, raw(&format!("{a}def h"), 2)).await;
    assert!(a_again.reused_tokens as f64 > 0.9 * a_again.prompt_tokens as f64);
    let b_again = run(&p, raw(&format!("{b}def h"), 2)).await;
    assert!(
        b_again.reused_tokens < b_again.prompt_tokens / 10,
        "B was evicted: {b_again:?}"
    );
}

#[tokio::test]
async fn a_moved_window_is_shifted_not_decoded_again() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let doc = document(7);
    let first = run(&p, raw(&doc, 2)).await;
    // The window start moved down by a few lines (the editor trimmed the prefix) and a line was typed.
    let cut = doc.find("def f7_3").expect("line");
    let moved = format!("{}def typed():\n", &doc[cut..]);
    let second = run(&p, raw(&moved, 2)).await;
    println!("first {first:?}\nsecond {second:?}");
    assert!(
        second.reused_tokens as f64 > 0.8 * second.prompt_tokens as f64,
        "the shifted chunk is reused: {second:?}"
    );
    assert!(
        second.decoded_tokens < second.prompt_tokens / 5,
        "{second:?}"
    );
    // And the answer is still sensible: generation after a shift works.
    let out = collect(p.generate(raw(&moved, 8)))
        .await
        .expect("after shift");
    assert!(out.usage.completion_tokens > 0);
}

#[tokio::test]
async fn prefill_warms_the_document_and_gives_way_to_completions() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let doc = document(9);
    let (s, rx) = p.prefill_with_metrics(raw(&doc, 8));
    let out = collect(s).await.expect("prefill ends");
    assert_eq!(
        out.usage.completion_tokens, 0,
        "a prefill generates nothing"
    );
    let pre = metrics(rx).await;
    assert_eq!(pre.generated_tokens, 0);
    assert!(pre.decoded_tokens > 300, "{pre:?}");
    let key = run(&p, raw(&format!("{doc}def k"), 4)).await;
    assert!(
        key.reused_tokens as f64 > 0.9 * key.prompt_tokens as f64,
        "{key:?}"
    );

    // A completion arriving during a prefill runs first; the prefill is dropped part way or runs after it.
    let other = document(10);
    let (ps, prx) = p.prefill_with_metrics(raw(&other, 8));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (cs, crx) = p.generate_with_metrics(raw("def urgent():\n", 4));
    let (_, c_out) = tokio::join!(collect(ps), collect(cs));
    c_out.expect("completion");
    let (pm, cm) = (metrics(prx).await, metrics(crx).await);
    println!("prefill {pm:?}\ncompletion {cm:?}");
    let prefill_work = pm.prompt_tokens.saturating_sub(pm.reused_tokens);
    let preempted = pm.cancelled && pm.decoded_tokens < prefill_work;
    let ran_first = cm.queue_wait < pm.queue_wait;
    assert!(
        preempted || ran_first,
        "the completion waited for the whole prefill: {pm:?} {cm:?}"
    );

    // A prefill whose stream is dropped (document closed) never runs.
    let (busy, _) = p.generate_with_metrics(raw(&document(12), 2));
    let (dropped, drx) = p.prefill_with_metrics(raw(&document(11), 8));
    drop(dropped);
    collect(busy).await.expect("busy");
    let dm = metrics(drx).await;
    assert!(dm.cancelled && dm.decoded_tokens == 0, "{dm:?}");
}

#[tokio::test]
async fn completions_go_before_a_running_chat() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    let chat = GenerationRequest {
        prompt: Prompt::Chat {
            system: None,
            messages: vec![ChatTurn {
                role: ChatRole::User,
                content: "Write a long story about a robot.".to_string(),
            }],
        },
        max_tokens: 60,
        temperature: 0.0,
        stop: vec![],
        extra_context: vec![],
        completion: None,
    };
    let (mut chat_stream, chat_rx) = p.generate_with_metrics(chat);
    // Wait until the chat streams, then ask for a completion.
    let first = tokio::time::timeout(LIMIT, chat_stream.next())
        .await
        .expect("chat starts");
    assert!(matches!(first, Some(Ok(GenerationEvent::Text(_)))));
    let completion = run(&p, raw("def add(a, b):\n", 4)).await;
    // The chat is still going: the completion did not wait for its end.
    let mut chat_text_after = 0;
    while let Some(item) = chat_stream.next().await {
        if let Ok(GenerationEvent::Text(_)) = item {
            chat_text_after += 1;
        }
    }
    let chat_metrics = metrics(chat_rx).await;
    println!("completion {completion:?}\nchat {chat_metrics:?}");
    assert!(
        chat_text_after > 0,
        "the completion ran while the chat was unfinished"
    );
    assert!(
        completion.total < chat_metrics.total,
        "{completion:?} {chat_metrics:?}"
    );
}

#[tokio::test]
async fn a_cancelled_prompt_stops_within_a_batch_while_another_waits() {
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    // Measure the decoding speed once so batches can be sized.
    run(&p, raw(&document(20), 2)).await;
    let long: String = (21..24).map(document).collect();
    let (a, arx) = p.generate_with_metrics(raw(&long, 2));
    let (b, brx) = p.generate_with_metrics(raw("def waiting():\n", 2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(a);
    collect(b).await.expect("b runs");
    let (am, bm) = (metrics(arx).await, metrics(brx).await);
    println!("cancelled {am:?}\nwaiting {bm:?}");
    assert!(am.cancelled, "{am:?}");
    assert!(
        am.decoded_tokens < am.prompt_tokens.saturating_sub(am.reused_tokens),
        "the cancelled prompt stopped part way: {am:?}"
    );
}

#[tokio::test]
async fn bad_model_files_get_clear_messages_before_any_request() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let html = dir.path().join("page.gguf");
    std::fs::write(&html, b"<!doctype html><title>404</title>").expect("write");
    let p = EmbeddedProvider::new(&html, EmbeddedOptions::default());
    match p.wait_loaded().await {
        Err(ProviderError::ModelLoad(m)) => assert!(m.contains("not a GGUF model file"), "{m}"),
        other => panic!("expected ModelLoad, got {other:?}"),
    }
    // A real model cut short: the header is fine, the tensors are missing.
    let truncated = dir.path().join("cut.gguf");
    let bytes = std::fs::read(model_path()).expect("model");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write");
    let p = EmbeddedProvider::new(&truncated, EmbeddedOptions::default());
    match p.wait_loaded().await {
        Err(ProviderError::ModelLoad(m)) => {
            assert!(
                m.contains("cut.gguf") && m.contains("truncated or corrupt"),
                "{m}"
            )
        }
        other => panic!("expected ModelLoad, got {other:?}"),
    }
}

#[tokio::test]
async fn typing_under_a_prefix_first_template_never_decodes_the_prompt_again() {
    use ai_engine::completion::{prepare_completion, ContextBudget, FimTemplate, PromptStyle};
    use lapce_ai_transport::protocol::{CompletionMode, CompletionRequest};
    let _serial = SERIAL.lock().await;
    let p = provider().await;
    // What the bridge sends while the user types at the end of a file with code below the cursor, through the
    // completion pipeline (trimming, the Qwen2.5-Coder template: prefix first, suffix after it).
    let style = PromptStyle::Template(FimTemplate::QwenCoder);
    let suffix = document(12);
    let mut prefix = format!("{}{}    total = ", document(13), document(11));
    let request = |prefix: &str| {
        let request = CompletionRequest {
            language_id: "python".into(),
            prefix: prefix.into(),
            suffix: suffix.clone(),
            mode: CompletionMode::SingleLine,
            max_tokens: 2,
            ..CompletionRequest::default()
        };
        prepare_completion(&request, style.clone(), ContextBudget::default(), 2, 0.0).request
    };
    let first = run(&p, request(&prefix)).await;
    assert!(first.decoded_tokens > 300, "{first:?}");
    for ch in "sum(values)".chars() {
        prefix.push(ch);
        let key = run(&p, request(&prefix)).await;
        // Only the typed text (and a token it merged with) is decoded: never the 200+ suffix tokens.
        assert!(key.decoded_tokens <= 6, "after {ch:?}: {key:?}");
        assert!(key.prompt_tokens > 300, "{key:?}");
    }
    // New lines: the trimmed window drops lines at its top (its new first line tokenizes differently at the
    // cut) and the start of the middle moves now and then; neither may cost a full evaluation.
    let lines = "\n    if total > limit:\n        total = limit\n    values.append(total)\n    return values\n";
    for ch in lines.chars() {
        prefix.push(ch);
        let key = run(&p, request(&prefix)).await;
        assert!(
            key.decoded_tokens < key.prompt_tokens / 2,
            "after {ch:?} in {:?}: {key:?}",
            &prefix[prefix.len().saturating_sub(40)..]
        );
    }
}
