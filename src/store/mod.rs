//! Durable state, behind seams cut by intent: [`Inbox`] (per-device envelope queues),
//! [`Directory`] (accounts, devices, keys, tokens), [`Outbox`] (federation queues per
//! destination domain), [`blobs::Blobs`] (attachments) and [`Health`]. Everything above this module talks to these traits
//! through a [`Stores`]; only the backends know how they keep their promises.
//!
//! ```text
//!  mailbox ──▶ Inbox::open(user) ──▶ UserInbox (one per mailbox: its single writer)
//!  gateway ──▶ Directory            federation peer ──▶ Outbox     server ──▶ Health
//!                  │                        │
//!        ┌─────────┴─────────┐     ┌────────┴─────────┐
//!   sled::SledStore (default)   memory::MemoryStore (unit tests, injectable faults)
//!                    nats::NatsStore (scale-out: many pods, one domain)
//! ```
//!
//! # Contract
//!
//! - Every future is `'static` and `Send`, so an actor can await it (`into_actor`) without
//!   borrowing the store; every trait is object-safe. A backend may do fast local work inline
//!   (sled does) and return a future that only waits for durability; a network backend does
//!   the work in the future.
//! - Writes resolve once durable. Nothing is acknowledged to anyone before that.
//! - Refusals a single writer must see before it handles its next message (a full queue, a
//!   short disk, a failed write) are answered at once, not from the future: a federation
//!   origin's envelopes are kept in order across a refusal only if the refusal is known
//!   before the next envelope is taken.
//! - A [`UserInbox`] is owned by its user's mailbox, the one writer of those queues. Its
//!   appends resolve in call order, and when one resolves, what it reports in
//!   [`Appended::durable`] is durable.
//!
//! # How each trait maps onto the backends
//!
//! | seam | sled ([`sled`], the embedded default) | NATS JetStream ([`nats`], scale-out) |
//! |---|---|---|
//! | [`Inbox::open`] | reads the heads, rolls back a send a crash tore (a prefix of unsynced writes survives: envelopes, heads, then the user's `L` record naming the queue ends, which commits them), pages again the sends a crashed writer had not paged, loads the recent pages' ids, waits for a flush if the last one failed | reads each device subject (batched direct get): its envelopes, its end, its head marker; nothing to repair: a publish is atomic |
//! | [`UserInbox::append`] | envelopes + heads + `L` (one per user, overwritten), written in commit order, and every 64 sends a page listing them; one group commit (flush + fsync) covers many appends | one publish per copy (`sp.in.<p>.<U>.<device>`), `Nats-Msg-Id` = envelope id + device for dedup, `Nats-Expected-Last-Subject-Sequence` so that two pods writing one queue number it without gaps, `Nats-TTL`; resolves on the publish acks (quorum) |
//! | [`UserInbox::duplicate`] | the writer's memory of the dedup window's ids (its sends, and the recent pages), or a send still being flushed; layout 4's dedup records while a user has them | the writer's memory of recent ids; otherwise the publish itself answers duplicate |
//! | quota ([`AppendError::Full`]) | per-device count and bytes in the heads | counts the writer read at open plus its own appends |
//! | [`UserInbox::read`] | range scan of `userdeviceseq_envelope` | batched direct get by subject from the cursor's stream sequence |
//! | [`UserInbox::trim`] | delete the envelopes (the head stays in memory: a checkpoint); a queue left empty has its key destroyed after the next flush (envelopes are sealed under a key per queue: crypto-shredding, `sled::keyring`) | a head marker if the queue drains, then delete (with erase) by stream sequence |
//! | [`Inbox::due`], [`UserInbox::expire`] | the `W` expiry index (one entry per page of sends, due when its first envelopes expire; a `Z` wake entry until the writer stores its page; layouts 2–4's `X`/`Y`/`Z` still swept), swept by the server | nothing due: the stream expires messages by their TTL |
//! | [`Directory`] | tree `accounts`, one lock for read-modify-write | KV bucket `sealpost_directory`; create/update on the revision = compare-and-set (device ids, key claims, link codes) |
//! | [`Outbox`] | tree `outbox`, one key per envelope | stream `SEALPOST_OUTBOX`, a subject per (domain, pod) |
//! | [`Health`] | free disk space and the last flush | the connection to NATS and the last write |
//!
//! Key layouts of the sled backend live in [`keys`] (one catalogue; the on-disk format),
//! record types in [`records`].

pub mod blobs;
#[doc(hidden)]
pub mod contract;
pub mod keys;
pub mod live;
pub mod memory;
pub mod nats;
pub mod records;
pub mod sled;
pub mod transparency;

use std::{future::Future, pin::Pin, sync::Arc};

pub use self::sled::{SledStore, StoreOptions};
pub use records::{
    AccountRecord, DeliveryTokenRecord, DeviceRecord, EnvelopeRecord, EpochTaken,
    FallbackKeyRecord, GroupRecord, LinkCodeRecord, OutboxRecord, PushKind, PushRecord,
};

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

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What every store operation returns: `'static`, so an actor can await it without borrowing
/// the store.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>;

/// A future that is already resolved (what a backend that works inline returns).
pub(crate) fn ready<T: Send + 'static>(result: Result<T>) -> StoreFuture<T> {
    Box::pin(std::future::ready(result))
}

/// The store's seams, as the broker holds them.
#[derive(Clone)]
pub struct Stores {
    /// Per-device envelope queues.
    pub inbox: Arc<dyn Inbox>,
    /// Accounts, devices, keys, tokens, link codes.
    pub directory: Arc<dyn Directory>,
    /// Federation queues per destination domain.
    pub outbox: Arc<dyn Outbox>,
    /// Room and flush state.
    pub health: Arc<dyn Health>,
    /// Wakes the holders of devices' sockets, in whatever process they are.
    pub live: Arc<dyn live::LiveDelivery>,
    /// Attachment blobs (every backend the server opens has them; `None` in stores built
    /// for tests without them, where the blob routes answer that they are unavailable).
    pub blobs: Option<Arc<dyn blobs::Blobs>>,
}

impl Stores {
    /// The four storage seams served by one backend, with live delivery inside this process.
    pub fn from_backend<B: Inbox + Directory + Outbox + Health>(backend: Arc<B>) -> Self {
        Stores {
            inbox: backend.clone(),
            directory: backend.clone(),
            outbox: backend.clone(),
            health: backend,
            live: live::InProcess::new(),
            blobs: None,
        }
    }

    /// The same stores with attachment blobs.
    pub fn with_blobs(self, blobs: Arc<dyn blobs::Blobs>) -> Self {
        Stores {
            blobs: Some(blobs),
            ..self
        }
    }

    /// The same stores with another live-delivery seam.
    pub fn with_live(self, live: Arc<dyn live::LiveDelivery>) -> Self {
        Stores { live, ..self }
    }
}

// ---------------------------------------------------------------------------------------
// Inbox

/// Per-device queue limits, enforced by the backend at append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most envelopes per device queue.
    pub count: u64,
    /// Most ciphertext bytes per device queue.
    pub bytes: u64,
}

/// An envelope to store, one copy per device.
#[derive(Debug)]
pub struct NewEnvelope<'a> {
    /// The client's envelope id: appends are idempotent by it.
    pub id: [u8; 16],
    /// Delivery class (wire value).
    pub class: u8,
    /// When the broker accepted it, ms since the Unix epoch.
    pub accepted_ms: u64,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Until when a retry of its id is answered as a duplicate (the dedup window; its
    /// envelopes may expire before or after).
    pub remember_until_ms: u64,
    /// (device, ciphertext) per copy; every device's queue is open.
    pub copies: Vec<(u32, &'a [u8])>,
}

/// Where an envelope's copies are stored: (device, seq) per copy.
pub type Placement = Vec<(u32, u64)>;

/// The answer to an append, once durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// True when the envelope id had been appended before: nothing new was stored.
    pub duplicate: bool,
    /// (device, seq) of each stored copy (for a duplicate, the original's where the backend
    /// still has it; possibly none).
    pub stored: Placement,
    /// (device, seq): every envelope of that device queue below `seq` is durable now. Covers
    /// at least `stored`, and may cover earlier appends whose own answer was a failure (their
    /// writes became durable with this one).
    pub durable: Vec<(u32, u64)>,
}

/// Why an append stored nothing, known at once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// These devices' queues are at their quota ([`QueueLimits`]).
    #[error("device queue full")]
    Full(Vec<u32>),
    /// The store is short of room (free disk space under its floor): refused rather than
    /// risk losing what was acknowledged.
    #[error("store short of room")]
    NoRoom,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One delivered envelope a device acknowledged, as it was appended or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trim {
    /// Its sequence number.
    pub seq: u64,
    /// Its expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Its ciphertext length (for the queue's byte count).
    pub bytes: u64,
}

/// Something a backend found due for expiry, for the user's writer to expire
/// ([`UserInbox::expire`]). Opaque but for its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
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
    /// A deduplication record.
    Dedup {
        /// Account handle.
        user: String,
        /// The envelope id, or what the backend keys it by (sled: its keyed hash).
        id: [u8; 16],
        /// Its expiry.
        expires_ms: u64,
    },
    /// Sends indexed together: those of one user that fall due by `due_ms` (none: the
    /// user's writer lists sends in memory, the first due by then).
    Sends {
        /// Account handle.
        user: String,
        /// When they are due: what is due by then goes.
        due_ms: u64,
        /// Which of the user's entries this is (sled: a random nonce in its key).
        entry: u64,
        /// The envelope ids, or what the backend keys them by (sled: their keyed hashes).
        ids: Vec<[u8; 16]>,
    },
    /// A page of sends listed together (sled: `P`), due at `due_ms`.
    Page {
        /// Account handle.
        user: String,
        /// When it is due.
        due_ms: u64,
        /// Which of the user's pages.
        page: u64,
    },
}

impl Due {
    /// The account this entry belongs to.
    pub fn user(&self) -> &str {
        match self {
            Due::Envelope { user, .. }
            | Due::Dedup { user, .. }
            | Due::Sends { user, .. }
            | Due::Page { user, .. } => user,
        }
    }
}

/// The per-device envelope queues of all accounts.
pub trait Inbox: Send + Sync + 'static {
    /// Opens `user`'s queues for its single writer: one queue per device in `devices` (from
    /// the directory), with any repair a crash calls for done inside. Resolves once what it
    /// reports is durable.
    fn open(
        &self,
        user: &str,
        devices: &[u32],
        limits: QueueLimits,
    ) -> StoreFuture<Box<dyn UserInbox>>;
    /// Up to `limit` entries due at `now_ms`, for their users' writers. Always empty for a
    /// backend that expires by itself.
    fn due(&self, now_ms: u64, limit: usize) -> StoreFuture<Vec<Due>>;
}

/// One user's device queues, held by their single writer (the user's mailbox).
pub trait UserInbox: Send + 'static {
    /// Per open device queue, the sequence number its next envelope gets: everything stored
    /// is below it (and durable, right after [`Inbox::open`]).
    fn ends(&self) -> Vec<(u32, u64)>;
    /// Opens an empty queue for a new device; answers its end (see [`UserInbox::ends`]).
    fn add_queue(&mut self, device: u32) -> u64;
    /// If `id` was appended before (or is being appended), the original answer, once
    /// durable. Lets the writer answer a retry before checking anything else.
    fn duplicate(&mut self, id: &[u8; 16]) -> Result<Option<StoreFuture<Appended>>>;
    /// Appends an envelope's copies, idempotently by its id: refused at once (nothing
    /// stored), or resolves once durable with the assigned sequence numbers (or the original
    /// answer, for a duplicate).
    fn append(&mut self, envelope: NewEnvelope<'_>) -> Result<StoreFuture<Appended>, AppendError>;
    /// Up to `limit` envelopes of a device queue with `seq >= from`, in order.
    fn read(&self, device: u32, from: u64, limit: usize)
    -> StoreFuture<Vec<(u64, EnvelopeRecord)>>;
    /// Deletes acknowledged envelopes of a device queue; resolves once the deletion is
    /// durable (so an acknowledged envelope is not delivered again after a crash).
    fn trim(&mut self, device: u32, acked: &[Trim]) -> Result<StoreFuture<()>>;
    /// Deletes a removed device's queue; resolves once durable.
    fn drop_queue(&mut self, device: u32) -> Result<StoreFuture<()>>;
    /// Expires what is due of this user (from [`Inbox::due`]); answers the (device, seq) of
    /// the envelopes it deleted. Deletions ride the next durable write.
    fn expire(&mut self, due: Vec<Due>) -> Result<Vec<(u32, u64)>>;
    /// A device queue's end as the store has it now: below it everything stored is durable.
    /// Beyond [`UserInbox::ends`] when another writer (in another process) appended.
    fn end(&self, device: u32) -> StoreFuture<u64> {
        let end = self
            .ends()
            .into_iter()
            .find(|(d, _)| *d == device)
            .map_or(1, |(_, end)| end);
        ready(Ok(end))
    }
    /// The writer is done with the queues (its mailbox stops): state it kept in memory is
    /// stored, so that the next writer opens them without recounting. Not called when the
    /// writer crashes; rides the next durable write.
    fn close(self: Box<Self>) {}
}

// ---------------------------------------------------------------------------------------
// Directory

/// Which of a device's published key sets: each kind has its own one-time keys and its own
/// fallback key, claimed independently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    /// Olm one-time keys and the fallback key (1:1 sessions).
    Olm,
    /// MLS KeyPackages (groups): one-time ones and a last-resort one.
    Mls,
}

impl KeyKind {
    /// The kind a federation claim asks for (`claim_key_package` or `claim_key`).
    pub fn of(key_package: bool) -> Self {
        if key_package {
            KeyKind::Mls
        } else {
            KeyKind::Olm
        }
    }
}

/// A device's key counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCount {
    /// One-time keys held.
    pub one_time: u64,
    /// Whether a fallback key is set.
    pub fallback: bool,
}

/// Keys a device uploads.
#[derive(Debug, Clone)]
pub struct KeyUpload {
    /// (key id, key) pairs; keys under ids already held replace them (a retry).
    pub one_time: Vec<(u64, Vec<u8>)>,
    /// A new fallback key.
    pub fallback: Option<FallbackKeyRecord>,
    /// Most one-time keys the device may hold: an upload that would pass it stores nothing.
    pub max_held: u64,
}

/// The answer to a key upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysPut {
    /// Stored; the device now holds this many one-time keys.
    Held(u64),
    /// Refused: the device would hold more than `max_held`.
    OverLimit,
}

/// A claimed key of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// Key id.
    pub key_id: u64,
    /// The key, opaque.
    pub key: Vec<u8>,
    /// True when this is the fallback key (no one-time key was left).
    pub fallback: bool,
    /// One-time keys left after the claim.
    pub left: u64,
}

/// Accounts, devices, their keys, device lists, delivery tokens and link codes. Writes
/// resolve once durable; read-modify-writes (device ids, key claims, link codes) are atomic
/// in the backend, whoever calls them.
pub trait Directory: Send + Sync + 'static {
    /// The account record of `user`.
    fn account(&self, user: &str) -> StoreFuture<Option<AccountRecord>>;
    /// Creates `user` with its first device (id 1); fails with `AccountExists` if taken.
    fn create_account(&self, user: &str, created_ms: u64, first: DeviceRecord) -> StoreFuture<u32>;
    /// Adds a device to `user`, returning its id (ids are never reused).
    fn add_device(&self, user: &str, device: DeviceRecord, max_devices: usize) -> StoreFuture<u32>;
    /// Removes a device and its keys.
    fn remove_device(&self, user: &str, device: u32) -> StoreFuture<()>;
    /// One device record.
    fn device(&self, user: &str, device: u32) -> StoreFuture<Option<DeviceRecord>>;
    /// All devices of `user`, ordered by id.
    fn devices(&self, user: &str) -> StoreFuture<Vec<(u32, DeviceRecord)>>;
    /// Stores uploaded keys, unless they would pass the limit.
    fn put_keys(
        &self,
        user: &str,
        device: u32,
        kind: KeyKind,
        upload: KeyUpload,
    ) -> StoreFuture<KeysPut>;
    /// A device's key counts.
    fn key_count(&self, user: &str, device: u32, kind: KeyKind) -> StoreFuture<KeyCount>;
    /// Claims a key: the lowest one-time key (consumed, atomically: never handed out twice)
    /// or, when none is left, the fallback key (kept).
    fn claim_key(&self, user: &str, device: u32, kind: KeyKind) -> StoreFuture<Option<Claimed>>;
    /// At a group's hub: takes `epoch` of `group` for the Commit sent as `id`, atomically —
    /// the first Commit of an epoch (and its retries) wins, every other is answered the
    /// group's current epoch ([`records::GroupRecord::take`]).
    fn take_epoch(
        &self,
        group: &[u8],
        epoch: u64,
        id: [u8; 16],
        now_ms: u64,
    ) -> StoreFuture<EpochTaken>;
    /// The account's signed device list, opaque.
    fn device_list(&self, user: &str) -> StoreFuture<Option<Vec<u8>>>;
    /// Replaces the account's signed device list.
    fn set_device_list(&self, user: &str, signed: Vec<u8>) -> StoreFuture<()>;
    /// The push subscription `device` registered, if any.
    fn push_subscription(&self, user: &str, device: u32) -> StoreFuture<Option<PushRecord>>;
    /// Registers (`Some`) or removes (`None`) `device`'s push subscription. Removing the
    /// device removes it too.
    fn set_push_subscription(
        &self,
        user: &str,
        device: u32,
        record: Option<PushRecord>,
    ) -> StoreFuture<()>;
    /// The account's sealed-sender admission record.
    fn delivery_token(&self, user: &str) -> StoreFuture<Option<DeliveryTokenRecord>>;
    /// Replaces the account's sealed-sender admission record.
    fn set_delivery_token(&self, user: &str, record: DeliveryTokenRecord) -> StoreFuture<()>;
    /// Stores a link code (by hash).
    fn put_link_code(
        &self,
        user: &str,
        code_hash: [u8; 32],
        record: LinkCodeRecord,
    ) -> StoreFuture<()>;
    /// Consumes a link code: true if it existed and had not expired at `now_ms`.
    fn take_link_code(&self, user: &str, code_hash: [u8; 32], now_ms: u64) -> StoreFuture<bool>;
    /// Spends a one-time session ticket (its nonce) across every process sharing this store,
    /// remembered until `until_ms`: `Some(true)` the first time, `Some(false)` after. `None`:
    /// the store is one process's own, which remembers spent tickets itself.
    fn spend_ticket(&self, _nonce: [u8; 16], _until_ms: u64) -> StoreFuture<Option<bool>> {
        ready(Ok(None))
    }
}

// ---------------------------------------------------------------------------------------
// Outbox

/// What a federation peer keeps in memory of one outbox entry (never its ciphertext).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Its sequence number in the domain's outbox.
    pub seq: u64,
    /// When it was accepted, ms since the Unix epoch.
    pub accepted_ms: u64,
    /// Its ciphertext bytes.
    pub bytes: u64,
}

/// Federation outboxes, one per destination domain, each written by that domain's peer
/// alone. Sequence numbers grow per domain and are chosen by the peer. When a put (or
/// [`Outbox::durable`]) resolves, every earlier put to that outbox is durable too.
pub trait Outbox: Send + Sync + 'static {
    /// Every entry of a domain's outbox, in order: what a peer needs to account for its
    /// backlog after a restart.
    fn index(&self, domain: &str) -> StoreFuture<Vec<OutboxEntry>>;
    /// Stores an entry at `seq`: refused at once, or resolves once durable.
    fn put(&self, domain: &str, seq: u64, record: &OutboxRecord) -> Result<StoreFuture<()>>;
    /// Resolves once every entry put into this domain's outbox so far is durable.
    fn durable(&self, domain: &str) -> StoreFuture<()>;
    /// Up to `limit` entries with `seq >= from`, in order.
    fn read(&self, domain: &str, from: u64, limit: usize) -> StoreFuture<Vec<(u64, OutboxRecord)>>;
    /// Deletes acknowledged (or expired) entries; resolves once durable.
    fn remove(&self, domain: &str, seqs: &[u64]) -> Result<StoreFuture<()>>;
}

// ---------------------------------------------------------------------------------------
// Health

/// What the store knows of its own health, for refusing early and for readiness.
pub trait Health: Send + Sync + 'static {
    /// Whether there is room for new envelopes (free disk space above the configured floor).
    fn has_room(&self) -> bool;
    /// Whether the last flush succeeded.
    fn flush_ok(&self) -> bool;
    /// Re-checks free space (called periodically).
    fn check_room(&self);
    /// Approximate bytes the store occupies.
    fn size_on_disk(&self) -> Result<u64>;
    /// Resolves once everything accepted so far is durable (shutdown).
    fn flush(&self) -> StoreFuture<()>;
    /// Whether the store failed to make writes durable and, its cause gone (room again),
    /// should be reopened to accept writes again. The caller first stops everything that holds
    /// a user's open queues ([`Inbox::open`]).
    fn wants_reopen(&self) -> bool {
        false
    }
    /// Reopens the store (see [`Health::wants_reopen`]); fails while a user's queues are
    /// still open.
    fn reopen(&self) -> StoreFuture<()> {
        ready(Ok(()))
    }
}
