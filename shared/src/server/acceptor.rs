//! The acceptor thread: inotify on the slots directory reports dead clients (and late announcements).

use crate::util::lock;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchMask};

use super::{Attach, InboxEvent, Shared};
use crate::endpoint::Endpoint;
use crate::error::TransportError;
use crate::lockfile::{self, HeldLock, TryLock};
use crate::segment::{Announcement, SlotSegment};

/// Starts watching before anything is scanned, so no death can slip between scan and watch. Announcements are
/// not watched (a connecting client rings the reactor, which attaches it: see [`open_announcement`]), except
/// as a fallback: a client still unanswered after a liveness interval touches its lock file (`IN_ATTRIB`), in
/// case a peer wiped its hint in the shared engine page.
pub(super) fn watch_slots(endpoint: &Endpoint) -> Result<Inotify, TransportError> {
    let inotify = Inotify::init().map_err(|e| TransportError::io("initialising inotify", e))?;
    inotify
        .watches()
        .add(
            endpoint.slots_dir(),
            WatchMask::CLOSE_WRITE | WatchMask::DELETE | WatchMask::ATTRIB,
        )
        .map_err(|e| {
            TransportError::io(format!("watching {}", endpoint.slots_dir().display()), e)
        })?;
    Ok(inotify)
}

pub(super) fn run(shared: &Shared, mut inotify: Inotify, wake: &OwnedFd) {
    rescan(shared);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut rechecks = Rechecks::default();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, rechecks.poll_timeout_ms()) };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        rechecks.run_due(shared);
        if rc == 0 {
            continue;
        }
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %err, "acceptor poll failed");
                return;
            }
            continue;
        }
        let events = match inotify.read_events(&mut buffer) {
            Ok(events) => events,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::error!(error = %e, "reading inotify events failed");
                return;
            }
        };
        let mut overflow = false;
        let mut to_check: Vec<(u32, EventMask)> = Vec::new();
        for event in events {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                overflow = true;
                continue;
            }
            let Some(slot) = event
                .name
                .and_then(|n| n.to_str())
                .and_then(parse_slot_file)
            else {
                continue;
            };
            to_check.push((slot, event.mask));
        }
        if overflow {
            tracing::warn!("inotify queue overflowed; rescanning all slots");
            rescan(shared);
            continue;
        }
        for (slot, mask) in to_check {
            // Probed again while held, attached or not: the reactor may attach this slot after this probe (see
            // `open_announcement`), with a dying client's flock not yet released.
            if mask.intersects(EventMask::CLOSE_WRITE | EventMask::DELETE)
                && check_death(shared, slot)
            {
                rechecks.schedule(slot);
            }
            if mask.contains(EventMask::ATTRIB) {
                check_announcement(shared, slot);
            }
        }
    }
}

fn parse_slot_file(name: &str) -> Option<u32> {
    name.strip_suffix(".lock")?.parse().ok()
}

fn rescan(shared: &Shared) {
    let Ok(entries) = std::fs::read_dir(shared.endpoint.slots_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if let Some(slot) = entry.file_name().to_str().and_then(parse_slot_file) {
            check_death(shared, slot);
            check_announcement(shared, slot);
        }
    }
    let attached: Vec<u32> = lock(&shared.attached).keys().copied().collect();
    for slot in attached {
        check_death(shared, slot);
    }
}

/// A slot found with an announcement at start-up, after an inotify overflow, or touched by a client the reactor
/// did not answer: hand it to the reactor.
fn check_announcement(shared: &Shared, slot: u32) {
    let opened = open_announcement(shared, slot);
    if opened.replaces.is_none() && opened.segment.is_none() {
        return;
    }
    shared.post(|inbox| {
        if let Some(generation) = opened.replaces {
            inbox.events.push(InboxEvent::Detach { slot, generation });
        }
        if let Some(segment) = opened.segment {
            inbox
                .events
                .push(InboxEvent::Attach(Attach { slot, segment }));
        }
    });
}

/// What [`open_announcement`] found in a slot.
pub(super) struct Opened {
    /// The verified, mapped segment of a new client.
    pub(super) segment: Option<SlotSegment>,
    /// The generation of the slot's previous holder, now gone (the slot changed hands): detach it.
    pub(super) replaces: Option<u64>,
}

/// Reads the announcement in `slot`'s lock file and, unless that generation was seen already, opens and
/// verifies the segment it names (owner, mode, seals, size: [`SlotSegment::open_announced`]). Called by the
/// reactor when a client rings it, and by the acceptor when it rescans.
///
/// The generation is recorded in `attached` before the client's lock is probed, so its death is never lost:
/// a death [`check_death`] saw before the record finds the lock free here; one after it sees the record and
/// reports a detach.
pub(super) fn open_announcement(shared: &Shared, slot: u32) -> Opened {
    let nothing = Opened {
        segment: None,
        replaces: None,
    };
    let path = shared.endpoint.slot_lock_path(slot);
    let Ok(file) = std::fs::File::open(&path) else {
        return nothing;
    };
    let mut text = [0u8; Announcement::LEN];
    if !matches!(file.read_at(&mut text, 0), Ok(Announcement::LEN)) {
        return nothing;
    }
    let Some(announcement) = Announcement::parse(&text) else {
        return nothing;
    };
    let generation = announcement.generation;
    let replaces = {
        let mut attached = lock(&shared.attached);
        let previous = attached.get(&slot).copied();
        if previous == Some(generation) {
            return nothing;
        }
        attached.insert(slot, generation);
        previous
    };
    let forget = || {
        let mut attached = lock(&shared.attached);
        if attached.get(&slot) == Some(&generation) {
            attached.remove(&slot);
        }
    };
    if !lockfile::is_locked_by_other(&file).unwrap_or(false) {
        // The client released its slot (or died) before we looked.
        forget();
        return Opened {
            segment: None,
            replaces,
        };
    }
    match SlotSegment::open_announced(announcement.pid, announcement.memfd, generation) {
        Ok(segment) => Opened {
            segment: Some(segment),
            replaces,
        },
        // The client died before we looked: its death is handled by check_death.
        Err(TransportError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            forget();
            Opened {
                segment: None,
                replaces,
            }
        }
        Err(e) => {
            // Stays recorded, so the same announcement is not tried again.
            tracing::warn!(slot, error = %e, "refusing a slot segment");
            Opened {
                segment: None,
                replaces,
            }
        }
    }
}

/// A slot file was closed or deleted: if nobody holds its lock any more, the client is gone.
/// Returns true when the lock is still held (the caller may probe again: see [`Rechecks`]).
fn check_death(shared: &Shared, slot: u32) -> bool {
    let path = shared.endpoint.slot_lock_path(slot);
    let gone = match HeldLock::try_acquire_existing(&path) {
        Ok(Some(TryLock::Busy)) => false,
        Ok(Some(TryLock::Acquired(held))) => {
            held.remove();
            true
        }
        Ok(None) => true,
        Err(e) => {
            tracing::warn!(slot, error = %e, "probing a slot lock failed");
            false
        }
    };
    if gone {
        shared.page.mark_slot(slot, false);
        if let Some(generation) = lock(&shared.attached).remove(&slot) {
            tracing::debug!(slot, "client gone");
            shared.post(|inbox| inbox.events.push(InboxEvent::Detach { slot, generation }));
        }
    }
    !gone
}

/// Slots to probe again after a close event found their lock still held. A dying process's files are closed
/// (IN_CLOSE_WRITE queued) before the kernel drops its flock, so the first probe can lose that race; a few
/// probes with a growing delay (1 ms .. 128 ms, about 255 ms in all) close the gap without polling forever.
#[derive(Default)]
struct Rechecks {
    pending: Vec<Recheck>,
}

struct Recheck {
    slot: u32,
    due: Instant,
    delay: Duration,
}

impl Rechecks {
    const FIRST_DELAY: Duration = Duration::from_millis(1);
    const LAST_DELAY: Duration = Duration::from_millis(128);

    fn schedule(&mut self, slot: u32) {
        self.pending.retain(|r| r.slot != slot);
        self.pending.push(Recheck {
            slot,
            due: Instant::now() + Self::FIRST_DELAY,
            delay: Self::FIRST_DELAY,
        });
    }

    /// Milliseconds until the next probe is due, as `poll` wants it (-1 = none pending).
    fn poll_timeout_ms(&self) -> libc::c_int {
        let now = Instant::now();
        self.pending
            .iter()
            .map(|r| r.due.saturating_duration_since(now))
            .min()
            .map_or(-1, |d| d.as_millis().clamp(1, 1_000) as libc::c_int)
    }

    /// Probes every slot that is due; reschedules those still held until the last delay has passed.
    fn run_due(&mut self, shared: &Shared) {
        let now = Instant::now();
        let mut still = Vec::new();
        for mut recheck in std::mem::take(&mut self.pending) {
            if recheck.due > now {
                still.push(recheck);
                continue;
            }
            if check_death(shared, recheck.slot) && recheck.delay < Self::LAST_DELAY {
                recheck.delay *= 2;
                recheck.due = now + recheck.delay;
                still.push(recheck);
            }
        }
        self.pending = still;
    }
}
