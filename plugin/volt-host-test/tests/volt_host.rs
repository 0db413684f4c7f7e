//! Runs the built lapce-ai volt in a Lapce-like wasmtime host and checks what it asks Lapce to do.

mod common;

use std::path::Path;

use common::*;
use lapce_ai_volt_host_test::VoltHost;
use serde_json::json;

/// A volt folder whose bin/ holds a (stand-in) bridge and engine for this machine.
fn installed_volt() -> tempfile::TempDir {
    volt_dir(&[
        (bridge_name(), fake_executable()),
        (engine_name(), fake_executable()),
    ])
}

#[test]
fn initialize_without_options_starts_the_bundled_bridge_with_defaults() {
    let dir = installed_volt();
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
    // lapce-plugin 0.1.2 (the newest on crates.io) has only the notification form of startLspServer,
    // which Lapce 0.4.6 accepts with this one warning; the request form is only in lapce-plugin's git.
    assert_eq!(
        host.lapce_warnings(),
        ["Usage of startLspServer as a notification is deprecated."]
    );
    // `initialized` afterwards is accepted quietly and starts nothing more.
    let more = host
        .send(&json!({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
        .expect("initialized");
    assert!(by_method(&more, "host/startLspServer").is_empty());
}

#[test]
fn user_options_override_the_defaults() {
    let dir = installed_volt();
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
fn a_development_build_without_binaries_starts_nothing_and_says_how_to_install() {
    let dir = volt_dir(&[]);
    let mut host = VoltHost::load(dir.path()).expect("load volt");
    let msgs = host.send(&initialize(None)).expect("handle_rpc");
    assert_one_message_per_call(&msgs);
    let (kind, message) = one_message(&msgs);
    assert_eq!(kind, 1, "an error");
    assert!(message.contains("cargo xtask install"), "{message}");
    assert!(
        by_method(&msgs, "host/startLspServer").is_empty(),
        "{msgs:#?}"
    );
    assert!(
        host.http_requests().is_empty(),
        "no checksum: nothing downloaded"
    );
}

#[test]
fn a_binary_for_another_format_or_cpu_is_not_started() {
    let other_cpu = {
        let mut e = fake_executable();
        e[18] = if std::env::consts::ARCH == "aarch64" {
            62
        } else {
            183
        };
        e
    };
    for bridge in [b"#!/bin/sh\necho not a binary\n".to_vec(), other_cpu] {
        let dir = volt_dir(&[(bridge_name(), bridge), (engine_name(), fake_executable())]);
        let mut host = VoltHost::load(dir.path()).expect("load volt");
        let msgs = host.send(&initialize(None)).expect("handle_rpc");
        let (kind, _) = one_message(&msgs);
        assert_eq!(kind, 1, "an error: {msgs:#?}");
        assert!(
            by_method(&msgs, "host/startLspServer").is_empty(),
            "{msgs:#?}"
        );
    }
}

#[test]
fn xtask_install_produces_a_folder_the_host_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volt = dir.path().join("lapce-ai");
    // The test checks the layout, not the optimisation: reuse the test build's profile.
    let stdout = xtask(
        "dev",
        &[
            "install".as_ref(),
            "--skip-model".as_ref(),
            "--dir".as_ref(),
            volt.as_os_str(),
        ],
    );
    assert!(stdout.contains("--plugin-path"), "{stdout}");
    for file in ["volt.toml", "lapce-ai.wasm", "icon.svg"] {
        assert!(volt.join(file).is_file(), "{file} installed");
    }
    let engine = volt.join("bin").join(engine_name());
    assert!(engine.is_file(), "engine installed");
    let bridge = volt.join("bin").join(bridge_name());
    let version = std::process::Command::new(&bridge)
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
