//! Stored records: versioned, separate from live actor state and from wire types.
//!
//! Each record is MessagePack, a positional array whose first element is the record version.
//! Decoding rejects versions this build does not know (a future migration reads old ones).

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::StoreError;

/// Version written by this build for every record type.
pub(crate) const RECORD_VERSION: u8 = 1;

/// An account. The handle is the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    /// Record version.
    pub version: u8,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// The next device id to hand out; ids are never reused, so an old token can never
    /// authenticate a newer device.
    pub next_device: u32,
}

/// A device of an account.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Record version.
    pub version: u8,
    /// Keyed BLAKE3 hash of the device's auth token (never the token itself).
    pub token_hash: [u8; 32],
    /// The device's public identity keys, opaque to the broker, published with the device list.
    #[serde(with = "serde_bytes")]
    pub identity_keys: Vec<u8>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

impl DeviceRecord {
    /// A device record for unit tests that never look inside it.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        DeviceRecord {
            version: RECORD_VERSION,
            token_hash: [0; 32],
            identity_keys: vec![1],
            created_ms: 0,
        }
    }
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("created_ms", &self.created_ms)
            .finish_non_exhaustive()
    }
}

/// The persistent state of one device queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeadRecord {
    /// Record version.
    pub version: u8,
    /// Sequence number the next appended envelope gets. Starts at 1; never goes back, even
    /// when the queue is empty, so a device never sees a sequence number reused.
    pub next_seq: u64,
    /// Envelopes currently stored in the queue.
    pub count: u64,
    /// Ciphertext bytes currently stored in the queue.
    pub bytes: u64,
}

/// One stored envelope copy in a device queue.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeRecord {
    /// Record version.
    pub version: u8,
    /// The client's envelope id.
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// Delivery class (wire value).
    pub class: u8,
    /// When the broker accepted it, ms since the Unix epoch.
    pub accepted_ms: u64,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Opaque ciphertext.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for EnvelopeRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeRecord")
            .field("expires_ms", &self.expires_ms)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// What an accepted send stored, kept so a retry with the same id returns the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    /// Record version.
    pub version: u8,
    /// When this record may be forgotten, ms since the Unix epoch.
    pub expires_ms: u64,
    /// The (device, seq) pairs the send was stored at.
    pub stored: Vec<(u32, u64)>,
    /// When the send's envelopes expire, if the sweep finds them through this record (sled
    /// layout 3: one expiry index entry per send, first at this time, then at `expires_ms`).
    /// 0 in records written before (each envelope had its own index entry).
    #[serde(default)]
    pub envelopes_expire_ms: u64,
}

/// The sled backend's word on a user's queues after its last committed send (layout 5; one
/// per user, overwritten by every send after its envelopes): every queue's end, so that
/// envelopes past it are known for a torn send's and no sequence number is handed out twice;
/// and the sends not yet listed in a page, so that a crash forgets none of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastSendRecord {
    /// Record version.
    pub version: u8,
    /// Per device queue: (device, next sequence number, first sequence number not listed in
    /// a page).
    pub queues: Vec<(u32, u64, u64)>,
    /// The keyed ids of the sends not yet listed in a page, 16 bytes each, in order.
    #[serde(with = "serde_bytes")]
    pub unpaged: Vec<u8>,
    /// How long a retry of the last send is answered as a duplicate (the dedup window).
    pub dedup_window_ms: u64,
}

impl LastSendRecord {
    /// The next sequence number of `device`'s queue, if this record names the queue.
    pub fn end(&self, device: u32) -> Option<u64> {
        self.queues
            .iter()
            .find(|(d, _, _)| *d == device)
            .map(|(_, end, _)| *end)
    }

    /// The first sequence number of `device`'s queue not listed in a page (0 if this record
    /// does not name the queue).
    pub fn paged_from(&self, device: u32) -> u64 {
        self.queues
            .iter()
            .find(|(d, _, _)| *d == device)
            .map_or(0, |(_, _, paged)| *paged)
    }

    /// The keyed ids of the sends not yet listed in a page.
    pub fn unpaged(&self) -> impl Iterator<Item = [u8; 16]> + '_ {
        self.unpaged
            .chunks_exact(16)
            .filter_map(|id| id.try_into().ok())
    }
}

/// Sends of one user listed together (sled layout 5): what the expiry sweep needs to find
/// their envelopes, and what the user's writer remembers to deduplicate retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRecord {
    /// Record version.
    pub version: u8,
    /// The sends, in the order they were made.
    pub sends: Vec<PagedSend>,
}

/// One send in a [`PageRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedSend {
    /// The keyed hash of its envelope id.
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// Until when a retry of it is answered as a duplicate.
    pub dedup_until_ms: u64,
    /// When its envelopes expire.
    pub envelopes_expire_ms: u64,
    /// (device, seq) of its envelopes; empty once the sweep has expired them.
    pub stored: Vec<(u32, u64)>,
}

/// A device's fallback key: handed out when its one-time keys run out, and not consumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackKeyRecord {
    /// Record version.
    pub version: u8,
    /// Client-chosen key id.
    pub key_id: u64,
    /// The key, opaque to the broker (signed by the device).
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

/// Admission of sealed envelopes to an account: the keyed hash of the delivery token the user
/// hands to its contacts, and whether envelopes from anyone (no token) are accepted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryTokenRecord {
    /// Record version.
    pub version: u8,
    /// Keyed BLAKE3 hash of the token's proof (`crypto::delivery_proof`), if one is set; of
    /// the token itself in records written before proofs (`of_proof` false).
    pub token_hash: Option<[u8; 32]>,
    /// Accept sealed envelopes without a token (rate-limited).
    pub unrestricted: bool,
    /// Whether `token_hash` is of the proof. Absent (false) in older records.
    #[serde(default)]
    pub of_proof: bool,
}

/// A device's push subscription (RFC 8030 endpoint and RFC 8291 keys): where the broker posts
/// a content-free wake-up when an envelope arrives while the device is not connected.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRecord {
    /// Record version.
    pub version: u8,
    /// The push service's URL for this device (https; it names the device at that service).
    pub endpoint: String,
    /// The device's P-256 public key for message encryption (uncompressed point, 65 bytes).
    #[serde(with = "serde_bytes")]
    pub p256dh: Vec<u8>,
    /// The device's authentication secret for message encryption (16 bytes).
    #[serde(with = "serde_bytes")]
    pub auth: Vec<u8>,
    /// Web Push (a browser) or UnifiedPush (a distributor on another client): the same
    /// protocol, counted apart.
    pub kind: PushKind,
}

/// Who serves a push subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushKind {
    /// A browser's push service (`PushManager.subscribe`).
    WebPush,
    /// A UnifiedPush distributor (ntfy, NextPush, …).
    UnifiedPush,
}

impl std::fmt::Debug for PushRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushRecord")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A pending link code: lets one new device join the account once, before it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCodeRecord {
    /// Record version.
    pub version: u8,
    /// Expiry, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// A group at its hub: the epoch its next Commit must name, and which send took the last one.
/// The group id (random, opaque) is the key; nothing else of the group is known here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Record version.
    pub version: u8,
    /// The epoch the group is in: the next Commit must name it.
    pub epoch: u64,
    /// The envelope id of the Commit that moved the group into `epoch` (its retries are
    /// answered as taken).
    pub last_id: [u8; 16],
    /// When that happened, ms since the Unix epoch.
    pub updated_ms: u64,
}

/// What the hub answers a Commit that names an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochTaken {
    /// The Commit took the epoch (or is a retry of the one that did): fan it out.
    Taken,
    /// Another Commit took it, or the group is past it: the group is in `current`.
    Stale {
        /// The group's epoch now.
        current: u64,
    },
}

impl GroupRecord {
    /// Decides a Commit of send `id` naming `epoch` against the stored record (`None`: a group
    /// never seen, which starts at whatever epoch its first Commit names): the answer, and the
    /// record to store if it changed. The same for every backend, which make it atomic.
    pub(crate) fn take(
        stored: Option<&GroupRecord>,
        epoch: u64,
        id: [u8; 16],
        now_ms: u64,
    ) -> (EpochTaken, Option<GroupRecord>) {
        let next = || GroupRecord {
            version: RECORD_VERSION,
            epoch: epoch.saturating_add(1),
            last_id: id,
            updated_ms: now_ms,
        };
        match stored {
            None => (EpochTaken::Taken, Some(next())),
            Some(r) if r.epoch == epoch => (EpochTaken::Taken, Some(next())),
            Some(r) if r.epoch == epoch.saturating_add(1) && r.last_id == id => {
                (EpochTaken::Taken, None)
            }
            Some(r) => (EpochTaken::Stale { current: r.epoch }, None),
        }
    }
}

/// One envelope waiting in a federation outbox for its destination broker's acknowledgement.
/// It names the recipient and nothing about the sender.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// Record version.
    pub version: u8,
    /// The client's envelope id (the receiving broker deduplicates retries by it).
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// Recipient handle (on the destination domain).
    pub to: String,
    /// Delivery class (wire value).
    pub class: u8,
    /// When this broker accepted it, ms since the Unix epoch.
    pub accepted_ms: u64,
    /// When it expires, ms since the Unix epoch; it is dropped from the outbox then.
    pub expires_ms: u64,
    /// One (device, ciphertext) pair per recipient device.
    pub copies: Vec<(u32, serde_bytes::ByteBuf)>,
    /// How it was admitted: 0 an authenticated local account, 1 a delivery token, 2 none.
    pub admission: u8,
    /// The recipient's delivery token for admission 1, forwarded to the recipient's broker.
    pub token: Option<serde_bytes::ByteBuf>,
    /// For a group message: its recipients on the destination domain (then `to` is empty,
    /// `admission` and `token` unused, and `copies` holds the one ciphertext, under device 0).
    /// Absent from records written before group messages went once per domain.
    #[serde(default)]
    pub group: Option<Vec<OutboxRecipient>>,
}

/// A recipient of a group message in a federation outbox.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct OutboxRecipient {
    /// Recipient handle.
    pub to: String,
    /// Its devices that get a copy.
    pub devices: Vec<u32>,
    /// As [`OutboxRecord::admission`].
    pub admission: u8,
    /// As [`OutboxRecord::token`].
    pub token: Option<serde_bytes::ByteBuf>,
}

impl std::fmt::Debug for OutboxRecipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The handle is a recipient and the token a secret: counts only.
        f.debug_struct("OutboxRecipient")
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl OutboxRecord {
    /// Ciphertext bytes, for backlog accounting (a group message's once).
    pub fn size(&self) -> u64 {
        self.copies.iter().map(|(_, c)| c.len() as u64).sum()
    }

    /// The recipients this entry goes to: one for an envelope, many for a group message.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        let group = self.group.iter().flatten().map(|r| r.to.as_str());
        let one = self.group.is_none().then_some(self.to.as_str());
        one.into_iter().chain(group)
    }
}

impl std::fmt::Debug for OutboxRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRecord")
            .field("expires_ms", &self.expires_ms)
            .field("copies", &self.copies.len())
            .field("bytes", &self.size())
            .finish_non_exhaustive()
    }
}

pub(crate) fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    rmp_serde::to_vec(record).expect("store records always serialize")
}

pub(crate) fn decode<T: DeserializeOwned + Versioned>(bytes: &[u8]) -> Result<T, StoreError> {
    let record: T = rmp_serde::from_slice(bytes)
        .map_err(|e| StoreError::Corruption(format!("undecodable record: {e}")))?;
    if record.version() != RECORD_VERSION {
        return Err(StoreError::Corruption(format!(
            "unknown record version {}",
            record.version()
        )));
    }
    Ok(record)
}

/// Records that carry a version.
pub(crate) trait Versioned {
    fn version(&self) -> u8;
}

macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn version(&self) -> u8 {
                self.version
            }
        }
    )*};
}

versioned!(
    AccountRecord,
    DeviceRecord,
    HeadRecord,
    EnvelopeRecord,
    DedupRecord,
    LastSendRecord,
    PageRecord,
    FallbackKeyRecord,
    DeliveryTokenRecord,
    LinkCodeRecord,
    OutboxRecord,
    GroupRecord,
    PushRecord
);

#[cfg(test)]
mod tests {
    use serde_bytes::ByteBuf;

    use super::*;

    #[test]
    fn an_outbox_record_of_an_earlier_release_reads_as_one_envelope() {
        // The nine fields an outbox record had before group messages went once per domain.
        let old = encode(&(
            RECORD_VERSION,
            ByteBuf::from(vec![1u8; 16]),
            "bob@b.example",
            0u8,
            5u64,
            9u64,
            vec![(1u32, ByteBuf::from(vec![2u8; 3]))],
            0u8,
            Option::<ByteBuf>::None,
        ));
        let record: OutboxRecord = decode(&old).expect("decodes");
        assert!(record.group.is_none());
        assert_eq!(record.recipients().collect::<Vec<_>>(), ["bob@b.example"]);
    }
}
