//! KV-cache bookkeeping: one llama sequence per document (LRU), and how much of a cached sequence a new prompt can keep.
//!
//! A prompt keeps the longest common token prefix of its sequence. Past that, chunks of cached tokens that reappear
//! later in the prompt (the window start moved, the prefix was cut further down) are kept too: the tokens skipped over
//! are removed and the chunk is shifted to its new position, as llama.cpp's `n_cache_reuse` does, instead of being
//! evaluated again. Tokens are compared, never text, so a cached token is not reused when an edit makes the tokenizer
//! merge it with a neighbour.

/// A token id as llama.cpp numbers them.
pub(crate) type TokenId = i32;

/// One llama sequence and the tokens whose KV entries it holds at positions `0..tokens.len()`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot {
    pub seq: i32,
    pub tokens: Vec<TokenId>,
    /// Tick of the last request that used it (0 = never).
    pub last_used: u64,
}

/// Move cached tokens `from..from + len` to positions `to..to + len` (`to < from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shift {
    pub from: usize,
    pub to: usize,
    pub len: usize,
}

/// At most this many prompt tokens are dropped at the seam where the window's first line was cut: text cut at
/// a line start tokenizes differently there than it did inside the text (the newline merges with the
/// indentation, or with the punctuation before it), so the window's first tokens never appear in the cache
/// and nothing after them could be reused. Dropping them loses part of the oldest line's indentation.
pub(crate) const MAX_SEAM_DROP: usize = 4;
/// Tokens are dropped only where the prompt and the cache part this close to the prompt's start (after BOS and a
/// FIM marker), never inside the text, where dropping tokens would hide an edit from the model.
pub(crate) const MAX_SEAM_START: usize = 8;

/// What a prompt can keep of a slot's cache.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ReusePlan {
    /// Tokens shared from position 0.
    pub common: usize,
    /// Prompt tokens to remove at `drop_at` before the plan applies (the seam of a moved window; see
    /// [`MAX_SEAM_DROP`]). `common`, `shifts` and `kept` count positions in the prompt without them.
    pub dropped: usize,
    pub drop_at: usize,
    /// Chunks to shift down after the common prefix, in order.
    pub shifts: Vec<Shift>,
    /// Prompt tokens whose KV entries are kept (common + shifted); decoding starts here.
    pub kept: usize,
}

impl ReusePlan {
    /// Removes the seam tokens this plan drops from `prompt` (at `drop_at`, not at `common`: once the cache
    /// lacks them, the common prefix runs far past the seam), so the plan's positions apply to it.
    pub(crate) fn drop_seam<T>(&self, prompt: &mut Vec<T>) {
        prompt.drain(self.drop_at..self.drop_at + self.dropped);
    }
}

/// Plans reuse of `cached` for `prompt`. Chunks shorter than `min_chunk` are not shifted (0 = no shifting).
/// At least the last prompt token is always left to decode, since its logits are needed. Where the two part
/// right after the prompt's start, up to [`MAX_SEAM_DROP`] prompt tokens may be dropped when that lets a moved
/// window be shifted instead of evaluated again.
pub(crate) fn plan_reuse(cached: &[TokenId], prompt: &[TokenId], min_chunk: usize) -> ReusePlan {
    let mut best = plan_without_drops(cached, prompt, min_chunk);
    if min_chunk == 0 || best.common > MAX_SEAM_START {
        return best;
    }
    let at = best.common;
    for dropped in 1..=MAX_SEAM_DROP.min(prompt.len().saturating_sub(at + 1)) {
        let shorter: Vec<TokenId> = prompt[..at]
            .iter()
            .chain(&prompt[at + dropped..])
            .copied()
            .collect();
        let plan = plan_without_drops(cached, &shorter, min_chunk);
        // Worth it only for a real chunk: the dropped tokens must buy at least `min_chunk` kept ones. (The
        // cache may already lack them, dropped at the previous request: then the rest is a common prefix.)
        if plan.kept >= best.kept + min_chunk {
            best = ReusePlan {
                dropped,
                drop_at: at,
                ..plan
            };
        }
    }
    best
}

fn plan_without_drops(cached: &[TokenId], prompt: &[TokenId], min_chunk: usize) -> ReusePlan {
    let limit = prompt.len().saturating_sub(1);
    let common = cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(limit);
    let mut plan = ReusePlan {
        common,
        dropped: 0,
        drop_at: 0,
        shifts: Vec::new(),
        kept: common,
    };
    if min_chunk == 0 {
        return plan;
    }
    let (mut head_c, mut head_p) = (common, common);
    while head_c < cached.len() && head_p < limit {
        let n = cached[head_c..]
            .iter()
            .zip(&prompt[head_p..limit])
            .take_while(|(a, b)| a == b)
            .count();
        if n >= min_chunk {
            plan.shifts.push(Shift {
                from: head_c,
                to: head_p,
                len: n,
            });
            head_c += n;
            head_p += n;
            plan.kept = head_p;
        } else {
            head_c += 1;
        }
    }
    plan
}

/// Picks the slot for `prompt`: the one that keeps the most tokens, if it keeps a useful share of the
/// prompt; otherwise an unused slot, else the least recently used one (its cache is dropped). `busy` is a
/// sequence that must not be taken (a paused request's).
pub(crate) fn choose_slot(
    slots: &[Slot],
    prompt: &[TokenId],
    min_chunk: usize,
    busy: &[i32],
) -> Option<(usize, ReusePlan)> {
    let mut best: Option<(usize, ReusePlan)> = None;
    for (i, slot) in slots.iter().enumerate() {
        if busy.contains(&slot.seq) || slot.tokens.is_empty() {
            continue;
        }
        let plan = plan_reuse(&slot.tokens, prompt, min_chunk);
        if best.as_ref().is_none_or(|(_, b)| plan.kept > b.kept) {
            best = Some((i, plan));
        }
    }
    // A shared header (BOS, a FIM marker, a licence comment) is not a reason to take over another
    // document's sequence: a useful match covers a quarter of the prompt or more.
    let useful = (prompt.len() / 4)
        .max(8)
        .min(prompt.len().saturating_sub(1));
    if let Some((i, plan)) = best {
        if plan.kept >= useful && plan.kept > 0 {
            return Some((i, plan));
        }
    }
    let free = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| !busy.contains(&s.seq))
        .min_by_key(|(_, s)| (!s.tokens.is_empty(), s.last_used))
        .map(|(i, _)| i)?;
    let plan = plan_reuse(&slots[free].tokens, prompt, min_chunk);
    Some((free, plan))
}

/// Where the kept window of a long token list starts, with hysteresis: `excess` tokens must go, and the cut
/// is rounded up to a multiple of `step`, so the start only moves once per `step` new tokens.
pub(crate) fn window_start(excess: usize, step: usize, len: usize) -> usize {
    if excess == 0 {
        return 0;
    }
    let step = step.max(1);
    (excess.div_ceil(step) * step).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_leaves_the_last_token_to_decode() {
        let plan = plan_reuse(&[1, 2, 3, 4], &[1, 2, 3, 4], 4);
        assert_eq!(plan.common, 3);
        assert_eq!(plan.kept, 3);
        let plan = plan_reuse(&[1, 2, 3, 4], &[1, 2, 9, 4, 5], 0);
        assert_eq!((plan.common, plan.kept), (2, 2));
        assert!(plan.shifts.is_empty());
    }

    #[test]
    fn moved_window_is_shifted_not_recomputed() {
        // BOS, marker, then a window of 0..100 that moved down by 10 tokens, plus 3 new tokens at the end.
        let cached: Vec<i32> = [1, 2].into_iter().chain(100..200).collect();
        let prompt: Vec<i32> = [1, 2].into_iter().chain(110..203).collect();
        let plan = plan_reuse(&cached, &prompt, 16);
        assert_eq!(plan.common, 2);
        assert_eq!(
            plan.shifts,
            vec![Shift {
                from: 12,
                to: 2,
                len: 90
            }]
        );
        assert_eq!(plan.kept, 92);
        // Shifting disabled: only the header is kept.
        assert_eq!(plan_reuse(&cached, &prompt, 0).kept, 2);
        // Chunks shorter than the minimum are not worth a shift.
        assert_eq!(plan_reuse(&cached, &prompt, 200).kept, 2);
    }

    #[test]
    fn a_token_merged_by_an_edit_is_not_reused() {
        // "fo" + "o" cached; after typing, the tokenizer produced "foo" (a different id) at that place.
        let cached = [1, 50, 51, 52];
        let prompt = [1, 50, 77, 9];
        let plan = plan_reuse(&cached, &prompt, 1);
        assert_eq!(plan.common, 2);
        assert!(plan.kept <= 2 + plan.shifts.iter().map(|s| s.len).sum::<usize>());
        assert!(plan
            .shifts
            .iter()
            .all(|s| cached[s.from..s.from + s.len] == prompt[s.to..s.to + s.len]));
    }

    #[test]
    fn a_window_cut_that_tokenizes_differently_drops_its_first_tokens_and_shifts() {
        // BOS, FIM marker, then lines 100..300. The window moved down 20 tokens, and its new first line starts
        // with two tokens the cache never saw (the newline merged differently at the cut).
        let cached: Vec<i32> = [1, 2].into_iter().chain(100..300).collect();
        let prompt: Vec<i32> = [1, 2, 7001, 7002].into_iter().chain(122..303).collect();
        let plan = plan_reuse(&cached, &prompt, 16);
        assert_eq!((plan.common, plan.dropped), (2, 2));
        assert_eq!(
            plan.shifts,
            vec![Shift {
                from: 24,
                to: 2,
                len: 178
            }]
        );
        assert_eq!(plan.kept, 180);
        let mut dropped = prompt.clone();
        plan.drop_seam(&mut dropped);
        assert_eq!(dropped[..plan.common], cached[..plan.common]);
        assert!(plan
            .shifts
            .iter()
            .all(|s| cached[s.from..s.from + s.len] == dropped[s.to..s.to + s.len]));
        // The next keystroke: the cache already lacks the two seam tokens, the prompt has them again.
        let cached_now: Vec<i32> = [1, 2].into_iter().chain(122..303).collect();
        let typed: Vec<i32> = [1, 2, 7001, 7002].into_iter().chain(122..304).collect();
        let plan = plan_reuse(&cached_now, &typed, 16);
        assert_eq!((plan.drop_at, plan.dropped, plan.common), (2, 2, 183));
        assert!(plan.shifts.is_empty());
        // With the seam dropped, the prompt is the cache plus the new token: nothing typed is lost.
        let mut dropped = typed.clone();
        plan.drop_seam(&mut dropped);
        assert_eq!(dropped[..plan.common], cached_now[..plan.common]);
        assert_eq!(dropped.last(), Some(&303));
        // An edit inside the text is never dropped: the model must see it.
        let mut edited: Vec<i32> = [1, 2].into_iter().chain(100..300).collect();
        edited[150] = 9999;
        let plan = plan_reuse(&cached, &edited, 16);
        assert_eq!((plan.common, plan.dropped), (150, 0));
        // More new tokens at the seam than may be dropped: evaluated again.
        let prompt: Vec<i32> = [1, 2, 7001, 7002, 7003, 7004, 7005]
            .into_iter()
            .chain(122..303)
            .collect();
        assert_eq!(plan_reuse(&cached, &prompt, 16).kept, 2);
    }

    fn slot(seq: i32, tokens: Vec<i32>, last_used: u64) -> Slot {
        Slot {
            seq,
            tokens,
            last_used,
        }
    }

    #[test]
    fn documents_keep_their_own_sequence_and_lru_is_evicted() {
        let doc_a: Vec<i32> = (0..100).collect();
        let doc_b: Vec<i32> = (1000..1100).collect();
        let slots = vec![
            slot(0, doc_a.clone(), 5),
            slot(1, doc_b.clone(), 3),
            slot(2, Vec::new(), 0),
        ];
        // Returning to document B finds its sequence.
        let mut b_again = doc_b.clone();
        b_again.push(7);
        let (i, plan) = choose_slot(&slots, &b_again, 16, &[]).expect("slot");
        assert_eq!((i, plan.kept), (1, 100));
        // A new document takes the unused slot, not A's or B's.
        let doc_c: Vec<i32> = (5000..5100).collect();
        assert_eq!(choose_slot(&slots, &doc_c, 16, &[]).expect("slot").0, 2);
        // With no unused slot, the least recently used one goes.
        let full = vec![slot(0, doc_a, 5), slot(1, doc_b.clone(), 3)];
        assert_eq!(choose_slot(&full, &doc_c, 16, &[]).expect("slot").0, 1);
        // A busy sequence is never taken, even when it matches best.
        assert_eq!(choose_slot(&full, &b_again, 16, &[1]).expect("slot").0, 0);
        assert!(choose_slot(&full, &b_again, 16, &[0, 1]).is_none());
    }

    #[test]
    fn window_start_moves_in_steps() {
        assert_eq!(window_start(0, 256, 1000), 0);
        assert_eq!(window_start(1, 256, 1000), 256);
        assert_eq!(window_start(255, 256, 1000), 256);
        assert_eq!(window_start(257, 256, 1000), 512);
        assert_eq!(window_start(900, 256, 1000), 1000);
    }
}
