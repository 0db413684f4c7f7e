//! Fuzz target: arbitrary bytes into `FrameHeader::decode` / `verify_parts`; never panics, decoded frames re-encode.
//!
//! Input: one mode byte, then the frame. Mode bit 0 patches a correct CRC (zero for `FLAG_NO_CRC` frames) into bytes 20..24 first, so the fuzzer
//! also reaches the checks behind the CRC (length, version, flags, limit) instead of stopping at a CRC mismatch.
//! Mode bits 1..=3 pick the payload limit.

#![no_main]

use lapce_ai_transport::protocol::frame::FLAG_NO_CRC;
use lapce_ai_transport::protocol::{FrameHeader, FRAME_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

/// The CRC the wire format specifies: header bytes 0..20, four zero bytes, then the payload.
fn spec_crc(frame: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..20]);
    h.update(&[0u8; 4]);
    h.update(&frame[FRAME_HEADER_LEN..]);
    h.finalize()
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let mut frame = rest.to_vec();
    if mode & 1 == 1 && frame.len() >= FRAME_HEADER_LEN {
        // A frame flagged FLAG_NO_CRC must carry a zero CRC field instead.
        let crc = if frame[5] & FLAG_NO_CRC != 0 {
            0
        } else {
            spec_crc(&frame)
        };
        frame[20..24].copy_from_slice(&crc.to_le_bytes());
    }
    let max_payload = match (mode >> 1) & 7 {
        0 => u32::MAX,
        1 => 0,
        2 => 16,
        3 => 64,
        4 => 4096,
        _ => 16 * 1024 * 1024,
    };

    let _ = FrameHeader::parse_unchecked(&frame);
    let decoded = FrameHeader::decode(&frame, max_payload);

    // verify_parts on the same bytes split apart must agree with decode.
    if let Some((head, payload)) = frame.split_first_chunk::<FRAME_HEADER_LEN>() {
        let parts = FrameHeader::verify_parts(head, payload, max_payload);
        match (&decoded, &parts) {
            (Ok((a, _)), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("decode and verify_parts disagree: {decoded:?} vs {parts:?}"),
        }
    } else {
        assert!(decoded.is_err(), "a frame shorter than its header decoded");
    }

    if let Ok((header, payload)) = decoded {
        assert_eq!(payload.len(), header.payload_len as usize);
        assert!(header.payload_len <= max_payload);
        assert_eq!(payload, &frame[FRAME_HEADER_LEN..]);
        let mut again = [0u8; FRAME_HEADER_LEN];
        header.encode_into(payload, &mut again);
        assert_eq!(
            &again[..],
            &frame[..FRAME_HEADER_LEN],
            "re-encoding changed the header bytes"
        );
        let rebuilt = FrameHeader::new(
            header.message_type,
            header.flags,
            header.payload_len,
            header.message_id,
        );
        assert_eq!(rebuilt, header);
    } else if let Err(e) = decoded {
        // Error values must be printable and classified without panicking.
        let _ = (e.to_string(), e.is_fatal());
    }
});
