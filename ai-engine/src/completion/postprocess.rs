//! Streaming post-processing of raw model output into the completion shown to the user.
//!
//! [`CompletionFilter`] takes the provider's text deltas and emits only text that no later rule can cut, so a
//! client never has to retract ghost text, and tells the caller when to stop generation. The rules, in the
//! order they apply along the text:
//!
//! 1. **Line endings**: `\r\n` in the output becomes `\n` for analysis; when the document (prefix or suffix)
//!    uses `\r\n`, emitted text uses `\r\n` again.
//! 2. **Stop sequences** ([`FilterContext::stop`]) end the completion, also when split across deltas (a tail
//!    that may start a stop sequence is held back).
//! 3. **Chat answers** ([`FilterContext::chat_answer`]): an opening Markdown fence line is dropped, a closing
//!    fence at a line start ends the answer, and leading lines that echo the code before the cursor (whole
//!    prefix lines, then the text of the cursor line before the cursor) are removed.
//! 4. **Brackets**: a closer that closes a bracket opened inside the completion is fine. A closer with no
//!    opener in the completion stops the completion before it, unless it matches the innermost bracket still
//!    open in the prefix *and* the suffix does not start (after whitespace) with that same closer: then the
//!    completion is closing a bracket the user left open, and it is kept. Strings, and `//` or `#` line
//!    comments (by language), are skipped.
//! 5. **Repeating what follows the cursor**: on the first line, when the cursor has text after it on its line,
//!    a first line ending with that text has it removed and ends the completion. Any generated line equal
//!    (ignoring surrounding whitespace) to the next non-blank line below the cursor ends the completion before
//!    that line (for the first line only when the cursor line is blank before the cursor). A next line without
//!    letters or digits (`}`, `});`) must also match in indentation, since closers of nested blocks look alike.
//!    The same holds for the [`LATER_SUFFIX_LINES`] non-blank lines after it that have at least
//!    [`MIN_LATER_SUFFIX_LINE_CHARS`] characters and a letter or digit.
//! 6. **Repeated lines**: a non-blank line equal (ignoring trailing whitespace) to the previous non-blank line,
//!    or seen twice before, ends the completion before it. The "three times" rule only applies to lines with
//!    at least [`MIN_REPEATED_LINE_CHARS`] non-whitespace characters, since `}` or `break;` legitimately recur.
//! 7. **Single-line mode** stops at the first newline once there is non-whitespace text.
//!    [`CompletionMode::Auto`] is resolved by [`resolve_line_mode`]. With [`FilterContext::max_lines`], the
//!    completion stops at the end of that many lines.
//! 8. **Indentation and scope**: when the cursor line is blank before the cursor, blank lines before the first
//!    code line are dropped, and the first line's own indentation is kept only where it gives the indentation
//!    the line above calls for (a model that re-emits the cursor line's indentation, or adds a space after it,
//!    does not indent the line twice). Every later line's indentation is rewritten in the document's style
//!    ([`IndentStyle`]: tabs, or spaces of its width; a model that indents by another width is converted level
//!    by level). A line indented less than the cursor's block (the first line's indentation, or the suffix's
//!    next line's when that is deeper) leaves the block and ends the completion, unless it starts with a
//!    closing bracket (rule 4 judges those).
//! 9. **Line length**: when the completion continues a line with code before the cursor, that line may not
//!    grow longer than the longest line near the cursor (at least [`MIN_LINE_WIDTH_LIMIT`] characters).
//! 10. **Trivial results**: trailing whitespace is removed; an empty or whitespace-only result, or one that only
//!     restates the start of the suffix up to a line end, becomes empty.

use std::collections::HashMap;

use lapce_ai_transport::protocol::CompletionMode;

use super::indent::{indent_width, IndentStyle};

/// Lines shorter than this (non-whitespace characters) are exempt from the "three times total" rule.
pub const MIN_REPEATED_LINE_CHARS: usize = 8;

/// How many bytes of the prefix are scanned for open brackets and string state.
const PREFIX_SCAN_BYTES: usize = 16 * 1024;

/// How many prefix lines a chat answer may echo before its real content.
const CHAT_ECHO_LINES: usize = 8;

const MARKDOWN_FENCE: &str = "```";

/// How many lines on each side of the cursor decide the document's indentation style.
const STYLE_SCAN_LINES: usize = 200;

/// How many lines on each side of the cursor set the longest line a mid-line completion may reach.
const NEARBY_LINES: usize = 20;

/// A mid-line completion may always make its line this long (characters), however short the lines near it.
pub const MIN_LINE_WIDTH_LIMIT: usize = 80;

/// How many non-blank suffix lines after the next one a generated line is also compared with.
pub const LATER_SUFFIX_LINES: usize = 2;

/// Later suffix lines shorter than this (non-whitespace characters) are not compared.
pub const MIN_LATER_SUFFIX_LINE_CHARS: usize = 4;

/// Everything the filter needs to know about the request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterContext {
    /// Text before the cursor (the same window the prompt used, or more).
    pub prefix: String,
    /// Text after the cursor.
    pub suffix: String,
    pub mode: CompletionMode,
    /// Stop sequences (template stop tokens plus any configured ones); empty strings are ignored.
    pub stop: Vec<String>,
    /// LSP language id; selects string and comment syntax for bracket matching.
    pub language_id: String,
    /// True when the output is a chat model's answer to a fill-the-hole prompt.
    pub chat_answer: bool,
    /// Stop after this many lines (0 = no limit).
    pub max_lines: u32,
}

/// The result of one [`CompletionFilter::push`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterStep {
    /// Text now decided: safe to show, never retracted.
    pub emit: String,
    /// The completion is complete: stop generation now (the remaining text, if any, is in `emit`).
    pub done: bool,
}

/// The line policy after resolving [`CompletionMode::Auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineMode {
    SingleLine,
    MultiLine,
}

/// Resolves the requested mode.
///
/// `Auto` gives single-line when the cursor has non-whitespace text after it on its line, or when the text
/// before the cursor on its line is not blank and does not open a block. It gives multi-line when the text
/// before the cursor opens a block (ends with `{`, `(`, `[`, or `:` in Python), or when the cursor line is
/// blank and the previous non-blank line opens a block. A blank cursor line after an ordinary statement is
/// single-line: one statement at a time is the conservative choice there.
pub fn resolve_line_mode(
    prefix: &str,
    suffix: &str,
    mode: CompletionMode,
    language_id: &str,
) -> LineMode {
    match mode {
        CompletionMode::SingleLine => LineMode::SingleLine,
        CompletionMode::MultiLine => LineMode::MultiLine,
        CompletionMode::Auto => {
            let rest_of_line = suffix.split('\n').next().unwrap_or("");
            let (before_cursor_lines, cursor_line) = match prefix.rfind('\n') {
                Some(index) => (&prefix[..index], &prefix[index + 1..]),
                None => ("", prefix),
            };
            if !rest_of_line.trim().is_empty() {
                LineMode::SingleLine
            } else if !cursor_line.trim().is_empty() {
                if opens_block(cursor_line, language_id) {
                    LineMode::MultiLine
                } else {
                    LineMode::SingleLine
                }
            } else {
                let previous_line = before_cursor_lines
                    .lines()
                    .rev()
                    .find(|line| !line.trim().is_empty())
                    .unwrap_or("");
                if opens_block(previous_line, language_id) {
                    LineMode::MultiLine
                } else {
                    LineMode::SingleLine
                }
            }
        }
    }
}

fn opens_block(line: &str, language_id: &str) -> bool {
    match line.trim_end().chars().last() {
        Some('{' | '(' | '[') => true,
        Some(':') => language_id == "python",
        _ => false,
    }
}

/// Runs the streaming filter over a whole output at once.
pub fn postprocess_full(context: FilterContext, raw: &str) -> String {
    let mut filter = CompletionFilter::new(context);
    let step = filter.push(raw);
    let mut completion = step.emit;
    if !step.done {
        completion.push_str(&filter.finish());
    }
    completion
}

/// Where a chat answer's preamble handling stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChatPhase {
    /// Waiting to see whether the answer opens with a Markdown fence.
    Fence,
    /// Dropping lines that echo the prefix; `next_prefix_line` is the index of the prefix line expected next
    /// once an echo started.
    Echo { next_prefix_line: Option<usize> },
    /// Passing text through until a closing fence.
    Pass,
}

/// The streaming filter: see the module documentation for the rules.
#[derive(Debug)]
pub struct CompletionFilter {
    // What the request says.
    line_mode: LineMode,
    stop: Vec<String>,
    crlf_document: bool,
    chat_answer: bool,
    /// The cursor line's text after the cursor, trimmed.
    rest_of_line: String,
    /// The first non-blank suffix line below the cursor line, trimmed.
    next_suffix_line: String,
    /// The same line with its indentation (compared as is when it has no letters or digits, like `}`).
    next_suffix_line_indented: String,
    /// Later non-blank suffix lines (trimmed) that a generated line must not repeat either.
    later_suffix_lines: Vec<String>,
    /// The suffix without leading whitespace (line endings normalized).
    suffix_trimmed: String,
    /// The first non-whitespace character of the suffix.
    suffix_first_char: Option<char>,
    /// True when the cursor line is blank before the cursor (the first generated line is a whole line).
    first_line_is_whole: bool,
    /// The cursor line before the cursor: the first generated line continues it.
    cursor_line_before: String,
    cursor_indent: usize,
    /// Prefix lines a chat answer may echo; the last is the cursor line up to the cursor.
    chat_prefix_lines: Vec<String>,
    /// The document's indentation style; `None` keeps generated indentation as it is.
    indent_style: Option<IndentStyle>,
    /// The indentation a line at the cursor should have, judging by the line above (blank cursor line only).
    expected_indent: Option<usize>,
    /// Indentation of the suffix's next non-blank line unless it starts with a closing bracket.
    suffix_block_indent: Option<usize>,
    /// Lines indented less than this leave the cursor's block (fixed once the first line's indentation is).
    block_indent: usize,
    /// The longest the cursor line may grow when the completion continues it mid-line (characters).
    line_width_limit: Option<usize>,
    /// Characters of the cursor line before the cursor.
    cursor_line_chars: usize,
    max_lines: u32,

    // Stage state.
    /// A `\r` at the end of the last delta, waiting to see whether `\n` follows.
    pending_carriage_return: bool,
    /// Output not yet released past the stop-sequence check (a possible partial stop sequence).
    stop_buffer: String,
    chat_phase: ChatPhase,
    chat_buffer: String,
    /// In the chat pass phase: whether the next released character starts a line.
    chat_at_line_start: bool,

    // Indentation stage state.
    /// True while the current line has only had whitespace (held in `pending_indent`).
    at_indentation: bool,
    pending_indent: String,
    /// Blank lines were dropped before the first line: its generated indentation is absolute.
    started_new_line: bool,
    /// The model's indentation step, once a line after a block opener shows it.
    model_unit: Option<usize>,
    /// (generated width, document width) of the first line: conversions between widths are relative to it.
    anchor: (usize, usize),
    /// Generated indentation width of the last line with content.
    previous_generated_width: usize,
    /// Whether the last completed line opens a block.
    previous_line_opens_block: bool,
    /// Characters of the first generated line so far.
    first_line_chars: usize,

    // Rule state over the released text.
    text: String,
    line_start: usize,
    line_index: usize,
    line_has_content: bool,
    any_content: bool,
    previous_line: Option<String>,
    line_counts: HashMap<String, usize>,
    lexer: BracketLexer,
    prefix_open: Vec<char>,
    completion_open: Vec<char>,
    cut: Option<usize>,

    // Output state.
    emitted: usize,
    done: bool,
    finished_text: Option<String>,
}

impl CompletionFilter {
    pub fn new(context: FilterContext) -> CompletionFilter {
        let prefix = context.prefix.replace("\r\n", "\n");
        let suffix = context.suffix.replace("\r\n", "\n");
        let crlf_document = context.prefix.contains("\r\n") || context.suffix.contains("\r\n");
        let line_mode = resolve_line_mode(&prefix, &suffix, context.mode, &context.language_id);

        let mut suffix_lines = suffix.split('\n');
        let rest_of_line_raw = suffix_lines.next().unwrap_or("");
        let rest_of_line = rest_of_line_raw.trim().to_string();
        let mut non_blank_below = suffix_lines.filter(|line| !line.trim().is_empty());
        let next_suffix_line_indented = non_blank_below.next().unwrap_or("").trim_end().to_string();
        let next_suffix_line = next_suffix_line_indented.trim().to_string();
        let later_suffix_lines: Vec<String> = non_blank_below
            .take(LATER_SUFFIX_LINES)
            .map(str::trim)
            .filter(|line| {
                line.chars().any(char::is_alphanumeric)
                    && line.chars().filter(|c| !c.is_whitespace()).count()
                        >= MIN_LATER_SUFFIX_LINE_CHARS
            })
            .map(str::to_string)
            .collect();
        let suffix_block_indent = (!next_suffix_line.is_empty()
            && !next_suffix_line.starts_with([')', ']', '}']))
        .then(|| indent_width(&next_suffix_line_indented));
        let suffix_trimmed = suffix.trim_start().to_string();
        let suffix_first_char = suffix_trimmed.chars().next();

        let cursor_line = prefix.rsplit('\n').next().unwrap_or("");
        let first_line_is_whole = cursor_line.trim().is_empty();
        let cursor_indent = indent_width(cursor_line);

        let lines_above: Vec<&str> = prefix.rsplit('\n').skip(1).take(STYLE_SCAN_LINES).collect();
        let lines_below = suffix.split('\n').skip(1).take(STYLE_SCAN_LINES);
        let indent_style =
            IndentStyle::detect(lines_above.iter().rev().copied().chain(lines_below));
        let expected_indent = lines_above
            .iter()
            .find(|line| !line.trim().is_empty())
            .map(|line| {
                let above = indent_width(line);
                // Without a detected style, the editor's indentation of the cursor line says the step.
                let unit = indent_style.map_or(
                    if cursor_indent > above {
                        cursor_indent - above
                    } else {
                        super::indent::TAB_WIDTH
                    },
                    IndentStyle::unit_width,
                );
                above
                    + if opens_block(line, &context.language_id) {
                        unit
                    } else {
                        0
                    }
            });
        let line_width_limit = (!first_line_is_whole).then(|| {
            let longest_nearby = lines_above
                .iter()
                .take(NEARBY_LINES)
                .copied()
                .chain(suffix.split('\n').skip(1).take(NEARBY_LINES))
                .map(|line| line.chars().count())
                .chain(std::iter::once(
                    cursor_line.chars().count() + rest_of_line_raw.chars().count(),
                ))
                .max()
                .unwrap_or(0);
            longest_nearby.max(MIN_LINE_WIDTH_LIMIT)
        });

        let mut stop: Vec<String> = context
            .stop
            .into_iter()
            .filter(|sequence| !sequence.is_empty())
            .map(|sequence| sequence.replace("\r\n", "\n"))
            .collect();
        stop.dedup();

        let syntax = Syntax::for_language(&context.language_id);
        let scan_start =
            floor_char_boundary(&prefix, prefix.len().saturating_sub(PREFIX_SCAN_BYTES));
        let mut lexer = BracketLexer::new(syntax);
        let mut prefix_open = Vec::new();
        for character in prefix[scan_start..].chars() {
            match lexer.step(character) {
                Lexeme::Opener => prefix_open.push(character),
                Lexeme::Closer => {
                    if prefix_open.last() == Some(&opener_for(character)) {
                        prefix_open.pop();
                    }
                }
                Lexeme::Other => {}
            }
        }

        let mut chat_prefix_lines: Vec<String> = prefix
            .rsplit('\n')
            .take(CHAT_ECHO_LINES)
            .map(str::to_string)
            .collect();
        chat_prefix_lines.reverse();

        CompletionFilter {
            line_mode,
            stop,
            crlf_document,
            chat_answer: context.chat_answer,
            rest_of_line,
            next_suffix_line,
            next_suffix_line_indented,
            later_suffix_lines,
            suffix_trimmed,
            suffix_first_char,
            first_line_is_whole,
            cursor_line_before: cursor_line.to_string(),
            cursor_indent,
            chat_prefix_lines,
            indent_style,
            expected_indent,
            suffix_block_indent,
            block_indent: cursor_indent.max(suffix_block_indent.unwrap_or(0)),
            line_width_limit,
            cursor_line_chars: cursor_line.chars().count(),
            max_lines: context.max_lines,
            pending_carriage_return: false,
            stop_buffer: String::new(),
            chat_phase: ChatPhase::Fence,
            chat_buffer: String::new(),
            chat_at_line_start: true,
            at_indentation: first_line_is_whole,
            pending_indent: String::new(),
            started_new_line: false,
            model_unit: None,
            anchor: (cursor_indent, cursor_indent),
            previous_generated_width: cursor_indent,
            previous_line_opens_block: false,
            first_line_chars: 0,
            text: String::new(),
            line_start: 0,
            line_index: 0,
            line_has_content: false,
            any_content: false,
            previous_line: None,
            line_counts: HashMap::new(),
            lexer,
            prefix_open,
            completion_open: Vec::new(),
            cut: None,
            emitted: 0,
            done: false,
            finished_text: None,
        }
    }

    /// The resolved line policy.
    pub fn line_mode(&self) -> LineMode {
        self.line_mode
    }

    /// True once the filter decided the completion is complete (a stop sequence or a rule cut it).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Feeds the next piece of provider output.
    pub fn push(&mut self, delta: &str) -> FilterStep {
        if self.done {
            return FilterStep {
                emit: String::new(),
                done: true,
            };
        }
        let normalized = self.normalize_line_endings(delta, false);
        self.stop_buffer.push_str(&normalized);
        let (released, stop_found) = self.release_past_stop_sequences(false);
        self.feed_released(&released, stop_found);
        self.step()
    }

    /// The provider ended: returns the rest of the completion. Later calls return an empty string.
    pub fn finish(&mut self) -> String {
        if !self.done {
            let normalized = self.normalize_line_endings("", true);
            self.stop_buffer.push_str(&normalized);
            let (released, _) = self.release_past_stop_sequences(true);
            self.feed_released(&released, true);
        }
        self.step().emit
    }

    /// `\r\n` -> `\n`; a trailing `\r` is held until the next delta (or the end).
    fn normalize_line_endings(&mut self, delta: &str, at_end: bool) -> String {
        let mut joined = String::with_capacity(delta.len() + 1);
        if self.pending_carriage_return {
            joined.push('\r');
            self.pending_carriage_return = false;
        }
        joined.push_str(delta);
        if !at_end && joined.ends_with('\r') {
            joined.pop();
            self.pending_carriage_return = true;
        }
        joined.replace("\r\n", "\n")
    }

    /// Releases the buffered output that cannot be part of a stop sequence; the bool says a stop sequence was found.
    fn release_past_stop_sequences(&mut self, at_end: bool) -> (String, bool) {
        let earliest = self
            .stop
            .iter()
            .filter_map(|sequence| self.stop_buffer.find(sequence.as_str()))
            .min();
        if let Some(stop_at) = earliest {
            tracing::trace!(stop_at, "stop sequence in completion output");
            let released = self.stop_buffer[..stop_at].to_string();
            self.stop_buffer.clear();
            return (released, true);
        }
        if at_end {
            return (std::mem::take(&mut self.stop_buffer), false);
        }
        let held = self
            .stop
            .iter()
            .map(|sequence| partial_match_len(&self.stop_buffer, sequence))
            .max()
            .unwrap_or(0);
        let release_end = self.stop_buffer.len() - held;
        let released = self.stop_buffer[..release_end].to_string();
        self.stop_buffer.drain(..release_end);
        (released, false)
    }

    /// Passes released text through the chat stage (if any) into the rules; `ended` = no more text follows.
    fn feed_released(&mut self, released: &str, ended: bool) {
        let (for_rules, chat_ended) = if self.chat_answer {
            self.chat_stage(released, ended)
        } else {
            (released.to_string(), false)
        };
        for character in for_rules.chars() {
            if self.cut.is_some() {
                break;
            }
            self.rules_step(character);
        }
        if ended || chat_ended || self.cut.is_some() {
            self.conclude();
        }
    }

    /// Chat answers: drop an opening fence and echoed prefix lines; end at a closing fence.
    fn chat_stage(&mut self, released: &str, ended: bool) -> (String, bool) {
        self.chat_buffer.push_str(released);
        if self.chat_phase == ChatPhase::Fence {
            let content = self.chat_buffer.trim_start();
            if content.starts_with(MARKDOWN_FENCE) {
                match content.find('\n') {
                    Some(newline) => {
                        let drop_until = self.chat_buffer.len() - content.len() + newline + 1;
                        self.chat_buffer.drain(..drop_until);
                        self.chat_phase = ChatPhase::Echo {
                            next_prefix_line: None,
                        };
                    }
                    None if ended => {
                        self.chat_buffer.clear();
                        return (String::new(), true);
                    }
                    None => return (String::new(), false),
                }
            } else if !ended && (content.is_empty() || MARKDOWN_FENCE.starts_with(content)) {
                return (String::new(), false);
            } else {
                self.chat_phase = ChatPhase::Echo {
                    next_prefix_line: None,
                };
            }
        }
        let mut passed = String::new();
        while let ChatPhase::Echo { next_prefix_line } = self.chat_phase {
            let line_end = match self.chat_buffer.find('\n') {
                Some(newline) => newline,
                None if ended => self.chat_buffer.len(),
                None => return (passed, false),
            };
            let line = self.chat_buffer[..line_end].to_string();
            if line.trim_start().starts_with(MARKDOWN_FENCE) {
                // A closing fence right away: nothing (more) to insert.
                self.chat_buffer.clear();
                return (passed, true);
            }
            let cursor_index = self.chat_prefix_lines.len().saturating_sub(1);
            let cursor_text = self
                .chat_prefix_lines
                .last()
                .map(|line| line.trim_start().to_string())
                .unwrap_or_default();
            let cursor_text_trimmed = cursor_text.trim_end();
            let at_cursor_line = next_prefix_line.is_none_or(|expected| expected == cursor_index);
            if at_cursor_line
                && !cursor_text_trimmed.is_empty()
                && line.trim_start().starts_with(cursor_text_trimmed)
            {
                let mut remainder = &line.trim_start()[cursor_text_trimmed.len()..];
                if cursor_text.len() > cursor_text_trimmed.len() {
                    remainder = remainder.trim_start();
                }
                let consumed = line_end;
                let rest = self.chat_buffer[consumed..].to_string();
                self.chat_buffer = format!("{remainder}{rest}");
                self.chat_phase = ChatPhase::Pass;
                break;
            }
            let matched_index = if line.trim().is_empty() {
                None
            } else {
                match next_prefix_line {
                    Some(expected) if expected < cursor_index => self.chat_prefix_lines[expected]
                        .trim()
                        .eq(line.trim())
                        .then_some(expected),
                    Some(_) => None,
                    None if is_long_enough_to_repeat(&line) => self.chat_prefix_lines
                        [..cursor_index]
                        .iter()
                        .rposition(|prefix_line| prefix_line.trim() == line.trim()),
                    None => None,
                }
            };
            match matched_index {
                Some(index) => {
                    tracing::trace!(line = %line, "chat answer echoes a prefix line; dropped");
                    let drop_until = (line_end + 1).min(self.chat_buffer.len());
                    self.chat_buffer.drain(..drop_until);
                    self.chat_phase = ChatPhase::Echo {
                        next_prefix_line: Some(index + 1),
                    };
                    if self.chat_buffer.is_empty() && ended {
                        return (passed, true);
                    }
                }
                None if line.trim().is_empty() && next_prefix_line.is_some() => {
                    let drop_until = (line_end + 1).min(self.chat_buffer.len());
                    self.chat_buffer.drain(..drop_until);
                    if self.chat_buffer.is_empty() && ended {
                        return (passed, true);
                    }
                }
                None => self.chat_phase = ChatPhase::Pass,
            }
        }
        // Pass phase: release up to a closing fence at a line start, holding a possible partial fence.
        let buffer = std::mem::take(&mut self.chat_buffer);
        let mut line_begin = if self.chat_at_line_start {
            Some(0)
        } else {
            None
        };
        let mut release_end = buffer.len();
        let mut fence_found = false;
        let mut search_from = 0;
        loop {
            if let Some(begin) = line_begin {
                let line_rest = &buffer[begin..];
                let content = line_rest.trim_start_matches([' ', '\t']);
                if content.starts_with(MARKDOWN_FENCE) {
                    release_end = begin;
                    fence_found = true;
                    break;
                }
                if !ended && !content.contains('\n') && MARKDOWN_FENCE.starts_with(content) {
                    release_end = begin;
                    break;
                }
            }
            match buffer[search_from..].find('\n') {
                Some(offset) => {
                    let next_begin = search_from + offset + 1;
                    line_begin = Some(next_begin);
                    search_from = next_begin;
                }
                None => break,
            }
        }
        passed.push_str(&buffer[..release_end]);
        if !fence_found {
            self.chat_buffer = buffer[release_end..].to_string();
        }
        if let Some(last) = passed.chars().last() {
            self.chat_at_line_start = last == '\n';
        }
        (passed, fence_found)
    }

    /// Applies the character-level rules to the next released character.
    fn rules_step(&mut self, character: char) {
        if self.at_indentation {
            match character {
                ' ' | '\t' => {
                    self.pending_indent.push(character);
                    return;
                }
                '\n' => {
                    // A blank line keeps no whitespace; blank lines before the first code line are dropped.
                    self.pending_indent.clear();
                    if self.line_index == 0 && self.first_line_is_whole {
                        self.started_new_line = true;
                        return;
                    }
                }
                _ => {
                    let generated = std::mem::take(&mut self.pending_indent);
                    let indent = self.shape_indentation(&generated);
                    self.at_indentation = false;
                    if self.line_index > 0 && !matches!(character, ')' | ']' | '}') {
                        let width = indent_width(&indent);
                        if width < self.block_indent {
                            tracing::trace!(
                                width,
                                block = self.block_indent,
                                "line leaves the cursor's block; cut"
                            );
                            self.cut = Some(self.text.len());
                            return;
                        }
                    }
                    for whitespace in indent.chars() {
                        self.lexer.step(whitespace);
                        self.text.push(whitespace);
                    }
                }
            }
        }
        let position = self.text.len();
        if self.line_index == 0 && character != '\n' {
            if let Some(limit) = self.line_width_limit {
                if self.cursor_line_chars + self.first_line_chars + 1 > limit {
                    tracing::trace!(
                        limit,
                        "line grows longer than the lines near the cursor; cut"
                    );
                    self.cut = Some(position);
                    return;
                }
            }
            self.first_line_chars += 1;
        }
        match self.lexer.step(character) {
            Lexeme::Opener => self.completion_open.push(character),
            Lexeme::Closer => {
                let opener = opener_for(character);
                if let Some(&open) = self.completion_open.last() {
                    if open == opener {
                        self.completion_open.pop();
                    } else {
                        tracing::trace!(%character, "mismatched closer in completion; cut");
                        self.cut = Some(position);
                        return;
                    }
                } else if self.prefix_open.last() == Some(&opener)
                    && self.suffix_first_char != Some(character)
                {
                    self.prefix_open.pop();
                } else {
                    tracing::trace!(%character, "closer of a bracket opened before the completion; cut");
                    self.cut = Some(position);
                    return;
                }
            }
            Lexeme::Other => {}
        }
        self.text.push(character);
        if character == '\n' {
            self.complete_line(position);
            self.at_indentation = true;
        } else if !character.is_whitespace() && !self.line_has_content {
            self.line_has_content = true;
            self.any_content = true;
        }
    }

    /// The indentation to insert for a line whose generated indentation is `generated` (see rule 8).
    fn shape_indentation(&mut self, generated: &str) -> String {
        let generated_width = indent_width(generated);
        if self.line_index == 0 {
            return self.shape_first_line_indentation(generated, generated_width);
        }
        if !generated.contains('\t')
            && self.model_unit.is_none()
            && self.previous_line_opens_block
            && generated_width > self.previous_generated_width
        {
            let step = generated_width - self.previous_generated_width;
            if matches!(step, 2 | 4) {
                tracing::trace!(step, "model indentation step");
                self.model_unit = Some(step);
            }
        }
        self.previous_generated_width = generated_width;
        match self.indent_style {
            Some(style) => style.render(self.document_width(generated, style)),
            None => generated.to_string(),
        }
    }

    /// The first line's indentation, when the cursor line is blank before the cursor: only what the cursor's
    /// own indentation lacks.
    fn shape_first_line_indentation(&mut self, generated: &str, generated_width: usize) -> String {
        let cursor = self.cursor_indent;
        let width = match self.indent_style {
            Some(style) => self.document_width(generated, style),
            None => generated_width,
        };
        let target = if self.started_new_line || cursor == 0 {
            width.max(cursor)
        } else if width > 0 && self.expected_indent == Some(cursor + width) {
            cursor + width
        } else if width > cursor && self.expected_indent == Some(width) {
            width
        } else {
            cursor
        };
        let continues_cursor = !self.started_new_line && target == cursor + width && width > 0;
        let anchor_generated = if continues_cursor {
            cursor + generated_width
        } else if self.started_new_line || generated_width >= cursor {
            generated_width
        } else {
            cursor
        };
        self.anchor = (anchor_generated, target);
        self.previous_generated_width = anchor_generated;
        self.block_indent = target.max(self.suffix_block_indent.unwrap_or(0));
        if target == cursor {
            if generated_width > 0 {
                tracing::trace!(generated_width, "first line's extra indentation dropped");
            }
            return String::new();
        }
        match self.indent_style {
            Some(style) => style.render(target - cursor),
            None if continues_cursor => generated.to_string(),
            None => generated
                .strip_prefix(self.cursor_line_before.as_str())
                .unwrap_or(generated)
                .to_string(),
        }
    }

    /// The width `generated` indentation has in the document's `style`: a tab is one level; spaces of a model
    /// that indents by another step are converted level by level, relative to the first line.
    fn document_width(&self, generated: &str, style: IndentStyle) -> usize {
        let tabs = generated.chars().filter(|c| *c == '\t').count();
        let spaces = generated.len() - tabs;
        match style {
            IndentStyle::Spaces(unit) => match self.model_unit {
                Some(step) if tabs == 0 && step != unit && self.line_index > 0 => {
                    let (anchor_generated, anchor_document) = self.anchor;
                    let offset = spaces as i64 - anchor_generated as i64;
                    let step = step as i64;
                    // Levels, rounded half away from zero.
                    let levels = (offset + offset.signum() * (step / 2)) / step;
                    usize::try_from(anchor_document as i64 + levels * unit as i64).unwrap_or(0)
                }
                _ => tabs * unit + spaces,
            },
            IndentStyle::Tabs => {
                let step = self.model_unit.unwrap_or(super::indent::TAB_WIDTH);
                (tabs + spaces / step) * super::indent::TAB_WIDTH + spaces % step
            }
        }
    }

    /// Line-end rules for the line ending at `line_end` (the newline's position).
    fn complete_line(&mut self, line_end: usize) {
        let line = self.text[self.line_start..line_end].to_string();
        if let Some(cut) = self.line_rules(&line) {
            self.cut = Some(cut);
            return;
        }
        if self.line_mode == LineMode::SingleLine && self.any_content {
            self.cut = Some(line_end);
            return;
        }
        if self.max_lines > 0 && self.line_index + 1 >= self.max_lines as usize {
            tracing::trace!(max_lines = self.max_lines, "line limit reached; cut");
            self.cut = Some(line_end);
            return;
        }
        let full_line = if self.line_index == 0 {
            format!("{}{line}", self.cursor_line_before)
        } else {
            line
        };
        if !full_line.trim().is_empty() {
            self.previous_line_opens_block =
                matches!(full_line.trim_end().chars().last(), Some('{' | ':'));
        }
        self.line_index += 1;
        self.line_start = line_end + 1;
        self.line_has_content = false;
    }

    /// Rules that judge a whole line (also the last, unterminated one): returns the cut position.
    fn line_rules(&mut self, line: &str) -> Option<usize> {
        let trimmed = line.trim();
        if self.line_index == 0 && !self.rest_of_line.is_empty() {
            let without_trailing = line.trim_end();
            if without_trailing.ends_with(self.rest_of_line.as_str()) {
                tracing::trace!("first line repeats the rest of the cursor line; cut");
                return Some(self.line_start + without_trailing.len() - self.rest_of_line.len());
            }
        }
        if trimmed.is_empty() {
            return None;
        }
        // Lines are compared as they appear in the document, so the first line includes the cursor line's start.
        let full_line = if self.line_index == 0 {
            format!("{}{line}", self.cursor_line_before)
        } else {
            line.to_string()
        };
        if (self.line_index > 0 || self.first_line_is_whole)
            && (self.repeats_next_suffix_line(&full_line)
                || self.later_suffix_lines.iter().any(|later| later == trimmed))
        {
            tracing::trace!("line repeats a line of the suffix; cut");
            return Some(self.line_start);
        }
        let key = full_line.trim_end();
        if self.previous_line.as_deref() == Some(key) {
            tracing::trace!("line repeated twice in a row; cut");
            return Some(self.line_start);
        }
        let seen = self.line_counts.entry(key.to_string()).or_insert(0);
        if *seen >= 2 && is_long_enough_to_repeat(key) {
            tracing::trace!("line generated a third time; cut");
            return Some(self.line_start);
        }
        *seen += 1;
        self.previous_line = Some(key.to_string());
        None
    }

    /// No more text: judge the last line and fix the final completion.
    fn conclude(&mut self) {
        if self.finished_text.is_some() {
            return;
        }
        // The last line counts as complete when the text ended or a bracket cut it at the end.
        let cut_at_end = self.cut.is_none_or(|cut| cut == self.text.len());
        if cut_at_end && self.line_start <= self.text.len() {
            let last_line = self.text[self.line_start..].to_string();
            if let Some(cut) = self.line_rules(&last_line) {
                self.cut = Some(cut);
            }
        }
        let cut = self.cut.unwrap_or(self.text.len()).min(self.text.len());
        let candidate = self.text[..cut].trim_end();
        let completion = if candidate.trim().is_empty() || self.restates_suffix(candidate) {
            tracing::debug!(
                raw_bytes = self.text.len(),
                "completion is empty or only repeats the suffix; dropped"
            );
            String::new()
        } else {
            candidate.to_string()
        };
        if !completion.starts_with(&self.text[..self.emitted]) {
            tracing::warn!("completion filter emitted text that the final result does not keep");
        }
        self.done = true;
        self.finished_text = Some(completion);
    }

    /// True when `full_line` is the suffix's next line: compared without surrounding whitespace, except that a
    /// line without letters or digits (`}`, `});`) must also have the same indentation, since closers of
    /// nested blocks look alike.
    fn repeats_next_suffix_line(&self, full_line: &str) -> bool {
        if self.next_suffix_line.is_empty() || full_line.trim() != self.next_suffix_line {
            return false;
        }
        let has_words = self.next_suffix_line.chars().any(char::is_alphanumeric);
        has_words || full_line.trim_end() == self.next_suffix_line_indented
    }

    /// True when `candidate` only restates the start of the suffix, up to a line end.
    fn restates_suffix(&self, candidate: &str) -> bool {
        let content = candidate.trim_start();
        if !self.suffix_trimmed.starts_with(content) {
            return false;
        }
        let after = self.suffix_trimmed[content.len()..].trim_start_matches([' ', '\t']);
        after.is_empty() || after.starts_with('\n')
    }

    /// Emits whatever became decided since the last step.
    fn step(&mut self) -> FilterStep {
        let decided_end = match &self.finished_text {
            Some(completion) => completion.len(),
            None => self.undecided_bound(),
        };
        let source = self.finished_text.as_deref().unwrap_or(&self.text);
        let emit = if decided_end > self.emitted && source.is_char_boundary(decided_end) {
            let piece = &source[self.emitted..decided_end];
            self.emitted = decided_end;
            if self.crlf_document {
                piece.replace('\n', "\r\n")
            } else {
                piece.to_string()
            }
        } else {
            String::new()
        };
        FilterStep {
            emit,
            done: self.done,
        }
    }

    /// How far the released text is safe from every rule that could still cut it.
    fn undecided_bound(&self) -> usize {
        let mut bound = self.text.len();
        let partial = &self.text[self.line_start..];
        if !partial.trim().is_empty() {
            let content = partial.trim();
            let may_repeat_suffix_line = (!self.next_suffix_line.is_empty()
                && self.next_suffix_line.starts_with(content))
                || self
                    .later_suffix_lines
                    .iter()
                    .any(|later| later.starts_with(content));
            if (self.line_index > 0 || self.first_line_is_whole) && may_repeat_suffix_line {
                bound = bound.min(self.line_start);
            }
            let key = partial.trim_end();
            let may_repeat_previous = self
                .previous_line
                .as_deref()
                .is_some_and(|previous| previous.starts_with(key));
            let may_repeat_third_time = self.line_counts.iter().any(|(line, count)| {
                *count >= 2 && is_long_enough_to_repeat(line) && line.starts_with(key)
            });
            if may_repeat_previous || may_repeat_third_time {
                bound = bound.min(self.line_start);
            }
            if self.line_index == 0 && !self.rest_of_line.is_empty() {
                // Only tails no longer than the rest of the line (plus trailing whitespace) can match it.
                let earliest = partial
                    .trim_end()
                    .len()
                    .saturating_sub(self.rest_of_line.len());
                let possible_overlap = partial
                    .char_indices()
                    .map(|(offset, _)| offset)
                    .filter(|&offset| offset >= earliest)
                    .find(|&offset| {
                        let tail = partial[offset..].trim_end();
                        !tail.is_empty() && self.rest_of_line.starts_with(tail)
                    });
                if let Some(offset) = possible_overlap {
                    bound = bound.min(self.line_start + offset);
                }
            }
        }
        // Never emit trailing whitespace: it may be trimmed at the end.
        let shown = self.text[..bound].trim_end();
        bound = shown.len();
        // Hold everything while the completion may still turn out to restate the suffix.
        if self.emitted == 0 && self.suffix_trimmed.starts_with(shown.trim_start()) {
            bound = 0;
        }
        bound.max(self.emitted)
    }
}

fn is_long_enough_to_repeat(line: &str) -> bool {
    line.chars()
        .filter(|character| !character.is_whitespace())
        .count()
        >= MIN_REPEATED_LINE_CHARS
}

/// Length of the longest tail of `text` that is a proper, non-empty prefix of `sequence`.
fn partial_match_len(text: &str, sequence: &str) -> usize {
    let longest = text.len().min(sequence.len().saturating_sub(1));
    (1..=longest)
        .rev()
        .find(|&length| {
            let start = text.len() - length;
            text.is_char_boundary(start)
                && sequence.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while index > 0 && !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

fn opener_for(closer: char) -> char {
    match closer {
        ')' => '(',
        ']' => '[',
        _ => '{',
    }
}

/// String and comment syntax, enough to skip brackets that are not code.
#[derive(Debug, Clone, Copy)]
struct Syntax {
    single_quote_strings: bool,
    backtick_strings: bool,
    slash_comments: bool,
    hash_comments: bool,
}

impl Syntax {
    fn for_language(language_id: &str) -> Syntax {
        let hash_comment_languages = [
            "python",
            "shellscript",
            "bash",
            "sh",
            "ruby",
            "yaml",
            "toml",
            "perl",
            "r",
            "makefile",
        ];
        let hash_comments = hash_comment_languages.contains(&language_id);
        Syntax {
            // Rust uses `'` for lifetimes; prose has apostrophes.
            single_quote_strings: !matches!(language_id, "rust" | "" | "plaintext" | "markdown"),
            backtick_strings: matches!(
                language_id,
                "javascript" | "typescript" | "javascriptreact" | "typescriptreact" | "go"
            ),
            slash_comments: !hash_comments && !matches!(language_id, "" | "plaintext" | "markdown"),
            hash_comments,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lexeme {
    Opener,
    Closer,
    Other,
}

/// Classifies characters as bracket openers/closers outside strings and line comments.
#[derive(Debug, Clone)]
struct BracketLexer {
    syntax: Syntax,
    quote: Option<char>,
    escaped: bool,
    line_comment: bool,
    previous: char,
}

impl BracketLexer {
    fn new(syntax: Syntax) -> BracketLexer {
        BracketLexer {
            syntax,
            quote: None,
            escaped: false,
            line_comment: false,
            previous: '\n',
        }
    }

    fn step(&mut self, character: char) -> Lexeme {
        let previous = std::mem::replace(&mut self.previous, character);
        if self.line_comment {
            if character == '\n' {
                self.line_comment = false;
            }
            return Lexeme::Other;
        }
        if let Some(quote) = self.quote {
            if self.escaped {
                self.escaped = false;
            } else if character == '\\' {
                self.escaped = true;
            } else if character == quote || (character == '\n' && quote != '`') {
                self.quote = None;
            }
            return Lexeme::Other;
        }
        match character {
            '"' => self.quote = Some('"'),
            '\'' if self.syntax.single_quote_strings => self.quote = Some('\''),
            '`' if self.syntax.backtick_strings => self.quote = Some('`'),
            '/' if self.syntax.slash_comments && previous == '/' => self.line_comment = true,
            '#' if self.syntax.hash_comments => self.line_comment = true,
            '(' | '[' | '{' => return Lexeme::Opener,
            ')' | ']' | '}' => return Lexeme::Closer,
            _ => {}
        }
        Lexeme::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(prefix: &str, suffix: &str, mode: CompletionMode) -> FilterContext {
        FilterContext {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
            mode,
            stop: vec!["<|endoftext|>".to_string()],
            language_id: "rust".to_string(),
            chat_answer: false,
            max_lines: 0,
        }
    }

    #[test]
    fn auto_mode_resolution() {
        let auto = CompletionMode::Auto;
        assert_eq!(
            resolve_line_mode("foo(", ");", auto, "rust"),
            LineMode::SingleLine
        );
        assert_eq!(
            resolve_line_mode("let x = ", "\n", auto, "rust"),
            LineMode::SingleLine
        );
        assert_eq!(
            resolve_line_mode("fn a() {", "\n}", auto, "rust"),
            LineMode::MultiLine
        );
        assert_eq!(
            resolve_line_mode("fn a() {\n    ", "\n}", auto, "rust"),
            LineMode::MultiLine
        );
        assert_eq!(
            resolve_line_mode("def f():\n    ", "", auto, "python"),
            LineMode::MultiLine
        );
        assert_eq!(
            resolve_line_mode("let a = 1;\n    ", "\n", auto, "rust"),
            LineMode::SingleLine
        );
        assert_eq!(
            resolve_line_mode("foo(", ");", CompletionMode::MultiLine, "rust"),
            LineMode::MultiLine
        );
    }

    #[test]
    fn stop_sequence_split_across_deltas_is_never_shown() {
        let mut filter = CompletionFilter::new(context("let x = ", ";\n", CompletionMode::Auto));
        let first = filter.push("42<|endof");
        assert_eq!(first.emit, "42");
        assert!(!first.done);
        let second = filter.push("text|>garbage");
        assert_eq!(second.emit, "");
        assert!(second.done);
        assert_eq!(filter.finish(), "");
    }

    #[test]
    fn partial_stop_prefix_that_does_not_complete_is_released() {
        let mut filter = CompletionFilter::new(context("let s = ", "\n", CompletionMode::Auto));
        assert_eq!(filter.push("a <|e").emit, "a");
        assert_eq!(filter.push("x").emit, " <|ex");
        assert_eq!(filter.finish(), "");
    }

    #[test]
    fn emission_waits_while_the_line_may_repeat_the_suffix_line() {
        let mut filter = CompletionFilter::new(context(
            "fn f() {\n    ",
            "\n    return 1;\n}",
            CompletionMode::MultiLine,
        ));
        assert_eq!(filter.push("return").emit, "");
        let step = filter.push(" 1;\n");
        assert!(step.done);
        assert_eq!(step.emit, "");
    }

    #[test]
    fn push_after_done_is_ignored() {
        let mut filter = CompletionFilter::new(context("let x = ", ";", CompletionMode::Auto));
        let step = filter.push("1\n2");
        assert!(step.done);
        assert_eq!(step.emit, "1");
        assert_eq!(filter.push("more").emit, "");
        assert!(filter.is_done());
    }

    #[test]
    fn lone_carriage_return_is_kept_and_crlf_split_is_joined() {
        let mut filter =
            CompletionFilter::new(context("let s = ", "\n", CompletionMode::SingleLine));
        assert_eq!(filter.push("a\rb\r").emit, "a\rb");
        let step = filter.push("\nnext line");
        assert!(step.done, "CRLF split across deltas is one line break");
        assert_eq!(filter.finish(), "");
    }

    #[test]
    fn held_first_line_overlap_with_rest_of_line_is_released_when_it_diverges() {
        let mut filter = CompletionFilter::new(context("call(\"", "\");", CompletionMode::Auto));
        assert_eq!(filter.push("abc\"").emit, "abc");
        assert_eq!(filter.push(" + x").emit, "\" + x");
        assert_eq!(filter.finish(), "");
    }

    #[test]
    fn chat_answer_without_closing_fence_streams_after_the_first_line() {
        let mut filter = CompletionFilter::new(FilterContext {
            chat_answer: true,
            ..context("fn f() {\n    ", "\n}", CompletionMode::MultiLine)
        });
        assert_eq!(filter.push("```rust\nlet a = 1;").emit, "");
        assert_eq!(
            filter.push("\n    let b = 2;\n``").emit,
            "let a = 1;\n    let b = 2;"
        );
        let step = filter.push("`\nExplanation.");
        assert!(step.done);
        assert_eq!(step.emit, "");
    }

    #[test]
    fn partial_match_len_finds_longest_proper_prefix_tail() {
        assert_eq!(partial_match_len("abc<|end", "<|endoftext|>"), 5);
        assert_eq!(partial_match_len("abc", "<|endoftext|>"), 0);
        assert_eq!(partial_match_len("x<", "<"), 0);
        assert_eq!(
            partial_match_len("é<｜", "<｜end▁of▁sentence｜>"),
            "<｜".len()
        );
    }

    #[test]
    fn lexer_ignores_brackets_in_strings_and_comments() {
        let mut lexer = BracketLexer::new(Syntax::for_language("javascript"));
        let kinds: Vec<Lexeme> = "\"(\" // )\n`{` )"
            .chars()
            .map(|character| lexer.step(character))
            .collect();
        let closers = kinds.iter().filter(|kind| **kind == Lexeme::Closer).count();
        let openers = kinds.iter().filter(|kind| **kind == Lexeme::Opener).count();
        assert_eq!((openers, closers), (0, 1));
    }
}
