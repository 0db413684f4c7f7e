//! A registry install end to end: only the registry archive (`cargo xtask package --registry-only`) is
//! extracted into a plugins folder; the volt downloads the platform archive from a local HTTP server,
//! verifies and unpacks it, asks Lapce to start the bridge, and the bridge answers an inline completion.
//! Then the failures: a tampered or partial download, a 404, the server down.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::*;
use lapce_ai_engine_testkit::{fake_config, FakeOpenAi, Script};
use lapce_ai_volt_host_test::VoltHost;
use serde_json::{json, Value};
use wiremock::{
    matchers::{method, path},
    Mock, MockServer, ResponseTemplate,
};

const T: Duration = Duration::from_secs(60);

/// The debug bridge and engine of this build.
fn native_binaries() -> (PathBuf, PathBuf) {
    let _lock = cargo_lock();
    let status = cargo()
        .args([
            "build",
            "-p",
            "lapce-ai-lsp",
            "--bin",
            "lapce-ai-lsp",
            "-p",
            "ai-engine",
            "--bin",
            "ai-engine",
        ])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building the bridge and engine failed");
    let debug = target_dir().join("debug");
    (debug.join("lapce-ai-lsp"), debug.join("ai-engine"))
}

/// `lapce-ai-<version>-<os>-<arch>.tar.gz` as `cargo xtask package` names it.
fn archive_name() -> String {
    format!(
        "lapce-ai-{}-{}-{}.tar.gz",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// The platform archive: bin/ with the bridge and the engine, modes dropped (as a WASI unpack leaves them).
fn platform_archive(bridge: &Path, engine: &Path) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, file) in [(bridge_name(), bridge), (engine_name(), engine)] {
        let data = std::fs::read(file).expect("binary");
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, format!("bin/{name}"), data.as_slice())
            .expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

/// Runs `cargo xtask package --registry-only` on a folder holding `archive` and returns the `.volt` file.
fn registry_archive(dist: &Path, archive: &[u8], release_url: &str) -> PathBuf {
    std::fs::write(dist.join(archive_name()), archive).expect("archive");
    xtask(
        "release",
        &[
            "package".as_ref(),
            "--registry-only".as_ref(),
            "--release-url".as_ref(),
            release_url.as_ref(),
            "--out-dir".as_ref(),
            dist.as_os_str(),
        ],
    );
    let sums = std::fs::read_to_string(dist.join("SHA256SUMS")).expect("SHA256SUMS");
    assert!(sums.contains(&archive_name()), "{sums}");
    dist.join(format!("lapce-ai-{}.volt", env!("CARGO_PKG_VERSION")))
}

/// Extracts the registry archive (zstd tar) into a fresh `plugins/<author>.<name>` folder, like Lapce.
fn install_from_registry(volt_file: &Path, plugins: &Path, folder: &str) -> PathBuf {
    let dir = plugins.join(folder);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let decoder = zstd::Decoder::new(std::fs::File::open(volt_file).expect("open")).expect("zstd");
    let mut archive = tar::Archive::new(decoder);
    let mut names = Vec::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        names.push(entry.path().expect("path").display().to_string());
        entry.unpack_in(&dir).expect("unpack");
    }
    assert_eq!(
        names,
        ["volt.toml", "lapce-ai.wasm", "README.md", "icon.svg"],
        "exactly what volts publish packs"
    );
    dir
}

/// Entries of a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Loads the volt, sends Lapce's `initialize`, checks the one-message-per-call rule.
fn start_volt(dir: &Path, options: Value) -> (VoltHost, Vec<Value>) {
    let mut host = VoltHost::load(dir).expect("load volt");
    let msgs = host.send(&initialize(Some(options))).expect("handle_rpc");
    assert_one_message_per_call(&msgs);
    (host, msgs)
}

/// A failed first start: one error message containing `expect`, nothing started, nothing unpacked.
fn assert_refused(
    volt_file: &Path,
    plugins: &Path,
    folder: &str,
    download_url: &str,
    expect: &str,
) {
    let dir = install_from_registry(volt_file, plugins, folder);
    let (host, msgs) = start_volt(&dir, json!({ "download-url": download_url }));
    assert_eq!(host.http_requests().len(), 1, "{:?}", host.http_requests());
    let (kind, message) = one_message(&msgs);
    assert_eq!(kind, 1, "an error: {message}");
    assert!(
        message.contains(expect),
        "{message:?} should mention {expect:?}"
    );
    assert!(
        by_method(&msgs, "host/startLspServer").is_empty(),
        "nothing unverified runs: {msgs:#?}"
    );
    assert_eq!(
        listing(&dir),
        ["README.md", "icon.svg", "lapce-ai.wasm", "volt.toml"],
        "nothing half unpacked"
    );
}

/// A minimal LSP client over a child's stdio (Content-Length framing), as Lapce talks to the bridge.
struct Lsp {
    child: Child,
    incoming: mpsc::Receiver<Value>,
}

impl Lsp {
    fn send(&mut self, msg: Value) {
        let body = msg.to_string();
        let stdin = self.child.stdin.as_mut().expect("stdin");
        write!(stdin, "Content-Length: {}\r\n\r\n{body}", body.len()).expect("write");
        stdin.flush().expect("flush");
    }

    fn response(&self, id: i64) -> Value {
        loop {
            let msg = self
                .incoming
                .recv_timeout(T)
                .expect("bridge answered in time");
            if msg.get("id") == Some(&json!(id)) && msg.get("method").is_none() {
                return msg;
            }
        }
    }
}

fn spawn_lsp(program: &Path, cwd: &Path, envs: &[(&str, PathBuf)]) -> Lsp {
    let mut child = Command::new(program)
        .current_dir(cwd)
        .envs(envs.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the bridge");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let (tx, incoming) = mpsc::channel();
    std::thread::spawn(move || loop {
        let mut length = None;
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim();
            if line.is_empty() {
                break;
            }
            if let Some(n) = line.strip_prefix("Content-Length:") {
                length = n.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length.unwrap_or(0)];
        if stdout.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    Lsp { child, incoming }
}

#[test]
fn registry_install_downloads_verifies_unpacks_and_completes() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (bridge, engine) = native_binaries();
    let archive = platform_archive(&bridge, &engine);
    let mut tampered = archive.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0xff;
    let partial = archive[..archive.len() / 3].to_vec();

    let server = runtime.block_on(MockServer::start());
    let provider = runtime.block_on(FakeOpenAi::start(Script {
        pieces: vec!["a + b".into()],
        delay: Duration::from_millis(1),
    }));
    runtime.block_on(async {
        for (folder, body) in [
            ("rel", &archive),
            ("tampered", &tampered),
            ("partial", &partial),
        ] {
            Mock::given(method("GET"))
                .and(path(format!("/{folder}/{}", archive_name())))
                .respond_with(ResponseTemplate::new(200).set_body_bytes(body.clone()))
                .mount(&server)
                .await;
        }
    });

    let work = tempfile::tempdir().expect("tempdir");
    let dist = work.path().join("dist");
    std::fs::create_dir(&dist).expect("dist");
    let volt_file = registry_archive(&dist, &archive, &format!("{}/rel", server.uri()));
    let plugins = work.path().join("plugins");

    // First start: download, verify, unpack, start the bridge.
    let dir = install_from_registry(&volt_file, &plugins, "lapce-ai.lapce-ai");
    let endpoint = format!("registry-{}", std::process::id());
    let (host, msgs) = start_volt(&dir, json!({ "endpoint": endpoint, "debounce-ms": 20 }));
    assert_eq!(
        host.http_requests(),
        [format!("{}/rel/{}", server.uri(), archive_name())]
    );
    let (kind, message) = one_message(&msgs);
    assert_eq!(kind, 3, "an info message: {message}");
    assert!(message.contains("installed"), "{message}");
    let start = start_request(&msgs);
    let uri = start["serverUri"].as_str().expect("uri");
    assert_eq!(uri, format!("{}bin/{}", host.volt_uri, bridge_name()));
    assert_eq!(listing(&dir.join("bin")), {
        let mut want = vec![engine_name(), bridge_name()];
        want.sort();
        want
    });
    assert!(!dir.join(".lapce-ai-installing").exists());

    // Lapce: chmod +x the file:// server, run it with the workspace as cwd, the options as
    // initializationOptions.
    let server_path = PathBuf::from(uri.strip_prefix("file://").expect("file uri"));
    assert!(Command::new("chmod")
        .arg("+x")
        .arg(&server_path)
        .status()
        .expect("chmod")
        .success());
    let sandbox = work.path().join("sandbox");
    for sub in [
        "run",
        "config/lapce-ai",
        "state",
        "cache",
        "home",
        "workspace",
    ] {
        std::fs::create_dir_all(sandbox.join(sub)).expect("mkdir");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        for private in [sandbox.clone(), sandbox.join("run")] {
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
        }
    }
    std::fs::write(
        sandbox.join("config/lapce-ai/engine.toml"),
        fake_config(&format!("http://127.0.0.1:{}", provider.port)),
    )
    .expect("engine.toml");
    let envs: Vec<(&str, PathBuf)> = vec![
        ("LAPCE_AI_RUNTIME_DIR", sandbox.join("run")),
        ("XDG_CONFIG_HOME", sandbox.join("config")),
        ("XDG_STATE_HOME", sandbox.join("state")),
        ("XDG_CACHE_HOME", sandbox.join("cache")),
        ("HOME", sandbox.join("home")),
    ];
    let mut lsp = spawn_lsp(&server_path, &sandbox.join("workspace"), &envs);
    let root = format!("file://{}/", sandbox.join("workspace").display());
    lsp.send(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "processId": std::process::id(), "rootUri": root, "capabilities": {"textDocument": {"inlineCompletion": {}}},
        "initializationOptions": start["options"],
    }}));
    let init = lsp.response(1);
    assert!(
        init["result"]["capabilities"]["inlineCompletionProvider"].is_object()
            || init["result"]["capabilities"]["inlineCompletionProvider"] == json!(true),
        "{init}"
    );
    lsp.send(json!({"jsonrpc": "2.0", "method": "initialized", "params": {}}));
    let uri = format!("{root}add.py");
    lsp.send(json!({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": uri, "languageId": "python", "version": 0, "text": "def add(a, b):\n    return \n"}}}));
    lsp.send(json!({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
        "textDocument": {"uri": uri}, "position": {"line": 1, "character": 11}, "context": {"triggerKind": 1}}}));
    let reply = lsp.response(2);
    let first = reply["result"]
        .as_array()
        .or_else(|| reply["result"]["items"].as_array())
        .and_then(|items| items.first())
        .and_then(|item| item["insertText"].as_str())
        .map(str::to_owned);
    assert_eq!(first.as_deref(), Some("a + b"), "{reply}");
    // The bridge made the unpacked engine executable and linked the command our messages name.
    let link = sandbox.join("home/.local/bin/ai-engine");
    assert_eq!(
        std::fs::read_link(&link).expect("ai-engine link"),
        dir.join("bin").join(engine_name())
    );

    let _ = lsp.child.kill();
    let _ = lsp.child.wait();
    let stopped = Command::new(dir.join("bin").join(engine_name()))
        .args(["--endpoint", &endpoint, "stop"])
        .envs(envs.iter().map(|(k, v)| (*k, v)))
        .output()
        .expect("ai-engine stop");
    assert!(stopped.status.success(), "{stopped:?}");

    // Failures: one message each, nothing started, nothing unpacked.
    assert_refused(
        &volt_file,
        &plugins,
        "tampered",
        &format!("{}/tampered", server.uri()),
        "checksum",
    );
    assert_refused(
        &volt_file,
        &plugins,
        "partial",
        &format!("{}/partial", server.uri()),
        "checksum",
    );
    assert_refused(
        &volt_file,
        &plugins,
        "missing",
        &format!("{}/missing", server.uri()),
        "404",
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let down = format!("http://{}/rel", closed.local_addr().expect("addr"));
    drop(closed);
    assert_refused(&volt_file, &plugins, "down", &down, "could not download");
}
