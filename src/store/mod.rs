//! Durable state: accounts, devices and per-device envelope queues.
//!
//! This is the only module that imports sled. Everything above it talks to the [`Store`]
//! trait, which is shaped so that a replicated backend (NATS JetStream) can implement it:
//! writes are applied with [`Store::write`] and become durable when the future returned by
//! [`Store::sync`] resolves; callers acknowledge nothing before that.
//!
//! Key layouts live in [`keys`], record types in [`records`].

mod committer;
pub mod keys;
pub mod records;
mod sled_store;

use std::{future::Future, pin::Pin};

pub use records::{
    AccountRecord, DedupRecord, DeliveryTokenRecord, DeviceRecord, EnvelopeRecord,
    FallbackKeyRecord, HeadRecord, LinkCodeRecord, OutboxRecord,
};
pub use sled_store::{SledStore, StoreOptions};

/// Errors of the store, sorted by source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The storage engine or the file system failed (disk full, I/O error). Nothing written
    /// in the failed operation may be assumed durable.
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// A stored record could not be decoded: the data directory is damaged or was written by
    /// an incompatible version.
    #[error("stored data is corrupt: {0}")]
    Corruption(String),
    /// The account already exists.
    #[error("account already exists")]
    AccountExists,
    /// The account or device does not exist.
    #[error("no such account or device")]
    NotFound,
    /// The account has the maximum number of devices.
    #[error("too many devices")]
    TooManyDevices,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Corruption(e.to_string()),
            other => StoreError::Io(other.to_string()),
        }
    }
}

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Resolves when everything written before [`Store::sync`] was called is durable.
pub type Durable = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// One write operation of a [`QueueWrite`] batch.
#[derive(Debug)]
pub enum QueueOp {
    /// Store an envelope at `seq` of a device queue (and index its expiry).
    Append {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
        /// Sequence number.
        seq: u64,
        /// The envelope.
        record: EnvelopeRecord,
    },
    /// Delete an envelope (and its expiry index entry).
    Remove {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
        /// Sequence number.
        seq: u64,
        /// Its expiry, to find the index entry.
        expires_ms: u64,
    },
    /// Set a device queue's head.
    Head {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
        /// New head.
        head: HeadRecord,
    },
    /// Delete a device queue's head (the device was removed).
    DropHead {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
    },
    /// Remember an accepted send for deduplication (and index its expiry).
    Dedup {
        /// Account handle.
        user: String,
        /// Envelope id.
        id: [u8; 16],
        /// The record.
        record: DedupRecord,
    },
    /// Forget a dedup record.
    ForgetDedup {
        /// Account handle.
        user: String,
        /// Envelope id.
        id: [u8; 16],
        /// Its expiry, to find the index entry.
        expires_ms: u64,
    },
    /// Delete only an expiry index entry: its record is gone, or was written again with
    /// another expiry (a crash can leave an entry behind, since entries go first).
    Unindex(Expired),
}

/// Queue writes, applied in order; after a crash a prefix of them survives.
#[derive(Debug, Default)]
pub struct QueueWrite {
    /// The operations, applied in order.
    pub ops: Vec<QueueOp>,
}

impl QueueWrite {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Something due for expiry, found through the expiry index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired {
    /// An envelope copy.
    Envelope {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
        /// Sequence number.
        seq: u64,
        /// Its expiry.
        expires_ms: u64,
    },
    /// A dedup record.
    Dedup {
        /// Account handle.
        user: String,
        /// Envelope id.
        id: [u8; 16],
        /// Its expiry.
        expires_ms: u64,
    },
}

impl Expired {
    /// The account this entry belongs to.
    pub fn user(&self) -> &str {
        match self {
            Expired::Envelope { user, .. } | Expired::Dedup { user, .. } => user,
        }
    }
}

/// The broker's durable state. `Ok(None)` means "nothing stored"; `Err` means the store
/// failed.
///
/// Concurrency contract: each account's queue keys are written by one writer at a time (its
/// mailbox actor); account and device records are written under the store's own lock.
pub trait Store: Send + Sync + 'static {
    /// The account record of `user`.
    fn account(&self, user: &str) -> Result<Option<AccountRecord>>;
    /// Creates `user` with its first device; fails with `AccountExists` if taken.
    fn create_account(&self, user: &str, created_ms: u64, first: DeviceRecord) -> Result<u32>;
    /// Adds a device to `user`, returning its id.
    fn add_device(&self, user: &str, device: DeviceRecord, max_devices: usize) -> Result<u32>;
    /// Removes a device record (its queue is dropped by the caller with [`Store::write`]).
    fn remove_device(&self, user: &str, device: u32) -> Result<()>;
    /// One device record.
    fn device(&self, user: &str, device: u32) -> Result<Option<DeviceRecord>>;
    /// All devices of `user`, ordered by id.
    fn devices(&self, user: &str) -> Result<Vec<(u32, DeviceRecord)>>;

    /// Adds one-time keys to a device (replacing keys with the same ids); returns how many the
    /// device now has. Called by the user's mailbox, the single writer of its keys.
    fn put_one_time_keys(&self, user: &str, device: u32, keys: Vec<(u64, Vec<u8>)>) -> Result<u64>;
    /// Sets a device's fallback key.
    fn set_fallback_key(&self, user: &str, device: u32, key: FallbackKeyRecord) -> Result<()>;
    /// One-time key count and whether a fallback key is set.
    fn key_count(&self, user: &str, device: u32) -> Result<(u64, bool)>;
    /// Whether the device holds the one-time key `key_id`.
    fn has_one_time_key(&self, user: &str, device: u32, key_id: u64) -> Result<bool>;
    /// Removes and returns the device's lowest one-time key. Called only by the user's mailbox,
    /// so two claims never get the same key.
    fn take_one_time_key(&self, user: &str, device: u32) -> Result<Option<(u64, Vec<u8>)>>;
    /// The device's fallback key.
    fn fallback_key(&self, user: &str, device: u32) -> Result<Option<FallbackKeyRecord>>;
    /// Deletes all keys of a removed device.
    fn drop_device_keys(&self, user: &str, device: u32) -> Result<()>;
    /// The account's signed device list, opaque.
    fn device_list(&self, user: &str) -> Result<Option<Vec<u8>>>;
    /// Replaces the account's signed device list.
    fn set_device_list(&self, user: &str, signed: Vec<u8>) -> Result<()>;
    /// The account's sealed-sender admission record.
    fn delivery_token(&self, user: &str) -> Result<Option<DeliveryTokenRecord>>;
    /// Replaces the account's sealed-sender admission record.
    fn set_delivery_token(&self, user: &str, record: DeliveryTokenRecord) -> Result<()>;
    /// Stores a link code (by hash).
    fn put_link_code(&self, user: &str, code_hash: &[u8; 32], record: LinkCodeRecord)
    -> Result<()>;
    /// Consumes a link code: true if it existed and had not expired at `now_ms`.
    fn take_link_code(&self, user: &str, code_hash: &[u8; 32], now_ms: u64) -> Result<bool>;

    /// All queue heads of `user`.
    fn heads(&self, user: &str) -> Result<Vec<(u32, HeadRecord)>>;
    /// The envelope with the highest stored sequence number of a device queue.
    fn last_envelope(&self, user: &str, device: u32) -> Result<Option<(u64, EnvelopeRecord)>>;
    /// The lowest stored sequence number of a device queue.
    fn first_seq(&self, user: &str, device: u32) -> Result<Option<u64>>;
    /// Up to `limit` envelopes of a device queue with `seq >= from`, in order.
    fn read(
        &self,
        user: &str,
        device: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, EnvelopeRecord)>>;
    /// All stored sequence numbers of a device queue (used when a device is removed).
    fn seqs(&self, user: &str, device: u32) -> Result<Vec<(u64, u64)>>;
    /// The dedup record of a send.
    fn dedup(&self, user: &str, id: &[u8; 16]) -> Result<Option<DedupRecord>>;
    /// Applies the writes in order (not yet durable). After a crash, a prefix of the writes
    /// not yet synced survives; callers order their writes so that every prefix is
    /// consistent or repairable (a send's dedup record goes last and commits it: see
    /// `mailbox::recovery`).
    fn write(&self, batch: QueueWrite) -> Result<()>;
    /// Resolves once everything written so far is durable. Many calls share one flush.
    fn sync(&self) -> Durable;
    /// Up to `limit` index entries due at or before `now_ms`.
    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Expired>>;
    /// Whether there is room for new envelopes (free disk space above the configured floor).
    /// Sends are refused, not half-written, when there is not.
    fn has_room(&self) -> bool;
    /// Whether the last flush succeeded.
    fn healthy(&self) -> bool;
    /// Re-checks free disk space (called periodically).
    fn check_disk(&self);
    /// Approximate bytes the store occupies on disk.
    fn size_on_disk(&self) -> Result<u64>;

    /// Stores an envelope in the outbox of `domain` at `seq` (not yet durable: see
    /// [`Store::sync`]). Called only by that domain's federation peer, its single writer.
    fn outbox_put(&self, domain: &str, seq: u64, record: &OutboxRecord) -> Result<()>;
    /// Deletes acknowledged (or expired) entries of an outbox.
    fn outbox_remove(&self, domain: &str, seqs: &[u64]) -> Result<()>;
    /// Up to `limit` outbox entries with `seq >= from`, in order.
    fn outbox_read(
        &self,
        domain: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>>;
    /// Every entry of an outbox as (seq, accepted_ms, bytes), in order: what a peer needs to
    /// account for its backlog after a restart, without keeping ciphertext in memory.
    fn outbox_index(&self, domain: &str) -> Result<Vec<(u64, u64, u64)>>;
}
