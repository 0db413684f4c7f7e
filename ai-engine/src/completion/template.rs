//! Fill-in-the-middle prompt templates per model family, and how a completion request becomes a provider [`Prompt`].

use std::sync::Arc;

use crate::provider::{
    ChatRole, ChatTurn, CompletionHints, FimFallback, GenerationRequest, Prompt,
};

/// A model family's fill-in-the-middle prompt format, with the tokens exactly as the model was trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FimTemplate {
    /// StarCoder (1), StableCode, and other models on the StarCoder tokenizer:
    /// `<fim_prefix>P<fim_suffix>S<fim_middle>`; multi-file `<reponame>` / `<filename>`.
    StarCoder,
    /// StarCoder2: the StarCoder FIM tokens; multi-file `<repo_name>` / `<file_sep>`.
    StarCoder2,
    /// CodeLlama: `<PRE> P <SUF>S <MID>`, ends with `<EOT>`.
    CodeLlama,
    /// DeepSeek-Coder: `<｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜>`.
    DeepSeekCoder,
    /// Qwen2.5-Coder and Qwen3-Coder: `<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`;
    /// multi-file `<|repo_name|>` / `<|file_sep|>`.
    QwenCoder,
    /// CodeQwen1.5: StarCoder-style `<fim_prefix>P<fim_suffix>S<fim_middle>`; multi-file `<reponame>` / `<file_sep>`.
    CodeQwen,
    /// Codestral: `[SUFFIX]S[PREFIX]P` (suffix first).
    Codestral,
    /// CodeGemma: `<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`; files separated by `<|file_separator|>`.
    CodeGemma,
    /// IBM Granite-Code: StarCoder-tokenizer `<fim_prefix>P<fim_suffix>S<fim_middle>`.
    GraniteCode,
    /// ByteDance Seed-Coder, suffix first: `<[fim-suffix]>S<[fim-prefix]>P<[fim-middle]>`.
    SeedCoder,
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
    ("stablecode", FimTemplate::StarCoder),
    ("starcoder2", FimTemplate::StarCoder2),
    ("codellama", FimTemplate::CodeLlama),
    ("code-llama", FimTemplate::CodeLlama),
    ("deepseek", FimTemplate::DeepSeekCoder),
    ("deepseek-coder", FimTemplate::DeepSeekCoder),
    ("qwen", FimTemplate::QwenCoder),
    ("qwen-coder", FimTemplate::QwenCoder),
    ("qwen2.5-coder", FimTemplate::QwenCoder),
    ("qwen3-coder", FimTemplate::QwenCoder),
    ("codeqwen", FimTemplate::CodeQwen),
    ("codestral", FimTemplate::Codestral),
    ("codegemma", FimTemplate::CodeGemma),
    ("granite-code", FimTemplate::GraniteCode),
    ("granite", FimTemplate::GraniteCode),
    ("seed-coder", FimTemplate::SeedCoder),
];

/// Model-name fragments (lower case) that identify a family; checked in this order (more specific first:
/// `codeqwen` before `qwen`, `starcoder2` before `starcoder`).
const MODEL_NAME_FRAGMENTS: &[(&str, FimTemplate)] = &[
    ("codeqwen", FimTemplate::CodeQwen),
    ("qwen2.5-coder", FimTemplate::QwenCoder),
    ("qwen2.5coder", FimTemplate::QwenCoder),
    ("qwen3-coder", FimTemplate::QwenCoder),
    ("qwen3coder", FimTemplate::QwenCoder),
    ("qwen-coder", FimTemplate::QwenCoder),
    ("starcoder2", FimTemplate::StarCoder2),
    ("starcoder", FimTemplate::StarCoder),
    ("stable-code", FimTemplate::StarCoder),
    ("stablecode", FimTemplate::StarCoder),
    ("codellama", FimTemplate::CodeLlama),
    ("code-llama", FimTemplate::CodeLlama),
    ("deepseek-coder", FimTemplate::DeepSeekCoder),
    ("codestral", FimTemplate::Codestral),
    ("codegemma", FimTemplate::CodeGemma),
    ("granite-code", FimTemplate::GraniteCode),
    ("granite-3b-code", FimTemplate::GraniteCode),
    ("granite-8b-code", FimTemplate::GraniteCode),
    ("granite-20b-code", FimTemplate::GraniteCode),
    ("granite-34b-code", FimTemplate::GraniteCode),
    ("seed-coder", FimTemplate::SeedCoder),
    ("seedcoder", FimTemplate::SeedCoder),
];

impl FimTemplate {
    /// Every template, for listings and tests.
    pub const ALL: [FimTemplate; 10] = [
        FimTemplate::StarCoder,
        FimTemplate::StarCoder2,
        FimTemplate::CodeLlama,
        FimTemplate::DeepSeekCoder,
        FimTemplate::QwenCoder,
        FimTemplate::CodeQwen,
        FimTemplate::Codestral,
        FimTemplate::CodeGemma,
        FimTemplate::GraniteCode,
        FimTemplate::SeedCoder,
    ];

    /// Picks the template from a model name by case-insensitive substring (`Qwen2.5-Coder-1.5B` -> Qwen).
    /// Underscores count as dashes (`qwen3_coder`).
    pub fn for_model(model_name: &str) -> Option<FimTemplate> {
        let lower = model_name.to_lowercase().replace('_', "-");
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
            FimTemplate::StarCoder2 => "starcoder2",
            FimTemplate::CodeLlama => "codellama",
            FimTemplate::DeepSeekCoder => "deepseek-coder",
            FimTemplate::QwenCoder => "qwen2.5-coder",
            FimTemplate::CodeQwen => "codeqwen",
            FimTemplate::Codestral => "codestral",
            FimTemplate::CodeGemma => "codegemma",
            FimTemplate::GraniteCode => "granite-code",
            FimTemplate::SeedCoder => "seed-coder",
        }
    }

    /// True for prefix-first layouts whose middle may start with given text ([`super::anchor`]): the marker
    /// tokens delimit the parts exactly. Suffix-first layouts have the prefix last already; Code Llama's
    /// layout puts spaces around its markers, so a split would change what the model sees.
    pub fn can_start_middle(self) -> bool {
        !matches!(
            self,
            FimTemplate::CodeLlama | FimTemplate::Codestral | FimTemplate::SeedCoder
        )
    }

    /// The raw prompt for `prefix`/`suffix` with the middle starting at `middle_start` in the prefix (see
    /// [`super::anchor`]) where the layout allows it; the model continues the middle right after it.
    pub fn render_split(self, prefix: &str, suffix: &str, middle_start: Option<usize>) -> String {
        if !self.can_start_middle() {
            return self.render(prefix, suffix);
        }
        let (head, tail) = crate::provider::split_at_middle(prefix, middle_start);
        let mut text = self.render(head, suffix);
        text.push_str(tail);
        text
    }

    /// The raw prompt for `prefix`/`suffix`; the model generates the middle right after it.
    pub fn render(self, prefix: &str, suffix: &str) -> String {
        match self {
            FimTemplate::StarCoder
            | FimTemplate::StarCoder2
            | FimTemplate::CodeQwen
            | FimTemplate::GraniteCode => {
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
            FimTemplate::SeedCoder => {
                format!("<[fim-suffix]>{suffix}<[fim-prefix]>{prefix}<[fim-middle]>")
            }
        }
    }

    /// The token that starts each file of multi-file (repository-level) context, followed by the file's path
    /// and a newline, for families trained with one.
    pub fn file_separator(self) -> Option<&'static str> {
        match self {
            FimTemplate::QwenCoder => Some("<|file_sep|>"),
            FimTemplate::StarCoder2 | FimTemplate::CodeQwen => Some("<file_sep>"),
            FimTemplate::StarCoder => Some("<filename>"),
            FimTemplate::CodeGemma => Some("<|file_separator|>"),
            _ => None,
        }
    }

    /// The token that introduces the repository name at the start of multi-file context, where the family
    /// has one.
    pub fn repo_name_token(self) -> Option<&'static str> {
        match self {
            FimTemplate::QwenCoder => Some("<|repo_name|>"),
            FimTemplate::StarCoder2 => Some("<repo_name>"),
            FimTemplate::StarCoder | FimTemplate::CodeQwen => Some("<reponame>"),
            _ => None,
        }
    }

    /// Tokens that end the middle for this family (end of text, file separators, the FIM markers themselves).
    pub fn stop_tokens(self) -> &'static [&'static str] {
        match self {
            FimTemplate::StarCoder | FimTemplate::StarCoder2 => &[
                "<|endoftext|>",
                "<file_sep>",
                "<filename>",
                "<fim_prefix>",
                "<fim_suffix>",
                "<fim_middle>",
                "<|end_of_text|>",
            ],
            FimTemplate::CodeQwen => &[
                "<|endoftext|>",
                "<file_sep>",
                "<reponame>",
                "<fim_prefix>",
                "<fim_suffix>",
                "<fim_middle>",
                "<fim_pad>",
                "<|im_end|>",
            ],
            // Granite-Code uses the StarCoder tokenizer (Granite Code paper, section 3); taken from the paper and
            // the StarCoder vocabulary, not checked against Granite's own tokenizer_config.json here.
            FimTemplate::GraniteCode => &[
                "<|endoftext|>",
                "<fim_prefix>",
                "<fim_suffix>",
                "<fim_middle>",
                "<fim_pad>",
                "<filename>",
                "<reponame>",
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
            // FIM tokens and their suffix-first order are from the Seed-Coder report (arXiv 2506.03524, the FIM
            // format section); the end-of-sentence spelling `<[end~of~sentence]>` was not verified here.
            FimTemplate::SeedCoder => &[
                "<[end~of~sentence]>",
                "<[fim-suffix]>",
                "<[fim-prefix]>",
                "<[fim-middle]>",
            ],
        }
    }
}

/// A user-written FIM template from `fim_template`: text with `{prefix}` and `{suffix}` placeholders
/// (`{{` and `}}` stand for literal braces), plus the stop strings from `fim_stop`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomFimTemplate {
    pieces: Vec<TemplatePiece>,
    stop: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePiece {
    Text(String),
    Prefix,
    Suffix,
}

/// Why a custom FIM template string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("the template has no `{{prefix}}` placeholder")]
    MissingPrefix,
    #[error("unknown placeholder `{{{0}}}` (only {{prefix}} and {{suffix}} exist; write {{{{ or }}}} for a literal brace)")]
    UnknownPlaceholder(String),
    #[error("unbalanced `{0}` at character {1} (write {{{{ or }}}} for a literal brace)")]
    Unbalanced(char, usize),
}

impl CustomFimTemplate {
    /// Parses `template`; `stop` are the strings that end the middle.
    pub fn parse(template: &str, stop: Vec<String>) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = template.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => return Err(TemplateError::Unbalanced('}', at)),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, '{')) | None => {
                                return Err(TemplateError::Unbalanced('{', at))
                            }
                            Some((_, n)) => name.push(n),
                        }
                    }
                    let piece = match name.as_str() {
                        "prefix" => TemplatePiece::Prefix,
                        "suffix" => TemplatePiece::Suffix,
                        _ => return Err(TemplateError::UnknownPlaceholder(name)),
                    };
                    if !text.is_empty() {
                        pieces.push(TemplatePiece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(piece);
                }
                _ => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(TemplatePiece::Text(text));
        }
        if !pieces.contains(&TemplatePiece::Prefix) {
            return Err(TemplateError::MissingPrefix);
        }
        Ok(Self { pieces, stop })
    }

    /// True when `setting` is meant as a template string rather than a template name (it has a brace).
    pub fn looks_like_template(setting: &str) -> bool {
        setting.contains('{') || setting.contains('}')
    }

    /// The prompt with the placeholders filled in.
    pub fn render(&self, prefix: &str, suffix: &str) -> String {
        let mut out = String::with_capacity(prefix.len() + suffix.len() + 64);
        for piece in &self.pieces {
            match piece {
                TemplatePiece::Text(text) => out.push_str(text),
                TemplatePiece::Prefix => out.push_str(prefix),
                TemplatePiece::Suffix => out.push_str(suffix),
            }
        }
        out
    }

    /// The configured stop strings.
    pub fn stop_tokens(&self) -> &[String] {
        &self.stop
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptStyle {
    /// The provider has a suffix field: [`Prompt::FillInTheMiddle`].
    NativeFim,
    /// A FIM template applied here: [`Prompt::Raw`] with the rendered template.
    Template(FimTemplate),
    /// A user-written template from `fim_template`, applied here like [`PromptStyle::Template`].
    Custom(Arc<CustomFimTemplate>),
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
        } else {
            Self::template_for(None, model_name)
        }
    }

    /// The template style: the configured template (named or custom), else the model family's, else
    /// prefix-only.
    pub fn template_for(configured: Option<&PromptStyle>, model_name: &str) -> PromptStyle {
        match configured {
            Some(style @ (PromptStyle::Template(_) | PromptStyle::Custom(_))) => style.clone(),
            _ => FimTemplate::for_model(model_name)
                .map(PromptStyle::Template)
                .unwrap_or(PromptStyle::PrefixOnly),
        }
    }

    /// A short description for log lines and errors.
    pub fn describe(&self) -> String {
        match self {
            PromptStyle::NativeFim => "native fill-in-the-middle".to_string(),
            PromptStyle::Template(template) => format!("the {} FIM template", template.name()),
            PromptStyle::Custom(_) => "the custom fim_template".to_string(),
            PromptStyle::PrefixOnly => "prefix-only completion".to_string(),
            PromptStyle::ChatFillHole => "a chat fill-the-hole prompt".to_string(),
        }
    }

    /// Builds the prompt for an already budget-trimmed `prefix`/`suffix`.
    pub fn build(&self, prefix: &str, suffix: &str, language_id: &str) -> BuiltPrompt {
        let raw = |prompt: String, stop: Vec<String>| BuiltPrompt {
            prompt: Prompt::Raw(prompt),
            stop,
            chat_answer: false,
        };
        match self {
            PromptStyle::NativeFim => BuiltPrompt {
                prompt: Prompt::FillInTheMiddle {
                    prefix: prefix.to_string(),
                    suffix: suffix.to_string(),
                    middle_start: super::anchor::middle_start(prefix),
                },
                stop: Vec::new(),
                chat_answer: false,
            },
            PromptStyle::Template(template) => raw(
                template.render_split(prefix, suffix, super::anchor::middle_start(prefix)),
                template
                    .stop_tokens()
                    .iter()
                    .map(|token| token.to_string())
                    .collect(),
            ),
            PromptStyle::Custom(template) => raw(
                template.render(prefix, suffix),
                template.stop_tokens().to_vec(),
            ),
            PromptStyle::PrefixOnly => raw(prefix.to_string(), Vec::new()),
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

/// A profile's prompt decision: the style, and for native FIM the style the provider falls back to when the
/// server does not honour a suffix (or, in `fim = "auto"`, is not known to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPlan {
    pub style: PromptStyle,
    /// Set when `style` is [`PromptStyle::NativeFim`]: a template style or prefix-only.
    pub fallback: Option<PromptStyle>,
}

impl PromptPlan {
    /// The plan for `style`; a native style falls back to the configured template, else the family's template
    /// for `model_name`, else prefix-only.
    pub fn new(
        style: PromptStyle,
        configured: Option<&PromptStyle>,
        model_name: &str,
    ) -> PromptPlan {
        let fallback = (style == PromptStyle::NativeFim)
            .then(|| PromptStyle::template_for(configured, model_name));
        PromptPlan { style, fallback }
    }

    /// Puts the fallback prompt (rendered from the same trimmed prefix and suffix, with the same context from
    /// other files) into the prepared request,
    /// and its stop strings into the filter, so a fallback answer is cut where a template answer would be.
    pub fn attach_fallback(&self, prepared: &mut super::PreparedCompletion) {
        let Some(fallback) = &self.fallback else {
            return;
        };
        // The native prompt's prefix may carry context from other files (commented path headers): keep it.
        let (prefix, suffix) = match &prepared.request.prompt {
            Prompt::FillInTheMiddle { prefix, suffix, .. } => (prefix.as_str(), suffix.as_str()),
            _ => (
                prepared.context.prefix.as_str(),
                prepared.context.suffix.as_str(),
            ),
        };
        let fallback = fim_fallback(fallback, prefix, suffix);
        for stop in &fallback.stop {
            if !prepared.filter_context.stop.contains(stop) {
                prepared.filter_context.stop.push(stop.clone());
            }
        }
        prepared
            .request
            .completion
            .get_or_insert_with(CompletionHints::default)
            .fim_fallback = Some(fallback);
    }
}

/// The raw prompt `fallback` (a [`PromptStyle::template_for`] style) builds for `prefix`/`suffix`.
pub fn fim_fallback(fallback: &PromptStyle, prefix: &str, suffix: &str) -> FimFallback {
    let built = fallback.build(prefix, suffix, "");
    let prompt = match built.prompt {
        Prompt::Raw(text) => text,
        // template_for only yields raw-prompt styles; anything else degrades to the prefix alone.
        _ => prefix.to_string(),
    };
    FimFallback {
        prompt,
        stop: built.stop,
        description: fallback.describe(),
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
            completion: Some(CompletionHints { fim_fallback: None }),
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
            (
                FimTemplate::StarCoder2,
                "<fim_prefix>def add(a, b):\n    <fim_suffix>\n\nprint(add(1, 2))\n<fim_middle>",
            ),
            (
                FimTemplate::CodeQwen,
                "<fim_prefix>def add(a, b):\n    <fim_suffix>\n\nprint(add(1, 2))\n<fim_middle>",
            ),
            (
                FimTemplate::GraniteCode,
                "<fim_prefix>def add(a, b):\n    <fim_suffix>\n\nprint(add(1, 2))\n<fim_middle>",
            ),
            (
                FimTemplate::SeedCoder,
                "<[fim-suffix]>\n\nprint(add(1, 2))\n<[fim-prefix]>def add(a, b):\n    <[fim-middle]>",
            ),
        ];
        assert_eq!(
            expected.len(),
            FimTemplate::ALL.len(),
            "every template has a golden string"
        );
        for (template, rendered) in expected {
            assert_eq!(template.render(PREFIX, SUFFIX), rendered, "{template:?}");
        }
    }

    #[test]
    fn prefix_first_templates_can_start_the_middle_with_the_prefix_tail() {
        let head_len = "def add(a, b):\n".len();
        for template in FimTemplate::ALL {
            let split = template.render_split(PREFIX, SUFFIX, Some(head_len));
            if template.can_start_middle() {
                let expected = template.render("def add(a, b):\n", SUFFIX) + "    ";
                assert_eq!(split, expected, "{template:?}");
            } else {
                assert_eq!(split, template.render(PREFIX, SUFFIX), "{template:?}");
            }
            // No split, or one that is not a char boundary: the plain layout.
            assert_eq!(
                template.render_split(PREFIX, SUFFIX, None),
                template.render(PREFIX, SUFFIX)
            );
        }
        assert_eq!(
            FimTemplate::QwenCoder.render_split("é\nx", "s", Some(1)),
            FimTemplate::QwenCoder.render("é\nx", "s")
        );
    }

    #[test]
    fn typing_only_appends_to_a_prefix_first_prompt() {
        // What a prompt cache sees while the user types on the last line of a long file: each prompt extends
        // the previous one, so the suffix is never evaluated again.
        let file: String = (0..300)
            .map(|i| format!("    item_{i} = lookup(table, {i})\n"))
            .collect();
        let suffix = "\n    return items\n\n\ndef main():\n    run()\n";
        for style in [
            PromptStyle::Template(FimTemplate::QwenCoder),
            PromptStyle::Template(FimTemplate::StarCoder2),
            PromptStyle::Template(FimTemplate::DeepSeekCoder),
        ] {
            let mut prefix = file.clone() + "    ";
            let mut previous = style.build(&prefix, suffix, "python").prompt;
            for ch in "total = sum(items)".chars() {
                prefix.push(ch);
                let prompt = style.build(&prefix, suffix, "python").prompt;
                let (Prompt::Raw(before), Prompt::Raw(now)) = (&previous, &prompt) else {
                    panic!("template styles build raw prompts");
                };
                assert!(now.starts_with(before.as_str()), "{style:?}: {now:?}");
                assert!(now.ends_with(&prefix[prefix.rfind('\n').unwrap_or(0)..]));
                previous = prompt;
            }
        }
        // The native prompt carries the same split for providers that lay the prompt out themselves.
        let prefix = file + "    x = ";
        let Prompt::FillInTheMiddle { middle_start, .. } = PromptStyle::NativeFim
            .build(&prefix, suffix, "python")
            .prompt
        else {
            panic!("native prompt");
        };
        assert_eq!(middle_start, super::super::anchor::middle_start(&prefix));
        assert!(middle_start.is_some_and(|at| prefix.as_bytes()[at - 1] == b'\n'));
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
            (FimTemplate::StarCoder2, "<|endoftext|>"),
            (FimTemplate::CodeQwen, "<|endoftext|>"),
            (FimTemplate::GraniteCode, "<|endoftext|>"),
            (FimTemplate::SeedCoder, "<[end~of~sentence]>"),
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
            ("bigcode/StarCoder2-3B", Some(FimTemplate::StarCoder2)),
            ("codellama:7b-code", Some(FimTemplate::CodeLlama)),
            (
                "deepseek-ai/DeepSeek-Coder-6.7B-base",
                Some(FimTemplate::DeepSeekCoder),
            ),
            ("codestral-latest", Some(FimTemplate::Codestral)),
            ("google/codegemma-2b", Some(FimTemplate::CodeGemma)),
            (
                "Qwen/Qwen3-Coder-30B-A3B-Instruct",
                Some(FimTemplate::QwenCoder),
            ),
            ("qwen3-coder:30b", Some(FimTemplate::QwenCoder)),
            ("qwen3_coder_480b", Some(FimTemplate::QwenCoder)),
            ("Qwen/CodeQwen1.5-7B", Some(FimTemplate::CodeQwen)),
            ("codeqwen:7b-code-v1.5", Some(FimTemplate::CodeQwen)),
            (
                "ibm-granite/granite-3b-code-base-2k",
                Some(FimTemplate::GraniteCode),
            ),
            ("granite-code:8b", Some(FimTemplate::GraniteCode)),
            (
                "ByteDance-Seed/Seed-Coder-8B-Base",
                Some(FimTemplate::SeedCoder),
            ),
            ("stabilityai/stable-code-3b", Some(FimTemplate::StarCoder)),
            (
                "stablecode-completion-alpha-3b",
                Some(FimTemplate::StarCoder),
            ),
            ("bigcode/starcoderbase-1b", Some(FimTemplate::StarCoder)),
            ("granite-3.1-8b-instruct", None),
            ("qwen2.5-7b-instruct", None),
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
                suffix: "b".into(),
                middle_start: None,
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

    #[test]
    fn multi_file_tokens_per_family() {
        assert_eq!(
            FimTemplate::QwenCoder.file_separator(),
            Some("<|file_sep|>")
        );
        assert_eq!(
            FimTemplate::QwenCoder.repo_name_token(),
            Some("<|repo_name|>")
        );
        assert_eq!(FimTemplate::StarCoder2.file_separator(), Some("<file_sep>"));
        assert_eq!(
            FimTemplate::StarCoder2.repo_name_token(),
            Some("<repo_name>")
        );
        assert_eq!(FimTemplate::CodeQwen.file_separator(), Some("<file_sep>"));
        assert_eq!(FimTemplate::CodeQwen.repo_name_token(), Some("<reponame>"));
        for template in [
            FimTemplate::CodeLlama,
            FimTemplate::DeepSeekCoder,
            FimTemplate::Codestral,
        ] {
            assert_eq!(template.file_separator(), None, "{template:?}");
            assert_eq!(template.repo_name_token(), None, "{template:?}");
        }
        // A family's separators are among its stop tokens, so a model that starts another file is cut there.
        for template in FimTemplate::ALL {
            if let Some(separator) = template.file_separator() {
                assert!(template.stop_tokens().contains(&separator), "{template:?}");
            }
        }
    }

    #[test]
    fn custom_templates_render_and_broken_ones_are_refused() {
        let template =
            CustomFimTemplate::parse("{{ctx}}<s>{suffix}<p>{prefix}<m>", vec!["<e>".to_string()])
                .unwrap();
        assert_eq!(template.render("a {b}", "c"), "{ctx}<s>c<p>a {b}<m>");
        assert_eq!(template.stop_tokens(), ["<e>"]);
        let built = PromptStyle::Custom(Arc::new(template)).build("P", "S", "rust");
        assert_eq!(built.prompt, Prompt::Raw("{ctx}<s>S<p>P<m>".into()));
        assert_eq!(built.stop, ["<e>"]);

        let refused = [
            ("<s>{suffix}", TemplateError::MissingPrefix),
            (
                "{prefix}{middle}",
                TemplateError::UnknownPlaceholder("middle".into()),
            ),
            ("{prefix", TemplateError::Unbalanced('{', 0)),
            ("{prefix}}", TemplateError::Unbalanced('}', 8)),
            ("{pre{fix}", TemplateError::Unbalanced('{', 0)),
        ];
        for (text, expected) in refused {
            assert_eq!(
                CustomFimTemplate::parse(text, vec![]),
                Err(expected),
                "{text}"
            );
        }
        assert!(CustomFimTemplate::looks_like_template("<a>{prefix}"));
        assert!(!CustomFimTemplate::looks_like_template("qwen"));
    }

    #[test]
    fn a_native_plan_falls_back_to_the_configured_or_family_template() {
        let plan = PromptPlan::new(PromptStyle::NativeFim, None, "qwen2.5-coder:1.5b");
        assert_eq!(
            plan.fallback,
            Some(PromptStyle::Template(FimTemplate::QwenCoder))
        );
        let plan = PromptPlan::new(PromptStyle::NativeFim, None, "SmolLM2");
        assert_eq!(plan.fallback, Some(PromptStyle::PrefixOnly));
        let configured = PromptStyle::Template(FimTemplate::CodeLlama);
        let plan = PromptPlan::new(PromptStyle::NativeFim, Some(&configured), "qwen2.5-coder");
        assert_eq!(plan.fallback, Some(configured));
        let plan = PromptPlan::new(PromptStyle::PrefixOnly, None, "qwen2.5-coder");
        assert_eq!(plan.fallback, None);

        let fallback = fim_fallback(&PromptStyle::Template(FimTemplate::SeedCoder), "P", "S");
        assert_eq!(
            fallback.prompt,
            "<[fim-suffix]>S<[fim-prefix]>P<[fim-middle]>"
        );
        assert!(fallback.stop.contains(&"<[fim-middle]>".to_string()));
        assert!(fallback.description.contains("seed-coder"));
        let fallback = fim_fallback(&PromptStyle::PrefixOnly, "P", "S");
        assert_eq!(fallback.prompt, "P");
        assert!(fallback.stop.is_empty());
    }
}
