//! The lapce-ai volt: merges settings over defaults, finds the bundled bridge and asks Lapce to start it.

pub mod launch;

#[cfg(target_os = "wasi")]
mod wasi_entry;
