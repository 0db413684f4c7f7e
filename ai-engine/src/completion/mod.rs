//! The completion pipeline's pure logic: prompt templates, context trimming, streaming post-processing, cache.
//!
//! A request flows as: [`context::trim_context`] cuts the prefix/suffix to the token budget,
//! [`template::PromptStyle::build`] turns them into a provider prompt, the provider's text deltas go through a
//! [`postprocess::CompletionFilter`] (which says when to stop generation), and the final completion is stored
//! in the [`cache::CompletionCache`].

pub mod cache;
pub mod context;
pub mod postprocess;
pub mod template;

pub use cache::{CacheConfig, CacheStats, Clock, CompletionCache, ManualClock, SystemClock};
pub use context::{
    approximate_tokens, trim_context, trim_context_with, ContextBudget, TrimmedContext,
};
pub use postprocess::{
    postprocess_full, resolve_line_mode, CompletionFilter, FilterContext, FilterStep, LineMode,
};
pub use template::{BuiltPrompt, FimTemplate, PromptStyle, UnknownNameError};
