//! A document's indentation style (tabs, or spaces of some width), detected from its lines, and rendering in it.

/// Columns a tab counts for when indentation widths are compared.
pub const TAB_WIDTH: usize = 4;

/// How many leading characters a line may have to count in detection (longer runs are alignment or data).
const MAX_DETECTED_INDENT: usize = 64;

/// How a document indents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndentStyle {
    Tabs,
    /// Spaces, this many per level.
    Spaces(usize),
}

impl IndentStyle {
    /// The style most of `lines` use, or `None` when they do not say (no indented lines).
    ///
    /// Tabs win when more lines start with a tab than with two or more spaces (one space is usually the ` *`
    /// of a block comment). The width of a space level is the most frequent increase of indentation between
    /// consecutive non-blank lines (ties go to the smaller), else the greatest common divisor of the widths.
    pub fn detect<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<IndentStyle> {
        let mut tab_lines = 0usize;
        let mut space_lines = 0usize;
        let mut increases = [0usize; 9];
        let mut divisor = 0usize;
        let mut previous: Option<usize> = None;
        for line in lines {
            if line.trim().is_empty() {
                continue;
            }
            let leading = leading_whitespace(line);
            if leading.starts_with('\t') {
                tab_lines += 1;
                previous = None;
                continue;
            }
            let width = leading.len();
            if leading.contains('\t') || width > MAX_DETECTED_INDENT {
                previous = None;
                continue;
            }
            if width >= 2 {
                space_lines += 1;
                divisor = greatest_common_divisor(divisor, width);
            }
            if let Some(before) = previous {
                if width > before && width - before < increases.len() && width - before >= 2 {
                    increases[width - before] += 1;
                }
            }
            previous = Some(width);
        }
        if tab_lines == 0 && space_lines == 0 {
            return None;
        }
        if tab_lines > space_lines {
            return Some(IndentStyle::Tabs);
        }
        let most_frequent = (2..increases.len())
            .filter(|&width| increases[width] > 0)
            .max_by(|&a, &b| increases[a].cmp(&increases[b]).then(b.cmp(&a)));
        match most_frequent {
            Some(width) => Some(IndentStyle::Spaces(width)),
            None if divisor >= 2 => Some(IndentStyle::Spaces(divisor.min(8))),
            None => None,
        }
    }

    /// Columns of one indentation level.
    pub fn unit_width(self) -> usize {
        match self {
            IndentStyle::Tabs => TAB_WIDTH,
            IndentStyle::Spaces(width) => width,
        }
    }

    /// Indentation of `width` columns in this style (tabs, then spaces for a remainder).
    pub fn render(self, width: usize) -> String {
        match self {
            IndentStyle::Tabs => {
                let mut text = "\t".repeat(width / TAB_WIDTH);
                text.push_str(&" ".repeat(width % TAB_WIDTH));
                text
            }
            IndentStyle::Spaces(_) => " ".repeat(width),
        }
    }
}

/// The leading spaces and tabs of `line`.
pub fn leading_whitespace(line: &str) -> &str {
    let content = line.trim_start_matches([' ', '\t']);
    &line[..line.len() - content.len()]
}

/// Leading indentation in columns (a tab counts [`TAB_WIDTH`]).
pub fn indent_width(line: &str) -> usize {
    leading_whitespace(line)
        .chars()
        .map(|character| if character == '\t' { TAB_WIDTH } else { 1 })
        .sum()
}

fn greatest_common_divisor(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        greatest_common_divisor(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_tabs_and_space_widths() {
        let go = "func f() {\n\tif x {\n\t\treturn\n\t}\n}";
        assert_eq!(IndentStyle::detect(go.lines()), Some(IndentStyle::Tabs));
        let ts = "function f() {\n  if (x) {\n    return;\n  }\n}";
        assert_eq!(
            IndentStyle::detect(ts.lines()),
            Some(IndentStyle::Spaces(2))
        );
        let python = "class A:\n    def f(self):\n        pass\n\n    def g(self):\n        pass";
        assert_eq!(
            IndentStyle::detect(python.lines()),
            Some(IndentStyle::Spaces(4))
        );
        // Only one indented level: the width itself.
        let flat = "def f():\n    a()\n    b()";
        assert_eq!(
            IndentStyle::detect(flat.lines()),
            Some(IndentStyle::Spaces(4))
        );
        assert_eq!(IndentStyle::detect("a\nb\n".lines()), None);
        // A block comment's one-space lines say nothing.
        assert_eq!(IndentStyle::detect("/**\n * doc\n */".lines()), None);
    }

    #[test]
    fn renders_and_measures() {
        assert_eq!(IndentStyle::Tabs.render(9), "\t\t ");
        assert_eq!(IndentStyle::Spaces(2).render(4), "    ");
        assert_eq!(indent_width("\t  x"), 6);
        assert_eq!(leading_whitespace(" \tx y"), " \t");
    }
}
