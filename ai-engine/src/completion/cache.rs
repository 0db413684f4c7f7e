//! A small LRU cache of finished completions with expiry and type-through hits.
//!
//! Entries are keyed by a [`CacheScope`] (model, completion mode, line limit), the prefix (its length plus a
//! hash of its last [`PREFIX_TAIL_BYTES`]) and the suffix (a hash of its first [`SUFFIX_HEAD_BYTES`]). When a
//! completion `C` is stored for prefix `P`, a lookup for prefix `P + C[..k]` with the same suffix (the user
//! typed the first `k` bytes of the ghost text) hits and returns `C[k..]`. Capacity is small (default 256), so
//! eviction scans for the least recently used entry.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapce_ai_transport::protocol::CompletionMode;

/// How much of the prefix end identifies a cache entry (with the prefix length).
pub const PREFIX_TAIL_BYTES: usize = 4096;
/// How much of the suffix start identifies a cache entry.
pub const SUFFIX_HEAD_BYTES: usize = 1024;

/// A source of the current time, replaceable in tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to (for tests).
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    elapsed_millis: AtomicU64,
}

impl ManualClock {
    pub fn new() -> ManualClock {
        ManualClock {
            start: Instant::now(),
            elapsed_millis: AtomicU64::new(0),
        }
    }

    pub fn advance(&self, by: Duration) {
        let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.elapsed_millis.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.elapsed_millis.load(Ordering::SeqCst))
    }
}

impl<T: Clock + ?Sized> Clock for std::sync::Arc<T> {
    fn now(&self) -> Instant {
        (**self).now()
    }
}

/// Size and lifetime limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub max_entries: usize,
    pub time_to_live: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 256,
            time_to_live: Duration::from_secs(5 * 60),
        }
    }
}

/// Counters for status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered (exact or type-through).
    pub hits: u64,
    /// Of `hits`, those where the user had typed part of the cached completion.
    pub type_through_hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub expirations: u64,
    /// Entries currently held.
    pub entries: usize,
}

/// What, besides the text around the cursor, decides a completion: entries only answer the same scope.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheScope {
    /// Profile and model (and anything else that changes the answer, folded in by the caller).
    pub model: String,
    /// The requested mode (a single-line answer is no answer for a multi-line request).
    pub mode: CompletionMode,
    /// The line limit the completion was cut at (0 = none).
    pub max_lines: u32,
}

impl CacheScope {
    pub fn new(model: impl Into<String>, mode: CompletionMode, max_lines: u32) -> CacheScope {
        CacheScope {
            model: model.into(),
            mode,
            max_lines,
        }
    }
}

#[derive(Debug, Clone)]
struct CacheEntry {
    scope: CacheScope,
    prefix_len: usize,
    prefix_tail_hash: u64,
    suffix_head_hash: u64,
    completion: String,
    stored_at: Instant,
    last_used: u64,
}

/// The completion cache. Not internally synchronized: wrap it in a mutex to share it.
pub struct CompletionCache {
    config: CacheConfig,
    clock: Box<dyn Clock>,
    entries: Vec<CacheEntry>,
    use_counter: u64,
    stats: CacheStats,
}

impl std::fmt::Debug for CompletionCache {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CompletionCache")
            .field("config", &self.config)
            .field("entries", &self.entries.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Default for CompletionCache {
    fn default() -> Self {
        CompletionCache::new(CacheConfig::default())
    }
}

impl CompletionCache {
    pub fn new(config: CacheConfig) -> CompletionCache {
        CompletionCache::with_clock(config, Box::new(SystemClock))
    }

    pub fn with_clock(config: CacheConfig, clock: Box<dyn Clock>) -> CompletionCache {
        CompletionCache {
            config,
            clock,
            entries: Vec::new(),
            use_counter: 0,
            stats: CacheStats::default(),
        }
    }

    /// Stores a finished completion; empty completions are not stored. Replaces an entry with the same key.
    pub fn insert(&mut self, scope: &CacheScope, prefix: &str, suffix: &str, completion: &str) {
        if completion.is_empty() || self.config.max_entries == 0 {
            return;
        }
        let now = self.clock.now();
        self.remove_expired(now);
        let prefix_tail_hash = hash_bytes(tail_bytes(prefix.as_bytes(), PREFIX_TAIL_BYTES));
        let suffix_head_hash = hash_bytes(head_bytes(suffix.as_bytes(), SUFFIX_HEAD_BYTES));
        self.entries.retain(|entry| {
            !(entry.scope == *scope
                && entry.prefix_len == prefix.len()
                && entry.prefix_tail_hash == prefix_tail_hash
                && entry.suffix_head_hash == suffix_head_hash)
        });
        while self.entries.len() >= self.config.max_entries {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(index, _)| index)
            else {
                break;
            };
            self.entries.swap_remove(oldest);
            self.stats.evictions += 1;
        }
        self.use_counter += 1;
        self.entries.push(CacheEntry {
            scope: scope.clone(),
            prefix_len: prefix.len(),
            prefix_tail_hash,
            suffix_head_hash,
            completion: completion.to_string(),
            stored_at: now,
            last_used: self.use_counter,
        });
    }

    /// The cached completion for this cursor position, or the untyped rest of one the user is typing through.
    pub fn get(&mut self, scope: &CacheScope, prefix: &str, suffix: &str) -> Option<String> {
        let now = self.clock.now();
        self.remove_expired(now);
        let suffix_head_hash = hash_bytes(head_bytes(suffix.as_bytes(), SUFFIX_HEAD_BYTES));
        let mut best: Option<(usize, usize)> = None; // (entry index, typed bytes)
        for (index, entry) in self.entries.iter().enumerate() {
            if entry.scope != *scope
                || entry.suffix_head_hash != suffix_head_hash
                || entry.prefix_len > prefix.len()
                || !prefix.is_char_boundary(entry.prefix_len)
            {
                continue;
            }
            let typed = &prefix[entry.prefix_len..];
            if typed.len() >= entry.completion.len() || !entry.completion.starts_with(typed) {
                continue;
            }
            let stored_prefix = &prefix.as_bytes()[..entry.prefix_len];
            if hash_bytes(tail_bytes(stored_prefix, PREFIX_TAIL_BYTES)) != entry.prefix_tail_hash {
                continue;
            }
            // Prefer the entry that needs the least typed-through text (the most specific one).
            if best.is_none_or(|(_, best_typed)| typed.len() < best_typed) {
                best = Some((index, typed.len()));
            }
        }
        match best {
            Some((index, typed)) => {
                self.use_counter += 1;
                let entry = &mut self.entries[index];
                entry.last_used = self.use_counter;
                self.stats.hits += 1;
                if typed > 0 {
                    self.stats.type_through_hits += 1;
                }
                tracing::trace!(typed, "completion cache hit");
                Some(entry.completion[typed..].to_string())
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            ..self.stats
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    fn remove_expired(&mut self, now: Instant) {
        let time_to_live = self.config.time_to_live;
        let before = self.entries.len();
        self.entries
            .retain(|entry| now.saturating_duration_since(entry.stored_at) < time_to_live);
        let expired = before - self.entries.len();
        if expired > 0 {
            self.stats.expirations += expired as u64;
            tracing::trace!(expired, "completion cache entries expired");
        }
    }
}

fn tail_bytes(bytes: &[u8], limit: usize) -> &[u8] {
    &bytes[bytes.len().saturating_sub(limit)..]
}

fn head_bytes(bytes: &[u8], limit: usize) -> &[u8] {
    &bytes[..bytes.len().min(limit)]
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn scope(model: &str) -> CacheScope {
        CacheScope::new(model, CompletionMode::Auto, 0)
    }

    fn cache_with_clock(max_entries: usize) -> (CompletionCache, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let config = CacheConfig {
            max_entries,
            time_to_live: Duration::from_secs(300),
        };
        (
            CompletionCache::with_clock(config, Box::new(Arc::clone(&clock))),
            clock,
        )
    }

    #[test]
    fn exact_hit_and_miss_are_counted() {
        let (mut cache, _clock) = cache_with_clock(8);
        cache.insert(&scope("qwen"), "let x = ", ";\n", "compute(1)");
        assert_eq!(
            cache.get(&scope("qwen"), "let x = ", ";\n").as_deref(),
            Some("compute(1)")
        );
        assert_eq!(cache.get(&scope("other-model"), "let x = ", ";\n"), None);
        assert_eq!(
            cache.get(&scope("qwen"), "let x = ", "; // changed\n"),
            None
        );
        let stats = cache.stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.type_through_hits),
            (1, 2, 0)
        );
    }

    #[test]
    fn typing_through_the_completion_hits_with_the_rest() {
        let (mut cache, _clock) = cache_with_clock(8);
        cache.insert(&scope("qwen"), "let x = ", ";\n", "compute(1)");
        assert_eq!(
            cache.get(&scope("qwen"), "let x = com", ";\n").as_deref(),
            Some("pute(1)")
        );
        assert_eq!(
            cache
                .get(&scope("qwen"), "let x = compute(1", ";\n")
                .as_deref(),
            Some(")")
        );
        // Typed all of it, or typed something else: miss.
        assert_eq!(cache.get(&scope("qwen"), "let x = compute(1)", ";\n"), None);
        assert_eq!(cache.get(&scope("qwen"), "let x = cat", ";\n"), None);
        // Deleted a character before the stored prefix: miss.
        assert_eq!(cache.get(&scope("qwen"), "let x =", ";\n"), None);
        assert_eq!(cache.stats().type_through_hits, 2);
    }

    #[test]
    fn type_through_with_non_ascii_text_stays_on_char_boundaries() {
        let (mut cache, _clock) = cache_with_clock(8);
        cache.insert(&scope("m"), "let s = \"", "\";", "héllo wörld");
        assert_eq!(
            cache.get(&scope("m"), "let s = \"hé", "\";").as_deref(),
            Some("llo wörld")
        );
        // A prefix ending inside the stored prefix's bytes never panics.
        assert_eq!(cache.get(&scope("m"), "let s = ", "\";"), None);
    }

    #[test]
    fn long_prefixes_are_distinguished_by_their_tail() {
        let (mut cache, _clock) = cache_with_clock(8);
        let base = "x".repeat(10_000);
        let prefix_a = format!("{base}fn a() {{\n    ");
        let prefix_b = format!("{base}fn b() {{\n    ");
        cache.insert(&scope("m"), &prefix_a, "\n}", "alpha()");
        assert_eq!(cache.get(&scope("m"), &prefix_b, "\n}"), None);
        assert_eq!(
            cache.get(&scope("m"), &prefix_a, "\n}").as_deref(),
            Some("alpha()")
        );
    }

    #[test]
    fn entries_expire_after_the_time_to_live() {
        let (mut cache, clock) = cache_with_clock(8);
        cache.insert(&scope("m"), "p", "s", "completion");
        clock.advance(Duration::from_secs(299));
        assert_eq!(
            cache.get(&scope("m"), "p", "s").as_deref(),
            Some("completion")
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(cache.get(&scope("m"), "p", "s"), None);
        assert_eq!(cache.stats().expirations, 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn least_recently_used_entry_is_evicted() {
        let (mut cache, _clock) = cache_with_clock(2);
        cache.insert(&scope("m"), "one", "", "1");
        cache.insert(&scope("m"), "two", "", "2");
        // Touch "one" so "two" is the least recently used.
        assert!(cache.get(&scope("m"), "one", "").is_some());
        cache.insert(&scope("m"), "three", "", "3");
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&scope("m"), "two", ""), None);
        assert_eq!(cache.get(&scope("m"), "one", "").as_deref(), Some("1"));
        assert_eq!(cache.get(&scope("m"), "three", "").as_deref(), Some("3"));
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn reinserting_a_key_replaces_and_empty_completions_are_skipped() {
        let (mut cache, _clock) = cache_with_clock(4);
        cache.insert(&scope("m"), "p", "s", "old");
        cache.insert(&scope("m"), "p", "s", "new");
        cache.insert(&scope("m"), "q", "s", "");
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&scope("m"), "p", "s").as_deref(), Some("new"));
        assert_eq!(cache.get(&scope("m"), "q", "s"), None);
    }

    #[test]
    fn mode_and_line_limit_are_part_of_the_key() {
        let (mut cache, _clock) = cache_with_clock(8);
        let eight_lines = CacheScope::new("m", CompletionMode::MultiLine, 8);
        cache.insert(&eight_lines, "fn f() {\n    ", "\n}", "a();\n    b();");
        assert_eq!(
            cache.get(&eight_lines, "fn f() {\n    ", "\n}").as_deref(),
            Some("a();\n    b();")
        );
        let single = CacheScope::new("m", CompletionMode::SingleLine, 8);
        assert_eq!(cache.get(&single, "fn f() {\n    ", "\n}"), None);
        let two_lines = CacheScope::new("m", CompletionMode::MultiLine, 2);
        assert_eq!(cache.get(&two_lines, "fn f() {\n    ", "\n}"), None);
        // The same position in another scope is a separate entry.
        cache.insert(&single, "fn f() {\n    ", "\n}", "a();");
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache
                .get(&eight_lines, "fn f() {\n    a();\n", "\n}")
                .as_deref(),
            Some("    b();")
        );
    }
}
