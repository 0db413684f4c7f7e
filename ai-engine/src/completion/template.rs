//! Fill-in-the-middle prompt templates per model family, and how a completion request becomes a provider [`Prompt`].

use crate::provider::{ChatRole, ChatTurn, GenerationRequest, Prompt};

/// A model family's fill-in-the-middle prompt format, with the tokens exactly as the model was trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FimTemplate {
    /// StarCoder / StarCoder2: `<fim_prefix>P<fim_suffix>S<fim_middle>`.
    StarCoder,
    /// CodeLlama: `<PRE> P <SUF>S <MID>`, ends with `<EOT>`.
    CodeLlama,
    /// DeepSeek-Coder: `<｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜>`.
    DeepSeekCoder,
    /// Qwen2.5-Coder: `<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`.
    QwenCoder,
    /// Codestral: `[SUFFIX]S[PREFIX]P` (suffix first).
    Codestral,
    /// CodeGemma: `<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`.
    CodeGemma,
}

/// A configured template or prompt-style name that this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{name}`; known names: {known}")]
pub struct UnknownNameError {
    /// What kind of name was looked up (`FIM template`, `prompt style`).
    pub what: &'static str,
    /// The name as configured.
    pub name: String,
    /// Comma-separated list of accepted names.
    pub known: String,
}

/// Configured names accepted by [`FimTemplate::from_name`], with the template each selects.
const TEMPLATE_NAMES: &[(&str, FimTemplate)] = &[
    ("starcoder", FimTemplate::StarCoder),
    ("starcoder2", FimTemplate::StarCoder),
    ("codellama", FimTemplate::CodeLlama),
    ("code-llama", FimTemplate::CodeLlama),
    ("deepseek", FimTemplate::DeepSeekCoder),
    ("deepseek-coder", FimTemplate::DeepSeekCoder),
    ("qwen", FimTemplate::QwenCoder),
    ("qwen-coder", FimTemplate::QwenCoder),
    ("qwen2.5-coder", FimTemplate::QwenCoder),
    ("codestral", FimTemplate::Codestral),
    ("codegemma", FimTemplate::CodeGemma),
];

/// Model-name fragments (lower case) that identify a family; checked in this order.
const MODEL_NAME_FRAGMENTS: &[(&str, FimTemplate)] = &[
    ("qwen2.5-coder", FimTemplate::QwenCoder),
    ("qwen2.5coder", FimTemplate::QwenCoder),
    ("qwen-coder", FimTemplate::QwenCoder),
    ("starcoder", FimTemplate::StarCoder),
    ("codellama", FimTemplate::CodeLlama),
    ("code-llama", FimTemplate::CodeLlama),
    ("deepseek-coder", FimTemplate::DeepSeekCoder),
    ("codestral", FimTemplate::Codestral),
    ("codegemma", FimTemplate::CodeGemma),
];

impl FimTemplate {
    /// Every template, for listings and tests.
    pub const ALL: [FimTemplate; 6] = [
        FimTemplate::StarCoder,
        FimTemplate::CodeLlama,
        FimTemplate::DeepSeekCoder,
        FimTemplate::QwenCoder,
        FimTemplate::Codestral,
        FimTemplate::CodeGemma,
    ];

    /// Picks the template from a model name by case-insensitive substring (`Qwen2.5-Coder-1.5B` -> Qwen).
    pub fn for_model(model_name: &str) -> Option<FimTemplate> {
        let lower = model_name.to_lowercase();
        MODEL_NAME_FRAGMENTS
            .iter()
            .find(|(fragment, _)| lower.contains(fragment))
            .map(|(_, template)| *template)
    }

    /// Looks up a configured template name (case-insensitive), e.g. `qwen`, `starcoder`, `deepseek`.
    pub fn from_name(name: &str) -> Result<FimTemplate, UnknownNameError> {
        let wanted = name.trim().to_lowercase();
        TEMPLATE_NAMES
            .iter()
            .find(|(known, _)| *known == wanted)
            .map(|(_, template)| *template)
            .ok_or_else(|| UnknownNameError {
                what: "FIM template",
                name: name.to_string(),
                known: TEMPLATE_NAMES
                    .iter()
                    .map(|(known, _)| *known)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The canonical configuration name of this template.
    pub fn name(self) -> &'static str {
        match self {
            FimTemplate::StarCoder => "starcoder",
            FimTemplate::CodeLlama => "codellama",
            FimTemplate::DeepSeekCoder => "deepseek-coder",
            FimTemplate::QwenCoder => "qwen2.5-coder",
            FimTemplate::Codestral => "codestral",
            FimTemplate::CodeGemma => "codegemma",
        }
    }

    /// The raw prompt for `prefix`/`suffix`; the model generates the middle right after it.
    pub fn render(self, prefix: &str, suffix: &str) -> String {
        match self {
            FimTemplate::StarCoder => {
                format!("<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>")
            }
            FimTemplate::CodeLlama => format!("<PRE> {prefix} <SUF>{suffix} <MID>"),
            FimTemplate::DeepSeekCoder => {
                format!("<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>")
            }
            FimTemplate::QwenCoder | FimTemplate::CodeGemma => {
                format!("<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>")
            }
            FimTemplate::Codestral => format!("[SUFFIX]{suffix}[PREFIX]{prefix}"),
        }
    }

    /// Tokens that end the middle for this family (end of text, file separators, the FIM markers themselves).
    pub fn stop_tokens(self) -> &'static [&'static str] {
        match self {
            FimTemplate::StarCoder => &[
                "<|endoftext|>",
                "<file_sep>",
                "<fim_prefix>",
                "<fim_suffix>",
                "<fim_middle>",
                "<|end_of_text|>",
            ],
            FimTemplate::CodeLlama => &["<EOT>", "<PRE>", "<SUF>", "<MID>", "</s>"],
            FimTemplate::DeepSeekCoder => &[
                "<｜end▁of▁sentence｜>",
                "<｜fim▁begin｜>",
                "<｜fim▁hole｜>",
                "<｜fim▁end｜>",
                "<|EOT|>",
            ],
            FimTemplate::QwenCoder => &[
                "<|endoftext|>",
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
                "<|fim_pad|>",
                "<|repo_name|>",
                "<|file_sep|>",
                "<|im_start|>",
                "<|im_end|>",
            ],
            FimTemplate::Codestral => &["[PREFIX]", "[SUFFIX]", "</s>"],
            FimTemplate::CodeGemma => &[
                "<|file_separator|>",
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
                "<end_of_turn>",
                "<eos>",
            ],
        }
    }
}

/// The hole marker a chat model is asked to fill in [`PromptStyle::ChatFillHole`].
pub const FILL_HERE_MARKER: &str = "<FILL_HERE>";

/// System prompt for [`PromptStyle::ChatFillHole`].
pub const CHAT_FILL_SYSTEM_PROMPT: &str = "You are a code completion engine inside a code editor. \
The user sends a file with the marker <FILL_HERE> at the cursor. Reply with only the code that replaces \
<FILL_HERE>: no explanation, no Markdown code fences, and do not repeat the code before or after the marker. \
Keep the indentation of the surrounding code. If nothing should be inserted, reply with nothing.";

/// How a completion request becomes a provider [`Prompt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptStyle {
    /// The provider has a suffix field: [`Prompt::FillInTheMiddle`].
    NativeFim,
    /// A FIM template applied here: [`Prompt::Raw`] with the rendered template.
    Template(FimTemplate),
    /// A model without FIM tokens (e.g. SmolLM2): [`Prompt::Raw`] with the prefix alone;
    /// the suffix is still used by post-processing.
    PrefixOnly,
    /// A chat-only model: a system prompt plus a user message asking to fill [`FILL_HERE_MARKER`];
    /// post-processing strips code fences and echoed code ([`BuiltPrompt::chat_answer`]).
    ChatFillHole,
}

/// Configured prompt-style names other than template names.
const STYLE_NAMES: &[&str] = &["native", "prefix-only", "chat"];

impl PromptStyle {
    /// Reads a configured style: `native`, `prefix-only`, `chat`, or any [`FimTemplate::from_name`] name.
    pub fn from_name(name: &str) -> Result<PromptStyle, UnknownNameError> {
        match name.trim().to_lowercase().as_str() {
            "native" | "native-fim" => Ok(PromptStyle::NativeFim),
            "prefix-only" | "prefix" | "none" => Ok(PromptStyle::PrefixOnly),
            "chat" | "chat-fill-hole" => Ok(PromptStyle::ChatFillHole),
            _ => FimTemplate::from_name(name)
                .map(PromptStyle::Template)
                .map_err(|template_error| UnknownNameError {
                    what: "prompt style",
                    name: name.to_string(),
                    known: format!("{}, {}", STYLE_NAMES.join(", "), template_error.known),
                }),
        }
    }

    /// The style when none is configured: chat-only providers fill a hole; providers with a suffix field
    /// use it; otherwise the template of the model's family; otherwise plain prefix completion.
    pub fn detect(model_name: &str, supports_native_fim: bool, chat_only: bool) -> PromptStyle {
        if chat_only {
            PromptStyle::ChatFillHole
        } else if supports_native_fim {
            PromptStyle::NativeFim
        } else if let Some(template) = FimTemplate::for_model(model_name) {
            PromptStyle::Template(template)
        } else {
            PromptStyle::PrefixOnly
        }
    }

    /// Builds the prompt for an already budget-trimmed `prefix`/`suffix`.
    pub fn build(self, prefix: &str, suffix: &str, language_id: &str) -> BuiltPrompt {
        match self {
            PromptStyle::NativeFim => BuiltPrompt {
                prompt: Prompt::FillInTheMiddle {
                    prefix: prefix.to_string(),
                    suffix: suffix.to_string(),
                },
                stop: Vec::new(),
                chat_answer: false,
            },
            PromptStyle::Template(template) => BuiltPrompt {
                prompt: Prompt::Raw(template.render(prefix, suffix)),
                stop: template
                    .stop_tokens()
                    .iter()
                    .map(|token| token.to_string())
                    .collect(),
                chat_answer: false,
            },
            PromptStyle::PrefixOnly => BuiltPrompt {
                prompt: Prompt::Raw(prefix.to_string()),
                stop: Vec::new(),
                chat_answer: false,
            },
            PromptStyle::ChatFillHole => BuiltPrompt {
                prompt: Prompt::Chat {
                    system: Some(CHAT_FILL_SYSTEM_PROMPT.to_string()),
                    messages: vec![ChatTurn {
                        role: ChatRole::User,
                        content: chat_fill_message(prefix, suffix, language_id),
                    }],
                },
                stop: Vec::new(),
                chat_answer: true,
            },
        }
    }
}

/// The user message of [`PromptStyle::ChatFillHole`].
fn chat_fill_message(prefix: &str, suffix: &str, language_id: &str) -> String {
    let language = if language_id.is_empty() {
        "code"
    } else {
        language_id
    };
    format!(
        "Fill in the code at {FILL_HERE_MARKER} in this {language} file. \
Answer with only the code that replaces {FILL_HERE_MARKER}.\n\n\
{prefix}{FILL_HERE_MARKER}{suffix}"
    )
}

/// A prompt ready for a provider, with what post-processing needs to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltPrompt {
    pub prompt: Prompt,
    /// Stop sequences of the template (send them to the provider and to the filter).
    pub stop: Vec<String>,
    /// True when the answer comes from a chat model (fences and echoed code are stripped).
    pub chat_answer: bool,
}

impl BuiltPrompt {
    /// The provider request for this prompt.
    pub fn to_request(&self, max_tokens: u32, temperature: f32) -> GenerationRequest {
        GenerationRequest {
            prompt: self.prompt.clone(),
            max_tokens,
            temperature,
            stop: self.stop.clone(),
            extra_context: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "def add(a, b):\n    ";
    const SUFFIX: &str = "\n\nprint(add(1, 2))\n";

    #[test]
    fn renders_exact_strings_per_family() {
        let expected = [
            (
                FimTemplate::StarCoder,
                "<fim_prefix>def add(a, b):\n    <fim_suffix>\n\nprint(add(1, 2))\n<fim_middle>",
            ),
            (
                FimTemplate::CodeLlama,
                "<PRE> def add(a, b):\n     <SUF>\n\nprint(add(1, 2))\n <MID>",
            ),
            (
                FimTemplate::DeepSeekCoder,
                "<｜fim▁begin｜>def add(a, b):\n    <｜fim▁hole｜>\n\nprint(add(1, 2))\n<｜fim▁end｜>",
            ),
            (
                FimTemplate::QwenCoder,
                "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n\nprint(add(1, 2))\n<|fim_middle|>",
            ),
            (
                FimTemplate::Codestral,
                "[SUFFIX]\n\nprint(add(1, 2))\n[PREFIX]def add(a, b):\n    ",
            ),
            (
                FimTemplate::CodeGemma,
                "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n\nprint(add(1, 2))\n<|fim_middle|>",
            ),
        ];
        for (template, rendered) in expected {
            assert_eq!(template.render(PREFIX, SUFFIX), rendered, "{template:?}");
        }
    }

    #[test]
    fn stop_tokens_include_the_end_of_text_token() {
        let ends = [
            (FimTemplate::StarCoder, "<|endoftext|>"),
            (FimTemplate::CodeLlama, "<EOT>"),
            (FimTemplate::DeepSeekCoder, "<｜end▁of▁sentence｜>"),
            (FimTemplate::QwenCoder, "<|endoftext|>"),
            (FimTemplate::Codestral, "</s>"),
            (FimTemplate::CodeGemma, "<|file_separator|>"),
        ];
        for (template, end) in ends {
            assert!(template.stop_tokens().contains(&end), "{template:?}");
        }
        assert!(FimTemplate::QwenCoder
            .stop_tokens()
            .contains(&"<|file_sep|>"));
        assert!(FimTemplate::QwenCoder
            .stop_tokens()
            .contains(&"<|fim_pad|>"));
    }

    #[test]
    fn picks_template_from_model_name_case_insensitively() {
        let cases = [
            ("Qwen2.5-Coder-1.5B-Instruct", Some(FimTemplate::QwenCoder)),
            ("qwen2.5-coder:7b-base", Some(FimTemplate::QwenCoder)),
            ("bigcode/StarCoder2-3B", Some(FimTemplate::StarCoder)),
            ("codellama:7b-code", Some(FimTemplate::CodeLlama)),
            (
                "deepseek-ai/DeepSeek-Coder-6.7B-base",
                Some(FimTemplate::DeepSeekCoder),
            ),
            ("codestral-latest", Some(FimTemplate::Codestral)),
            ("google/codegemma-2b", Some(FimTemplate::CodeGemma)),
            ("SmolLM2-135M-Instruct", None),
            ("gpt-4o-mini", None),
        ];
        for (model, expected) in cases {
            assert_eq!(FimTemplate::for_model(model), expected, "{model}");
        }
    }

    #[test]
    fn configured_names_resolve_and_unknown_names_list_the_choices() {
        assert_eq!(FimTemplate::from_name("qwen"), Ok(FimTemplate::QwenCoder));
        assert_eq!(
            FimTemplate::from_name(" DeepSeek "),
            Ok(FimTemplate::DeepSeekCoder)
        );
        for template in FimTemplate::ALL {
            assert_eq!(FimTemplate::from_name(template.name()), Ok(template));
        }
        let error = FimTemplate::from_name("gpt").expect_err("gpt is no FIM template");
        let message = error.to_string();
        assert!(message.contains("`gpt`"), "{message}");
        assert!(message.contains("starcoder"), "{message}");

        assert_eq!(
            PromptStyle::from_name("chat"),
            Ok(PromptStyle::ChatFillHole)
        );
        assert_eq!(
            PromptStyle::from_name("codestral"),
            Ok(PromptStyle::Template(FimTemplate::Codestral))
        );
        let style_error = PromptStyle::from_name("fancy").expect_err("unknown style");
        assert!(style_error.to_string().contains("prefix-only"));
    }

    #[test]
    fn detection_prefers_chat_then_native_then_family_template() {
        assert_eq!(
            PromptStyle::detect("claude-sonnet", false, true),
            PromptStyle::ChatFillHole
        );
        assert_eq!(
            PromptStyle::detect("qwen2.5-coder", true, false),
            PromptStyle::NativeFim
        );
        assert_eq!(
            PromptStyle::detect("qwen2.5-coder", false, false),
            PromptStyle::Template(FimTemplate::QwenCoder)
        );
        assert_eq!(
            PromptStyle::detect("SmolLM2-135M", false, false),
            PromptStyle::PrefixOnly
        );
    }

    #[test]
    fn each_style_builds_the_matching_prompt_kind() {
        let native = PromptStyle::NativeFim.build("a", "b", "rust");
        assert_eq!(
            native.prompt,
            Prompt::FillInTheMiddle {
                prefix: "a".into(),
                suffix: "b".into()
            }
        );
        assert!(native.stop.is_empty());

        let templated = PromptStyle::Template(FimTemplate::CodeLlama).build("a", "b", "rust");
        assert_eq!(templated.prompt, Prompt::Raw("<PRE> a <SUF>b <MID>".into()));
        assert!(templated.stop.contains(&"<EOT>".to_string()));
        let request = templated.to_request(64, 0.2);
        assert_eq!(request.max_tokens, 64);
        assert_eq!(request.stop, templated.stop);

        let prefix_only = PromptStyle::PrefixOnly.build("fn main() {", "}", "rust");
        assert_eq!(prefix_only.prompt, Prompt::Raw("fn main() {".into()));

        let chat = PromptStyle::ChatFillHole.build("let x = ", ";", "rust");
        assert!(chat.chat_answer);
        match chat.prompt {
            Prompt::Chat { system, messages } => {
                assert_eq!(system.as_deref(), Some(CHAT_FILL_SYSTEM_PROMPT));
                assert_eq!(messages.len(), 1);
                assert_eq!(messages[0].role, ChatRole::User);
                assert!(messages[0].content.ends_with("let x = <FILL_HERE>;"));
                assert!(messages[0].content.contains("rust file"));
            }
            other => panic!("expected a chat prompt, got {other:?}"),
        }
    }
}
