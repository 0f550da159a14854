//! Sealpost client library.
//!
//! # Layout
//!
//! - [`crypto`]: everything that touches a key — device and account identities, signed
//!   device lists, Olm sessions (vodozemac), sealed sender (HPKE), safety numbers, key pins
//!   and the encrypted local state file. Nothing outside this module handles key material or
//!   plaintext-to-ciphertext conversions.
//!
//! The network SDK and the `sealpost` CLI will live beside `crypto`; they talk to the broker
//! through `sealpost-proto` frames and hand opaque sealed bytes in and out of [`crypto`].

#![deny(missing_docs)]

pub mod crypto;
