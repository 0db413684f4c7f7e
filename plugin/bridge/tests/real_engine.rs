//! The bridge against a real `ai-engine` on a private endpoint: auto-start, keystroke bursts, the engine
//! killed with SIGKILL (the next request auto-restarts it), and the bridge killed (the engine keeps running).

mod support;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lapce_ai_engine_testkit::{fake_config, FakeOpenAi, Script};
use lapce_ai_transport::segment::EngineIdentity;
use serde_json::json;
use support::{is_error, items, Client};

const T: Duration = Duration::from_secs(20);

/// The `ai-engine` binary of this build (built on demand when only this crate's tests were built).
fn engine_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let engine = profile_dir.join("ai-engine");
    if !engine.is_file() {
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "ai-engine", "--bin", "ai-engine"]);
        if profile != "debug" {
            build.args(["--profile", profile]);
        }
        assert!(build.status().expect("cargo build").success());
    }
    engine
}

/// Private runtime root, config and state dirs for one engine + bridge pair.
struct Sandbox {
    dir: tempfile::TempDir,
    endpoint: String,
}

impl Sandbox {
    fn new(name: &str, base_url: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let private = |p: &Path| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).expect("chmod")
        };
        private(dir.path());
        std::fs::create_dir(dir.path().join("run")).expect("mkdir");
        private(&dir.path().join("run"));
        let config_dir = dir.path().join("config/lapce-ai");
        std::fs::create_dir_all(&config_dir).expect("mkdir");
        let config = config_dir.join("engine.toml");
        std::fs::write(&config, fake_config(base_url)).expect("config");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Self {
            dir,
            endpoint: format!("{name}-{}", std::process::id()),
        }
    }

    fn envs(&self) -> Vec<(&'static str, OsString)> {
        let p = |s: &str| self.dir.path().join(s).into_os_string();
        vec![
            ("LAPCE_AI_RUNTIME_DIR", p("run")),
            ("XDG_CONFIG_HOME", p("config")),
            ("XDG_STATE_HOME", p("state")),
            ("XDG_CACHE_HOME", p("cache")),
        ]
    }

    /// Kills the auto-started engine if it still runs (a failed test never reached its `stop`).
    fn kill_engine(&self) {
        if let Some(pid) = self.engine_pid() {
            // SAFETY: kill(2) on the engine this sandbox's bridge started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// The auto-started engine's log (for failure messages).
    fn engine_log(&self) -> String {
        let dir = self.dir.path().join("state/lapce-ai");
        let mut out = String::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
        out
    }

    fn engine_lock(&self) -> PathBuf {
        self.dir
            .path()
            .join("run")
            .join(&self.endpoint)
            .join("engine.lock")
    }

    /// The running engine's pid, from engine.lock (None when no engine holds it).
    fn engine_pid(&self) -> Option<i32> {
        if !lapce_ai_transport::lockfile::path_is_locked(&self.engine_lock()).ok()? {
            return None;
        }
        let file = std::fs::File::open(self.engine_lock()).ok()?;
        let pid = EngineIdentity::read(&file).ok()?.pid()?;
        i32::try_from(pid).ok()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(engine_binary())
            .args(["--endpoint", &self.endpoint])
            .args(args)
            .envs(self.envs())
            .output()
            .expect("ai-engine cli")
    }

    fn assert_clean(&self) {
        let run = self.dir.path().join("run");
        let endpoint =
            lapce_ai_transport::Endpoint::in_root(&self.endpoint, &run).expect("endpoint");
        lapce_ai_testkit::assert_endpoint_clean(&endpoint);
    }
}

fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn real_engine_burst_engine_kill_and_bridge_kill() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let fake = runtime.block_on(FakeOpenAi::start(Script {
        pieces: vec![
            "total".into(),
            " * 2;".into(),
            "\n".into(),
            "    println!(\"{doubled}\");\n".into(),
        ],
        delay: Duration::from_millis(1),
    }));
    let sandbox = Sandbox::new("bridge", &format!("http://127.0.0.1:{}", fake.port));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bridge = Client::spawn_in(dir, &sandbox.envs());
    let engine = engine_binary();
    bridge.initialize(Some(json!({
        "endpoint": sandbox.endpoint,
        "engine-path": engine.display().to_string(),
        "debounce-ms": 150,
    })));
    let uri = bridge.uri("main.rs");
    bridge.open(&uri, "rust", "fn main() {\n    let total = 21;\n    \n}\n");

    // Type `let doubled = ` with an inline request per keystroke and no cancels, as Lapce does.
    let typed = "let doubled = ";
    let mut ids = Vec::new();
    for (i, ch) in typed.chars().enumerate() {
        let col = 4 + i as u32;
        bridge.change(&uri, i as i32 + 1, (2, col), (2, col), &ch.to_string());
        ids.push(bridge.inline(&uri, (2, col + 1), 2));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (last, earlier) = ids.split_last().expect("ids");
    for id in earlier {
        let response = bridge.response(*id, T);
        assert!(
            is_error(&response),
            "superseded request {id} must get an error: {response}"
        );
    }
    let response = bridge.response(*last, T);
    assert_eq!(
        items(&response),
        vec!["total * 2;".to_owned()],
        "{response}\n{}",
        bridge.log()
    );
    let provider_calls = fake.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=3).contains(&provider_calls),
        "{} keystrokes made {provider_calls} provider calls",
        typed.len()
    );

    // The bridge started the engine detached: kill it with SIGKILL.
    let first_engine = sandbox.engine_pid().expect("an engine was auto-started");
    // SAFETY: kill(2) on the engine we started.
    unsafe { libc::kill(first_engine, libc::SIGKILL) };
    assert!(
        wait_until(T, || sandbox.engine_pid().is_none()),
        "engine lock not released"
    );

    // The next request restarts the engine and answers.
    let id = bridge.inline(&uri, (2, 4 + typed.len() as u32), 1);
    let response = bridge.response(id, T);
    assert_eq!(
        items(&response),
        vec!["total * 2;".to_owned()],
        "{response}\n{}",
        bridge.log()
    );
    let second_engine = sandbox.engine_pid().expect("engine restarted");
    assert_ne!(first_engine, second_engine);

    // Lapce stops the bridge with SIGKILL: the engine keeps serving.
    bridge.child.kill().expect("kill bridge");
    bridge.child.wait().expect("reap bridge");
    let status = sandbox.cli(&["--no-start", "status", "--json"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(status["pid"], json!(second_engine));
    assert!(
        wait_until(T, || {
            let out = sandbox.cli(&["--no-start", "status", "--json"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["connections"] == json!(1))
        }),
        "the killed bridge's connection was not released"
    );

    let stop = sandbox.cli(&["stop"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    sandbox.assert_clean();
}

/// Types one character at the end of line 1 of `main.rs` and asks for a completion there; returns the body the
/// provider received for it (each keystroke changes the prefix, so the engine's cache never answers).
fn keystroke_body(
    bridge: &mut Client,
    fake: &FakeOpenAi,
    uri: &str,
    typed: &mut String,
    version: &mut i32,
) -> String {
    let column = "    let x = ".len() as u32 + typed.len() as u32;
    *version += 1;
    bridge.change(uri, *version, (1, column), (1, column), "s");
    typed.push('s');
    let before = fake.bodies.lock().unwrap().len();
    let id = bridge.inline(uri, (1, column + 1), 1);
    let response = bridge.response(id, T);
    assert!(!is_error(&response), "{response}\n{}", bridge.log());
    let bodies = fake.bodies.lock().unwrap();
    assert_eq!(bodies.len(), before + 1, "{}", bridge.log());
    bodies[before].clone()
}

#[test]
fn the_engine_sees_definitions_and_edits_from_other_open_documents() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let fake = runtime.block_on(FakeOpenAi::start(Script {
        pieces: vec!["3)".into()],
        delay: Duration::from_millis(1),
    }));
    let sandbox = Sandbox::new("bridge-context", &fake.base_url());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bridge = Client::spawn_in(dir, &sandbox.envs());
    bridge.initialize(Some(json!({
        "endpoint": sandbox.endpoint,
        "engine-path": engine_binary().display().to_string(),
    })));
    let util = bridge.uri("util.rs");
    bridge.open(
        &util,
        "rust",
        "pub fn scale_total(total: u32) -> u32 {\n    total * 3\n}\n",
    );
    let main = bridge.uri("main.rs");
    bridge.open(&main, "rust", "fn main() {\n    let x = \n}\n");
    let (mut typed, mut version) = (String::new(), 0);

    // The first completion starts the engine; the documents follow in the background right after.
    let deadline = Instant::now() + T;
    let body = loop {
        let body = keystroke_body(&mut bridge, &fake, &main, &mut typed, &mut version);
        if body.contains("scale_total") || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let sent: serde_json::Value = serde_json::from_str(&body).expect("json body");
    let prompt = sent["prompt"].as_str().expect("prompt");
    assert!(
        prompt.starts_with(
            "// Path: util.rs\n// pub fn scale_total(total: u32) -> u32 {\n//     total * 3\n// }\n"
        ),
        "{prompt}\n{}",
        sandbox.engine_log()
    );
    assert!(
        prompt.ends_with(&format!("fn main() {{\n    let x = {typed}")),
        "{prompt}"
    );

    // An edit in util.rs travels as a byte range and shows up as a recently edited place.
    bridge.change(&util, 1, (1, 4), (1, 4), "2 + ");
    let deadline = Instant::now() + T;
    let prompt = loop {
        let body = keystroke_body(&mut bridge, &fake, &main, &mut typed, &mut version);
        let sent: serde_json::Value = serde_json::from_str(&body).expect("json body");
        let prompt = sent["prompt"].as_str().expect("prompt").to_owned();
        if prompt.contains("2 + total") || Instant::now() > deadline {
            break prompt;
        }
    };
    assert!(
        prompt.contains("//     2 + total * 3\n"),
        "{prompt}\n{}",
        bridge.log()
    );

    bridge.child.kill().expect("kill bridge");
    bridge.child.wait().expect("reap bridge");
    let stop = sandbox.cli(&["stop"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    sandbox.assert_clean();
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_engine();
    }
}
