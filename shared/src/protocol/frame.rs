//! The 24-byte little-endian frame header: magic `LAPC`, version, flags, type, length, message id, CRC32.

/// Length of every frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 24;
/// The magic, as the explicit bytes `L A P C` (not an integer, so byte order cannot flip it).
pub const MAGIC: [u8; 4] = *b"LAPC";
/// Default largest message (after reassembly) a receiver accepts.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 16 * 1024 * 1024;

/// Header flag: this frame is one fragment of a larger message and more fragments follow.
pub const FLAG_MORE_FRAGMENTS: u8 = 0b0000_0001;
/// Header flag: this frame continues a message started by an earlier fragment.
pub const FLAG_CONTINUATION: u8 = 0b0000_0010;
/// Header flag: the sender did not compute a CRC; the CRC field must then be zero. Shared memory has no
/// transmission errors: the CRC only catches a sender's own bugs (torn or misplaced records), and bytecheck
/// validates every payload anyway. Senders keep the CRC on by default; see docs/BENCHMARKS.md for its cost.
pub const FLAG_NO_CRC: u8 = 0b0000_0100;
const KNOWN_FLAGS: u8 = FLAG_MORE_FRAGMENTS | FLAG_CONTINUATION | FLAG_NO_CRC;

/// A decoded, integrity-checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u8,
    pub flags: u8,
    pub message_type: u16,
    pub payload_len: u32,
    pub message_id: u64,
}

/// Why a frame was rejected. `BadMagic`, `BadCrc` and `Truncated` close the connection; the others are
/// answered with an error frame for the message id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame shorter than its header or declared length ({got} bytes, need {need})")]
    Truncated { got: usize, need: usize },
    #[error("bad frame magic {0:02x?} (expected \"LAPC\")")]
    BadMagic([u8; 4]),
    #[error("frame CRC mismatch (header says {expected:08x}, computed {computed:08x})")]
    BadCrc { expected: u32, computed: u32 },
    #[error("unsupported protocol version {version} in message {message_id}")]
    UnsupportedVersion { version: u8, message_id: u64 },
    #[error("unknown flags {flags:#04x} in message {message_id}")]
    UnknownFlags { flags: u8, message_id: u64 },
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u32 },
}

impl FrameError {
    /// True when the byte stream can no longer be trusted and the connection must close.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Truncated { .. } | Self::BadMagic(_) | Self::BadCrc { .. }
        )
    }
}

impl FrameHeader {
    pub fn new(message_type: u16, flags: u8, payload_len: u32, message_id: u64) -> Self {
        Self {
            version: super::messages::PROTOCOL_VERSION,
            flags,
            message_type,
            payload_len,
            message_id,
        }
    }

    fn header_bytes_without_crc(&self) -> [u8; 20] {
        let mut bytes = [0u8; 20];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4] = self.version;
        bytes[5] = self.flags;
        bytes[6..8].copy_from_slice(&self.message_type.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes[12..20].copy_from_slice(&self.message_id.to_le_bytes());
        bytes
    }

    /// Writes header + CRC for `payload` into `out[..24]`. `payload.len()` must equal `payload_len`.
    pub fn encode_into(&self, payload: &[u8], out: &mut [u8; FRAME_HEADER_LEN]) {
        debug_assert_eq!(payload.len(), self.payload_len as usize);
        let head = self.header_bytes_without_crc();
        let crc = if self.flags & FLAG_NO_CRC != 0 {
            0
        } else {
            frame_crc(&head, payload)
        };
        out[..20].copy_from_slice(&head);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads a header from the first 24 bytes without checking the CRC (it needs the payload).
    pub fn parse_unchecked(bytes: &[u8]) -> Result<(Self, u32), FrameError> {
        let Some(raw) = bytes.get(..FRAME_HEADER_LEN) else {
            return Err(FrameError::Truncated {
                got: bytes.len(),
                need: FRAME_HEADER_LEN,
            });
        };
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&raw[0..4]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let header = Self {
            version: raw[4],
            flags: raw[5],
            message_type: u16::from_le_bytes([raw[6], raw[7]]),
            payload_len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            message_id: u64::from_le_bytes([
                raw[12], raw[13], raw[14], raw[15], raw[16], raw[17], raw[18], raw[19],
            ]),
        };
        let crc = u32::from_le_bytes([raw[20], raw[21], raw[22], raw[23]]);
        Ok((header, crc))
    }

    /// Decodes and verifies one complete frame (`bytes` = header + payload, exactly).
    /// Returns the header and the payload slice.
    pub fn decode(bytes: &[u8], max_payload: u32) -> Result<(Self, &[u8]), FrameError> {
        let Some((head, payload)) = bytes.split_first_chunk::<FRAME_HEADER_LEN>() else {
            return Err(FrameError::Truncated {
                got: bytes.len(),
                need: FRAME_HEADER_LEN,
            });
        };
        let header = Self::verify_parts(head, payload, max_payload)?;
        Ok((header, payload))
    }

    /// Verifies a header and its payload held separately (the receive path copies them apart so the payload
    /// lands aligned). Version and flags are checked after the CRC, so a non-fatal error carries a trustworthy
    /// message id.
    pub fn verify_parts(
        head: &[u8; FRAME_HEADER_LEN],
        payload: &[u8],
        max_payload: u32,
    ) -> Result<Self, FrameError> {
        let (header, expected) = Self::parse_unchecked(head)?;
        let need = FRAME_HEADER_LEN + header.payload_len as usize;
        if payload.len() != header.payload_len as usize {
            return Err(FrameError::Truncated {
                got: FRAME_HEADER_LEN + payload.len(),
                need,
            });
        }
        let computed = if header.flags & FLAG_NO_CRC != 0 {
            0
        } else {
            frame_crc(&header.header_bytes_without_crc(), payload)
        };
        if computed != expected {
            return Err(FrameError::BadCrc { expected, computed });
        }
        if header.payload_len > max_payload {
            return Err(FrameError::TooLarge {
                len: header.payload_len as u64,
                max: max_payload,
            });
        }
        if header.version != super::messages::PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion {
                version: header.version,
                message_id: header.message_id,
            });
        }
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags {
                flags: header.flags,
                message_id: header.message_id,
            });
        }
        Ok(header)
    }
}

/// CRC32 (IEEE) over the first 20 header bytes, four zero bytes standing in for the CRC field, and the payload.
fn frame_crc(head: &[u8; 20], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(head);
    hasher.update(&[0u8; 4]);
    hasher.update(payload);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(header: FrameHeader, payload: &[u8]) -> Vec<u8> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        header.encode_into(payload, &mut head);
        let mut out = head.to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn encode_then_decode_roundtrips_and_magic_is_literal_bytes() {
        let header = FrameHeader::new(16, FLAG_MORE_FRAGMENTS, 5, 0x0102_0304_0506_0708);
        let bytes = frame(header, b"hello");
        assert_eq!(&bytes[0..4], b"LAPC");
        assert_eq!(bytes[4], super::super::messages::PROTOCOL_VERSION);
        assert_eq!(&bytes[6..8], &16u16.to_le_bytes());
        let (decoded, payload) = FrameHeader::decode(&bytes, 1024).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = frame(FrameHeader::new(32, 0, 8, 42), b"abcdefgh");
        for bit in 0..bytes.len() * 8 {
            let mut corrupt = bytes.clone();
            corrupt[bit / 8] ^= 1 << (bit % 8);
            assert!(
                FrameHeader::decode(&corrupt, 1 << 20).is_err(),
                "bit {bit} flip went unnoticed"
            );
        }
    }

    #[test]
    fn a_frame_without_crc_decodes_and_must_carry_a_zero_crc_field() {
        let header = FrameHeader::new(32, FLAG_NO_CRC, 8, 42);
        let bytes = frame(header, b"abcdefgh");
        assert_eq!(&bytes[20..24], &[0, 0, 0, 0]);
        let (decoded, payload) = FrameHeader::decode(&bytes, 1024).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(payload, b"abcdefgh");
        // Setting the flag on a frame that carries a CRC is caught: the field is not zero.
        let mut flipped = frame(FrameHeader::new(32, 0, 8, 42), b"abcdefgh");
        flipped[5] |= FLAG_NO_CRC;
        assert!(matches!(
            FrameHeader::decode(&flipped, 1024),
            Err(FrameError::BadCrc { .. })
        ));
    }

    #[test]
    fn unknown_version_is_non_fatal_and_keeps_message_id() {
        let mut header = FrameHeader::new(5, 0, 0, 77);
        header.version = 9;
        let bytes = frame(header, b"");
        let err = FrameHeader::decode(&bytes, 1024).unwrap_err();
        assert_eq!(
            err,
            FrameError::UnsupportedVersion {
                version: 9,
                message_id: 77
            }
        );
        assert!(!err.is_fatal());
    }

    #[test]
    fn oversized_and_truncated_frames_are_rejected() {
        let bytes = frame(FrameHeader::new(5, 0, 100, 1), &[7u8; 100]);
        assert!(matches!(
            FrameHeader::decode(&bytes, 99),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            FrameHeader::decode(&bytes[..50], 1000),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            FrameHeader::decode(b"XXXX", 1000),
            Err(FrameError::Truncated { .. })
        ));
    }
}
