//! The message registry: every message type on the wire and its rkyv payload, defined once for both sides.

use rkyv::{Archive, Deserialize, Serialize};

/// Protocol version carried in every frame header and in `Hello`.
pub const PROTOCOL_VERSION: u8 = 2;

/// A payload type that travels in a frame of a fixed [`MessageType`].
pub trait Message:
    Archive
    + for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >
{
    const TYPE: MessageType;
}

macro_rules! registry {
    ($( $(#[$doc:meta])* $name:ident = $code:literal ),* $(,)?) => {
        /// The message type field of a frame header (u16, little-endian on the wire).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum MessageType { $( $(#[$doc])* $name = $code ),* }

        impl MessageType {
            /// Maps a wire code to a known type; `None` for codes this build does not know.
            pub fn from_code(code: u16) -> Option<Self> {
                match code { $( $code => Some(Self::$name), )* _ => None }
            }
            pub fn code(self) -> u16 { self as u16 }
            pub fn name(self) -> &'static str {
                match self { $( Self::$name => stringify!($name), )* }
            }
        }

        $( impl Message for $name { const TYPE: MessageType = MessageType::$name; } )*
    };
}

registry! {
    /// Client -> server, first frame on a connection.
    Hello = 1,
    /// Server -> client answer to `Hello`.
    HelloAck = 2,
    /// Either direction: an error about the message id in the frame header (0 = the connection).
    ErrorMessage = 3,
    /// Either direction: the sender is closing the connection.
    Goodbye = 4,
    /// Either direction: heartbeat / echo request; answered by the transport itself with `Pong`.
    Ping = 5,
    /// Answer to `Ping`, echoing nonce and payload.
    Pong = 6,
    /// Client -> server: fill-in-the-middle completion; opens a response stream keyed by the frame's message id.
    CompletionRequest = 16,
    /// Client -> server: chat answer; opens a response stream keyed by the frame's message id.
    ChatRequest = 17,
    /// Client -> server: stop the stream of `request_id`; the server still ends it with one terminal frame.
    Cancel = 18,
    /// Receiver -> sender: the receiver consumed `bytes` of stream `request_id`; the sender may send that much more.
    Credit = 19,
    /// Client -> server notification (no reply): an open document's full text or its latest edits.
    DocumentSync = 20,
    /// Client -> server notification (no reply): a document was closed.
    DocumentClosed = 21,
    /// Client -> server: warm the engine's cache for a document (no reply; `Cancel` with this frame's id drops it).
    Prefill = 22,
    /// Server -> client: the next piece of a response stream.
    StreamChunk = 32,
    /// Server -> client: the stream ended normally (or cancelled); terminal.
    StreamEnd = 33,
    /// Client -> server: ask for engine statistics.
    StatusRequest = 48,
    /// Server -> client: engine statistics.
    StatusReply = 49,
    /// Client -> server: ask the engine to exit gracefully.
    Shutdown = 50,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Hello {
    pub protocol_version: u8,
    pub client_to_server_ring_bytes: u32,
    pub server_to_client_ring_bytes: u32,
    pub generation: u64,
    pub client_pid: u32,
    pub client_name: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct HelloAck {
    pub protocol_version: u8,
    pub slot: u32,
    pub server_pid: u32,
    pub max_message_bytes: u32,
    /// Initial per-stream credit in payload bytes, for each direction.
    pub stream_window_bytes: u32,
    pub server_name: String,
}

/// Why something failed; stable numeric codes so both sides agree.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer broke the protocol (bad frame, bad payload, bad sequence).
    Protocol = 1,
    VersionMismatch = 2,
    SlotLimit = 3,
    MessageTooLarge = 4,
    UnknownMessageType = 5,
    InvalidPayload = 6,
    /// The engine went away (its lock was released) while the request was in flight.
    ServerGone = 7,
    Timeout = 8,
    Busy = 9,
    /// A malformed or unsatisfiable request (unknown profile, empty prompt, ...).
    BadRequest = 10,
    /// No usable model: the message says how to get one.
    ModelMissing = 11,
    ModelLoad = 12,
    /// The provider rejected the credentials (HTTP 401).
    ProviderAuth = 13,
    /// HTTP 403.
    ProviderForbidden = 14,
    /// HTTP 404: wrong base URL or model name.
    ProviderNotFound = 15,
    /// HTTP 429; the message carries the retry delay when the provider gave one.
    ProviderRateLimited = 16,
    /// HTTP 5xx.
    ProviderServer = 17,
    /// Connection refused / DNS / TLS: the provider cannot be reached.
    ProviderUnreachable = 18,
    /// The provider's stream was malformed or stalled.
    ProviderProtocol = 19,
    Config = 20,
    Internal = 21,
    Cancelled = 22,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Goodbye {
    pub reason: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Ping {
    pub nonce: u64,
    pub payload: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Pong {
    pub nonce: u64,
    pub payload: Vec<u8>,
}

/// How many lines the completion may span.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum CompletionMode {
    /// The engine decides from the cursor context.
    #[default]
    Auto = 0,
    SingleLine = 1,
    MultiLine = 2,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct CompletionRequest {
    /// Provider profile name; empty selects the engine's inline-completion profile.
    pub profile: String,
    /// LSP language id (`rust`, `python`, ...); may be empty.
    pub language_id: String,
    /// Path of the file being edited (for prompts and cache keys); may be empty.
    pub file_path: String,
    /// Text before the cursor.
    pub prefix: String,
    /// Text after the cursor.
    pub suffix: String,
    pub mode: CompletionMode,
    /// 0 = profile default.
    pub max_tokens: u32,
    /// `None` = profile default.
    pub temperature: Option<f32>,
    /// The most lines the client shows; the engine stops generating there (and caches the cut completion).
    /// 0 = no limit.
    pub max_lines: u32,
}

/// A document was opened or focused, or the cursor rested somewhere new: the engine evaluates the prompt a
/// completion there would use, at low priority, so the first keystroke finds it cached.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Prefill {
    /// Provider profile name; empty selects the engine's inline-completion profile.
    pub profile: String,
    /// LSP language id; may be empty.
    pub language_id: String,
    /// Path of the document; may be empty.
    pub file_path: String,
    /// Text before the cursor.
    pub prefix: String,
    /// Text after the cursor.
    pub suffix: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum ChatRole {
    User = 0,
    Assistant = 1,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct ChatRequest {
    /// Provider profile name; empty selects the engine's chat profile.
    pub profile: String,
    /// System prompt; may be empty.
    pub system: String,
    pub messages: Vec<ChatMessage>,
    /// 0 = profile default.
    pub max_tokens: u32,
    pub temperature: Option<f32>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Cancel {
    pub request_id: u64,
}

/// One edit of a document: replace bytes `start..end` (UTF-8 offsets into the text as it was before this
/// edit) with `text`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ByteEdit {
    pub start: u64,
    pub end: u64,
    /// UTF-8 text; anything else is refused by the engine.
    pub text: Vec<u8>,
}

/// What a [`DocumentSync`] carries: the whole text (on open, after a reconnect or when edits piled up) or
/// the edits since the version the engine has.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum DocumentContent {
    /// The whole document, UTF-8 (anything else is refused by the engine).
    Full(Vec<u8>),
    /// Edits applied in order to version `base_version`; a receiver holding another version drops the document.
    Edits {
        base_version: i32,
        edits: Vec<ByteEdit>,
    },
}

/// Client -> server: a document the editor has open, so completions can use it as context. Fire and forget.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DocumentSync {
    /// The document's path, spelled as in [`CompletionRequest::file_path`].
    pub path: String,
    /// LSP language id; may be empty.
    pub language_id: String,
    /// The editor's version after this change.
    pub version: i32,
    pub content: DocumentContent,
}

/// Client -> server: the editor closed `path`. Fire and forget.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DocumentClosed {
    pub path: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Credit {
    pub request_id: u64,
    pub bytes: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct StreamChunk {
    pub request_id: u64,
    /// 0, 1, 2, ... within the stream; a gap is a protocol error.
    pub sequence: u32,
    pub text: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum FinishReason {
    /// The model stopped (end of text or a stop sequence).
    Stop = 0,
    /// The token limit was reached.
    Length = 1,
    /// Post-processing decided the answer was complete and cut generation.
    Truncated = 2,
    /// The client cancelled.
    Cancelled = 3,
    /// Answered from the cache.
    Cached = 4,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct StreamEnd {
    pub request_id: u64,
    /// Number of chunks sent before this frame.
    pub chunks: u32,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub time_to_first_token_us: u64,
    pub total_us: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct StatusRequest {}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct StatusReply {
    pub endpoint: String,
    pub engine_pid: u32,
    pub engine_version: String,
    pub uptime_ms: u64,
    pub completion_provider: String,
    pub completion_model: String,
    pub chat_provider: String,
    pub chat_model: String,
    pub connections: u32,
    pub requests: u64,
    pub cancels: u64,
    pub errors: u64,
    pub cache_hits: u64,
    pub time_to_first_token_p50_us: u64,
    pub time_to_first_token_p95_us: u64,
    pub total_p50_us: u64,
    pub total_p95_us: u64,
    /// The completion profile's local model: `loading`, `ready: ...` or `failed: ...` (empty for remote providers).
    pub model_state: String,
    /// The CPU code llama.cpp runs (its SIMD level); empty for remote providers.
    pub cpu_backend: String,
    /// The GPU backend in use; empty for CPU only.
    pub gpu_backend: String,
    /// Advice about the model in use (e.g. how to get a better one), or empty.
    pub model_note: String,
    /// The daemon exits after this long without clients; 0 = never.
    pub idle_exit_after_ms: u64,
    /// Time left before that exit, not counting the asking client; `u64::MAX` while other clients are
    /// connected or requests run (or when it never exits).
    pub idle_exit_in_ms: u64,
    /// Why the engine's configuration file could not be used when last read (file:line: message), or empty.
    /// A broken edit keeps the configuration loaded before it.
    pub config_error: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Shutdown {}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<M>(message: &M) -> M
    where
        M: Message,
        M::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let bytes = super::super::encode(message).expect("encode");
        let archived = super::super::decode::<M>(&bytes).expect("decode");
        rkyv::deserialize::<M, rkyv::rancor::Error>(archived).expect("deserialize")
    }

    #[test]
    fn document_messages_round_trip_with_their_codes() {
        assert_eq!(MessageType::from_code(20), Some(MessageType::DocumentSync));
        assert_eq!(
            MessageType::from_code(21),
            Some(MessageType::DocumentClosed)
        );
        assert_eq!(DocumentSync::TYPE.code(), 20);
        assert_eq!(DocumentClosed::TYPE.name(), "DocumentClosed");
        let full = DocumentSync {
            path: "/src/lib.rs".into(),
            language_id: "rust".into(),
            version: 3,
            content: DocumentContent::Full("fn main() {}\n".as_bytes().to_vec()),
        };
        assert_eq!(round_trip(&full), full);
        let edits = DocumentSync {
            path: "/src/lib.rs".into(),
            language_id: "rust".into(),
            version: 5,
            content: DocumentContent::Edits {
                base_version: 3,
                edits: vec![
                    ByteEdit {
                        start: 3,
                        end: 7,
                        text: b"start".to_vec(),
                    },
                    ByteEdit {
                        start: 0,
                        end: 0,
                        text: "// é\n".as_bytes().to_vec(),
                    },
                ],
            },
        };
        assert_eq!(round_trip(&edits), edits);
        let closed = DocumentClosed {
            path: "/src/lib.rs".into(),
        };
        assert_eq!(round_trip(&closed), closed);
    }
}
