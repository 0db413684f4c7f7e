//! Fuzz target: a ring in heap memory whose peer (indices and record bytes) is rewritten between reads.
//!
//! The input is a small program. Its header picks the ring size, the reader (raw `RingConsumer::read_into` or
//! the `FrameReceiver` on top of it) and the indices the ring starts from (a client creates and fills its slot
//! segment before the engine builds its ends from it, so the starting indices are peer-controlled too). The
//! ops then interleave honest records (published at once or in batches) and frames (with or without CRC), hostile rewrites of the tail, head and record bytes, and
//! reads. Reading must never panic or touch memory outside the ring (run under AddressSanitizer); a violation
//! is reported as an error, after which the connection would be closed, so the program stops there.
//!
//! `RING_PEER_ALIGNED_START=1` restricts the starting indices to 8-aligned values below 2^62 (what the ring
//! code assumes), to explore past the start-up findings.

#![no_main]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use lapce_ai_transport::framing::{FrameReceiver, Received};
use lapce_ai_transport::protocol::{FrameHeader, Ping, FRAME_HEADER_LEN};
use lapce_ai_transport::ring::{self, CacheLine, RingConsumer, RingIndices, RingProducer};
use libfuzzer_sys::fuzz_target;

const KIND_DATA: u32 = 0x4441_5441;
const KIND_PADDING: u32 = 0x5041_4444;
const MAX_MESSAGE: u32 = 64 * 1024;

fn aligned_start_only() -> bool {
    static FLAG: OnceLock<bool> = OnceLock::new();
    *FLAG.get_or_init(|| std::env::var_os("RING_PEER_ALIGNED_START").is_some_and(|v| v == "1"))
}

/// Reads fixed-size values off the front of the fuzzer's input; zeros once it runs out.
struct Program<'a>(&'a [u8]);

impl Program<'_> {
    fn done(&self) -> bool {
        self.0.is_empty()
    }
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.u8() as usize).min(max).min(self.0.len());
        let out = self.0[..n].to_vec();
        self.0 = &self.0[n..];
        out
    }
}

/// The ring's shared memory, on the heap: exactly `capacity` data bytes so AddressSanitizer sees overruns.
struct HeapRing {
    indices: Box<RingIndices>,
    data: *mut u8,
    capacity: usize,
}

impl HeapRing {
    fn new(capacity: usize, head: u64, tail: u64) -> Self {
        let data = Box::into_raw(vec![0u8; capacity].into_boxed_slice()).cast::<u8>();
        Self {
            indices: Box::new(RingIndices {
                tail: CacheLine(AtomicU64::new(tail)),
                head: CacheLine(AtomicU64::new(head)),
                producer_waiting: CacheLine(AtomicU32::new(0)),
            }),
            data,
            capacity,
        }
    }

    /// The hostile peer writes `bytes` at `offset` (clipped to the ring).
    fn scribble(&self, offset: usize, bytes: &[u8]) {
        let offset = offset % self.capacity;
        let n = bytes.len().min(self.capacity - offset);
        // SAFETY: in bounds of the data allocation; single-threaded, and no reference into it is alive.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.add(offset), n) };
    }
}

impl Drop for HeapRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` as a boxed slice of `capacity` bytes.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.data,
                self.capacity,
            )));
        }
    }
}

enum Reader {
    Raw(RingConsumer, Vec<u8>),
    Frames(FrameReceiver),
}

impl Reader {
    /// One read. `None` when the reader reported a violation (the connection would close here), else
    /// whether it found anything.
    fn step(&mut self, capacity: usize) -> Option<bool> {
        match self {
            Reader::Raw(consumer, out) => match consumer.read_into(out) {
                Ok(true) => {
                    assert!(out.len() <= ring::max_record_payload(capacity));
                    Some(true)
                }
                Ok(false) => Some(false),
                Err(e) => {
                    let _ = e.to_string();
                    None
                }
            },
            Reader::Frames(receiver) => match receiver.poll() {
                Ok(Received::Message) => {
                    let message = receiver.message();
                    assert_eq!(message.payload.len(), message.header.payload_len as usize);
                    assert!(message.payload.len() <= MAX_MESSAGE as usize);
                    // Hostile bytes through rkyv validation: an error, never a panic.
                    let _ = message.decode::<Ping>();
                    Some(true)
                }
                Ok(Received::Nothing) => Some(false),
                Ok(Received::Rejected { error, .. }) => {
                    assert!(!error.is_fatal());
                    Some(true)
                }
                Err(e) => {
                    let _ = e.to_string();
                    None
                }
            },
        }
    }
}

fn frame(message_type: u16, flags: u8, id: u64, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader::new(message_type, flags, payload.len() as u32, id);
    let mut head = [0u8; FRAME_HEADER_LEN];
    header.encode_into(payload, &mut head);
    let mut out = head.to_vec();
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|input: &[u8]| {
    let mut p = Program(input);
    let config = p.u8();
    let capacity = 4096usize << (config % 3);
    let frames = config & 0x10 != 0;
    let (mut head, mut tail) = if config & 0x20 != 0 {
        (p.u64(), p.u64())
    } else {
        (0, 0)
    };
    if aligned_start_only() {
        head = (head >> 2) & !7;
        tail = (tail >> 2) & !7;
    }
    let shared = HeapRing::new(capacity, head, tail);
    let indices: *const RingIndices = &*shared.indices;
    // SAFETY: `shared` outlives both ends (declared first, dropped last); one producer, one consumer.
    // Impossible starting indices are refused by the constructors (the engine then refuses the slot).
    let Ok(mut producer) = (unsafe { RingProducer::new(indices, shared.data, capacity) }) else {
        return;
    };
    // SAFETY: as above.
    let Ok(consumer) = (unsafe { RingConsumer::new(indices, shared.data, capacity) }) else {
        return;
    };
    let mut reader = if frames {
        Reader::Frames(FrameReceiver::new(consumer, MAX_MESSAGE))
    } else {
        Reader::Raw(consumer, Vec::new())
    };
    let idx = &*shared.indices;

    let mut steps = 0;
    while !p.done() && steps < 4096 {
        steps += 1;
        match p.u8() % 10 {
            // An honest record of arbitrary bytes (the producer may refuse: full ring or hostile head),
            // published at once or left for a later batch publish (op 8).
            0 => {
                let batched = p.u8() & 1 != 0;
                let len = p.u16() as usize % (ring::max_record_payload(capacity) + 1);
                let fill = p.bytes(64);
                let fill = |out: &mut [u8]| {
                    for (i, b) in out.iter_mut().enumerate() {
                        *b = fill.get(i % fill.len().max(1)).copied().unwrap_or(0);
                    }
                };
                let _ = if batched {
                    producer.try_write_unpublished(len, fill)
                } else {
                    producer.try_write(len, fill)
                };
            }
            // Publish a batch of records written unpublished.
            8 => {
                producer.publish();
            }
            // An honest frame with fuzzer-chosen type, flags (fragments, unknown bits) and id.
            1 => {
                let message_type = p.u16() % 64;
                let flags = p.u8();
                let flags = if flags & 0x80 != 0 { flags } else { flags & 7 };
                let id = u64::from(p.u8() % 4);
                let payload = p.bytes(200);
                let bytes = frame(message_type, flags, id, &payload);
                let _ = producer.try_write(bytes.len(), |out| out.copy_from_slice(&bytes));
            }
            // A valid Ping, so the rkyv path sees well-formed payloads too.
            2 => {
                let ping = Ping {
                    nonce: p.u64(),
                    payload: p.bytes(64),
                };
                if let Ok(payload) = lapce_ai_transport::protocol::encode(&ping) {
                    let bytes = frame(5, 0, u64::from(p.u8()), &payload);
                    let _ = producer.try_write(bytes.len(), |out| out.copy_from_slice(&bytes));
                }
            }
            // Hostile tail: anything at all.
            3 => idx.tail.0.store(p.u64(), Ordering::Release),
            // Hostile tail: near the published one (more likely to pass the index checks).
            4 => {
                let delta = i64::from(p.u16() as i16);
                let t = idx.tail.0.load(Ordering::Relaxed);
                idx.tail
                    .0
                    .store(t.wrapping_add_signed(delta), Ordering::Release);
            }
            // Hostile head (the consumer's published index: only the producer reads it).
            5 => idx.head.0.store(p.u64(), Ordering::Release),
            // Scribble arbitrary bytes anywhere in the data.
            6 => {
                let offset = p.u16() as usize;
                let bytes = p.bytes(32);
                shared.scribble(offset, &bytes);
            }
            // Scribble a record header at a record boundary near the reader's position.
            7 => {
                let at = idx
                    .head
                    .0
                    .load(Ordering::Relaxed)
                    .wrapping_add(u64::from(p.u8()) * 8);
                let len = p.u32() % (capacity as u32 * 2);
                let kind = match p.u8() % 3 {
                    0 => KIND_DATA,
                    1 => KIND_PADDING,
                    _ => p.u32(),
                };
                let mut header = [0u8; 8];
                header[..4].copy_from_slice(&len.to_le_bytes());
                header[4..].copy_from_slice(&kind.to_le_bytes());
                shared.scribble((at % capacity as u64) as usize & !7, &header);
            }
            // Read.
            _ => {
                if reader.step(capacity).is_none() {
                    return;
                }
            }
        }
    }
    // Drain what is left (bounded: at most one record per 8 bytes of ring), until the reader finds nothing.
    for _ in 0..capacity / 8 + 1 {
        if reader.step(capacity) != Some(true) {
            return;
        }
    }
});
