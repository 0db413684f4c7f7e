//! Profile name -> provider instance, built on first use and shared by every connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::{ApiKey, EngineConfig, ProfileConfig, ProviderKind};
use crate::provider::{Provider, ProviderError};
use lapce_ai_transport::util::lock;

/// Builds a provider for a profile. Replaceable so tests and benchmarks can inject instant fakes.
pub type ProviderFactory =
    Arc<dyn Fn(&ProfileConfig) -> Result<Arc<dyn Provider>, ProviderError> + Send + Sync>;

/// A provider and what it was built from.
struct Built {
    profile: ProfileConfig,
    key: Option<ApiKey>,
    provider: Arc<dyn Provider>,
}

/// Lazily built providers, one per profile.
pub struct ProviderRegistry {
    factory: ProviderFactory,
    built: Mutex<HashMap<String, Built>>,
}

impl ProviderRegistry {
    pub fn new(factory: ProviderFactory) -> Self {
        Self {
            factory,
            built: Mutex::new(HashMap::new()),
        }
    }

    /// The provider of `profile`, building it on first use. A failed build is not cached (a model pulled
    /// later, or a key written later, works without restarting the engine), and a provider is built again
    /// when its profile was edited or its key changed.
    pub fn get(&self, profile: &ProfileConfig) -> Result<Arc<dyn Provider>, ProviderError> {
        let key = profile.resolve_api_key();
        let mut built = lock(&self.built);
        if let Some(entry) = built.get(&profile.name) {
            if entry.profile == *profile && entry.key == key {
                return Ok(Arc::clone(&entry.provider));
            }
        }
        built.remove(&profile.name);
        let provider = (self.factory)(profile)?;
        built.insert(
            profile.name.clone(),
            Built {
                profile: profile.clone(),
                key,
                provider: Arc::clone(&provider),
            },
        );
        Ok(provider)
    }

    /// The provider if already built (for status output).
    pub fn peek(&self, name: &str) -> Option<Arc<dyn Provider>> {
        lock(&self.built)
            .get(name)
            .map(|entry| Arc::clone(&entry.provider))
    }
}

/// The real factory: HTTP providers by wire format, the embedded model for `embedded` profiles.
pub fn default_factory(_config: &EngineConfig) -> ProviderFactory {
    Arc::new(
        |profile: &ProfileConfig| -> Result<Arc<dyn Provider>, ProviderError> {
            match profile.kind {
                ProviderKind::Embedded => embedded(profile),
                _ => crate::provider::provider_from_profile(profile)
                    .map_err(|e| ProviderError::BadRequest(e.to_string())),
            }
        },
    )
}

#[cfg(feature = "embedded")]
fn embedded(profile: &ProfileConfig) -> Result<Arc<dyn Provider>, ProviderError> {
    use crate::models::{catalog, resolve_default, resolve_model};
    use crate::provider::embedded::{EmbeddedOptions, EmbeddedProvider};
    let (entry, resolved) = if profile.model.eq_ignore_ascii_case(catalog::DEFAULT_MODEL) {
        resolve_default(profile.model_path.as_deref())
    } else {
        let entry = catalog::find(&profile.model).unwrap_or_else(catalog::default_entry);
        resolve_model(profile.model_path.as_deref(), entry).map(|r| (entry, r))
    }
    .map_err(|e| ProviderError::ModelMissing(e.to_string()))?;
    if let Some(note) = catalog::model_note(entry.name) {
        tracing::warn!("{note}");
    }
    let mut options = EmbeddedOptions {
        model_name: Some(entry.name.to_string()),
        threads: profile.threads,
        ..EmbeddedOptions::default()
    };
    if let Some(context) = profile.context_tokens {
        options.context_tokens = context;
    }
    Ok(Arc::new(EmbeddedProvider::new(resolved.path, options)))
}

#[cfg(not(feature = "embedded"))]
fn embedded(_profile: &ProfileConfig) -> Result<Arc<dyn Provider>, ProviderError> {
    Err(ProviderError::ModelLoad(
        "this ai-engine was built without the embedded model (cargo feature `embedded`)".into(),
    ))
}
