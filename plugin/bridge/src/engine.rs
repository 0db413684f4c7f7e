//! The real backend: the ai-engine daemon over the shared-memory transport, and finding its binary.
//!
//! The transport crate's async client is not ready yet; until it is, [`EngineBackend`] reports the
//! engine as unavailable (one message to the user) and the bridge answers `[]`. To finish it:
//! connect with the client for `settings.endpoint` (starting the engine found by [`find_engine`]
//! when nobody serves the endpoint), send the `CompletionRequest`, map `StreamChunk`s to stream items,
//! `StreamEnd` to the end of the stream and `ErrorMessage` codes to [`BackendErrorKind`]s, and send
//! `Cancel` when the stream is dropped.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use futures::FutureExt;

use crate::backend::{
    BackendError, BackendErrorKind, CompletionBackend, CompletionRequest, CompletionStream,
    EngineSettings,
};

/// Name of the engine binary; shipped as `ai-engine-<os>-<arch>` next to the bridge in the volt.
pub const ENGINE_NAME: &str = "ai-engine";

/// The ai-engine client backend.
#[derive(Debug, Default)]
pub struct EngineBackend {
    settings: Mutex<EngineSettings>,
}

impl EngineBackend {
    pub fn new(settings: EngineSettings) -> Self {
        Self {
            settings: Mutex::new(settings),
        }
    }

    fn settings(&self) -> EngineSettings {
        match self.settings.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl CompletionBackend for EngineBackend {
    fn complete(
        &self,
        _request: CompletionRequest,
    ) -> futures::future::BoxFuture<'static, Result<CompletionStream, BackendError>> {
        let settings = self.settings();
        async move {
            let engine = find_engine(&settings.engine_path);
            let where_ = match &engine {
                Some(path) => format!("found {}", path.display()),
                None => "no ai-engine binary found".to_owned(),
            };
            Err(BackendError::new(
                BackendErrorKind::EngineUnavailable,
                format!(
                    "cannot reach ai-engine endpoint {:?}: this bridge build has no engine client yet ({where_})",
                    settings.endpoint
                ),
            ))
        }
        .boxed()
    }

    fn reconfigure(&self, settings: &EngineSettings) {
        match self.settings.lock() {
            Ok(mut s) => *s = settings.clone(),
            Err(poisoned) => *poisoned.into_inner() = settings.clone(),
        }
    }
}

/// Where the engine binary is: the `engine-path` setting if given, else next to this bridge
/// (`ai-engine-<os>-<arch>`, then `ai-engine`), else on PATH.
pub fn find_engine(engine_path: &str) -> Option<PathBuf> {
    if !engine_path.is_empty() {
        let p = PathBuf::from(engine_path);
        return is_file(&p).then_some(p);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    find_engine_in(beside.as_deref(), std::env::var_os("PATH").as_deref())
}

/// [`find_engine`] without the setting, with the bridge's folder and PATH given.
pub fn find_engine_in(
    bridge_dir: Option<&Path>,
    path: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    let exe = std::env::consts::EXE_SUFFIX;
    let platform = format!(
        "{ENGINE_NAME}-{}-{}{exe}",
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    let plain = format!("{ENGINE_NAME}{exe}");
    if let Some(dir) = bridge_dir {
        for name in [&platform, &plain] {
            let p = dir.join(name);
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    std::env::split_paths(path?)
        .map(|dir| dir.join(&plain))
        .find(|p| is_file(p))
}

fn is_file(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_file()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_binary_beside_the_bridge() {
        let beside = tempfile::tempdir().expect("tmp");
        let on_path = tempfile::tempdir().expect("tmp");
        let platform = format!(
            "ai-engine-{}-{}{}",
            std::env::consts::OS,
            std::env::consts::ARCH,
            std::env::consts::EXE_SUFFIX
        );
        let plain = format!("ai-engine{}", std::env::consts::EXE_SUFFIX);
        std::fs::write(on_path.path().join(&plain), b"x").expect("write");
        let path_var = std::env::join_paths([on_path.path()]).expect("join");
        assert_eq!(
            find_engine_in(Some(beside.path()), Some(&path_var)),
            Some(on_path.path().join(&plain))
        );
        std::fs::write(beside.path().join(&platform), b"x").expect("write");
        assert_eq!(
            find_engine_in(Some(beside.path()), Some(&path_var)),
            Some(beside.path().join(&platform))
        );
        assert_eq!(find_engine_in(None, None), None);
    }
}
