//! The client's cryptographic core: the only module that owns vodozemac, HPKE and key
//! material (STYLE habit 13).
//!
//! # Layout
//!
//! - [`identity`]: the account's [`MasterKey`] (Ed25519), a device's [`DeviceKeys`] (a
//!   vodozemac Olm account plus a separate X25519 key that only opens sealed envelopes), the
//!   published [`PublicDeviceKeys`] blob and signed one-time keys ([`SignedOneTimeKey`]).
//! - [`device_list`]: a user's [`DeviceList`], signed by the master key; verification checks
//!   the signature, the user, the pinned master key and version rollback.
//! - [`sealed`]: sealed sender — an Olm message plus the sender's identity, sealed with HPKE
//!   to one recipient device, so the broker sees a recipient and a size but never a sender.
//! - [`message`]: the Olm message ([`OlmMessage`]) a sealed envelope carries.
//! - [`session`]: pairwise Olm sessions keyed by (peer user, peer device), with the check
//!   that an envelope's claimed sender owns the Olm session that decrypted it.
//! - [`payload`]: the application plaintext carried inside an Olm message ([`Payload`]).
//! - [`link`]: proofs of a link code's secret, for linking a new device.
//! - [`group`]: group conversations with MLS (`openmls`): members certified by their
//!   devices' identity keys, KeyPackages, Commits, Welcomes and the group wire format.
//! - [`transparency`]: key-transparency checks: lookup proofs of device lists, roots that
//!   only extend each other, auditors' co-signatures, this account's own history.
//! - [`safety`]: safety numbers derived from both users' handles and master keys.
//! - [`pins`]: trust-on-first-use pins of contacts' master keys and last device-list versions.
//! - [`seen`]: envelope ids already handled ([`SeenIds`]), to drop redeliveries.
//! - [`store`]: [`ClientState`], persisted as one file encrypted under a local 32-byte key,
//!   written crash-safely.
//!
//! # Receiving an envelope
//!
//! ```text
//! sealed bytes ──open()──▶ Unsealed { claimed sender, timestamp, OlmMessage }
//!                               │  look up the claimed sender's *verified* device list entry
//!                               ▼
//!            Sessions::decrypt(own device, claimed sender, its PublicDeviceKeys, message)
//!                               │  Olm session's remote identity key == entry's curve25519,
//!                               │  else ForgedSender; used message key, else Replay
//!                               ▼
//!                            Payload
//! ```
//!
//! Sending is the reverse: [`Sessions::encrypt`] then [`seal`] once per recipient device.
//!
//! ```
//! use sealpost_client::crypto::{
//!     DeviceKeys, Payload, SenderInfo, Sessions, open, seal,
//! };
//!
//! // Bob's device publishes its keys and a fallback key (in its signed device list and
//! // the key directory).
//! let mut bob_keys = DeviceKeys::generate();
//! let mut bob_sessions = Sessions::new("bob@b.example".into(), 7);
//! let bob_public = bob_keys.public_keys();
//! let bob_fallback = bob_keys.unpublished_keys().fallback.expect("generated with one");
//!
//! // Alice starts a session from Bob's verified keys and a claimed key, then seals.
//! let alice_keys = DeviceKeys::generate();
//! let mut alice_sessions = Sessions::new("alice@a.example".into(), 1);
//! alice_sessions.create_outbound(&alice_keys, "bob@b.example", 7, &bob_public, &bob_fallback)?;
//! let olm = alice_sessions.encrypt("bob@b.example", 7, &Payload::Text { body: "hi".into(), link: None })?;
//! let alice = SenderInfo { user: "alice@a.example".into(), device: 1 };
//! let sealed = seal("bob@b.example", 7, &bob_public.seal_x25519, &alice, 1_700_000_000_000, &olm)?;
//!
//! // Bob opens it, looks up the *claimed* sender's verified keys, and decrypts.
//! let unsealed = open("bob@b.example", 7, bob_keys.seal_secret(), &sealed)?;
//! let sender_keys = alice_keys.public_keys(); // from Alice's verified device list
//! let payload =
//!     bob_sessions.decrypt(&mut bob_keys, &unsealed.sender, &sender_keys, &unsealed.olm_message)?;
//! assert_eq!(payload, Payload::Text { body: "hi".into(), link: None });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Randomness
//!
//! vodozemac 0.11 and hpke 0.14 are built on `rand_core` 0.10 and draw from the operating
//! system themselves (`getrandom` 0.4); the workspace's `rand` 0.8 (`OsRng`) is used here only
//! for the master key, nonces of the state file and the local key. No RNG object crosses a
//! crate boundary, so the two `rand_core` generations never need to interoperate.
//!
//! # Errors
//!
//! Each module has its own error enum. Their `Display` texts never contain handles, keys or
//! plaintext, so they are safe to log.

pub mod attachment;
pub mod device_list;
pub mod group;
pub mod identity;
pub mod link;
pub mod message;
pub mod payload;
pub mod pins;
pub mod safety;
pub mod sealed;
pub mod seen;
pub mod session;
pub mod store;
pub mod transparency;

pub use attachment::{AttachmentError, FileKey, FileRef};
pub use device_list::{DeviceList, DeviceListError, SeenDeviceList, SignedDeviceList};
pub use identity::{
    DeviceKeys, KeyError, MasterKey, PublicDeviceKeys, SealSecretKey, SignedOneTimeKey,
    UnpublishedKeys,
};
pub use message::{OlmMessage, OlmMessageKind};
pub use payload::{
    CallId, GrantContact, Link, MAX_LINK_PREV, MAX_RECEIPT_IDS, Named, Payload, PayloadError,
    ReceiptKind,
};
pub use pins::{PinResult, Pins};
pub use safety::{SafetyNumber, safety_number};
pub use sealed::{PLACEHOLDER_BYTES, SealError, SenderInfo, Unsealed, open, placeholder, seal};
pub use seen::SeenIds;
pub use session::{SessionError, Sessions};
pub use store::{ClientState, LocalKey, StoreError};

/// Decodes one MessagePack value from the front of `bytes`; returns it and what follows.
/// Never panics on untrusted input.
pub(crate) fn decode_prefix<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<(T, &[u8])> {
    let mut rest = bytes;
    let mut de = rmp_serde::Deserializer::new(&mut rest);
    let value = T::deserialize(&mut de).ok()?;
    drop(de);
    Some((value, rest))
}

/// Decodes one MessagePack value that must span all of `bytes`.
pub(crate) fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match decode_prefix(bytes)? {
        (value, []) => Some(value),
        _ => None,
    }
}
