//! Context from other files through the daemon: documents synced over the transport reach the prompt of a
//! completion on the same connection (and only that one), closes and bad documents are handled, `[context]`
//! parses.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ai_engine::config::{EngineConfig, ProfileConfig};
use ai_engine::engine::{Engine, ProviderFactory};
use ai_engine::provider::{GenerationRequest, Prompt, Provider};
use lapce_ai_engine_testkit::{instant_engine_parts, serve_engine, FnProvider, InstantProvider};
use lapce_ai_transport::protocol::{
    ByteEdit, CompletionRequest, DocumentClosed, DocumentContent, DocumentSync,
};
use lapce_ai_transport::{AsyncClient, ClientOptions, Endpoint, Server, StreamEvent};

struct Daemon {
    server: Option<Server>,
    endpoint: Endpoint,
    seen: Arc<Mutex<Vec<GenerationRequest>>>,
    _root: tempfile::TempDir,
}

impl Daemon {
    fn start(config: EngineConfig) -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let endpoint = Endpoint::in_root("related", root.path()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let captured = Arc::clone(&seen);
        // Answers instantly and keeps every request it was given.
        let capture = Arc::new(FnProvider(move |request: GenerationRequest| {
            captured.lock().unwrap().push(request.clone());
            InstantProvider { text: "ok".into() }.generate(request)
        }));
        let factory: ProviderFactory =
            Arc::new(move |_p: &ProfileConfig| Ok(Arc::clone(&capture) as Arc<dyn Provider>));
        let engine = Engine::new(config, factory, "related");
        let server = serve_engine(&endpoint, engine, tokio::runtime::Handle::current()).unwrap();
        Self {
            server: Some(server),
            endpoint,
            seen,
            _root: root,
        }
    }

    async fn client(&self) -> AsyncClient {
        AsyncClient::connect(&self.endpoint, ClientOptions::default())
            .await
            .unwrap()
    }

    /// Completes `prefix` in /w/src/main.rs and returns the prompt prefix the provider got.
    async fn prompt_prefix(&self, client: &AsyncClient, prefix: &str) -> String {
        let request = CompletionRequest {
            file_path: "/w/src/main.rs".into(),
            language_id: "rust".into(),
            prefix: prefix.into(),
            suffix: ");\n}\n".into(),
            ..CompletionRequest::default()
        };
        let mut stream = client.request(&request).await.unwrap();
        while let Some(event) = stream.next().await {
            if let StreamEvent::End(_) = event.unwrap() {
                break;
            }
        }
        let seen = self.seen.lock().unwrap();
        match &seen.last().expect("the provider was called").prompt {
            Prompt::FillInTheMiddle { prefix, .. } => prefix.clone(),
            other => panic!("expected a native FIM prompt, got {other:?}"),
        }
    }

    async fn stop(mut self) {
        let server = self.server.take().unwrap();
        tokio::task::spawn_blocking(move || server.shutdown())
            .await
            .unwrap();
        lapce_ai_testkit::assert_endpoint_clean(&self.endpoint);
    }
}

const GEOMETRY: &str =
    "use std::f64::consts::PI;\n\npub fn area_of_circle(r: f64) -> f64 {\n    PI * r * r\n}\n";

fn full(path: &str, version: i32, text: &[u8]) -> DocumentSync {
    DocumentSync {
        path: path.into(),
        language_id: "rust".into(),
        version,
        content: DocumentContent::Full(text.to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_uses_definitions_from_documents_synced_on_its_connection() {
    let (config, _) = instant_engine_parts("");
    let daemon = Daemon::start(config);
    let client = daemon.client().await;
    // A bad document first: it is refused, the connection keeps working.
    client
        .notify(&full("/w/src/blob.bin", 1, &[0xff, 0xfe, 0x00, 0x41]))
        .await
        .unwrap();
    client
        .notify(&full("/w/src/geometry.rs", 1, GEOMETRY.as_bytes()))
        .await
        .unwrap();
    // A keystroke-sized edit: a doc comment above the function (byte 27 = start of line 3).
    client
        .notify(&DocumentSync {
            path: "/w/src/geometry.rs".into(),
            language_id: "rust".into(),
            version: 2,
            content: DocumentContent::Edits {
                base_version: 1,
                edits: vec![ByteEdit {
                    start: 27,
                    end: 27,
                    text: b"/// Area.\n".to_vec(),
                }],
            },
        })
        .await
        .unwrap();
    let prefix = "fn main() {\n    let a = area_of_circle(";
    let prompt = daemon.prompt_prefix(&client, prefix).await;
    assert!(prompt.ends_with(prefix), "{prompt}");
    let context = &prompt[..prompt.len() - prefix.len()];
    // The recently edited place comes first (it includes the definition), in Rust comments.
    assert!(context.starts_with("// Path: geometry.rs\n"), "{context}");
    assert!(
        context.contains(
            "// /// Area.\n// pub fn area_of_circle(r: f64) -> f64 {\n//     PI * r * r\n// }\n"
        ),
        "{context}"
    );
    assert!(!context.contains("blob"), "{context}");

    // Another connection has its own (empty) store. (Each request differs: the engine's cache never answers.)
    let other = daemon.client().await;
    let prefix = "fn main() {\n    let b = area_of_circle(";
    assert_eq!(daemon.prompt_prefix(&other, prefix).await, prefix);
    drop(other);

    // Closed: no longer used.
    client
        .notify(&DocumentClosed {
            path: "/w/src/geometry.rs".into(),
        })
        .await
        .unwrap();
    let prefix = "fn main() {\n    let c = area_of_circle(";
    assert_eq!(daemon.prompt_prefix(&client, prefix).await, prefix);
    assert!(client.is_alive());
    drop(client);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_switched_off_in_the_config_adds_nothing() {
    let (mut config, _) = instant_engine_parts("");
    config.context.enabled = false;
    let daemon = Daemon::start(config);
    let client = daemon.client().await;
    client
        .notify(&full("/w/src/geometry.rs", 1, GEOMETRY.as_bytes()))
        .await
        .unwrap();
    let prefix = "fn main() {\n    let a = area_of_circle(";
    assert_eq!(daemon.prompt_prefix(&client, prefix).await, prefix);
    drop(client);
    daemon.stop().await;
}

#[test]
fn the_context_section_parses_and_names_bad_keys() {
    let file = Path::new("/x/engine.toml");
    let config = EngineConfig::parse(
        "[context]\nenabled = true\nextra_tokens = 256\nmax_documents = 8\nmax_document_bytes = 4096\n",
        file,
        true,
    )
    .unwrap();
    assert_eq!(config.context.effective_extra_tokens(), 256);
    assert_eq!(config.context.max_documents, 8);
    assert_eq!(config.context.max_document_bytes, 4096);
    let off = EngineConfig::parse("[context]\nextra_tokens = 0\n", file, true).unwrap();
    assert_eq!(off.context.effective_extra_tokens(), 0);
    let disabled = EngineConfig::parse("[context]\nenabled = false\n", file, true).unwrap();
    assert_eq!(disabled.context.effective_extra_tokens(), 0);
    assert_eq!(
        EngineConfig::default().context.effective_extra_tokens(),
        1024
    );
    let error = EngineConfig::parse("\n[context]\ntokens = 3\n", file, true)
        .unwrap_err()
        .to_string();
    assert!(error.contains("engine.toml:3: context.tokens"), "{error}");
}
