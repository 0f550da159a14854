//! Messages a mailbox handles. Each is answered by the mailbox actor alone, so their effects
//! on a user's queues are serialized.

use std::sync::Arc;

use actix::Message;
use sealpost_proto::{Class, CloseCode, Copy, DeviceId, EnvelopeId, SendOutcome};
use tokio::sync::oneshot;

use crate::store::{DeviceRecord, Due, KeyKind, StoreError};

/// Identifies one connection of a device, to tell a displaced connection from its successor.
pub type ConnId = u64;

/// A connected device session, as seen by its mailbox.
pub struct Conn {
    /// Unique per connection.
    pub id: ConnId,
    /// Encoded frames to write to the socket. Bounded: the mailbox uses `try_send`, and a full
    /// channel means a slow consumer, which is disconnected and resumes from the store.
    pub tx: super::push_queue::Sender,
    /// Tells the session to close with a reason (displaced, revoked, slow consumer).
    pub kick: oneshot::Sender<CloseCode>,
}

/// Attach a connected, authenticated device; its backlog starts flowing.
#[derive(Message)]
#[rtype(result = "Result<(), AttachError>")]
pub struct Attach {
    /// The device.
    pub device: DeviceId,
    /// Its connection.
    pub conn: Conn,
}

/// Why a device could not attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The device was removed after authenticating.
    #[error("device was removed")]
    UnknownDevice,
}

/// A connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach {
    /// The device.
    pub device: DeviceId,
    /// The connection that ended (ignored if the device has since reconnected).
    pub conn: ConnId,
}

/// Store an envelope for every device of this mailbox's user. Answered once durable.
#[derive(Message, Clone)]
#[rtype(result = "SendOutcome")]
pub struct Submit {
    /// Client envelope id.
    pub id: EnvelopeId,
    /// Delivery class.
    pub class: Class,
    /// Time-to-live, already validated against the class limits.
    pub ttl_secs: u32,
    /// One ciphertext per recipient device.
    pub copies: Arc<Vec<Copy>>,
    /// The peer domain a federated envelope came from (`None` for a local send). Its device
    /// set was checked where it was accepted, so the copies for the devices that still exist
    /// are stored instead of refusing a set that changed since; and its origin's envelopes
    /// are kept in order across a refusal as full (see `Mailbox::submit`).
    pub origin: Option<Arc<str>>,
}

/// A device acknowledges deliveries.
#[derive(Message)]
#[rtype(result = "Vec<u64>")]
pub struct Ack {
    /// The device.
    pub device: DeviceId,
    /// The connection the acks came on.
    pub conn: ConnId,
    /// Acknowledged sequence numbers. The answer lists those that were not outstanding.
    pub seqs: Vec<u64>,
    /// Also report those (a few) on the connection itself, as `unknown_seq` errors: set when
    /// nobody waits for the answer.
    pub report: bool,
}

/// Add a device to the account.
#[derive(Message)]
#[rtype(result = "Result<DeviceId, StoreError>")]
pub struct AddDevice {
    /// Its record.
    pub record: DeviceRecord,
    /// Per-account device limit.
    pub max_devices: usize,
}

/// Remove a device: its queue is deleted and its connection closed.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct RemoveDevice {
    /// The device.
    pub device: DeviceId,
}

/// Delete entries whose time-to-live has passed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Expire {
    /// Due entries of this user, from the expiry index.
    pub due: Vec<Due>,
}

/// A device uploads one-time keys and, optionally, a new fallback key. Answers the count of
/// one-time keys the device now holds.
#[derive(Message)]
#[rtype(result = "Result<u64, UploadError>")]
pub struct UploadKeys {
    /// The uploading device.
    pub device: DeviceId,
    /// Olm keys or MLS KeyPackages.
    pub kind: KeyKind,
    /// Most one-time keys a device may hold; an upload that would pass it stores nothing.
    pub max_held: u64,
    /// (key id, key) pairs, opaque to the broker.
    pub one_time: Vec<(u64, Vec<u8>)>,
    /// A new fallback key (key id, key).
    pub fallback: Option<(u64, Vec<u8>)>,
}

/// Why an upload of keys stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The device would hold more one-time keys than allowed (the limit).
    #[error("a device holds at most {0} one-time keys")]
    TooManyKeys(u64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Claim a key of a device to start a session with it: a one-time key (consumed) or, when
/// none are left, the fallback key.
#[derive(Message, Clone)]
#[rtype(result = "Result<Option<ClaimedKey>, StoreError>")]
pub struct ClaimKey {
    /// The device whose key is claimed.
    pub device: DeviceId,
    /// An Olm key or an MLS KeyPackage.
    pub kind: KeyKind,
}

/// A claimed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKey {
    /// Key id.
    pub key_id: u64,
    /// The key, opaque.
    pub key: Vec<u8>,
    /// True when this is the fallback key (the device had no one-time key left).
    pub fallback: bool,
}

/// Current device ids, for the device list endpoint and stale-set checks.
#[derive(Message)]
#[rtype(result = "Vec<DeviceId>")]
pub struct CurrentDevices;

/// Stop now: the store is about to be reopened, and an open mailbox holds the old one. Its
/// devices are sent away (`going_away`) and reconnect to a fresh mailbox.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Close every connection with a reason (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct KickAll {
    /// The reason.
    pub reason: CloseCode,
}
