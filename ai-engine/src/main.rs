//! The `ai-engine` binary: parses the command line and runs it.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ai_engine::cli::Cli::parse();
    // The daemon logs its life at info; client commands only say something when it matters.
    let default_level = match cli.command {
        ai_engine::cli::Command::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAPCE_AI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    ai_engine::cli::run(cli)
}
