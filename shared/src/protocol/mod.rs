//! The wire protocol: frame header codec and the message registry with rkyv payloads.

pub mod frame;
pub mod messages;
pub mod payload;

pub use frame::{FrameError, FrameHeader, FRAME_HEADER_LEN};
pub use messages::*;
pub use payload::{decode, encode, PayloadEncoder};
