//! Adaptive debounce: waits a little longer than the user's typing rhythm before asking the engine.

use std::time::{Duration, Instant};

/// Gaps longer than this are pauses, not typing rhythm.
const MAX_RHYTHM_GAP: Duration = Duration::from_millis(2_000);
/// Weight of the newest gap in the moving average.
const ALPHA: f64 = 0.3;

/// Keystroke timing of one document.
#[derive(Debug, Default, Clone)]
pub struct Rhythm {
    last: Option<Instant>,
    /// Exponential moving average of the gaps between keystrokes, in ms.
    average_gap_ms: Option<f64>,
}

impl Rhythm {
    /// Records a keystroke (an automatic completion request) at `now`.
    pub fn observe(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last);
            if gap <= MAX_RHYTHM_GAP {
                let gap = gap.as_secs_f64() * 1000.0;
                self.average_gap_ms = Some(match self.average_gap_ms {
                    Some(avg) => avg * (1.0 - ALPHA) + gap * ALPHA,
                    None => gap,
                });
            }
        }
        self.last = Some(now);
    }

    /// The delay before asking: without a rhythm the base; with one, midway between the base and
    /// 1.5 x the average gap, kept within `[min(base, 100), max(base, 1000)]` ms; shortened at the
    /// end of a line, where a completion is most likely wanted.
    /// A base of 0 turns debouncing off.
    pub fn delay(&self, base_ms: u64, at_line_end: bool) -> Duration {
        if base_ms == 0 {
            return Duration::ZERO;
        }
        let base = base_ms as f64;
        let lower = base.min(100.0);
        let upper = base.max(1000.0);
        let mut ms = match self.average_gap_ms {
            None => base,
            Some(avg) => ((base + 1.5 * avg) / 2.0).clamp(lower, upper),
        };
        if at_line_end {
            ms = (ms * 0.6).max(lower.min(ms));
        }
        Duration::from_millis(ms.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_rhythm_within_bounds() {
        let t0 = Instant::now();
        let mut r = Rhythm::default();
        assert_eq!(r.delay(150, false), Duration::from_millis(150));
        for i in 0..20 {
            r.observe(t0 + Duration::from_millis(600 * i));
        }
        let slow = r.delay(150, false);
        assert!(slow > Duration::from_millis(400) && slow <= Duration::from_millis(1000));
        let mut fast = Rhythm::default();
        for i in 0..20 {
            fast.observe(t0 + Duration::from_millis(30 * i));
        }
        let d = fast.delay(150, false);
        assert!(
            d >= Duration::from_millis(100) && d < Duration::from_millis(150),
            "{d:?}"
        );
        assert!(fast.delay(150, true) <= d);
        assert_eq!(fast.delay(0, true), Duration::ZERO);
    }
}
