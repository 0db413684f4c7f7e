//! Runs the built lapce-ai volt in a Lapce-like wasmtime host and checks what it asks Lapce to do.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use lapce_ai_volt_host_test::VoltHost;
use serde_json::{json, Value};

/// Serialises the cargo invocations of these tests.
static CARGO: Mutex<()> = Mutex::new(());

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
        Some(t) => workspace_root().join(t),
        None => workspace_root().join("target"),
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir());
    c
}

/// Builds the wasm volt (release, wasm32-wasip1) and returns its path.
fn built_wasm() -> PathBuf {
    let _lock = CARGO.lock().unwrap_or_else(|p| p.into_inner());
    let status = cargo()
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip1",
            "-p",
            "lapce-ai-volt",
        ])
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "building the volt failed (needs `rustup target add wasm32-wasip1`)"
    );
    target_dir().join("wasm32-wasip1/release/lapce_ai_volt.wasm")
}

fn bridge_name() -> String {
    format!(
        "lapce-ai-lsp-{}-{}{}",
        std::env::consts::OS,
        std::env::consts::ARCH,
        std::env::consts::EXE_SUFFIX
    )
}

/// A volt folder with volt.toml, the wasm and (optionally) bin/ contents.
fn volt_dir(bridge: Option<&[u8]>) -> tempfile::TempDir {
    let wasm = built_wasm();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = workspace_root();
    std::fs::copy(root.join("volt.toml"), dir.path().join("volt.toml")).expect("volt.toml");
    std::fs::copy(root.join("icon.svg"), dir.path().join("icon.svg")).expect("icon");
    std::fs::copy(wasm, dir.path().join("lapce-ai.wasm")).expect("wasm");
    if let Some(bytes) = bridge {
        std::fs::create_dir_all(dir.path().join("bin")).expect("bin");
        std::fs::write(dir.path().join("bin").join(bridge_name()), bytes).expect("bridge");
    }
    dir
}

/// A stand-in executable for the host OS (only its header is looked at).
fn fake_executable() -> Vec<u8> {
    let mut head = match std::env::consts::OS {
        "macos" => vec![0xcf, 0xfa, 0xed, 0xfe],
        "windows" => b"MZ".to_vec(),
        _ => b"\x7fELF".to_vec(),
    };
    head.extend_from_slice(&[0; 60]);
    head
}

/// `initialize` exactly as Lapce sends it to a volt (id 0).
fn initialize(options: Option<Value>) -> Value {
    let mut params = json!({
        "processId": 4242,
        "rootUri": "file:///home/user/project/",
        "capabilities": { "textDocument": { "inlineCompletion": {} } },
        "workspaceFolders": [{ "uri": "file:///home/user/project/", "name": "file:///home/user/project/" }],
    });
    if let Some(o) = options {
        params["initializationOptions"] = o;
    }
    json!({ "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params })
}

fn defaults() -> Value {
    json!({
        "enabled": true,
        "profile": "",
        "model": "",
        "debounce-ms": 150,
        "max-lines": 8,
        "endpoint": "default",
        "engine-path": "",
        "multiline": "auto",
    })
}

fn by_method<'a>(msgs: &'a [Value], method: &str) -> Vec<&'a Value> {
    msgs.iter()
        .filter(|m| m.get("method").and_then(Value::as_str) == Some(method))
        .collect()
}

fn start_request(msgs: &[Value]) -> Value {
    let starts = by_method(msgs, "host/startLspServer");
    assert_eq!(starts.len(), 1, "exactly one start request: {msgs:#?}");
    starts[0]["params"].clone()
}

#[test]
fn initialize_without_options_starts_the_bundled_bridge_with_defaults() {
    let dir = volt_dir(Some(&fake_executable()));
    let mut host = VoltHost::load(dir.path()).expect("load volt");
    let msgs = host.send(&initialize(None)).expect("handle_rpc");
    // The volt answers initialize.
    let reply = msgs
        .iter()
        .find(|m| m.get("id") == Some(&json!(0)) && m.get("method").is_none())
        .expect("initialize reply");
    assert!(reply["result"]["capabilities"].is_object(), "{reply}");
    let start = start_request(&msgs);
    let expected_uri = format!("{}bin/{}", host.volt_uri, bridge_name());
    assert_eq!(start["serverUri"], json!(expected_uri));
    assert!(
        expected_uri.starts_with("file:///"),
        "a file:// path inside the volt folder: {expected_uri}"
    );
    assert_eq!(start["serverArgs"], json!([]));
    assert_eq!(start["documentSelector"], json!([{}]));
    assert_eq!(start["options"], defaults());
    assert!(
        by_method(&msgs, "window/showMessage").is_empty(),
        "{msgs:#?}"
    );
    // `initialized` afterwards is accepted quietly and starts nothing more.
    let more = host
        .send(&json!({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
        .expect("initialized");
    assert!(by_method(&more, "host/startLspServer").is_empty());
}

#[test]
fn user_options_override_the_defaults() {
    let dir = volt_dir(Some(&fake_executable()));
    let mut host = VoltHost::load(dir.path()).expect("load volt");
    let user =
        json!({ "debounce-ms": 60, "profile": "fast", "enabled": false, "extra": { "x": 1 } });
    let msgs = host.send(&initialize(Some(user))).expect("handle_rpc");
    let start = start_request(&msgs);
    let mut expected = defaults();
    expected["debounce-ms"] = json!(60);
    expected["profile"] = json!("fast");
    expected["enabled"] = json!(false);
    expected["extra"] = json!({ "x": 1 });
    assert_eq!(start["options"], expected);
    assert_eq!(
        start["serverUri"],
        json!(format!("{}bin/{}", host.volt_uri, bridge_name()))
    );
}

#[test]
fn missing_bridge_shows_a_message_and_falls_back_to_path() {
    let dir = volt_dir(None);
    let mut host = VoltHost::load(dir.path()).expect("load volt");
    let msgs = host.send(&initialize(None)).expect("handle_rpc");
    let shown = by_method(&msgs, "window/showMessage");
    assert_eq!(shown.len(), 1, "{msgs:#?}");
    let message = shown[0]["params"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("bin/{}", bridge_name())),
        "{message}"
    );
    assert!(message.contains("PATH"), "{message}");
    let start = start_request(&msgs);
    assert_eq!(start["serverUri"], json!("urn:lapce-ai-lsp"));
    assert_eq!(start["options"], defaults());
}

#[test]
fn unrunnable_bridge_is_reported_as_an_error() {
    let dir = volt_dir(Some(b"#!/bin/sh\necho not a binary\n"));
    let mut host = VoltHost::load(dir.path()).expect("load volt");
    let msgs = host.send(&initialize(None)).expect("handle_rpc");
    let shown = by_method(&msgs, "window/showMessage");
    assert_eq!(shown.len(), 1, "{msgs:#?}");
    assert_eq!(
        shown[0]["params"]["type"],
        json!(1),
        "an error: {:?}",
        shown[0]
    );
    assert_eq!(start_request(&msgs)["serverUri"], json!("urn:lapce-ai-lsp"));
}

#[test]
fn xtask_install_produces_a_folder_the_host_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volt = dir.path().join("lapce-ai");
    {
        let _lock = CARGO.lock().unwrap_or_else(|p| p.into_inner());
        let out = cargo()
            .args([
                "run",
                "--quiet",
                "-p",
                "xtask",
                "--",
                // The test checks the layout, not the optimisation: reuse the test build's profile.
                "--profile",
                "dev",
                "install",
                "--skip-model",
                "--dir",
            ])
            .arg(&volt)
            .output()
            .expect("run xtask");
        assert!(
            out.status.success(),
            "xtask install failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("--plugin-path"), "{stdout}");
    }
    for file in ["volt.toml", "lapce-ai.wasm", "icon.svg"] {
        assert!(volt.join(file).is_file(), "{file} installed");
    }
    let engine = volt.join("bin").join(format!(
        "ai-engine-{}-{}{}",
        std::env::consts::OS,
        std::env::consts::ARCH,
        std::env::consts::EXE_SUFFIX
    ));
    assert!(engine.is_file(), "engine installed");
    let bridge = volt.join("bin").join(bridge_name());
    let version = Command::new(&bridge)
        .arg("--version")
        .output()
        .expect("run bridge");
    assert!(version.status.success());

    let mut host = VoltHost::load(&volt).expect("load the installed volt");
    let msgs = host
        .send(&initialize(Some(json!({ "max-lines": 3 }))))
        .expect("handle_rpc");
    assert!(
        by_method(&msgs, "window/showMessage").is_empty(),
        "{msgs:#?}"
    );
    let start = start_request(&msgs);
    let uri = start["serverUri"].as_str().expect("uri").to_owned();
    assert_eq!(uri, format!("{}bin/{}", host.volt_uri, bridge_name()));
    // The URI names the installed, runnable bridge.
    let path = uri.strip_prefix("file://").expect("file uri");
    assert_eq!(Path::new(path), bridge.as_path());
    assert_eq!(start["options"]["max-lines"], json!(3));
    assert_eq!(start["options"]["debounce-ms"], json!(150));
}
