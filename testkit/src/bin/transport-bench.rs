//! Side-by-side transport benchmark: shm-ring round trip vs a busy-poll floor, Unix sockets and Node.js IPC.
//!
//! One invocation spawns its own peers (this executable with a hidden `__child <role>` argument) and prints a
//! table, or with `--json` one JSON object. Flags: `--json`, `--quick` (smoke-test sizes), `--skip-node`,
//! `--only <phase>` (`connect`: only the 1000 sequential connects of the transport phase).
//! Progress goes to stderr. Every child is killed and reaped and every shared-memory name is checked gone on
//! every exit path.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapce_ai_testkit::{ScriptedHandler, ScriptedPeer};
use lapce_ai_transport::protocol::{
    FrameHeader, MessageType, Ping, Pong, StatusReply, StatusRequest, FRAME_HEADER_LEN,
};
use lapce_ai_transport::server::{ServerConnection, ServerHandler};
use lapce_ai_transport::{
    AsyncClient, Client, ClientOptions, Endpoint, ReceivedMessage, Server, ServerOptions,
};

type BoxError = Box<dyn std::error::Error>;
type Res<T> = Result<T, BoxError>;

const PAYLOAD: usize = 64;
const T: Duration = Duration::from_secs(10);
const CHILD_ARG: &str = "__child";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some(CHILD_ARG) {
        child_main(&args[1..])
    } else {
        parent_main(&args)
    };
    if let Err(e) = result {
        eprintln!("transport-bench: error: {e}");
        std::process::exit(1);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Parent: orchestration and reporting
// ------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Sizes {
    rtt_warmup: usize,
    rtt_iters: usize,
    floor_iters: usize,
    uds_iters: usize,
    node_iters: usize,
    msgs_64b: u64,
    mib_msgs: u64,
    memcpy_iters: usize,
    connect_clients: usize,
    idle_secs: f64,
}

impl Sizes {
    fn full() -> Self {
        Self {
            rtt_warmup: 20_000,
            rtt_iters: 200_000,
            floor_iters: 500_000,
            uds_iters: 50_000,
            node_iters: 50_000,
            msgs_64b: 4_000_000,
            mib_msgs: 512,
            memcpy_iters: 2_000,
            connect_clients: 1000,
            idle_secs: 3.0,
        }
    }

    fn quick() -> Self {
        Self {
            rtt_warmup: 500,
            rtt_iters: 5_000,
            floor_iters: 20_000,
            uds_iters: 2_000,
            node_iters: 2_000,
            msgs_64b: 100_000,
            mib_msgs: 16,
            memcpy_iters: 100,
            connect_clients: 1000,
            idle_secs: 0.5,
        }
    }
}

/// An ordered flat JSON object of numbers, strings and nulls.
#[derive(Default)]
struct Report {
    entries: Vec<(String, Value)>,
}

enum Value {
    Num(f64),
    Str(String),
    Null,
}

impl Report {
    fn num(&mut self, key: &str, value: f64) {
        self.entries.push((key.to_owned(), Value::Num(value)));
    }
    fn str(&mut self, key: &str, value: impl Into<String>) {
        self.entries
            .push((key.to_owned(), Value::Str(value.into())));
    }
    fn null(&mut self, key: &str) {
        self.entries.push((key.to_owned(), Value::Null));
    }
    fn get(&self, key: &str) -> Option<f64> {
        self.entries.iter().find_map(|(k, v)| match v {
            Value::Num(n) if k == key => Some(*n),
            _ => None,
        })
    }
    fn get_str(&self, key: &str) -> Option<&str> {
        self.entries.iter().find_map(|(k, v)| match v {
            Value::Str(s) if k == key => Some(s.as_str()),
            _ => None,
        })
    }
    fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"{}\":", escape(k));
            match v {
                Value::Num(n) if n.is_finite() => {
                    if n.fract() == 0.0 && n.abs() < 1e15 {
                        let _ = write!(out, "{}", *n as i64);
                    } else {
                        let _ = write!(out, "{n:.3}");
                    }
                }
                Value::Num(_) | Value::Null => out.push_str("null"),
                Value::Str(s) => {
                    let _ = write!(out, "\"{}\"", escape(s));
                }
            }
        }
        out.push('}');
        out
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Percentiles of a latency sample in nanoseconds.
struct Percentiles {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

fn percentiles(mut samples: Vec<u64>) -> Percentiles {
    samples.sort_unstable();
    let at = |q: f64| {
        if samples.is_empty() {
            return 0;
        }
        let idx = ((samples.len() as f64 * q).ceil() as usize).saturating_sub(1);
        samples[idx.min(samples.len() - 1)]
    };
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: samples.last().copied().unwrap_or(0),
    }
}

fn record(report: &mut Report, prefix: &str, p: &Percentiles, iterations: usize) {
    report.num(&format!("{prefix}_p50_ns"), p.p50 as f64);
    report.num(&format!("{prefix}_p99_ns"), p.p99 as f64);
    report.num(&format!("{prefix}_p999_ns"), p.p999 as f64);
    report.num(&format!("{prefix}_max_ns"), p.max as f64);
    report.num(&format!("{prefix}_iterations"), iterations as f64);
}

fn progress(what: &str) {
    eprintln!("transport-bench: {what}");
}

fn parent_main(args: &[String]) -> Res<()> {
    let mut json = false;
    let mut quick = false;
    let mut skip_node = false;
    let mut only: Option<String> = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--only" => only = Some(args.next().ok_or("--only needs a phase name")?.clone()),
            "--json" => json = true,
            "--quick" => quick = true,
            "--skip-node" => skip_node = true,
            "-h" | "--help" => {
                println!(
                    "usage: transport-bench [--json] [--quick] [--skip-node] \
                     [--only transport|connect|throughput|floor|uds|node]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)").into()),
        }
    }
    let sizes = if quick { Sizes::quick() } else { Sizes::full() };
    raise_nofile_limit();
    let workspace = BenchDir::new()?;
    let mut report = Report::default();
    report.str("mode", if quick { "quick" } else { "full" });
    report.num("nproc", available_cpus() as f64);
    report.str("load_avg_start", load_average());
    report.str("rendezvous_dir", describe_dir(&workspace.path));

    let run = |phase: &str| only.as_deref().is_none_or(|o| o == phase);
    if let Some(phase) = &only {
        if !["transport", "connect", "throughput", "floor", "uds", "node"].contains(&phase.as_str())
        {
            return Err(format!("unknown phase {phase:?} for --only").into());
        }
        report.str("only", phase.clone());
    }
    if run("transport") || run("connect") {
        let connect_only = only.as_deref() == Some("connect");
        bench_transport(&workspace, sizes, connect_only, &mut report)?;
    }
    if run("throughput") {
        bench_throughput(&workspace, sizes, &mut report)?;
    }
    if run("floor") {
        bench_floor(sizes, &mut report)?;
    }
    if run("uds") {
        bench_uds(&workspace, sizes, &mut report)?;
    }
    if !run("node") {
    } else if skip_node {
        report.str("node_note", "skipped (--skip-node)");
        null_node(&mut report);
    } else {
        bench_node(&workspace, sizes, &mut report);
    }
    report.str("load_avg_end", load_average());
    derive_ratios(&mut report);

    let table = render_table(&report);
    if json {
        eprintln!("{table}");
        println!("{}", report.to_json());
    } else {
        println!("{table}");
    }
    Ok(())
}

/// A private 0700 directory for endpoints and sockets, removed on drop.
struct BenchDir {
    path: PathBuf,
}

impl BenchDir {
    fn new() -> Res<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| format!("getrandom: {e}"))?;
        let path = std::env::temp_dir().join(format!(
            "lapce-ai-bench-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(nonce)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self { path })
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A spawned child of this executable; killed and reaped on drop unless it already exited.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    name: &'static str,
}

impl Peer {
    fn spawn(name: &'static str, role_args: &[&str]) -> Res<Self> {
        let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
        let mut child = Command::new(exe)
            .arg(CHILD_ARG)
            .args(role_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning the {name} peer: {e}"))?;
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("child stdout missing".into());
        };
        Ok(Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            name,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads one line from the child (it announces readiness and results this way).
    fn line(&mut self) -> Res<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(format!("the {} peer exited early", self.name).into());
        }
        Ok(line.trim().to_owned())
    }

    fn expect_prefix(&mut self, prefix: &str) -> Res<String> {
        let line = self.line()?;
        match line.strip_prefix(prefix) {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => {
                Err(format!("the {} peer said {line:?}, expected {prefix:?}", self.name).into())
            }
        }
    }

    /// Closes stdin (the child's signal to shut down gracefully) and waits up to `timeout` for it to exit.
    fn finish(mut self, timeout: Duration) -> Res<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                return Err(format!("the {} peer exited with {status}", self.name).into());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the {} peer did not exit within {timeout:?}; killed",
                    self.name
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            // Only the child we spawned, by its own handle.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn shm_leftovers(prefix: &str) -> Vec<String> {
    lapce_ai_testkit::shm_names_with_prefix(prefix)
}

fn assert_no_shm(prefix: &str) -> Res<()> {
    let left = shm_leftovers(prefix);
    if left.is_empty() {
        Ok(())
    } else {
        for name in &left {
            let _ = unlink_shm(name);
        }
        Err(format!("shared memory left behind (now removed): {left:?}").into())
    }
}

fn client_options(ring: usize) -> ClientOptions {
    ClientOptions {
        client_name: "transport-bench".into(),
        client_to_server_ring_bytes: ring,
        server_to_client_ring_bytes: ring,
        ..ClientOptions::default()
    }
}

/// Round trips, idle CPU, RSS and connection set-up against a scripted server in a second process.
/// With `connect_only`, only the sequential connects (and the disconnect that follows).
fn bench_transport(
    dir: &BenchDir,
    sizes: Sizes,
    connect_only: bool,
    report: &mut Report,
) -> Res<()> {
    let name = format!("bench-{}", std::process::id());
    let endpoint = Endpoint::in_root(&name, &dir.path)?;
    let prefix = endpoint.shm_prefix();
    let root = dir.path.to_str().ok_or("temp dir is not UTF-8")?;
    let mut server = Peer::spawn("scripted server", &["serve", root, &name])?;
    server.expect_prefix("ready")?;
    let result = transport_phases(&endpoint, &mut server, sizes, connect_only, report);
    let finished = server.finish(Duration::from_secs(10));
    result?;
    finished?;
    assert_no_shm(&prefix)?;
    if endpoint.dir().exists() {
        return Err(format!("{} left behind after shutdown", endpoint.dir().display()).into());
    }
    report.str(
        "cleanup",
        "ok: server exited, no shm names or rendezvous files left",
    );
    Ok(())
}

fn transport_phases(
    endpoint: &Endpoint,
    server: &mut Peer,
    sizes: Sizes,
    connect_only: bool,
    report: &mut Report,
) -> Res<()> {
    let pid = server.pid();
    let mut client = Client::connect(endpoint, client_options(64 * 1024))?;
    if !shm_leftovers(&endpoint.shm_prefix()).is_empty() {
        return Err("slot segment name still present after the handshake".into());
    }
    if !connect_only {
        round_trip_and_idle_phases(endpoint, &mut client, pid, sizes, report)?;
    }
    connect_phase(endpoint, &mut client, pid, sizes, report)?;
    client.close();
    Ok(())
}

/// Round trips, then the server's and this process's idle CPU and RSS.
fn round_trip_and_idle_phases(
    endpoint: &Endpoint,
    client: &mut Client,
    pid: u32,
    sizes: Sizes,
    report: &mut Report,
) -> Res<()> {
    progress("transport round trip (64 B ping/pong, blocking client, server in a second process)");
    let mut ping = Ping {
        nonce: 0,
        payload: vec![0u8; PAYLOAD],
    };
    let mut samples = Vec::with_capacity(sizes.rtt_iters);
    for i in 0..(sizes.rtt_warmup + sizes.rtt_iters) as u64 {
        ping.nonce = i;
        ping.payload.fill(i as u8);
        let start = Instant::now();
        client.send(i + 1, &ping, T)?;
        let reply = client.recv(T)?;
        if reply.message_type() != Some(MessageType::Pong) || reply.id() != i + 1 {
            return Err(format!("unexpected reply {:?} to ping {}", reply.header, i + 1).into());
        }
        let pong = reply.decode::<Pong>()?;
        if pong.nonce.to_native() != i
            || pong.payload.len() != PAYLOAD
            || pong.payload[0] != i as u8
        {
            return Err("pong does not echo the ping".into());
        }
        let elapsed = start.elapsed().as_nanos() as u64;
        if i as usize >= sizes.rtt_warmup {
            samples.push(elapsed);
        }
    }
    let p = percentiles(samples);
    record(report, "rtt", &p, sizes.rtt_iters);

    progress("server idle CPU and RSS with 1 client connected");
    std::thread::sleep(Duration::from_millis(200));
    let before = ProcCpu::read(pid)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(sizes.idle_secs));
    let after = ProcCpu::read(pid)?;
    let wall = started.elapsed().as_secs_f64();
    let ticks = after.ticks.saturating_sub(before.ticks);
    let tick_hz = clock_ticks_per_sec();
    report.num("idle_cpu_percent", ticks as f64 / tick_hz / wall * 100.0);
    report.num("idle_cpu_ticks", ticks as f64);
    report.num(
        "idle_cpu_sched_ns",
        after.sched_ns.saturating_sub(before.sched_ns) as f64,
    );
    report.num(
        "idle_ctx_switches",
        after.switches.saturating_sub(before.switches) as f64,
    );
    report.num("idle_seconds", wall);
    let rss = ProcMem::read(pid)?;
    report.num("rss_idle_kib", rss.vm_rss as f64);
    report.num("rss_anon_idle_kib", rss.anon as f64);
    report.num("rss_shmem_idle_kib", rss.shmem as f64);
    report.num("server_threads", rss.threads as f64);

    progress("idle CPU of this process with idle async clients connected");
    let idle_clients = (0..IDLE_CLIENTS)
        .map(|_| AsyncClient::connect_blocking(endpoint, client_options(16 * 1024)))
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(200));
    let me = std::process::id();
    let before = ProcCpu::read(me)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(sizes.idle_secs));
    let after = ProcCpu::read(me)?;
    let wall = started.elapsed().as_secs_f64();
    report.num("client_idle_clients", IDLE_CLIENTS as f64);
    report.num(
        "client_idle_cpu_ticks",
        after.ticks.saturating_sub(before.ticks) as f64,
    );
    report.num(
        "client_idle_sched_ns",
        after.sched_ns.saturating_sub(before.sched_ns) as f64,
    );
    report.num(
        "client_idle_ctx_switches",
        after.switches.saturating_sub(before.switches) as f64,
    );
    report.num("client_idle_seconds", wall);
    drop(idle_clients);
    Ok(())
}

/// 1000 sequential connects (first and last tenth), the server's RSS with them, then closing them all.
fn connect_phase(
    endpoint: &Endpoint,
    client: &mut Client,
    pid: u32,
    sizes: Sizes,
    report: &mut Report,
) -> Res<()> {
    let files = endpoint.root().join(format!("{}-files", endpoint.name()));
    let result = connect_and_close(endpoint, client, pid, sizes, &files, report);
    let _ = std::fs::remove_dir_all(&files);
    result
}

/// Milliseconds to create `count` empty 0600 files in a new directory `dir` (left in place for the caller).
fn time_file_creation(dir: &Path, count: usize) -> Res<f64> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir(dir)?;
    let started = Instant::now();
    for n in 0..count {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(format!("{n}.lock")))?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// The connects, then (all still connected) the file system's share, then closing them all. `files` is a
/// scratch directory the caller removes.
fn connect_and_close(
    endpoint: &Endpoint,
    client: &mut Client,
    pid: u32,
    sizes: Sizes,
    files: &Path,
    report: &mut Report,
) -> Res<()> {
    progress(&format!(
        "connecting {} clients sequentially (16 KiB rings)",
        sizes.connect_clients
    ));
    warm_up(client, CONNECT_WARM_UP)?;
    let mut clients = Vec::with_capacity(sizes.connect_clients);
    let mut each = Vec::with_capacity(sizes.connect_clients);
    let memory_before = ConnectionMemory::read(pid)?;
    let cpu_before = ProcCpu::read(pid)?;
    let started = Instant::now();
    for _ in 0..sizes.connect_clients {
        let one = Instant::now();
        clients.push(Client::connect(endpoint, client_options(16 * 1024))?);
        each.push(one.elapsed().as_nanos() as u64);
    }
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    let cpu_after = ProcCpu::read(pid)?;
    // Per-connect cost early vs late shows whether connecting scales with the number already connected.
    let tenth = (each.len() / 10).max(1);
    let avg_us = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64 / 1e3;
    report.num("connect_first_tenth_avg_us", avg_us(&each[..tenth]));
    report.num(
        "connect_last_tenth_avg_us",
        avg_us(&each[each.len() - tenth..]),
    );
    report.num(
        "connect_server_cpu_ms",
        cpu_after.sched_ns.saturating_sub(cpu_before.sched_ns) as f64 / 1e6,
    );
    report.num("connect_clients", sizes.connect_clients as f64);
    report.num("connect_1000_ms", connect_ms);
    let connected = status_connections(client)?;
    if connected as usize != sizes.connect_clients + 1 {
        return Err(format!(
            "server reports {connected} connections, expected {}",
            sizes.connect_clients + 1
        )
        .into());
    }
    std::thread::sleep(Duration::from_millis(200));
    ConnectionMemory::read(pid)?.report_per_connection(
        &memory_before,
        sizes.connect_clients,
        "",
        report,
    );
    let rss = ProcMem::read(pid)?;
    report.num("rss_1000_kib", rss.vm_rss as f64);
    report.num("rss_anon_1000_kib", rss.anon as f64);
    report.num("rss_shmem_1000_kib", rss.shmem as f64);
    // Each connect created one slot lock file; creating as many empty files in the same file system right after
    // (nothing deleted in between) is the file system's share of the connect figure.
    report.num(
        "connect_file_create_ms",
        time_file_creation(files, sizes.connect_clients)?,
    );

    let started = Instant::now();
    drop(clients);
    wait_for_connections(client, 1)?;
    report.num("disconnect_1000_ms", started.elapsed().as_secs_f64() * 1e3);

    // The same accounting for connections with the default rings, as the bridge and the CLI connect.
    let count = sizes.connect_clients / 10;
    let memory_before = ConnectionMemory::read(pid)?;
    let default_clients = (0..count)
        .map(|_| {
            Client::connect(
                endpoint,
                ClientOptions {
                    client_name: "transport-bench".into(),
                    ..ClientOptions::default()
                },
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(200));
    ConnectionMemory::read(pid)?.report_per_connection(&memory_before, count, "_default", report);
    report.num(
        "default_ring_kib",
        ClientOptions::default().client_to_server_ring_bytes as f64 / 1024.0,
    );
    drop(default_clients);
    wait_for_connections(client, 1)?;
    Ok(())
}

/// What connections cost in memory, on both sides: the engine's and this process's private memory, and the
/// system's shared memory (the memfd segments, whose pages are reserved when they are created, and lock files
/// on a tmpfs rendezvous directory), which both processes map but which exists once.
struct ConnectionMemory {
    server_anon_kib: u64,
    client_anon_kib: u64,
    system_shmem_kib: u64,
}

impl ConnectionMemory {
    fn read(server_pid: u32) -> Res<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        Ok(Self {
            server_anon_kib: ProcMem::read(server_pid)?.anon,
            client_anon_kib: ProcMem::read(std::process::id())?.anon,
            system_shmem_kib: status_field(&meminfo, "Shmem:")
                .ok_or("Shmem missing in /proc/meminfo")?,
        })
    }

    /// Reports the growth since `before` per connection, as `memory_per_connection{suffix}_*_kib`.
    fn report_per_connection(
        &self,
        before: &Self,
        connections: usize,
        suffix: &str,
        report: &mut Report,
    ) {
        let per = |after: u64, before: u64| {
            after.saturating_sub(before) as f64 / connections.max(1) as f64
        };
        let server = per(self.server_anon_kib, before.server_anon_kib);
        let client = per(self.client_anon_kib, before.client_anon_kib);
        let shared = per(self.system_shmem_kib, before.system_shmem_kib);
        report.num(&format!("memory_per_connection{suffix}_server_kib"), server);
        report.num(&format!("memory_per_connection{suffix}_client_kib"), client);
        report.num(&format!("memory_per_connection{suffix}_shared_kib"), shared);
        report.num(
            &format!("memory_per_connection{suffix}_kib"),
            server + client + shared,
        );
    }
}

/// Async clients left idle while this process's CPU use is measured.
const IDLE_CLIENTS: usize = 10;

/// Round trips before the connects. The idle measurements before them leave both CPUs idle for seconds, and on
/// the KVM guest this was measured on, the first ~100 ms of work after that ran about twice as slowly (1000
/// connects after 6 s idle: 120-187 ms; the next 1000: 68-84 ms). Round trips touch no file, so they leave the
/// rendezvous file system as it was.
const CONNECT_WARM_UP: Duration = Duration::from_millis(300);

fn warm_up(client: &mut Client, time: Duration) -> Res<()> {
    let ping = Ping {
        nonce: 0,
        payload: vec![0u8; PAYLOAD],
    };
    let started = Instant::now();
    let mut id = 1u64 << 62;
    while started.elapsed() < time {
        id += 1;
        client.send(id, &ping, T)?;
        let reply = client.recv(T)?;
        if reply.message_type() != Some(MessageType::Pong) || reply.id() != id {
            return Err(format!("unexpected reply {:?} to a warm-up ping", reply.header).into());
        }
    }
    Ok(())
}

/// Waits until the server reports `count` connections (closed clients noticed), at most `T`.
fn wait_for_connections(client: &mut Client, count: u32) -> Res<()> {
    let deadline = Instant::now() + T;
    while status_connections(client)? != count {
        if Instant::now() >= deadline {
            return Err("the server did not notice the closed clients".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn status_connections(client: &mut Client) -> Res<u32> {
    client.send(u64::MAX - 1, &StatusRequest {}, T)?;
    let reply = client.recv(T)?;
    let status: StatusReply = reply.decode_owned()?;
    Ok(status.connections)
}

/// One-way throughput into a counting server: 64 B frames and 1 MiB (fragmented) messages, plus memcpy.
fn bench_throughput(dir: &BenchDir, sizes: Sizes, report: &mut Report) -> Res<()> {
    let name = format!("count-{}", std::process::id());
    let endpoint = Endpoint::in_root(&name, &dir.path)?;
    let root = dir.path.to_str().ok_or("temp dir is not UTF-8")?;
    let mut server = Peer::spawn("counting server", &["count", root, &name])?;
    server.expect_prefix("ready")?;
    let result = throughput_phases(&endpoint, sizes, report);
    let finished = server.finish(Duration::from_secs(10));
    result?;
    finished?;
    assert_no_shm(&endpoint.shm_prefix())
}

fn throughput_phases(endpoint: &Endpoint, sizes: Sizes, report: &mut Report) -> Res<()> {
    progress("one-way 64 B frames: a streaming sender (batched, no CRC) 5 times, then CRC and per-message variants");
    let small = [0x5au8; PAYLOAD];
    // A streaming sender: batches of STREAM_BATCH frames, frame CRC off (see docs/BENCHMARKS.md).
    let mut client = Client::connect(
        endpoint,
        ClientOptions {
            frame_crc: false,
            ..client_options(64 * 1024)
        },
    )?;
    // Warm-up round: also resets the server's counters.
    one_way(&mut client, &small, sizes.msgs_64b / 10, STREAM_BATCH)?;
    let mut runs = Vec::new();
    for run in 1..=5 {
        let elapsed = one_way(&mut client, &small, sizes.msgs_64b, STREAM_BATCH)?;
        let rate = sizes.msgs_64b as f64 / elapsed;
        report.num(&format!("msgs_per_sec_64b_run{run}"), rate);
        runs.push(rate);
    }
    report.num(
        "msgs_per_sec_64b",
        runs.iter().copied().fold(f64::INFINITY, f64::min),
    );
    report.num("msgs_64b_count", sizes.msgs_64b as f64);
    report.num("msgs_64b_batch", STREAM_BATCH as f64);
    // One tail publish and one fence per message (a batch of one), no CRC.
    let elapsed = one_way(&mut client, &small, sizes.msgs_64b, 1)?;
    report.num(
        "msgs_per_sec_64b_no_crc_per_message",
        sizes.msgs_64b as f64 / elapsed,
    );
    client.close();
    // The default client: CRC on every frame (computed by the sender, verified by the reactor).
    let mut client = Client::connect(endpoint, client_options(64 * 1024))?;
    one_way(&mut client, &small, sizes.msgs_64b / 10, STREAM_BATCH)?;
    let elapsed = one_way(&mut client, &small, sizes.msgs_64b, STREAM_BATCH)?;
    report.num("msgs_per_sec_64b_crc", sizes.msgs_64b as f64 / elapsed);
    let elapsed = one_way(&mut client, &small, sizes.msgs_64b, 1)?;
    report.num(
        "msgs_per_sec_64b_per_message",
        sizes.msgs_64b as f64 / elapsed,
    );
    client.close();
    let mut client = Client::connect(endpoint, client_options(64 * 1024))?;

    progress("one-way 1 MiB messages (fragmented through a 64 KiB ring)");
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    one_way(&mut client, &big, 2, 1)?;
    let elapsed = one_way(&mut client, &big, sizes.mib_msgs, 1)?;
    report.num(
        "gbps_1mib",
        (sizes.mib_msgs as f64 * big.len() as f64) / elapsed / 1e9,
    );
    client.close();

    progress("one-way 1 MiB messages through a 4 MiB ring");
    let mut client = Client::connect(endpoint, client_options(4 << 20))?;
    one_way(&mut client, &big, 2, 1)?;
    let elapsed = one_way(&mut client, &big, sizes.mib_msgs, 1)?;
    report.num(
        "gbps_1mib_4mib_ring",
        (sizes.mib_msgs as f64 * big.len() as f64) / elapsed / 1e9,
    );
    client.close();

    progress("memcpy of 1 MiB in this process");
    let mut dst = vec![0u8; big.len()];
    for _ in 0..10 {
        dst.copy_from_slice(std::hint::black_box(&big));
    }
    let started = Instant::now();
    for _ in 0..sizes.memcpy_iters {
        dst.copy_from_slice(std::hint::black_box(&big));
        std::hint::black_box(&mut dst);
    }
    let elapsed = started.elapsed().as_secs_f64();
    report.num(
        "memcpy_gbps",
        (sizes.memcpy_iters as f64 * big.len() as f64) / elapsed / 1e9,
    );
    Ok(())
}

/// Frames a streaming sender hands to `send_raw_batch` at a time in the throughput runs.
const STREAM_BATCH: u64 = 32;

/// Sends `count` `Cancel`-typed frames carrying `payload` without waiting, `batch` per tail publish (1: one
/// `send_raw` each), then a `StatusRequest`; the counting server answers it after everything before it was
/// received and verified. Returns the elapsed seconds.
fn one_way(client: &mut Client, payload: &[u8], count: u64, batch: u64) -> Res<f64> {
    let started = Instant::now();
    if batch <= 1 {
        for i in 0..count {
            client.send_raw(MessageType::Cancel.code(), i + 1, payload, T)?;
        }
    } else {
        let mut next = 0;
        while next < count {
            let end = (next + batch).min(count);
            client.send_raw_batch(
                (next..end).map(|i| (MessageType::Cancel.code(), i + 1, payload)),
                T,
            )?;
            next = end;
        }
    }
    client.send(u64::MAX, &StatusRequest {}, T)?;
    let reply = client.recv(T)?;
    let elapsed = started.elapsed().as_secs_f64();
    let status: StatusReply = reply.decode_owned()?;
    let expected_bytes = count * payload.len() as u64;
    if status.cancels != count || status.requests != expected_bytes {
        return Err(format!(
            "counting server saw {} messages / {} bytes, sent {count} / {expected_bytes}",
            status.cancels, status.requests
        )
        .into());
    }
    Ok(elapsed)
}

/// Layout of the busy-poll floor's shared page: one 128-byte line per direction.
#[repr(C, align(128))]
struct Lane {
    seq: AtomicU64,
    payload: [u8; PAYLOAD],
}

#[repr(C)]
struct FloorPage {
    ping: Lane,
    pong: Lane,
}

const FLOOR_STOP: u64 = u64::MAX;

/// A raw shared mapping of one `FloorPage`.
struct FloorMap {
    ptr: *mut FloorPage,
}

impl FloorMap {
    fn map(fd: libc::c_int) -> Res<Self> {
        let len = std::mem::size_of::<FloorPage>();
        // SAFETY: mapping a shm fd we opened; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()).into());
        }
        Ok(Self { ptr: ptr.cast() })
    }

    fn page(&self) -> &FloorPage {
        // SAFETY: the mapping lives as long as self and is only accessed through atomics and raw copies.
        unsafe { &*self.ptr }
    }

    fn write_payload(&self, lane: &Lane, bytes: &[u8; PAYLOAD]) {
        // SAFETY: the lane's payload lies inside the mapping; the peer does not read it until `seq` is published.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), lane.payload.as_ptr().cast_mut(), PAYLOAD)
        }
    }

    fn read_payload(&self, lane: &Lane, out: &mut [u8; PAYLOAD]) {
        // SAFETY: as above; the peer finished writing before publishing `seq`.
        unsafe { std::ptr::copy_nonoverlapping(lane.payload.as_ptr(), out.as_mut_ptr(), PAYLOAD) }
    }
}

impl Drop for FloorMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), std::mem::size_of::<FloorPage>()) };
    }
}

fn shm_cname(name: &str) -> Res<std::ffi::CString> {
    Ok(std::ffi::CString::new(format!("/{name}"))?)
}

fn unlink_shm(name: &str) -> Res<()> {
    let cname = shm_cname(name)?;
    // SAFETY: valid C string.
    if unsafe { libc::shm_unlink(cname.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn open_shm(name: &str, create: bool) -> Res<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let cname = shm_cname(name)?;
    let flags = if create {
        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC
    } else {
        libc::O_RDWR | libc::O_CLOEXEC
    };
    // SAFETY: valid C string; the result is checked and owned below.
    let fd = unsafe { libc::shm_open(cname.as_ptr(), flags, 0o600) };
    if fd < 0 {
        return Err(format!("shm_open {name}: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Unlinks a shm name on drop unless already done.
struct ShmName(Option<String>);

impl ShmName {
    fn unlink(&mut self) -> Res<()> {
        match self.0.take() {
            Some(name) => unlink_shm(&name),
            None => Ok(()),
        }
    }
}

impl Drop for ShmName {
    fn drop(&mut self) {
        let _ = self.unlink();
    }
}

/// Spins until `ready()`, failing after `limit` (the peer died).
fn spin_until(limit: Duration, mut ready: impl FnMut() -> bool) -> Res<()> {
    let mut spins = 0u32;
    let mut started: Option<Instant> = None;
    while !ready() {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) {
            let s = *started.get_or_insert_with(Instant::now);
            if s.elapsed() > limit {
                return Err("peer stopped answering".into());
            }
        }
    }
    Ok(())
}

fn bench_floor(sizes: Sizes, report: &mut Report) -> Res<()> {
    progress("busy-poll shared-memory floor (64 B each way, both processes spinning)");
    let name = format!("lapce-ai-bench-floor-{}", std::process::id());
    let fd = open_shm(&name, true)?;
    let mut guard = ShmName(Some(name.clone()));
    // SAFETY: sizing our fresh shm fd.
    if unsafe {
        libc::ftruncate(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::mem::size_of::<FloorPage>() as libc::off_t,
        )
    } != 0
    {
        return Err(format!("ftruncate: {}", std::io::Error::last_os_error()).into());
    }
    let map = FloorMap::map(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    drop(fd);
    let mut peer = Peer::spawn("floor echo", &["floor", &name])?;
    peer.expect_prefix("mapped")?;
    guard.unlink()?;
    let page = map.page();
    let mut out = [0u8; PAYLOAD];
    let mut buf = [0u8; PAYLOAD];
    let warmup = sizes.floor_iters / 10;
    let mut samples = Vec::with_capacity(sizes.floor_iters);
    let result = (|| -> Res<()> {
        for i in 1..=(warmup + sizes.floor_iters) as u64 {
            buf.fill(i as u8);
            let start = Instant::now();
            map.write_payload(&page.ping, &buf);
            page.ping.seq.store(i, Ordering::Release);
            spin_until(Duration::from_secs(5), || {
                page.pong.seq.load(Ordering::Acquire) == i
            })?;
            map.read_payload(&page.pong, &mut out);
            let elapsed = start.elapsed().as_nanos() as u64;
            if out[0] != i as u8 || out[PAYLOAD - 1] != i as u8 {
                return Err("floor echo returned the wrong payload".into());
            }
            if i as usize > warmup {
                samples.push(elapsed);
            }
        }
        Ok(())
    })();
    page.ping.seq.store(FLOOR_STOP, Ordering::Release);
    let finished = peer.finish(Duration::from_secs(5));
    result?;
    finished?;
    assert_no_shm(&name)?;
    record(report, "floor", &percentiles(samples), sizes.floor_iters);
    Ok(())
}

fn encode_frame(message_type: u16, id: u64, payload: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader::new(message_type, 0, payload.len() as u32, id);
    let mut head = [0u8; FRAME_HEADER_LEN];
    header.encode_into(payload, &mut head);
    out.clear();
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
}

/// Reads one frame (header, then its payload) and verifies it; returns the header.
fn read_frame(stream: &mut UnixStream, payload: &mut Vec<u8>) -> Res<Option<FrameHeader>> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    match stream.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (header, _) = FrameHeader::parse_unchecked(&head)?;
    if header.payload_len > 4096 {
        return Err(format!(
            "frame of {} bytes is too large for this benchmark",
            header.payload_len
        )
        .into());
    }
    payload.resize(header.payload_len as usize, 0);
    stream.read_exact(payload)?;
    Ok(Some(FrameHeader::verify_parts(&head, payload, 4096)?))
}

fn bench_uds(dir: &BenchDir, sizes: Sizes, report: &mut Report) -> Res<()> {
    progress("Unix-domain socket round trip (same 24-byte framing + CRC, blocking std sockets)");
    let path = dir.path.join("uds.sock");
    let listener = UnixListener::bind(&path)?;
    let path_str = path.to_str().ok_or("temp dir is not UTF-8")?;
    let peer = Peer::spawn("uds echo", &["uds", path_str])?;
    let mut stream = accept_within(&listener, Duration::from_secs(10))?;
    let result = (|| -> Res<Vec<u64>> {
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + PAYLOAD);
        let mut reply = Vec::with_capacity(PAYLOAD);
        let mut payload = [0u8; PAYLOAD];
        let warmup = sizes.uds_iters / 10;
        let mut samples = Vec::with_capacity(sizes.uds_iters);
        for i in 1..=(warmup + sizes.uds_iters) as u64 {
            payload.fill(i as u8);
            let start = Instant::now();
            encode_frame(MessageType::Ping.code(), i, &payload, &mut frame);
            stream.write_all(&frame)?;
            let header = read_frame(&mut stream, &mut reply)?.ok_or("uds peer closed")?;
            let elapsed = start.elapsed().as_nanos() as u64;
            if header.message_id != i || reply[..] != payload[..] {
                return Err("uds echo returned the wrong frame".into());
            }
            if i as usize > warmup {
                samples.push(elapsed);
            }
        }
        Ok(samples)
    })();
    drop(stream);
    let finished = peer.finish(Duration::from_secs(5));
    let _ = std::fs::remove_file(&path);
    let samples = result?;
    finished?;
    record(report, "uds", &percentiles(samples), sizes.uds_iters);
    Ok(())
}

/// Accepts one connection, giving up after `limit` (the child failed to connect).
fn accept_within(listener: &UnixListener, limit: Duration) -> Res<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("accepting the uds peer: {e}").into()),
        }
    }
}

fn null_node(report: &mut Report) {
    for key in [
        "node_ipc_p50_ns",
        "node_ipc_p99_ns",
        "node_ipc_json_p50_ns",
        "node_ipc_advanced_p50_ns",
        "node_net_p50_ns",
        "node_net_p99_ns",
    ] {
        report.null(key);
    }
}

/// Runs the Node.js scripts in `testkit/bench/`; missing `node` is a note, not an error.
fn bench_node(dir: &BenchDir, sizes: Sizes, report: &mut Report) {
    let scripts = std::env::var_os("TRANSPORT_BENCH_SCRIPTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("bench"));
    let version = Command::new("node").arg("--version").output();
    let version = match version {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => {
            progress("node not found: skipping the Node.js comparison");
            report.str("node_note", "skipped: `node` not found");
            null_node(report);
            return;
        }
    };
    report.str("node_version", version);
    let iters = sizes.node_iters.to_string();
    let mut ipc = Vec::new();
    for serialization in ["json", "advanced"] {
        progress(&format!(
            "Node child_process IPC round trip ({serialization} serialization)"
        ));
        match run_node(
            &scripts.join("node_ipc.js"),
            &[&iters, serialization],
            &dir.path,
        ) {
            Ok(text) => {
                let p50 = json_number(&text, "p50_ns");
                let p99 = json_number(&text, "p99_ns");
                let p999 = json_number(&text, "p999_ns");
                match (p50, p99) {
                    (Some(p50), Some(p99)) => {
                        report.num(&format!("node_ipc_{serialization}_p50_ns"), p50);
                        report.num(&format!("node_ipc_{serialization}_p99_ns"), p99);
                        if let Some(p999) = p999 {
                            report.num(&format!("node_ipc_{serialization}_p999_ns"), p999);
                        }
                        ipc.push((serialization, p50, p99));
                    }
                    _ => progress(&format!("node_ipc.js printed no percentiles: {text}")),
                }
            }
            Err(e) => progress(&format!("node_ipc.js ({serialization}) failed: {e}")),
        }
    }
    // Compare against the faster Node variant: the conservative choice for our ratio.
    match ipc.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
        Some((serialization, p50, p99)) => {
            report.num("node_ipc_p50_ns", *p50);
            report.num("node_ipc_p99_ns", *p99);
            report.str(
                "node_ipc_note",
                format!(
                    "fork() + process.send of {{n, data}}: 64 random bytes as base64 string (json) or Buffer \
                     (advanced); node_ipc_p50_ns is the faster variant ({serialization})"
                ),
            );
        }
        None => {
            report.null("node_ipc_p50_ns");
            report.null("node_ipc_p99_ns");
        }
    }
    progress("Node net over a Unix socket round trip");
    match run_node(&scripts.join("node_net.js"), &[&iters], &dir.path) {
        Ok(text) => match (json_number(&text, "p50_ns"), json_number(&text, "p99_ns")) {
            (Some(p50), Some(p99)) => {
                report.num("node_net_p50_ns", p50);
                report.num("node_net_p99_ns", p99);
                if let Some(p999) = json_number(&text, "p999_ns") {
                    report.num("node_net_p999_ns", p999);
                }
            }
            _ => {
                progress(&format!("node_net.js printed no percentiles: {text}"));
                report.null("node_net_p50_ns");
            }
        },
        Err(e) => {
            progress(&format!("node_net.js failed: {e}"));
            report.null("node_net_p50_ns");
        }
    }
}

fn run_node(script: &Path, args: &[&str], tmp: &Path) -> Res<String> {
    let output = Command::new("node")
        .arg(script)
        .args(args)
        .env("BENCH_TMPDIR", tmp)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running node {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!("node {} exited with {}", script.display(), output.status).into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Extracts `"key": <number>` from a flat JSON object printed by our own scripts.
fn json_number(text: &str, key: &str) -> Option<f64> {
    let needle = format!("\"{key}\"");
    let rest = &text[text.find(&needle)? + needle.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn derive_ratios(report: &mut Report) {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    if let Some(r) = ratio(report.get("rtt_p50_ns"), report.get("floor_p50_ns")) {
        report.num("rtt_over_floor_p50", r);
    }
    if let Some(r) = ratio(report.get("node_ipc_p50_ns"), report.get("rtt_p50_ns")) {
        report.num("node_ipc_over_rtt_p50", r);
    }
    if let Some(r) = ratio(report.get("uds_p50_ns"), report.get("rtt_p50_ns")) {
        report.num("uds_over_rtt_p50", r);
    }
    if let Some(r) = ratio(report.get("gbps_1mib"), report.get("memcpy_gbps")) {
        report.num("ring_over_memcpy_1mib", r);
    }
}

fn fmt_ns(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(ns) if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        Some(ns) if ns >= 1e3 => format!("{:.2} us", ns / 1e3),
        Some(ns) => format!("{ns:.0} ns"),
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "MET",
        Some(false) => "MISSED",
        None => "n/a",
    }
}

fn render_table(r: &Report) -> String {
    let mut t = String::new();
    let g = |k: &str| r.get(k);
    let connection_memory = |suffix: &str| {
        let part = |what: &str| {
            g(&format!("memory_per_connection{suffix}{what}_kib"))
                .map_or("n/a".to_owned(), |v| format!("{v:.1} KiB"))
        };
        format!(
            "{} + {} + {} = {}",
            part("_server"),
            part("_client"),
            part("_shared"),
            part("")
        )
    };
    let _ = writeln!(t, "Latency (round trip, 64-byte payload, two processes)");
    let _ = writeln!(t, "| mechanism | p50 | p99 | p99.9 | iterations |");
    let _ = writeln!(t, "|---|---|---|---|---|");
    let rows: [(&str, &str); 6] = [
        (
            "lapce-ai transport (Client -> reactor Ping/Pong, rkyv + CRC)",
            "rtt",
        ),
        (
            "busy-poll shm floor (seq flag + 64 B copy each way)",
            "floor",
        ),
        ("Unix socket, same 24 B framing + CRC", "uds"),
        (
            "Node child_process IPC, json (base64 string)",
            "node_ipc_json",
        ),
        (
            "Node child_process IPC, advanced (Buffer)",
            "node_ipc_advanced",
        ),
        ("Node net over a Unix socket (Buffer)", "node_net"),
    ];
    for (label, prefix) in rows {
        let iters = g(&format!("{prefix}_iterations")).map_or("".into(), |n| format!("{n:.0}"));
        let _ = writeln!(
            t,
            "| {label} | {} | {} | {} | {iters} |",
            fmt_ns(g(&format!("{prefix}_p50_ns"))),
            fmt_ns(g(&format!("{prefix}_p99_ns"))),
            fmt_ns(g(&format!("{prefix}_p999_ns"))),
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "Throughput, connections, server resources");
    let _ = writeln!(t, "| measurement | value |");
    let _ = writeln!(t, "|---|---|");
    let num = |k: &str, scale: f64, unit: &str, digits: usize| {
        g(k).map_or("n/a".into(), |v| format!("{:.*} {unit}", digits, v / scale))
    };
    let lines: Vec<(&str, String)> = vec![
        (
            "one-way 64 B, streaming sender (batches of 32, no CRC): 5 runs",
            (1..=5)
                .map(|run| {
                    g(&format!("msgs_per_sec_64b_run{run}"))
                        .map_or("n/a".into(), |v| format!("{:.2}", v / 1e6))
                })
                .collect::<Vec<_>>()
                .join(" / ")
                + " M msg/s",
        ),
        (
            "one-way 64 B, one publish + fence per message, CRC",
            num("msgs_per_sec_64b_per_message", 1e6, "M msg/s", 2),
        ),
        (
            "one-way 64 B, batches of 32, CRC",
            num("msgs_per_sec_64b_crc", 1e6, "M msg/s", 2),
        ),
        (
            "one-way 64 B, one publish + fence per message, no CRC",
            num("msgs_per_sec_64b_no_crc_per_message", 1e6, "M msg/s", 2),
        ),
        (
            "one-way 1 MiB messages, 64 KiB ring (fragmented)",
            num("gbps_1mib", 1.0, "GB/s", 2),
        ),
        (
            "one-way 1 MiB messages, 4 MiB ring",
            num("gbps_1mib_4mib_ring", 1.0, "GB/s", 2),
        ),
        (
            "memcpy 1 MiB (same process)",
            num("memcpy_gbps", 1.0, "GB/s", 2),
        ),
        (
            "connect clients sequentially (16 KiB rings)",
            format!(
                "{} clients in {}",
                g("connect_clients").map_or(0.0, |v| v),
                num("connect_1000_ms", 1.0, "ms", 1)
            ),
        ),
        (
            "per connect: first / last tenth (server CPU during all connects)",
            format!(
                "{} / {} ({})",
                num("connect_first_tenth_avg_us", 1.0, "us", 0),
                num("connect_last_tenth_avg_us", 1.0, "us", 0),
                num("connect_server_cpu_ms", 1.0, "ms", 0)
            ),
        ),
        (
            "file system share: as many empty files created in the rendezvous file system, right after",
            num("connect_file_create_ms", 1.0, "ms", 1),
        ),
        (
            "close them all until the server saw it",
            num("disconnect_1000_ms", 1.0, "ms", 1),
        ),
        (
            "server idle CPU (1 client connected)",
            format!(
                "{} over {} ({} ticks, {} ns scheduled, {} context switches)",
                num("idle_cpu_percent", 1.0, "%", 3),
                num("idle_seconds", 1.0, "s", 1),
                g("idle_cpu_ticks").unwrap_or(0.0),
                g("idle_cpu_sched_ns").unwrap_or(0.0),
                g("idle_ctx_switches").unwrap_or(0.0),
            ),
        ),
        (
            "client process idle CPU (10 idle async clients)",
            format!(
                "{} ticks over {} ({} ns scheduled, {} context switches)",
                g("client_idle_cpu_ticks").unwrap_or(f64::NAN),
                num("client_idle_seconds", 1.0, "s", 1),
                g("client_idle_sched_ns").unwrap_or(f64::NAN),
                g("client_idle_ctx_switches").unwrap_or(f64::NAN),
            ),
        ),
        (
            "server RSS idle (VmRSS / RssAnon / RssShmem)",
            format!(
                "{} / {} / {}",
                num("rss_idle_kib", 1.0, "KiB", 0),
                num("rss_anon_idle_kib", 1.0, "KiB", 0),
                num("rss_shmem_idle_kib", 1.0, "KiB", 0)
            ),
        ),
        (
            "server RSS with 1001 connections",
            format!(
                "{} / {} / {}",
                num("rss_1000_kib", 1.0, "KiB", 0),
                num("rss_anon_1000_kib", 1.0, "KiB", 0),
                num("rss_shmem_1000_kib", 1.0, "KiB", 0)
            ),
        ),
        (
            "memory per idle connection, 16 KiB rings: engine private + client private + shared (segment, lock file) = total",
            connection_memory(""),
        ),
        (
            "memory per idle connection, default rings (as the bridge connects)",
            connection_memory("_default"),
        ),
    ];
    for (label, value) in lines {
        let _ = writeln!(t, "| {label} | {value} |");
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "Targets");
    let _ = writeln!(t, "| target | measured | verdict |");
    let _ = writeln!(t, "|---|---|---|");
    let shown = |key: &str, show: fn(f64) -> String| g(key).map_or("n/a".into(), show);
    let met = |key: &str, ok: fn(f64) -> bool| verdict(g(key).map(ok));
    let connect_ok =
        g("connect_clients") != Some(1000.0) || g("connect_1000_ms").is_some_and(|v| v < 100.0);
    let targets = [
        (
            "rtt p50 <= 2x floor p50",
            shown("rtt_over_floor_p50", |v| format!("{v:.2}x")),
            met("rtt_over_floor_p50", |v| v <= 2.0),
        ),
        (
            "rtt p99 < 10 us",
            fmt_ns(g("rtt_p99_ns")),
            met("rtt_p99_ns", |v| v < 10_000.0),
        ),
        (
            ">= 20x better than Node IPC p50",
            shown("node_ipc_over_rtt_p50", |v| format!("{v:.1}x")),
            met("node_ipc_over_rtt_p50", |v| v >= 20.0),
        ),
        (
            ">= 5 M msg/s (64 B, streaming sender), slowest of 5 runs",
            shown("msgs_per_sec_64b", |v| format!("{:.2} M/s", v / 1e6)),
            met("msgs_per_sec_64b", |v| v >= 5e6),
        ),
        (
            "server idle CPU 0",
            shown("idle_cpu_ticks", |v| format!("{v} ticks")),
            met("idle_cpu_ticks", |v| v == 0.0),
        ),
        (
            "client idle CPU 0",
            shown("client_idle_cpu_ticks", |v| format!("{v} ticks")),
            met("client_idle_cpu_ticks", |v| v == 0.0),
        ),
        (
            "memory per idle connection, both sides, < 64 KiB (16 KiB rings / default rings)",
            format!(
                "{} / {}",
                num("memory_per_connection_kib", 1.0, "KiB", 1),
                num("memory_per_connection_default_kib", 1.0, "KiB", 1)
            ),
            verdict(
                g("memory_per_connection_kib")
                    .zip(g("memory_per_connection_default_kib"))
                    .map(|(small, default)| small.max(default) < 64.0),
            ),
        ),
        (
            "1000 sequential connects < 100 ms",
            num("connect_1000_ms", 1.0, "ms", 1),
            verdict(Some(connect_ok)),
        ),
    ];
    for (label, measured, verdict) in targets {
        let _ = writeln!(t, "| {label} | {measured} | {verdict} |");
    }
    let _ = writeln!(t);
    if let Some(note) = r.get_str("node_ipc_note").or(r.get_str("node_note")) {
        let _ = writeln!(t, "Node: {note}");
    }
    let _ = writeln!(
        t,
        "Machine: {} CPUs, load average at start {} / end {}; rendezvous directory {}",
        g("nproc").unwrap_or(0.0),
        r.get_str("load_avg_start").unwrap_or("?"),
        r.get_str("load_avg_end").unwrap_or("?"),
        r.get_str("rendezvous_dir").unwrap_or("?")
    );
    t
}

// ------------------------------------------------------------------------------------------------------------
// /proc readers and process limits
// ------------------------------------------------------------------------------------------------------------

struct ProcCpu {
    /// utime + stime of the whole process, in clock ticks.
    ticks: u64,
    /// Sum of every thread's scheduled time (schedstat), in ns.
    sched_ns: u64,
    /// Voluntary + involuntary context switches of every thread.
    switches: u64,
}

impl ProcCpu {
    fn read(pid: u32) -> Res<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or("malformed /proc/pid/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state); utime is field 14, stime 15.
        let field = |n: usize| -> Res<u64> {
            Ok(fields
                .get(n - 3)
                .ok_or("short /proc/pid/stat")?
                .parse::<u64>()?)
        };
        let ticks = field(14)? + field(15)?;
        let mut sched_ns = 0;
        let mut switches = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
                sched_ns += text
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            if let Ok(text) = std::fs::read_to_string(task.path().join("status")) {
                switches += status_field(&text, "voluntary_ctxt_switches:").unwrap_or(0)
                    + status_field(&text, "nonvoluntary_ctxt_switches:").unwrap_or(0);
            }
        }
        Ok(Self {
            ticks,
            sched_ns,
            switches,
        })
    }
}

struct ProcMem {
    vm_rss: u64,
    anon: u64,
    shmem: u64,
    threads: u64,
}

impl ProcMem {
    fn read(pid: u32) -> Res<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let get = |k: &str| {
            status_field(&text, k).ok_or_else(|| format!("{k} missing in /proc/{pid}/status"))
        };
        Ok(Self {
            vm_rss: get("VmRSS:")?,
            anon: get("RssAnon:")?,
            shmem: get("RssShmem:")?,
            threads: get("Threads:")?,
        })
    }
}

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `path (filesystem)`: slot lock files are created there, one per connection, so the file system shows in the
/// connect figures (see docs/BENCHMARKS.md).
fn describe_dir(path: &Path) -> String {
    let fs = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .ok()
        .and_then(|c| {
            let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
            // SAFETY: a NUL-terminated path and a valid out-pointer; read only after success.
            (unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } == 0)
                .then(|| unsafe { st.assume_init() }.f_type)
        })
        .map_or("unknown file system".to_owned(), |magic| match magic {
            0x0102_1994 => "tmpfs".to_owned(),
            0xEF53 => "ext4".to_owned(),
            0x5846_5342 => "xfs".to_owned(),
            0x9123_683E => "btrfs".to_owned(),
            other => format!("file system magic {other:#x}"),
        });
    format!("{} ({fs})", path.display())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Raises the soft open-file limit to the hard limit (1000 clients hold a few descriptors each); children inherit.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0
        && limit.rlim_cur < limit.rlim_max
    {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: valid in-pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

// ------------------------------------------------------------------------------------------------------------
// Children
// ------------------------------------------------------------------------------------------------------------

fn child_main(args: &[String]) -> Res<()> {
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .ok_or("missing child argument")
    };
    match arg(0)? {
        "serve" => child_serve(Path::new(arg(1)?), arg(2)?, false),
        "count" => child_serve(Path::new(arg(1)?), arg(2)?, true),
        "floor" => child_floor(arg(1)?),
        "uds" => child_uds(Path::new(arg(1)?)),
        other => Err(format!("unknown child role {other:?}").into()),
    }
}

/// Serves until stdin closes: the scripted handler (pings are answered by the reactor) or a counting handler.
fn child_serve(root: &Path, name: &str, counting: bool) -> Res<()> {
    let endpoint = Endpoint::in_root(name, root)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let handler: Arc<dyn ServerHandler> = if counting {
        Arc::new(CountingHandler::default())
    } else {
        Arc::new(ScriptedHandler(ScriptedPeer::new(runtime.handle().clone())))
    };
    let server = Server::bind(&endpoint, ServerOptions::default(), handler)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready {}", std::process::id())?;
    stdout.flush()?;
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    server.shutdown();
    drop(runtime);
    Ok(())
}

/// Counts `Cancel`-typed frames (their payload is not decoded) and answers `StatusRequest` with the counts so
/// far, then resets them: `cancels` = frames counted, `requests` = their payload bytes.
#[derive(Default)]
struct CountingHandler {
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl ServerHandler for CountingHandler {
    fn on_message(&self, connection: &Arc<ServerConnection>, message: &ReceivedMessage<'_>) {
        match message.message_type() {
            Some(MessageType::Cancel) => {
                self.frames.fetch_add(1, Ordering::Relaxed);
                self.bytes
                    .fetch_add(message.payload.len() as u64, Ordering::Relaxed);
            }
            Some(MessageType::StatusRequest) => {
                let reply = StatusReply {
                    cancels: self.frames.swap(0, Ordering::Relaxed),
                    requests: self.bytes.swap(0, Ordering::Relaxed),
                    engine_pid: std::process::id(),
                    ..StatusReply::default()
                };
                let sent = lapce_ai_transport::protocol::encode(&reply)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        connection
                            .try_send_raw(MessageType::StatusReply.code(), message.id(), &bytes)
                            .map_err(|e| e.to_string())
                    });
                // The client waits for this reply with nothing else in flight, so its ring has room.
                if !matches!(sent, Ok(true)) {
                    eprintln!("transport-bench counting server: could not reply: {sent:?}");
                }
            }
            _ => {}
        }
    }
}

/// The floor's echo side: spins on the ping sequence, copies the payload back, publishes the pong sequence.
fn child_floor(name: &str) -> Res<()> {
    let fd = open_shm(name, false)?;
    let map = FloorMap::map(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    drop(fd);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "mapped")?;
    stdout.flush()?;
    let page = map.page();
    let mut buf = [0u8; PAYLOAD];
    let mut last = 0u64;
    loop {
        let mut seq = 0;
        spin_until(Duration::from_secs(30), || {
            seq = page.ping.seq.load(Ordering::Acquire);
            seq != last
        })?;
        if seq == FLOOR_STOP {
            return Ok(());
        }
        map.read_payload(&page.ping, &mut buf);
        map.write_payload(&page.pong, &buf);
        page.pong.seq.store(seq, Ordering::Release);
        last = seq;
    }
}

/// The Unix-socket echo side: verifies each frame and answers with a re-encoded `Pong` frame.
fn child_uds(path: &Path) -> Res<()> {
    let mut stream = UnixStream::connect(path)?;
    let mut payload = Vec::with_capacity(PAYLOAD);
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + PAYLOAD);
    while let Some(header) = read_frame(&mut stream, &mut payload)? {
        encode_frame(
            MessageType::Pong.code(),
            header.message_id,
            &payload,
            &mut frame,
        );
        stream.write_all(&frame)?;
    }
    Ok(())
}
