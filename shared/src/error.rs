//! The transport's error type: every failure a caller can see, each with a message a person can act on.

use std::io;

use crate::protocol::{ErrorCode, FrameError};
use crate::ring::RingError;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid endpoint name {0}")]
    InvalidEndpoint(String),
    #[error("unsafe rendezvous directory: {0}")]
    UnsafeRendezvous(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("an engine is already running on endpoint {endpoint:?} (pid {pid})")]
    AlreadyRunning { endpoint: String, pid: String },
    #[error(
        "the engine running on endpoint {endpoint:?} (pid {pid}) is from another lapce-ai release (rendezvous \
         version {}; this client speaks {}): stop it (`ai-engine stop` replaces it) and the next request starts \
         the current one",
        version.map_or_else(|| "older than 3".to_owned(), |v| v.to_string()),
        crate::segment::RENDEZVOUS_VERSION
    )]
    IncompatibleEngine {
        endpoint: String,
        pid: u32,
        version: Option<u32>,
    },
    #[error("no engine is running on endpoint {0:?}")]
    NoServer(String),
    #[error("the engine on endpoint {0:?} went away")]
    ServerGone(String),
    #[error("all {0} client slots are in use")]
    NoFreeSlot(u32),
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("the engine refused the connection ({code:?}): {message}")]
    Rejected { code: ErrorCode, message: String },
    #[error("{message} ({code:?})")]
    Remote { code: ErrorCode, message: String },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error("payload could not be encoded or decoded: {0}")]
    Payload(String),
    #[error("the connection is closed: {0}")]
    Closed(String),
}

impl TransportError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The wire error code that best describes this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::ServerGone(_) | Self::NoServer(_) | Self::Closed(_) => ErrorCode::ServerGone,
            Self::Timeout(..) => ErrorCode::Timeout,
            Self::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            Self::Rejected { code, .. } | Self::Remote { code, .. } => *code,
            Self::Payload(_) => ErrorCode::InvalidPayload,
            Self::NoFreeSlot(_) => ErrorCode::SlotLimit,
            _ => ErrorCode::Protocol,
        }
    }
}

impl From<rkyv::rancor::Error> for TransportError {
    fn from(e: rkyv::rancor::Error) -> Self {
        Self::Payload(e.to_string())
    }
}
