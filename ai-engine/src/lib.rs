//! ai-engine: the per-user daemon that turns completion and chat requests into streamed model output.

pub mod cli;
pub mod completion;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod models;
pub mod provider;
