//! The `ai-engine` binary: parses the command line and runs it.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ai_engine::cli::Cli::parse();
    // The daemon logs its life at info; client commands only say something when it matters.
    let default_level = match cli.command {
        ai_engine::cli::Command::Serve { .. } => "info",
        _ => "warn",
    };
    ai_engine::cli::init_logging(default_level);
    ai_engine::cli::run(cli)
}
