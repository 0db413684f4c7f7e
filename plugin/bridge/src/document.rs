//! Open documents as ropes, edited with LSP's UTF-16 positions, and the cursor context they give.

use lsp_types::{Position, Range, TextDocumentContentChangeEvent};
use ropey::Rope;

/// An edit that does not fit the document we have (the client and we disagree).
#[derive(Debug, thiserror::Error)]
#[error("edit range {0:?} is outside the document")]
pub struct OutOfSync(pub Range);

/// One open text document.
#[derive(Debug, Clone)]
pub struct Document {
    pub language_id: String,
    pub version: i32,
    pub text: Rope,
}

impl Document {
    pub fn new(language_id: String, version: i32, text: &str) -> Self {
        Self {
            language_id,
            version,
            text: Rope::from_str(text),
        }
    }

    /// Applies one `didChange` content change (full or incremental).
    pub fn apply(&mut self, change: &TextDocumentContentChangeEvent) -> Result<(), OutOfSync> {
        match change.range {
            None => self.text = Rope::from_str(&change.text),
            Some(range) => {
                let start = char_index(&self.text, range.start).ok_or(OutOfSync(range))?;
                let end = char_index(&self.text, range.end).ok_or(OutOfSync(range))?;
                if end < start {
                    return Err(OutOfSync(range));
                }
                self.text.remove(start..end);
                self.text.insert(start, &change.text);
            }
        }
        Ok(())
    }

    /// The context around `pos` for a completion request.
    pub fn context(&self, pos: Position, limits: ContextLimits) -> Option<CursorContext> {
        let cursor = char_index(&self.text, pos)?;
        let rope = &self.text;
        let line = rope.char_to_line(cursor);
        let first_line = line.saturating_sub(limits.prefix_lines);
        let mut start = rope.line_to_char(first_line);
        start = start.max(cursor.saturating_sub(limits.prefix_chars));
        let last_line = (line + limits.suffix_lines).min(rope.len_lines().saturating_sub(1));
        let mut end = line_end_char(rope, last_line);
        end = end.min(cursor + limits.suffix_chars).max(cursor);
        let line_rest = rope.slice(cursor..line_end_char(rope, line)).to_string();
        Some(CursorContext {
            prefix: rope.slice(start..cursor).to_string(),
            suffix: rope.slice(cursor..end).to_string(),
            at_line_end: line_rest.trim().is_empty(),
        })
    }
}

/// How much text around the cursor is sent.
#[derive(Debug, Clone, Copy)]
pub struct ContextLimits {
    pub prefix_lines: usize,
    pub prefix_chars: usize,
    pub suffix_lines: usize,
    pub suffix_chars: usize,
}

impl Default for ContextLimits {
    fn default() -> Self {
        Self {
            prefix_lines: 150,
            prefix_chars: 12_000,
            suffix_lines: 50,
            suffix_chars: 4_000,
        }
    }
}

/// Text before and after the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorContext {
    pub prefix: String,
    pub suffix: String,
    /// Only whitespace follows the cursor on its line.
    pub at_line_end: bool,
}

/// Char index just past the content of `line` (before its line break).
fn line_end_char(rope: &Rope, line: usize) -> usize {
    let start = rope.line_to_char(line);
    let slice = rope.line(line);
    let mut len = slice.len_chars();
    // Strip the line break: LF, CR or CRLF (the only ones this rope knows).
    if len > 0 && slice.char(len - 1) == '\n' {
        len -= 1;
    }
    if len > 0 && slice.char(len - 1) == '\r' {
        len -= 1;
    }
    start + len
}

/// Char index of an LSP position (line, UTF-16 code units). A character past the end of its line
/// means the end of the line (as LSP says); a line past the end of the document is `None`, except
/// the line just after the last one... which `len_lines` already counts.
pub fn char_index(rope: &Rope, pos: Position) -> Option<usize> {
    let line = usize::try_from(pos.line).ok()?;
    if line >= rope.len_lines() {
        return None;
    }
    let line_start = rope.line_to_char(line);
    let content_end = line_end_char(rope, line);
    let content = rope.slice(line_start..content_end);
    let col = usize::try_from(pos.character).ok()?;
    if col >= content.len_utf16_cu() {
        return Some(content_end);
    }
    Some(line_start + content.utf16_cu_to_char(col))
}

/// LSP position of a char index.
pub fn position_of(rope: &Rope, char_idx: usize) -> Position {
    let char_idx = char_idx.min(rope.len_chars());
    let line = rope.char_to_line(char_idx);
    let line_start = rope.line_to_char(line);
    let col = rope.slice(line_start..char_idx).len_utf16_cu();
    Position::new(
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(sl: u32, sc: u32, el: u32, ec: u32, text: &str) -> TextDocumentContentChangeEvent {
        TextDocumentContentChangeEvent {
            range: Some(Range::new(Position::new(sl, sc), Position::new(el, ec))),
            range_length: None,
            text: text.into(),
        }
    }

    #[test]
    fn utf16_positions_with_emoji_and_cjk() {
        // 😀 is two UTF-16 code units, 漢 one.
        let mut d = Document::new("rust".into(), 1, "a😀b\n漢字x\r\nend");
        d.apply(&change(0, 3, 0, 3, "Z")).expect("in range");
        assert_eq!(d.text.to_string(), "a😀Zb\n漢字x\r\nend");
        d.apply(&change(1, 1, 1, 2, "")).expect("in range");
        assert_eq!(d.text.to_string(), "a😀Zb\n漢x\r\nend");
        // Past the end of a line clamps to the line end, before CRLF.
        d.apply(&change(1, 99, 1, 99, "!")).expect("in range");
        assert_eq!(d.text.to_string(), "a😀Zb\n漢x!\r\nend");
        assert!(d.apply(&change(9, 0, 9, 0, "?")).is_err());
        assert_eq!(position_of(&d.text, 3), Position::new(0, 4));
    }

    #[test]
    fn context_splits_at_cursor() {
        let d = Document::new("rust".into(), 1, "fn 😀() {\n    let x = 1;\n}\n");
        let ctx = d
            .context(Position::new(1, 7), ContextLimits::default())
            .expect("ctx");
        assert_eq!(ctx.prefix, "fn 😀() {\n    let");
        assert_eq!(ctx.suffix, " x = 1;\n}\n");
        assert!(!ctx.at_line_end);
        let end = d
            .context(Position::new(1, 14), ContextLimits::default())
            .expect("ctx");
        assert!(end.at_line_end);
        let small = ContextLimits {
            prefix_lines: 0,
            prefix_chars: 3,
            suffix_lines: 0,
            suffix_chars: 100,
        };
        let ctx = d.context(Position::new(1, 7), small).expect("ctx");
        assert_eq!(ctx.prefix, "let");
        assert_eq!(ctx.suffix, " x = 1;");
    }
}
