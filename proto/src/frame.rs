//! The device protocol: frames exchanged over a WebSocket connection as binary messages.
//!
//! # Byte layout
//!
//! Every frame, in both directions, is one WebSocket binary message:
//!
//! ```text
//! +---------+--------+-----------------------------------------------+
//! | version | kind   | body                                          |
//! | u8 = 1  | u8     | MessagePack, structs as positional arrays     |
//! +---------+--------+-----------------------------------------------+
//! ```
//!
//! Bodies are encoded with `rmp_serde::to_vec` (arrays, not maps: field names are not sent), byte
//! fields as MessagePack `bin`. A decoder rejects unknown versions and kinds, bodies that do not
//! match the kind's schema, and trailing bytes. Kinds `0x01..=0x7f` go from device to broker,
//! `0x81..=0xff` from broker to device:
//!
//! | kind | frame            | body fields, in order                                   |
//! |------|------------------|---------------------------------------------------------|
//! | 0x01 | `auth`           | user (str), device (u32), ticket or token (bin 32)      |
//! | 0x02 | `send`           | id (bin 16), to (str), class (u8), ttl_secs (u32), copies ([[device u32, ciphertext bin]]) |
//! | 0x03 | `ack`            | seqs ([u64])                                            |
//! | 0x04 | `sealed_send`    | as `send`, then delivery_token (bin 32 or nil)          |
//! | 0x05 | `group_send`     | id (bin 16), class (u8), ttl_secs (u32), ciphertext (bin), recipients ([[to str, devices [u32], delivery_token bin or nil]]), order (nil or [group bin 16..=32, epoch u64, hub str]) |
//! | 0x81 | `auth_ok`        | user (str), device (u32), server_time_ms (u64)          |
//! | 0x82 | `send_result`    | id (bin 16), code (u16, 0 = accepted), duplicate (bool), current_devices ([u32]) |
//! | 0x83 | `deliver`        | seq (u64), envelope [id bin 16, class u8, accepted_ms u64, expires_ms u64, ciphertext bin] |
//! | 0x84 | `deliver_ephemeral` | envelope (as in `deliver`)                           |
//! | 0x85 | `queue_empty`    | (empty array)                                           |
//! | 0x86 | `notice`         | kind (u16: 1 mailbox_full, 2 keys_low, 3 key_packages_low), device (u32) |
//! | 0x87 | `error`          | code (u16), message (str), seq (u64 or nil)             |
//! | 0x88 | `group_send_result` | id (bin 16), code (u16, 0 = handed to every recipient not listed), refused ([[to str, code u16, current_devices [u32]]]), epoch (u64 or nil) |
//! | 0x8f | `batch`          | frames ([bin]): each a whole broker-to-device frame above, never a `batch` |
//!
//! `batch` goes only to a device that asked for it when it connected (`/v1/ws?batch=1`; an
//! older client does not, and gets every frame as its own message): frames the broker has ready
//! for the device at once (a backlog, a burst) travel as one message, in order, at most
//! [`MAX_BATCH_FRAMES`](crate::limits::MAX_BATCH_FRAMES) of them.
//! [`ServerFrame::decode_all`] reads a message of either kind.
//!
//! `sealed_send` is the only frame accepted on the anonymous endpoint (`/v1/sealed`), and it is
//! accepted only there: it is not tied to any account, and the recipient's delivery token (or
//! its choice to accept sealed envelopes from anyone) is what admits it. On the authenticated
//! `/v1/ws` it is refused with `wrong_endpoint`, since that connection names its sender.
//!
//! `group_send` carries one ciphertext for many recipients (an MLS group message): the broker
//! stores one copy per listed device, recipient by recipient, each with the guarantees of a
//! `send` to that recipient under the same id. It is accepted on both endpoints: on `/v1/sealed`
//! each recipient is admitted by its own delivery token, on `/v1/ws` by the authenticated
//! sender (the tokens are then ignored). `order`, for MLS handshake messages (Commits), asks
//! the group's hub broker to take `epoch` for this send first: the first send of an epoch wins,
//! any other is refused `stale_epoch` with the group's current epoch. Its answer,
//! `group_send_result`, lists the recipients that were refused and why (a stale device set
//! with the current devices, as for `send`); every other recipient has it durably.
//!
//! Keep-alive uses WebSocket ping/pong control frames, not protocol frames.
//!
//! An envelope names its recipient device (by being in that device's queue) and nothing about
//! its sender: the sender identity, if any, is inside the ciphertext.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::{
    codec::{self, body},
    error::{DecodeError, ErrorCode},
    ids::{DeviceId, EnvelopeId},
    limits::MAX_FRAME_BYTES,
};

/// The protocol version this build speaks; the first byte of every frame.
pub const PROTOCOL_VERSION: u8 = 1;

/// Delivery class of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Class {
    /// Stored until acknowledged or expired (days). The default for messages.
    Durable = 0,
    /// Delivered only to connected devices and never written to disk (typing, presence).
    Ephemeral = 1,
    /// Stored with a short time-to-live (call ringing), so a device that wakes in time rings.
    Urgent = 2,
}

impl Serialize for Class {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(*self as u8)
    }
}

impl<'de> Deserialize<'de> for Class {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            0 => Ok(Class::Durable),
            1 => Ok(Class::Ephemeral),
            2 => Ok(Class::Urgent),
            other => Err(serde::de::Error::custom(format_args!(
                "unknown class {other}"
            ))),
        }
    }
}

/// One copy of an envelope: the ciphertext for one recipient device.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copy {
    /// The recipient device.
    pub device: DeviceId,
    /// Opaque ciphertext for that device.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Copy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print ciphertext; its size is all a log may hold.
        f.debug_struct("Copy")
            .field("device", &self.device)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// One recipient of a `group_send`: an account, the devices that get the ciphertext, and (on
/// `/v1/sealed`) the token that admits it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecipient {
    /// Recipient account handle.
    pub to: String,
    /// Its devices that get a copy: every current one (else `stale_devices`).
    pub devices: Vec<DeviceId>,
    /// The recipient's delivery token (sealed sends), or `None`.
    #[serde(with = "serde_bytes")]
    pub delivery_token: Option<Vec<u8>>,
}

impl std::fmt::Debug for GroupRecipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret and the handle a recipient: a count is all a log may hold.
        f.debug_struct("GroupRecipient")
            .field("devices", &self.devices.len())
            .field("token", &self.delivery_token.is_some())
            .finish_non_exhaustive()
    }
}

/// What a handshake message (an MLS Commit) asks of its group's hub: to take `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The group's id as the broker sees it: random, 16 to 32 bytes.
    #[serde(with = "serde_bytes")]
    pub group: Vec<u8>,
    /// The epoch this Commit moves the group from (the group's current epoch at its hub).
    pub epoch: u64,
    /// The group's hub: the domain whose broker orders its Commits.
    pub hub: String,
}

/// A recipient of a `group_send` that was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRefusal {
    /// The recipient.
    pub to: String,
    /// Why.
    pub code: ErrorCode,
    /// With `stale_devices`: its current devices.
    pub current_devices: Vec<DeviceId>,
}

/// An envelope as delivered to a device.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's envelope id, for client-side deduplication.
    pub id: EnvelopeId,
    /// The class it was sent with.
    pub class: Class,
    /// When the broker accepted it, in milliseconds since the Unix epoch.
    pub accepted_ms: u64,
    /// When it expires, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// Opaque ciphertext for the receiving device.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("class", &self.class)
            .field("accepted_ms", &self.accepted_ms)
            .field("expires_ms", &self.expires_ms)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// A frame from a device to the broker.
#[derive(Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Authenticate the connection as `device` of `user`. Must be the first frame.
    Auth {
        /// The account handle (validated by the broker, which answers `bad_token` if invalid).
        user: String,
        /// The device id.
        device: DeviceId,
        /// A one-time session ticket for the device (`POST …/session-ticket`), or the
        /// device's 256-bit auth token itself (older clients: it then stays in the broker's
        /// connection buffers for as long as the connection is open).
        token: Vec<u8>,
    },
    /// Send one envelope to every current device of `to`.
    Send {
        /// Client-chosen id; a retry with the same id returns the first result.
        id: EnvelopeId,
        /// Recipient account handle.
        to: String,
        /// Delivery class.
        class: Class,
        /// Time-to-live in seconds.
        ttl_secs: u32,
        /// One ciphertext per recipient device.
        copies: Vec<Copy>,
    },
    /// Send a sealed envelope over an anonymous connection: nothing in it names the sender.
    SealedSend {
        /// Client-chosen id; a retry with the same id returns the first result.
        id: EnvelopeId,
        /// Recipient account handle.
        to: String,
        /// Delivery class.
        class: Class,
        /// Time-to-live in seconds.
        ttl_secs: u32,
        /// One sealed ciphertext per recipient device.
        copies: Vec<Copy>,
        /// The recipient's delivery token, as handed to its contacts; `None` for recipients
        /// that accept sealed envelopes from anyone.
        delivery_token: Option<Vec<u8>>,
    },
    /// Send one ciphertext to many recipients (an MLS group message).
    GroupSend {
        /// Client-chosen id; a retry with the same id is deduplicated per recipient.
        id: EnvelopeId,
        /// Delivery class.
        class: Class,
        /// Time-to-live in seconds.
        ttl_secs: u32,
        /// The ciphertext every listed device receives.
        ciphertext: Vec<u8>,
        /// Who gets it, each recipient once.
        recipients: Vec<GroupRecipient>,
        /// For a handshake message (a Commit): the epoch it must take at the group's hub.
        order: Option<Order>,
    },
    /// Acknowledge delivered envelopes by sequence number; the broker deletes them.
    Ack {
        /// Sequence numbers of this device's queue.
        seqs: Vec<u64>,
    },
}

impl std::fmt::Debug for ClientFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The token is a secret: never printed.
            ClientFrame::Auth { device, .. } => f
                .debug_struct("Auth")
                .field("device", device)
                .finish_non_exhaustive(),
            ClientFrame::Send {
                id,
                class,
                ttl_secs,
                copies,
                ..
            } => f
                .debug_struct("Send")
                .field("id", id)
                .field("class", class)
                .field("ttl_secs", ttl_secs)
                .field("copies", copies)
                .finish_non_exhaustive(),
            ClientFrame::SealedSend {
                id,
                class,
                ttl_secs,
                copies,
                ..
            } => f
                .debug_struct("SealedSend")
                .field("id", id)
                .field("class", class)
                .field("ttl_secs", ttl_secs)
                .field("copies", copies)
                .finish_non_exhaustive(),
            ClientFrame::GroupSend {
                id,
                class,
                ttl_secs,
                ciphertext,
                recipients,
                order,
            } => f
                .debug_struct("GroupSend")
                .field("id", id)
                .field("class", class)
                .field("ttl_secs", ttl_secs)
                .field("ciphertext_len", &ciphertext.len())
                .field("recipients", &recipients.len())
                .field("ordered", &order.is_some())
                .finish(),
            ClientFrame::Ack { seqs } => f.debug_struct("Ack").field("seqs", &seqs.len()).finish(),
        }
    }
}

/// Result of a send, as carried by [`ServerFrame::SendResult`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Durable in every recipient device's queue (or handed to connected devices, for the
    /// ephemeral class).
    Accepted {
        /// True when this id had already been accepted: nothing new was stored.
        duplicate: bool,
    },
    /// Refused; nothing was stored.
    Rejected {
        /// Why.
        code: ErrorCode,
        /// For [`ErrorCode::StaleDevices`]: the recipient's current device ids.
        current_devices: Vec<DeviceId>,
    },
}

/// Broker notices that are not answers to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Notice {
    /// A sender was refused because this device's queue is at its quota: drain it.
    MailboxFull = 1,
    /// This device's one-time keys are running low: upload more.
    KeysLow = 2,
    /// This device's one-time MLS KeyPackages are running low: upload more. Sent only to a
    /// device that published KeyPackages.
    KeyPackagesLow = 3,
}

/// A frame from the broker to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// Authentication succeeded.
    AuthOk {
        /// The authenticated account.
        user: String,
        /// The authenticated device.
        device: DeviceId,
        /// The broker's clock, in milliseconds since the Unix epoch.
        server_time_ms: u64,
    },
    /// The answer to a `send`.
    SendResult {
        /// The envelope id of the send.
        id: EnvelopeId,
        /// What happened.
        outcome: SendOutcome,
    },
    /// A stored envelope, with this device's gap-free sequence number. Ack it when handled.
    Deliver {
        /// Position in this device's queue.
        seq: u64,
        /// The envelope.
        envelope: Envelope,
    },
    /// An ephemeral envelope: not stored, not acknowledged.
    DeliverEphemeral {
        /// The envelope.
        envelope: Envelope,
    },
    /// Everything queued when the device connected has been delivered.
    QueueEmpty,
    /// A notice about this device's queue.
    Notice {
        /// What happened.
        notice: Notice,
        /// The device concerned.
        device: DeviceId,
    },
    /// The answer to a `group_send`.
    GroupSendResult {
        /// The envelope id of the send.
        id: EnvelopeId,
        /// `None`: every recipient not in `refused` has it durably. Otherwise nobody does
        /// (the whole send was refused: a bad field, `stale_epoch`, …).
        code: Option<ErrorCode>,
        /// Recipients that were refused, with why.
        refused: Vec<RecipientRefusal>,
        /// With `stale_epoch`: the group's current epoch at its hub.
        epoch: Option<u64>,
    },
    /// A request failed or the protocol was violated.
    Error {
        /// Stable error code.
        code: ErrorCode,
        /// Human-readable detail; never contains user content.
        message: String,
        /// The sequence number concerned, for ack errors.
        seq: Option<u64>,
    },
}

// Frame kinds (the second byte).
const AUTH: u8 = 0x01;
const SEND: u8 = 0x02;
const ACK: u8 = 0x03;
const SEALED_SEND: u8 = 0x04;
const GROUP_SEND: u8 = 0x05;
const AUTH_OK: u8 = 0x81;
const SEND_RESULT: u8 = 0x82;
const DELIVER: u8 = 0x83;
const DELIVER_EPHEMERAL: u8 = 0x84;
const QUEUE_EMPTY: u8 = 0x85;
const NOTICE: u8 = 0x86;
const ERROR: u8 = 0x87;
const GROUP_SEND_RESULT: u8 = 0x88;
const BATCH: u8 = 0x8f;

// Wire bodies: private, positional, decoupled from the public enums above.

#[derive(Serialize, Deserialize)]
struct AuthBody(String, DeviceId, ByteBuf);

#[derive(Serialize, Deserialize)]
struct SendBody(EnvelopeId, String, Class, u32, Vec<Copy>);

#[derive(Serialize, Deserialize)]
struct SealedSendBody(EnvelopeId, String, Class, u32, Vec<Copy>, Option<ByteBuf>);

#[derive(Serialize, Deserialize)]
struct GroupSendBody(
    EnvelopeId,
    Class,
    u32,
    ByteBuf,
    Vec<GroupRecipient>,
    Option<Order>,
);

#[derive(Serialize, Deserialize)]
struct GroupSendResultBody(EnvelopeId, u16, Vec<RefusalBody>, Option<u64>);

#[derive(Serialize, Deserialize)]
struct RefusalBody(String, u16, Vec<DeviceId>);

#[derive(Serialize, Deserialize)]
struct AckBody {
    seqs: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct AuthOkBody(String, DeviceId, u64);

#[derive(Serialize, Deserialize)]
struct SendResultBody(EnvelopeId, u16, bool, Vec<DeviceId>);

#[derive(Serialize, Deserialize)]
struct DeliverBody(u64, Envelope);

#[derive(Serialize, Deserialize)]
struct DeliverEphemeralBody {
    envelope: Envelope,
}

#[derive(Serialize, Deserialize)]
struct EmptyBody();

#[derive(Serialize, Deserialize)]
struct NoticeBody(u16, DeviceId);

#[derive(Serialize, Deserialize)]
struct ErrorBody(u16, String, Option<u64>);

fn encode<T: Serialize>(kind: u8, body: &T) -> Vec<u8> {
    codec::encode(PROTOCOL_VERSION, kind, body)
}

fn header(bytes: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    codec::header(bytes, PROTOCOL_VERSION, MAX_FRAME_BYTES)
}

impl ClientFrame {
    /// Encodes the frame into one WebSocket binary message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ClientFrame::Auth {
                user,
                device,
                token,
            } => encode(
                AUTH,
                &AuthBody(user.clone(), *device, ByteBuf::from(token.clone())),
            ),
            ClientFrame::Send {
                id,
                to,
                class,
                ttl_secs,
                copies,
            } => encode(
                SEND,
                &SendBody(*id, to.clone(), *class, *ttl_secs, copies.clone()),
            ),
            ClientFrame::SealedSend {
                id,
                to,
                class,
                ttl_secs,
                copies,
                delivery_token,
            } => encode(
                SEALED_SEND,
                &SealedSendBody(
                    *id,
                    to.clone(),
                    *class,
                    *ttl_secs,
                    copies.clone(),
                    delivery_token.clone().map(ByteBuf::from),
                ),
            ),
            ClientFrame::GroupSend {
                id,
                class,
                ttl_secs,
                ciphertext,
                recipients,
                order,
            } => encode(
                GROUP_SEND,
                &GroupSendBody(
                    *id,
                    *class,
                    *ttl_secs,
                    ByteBuf::from(ciphertext.clone()),
                    recipients.clone(),
                    order.clone(),
                ),
            ),
            ClientFrame::Ack { seqs } => encode(ACK, &AckBody { seqs: seqs.clone() }),
        }
    }

    /// Decodes one WebSocket binary message received from a device.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (kind, rest) = header(bytes)?;
        Ok(match kind {
            AUTH => {
                let AuthBody(user, device, token) = body(rest)?;
                ClientFrame::Auth {
                    user,
                    device,
                    token: token.into_vec(),
                }
            }
            SEND => {
                let SendBody(id, to, class, ttl_secs, copies) = body(rest)?;
                ClientFrame::Send {
                    id,
                    to,
                    class,
                    ttl_secs,
                    copies,
                }
            }
            SEALED_SEND => {
                let SealedSendBody(id, to, class, ttl_secs, copies, token) = body(rest)?;
                ClientFrame::SealedSend {
                    id,
                    to,
                    class,
                    ttl_secs,
                    copies,
                    delivery_token: token.map(ByteBuf::into_vec),
                }
            }
            GROUP_SEND => {
                let GroupSendBody(id, class, ttl_secs, ciphertext, recipients, order) = body(rest)?;
                if let Some(order) = &order
                    && !(16..=32).contains(&order.group.len())
                {
                    return Err(DecodeError::Malformed(
                        "group id must be 16..=32 bytes".into(),
                    ));
                }
                ClientFrame::GroupSend {
                    id,
                    class,
                    ttl_secs,
                    ciphertext: ciphertext.into_vec(),
                    recipients,
                    order,
                }
            }
            ACK => {
                let AckBody { seqs } = body(rest)?;
                ClientFrame::Ack { seqs }
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        })
    }
}

impl ServerFrame {
    /// Encodes the frame into one WebSocket binary message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ServerFrame::AuthOk {
                user,
                device,
                server_time_ms,
            } => encode(AUTH_OK, &AuthOkBody(user.clone(), *device, *server_time_ms)),
            ServerFrame::SendResult { id, outcome } => {
                let body = match outcome {
                    SendOutcome::Accepted { duplicate } => {
                        SendResultBody(*id, 0, *duplicate, Vec::new())
                    }
                    SendOutcome::Rejected {
                        code,
                        current_devices,
                    } => SendResultBody(*id, code.as_u16(), false, current_devices.clone()),
                };
                encode(SEND_RESULT, &body)
            }
            ServerFrame::Deliver { seq, envelope } => {
                encode(DELIVER, &DeliverBody(*seq, envelope.clone()))
            }
            ServerFrame::DeliverEphemeral { envelope } => encode(
                DELIVER_EPHEMERAL,
                &DeliverEphemeralBody {
                    envelope: envelope.clone(),
                },
            ),
            ServerFrame::QueueEmpty => encode(QUEUE_EMPTY, &EmptyBody()),
            ServerFrame::Notice { notice, device } => {
                encode(NOTICE, &NoticeBody(*notice as u16, *device))
            }
            ServerFrame::Error { code, message, seq } => {
                encode(ERROR, &ErrorBody(code.as_u16(), message.clone(), *seq))
            }
            ServerFrame::GroupSendResult {
                id,
                code,
                refused,
                epoch,
            } => {
                let refused = refused
                    .iter()
                    .map(|r| RefusalBody(r.to.clone(), r.code.as_u16(), r.current_devices.clone()))
                    .collect();
                encode(
                    GROUP_SEND_RESULT,
                    &GroupSendResultBody(*id, code.map_or(0, ErrorCode::as_u16), refused, *epoch),
                )
            }
        }
    }

    /// Encodes a `deliver` frame without cloning the envelope (the broker's hot path).
    pub fn encode_deliver(seq: u64, envelope: &Envelope) -> Vec<u8> {
        #[derive(Serialize)]
        struct DeliverRef<'a>(u64, &'a Envelope);
        encode(DELIVER, &DeliverRef(seq, envelope))
    }

    /// One `batch` message holding `frames` (each already encoded, in order; none a batch).
    pub fn encode_batch<F: AsRef<[u8]>>(frames: &[F]) -> Vec<u8> {
        let frames: Vec<&serde_bytes::Bytes> = frames
            .iter()
            .map(|f| serde_bytes::Bytes::new(f.as_ref()))
            .collect();
        encode(BATCH, &frames)
    }

    /// Decodes a WebSocket binary message received from the broker: a `batch` into its frames,
    /// any other frame into itself alone.
    pub fn decode_all(bytes: &[u8]) -> Result<Vec<Self>, DecodeError> {
        Self::unbatch(bytes)?
            .iter()
            .map(|frame| Self::decode(frame))
            .collect()
    }

    /// The frames of a WebSocket binary message received from the broker, still encoded: a
    /// `batch`'s frames, or the message itself. For clients that hand each frame on as bytes
    /// (the browser's page gives them to its engine one at a time).
    pub fn unbatch(bytes: &[u8]) -> Result<Vec<Cow<'_, [u8]>>, DecodeError> {
        let (kind, rest) = header(bytes)?;
        if kind != BATCH {
            return Ok(vec![Cow::Borrowed(bytes)]);
        }
        let frames: Vec<ByteBuf> = body(rest)?;
        if frames.is_empty() || frames.len() > crate::limits::MAX_BATCH_FRAMES {
            return Err(DecodeError::Malformed(format!(
                "a batch holds 1..={} frames, not {}",
                crate::limits::MAX_BATCH_FRAMES,
                frames.len()
            )));
        }
        // Nested batches are refused here, not left to `decode`: a caller may only split.
        if frames.iter().any(|f| f.get(1) == Some(&BATCH)) {
            return Err(DecodeError::Malformed("a batch inside a batch".into()));
        }
        Ok(frames
            .into_iter()
            .map(|f| Cow::Owned(f.into_vec()))
            .collect())
    }

    /// Decodes one WebSocket binary message received from the broker.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (kind, rest) = header(bytes)?;
        let unknown_code = |c: u16| DecodeError::Malformed(format!("unknown error code {c}"));
        Ok(match kind {
            AUTH_OK => {
                let AuthOkBody(user, device, server_time_ms) = body(rest)?;
                ServerFrame::AuthOk {
                    user,
                    device,
                    server_time_ms,
                }
            }
            SEND_RESULT => {
                let SendResultBody(id, code, duplicate, current_devices) = body(rest)?;
                let outcome = if code == 0 {
                    SendOutcome::Accepted { duplicate }
                } else {
                    let code = ErrorCode::from_u16(code).ok_or_else(|| unknown_code(code))?;
                    SendOutcome::Rejected {
                        code,
                        current_devices,
                    }
                };
                ServerFrame::SendResult { id, outcome }
            }
            DELIVER => {
                let DeliverBody(seq, envelope) = body(rest)?;
                ServerFrame::Deliver { seq, envelope }
            }
            DELIVER_EPHEMERAL => {
                let DeliverEphemeralBody { envelope } = body(rest)?;
                ServerFrame::DeliverEphemeral { envelope }
            }
            QUEUE_EMPTY => {
                let EmptyBody() = body(rest)?;
                ServerFrame::QueueEmpty
            }
            NOTICE => {
                let NoticeBody(notice, device) = body(rest)?;
                let notice = match notice {
                    1 => Notice::MailboxFull,
                    2 => Notice::KeysLow,
                    3 => Notice::KeyPackagesLow,
                    other => {
                        return Err(DecodeError::Malformed(format!("unknown notice {other}")));
                    }
                };
                ServerFrame::Notice { notice, device }
            }
            ERROR => {
                let ErrorBody(code, message, seq) = body(rest)?;
                let code = ErrorCode::from_u16(code).ok_or_else(|| unknown_code(code))?;
                ServerFrame::Error { code, message, seq }
            }
            GROUP_SEND_RESULT => {
                let GroupSendResultBody(id, code, refused, epoch) = body(rest)?;
                let code = match code {
                    0 => None,
                    c => Some(ErrorCode::from_u16(c).ok_or_else(|| unknown_code(c))?),
                };
                let refused = refused
                    .into_iter()
                    .map(|RefusalBody(to, code, current_devices)| {
                        Ok(RecipientRefusal {
                            to,
                            code: ErrorCode::from_u16(code).ok_or_else(|| unknown_code(code))?,
                            current_devices,
                        })
                    })
                    .collect::<Result<_, DecodeError>>()?;
                ServerFrame::GroupSendResult {
                    id,
                    code,
                    refused,
                    epoch,
                }
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            id: EnvelopeId([7; 16]),
            class: Class::Urgent,
            accepted_ms: 1,
            expires_ms: 2,
            ciphertext: vec![1, 2, 3],
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = [
            ServerFrame::AuthOk {
                user: "a@b".into(),
                device: DeviceId(3),
                server_time_ms: 9,
            },
            ServerFrame::SendResult {
                id: EnvelopeId([1; 16]),
                outcome: SendOutcome::Accepted { duplicate: true },
            },
            ServerFrame::SendResult {
                id: EnvelopeId([1; 16]),
                outcome: SendOutcome::Rejected {
                    code: ErrorCode::StaleDevices,
                    current_devices: vec![DeviceId(1), DeviceId(4)],
                },
            },
            ServerFrame::Deliver {
                seq: 42,
                envelope: envelope(),
            },
            ServerFrame::DeliverEphemeral {
                envelope: envelope(),
            },
            ServerFrame::QueueEmpty,
            ServerFrame::Notice {
                notice: Notice::MailboxFull,
                device: DeviceId(2),
            },
            ServerFrame::Error {
                code: ErrorCode::UnknownSeq,
                message: "x".into(),
                seq: Some(5),
            },
            ServerFrame::GroupSendResult {
                id: EnvelopeId([4; 16]),
                code: None,
                refused: vec![RecipientRefusal {
                    to: "bob@b".into(),
                    code: ErrorCode::StaleDevices,
                    current_devices: vec![DeviceId(1), DeviceId(3)],
                }],
                epoch: None,
            },
            ServerFrame::GroupSendResult {
                id: EnvelopeId([4; 16]),
                code: Some(ErrorCode::StaleEpoch),
                refused: vec![],
                epoch: Some(12),
            },
        ];
        for frame in frames {
            assert_eq!(ServerFrame::decode(&frame.encode()).unwrap(), frame);
        }
        assert_eq!(
            ServerFrame::encode_deliver(42, &envelope()),
            ServerFrame::Deliver {
                seq: 42,
                envelope: envelope()
            }
            .encode()
        );
    }

    #[test]
    fn byte_fields_are_msgpack_bin() {
        let frame = ClientFrame::Ack { seqs: vec![1] }.encode();
        assert_eq!(frame, vec![1, ACK, 0x91, 0x91, 0x01]);
        let send = ClientFrame::Send {
            id: EnvelopeId([0; 16]),
            to: "a@b".into(),
            class: Class::Durable,
            ttl_secs: 1,
            copies: vec![],
        }
        .encode();
        // array of 5, then bin8 of 16 bytes for the id.
        assert_eq!(&send[2..5], &[0x95, 0xc4, 16]);
    }

    #[test]
    fn rejects_bad_headers_and_trailing_bytes() {
        assert_eq!(ClientFrame::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(ClientFrame::decode(&[1]), Err(DecodeError::Truncated));
        assert_eq!(
            ClientFrame::decode(&[2, ACK, 0x90]),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            ClientFrame::decode(&[1, 0x7e, 0x90]),
            Err(DecodeError::UnknownFrameType(0x7e))
        );
        assert_eq!(
            ClientFrame::decode(&[1, ACK, 0x91, 0x90, 0x00]),
            Err(DecodeError::TrailingBytes(1))
        );
        assert!(matches!(
            ClientFrame::decode(&[1, ACK, 0xc1]),
            Err(DecodeError::Malformed(_))
        ));
        let big = vec![1u8; MAX_FRAME_BYTES + 1];
        assert_eq!(
            ClientFrame::decode(&big),
            Err(DecodeError::TooLarge(big.len()))
        );
        // A server kind is unknown to the client-frame decoder and vice versa.
        assert_eq!(
            ClientFrame::decode(&[1, QUEUE_EMPTY, 0x90]),
            Err(DecodeError::UnknownFrameType(QUEUE_EMPTY))
        );
        assert_eq!(
            ServerFrame::decode(&[1, ACK, 0x91, 0x90]),
            Err(DecodeError::UnknownFrameType(ACK))
        );
    }

    fn arb_client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            (
                ".{0,40}",
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(user, d, token)| ClientFrame::Auth {
                    user,
                    device: DeviceId(d),
                    token
                }),
            (
                any::<[u8; 16]>(),
                ".{0,40}",
                0u8..3,
                any::<u32>(),
                proptest::collection::vec(
                    (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64)),
                    0..5
                )
            )
                .prop_map(|(id, to, class, ttl_secs, copies)| ClientFrame::Send {
                    id: EnvelopeId(id),
                    to,
                    class: [Class::Durable, Class::Ephemeral, Class::Urgent][class as usize],
                    ttl_secs,
                    copies: copies
                        .into_iter()
                        .map(|(d, ciphertext)| Copy {
                            device: DeviceId(d),
                            ciphertext
                        })
                        .collect(),
                }),
            proptest::collection::vec(any::<u64>(), 0..50)
                .prop_map(|seqs| ClientFrame::Ack { seqs }),
            (
                any::<[u8; 16]>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::collection::vec(
                    (
                        ".{0,20}",
                        proptest::collection::vec(any::<u32>(), 0..4),
                        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..33)),
                    ),
                    0..5
                ),
                proptest::option::of((
                    proptest::collection::vec(any::<u8>(), 16..=32),
                    any::<u64>(),
                    ".{0,20}"
                )),
            )
                .prop_map(|(id, ttl_secs, ciphertext, recipients, order)| {
                    ClientFrame::GroupSend {
                        id: EnvelopeId(id),
                        class: Class::Durable,
                        ttl_secs,
                        ciphertext,
                        recipients: recipients
                            .into_iter()
                            .map(|(to, devices, delivery_token)| GroupRecipient {
                                to,
                                devices: devices.into_iter().map(DeviceId).collect(),
                                delivery_token,
                            })
                            .collect(),
                        order: order.map(|(group, epoch, hub)| Order { group, epoch, hub }),
                    }
                }),
        ]
    }

    #[test]
    fn a_batch_carries_frames_in_order_and_nothing_else() {
        let frames = [
            ServerFrame::Deliver {
                seq: 1,
                envelope: envelope(),
            },
            ServerFrame::Error {
                code: ErrorCode::UnknownSeq,
                message: "not outstanding".into(),
                seq: Some(9),
            },
            ServerFrame::QueueEmpty,
        ];
        let encoded: Vec<Vec<u8>> = frames.iter().map(ServerFrame::encode).collect();
        let batch = ServerFrame::encode_batch(&encoded);
        assert_eq!(ServerFrame::decode_all(&batch).unwrap(), frames);
        // A single frame reads as itself; `decode` alone does not know batches.
        assert_eq!(
            ServerFrame::decode_all(&encoded[2]).unwrap(),
            vec![ServerFrame::QueueEmpty]
        );
        assert!(matches!(
            ServerFrame::decode(&batch),
            Err(DecodeError::UnknownFrameType(0x8f))
        ));
        // Nested, empty, too many, or holding junk: refused whole.
        let nested = ServerFrame::encode_batch(std::slice::from_ref(&batch));
        assert!(ServerFrame::decode_all(&nested).is_err());
        let empty: [Vec<u8>; 0] = [];
        assert!(ServerFrame::decode_all(&ServerFrame::encode_batch(&empty)).is_err());
        let many = vec![encoded[2].clone(); crate::limits::MAX_BATCH_FRAMES + 1];
        assert!(ServerFrame::decode_all(&ServerFrame::encode_batch(&many)).is_err());
        let junk = ServerFrame::encode_batch(&[vec![1u8, 0x83, 0xc1]]);
        assert!(ServerFrame::decode_all(&junk).is_err());
        // A batch is a broker-to-device message only.
        assert!(ClientFrame::decode(&batch).is_err());
        // Split without decoding: the frames' own bytes, or the message itself.
        let split = ServerFrame::unbatch(&batch).unwrap();
        assert_eq!(
            split.iter().map(|f| f.to_vec()).collect::<Vec<_>>(),
            encoded
        );
        assert_eq!(
            ServerFrame::unbatch(&encoded[0]).unwrap(),
            vec![&encoded[0][..]]
        );
        assert!(ServerFrame::unbatch(&nested).is_err(), "not even split");
    }

    #[test]
    fn a_group_id_is_16_to_32_bytes() {
        let frame = |len| ClientFrame::GroupSend {
            id: EnvelopeId([1; 16]),
            class: Class::Durable,
            ttl_secs: 60,
            ciphertext: vec![1],
            recipients: vec![],
            order: Some(Order {
                group: vec![7; len],
                epoch: 1,
                hub: "a.example".into(),
            }),
        };
        assert!(ClientFrame::decode(&frame(16).encode()).is_ok());
        assert!(matches!(
            ClientFrame::decode(&frame(15).encode()),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            ClientFrame::decode(&frame(33).encode()),
            Err(DecodeError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn client_frames_round_trip(frame in arb_client_frame()) {
            prop_assert_eq!(ClientFrame::decode(&frame.encode()).unwrap(), frame);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClientFrame::decode(&bytes);
            let _ = ServerFrame::decode(&bytes);
        }
    }
}
