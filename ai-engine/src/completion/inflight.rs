//! Completion generations detached from the requests that started them, so that typing through streamed text reuses one.
//!
//! A generation runs in its own task and publishes the text its filter decided. Requests subscribe to it. When
//! the last subscriber leaves (the bridge cancels a request as soon as the user types), the generation keeps
//! running for [`ORPHAN_GRACE`]: a new request whose prefix is the old prefix plus text the generation already
//! streamed ([`typed_through`]) adopts it and gets the rest, instead of starting another generation. An orphan
//! nobody adopts in time, or one whose document got a request it does not fit, is cancelled (its provider
//! stream dropped). Cancelled and failed generations are never adopted; finished ones leave the registry (the
//! cache has them).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;
use lapce_ai_transport::protocol::{FinishReason, Usage};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::cache::{CacheScope, PREFIX_TAIL_BYTES, SUFFIX_HEAD_BYTES};
use super::postprocess::{CompletionFilter, FilterStep};
use crate::provider::{GenerationEvent, ProviderError, StopReason};
use lapce_ai_transport::util::lock;

/// How long a generation nobody listens to keeps running, waiting for a request to adopt it. Longer than the
/// bridge's longest debounce (1 s), so the next keystroke's request arrives in time.
pub const ORPHAN_GRACE: Duration = Duration::from_millis(1500);

/// What a generation completes: requests only adopt generations of the same document, scope and surroundings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationOrigin {
    pub scope: CacheScope,
    pub file_path: String,
    pub language_id: String,
    pub prefix: String,
    pub suffix: String,
}

/// Where a generation stands.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationState {
    Running,
    Finished {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Failed(ProviderError),
    Cancelled,
}

/// The decided text so far and the state.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub text: String,
    pub state: GenerationState,
}

/// How many bytes of `streamed` the user typed, when `request` continues `origin` by typing them: same scope,
/// document and language, the suffixes agree on their first [`SUFFIX_HEAD_BYTES`], and the request's prefix
/// is the origin's prefix (compared on their last [`PREFIX_TAIL_BYTES`], since the client's window may move)
/// followed by the first bytes of `streamed`. `None` for generations that failed or were cancelled.
pub fn typed_through(
    origin: &GenerationOrigin,
    streamed: &str,
    state: &GenerationState,
    request: &GenerationOrigin,
) -> Option<usize> {
    if !matches!(
        state,
        GenerationState::Running | GenerationState::Finished { .. }
    ) || origin.scope != request.scope
        || origin.file_path != request.file_path
        || origin.language_id != request.language_id
        || !heads_agree(&origin.suffix, &request.suffix)
    {
        return None;
    }
    let prefix = request.prefix.as_str();
    let fits = |typed: usize| {
        typed <= streamed.len()
            && streamed.is_char_boundary(typed)
            && prefix.ends_with(&streamed[..typed])
            && tails_agree(&origin.prefix, &prefix[..prefix.len() - typed])
    };
    // The usual case: the window did not move, the prefix grew by what was typed.
    if let Some(grown) = prefix.len().checked_sub(origin.prefix.len()) {
        if fits(grown) {
            return Some(grown);
        }
    }
    (0..=streamed.len()).rev().find(|&typed| fits(typed))
}

/// True when the two prefixes end the same way over the last bytes both have (at most [`PREFIX_TAIL_BYTES`]).
fn tails_agree(a: &str, b: &str) -> bool {
    let length = a.len().min(b.len()).min(PREFIX_TAIL_BYTES);
    a.as_bytes()[a.len() - length..] == b.as_bytes()[b.len() - length..]
}

/// True when the two suffixes start the same way over the first bytes both have (at most [`SUFFIX_HEAD_BYTES`]),
/// and are either both empty or both not.
fn heads_agree(a: &str, b: &str) -> bool {
    let length = a.len().min(b.len()).min(SUFFIX_HEAD_BYTES);
    a.is_empty() == b.is_empty() && a.as_bytes()[..length] == b.as_bytes()[..length]
}

#[derive(Debug, Default)]
struct Listeners {
    count: usize,
    orphaned_at: Option<Instant>,
    /// Set when the generation is cancelled or ends: nobody may adopt it any more.
    closed: bool,
}

/// One generation, shared by the requests it serves.
pub struct Generation {
    origin: GenerationOrigin,
    progress: watch::Sender<Progress>,
    listeners: Mutex<Listeners>,
    listeners_changed: Notify,
    cancel: CancellationToken,
}

impl Generation {
    fn listeners(&self) -> MutexGuard<'_, Listeners> {
        lock(&self.listeners)
    }

    /// When the generation is to be cancelled for lack of listeners, if it has none.
    fn orphan_deadline(&self) -> Option<Instant> {
        let listeners = self.listeners();
        match listeners.orphaned_at {
            Some(since) if listeners.count == 0 => Some(since + ORPHAN_GRACE),
            _ => None,
        }
    }

    /// Closes the generation if it still has no listener; true when it did.
    fn close_if_orphaned(&self) -> bool {
        let mut listeners = self.listeners();
        if listeners.count == 0 && !listeners.closed {
            listeners.closed = true;
            self.cancel.cancel();
            true
        } else {
            false
        }
    }

    fn subscribe(self: &Arc<Self>, listeners: &mut Listeners, offset: usize) -> Subscription {
        listeners.count += 1;
        listeners.orphaned_at = None;
        self.listeners_changed.notify_one();
        Subscription {
            generation: Arc::clone(self),
            progress: self.progress.subscribe(),
            offset,
        }
    }
}

/// A request's view of a generation: the text from `offset` on, as it is decided.
pub struct Subscription {
    generation: Arc<Generation>,
    progress: watch::Receiver<Progress>,
    offset: usize,
}

impl Subscription {
    /// The decided text not yet taken and the state; marks it taken.
    pub fn take_new(&mut self) -> (String, GenerationState) {
        let progress = self.progress.borrow_and_update();
        let new = progress
            .text
            .get(self.offset..)
            .unwrap_or_default()
            .to_string();
        self.offset = progress.text.len().max(self.offset);
        (new, progress.state.clone())
    }

    /// Waits until the generation publishes something new (returns at once if it is gone).
    pub async fn changed(&mut self) {
        // An error means the sender is gone; it lives as long as this subscription, so it does not happen.
        let _ = self.progress.changed().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut listeners = self.generation.listeners();
        listeners.count = listeners.count.saturating_sub(1);
        if listeners.count == 0 {
            listeners.orphaned_at = Some(Instant::now());
        }
        drop(listeners);
        self.generation.listeners_changed.notify_one();
    }
}

/// The generations that may still be adopted.
#[derive(Default)]
pub struct InflightGenerations {
    generations: Mutex<Vec<Arc<Generation>>>,
}

impl InflightGenerations {
    fn generations(&self) -> MutexGuard<'_, Vec<Arc<Generation>>> {
        lock(&self.generations)
    }

    /// Subscribes `request` to a running (or just finished) generation it types through, from the first
    /// character not typed yet.
    pub fn adopt(&self, request: &GenerationOrigin) -> Option<Subscription> {
        let generations = self.generations();
        for generation in generations.iter() {
            let mut listeners = generation.listeners();
            if listeners.closed {
                continue;
            }
            let progress = generation.progress.borrow();
            let Some(typed) =
                typed_through(&generation.origin, &progress.text, &progress.state, request)
            else {
                continue;
            };
            drop(progress);
            tracing::debug!(typed, "request types through a running generation; reused");
            return Some(generation.subscribe(&mut listeners, typed));
        }
        None
    }

    /// Starts a generation for `origin` from a provider stream and its filter, subscribed by the caller.
    /// `on_success` gets the final text of a generation that ended normally (before anyone can see the end).
    /// Orphans of the same document are cancelled: the user moved on.
    pub fn start(
        self: &Arc<Self>,
        origin: GenerationOrigin,
        stream: BoxStream<'static, Result<GenerationEvent, ProviderError>>,
        filter: CompletionFilter,
        on_success: impl FnOnce(&str) + Send + 'static,
    ) -> Subscription {
        let (progress, _) = watch::channel(Progress {
            text: String::new(),
            state: GenerationState::Running,
        });
        let generation = Arc::new(Generation {
            origin,
            progress,
            listeners: Mutex::new(Listeners::default()),
            listeners_changed: Notify::new(),
            cancel: CancellationToken::new(),
        });
        let subscription = {
            let mut listeners = generation.listeners();
            generation.subscribe(&mut listeners, 0)
        };
        {
            let mut generations = self.generations();
            let document = &generation.origin.file_path;
            generations.retain(|other| {
                let superseded = !document.is_empty()
                    && other.origin.file_path == *document
                    && other.close_if_orphaned();
                if superseded {
                    tracing::debug!("orphaned generation of this document cancelled");
                }
                !superseded
            });
            generations.push(Arc::clone(&generation));
        }
        let registry = Arc::clone(self);
        tokio::spawn(async move {
            drive(&generation, stream, filter, on_success).await;
            registry
                .generations()
                .retain(|other| !Arc::ptr_eq(other, &generation));
        });
        subscription
    }

    /// How many generations may still be adopted (for tests and status).
    pub fn len(&self) -> usize {
        self.generations().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs the provider stream through the filter into the generation's progress until it ends, fails, or is
/// cancelled for lack of listeners.
async fn drive(
    generation: &Generation,
    mut stream: BoxStream<'static, Result<GenerationEvent, ProviderError>>,
    mut filter: CompletionFilter,
    on_success: impl FnOnce(&str),
) {
    let mut text = String::new();
    let mut generated_pieces = 0u32;
    let end = loop {
        let deadline = generation.orphan_deadline();
        let orphan_expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        let item = tokio::select! {
            biased;
            () = generation.cancel.cancelled() => break GenerationState::Cancelled,
            () = orphan_expired => {
                if generation.close_if_orphaned() {
                    tracing::debug!("nobody adopted the orphaned generation; cancelled");
                    break GenerationState::Cancelled;
                }
                continue;
            }
            () = generation.listeners_changed.notified() => continue,
            item = stream.next() => item,
        };
        let (step, ended) = match item {
            Some(Ok(GenerationEvent::Text(piece))) => {
                generated_pieces += 1;
                (filter.push(&piece), None)
            }
            Some(Ok(GenerationEvent::Finished { reason, usage })) => {
                let finish_reason = if reason == StopReason::Length {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                let usage = Usage {
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: if usage.completion_tokens == 0 {
                        generated_pieces
                    } else {
                        usage.completion_tokens
                    },
                };
                let emit = filter.finish();
                (
                    FilterStep { emit, done: true },
                    Some((finish_reason, usage)),
                )
            }
            Some(Err(error)) => break GenerationState::Failed(error),
            None => {
                let usage = Usage {
                    prompt_tokens: 0,
                    completion_tokens: generated_pieces,
                };
                let emit = filter.finish();
                (
                    FilterStep { emit, done: true },
                    Some((FinishReason::Stop, usage)),
                )
            }
        };
        if !step.emit.is_empty() {
            text.push_str(&step.emit);
            generation
                .progress
                .send_modify(|progress| progress.text.push_str(&step.emit));
        }
        match ended {
            Some((finish_reason, usage)) => {
                break GenerationState::Finished {
                    finish_reason,
                    usage,
                }
            }
            // Post-processing decided the answer: stop generating (dropping the stream cancels it).
            None if step.done => {
                break GenerationState::Finished {
                    finish_reason: FinishReason::Truncated,
                    usage: Usage {
                        prompt_tokens: 0,
                        completion_tokens: generated_pieces,
                    },
                }
            }
            None => {}
        }
    };
    drop(stream);
    // Cache first, then close: a request arriving in between finds one or the other.
    if matches!(end, GenerationState::Finished { .. }) {
        on_success(&text);
    }
    generation.listeners().closed = true;
    generation
        .progress
        .send_modify(|progress| progress.state = end);
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapce_ai_transport::protocol::CompletionMode;

    fn origin(prefix: &str, suffix: &str) -> GenerationOrigin {
        GenerationOrigin {
            scope: CacheScope::new("profile/model", CompletionMode::Auto, 8),
            file_path: "/src/lib.rs".to_string(),
            language_id: "rust".to_string(),
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        }
    }

    const RUNNING: GenerationState = GenerationState::Running;

    #[test]
    fn prefix_extended_by_streamed_text_is_reused_from_the_typed_offset() {
        let old = origin("fn main() {\n    let total = ", ";\n}");
        let streamed = "values.iter().sum()";
        for typed in ["", "v", "values.", "values.iter().sum()"] {
            let new = origin(&format!("{}{typed}", old.prefix), ";\n}");
            assert_eq!(
                typed_through(&old, streamed, &RUNNING, &new),
                Some(typed.len()),
                "typed {typed:?}"
            );
        }
        let finished = GenerationState::Finished {
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
        };
        let new = origin(&format!("{}val", old.prefix), ";\n}");
        assert_eq!(typed_through(&old, streamed, &finished, &new), Some(3));
    }

    #[test]
    fn mismatching_or_unstreamed_text_is_not_reused() {
        let old = origin("let total = ", ";");
        let streamed = "values.iter()";
        // A character the generation did not stream.
        let new = origin("let total = valu3", ";");
        assert_eq!(typed_through(&old, streamed, &RUNNING, &new), None);
        // Typed past what was streamed so far.
        let new = origin("let total = values.iter().sum", ";");
        assert_eq!(typed_through(&old, streamed, &RUNNING, &new), None);
        // Deleted a character before the old cursor.
        let new = origin("let total =", ";");
        assert_eq!(typed_through(&old, streamed, &RUNNING, &new), None);
    }

    #[test]
    fn different_surroundings_are_not_reused() {
        let old = origin("let total = ", ";\n}");
        let streamed = "values.iter()";
        let base = origin("let total = val", ";\n}");
        assert_eq!(typed_through(&old, streamed, &RUNNING, &base), Some(3));
        let different_suffix = origin(&base.prefix, ");\n}");
        assert_eq!(
            typed_through(&old, streamed, &RUNNING, &different_suffix),
            None
        );
        let mut different_mode = base.clone();
        different_mode.scope.mode = CompletionMode::SingleLine;
        assert_eq!(
            typed_through(&old, streamed, &RUNNING, &different_mode),
            None
        );
        let mut different_lines = base.clone();
        different_lines.scope.max_lines = 1;
        assert_eq!(
            typed_through(&old, streamed, &RUNNING, &different_lines),
            None
        );
        let mut other_file = base.clone();
        other_file.file_path = "/src/main.rs".to_string();
        assert_eq!(typed_through(&old, streamed, &RUNNING, &other_file), None);
    }

    #[test]
    fn cancelled_and_failed_generations_are_never_reused() {
        let old = origin("let total = ", ";");
        let new = origin("let total = val", ";");
        assert_eq!(
            typed_through(&old, "values", &GenerationState::Cancelled, &new),
            None
        );
        let failed = GenerationState::Failed(ProviderError::Server("500".to_string()));
        assert_eq!(typed_through(&old, "values", &failed, &new), None);
    }

    #[test]
    fn a_moving_window_still_matches_on_the_prefix_tail() {
        // The client sends at most N characters before the cursor: typing drops the first ones.
        let body = "x".repeat(5000);
        let old = origin(&format!("a{body}let total = "), ";");
        let new = origin(&format!("{body}let total = va"), ";");
        assert_eq!(typed_through(&old, "values", &RUNNING, &new), Some(2));
        // A suffix window that grew by a line at its far end still agrees on its head.
        let old = origin("let total = ", ";\n}\n");
        let new = origin("let total = v", ";\n}\nfn next() {}\n");
        assert_eq!(typed_through(&old, "values", &RUNNING, &new), Some(1));
    }
}
