//! First use as Lapce shows it: `$/progress` around the session's first completion (engine start and model
//! load), whether it succeeds or fails, and only once.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{items, Client};

const T: Duration = Duration::from_secs(10);

fn kinds(progress: &[Value]) -> Vec<String> {
    progress
        .iter()
        .map(|p| {
            assert_eq!(
                p["params"]["token"],
                json!("lapce-ai/first-completion"),
                "{p}"
            );
            p["params"]["value"]["kind"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[test]
fn first_completion_shows_progress_once() {
    let mut c = Client::spawn("echo");
    c.initialize(Some(json!({ "debounce-ms": 0 })));
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "fn a() {}\n");
    let id = c.inline(&uri, (0, 9), 1);
    assert!(!items(&c.response(id, T)).is_empty());
    let id = c.inline(&uri, (0, 9), 1);
    c.response(id, T);
    let progress = c.notifications("$/progress", Duration::from_millis(300));
    assert_eq!(kinds(&progress), ["begin", "end"], "{progress:?}");
    assert_eq!(
        progress[1]["params"]["value"]["message"],
        json!("engine ready")
    );
}

#[test]
fn a_failing_first_completion_ends_its_progress_with_the_reason() {
    let mut c = Client::spawn("model-missing");
    c.initialize(Some(json!({ "debounce-ms": 0 })));
    let uri = c.uri("a.rs");
    c.open(&uri, "rust", "fn\n");
    let id = c.inline(&uri, (0, 2), 1);
    assert_eq!(c.response(id, T)["result"], json!([]));
    let progress = c.notifications("$/progress", Duration::from_millis(300));
    assert_eq!(kinds(&progress), ["begin", "end"], "{progress:?}");
    let end = progress[1]["params"]["value"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(end.starts_with("engine not ready: "), "{end}");
}
