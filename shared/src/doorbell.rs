//! Wake-ups between processes: a futex doorbell in shared memory plus a bounded, adaptive spin before sleeping.
//!
//! The sleeper arms the bell (`armed`), re-checks its condition, then futex-waits on `sequence`; a notifier
//! only makes a syscall when it disarms an armed bell, so a busy stream costs no syscalls and a sleeping peer
//! costs one wake-up per sleep, not one per message.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::ring::CacheLine;
use crate::sys;

/// The shared part of a doorbell. Lives in shared memory, zero-initialised.
#[repr(C)]
pub struct Doorbell {
    pub sequence: CacheLine<AtomicU32>,
    /// 1 while the owner is (about to be) asleep and nobody has woken it yet.
    pub armed: CacheLine<AtomicU32>,
}

impl Doorbell {
    /// Wakes the owner of this doorbell if it sleeps. Call after publishing (data or space).
    #[inline]
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.armed.0.load(Ordering::Relaxed) != 0 && self.armed.0.swap(0, Ordering::AcqRel) != 0
        {
            self.sequence.0.fetch_add(1, Ordering::Release);
            sys::futex_wake_all(&self.sequence.0);
        }
    }

    /// Arms the bell before a final re-check and sleep.
    fn arm(&self) -> u32 {
        let seen = self.sequence.0.load(Ordering::Acquire);
        self.armed.0.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        seen
    }

    /// Arms the bell without sleeping yet (the reactor, just before its final re-check: see
    /// [`wait_forever_armed`]). Writes only when it changes, so a spinning sleeper leaves the line shared.
    pub fn set_armed(&self) {
        if self.armed.0.load(Ordering::Relaxed) != 1 {
            self.armed.0.store(1, Ordering::Relaxed);
        }
    }

    /// Disarms the bell after a wake-up nobody announced on it, so later notifiers skip the syscall.
    pub fn disarm(&self) {
        if self.armed.0.load(Ordering::Relaxed) != 0 {
            self.armed.0.store(0, Ordering::Relaxed);
        }
    }

    /// Rings unconditionally (used for out-of-band events such as shutdown).
    pub fn ring_always(&self) {
        self.sequence.0.fetch_add(1, Ordering::Release);
        sys::futex_wake_all(&self.sequence.0);
    }
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The condition became true.
    Ready,
    /// The sleep timed out (or woke spuriously) without the condition; the caller re-checks liveness/deadline.
    Slept,
}

/// Per-waiter adaptive spin budget: grows when spinning pays off, shrinks when the waiter ends up sleeping.
#[derive(Debug, Clone)]
pub struct SpinPolicy {
    budget: Duration,
    max: Duration,
}

impl SpinPolicy {
    /// The budget never drops below this on a multi-CPU machine: a round trip here is ~1 us, and a spin that
    /// collapsed to the round-trip time would fail half the time and pay a ~17 us sleep/wake.
    const MIN: Duration = Duration::from_micros(20);

    /// `max` is the longest spin; on a single CPU spinning is disabled (it would only steal the peer's time).
    pub fn new(max: Duration) -> Self {
        let max = if sys::available_cpus() < 2 {
            Duration::ZERO
        } else {
            max
        };
        Self { budget: max, max }
    }

    /// The current budget (what the next spin may take).
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// A policy with `max` that starts from `budget` (clamped to it) instead of from `max`: carries what
    /// earlier waits of the same kind learnt.
    pub fn resume(max: Duration, budget: Duration) -> Self {
        let mut policy = Self::new(max);
        policy.budget = budget.min(policy.max);
        policy
    }

    pub fn default_budget() -> Self {
        Self::new(Duration::from_micros(50))
    }

    fn spin_succeeded(&mut self) {
        self.budget = (self.budget * 2).clamp(Self::MIN.min(self.max), self.max);
    }

    fn spin_failed(&mut self) {
        self.budget = (self.budget / 2).max(Self::MIN.min(self.max));
    }

    /// Spins until `ready()` or the budget runs out. Returns true if ready. The clock is read every 64 checks:
    /// for a cheap `ready` (one ring's index).
    pub fn spin(&mut self, ready: impl FnMut() -> bool) -> bool {
        self.spin_checking_clock_every(64, ready)
    }

    /// As [`SpinPolicy::spin`], reading the clock every `checks` calls of `ready`: fewer for a `ready` whose
    /// cost grows with the number of connections (the reactor's), so the budget holds however many there are.
    pub fn spin_checking_clock_every(
        &mut self,
        checks: u32,
        mut ready: impl FnMut() -> bool,
    ) -> bool {
        if self.budget.is_zero() {
            return ready();
        }
        let start = Instant::now();
        loop {
            for _ in 0..checks.max(1) {
                if ready() {
                    self.spin_succeeded();
                    return true;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= self.budget {
                self.spin_failed();
                return false;
            }
        }
    }
}

/// Spins, then sleeps on `bell` until `ready()` or `timeout`. Never misses a wake-up: the condition is re-checked
/// after announcing the sleep.
pub fn wait_on(
    bell: &Doorbell,
    spin: &mut SpinPolicy,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> WaitOutcome {
    if spin.spin(&mut ready) {
        return WaitOutcome::Ready;
    }
    let seen = bell.arm();
    if ready() {
        return WaitOutcome::Ready;
    }
    sys::futex_wait(&bell.sequence.0, seen, Some(timeout));
    if ready() {
        WaitOutcome::Ready
    } else {
        WaitOutcome::Slept
    }
}

/// Sleeps on `bell` with no timeout until `ready()` (the server reactor, so an idle server uses no CPU).
/// `arm` announces the sleep where the wakers look: the reactor arms a flag in every client's slot, so no
/// connected client can keep it asleep by clearing a flag the others depend on. A waker that finds its flag
/// armed clears it and calls [`Doorbell::ring_always`]. The shared `armed` word of the engine page is armed as
/// well, for clients that are still connecting (they have no slot mapped by the engine yet): one that a peer
/// cleared costs a connecting client one liveness interval, after which it rings unconditionally.
///
/// `checks_per_clock`: calls of `ready` between two clock reads while spinning (see
/// [`SpinPolicy::spin_checking_clock_every`]).
pub fn wait_forever_armed(
    bell: &Doorbell,
    spin: &mut SpinPolicy,
    checks_per_clock: u32,
    mut arm: impl FnMut(),
    mut ready: impl FnMut() -> bool,
) {
    if spin.spin_checking_clock_every(checks_per_clock, &mut ready) {
        return;
    }
    loop {
        let seen = bell.sequence.0.load(Ordering::Acquire);
        arm();
        // Pairs with the waker's fence between publishing and reading its flag.
        fence(Ordering::SeqCst);
        if ready() {
            return;
        }
        sys::futex_wait(&bell.sequence.0, seen, None);
        if ready() {
            return;
        }
    }
}
