//! The completion pipeline's pure logic: prompt templates, context trimming, streaming post-processing, cache.
//!
//! A request flows as: [`context::trim_context`] cuts the prefix/suffix to the token budget,
//! [`template::PromptStyle::build`] turns them into a provider prompt, the provider's text deltas go through a
//! [`postprocess::CompletionFilter`] (which says when to stop generation), and the final completion is stored
//! in the [`cache::CompletionCache`].

use crate::provider::GenerationRequest;
use lapce_ai_transport::protocol::CompletionRequest;

pub mod cache;
pub mod context;
pub mod indent;
pub mod inflight;
pub mod postprocess;
pub mod template;

pub use cache::{
    CacheConfig, CacheScope, CacheStats, Clock, CompletionCache, ManualClock, SystemClock,
};
pub use context::{
    approximate_tokens, trim_context, trim_context_with, ContextBudget, TrimmedContext,
};
pub use postprocess::{
    postprocess_full, resolve_line_mode, CompletionFilter, FilterContext, FilterStep, LineMode,
};
pub use template::{BuiltPrompt, FimTemplate, PromptStyle, UnknownNameError};

/// What a completion request turns into: the provider request and the matching filter context.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedCompletion {
    pub request: GenerationRequest,
    /// Uses the untrimmed prefix and suffix (the filter only reads their ends near the cursor).
    pub filter_context: FilterContext,
    /// The prefix and suffix as sent in the prompt.
    pub context: TrimmedContext,
}

/// Trims the request's context to `budget`, builds the prompt in `style`, and sets up post-processing.
/// `max_tokens` and `temperature` are the values to use (the caller resolves profile defaults).
pub fn prepare_completion(
    request: &CompletionRequest,
    style: PromptStyle,
    budget: ContextBudget,
    max_tokens: u32,
    temperature: f32,
) -> PreparedCompletion {
    let context = trim_context(&request.prefix, &request.suffix, budget);
    let built = style.build(&context.prefix, &context.suffix, &request.language_id);
    PreparedCompletion {
        request: built.to_request(max_tokens, temperature),
        filter_context: FilterContext {
            prefix: request.prefix.clone(),
            suffix: request.suffix.clone(),
            mode: request.mode,
            stop: built.stop.clone(),
            language_id: request.language_id.clone(),
            chat_answer: built.chat_answer,
            max_lines: request.max_lines,
        },
        context,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Prompt;

    #[test]
    fn prepared_completion_wires_template_trimming_and_filter() {
        let request = CompletionRequest {
            language_id: "python".to_string(),
            prefix: format!("{}def f(x):\n    return ", "# filler line\n".repeat(2000)),
            suffix: "\n".to_string(),
            ..CompletionRequest::default()
        };
        let prepared = prepare_completion(
            &request,
            PromptStyle::Template(FimTemplate::QwenCoder),
            ContextBudget::default(),
            128,
            0.1,
        );
        assert!(prepared.context.prefix_truncated);
        assert!(prepared.context.prefix.ends_with("def f(x):\n    return "));
        let Prompt::Raw(raw) = &prepared.request.prompt else {
            panic!("template style gives a raw prompt");
        };
        assert!(raw.starts_with("<|fim_prefix|>"));
        assert!(raw.len() < request.prefix.len());
        assert_eq!(prepared.request.max_tokens, 128);
        assert!(prepared.request.stop.contains(&"<|endoftext|>".to_string()));
        assert_eq!(prepared.filter_context.stop, prepared.request.stop);
        assert_eq!(prepared.filter_context.prefix, request.prefix);
        assert_eq!(
            postprocess_full(prepared.filter_context, "x * 2<|endoftext|>"),
            "x * 2"
        );
    }
}
