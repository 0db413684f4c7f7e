//! A separate process for transport tests and benchmarks: a scripted server, or a client that streams.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lapce_ai_testkit::{scripted_request, ScriptedHandler, ScriptedPeer};
use lapce_ai_transport::{
    AsyncClient, ClientOptions, Endpoint, Server, ServerOptions, StreamEvent,
};

#[derive(Parser)]
#[command(about = "Test peer for the lapce-ai transport (not the engine)")]
struct Args {
    /// Endpoint name.
    #[arg(long)]
    endpoint: String,
    /// Rendezvous root directory (default: the per-user runtime dir).
    #[arg(long)]
    root: Option<PathBuf>,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Serve scripted streams until stdin closes, then shut down gracefully.
    Serve,
    /// Connect, start a slow endless stream, print `streaming` after the first chunk, then keep reading.
    StreamForever,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let endpoint = match &args.root {
        Some(root) => Endpoint::in_root(&args.endpoint, root)?,
        None => Endpoint::named(&args.endpoint)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.role {
        Role::Serve => {
            let peer = ScriptedPeer::new(runtime.handle().clone());
            let server = Server::bind(
                &endpoint,
                ServerOptions::default(),
                Arc::new(ScriptedHandler(peer)),
            )?;
            println!("ready {}", std::process::id());
            std::io::stdout().flush()?;
            // Serve until our parent closes stdin.
            let mut line = String::new();
            let stdin = std::io::stdin();
            while stdin.lock().read_line(&mut line)? > 0 {
                line.clear();
            }
            server.shutdown();
        }
        Role::StreamForever => runtime.block_on(async {
            let client = AsyncClient::connect(&endpoint, ClientOptions::default()).await?;
            let request = scripted_request("x", u32::MAX, Some(Duration::from_millis(1)));
            let mut stream = client.request(&request).await?;
            let mut announced = false;
            while let Some(event) = stream.next().await {
                if let StreamEvent::Chunk { .. } = event? {
                    if !announced {
                        println!("streaming");
                        std::io::stdout().flush()?;
                        announced = true;
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error>>(())
        })?,
    }
    Ok(())
}
