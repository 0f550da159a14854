//! The application plaintext inside an Olm message.
//!
//! # Encoding
//!
//! ```text
//! +------------+----------------+-----------------------------------------+
//! | u8 format  | u16 kind (BE)  | body: MessagePack, structs as positional |
//! |    = 1     |                | arrays                                  |
//! +------------+----------------+-----------------------------------------+
//! ```
//!
//! | kind | variant | body |
//! |---|---|---|
//! | 1 | [`Payload::Text`] | `[str body]` |
//! | 2 | [`Payload::DeliveryToken`] | `[bin token]` |
//! | 3 | [`Payload::Sent`] | `[str to, str body]` |
//! | 4 | [`Payload::LinkRequest`] | `[bin public device keys, bin proof (32)]` |
//! | 5 | [`Payload::LinkGrant`] | `[bin master key seed (32), bin delivery token, [[str handle, bin master key (32), bin token or nil, bool verified]], bin proof (32)]` |
//! | 6 | [`Payload::DeviceLinked`] | `[u32 device]` |
//!
//! New kinds (delivery tokens, call signaling, receipts, …) take new numbers; a client that
//! meets a kind it does not know gets [`PayloadError::UnknownKind`] and can tell its user to
//! update, instead of failing to decrypt. New fields go at the end of a body, with
//! `#[serde(default)]`, so older bodies still decode.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use zeroize::Zeroizing;

use super::decode_exact;

/// Format byte of the payload encoding.
const FORMAT: u8 = 1;

const KIND_TEXT: u16 = 1;
const KIND_DELIVERY_TOKEN: u16 = 2;
const KIND_SENT: u16 = 3;
const KIND_LINK_REQUEST: u16 = 4;
const KIND_LINK_GRANT: u16 = 5;
const KIND_DEVICE_LINKED: u16 = 6;

/// Why a decrypted plaintext could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadError {
    /// The plaintext is empty, truncated or not valid MessagePack for its kind.
    #[error("malformed payload")]
    Malformed,
    /// The plaintext uses a format this build does not know.
    #[error("unsupported payload format {0}")]
    UnsupportedFormat(u8),
    /// A payload kind this build does not know (sent by a newer client).
    #[error("unknown payload kind {0}")]
    UnknownKind(u16),
}

/// What one device says to another, end to end.
///
/// `Debug` shows the kind and sizes, never the content.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Payload {
    /// A text message.
    Text {
        /// The message text.
        body: String,
    },
    /// The sender's delivery token: what admits sealed envelopes to the sender's account, so
    /// the recipient can reply (and write later) without naming itself to the broker.
    DeliveryToken {
        /// The token (16..=64 bytes; the SDK uses 32).
        token: Zeroizing<Vec<u8>>,
    },
    /// A transcript for the sender's own other devices: "I sent `body` to `to`", so every
    /// device of a user shows the whole conversation.
    Sent {
        /// The recipient handle of the original message.
        to: String,
        /// The message text.
        body: String,
    },
    /// From a device being linked to the account's existing devices: its public keys and a
    /// proof that it holds the link code the user read off an existing device.
    LinkRequest {
        /// The new device's [`PublicDeviceKeys`](super::PublicDeviceKeys) encoding.
        keys: Vec<u8>,
        /// Keyed hash of the link code's secret part over the keys and device id.
        proof: [u8; 32],
    },
    /// From an existing device to a newly linked one: the account's secrets.
    LinkGrant {
        /// The master key's 32-byte seed.
        master_key: Zeroizing<[u8; 32]>,
        /// The account's delivery token.
        delivery_token: Zeroizing<Vec<u8>>,
        /// What the account knows about its contacts.
        contacts: Vec<GrantContact>,
        /// Keyed hash of the link code's secret part over the grant's public parts, so the
        /// new device knows the grant comes from a device that showed the code.
        proof: [u8; 32],
    },
    /// To the account's other devices: a device was linked and added to the signed list.
    DeviceLinked {
        /// The new device's id.
        device: u32,
    },
}

/// One contact, as handed to a newly linked device in a [`Payload::LinkGrant`].
#[derive(Clone, PartialEq, Eq)]
pub struct GrantContact {
    /// The contact's handle.
    pub handle: String,
    /// The contact's pinned master key.
    pub master_key: [u8; 32],
    /// The contact's delivery token, if known.
    pub delivery_token: Option<Zeroizing<Vec<u8>>>,
    /// Whether the user compared safety numbers with this contact.
    pub verified: bool,
}

#[derive(Serialize, Deserialize)]
struct TokenBody(ByteBuf);

#[derive(Serialize, Deserialize)]
struct SentBody(String, String);

#[derive(Serialize, Deserialize)]
struct LinkRequestBody(ByteBuf, ByteBuf);

#[derive(Serialize, Deserialize)]
struct GrantContactBody(String, ByteBuf, Option<ByteBuf>, bool);

#[derive(Serialize, Deserialize)]
struct LinkGrantBody(ByteBuf, ByteBuf, Vec<GrantContactBody>, ByteBuf);

#[derive(Serialize, Deserialize)]
struct DeviceLinkedBody(u32);

fn array32(bytes: &[u8]) -> Result<[u8; 32], PayloadError> {
    bytes.try_into().map_err(|_| PayloadError::Malformed)
}

#[derive(Serialize, Deserialize)]
struct TextBody(String);

impl Payload {
    /// Encodes as described in the module doc.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Payload::Text { body } => (KIND_TEXT, rmp_serde::to_vec(&TextBody(body.clone()))),
            Payload::DeliveryToken { token } => (
                KIND_DELIVERY_TOKEN,
                rmp_serde::to_vec(&TokenBody(ByteBuf::from(token.to_vec()))),
            ),
            Payload::Sent { to, body } => (
                KIND_SENT,
                rmp_serde::to_vec(&SentBody(to.clone(), body.clone())),
            ),
            Payload::LinkRequest { keys, proof } => (
                KIND_LINK_REQUEST,
                rmp_serde::to_vec(&LinkRequestBody(
                    ByteBuf::from(keys.clone()),
                    ByteBuf::from(proof.to_vec()),
                )),
            ),
            Payload::LinkGrant {
                master_key,
                delivery_token,
                contacts,
                proof,
            } => (
                KIND_LINK_GRANT,
                rmp_serde::to_vec(&LinkGrantBody(
                    ByteBuf::from(master_key.to_vec()),
                    ByteBuf::from(delivery_token.to_vec()),
                    contacts
                        .iter()
                        .map(|c| {
                            GrantContactBody(
                                c.handle.clone(),
                                ByteBuf::from(c.master_key.to_vec()),
                                c.delivery_token.as_ref().map(|t| ByteBuf::from(t.to_vec())),
                                c.verified,
                            )
                        })
                        .collect(),
                    ByteBuf::from(proof.to_vec()),
                )),
            ),
            Payload::DeviceLinked { device } => (
                KIND_DEVICE_LINKED,
                rmp_serde::to_vec(&DeviceLinkedBody(*device)),
            ),
        };
        let body = body.expect("payload bodies always encode");
        let mut out = Vec::with_capacity(3 + body.len());
        out.push(FORMAT);
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes; never panics on untrusted input.
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let (&format, rest) = bytes.split_first().ok_or(PayloadError::Malformed)?;
        if format != FORMAT {
            return Err(PayloadError::UnsupportedFormat(format));
        }
        let (kind, body) = rest
            .split_first_chunk::<2>()
            .ok_or(PayloadError::Malformed)?;
        match u16::from_be_bytes(*kind) {
            KIND_TEXT => {
                let TextBody(body) = decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::Text { body })
            }
            KIND_DELIVERY_TOKEN => {
                let TokenBody(token) = decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::DeliveryToken {
                    token: Zeroizing::new(token.into_vec()),
                })
            }
            KIND_SENT => {
                let SentBody(to, body) = decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::Sent { to, body })
            }
            KIND_LINK_REQUEST => {
                let LinkRequestBody(keys, proof) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::LinkRequest {
                    keys: keys.into_vec(),
                    proof: array32(&proof)?,
                })
            }
            KIND_LINK_GRANT => {
                let LinkGrantBody(master_key, delivery_token, contacts, proof) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                let master_key = Zeroizing::new(master_key.into_vec());
                Ok(Payload::LinkGrant {
                    master_key: Zeroizing::new(array32(&master_key)?),
                    delivery_token: Zeroizing::new(delivery_token.into_vec()),
                    contacts: contacts
                        .into_iter()
                        .map(|GrantContactBody(handle, master_key, token, verified)| {
                            Ok(GrantContact {
                                handle,
                                master_key: array32(&master_key)?,
                                delivery_token: token.map(|t| Zeroizing::new(t.into_vec())),
                                verified,
                            })
                        })
                        .collect::<Result<_, PayloadError>>()?,
                    proof: array32(&proof)?,
                })
            }
            KIND_DEVICE_LINKED => {
                let DeviceLinkedBody(device) = decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::DeviceLinked { device })
            }
            other => Err(PayloadError::UnknownKind(other)),
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Text { body } => f
                .debug_struct("Text")
                .field("body_len", &body.len())
                .finish_non_exhaustive(),
            Payload::DeliveryToken { .. } => {
                f.debug_struct("DeliveryToken").finish_non_exhaustive()
            }
            Payload::Sent { body, .. } => f
                .debug_struct("Sent")
                .field("body_len", &body.len())
                .finish_non_exhaustive(),
            Payload::LinkRequest { .. } => f.debug_struct("LinkRequest").finish_non_exhaustive(),
            Payload::LinkGrant { contacts, .. } => f
                .debug_struct("LinkGrant")
                .field("contacts", &contacts.len())
                .finish_non_exhaustive(),
            Payload::DeviceLinked { device } => f
                .debug_struct("DeviceLinked")
                .field("device", device)
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        let payload = Payload::Text {
            body: "hello, Bob ☕".into(),
        };
        let bytes = payload.encode();
        assert_eq!(&bytes[..3], &[1, 0, 1]);
        assert_eq!(Payload::decode(&bytes), Ok(payload));
    }

    #[test]
    fn new_kinds_round_trip() {
        let payloads = [
            Payload::DeliveryToken {
                token: Zeroizing::new(vec![7; 32]),
            },
            Payload::Sent {
                to: "bob@b.example".into(),
                body: "hi".into(),
            },
            Payload::LinkRequest {
                keys: vec![1; 97],
                proof: [2; 32],
            },
            Payload::LinkGrant {
                master_key: Zeroizing::new([3; 32]),
                delivery_token: Zeroizing::new(vec![4; 32]),
                contacts: vec![
                    GrantContact {
                        handle: "bob@b.example".into(),
                        master_key: [5; 32],
                        delivery_token: Some(Zeroizing::new(vec![6; 32])),
                        verified: true,
                    },
                    GrantContact {
                        handle: "carol@c.example".into(),
                        master_key: [8; 32],
                        delivery_token: None,
                        verified: false,
                    },
                ],
                proof: [9; 32],
            },
            Payload::DeviceLinked { device: 3 },
        ];
        for (kind, payload) in (2u16..).zip(payloads) {
            let bytes = payload.encode();
            assert_eq!(&bytes[1..3], &kind.to_be_bytes());
            assert_eq!(Payload::decode(&bytes), Ok(payload.clone()));
            let shown = format!("{payload:?}");
            assert!(!shown.contains("bob"), "{shown}");
        }
        // A proof of the wrong length is malformed, not a panic.
        let mut bad = vec![1, 0, 4];
        bad.extend(
            rmp_serde::to_vec(&LinkRequestBody(
                ByteBuf::from(vec![1]),
                ByteBuf::from(vec![2; 31]),
            ))
            .unwrap(),
        );
        assert_eq!(Payload::decode(&bad), Err(PayloadError::Malformed));
    }

    #[test]
    fn debug_hides_content() {
        let payload = Payload::Text {
            body: "canary-secret".into(),
        };
        let shown = format!("{payload:?}");
        assert!(!shown.contains("canary"), "{shown}");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(Payload::decode(&[]), Err(PayloadError::Malformed));
        assert_eq!(Payload::decode(&[1, 0]), Err(PayloadError::Malformed));
        assert_eq!(
            Payload::decode(&[2, 0, 1]),
            Err(PayloadError::UnsupportedFormat(2))
        );
        assert_eq!(
            Payload::decode(&[1, 0, 9, 0x90]),
            Err(PayloadError::UnknownKind(9))
        );
        assert_eq!(
            Payload::decode(&[1, 0, 1, 0xc1]),
            Err(PayloadError::Malformed)
        );
        let mut trailing = Payload::Text { body: "x".into() }.encode();
        trailing.push(0);
        assert_eq!(Payload::decode(&trailing), Err(PayloadError::Malformed));
    }
}
