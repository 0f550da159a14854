//! Sealpost wire protocol: a pure codec shared by the broker, the clients and the fuzzers.
//!
//! # Layout
//!
//! - [`ids`]: validated identifiers — account [`Handle`]s, [`DeviceId`]s, [`EnvelopeId`]s.
//! - [`frame`]: the device protocol spoken over WebSocket binary messages: [`ClientFrame`]
//!   (device → broker) and [`ServerFrame`] (broker → device), with their byte layout.
//! - [`federation`]: the broker-to-broker protocol (Noise handshake frames, encrypted link
//!   frames carrying transactions of sealed envelopes and remote lookups).
//! - [`transparency`]: key-transparency records (signed roots, co-signatures, evidence).
//! - [`limits`]: sizes and counts both sides enforce.
//! - [`error`]: decode errors and the stable [`ErrorCode`]s and [`CloseCode`]s the broker sends.
//!
//! This crate knows nothing of actix, tokio or sled. Ciphertext is opaque bytes everywhere:
//! there is no type here that could hold a plaintext message or a sender identity.

#![deny(missing_docs)]

mod codec;
pub mod error;
pub mod federation;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod transparency;

pub use error::{CloseCode, DecodeError, ErrorCode};
pub use frame::{
    Class, ClientFrame, Copy, Envelope, GroupRecipient, Notice, Order, PROTOCOL_VERSION,
    RecipientRefusal, SendOutcome, ServerFrame,
};
pub use ids::{DeviceId, EnvelopeId, Handle, HandleError};
