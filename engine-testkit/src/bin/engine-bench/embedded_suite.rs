//! `engine-bench --embedded-suite`: the embedded model against llama.cpp (llama-cpp-python), quiet and under load.
//!
//! Same GGUF, same thread count, same prompts, in one run: cold prompt evaluation and generation speed next to
//! llama.cpp built for this CPU; then the editing scenarios (typing with a suffix under two FIM layouts, returning
//! to one of three files, the first keystroke after prefill, completions while a chat streams). Everything runs
//! once on a quiet machine and once beside two CPU-bound processes; the table shows both and the ratios.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ai_engine::completion::{self, ContextBudget, PromptStyle};
use ai_engine::provider::embedded::{EmbeddedOptions, EmbeddedProvider, RequestMetrics};
use ai_engine::provider::{ChatRole, ChatTurn, GenerationRequest, Prompt};
use futures::StreamExt;
use lapce_ai_transport::protocol::{CompletionMode, CompletionRequest};

/// Options of the suite (from the command line).
pub struct SuiteArgs {
    pub model: PathBuf,
    pub threads: u32,
    /// Python with `llama_cpp` importable (llama-cpp-python); `None` skips the comparison.
    pub llama_python: Option<PathBuf>,
    pub quick: bool,
    /// KV sequences kept (`documents` of the embedded profile); `None` takes the engine's default.
    pub documents: Option<u32>,
    /// Only the cold prompts next to llama.cpp (skips the editing scenarios).
    pub cold_only: bool,
}

/// Finds a Python interpreter with llama-cpp-python: `LAPCE_AI_LLAMA_PYTHON`, then the venvs under
/// `~/.cache/lapce-ai/` whose name starts with `llama-server-venv`.
pub fn find_llama_python() -> Option<PathBuf> {
    let explicit = std::env::var_os("LAPCE_AI_LLAMA_PYTHON").map(PathBuf::from);
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/lapce-ai"))
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("llama-server-venv")
        })
        .map(|e| e.path().join("bin/python"));
    explicit.into_iter().chain(cached).find(|python| {
        Command::new(python)
            .args(["-c", "import llama_cpp"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Two busy loops, killed on drop: "a build running beside the editor".
struct Load(Vec<Child>);

impl Load {
    fn start(processes: usize) -> Self {
        Self(
            (0..processes)
                .filter_map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .ok()
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Python file of about `bytes` bytes whose content depends on `seed` (distinct files share no tokens).
fn source_file(seed: usize, bytes: usize) -> String {
    let mut text = format!("# module {seed}: generated for the benchmark\nimport math\n\n");
    let mut i = 0;
    while text.len() < bytes {
        text.push_str(&format!(
            "def f{seed}_{i}(values, scale={i}):\n    total = 0\n    for v in values:\n        if v % {m} == {r}:\n            total += math.sqrt(v * scale + {seed})\n    return total\n\n",
            m = i % 7 + 2,
            r = i % 3,
        ));
        i += 1;
    }
    text.truncate(bytes);
    text
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn raw(text: String, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        prompt: Prompt::Raw(text),
        max_tokens,
        temperature: 0.0,
        stop: Vec::new(),
        extra_context: Vec::new(),
        completion: None,
    }
}

/// The provider request a completion at the end of `prefix` would make under `style` (budget, template).
fn completion_request(prefix: &str, suffix: &str, style: &PromptStyle) -> GenerationRequest {
    let request = CompletionRequest {
        language_id: "python".into(),
        prefix: prefix.into(),
        suffix: suffix.into(),
        mode: CompletionMode::SingleLine,
        max_tokens: 8,
        ..CompletionRequest::default()
    };
    completion::prepare_completion(&request, style.clone(), ContextBudget::default(), 8, 0.0)
        .request
}

async fn run_one(provider: &EmbeddedProvider, request: GenerationRequest) -> RequestMetrics {
    let (mut stream, metrics) = provider.generate_with_metrics(request);
    while stream.next().await.is_some() {}
    metrics.await.unwrap_or_default()
}

fn ttft(m: &RequestMetrics) -> Duration {
    m.ttft.unwrap_or(m.total)
}

/// One row of results: name, value, unit, and the llama.cpp value when there is one.
struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    llama: Option<f64>,
}

fn row(name: impl Into<String>, value: f64, unit: &'static str) -> Row {
    let name = name.into();
    eprintln!("  {name}: {value:.1} {unit}");
    Row {
        name,
        value,
        unit,
        llama: None,
    }
}

/// llama.cpp through llama-cpp-python in a child process, fed one prompt at a time: cold prompt evaluation and
/// generation speed for the same prompts, measured right after the engine's run of each prompt so both see the
/// same machine.
struct LlamaCpp {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl LlamaCpp {
    const SCRIPT: &'static str = r#"
import json, sys, time
from llama_cpp import Llama
model, threads, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
for line in sys.stdin:
    text = json.loads(line)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    prompt_s = time.perf_counter() - t0
    first = llm.sample(temp=0.0)
    ttft_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tok = first
    for _ in range(gen):
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
    gen_s = time.perf_counter() - t1
    print(json.dumps([len(tokens) / prompt_s, gen / gen_s, ttft_s]), flush=True)
"#;

    fn start(args: &SuiteArgs, gen_tokens: u32) -> Result<Self, String> {
        let Some(python) = &args.llama_python else {
            return Err("no python with llama_cpp (set LAPCE_AI_LLAMA_PYTHON)".into());
        };
        let mut child = Command::new(python)
            .args(["-c", Self::SCRIPT])
            .arg(&args.model)
            .arg(args.threads.to_string())
            .arg(gen_tokens.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut llama = Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        // Not counted: the first evaluation allocates llama.cpp's compute buffers.
        llama.run(&source_file(99, 500))?;
        Ok(llama)
    }

    /// (prompt tok/s, generated tok/s, time to first token in s) for one cold prompt.
    fn run(&mut self, prompt: &str) -> Result<(f64, f64, f64), String> {
        let line = serde_json::to_string(prompt).map_err(|e| e.to_string())?;
        writeln!(self.stdin, "{line}").map_err(|e| e.to_string())?;
        let answer = self
            .lines
            .next()
            .ok_or("llama-cpp-python exited")?
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&answer).map_err(|e| e.to_string())
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every measurement under the current machine load.
async fn scenarios(args: &SuiteArgs, rows: &mut Vec<Row>, label: &str) -> Result<(), String> {
    let files = if args.quick { 3 } else { 6 };
    let gen_tokens = 32;
    // Cold prompts: ~2000 characters (~600 tokens) each, all different.
    let prompts: Vec<String> = (0..files).map(|i| source_file(100 + i, 2000)).collect();
    let defaults = EmbeddedOptions::default();
    let options = EmbeddedOptions {
        threads: Some(args.threads),
        documents: args.documents.unwrap_or(defaults.documents),
        ..defaults
    };
    let provider = EmbeddedProvider::new(&args.model, options);
    provider.wait_loaded().await.map_err(|e| e.to_string())?;
    let mut llama = LlamaCpp::start(args, gen_tokens);
    let mut prompt_rates = Vec::new();
    let mut ttfts = Vec::new();
    let mut gen_rates = Vec::new();
    let mut llama_results = Vec::new();
    for prompt in &prompts {
        let m = run_one(&provider, raw(prompt.clone(), gen_tokens + 1)).await;
        let decoded = m.prompt_tokens.saturating_sub(m.reused_tokens) as f64;
        prompt_rates.push(decoded / m.prompt_eval.as_secs_f64().max(1e-9));
        ttfts.push(ttft(&m));
        let generating = m.total.saturating_sub(ttft(&m)).as_secs_f64().max(1e-9);
        gen_rates.push(f64::from(m.generated_tokens.saturating_sub(1)) / generating);
        if let Ok(l) = &mut llama {
            match l.run(prompt) {
                Ok(v) => llama_results.push(v),
                Err(e) => llama = Err(e),
            }
        }
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let llama = llama.map(|_| llama_results);
    let (l_prompt, l_gen, l_ttft) = match &llama {
        Ok(v) => (
            Some(median(&v.iter().map(|x| x.0).collect::<Vec<_>>())),
            Some(median(&v.iter().map(|x| x.1).collect::<Vec<_>>())),
            Some(median(&v.iter().map(|x| x.2 * 1e3).collect::<Vec<_>>())),
        ),
        Err(e) => {
            eprintln!("llama.cpp comparison skipped: {e}");
            (None, None, None)
        }
    };
    let max_ttft = ttfts.iter().max().copied().unwrap_or_default();
    let ttft_ms: Vec<f64> = ttfts.iter().map(|d| ms(*d)).collect();
    rows.push(Row {
        llama: l_prompt,
        ..row(
            format!("{label}: cold prompt tok/s (median of {files})"),
            median(&prompt_rates),
            "tok/s",
        )
    });
    rows.push(Row {
        llama: l_gen,
        ..row(
            format!("{label}: generated tok/s"),
            median(&gen_rates),
            "tok/s",
        )
    });
    rows.push(Row {
        llama: l_ttft,
        ..row(
            format!("{label}: cold TTFT p50 (~600 tok)"),
            median(&ttft_ms),
            "ms",
        )
    });
    let l_max = llama
        .as_ref()
        .ok()
        .map(|v| v.iter().map(|x| x.2 * 1e3).fold(0.0, f64::max));
    rows.push(Row {
        llama: l_max,
        ..row(format!("{label}: cold TTFT max"), ms(max_ttft), "ms")
    });
    if args.cold_only {
        return Ok(());
    }

    // Typing 30 characters at the end of a 20 KB file with a 2 KB suffix, PSM vs SPM templates; then 90
    // characters over three new lines under PSM, where finishing a line can move the start of the middle.
    let letters: String = (0..30).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let lines =
        "    x = compute(values, 1)\n    y = compute(values, 2)\n    z = compute(values, 3)\n";
    for (name, template, typed) in [
        ("PSM (qwen2.5-coder)", "qwen2.5-coder", letters.as_str()),
        ("SPM (codestral)", "codestral", letters.as_str()),
        ("PSM, 3 new lines", "qwen2.5-coder", lines),
    ] {
        let style = PromptStyle::from_name(template).map_err(|e| e.to_string())?;
        let file = source_file(7, 20_000);
        let suffix = source_file(8, 2_000);
        let mut prefix = file.clone();
        run_one(&provider, completion_request(&prefix, &suffix, &style)).await;
        let mut samples = Vec::new();
        let keystrokes = if args.quick { 10 } else { typed.len() };
        for ch in typed.chars().take(keystrokes) {
            prefix.push(ch);
            let m = run_one(&provider, completion_request(&prefix, &suffix, &style)).await;
            samples.push(ttft(&m));
        }
        rows.push(row(
            format!("{label}: typing, 2 KB suffix, {name}: TTFT p50"),
            ms(percentile(&samples, 0.5)),
            "ms",
        ));
        rows.push(row(
            format!("{label}: typing, 2 KB suffix, {name}: TTFT p95"),
            ms(percentile(&samples, 0.95)),
            "ms",
        ));
    }

    // Switching between three open 20 KB files: time to first token on returning to one.
    let style = PromptStyle::from_name("codestral").map_err(|e| e.to_string())?;
    let docs: Vec<String> = (0..3).map(|i| source_file(200 + i, 20_000)).collect();
    let suffix = "\n\nif __name__ == \"__main__\":\n    main()\n";
    for doc in &docs {
        run_one(&provider, completion_request(doc, suffix, &style)).await;
    }
    let mut returns = Vec::new();
    for round in 0..3 {
        for doc in &docs {
            let edited = format!("{doc}{}", char::from(b'x' + round as u8));
            returns.push(ttft(
                &run_one(&provider, completion_request(&edited, suffix, &style)).await,
            ));
        }
    }
    rows.push(row(
        format!("{label}: return to 1 of 3 files: TTFT p50"),
        ms(percentile(&returns, 0.5)),
        "ms",
    ));

    // First keystroke after open + prefill, next to one without prefill.
    let opened = source_file(300, 20_000);
    let (mut prefill, done) =
        provider.prefill_with_metrics(completion_request(&opened, suffix, &style));
    while prefill.next().await.is_some() {}
    let _ = done.await;
    let after_prefill = run_one(
        &provider,
        completion_request(&format!("{opened}r"), suffix, &style),
    )
    .await;
    let cold = source_file(301, 20_000);
    let without = run_one(
        &provider,
        completion_request(&format!("{cold}r"), suffix, &style),
    )
    .await;
    rows.push(Row {
        llama: None,
        ..row(
            format!("{label}: first keystroke after open+prefill: TTFT"),
            ms(ttft(&after_prefill)),
            "ms",
        )
    });
    rows.push(row(
        format!("{label}: first keystroke, no prefill: TTFT"),
        ms(ttft(&without)),
        "ms",
    ));

    // Completions while a chat answer streams, next to the same completions alone.
    let base = source_file(400, 6_000);
    run_one(&provider, completion_request(&base, suffix, &style)).await;
    let mut alone = Vec::new();
    let mut typed = base.clone();
    for i in 0..5 {
        typed.push(char::from(b'a' + i as u8));
        alone.push(ttft(
            &run_one(&provider, completion_request(&typed, suffix, &style)).await,
        ));
    }
    let chat = GenerationRequest {
        prompt: Prompt::Chat {
            system: None,
            messages: vec![ChatTurn {
                role: ChatRole::User,
                content: "Explain in detail how a hash map works, with examples.".into(),
            }],
        },
        max_tokens: 400,
        temperature: 0.0,
        stop: Vec::new(),
        extra_context: Vec::new(),
        completion: None,
    };
    let (mut chat_stream, _chat_metrics) = provider.generate_with_metrics(chat);
    let _ = chat_stream.next().await; // the chat is generating
    let chat_task = tokio::spawn(async move { while chat_stream.next().await.is_some() {} });
    let mut beside_chat = Vec::new();
    for i in 0..5 {
        typed.push(char::from(b'k' + i as u8));
        beside_chat.push(ttft(
            &run_one(&provider, completion_request(&typed, suffix, &style)).await,
        ));
    }
    chat_task.abort();
    let alone_p50 = ms(percentile(&alone, 0.5));
    let beside_p50 = ms(percentile(&beside_chat, 0.5));
    rows.push(row(
        format!("{label}: completion alone: TTFT p50"),
        alone_p50,
        "ms",
    ));
    rows.push(row(
        format!("{label}: completion beside a chat: TTFT p50"),
        beside_p50,
        "ms",
    ));
    Ok(())
}

/// Runs the suite quiet and under load and prints the table.
pub async fn run(args: SuiteArgs) -> Result<(), String> {
    let mut rows = Vec::new();
    scenarios(&args, &mut rows, "quiet").await?;
    {
        let _load = Load::start(2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        scenarios(&args, &mut rows, "2 busy processes").await?;
    }
    println!(
        "embedded model vs llama.cpp: {} ({} threads)",
        args.model.display(),
        args.threads
    );
    println!(
        "{:<62} {:>12} {:>12} {:>8}",
        "measurement", "engine", "llama.cpp", "ratio"
    );
    for r in &rows {
        let (llama, ratio) = match r.llama {
            Some(l) if r.unit == "tok/s" => {
                (format!("{l:.1}"), format!("{:.2}x", l / r.value.max(1e-9)))
            }
            Some(l) => (format!("{l:.1}"), format!("{:.2}x", r.value / l.max(1e-9))),
            None => (String::new(), String::new()),
        };
        println!(
            "{:<62} {:>8.1} {:<5} {:>10} {:>8}",
            r.name, r.value, r.unit, llama, ratio
        );
    }
    println!("(ratio: engine time / llama.cpp time, or llama.cpp rate / engine rate: above 1 the engine is slower)");
    Ok(())
}

/// The default model for the suite: the test model (`LAPCE_AI_TEST_MODEL`), else the resolved default.
pub fn default_model() -> Option<PathBuf> {
    std::env::var_os("LAPCE_AI_TEST_MODEL")
        .map(PathBuf::from)
        .filter(|p| Path::new(p).is_file())
        .or_else(|| {
            ai_engine::models::resolve_default(None)
                .ok()
                .map(|(_, r)| r.path)
        })
}
