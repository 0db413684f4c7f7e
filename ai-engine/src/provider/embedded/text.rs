//! Turns token bytes into streamed text: buffers UTF-8 split across tokens and holds back possible stop-string starts.

/// Accumulates token bytes and yields the longest valid UTF-8 prefix, keeping an incomplete
/// trailing sequence for the next token. Invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub(crate) struct Utf8Buffer {
    pending: Vec<u8>,
}

impl Utf8Buffer {
    /// Adds `bytes` and returns the text that is now complete.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `valid` bytes were just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Returns whatever is left (an incomplete sequence becomes U+FFFD).
    pub(crate) fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// Watches generated text for stop strings. Text is released only once it cannot be the start of a
/// stop string, so a stop string never reaches the client, even when split across tokens.
#[derive(Debug)]
pub(crate) struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

/// What [`StopScanner::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// Text safe to send now (may be empty).
    Continue(String),
    /// A stop string was found; send this text and stop.
    Stop(String),
}

impl StopScanner {
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    pub(crate) fn push(&mut self, piece: &str) -> Scan {
        self.text.push_str(piece);
        let unsent = &self.text[self.emitted..];
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| unsent.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let out = unsent[..at].to_string();
            self.emitted = self.text.len();
            return Scan::Stop(out);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(unsent, s))
            .max()
            .unwrap_or(0);
        let release = unsent.len() - hold;
        let out = unsent[..release].to_string();
        self.emitted += release;
        Scan::Continue(out)
    }

    /// Releases held-back text at the end of generation.
    pub(crate) fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop` (on char boundaries).
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_pushes() {
        let bytes = "é🙂x".as_bytes();
        let mut b = Utf8Buffer::default();
        let mut out = String::new();
        for byte in bytes {
            out.push_str(&b.push(&[*byte]));
        }
        out.push_str(&b.finish());
        assert_eq!(out, "é🙂x");
    }

    #[test]
    fn utf8_invalid_bytes_replaced() {
        let mut b = Utf8Buffer::default();
        assert_eq!(b.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        assert_eq!(b.push(&[0xf0, 0x9f]), "");
        assert_eq!(b.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_string_split_across_tokens_is_never_sent() {
        let mut s = StopScanner::new(&["\n\n".to_string(), "```".to_string()]);
        assert_eq!(s.push("return x"), Scan::Continue("return x".into()));
        assert_eq!(s.push("\n"), Scan::Continue(String::new()));
        assert_eq!(s.push("  y"), Scan::Continue("\n  y".into()));
        assert_eq!(s.push("`"), Scan::Continue(String::new()));
        assert_eq!(s.push("`` tail"), Scan::Stop(String::new()));
    }

    #[test]
    fn stop_inside_piece_cuts_text() {
        let mut s = StopScanner::new(&["END".to_string()]);
        assert_eq!(s.push("abcEN"), Scan::Continue("abc".into()));
        assert_eq!(s.push("Dxyz"), Scan::Stop(String::new()));
        let mut s = StopScanner::new(&["END".to_string()]);
        assert_eq!(s.push("abENDc"), Scan::Stop("ab".into()));
    }

    #[test]
    fn held_text_flushed_at_finish_and_no_stops_passes_through() {
        let mut s = StopScanner::new(&["\n\n".to_string()]);
        assert_eq!(s.push("a\n"), Scan::Continue("a".into()));
        assert_eq!(s.finish(), "\n");
        let mut s = StopScanner::new(&[]);
        assert_eq!(s.push("é\n"), Scan::Continue("é\n".into()));
    }
}
