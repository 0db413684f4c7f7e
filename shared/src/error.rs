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
    #[error("{}", incompatible_engine_text(endpoint, *pid, *version))]
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

/// The message of [`TransportError::IncompatibleEngine`]: what runs, and what to do about it.
fn incompatible_engine_text(endpoint: &str, pid: u32, version: Option<u32>) -> String {
    let ours = crate::segment::RENDEZVOUS_VERSION;
    match version {
        Some(v) if v > ours => format!(
            "the engine running on endpoint {endpoint:?} (pid {pid}) is from a newer lapce-ai release \
             (rendezvous version {v}; this client speaks {ours}): update this plugin or command, or stop that \
             engine with its own `ai-engine stop`"
        ),
        _ => format!(
            "the engine running on endpoint {endpoint:?} (pid {pid}) is from an older lapce-ai release \
             (rendezvous version {}; this client speaks {ours}): `ai-engine stop` replaces it, and so does the \
             next request that may start an engine",
            version.map_or_else(|| "before 3".to_owned(), |v| v.to_string()),
        ),
    }
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
