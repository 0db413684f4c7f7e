//! A separate process for transport tests and benchmarks: a scripted server, or a client that streams.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lapce_ai_testkit::{scripted_request, ScriptedHandler, ScriptedPeer};
use lapce_ai_transport::protocol::Ping;
use lapce_ai_transport::segment::SlotSegment;
use lapce_ai_transport::{
    AsyncClient, Client, ClientOptions, Endpoint, Server, ServerOptions, StreamEvent,
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
    /// Connect, ping and disconnect in a loop (16 KiB rings), after printing `connecting`; for tests that kill
    /// the process at an arbitrary point of a handshake.
    ConnectLoop,
    /// Become `uid` (needs root), create a sealed slot segment and print `segment <pid> <memfd> <generation>`;
    /// then answer each stdin line with `untouched` or `touched` (did anyone write a reply or close mark into
    /// it). For tests of a segment another user offers the engine.
    ForeignSegment {
        #[arg(long)]
        uid: u32,
    },
    /// Act as an engine of another release: hold engine.lock with an identity line of rendezvous `version`
    /// (none: the line releases before the version field wrote), print `ready`, and wait until killed.
    OldEngine {
        #[arg(long)]
        version: Option<u32>,
        /// Ignore SIGTERM (a stuck engine that only SIGKILL ends).
        #[arg(long)]
        ignore_sigterm: bool,
    },
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
        Role::ConnectLoop => {
            let options = ClientOptions {
                client_to_server_ring_bytes: 16 * 1024,
                server_to_client_ring_bytes: 16 * 1024,
                ..ClientOptions::default()
            };
            println!("connecting");
            std::io::stdout().flush()?;
            for nonce in 0u64.. {
                let mut client = Client::connect(&endpoint, options.clone())?;
                let ping = Ping {
                    nonce,
                    payload: Vec::new(),
                };
                client.send(nonce, &ping, Duration::from_secs(5))?;
                client.recv(Duration::from_secs(5))?;
            }
        }
        Role::ForeignSegment { uid } => foreign_segment(uid)?,
        Role::OldEngine {
            version,
            ignore_sigterm,
        } => {
            use lapce_ai_transport::lockfile::{HeldLock, TryLock};
            if ignore_sigterm {
                // SAFETY: installing SIG_IGN has no handler code to be unsafe in.
                unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            }
            endpoint.ensure_dirs()?;
            let TryLock::Acquired(lock) = HeldLock::try_acquire(&endpoint.engine_lock_path())?
            else {
                return Err("engine.lock is taken".into());
            };
            lock.file().set_len(4096)?;
            let line = match version {
                Some(v) => format!("{} rendezvous={v}", std::process::id()),
                None => std::process::id().to_string(),
            };
            lapce_ai_transport::segment::write_identity_line(lock.file(), &line)?;
            println!("ready");
            std::io::stdout().flush()?;
            // Until killed (a SIGTERM ends the process and the kernel frees the lock), or stdin closes.
            let mut line = String::new();
            while std::io::stdin().lock().read_line(&mut line)? > 0 {
                line.clear();
            }
            lock.remove();
        }
    }
    Ok(())
}

/// See [`Role::ForeignSegment`].
fn foreign_segment(uid: u32) -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: plain syscalls; the process is single-threaded here apart from tokio's idle workers, and
    // setresgid/setresuid apply to every thread (glibc's set*id broadcast).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(uid, uid, uid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(format!("becoming uid {uid}: {}", std::io::Error::last_os_error()).into());
        }
    }
    let generation = 0x0f0e_1a9e_u64;
    let segment = SlotSegment::create(4096, 4096, generation)?;
    let memfd = segment
        .memfd_number()
        .ok_or("a segment without its memfd")?;
    println!("segment {} {memfd} {generation}", std::process::id());
    std::io::stdout().flush()?;
    // SAFETY: this process never connects, so these are the segment's only ends.
    let (_producer, consumer) = unsafe { segment.client_ends()? };
    let mut line = String::new();
    let stdin = std::io::stdin();
    while stdin.lock().read_line(&mut line)? > 0 {
        line.clear();
        let touched = segment.server_closed() || consumer.has_data();
        println!("{}", if touched { "touched" } else { "untouched" });
        std::io::stdout().flush()?;
    }
    Ok(())
}
