//! User settings (from `initializationOptions` and `workspace/didChangeConfiguration`) with defaults.

use serde_json::Value;

use crate::backend::{CompletionMode, EngineSettings};

/// The bridge's view of the `[lapce-ai]` settings; every field has a default.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub enabled: bool,
    pub profile: String,
    /// Base of the adaptive debounce.
    pub debounce_ms: u64,
    pub max_lines: u32,
    pub endpoint: String,
    pub engine_path: String,
    pub multiline: Multiline,
}

/// The `multiline` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Multiline {
    Auto,
    Always,
    Never,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            profile: String::new(),
            debounce_ms: 150,
            max_lines: 8,
            endpoint: "default".into(),
            engine_path: String::new(),
            multiline: Multiline::Auto,
        }
    }
}

/// Largest accepted debounce base; larger values are clamped.
const MAX_DEBOUNCE_MS: u64 = 5_000;

impl Settings {
    /// Defaults overridden by whatever valid keys `value` has. Accepts the flat object the volt
    /// sends, or one nested under `"lapce-ai"` (as a `didChangeConfiguration` may carry).
    /// Unknown keys and values of the wrong type are ignored (and logged).
    pub fn from_value(value: Option<&Value>) -> Self {
        let mut s = Self::default();
        let Some(mut obj) = value.and_then(Value::as_object) else {
            return s;
        };
        if let Some(inner) = obj.get("lapce-ai").and_then(Value::as_object) {
            obj = inner;
        }
        for (key, v) in obj {
            let ok = match key.as_str() {
                "enabled" => v.as_bool().map(|b| s.enabled = b).is_some(),
                "profile" => v.as_str().map(|x| s.profile = x.to_owned()).is_some(),
                "debounce-ms" | "debounce_ms" | "debounceMs" => as_u64(v)
                    .map(|n| s.debounce_ms = n.min(MAX_DEBOUNCE_MS))
                    .is_some(),
                "max-lines" | "max_lines" | "maxLines" => as_u64(v)
                    .map(|n| s.max_lines = u32::try_from(n.clamp(1, 1000)).unwrap_or(1000))
                    .is_some(),
                "endpoint" => v.as_str().map(|x| s.endpoint = x.to_owned()).is_some(),
                "engine-path" | "engine_path" | "enginePath" => {
                    v.as_str().map(|x| s.engine_path = x.to_owned()).is_some()
                }
                "multiline" => match v.as_str() {
                    Some("auto") => Some(Multiline::Auto),
                    Some("always") | Some("true") => Some(Multiline::Always),
                    Some("never") | Some("false") => Some(Multiline::Never),
                    _ => v.as_bool().map(|b| {
                        if b {
                            Multiline::Always
                        } else {
                            Multiline::Never
                        }
                    }),
                }
                .map(|m| s.multiline = m)
                .is_some(),
                _ => true,
            };
            if !ok {
                tracing::warn!(key = %key, value = %v, "ignoring setting with an invalid value");
            }
        }
        s
    }

    /// The completion mode the engine is asked for.
    pub fn mode(&self) -> CompletionMode {
        if self.max_lines <= 1 {
            return CompletionMode::SingleLine;
        }
        match self.multiline {
            Multiline::Auto => CompletionMode::Auto,
            Multiline::Always => CompletionMode::MultiLine,
            Multiline::Never => CompletionMode::SingleLine,
        }
    }

    /// The part of the settings the backend cares about.
    pub fn engine(&self) -> EngineSettings {
        EngineSettings {
            endpoint: self.endpoint.clone(),
            engine_path: self.engine_path.clone(),
        }
    }
}

/// Numbers may arrive as integers, floats or strings (TOML users write all three).
fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(Settings::from_value(None), Settings::default());
        let s = Settings::from_value(Some(&json!({
            "enabled": false, "debounce-ms": "40", "max-lines": 1, "multiline": "always", "x": 1
        })));
        assert!(!s.enabled);
        assert_eq!(s.debounce_ms, 40);
        assert_eq!(s.mode(), CompletionMode::SingleLine);
        let nested = Settings::from_value(Some(&json!({"lapce-ai": {"profile": "p"}})));
        assert_eq!(nested.profile, "p");
        let bad = Settings::from_value(Some(&json!({"enabled": "yes"})));
        assert!(bad.enabled);
    }

    /// Every `[config."…"]` key of volt.toml changes the bridge's settings (except `download-url`, which
    /// only the volt reads: tested there).
    #[test]
    fn every_volt_setting_is_read() {
        let keys: Vec<&str> = include_str!("../../../volt.toml")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("[config.\"")?.strip_suffix("\"]"))
            .collect();
        assert!(keys.len() >= 7, "{keys:?}");
        let changed = json!({
            "enabled": false, "profile": "p", "debounce-ms": 40, "max-lines": 3,
            "endpoint": "e", "engine-path": "/x/ai-engine", "multiline": "never",
        });
        for key in keys.into_iter().filter(|k| *k != "download-url") {
            let value = changed
                .get(key)
                .unwrap_or_else(|| panic!("no test value for {key}"));
            let settings = Settings::from_value(Some(&json!({ key: value })));
            assert_ne!(settings, Settings::default(), "{key} has no effect");
        }
    }
}
