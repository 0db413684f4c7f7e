//! Golden tests for completion post-processing: cases in `tests/golden/*.txt`, each run whole and streamed.
//!
//! Case format: `=== name` starts a case; header lines `key: value` follow (`language`, `mode` =
//! `auto|single|multi`, `stop` (repeatable), `chat: true`, `crlf: true`, `max_lines: N`); then sections `--- input` (the
//! document with `<|cursor|>`), `--- raw` (model output) and `--- expected` (the completion). A section's text
//! is its lines joined with `\n` without trailing empty lines; with `crlf: true` every `\n` of the input, raw
//! output and expected completion becomes `\r\n`. Lines starting with `#` outside cases are comments.

use std::path::Path;

use ai_engine::completion::{postprocess_full, CompletionFilter, FilterContext};
use lapce_ai_transport::protocol::CompletionMode;

const CURSOR: &str = "<|cursor|>";

#[derive(Debug, Default)]
struct GoldenCase {
    name: String,
    file: String,
    language: String,
    mode: CompletionMode,
    stop: Vec<String>,
    chat: bool,
    crlf: bool,
    max_lines: u32,
    input: String,
    raw: String,
    expected: String,
}

impl GoldenCase {
    fn context(&self) -> FilterContext {
        let (prefix, suffix) = self
            .input
            .split_once(CURSOR)
            .unwrap_or_else(|| panic!("case {} has no {CURSOR} marker", self.name));
        FilterContext {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
            mode: self.mode,
            stop: self.stop.clone(),
            language_id: self.language.clone(),
            chat_answer: self.chat,
            max_lines: self.max_lines,
        }
    }
}

fn parse_cases(file: &str, text: &str) -> Vec<GoldenCase> {
    let mut cases = Vec::new();
    let mut current: Option<GoldenCase> = None;
    let mut section: Option<String> = None;
    let mut section_lines: Vec<&str> = Vec::new();

    fn close_section(case: &mut GoldenCase, section: Option<String>, lines: &mut Vec<&str>) {
        let Some(section) = section else {
            lines.clear();
            return;
        };
        while lines.last() == Some(&"") {
            lines.pop();
        }
        let mut content = lines.join("\n");
        if case.crlf {
            content = content.replace('\n', "\r\n");
        }
        match section.as_str() {
            "input" => case.input = content,
            "raw" => case.raw = content,
            "expected" => case.expected = content,
            other => panic!("case {}: unknown section `{other}`", case.name),
        }
        lines.clear();
    }

    for line in text.lines() {
        if let Some(name) = line.strip_prefix("=== ") {
            if let Some(mut case) = current.take() {
                close_section(&mut case, section.take(), &mut section_lines);
                cases.push(case);
            }
            current = Some(GoldenCase {
                name: name.trim().to_string(),
                file: file.to_string(),
                ..GoldenCase::default()
            });
            continue;
        }
        let Some(case) = current.as_mut() else {
            assert!(
                line.is_empty() || line.starts_with('#'),
                "{file}: text outside a case: {line}"
            );
            continue;
        };
        if let Some(name) = line.strip_prefix("--- ") {
            close_section(case, section.take(), &mut section_lines);
            section = Some(name.trim().to_string());
            continue;
        }
        if section.is_some() {
            section_lines.push(line);
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("case {}: bad header line `{line}`", case.name));
        match key {
            "language" => case.language = value.to_string(),
            "mode" => {
                case.mode = match value {
                    "auto" => CompletionMode::Auto,
                    "single" => CompletionMode::SingleLine,
                    "multi" => CompletionMode::MultiLine,
                    other => panic!("case {}: unknown mode `{other}`", case.name),
                }
            }
            "stop" => case.stop.push(value.to_string()),
            "chat" => case.chat = value == "true",
            "crlf" => case.crlf = value == "true",
            "max_lines" => {
                case.max_lines = value
                    .parse()
                    .unwrap_or_else(|_| panic!("case {}: bad max_lines `{value}`", case.name))
            }
            other => panic!("case {}: unknown header `{other}`", case.name),
        }
    }
    if let Some(mut case) = current.take() {
        close_section(&mut case, section.take(), &mut section_lines);
        cases.push(case);
    }
    cases
}

fn load_cases() -> Vec<GoldenCase> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut paths: Vec<_> = std::fs::read_dir(&directory)
        .expect("golden directory exists")
        .map(|entry| entry.expect("readable golden entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "txt"))
        .collect();
    paths.sort();
    let mut cases = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("readable golden file");
        let file = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        cases.extend(parse_cases(&file, &text));
    }
    cases
}

/// Streams `pieces` through a filter; checks that nothing is emitted after `done`; returns the completion.
fn run_streamed(context: FilterContext, pieces: &[&str]) -> Result<String, String> {
    let mut filter = CompletionFilter::new(context);
    let mut shown = String::new();
    let mut done = false;
    for piece in pieces {
        let step = filter.push(piece);
        if done && !step.emit.is_empty() {
            return Err(format!("emitted {:?} after done", step.emit));
        }
        shown.push_str(&step.emit);
        done |= step.done;
    }
    let rest = filter.finish();
    if done && !rest.is_empty() {
        return Err(format!("finish returned {rest:?} after done"));
    }
    shown.push_str(&rest);
    Ok(shown)
}

fn char_boundaries(text: &str) -> Vec<usize> {
    text.char_indices()
        .map(|(index, _)| index)
        .chain(std::iter::once(text.len()))
        .collect()
}

#[test]
fn golden_cases_whole_output() {
    let cases = load_cases();
    assert!(
        cases.len() >= 25,
        "expected at least 25 golden cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let actual = postprocess_full(case.context(), &case.raw);
        if actual != case.expected {
            failures.push(format!(
                "{}:{}\n  expected: {:?}\n  actual:   {:?}",
                case.file, case.name, case.expected, actual
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn golden_cases_split_at_every_char_boundary_match_one_push() {
    let mut failures = Vec::new();
    for case in load_cases() {
        let whole = postprocess_full(case.context(), &case.raw);
        for split in char_boundaries(&case.raw) {
            let (head, tail) = case.raw.split_at(split);
            match run_streamed(case.context(), &[head, tail]) {
                Ok(streamed) if streamed == whole => {}
                Ok(streamed) => failures.push(format!(
                    "{}: split at byte {split}: {streamed:?} != {whole:?}",
                    case.name
                )),
                Err(problem) => {
                    failures.push(format!("{}: split at byte {split}: {problem}", case.name))
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_cases_char_by_char_and_in_irregular_pieces_match_one_push() {
    let mut failures = Vec::new();
    for case in load_cases() {
        let whole = postprocess_full(case.context(), &case.raw);
        let boundaries = char_boundaries(&case.raw);
        let single_chars: Vec<&str> = boundaries
            .windows(2)
            .map(|pair| &case.raw[pair[0]..pair[1]])
            .collect();
        match run_streamed(case.context(), &single_chars) {
            Ok(streamed) if streamed == whole => {}
            Ok(streamed) => failures.push(format!(
                "{}: char by char: {streamed:?} != {whole:?}",
                case.name
            )),
            Err(problem) => failures.push(format!("{}: char by char: {problem}", case.name)),
        }
        // Deterministic pseudo-random piece sizes (1..=5 chars), several seeds.
        for seed in 1u64..=8 {
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut pieces = Vec::new();
            let mut start = 0;
            while start + 1 < boundaries.len() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let step = 1 + (state % 5) as usize;
                let end = (start + step).min(boundaries.len() - 1);
                pieces.push(&case.raw[boundaries[start]..boundaries[end]]);
                start = end;
            }
            match run_streamed(case.context(), &pieces) {
                Ok(streamed) if streamed == whole => {}
                Ok(streamed) => failures.push(format!(
                    "{}: seed {seed}: {streamed:?} != {whole:?}",
                    case.name
                )),
                Err(problem) => failures.push(format!("{}: seed {seed}: {problem}", case.name)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn crlf_split_between_carriage_return_and_line_feed_is_handled() {
    let case = load_cases()
        .into_iter()
        .find(|case| case.crlf)
        .expect("a CRLF golden case exists");
    let position = case.raw.find("\r\n").expect("raw output has CRLF");
    let (head, tail) = case.raw.split_at(position + 1);
    assert!(head.ends_with('\r'));
    let streamed = run_streamed(case.context(), &[head, tail]).expect("well-formed stream");
    assert_eq!(streamed, case.expected);
    assert!(
        streamed.contains("\r\n"),
        "completion keeps the document's CRLF"
    );
}

#[test]
fn streaming_shows_decided_text_before_the_provider_ends() {
    // Multi-line body: text is shown as soon as no rule can cut it any more.
    let context = FilterContext {
        prefix: "fn add(a: i32, b: i32) -> i32 {\n    ".to_string(),
        suffix: "\n}\n".to_string(),
        mode: CompletionMode::Auto,
        stop: Vec::new(),
        language_id: "rust".to_string(),
        chat_answer: false,
        max_lines: 0,
    };
    let mut filter = CompletionFilter::new(context);
    let first = filter.push("let sum = a + b;\n    su");
    assert_eq!(first.emit, "let sum = a + b;\n    su");
    assert!(!first.done);
    let second = filter.push("m\n}\nfn main() {}");
    assert!(second.done, "the enclosing brace ends generation");
    assert_eq!(second.emit, "m");
    assert_eq!(filter.finish(), "");
}
