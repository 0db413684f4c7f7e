//! Context from other files: picks snippets (recent edits, definitions, recent files) within a token budget
//! and renders them in the model's multi-file format, as llama.cpp extra chunks, or as commented headers.

use std::collections::HashMap;
use std::ops::Range;

use lapce_ai_transport::protocol::CompletionRequest;

use super::context::{approximate_tokens, TrimmedContext};
use super::template::FimTemplate;
use super::workspace::{is_identifier_char, StoredDocument, WorkspaceStore};
use crate::provider::ContextChunk;

/// Lines kept on each side of a recently edited place.
const EDIT_WINDOW_LINES: usize = 8;
/// Longest definition snippet, in lines.
const DEFINITION_MAX_LINES: usize = 40;
/// Longest head of a recently used file, in lines.
const OPEN_FILE_MAX_LINES: usize = 60;
/// Lines of prefix (before the cursor) and suffix searched for identifiers.
const NEAR_CURSOR_PREFIX_LINES: usize = 12;
const NEAR_CURSOR_SUFFIX_LINES: usize = 4;
/// Identifiers near the cursor looked up as definitions.
const MAX_IDENTIFIERS: usize = 32;
/// Definitions used per identifier.
const MAX_DEFINITIONS_PER_NAME: usize = 2;
/// Tokens charged for a snippet's path header and separators besides the path itself.
const HEADER_TOKENS: usize = 4;
/// A snippet cut to fit the budget keeps at least this many lines, or is skipped.
const MIN_SNIPPET_LINES: usize = 2;

/// Why a snippet was chosen (also its priority: earlier variants first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnippetKind {
    /// Around a place the user edited recently (another file, or far from the cursor in this one).
    RecentEdit,
    /// The definition of an identifier near the cursor, found in another open file.
    Definition,
    /// The head of another open file, most recently used first.
    OpenFile,
}

/// A piece of another file (or a far part of this one) for the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelatedSnippet {
    /// The document's path as synced.
    pub path: String,
    /// 0-based first line.
    pub first_line: usize,
    /// Whole lines, ending with one line break.
    pub text: String,
    pub kind: SnippetKind,
}

/// Where snippets go in the provider request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnippetPlacement {
    /// Into the prompt: the model's multi-file format, else commented path headers before the prefix.
    Prompt,
    /// As [`crate::provider::GenerationRequest::extra_context`] chunks (llama.cpp `/infill` `input_extra`).
    ExtraContext,
}

/// Picks the most relevant snippets for `request` within `extra_tokens`, most relevant first: places edited
/// recently, then definitions of identifiers near the cursor found in other open files, then other open files
/// by recency. `cursor` is the request's trimmed context: the same document's lines it covers are never
/// repeated. The budget is separate from the cursor context's, so the cursor's own prefix is never cut for it.
pub fn select_snippets(
    store: &WorkspaceStore,
    request: &CompletionRequest,
    cursor: &TrimmedContext,
    extra_tokens: usize,
) -> Vec<RelatedSnippet> {
    let mut picker = Picker {
        remaining: extra_tokens,
        chosen: Vec::new(),
        taken: HashMap::new(),
    };
    if extra_tokens == 0 || store.is_empty() {
        return picker.chosen;
    }
    let current_path = request.file_path.as_str();
    // The current document's lines the cursor context already shows. Where the cursor is, the latest edit in
    // this document says (the user types at the cursor); without one, the whole document is left out.
    let current = store.document(current_path);
    let cursor_line = current.and_then(|doc| {
        store
            .recent_edits()
            .find(|place| &*place.path == current_path)
            .map(|place| doc.line_of(place.offset))
    });
    if let (Some(doc), Some(line)) = (current, cursor_line) {
        let shown = line.saturating_sub(cursor.prefix.matches('\n').count())
            ..line + cursor.suffix.matches('\n').count() + 1;
        picker.taken.insert(doc.path.to_string(), vec![shown]);
    } else if current.is_some() {
        picker.taken.insert(
            current_path.to_owned(),
            std::iter::once(0..usize::MAX).collect(),
        );
    }

    // (a) Recently edited places.
    for place in store.recent_edits() {
        let Some(doc) = store.document(&place.path) else {
            continue;
        };
        let line = doc.line_of(place.offset);
        let range = line.saturating_sub(EDIT_WINDOW_LINES)..line + EDIT_WINDOW_LINES + 1;
        picker.offer(doc, range, SnippetKind::RecentEdit);
        if picker.exhausted() {
            return picker.chosen;
        }
    }

    // Other documents, most recently used first.
    let mut others: Vec<&StoredDocument> = store
        .documents()
        .filter(|doc| &*doc.path != current_path)
        .collect();
    others.sort_by_key(|b| std::cmp::Reverse(b.touched));

    // (b) Definitions of identifiers near the cursor, in other files.
    for name in identifiers_near_cursor(&cursor.prefix, &cursor.suffix) {
        for doc in &others {
            for &line in doc
                .definitions()
                .lines(name)
                .iter()
                .take(MAX_DEFINITIONS_PER_NAME)
            {
                picker.offer(doc, definition_range(doc, line), SnippetKind::Definition);
                if picker.exhausted() {
                    return picker.chosen;
                }
            }
        }
    }

    // (c) Other open files by recency: their first lines (up to what was already taken from them).
    for doc in &others {
        let end = picker
            .taken
            .get(&*doc.path)
            .and_then(|ranges| ranges.iter().map(|r| r.start).min())
            .unwrap_or(usize::MAX)
            .min(OPEN_FILE_MAX_LINES);
        picker.offer(doc, 0..end, SnippetKind::OpenFile);
        if picker.exhausted() {
            break;
        }
    }
    picker.chosen
}

/// Accumulates snippets within the budget, never two overlapping line ranges of one document.
struct Picker {
    remaining: usize,
    chosen: Vec<RelatedSnippet>,
    taken: HashMap<String, Vec<Range<usize>>>,
}

impl Picker {
    fn exhausted(&self) -> bool {
        self.remaining < HEADER_TOKENS * 4
    }

    fn offer(&mut self, doc: &StoredDocument, range: Range<usize>, kind: SnippetKind) {
        let range = range.start..range.end.min(doc.line_count());
        if range.is_empty() {
            return;
        }
        if let Some(ranges) = self.taken.get(&*doc.path) {
            if ranges
                .iter()
                .any(|r| r.start < range.end && range.start < r.end)
            {
                return;
            }
        }
        let header = approximate_tokens(&doc.path) + HEADER_TOKENS;
        if header >= self.remaining {
            return;
        }
        let allowance = self.remaining - header;
        // Whole lines from the start of the range while they fit (trailing blank lines dropped).
        let mut end = range.start;
        let mut used = 0;
        while end < range.end {
            let line_tokens = approximate_tokens(doc.lines(end, end + 1));
            if used + line_tokens > allowance {
                break;
            }
            used += line_tokens;
            end += 1;
        }
        if end < range.end && end - range.start < MIN_SNIPPET_LINES {
            return;
        }
        while end > range.start && doc.line(end - 1).trim().is_empty() {
            end -= 1;
        }
        if end == range.start {
            return;
        }
        let text = doc.lines(range.start, end);
        if text.trim().is_empty() {
            return;
        }
        let text = format!("{}\n", text.trim_end_matches(['\n', '\r']));
        self.remaining -= header + approximate_tokens(&text).min(allowance);
        self.taken
            .entry(doc.path.to_string())
            .or_default()
            .push(range.start..end);
        self.chosen.push(RelatedSnippet {
            path: doc.path.to_string(),
            first_line: range.start,
            text,
            kind,
        });
    }
}

/// The lines of a definition starting at `line`: following lines while they are blank or indented deeper,
/// plus a closing line (`}`, `end`, ...) at the definition's own indentation.
fn definition_range(doc: &StoredDocument, line: usize) -> Range<usize> {
    let indent_of = |text: &str| text.len() - text.trim_start().len();
    let head = doc.line(line);
    let indent = indent_of(head);
    let limit = (line + DEFINITION_MAX_LINES).min(doc.line_count());
    let mut end = line + 1;
    while end < limit {
        let text = doc.line(end);
        if text.trim().is_empty() || indent_of(text) > indent {
            end += 1;
            continue;
        }
        let trimmed = text.trim_start();
        if trimmed.starts_with(['}', ')', ']']) || trimmed.starts_with("end") {
            end += 1;
        }
        break;
    }
    line..end
}

/// Words too common to be worth a definition lookup.
const COMMON_WORDS: &[&str] = &[
    "if", "else", "for", "while", "in", "return", "let", "mut", "fn", "def", "class", "self",
    "Self", "this", "true", "false", "True", "False", "None", "null", "nil", "new", "pub", "use",
    "import", "from", "const", "var", "func", "function", "struct", "enum", "impl", "type",
    "match", "and", "or", "not", "as", "is", "int", "str", "string", "String", "bool", "u8", "u32",
    "u64", "i32", "i64", "usize", "f32", "f64", "void", "async", "await", "static", "Some", "Ok",
    "Err", "Vec",
];

/// Identifiers near the cursor, nearest first: the prefix's last lines read backwards, then the suffix's
/// first lines.
pub fn identifiers_near_cursor<'a>(prefix: &'a str, suffix: &'a str) -> Vec<&'a str> {
    let prefix_start = prefix
        .rmatch_indices('\n')
        .nth(NEAR_CURSOR_PREFIX_LINES - 1)
        .map_or(0, |(i, _)| i + 1);
    let suffix_end = suffix
        .match_indices('\n')
        .nth(NEAR_CURSOR_SUFFIX_LINES - 1)
        .map_or(suffix.len(), |(i, _)| i);
    let mut names: Vec<&str> = Vec::new();
    let mut add = |name: &'a str| {
        let useful = name.len() >= 2
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && !COMMON_WORDS.contains(&name);
        if useful && !names.contains(&name) {
            names.push(name);
        }
    };
    let mut before: Vec<&str> = identifiers(&prefix[prefix_start..]).collect();
    before.reverse();
    before.into_iter().for_each(&mut add);
    identifiers(&suffix[..suffix_end]).for_each(&mut add);
    names.truncate(MAX_IDENTIFIERS);
    names
}

fn identifiers(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !is_identifier_char(c))
        .filter(|word| !word.is_empty())
}

/// Special tokens of a model family's repository-level format, where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoTokens {
    pub repo_name: &'static str,
    pub file_separator: &'static str,
}

/// The multi-file tokens of `template`'s family (Qwen2.5-Coder and StarCoder2 were trained with them).
/// The tokens themselves come from [`FimTemplate::repo_name_token`] and [`FimTemplate::file_separator`]; only these
/// two layouts are rendered here (others get commented path headers).
pub fn repo_tokens(template: FimTemplate) -> Option<RepoTokens> {
    if !matches!(template, FimTemplate::QwenCoder | FimTemplate::StarCoder2) {
        return None;
    }
    Some(RepoTokens {
        repo_name: template.repo_name_token()?,
        file_separator: template.file_separator()?,
    })
}

/// Snippets ready to render: paths relative to the files' common directory, least relevant first (so the
/// most relevant text sits closest to the cursor's file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedContext {
    /// The last component of the common directory (`workspace` when there is none).
    pub repo_name: String,
    /// The current file's path relative to the common directory.
    pub current_path: String,
    /// (relative path, text), least relevant first.
    pub files: Vec<(String, String)>,
}

impl RenderedContext {
    pub fn new(snippets: &[RelatedSnippet], current_path: &str) -> Self {
        let directory_of = |path: &str| -> Vec<String> {
            let mut parts: Vec<String> = path.split('/').map(str::to_owned).collect();
            parts.pop();
            parts
        };
        let mut root = directory_of(current_path);
        for snippet in snippets {
            let dir = directory_of(&snippet.path);
            let common = root.iter().zip(&dir).take_while(|(a, b)| a == b).count();
            root.truncate(common);
        }
        let relative = |path: &str| -> String {
            let mut parts = path.split('/');
            for _ in 0..root.len() {
                parts.next();
            }
            parts.collect::<Vec<_>>().join("/")
        };
        let repo_name = root
            .iter()
            .rev()
            .find(|part| !part.is_empty())
            .cloned()
            .unwrap_or_else(|| "workspace".to_owned());
        let current = relative(current_path);
        Self {
            repo_name,
            current_path: if current.is_empty() {
                "untitled".to_owned()
            } else {
                current
            },
            files: snippets
                .iter()
                .rev()
                .map(|s| (relative(&s.path), s.text.clone()))
                .collect(),
        }
    }

    /// The repository-level prompt head in `tokens`' format, ending where the current file's FIM prompt starts.
    /// Qwen2.5-Coder: `<|repo_name|>R\n<|file_sep|>P\nT...<|file_sep|>CURRENT\n`; StarCoder2 (path after
    /// `<fim_prefix>`, see [`RenderedContext::starcoder_prefix`]): `<repo_name>R<file_sep>P\nT...<file_sep>`.
    pub fn repo_head(&self, template: FimTemplate, tokens: RepoTokens) -> String {
        let RepoTokens {
            repo_name,
            file_separator,
        } = tokens;
        let mut head = String::new();
        head.push_str(repo_name);
        head.push_str(&self.repo_name);
        if template == FimTemplate::QwenCoder {
            head.push('\n');
        }
        for (path, text) in &self.files {
            head.push_str(file_separator);
            head.push_str(path);
            head.push('\n');
            head.push_str(text);
        }
        head.push_str(file_separator);
        if template == FimTemplate::QwenCoder {
            head.push_str(&self.current_path);
            head.push('\n');
        }
        head
    }

    /// StarCoder2 puts the current file's path at the start of its prefix.
    pub fn starcoder_prefix(&self, prefix: &str) -> String {
        format!("{}\n{prefix}", self.current_path)
    }

    /// Every snippet as commented lines in the current file's language, to put before its prefix.
    pub fn comment_head(&self, language_id: &str) -> String {
        let mut head = String::new();
        for (path, text) in &self.files {
            head.push_str(&comment_line(language_id, &format!("Path: {path}")));
            for line in text.lines() {
                head.push_str(&comment_line(language_id, line));
            }
        }
        head
    }

    /// The snippets as llama.cpp `input_extra` chunks.
    pub fn chunks(&self) -> Vec<ContextChunk> {
        self.files
            .iter()
            .map(|(path, text)| ContextChunk {
                path: path.clone(),
                text: text.clone(),
            })
            .collect()
    }
}

/// `text` as one comment line (with its line break) in `language_id`'s syntax; `//` when unknown.
pub fn comment_line(language_id: &str, text: &str) -> String {
    let (open, close) = match language_id.to_ascii_lowercase().as_str() {
        "python" | "ruby" | "shellscript" | "shell" | "bash" | "sh" | "zsh" | "fish" | "perl"
        | "r" | "yaml" | "toml" | "dockerfile" | "makefile" | "elixir" | "nim" | "julia"
        | "powershell" | "coffeescript" | "cmake" | "gdscript" | "nix" | "tcl" | "crystal" => {
            ("#", "")
        }
        "lua" | "sql" | "haskell" | "elm" | "ada" | "purescript" | "vhdl" => ("--", ""),
        "clojure" | "lisp" | "commonlisp" | "scheme" | "racket" | "asm" | "ini" => (";", ""),
        "erlang" | "latex" | "tex" | "matlab" | "prolog" => ("%", ""),
        "vb" | "vba" => ("'", ""),
        "html" | "xml" | "markdown" | "svg" | "vue" | "svelte" => ("<!--", " -->"),
        "css" => ("/*", " */"),
        _ => ("//", ""),
    };
    if text.is_empty() && close.is_empty() {
        format!("{open}\n")
    } else {
        format!("{open} {text}{close}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::workspace::WorkspaceLimits;
    use lapce_ai_transport::protocol::{ByteEdit, DocumentContent, DocumentSync};

    fn open(store: &mut WorkspaceStore, path: &str, text: &str) {
        store
            .apply(&DocumentSync {
                path: path.into(),
                language_id: "rust".into(),
                version: 1,
                content: DocumentContent::Full(text.as_bytes().to_vec()),
            })
            .expect("open");
    }

    /// Inserts `text` at byte `at` of a version-1 document (making it version 2).
    fn insert(store: &mut WorkspaceStore, path: &str, at: usize, text: &str) {
        let version = store.document(path).expect("open").version;
        store
            .apply(&DocumentSync {
                path: path.into(),
                language_id: "rust".into(),
                version: version + 1,
                content: DocumentContent::Edits {
                    base_version: version,
                    edits: vec![ByteEdit {
                        start: at as u64,
                        end: at as u64,
                        text: text.as_bytes().to_vec(),
                    }],
                },
            })
            .expect("edit");
    }

    fn request(path: &str, prefix: &str, suffix: &str) -> (CompletionRequest, TrimmedContext) {
        let request = CompletionRequest {
            file_path: path.into(),
            language_id: "rust".into(),
            prefix: prefix.into(),
            suffix: suffix.into(),
            ..CompletionRequest::default()
        };
        let trimmed = TrimmedContext {
            prefix: prefix.into(),
            suffix: suffix.into(),
            prefix_truncated: false,
            suffix_truncated: false,
        };
        (request, trimmed)
    }

    fn numbered(name: &str, lines: usize) -> String {
        (0..lines)
            .map(|i| format!("// {name} line {i}\n"))
            .collect()
    }

    #[test]
    fn edits_come_first_then_definitions_then_recent_files() {
        let mut store = WorkspaceStore::new(WorkspaceLimits::default());
        open(&mut store, "/p/src/notes.rs", &numbered("notes", 40));
        open(
            &mut store,
            "/p/src/math.rs",
            "use std::fmt;\n\npub fn scale_total(total: u32) -> u32 {\n    total * 3\n}\n\nfn other() {}\n",
        );
        open(&mut store, "/p/src/edited.rs", &numbered("edited", 60));
        // The user edited line 30 of edited.rs.
        let at = store.document("/p/src/edited.rs").unwrap().line_starts()[30];
        insert(&mut store, "/p/src/edited.rs", at, "let changed = 1;\n");
        open(
            &mut store,
            "/p/src/main.rs",
            "fn main() {\n    let x = \n}\n",
        );
        let (request, cursor) = request(
            "/p/src/main.rs",
            "fn main() {\n    let x = scale_total(",
            ");\n}\n",
        );
        let snippets = select_snippets(&store, &request, &cursor, 2000);
        let kinds: Vec<(SnippetKind, &str)> =
            snippets.iter().map(|s| (s.kind, s.path.as_str())).collect();
        assert_eq!(
            kinds,
            vec![
                (SnippetKind::RecentEdit, "/p/src/edited.rs"),
                (SnippetKind::Definition, "/p/src/math.rs"),
                (SnippetKind::OpenFile, "/p/src/edited.rs"),
                (SnippetKind::OpenFile, "/p/src/math.rs"),
                (SnippetKind::OpenFile, "/p/src/notes.rs"),
            ],
            "{snippets:#?}"
        );
        // The edit window: 8 lines either side of the edited line (line 31 after the insert; its own line 30).
        assert_eq!(snippets[0].first_line, 23);
        assert!(snippets[0].text.contains("let changed = 1;"));
        assert_eq!(
            snippets[1].text,
            "pub fn scale_total(total: u32) -> u32 {\n    total * 3\n}\n"
        );
        // The recent-file head of edited.rs stops where the edit window starts.
        assert_eq!(snippets[2].first_line, 0);
        assert_eq!(snippets[2].text.lines().count(), 23);
        // The head of math.rs stops before its definition (already taken), without trailing blank lines.
        assert_eq!(snippets[3].text, "use std::fmt;\n");
    }

    #[test]
    fn budget_is_respected_and_zero_disables() {
        let mut store = WorkspaceStore::new(WorkspaceLimits::default());
        for i in 0..10 {
            open(&mut store, &format!("/p/f{i}.rs"), &numbered("file", 500));
        }
        let (request, cursor) = request("/p/main.rs", "fn main() {\n    ", "\n}\n");
        assert!(select_snippets(&store, &request, &cursor, 0).is_empty());
        for budget in [50, 300, 1024, 4000] {
            let snippets = select_snippets(&store, &request, &cursor, budget);
            let used: usize = snippets
                .iter()
                .map(|s| approximate_tokens(&s.text) + approximate_tokens(&s.path) + HEADER_TOKENS)
                .sum();
            assert!(used <= budget, "budget {budget} used {used}");
            assert!(!snippets.is_empty(), "budget {budget}");
            assert!(
                used * 10 >= budget * 6,
                "budget {budget} barely used: {used}"
            );
        }
    }

    #[test]
    fn the_same_file_gives_only_far_away_edits_and_never_the_cursor_lines() {
        let mut store = WorkspaceStore::new(WorkspaceLimits::default());
        let text = numbered("main", 300);
        open(&mut store, "/p/main.rs", &text);
        let far = store.document("/p/main.rs").unwrap().line_starts()[20];
        insert(&mut store, "/p/main.rs", far, "fn far_away() {}\n");
        let near = store.document("/p/main.rs").unwrap().line_starts()[250];
        insert(&mut store, "/p/main.rs", near, "x");
        // The cursor (latest edit) is on line 250; the request shows 30 lines before and 5 after it.
        let prefix = numbered("p", 30);
        let (request, cursor) = request("/p/main.rs", &prefix, "\n\n\n\n\n");
        let snippets = select_snippets(&store, &request, &cursor, 4000);
        assert_eq!(snippets.len(), 1, "{snippets:#?}");
        assert_eq!(snippets[0].kind, SnippetKind::RecentEdit);
        assert!(snippets[0].text.contains("fn far_away() {}"));
        // Without any edit in the current file, nothing of it is used.
        let mut store = WorkspaceStore::new(WorkspaceLimits::default());
        open(&mut store, "/p/main.rs", &text);
        assert!(select_snippets(&store, &request, &cursor, 4000).is_empty());
    }

    #[test]
    fn identifiers_are_nearest_first_without_keywords() {
        let names =
            identifiers_near_cursor("let a = 1;\nlet total = compute(items, ", "factor);\n");
        assert_eq!(names, vec!["items", "compute", "total", "factor"]);
    }

    fn sample() -> RenderedContext {
        let snippets = vec![
            RelatedSnippet {
                path: "/home/u/proj/src/util.py".into(),
                first_line: 0,
                text: "def helper():\n    return 1\n".into(),
                kind: SnippetKind::Definition,
            },
            RelatedSnippet {
                path: "/home/u/proj/lib/io.py".into(),
                first_line: 0,
                text: "import os\n".into(),
                kind: SnippetKind::OpenFile,
            },
        ];
        RenderedContext::new(&snippets, "/home/u/proj/src/main.py")
    }

    #[test]
    fn qwen_and_starcoder2_get_their_repository_format() {
        let context = sample();
        assert_eq!(context.repo_name, "proj");
        let qwen = repo_tokens(FimTemplate::QwenCoder).unwrap();
        let head = context.repo_head(FimTemplate::QwenCoder, qwen);
        assert_eq!(
            format!("{head}{}", FimTemplate::QwenCoder.render("x = ", "\n")),
            "<|repo_name|>proj\n<|file_sep|>lib/io.py\nimport os\n<|file_sep|>src/util.py\n\
def helper():\n    return 1\n<|file_sep|>src/main.py\n<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>"
        );
        let star = repo_tokens(FimTemplate::StarCoder2).unwrap();
        let head = context.repo_head(FimTemplate::StarCoder2, star);
        let prefix = context.starcoder_prefix("x = ");
        assert_eq!(
            format!("{head}{}", FimTemplate::StarCoder2.render(&prefix, "\n")),
            "<repo_name>proj<file_sep>lib/io.py\nimport os\n<file_sep>src/util.py\ndef helper():\n    \
return 1\n<file_sep><fim_prefix>src/main.py\nx = <fim_suffix>\n<fim_middle>"
        );
        for template in [
            FimTemplate::StarCoder,
            FimTemplate::CodeLlama,
            FimTemplate::DeepSeekCoder,
            FimTemplate::Codestral,
            FimTemplate::CodeGemma,
        ] {
            assert_eq!(repo_tokens(template), None);
        }
    }

    #[test]
    fn comment_headers_use_the_languages_comment_syntax() {
        let context = sample();
        assert_eq!(
            context.comment_head("python"),
            "# Path: lib/io.py\n# import os\n# Path: src/util.py\n# def helper():\n#     return 1\n"
        );
        assert_eq!(
            context.comment_head("rust"),
            "// Path: lib/io.py\n// import os\n// Path: src/util.py\n// def helper():\n//     return 1\n"
        );
        assert_eq!(comment_line("lua", "x"), "-- x\n");
        assert_eq!(comment_line("html", "x"), "<!-- x -->\n");
        assert_eq!(comment_line("python", ""), "#\n");
        assert_eq!(
            context.chunks(),
            vec![
                ContextChunk {
                    path: "lib/io.py".into(),
                    text: "import os\n".into()
                },
                ContextChunk {
                    path: "src/util.py".into(),
                    text: "def helper():\n    return 1\n".into()
                },
            ]
        );
    }
}
