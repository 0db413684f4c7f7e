//! The lapce-ai volt: merges settings over defaults, installs the verified native binaries on first start
//! and asks Lapce to start the bridge.

pub mod install;
pub mod launch;

#[cfg(target_os = "wasi")]
mod wasi_entry;
