//! The federation protocol: what two brokers of different domains say to each other over a
//! link (one WebSocket from the sending broker to the receiving broker's `/v1/federation`).
//!
//! # Handshake
//!
//! The link is a Noise `KK` session (`Noise_KK_25519_ChaChaPoly_BLAKE2s`): each side knows the
//! other domain's static X25519 key beforehand (pinned in the config or published at
//! `/.well-known/sealpost/server`), so a peer holding another key, or claiming another domain,
//! fails the handshake. The prologue ([`prologue`]) binds both domain names.
//!
//! Before and during the handshake, messages are plain [`HandshakeFrame`]s:
//!
//! ```text
//! initiator                                   responder
//!   hello   [origin, target, noise msg 1] ──▶   looks up origin's key; refuses unknown peers
//!           ◀── welcome [noise msg 2]           (or refuse [code, message], then close)
//! ```
//!
//! # Transport
//!
//! After the handshake every WebSocket binary message carries one [`LinkFrame`], encrypted:
//! the frame's bytes are cut into chunks of [`NOISE_CHUNK_PLAINTEXT`] bytes (the last one
//! shorter), each chunk becomes one Noise transport message (chunk + 16-byte tag), and the
//! messages are concatenated. A receiver splits the WebSocket message every
//! [`NOISE_MAX_MESSAGE`] bytes, decrypts each part in order and concatenates the plaintexts.
//!
//! # Byte layout of a frame
//!
//! ```text
//! +---------+--------+-----------------------------------------------+
//! | version | kind   | body                                          |
//! | u8 = 1  | u8     | MessagePack, structs as positional arrays     |
//! +---------+--------+-----------------------------------------------+
//! ```
//!
//! As in the device protocol ([`crate::frame`]), bodies are `rmp_serde::to_vec` arrays with byte
//! fields as `bin`; decoders reject unknown versions and kinds, schema mismatches and trailing
//! bytes. Kinds `0x01..=0x3f` go from the sending broker (initiator) to the receiving broker,
//! `0x81..=0xbf` back; `0x40` and `0xc0..` are handshake frames.
//!
//! | kind | frame          | body fields, in order                                          |
//! |------|----------------|----------------------------------------------------------------|
//! | 0x40 | `hello`        | origin (str), target (str), noise (bin)                        |
//! | 0xc0 | `welcome`      | noise (bin)                                                    |
//! | 0xc1 | `refuse`       | code (u16), message (str)                                      |
//! | 0x01 | `txn`          | txn_id (u64), envelopes ([[id bin 16, to str, class u8, ttl_secs u32, copies [[device u32, ciphertext bin]], admission u8, token bin or nil]]) |
//! | 0x02 | `get_devices`  | req_id (u64), user (str)                                       |
//! | 0x03 | `get_device_list` | req_id (u64), user (str)                                    |
//! | 0x04 | `claim_key`    | req_id (u64), user (str), device (u32), admission u8, token (bin or nil) |
//! | 0x05 | `claim_key_package` | as `claim_key`: claims an MLS KeyPackage instead of an Olm key |
//! | 0x06 | `take_epoch`   | req_id (u64), group (bin 16..=32), epoch (u64), id (bin 16): a Commit asks the group's hub for its epoch |
//! | 0x07 | `group_txn`    | txn_id (u64), entries ([[id bin 16, class u8, ttl_secs u32, ciphertext bin, recipients [[to str, devices [u32], admission u8, token bin or nil]]]]): one group message, once, for all its recipients on the receiving domain; acknowledged by `txn_ack` with one code per recipient, entry by entry |
//! | 0x08 | `get_roots`    | req_id (u64), from (u64), to (u64): the receiver's key-transparency roots `from..=to` and the append-only proof between them (`from` = `NEWEST` (u64::MAX): only the newest root; `to` = 0: up to the newest); at most `MAX_AUDIT_EPOCHS` epochs |
//! | 0x09 | `cosign`       | req_id (u64), cosignatures ([bin]): co-signatures the sender made of logs it audited (see `transparency`) |
//! | 0x81 | `txn_ack`      | txn_id (u64), codes ([u16], one per envelope, 0 = stored)      |
//! | 0x82 | `devices`      | req_id (u64), devices ([[device u32, identity_keys bin]])      |
//! | 0x83 | `device_list`  | req_id (u64), signed (bin), evidence (bin, empty: none; optional, absent from older brokers) |
//! | 0x88 | `roots`        | req_id (u64), roots ([bin]), proof (bin, empty: none)          |
//! | 0x89 | `noted`        | req_id (u64): reply to `cosign`                                |
//! | 0x84 | `claimed`      | req_id (u64), key_id (u64), key (bin), fallback (bool)         |
//! | 0x85 | `refused`      | req_id (u64), code (u16)                                       |
//! | 0x87 | `epoch`        | req_id (u64), taken (bool), current (u64): reply to `take_epoch` |
//! | 0x86 | `link_error`   | code (u16), message (str) — the link closes after it           |
//!
//! Admission (`u8`): 0 = the sender is an authenticated account of the origin domain (the origin
//! vouches; nothing says which account), 1 = anonymous with the recipient's delivery token,
//! 2 = anonymous without a token (only for recipients that accept envelopes from anyone).
//!
//! # What the receiving broker learns
//!
//! A [`FedEnvelope`] names the recipient (handle and devices), the class, the time-to-live and
//! the ciphertext sizes; the link names the origin domain. No field names the sender's handle
//! or device: there is no such field in any frame.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::{
    codec::{self, body},
    error::{DecodeError, ErrorCode},
    frame::{Class, Copy},
    ids::{DeviceId, EnvelopeId},
    limits::{
        MAX_DEVICES_PER_USER, MAX_GROUP_CIPHERTEXT_BYTES, MAX_GROUP_DEVICES, MAX_GROUP_RECIPIENTS,
    },
    transparency::MAX_AUDIT_EPOCHS,
};

/// The version byte of every federation frame.
pub const FEDERATION_VERSION: u8 = 1;

/// The Noise protocol of a link.
pub const NOISE_PATTERN: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";

/// Largest Noise message (the Noise specification's limit).
pub const NOISE_MAX_MESSAGE: usize = 65_535;

/// Authentication tag added to every Noise transport message.
pub const NOISE_TAG: usize = 16;

/// Plaintext bytes carried by one full Noise transport message of a link.
pub const NOISE_CHUNK_PLAINTEXT: usize = NOISE_MAX_MESSAGE - NOISE_TAG;

/// Largest link frame (plaintext), in bytes. A transaction is cut before it reaches this.
pub const MAX_LINK_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Largest handshake frame, in bytes.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize = 1024;

/// Most envelopes one transaction may carry.
pub const MAX_TXN_ENVELOPES: usize = 1024;

/// The Noise prologue of a link from `origin` to `target`: both domain names are bound into the
/// handshake hash, so a handshake made for one pair of domains fails for any other.
pub fn prologue(origin: &str, target: &str) -> Vec<u8> {
    let mut p = b"sealpost-federation-v1\0".to_vec();
    p.extend_from_slice(origin.as_bytes());
    p.push(0);
    p.extend_from_slice(target.as_bytes());
    p
}

/// Frames exchanged in the clear while a link is being set up.
#[derive(Clone, PartialEq, Eq)]
pub enum HandshakeFrame {
    /// Initiator → responder: who is calling, whom it means to reach, and the first Noise
    /// handshake message.
    Hello {
        /// The initiator's domain (checked against its static key by the handshake).
        origin: String,
        /// The responder's domain, as the initiator believes it to be.
        target: String,
        /// Noise handshake message 1.
        noise: Vec<u8>,
    },
    /// Responder → initiator: the second Noise handshake message; the link is up.
    Welcome {
        /// Noise handshake message 2.
        noise: Vec<u8>,
    },
    /// Responder → initiator: the link is refused (the connection closes after it).
    Refuse {
        /// Why.
        code: ErrorCode,
        /// Detail without secrets.
        message: String,
    },
}

impl std::fmt::Debug for HandshakeFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeFrame::Hello { origin, target, .. } => f
                .debug_struct("Hello")
                .field("origin", origin)
                .field("target", target)
                .finish_non_exhaustive(),
            HandshakeFrame::Welcome { .. } => f.debug_struct("Welcome").finish_non_exhaustive(),
            HandshakeFrame::Refuse { code, message } => f
                .debug_struct("Refuse")
                .field("code", code)
                .field("message", message)
                .finish(),
        }
    }
}

/// How the origin admitted an envelope or a key claim; the receiving broker applies the
/// recipient's sealed-sender policy to it.
#[derive(Clone, PartialEq, Eq)]
pub enum Admission {
    /// An authenticated account of the origin domain sent it (the origin vouches; which
    /// account is not said).
    Origin,
    /// Anonymous, with the recipient's delivery token.
    Token(Vec<u8>),
    /// Anonymous without a token: only for recipients that accept envelopes from anyone.
    Open,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret of the recipient's contacts: never printed.
        f.write_str(match self {
            Admission::Origin => "Origin",
            Admission::Token(_) => "Token(..)",
            Admission::Open => "Open",
        })
    }
}

impl Admission {
    fn to_wire(&self) -> (u8, Option<ByteBuf>) {
        match self {
            Admission::Origin => (0, None),
            Admission::Token(t) => (1, Some(ByteBuf::from(t.clone()))),
            Admission::Open => (2, None),
        }
    }

    fn from_wire(kind: u8, token: Option<ByteBuf>) -> Result<Self, DecodeError> {
        match (kind, token) {
            (0, None) => Ok(Admission::Origin),
            (1, Some(t)) => Ok(Admission::Token(t.into_vec())),
            (2, None) => Ok(Admission::Open),
            (k, _) => Err(DecodeError::Malformed(format!(
                "admission {k} with a token that does not fit it"
            ))),
        }
    }
}

/// One envelope carried by a transaction: what the receiving broker needs to store it, and
/// nothing about who sent it.
#[derive(Clone, PartialEq, Eq)]
pub struct FedEnvelope {
    /// The sender client's envelope id (deduplicates retries at the receiving broker).
    pub id: EnvelopeId,
    /// Recipient handle, on the receiving broker's domain.
    pub to: String,
    /// Delivery class.
    pub class: Class,
    /// Time-to-live left, in seconds.
    pub ttl_secs: u32,
    /// One ciphertext per recipient device.
    pub copies: Vec<Copy>,
    /// How the origin admitted it.
    pub admission: Admission,
}

impl std::fmt::Debug for FedEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedEnvelope")
            .field("id", &self.id)
            .field("class", &self.class)
            .field("ttl_secs", &self.ttl_secs)
            .field("copies", &self.copies)
            .field("admission", &self.admission)
            .finish_non_exhaustive()
    }
}

/// One group message (`group_send`) for all of its recipients on the receiving domain: the
/// ciphertext travels once, and the receiving broker stores a copy for each recipient device.
#[derive(Clone, PartialEq, Eq)]
pub struct FedGroupEnvelope {
    /// The sender client's envelope id (the same for every recipient).
    pub id: EnvelopeId,
    /// Delivery class.
    pub class: Class,
    /// Time-to-live left, in seconds.
    pub ttl_secs: u32,
    /// The one ciphertext every recipient device gets.
    pub ciphertext: Vec<u8>,
    /// The recipients on the receiving broker's domain, each once.
    pub recipients: Vec<FedRecipient>,
}

/// A recipient of a [`FedGroupEnvelope`].
#[derive(Clone, PartialEq, Eq)]
pub struct FedRecipient {
    /// Recipient handle, on the receiving broker's domain.
    pub to: String,
    /// Its devices that get a copy.
    pub devices: Vec<DeviceId>,
    /// How the origin admitted it for this recipient.
    pub admission: Admission,
}

impl FedGroupEnvelope {
    /// The envelope as one [`FedEnvelope`] per recipient, in order (what the receiving broker
    /// stores; a transaction's acknowledgement has one code for each).
    pub fn into_envelopes(self) -> impl Iterator<Item = FedEnvelope> {
        let FedGroupEnvelope {
            id,
            class,
            ttl_secs,
            ciphertext,
            recipients,
        } = self;
        recipients.into_iter().map(move |r| FedEnvelope {
            id,
            to: r.to,
            class,
            ttl_secs,
            copies: r
                .devices
                .iter()
                .map(|&device| Copy {
                    device,
                    ciphertext: ciphertext.clone(),
                })
                .collect(),
            admission: r.admission,
        })
    }
}

impl std::fmt::Debug for FedGroupEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedGroupEnvelope")
            .field("id", &self.id)
            .field("class", &self.class)
            .field("ttl_secs", &self.ttl_secs)
            .field("bytes", &self.ciphertext.len())
            .field("recipients", &self.recipients.len())
            .finish_non_exhaustive()
    }
}

/// A device of a remote account, as listed by its home broker.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteDevice {
    /// Device id.
    pub device: u32,
    /// Its public identity keys, opaque.
    pub identity_keys: Vec<u8>,
}

impl std::fmt::Debug for RemoteDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDevice")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// An encrypted frame of an established link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFrame {
    /// Sending → receiving broker: envelopes to persist, then acknowledge with `TxnAck`.
    Txn {
        /// Chosen by the sender; echoed by the acknowledgement.
        txn_id: u64,
        /// The envelopes, in outbox order.
        envelopes: Vec<FedEnvelope>,
    },
    /// Sending → receiving broker: group messages, each once for all its recipients there, to
    /// persist for every recipient, then acknowledge with `TxnAck` (one code per recipient,
    /// entry by entry).
    GroupTxn {
        /// Chosen by the sender; echoed by the acknowledgement.
        txn_id: u64,
        /// The group messages, in outbox order.
        entries: Vec<FedGroupEnvelope>,
    },
    /// Request: the devices (ids and identity keys) of a local account of the receiver.
    GetDevices {
        /// Echoed by the reply.
        req_id: u64,
        /// The account.
        user: String,
    },
    /// Request: the signed device list of an account (opaque; signed by its master key).
    GetDeviceList {
        /// Echoed by the reply.
        req_id: u64,
        /// The account.
        user: String,
    },
    /// Request: signed roots of the receiver's key-transparency log and the append-only proof
    /// between them.
    GetRoots {
        /// Echoed by the reply.
        req_id: u64,
        /// First epoch ([`NEWEST`]: only the newest root).
        from: u64,
        /// Last epoch (0: the newest).
        to: u64,
    },
    /// Request: co-signatures the sender made of the logs it audited, for the receiver to keep
    /// and show its clients.
    Cosign {
        /// Echoed by the reply.
        req_id: u64,
        /// Encoded `transparency::Cosignature`s.
        cosignatures: Vec<Vec<u8>>,
    },
    /// Request: claim a one-time (or the fallback) key of a device, or one of its MLS
    /// KeyPackages (a one-time one, or the last-resort one).
    ClaimKey {
        /// Echoed by the reply.
        req_id: u64,
        /// The account.
        user: String,
        /// The device.
        device: u32,
        /// How the origin admitted the claim.
        admission: Admission,
        /// An MLS KeyPackage (`claim_key_package`) rather than an Olm key (`claim_key`).
        key_package: bool,
    },
    /// Receiving → sending broker: every envelope of the transaction has been handled; the
    /// stored ones are durable.
    TxnAck {
        /// The transaction.
        txn_id: u64,
        /// One per envelope, in order: `None` stored (or a duplicate of a stored one), else why
        /// it was refused.
        codes: Vec<Option<ErrorCode>>,
    },
    /// Reply to `GetDevices`.
    Devices {
        /// The request.
        req_id: u64,
        /// The devices, ordered by id.
        devices: Vec<RemoteDevice>,
    },
    /// Reply to `GetDeviceList`.
    DeviceList {
        /// The request.
        req_id: u64,
        /// The signed list, opaque.
        signed: Vec<u8>,
        /// Its key-transparency evidence (`transparency::Evidence`), empty when the receiver
        /// keeps no log.
        evidence: Vec<u8>,
    },
    /// Reply to `GetRoots`.
    Roots {
        /// The request.
        req_id: u64,
        /// Encoded `transparency::SignedRoot`s, in epoch order.
        roots: Vec<Vec<u8>>,
        /// akd's `AppendOnlyProof` from the first root to the last (MessagePack), empty with
        /// one root.
        proof: Vec<u8>,
    },
    /// Reply to `Cosign`.
    Noted {
        /// The request.
        req_id: u64,
    },
    /// Reply to `ClaimKey`.
    Claimed {
        /// The request.
        req_id: u64,
        /// Key id.
        key_id: u64,
        /// The key, opaque.
        key: Vec<u8>,
        /// True when this is the fallback key.
        fallback: bool,
    },
    /// Request, to a group's hub: take `epoch` of `group` for the Commit sent as `id`.
    TakeEpoch {
        /// Echoed by the reply.
        req_id: u64,
        /// The group's id (random, opaque).
        group: Vec<u8>,
        /// The epoch the Commit names.
        epoch: u64,
        /// The Commit's envelope id (its retries are answered as taken).
        id: EnvelopeId,
    },
    /// Reply to `TakeEpoch`.
    Epoch {
        /// The request.
        req_id: u64,
        /// Whether the Commit took the epoch (else another did, or the group is past it).
        taken: bool,
        /// The group's epoch now.
        current: u64,
    },
    /// A request was refused.
    Refused {
        /// The request.
        req_id: u64,
        /// Why.
        code: ErrorCode,
    },
    /// The link is being closed for a protocol violation or a limit.
    LinkError {
        /// Why.
        code: ErrorCode,
        /// Detail without user content.
        message: String,
    },
}

// Frame kinds.
const TXN: u8 = 0x01;
const GET_DEVICES: u8 = 0x02;
const GET_DEVICE_LIST: u8 = 0x03;
const CLAIM_KEY: u8 = 0x04;
const CLAIM_KEY_PACKAGE: u8 = 0x05;
const TAKE_EPOCH: u8 = 0x06;
const GROUP_TXN: u8 = 0x07;
const GET_ROOTS: u8 = 0x08;
const COSIGN: u8 = 0x09;
const ROOTS: u8 = 0x88;
const NOTED: u8 = 0x89;
const EPOCH: u8 = 0x87;
const HELLO: u8 = 0x40;
const TXN_ACK: u8 = 0x81;
const DEVICES: u8 = 0x82;
const DEVICE_LIST: u8 = 0x83;
const CLAIMED: u8 = 0x84;
const REFUSED: u8 = 0x85;
const LINK_ERROR: u8 = 0x86;
const WELCOME: u8 = 0xc0;
const REFUSE: u8 = 0xc1;

#[derive(Serialize, Deserialize)]
struct HelloBody(String, String, ByteBuf);

#[derive(Serialize, Deserialize)]
struct WelcomeBody(ByteBuf);

#[derive(Serialize, Deserialize)]
struct CodeMessageBody(u16, String);

#[derive(Serialize, Deserialize)]
struct EnvelopeBody(
    EnvelopeId,
    String,
    Class,
    u32,
    Vec<Copy>,
    u8,
    Option<ByteBuf>,
);

#[derive(Serialize, Deserialize)]
struct TxnBody(u64, Vec<EnvelopeBody>);

#[derive(Serialize, Deserialize)]
struct GroupEnvelopeBody(
    EnvelopeId,
    Class,
    u32,
    ByteBuf,
    Vec<(String, Vec<DeviceId>, u8, Option<ByteBuf>)>,
);

#[derive(Serialize, Deserialize)]
struct GroupTxnBody(u64, Vec<GroupEnvelopeBody>);

#[derive(Serialize, Deserialize)]
struct UserRequestBody(u64, String);

#[derive(Serialize, Deserialize)]
struct ClaimBody(u64, String, u32, u8, Option<ByteBuf>);

#[derive(Serialize, Deserialize)]
struct TxnAckBody(u64, Vec<u16>);

#[derive(Serialize, Deserialize)]
struct DevicesBody(u64, Vec<(u32, ByteBuf)>);

#[derive(Serialize, Deserialize)]
struct DeviceListBody(u64, ByteBuf, #[serde(default)] ByteBuf);

#[derive(Serialize, Deserialize)]
struct RangeBody(u64, u64, u64);

#[derive(Serialize, Deserialize)]
struct ListBody(u64, Vec<ByteBuf>);

#[derive(Serialize, Deserialize)]
struct RootsBody(u64, Vec<ByteBuf>, ByteBuf);

#[derive(Serialize, Deserialize)]
struct IdBody(u64);

#[derive(Serialize, Deserialize)]
struct ClaimedBody(u64, u64, ByteBuf, bool);

#[derive(Serialize, Deserialize)]
struct TakeEpochBody(u64, ByteBuf, u64, EnvelopeId);

#[derive(Serialize, Deserialize)]
struct EpochBody(u64, bool, u64);

#[derive(Serialize, Deserialize)]
struct RefusedBody(u64, u16);

fn encode<T: Serialize>(kind: u8, body: &T) -> Vec<u8> {
    codec::encode(FEDERATION_VERSION, kind, body)
}

fn header(bytes: &[u8], max: usize) -> Result<(u8, &[u8]), DecodeError> {
    codec::header(bytes, FEDERATION_VERSION, max)
}

/// The limits of a group message as its sending broker checked them (its `group_send`'s): what
/// the receiving broker fans out is bounded before it makes a copy.
fn check_group(
    ciphertext: &[u8],
    recipients: &[(String, Vec<DeviceId>, u8, Option<ByteBuf>)],
) -> Result<(), DecodeError> {
    let malformed = |what: &str| Err(DecodeError::Malformed(format!("group message: {what}")));
    if ciphertext.len() > MAX_GROUP_CIPHERTEXT_BYTES {
        return malformed("ciphertext too large");
    }
    if recipients.is_empty() || recipients.len() > MAX_GROUP_RECIPIENTS {
        return malformed("no recipients, or too many");
    }
    let mut total = 0;
    for (_, devices, _, _) in recipients {
        let mut distinct = devices.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if devices.is_empty()
            || devices.len() > MAX_DEVICES_PER_USER
            || distinct.len() != devices.len()
        {
            return malformed("a recipient without 1 to 16 distinct devices");
        }
        total += devices.len();
    }
    if total > MAX_GROUP_DEVICES {
        return malformed("too many devices");
    }
    Ok(())
}

/// `GetRoots::from` asking for the newest root only.
pub const NEWEST: u64 = u64::MAX;

/// Most co-signatures one `cosign` frame carries.
pub const MAX_COSIGNATURES: usize = 256;

fn bufs(items: &[Vec<u8>]) -> Vec<ByteBuf> {
    items.iter().map(|b| ByteBuf::from(b.clone())).collect()
}

/// `items`, if there are at most `max` of them.
fn at_most<T>(items: Vec<T>, max: usize, what: &str) -> Result<Vec<T>, DecodeError> {
    if items.len() > max {
        return Err(DecodeError::Malformed(format!("{} {what}", items.len())));
    }
    Ok(items)
}

fn code(value: u16) -> Result<ErrorCode, DecodeError> {
    ErrorCode::from_u16(value)
        .ok_or_else(|| DecodeError::Malformed(format!("unknown error code {value}")))
}

impl HandshakeFrame {
    /// Encodes the frame into one WebSocket binary message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            HandshakeFrame::Hello {
                origin,
                target,
                noise,
            } => encode(
                HELLO,
                &HelloBody(origin.clone(), target.clone(), ByteBuf::from(noise.clone())),
            ),
            HandshakeFrame::Welcome { noise } => {
                encode(WELCOME, &WelcomeBody(ByteBuf::from(noise.clone())))
            }
            HandshakeFrame::Refuse { code, message } => {
                encode(REFUSE, &CodeMessageBody(code.as_u16(), message.clone()))
            }
        }
    }

    /// Decodes one WebSocket binary message of a link that is not yet up.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (kind, rest) = header(bytes, MAX_HANDSHAKE_FRAME_BYTES)?;
        Ok(match kind {
            HELLO => {
                let HelloBody(origin, target, noise) = body(rest)?;
                HandshakeFrame::Hello {
                    origin,
                    target,
                    noise: noise.into_vec(),
                }
            }
            WELCOME => {
                let WelcomeBody(noise) = body(rest)?;
                HandshakeFrame::Welcome {
                    noise: noise.into_vec(),
                }
            }
            REFUSE => {
                let CodeMessageBody(c, message) = body(rest)?;
                HandshakeFrame::Refuse {
                    code: code(c)?,
                    message,
                }
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        })
    }
}

impl LinkFrame {
    /// Encodes the frame (before encryption).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            LinkFrame::Txn { txn_id, envelopes } => {
                let envelopes = envelopes
                    .iter()
                    .map(|e| {
                        let (kind, token) = e.admission.to_wire();
                        EnvelopeBody(
                            e.id,
                            e.to.clone(),
                            e.class,
                            e.ttl_secs,
                            e.copies.clone(),
                            kind,
                            token,
                        )
                    })
                    .collect();
                encode(TXN, &TxnBody(*txn_id, envelopes))
            }
            LinkFrame::GroupTxn { txn_id, entries } => {
                let entries = entries
                    .iter()
                    .map(|e| {
                        let recipients = e
                            .recipients
                            .iter()
                            .map(|r| {
                                let (kind, token) = r.admission.to_wire();
                                (r.to.clone(), r.devices.clone(), kind, token)
                            })
                            .collect();
                        GroupEnvelopeBody(
                            e.id,
                            e.class,
                            e.ttl_secs,
                            ByteBuf::from(e.ciphertext.clone()),
                            recipients,
                        )
                    })
                    .collect();
                encode(GROUP_TXN, &GroupTxnBody(*txn_id, entries))
            }
            LinkFrame::GetDevices { req_id, user } => {
                encode(GET_DEVICES, &UserRequestBody(*req_id, user.clone()))
            }
            LinkFrame::GetDeviceList { req_id, user } => {
                encode(GET_DEVICE_LIST, &UserRequestBody(*req_id, user.clone()))
            }
            LinkFrame::ClaimKey {
                req_id,
                user,
                device,
                admission,
                key_package,
            } => {
                let (kind, token) = admission.to_wire();
                encode(
                    if *key_package {
                        CLAIM_KEY_PACKAGE
                    } else {
                        CLAIM_KEY
                    },
                    &ClaimBody(*req_id, user.clone(), *device, kind, token),
                )
            }
            LinkFrame::TxnAck { txn_id, codes } => {
                let codes = codes
                    .iter()
                    .map(|c| c.map_or(0, ErrorCode::as_u16))
                    .collect();
                encode(TXN_ACK, &TxnAckBody(*txn_id, codes))
            }
            LinkFrame::Devices { req_id, devices } => {
                let devices = devices
                    .iter()
                    .map(|d| (d.device, ByteBuf::from(d.identity_keys.clone())))
                    .collect();
                encode(DEVICES, &DevicesBody(*req_id, devices))
            }
            LinkFrame::DeviceList {
                req_id,
                signed,
                evidence,
            } => encode(
                DEVICE_LIST,
                &DeviceListBody(
                    *req_id,
                    ByteBuf::from(signed.clone()),
                    ByteBuf::from(evidence.clone()),
                ),
            ),
            LinkFrame::GetRoots { req_id, from, to } => {
                encode(GET_ROOTS, &RangeBody(*req_id, *from, *to))
            }
            LinkFrame::Cosign {
                req_id,
                cosignatures,
            } => encode(COSIGN, &ListBody(*req_id, bufs(cosignatures))),
            LinkFrame::Roots {
                req_id,
                roots,
                proof,
            } => encode(
                ROOTS,
                &RootsBody(*req_id, bufs(roots), ByteBuf::from(proof.clone())),
            ),
            LinkFrame::Noted { req_id } => encode(NOTED, &IdBody(*req_id)),
            LinkFrame::Claimed {
                req_id,
                key_id,
                key,
                fallback,
            } => encode(
                CLAIMED,
                &ClaimedBody(*req_id, *key_id, ByteBuf::from(key.clone()), *fallback),
            ),
            LinkFrame::TakeEpoch {
                req_id,
                group,
                epoch,
                id,
            } => encode(
                TAKE_EPOCH,
                &TakeEpochBody(*req_id, ByteBuf::from(group.clone()), *epoch, *id),
            ),
            LinkFrame::Epoch {
                req_id,
                taken,
                current,
            } => encode(EPOCH, &EpochBody(*req_id, *taken, *current)),
            LinkFrame::Refused { req_id, code } => {
                encode(REFUSED, &RefusedBody(*req_id, code.as_u16()))
            }
            LinkFrame::LinkError { code, message } => {
                encode(LINK_ERROR, &CodeMessageBody(code.as_u16(), message.clone()))
            }
        }
    }

    /// Decodes one decrypted link frame.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (kind, rest) = header(bytes, MAX_LINK_FRAME_BYTES)?;
        Ok(match kind {
            TXN => {
                let TxnBody(txn_id, envelopes) = body(rest)?;
                let envelopes =
                    at_most(envelopes, MAX_TXN_ENVELOPES, "envelopes in one transaction")?
                        .into_iter()
                        .map(
                            |EnvelopeBody(id, to, class, ttl_secs, copies, kind, token)| {
                                Ok(FedEnvelope {
                                    id,
                                    to,
                                    class,
                                    ttl_secs,
                                    copies,
                                    admission: Admission::from_wire(kind, token)?,
                                })
                            },
                        )
                        .collect::<Result<_, DecodeError>>()?;
                LinkFrame::Txn { txn_id, envelopes }
            }
            GROUP_TXN => {
                let GroupTxnBody(txn_id, entries) = body(rest)?;
                let entries = at_most(entries, MAX_TXN_ENVELOPES, "entries in one transaction")?
                    .into_iter()
                    .map(
                        |GroupEnvelopeBody(id, class, ttl_secs, ciphertext, recipients)| {
                            check_group(&ciphertext, &recipients)?;
                            let recipients = recipients
                                .into_iter()
                                .map(|(to, devices, kind, token)| {
                                    Ok(FedRecipient {
                                        to,
                                        devices,
                                        admission: Admission::from_wire(kind, token)?,
                                    })
                                })
                                .collect::<Result<_, DecodeError>>()?;
                            Ok(FedGroupEnvelope {
                                id,
                                class,
                                ttl_secs,
                                ciphertext: ciphertext.into_vec(),
                                recipients,
                            })
                        },
                    )
                    .collect::<Result<_, DecodeError>>()?;
                LinkFrame::GroupTxn { txn_id, entries }
            }
            GET_DEVICES => {
                let UserRequestBody(req_id, user) = body(rest)?;
                LinkFrame::GetDevices { req_id, user }
            }
            GET_DEVICE_LIST => {
                let UserRequestBody(req_id, user) = body(rest)?;
                LinkFrame::GetDeviceList { req_id, user }
            }
            CLAIM_KEY | CLAIM_KEY_PACKAGE => {
                let key_package = kind == CLAIM_KEY_PACKAGE;
                let ClaimBody(req_id, user, device, kind, token) = body(rest)?;
                LinkFrame::ClaimKey {
                    req_id,
                    user,
                    device,
                    admission: Admission::from_wire(kind, token)?,
                    key_package,
                }
            }
            TXN_ACK => {
                let TxnAckBody(txn_id, codes) = body(rest)?;
                let codes = codes
                    .into_iter()
                    .map(|c| if c == 0 { Ok(None) } else { code(c).map(Some) })
                    .collect::<Result<_, _>>()?;
                LinkFrame::TxnAck { txn_id, codes }
            }
            DEVICES => {
                let DevicesBody(req_id, devices) = body(rest)?;
                let devices = devices
                    .into_iter()
                    .map(|(device, keys)| RemoteDevice {
                        device,
                        identity_keys: keys.into_vec(),
                    })
                    .collect();
                LinkFrame::Devices { req_id, devices }
            }
            DEVICE_LIST => {
                let DeviceListBody(req_id, signed, evidence) = body(rest)?;
                LinkFrame::DeviceList {
                    req_id,
                    signed: signed.into_vec(),
                    evidence: evidence.into_vec(),
                }
            }
            GET_ROOTS => {
                let RangeBody(req_id, from, to) = body(rest)?;
                LinkFrame::GetRoots { req_id, from, to }
            }
            COSIGN => {
                let ListBody(req_id, cosignatures) = body(rest)?;
                LinkFrame::Cosign {
                    req_id,
                    cosignatures: at_most(cosignatures, MAX_COSIGNATURES, "co-signatures")?
                        .into_iter()
                        .map(ByteBuf::into_vec)
                        .collect(),
                }
            }
            ROOTS => {
                let RootsBody(req_id, roots, proof) = body(rest)?;
                let max = usize::try_from(MAX_AUDIT_EPOCHS + 1).unwrap_or(usize::MAX);
                LinkFrame::Roots {
                    req_id,
                    roots: at_most(roots, max, "roots")?
                        .into_iter()
                        .map(ByteBuf::into_vec)
                        .collect(),
                    proof: proof.into_vec(),
                }
            }
            NOTED => {
                let IdBody(req_id) = body(rest)?;
                LinkFrame::Noted { req_id }
            }
            CLAIMED => {
                let ClaimedBody(req_id, key_id, key, fallback) = body(rest)?;
                LinkFrame::Claimed {
                    req_id,
                    key_id,
                    key: key.into_vec(),
                    fallback,
                }
            }
            TAKE_EPOCH => {
                let TakeEpochBody(req_id, group, epoch, id) = body(rest)?;
                if !(16..=32).contains(&group.len()) {
                    return Err(DecodeError::Malformed(
                        "group id must be 16..=32 bytes".into(),
                    ));
                }
                LinkFrame::TakeEpoch {
                    req_id,
                    group: group.into_vec(),
                    epoch,
                    id,
                }
            }
            EPOCH => {
                let EpochBody(req_id, taken, current) = body(rest)?;
                LinkFrame::Epoch {
                    req_id,
                    taken,
                    current,
                }
            }
            REFUSED => {
                let RefusedBody(req_id, c) = body(rest)?;
                LinkFrame::Refused {
                    req_id,
                    code: code(c)?,
                }
            }
            LINK_ERROR => {
                let CodeMessageBody(c, message) = body(rest)?;
                LinkFrame::LinkError {
                    code: code(c)?,
                    message,
                }
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        })
    }

    /// True for the frames a sending broker sends (the receiving broker accepts only these).
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            LinkFrame::Txn { .. }
                | LinkFrame::GroupTxn { .. }
                | LinkFrame::GetDevices { .. }
                | LinkFrame::GetDeviceList { .. }
                | LinkFrame::GetRoots { .. }
                | LinkFrame::Cosign { .. }
                | LinkFrame::ClaimKey { .. }
                | LinkFrame::TakeEpoch { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn envelope(admission: Admission) -> FedEnvelope {
        FedEnvelope {
            id: EnvelopeId([3; 16]),
            to: "bob@b.example".into(),
            class: Class::Durable,
            ttl_secs: 60,
            copies: vec![Copy {
                device: DeviceId(2),
                ciphertext: vec![9; 5],
            }],
            admission,
        }
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            LinkFrame::Txn {
                txn_id: 7,
                envelopes: vec![
                    envelope(Admission::Origin),
                    envelope(Admission::Token(vec![1; 32])),
                    envelope(Admission::Open),
                ],
            },
            LinkFrame::GroupTxn {
                txn_id: 8,
                entries: vec![FedGroupEnvelope {
                    id: EnvelopeId([4; 16]),
                    class: Class::Durable,
                    ttl_secs: 90,
                    ciphertext: vec![7; 9],
                    recipients: vec![
                        FedRecipient {
                            to: "bob@b.example".into(),
                            devices: vec![DeviceId(1), DeviceId(2)],
                            admission: Admission::Origin,
                        },
                        FedRecipient {
                            to: "carol@b.example".into(),
                            devices: vec![DeviceId(1)],
                            admission: Admission::Token(vec![2; 32]),
                        },
                    ],
                }],
            },
            LinkFrame::GetDevices {
                req_id: 1,
                user: "bob@b.example".into(),
            },
            LinkFrame::GetDeviceList {
                req_id: 2,
                user: "bob@b.example".into(),
            },
            LinkFrame::ClaimKey {
                req_id: 3,
                user: "bob@b.example".into(),
                device: 4,
                admission: Admission::Token(vec![5; 16]),
                key_package: false,
            },
            LinkFrame::ClaimKey {
                req_id: 4,
                user: "bob@b.example".into(),
                device: 4,
                admission: Admission::Open,
                key_package: true,
            },
            LinkFrame::TxnAck {
                txn_id: 7,
                codes: vec![None, Some(ErrorCode::StaleDevices)],
            },
            LinkFrame::Devices {
                req_id: 1,
                devices: vec![RemoteDevice {
                    device: 1,
                    identity_keys: vec![1, 2],
                }],
            },
            LinkFrame::DeviceList {
                req_id: 2,
                signed: vec![8; 40],
                evidence: vec![9; 3],
            },
            LinkFrame::GetRoots {
                req_id: 5,
                from: 3,
                to: 0,
            },
            LinkFrame::Cosign {
                req_id: 6,
                cosignatures: vec![vec![1; 3], vec![2; 4]],
            },
            LinkFrame::Roots {
                req_id: 5,
                roots: vec![vec![1; 3]],
                proof: vec![],
            },
            LinkFrame::Noted { req_id: 6 },
            LinkFrame::Claimed {
                req_id: 3,
                key_id: 99,
                key: vec![1],
                fallback: true,
            },
            LinkFrame::TakeEpoch {
                req_id: 8,
                group: vec![5; 16],
                epoch: 3,
                id: EnvelopeId([6; 16]),
            },
            LinkFrame::Epoch {
                req_id: 8,
                taken: false,
                current: 4,
            },
            LinkFrame::Refused {
                req_id: 3,
                code: ErrorCode::NotFound,
            },
            LinkFrame::LinkError {
                code: ErrorCode::MalformedFrame,
                message: "x".into(),
            },
        ];
        for frame in frames {
            assert_eq!(LinkFrame::decode(&frame.encode()).unwrap(), frame);
        }
        let hs = [
            HandshakeFrame::Hello {
                origin: "a.example".into(),
                target: "b.example".into(),
                noise: vec![1; 48],
            },
            HandshakeFrame::Welcome { noise: vec![2; 48] },
            HandshakeFrame::Refuse {
                code: ErrorCode::UnknownPeer,
                message: "unknown".into(),
            },
        ];
        for frame in hs {
            assert_eq!(HandshakeFrame::decode(&frame.encode()).unwrap(), frame);
        }
    }

    #[test]
    fn no_frame_names_a_sender() {
        // The envelope body is exactly: id, recipient, class, ttl, copies, admission, token.
        let bytes = LinkFrame::Txn {
            txn_id: 1,
            envelopes: vec![envelope(Admission::Origin)],
        }
        .encode();
        // array(2) [txn_id, array(1) [array(7) ...]]
        assert_eq!(&bytes[2..6], &[0x92, 0x01, 0x91, 0x97]);
    }

    #[test]
    fn rejects_mismatched_admission_and_bad_headers() {
        let bad = encode(
            TXN,
            &TxnBody(
                1,
                vec![EnvelopeBody(
                    EnvelopeId([0; 16]),
                    "a@b".into(),
                    Class::Durable,
                    1,
                    vec![],
                    1,
                    None,
                )],
            ),
        );
        assert!(matches!(
            LinkFrame::decode(&bad),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(LinkFrame::decode(&[1]), Err(DecodeError::Truncated));
        assert_eq!(
            LinkFrame::decode(&[2, TXN, 0x90]),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            LinkFrame::decode(&[1, HELLO, 0x90]),
            Err(DecodeError::UnknownFrameType(HELLO))
        );
        assert_eq!(
            HandshakeFrame::decode(&[1, TXN, 0x90]),
            Err(DecodeError::UnknownFrameType(TXN))
        );
        let big = vec![1u8; MAX_HANDSHAKE_FRAME_BYTES + 1];
        assert!(matches!(
            HandshakeFrame::decode(&big),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn a_group_message_names_one_to_many_recipients() {
        let group =
            |ciphertext: usize, recipients: Vec<(String, Vec<DeviceId>, u8, Option<ByteBuf>)>| {
                encode(
                    GROUP_TXN,
                    &GroupTxnBody(
                        1,
                        vec![GroupEnvelopeBody(
                            EnvelopeId([0; 16]),
                            Class::Durable,
                            1,
                            ByteBuf::from(vec![1; ciphertext]),
                            recipients,
                        )],
                    ),
                )
            };
        let to = |devices: Vec<u32>| {
            (
                "a@b".to_owned(),
                devices.into_iter().map(DeviceId).collect(),
                0u8,
                None,
            )
        };
        assert!(LinkFrame::decode(&group(10, vec![to(vec![1, 2])])).is_ok());
        for bad in [
            group(10, vec![]),
            group(10, vec![to(vec![1]); MAX_GROUP_RECIPIENTS + 1]),
            group(MAX_GROUP_CIPHERTEXT_BYTES + 1, vec![to(vec![1])]),
            group(10, vec![to(vec![1, 1])]),
            group(10, vec![to(vec![])]),
            group(10, vec![to((1..=17).collect())]),
            group(10, vec![to((1..=16).collect()); 251]),
        ] {
            assert!(matches!(
                LinkFrame::decode(&bad),
                Err(DecodeError::Malformed(_))
            ));
        }
    }

    #[test]
    fn prologue_binds_both_domains_in_order() {
        assert_ne!(prologue("a.x", "b.x"), prologue("b.x", "a.x"));
        assert_ne!(prologue("a.x", "b.x"), prologue("a.xb", ".x"));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = LinkFrame::decode(&bytes);
            let _ = HandshakeFrame::decode(&bytes);
        }
    }
}
