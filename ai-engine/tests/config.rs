//! Tests for `engine.toml` loading: defaults, a full file, error locations, key permissions, secret redaction.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ai_engine::completion::{FimTemplate, PromptStyle};
use ai_engine::config::{
    ApiKey, ConfigError, EngineConfig, FimMode, ProfileConfig, ProviderKind,
    DEFAULT_EMBEDDED_MODEL, DEFAULT_KEEP_ALIVE,
};

const SECRET: &str = "sk-literal-SECRET-42";

fn write_config(dir: &Path, text: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("engine.toml");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn load_err(text: &str, mode: u32) -> (ConfigError, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), text, mode);
    let err = EngineConfig::load(Some(&path)).unwrap_err();
    let shown = err.to_string();
    (err, shown)
}

#[test]
fn defaults_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    // The only test in this binary that touches XDG_CONFIG_HOME.
    std::env::set_var("XDG_CONFIG_HOME", dir.path());
    assert_eq!(
        EngineConfig::default_path().unwrap(),
        dir.path().join("lapce-ai").join("engine.toml")
    );
    let config = EngineConfig::load(None).unwrap();
    assert_eq!(config, EngineConfig::default());
    assert_eq!(config.completion_profile, "embedded");
    assert_eq!(config.chat_profile, "embedded");
    assert_eq!(config.profiles.len(), 1);
    let profile = config.completion();
    assert_eq!(profile.kind, ProviderKind::Embedded);
    assert_eq!(profile.model, DEFAULT_EMBEDDED_MODEL);
    assert_eq!(profile.model, "default");
    assert_eq!(config.chat(), profile);
    assert_eq!(config.cache.entries, 100);
    assert_eq!(config.cache.ttl, Duration::from_secs(300));

    // The default file, once present, is read.
    std::fs::create_dir_all(dir.path().join("lapce-ai")).unwrap();
    write_config(
        &dir.path().join("lapce-ai"),
        "[cache]\nentries = 7\n",
        0o644,
    );
    let config = EngineConfig::load(None).unwrap();
    assert_eq!(config.cache.entries, 7);
}

#[test]
fn explicit_missing_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let err = EngineConfig::load(Some(&path)).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.toml"), "{err}");
}

const FULL: &str = r#"completion_profile = "fast"
chat_profile = "claude"

[cache]
entries = 250
ttl_secs = 60

[profiles.fast]
kind = "openai-completions"
base_url = "http://127.0.0.1:8080/v1"
model = "qwen2.5-coder-1.5b"
api_key_env = "MY_LLAMA_KEY"
connect_timeout_ms = 1500
idle_timeout_ms = 2500
request_timeout_ms = 9000
fim_template = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
max_tokens = 128
temperature = 0.1

[profiles.claude]
kind = "anthropic"
model = "claude-sonnet-4-5"
api_key = "sk-literal-SECRET-42"

[profiles.local]
kind = "embedded"
model_path = "/models/tiny.gguf"
context_tokens = 4096
threads = 2

[profiles.ol]
kind = "ollama"
model = "qwen2.5-coder:1.5b"

[profiles.codestral]
kind = "mistral-fim"
model = "codestral-latest"

[profiles.gem]
kind = "gemini"
model = "gemini-2.0-flash"

[profiles.gpt]
kind = "openai-chat"
model = "gpt-4o-mini"
"#;

#[test]
fn full_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), FULL, 0o600);
    let config = EngineConfig::load(Some(&path)).unwrap();
    assert_eq!(config.source.as_deref(), Some(path.as_path()));
    assert_eq!(config.cache.entries, 250);
    assert_eq!(config.cache.ttl, Duration::from_secs(60));
    // 7 from the file + the built-in `embedded`.
    assert_eq!(config.profiles.len(), 8);
    assert!(config.profile("embedded").is_some());

    let fast = config.completion();
    assert_eq!(fast.name, "fast");
    assert_eq!(fast.kind, ProviderKind::OpenAiCompletions);
    assert_eq!(fast.base_url.as_deref(), Some("http://127.0.0.1:8080/v1"));
    assert_eq!(fast.model, "qwen2.5-coder-1.5b");
    assert_eq!(fast.api_key_env.as_deref(), Some("MY_LLAMA_KEY"));
    assert_eq!(fast.effective_api_key_env(), Some("MY_LLAMA_KEY"));
    assert_eq!(fast.api_key, None);
    assert_eq!(fast.connect_timeout, Duration::from_millis(1500));
    assert_eq!(fast.idle_timeout, Duration::from_millis(2500));
    assert_eq!(fast.request_timeout, Duration::from_millis(9000));
    match &fast.fim_template {
        Some(PromptStyle::Custom(template)) => assert_eq!(
            template.render("P", "S"),
            "<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>"
        ),
        other => panic!("expected a custom template, got {other:?}"),
    }
    assert_eq!(fast.fim, FimMode::Auto);
    assert_eq!(fast.max_tokens, Some(128));
    assert_eq!(fast.temperature, Some(0.1));

    let claude = config.chat();
    assert_eq!(claude.kind, ProviderKind::Anthropic);
    assert_eq!(claude.api_key.as_ref().unwrap().expose(), SECRET);
    assert_eq!(
        claude.effective_base_url(),
        Some("https://api.anthropic.com")
    );
    assert_eq!(claude.effective_api_key_env(), Some("ANTHROPIC_API_KEY"));
    assert_eq!(claude.resolve_api_key().unwrap().expose(), SECRET);

    let local = config.profile("local").unwrap();
    assert_eq!(local.kind, ProviderKind::Embedded);
    assert_eq!(local.model, DEFAULT_EMBEDDED_MODEL);
    assert_eq!(
        local.model_path.as_deref(),
        Some(Path::new("/models/tiny.gguf"))
    );
    assert_eq!(local.context_tokens, Some(4096));
    assert_eq!(local.threads, Some(2));

    let kinds: Vec<(&str, ProviderKind, Option<&str>)> = config
        .profiles
        .values()
        .map(|p| (p.name.as_str(), p.kind, p.effective_api_key_env()))
        .collect();
    assert!(kinds.contains(&("ol", ProviderKind::Ollama, None)));
    assert!(kinds.contains(&(
        "codestral",
        ProviderKind::MistralFim,
        Some("MISTRAL_API_KEY")
    )));
    assert!(kinds.contains(&("gem", ProviderKind::Gemini, Some("GEMINI_API_KEY"))));
    assert!(kinds.contains(&("gpt", ProviderKind::OpenAiChat, Some("OPENAI_API_KEY"))));
    assert_eq!(
        config.profile("ol").unwrap().effective_base_url(),
        Some("http://127.0.0.1:11434")
    );

    // The literal key never shows in debug output of the whole config.
    let debug = format!("{config:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("***"));
}

#[test]
fn unknown_key_names_line_and_key() {
    let text = "[profiles.fast]\nkind = \"ollama\"\nmodel = \"m\"\ntemprature = 0.2\n";
    let (err, shown) = load_err(text, 0o644);
    match &err {
        ConfigError::Invalid { line, key, .. } => {
            assert_eq!(*line, Some(4), "{shown}");
            assert_eq!(key, "profiles.fast.temprature");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        shown.contains("engine.toml:4: profiles.fast.temprature: unknown field"),
        "{shown}"
    );

    let (_, shown) = load_err("colour = \"red\"\n", 0o644);
    assert!(
        shown.contains("engine.toml:1: colour: unknown field"),
        "{shown}"
    );
    let (_, shown) = load_err("\n[cache]\nsize = 3\n", 0o644);
    assert!(
        shown.contains("engine.toml:3: cache.size: unknown field"),
        "{shown}"
    );
}

#[test]
fn bad_type_names_line_and_key() {
    let text = "completion_profile = \"fast\"\n\n[profiles.fast]\nkind = \"ollama\"\nmodel = \"m\"\n\ntemperature = \"hot\"\n";
    let (_, shown) = load_err(text, 0o644);
    assert!(
        shown.contains("engine.toml:7: profiles.fast.temperature: invalid type"),
        "{shown}"
    );

    let (_, shown) = load_err("[profiles.x]\nkind = \"telepathy\"\nmodel = \"m\"\n", 0o644);
    assert!(shown.contains("engine.toml:2: profiles.x.kind"), "{shown}");
    assert!(shown.contains("telepathy"), "{shown}");

    let (_, shown) = load_err("[cache]\nentries = -1\n", 0o644);
    assert!(shown.contains("engine.toml:2: cache.entries"), "{shown}");
}

#[test]
fn mistyped_api_key_is_reported_without_its_value() {
    let text = "[profiles.x]\nkind = \"openai\"\nmodel = \"m\"\napi_key = 98765432123456789\n";
    let (_, shown) = load_err(text, 0o600);
    assert!(
        shown.contains("engine.toml:4: profiles.x.api_key"),
        "{shown}"
    );
    assert!(
        !shown.contains("98765432123456789"),
        "the value leaked: {shown}"
    );
}

#[test]
fn syntax_error_names_line() {
    let (err, shown) = load_err("[cache]\nentries = 3\nttl_secs = = 4\n", 0o644);
    assert!(
        matches!(err, ConfigError::Invalid { line: Some(3), .. }),
        "{err:?}"
    );
    assert!(shown.contains("engine.toml:3:"), "{shown}");
}

#[test]
fn semantic_errors_name_line_and_key() {
    let (_, shown) = load_err("[profiles.a]\nkind = \"anthropic\"\n", 0o644);
    assert!(shown.contains("profiles.a.model: missing"), "{shown}");

    let text = "[profiles.a]\nkind = \"ollama\"\nmodel = \"m\"\ntemperature = 7.5\n";
    let (_, shown) = load_err(text, 0o644);
    assert!(
        shown.contains("engine.toml:4: profiles.a.temperature"),
        "{shown}"
    );
    assert!(shown.contains("out of range"), "{shown}");

    let text = "[profiles.a]\nkind = \"ollama\"\nmodel = \"m\"\nbase_url = \"not a url\"\n";
    let (_, shown) = load_err(text, 0o644);
    assert!(
        shown.contains("engine.toml:4: profiles.a.base_url"),
        "{shown}"
    );
}

#[test]
fn literal_key_in_group_or_world_readable_file_is_rejected() {
    let text = format!(
        "chat_profile = \"c\"\n[profiles.c]\nkind = \"anthropic\"\nmodel = \"m\"\napi_key = \"{SECRET}\"\n"
    );
    for mode in [0o644, 0o640, 0o604] {
        let (err, shown) = load_err(&text, mode);
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
        assert!(
            shown.contains("engine.toml:5: profiles.c.api_key"),
            "{shown}"
        );
        assert!(shown.contains("chmod 600"), "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(!format!("{err:?}").contains(SECRET));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &text, 0o600);
    let config = EngineConfig::load(Some(&path)).unwrap();
    assert_eq!(config.chat().resolve_api_key().unwrap().expose(), SECRET);
}

#[test]
fn unknown_profile_reference_is_rejected() {
    let text = "[profiles.a]\nkind = \"ollama\"\nmodel = \"m\"\n";
    let (_, shown) = load_err(
        &format!("completion_profile = \"missing-one\"\n{text}"),
        0o644,
    );
    assert!(
        shown.contains("engine.toml:1: completion_profile: unknown profile `missing-one`"),
        "{shown}"
    );
    assert!(shown.contains("a, embedded"), "{shown}");
    let (_, shown) = load_err(&format!("chat_profile = \"b\"\n{text}"), 0o644);
    assert!(
        shown.contains("chat_profile: unknown profile `b`"),
        "{shown}"
    );
}

#[test]
fn valid_file_without_references_uses_embedded_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[profiles.a]\nkind = \"ollama\"\nmodel = \"m\"\n",
        0o644,
    );
    let config = EngineConfig::load(Some(&path)).unwrap();
    assert_eq!(config.completion().kind, ProviderKind::Embedded);
    assert_eq!(config.chat().name, "embedded");
}

#[test]
fn secrets_are_redacted() {
    let key = ApiKey::new(SECRET);
    assert_eq!(format!("{key:?}"), "***");
    assert_eq!(format!("{key}"), "***");
    assert_eq!(key.expose(), SECRET);
    let mut profile = ProfileConfig::new("p", ProviderKind::OpenAiChat, "m");
    profile.api_key = Some(key);
    let debug = format!("{profile:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("api_key: Some(***)"), "{debug}");
}

#[test]
fn api_key_comes_from_the_named_env_var() {
    let mut profile = ProfileConfig::new("p", ProviderKind::MistralFim, "m");
    profile.api_key_env = Some("LAPCE_AI_CONFIG_TEST_KEY_VAR".to_string());
    assert!(profile.resolve_api_key().is_none());
    std::env::set_var("LAPCE_AI_CONFIG_TEST_KEY_VAR", " from-env \n");
    assert_eq!(profile.resolve_api_key().unwrap().expose(), "from-env");
    assert_eq!(
        ProviderKind::OpenAiChat.default_api_key_env(),
        Some("OPENAI_API_KEY")
    );
    assert_eq!(
        ProviderKind::OpenAiCompletions.default_api_key_env(),
        Some("OPENAI_API_KEY")
    );
    assert_eq!(
        ProviderKind::Anthropic.default_api_key_env(),
        Some("ANTHROPIC_API_KEY")
    );
    assert_eq!(
        ProviderKind::MistralFim.default_api_key_env(),
        Some("MISTRAL_API_KEY")
    );
    assert_eq!(
        ProviderKind::Gemini.default_api_key_env(),
        Some("GEMINI_API_KEY")
    );
    assert_eq!(ProviderKind::Ollama.default_api_key_env(), None);
}

#[test]
fn documented_example_parses() {
    let source = include_str!("../src/config.rs");
    let example: String = source
        .lines()
        .skip_while(|l| !l.starts_with("//! ```toml"))
        .skip(1)
        .take_while(|l| !l.starts_with("//! ```"))
        .map(|l| {
            format!(
                "{}\n",
                l.trim_start_matches("//!").strip_prefix(' ').unwrap_or("")
            )
        })
        .collect();
    assert!(example.contains("[profiles.claude]"), "{example}");
    let config = EngineConfig::parse(&example, Path::new("example.toml"), true).unwrap();
    assert_eq!(config.completion().kind, ProviderKind::LlamaCpp);
    let vllm = config.profile("vllm").unwrap();
    assert_eq!(vllm.fim, FimMode::Template);
    match &vllm.fim_template {
        Some(PromptStyle::Custom(template)) => {
            assert_eq!(template.stop_tokens(), ["<|endoftext|>", "<file_sep>"])
        }
        other => panic!("expected a custom template, got {other:?}"),
    }
    assert_eq!(config.profile("ollama").unwrap().keep_alive, "30m");
    assert_eq!(config.completion().idle_timeout, Duration::from_secs(5));
    assert_eq!(config.chat().kind, ProviderKind::Anthropic);
}

/// The error for `text` must be at `line`, name `key` and contain every piece of `words`.
fn assert_config_error(text: &str, line: usize, key: &str, words: &[&str]) {
    let (err, shown) = load_err(text, 0o644);
    match &err {
        ConfigError::Invalid {
            line: got_line,
            key: got_key,
            ..
        } => {
            assert_eq!(*got_line, Some(line), "{shown}");
            assert_eq!(got_key, key, "{shown}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        shown.contains(&format!("engine.toml:{line}: {key}: ")),
        "{shown}"
    );
    for word in words {
        assert!(shown.contains(word), "{word:?} missing from: {shown}");
    }
}

#[test]
fn broken_fim_templates_are_refused_naming_key_and_line() {
    let head = "[profiles.vllm]\nkind = \"openai-completions\"\nmodel = \"m\"\n";
    assert_config_error(
        &format!("{head}fim_template = \"<PRE>{{suffix}}<MID>\"\n"),
        4,
        "profiles.vllm.fim_template",
        &["{prefix}"],
    );
    assert_config_error(
        &format!("{head}fim_template = \"{{prefix}}{{sufix}}\"\n"),
        4,
        "profiles.vllm.fim_template",
        &["unknown placeholder", "{sufix}"],
    );
    assert_config_error(
        &format!("{head}\nfim_template = \"<a>{{prefix<b>\"\n"),
        5,
        "profiles.vllm.fim_template",
        &["unbalanced `{`"],
    );
    assert_config_error(
        &format!("{head}fim_template = \"{{prefix}}}}{{suffix}}\"\n"),
        4,
        "profiles.vllm.fim_template",
        &["unbalanced `}`"],
    );
    assert_config_error(
        &format!("{head}fim_template = \"gpt\"\n"),
        4,
        "profiles.vllm.fim_template",
        &["unknown prompt style `gpt`", "qwen3-coder", "seed-coder"],
    );
    assert_config_error(
        &format!("{head}fim_stop = [\"<eot>\"]\n"),
        4,
        "profiles.vllm.fim_stop",
        &["custom fim_template"],
    );
}

#[test]
fn fim_modes_that_cannot_work_are_refused() {
    assert_config_error(
        "[profiles.c]\nkind = \"anthropic\"\nmodel = \"claude\"\nfim = \"native\"\n",
        4,
        "profiles.c.fim",
        &["no native fill-in-the-middle", "anthropic"],
    );
    assert_config_error(
        "[profiles.v]\nkind = \"openai-completions\"\nmodel = \"my-finetune\"\nfim = \"template\"\n",
        4,
        "profiles.v.fim",
        &["my-finetune", "fim_template"],
    );
    assert_config_error(
        "[profiles.v]\nkind = \"openai-completions\"\nmodel = \"m\"\nfim = \"sometimes\"\n",
        4,
        "profiles.v.fim",
        &["sometimes"],
    );
    assert_config_error(
        "[profiles.o]\nkind = \"ollama\"\nmodel = \"m\"\nkeep_alive = true\n",
        4,
        "profiles.o.keep_alive",
        &["duration"],
    );
}

#[test]
fn fim_settings_load_and_decide_the_prompt_style() {
    let text = r#"
[profiles.auto]
kind = "openai-completions"
base_url = "http://127.0.0.1:8000/v1"
model = "Qwen3-Coder-30B-A3B"

[profiles.family]
kind = "openai-completions"
model = "bigcode/starcoder2-3b"
fim = "template"

[profiles.named]
kind = "llama-cpp"
model = "my-model"
fim = "template"
fim_template = "deepseek"

[profiles.custom]
kind = "llama-cpp"
model = "my-model"
fim_template = "<s>{suffix}<p>{prefix}<m>{{x}}"
fim_stop = ["<e>"]

[profiles.off]
kind = "ollama"
model = "qwen2.5-coder:1.5b"
fim = "none"
keep_alive = 600

[profiles.chat]
kind = "anthropic"
model = "claude"
"#;
    let config = EngineConfig::parse(text, Path::new("engine.toml"), true).unwrap();
    let plan = |name: &str, native: bool| {
        config
            .profile(name)
            .unwrap()
            .prompt_plan(&config.profile(name).unwrap().model, native)
    };

    let auto = plan("auto", true);
    assert_eq!(auto.style, PromptStyle::NativeFim);
    assert_eq!(
        auto.fallback,
        Some(PromptStyle::Template(FimTemplate::QwenCoder))
    );

    let family = plan("family", true);
    assert_eq!(family.style, PromptStyle::Template(FimTemplate::StarCoder2));
    assert_eq!(family.fallback, None);

    assert_eq!(
        plan("named", true).style,
        PromptStyle::Template(FimTemplate::DeepSeekCoder)
    );

    let custom = plan("custom", true);
    let PromptStyle::Custom(template) = &custom.style else {
        panic!("custom style expected, got {custom:?}");
    };
    assert_eq!(template.render("P", "S"), "<s>S<p>P<m>{x}");
    assert_eq!(template.stop_tokens(), ["<e>"]);

    let off = config.profile("off").unwrap();
    assert_eq!(off.keep_alive, "600s");
    assert_eq!(plan("off", true).style, PromptStyle::PrefixOnly);
    assert_eq!(plan("chat", false).style, PromptStyle::ChatFillHole);
    assert_eq!(
        config.profile("chat").unwrap().keep_alive,
        DEFAULT_KEEP_ALIVE
    );
    assert_eq!(
        config.profile("named").unwrap().effective_base_url(),
        Some("http://127.0.0.1:8080")
    );
}

#[test]
fn api_key_file_is_relative_to_the_config_private_and_read_on_each_use() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[profiles.m]\nkind = \"mistral-fim\"\nmodel = \"codestral-latest\"\napi_key_file = \"keys/m.key\"\n",
        0o644,
    );
    let config = EngineConfig::load(Some(&path)).unwrap();
    let profile = config.profile("m").unwrap();
    let key_file = dir.path().join("keys").join("m.key");
    assert_eq!(profile.api_key_file.as_deref(), Some(key_file.as_path()));
    assert!(profile.resolve_api_key().is_none(), "no file yet");

    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(&key_file, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        profile.resolve_api_key().is_none(),
        "a key file others can read is not used"
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(profile.resolve_api_key().unwrap().expose(), SECRET);
    std::fs::write(&key_file, "sk-second\n").unwrap();
    assert_eq!(profile.resolve_api_key().unwrap().expose(), "sk-second");
    assert!(!format!("{profile:?}").contains("sk-second"));
}
