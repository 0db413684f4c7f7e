//! Host-independent launch logic: settings defaults and merging, the first-start install, start parameters.

use std::path::Path;

use lsp_types::{DocumentFilter, Url};
use serde_json::{json, Value};

use crate::install::{self, InstallError, Platform, BRIDGE_NAME, ENGINE_NAME};

/// The plugin's own defaults; they must equal the `[config]` defaults of `volt.toml` (checked by a test),
/// because Lapce shows those in its settings UI but never sends them.
pub fn default_settings() -> Value {
    json!({
        "enabled": true,
        "profile": "",
        "debounce-ms": 150,
        "max-lines": 8,
        "endpoint": "default",
        "engine-path": "",
        "multiline": "auto",
        "download-url": "",
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

/// What the volt knows about the host, from its environment.
#[derive(Debug, Clone, Default)]
pub struct HostInfo {
    /// `VOLT_URI`: `file://` URL of the volt folder (trailing `/`).
    pub volt_uri: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    /// `VOLT_LIBC`: `glibc`, `musl` or empty.
    pub libc: Option<String>,
}

/// Message severity, mirrored from LSP so the logic stays independent of the host API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
    Info,
}

/// The `startLspServer` parameters for the bridge.
#[derive(Debug, Clone)]
pub struct StartBridge {
    pub server_uri: Url,
    pub args: Vec<String>,
    pub document_selector: Vec<DocumentFilter>,
    pub options: Value,
}

/// The decision: the bridge to start (if any) and the one message for the user (if any).
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub start: Option<StartBridge>,
    pub message: Option<(Severity, String)>,
}

impl LaunchPlan {
    fn refuse(message: String) -> Self {
        Self {
            start: None,
            message: Some((Severity::Error, message)),
        }
    }
}

/// Release settings baked into the wasm (see `install::baked_*`); a parameter so tests can vary them.
#[derive(Debug, Clone, Default)]
pub struct Release {
    pub base_url: Option<String>,
    /// `os-arch=sha256,...`
    pub hashes: String,
}

impl Release {
    pub fn baked() -> Self {
        Self {
            base_url: install::baked_release_url().map(str::to_owned),
            hashes: install::baked_archive_hashes().to_owned(),
        }
    }
}

/// Decides how to start the bridge. When `volt_root/bin` lacks this platform's binaries, downloads the
/// platform archive with `fetch` (from the `download-url` setting, else the baked release URL), verifies
/// its baked sha256 and unpacks it; nothing unverified is ever started.
pub fn plan_launch(
    host: &HostInfo,
    user_options: Option<&Value>,
    volt_root: &Path,
    release: &Release,
    fetch: impl FnOnce(&str) -> Result<Vec<u8>, InstallError>,
) -> LaunchPlan {
    let options = merged_settings(user_options);
    let (Some(os), Some(arch), Some(volt_uri)) = (&host.os, &host.arch, &host.volt_uri) else {
        return LaunchPlan::refuse(
            "lapce-ai: Lapce did not tell the plugin its folder and platform (VOLT_URI, VOLT_OS, \
             VOLT_ARCH); update Lapce to 0.4 or newer."
                .into(),
        );
    };
    let platform = Platform {
        os: os.clone(),
        arch: arch.clone(),
        libc: host.libc.clone().unwrap_or_default(),
    };
    if let Err(message) = platform.check_supported() {
        return LaunchPlan::refuse(message);
    }
    let Some(bridge_uri) = file_url_in(volt_uri, &platform.binary_path(BRIDGE_NAME)) else {
        return LaunchPlan::refuse(format!(
            "lapce-ai: cannot make a file URL from VOLT_URI {volt_uri:?}; reinstall the plugin."
        ));
    };
    let mut message = None;
    if let Err(why) = binaries_ready(&platform, volt_root) {
        let installed = download_and_install(&platform, &options, volt_root, release, fetch)
            .and_then(|()| binaries_ready(&platform, volt_root).map_err(InstallError::WrongBinary));
        match installed {
            Ok(()) => {
                message = Some((
                    Severity::Info,
                    format!(
                        "lapce-ai: installed its engine for {}-{} ({why} before); starting it.",
                        platform.os, platform.arch
                    ),
                ))
            }
            Err(err) => return LaunchPlan::refuse(err.user_message(&platform)),
        }
    }
    LaunchPlan {
        start: Some(StartBridge {
            server_uri: bridge_uri,
            args: Vec::new(),
            document_selector: vec![DocumentFilter {
                language: None,
                scheme: None,
                pattern: None,
            }],
            options,
        }),
        message,
    }
}

/// `Ok` when `bin/` holds a bridge and an engine that run here; `Err` says what is wrong.
fn binaries_ready(platform: &Platform, volt_root: &Path) -> Result<(), String> {
    for name in [BRIDGE_NAME, ENGINE_NAME] {
        let rel = platform.binary_path(name);
        let head =
            install::read_head(volt_root, &rel, 64).ok_or_else(|| format!("{rel} was missing"))?;
        install::check_executable(&platform.os, &platform.arch, &head)
            .map_err(|why| format!("{rel} could not run: {why}"))?;
    }
    Ok(())
}

fn download_and_install(
    platform: &Platform,
    options: &Value,
    volt_root: &Path,
    release: &Release,
    fetch: impl FnOnce(&str) -> Result<Vec<u8>, InstallError>,
) -> Result<(), InstallError> {
    let expected = platform
        .expected_sha256(&release.hashes)
        .ok_or(InstallError::NoChecksum)?;
    let base = options
        .get("download-url")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(str::to_owned)
        .or_else(|| release.base_url.clone())
        .ok_or(InstallError::NoChecksum)?;
    let url = install::archive_url(base.trim(), platform);
    let archive = fetch(&url)?;
    install::install_archive(&archive, &expected, &url, platform, volt_root)
}

/// `VOLT_URI` (with or without its trailing `/`) joined with a relative path.
fn file_url_in(volt_uri: &str, rel: &str) -> Option<Url> {
    let mut base = Url::parse(volt_uri).ok()?;
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    base.join(rel).ok()
}

/// The reply the volt gives to `initialize`: it serves nothing itself.
pub fn initialize_result() -> Value {
    json!({ "capabilities": {}, "serverInfo": { "name": "lapce-ai-volt", "version": env!("CARGO_PKG_VERSION") } })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    use crate::install::sha256_hex;
    use crate::install::tests::{elf, good_archive};

    fn host() -> HostInfo {
        HostInfo {
            volt_uri: Some("file:///home/u/.local/share/lapce-stable/plugins/lapce-ai/".into()),
            os: Some("linux".into()),
            arch: Some("x86_64".into()),
            libc: Some("glibc".into()),
        }
    }

    fn release_for(archive: &[u8]) -> Release {
        Release {
            base_url: Some("https://example.invalid/rel".into()),
            hashes: format!("linux-x86_64={}", sha256_hex(archive)),
        }
    }

    fn no_fetch(url: &str) -> Result<Vec<u8>, InstallError> {
        panic!("nothing should be downloaded ({url})")
    }

    #[test]
    fn bundled_binaries_are_used_without_download() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("bin")).expect("bin");
        for name in ["lapce-ai-lsp-linux-x86_64", "ai-engine-linux-x86_64"] {
            std::fs::write(dir.path().join("bin").join(name), elf(62)).expect("write");
        }
        let plan = plan_launch(&host(), None, dir.path(), &Release::default(), no_fetch);
        let start = plan.start.expect("starts");
        assert_eq!(
            start.server_uri.as_str(),
            "file:///home/u/.local/share/lapce-stable/plugins/lapce-ai/bin/lapce-ai-lsp-linux-x86_64"
        );
        assert!(plan.message.is_none());
    }

    #[test]
    fn missing_binaries_are_downloaded_from_the_setting_url_then_started() {
        let dir = tempfile::tempdir().expect("tmp");
        let archive = good_archive();
        let user = json!({"download-url": "http://127.0.0.1:9/mirror/"});
        let mut asked = None;
        let plan = plan_launch(
            &host(),
            Some(&user),
            dir.path(),
            &release_for(&archive),
            |url| {
                asked = Some(url.to_owned());
                Ok(archive.clone())
            },
        );
        assert_eq!(
            asked.as_deref(),
            Some(
                format!(
                    "http://127.0.0.1:9/mirror/lapce-ai-{}-linux-x86_64.tar.gz",
                    env!("CARGO_PKG_VERSION")
                )
                .as_str()
            )
        );
        assert!(plan.start.is_some());
        assert_eq!(plan.message.expect("message").0, Severity::Info);
        assert!(dir.path().join("bin/ai-engine-linux-x86_64").is_file());
    }

    #[test]
    fn failures_refuse_to_start_with_one_message() {
        let dir = tempfile::tempdir().expect("tmp");
        // A development build: no checksum, so no download.
        let plan = plan_launch(&host(), None, dir.path(), &Release::default(), no_fetch);
        assert!(plan.start.is_none());
        assert!(plan.message.expect("msg").1.contains("cargo xtask install"));

        let archive = good_archive();
        let plan = plan_launch(&host(), None, dir.path(), &release_for(&archive), |url| {
            Err(InstallError::Status {
                url: url.into(),
                status: 404,
            })
        });
        assert!(plan.start.is_none());
        let (severity, text) = plan.message.expect("msg");
        assert_eq!(severity, Severity::Error);
        assert!(
            text.contains("404") && text.contains("download-url"),
            "{text}"
        );

        let plan = plan_launch(&host(), None, dir.path(), &release_for(b"other"), |_| {
            Ok(archive.clone())
        });
        assert!(plan.start.is_none());
        assert!(plan.message.expect("msg").1.contains("checksum"));
        assert!(!dir.path().join("bin").exists());

        for (os, libc) in [("macos", ""), ("windows", "")] {
            let h = HostInfo {
                os: Some(os.into()),
                libc: Some(libc.into()),
                ..host()
            };
            let plan = plan_launch(&h, None, dir.path(), &release_for(&archive), no_fetch);
            assert!(plan.start.is_none());
            assert!(plan
                .message
                .expect("msg")
                .1
                .starts_with("lapce-ai runs on Linux; macOS and Windows are planned"));
        }
    }
}
