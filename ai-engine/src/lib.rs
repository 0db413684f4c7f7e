//! ai-engine: the per-user daemon that turns completion and chat requests into streamed model output.

pub mod completion;
pub mod config;
pub mod provider;
