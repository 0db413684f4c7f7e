//! lapce-ai transport: lock files + shared-memory rings between editor bridges and the ai-engine daemon.

pub mod protocol;
