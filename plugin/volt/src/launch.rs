//! Host-independent launch logic: settings defaults and merging, bridge binary selection, start parameters.

use lsp_types::{DocumentFilter, Url};
use serde_json::{json, Map, Value};

/// Name of the bridge binary, shipped as `bin/<BRIDGE_NAME>-<os>-<arch>` in the volt folder.
pub const BRIDGE_NAME: &str = "lapce-ai-lsp";

/// The plugin's own defaults; they must equal the `[config]` defaults of `volt.toml` (checked by a test),
/// because Lapce shows those in its settings UI but never sends them.
pub fn default_settings() -> Value {
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

/// Deep-merges `user` over `base`: objects merge key by key, anything else replaces.
pub fn merge(base: &mut Value, user: &Value) {
    match (base, user) {
        (Value::Object(base), Value::Object(user)) => {
            for (key, value) in user {
                match base.get_mut(key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, user) => *base = user.clone(),
    }
}

/// The settings the bridge gets: defaults with the user's `initializationOptions` (if an object) on top.
pub fn merged_settings(user: Option<&Value>) -> Value {
    let mut settings = default_settings();
    match user {
        Some(user @ Value::Object(_)) => merge(&mut settings, user),
        Some(Value::Null) | None => {}
        Some(_) => {} // Lapce only ever sends an object; anything else is ignored.
    }
    settings
}

/// Path of the bundled bridge, relative to the volt folder, for a host OS/arch.
pub fn bridge_relative_path(os: &str, arch: &str) -> String {
    let exe = if os == "windows" { ".exe" } else { "" };
    format!("bin/{BRIDGE_NAME}-{os}-{arch}{exe}")
}

/// What the volt knows about the host, from its environment and the volt folder.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// `VOLT_URI`: `file://` URL of the volt folder (trailing `/`).
    pub volt_uri: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
}

/// How the bundled binary looks on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryState {
    Missing,
    /// Exists but is not an executable for the host OS (or is empty).
    NotExecutable(String),
    Ok,
}

/// Checks the first bytes of a file against the host OS executable format.
pub fn check_executable(os: &str, head: &[u8]) -> BinaryState {
    let ok = match os {
        "linux" => head.starts_with(b"\x7fELF"),
        "macos" => {
            head.starts_with(&[0xcf, 0xfa, 0xed, 0xfe])
                || head.starts_with(&[0xce, 0xfa, 0xed, 0xfe])
                || head.starts_with(&[0xca, 0xfe, 0xba, 0xbe])
        }
        "windows" => head.starts_with(b"MZ"),
        _ => !head.is_empty(),
    };
    if ok {
        BinaryState::Ok
    } else if head.is_empty() {
        BinaryState::NotExecutable("the file is empty".into())
    } else {
        BinaryState::NotExecutable(format!("it is not a {os} executable"))
    }
}

/// Message severity, mirrored from LSP so the logic stays independent of the host API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// The decision: which server to start and what to tell the user.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub server_uri: Url,
    pub args: Vec<String>,
    pub document_selector: Vec<DocumentFilter>,
    pub options: Value,
    pub message: Option<(Severity, String)>,
}

/// Decides how to start the bridge. `probe` reads the head of a file in the volt folder
/// (relative path) and returns `None` when it does not exist.
pub fn plan_launch(
    host: &HostInfo,
    user_options: Option<&Value>,
    probe: impl Fn(&str) -> Option<Vec<u8>>,
) -> LaunchPlan {
    let options = merged_settings(user_options);
    let path_fallback = path_fallback_uri;
    let (server_uri, message) = match (&host.os, &host.arch, &host.volt_uri) {
        (Some(os), Some(arch), Some(volt_uri)) => {
            let rel = bridge_relative_path(os, arch);
            let state = match probe(&rel) {
                None => BinaryState::Missing,
                Some(head) => check_executable(os, &head),
            };
            let base = Url::parse(volt_uri).ok().map(|mut u| {
                if !u.path().ends_with('/') {
                    let p = format!("{}/", u.path());
                    u.set_path(&p);
                }
                u
            });
            match (state, base.and_then(|b| b.join(&rel).ok())) {
                (BinaryState::Ok, Some(uri)) => (uri, None),
                (BinaryState::Ok, None) => (
                    path_fallback(),
                    Some((
                        Severity::Warning,
                        format!(
                            "lapce-ai: cannot make a file URL from VOLT_URI {volt_uri:?}; \
                             starting `{BRIDGE_NAME}` from PATH instead."
                        ),
                    )),
                ),
                (BinaryState::Missing, _) => (
                    path_fallback(),
                    Some((
                        Severity::Warning,
                        format!(
                            "lapce-ai: the plugin folder has no bridge for {os}-{arch} ({rel}); \
                             starting `{BRIDGE_NAME}` from PATH instead. Reinstall with \
                             `cargo xtask install` if completions do not appear."
                        ),
                    )),
                ),
                (BinaryState::NotExecutable(why), _) => (
                    path_fallback(),
                    Some((
                        Severity::Error,
                        format!(
                            "lapce-ai: the bundled bridge {rel} cannot run here ({why}); \
                             starting `{BRIDGE_NAME}` from PATH instead. Reinstall the plugin \
                             for {os}-{arch}."
                        ),
                    )),
                ),
            }
        }
        _ => (
            path_fallback(),
            Some((
                Severity::Warning,
                format!(
                    "lapce-ai: VOLT_URI/VOLT_OS/VOLT_ARCH are not set; starting `{BRIDGE_NAME}` \
                     from PATH."
                ),
            )),
        ),
    };
    LaunchPlan {
        server_uri,
        args: Vec::new(),
        document_selector: vec![DocumentFilter {
            language: None,
            scheme: None,
            pattern: None,
        }],
        options,
        message,
    }
}

/// `urn:lapce-ai-lsp`: Lapce runs the command of that name from PATH.
pub fn path_fallback_uri() -> Url {
    #[allow(clippy::expect_used)]
    Url::parse(concat!("urn:", "lapce-ai-lsp")).expect("constant URN is a valid URL")
}

/// The reply the volt gives to `initialize`: it serves nothing itself.
pub fn initialize_result() -> Value {
    json!({ "capabilities": {}, "serverInfo": { "name": "lapce-ai-volt", "version": env!("CARGO_PKG_VERSION") } })
}

/// The settings object as a JSON map (for callers that need the map).
pub fn as_map(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            volt_uri: Some("file:///home/u/.local/share/lapce-stable/plugins/lapce-ai/".into()),
            os: Some("linux".into()),
            arch: Some("x86_64".into()),
        }
    }

    #[test]
    fn defaults_match_volt_toml() {
        let manifest: toml::Value =
            toml::from_str(include_str!("../../../volt.toml")).expect("volt.toml parses");
        let config = manifest["config"].as_table().expect("[config]");
        let defaults = default_settings();
        let defaults = defaults.as_object().expect("object");
        assert_eq!(config.len(), defaults.len());
        for (key, entry) in config {
            let want = serde_json::to_value(&entry["default"]).expect("json");
            assert_eq!(defaults.get(key), Some(&want), "default of {key}");
            assert!(
                entry.get("description").is_some(),
                "{key} has a description"
            );
        }
    }

    #[test]
    fn merge_overrides_and_keeps_defaults() {
        let user = json!({"debounce-ms": 40, "profile": "fast", "extra": {"a": 1}});
        let merged = merged_settings(Some(&user));
        assert_eq!(merged["debounce-ms"], 40);
        assert_eq!(merged["profile"], "fast");
        assert_eq!(merged["enabled"], true);
        assert_eq!(merged["extra"]["a"], 1);
        assert_eq!(merged_settings(None), default_settings());
        assert_eq!(merged_settings(Some(&json!(3))), default_settings());
    }

    #[test]
    fn bundled_binary_is_used() {
        let plan = plan_launch(&host(), None, |_| Some(b"\x7fELF....".to_vec()));
        assert_eq!(
            plan.server_uri.as_str(),
            "file:///home/u/.local/share/lapce-stable/plugins/lapce-ai/bin/lapce-ai-lsp-linux-x86_64"
        );
        assert!(plan.message.is_none());
    }

    #[test]
    fn missing_binary_falls_back_to_path_with_message() {
        let plan = plan_launch(&host(), None, |_| None);
        assert_eq!(plan.server_uri.as_str(), "urn:lapce-ai-lsp");
        let (sev, msg) = plan.message.expect("message");
        assert_eq!(sev, Severity::Warning);
        assert!(msg.contains("bin/lapce-ai-lsp-linux-x86_64"), "{msg}");
    }

    #[test]
    fn wrong_format_binary_is_reported() {
        let plan = plan_launch(&host(), None, |_| Some(b"MZ\x90\x00".to_vec()));
        assert_eq!(plan.server_uri.as_str(), "urn:lapce-ai-lsp");
        assert_eq!(plan.message.expect("message").0, Severity::Error);
        assert!(matches!(
            check_executable("linux", b""),
            BinaryState::NotExecutable(_)
        ));
    }

    #[test]
    fn volt_uri_without_trailing_slash_and_windows_exe() {
        let h = HostInfo {
            volt_uri: Some("file:///C:/Users/u/plugins/lapce-ai".into()),
            os: Some("windows".into()),
            arch: Some("x86_64".into()),
        };
        let plan = plan_launch(&h, None, |_| Some(b"MZ".to_vec()));
        assert_eq!(
            plan.server_uri.as_str(),
            "file:///C:/Users/u/plugins/lapce-ai/bin/lapce-ai-lsp-windows-x86_64.exe"
        );
    }
}
