//! Where a prefix-first FIM prompt starts the middle, so that typing appends to the prompt instead of changing it in front of the suffix.
//!
//! In a prefix-suffix-middle prompt (`<PRE>prefix<SUF>suffix<MID>`) every keystroke changes the end of the
//! prefix, which sits in front of the suffix, so a prompt cache (the embedded model's KV cache, llama.cpp
//! server's `cache_prompt`) evaluates the whole suffix again on every keystroke. Moving the last lines of the
//! prefix after the middle marker (`<PRE>head<SUF>suffix<MID>tail`) keeps everything up to the tail unchanged
//! while the user types, so only the typed tokens are new. The model reads the same text in the same roles:
//! FIM training cuts the middle out at arbitrary points, and a middle whose first lines are given is the
//! ordinary left-to-right continuation of such a middle.
//!
//! The split point (the *anchor*) must stay put while the user types, and also when the editor's window over
//! the file drops a line at its top, so it is chosen by content, never by offset: it is the start of the line
//! after the last *marker* line above the cursor's line. A marker is a complete, non-blank line whose hash is
//! 0 modulo [`MARKER_EVERY`], so about one line in eight is one: the tail holds about eight lines, and
//! finishing a line moves the anchor (one full evaluation) about once every eight new lines. When no marker is
//! near, the anchor is the start of the cursor's line.

use std::hash::{DefaultHasher, Hash, Hasher};

#[cfg(test)]
use crate::provider::split_at_middle;

/// About one complete line in this many is a marker.
const MARKER_EVERY: u64 = 8;
/// The tail holds at most this many complete lines before the cursor's line.
const MAX_TAIL_LINES: usize = 32;
/// The tail holds at most this many bytes.
const MAX_TAIL_BYTES: usize = 2048;

/// The byte index in `prefix` where the middle should start: always the start of a line, never 0. `None`
/// when the prefix is one line, or the cursor's line alone is longer than the tail may be.
pub fn middle_start(prefix: &str) -> Option<usize> {
    let cursor_line = prefix.rfind('\n').map(|newline| newline + 1)?;
    if prefix.len() - cursor_line > MAX_TAIL_BYTES {
        return None;
    }
    // `start` is the start of a line; the line above it ends at `start - 1` (its newline).
    let mut start = cursor_line;
    for _ in 0..=MAX_TAIL_LINES {
        // The first line of the prefix may be cut by the editor's window (it moves as the window does), so it
        // never serves as a marker.
        let Some(line_start) = prefix[..start - 1].rfind('\n').map(|newline| newline + 1) else {
            break;
        };
        if is_marker(&prefix[line_start..start - 1]) {
            return Some(start);
        }
        if prefix.len() - line_start > MAX_TAIL_BYTES {
            break;
        }
        start = line_start;
    }
    Some(cursor_line)
}

fn is_marker(line: &str) -> bool {
    let line = line.trim_end();
    if line.trim_start().is_empty() {
        return false;
    }
    let mut hasher = DefaultHasher::new();
    line.hash(&mut hasher);
    hasher.finish().is_multiple_of(MARKER_EVERY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Python-like file of `lines` distinct lines.
    fn file(lines: usize) -> String {
        (0..lines)
            .map(|i| format!("    value_{i} = compute({i}, {})\n", i * 7))
            .collect()
    }

    #[test]
    fn the_middle_starts_at_a_line_after_a_marker() {
        let prefix = file(200) + "    result = ";
        let at = middle_start(&prefix).expect("a split");
        assert!(at > 0 && prefix.as_bytes()[at - 1] == b'\n');
        let (head, tail) = split_at_middle(&prefix, Some(at));
        assert_eq!(format!("{head}{tail}"), prefix);
        assert!(tail.ends_with("    result = "));
        assert!(tail.len() <= MAX_TAIL_BYTES);
        // The line above the anchor is a marker unless the cursor's line is the fallback.
        let line_above = head[..head.len() - 1].rsplit('\n').next().unwrap_or("");
        let cursor_line = prefix.rfind('\n').map_or(0, |i| i + 1);
        assert!(is_marker(line_above) || at == cursor_line);
    }

    #[test]
    fn typing_on_the_cursor_line_keeps_the_anchor() {
        let mut prefix = file(300);
        let first = middle_start(&prefix).expect("a split");
        for ch in "total = sum(values) if values else 0".chars() {
            prefix.push(ch);
            assert_eq!(middle_start(&prefix), Some(first), "after {prefix:?}");
        }
    }

    #[test]
    fn dropping_lines_at_the_top_keeps_the_tail() {
        // The editor's window moves down one line at a time: the tail (text from the anchor) must not change.
        let full = file(400) + "    x = ";
        let at = middle_start(&full).expect("a split");
        let tail = &full[at..];
        let mut window = full.as_str();
        for _ in 0..100 {
            window = &window[window.find('\n').expect("a line") + 1..];
            let moved = middle_start(window).expect("a split");
            assert_eq!(&window[moved..], tail);
        }
    }

    #[test]
    fn new_lines_move_the_anchor_only_at_markers() {
        // Type 200 new lines; the anchor moves only when a finished line is a marker, so rarely.
        let mut prefix = file(100);
        let mut moves = 0;
        let mut last = middle_start(&prefix);
        for i in 0..200 {
            prefix.push_str(&format!("    typed_{i} = call({i})\n"));
            let now = middle_start(&prefix);
            if now != last {
                moves += 1;
            }
            last = now;
            let tail = &prefix[now.expect("a split")..];
            assert!(tail.lines().count() <= MAX_TAIL_LINES + 1);
        }
        // About one in eight lines is a marker; allow wide statistical slack but fail on "every line".
        assert!(
            (5..=80).contains(&moves),
            "{moves} anchor moves in 200 lines"
        );
    }

    #[test]
    fn blank_lines_are_never_markers_and_limits_hold() {
        assert!(!is_marker(""));
        assert!(!is_marker("   \r"));
        // One-line prefixes and huge cursor lines are not split.
        assert_eq!(middle_start("x = foo("), None);
        let long_line = format!("a\n{}", "y".repeat(MAX_TAIL_BYTES + 1));
        assert_eq!(middle_start(&long_line), None);
        // Only blank lines above: the cursor's line starts the middle.
        let prefix = format!("{}    z = ", "\n".repeat(50));
        assert_eq!(middle_start(&prefix), Some(50));
        // A split index that is not a char boundary is ignored.
        assert_eq!(split_at_middle("é\nx", Some(1)), ("é\nx", ""));
        assert_eq!(split_at_middle("ab\ncd", Some(3)), ("ab\n", "cd"));
        assert_eq!(split_at_middle("ab", None), ("ab", ""));
    }
}
