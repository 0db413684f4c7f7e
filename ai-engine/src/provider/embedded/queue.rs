//! The embedded model's job queue: completions before chat before prefill, arrival order within a class.

use lapce_ai_transport::util::lock;
use std::sync::{Condvar, Mutex, MutexGuard};

/// How urgent a job is; the smaller, the sooner it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Priority {
    /// A keystroke is waiting for ghost text.
    Completion = 0,
    /// A person reads the answer as it streams; may pause for completions.
    Chat = 1,
    /// Warming the cache for a document; dropped when anything else arrives.
    Prefill = 2,
}

struct State<J> {
    /// (priority, arrival number, job)
    jobs: Vec<(Priority, u64, J)>,
    arrivals: u64,
    closed: bool,
}

/// A blocking priority queue shared by the provider (producers) and the worker thread (consumer).
pub(crate) struct JobQueue<J> {
    state: Mutex<State<J>>,
    ready: Condvar,
}

impl<J> JobQueue<J> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                jobs: Vec::new(),
                arrivals: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<J>> {
        lock(&self.state)
    }

    /// Queues `job`; gives it back when the queue is closed.
    pub(crate) fn push(&self, priority: Priority, job: J) -> Result<(), J> {
        let mut state = self.lock();
        if state.closed {
            return Err(job);
        }
        state.arrivals += 1;
        let arrival = state.arrivals;
        state.jobs.push((priority, arrival, job));
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Removes queued jobs for which `drop` says so (returns them, e.g. to report them cancelled).
    pub(crate) fn remove_where(&self, mut remove: impl FnMut(Priority, &J) -> bool) -> Vec<J> {
        let mut state = self.lock();
        let mut removed = Vec::new();
        let mut i = 0;
        while i < state.jobs.len() {
            if remove(state.jobs[i].0, &state.jobs[i].2) {
                removed.push(state.jobs.remove(i).2);
            } else {
                i += 1;
            }
        }
        removed
    }

    fn take_best(
        state: &mut State<J>,
        more_urgent_than: Option<Priority>,
    ) -> Option<(Priority, J)> {
        let best = state
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, (p, _, _))| more_urgent_than.is_none_or(|limit| *p < limit))
            .min_by_key(|(_, (p, arrival, _))| (*p, *arrival))
            .map(|(i, _)| i)?;
        let (priority, _, job) = state.jobs.remove(best);
        Some((priority, job))
    }

    /// The most urgent job, waiting for one; `None` once the queue is closed and empty.
    pub(crate) fn pop(&self) -> Option<(Priority, J)> {
        let mut state = self.lock();
        loop {
            if let Some(job) = Self::take_best(&mut state, None) {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A job strictly more urgent than `priority`, if one is queued (never waits).
    pub(crate) fn pop_more_urgent(&self, priority: Priority) -> Option<(Priority, J)> {
        Self::take_best(&mut self.lock(), Some(priority))
    }

    /// True when a job at least as urgent as `priority` is queued.
    pub(crate) fn has_waiting(&self, priority: Priority) -> bool {
        self.lock().jobs.iter().any(|(p, _, _)| *p <= priority)
    }

    /// True when a job strictly more urgent than `priority` is queued.
    pub(crate) fn has_more_urgent(&self, priority: Priority) -> bool {
        self.lock().jobs.iter().any(|(p, _, _)| *p < priority)
    }

    /// No more jobs are accepted; the worker drains what is queued, then `pop` returns `None`.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_first_then_chat_then_prefill_in_arrival_order() {
        let q = JobQueue::new();
        q.push(Priority::Prefill, "p1").expect("open");
        q.push(Priority::Chat, "c1").expect("open");
        q.push(Priority::Completion, "k1").expect("open");
        q.push(Priority::Completion, "k2").expect("open");
        assert!(q.has_more_urgent(Priority::Chat));
        assert_eq!(
            q.pop_more_urgent(Priority::Chat),
            Some((Priority::Completion, "k1"))
        );
        assert_eq!(q.pop(), Some((Priority::Completion, "k2")));
        assert!(!q.has_more_urgent(Priority::Chat));
        assert!(q.has_waiting(Priority::Chat));
        assert_eq!(q.pop_more_urgent(Priority::Chat), None);
        assert_eq!(q.pop(), Some((Priority::Chat, "c1")));
        assert_eq!(q.pop(), Some((Priority::Prefill, "p1")));
        q.close();
        assert_eq!(q.pop(), None);
        assert_eq!(q.push(Priority::Completion, "late"), Err("late"));
    }

    #[test]
    fn remove_where_drops_matching_jobs_and_pop_wakes_on_push() {
        let q = std::sync::Arc::new(JobQueue::new());
        q.push(Priority::Prefill, 1).expect("open");
        q.push(Priority::Prefill, 2).expect("open");
        q.push(Priority::Completion, 3).expect("open");
        let removed = q.remove_where(|p, j| p == Priority::Prefill && *j == 1);
        assert_eq!(removed, vec![1]);
        assert_eq!(q.pop(), Some((Priority::Completion, 3)));
        assert_eq!(q.pop(), Some((Priority::Prefill, 2)));
        let waiter = std::thread::spawn({
            let q = std::sync::Arc::clone(&q);
            move || q.pop()
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        q.push(Priority::Chat, 4).expect("open");
        assert_eq!(waiter.join().expect("join"), Some((Priority::Chat, 4)));
    }
}
