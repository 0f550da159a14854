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
//! | 1 | [`Payload::Text`] | `str body` (unlinked), or `[str body, u64 n, [[u64 n, bin envelope id (16)]]]` ([`Link`]) |
//! | 2 | [`Payload::DeliveryToken`] | `[bin token]` |
//! | 3 | [`Payload::Sent`] | `[str to, str body]` |
//! | 4 | [`Payload::LinkRequest`] | `[bin public device keys, bin proof (32)]` |
//! | 5 | [`Payload::LinkGrant`] | `[bin master key seed (32), bin delivery token, [[str handle, bin master key (32), bin token or nil, bool verified]], bin proof (32)]` |
//! | 6 | [`Payload::DeviceLinked`] | `[u32 device]` |
//! | 7 | [`Payload::CallOffer`] | `[bin call id (16), str sdp, str dtls fingerprint, bool video]` |
//! | 8 | [`Payload::CallAnswer`] | `[bin call id (16), str sdp, str dtls fingerprint]` |
//! | 9 | [`Payload::IceCandidate`] | `[bin call id (16), str candidate, str sdp mid, u16 m-line index]` |
//! | 10 | [`Payload::HangUp`] | `[bin call id (16)]` |
//! | 11 | [`Payload::Busy`] | `[bin call id (16)]` |
//! | 12 | [`Payload::Decline`] | `[bin call id (16)]` |
//! | 13 | [`Payload::AnsweredElsewhere`] | `[bin call id (16), u32 device]` |
//! | 14 | [`Payload::File`] | `[bin blob id (32), bin key (32), u64 size, bin digest (32), str name, str media type, str domain, bin thumbnail or nil]` ([`FileRef`]) |
//! | 15 | [`Payload::SentFile`] | `[str to, [the body of kind 14]]` |
//! | 16 | [`Payload::History`] | `[u32 device, [the body of kind 14]]` |
//! | 17 | [`Payload::Receipt`] | `[u8 state (1 delivered, 2 read), [bin envelope id (16)]]` (at most [`MAX_RECEIPT_IDS`] ids) |
//! | 18 | [`Payload::Typing`] | `[bool on]` |
//! | 19 | [`Payload::Disappearing`] | `[u32 seconds (0: off), str conversation or nil]` |
//!
//! Receipts (kind 17) go from a recipient device to the sender account's devices: "delivered"
//! when the message was decrypted, "read" when the user marked the conversation read; they
//! name the messages by envelope id. They are never answered with a receipt. Typing (kind 18)
//! travels in the ephemeral class. A disappearing-messages timer (kind 19) goes to the peer's
//! devices with no conversation (the conversation is the one with the sender) and to the
//! sender's own other devices naming the peer.
//!
//! Call signaling (kinds 7–13) travels like every other payload: Olm-encrypted and sealed, so
//! the broker never sees an SDP, an ICE candidate or a DTLS fingerprint. The fingerprint in an
//! offer or answer is the sender's DTLS certificate fingerprint (`"sha-256 AB:CD:..."`, as in
//! the SDP's `a=fingerprint`): the receiver checks that the DTLS connection it gets is with
//! that certificate, which binds the media keys to the verified device that sent it.
//!
//! New kinds (delivery tokens, call signaling, receipts, …) take new numbers; a client that
//! meets a kind it does not know gets [`PayloadError::UnknownKind`] and can tell its user to
//! update, instead of failing to decrypt. New fields go at the end of a body, with
//! `#[serde(default)]`, so older bodies still decode.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use zeroize::{Zeroize, Zeroizing};

use super::{attachment::FileRef, decode_exact};

/// A message's place in its sending device's chain to one conversation: its own number `n`
/// (counting up per device and conversation, texts and files alike), and the numbers and
/// envelope ids of the messages of that chain the broker accepted since the previous text
/// (usually one). A recipient that has not received one of those, and has seen this device's
/// chain from before it, knows the broker withheld or has not yet delivered it: the broker
/// assigns the sequence numbers it delivers by, but cannot read or forge these. Envelope ids
/// are random and unique, so they stand for the earlier message as a hash would; the Olm
/// session authenticates everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// This message's number in the chain.
    pub n: u64,
    /// This message's own envelope id. The broker delivers an envelope under an id it could
    /// change; this one it cannot, so the recipient records what it received by it.
    pub id: [u8; 16],
    /// Earlier messages of the chain, at most [`MAX_LINK_PREV`].
    pub prev: Vec<Named>,
}

/// An earlier message a [`Link`] names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    /// Its number in the chain.
    pub n: u64,
    /// Its envelope id.
    pub id: [u8; 16],
    /// When the broker lets it expire (ms since the Unix epoch, sender's clock): after that,
    /// not having it is no sign of anything.
    pub expires_ms: u64,
}

/// Most earlier messages one link names.
pub const MAX_LINK_PREV: usize = 16;

/// A [`Link`] on the wire (in a 1:1 text and in a group text): number, own id, and the named
/// messages as (number, id, expiry).
pub(crate) type LinkFields = (u64, ByteBuf, Vec<(u64, ByteBuf, u64)>);

impl Link {
    /// The wire fields.
    pub(crate) fn to_fields(&self) -> LinkFields {
        (
            self.n,
            ByteBuf::from(self.id.to_vec()),
            self.prev
                .iter()
                .map(|p| (p.n, ByteBuf::from(p.id.to_vec()), p.expires_ms))
                .collect(),
        )
    }

    /// From the wire fields; malformed ones (wrong id lengths, too many names) are refused.
    pub(crate) fn from_fields((n, id, prev): LinkFields) -> Result<Link, PayloadError> {
        if prev.len() > MAX_LINK_PREV {
            return Err(PayloadError::Malformed);
        }
        let prev = prev
            .into_iter()
            .map(|(n, id, expires_ms)| {
                Ok(Named {
                    n,
                    id: id16(&id)?,
                    expires_ms,
                })
            })
            .collect::<Result<Vec<_>, PayloadError>>()?;
        Ok(Link {
            n,
            id: id16(&id)?,
            prev,
        })
    }
}

/// A text body on the wire: a plain string (unlinked, as older clients send it) or the text
/// with its link.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum TextWire {
    Plain(String),
    Linked(String, u64, ByteBuf, Vec<(u64, ByteBuf, u64)>),
}

fn id16(bytes: &[u8]) -> Result<[u8; 16], PayloadError> {
    bytes.try_into().map_err(|_| PayloadError::Malformed)
}

/// Format byte of the payload encoding.
const FORMAT: u8 = 1;

const KIND_TEXT: u16 = 1;
const KIND_DELIVERY_TOKEN: u16 = 2;
const KIND_SENT: u16 = 3;
const KIND_LINK_REQUEST: u16 = 4;
const KIND_LINK_GRANT: u16 = 5;
const KIND_DEVICE_LINKED: u16 = 6;
const KIND_CALL_OFFER: u16 = 7;
const KIND_CALL_ANSWER: u16 = 8;
const KIND_ICE_CANDIDATE: u16 = 9;
const KIND_HANG_UP: u16 = 10;
const KIND_BUSY: u16 = 11;
const KIND_DECLINE: u16 = 12;
const KIND_ANSWERED_ELSEWHERE: u16 = 13;
const KIND_FILE: u16 = 14;
const KIND_SENT_FILE: u16 = 15;
const KIND_HISTORY: u16 = 16;
const KIND_RECEIPT: u16 = 17;
const KIND_TYPING: u16 = 18;
const KIND_DISAPPEARING: u16 = 19;

/// Most message ids in one [`Payload::Receipt`] (more go in several).
pub const MAX_RECEIPT_IDS: usize = 256;

/// What a [`Payload::Receipt`] says of the messages it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReceiptKind {
    /// A device of the recipient decrypted them.
    Delivered,
    /// The recipient marked the conversation read.
    Read,
}

impl ReceiptKind {
    fn to_wire(self) -> u8 {
        match self {
            ReceiptKind::Delivered => 1,
            ReceiptKind::Read => 2,
        }
    }

    fn from_wire(byte: u8) -> Result<Self, PayloadError> {
        match byte {
            1 => Ok(ReceiptKind::Delivered),
            2 => Ok(ReceiptKind::Read),
            _ => Err(PayloadError::Malformed),
        }
    }
}

/// Identifies one call across its signaling messages (random, chosen by the caller).
pub type CallId = [u8; 16];

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
        /// Where it stands in its sending device's chain of messages to this conversation, so
        /// that the recipient notices one the broker withheld (`None`: sent without, by an
        /// older client, or as a retry that lost its place).
        link: Option<Link>,
    },
    /// A file: where its encrypted bytes are, and the key that opens them.
    File {
        /// The attachment.
        file: FileRef,
    },
    /// The account's conversation history, for a device just linked to it (sent by another
    /// of its devices, if its user chose to): an encrypted archive kept as an attachment.
    History {
        /// The device it is for (the account's other devices ignore it).
        device: u32,
        /// The archive.
        file: FileRef,
    },
    /// A transcript of a file sent to `to`, for the sender's own other devices.
    SentFile {
        /// The recipient.
        to: String,
        /// The attachment.
        file: FileRef,
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
    /// Delivery or read receipt for messages of the recipient's conversation with the
    /// receipt's sender, by envelope id. Never answered with a receipt (no loops).
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The envelope ids of the messages (1..=[`MAX_RECEIPT_IDS`]).
        ids: Vec<[u8; 16]>,
    },
    /// The sender is (or stopped) typing in its conversation with the recipient. Sent in the
    /// ephemeral class: lost when nobody is connected, never stored.
    Typing {
        /// Typing now (false: stopped).
        on: bool,
    },
    /// A disappearing-messages timer for a conversation, set by the sender.
    Disappearing {
        /// The timer, seconds; 0 turns it off.
        secs: u32,
        /// The conversation, in a copy for the sender's own other devices (the peer); `None`
        /// in the copy for the peer (the conversation with the sender).
        with: Option<String>,
    },
    /// A call: sent to every device of the callee, which all ring.
    CallOffer {
        /// The call.
        call_id: CallId,
        /// The caller's SDP offer.
        sdp: String,
        /// The caller's DTLS certificate fingerprint (`"sha-256 AB:CD:..."`).
        dtls_fingerprint: String,
        /// Whether the caller offers video (else audio only).
        video: bool,
    },
    /// The callee accepted on one device.
    CallAnswer {
        /// The call.
        call_id: CallId,
        /// The callee's SDP answer.
        sdp: String,
        /// The callee's DTLS certificate fingerprint.
        dtls_fingerprint: String,
    },
    /// One ICE candidate (trickle ICE).
    IceCandidate {
        /// The call.
        call_id: CallId,
        /// The `candidate:` attribute; empty for end-of-candidates.
        candidate: String,
        /// The media stream identification it belongs to.
        sdp_mid: String,
        /// The m-line index it belongs to.
        sdp_m_line_index: u16,
    },
    /// Either side ended the call (or the caller gave up before an answer).
    HangUp {
        /// The call.
        call_id: CallId,
    },
    /// The callee is in another call.
    Busy {
        /// The call.
        call_id: CallId,
    },
    /// The callee declined.
    Decline {
        /// The call.
        call_id: CallId,
    },
    /// To the callee's own other devices: the call was answered (or declined) on `device`;
    /// stop ringing.
    AnsweredElsewhere {
        /// The call.
        call_id: CallId,
        /// The device that answered.
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
struct OfferBody(ByteBuf, String, String, bool);

#[derive(Serialize, Deserialize)]
struct AnswerBody(ByteBuf, String, String);

#[derive(Serialize, Deserialize)]
struct CandidateBody(ByteBuf, String, String, u16);

#[derive(Serialize, Deserialize)]
struct CallIdBody(ByteBuf);

#[derive(Serialize, Deserialize)]
struct ElsewhereBody(ByteBuf, u32);

#[derive(Serialize, Deserialize)]
struct ReceiptBody(u8, Vec<ByteBuf>);

#[derive(Serialize, Deserialize)]
struct TypingBody(bool);

#[derive(Serialize, Deserialize)]
struct DisappearingBody(u32, Option<String>);

fn call_id(bytes: &[u8]) -> Result<CallId, PayloadError> {
    bytes.try_into().map_err(|_| PayloadError::Malformed)
}

fn id_buf(id: &CallId) -> ByteBuf {
    ByteBuf::from(id.to_vec())
}

impl Payload {
    /// Whether this is call signaling between two accounts (offer, answer, candidate,
    /// hang-up, busy, decline); [`Payload::AnsweredElsewhere`] stays within one account.
    pub fn is_call_signal(&self) -> bool {
        matches!(
            self,
            Payload::CallOffer { .. }
                | Payload::CallAnswer { .. }
                | Payload::IceCandidate { .. }
                | Payload::HangUp { .. }
                | Payload::Busy { .. }
                | Payload::Decline { .. }
        )
    }

    /// Encodes as described in the module doc. The bytes may carry secrets (a delivery token,
    /// a link grant): the caller wipes them when done.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Payload::Text { body, link } => {
                let wire = match link {
                    None => TextWire::Plain(body.clone()),
                    Some(link) => {
                        let (n, id, prev) = link.to_fields();
                        TextWire::Linked(body.clone(), n, id, prev)
                    }
                };
                (KIND_TEXT, rmp_serde::to_vec(&wire))
            }
            Payload::File { file } => (KIND_FILE, rmp_serde::to_vec(file)),
            Payload::SentFile { to, file } => (KIND_SENT_FILE, rmp_serde::to_vec(&(to, file))),
            Payload::History { device, file } => (KIND_HISTORY, rmp_serde::to_vec(&(device, file))),
            Payload::DeliveryToken { token } => {
                let mut body = TokenBody(ByteBuf::from(token.to_vec()));
                let encoded = rmp_serde::to_vec(&body);
                body.0.zeroize();
                (KIND_DELIVERY_TOKEN, encoded)
            }
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
            } => {
                let mut body = LinkGrantBody(
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
                );
                let encoded = rmp_serde::to_vec(&body);
                // The copies of the account's secrets made for encoding.
                body.0.zeroize();
                body.1.zeroize();
                for contact in &mut body.2 {
                    if let Some(token) = &mut contact.2 {
                        token.zeroize();
                    }
                }
                (KIND_LINK_GRANT, encoded)
            }
            Payload::DeviceLinked { device } => (
                KIND_DEVICE_LINKED,
                rmp_serde::to_vec(&DeviceLinkedBody(*device)),
            ),
            Payload::CallOffer {
                call_id,
                sdp,
                dtls_fingerprint,
                video,
            } => (
                KIND_CALL_OFFER,
                rmp_serde::to_vec(&OfferBody(
                    id_buf(call_id),
                    sdp.clone(),
                    dtls_fingerprint.clone(),
                    *video,
                )),
            ),
            Payload::CallAnswer {
                call_id,
                sdp,
                dtls_fingerprint,
            } => (
                KIND_CALL_ANSWER,
                rmp_serde::to_vec(&AnswerBody(
                    id_buf(call_id),
                    sdp.clone(),
                    dtls_fingerprint.clone(),
                )),
            ),
            Payload::IceCandidate {
                call_id,
                candidate,
                sdp_mid,
                sdp_m_line_index,
            } => (
                KIND_ICE_CANDIDATE,
                rmp_serde::to_vec(&CandidateBody(
                    id_buf(call_id),
                    candidate.clone(),
                    sdp_mid.clone(),
                    *sdp_m_line_index,
                )),
            ),
            Payload::HangUp { call_id } => (
                KIND_HANG_UP,
                rmp_serde::to_vec(&CallIdBody(id_buf(call_id))),
            ),
            Payload::Busy { call_id } => {
                (KIND_BUSY, rmp_serde::to_vec(&CallIdBody(id_buf(call_id))))
            }
            Payload::Decline { call_id } => (
                KIND_DECLINE,
                rmp_serde::to_vec(&CallIdBody(id_buf(call_id))),
            ),
            Payload::AnsweredElsewhere { call_id, device } => (
                KIND_ANSWERED_ELSEWHERE,
                rmp_serde::to_vec(&ElsewhereBody(id_buf(call_id), *device)),
            ),
            Payload::Receipt { kind, ids } => (
                KIND_RECEIPT,
                rmp_serde::to_vec(&ReceiptBody(
                    kind.to_wire(),
                    ids.iter().map(|id| ByteBuf::from(id.to_vec())).collect(),
                )),
            ),
            Payload::Typing { on } => (KIND_TYPING, rmp_serde::to_vec(&TypingBody(*on))),
            Payload::Disappearing { secs, with } => (
                KIND_DISAPPEARING,
                rmp_serde::to_vec(&DisappearingBody(*secs, with.clone())),
            ),
        };
        let body = Zeroizing::new(body.expect("payload bodies always encode"));
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
            KIND_TEXT => match decode_exact(body).ok_or(PayloadError::Malformed)? {
                TextWire::Plain(body) => Ok(Payload::Text { body, link: None }),
                TextWire::Linked(body, n, id, prev) => Ok(Payload::Text {
                    body,
                    link: Some(Link::from_fields((n, id, prev))?),
                }),
            },
            KIND_FILE => {
                let file: FileRef = decode_exact(body).ok_or(PayloadError::Malformed)?;
                file.file_key().map_err(|_| PayloadError::Malformed)?;
                Ok(Payload::File { file })
            }
            KIND_SENT_FILE => {
                let (to, file): (String, FileRef) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                file.file_key().map_err(|_| PayloadError::Malformed)?;
                Ok(Payload::SentFile { to, file })
            }
            KIND_HISTORY => {
                let (device, file): (u32, FileRef) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                file.file_key().map_err(|_| PayloadError::Malformed)?;
                Ok(Payload::History { device, file })
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
            KIND_CALL_OFFER => {
                let OfferBody(id, sdp, dtls_fingerprint, video) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::CallOffer {
                    call_id: call_id(&id)?,
                    sdp,
                    dtls_fingerprint,
                    video,
                })
            }
            KIND_CALL_ANSWER => {
                let AnswerBody(id, sdp, dtls_fingerprint) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::CallAnswer {
                    call_id: call_id(&id)?,
                    sdp,
                    dtls_fingerprint,
                })
            }
            KIND_ICE_CANDIDATE => {
                let CandidateBody(id, candidate, sdp_mid, sdp_m_line_index) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::IceCandidate {
                    call_id: call_id(&id)?,
                    candidate,
                    sdp_mid,
                    sdp_m_line_index,
                })
            }
            KIND_HANG_UP | KIND_BUSY | KIND_DECLINE => {
                let CallIdBody(id) = decode_exact(body).ok_or(PayloadError::Malformed)?;
                let call_id = call_id(&id)?;
                Ok(match u16::from_be_bytes(*kind) {
                    KIND_HANG_UP => Payload::HangUp { call_id },
                    KIND_BUSY => Payload::Busy { call_id },
                    _ => Payload::Decline { call_id },
                })
            }
            KIND_ANSWERED_ELSEWHERE => {
                let ElsewhereBody(id, device) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::AnsweredElsewhere {
                    call_id: call_id(&id)?,
                    device,
                })
            }
            KIND_RECEIPT => {
                let ReceiptBody(kind, ids) = decode_exact(body).ok_or(PayloadError::Malformed)?;
                if ids.is_empty() || ids.len() > MAX_RECEIPT_IDS {
                    return Err(PayloadError::Malformed);
                }
                Ok(Payload::Receipt {
                    kind: ReceiptKind::from_wire(kind)?,
                    ids: ids
                        .iter()
                        .map(|id| <[u8; 16]>::try_from(id.as_slice()))
                        .collect::<Result<_, _>>()
                        .map_err(|_| PayloadError::Malformed)?,
                })
            }
            KIND_TYPING => {
                let TypingBody(on) = decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::Typing { on })
            }
            KIND_DISAPPEARING => {
                let DisappearingBody(secs, with) =
                    decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::Disappearing { secs, with })
            }
            other => Err(PayloadError::UnknownKind(other)),
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Text { body, .. } => f
                .debug_struct("Text")
                .field("body_len", &body.len())
                .finish_non_exhaustive(),
            Payload::DeliveryToken { .. } => {
                f.debug_struct("DeliveryToken").finish_non_exhaustive()
            }
            Payload::File { file }
            | Payload::SentFile { file, .. }
            | Payload::History { file, .. } => f
                .debug_struct("File")
                .field("file", file)
                .finish_non_exhaustive(),
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
            // Call ids, SDPs and candidates are not shown: they name addresses and keys.
            Payload::CallOffer { sdp, .. } => f
                .debug_struct("CallOffer")
                .field("sdp_len", &sdp.len())
                .finish_non_exhaustive(),
            Payload::CallAnswer { sdp, .. } => f
                .debug_struct("CallAnswer")
                .field("sdp_len", &sdp.len())
                .finish_non_exhaustive(),
            Payload::IceCandidate { .. } => f.debug_struct("IceCandidate").finish_non_exhaustive(),
            Payload::HangUp { .. } => f.debug_struct("HangUp").finish_non_exhaustive(),
            Payload::Busy { .. } => f.debug_struct("Busy").finish_non_exhaustive(),
            Payload::Decline { .. } => f.debug_struct("Decline").finish_non_exhaustive(),
            Payload::AnsweredElsewhere { device, .. } => f
                .debug_struct("AnsweredElsewhere")
                .field("device", device)
                .finish_non_exhaustive(),
            Payload::Receipt { kind, ids } => f
                .debug_struct("Receipt")
                .field("kind", kind)
                .field("ids", &ids.len())
                .finish(),
            Payload::Typing { on } => f.debug_struct("Typing").field("on", on).finish(),
            Payload::Disappearing { secs, .. } => f
                .debug_struct("Disappearing")
                .field("secs", secs)
                .finish_non_exhaustive(),
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
            link: None,
        };
        let bytes = payload.encode();
        assert_eq!(&bytes[..3], &[1, 0, 1]);
        assert_eq!(Payload::decode(&bytes), Ok(payload));
    }

    #[test]
    fn a_linked_text_round_trips_and_an_unlinked_one_keeps_the_old_encoding() {
        let named = |n, b| Named {
            n,
            id: [b; 16],
            expires_ms: 1_000 + n,
        };
        let linked = Payload::Text {
            body: "see you".into(),
            link: Some(Link {
                n: 7,
                id: [7; 16],
                prev: vec![named(5, 1), named(6, 2)],
            }),
        };
        assert_eq!(Payload::decode(&linked.encode()), Ok(linked));
        // An older client's text (a plain string body) decodes as unlinked.
        let mut old = vec![1, 0, 1];
        old.extend(rmp_serde::to_vec(&"hi").expect("encodes"));
        assert_eq!(
            Payload::decode(&old),
            Ok(Payload::Text {
                body: "hi".into(),
                link: None
            })
        );
        // A link naming an id of the wrong length, or too many, is malformed.
        let id = ByteBuf::from(vec![0u8; 16]);
        let mut bad = vec![1, 0, 1];
        let prev = vec![(1u64, ByteBuf::from(vec![0u8; 15]), 0u64)];
        bad.extend(rmp_serde::to_vec(&("x", 2u64, &id, prev)).expect("encodes"));
        assert_eq!(Payload::decode(&bad), Err(PayloadError::Malformed));
        let mut many = vec![1, 0, 1];
        let prev: Vec<(u64, ByteBuf, u64)> = (0..=MAX_LINK_PREV as u64)
            .map(|n| (n, ByteBuf::from(vec![0u8; 16]), 0))
            .collect();
        many.extend(rmp_serde::to_vec(&("x", 99u64, &id, prev)).expect("encodes"));
        assert_eq!(Payload::decode(&many), Err(PayloadError::Malformed));
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
    fn call_kinds_round_trip_and_hide_their_content() {
        let id = [0xab; 16];
        let payloads = [
            Payload::CallOffer {
                call_id: id,
                sdp: "v=0 canary-sdp 192.0.2.7".into(),
                dtls_fingerprint: "sha-256 AA:BB".into(),
                video: true,
            },
            Payload::CallAnswer {
                call_id: id,
                sdp: "v=0 canary-sdp".into(),
                dtls_fingerprint: "sha-256 CC:DD".into(),
            },
            Payload::IceCandidate {
                call_id: id,
                candidate: "candidate:1 1 udp 2122260223 192.0.2.7 5000 typ host".into(),
                sdp_mid: "0".into(),
                sdp_m_line_index: 1,
            },
            Payload::HangUp { call_id: id },
            Payload::Busy { call_id: id },
            Payload::Decline { call_id: id },
            Payload::AnsweredElsewhere {
                call_id: id,
                device: 2,
            },
        ];
        for (kind, payload) in (7u16..).zip(payloads) {
            let bytes = payload.encode();
            assert_eq!(&bytes[1..3], &kind.to_be_bytes());
            assert_eq!(Payload::decode(&bytes), Ok(payload.clone()));
            let shown = format!("{payload:?}");
            assert!(
                !shown.contains("canary") && !shown.contains("192.0.2") && !shown.contains("AA"),
                "{shown}"
            );
        }
        // A call id of the wrong length is malformed.
        let mut bad = vec![1, 0, 10];
        bad.extend(rmp_serde::to_vec(&CallIdBody(ByteBuf::from(vec![1; 15]))).unwrap());
        assert_eq!(Payload::decode(&bad), Err(PayloadError::Malformed));
    }

    #[test]
    fn file_kinds_round_trip_hide_their_key_and_need_one() {
        let file = FileRef {
            id: ByteBuf::from(vec![1; 32]),
            key: ByteBuf::from(vec![2; 32]),
            size: 1234,
            digest: ByteBuf::from(vec![3; 32]),
            name: "canary-name.jpg".into(),
            media_type: "image/jpeg".into(),
            domain: "a.example".into(),
            thumbnail: Some(ByteBuf::from(vec![9; 40])),
        };
        for payload in [
            Payload::File { file: file.clone() },
            Payload::SentFile {
                to: "bob@b.example".into(),
                file: file.clone(),
            },
            Payload::History {
                device: 2,
                file: file.clone(),
            },
        ] {
            assert_eq!(Payload::decode(&payload.encode()).unwrap(), payload);
            let shown = format!("{payload:?}");
            assert!(
                !shown.contains("canary") && !shown.contains("2, 2"),
                "{shown}"
            );
        }
        let keyless = Payload::File {
            file: FileRef {
                key: ByteBuf::from(vec![2; 5]),
                ..file
            },
        };
        assert_eq!(
            Payload::decode(&keyless.encode()),
            Err(PayloadError::Malformed)
        );
    }

    #[test]
    fn receipt_typing_and_timer_kinds_round_trip() {
        let payloads = [
            Payload::Receipt {
                kind: ReceiptKind::Delivered,
                ids: vec![[1; 16], [2; 16]],
            },
            Payload::Typing { on: true },
            Payload::Disappearing {
                secs: 3600,
                with: Some("bob@b.example".into()),
            },
        ];
        for (kind, payload) in (17u16..).zip(payloads) {
            let bytes = payload.encode();
            assert_eq!(&bytes[1..3], &kind.to_be_bytes());
            assert_eq!(Payload::decode(&bytes), Ok(payload.clone()));
            assert!(!format!("{payload:?}").contains("bob"));
        }
        let read = Payload::Receipt {
            kind: ReceiptKind::Read,
            ids: vec![[3; 16]],
        };
        assert_eq!(Payload::decode(&read.encode()), Ok(read));
        // No ids, too many, an id of the wrong length or an unknown state: malformed.
        for body in [
            ReceiptBody(1, vec![]),
            ReceiptBody(1, vec![ByteBuf::from(vec![0; 16]); MAX_RECEIPT_IDS + 1]),
            ReceiptBody(1, vec![ByteBuf::from(vec![0; 15])]),
            ReceiptBody(9, vec![ByteBuf::from(vec![0; 16])]),
        ] {
            let mut bad = vec![1, 0, 17];
            bad.extend(rmp_serde::to_vec(&body).unwrap());
            assert_eq!(Payload::decode(&bad), Err(PayloadError::Malformed));
        }
    }

    #[test]
    fn debug_hides_content() {
        let payload = Payload::Text {
            body: "canary-secret".into(),
            link: None,
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
            Payload::decode(&[1, 0, 99, 0x90]),
            Err(PayloadError::UnknownKind(99))
        );
        assert_eq!(
            Payload::decode(&[1, 0, 1, 0xc1]),
            Err(PayloadError::Malformed)
        );
        let mut trailing = Payload::Text {
            body: "x".into(),
            link: None,
        }
        .encode();
        trailing.push(0);
        assert_eq!(Payload::decode(&trailing), Err(PayloadError::Malformed));
    }
}
