//! The `lapce-ai-lsp` binary: parses flags, sets up logging to stderr or a file, runs the LSP server.

use std::{path::PathBuf, sync::Arc};

use clap::Parser;
use lapce_ai_lsp::{
    backend::CompletionBackend,
    engine::EngineBackend,
    fake::{FakeBackend, FakeMode},
    server,
    settings::Settings,
};
use lsp_server::Connection;
use tracing_subscriber::EnvFilter;

/// LSP server giving Lapce AI inline completions from ai-engine.
#[derive(Debug, Parser)]
#[command(name = "lapce-ai-lsp", version, about)]
struct Cli {
    /// Write logs to this file instead of stderr.
    #[arg(long, env = "LAPCE_AI_LOG_FILE")]
    log_file: Option<PathBuf>,
    /// Use an in-process fake engine (testing).
    #[arg(long, env = "LAPCE_AI_FAKE_ENGINE", value_enum, hide = true)]
    fake_engine: Option<FakeMode>,
    /// Where the fake engine writes its counters as JSON (testing).
    #[arg(long, env = "LAPCE_AI_FAKE_STATS", hide = true)]
    fake_stats: Option<PathBuf>,
    /// Accepted for compatibility with clients that pass it; stdio is the only transport.
    #[arg(long, hide = true)]
    stdio: bool,
}

fn init_logging(log_file: Option<&PathBuf>) {
    let filter = EnvFilter::try_from_env("LAPCE_AI_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let file = log_file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).init(),
        // stdout is the LSP channel: logs go to stderr.
        None => builder.with_writer(std::io::stderr).init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_file.as_ref());
    let backend: Arc<dyn CompletionBackend> = match cli.fake_engine {
        Some(mode) => {
            tracing::info!(?mode, "using the fake engine");
            Arc::new(FakeBackend::new(mode, cli.fake_stats.clone()))
        }
        None => Arc::new(EngineBackend::new(Settings::default().engine())),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(%err, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (connection, _io_threads) = Connection::stdio();
    runtime.block_on(server::run(connection, backend));
    // The reader thread may still block on stdin (after `exit`): do not join it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::ExitCode::SUCCESS
}
