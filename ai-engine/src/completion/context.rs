//! Trims the text around the cursor to a prompt token budget, keeping whole lines nearest the cursor.

/// How many prompt tokens the prefix and suffix may use together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContextBudget {
    /// Tokens for prefix plus suffix (template tokens are not counted).
    pub max_prompt_tokens: usize,
    /// The largest share of `max_prompt_tokens` the suffix may take (0.0..=1.0); the prefix gets the rest.
    pub max_suffix_share: f32,
}

impl Default for ContextBudget {
    fn default() -> Self {
        ContextBudget {
            max_prompt_tokens: 1024,
            max_suffix_share: 0.25,
        }
    }
}

impl ContextBudget {
    /// The suffix's token allowance.
    pub fn suffix_tokens(&self) -> usize {
        let share = self.max_suffix_share.clamp(0.0, 1.0);
        (self.max_prompt_tokens as f64 * f64::from(share)).floor() as usize
    }
}

/// Approximates a token count as characters / 3.5, rounded up (no tokenizer needed).
pub fn approximate_tokens(text: &str) -> usize {
    let chars = text.chars().count();
    (chars * 2).div_ceil(7)
}

/// The prefix and suffix after trimming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimmedContext {
    /// The end of the original prefix (the cursor side is always kept).
    pub prefix: String,
    /// The start of the original suffix.
    pub suffix: String,
    /// True when text was dropped from the start of the prefix.
    pub prefix_truncated: bool,
    /// True when text was dropped from the end of the suffix.
    pub suffix_truncated: bool,
}

/// Trims with [`approximate_tokens`].
pub fn trim_context(prefix: &str, suffix: &str, budget: ContextBudget) -> TrimmedContext {
    trim_context_with(prefix, suffix, budget, &approximate_tokens)
}

/// Trims `prefix` and `suffix` so that together they fit `budget` as measured by `count_tokens`.
///
/// The suffix takes at most [`ContextBudget::suffix_tokens`], the prefix gets the rest (including whatever
/// the suffix left unused). Whole lines are kept, nearest the cursor first; only when the cursor's own line
/// does not fit is it cut inside, at a character boundary, keeping the characters next to the cursor.
/// Line token counts are summed, which is exact for [`approximate_tokens`] up to rounding.
pub fn trim_context_with(
    prefix: &str,
    suffix: &str,
    budget: ContextBudget,
    count_tokens: &dyn Fn(&str) -> usize,
) -> TrimmedContext {
    let suffix_allowance = budget.suffix_tokens();
    let (kept_suffix, suffix_used) = keep_leading_lines(suffix, suffix_allowance, count_tokens);
    let prefix_allowance = budget.max_prompt_tokens.saturating_sub(suffix_used);
    let kept_prefix = keep_trailing_lines(prefix, prefix_allowance, count_tokens);
    if kept_prefix.len() < prefix.len() || kept_suffix.len() < suffix.len() {
        tracing::debug!(
            prefix_bytes = prefix.len(),
            kept_prefix_bytes = kept_prefix.len(),
            suffix_bytes = suffix.len(),
            kept_suffix_bytes = kept_suffix.len(),
            "trimmed completion context to the token budget"
        );
    }
    TrimmedContext {
        prefix_truncated: kept_prefix.len() < prefix.len(),
        suffix_truncated: kept_suffix.len() < suffix.len(),
        prefix: kept_prefix.to_string(),
        suffix: kept_suffix.to_string(),
    }
}

/// The longest tail of `text` made of whole lines (plus the unterminated last line) within `allowance`.
fn keep_trailing_lines<'a>(
    text: &'a str,
    allowance: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> &'a str {
    if count_tokens(text) <= allowance {
        return text;
    }
    // The cursor line: the text after the last newline.
    let cursor_line_start = text.rfind('\n').map_or(0, |index| index + 1);
    let cursor_line = &text[cursor_line_start..];
    let mut used = count_tokens(cursor_line);
    if used > allowance {
        return keep_tail_chars(cursor_line, allowance, count_tokens);
    }
    let mut start = cursor_line_start;
    while start > 0 {
        // `start - 1` is the newline ending the previous line.
        let previous_line_start = text[..start - 1].rfind('\n').map_or(0, |index| index + 1);
        let line_tokens = count_tokens(&text[previous_line_start..start]);
        if used + line_tokens > allowance {
            break;
        }
        used += line_tokens;
        start = previous_line_start;
    }
    &text[start..]
}

/// The longest head of `text` made of whole lines (starting with the cursor line's rest) within `allowance`,
/// and the tokens it uses.
fn keep_leading_lines<'a>(
    text: &'a str,
    allowance: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> (&'a str, usize) {
    let total = count_tokens(text);
    if total <= allowance {
        return (text, total);
    }
    let cursor_rest_end = text.find('\n').unwrap_or(text.len());
    let mut used = count_tokens(&text[..cursor_rest_end]);
    if used > allowance {
        let head = keep_head_chars(&text[..cursor_rest_end], allowance, count_tokens);
        return (head, count_tokens(head));
    }
    let mut end = cursor_rest_end;
    while end < text.len() {
        // `end` is at a newline; the next line runs to the following newline (exclusive).
        let next_end = text[end + 1..]
            .find('\n')
            .map_or(text.len(), |index| end + 1 + index);
        let line_tokens = count_tokens(&text[end..next_end]);
        if used + line_tokens > allowance {
            break;
        }
        used += line_tokens;
        end = next_end;
    }
    (&text[..end], used)
}

/// The longest char-boundary tail of `line` within `allowance` (binary search on the character count).
fn keep_tail_chars<'a>(
    line: &'a str,
    allowance: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> &'a str {
    let boundaries: Vec<usize> = line.char_indices().map(|(index, _)| index).collect();
    // Candidate k keeps the last k chars: starts at boundaries[len - k] (k = 0 keeps nothing).
    let tail_for = |kept: usize| -> &'a str {
        if kept == 0 {
            ""
        } else {
            &line[boundaries[boundaries.len() - kept]..]
        }
    };
    let (mut low, mut high) = (0usize, boundaries.len());
    while low < high {
        let middle = (low + high).div_ceil(2);
        if count_tokens(tail_for(middle)) <= allowance {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    tail_for(low)
}

/// The longest char-boundary head of `line` within `allowance`.
fn keep_head_chars<'a>(
    line: &'a str,
    allowance: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> &'a str {
    let mut ends: Vec<usize> = line
        .char_indices()
        .map(|(index, _)| index)
        .skip(1)
        .collect();
    ends.push(line.len());
    let head_for = |kept: usize| -> &'a str {
        if kept == 0 {
            ""
        } else {
            &line[..ends[kept - 1]]
        }
    };
    let (mut low, mut high) = (0usize, ends.len());
    while low < high {
        let middle = (low + high).div_ceil(2);
        if count_tokens(head_for(middle)) <= allowance {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    head_for(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per character: makes budgets easy to reason about.
    fn per_char(text: &str) -> usize {
        text.chars().count()
    }

    fn budget(max_prompt_tokens: usize, max_suffix_share: f32) -> ContextBudget {
        ContextBudget {
            max_prompt_tokens,
            max_suffix_share,
        }
    }

    #[test]
    fn approximate_tokens_is_chars_over_three_and_a_half() {
        assert_eq!(approximate_tokens(""), 0);
        assert_eq!(approximate_tokens("abc"), 1);
        assert_eq!(approximate_tokens("abcdefg"), 2);
        assert_eq!(approximate_tokens("abcdefgh"), 3);
        // Characters, not bytes.
        assert_eq!(approximate_tokens("ééééééé"), 2);
    }

    #[test]
    fn small_context_is_kept_whole() {
        let trimmed = trim_context("fn main() {\n    ", "\n}\n", ContextBudget::default());
        assert_eq!(trimmed.prefix, "fn main() {\n    ");
        assert_eq!(trimmed.suffix, "\n}\n");
        assert!(!trimmed.prefix_truncated && !trimmed.suffix_truncated);
    }

    #[test]
    fn prefix_keeps_whole_lines_nearest_the_cursor() {
        let prefix = "line one\nline two\nline three\n    cur";
        // 20 tokens: "    cur" (7) + "line three\n" (11) = 18 fits, adding "line two\n" (9) does not.
        let trimmed = trim_context_with(prefix, "", budget(20, 0.25), &per_char);
        assert_eq!(trimmed.prefix, "line three\n    cur");
        assert!(trimmed.prefix_truncated);
        assert!(!trimmed.suffix_truncated);
    }

    #[test]
    fn suffix_is_capped_at_its_share_and_keeps_leading_lines() {
        let suffix = ");\nsecond line\nthird line\n";
        // Suffix share 25% of 40 = 10: ");" (2) + "\nsecond line" (12) = 14 > 10, so only ");".
        let trimmed = trim_context_with("let x = foo(", suffix, budget(40, 0.25), &per_char);
        assert_eq!(trimmed.suffix, ");");
        assert!(trimmed.suffix_truncated);
        assert_eq!(trimmed.prefix, "let x = foo(");
    }

    #[test]
    fn prefix_gets_the_share_the_suffix_leaves_unused() {
        let prefix = "aaaa\nbbbb\ncccc\ndddd";
        // Budget 20, suffix uses 2, prefix may use 18: "dddd" (4) + "cccc\n" (5) + "bbbb\n" (5) + "aaaa\n" (5) = 19 > 18.
        let trimmed = trim_context_with(prefix, "xy", budget(20, 0.5), &per_char);
        assert_eq!(trimmed.suffix, "xy");
        assert_eq!(trimmed.prefix, "bbbb\ncccc\ndddd");
    }

    #[test]
    fn an_overlong_cursor_line_is_cut_at_a_char_boundary_next_to_the_cursor() {
        let prefix = "intro\nlet s = \"ééééé";
        let trimmed = trim_context_with(prefix, "", budget(4, 0.25), &per_char);
        assert_eq!(trimmed.prefix, "éééé");
        let suffix = "ööööö\" ;\nnext";
        let trimmed = trim_context_with("", suffix, budget(12, 0.25), &per_char);
        assert_eq!(trimmed.suffix, "ööö");
    }

    #[test]
    fn pluggable_counter_is_used() {
        // Count words instead of characters.
        let words = |text: &str| text.split_whitespace().count();
        let prefix = "one two three\nfour five\nsix";
        let trimmed = trim_context_with(prefix, "", budget(3, 0.0), &words);
        assert_eq!(trimmed.prefix, "four five\nsix");
    }

    #[test]
    fn zero_budget_keeps_nothing() {
        let trimmed = trim_context_with("abc\ndef", "ghi\njkl", budget(0, 0.25), &per_char);
        assert_eq!(trimmed.prefix, "");
        assert_eq!(trimmed.suffix, "");
        assert!(trimmed.prefix_truncated && trimmed.suffix_truncated);
    }
}
