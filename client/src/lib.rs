//! Sealpost client library.
//!
//! # Layout
//!
//! - [`crypto`]: everything that touches a key — device and account identities, signed
//!   device lists, Olm sessions (vodozemac), sealed sender (HPKE), safety numbers, key pins
//!   and the encrypted local state file. Nothing outside this module handles key material or
//!   plaintext-to-ciphertext conversions.
//! - [`api`]: the broker's HTTP API (accounts, devices, key directory, device lists, delivery
//!   tokens, link codes), typed.
//! - [`conn`]: WebSocket connections (authenticated `/v1/ws`, anonymous `/v1/sealed`)
//!   speaking `sealpost-proto` frames.
//! - [`sdk`]: [`Client`], one device of one account: registration, linking, sending (sealed
//!   sender), receiving (verify, decrypt, deduplicate, save, then ack), conversations,
//!   safety numbers. See its module doc for the protocol decisions.
//!
//! The `sealpost-cli` binary (src/main.rs) is a thin command-line front end to `Client`.
//!
//! Everything but [`crypto`] needs the default `net` feature. Without it the crate is the
//! cryptographic core alone, with no tokio or reqwest: the browser client (`web/`) compiles it
//! to wasm and does its networking in the page.

#![deny(missing_docs)]

#[cfg(feature = "net")]
pub mod api;
#[cfg(feature = "net")]
pub mod conn;
pub mod crypto;
#[cfg(feature = "net")]
mod record;
#[cfg(feature = "net")]
pub mod sdk;

#[cfg(feature = "net")]
pub use sdk::{
    CallSignal, Client, ClientError, Conversation, ConversationMessage, DeviceInfo, EnvelopeError,
    Event, LinkCode, PreparedEnvelope, ReceivedMessage, Stats,
};
