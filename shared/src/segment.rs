//! Shared-memory layouts: a client slot (control page + two rings) and the engine's doorbell page in engine.lock.
//!
//! A slot segment is a sealed memfd: the client creates it, sizes it, and seals its size (F_SEAL_SHRINK,
//! F_SEAL_GROW, F_SEAL_SEAL), so no peer can ftruncate it under the engine's mapping (SIGBUS). The engine opens
//! it through `/proc/<client pid>/fd/<n>`, as announced in the slot's lock file, and checks owner, mode, seals
//! and size before mapping. It has no name: nothing can be left in /dev/shm, and no other user can pre-create it.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::doorbell::Doorbell;
use crate::error::TransportError;
use crate::ring::{self, CacheLine, RingConsumer, RingError, RingIndices, RingProducer};
use crate::sys::{self, Mapping};

pub const PAGE: usize = 4096;
const SLOT_MAGIC: [u8; 8] = *b"LAPCSLOT";
const SLOT_LAYOUT_VERSION: u32 = 2;
/// Highest slot number + 1; the engine page's slot bitmap has one bit per slot.
pub const MAX_SLOTS: u32 = 4096;
const SLOT_WORDS: usize = MAX_SLOTS as usize / 64;

/// Written once by the creating client before the slot is announced; the server copies and validates it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SlotIdentity {
    magic: [u8; 8],
    layout_version: u32,
    client_to_server_bytes: u32,
    server_to_client_bytes: u32,
    client_pid: u32,
    generation: u64,
}

/// The control page of a slot segment.
#[repr(C)]
struct SlotControl {
    identity: CacheLine<SlotIdentity>,
    /// The client sleeps here (waiting for data or space).
    client_bell: Doorbell,
    /// Set by the server when it closed this connection (protocol violation, shutdown).
    server_closed: CacheLine<AtomicU32>,
    /// 1 while the engine's reactor is (about to be) asleep: this client then wakes it. One flag per slot, not
    /// one in the engine page that every client shares, so a client that clears it only delays itself.
    server_armed: CacheLine<AtomicU32>,
    client_to_server: RingIndices,
    server_to_client: RingIndices,
}

const _: () = assert!(size_of::<SlotControl>() <= PAGE);

/// One client's mapped slot segment.
pub struct SlotSegment {
    mapping: Mapping,
    /// Client side: the memfd, kept open for the connection's life so the engine can open it via /proc.
    memfd: Option<OwnedFd>,
    c2s_bytes: usize,
    s2c_bytes: usize,
    generation: u64,
    client_pid: u32,
}

impl SlotSegment {
    fn control(&self) -> &SlotControl {
        // SAFETY: the mapping is at least one page and page-aligned; SlotControl fits in a page.
        unsafe { &*self.mapping.as_ptr().cast::<SlotControl>() }
    }

    /// Creates a new sealed segment (client side), sized, reserved and initialised.
    pub fn create(
        c2s_bytes: usize,
        s2c_bytes: usize,
        generation: u64,
    ) -> Result<Self, TransportError> {
        if !ring::valid_capacity(c2s_bytes) || !ring::valid_capacity(s2c_bytes) {
            return Err(TransportError::Protocol(format!(
                "ring sizes must be powers of two between {} and {} bytes (got {c2s_bytes}, {s2c_bytes})",
                ring::MIN_RING_BYTES,
                ring::MAX_RING_BYTES
            )));
        }
        let fd = sys::memfd_create_sealable("lapce-ai-slot")
            .map_err(|e| TransportError::io("creating a memfd for the slot", e))?;
        let total = PAGE + c2s_bytes + s2c_bytes;
        sys::size_and_reserve(&fd, total).map_err(|e| {
            TransportError::io(
                format!("reserving {total} bytes of shared memory (is memory full?)"),
                e,
            )
        })?;
        sys::seal_size(&fd).map_err(|e| TransportError::io("sealing the slot's size", e))?;
        let mapping = Mapping::map_shared(&fd, total)
            .map_err(|e| TransportError::io("mapping shared memory", e))?;
        let client_pid = std::process::id();
        let identity = SlotIdentity {
            magic: SLOT_MAGIC,
            layout_version: SLOT_LAYOUT_VERSION,
            client_to_server_bytes: c2s_bytes as u32,
            server_to_client_bytes: s2c_bytes as u32,
            client_pid,
            generation,
        };
        // SAFETY: fresh zeroed mapping owned by us; nobody else can open the memfd before it is announced.
        unsafe {
            std::ptr::write(mapping.as_ptr().cast::<SlotIdentity>(), identity);
        }
        Ok(Self {
            mapping,
            memfd: Some(fd),
            c2s_bytes,
            s2c_bytes,
            generation,
            client_pid,
        })
    }

    /// Client side: the fd number to announce (the engine opens `/proc/<pid>/fd/<n>`).
    pub fn memfd_number(&self) -> Option<i32> {
        self.memfd.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Opens and validates the segment a client announced (server side): `/proc/<pid>/fd/<fd>`, which must be
    /// this user's private, size-sealed memfd. Never truncates or resizes it.
    pub fn open_announced(
        pid: u32,
        fd: i32,
        expected_generation: u64,
    ) -> Result<Self, TransportError> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| TransportError::io(format!("opening the announced segment {path}"), e))?;
        Self::open_file(&file, &path, expected_generation)
    }

    /// Validates and maps an open segment file (see [`SlotSegment::open_announced`]).
    pub fn open_file(
        file: &File,
        name: &str,
        expected_generation: u64,
    ) -> Result<Self, TransportError> {
        let facts =
            sys::fstat(file).map_err(|e| TransportError::io("inspecting shared memory", e))?;
        // Only this user's private segments are served: another user must never get this user's engine (and
        // its API keys) to talk to them.
        if facts.uid != sys::current_uid() || facts.mode & 0o077 != 0 {
            return Err(TransportError::UnsafeRendezvous(format!(
                "shared memory {name} is owned by uid {} with mode {:o}; expected uid {} and mode 600",
                facts.uid,
                facts.mode,
                sys::current_uid()
            )));
        }
        // A segment whose size can still change could be truncated under our mapping (SIGBUS).
        let seals =
            sys::seals(file).map_err(|e| TransportError::io("reading the segment's seals", e))?;
        if !sys::size_is_sealed(seals) {
            return Err(TransportError::Protocol(format!(
                "shared memory {name} is not sealed against resizing (seals {seals:#x})"
            )));
        }
        let size = facts.size;
        let max = (PAGE + 2 * ring::MAX_RING_BYTES) as u64;
        if size < (PAGE + 2 * ring::MIN_RING_BYTES) as u64 || size > max {
            return Err(TransportError::Protocol(format!(
                "slot segment has impossible size {size}"
            )));
        }
        let mapping = Mapping::map_shared(file, size as usize)
            .map_err(|e| TransportError::io("mapping shared memory", e))?;
        // Copy the identity out once, then validate the copy.
        // SAFETY: mapping is >= one page.
        let identity = unsafe { std::ptr::read_volatile(mapping.as_ptr().cast::<SlotIdentity>()) };
        let c2s = identity.client_to_server_bytes as usize;
        let s2c = identity.server_to_client_bytes as usize;
        if identity.magic != SLOT_MAGIC
            || identity.layout_version != SLOT_LAYOUT_VERSION
            || identity.generation != expected_generation
            || !ring::valid_capacity(c2s)
            || !ring::valid_capacity(s2c)
            || (PAGE + c2s + s2c) as u64 != size
        {
            return Err(TransportError::Protocol(format!(
                "slot segment {name} has an invalid header: {identity:?} (size {size})"
            )));
        }
        let segment = Self {
            mapping,
            memfd: None,
            c2s_bytes: c2s,
            s2c_bytes: s2c,
            generation: identity.generation,
            client_pid: identity.client_pid,
        };
        segment.validate_fresh_indices()?;
        Ok(segment)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn client_pid(&self) -> u32 {
        self.client_pid
    }

    pub fn ring_sizes(&self) -> (usize, usize) {
        (self.c2s_bytes, self.s2c_bytes)
    }

    pub fn client_bell(&self) -> &Doorbell {
        &self.control().client_bell
    }

    pub fn server_closed(&self) -> bool {
        self.control().server_closed.0.load(Ordering::Acquire) != 0
    }

    pub fn mark_server_closed(&self) {
        self.control().server_closed.0.store(1, Ordering::Release);
    }

    /// Server side, before the reactor re-checks this slot and sleeps: asks the client to wake it.
    pub fn arm_server_wakeup(&self) {
        let armed = &self.control().server_armed.0;
        // Only write when it changes: an idle client's line then stays shared in both caches.
        if armed.load(Ordering::Relaxed) != 1 {
            armed.store(1, Ordering::Relaxed);
        }
    }

    /// Client side, after publishing (data or space): wakes the engine's reactor if it sleeps. Costs a fence
    /// and a load when the reactor is awake; a syscall only when it armed this slot.
    #[inline]
    pub fn wake_server(&self, engine: &EnginePage) {
        // Pairs with the reactor's fence between arming and re-checking (see `Doorbell`).
        std::sync::atomic::fence(Ordering::SeqCst);
        let armed = &self.control().server_armed.0;
        if armed.load(Ordering::Relaxed) != 0 && armed.swap(0, Ordering::AcqRel) != 0 {
            engine.bell().ring_always();
        }
    }
    #[cfg(feature = "test-hooks")]
    pub(crate) fn hostile_set_client_to_server_tail(&self, tail: u64) {
        self.control()
            .client_to_server
            .tail
            .0
            .store(tail, Ordering::Release);
    }

    fn data(&self, offset: usize) -> *mut u8 {
        // SAFETY: offsets used below are within the mapping (validated sizes).
        unsafe { self.mapping.as_ptr().add(offset) }
    }

    /// # Safety
    /// Call at most once per segment and side; the returned ends must not outlive `self`.
    pub unsafe fn client_ends(&self) -> Result<(RingProducer, RingConsumer), RingError> {
        let control = self.control();
        // SAFETY: pointers into our mapping with validated capacities; caller keeps the mapping alive.
        unsafe {
            Ok((
                RingProducer::new(&control.client_to_server, self.data(PAGE), self.c2s_bytes)?,
                RingConsumer::new(
                    &control.server_to_client,
                    self.data(PAGE + self.c2s_bytes),
                    self.s2c_bytes,
                )?,
            ))
        }
    }

    /// Checks the ring indices the client left in a fresh segment: nothing consumed, nothing sent by the
    /// server, and the client's tail aligned and within its ring (only its hello can be there).
    pub fn validate_fresh_indices(&self) -> Result<(), TransportError> {
        let control = self.control();
        let c2s_tail = control.client_to_server.tail.0.load(Ordering::Acquire);
        let fresh = control.client_to_server.head.0.load(Ordering::Acquire) == 0
            && control.server_to_client.head.0.load(Ordering::Acquire) == 0
            && control.server_to_client.tail.0.load(Ordering::Acquire) == 0
            && c2s_tail.is_multiple_of(8)
            && c2s_tail <= self.c2s_bytes as u64;
        if fresh {
            Ok(())
        } else {
            Err(TransportError::Protocol(
                "slot segment has impossible initial ring indices".into(),
            ))
        }
    }

    /// # Safety
    /// As [`SlotSegment::client_ends`], for the server side. Call [`SlotSegment::validate_fresh_indices`] first.
    pub unsafe fn server_ends(&self) -> Result<(RingProducer, RingConsumer), RingError> {
        let control = self.control();
        // SAFETY: as above.
        unsafe {
            Ok((
                RingProducer::new(
                    &control.server_to_client,
                    self.data(PAGE + self.c2s_bytes),
                    self.s2c_bytes,
                )?,
                RingConsumer::new(&control.client_to_server, self.data(PAGE), self.c2s_bytes)?,
            ))
        }
    }
}

/// What a client writes at the start of its slot lock file: which segment to open. Fixed width, so the engine
/// reads it in one call and a half-written one never parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    pub generation: u64,
    pub pid: u32,
    pub memfd: i32,
}

impl Announcement {
    /// Encoded size: `gggggggggggggggg pppppppppp ffffffffff\n`.
    pub const LEN: usize = 16 + 1 + 10 + 1 + 10 + 1;

    pub fn new(generation: u64, pid: u32, memfd: i32) -> Self {
        Self {
            generation,
            pid,
            memfd,
        }
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let text = format!(
            "{:016x} {:010} {:010}\n",
            self.generation, self.pid, self.memfd
        );
        let mut out = [b' '; Self::LEN];
        out.copy_from_slice(&text.as_bytes()[..Self::LEN]);
        out
    }

    /// `None` for anything that is not a complete announcement.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes.get(..Self::LEN)?).ok()?;
        let text = text.strip_suffix('\n')?;
        let mut parts = text.split(' ');
        let generation = u64::from_str_radix(parts.next()?, 16).ok()?;
        let pid = parts.next()?.parse().ok()?;
        let memfd = parts.next()?.parse().ok()?;
        if parts.next().is_some() || memfd < 0 {
            return None;
        }
        Some(Self::new(generation, pid, memfd))
    }
}

/// The engine's page inside engine.lock: its pid (as text, for people and error messages) and its doorbell.
pub struct EnginePage {
    mapping: Mapping,
}

const ENGINE_PID_BYTES: usize = 32;

#[repr(C)]
struct EngineControl {
    pid_text: CacheLine<[u8; ENGINE_PID_BYTES]>,
    bell: Doorbell,
    /// A random non-zero number each engine publishes when it is ready (0 while it starts). A restarted engine
    /// may lock the same engine.lock inode; a client compares this number with the one it connected to.
    incarnation: CacheLine<AtomicU64>,
    /// One bit per slot, set while the slot is (believed) taken: a connecting client tries the lowest clear
    /// bit first instead of probing every slot. A hint only: the slot's flock decides, a wrong bit costs a
    /// probe, and a bitmap with no clear bit sends the client to a full scan.
    slots_taken: [AtomicU64; SLOT_WORDS],
    /// Bumped by a client after it announced its slot (and set its bit below), before it rings the bell: the
    /// reactor then attaches the slot itself, with no hop through the acceptor thread.
    announce_sequence: CacheLine<AtomicU32>,
    /// One bit per slot whose client announced a segment the reactor has not looked at yet. A hint only: the
    /// slot's lock file says which segment, and the segment is verified as from any other source. A bit a peer
    /// clears costs the announcing client one liveness interval (it then announces again and touches its lock
    /// file, which the acceptor's inotify watch sees); a bit a peer sets costs the reactor one read of that
    /// slot's lock file.
    announced: [AtomicU64; SLOT_WORDS],
}

const _: () = assert!(size_of::<EngineControl>() <= PAGE);

impl EnginePage {
    /// Server side: grows engine.lock to a page (never shrinks it), maps it and resets the doorbell.
    pub fn create(file: &File) -> io::Result<Self> {
        let size = sys::fstat(file)?.size;
        if size < PAGE as u64 {
            file.set_len(PAGE as u64)?;
        }
        let mapping = Mapping::map_shared(file, PAGE)?;
        let page = Self { mapping };
        page.bell().armed.0.store(0, Ordering::SeqCst);
        page.control().incarnation.0.store(0, Ordering::SeqCst);
        for word in page
            .control()
            .slots_taken
            .iter()
            .chain(&page.control().announced)
        {
            word.store(0, Ordering::Relaxed);
        }
        page.control()
            .announce_sequence
            .0
            .store(0, Ordering::SeqCst);
        Ok(page)
    }

    /// The identity line as it is now (the engine writes it when it binds and again when it is ready).
    pub fn identity(&self) -> EngineIdentity {
        // SAFETY: the line lies inside the mapped page; a copy is taken once and parsed privately (an engine
        // rewriting it concurrently can only make the copy unparsable, which reads as Blank or Other).
        let text = unsafe {
            std::ptr::read_volatile(self.mapping.as_ptr().cast::<[u8; ENGINE_PID_BYTES]>())
        };
        EngineIdentity::parse(&text)
    }

    /// Server side, once ready: publishes a fresh random incarnation number and returns it.
    pub fn publish_incarnation(&self) -> u64 {
        let incarnation = sys::random_u64().max(1);
        self.control()
            .incarnation
            .0
            .store(incarnation, Ordering::Release);
        incarnation
    }

    /// The incarnation of the engine that owns this page (0 while it starts).
    pub fn incarnation(&self) -> u64 {
        self.control().incarnation.0.load(Ordering::Acquire)
    }

    /// Client side: maps an existing engine.lock, refusing one that is not a full page yet.
    pub fn open(file: &File) -> io::Result<Option<Self>> {
        let size = sys::fstat(file)?.size;
        if size < PAGE as u64 {
            return Ok(None);
        }
        Ok(Some(Self {
            mapping: Mapping::map_shared(file, PAGE)?,
        }))
    }

    fn control(&self) -> &EngineControl {
        // SAFETY: one mapped page; EngineControl fits.
        unsafe { &*self.mapping.as_ptr().cast::<EngineControl>() }
    }

    pub fn bell(&self) -> &Doorbell {
        &self.control().bell
    }

    /// The lowest slot the bitmap calls free, if any (always `< MAX_SLOTS`, whatever a peer wrote there).
    pub fn free_slot_hint(&self) -> Option<u32> {
        self.control()
            .slots_taken
            .iter()
            .enumerate()
            .find_map(|(index, word)| {
                let bits = word.load(Ordering::Relaxed);
                (bits != u64::MAX).then(|| index as u32 * 64 + bits.trailing_ones())
            })
    }

    /// Records that `slot` is taken (or free again). Out-of-range slots are ignored.
    pub fn mark_slot(&self, slot: u32, taken: bool) {
        let Some(word) = self.control().slots_taken.get(slot as usize / 64) else {
            return;
        };
        let bit = 1u64 << (slot % 64);
        if taken {
            word.fetch_or(bit, Ordering::Relaxed);
        } else {
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Client side, after its announcement is in the slot's lock file: tells the reactor to look at `slot`. The
    /// caller then rings the engine's bell. Out-of-range slots are ignored.
    pub fn announce(&self, slot: u32) {
        let control = self.control();
        let Some(word) = control.announced.get(slot as usize / 64) else {
            return;
        };
        word.fetch_or(1u64 << (slot % 64), Ordering::Release);
        control.announce_sequence.0.fetch_add(1, Ordering::Release);
    }

    /// Changes whenever a client announced a slot (see [`EnginePage::announce`]).
    pub fn announce_sequence(&self) -> u32 {
        self.control().announce_sequence.0.load(Ordering::Acquire)
    }

    /// Server side: clears every announced bit, calling `f` with each slot that had one (always `< MAX_SLOTS`).
    pub fn take_announced(&self, mut f: impl FnMut(u32)) {
        for (index, word) in self.control().announced.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::Acquire);
            while bits != 0 {
                f(index as u32 * 64 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
    }

    /// True while `slot`'s announcement waits for the reactor (its bit is still set). Out-of-range slots: false.
    pub fn is_announced(&self, slot: u32) -> bool {
        self.control()
            .announced
            .get(slot as usize / 64)
            .is_some_and(|word| word.load(Ordering::Acquire) & (1u64 << (slot % 64)) != 0)
    }

    /// Test hook: lets a test act as a client that rewrites the shared engine page.
    #[cfg(feature = "test-hooks")]
    pub fn hostile_write(&self, armed: u32, sequence: Option<u32>, slot_words: Option<u64>) {
        let control = self.control();
        control.bell.armed.0.store(armed, Ordering::SeqCst);
        if let Some(sequence) = sequence {
            control.bell.sequence.0.store(sequence, Ordering::SeqCst);
        }
        if let Some(bits) = slot_words {
            for word in &control.slots_taken {
                word.store(bits, Ordering::Relaxed);
            }
        }
    }

    /// Test hook: a client that overwrites the announced-slot bitmap with `bits` in every word.
    #[cfg(feature = "test-hooks")]
    pub fn hostile_write_announced(&self, bits: u64) {
        for word in &self.control().announced {
            word.store(bits, Ordering::Relaxed);
        }
    }
}

/// The version of what a client and an engine share before they can exchange a `Hello`: the engine page's
/// layout, the slot announcement and the slot segment's layout. Bump it with any incompatible change there. The
/// engine writes it after its pid in engine.lock; a client that finds another version (or none: releases before
/// this field) refuses at once with [`TransportError::IncompatibleEngine`](crate::TransportError), instead of
/// announcing itself to an engine that cannot read the announcement and waiting out its timeout.
pub const RENDEZVOUS_VERSION: u32 = 3;

/// What the identity line at the start of engine.lock says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineIdentity {
    /// Nothing yet: the engine is starting (or the file is not an engine's).
    Blank,
    /// An engine of this rendezvous version.
    Compatible { pid: u32 },
    /// An engine of another release: `version` is `None` for releases before the version field.
    Other { pid: u32, version: Option<u32> },
}

impl EngineIdentity {
    /// Parses `<pid>[ rendezvous=<version>]` followed by blanks (see [`write_engine_pid`]).
    pub fn parse(text: &[u8]) -> Self {
        let text = String::from_utf8_lossy(text);
        let mut words = text
            .split(|c: char| c.is_whitespace() || c == '\0')
            .filter(|w| !w.is_empty());
        let Some(pid) = words.next().and_then(|w| w.parse::<u32>().ok()) else {
            return Self::Blank;
        };
        let version = words
            .next()
            .and_then(|w| w.strip_prefix("rendezvous="))
            .and_then(|v| v.parse::<u32>().ok());
        if version == Some(RENDEZVOUS_VERSION) {
            Self::Compatible { pid }
        } else {
            Self::Other { pid, version }
        }
    }

    /// Reads the identity line of engine.lock through `file`, without mapping it (for messages and tests;
    /// liveness is the lock, not this line).
    pub fn read(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::FileExt;
        let mut text = [0u8; ENGINE_PID_BYTES];
        let n = file.read_at(&mut text, 0)?;
        Ok(Self::parse(&text[..n]))
    }

    /// The engine's pid, of whichever release; `None` while the line is blank.
    pub fn pid(self) -> Option<u32> {
        match self {
            Self::Blank => None,
            Self::Compatible { pid } | Self::Other { pid, .. } => Some(pid),
        }
    }
}

/// Writes the identity line (`<pid> rendezvous=<version>`) at the start of engine.lock with a normal write
/// (which also announces readiness to inotify watchers of the rendezvous directory).
pub fn write_engine_pid(file: &File) -> io::Result<()> {
    write_identity_line(
        file,
        &format!("{} rendezvous={RENDEZVOUS_VERSION}", std::process::id()),
    )
}

/// Writes `line` (at most 30 bytes, no newline) as engine.lock's identity line: the line, a newline, blanks and a
/// final newline, as every release has laid it out. [`write_engine_pid`] writes this release's; tests write
/// other releases'.
pub fn write_identity_line(file: &File, line: &str) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    if line.len() > ENGINE_PID_BYTES - 2 || line.contains('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("identity line {line:?} does not fit"),
        ));
    }
    let mut text = [b' '; ENGINE_PID_BYTES];
    text[..line.len()].copy_from_slice(line.as_bytes());
    text[line.len()] = b'\n';
    text[ENGINE_PID_BYTES - 1] = b'\n';
    file.write_all_at(&text, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_free_slot_hint_follows_the_bitmap_and_stays_in_range() {
        let file = tempfile::tempfile().unwrap();
        let page = EnginePage::create(&file).unwrap();
        assert_eq!(page.free_slot_hint(), Some(0));
        for slot in 0..70 {
            page.mark_slot(slot, true);
        }
        assert_eq!(page.free_slot_hint(), Some(70));
        page.mark_slot(3, false);
        assert_eq!(page.free_slot_hint(), Some(3));
        page.mark_slot(MAX_SLOTS + 5, true); // ignored, no panic
                                             // A hostile page: every bit set means "no hint", never a slot out of range.
        for word in &page.control().slots_taken {
            word.store(u64::MAX, Ordering::Relaxed);
        }
        assert_eq!(page.free_slot_hint(), None);
        page.control().slots_taken[SLOT_WORDS - 1].store(u64::MAX >> 1, Ordering::Relaxed);
        assert_eq!(page.free_slot_hint(), Some(MAX_SLOTS - 1));
    }

    #[test]
    fn announced_slots_are_taken_once_and_stay_in_range() {
        let file = tempfile::tempfile().unwrap();
        let page = EnginePage::create(&file).unwrap();
        let before = page.announce_sequence();
        for slot in [3, 64, 200, MAX_SLOTS - 1, MAX_SLOTS + 7] {
            page.announce(slot);
        }
        assert_ne!(page.announce_sequence(), before);
        let mut seen = Vec::new();
        page.take_announced(|slot| seen.push(slot));
        assert_eq!(seen, [3, 64, 200, MAX_SLOTS - 1]);
        page.take_announced(|slot| panic!("slot {slot} taken twice"));
        // A hostile page with every bit set yields every slot once, none out of range.
        for word in &page.control().announced {
            word.store(u64::MAX, Ordering::Relaxed);
        }
        let mut count = 0;
        page.take_announced(|slot| {
            assert!(slot < MAX_SLOTS);
            count += 1;
        });
        assert_eq!(count, MAX_SLOTS);
    }

    fn reopen(segment: &SlotSegment, generation: u64) -> Result<SlotSegment, TransportError> {
        let fd = segment.memfd_number().expect("client side has the memfd");
        SlotSegment::open_announced(std::process::id(), fd, generation)
    }

    #[test]
    fn open_refuses_impossible_initial_ring_indices() {
        let segment = SlotSegment::create(4096, 4096, 7).unwrap();
        let control = segment.control();
        assert!(reopen(&segment, 7).is_ok());
        assert!(reopen(&segment, 8).is_err(), "wrong generation");
        // An unaligned engine-side tail would make the engine write past the mapping.
        control.server_to_client.tail.0.store(3, Ordering::Release);
        assert!(reopen(&segment, 7).is_err());
        control.server_to_client.tail.0.store(0, Ordering::Release);
        control
            .client_to_server
            .tail
            .0
            .store(4096 + 8, Ordering::Release);
        assert!(reopen(&segment, 7).is_err());
        control
            .client_to_server
            .tail
            .0
            .store(u64::MAX - 7, Ordering::Release);
        assert!(reopen(&segment, 7).is_err());
        control.client_to_server.tail.0.store(64, Ordering::Release);
        assert!(reopen(&segment, 7).is_ok());
    }

    #[test]
    fn a_sealed_segment_cannot_be_resized_by_its_creator() {
        let segment = SlotSegment::create(4096, 4096, 9).unwrap();
        let fd = segment.memfd.as_ref().expect("client side");
        for len in [PAGE as libc::off_t, 64 * PAGE as libc::off_t, 0] {
            // SAFETY: plain syscall on an fd we own.
            let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
            assert_eq!(rc, -1, "ftruncate to {len} must fail on a sealed segment");
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        }
        assert!(reopen(&segment, 9).is_ok());
    }

    #[test]
    fn an_unsealed_or_shared_segment_is_refused() {
        // Unsealed: a peer could shrink it under the engine's mapping.
        let fd = sys::memfd_create_sealable("lapce-ai-test").unwrap();
        sys::size_and_reserve(&fd, PAGE + 2 * 4096).unwrap();
        let file = File::from(fd);
        let err = SlotSegment::open_file(&file, "test", 1)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("not sealed"), "{err}");
        // Sealed but readable by others.
        let segment = SlotSegment::create(4096, 4096, 3).unwrap();
        let fd = segment.memfd.as_ref().expect("client side");
        // SAFETY: plain syscall on an fd we own.
        assert_eq!(unsafe { libc::fchmod(fd.as_raw_fd(), 0o644) }, 0);
        let err = reopen(&segment, 3).err().expect("refused");
        assert!(err.to_string().contains("mode 644"), "{err}");
    }
}
