//! lapce-ai-lsp: the editor-side bridge between Lapce (LSP over stdio) and the ai-engine daemon.

pub mod backend;
pub mod context_sync;
pub mod debounce;
pub mod document;
pub mod engine;
pub mod fake;
pub mod first_use;
pub mod prefill;
pub mod server;
pub mod settings;
