//! The `ai-engine` command line: argument parsing and the client commands (complete, chat, status, stop, models).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lapce_ai_transport::protocol::{
    ChatMessage, ChatRequest, ChatRole, CompletionMode, CompletionRequest, Shutdown, StatusReply,
    StatusRequest,
};
use lapce_ai_transport::{
    autostart, ClientOptions, Endpoint, ReconnectingClient, StreamEvent, TransportError,
};

use crate::config::EngineConfig;
use crate::daemon::{self, detach};
use crate::engine::default_factory;

/// Exit codes a script can rely on.
pub mod exit {
    pub const OK: u8 = 0;
    /// The request failed (provider error, bad input, ...).
    pub const FAILED: u8 = 1;
    /// Bad command-line usage (clap's own code).
    pub const USAGE: u8 = 2;
    /// No engine could be reached or started.
    pub const NO_ENGINE: u8 = 3;
    /// The configuration is broken.
    pub const CONFIG: u8 = 4;
}

/// The marker that splits stdin into prefix and suffix for `complete`.
pub const CURSOR_MARKER: &str = "<|cursor|>";

#[derive(Parser, Debug)]
#[command(
    name = "ai-engine",
    version,
    about = "AI code completion engine for lapce-ai (one daemon per user)"
)]
pub struct Cli {
    /// Configuration file (default: $XDG_CONFIG_HOME/lapce-ai/engine.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Transport endpoint name.
    #[arg(
        long,
        global = true,
        env = "LAPCE_AI_ENDPOINT",
        default_value = "default"
    )]
    pub endpoint: String,
    /// Do not start an engine when none is running (client commands).
    #[arg(long, global = true)]
    pub no_start: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the engine daemon (foreground unless --detach).
    Serve {
        /// Daemonize; logs go to the XDG state directory.
        #[arg(long)]
        detach: bool,
        /// Exit after this long without clients: `90s`, `30m`, `2h`, a number of minutes, or `never`
        /// (default: engine.toml's `idle_exit_minutes`, else 30 minutes).
        #[arg(long, value_name = "DURATION", value_parser = daemon::parse_idle_exit)]
        idle_exit: Option<daemon::IdleExit>,
    },
    /// One fill-in-the-middle completion, streamed to stdout.
    Complete(CompleteArgs),
    /// A streamed chat answer.
    Chat {
        /// The question.
        prompt: String,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        /// Provider profile (default: the configured chat profile).
        #[arg(long)]
        profile: Option<String>,
        #[arg(long, default_value_t = 0)]
        max_tokens: u32,
    },
    /// Engine statistics.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running engine.
    Stop,
    /// List or download models for the embedded provider.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Args, Debug)]
pub struct CompleteArgs {
    /// File to complete in (with --line and --column); otherwise stdin is read, split at `<|cursor|>`
    /// (all of stdin is the prefix when the marker is absent).
    #[arg(long, requires_all = ["line", "column"])]
    pub file: Option<PathBuf>,
    /// 1-based line of the cursor.
    #[arg(long)]
    pub line: Option<usize>,
    /// 1-based column (in characters) of the cursor.
    #[arg(long)]
    pub column: Option<usize>,
    /// Language id (default: from the file extension).
    #[arg(long)]
    pub language: Option<String>,
    /// Provider profile (default: the configured completion profile).
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    #[arg(long, default_value_t = 0)]
    pub max_tokens: u32,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Mode {
    Auto,
    Single,
    Multi,
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// The built-in catalog and which models are present.
    List,
    /// Download a model (default: the catalog default) into the model cache.
    Pull {
        name: Option<String>,
        /// Target directory (default: $XDG_CACHE_HOME/lapce-ai/models).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Logs to stderr at `default_level`, or as `LAPCE_AI_LOG` says (an `EnvFilter`, e.g. `ai_engine=debug`).
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAPCE_AI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> ExitCode {
    let endpoint = match Endpoint::named(&cli.endpoint) {
        Ok(e) => e,
        Err(e) => return fail(exit::USAGE, &e.to_string()),
    };
    match cli.command {
        Command::Serve {
            detach: true,
            idle_exit,
        } => {
            let idle_exit = idle_exit.map(|i| i.to_string());
            match detach::spawn_detached(&endpoint, cli.config.as_deref(), idle_exit.as_deref()) {
                Ok(detach::Detached::Started { pid, log }) => {
                    println!(
                        "ai-engine started (pid {pid}) on endpoint {:?}; log: {}",
                        endpoint.name(),
                        log.display()
                    );
                    ExitCode::SUCCESS
                }
                Ok(detach::Detached::AlreadyRunning) => {
                    println!(
                        "ai-engine already running on endpoint {:?}",
                        endpoint.name()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(exit::FAILED, &e),
            }
        }
        Command::Serve {
            detach: false,
            idle_exit,
        } => {
            // A missing or broken file does not stop the daemon: it serves once the file is fixed.
            let watched = daemon::config_watch::WatchedConfig::new(cli.config.as_deref());
            let loaded = match &watched {
                Some(watched) => watched.load(),
                None => Ok(EngineConfig::default()),
            };
            let (mut config, error) = match loaded {
                Ok(config) => (config, None),
                Err(error) => {
                    tracing::error!("{error} (requests fail until the file is fixed)");
                    (EngineConfig::default(), Some(error))
                }
            };
            if let Some(idle_exit) = idle_exit {
                config.idle_exit = idle_exit.0;
            }
            let factory = default_factory(&config);
            let start = daemon::StartConfig {
                config,
                error,
                watched,
            };
            match daemon::serve(start, &endpoint, factory) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ TransportError::AlreadyRunning { .. }) => {
                    fail(exit::FAILED, &e.to_string())
                }
                Err(e) => fail(exit::FAILED, &e.to_string()),
            }
        }
        Command::Models { command } => models_command(command),
        command => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    return fail(
                        exit::FAILED,
                        &format!("cannot start the async runtime: {e}"),
                    )
                }
            };
            let mut engine_args = Vec::new();
            if let Some(config) = &cli.config {
                engine_args.push("--config".into());
                engine_args.push(config.clone().into_os_string());
            }
            let code =
                runtime.block_on(client_command(command, endpoint, cli.no_start, engine_args));
            // Do not wait for background work (e.g. a reconnect watcher) when the command is done.
            runtime.shutdown_timeout(Duration::from_millis(100));
            code
        }
    }
}

fn models_command(command: ModelsCommand) -> ExitCode {
    use crate::models;
    match command {
        ModelsCommand::List => {
            let cache = models::model_cache_dir();
            for entry in models::catalog() {
                let present = cache
                    .as_ref()
                    .map(|dir| dir.join(entry.file_name))
                    .filter(|path| path.is_file());
                let size = entry.size_bytes.map_or_else(
                    || "size unknown".to_owned(),
                    |b| format!("{:.0} MB", b as f64 / 1e6),
                );
                let default = if entry.name == models::default_entry().name {
                    " (default)"
                } else if entry.name == models::FALLBACK_MODEL {
                    " (offline fallback)"
                } else {
                    ""
                };
                println!("{}{default}", entry.name);
                println!(
                    "    {} · {size} · template {}",
                    entry.description, entry.prompt_template
                );
                match present {
                    Some(path) => println!("    installed: {}", path.display()),
                    None => println!("    not installed: ai-engine models pull {}", entry.name),
                }
            }
            ExitCode::SUCCESS
        }
        ModelsCommand::Pull { name, dir } => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    return fail(
                        exit::FAILED,
                        &format!("cannot start the async runtime: {e}"),
                    )
                }
            };
            let options = models::PullOptions::default();
            match runtime.block_on(models::pull_model(
                name.as_deref(),
                dir.as_deref(),
                &options,
            )) {
                Ok(path) => {
                    println!("{}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(exit::FAILED, &e.to_string()),
            }
        }
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "ai-engine: {message}");
    ExitCode::from(code)
}

/// Connects to the engine (starting it detached unless told not to) and runs one client command.
async fn client_command(
    command: Command,
    endpoint: Endpoint,
    no_start: bool,
    engine_args: Vec<std::ffi::OsString>,
) -> ExitCode {
    let starter = if no_start {
        None
    } else {
        std::env::current_exe()
            .ok()
            .map(|exe| autostart::starter(exe, engine_args))
    };
    let options = ClientOptions {
        client_name: "ai-engine cli".into(),
        ..ClientOptions::default()
    };
    let wait = if no_start {
        Duration::ZERO
    } else {
        Duration::from_secs(30)
    };
    let reconnecting = ReconnectingClient::new(endpoint.clone(), options, starter, wait);
    if matches!(command, Command::Stop) {
        return stop(&endpoint).await;
    }
    let client = match reconnecting.client().await {
        Ok(c) => c,
        Err(e) => {
            let hint = if no_start {
                " (start one with `ai-engine serve`)"
            } else {
                ""
            };
            return fail(exit::NO_ENGINE, &format!("{e}{hint}"));
        }
    };
    match command {
        Command::Complete(args) => {
            let request = match completion_request(&args) {
                Ok(r) => r,
                Err(e) => return fail(exit::USAGE, &e),
            };
            stream_to_stdout(client.request(&request).await).await
        }
        Command::Chat {
            prompt,
            system,
            profile,
            max_tokens,
        } => {
            let request = ChatRequest {
                profile: profile.unwrap_or_default(),
                system: system.unwrap_or_default(),
                messages: vec![ChatMessage {
                    role: ChatRole::User,
                    content: prompt,
                }],
                max_tokens,
                temperature: None,
            };
            stream_to_stdout(client.request(&request).await).await
        }
        Command::Status { json } => match client.call::<_, StatusReply>(&StatusRequest {}).await {
            Ok(status) => {
                print_status(&status, json);
                ExitCode::SUCCESS
            }
            Err(e) => fail(exit::FAILED, &e.to_string()),
        },
        _ => ExitCode::from(exit::USAGE),
    }
}

async fn stop(endpoint: &Endpoint) -> ExitCode {
    let client =
        match lapce_ai_transport::AsyncClient::connect(endpoint, ClientOptions::default()).await {
            Ok(c) => c,
            Err(TransportError::NoServer(_)) => {
                println!("no engine is running on endpoint {:?}", endpoint.name());
                return ExitCode::SUCCESS;
            }
            Err(TransportError::IncompatibleEngine { pid, .. }) => {
                return stop_other_release(endpoint, pid).await
            }
            Err(e) => return fail(exit::NO_ENGINE, &e.to_string()),
        };
    if let Err(e) = client.notify(&Shutdown {}).await {
        return fail(exit::FAILED, &e.to_string());
    }
    // The engine is gone once it released its lock (it says goodbye to clients just before).
    client.failed().await;
    let lock = endpoint.engine_lock_path();
    let released = tokio::task::spawn_blocking(move || {
        lapce_ai_transport::lockfile::wait_until_released(&lock, Duration::from_secs(10))
    })
    .await
    .unwrap_or(false);
    if !released {
        return fail(exit::FAILED, "the engine did not stop within 10 s");
    }
    println!("ai-engine on endpoint {:?} stopped", endpoint.name());
    ExitCode::SUCCESS
}

/// `stop` for an engine of another release: it cannot read a Shutdown message, so it gets a signal.
async fn stop_other_release(endpoint: &Endpoint, pid: u32) -> ExitCode {
    let stopping = endpoint.clone();
    let stopped = tokio::task::spawn_blocking(move || {
        lapce_ai_transport::reconnect::stop_incompatible_engine(&stopping, pid)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|result| result.map_err(|e| e.to_string()));
    match stopped {
        Ok(()) => {
            println!(
                "stopped the engine of another lapce-ai release on endpoint {:?} (pid {pid})",
                endpoint.name()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit::FAILED, &e),
    }
}

async fn stream_to_stdout(
    stream: Result<lapce_ai_transport::ResponseStream, TransportError>,
) -> ExitCode {
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => return fail(exit::FAILED, &e.to_string()),
    };
    let mut stdout = std::io::stdout();
    while let Some(event) = stream.next().await {
        match event {
            Ok(StreamEvent::Chunk { text, .. }) => {
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
            Ok(StreamEvent::End(end)) => {
                let _ = writeln!(stdout);
                tracing::debug!(?end, "stream ended");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                let _ = writeln!(stdout);
                return fail(exit::FAILED, &e.to_string());
            }
        }
    }
    ExitCode::SUCCESS
}

/// Builds the request from `--file/--line/--column` or from stdin.
fn completion_request(args: &CompleteArgs) -> Result<CompletionRequest, String> {
    let (prefix, suffix, language) = match (&args.file, args.line, args.column) {
        (Some(file), Some(line), Some(column)) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let (prefix, suffix) = split_at_position(&text, line, column)?;
            let language = file
                .extension()
                .and_then(|e| e.to_str())
                .map(language_from_extension)
                .unwrap_or_default();
            (prefix, suffix, language)
        }
        _ => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
            match text.split_once(CURSOR_MARKER) {
                Some((p, s)) => (p.to_owned(), s.to_owned(), String::new()),
                None => (text, String::new(), String::new()),
            }
        }
    };
    Ok(CompletionRequest {
        profile: args.profile.clone().unwrap_or_default(),
        language_id: args.language.clone().unwrap_or(language),
        file_path: args
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
        prefix,
        suffix,
        mode: match args.mode {
            Mode::Auto => CompletionMode::Auto,
            Mode::Single => CompletionMode::SingleLine,
            Mode::Multi => CompletionMode::MultiLine,
        },
        max_tokens: args.max_tokens,
        temperature: None,
        max_lines: 0,
    })
}

/// Splits `text` at a 1-based line and 1-based character column (a column past the end means end of line).
pub fn split_at_position(
    text: &str,
    line: usize,
    column: usize,
) -> Result<(String, String), String> {
    if line == 0 || column == 0 {
        return Err("--line and --column are 1-based".into());
    }
    let mut offset = 0;
    let mut lines = text.split_inclusive('\n');
    for _ in 1..line {
        offset += lines
            .next()
            .ok_or_else(|| format!("the file has fewer than {line} lines"))?
            .len();
    }
    let current = lines.next().unwrap_or("");
    let content = current.strip_suffix('\n').unwrap_or(current);
    let within: usize = content.chars().take(column - 1).map(char::len_utf8).sum();
    let at = offset + within;
    Ok((text[..at].to_owned(), text[at..].to_owned()))
}

fn language_from_extension(extension: &str) -> String {
    match extension {
        "rs" => "rust",
        "py" => "python",
        "js" | "mjs" | "cjs" => "javascript",
        "ts" => "typescript",
        "tsx" => "typescriptreact",
        "go" => "go",
        "c" | "h" => "c",
        "cc" | "cpp" | "hpp" => "cpp",
        "java" => "java",
        "rb" => "ruby",
        "sh" => "shellscript",
        other => other,
    }
    .to_owned()
}

/// The `idle exit` line of `status`: never, in how long, or not while clients are connected.
fn describe_idle_exit(status: &StatusReply) -> String {
    if status.idle_exit_after_ms == 0 {
        return "never".into();
    }
    let after = Duration::from_millis(status.idle_exit_after_ms).as_secs();
    if status.idle_exit_in_ms == u64::MAX {
        return format!("{after}s after the last client leaves (clients connected)");
    }
    format!(
        "in {}s (after {after}s without clients)",
        Duration::from_millis(status.idle_exit_in_ms).as_secs()
    )
}

fn print_status(status: &StatusReply, json: bool) {
    let ms = |us: u64| us as f64 / 1000.0;
    if json {
        let value = serde_json::json!({
            "endpoint": status.endpoint,
            "pid": status.engine_pid,
            "version": status.engine_version,
            "uptime_ms": status.uptime_ms,
            "completion": { "provider": status.completion_provider, "model": status.completion_model },
            "chat": { "provider": status.chat_provider, "model": status.chat_model },
            "connections": status.connections,
            "requests": status.requests,
            "cancels": status.cancels,
            "errors": status.errors,
            "cache_hits": status.cache_hits,
            "time_to_first_token_ms": { "p50": ms(status.time_to_first_token_p50_us), "p95": ms(status.time_to_first_token_p95_us) },
            "total_ms": { "p50": ms(status.total_p50_us), "p95": ms(status.total_p95_us) },
            "local_model": {
                "state": status.model_state,
                "cpu": status.cpu_backend,
                "gpu": status.gpu_backend,
                "note": status.model_note,
            },
            "config_error": (!status.config_error.is_empty()).then_some(&status.config_error),
            "idle_exit": {
                "after_ms": (status.idle_exit_after_ms > 0).then_some(status.idle_exit_after_ms),
                "in_ms": (status.idle_exit_in_ms != u64::MAX).then_some(status.idle_exit_in_ms),
            },
        });
        println!("{value:#}");
        return;
    }
    let uptime = Duration::from_millis(status.uptime_ms);
    println!(
        "ai-engine {} (pid {}) on endpoint {:?}, up {}s",
        status.engine_version,
        status.engine_pid,
        status.endpoint,
        uptime.as_secs()
    );
    println!(
        "  completion   {} · {}",
        status.completion_provider, status.completion_model
    );
    println!(
        "  chat         {} · {}",
        status.chat_provider, status.chat_model
    );
    if !status.model_state.is_empty() {
        println!("  local model  {}", status.model_state);
        let gpu = if status.gpu_backend.is_empty() {
            "no GPU backend"
        } else {
            status.gpu_backend.as_str()
        };
        println!("  hardware     {} · {gpu}", status.cpu_backend);
    }
    if !status.model_note.is_empty() {
        println!("  note         {}", status.model_note);
    }
    if !status.config_error.is_empty() {
        println!("  config       {}", status.config_error);
    }
    println!("  connections  {}", status.connections);
    println!("  idle exit    {}", describe_idle_exit(status));
    println!(
        "  requests     {} ({} cancelled, {} failed, {} cache hits)",
        status.requests, status.cancels, status.errors, status.cache_hits
    );
    println!(
        "  first token  p50 {:.1} ms · p95 {:.1} ms",
        ms(status.time_to_first_token_p50_us),
        ms(status.time_to_first_token_p95_us)
    );
    println!(
        "  total        p50 {:.1} ms · p95 {:.1} ms",
        ms(status.total_p50_us),
        ms(status.total_p95_us)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_characters() {
        let text = "fn main() {\n    let é = 1;\n}\n";
        let (p, s) = split_at_position(text, 2, 10).unwrap();
        assert_eq!(p, "fn main() {\n    let é");
        assert_eq!(s, " = 1;\n}\n");
        let (p, s) = split_at_position(text, 2, 999).unwrap();
        assert!(p.ends_with("= 1;") && s == "\n}\n");
        assert!(split_at_position(text, 9, 1).is_err());
        assert!(split_at_position(text, 0, 1).is_err());
    }
}
