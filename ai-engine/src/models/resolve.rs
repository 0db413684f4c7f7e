//! Finds the model file: configured path, then `LAPCE_AI_MODEL`, then the user's model cache directory.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::catalog::ModelEntry;
use crate::provider::ProviderError;

/// Environment variable naming a GGUF model file; overrides the cache directory.
pub const MODEL_ENV: &str = "LAPCE_AI_MODEL";

/// Where a resolved model path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelOrigin {
    /// The path given in the configuration.
    Configured,
    /// The `LAPCE_AI_MODEL` environment variable.
    Env,
    /// The model cache directory (`$XDG_CACHE_HOME/lapce-ai/models`).
    Cache,
}

/// A model file that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub path: PathBuf,
    pub origin: ModelOrigin,
}

/// No usable model file. The message tells the user what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// A path was given explicitly (config or env) but there is no file there.
    #[error("model file {} (from {origin}) does not exist; fix the path, or unset it and run `ai-engine models pull` to download the default model", path.display())]
    NotFound { path: PathBuf, origin: &'static str },
    /// Nothing configured and nothing in the cache.
    #[error("no local model found (looked for {}); run `ai-engine models pull` to download the default model `{model}`, or set {MODEL_ENV} to a GGUF file", looked_for.display())]
    NotDownloaded { looked_for: PathBuf, model: String },
    /// No cache directory could be determined (no home directory).
    #[error("no local model found and no cache directory (is HOME set?); set {MODEL_ENV} to a GGUF file or run `ai-engine models pull`")]
    NoCacheDir,
}

impl From<ResolveError> for ProviderError {
    fn from(e: ResolveError) -> Self {
        ProviderError::ModelMissing(e.to_string())
    }
}

/// The directory downloaded models are kept in: `$XDG_CACHE_HOME/lapce-ai/models` on Linux
/// (`~/.cache/lapce-ai/models` by default), the platform cache directory elsewhere.
pub fn model_cache_dir() -> Option<PathBuf> {
    directories::BaseDirs::new().map(|d| d.cache_dir().join("lapce-ai").join("models"))
}

/// Resolves the model file for `entry`: `configured` path, then the `LAPCE_AI_MODEL` environment
/// variable, then `<model cache dir>/<entry.file_name>`.
pub fn resolve_model(
    configured: Option<&Path>,
    entry: &ModelEntry,
) -> Result<ResolvedModel, ResolveError> {
    let env = std::env::var_os(MODEL_ENV);
    resolve_model_with(
        configured,
        env.as_deref(),
        model_cache_dir().as_deref(),
        entry,
    )
}

/// [`resolve_model`] with the environment value and cache directory given explicitly (for tests and
/// callers that already read them). Empty values count as unset.
pub fn resolve_model_with(
    configured: Option<&Path>,
    env_value: Option<&OsStr>,
    cache_dir: Option<&Path>,
    entry: &ModelEntry,
) -> Result<ResolvedModel, ResolveError> {
    let explicit = [
        (
            configured.filter(|p| !p.as_os_str().is_empty()),
            ModelOrigin::Configured,
            "the configuration",
        ),
        (
            env_value.filter(|v| !v.is_empty()).map(Path::new),
            ModelOrigin::Env,
            MODEL_ENV,
        ),
    ];
    for (path, origin, label) in explicit {
        if let Some(path) = path {
            return if path.is_file() {
                tracing::debug!(path = %path.display(), ?origin, "resolved model file");
                Ok(ResolvedModel {
                    path: path.to_path_buf(),
                    origin,
                })
            } else {
                Err(ResolveError::NotFound {
                    path: path.to_path_buf(),
                    origin: label,
                })
            };
        }
    }
    let dir = cache_dir.ok_or(ResolveError::NoCacheDir)?;
    let path = dir.join(entry.file_name);
    if path.is_file() {
        tracing::debug!(path = %path.display(), "resolved model file from the cache");
        Ok(ResolvedModel {
            path,
            origin: ModelOrigin::Cache,
        })
    } else {
        Err(ResolveError::NotDownloaded {
            looked_for: path,
            model: entry.name.to_string(),
        })
    }
}

/// Resolves [`super::DEFAULT_MODEL`]: `configured` path or `LAPCE_AI_MODEL` as for [`resolve_model`]; else, in
/// the cache, the code model recommended for this machine, then any other downloaded code model, then the
/// offline fallback. Returns the catalog entry that serves (for a configured file: the entry with its file
/// name, else the recommended one) and the file.
pub fn resolve_default(
    configured: Option<&Path>,
) -> Result<(&'static ModelEntry, ResolvedModel), ResolveError> {
    let env = std::env::var_os(MODEL_ENV);
    resolve_default_with(configured, env.as_deref(), model_cache_dir().as_deref())
}

/// [`resolve_default`] with the environment value and cache directory given explicitly.
pub fn resolve_default_with(
    configured: Option<&Path>,
    env_value: Option<&OsStr>,
    cache_dir: Option<&Path>,
) -> Result<(&'static ModelEntry, ResolvedModel), ResolveError> {
    use super::catalog;
    let recommended = catalog::default_entry();
    let explicit = configured.filter(|p| !p.as_os_str().is_empty()).is_some()
        || env_value.is_some_and(|v| !v.is_empty());
    if explicit {
        let resolved = resolve_model_with(configured, env_value, cache_dir, recommended)?;
        let entry = resolved
            .path
            .file_name()
            .and_then(|n| catalog::find_by_file_name(&n.to_string_lossy()))
            .unwrap_or(recommended);
        return Ok((entry, resolved));
    }
    let candidates = std::iter::once(recommended)
        .chain(
            catalog::catalog()
                .iter()
                .filter(|e| e.supports_fim() && e.name != recommended.name),
        )
        .chain(std::iter::once(catalog::fallback_entry()));
    for entry in candidates {
        if let Ok(resolved) = resolve_model_with(None, None, cache_dir, entry) {
            return Ok((entry, resolved));
        }
    }
    // Nothing downloaded: the error names the recommended model.
    resolve_model_with(None, None, cache_dir, recommended).map(|r| (recommended, r))
}
