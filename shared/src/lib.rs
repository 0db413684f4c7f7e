//! lapce-ai transport: lock files + shared-memory rings between editor bridges and the ai-engine daemon.
//!
//! Layout: [`endpoint`] (rendezvous directory), [`lockfile`] (flock liveness), [`segment`] (shared-memory
//! layouts), [`ring`] + [`doorbell`] (SPSC rings and wake-ups), [`protocol`] (frames and the message registry),
//! [`framing`] (frames over rings), [`client`] / [`async_client`] / [`server`] (the two sides).

pub mod async_client;
pub mod autostart;
pub mod client;
pub mod doorbell;
pub mod endpoint;
pub mod error;
pub mod framing;
pub mod lockfile;
pub mod protocol;
pub mod reconnect;
pub mod ring;
pub mod segment;
pub mod server;
mod sys;
pub mod util;

pub use async_client::{AsyncClient, ResponseStream, StreamEvent};
pub use client::{Client, ClientOptions, ConnectionInfo};
pub use endpoint::Endpoint;
pub use error::TransportError;
pub use framing::ReceivedMessage;
pub use reconnect::{wait_for_engine, EngineStarter, ReconnectingClient};
pub use server::{
    DisconnectReason, Server, ServerConnection, ServerHandler, ServerOptions, StreamSender,
};
