//! The documents one client has open (synced by the bridge): bounded text store, recent edit places, and a
//! per-document definition index rebuilt only after the document changes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use lapce_ai_transport::protocol::{ByteEdit, DocumentContent, DocumentSync};

/// How much a workspace store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLimits {
    /// Open documents kept; the least recently touched one is evicted beyond this.
    pub max_documents: usize,
    /// Larger documents are refused (logged once per sync) and not used as context.
    pub max_document_bytes: usize,
    /// Recent edit places remembered across all documents.
    pub max_recent_edits: usize,
}

impl Default for WorkspaceLimits {
    fn default() -> Self {
        Self {
            max_documents: 64,
            max_document_bytes: 1024 * 1024,
            max_recent_edits: 16,
        }
    }
}

/// Why a synced document was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{bytes} bytes is over the {limit}-byte limit for context documents")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the text is not UTF-8")]
    NotUtf8,
    #[error("the text looks binary (it contains NUL bytes)")]
    Binary,
    #[error("an edit does not fit the document (range {start}..{end} of {len} bytes)")]
    EditOutOfRange { start: u64, end: u64, len: usize },
    #[error("edits for version {base} but the engine has version {have}")]
    VersionMismatch { base: i32, have: i32 },
    #[error("edits for a document the engine does not have")]
    Unknown,
}

/// A place the user edited: a byte offset in a document's current text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditPlace {
    pub path: Arc<str>,
    pub offset: usize,
}

/// Names defined in a document (`fn NAME`, `class NAME`, `const NAME =`, ...) and the lines defining them.
#[derive(Debug, Default)]
pub struct DefinitionIndex {
    by_name: HashMap<String, Vec<usize>>,
}

impl DefinitionIndex {
    /// Lines (0-based) where `name` is defined.
    pub fn lines(&self, name: &str) -> &[usize] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// One open document.
#[derive(Debug)]
pub struct StoredDocument {
    pub path: Arc<str>,
    pub language_id: String,
    pub version: i32,
    text: String,
    /// The store's clock when it was last opened or edited (larger = more recent).
    pub touched: u64,
    line_starts: OnceLock<Vec<usize>>,
    definitions: OnceLock<DefinitionIndex>,
}

impl StoredDocument {
    fn new(path: Arc<str>, language_id: String, version: i32, text: String, touched: u64) -> Self {
        Self {
            path,
            language_id,
            version,
            text,
            touched,
            line_starts: OnceLock::new(),
            definitions: OnceLock::new(),
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Byte offsets where each line starts (cached until the next change).
    pub fn line_starts(&self) -> &[usize] {
        self.line_starts.get_or_init(|| {
            std::iter::once(0)
                .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        })
    }

    pub fn line_count(&self) -> usize {
        self.line_starts().len()
    }

    /// The 0-based line holding byte `offset`.
    pub fn line_of(&self, offset: usize) -> usize {
        let starts = self.line_starts();
        starts
            .partition_point(|&start| start <= offset)
            .saturating_sub(1)
    }

    /// Lines `first..end` (0-based, end exclusive, clamped) as one string.
    pub fn lines(&self, first: usize, end: usize) -> &str {
        let starts = self.line_starts();
        let end = end.min(starts.len());
        if first >= end {
            return "";
        }
        let from = starts[first];
        let to = starts.get(end).copied().unwrap_or(self.text.len());
        &self.text[from..to]
    }

    /// The text of line `line` without its line break.
    pub fn line(&self, line: usize) -> &str {
        self.lines(line, line + 1).trim_end_matches(['\n', '\r'])
    }

    /// The definition index (built on first use after a change).
    pub fn definitions(&self) -> &DefinitionIndex {
        self.definitions
            .get_or_init(|| index_definitions(&self.text))
    }

    fn changed(&mut self) {
        self.line_starts = OnceLock::new();
        self.definitions = OnceLock::new();
    }
}

/// The documents of one client connection.
#[derive(Debug, Default)]
pub struct WorkspaceStore {
    limits: WorkspaceLimits,
    documents: HashMap<Arc<str>, StoredDocument>,
    recent_edits: VecDeque<EditPlace>,
    clock: u64,
}

impl WorkspaceStore {
    pub fn new(limits: WorkspaceLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    pub fn document(&self, path: &str) -> Option<&StoredDocument> {
        self.documents.get(path)
    }

    pub fn documents(&self) -> impl Iterator<Item = &StoredDocument> {
        self.documents.values()
    }

    pub fn len(&self) -> usize {
        self.documents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }

    /// Edit places, most recent first.
    pub fn recent_edits(&self) -> impl Iterator<Item = &EditPlace> {
        self.recent_edits.iter().rev()
    }

    /// Applies one `DocumentSync`. A refused document is dropped from the store (so stale text is never used)
    /// and the reason is logged; nothing here can fail the connection.
    pub fn apply(&mut self, sync: &DocumentSync) -> Result<(), Refused> {
        let result = match &sync.content {
            DocumentContent::Full(text) => {
                self.open(&sync.path, &sync.language_id, sync.version, text)
            }
            DocumentContent::Edits {
                base_version,
                edits,
            } => self.edit(&sync.path, *base_version, sync.version, edits),
        };
        if let Err(reason) = &result {
            if self.remove(&sync.path) || !matches!(reason, Refused::Unknown) {
                tracing::info!(path = %sync.path, %reason, "not using this document as completion context");
            }
        }
        result
    }

    /// Stores (or replaces) a document's whole text.
    pub fn open(
        &mut self,
        path: &str,
        language_id: &str,
        version: i32,
        text: &[u8],
    ) -> Result<(), Refused> {
        if text.len() > self.limits.max_document_bytes {
            return Err(Refused::TooLarge {
                bytes: text.len(),
                limit: self.limits.max_document_bytes,
            });
        }
        let text = std::str::from_utf8(text).map_err(|_| Refused::NotUtf8)?;
        if text.contains('\0') {
            return Err(Refused::Binary);
        }
        self.clock += 1;
        self.recent_edits.retain(|place| &*place.path != path);
        let path: Arc<str> = Arc::from(path);
        let document = StoredDocument::new(
            Arc::clone(&path),
            language_id.to_owned(),
            version,
            text.to_owned(),
            self.clock,
        );
        self.documents.insert(path, document);
        self.evict_beyond_limit();
        Ok(())
    }

    /// Applies edits made to version `base_version`, giving version `version`.
    pub fn edit(
        &mut self,
        path: &str,
        base_version: i32,
        version: i32,
        edits: &[ByteEdit],
    ) -> Result<(), Refused> {
        let limit = self.limits.max_document_bytes;
        let document = self.documents.get_mut(path).ok_or(Refused::Unknown)?;
        if document.version != base_version {
            return Err(Refused::VersionMismatch {
                base: base_version,
                have: document.version,
            });
        }
        let mut places = Vec::with_capacity(edits.len());
        for edit in edits {
            let len = document.text.len();
            let out_of_range = || Refused::EditOutOfRange {
                start: edit.start,
                end: edit.end,
                len,
            };
            let start = usize::try_from(edit.start).map_err(|_| out_of_range())?;
            let end = usize::try_from(edit.end).map_err(|_| out_of_range())?;
            if start > end
                || end > len
                || !document.text.is_char_boundary(start)
                || !document.text.is_char_boundary(end)
            {
                return Err(out_of_range());
            }
            let inserted = std::str::from_utf8(&edit.text).map_err(|_| Refused::NotUtf8)?;
            if inserted.contains('\0') {
                return Err(Refused::Binary);
            }
            let new_len = len - (end - start) + inserted.len();
            if new_len > limit {
                return Err(Refused::TooLarge {
                    bytes: new_len,
                    limit,
                });
            }
            document.text.replace_range(start..end, inserted);
            places.push((start, end, inserted.len()));
        }
        document.version = version;
        document.changed();
        self.clock += 1;
        document.touched = self.clock;
        let path = Arc::clone(&document.path);
        for (start, end, inserted) in places {
            self.record_edit(&path, start, end, inserted);
        }
        Ok(())
    }

    /// Forgets a document; true if it was there.
    pub fn remove(&mut self, path: &str) -> bool {
        self.recent_edits.retain(|place| &*place.path != path);
        self.documents.remove(path).is_some()
    }

    /// Shifts remembered places behind an edit and records where it happened (merging with the last place
    /// when the user keeps typing at the same spot).
    fn record_edit(&mut self, path: &Arc<str>, start: usize, end: usize, inserted: usize) {
        for place in self.recent_edits.iter_mut().filter(|p| p.path == *path) {
            if place.offset >= end {
                place.offset = place.offset - (end - start) + inserted;
            } else if place.offset > start {
                place.offset = start + inserted;
            }
        }
        let offset = start + inserted;
        /// Edits closer than this to the latest place count as the same place.
        const SAME_PLACE_BYTES: usize = 256;
        if let Some(last) = self.recent_edits.back_mut() {
            if last.path == *path && last.offset.abs_diff(offset) <= SAME_PLACE_BYTES {
                last.offset = offset;
                return;
            }
        }
        self.recent_edits
            .retain(|p| !(p.path == *path && p.offset.abs_diff(offset) <= SAME_PLACE_BYTES));
        self.recent_edits.push_back(EditPlace {
            path: Arc::clone(path),
            offset,
        });
        while self.recent_edits.len() > self.limits.max_recent_edits.max(1) {
            self.recent_edits.pop_front();
        }
    }

    fn evict_beyond_limit(&mut self) {
        while self.documents.len() > self.limits.max_documents.max(1) {
            let Some(oldest) = self
                .documents
                .values()
                .min_by_key(|d| d.touched)
                .map(|d| Arc::clone(&d.path))
            else {
                return;
            };
            tracing::debug!(path = %oldest, "evicting the least recently used context document");
            self.remove(&oldest);
        }
    }
}

/// Words that may precede a definition keyword.
const MODIFIERS: &[&str] = &[
    "pub",
    "export",
    "default",
    "async",
    "static",
    "public",
    "private",
    "protected",
    "internal",
    "abstract",
    "final",
    "unsafe",
    "extern",
    "inline",
    "override",
    "open",
    "sealed",
    "data",
    "declare",
    "const",
    "readonly",
];

/// Keywords followed by the name they define.
const DEFINITION_KEYWORDS: &[&str] = &[
    "fn",
    "def",
    "class",
    "func",
    "function",
    "struct",
    "enum",
    "trait",
    "type",
    "interface",
    "union",
    "mod",
    "module",
    "object",
    "record",
    "macro_rules!",
];

/// Keywords that define a name only when an `=` follows (`let x = ...`).
const BINDING_KEYWORDS: &[&str] = &["const", "let", "var", "val", "static"];

/// Scans every line for a definition (language-agnostic heuristics).
fn index_definitions(text: &str) -> DefinitionIndex {
    let mut index = DefinitionIndex::default();
    for (line_number, line) in text.lines().enumerate() {
        if let Some(name) = defined_name(line) {
            index
                .by_name
                .entry(name.to_owned())
                .or_default()
                .push(line_number);
        }
    }
    index
}

/// The name a line defines, if it looks like a definition.
pub fn defined_name(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    // A binding keyword may also be a modifier (`const fn`), so look at it before skipping modifiers.
    loop {
        let (word, after) = split_word(rest)?;
        if BINDING_KEYWORDS.contains(&word) {
            let after = after.trim_start();
            let after = after.strip_prefix("mut ").unwrap_or(after).trim_start();
            if let Some((name, tail)) = split_identifier(after) {
                let tail = tail.trim_start();
                let assigned = tail.starts_with('=') && !tail.starts_with("==");
                if assigned || tail.starts_with(':') && tail.contains('=') {
                    return Some(name);
                }
            }
        }
        if DEFINITION_KEYWORDS.contains(&word) {
            let mut after = after.trim_start();
            if word == "func" && after.starts_with('(') {
                // Go method: `func (r *T) Name(`.
                after = after[after.find(')')? + 1..].trim_start();
            }
            return split_identifier(after).map(|(name, _)| name);
        }
        if !MODIFIERS.contains(&word) && !word.starts_with("pub(") {
            return None;
        }
        rest = after.trim_start();
    }
}

/// The first whitespace-separated word and the rest.
fn split_word(text: &str) -> Option<(&str, &str)> {
    if text.is_empty() {
        return None;
    }
    let end = text.find(char::is_whitespace).unwrap_or(text.len());
    Some((&text[..end], &text[end..]))
}

/// A leading identifier (`[A-Za-z_$][A-Za-z0-9_$]*`) and the rest.
pub fn split_identifier(text: &str) -> Option<(&str, &str)> {
    let end = text
        .char_indices()
        .find(|&(i, c)| !(is_identifier_char(c) && (i > 0 || !c.is_ascii_digit())))
        .map_or(text.len(), |(i, _)| i);
    (end > 0).then(|| (&text[..end], &text[end..]))
}

pub fn is_identifier_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(path: &str, text: &str, version: i32) -> DocumentSync {
        DocumentSync {
            path: path.into(),
            language_id: "rust".into(),
            version,
            content: DocumentContent::Full(text.as_bytes().to_vec()),
        }
    }

    fn edit(path: &str, base: i32, start: u64, end: u64, text: &str) -> DocumentSync {
        DocumentSync {
            path: path.into(),
            language_id: "rust".into(),
            version: base + 1,
            content: DocumentContent::Edits {
                base_version: base,
                edits: vec![ByteEdit {
                    start,
                    end,
                    text: text.as_bytes().to_vec(),
                }],
            },
        }
    }

    #[test]
    fn definitions_are_found_across_languages() {
        let cases = [
            ("pub fn parse_config(text: &str) {", Some("parse_config")),
            ("    pub(crate) async fn load() {", Some("load")),
            ("def compute_total(items):", Some("compute_total")),
            ("async def fetch(url):", Some("fetch")),
            ("class Invoice(Base):", Some("Invoice")),
            ("export default class Widget {", Some("Widget")),
            ("func (s *Server) Serve(addr string) error {", Some("Serve")),
            ("func main() {", Some("main")),
            ("pub struct Totals {", Some("Totals")),
            ("export interface Shape {", Some("Shape")),
            ("type Alias = u32;", Some("Alias")),
            ("const MAX_ITEMS = 10;", Some("MAX_ITEMS")),
            ("pub const LIMIT: usize = 4;", Some("LIMIT")),
            ("let mut counter = 0;", Some("counter")),
            ("export const handler = () => {}", Some("handler")),
            ("var total = 0", Some("total")),
            ("function render(x) {", Some("render")),
            ("let value;", None),
            ("if x == y {", None),
            ("return compute_total(items)", None),
            ("const fn limit() -> u32 {", Some("limit")),
        ];
        for (line, expected) in cases {
            assert_eq!(defined_name(line), expected, "{line}");
        }
    }

    #[test]
    fn edits_apply_in_utf8_and_move_the_edit_places() {
        let mut store = WorkspaceStore::new(WorkspaceLimits::default());
        store
            .apply(&full("a.rs", "fn é() {}\nfn b() {}\n", 1))
            .unwrap();
        // Insert at the start of line 2 (byte 11: "fn é() {}\n" is 11 bytes, é being 2).
        store.apply(&edit("a.rs", 1, 11, 11, "// x\n")).unwrap();
        let doc = store.document("a.rs").unwrap();
        assert_eq!(doc.text(), "fn é() {}\n// x\nfn b() {}\n");
        assert_eq!(doc.version, 2);
        assert_eq!(doc.line(1), "// x");
        assert_eq!(doc.definitions().lines("b"), &[2]);
        let places: Vec<_> = store.recent_edits().cloned().collect();
        assert_eq!(places.len(), 1);
        assert_eq!(places[0].offset, 16);
        // A far-away edit earlier in the file shifts the remembered place.
        store.apply(&full("a.rs", &"x\n".repeat(400), 5)).unwrap();
        store.apply(&edit("a.rs", 5, 700, 700, "abc")).unwrap();
        store.apply(&edit("a.rs", 6, 0, 2, "")).unwrap();
        let offsets: Vec<usize> = store.recent_edits().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![0, 701]);
    }

    #[test]
    fn a_split_character_a_bad_range_or_a_stale_version_drops_the_document() {
        let mut store = WorkspaceStore::new(WorkspaceLimits::default());
        store.apply(&full("a.rs", "é", 1)).unwrap();
        assert!(matches!(
            store.apply(&edit("a.rs", 1, 1, 1, "x")),
            Err(Refused::EditOutOfRange { .. })
        ));
        assert!(store.document("a.rs").is_none());
        store.apply(&full("a.rs", "abc", 1)).unwrap();
        assert!(matches!(
            store.apply(&edit("a.rs", 1, 2, 9, "x")),
            Err(Refused::EditOutOfRange { .. })
        ));
        store.apply(&full("a.rs", "abc", 1)).unwrap();
        assert_eq!(
            store.apply(&edit("a.rs", 7, 0, 0, "x")),
            Err(Refused::VersionMismatch { base: 7, have: 1 })
        );
        assert!(store.is_empty());
        assert_eq!(
            store.apply(&edit("b.rs", 1, 0, 0, "x")),
            Err(Refused::Unknown)
        );
    }

    #[test]
    fn huge_binary_and_non_utf8_documents_are_refused() {
        let mut store = WorkspaceStore::new(WorkspaceLimits {
            max_document_bytes: 1000,
            ..WorkspaceLimits::default()
        });
        assert_eq!(
            store.apply(&full("big.rs", &"x".repeat(1001), 1)),
            Err(Refused::TooLarge {
                bytes: 1001,
                limit: 1000
            })
        );
        assert_eq!(
            store.apply(&full("blob.bin", "ab\0cd", 1)),
            Err(Refused::Binary)
        );
        let latin1 = DocumentSync {
            content: DocumentContent::Full(vec![b'c', 0xe9, b'\n']),
            ..full("latin1.txt", "", 1)
        };
        assert_eq!(store.apply(&latin1), Err(Refused::NotUtf8));
        assert!(store.is_empty());
        // An edit growing a document past the limit drops it.
        store.apply(&full("a.rs", &"x".repeat(990), 1)).unwrap();
        assert!(matches!(
            store.apply(&edit("a.rs", 1, 0, 0, &"y".repeat(20))),
            Err(Refused::TooLarge { .. })
        ));
        assert!(store.is_empty());
    }

    #[test]
    fn least_recently_touched_documents_are_evicted() {
        let mut store = WorkspaceStore::new(WorkspaceLimits {
            max_documents: 2,
            ..WorkspaceLimits::default()
        });
        store.apply(&full("a", "a", 1)).unwrap();
        store.apply(&full("b", "b", 1)).unwrap();
        store.apply(&edit("a", 1, 1, 1, "!")).unwrap();
        store.apply(&full("c", "c", 1)).unwrap();
        assert!(store.document("a").is_some());
        assert!(store.document("b").is_none());
        assert!(store.document("c").is_some());
    }
}
