//! Single-producer single-consumer byte ring in shared memory, hardened against a peer that scribbles on it.
//!
//! Records are `[len: u32][kind: u32][len bytes][pad to 8]`, never split across the wrap: when a record does not
//! fit before the end, a padding record fills the rest and the record starts at offset 0. Indices are u64 byte
//! counters that never wrap. Each side keeps its own index privately and only *publishes* it to shared memory,
//! so the peer can lie about its own index but never corrupt ours; every value read from shared memory is
//! validated before use.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Bytes of the per-record header.
pub const RECORD_HEADER_LEN: usize = 8;
const KIND_DATA: u32 = 0x4441_5441; // "DATA"
const KIND_PADDING: u32 = 0x5041_4444; // "PADD"

/// Smallest and largest ring capacities accepted from a peer.
pub const MIN_RING_BYTES: usize = 4096;
pub const MAX_RING_BYTES: usize = 64 * 1024 * 1024;

/// One 128-byte line, so producer and consumer indices never share a cache line (or an adjacent-line prefetch).
#[repr(C, align(128))]
pub struct CacheLine<T>(pub T);

/// The shared-memory control block of one ring.
#[repr(C)]
pub struct RingIndices {
    /// Bytes ever published by the producer.
    pub tail: CacheLine<AtomicU64>,
    /// Bytes ever released by the consumer.
    pub head: CacheLine<AtomicU64>,
    /// Set by a producer that found the ring full and is about to wait for space.
    pub producer_waiting: CacheLine<AtomicU32>,
}

/// A ring invariant the peer violated; the connection must be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error(
        "peer published an impossible {which} index {value} (ours {ours}, capacity {capacity})"
    )]
    BadIndex {
        which: &'static str,
        value: u64,
        ours: u64,
        capacity: u64,
    },
    #[error("corrupt record header at offset {offset}: kind {kind:#x}, length {len}")]
    BadRecord { offset: u64, kind: u32, len: u32 },
    #[error("record of {len} bytes can never fit a ring of {capacity} bytes")]
    RecordTooLarge { len: usize, capacity: usize },
}

fn record_size(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + payload_len.div_ceil(8) * 8
}

/// Largest record payload that always fits (half the ring, so a padding record can precede it).
pub fn max_record_payload(capacity: usize) -> usize {
    capacity / 2 - RECORD_HEADER_LEN
}

/// Checks a capacity announced by a peer.
pub fn valid_capacity(capacity: usize) -> bool {
    capacity.is_power_of_two() && (MIN_RING_BYTES..=MAX_RING_BYTES).contains(&capacity)
}

/// Reads and checks the indices a ring starts from: 8-aligned, head <= tail <= head + capacity, and far from
/// overflow. Anything else would make the first write or read land outside the ring.
///
/// # Safety
/// `indices` must be valid.
unsafe fn starting_indices(
    indices: *const RingIndices,
    capacity: usize,
) -> Result<(u64, u64), RingError> {
    // SAFETY: caller guarantees validity.
    let (head, tail) = unsafe {
        (
            (*indices).head.0.load(Ordering::Acquire),
            (*indices).tail.0.load(Ordering::Acquire),
        )
    };
    let sane = head.is_multiple_of(8)
        && tail.is_multiple_of(8)
        && head <= tail
        && tail - head <= capacity as u64
        && tail < u64::MAX / 2;
    if sane {
        Ok((head, tail))
    } else {
        Err(RingError::BadIndex {
            which: "starting",
            value: tail,
            ours: head,
            capacity: capacity as u64,
        })
    }
}

/// The writing end. Owns the authoritative tail.
pub struct RingProducer {
    indices: *const RingIndices,
    data: *mut u8,
    capacity: u64,
    /// Where the next record goes (may be ahead of what the consumer can see: see [`RingProducer::publish`]).
    tail: u64,
    /// The tail last stored in shared memory.
    published: u64,
    cached_head: u64,
}

// SAFETY: the producer is the only writer of its ring's data/tail; the pointers stay valid while the owning
// segment mapping lives (the segment owner keeps both together).
unsafe impl Send for RingProducer {}

impl RingProducer {
    /// # Safety
    /// `indices` and `data[..capacity]` must stay mapped for the producer's life, `capacity` must be a power of
    /// two >= MIN_RING_BYTES, and only one producer may exist per ring.
    pub unsafe fn new(
        indices: *const RingIndices,
        data: *mut u8,
        capacity: usize,
    ) -> Result<Self, RingError> {
        // SAFETY: caller guarantees `indices` is valid. Start from what was published (0 on a new ring), but
        // only if it is a position this ring could really be at: a peer may have written anything there.
        let (head, tail) = unsafe { starting_indices(indices, capacity)? };
        Ok(Self {
            indices,
            data,
            capacity: capacity as u64,
            tail,
            published: tail,
            cached_head: head,
        })
    }

    fn indices(&self) -> &RingIndices {
        // SAFETY: valid for the producer's life (constructor contract).
        unsafe { &*self.indices }
    }

    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Re-reads the consumer's head and validates it.
    fn refresh_head(&mut self) -> Result<(), RingError> {
        let head = self.indices().head.0.load(Ordering::Acquire);
        // The consumer can only have released what we published.
        if head < self.cached_head || head > self.published {
            return Err(RingError::BadIndex {
                which: "head",
                value: head,
                ours: self.published,
                capacity: self.capacity,
            });
        }
        self.cached_head = head;
        Ok(())
    }

    /// Bytes the consumer has not released yet (as last seen).
    pub fn used_bytes(&mut self) -> Result<u64, RingError> {
        self.refresh_head()?;
        Ok(self.tail - self.cached_head)
    }

    /// Unvalidated look at the bytes in use, for a waiter's cheap readiness check; [`RingProducer::used_bytes`]
    /// is the checked value.
    pub fn used_bytes_hint(&self) -> u64 {
        self.tail
            .saturating_sub(self.indices().head.0.load(Ordering::Acquire))
    }

    /// Writes one record of `len` bytes filled by `fill` and publishes it. Returns `Ok(false)` when the ring is
    /// currently too full (nothing written).
    pub fn try_write(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<bool, RingError> {
        let written = self.try_write_unpublished(len, fill)?;
        self.publish();
        Ok(written)
    }

    /// Like [`RingProducer::try_write`] but leaves the record invisible to the consumer until
    /// [`RingProducer::publish`]: a batch of records costs one store of the tail. Publish before waiting for
    /// space (the consumer can only free what it can see).
    pub fn try_write_unpublished(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<bool, RingError> {
        if len > max_record_payload(self.capacity as usize) {
            return Err(RingError::RecordTooLarge {
                len,
                capacity: self.capacity as usize,
            });
        }
        let size = record_size(len) as u64;
        let offset = self.tail & (self.capacity - 1);
        let until_end = self.capacity - offset;
        let padding = if size > until_end { until_end } else { 0 };
        let needed = padding + size;
        if self.capacity - (self.tail - self.cached_head) < needed {
            self.refresh_head()?;
            if self.capacity - (self.tail - self.cached_head) < needed {
                return Ok(false);
            }
        }
        let mut tail = self.tail;
        if padding > 0 {
            // SAFETY: offset + 8 <= capacity (records are 8-aligned), the bytes are free (checked above).
            unsafe {
                self.write_record_header(
                    offset,
                    (padding as usize - RECORD_HEADER_LEN) as u32,
                    KIND_PADDING,
                )
            };
            tail += padding;
        }
        let offset = tail & (self.capacity - 1);
        // SAFETY: the record fits contiguously at `offset` (padding handled above) and is free space.
        unsafe {
            self.write_record_header(offset, len as u32, KIND_DATA);
            let body = std::slice::from_raw_parts_mut(
                self.data.add(offset as usize + RECORD_HEADER_LEN),
                len,
            );
            fill(body);
        }
        tail += size;
        self.tail = tail;
        Ok(true)
    }

    /// Makes every record written so far visible to the consumer (one Release store; nothing when there is
    /// nothing new). Returns true when it published something.
    pub fn publish(&mut self) -> bool {
        if self.published == self.tail {
            return false;
        }
        self.published = self.tail;
        // Records are complete before this store: the consumer never sees a half-written record.
        self.indices().tail.0.store(self.tail, Ordering::Release);
        true
    }

    /// True when records were written but not published yet.
    pub fn has_unpublished(&self) -> bool {
        self.published != self.tail
    }

    unsafe fn write_record_header(&mut self, offset: u64, len: u32, kind: u32) {
        let mut header = [0u8; RECORD_HEADER_LEN];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4..].copy_from_slice(&kind.to_le_bytes());
        // SAFETY: caller guarantees offset + 8 <= capacity.
        unsafe {
            std::ptr::copy_nonoverlapping(
                header.as_ptr(),
                self.data.add(offset as usize),
                RECORD_HEADER_LEN,
            )
        };
    }

    /// Announce that the producer is about to wait for space (the consumer then rings our doorbell).
    pub fn set_waiting_for_space(&self, waiting: bool) {
        self.indices()
            .producer_waiting
            .0
            .store(u32::from(waiting), Ordering::SeqCst);
        // Pairs with the consumer's fence in `take_producer_waiting`: the caller's re-check of head comes after
        // the flag is visible.
        fence(Ordering::SeqCst);
    }
}

/// The reading end. Owns the authoritative head.
pub struct RingConsumer {
    indices: *const RingIndices,
    data: *const u8,
    capacity: u64,
    head: u64,
    cached_tail: u64,
}

// SAFETY: see RingProducer.
unsafe impl Send for RingConsumer {}

impl RingConsumer {
    /// # Safety
    /// Same contract as [`RingProducer::new`], for the single consumer.
    pub unsafe fn new(
        indices: *const RingIndices,
        data: *const u8,
        capacity: usize,
    ) -> Result<Self, RingError> {
        // SAFETY: caller guarantees validity; see RingProducer::new.
        let (head, _) = unsafe { starting_indices(indices, capacity)? };
        Ok(Self {
            indices,
            data,
            capacity: capacity as u64,
            head,
            cached_tail: head,
        })
    }

    fn indices(&self) -> &RingIndices {
        // SAFETY: constructor contract.
        unsafe { &*self.indices }
    }

    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Bytes consumed so far (the head this consumer owns): it moves whenever ring space is released.
    pub fn position(&self) -> u64 {
        self.head
    }

    /// True if a record may be available (cheap check used while spinning).
    pub fn has_data(&self) -> bool {
        if self.head != self.cached_tail {
            return true;
        }
        self.indices().tail.0.load(Ordering::Acquire) != self.head
    }

    /// Copies the next record into `out` (cleared first) and releases it from the ring.
    /// Returns `Ok(false)` when the ring is empty.
    pub fn read_into(&mut self, out: &mut impl RecordSink) -> Result<bool, RingError> {
        loop {
            if self.head == self.cached_tail {
                let tail = self.indices().tail.0.load(Ordering::Acquire);
                if tail < self.head || tail - self.head > self.capacity {
                    return Err(RingError::BadIndex {
                        which: "tail",
                        value: tail,
                        ours: self.head,
                        capacity: self.capacity,
                    });
                }
                self.cached_tail = tail;
                if tail == self.head {
                    return Ok(false);
                }
            }
            let offset = self.head & (self.capacity - 1);
            let available = self.cached_tail - self.head;
            let until_end = self.capacity - offset;
            if available < RECORD_HEADER_LEN as u64 {
                return Err(RingError::BadRecord {
                    offset,
                    kind: 0,
                    len: 0,
                });
            }
            // Copy the header out of shared memory once, then validate the copy.
            let mut header = [0u8; RECORD_HEADER_LEN];
            // SAFETY: offset + 8 <= capacity because offsets are 8-aligned (head only advances by record sizes).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data.add(offset as usize),
                    header.as_mut_ptr(),
                    RECORD_HEADER_LEN,
                )
            };
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let kind = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            let size = record_size(len as usize) as u64;
            let bad = RingError::BadRecord { offset, kind, len };
            match kind {
                KIND_PADDING => {
                    if size != until_end || size > available {
                        return Err(bad);
                    }
                    self.head += size;
                }
                KIND_DATA => {
                    if size > until_end
                        || size > available
                        || len as usize > max_record_payload(self.capacity as usize)
                    {
                        return Err(bad);
                    }
                    // SAFETY: bounds validated above against our own head and the validated tail.
                    let body = unsafe {
                        std::slice::from_raw_parts(
                            self.data.add(offset as usize + RECORD_HEADER_LEN),
                            len as usize,
                        )
                    };
                    out.accept(body);
                    self.head += size;
                    self.indices().head.0.store(self.head, Ordering::Release);
                    return Ok(true);
                }
                _ => return Err(bad),
            }
        }
    }

    /// True when the producer announced it waits for space; clears the announcement. Call after consuming.
    pub fn take_producer_waiting(&self) -> bool {
        // The head we published (Release) must be visible before we read the producer's flag: the producer
        // does the mirror image (sets the flag, SeqCst, then re-reads head). Without this fence the store of
        // head can sit in this CPU's store buffer while the flag reads 0, and both sides miss each other
        // (a lost wake-up). One fence per drained batch, not per message.
        fence(Ordering::SeqCst);
        let flag = &self.indices().producer_waiting.0;
        flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::SeqCst) != 0
    }
}

/// Where a consumer copies a record. The bytes may be rewritten by a hostile peer while they are copied; the
/// sink must only copy them, and validate its private copy afterwards.
pub trait RecordSink {
    fn accept(&mut self, record: &[u8]);
}

impl RecordSink for Vec<u8> {
    fn accept(&mut self, record: &[u8]) {
        self.clear();
        self.extend_from_slice(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestRing {
        indices: Box<RingIndices>,
        data: Vec<u64>,
    }

    impl TestRing {
        fn new(capacity: usize) -> Self {
            Self {
                indices: Box::new(RingIndices {
                    tail: CacheLine(AtomicU64::new(0)),
                    head: CacheLine(AtomicU64::new(0)),
                    producer_waiting: CacheLine(AtomicU32::new(0)),
                }),
                data: vec![0u64; capacity / 8],
            }
        }
        fn ends(&mut self) -> (RingProducer, RingConsumer) {
            let cap = self.data.len() * 8;
            let data = self.data.as_mut_ptr().cast::<u8>();
            let indices: *const RingIndices = &*self.indices;
            // SAFETY: the test ring outlives both ends.
            unsafe {
                (
                    RingProducer::new(indices, data, cap).unwrap(),
                    RingConsumer::new(indices, data, cap).unwrap(),
                )
            }
        }
    }

    #[test]
    fn records_roundtrip_across_many_wraps() {
        let mut ring = TestRing::new(4096);
        let (mut tx, mut rx) = ring.ends();
        let mut out = Vec::new();
        for i in 0..10_000u32 {
            let len = (i as usize * 37) % 700;
            let fill = |b: &mut [u8]| {
                b.iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = (i as usize + j) as u8)
            };
            assert!(tx.try_write(len, fill).unwrap());
            assert!(rx.read_into(&mut out).unwrap());
            assert_eq!(out.len(), len);
            assert!(out
                .iter()
                .enumerate()
                .all(|(j, x)| *x == (i as usize + j) as u8));
        }
        assert!(!rx.read_into(&mut out).unwrap());
    }

    #[test]
    fn unpublished_records_stay_invisible_until_one_publish() {
        let mut ring = TestRing::new(4096);
        let (mut tx, mut rx) = ring.ends();
        let mut out = Vec::new();
        for i in 0..10u8 {
            assert!(tx.try_write_unpublished(40, |b| b.fill(i)).unwrap());
        }
        assert!(tx.has_unpublished());
        assert!(!rx.has_data());
        assert!(!rx.read_into(&mut out).unwrap());
        assert_eq!(ring.indices.tail.0.load(Ordering::Relaxed), 0);
        assert!(tx.publish());
        assert!(!tx.publish(), "nothing new to publish");
        for i in 0..10u8 {
            assert!(rx.read_into(&mut out).unwrap());
            assert!(out.iter().all(|x| *x == i));
        }
        assert!(!rx.read_into(&mut out).unwrap());
        // A full ring refuses more unpublished records instead of overwriting unread ones.
        let mut n = 0;
        while tx.try_write_unpublished(1000, |b| b.fill(1)).unwrap() {
            n += 1;
        }
        assert_eq!(
            n, 3,
            "three fit before the wrap (the fourth would need padding first)"
        );
        // A consumer head beyond what was published is a violation, even though the local tail is ahead.
        ring.indices.head.0.store(4096, Ordering::Release);
        assert!(matches!(
            tx.used_bytes(),
            Err(RingError::BadIndex { which: "head", .. })
        ));
    }

    #[test]
    fn full_ring_reports_false_and_never_overwrites() {
        let mut ring = TestRing::new(4096);
        let (mut tx, mut rx) = ring.ends();
        let mut written = 0;
        while tx.try_write(1000, |b| b.fill(written as u8)).unwrap() {
            written += 1;
        }
        assert_eq!(written, 4); // 4 x 1008 bytes fit in 4096
        let mut out = Vec::new();
        for i in 0..written {
            assert!(rx.read_into(&mut out).unwrap());
            assert!(out.iter().all(|x| *x == i as u8));
        }
        assert!(tx.try_write(1000, |b| b.fill(9)).unwrap());
    }

    #[test]
    fn impossible_starting_indices_are_refused() {
        for (head, tail) in [
            (0, 3),
            (8, 0),
            (0, 4096 + 8),
            (u64::MAX - 7, u64::MAX - 7),
            (4, 4),
        ] {
            let mut ring = TestRing::new(4096);
            ring.indices.head.0.store(head, Ordering::Relaxed);
            ring.indices.tail.0.store(tail, Ordering::Relaxed);
            let data = ring.data.as_mut_ptr().cast::<u8>();
            let indices: *const RingIndices = &*ring.indices;
            // SAFETY: the test ring outlives the attempt.
            unsafe {
                assert!(
                    RingProducer::new(indices, data, 4096).is_err(),
                    "({head}, {tail})"
                );
                assert!(
                    RingConsumer::new(indices, data, 4096).is_err(),
                    "({head}, {tail})"
                );
            }
        }
    }

    #[test]
    fn hostile_indices_and_records_are_errors_not_panics() {
        let mut ring = TestRing::new(4096);
        let (mut tx, mut rx) = ring.ends();
        let mut out = Vec::new();
        ring.indices.tail.0.store(1 << 40, Ordering::Release);
        assert!(matches!(
            rx.read_into(&mut out),
            Err(RingError::BadIndex { .. })
        ));

        let mut ring = TestRing::new(4096);
        let (mut tx2, mut rx2) = ring.ends();
        assert!(tx2.try_write(16, |b| b.fill(1)).unwrap());
        ring.data[0] = u64::from_le_bytes([0xff, 0xff, 0, 0, 0x41, 0x54, 0x41, 0x44]); // DATA, len 65535
        assert!(matches!(
            rx2.read_into(&mut out),
            Err(RingError::BadRecord { .. })
        ));

        ring.indices.head.0.store(u64::MAX, Ordering::Release);
        assert!(matches!(
            tx2.try_write(8, |_| {}),
            Ok(true) | Err(RingError::BadIndex { .. })
        ));
        let _ = (&mut tx, &mut rx);
    }

    /// Spins until `done` holds, yielding the CPU now and then: with other tests running, the peer thread may
    /// need this CPU to make progress.
    fn spin_until(mut done: impl FnMut() -> bool) {
        let mut spins = 0u32;
        while !done() {
            spins += 1;
            if spins.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// The waiting protocol under stress: a producer that finds the ring full announces it waits, re-checks,
    /// and sleeps on a futex; the consumer drains a few records, then wakes it if the flag is up. A wake-up
    /// lost between the consumer's head store and its flag read leaves the producer asleep with the ring
    /// empty and the consumer idle, which the producer sees as a futex timeout with no ring of the bell.
    #[test]
    fn a_producer_waiting_for_space_is_always_woken() {
        use crate::sys::{futex_wait, futex_wake_all};
        use std::sync::atomic::AtomicBool;
        use std::time::Duration;

        const RECORDS: u32 = 300_000;
        const RECORD: usize = 900; // 4 fit in a 4 KiB ring: the producer waits for space every few records
        const SLEEP_LIMIT: Duration = Duration::from_secs(5);
        let mut ring = TestRing::new(4096);
        let (mut tx, mut rx) = ring.ends();
        let bell = AtomicU32::new(0);
        let done = AtomicBool::new(false);
        let (waits, lost) = std::thread::scope(|scope| {
            let consumer = scope.spawn(|| {
                let mut out = Vec::new();
                let mut expected = 0u32;
                while expected < RECORDS {
                    // A batch of at most two records, then the wake-up check, like the reactor's drain.
                    let mut got = 0;
                    while got < 2 && rx.read_into(&mut out).unwrap() {
                        assert_eq!(out[..4], expected.to_le_bytes(), "records arrive in order");
                        expected += 1;
                        got += 1;
                    }
                    if got > 0 {
                        if rx.take_producer_waiting() {
                            bell.fetch_add(1, Ordering::Release);
                            futex_wake_all(&bell);
                        }
                    } else if done.load(Ordering::Acquire) {
                        break;
                    } else {
                        spin_until(|| rx.has_data() || done.load(Ordering::Acquire));
                    }
                }
                expected
            });
            let mut waits = 0u64;
            let mut lost = 0u64;
            'records: for i in 0..RECORDS {
                let fill = |b: &mut [u8]| b[..4].copy_from_slice(&i.to_le_bytes());
                loop {
                    if tx.try_write(RECORD, fill).unwrap() {
                        continue 'records;
                    }
                    let rung = bell.load(Ordering::Acquire);
                    tx.set_waiting_for_space(true);
                    if tx.try_write(RECORD, fill).unwrap() {
                        continue 'records;
                    }
                    waits += 1;
                    // Futex waits may return early (a late wake meant for an earlier wait): sleep again until
                    // the bell changes or the limit has passed.
                    let deadline = std::time::Instant::now() + SLEEP_LIMIT;
                    while bell.load(Ordering::Acquire) == rung {
                        let now = std::time::Instant::now();
                        if now >= deadline {
                            // Nobody rang although the consumer drains as fast as it can.
                            lost += 1;
                            break 'records;
                        }
                        futex_wait(&bell, rung, Some(deadline - now));
                    }
                }
            }
            done.store(true, Ordering::Release);
            let consumed = consumer.join().unwrap();
            assert!(lost > 0 || consumed == RECORDS, "consumed {consumed}");
            (waits, lost)
        });
        assert_eq!(lost, 0, "a wake-up was lost after {waits} waits for space");
        assert!(waits > 1000, "the producer must really wait: {waits}");
    }

    /// The same hand-off as a store-buffering litmus test, so the race is hit often rather than by luck: both
    /// sides start together from a full ring; the consumer frees one record and then looks for the waiting flag,
    /// while the producer raises the flag and then looks for space. At least one of them must see the other,
    /// or the producer would sleep with nobody to wake it. Without the consumer's fence, x86 lets its store of
    /// head be overtaken by its read of the flag, and both see nothing.
    #[test]
    fn the_consumer_or_the_waiting_producer_always_sees_the_other() {
        use std::sync::atomic::AtomicU64 as Counter;

        const ROUNDS: u64 = 1_000_000;
        const RECORD: usize = 8;
        let mut ring = TestRing::new(4096);
        let (mut tx, mut rx) = ring.ends();
        while tx.try_write(RECORD, |_| {}).unwrap() {}
        let start = Counter::new(0);
        let finished = Counter::new(0);
        let lost = std::thread::scope(|scope| {
            let consumer = scope.spawn(|| {
                let mut out = Vec::new();
                let mut saw_flag = Vec::with_capacity(ROUNDS as usize);
                for round in 1..=ROUNDS {
                    spin_until(|| start.load(Ordering::Acquire) >= round);
                    assert!(rx.read_into(&mut out).unwrap(), "the ring was full");
                    saw_flag.push(rx.take_producer_waiting());
                    finished.fetch_add(1, Ordering::AcqRel);
                }
                saw_flag
            });
            let mut saw_space = Vec::with_capacity(ROUNDS as usize);
            for round in 1..=ROUNDS {
                start.store(round, Ordering::Release);
                // The consumer sees the start a cache-line transfer later: sweep the producer's delay so the
                // two sides' accesses overlap in every possible alignment.
                for _ in 0..round % 97 {
                    std::hint::spin_loop();
                }
                tx.set_waiting_for_space(true);
                saw_space.push(tx.try_write(RECORD, |_| {}).unwrap());
                spin_until(|| finished.load(Ordering::Acquire) >= round);
                // Both sides are done: fill the ring again for the next round and lower the flag.
                while tx.try_write(RECORD, |_| {}).unwrap() {}
                tx.set_waiting_for_space(false);
            }
            let saw_flag = consumer.join().unwrap();
            saw_space
                .iter()
                .zip(&saw_flag)
                .filter(|(space, flag)| !**space && !**flag)
                .count()
        });
        assert_eq!(
            lost, 0,
            "{lost} of {ROUNDS} rounds: the producer saw no space and the consumer saw no waiting producer"
        );
    }
}
