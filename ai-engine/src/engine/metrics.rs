//! Engine counters and latency percentiles for `ai-engine status`.

use lapce_ai_transport::util::lock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How many recent requests the percentiles cover.
const WINDOW: usize = 1024;

/// A sliding window of durations with percentile queries.
#[derive(Default)]
struct Window {
    samples: VecDeque<u64>,
}

impl Window {
    fn record(&mut self, micros: u64) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(micros);
    }

    fn percentile(&self, p: f64) -> u64 {
        if self.samples.is_empty() {
            return 0;
        }
        let mut sorted: Vec<u64> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[rank.min(sorted.len() - 1)]
    }
}

/// Thread-safe engine statistics.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub cancels: AtomicU64,
    pub errors: AtomicU64,
    pub cache_hits: AtomicU64,
    /// Completion requests served by a running generation they typed through (no provider call of their own).
    pub reused_generations: AtomicU64,
    time_to_first_token: Mutex<Window>,
    total: Mutex<Window>,
}

/// Percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latencies {
    pub time_to_first_token_p50_us: u64,
    pub time_to_first_token_p95_us: u64,
    pub total_p50_us: u64,
    pub total_p95_us: u64,
}

impl Metrics {
    pub fn record_latency(&self, time_to_first_token: Option<Duration>, total: Duration) {
        if let Some(ttft) = time_to_first_token {
            lock(&self.time_to_first_token).record(ttft.as_micros() as u64);
        }
        lock(&self.total).record(total.as_micros() as u64);
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn latencies(&self) -> Latencies {
        let ttft = lock(&self.time_to_first_token);
        let total = lock(&self.total);
        Latencies {
            time_to_first_token_p50_us: ttft.percentile(50.0),
            time_to_first_token_p95_us: ttft.percentile(95.0),
            total_p50_us: total.percentile(50.0),
            total_p95_us: total.percentile(95.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_a_window() {
        let metrics = Metrics::default();
        for ms in 1..=100 {
            metrics.record_latency(
                Some(Duration::from_millis(ms)),
                Duration::from_millis(ms * 2),
            );
        }
        let l = metrics.latencies();
        assert_eq!(l.time_to_first_token_p50_us, 51_000);
        assert_eq!(l.time_to_first_token_p95_us, 95_000);
        assert_eq!(l.total_p95_us, 190_000);
    }
}
