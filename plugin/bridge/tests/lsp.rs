//! End-to-end tests of `lapce-ai-lsp`, driven like Lapce drives it, against the fake engine.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{is_error, items, Client};

const T: Duration = Duration::from_secs(10);

#[test]
fn advertises_inline_completion_and_incremental_sync_only() {
    let mut c = Client::spawn("echo");
    let result = c.initialize(None);
    let caps = &result["capabilities"];
    assert_eq!(caps["inlineCompletionProvider"], json!(true));
    assert_eq!(caps["textDocumentSync"]["change"], json!(2));
    assert_eq!(caps["textDocumentSync"]["openClose"], json!(true));
    assert!(caps.get("completionProvider").is_none(), "{caps}");
    assert_eq!(caps["positionEncoding"], json!("utf-16"));
}

#[test]
fn keystroke_burst_answers_only_the_last_request() {
    let mut c = Client::spawn("echo");
    c.initialize(Some(json!({ "debounce-ms": 120 })));
    let uri = c.uri("main.rs");
    c.open(&uri, "rust", "fn main() {\n    \n}\n");
    let typed = "let total = 42;";
    let mut ids = Vec::new();
    for (i, ch) in typed.chars().enumerate() {
        let col = 4 + i as u32;
        c.change(&uri, i as i32 + 1, (1, col), (1, col), &ch.to_string());
        ids.push(c.inline(&uri, (1, col + 1), 2));
        std::thread::sleep(Duration::from_millis(15));
    }
    let (last, earlier) = ids.split_last().expect("ids");
    for id in earlier {
        let r = c.response(*id, T);
        assert!(
            is_error(&r),
            "superseded request {id} must get an error: {r}"
        );
    }
    let r = c.response(*last, T);
    let texts = items(&r);
    assert_eq!(texts.len(), 1, "{r}");
    let echo: Value = serde_json::from_str(&texts[0]).expect("echo json");
    assert_eq!(echo["prefix_line"], json!("    let total = 42;"));
    assert_eq!(echo["suffix_line"], json!(""));
    assert_eq!(echo["language_id"], json!("rust"));
    // Items carry no range: the text goes at the cursor.
    assert!(r["result"][0].get("range").is_none(), "{r}");
    let requests = c.stats()["requests"].as_u64().expect("stats");
    assert!(
        (1..=3).contains(&requests),
        "{} keystrokes made {requests} engine requests",
        typed.len()
    );
}

#[test]
fn non_ascii_positions_are_utf16() {
    let mut c = Client::spawn("echo");
    c.initialize(Some(json!({ "debounce-ms": 0 })));
    let uri = c.uri("notes.py");
    // 😀 = 2 UTF-16 units, 漢字 = 1 each.
    c.open(&uri, "python", "s = \"😀漢字\"\nx = 1\n");
    // Insert after the emoji: column 5 + 2.
    c.change(&uri, 1, (0, 7), (0, 7), "→");
    let id = c.inline(&uri, (0, 8), 1);
    let r = c.response(id, T);
    let echo: Value = serde_json::from_str(&items(&r)[0]).expect("echo json");
    assert_eq!(echo["prefix_line"], json!("s = \"😀→"));
    assert_eq!(echo["suffix_line"], json!("漢字\""));
    // Replace 漢 (one unit) and ask at the end of the line (past its length: clamped).
    c.change(&uri, 2, (0, 8), (0, 9), "🦀");
    let id = c.inline(&uri, (0, 99), 1);
    let r = c.response(id, T);
    let echo: Value = serde_json::from_str(&items(&r)[0]).expect("echo json");
    assert_eq!(echo["prefix_line"], json!("s = \"😀→🦀字\""));
    assert_eq!(echo["suffix_line"], json!(""));
}

#[test]
fn cancel_request_is_honoured() {
    let mut c = Client::spawn("slow");
    c.initialize(Some(json!({ "debounce-ms": 0 })));
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "fn a() {}\n");
    let id = c.inline(&uri, (0, 9), 1);
    std::thread::sleep(Duration::from_millis(200));
    c.notify("$/cancelRequest", json!({ "id": id }));
    let r = c.response(id, Duration::from_secs(2));
    assert_eq!(r["error"]["code"], json!(-32800), "{r}");
    // The engine stream was dropped, i.e. cancelled.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while c.stats()["dropped"] != json!(1) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.stats()["dropped"], json!(1), "{}", c.stats());
    assert_eq!(c.stats()["completed"], json!(0));
}

#[test]
fn configuration_change_disables_and_reenables() {
    let mut c = Client::spawn("echo");
    c.initialize(Some(json!({ "debounce-ms": 0, "profile": "first" })));
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "let a = 1;\n");
    let id = c.inline(&uri, (0, 10), 2);
    let echo: Value = serde_json::from_str(&items(&c.response(id, T))[0]).expect("echo json");
    assert_eq!(echo["profile"], json!("first"));
    assert_eq!(echo["max_lines"], json!(8), "the default max-lines setting");

    c.notify(
        "workspace/didChangeConfiguration",
        json!({ "settings": { "lapce-ai": { "enabled": false } } }),
    );
    let id = c.inline(&uri, (0, 10), 2);
    let r = c.response(id, T);
    assert_eq!(r["result"], json!([]), "{r}");

    c.notify(
        "workspace/didChangeConfiguration",
        json!({ "settings": { "enabled": true, "debounce-ms": 0, "profile": "second", "max-lines": 1 } }),
    );
    let id = c.inline(&uri, (0, 10), 2);
    let echo: Value = serde_json::from_str(&items(&c.response(id, T))[0]).expect("echo json");
    assert_eq!(echo["profile"], json!("second"));
    assert_eq!(echo["mode"], json!("single"));
    // The engine is told the line limit, so it stops there (and caches the cut completion).
    assert_eq!(echo["max_lines"], json!(1));
}

#[test]
fn max_lines_limits_the_suggestion() {
    let mut c = Client::spawn("lines");
    c.initialize(Some(json!({ "debounce-ms": 0, "max-lines": 3 })));
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "\n");
    let id = c.inline(&uri, (0, 0), 1);
    let texts = items(&c.response(id, T));
    assert_eq!(texts, vec!["line 1\nline 2\nline 3".to_owned()]);
}

#[test]
fn engine_errors_are_shown_once() {
    let mut c = Client::spawn("model-missing");
    c.initialize(Some(json!({ "debounce-ms": 0 })));
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "fn\n");
    for i in 0..5 {
        let id = c.inline(&uri, (0, 2), 1);
        let r = c.response(id, T);
        assert_eq!(r["result"], json!([]), "request {i}: {r}");
    }
    let shown = c.notifications("window/showMessage", Duration::from_millis(300));
    assert_eq!(shown.len(), 1, "{shown:?}");
    let message = shown[0]["params"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("ai-engine models pull"), "{message}");
    assert_eq!(c.stats()["requests"], json!(5));
}

#[test]
fn unknown_document_and_disabled_at_start_give_empty() {
    let mut c = Client::spawn("echo");
    c.initialize(Some(json!({ "enabled": false })));
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "x\n");
    let id = c.inline(&uri, (0, 1), 2);
    assert_eq!(c.response(id, T)["result"], json!([]));
    let other = c.uri("never-opened.rs");
    let id = c.inline(&other, (0, 0), 1);
    assert_eq!(c.response(id, T)["result"], json!([]));
    assert_eq!(c.stats()["requests"], json!(0));
}

#[test]
fn exits_promptly_when_stdin_closes() {
    let mut c = Client::spawn("slow");
    c.initialize(None);
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "fn a() {}\n");
    let _pending = c.inline(&uri, (0, 9), 1);
    c.close_stdin();
    let status = c
        .wait_exit(Duration::from_secs(3))
        .expect("exited within 3 s");
    assert!(status.success(), "{status:?}");
}

#[test]
fn exits_when_stdin_closes_before_initialize() {
    let mut c = Client::spawn("echo");
    c.close_stdin();
    assert!(c.wait_exit(Duration::from_secs(3)).is_some());
}

#[test]
fn survives_sigkill_without_leftovers() {
    use std::os::unix::process::ExitStatusExt;
    let mut c = Client::spawn("slow");
    c.initialize(None);
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "fn a() {}\n");
    let _pending = c.inline(&uri, (0, 9), 1);
    std::thread::sleep(Duration::from_millis(100));
    let pid = c.child.id();
    let children = child_pids(pid);
    // SAFETY: plain kill(2) on the child we spawned.
    let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(rc, 0);
    let status = c.wait_exit(Duration::from_secs(3)).expect("killed");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    for child in children {
        assert!(
            !std::path::Path::new(&format!("/proc/{child}")).exists(),
            "child {child} of the bridge survived"
        );
    }
    // Its stdout is closed: the reader thread sees EOF (after what was sent before the kill, at most the
    // first completion's progress).
    let leftover: Vec<_> = std::iter::from_fn(|| c.recv(Duration::from_millis(500))).collect();
    assert!(
        leftover.iter().all(|m| m["method"] == "$/progress"),
        "{leftover:?}"
    );
}

/// Direct children of `pid` (Linux /proc).
fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.to_owned();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

#[test]
fn shutdown_and_exit() {
    let mut c = Client::spawn("echo");
    c.initialize(None);
    let id = c.request("shutdown", Value::Null);
    let r = c.response(id, T);
    assert!(!is_error(&r), "{r}");
    c.notify("exit", Value::Null);
    assert!(c.wait_exit(Duration::from_secs(3)).is_some());
}
