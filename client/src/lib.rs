//! Sealpost client library.
//!
//! # Layout
//!
//! Dependencies point one way (modcycles: no cycle):
//!
//! ```text
//! sdk ──▶ conn ──▶ api ──▶ http ──▶ engine ──▶ crypto        error ◀── every module
//!  └──────────────────────────────▶ engine                  (imports none of them)
//! web/ (another crate, wasm) ──▶ engine, http, crypto
//! ```
//!
//! - [`crypto`]: everything that touches a key — device and account identities, signed
//!   device lists, Olm sessions (vodozemac), sealed sender (HPKE), safety numbers, key pins
//!   and the encrypted local state file. Nothing outside this module handles key material or
//!   plaintext-to-ciphertext conversions.
//! - [`engine`]: the protocol of one device, sans I/O — the persisted record, verified
//!   device lists, sending (every device, placeholders, routes, stale device sets),
//!   receiving (open, verify the sender's claim, decrypt, deduplicate, hold), linking, calls.
//!   It takes what the broker said and says what to fetch or send; both clients drive it.
//! - [`error`]: [`ClientError`] and [`EnvelopeError`], shared by the engine and the SDK.
//! - [`http`]: the JSON bodies of the broker's HTTP API that carry keys and tokens.
//! - [`api`]: the broker's HTTP API (accounts, devices, key directory, device lists, delivery
//!   tokens, link codes), typed, over reqwest.
//! - [`conn`]: WebSocket connections (authenticated `/v1/ws`, anonymous `/v1/sealed`)
//!   speaking `sealpost-proto` frames.
//! - [`sdk`]: [`Client`], one device of one account: the engine driven over the network,
//!   with its state in a directory — registration, linking, sending, receiving (save, then
//!   ack), calls, devices, safety numbers.
//!
//! The `sealpost-cli` binary (src/main.rs) is a thin command-line front end to `Client`.
//!
//! [`api`], [`conn`] and [`sdk`] need the default `net` feature. Without it the crate is the
//! sans-I/O core ([`crypto`], [`engine`], [`error`], [`http`]) with no tokio or reqwest: the
//! browser client (`web/`) compiles it to wasm, wraps the engine for JavaScript, and does its
//! networking in the page.

#![deny(missing_docs)]

#[cfg(feature = "net")]
pub mod api;
#[cfg(feature = "net")]
pub mod conn;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod http;
#[cfg(feature = "net")]
pub mod sdk;

pub use engine::{
    CallSignal, Conversation, ConversationMessage, DeviceInfo, Event, KeyChange, LinkCode,
    PreparedEnvelope, ReceivedMessage,
};
pub use error::{ClientError, EnvelopeError};
#[cfg(feature = "net")]
pub use sdk::{Client, Stats};
