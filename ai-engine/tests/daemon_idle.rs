//! Idle exit: `serve --idle-exit` stops a daemon that has had no clients for that long; a connected client
//! holds it, `status` shows the time left without resetting it.

#[allow(unused_imports)]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use lapce_ai_transport::{AsyncClient, ClientOptions};
use support::{fake_config, Sandbox};

fn exited_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn daemon_exits_after_the_idle_time_without_clients() {
    let sandbox = Sandbox::new("idle");
    let config = sandbox.config(&fake_config("http://127.0.0.1:9"));
    let mut engine = sandbox
        .command()
        .arg("--config")
        .arg(&config)
        .args(["serve", "--idle-exit", "3s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    lapce_ai_transport::wait_for_engine(&sandbox.endpoint, Duration::from_secs(20))
        .expect("engine did not start");

    // A client holds the daemon past the idle time.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(AsyncClient::connect(
            &sandbox.endpoint,
            ClientOptions::default(),
        ))
        .unwrap();
    let held = sandbox.status_json();
    assert_eq!(held["idle_exit"]["after_ms"], 3000, "{held}");
    assert!(
        held["idle_exit"]["in_ms"].is_null(),
        "no countdown with a client: {held}"
    );
    assert!(
        exited_within(&mut engine, Duration::from_secs(4)).is_none(),
        "exited with a client connected"
    );

    // The client leaves: the countdown runs, and status queries see it without resetting it.
    drop(client);
    std::thread::sleep(Duration::from_millis(300));
    let first = sandbox.status_json()["idle_exit"]["in_ms"]
        .as_u64()
        .expect("countdown");
    assert!(first <= 3000, "{first}");
    std::thread::sleep(Duration::from_millis(700));
    let second = sandbox.status_json()["idle_exit"]["in_ms"]
        .as_u64()
        .expect("countdown");
    assert!(
        second < first,
        "status does not reset the countdown: {first} then {second}"
    );
    let text = sandbox.status(&[]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("idle exit    in "), "{text}");

    let exit = exited_within(&mut engine, Duration::from_secs(10)).expect("idle daemon exited");
    assert!(exit.success(), "{exit}");
    sandbox.assert_clean();
}

#[test]
fn idle_exit_durations_are_validated() {
    let sandbox = Sandbox::new("idle-flag");
    let output = sandbox
        .command()
        .args(["serve", "--idle-exit", "soon"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("90s, 30m, 2h or never"), "{stderr}");
}
