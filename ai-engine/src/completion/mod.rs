//! The completion pipeline's pure logic: prompt templates, context trimming, streaming post-processing, cache.
//!
//! A request flows as: [`context::trim_context`] cuts the prefix/suffix to the token budget,
//! [`template::PromptStyle::build`] turns them into a provider prompt, the provider's text deltas go through a
//! [`postprocess::CompletionFilter`] (which says when to stop generation), and the final completion is stored
//! in the [`cache::CompletionCache`]. Snippets of other open files ([`workspace::WorkspaceStore`]) are picked and
//! rendered by [`related`] within their own budget.

use crate::provider::GenerationRequest;
use lapce_ai_transport::protocol::CompletionRequest;

pub mod anchor;
pub mod cache;
pub mod context;
pub mod indent;
pub mod inflight;
pub mod postprocess;
pub mod related;
pub mod template;
pub mod workspace;

pub use cache::{
    CacheConfig, CacheScope, CacheStats, Clock, CompletionCache, ManualClock, SystemClock,
};
pub use context::{
    approximate_tokens, trim_context, trim_context_with, ContextBudget, TrimmedContext,
};
pub use postprocess::{
    postprocess_full, resolve_line_mode, CompletionFilter, FilterContext, FilterStep, LineMode,
};
pub use related::{
    select_snippets, RelatedSnippet, RenderedContext, SnippetKind, SnippetPlacement,
};
pub use template::{BuiltPrompt, FimTemplate, PromptStyle, UnknownNameError};
pub use workspace::{WorkspaceLimits, WorkspaceStore};

/// What a completion request turns into: the provider request and the matching filter context.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedCompletion {
    pub request: GenerationRequest,
    /// Uses the untrimmed prefix and suffix (the filter only reads their ends near the cursor).
    pub filter_context: FilterContext,
    /// The prefix and suffix as sent in the prompt.
    pub context: TrimmedContext,
    /// Snippets of other files in the request, most relevant first.
    pub related: Vec<RelatedSnippet>,
}

/// Where a completion's context from other files comes from, and how much of it to use.
#[derive(Debug, Clone, Copy)]
pub struct RelatedContext<'a> {
    pub store: &'a WorkspaceStore,
    /// Token budget for snippets, on top of (never taken from) the prefix/suffix budget; 0 disables.
    pub extra_tokens: usize,
    pub placement: SnippetPlacement,
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
    prepare_completion_with(request, style, budget, max_tokens, temperature, None)
}

/// [`prepare_completion`] plus snippets of other files from `related`: in the model's repository format
/// (Qwen2.5-Coder, StarCoder2), as extra context chunks, or as commented path headers before the prefix.
/// The cursor's prefix and suffix are trimmed to `budget` first and never shortened for the snippets.
pub fn prepare_completion_with(
    request: &CompletionRequest,
    style: PromptStyle,
    budget: ContextBudget,
    max_tokens: u32,
    temperature: f32,
    related: Option<RelatedContext<'_>>,
) -> PreparedCompletion {
    let context = trim_context(&request.prefix, &request.suffix, budget);
    let snippets = related
        .map(|r| select_snippets(r.store, request, &context, r.extra_tokens))
        .unwrap_or_default();
    let placement = related.map_or(SnippetPlacement::Prompt, |r| r.placement);
    let mut built;
    let mut extra_context = Vec::new();
    if snippets.is_empty() {
        built = style.build(&context.prefix, &context.suffix, &request.language_id);
    } else {
        let rendered = RenderedContext::new(&snippets, &request.file_path);
        let repo_format = match style {
            PromptStyle::Template(template) => {
                related::repo_tokens(template).map(|tokens| (template, tokens))
            }
            _ => None,
        };
        match (placement, repo_format) {
            (SnippetPlacement::ExtraContext, _) => {
                built = style.build(&context.prefix, &context.suffix, &request.language_id);
                extra_context = rendered.chunks();
            }
            (SnippetPlacement::Prompt, Some((template, tokens))) => {
                let prefix = if template == FimTemplate::StarCoder2 {
                    rendered.starcoder_prefix(&context.prefix)
                } else {
                    context.prefix.clone()
                };
                built = style.build(&prefix, &context.suffix, &request.language_id);
                if let crate::provider::Prompt::Raw(raw) = &mut built.prompt {
                    raw.insert_str(0, &rendered.repo_head(template, tokens));
                }
            }
            (SnippetPlacement::Prompt, None) => {
                let prefix = rendered.comment_head(&request.language_id) + &context.prefix;
                built = style.build(&prefix, &context.suffix, &request.language_id);
            }
        }
    }
    let mut generation = built.to_request(max_tokens, temperature);
    generation.extra_context = extra_context;
    PreparedCompletion {
        request: generation,
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
        related: snippets,
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

    fn store_with_helper() -> WorkspaceStore {
        let mut store = WorkspaceStore::new(WorkspaceLimits::default());
        store
            .open(
                "/w/app/util.py",
                "python",
                1,
                b"def double(x):\n    return x * 2\n",
            )
            .expect("open");
        store
    }

    fn python_request(prefix: String) -> CompletionRequest {
        CompletionRequest {
            language_id: "python".to_string(),
            file_path: "/w/app/main.py".to_string(),
            prefix,
            suffix: "\n".to_string(),
            ..CompletionRequest::default()
        }
    }

    #[test]
    fn snippets_never_push_out_the_cursor_prefix() {
        let store = store_with_helper();
        let request = python_request(format!("{}y = double(", "z = 1\n".repeat(2000)));
        let plain = prepare_completion(
            &request,
            PromptStyle::NativeFim,
            ContextBudget::default(),
            64,
            0.0,
        );
        for extra_tokens in [16, 1024, 100_000] {
            let related = RelatedContext {
                store: &store,
                extra_tokens,
                placement: SnippetPlacement::Prompt,
            };
            let with = prepare_completion_with(
                &request,
                PromptStyle::NativeFim,
                ContextBudget::default(),
                64,
                0.0,
                Some(related),
            );
            assert_eq!(with.context, plain.context, "extra {extra_tokens}");
            let Prompt::FillInTheMiddle { prefix, suffix, .. } = &with.request.prompt else {
                panic!("native style");
            };
            assert!(prefix.ends_with(&plain.context.prefix));
            assert_eq!(suffix, &plain.context.suffix);
            if extra_tokens >= 1024 {
                assert_eq!(
                    &prefix[..prefix.len() - plain.context.prefix.len()],
                    "# Path: util.py\n# def double(x):\n#     return x * 2\n"
                );
            }
        }
    }

    #[test]
    fn qwen_gets_the_repository_format_and_llama_cpp_gets_chunks() {
        let store = store_with_helper();
        let request = python_request("y = double(".to_string());
        let related = |placement| {
            Some(RelatedContext {
                store: &store,
                extra_tokens: 512,
                placement,
            })
        };
        let style = PromptStyle::Template(FimTemplate::QwenCoder);
        let prepared = prepare_completion_with(
            &request,
            style.clone(),
            ContextBudget::default(),
            64,
            0.0,
            related(SnippetPlacement::Prompt),
        );
        assert_eq!(
            prepared.request.prompt,
            Prompt::Raw(
                "<|repo_name|>app\n<|file_sep|>util.py\ndef double(x):\n    return x * 2\n\
<|file_sep|>main.py\n<|fim_prefix|>y = double(<|fim_suffix|>\n<|fim_middle|>"
                    .to_string()
            )
        );
        assert!(prepared.request.extra_context.is_empty());
        assert_eq!(prepared.related.len(), 1);
        assert_eq!(prepared.related[0].kind, SnippetKind::Definition);

        let chunked = prepare_completion_with(
            &request,
            style.clone(),
            ContextBudget::default(),
            64,
            0.0,
            related(SnippetPlacement::ExtraContext),
        );
        let plain = prepare_completion(&request, style.clone(), ContextBudget::default(), 64, 0.0);
        assert_eq!(chunked.request.prompt, plain.request.prompt);
        assert_eq!(
            chunked.request.extra_context,
            vec![crate::provider::ContextChunk {
                path: "util.py".into(),
                text: "def double(x):\n    return x * 2\n".into()
            }]
        );
        let disabled = prepare_completion_with(
            &request,
            style.clone(),
            ContextBudget::default(),
            64,
            0.0,
            Some(RelatedContext {
                store: &store,
                extra_tokens: 0,
                placement: SnippetPlacement::Prompt,
            }),
        );
        assert_eq!(disabled.request, plain.request);
    }
}
