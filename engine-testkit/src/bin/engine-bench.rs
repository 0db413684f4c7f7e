//! `engine-bench`: engine overhead through the transport, embedded-model TTFT cold vs warm, idle daemon cost.
//!
//! One run prints a side-by-side table (and `--json`): completion round trips through the real transport with an
//! instant in-process provider next to the same pipeline called directly; time to first token for the embedded
//! model on a cold prompt and on the same prompt extended by a keystroke; idle daemon CPU and memory.
//! `--quality` instead runs the HumanEval infilling benchmark (`engine-bench/quality.rs`).

#[cfg(feature = "embedded")]
#[path = "engine-bench/quality.rs"]
mod quality;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_engine::config::EngineConfig;
#[cfg(feature = "embedded")]
use ai_engine::config::ProfileConfig;
use ai_engine::engine::{Engine, ProviderFactory, TextSink};
#[cfg(feature = "embedded")]
use ai_engine::provider::Provider;
use clap::Parser;
use lapce_ai_engine_testkit::{instant_engine_parts, serve_engine};
use lapce_ai_transport::protocol::{
    ByteEdit, CompletionMode, CompletionRequest, DocumentContent, DocumentSync,
};
use lapce_ai_transport::{AsyncClient, ClientOptions, Endpoint, StreamEvent};
use tokio_util::sync::CancellationToken;

#[cfg(feature = "embedded")]
#[path = "engine-bench/embedded_suite.rs"]
mod embedded_suite;

#[derive(Parser)]
#[command(about = "ai-engine benchmark (overhead, embedded TTFT, idle cost)")]
struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Fewer iterations (smoke test).
    #[arg(long)]
    quick: bool,
    /// GGUF model for the embedded measurements (default: LAPCE_AI_MODEL, then the model cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Only the embedded model against llama.cpp (llama-cpp-python), quiet and beside two busy processes.
    #[arg(long)]
    embedded_suite: bool,
    /// Run the HumanEval infilling benchmark (engine vs raw llama.cpp) instead of the speed measurements.
    #[arg(long)]
    quality: bool,
    /// Quality: tasks per set (single-line, multi-line).
    #[arg(long, default_value_t = 40, requires = "quality")]
    limit: usize,
    /// Quality: seed of the task selection.
    #[arg(long, default_value_t = 2022, requires = "quality")]
    seed: u64,
    /// Quality: token limit of each generation (engine and raw alike).
    #[arg(long, default_value_t = 128, requires = "quality")]
    max_tokens: u32,
    /// Quality: prompt style or FIM template name for the engine (default: detected from the model).
    #[arg(long, requires = "quality")]
    fim_template: Option<String>,
    /// Decoding threads for `--embedded-suite` and `--quality` (default: physical cores).
    #[arg(long)]
    threads: Option<u32>,
    /// Embedded suite: KV sequences (documents) the model keeps (default: the engine's default).
    #[arg(long, requires = "embedded_suite")]
    documents: Option<u32>,
    /// Embedded suite: only the cold prompts next to llama.cpp.
    #[arg(long, requires = "embedded_suite")]
    cold_only: bool,
}

fn instant_config() -> EngineConfig {
    instant_engine_parts("a + b").0
}

fn instant_factory() -> ProviderFactory {
    instant_engine_parts("a + b").1
}

fn request(i: usize) -> CompletionRequest {
    CompletionRequest {
        language_id: "python".into(),
        // A distinct first line per request keeps the cache out of the measurement.
        prefix: format!("# request {i}\ndef add(a, b):\n    return "),
        suffix: "\n".into(),
        mode: CompletionMode::Auto,
        ..CompletionRequest::default()
    }
}

struct Percentiles {
    p50: Duration,
    p99: Duration,
}

/// The nearest-rank percentiles `at` (0..=1) of `samples`; zero for no samples.
fn percentiles_of(mut samples: Vec<Duration>, at: &[f64]) -> Vec<Duration> {
    samples.sort_unstable();
    at.iter()
        .map(|p| match samples.len() {
            0 => Duration::ZERO,
            n => samples[((n - 1) as f64 * p).round() as usize],
        })
        .collect()
}

fn percentiles(samples: Vec<Duration>) -> Percentiles {
    let p = percentiles_of(samples, &[0.50, 0.99]);
    Percentiles {
        p50: p[0],
        p99: p[1],
    }
}

struct VecSink(String);

impl TextSink for VecSink {
    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.0.push_str(text);
        Ok(())
    }
}

/// Completion overhead: direct pipeline call vs the same through the transport (client in this process,
/// reactor + engine tasks as in the daemon).
async fn overhead(iterations: usize) -> (Percentiles, Percentiles) {
    let engine = Engine::new(instant_config(), instant_factory(), "bench");
    let cancel = CancellationToken::new();
    let mut direct = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let mut sink = VecSink(String::new());
        let started = Instant::now();
        engine
            .complete(request(i), &mut sink, &cancel)
            .await
            .expect("direct completion");
        direct.push(started.elapsed());
        assert_eq!(sink.0, "a + b");
    }

    let root = tempfile::tempdir().expect("temp dir");
    set_private(root.path());
    let endpoint = Endpoint::in_root("engine-bench", root.path()).expect("endpoint");
    let engine = Engine::new(instant_config(), instant_factory(), "bench");
    let server = serve_engine(
        &endpoint,
        Arc::clone(&engine),
        tokio::runtime::Handle::current(),
    )
    .expect("bind");
    let client = AsyncClient::connect(&endpoint, ClientOptions::default())
        .await
        .expect("connect");
    let mut through = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let started = Instant::now();
        let mut stream = client
            .request(&request(i + iterations))
            .await
            .expect("request");
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            match event.expect("stream") {
                StreamEvent::Chunk { text: piece, .. } => text.push_str(&piece),
                StreamEvent::End(_) => break,
            }
        }
        through.push(started.elapsed());
        assert_eq!(text, "a + b");
    }
    drop(client);
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .expect("shutdown");
    (percentiles(direct), percentiles(through))
}

/// A ~20 KB Rust module `index` full of small functions `helper_{index}_{n}`.
fn bench_module(index: usize) -> String {
    let mut text = String::from("use std::collections::HashMap;\n\n");
    let mut n = 0;
    while text.len() < 20_000 {
        text.push_str(&format!(
            "/// Helper {n} of module {index}.\npub fn helper_{index}_{n}(values: &[u32]) -> u32 {{\n    \
let mut total = 0;\n    for v in values {{\n        if *v > {n} {{\n            total += v * {index};\n        \
}}\n    }}\n    total\n}}\n\n"
        ));
        n += 1;
    }
    text
}

/// Time to first token through the transport with context from other files `enabled` or not: 10 open 20 KB
/// modules, and before each request a one-character edit of the current file synced as the bridge does.
async fn context_ttft(enabled: bool, iterations: usize) -> Percentiles {
    let mut config = instant_config();
    config.context.enabled = enabled;
    let root = tempfile::tempdir().expect("temp dir");
    set_private(root.path());
    let endpoint = Endpoint::in_root("context-bench", root.path()).expect("endpoint");
    let engine = Engine::new(config, instant_factory(), "bench");
    let server = serve_engine(&endpoint, engine, tokio::runtime::Handle::current()).expect("bind");
    let client = AsyncClient::connect(&endpoint, ClientOptions::default())
        .await
        .expect("connect");
    let full = |path: String, text: String| DocumentSync {
        path,
        language_id: "rust".into(),
        version: 1,
        content: DocumentContent::Full(text.into_bytes()),
    };
    for index in 0..10 {
        let sync = full(format!("/bench/src/module_{index}.rs"), bench_module(index));
        client.notify(&sync).await.expect("sync");
    }
    let main_path = "/bench/src/main.rs".to_owned();
    let main_text = "fn main() {\n    let values = vec![1, 2, 3];\n    \n}\n".to_owned();
    let mut cursor = main_text.len() - 3;
    client
        .notify(&full(main_path.clone(), main_text))
        .await
        .expect("sync");
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let keystroke = DocumentSync {
            path: main_path.clone(),
            language_id: "rust".into(),
            version: i as i32 + 2,
            content: DocumentContent::Edits {
                base_version: i as i32 + 1,
                edits: vec![ByteEdit {
                    start: cursor as u64,
                    end: cursor as u64,
                    text: b"x".to_vec(),
                }],
            },
        };
        cursor += 1;
        let request = CompletionRequest {
            language_id: "rust".into(),
            file_path: main_path.clone(),
            prefix: format!(
                "fn main() {{\n    let values = vec![1, 2, 3];\n    let a = helper_3_17(&values) + helper_7_{}(&values);\n    let y{i} = ",
                i % 40
            ),
            suffix: "\n}\n".into(),
            ..CompletionRequest::default()
        };
        let started = Instant::now();
        client.notify(&keystroke).await.expect("keystroke");
        let mut stream = client.request(&request).await.expect("request");
        let mut first = None;
        while let Some(event) = stream.next().await {
            match event.expect("stream") {
                StreamEvent::Chunk { .. } => {
                    first.get_or_insert_with(|| started.elapsed());
                }
                StreamEvent::End(_) => break,
            }
        }
        samples.push(first.expect("a chunk"));
    }
    drop(client);
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .expect("shutdown");
    percentiles(samples)
}

fn set_private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
}

/// Idle daemon: a real `ai-engine serve` process with one client connected and nothing to do.
fn idle_daemon() -> Option<(f64, u64, u64)> {
    let exe = std::env::current_exe().ok()?.parent()?.join("ai-engine");
    if !exe.is_file() {
        return None;
    }
    let root = tempfile::tempdir().ok()?;
    set_private(root.path());
    let config = root.path().join("engine.toml");
    std::fs::write(
        &config,
        "completion_profile = \"remote\"\nchat_profile = \"remote\"\n[profiles.remote]\nkind = \"openai-completions\"\nbase_url = \"http://127.0.0.1:9\"\nmodel = \"none\"\n",
    )
    .ok()?;
    let endpoint = Endpoint::in_root("idle", root.path()).ok()?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--endpoint", "idle", "--config"])
        .arg(&config)
        .env(lapce_ai_transport::endpoint::RUNTIME_DIR_ENV, root.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let measured = (|| {
        lapce_ai_transport::wait_for_engine(&endpoint, Duration::from_secs(10)).ok()?;
        let client =
            lapce_ai_transport::Client::connect(&endpoint, ClientOptions::default()).ok()?;
        std::thread::sleep(Duration::from_millis(500));
        let before = cpu_ticks(child.id())?;
        let window = Duration::from_secs(3);
        std::thread::sleep(window);
        let after = cpu_ticks(child.id())?;
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu = (after - before) as f64 / ticks_per_second / window.as_secs_f64() * 100.0;
        let (rss, anon) = rss_kib(child.id())?;
        client.close();
        Some((cpu, rss, anon))
    })();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    measured
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}

/// Embedded model: TTFT and total for a cold ~600-token prompt, then for the same prompt plus one keystroke.
#[cfg(feature = "embedded")]
async fn embedded(
    model: Option<PathBuf>,
    warm_runs: usize,
) -> Result<(Duration, Duration, Percentiles, Percentiles), String> {
    use ai_engine::provider::embedded::{EmbeddedOptions, EmbeddedProvider};
    let path = match model {
        Some(p) => p,
        None => {
            ai_engine::models::resolve_default(None)
                .map_err(|e| e.to_string())?
                .1
                .path
        }
    };
    let provider = EmbeddedProvider::new(path, EmbeddedOptions::default());
    provider.wait_loaded().await.map_err(|e| e.to_string())?;
    let provider: Arc<dyn Provider> = Arc::new(provider);
    let factory: ProviderFactory = {
        let provider = Arc::clone(&provider);
        Arc::new(move |_p: &ProfileConfig| Ok(Arc::clone(&provider)))
    };
    let engine = Engine::new(instant_config(), factory, "bench");
    let body: String = (0..40)
        .map(|i| {
            format!("def helper_{i}(values):\n    return [v * {i} for v in values if v > {i}]\n\n")
        })
        .collect();
    let measure = |prefix: String| {
        let engine = Arc::clone(&engine);
        async move {
            let mut sink = VecSink(String::new());
            let request = CompletionRequest {
                language_id: "python".into(),
                prefix,
                suffix: "\n".into(),
                mode: CompletionMode::SingleLine,
                max_tokens: 16,
                ..CompletionRequest::default()
            };
            let outcome = engine
                .complete(request, &mut sink, &CancellationToken::new())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((
                outcome.time_to_first_token.unwrap_or(outcome.total),
                outcome.total,
            ))
        }
    };
    let base = format!("{body}def total(values):\n    ");
    let (cold_ttft, cold_total) = measure(base.clone()).await?;
    let mut ttfts = Vec::new();
    let mut totals = Vec::new();
    let mut typed = base;
    for i in 0..warm_runs {
        typed.push(char::from(b'a' + (i % 26) as u8));
        let (ttft, total) = measure(typed.clone()).await?;
        ttfts.push(ttft);
        totals.push(total);
    }
    Ok((
        cold_ttft,
        cold_total,
        percentiles(ttfts),
        percentiles(totals),
    ))
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let args = Args::parse();
    // Engine logs (e.g. `LAPCE_AI_LOG=ai_engine=debug` for per-request timings) go to stderr.
    ai_engine::cli::init_logging("warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    #[cfg(feature = "embedded")]
    if args.embedded_suite {
        let Some(model) = args.model.clone().or_else(embedded_suite::default_model) else {
            eprintln!("no model: pass --model or set LAPCE_AI_TEST_MODEL");
            std::process::exit(2);
        };
        let threads = args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        let suite = embedded_suite::SuiteArgs {
            model,
            threads,
            llama_python: embedded_suite::find_llama_python(),
            quick: args.quick,
            documents: args.documents,
            cold_only: args.cold_only,
        };
        if let Err(e) = runtime.block_on(embedded_suite::run(suite)) {
            eprintln!("embedded suite failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    if args.quality {
        quality_main(&runtime, &args);
        return;
    }
    let iterations = if args.quick { 300 } else { 5000 };
    let (direct, through) = runtime.block_on(overhead(iterations));
    let context_iterations = if args.quick { 300 } else { 2000 };
    let context_off = runtime.block_on(context_ttft(false, context_iterations));
    let context_on = runtime.block_on(context_ttft(true, context_iterations));
    #[cfg(feature = "embedded")]
    let embedded = runtime.block_on(embedded(
        args.model.clone(),
        if args.quick { 3 } else { 10 },
    ));
    #[cfg(not(feature = "embedded"))]
    let embedded: Result<(Duration, Duration, Percentiles, Percentiles), String> = {
        let _ = &args.model;
        Err("built without the `embedded` feature".into())
    };
    let idle = idle_daemon();

    let mut json = serde_json::json!({
        "iterations": iterations,
        "direct_p50_us": micros(direct.p50),
        "direct_p99_us": micros(direct.p99),
        "overhead_p50_us": micros(through.p50),
        "overhead_p99_us": micros(through.p99),
        "transport_added_p50_us": micros(through.p50.saturating_sub(direct.p50)),
        "context_off_ttft_p50_us": micros(context_off.p50),
        "context_on_ttft_p50_us": micros(context_on.p50),
        "context_added_p50_us": micros(context_on.p50) - micros(context_off.p50),
    });
    match &embedded {
        Ok((cold_ttft, cold_total, warm_ttft, warm_total)) => {
            json["embedded_cold_ttft_ms"] = (cold_ttft.as_secs_f64() * 1e3).into();
            json["embedded_cold_total_ms"] = (cold_total.as_secs_f64() * 1e3).into();
            json["embedded_warm_ttft_p50_ms"] = (warm_ttft.p50.as_secs_f64() * 1e3).into();
            json["embedded_warm_total_p50_ms"] = (warm_total.p50.as_secs_f64() * 1e3).into();
        }
        Err(e) => json["embedded_skipped"] = e.clone().into(),
    }
    if let Some((cpu, rss, anon)) = idle {
        json["idle_cpu_percent"] = cpu.into();
        json["idle_rss_kib"] = rss.into();
        json["idle_rss_anon_kib"] = anon.into();
    }
    if args.json {
        println!("{json}");
        return;
    }
    println!("ai-engine benchmark ({iterations} completions per row; instant provider)");
    println!(
        "{:<48} {:>12} {:>12} {:>14}",
        "measurement", "p50", "p99", "target"
    );
    println!(
        "{:<48} {:>10.1}us {:>10.1}us {:>14}",
        "pipeline called directly (baseline)",
        micros(direct.p50),
        micros(direct.p99),
        ""
    );
    println!(
        "{:<48} {:>10.1}us {:>10.1}us {:>14}",
        "completion through transport + daemon",
        micros(through.p50),
        micros(through.p99),
        "p50 < 200us"
    );
    println!(
        "{:<48} {:>10.1}us {:>10.1}us {:>14}",
        "first token, context from other files off",
        micros(context_off.p50),
        micros(context_off.p99),
        ""
    );
    println!(
        "{:<48} {:>10.1}us {:>10.1}us {:>14}",
        "first token, context on (10 files x 20 KB)",
        micros(context_on.p50),
        micros(context_on.p99),
        "+< 500us p50"
    );
    println!(
        "{:<48} {:>10.1}us {:>12} {:>14}",
        "  added by context (on - off)",
        micros(context_on.p50) - micros(context_off.p50),
        "",
        ""
    );
    match &embedded {
        Ok((cold_ttft, cold_total, warm_ttft, warm_total)) => {
            println!(
                "{:<48} {:>10.1}ms {:>12} {:>14}",
                "embedded cold prompt: first token",
                cold_ttft.as_secs_f64() * 1e3,
                "",
                ""
            );
            println!(
                "{:<48} {:>10.1}ms {:>12} {:>14}",
                "embedded cold prompt: total",
                cold_total.as_secs_f64() * 1e3,
                "",
                ""
            );
            println!(
                "{:<48} {:>10.1}ms {:>10.1}ms {:>14}",
                "embedded repeated prefix: first token",
                warm_ttft.p50.as_secs_f64() * 1e3,
                warm_ttft.p99.as_secs_f64() * 1e3,
                "p50 < 50ms"
            );
            println!(
                "{:<48} {:>10.1}ms {:>10.1}ms {:>14}",
                "embedded repeated prefix: total",
                warm_total.p50.as_secs_f64() * 1e3,
                warm_total.p99.as_secs_f64() * 1e3,
                ""
            );
        }
        Err(e) => println!("embedded model: skipped ({e})"),
    }
    match idle {
        Some((cpu, rss, anon)) => {
            println!(
                "{:<48} {:>11.2}% {:>12} {:>14}",
                "idle daemon CPU (3 s, 1 client)", cpu, "", "0%"
            );
            println!(
                "{:<48} {:>9} KiB {:>12} {:>14}",
                "idle daemon RSS (no model loaded)", rss, "", "< 10 MB"
            );
            println!(
                "{:<48} {:>9} KiB {:>12} {:>14}",
                "idle daemon RssAnon", anon, "", ""
            );
        }
        None => println!("idle daemon: skipped (build the ai-engine binary next to engine-bench)"),
    }
}

#[cfg(feature = "embedded")]
fn quality_main(runtime: &tokio::runtime::Runtime, args: &Args) {
    let options = quality::QualityOptions {
        limit: args.limit,
        seed: args.seed,
        max_tokens: args.max_tokens,
        model: args.model.clone(),
        fim_template: args.fim_template.clone(),
        threads: args.threads,
    };
    if let Err(e) = runtime.block_on(quality::run(options)) {
        eprintln!("engine-bench --quality: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(feature = "embedded"))]
fn quality_main(_runtime: &tokio::runtime::Runtime, _args: &Args) {
    eprintln!("engine-bench --quality needs the `embedded` feature");
    std::process::exit(1);
}
