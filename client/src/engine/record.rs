//! The engine's persisted record, kept inside the encrypted state file
//! ([`ClientState::app_data`](crate::crypto::ClientState::app_data)) so that it is saved
//! atomically with the ratchets: credentials, delivery tokens, contacts, verified device lists,
//! recently handled envelope ids, conversations, held envelopes and link state. One format for
//! the SDK's state file and the browser's saved state.
//!
//! MessagePack, structs as positional arrays; new fields go at the end with
//! `#[serde(default)]`, so a record written before a field existed still loads. Secrets
//! (`Secret`) are decoded straight into wiping buffers.
//!
//! # Versions
//!
//! | written by | layout |
//! |---|---|
//! | the SDK before the engine (fixture `client/tests/fixtures/sdk-v1`) | this one without `linking` and `approving` (and older: without `held`) |
//! | the browser before the engine (fixture `client/tests/fixtures/browser-v1`) | `LegacyBrowserRecord`: lists inside contacts, no server; read by `Record::decode` and converted |
//!
//! The two old layouts cannot be taken for one another: the SDK's starts with a string and
//! has an integer third, the browser's starts with bytes and has a map fourth; a decode of
//! either with the other's layout fails on the first field that differs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use zeroize::Zeroizing;

pub(crate) use crate::crypto::store::SecretBytes as Secret;
use crate::crypto::{SeenIds, store::WipingWriter};

/// How many messages are kept per conversation.
pub(crate) const MESSAGES_PER_CONVERSATION: usize = 1000;
/// Held envelopes (see [`Record::hold`]): at most this many per sender, per sender domain,
/// in all, and in ciphertext bytes in all.
pub(crate) const HELD_PER_SENDER: usize = 32;
pub(crate) const HELD_PER_DOMAIN: usize = 64;
pub(crate) const HELD_ENVELOPES: usize = 256;
pub(crate) const HELD_BYTES: usize = 8 << 20;

/// A verified device list, as last accepted (its signature was checked and its version
/// recorded in the pins when it was fetched).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct CachedList {
    pub(crate) version: u64,
    /// (device id, `PublicDeviceKeys` encoding)
    pub(crate) devices: Vec<(u32, ByteBuf)>,
    pub(crate) master_key: ByteBuf,
    /// When it was fetched, ms since the Unix epoch (local clock).
    pub(crate) fetched_ms: u64,
}

/// One message of a conversation.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StoredMessage {
    /// True for messages this account sent (from any of its devices).
    pub(crate) outgoing: bool,
    /// The device that sent it.
    pub(crate) device: u32,
    /// The sender's clock, ms since the Unix epoch.
    pub(crate) time_ms: u64,
    pub(crate) body: String,
    /// The file it was, if it was one (`body` then says how it shows).
    #[serde(default)]
    pub(crate) file: Option<crate::crypto::FileRef>,
    /// Its envelope id (what receipts and expiry events name); `None` for messages stored
    /// before ids were kept.
    #[serde(default)]
    pub(crate) id: Option<ByteBuf>,
    /// Its delivery state ([`MessageState`](super::MessageState) on the wire, see
    /// [`STATE_UNKNOWN`] for messages stored before states were kept).
    #[serde(default = "unknown_state")]
    pub(crate) state: u8,
    /// When it disappears (ms since the Unix epoch, local clock), if the conversation had a
    /// disappearing-messages timer when it was stored.
    #[serde(default)]
    pub(crate) expires_ms: Option<u64>,
    /// `Some`: not a message but a change of the conversation's disappearing-messages timer
    /// (seconds, 0: off), by this account if `outgoing`.
    #[serde(default)]
    pub(crate) timer_secs: Option<u32>,
}

/// The state of a message stored before states were kept: shown as sent (outgoing) or read
/// (incoming).
pub(crate) const STATE_UNKNOWN: u8 = u8::MAX;

fn unknown_state() -> u8 {
    STATE_UNKNOWN
}

impl StoredMessage {
    /// A message (not a timer change) with no id, state or expiry yet.
    pub(crate) fn new(
        outgoing: bool,
        device: u32,
        time_ms: u64,
        body: String,
        file: Option<crate::crypto::FileRef>,
    ) -> Self {
        Self {
            outgoing,
            device,
            time_ms,
            body,
            file,
            id: None,
            state: STATE_UNKNOWN,
            expires_ms: None,
            timer_secs: None,
        }
    }

    /// Whether its envelope id is `id`.
    pub(crate) fn has_id(&self, id: &[u8; 16]) -> bool {
        self.id
            .as_ref()
            .is_some_and(|b| b.as_slice() == id.as_slice())
    }

    /// Its envelope id, if it has one.
    pub(crate) fn envelope_id(&self) -> Option<sealpost_proto::EnvelopeId> {
        let id = self.id.as_ref()?;
        <[u8; 16]>::try_from(id.as_slice())
            .ok()
            .map(sealpost_proto::EnvelopeId)
    }
}

/// A conversation's disappearing-messages timer, as last set by either side.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub(crate) struct DisappearingTimer {
    /// Seconds; 0: off.
    pub(crate) secs: u32,
    /// The setter's clock when it was set (ms since the Unix epoch): a later setting wins,
    /// so that two devices setting it at once end up agreeing.
    pub(crate) set_ms: u64,
}

/// Receipts this device owes one contact, waiting to be sent.
#[derive(Clone, Default, Serialize, Deserialize)]
pub(crate) struct OwedReceipts {
    /// Envelope ids of messages decrypted here.
    pub(crate) delivered: Vec<ByteBuf>,
    /// Envelope ids of messages the user marked read.
    pub(crate) read: Vec<ByteBuf>,
    /// When they go (ms since the Unix epoch, local clock): drawn when the first is owed.
    #[serde(default)]
    pub(crate) due_ms: u64,
}

/// What the account knows about one contact.
#[derive(Clone, Default, Serialize, Deserialize)]
pub(crate) struct Contact {
    /// The contact's delivery token: lets us send sealed envelopes to it.
    pub(crate) delivery_token: Option<Secret>,
    /// Whether this device has sent the contact our delivery token.
    pub(crate) token_shared: bool,
    /// Whether the user compared safety numbers.
    pub(crate) verified: bool,
    pub(crate) messages: VecDeque<StoredMessage>,
    /// A master key the contact's list was signed with that is not the pinned one, seen and
    /// not (yet) accepted: the user is shown the change until they accept it or the broker
    /// serves a list under the pinned key again.
    #[serde(default)]
    pub(crate) pending_master_key: Option<ByteBuf>,
    /// The conversation's disappearing-messages timer, once either side set one.
    #[serde(default)]
    pub(crate) disappearing: Option<DisappearingTimer>,
}

/// A link code this device issued and has not yet seen used.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct PendingLink {
    /// The part of the code the broker never sees.
    pub(crate) secret: Secret,
    pub(crate) expires_ms: u64,
}

/// A device whose link request this device accepted, waiting for its grant.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Approving {
    pub(crate) device: u32,
    /// The secret of the code it used.
    pub(crate) secret: Secret,
}

/// The record.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The broker's base URL (empty in the browser: the page's origin).
    pub(crate) server: String,
    /// This device's auth token.
    pub(crate) device_token: Secret,
    /// The account's delivery token (empty while this device is being linked).
    pub(crate) delivery_token: Secret,
    /// Next id for an uploaded one-time or fallback key.
    pub(crate) next_key_id: u64,
    pub(crate) contacts: BTreeMap<String, Contact>,
    /// Verified device lists by handle (contacts and the account itself).
    pub(crate) lists: BTreeMap<String, CachedList>,
    /// Envelope ids handled (or sent to ourselves).
    pub(crate) seen: SeenIds,
    pub(crate) pending_links: Vec<PendingLink>,
    /// Envelopes that cannot be read yet (the sender's key changed or its list is
    /// unavailable), oldest first.
    #[serde(default)]
    pub(crate) held: VecDeque<HeldEnvelope>,
    /// While this device is being linked: the link code's secret, until the grant came.
    #[serde(default)]
    pub(crate) linking: Option<Secret>,
    /// A device this one accepted, waiting for its grant.
    #[serde(default)]
    pub(crate) approving: Option<Approving>,
    /// Devices the broker has for an account (contacts and this one) that its signed list
    /// did not contain when we sent to it, and that the user was told about: each is
    /// reported once ([`Event::UnlistedDevices`](super::Event::UnlistedDevices)), and
    /// dropped from here once the list vouches for it.
    #[serde(default)]
    pub(crate) reported_unlisted: BTreeMap<String, BTreeSet<u32>>,
    /// Transcripts for this account's other devices, waiting for their time (see
    /// the `schedule` module), oldest first.
    #[serde(default)]
    pub(crate) transcripts: VecDeque<QueuedTranscript>,
    /// The device's MLS state (`crypto::group::GroupKeys::to_bytes`), once it has any.
    #[serde(default)]
    pub(crate) mls: Option<Secret>,
    /// Groups by hex id.
    #[serde(default)]
    pub(crate) groups: BTreeMap<String, GroupEntry>,
    /// Group messages of epochs this device has not reached yet, oldest first.
    #[serde(default)]
    pub(crate) group_held: VecDeque<HeldGroupMessage>,
    /// Next id of an uploaded KeyPackage (0: none uploaded yet).
    #[serde(default)]
    pub(crate) next_key_package_id: u64,
    /// Files being uploaded, by what identifies the file (path, length, modification time):
    /// an upload cut short goes on from where the broker has it.
    #[serde(default)]
    pub(crate) uploads: BTreeMap<String, PendingUpload>,
    /// The user turned read receipts off (none are sent, and others' are not shown).
    #[serde(default)]
    pub(crate) read_receipts_off: bool,
    /// Receipts owed to contacts, by contact, until the driver takes them.
    #[serde(default)]
    pub(crate) receipts: BTreeMap<String, OwedReceipts>,
    /// This device's message chains, by conversation (see the `chain` module).
    #[serde(default)]
    pub(crate) chains_out: BTreeMap<String, super::chain::ChainOut>,
    /// Contacts' devices' chains to this device, by contact and device.
    #[serde(default)]
    pub(crate) chains_in: BTreeMap<String, BTreeMap<u32, super::chain::ChainIn>>,
    /// Key transparency: the domains' logs as seen, and auditors' keys.
    #[serde(default)]
    pub(crate) logs: crate::crypto::transparency::LogPins,
    /// The newest version of this account's own log entry already checked.
    #[serde(default)]
    pub(crate) own_log_version: u64,
    /// Master keys this account made (earlier ones stay after a rotation).
    #[serde(default)]
    pub(crate) own_masters: Vec<ByteBuf>,
}

/// A file upload that has not finished.
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingUpload {
    /// The blob's id at the broker (base64url).
    pub id: String,
    /// The file's key (sealing again with it gives the same bytes).
    pub(crate) key: Secret,
}

impl PendingUpload {
    /// The file's key.
    pub fn key(&self) -> Option<crate::crypto::FileKey> {
        crate::crypto::FileKey::from_bytes(&self.key.0)
    }
}

/// One group, as this device keeps it.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct GroupEntry {
    /// The group's id (random; what the broker sees).
    pub(crate) id: ByteBuf,
    /// The domain whose broker orders its Commits.
    pub(crate) hub: String,
    /// Its name, as the members set it (the broker never sees it).
    pub(crate) name: String,
    pub(crate) messages: VecDeque<GroupMessage>,
    /// This device was removed (or left): kept for its history, sends refused.
    pub(crate) left: bool,
    /// Members' delivery tokens, as they shared them in the group: sends to them go sealed.
    #[serde(default)]
    pub(crate) tokens: BTreeMap<String, Secret>,
    /// Whether this account's token went to the group (when this device created it or first
    /// wrote to it: joining alone shares nothing, so that adding someone to a group does not
    /// hand the adder their token).
    #[serde(default)]
    pub(crate) token_shared: bool,
}

/// One message of a group.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct GroupMessage {
    pub(crate) from: String,
    pub(crate) device: u32,
    pub(crate) time_ms: u64,
    pub(crate) body: String,
}

/// A message held until its epoch is reached.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct HeldGroupMessage {
    #[serde(with = "serde_bytes")]
    pub(crate) id: [u8; 16],
    pub(crate) mls: ByteBuf,
}

/// A transcript of a text sent to a contact, queued for this account's other devices.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct QueuedTranscript {
    pub(crate) to: String,
    pub(crate) body: String,
    /// When it goes, ms since the Unix epoch (local clock).
    pub(crate) due_ms: u64,
    /// A file sent (then `body` is how it shows): the other devices can fetch it too.
    #[serde(default)]
    pub(crate) file: Option<crate::crypto::FileRef>,
}

/// An envelope kept, still sealed, until it can be read.
#[derive(Clone, Serialize, Deserialize)]
pub struct HeldEnvelope {
    /// The claimed sender.
    pub(crate) from: String,
    #[serde(with = "serde_bytes")]
    pub(crate) id: [u8; 16],
    pub(crate) ciphertext: ByteBuf,
}

impl HeldEnvelope {
    /// Its envelope id.
    pub fn id(&self) -> sealpost_proto::EnvelopeId {
        sealpost_proto::EnvelopeId(self.id)
    }

    /// The sealed envelope.
    pub fn ciphertext(&self) -> &[u8] {
        &self.ciphertext
    }
}

impl Record {
    /// The record of a device the broker at `server` just registered with `device_token`.
    pub(crate) fn new(server: &str, device_token: &[u8]) -> Self {
        Self {
            server: server.to_owned(),
            device_token: Secret::new(device_token),
            ..Self::default()
        }
    }

    /// Encodes into a wiping buffer.
    pub(crate) fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = WipingWriter(Zeroizing::new(Vec::with_capacity(4096)));
        rmp_serde::encode::write(&mut out, self).expect("the record always encodes");
        out.0
    }

    /// Decodes this layout or the browser's before it (see the module doc); `None` if
    /// malformed.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        rmp_serde::from_slice(bytes).ok().or_else(|| {
            rmp_serde::from_slice::<LegacyBrowserRecord>(bytes)
                .ok()
                .map(LegacyBrowserRecord::into_record)
        })
    }

    /// Keeps an envelope of `from` to read later, unless that would pass a bound: per
    /// sender, per sender domain, in all, or in bytes. Envelopes held already are never
    /// evicted for a new one (the first of a sender may be the pre-key message the rest
    /// need, and senders are only claimed at this point). Returns whether it was kept.
    pub(crate) fn hold(&mut self, from: &str, id: [u8; 16], ciphertext: &[u8]) -> bool {
        let from_domain = domain(from);
        let (mut sender, mut same_domain, mut bytes) = (0, 0, ciphertext.len());
        for held in &self.held {
            sender += usize::from(held.from == from);
            same_domain += usize::from(domain(&held.from) == from_domain);
            bytes += held.ciphertext.len();
        }
        if sender >= HELD_PER_SENDER
            || same_domain >= HELD_PER_DOMAIN
            || self.held.len() >= HELD_ENVELOPES
            || bytes > HELD_BYTES
        {
            return false;
        }
        self.held.push_back(HeldEnvelope {
            from: from.to_owned(),
            id,
            ciphertext: ByteBuf::from(ciphertext.to_vec()),
        });
        true
    }

    /// Whether envelopes of `from` are held.
    pub(crate) fn holds_from(&self, from: &str) -> bool {
        self.held.iter().any(|h| h.from == from)
    }

    /// Takes the envelopes held for `from`, oldest first.
    pub(crate) fn take_held(&mut self, from: &str) -> Vec<HeldEnvelope> {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.from == from);
        self.held = kept.into();
        taken
    }

    /// Puts taken envelopes back, in the given order (after the other senders').
    pub(crate) fn put_back(&mut self, envelopes: impl IntoIterator<Item = HeldEnvelope>) {
        self.held.extend(envelopes);
    }

    /// Appends a message to the conversation with `with` (bounded).
    pub(crate) fn add_message(&mut self, with: &str, message: StoredMessage) {
        let contact = self.contacts.entry(with.to_owned()).or_default();
        contact.messages.push_back(message);
        while contact.messages.len() > MESSAGES_PER_CONVERSATION {
            contact.messages.pop_front();
        }
    }
}

/// The domain part of a handle.
pub(crate) fn domain(handle: &str) -> &str {
    handle.rsplit_once('@').map_or("", |(_, d)| d)
}

/// The record the browser client kept before the engine was shared with the SDK: read only,
/// converted to a [`Record`] on load and saved in that layout from then on.
#[derive(Deserialize)]
struct LegacyBrowserRecord {
    device_token: Secret,
    delivery_token: Secret,
    next_key_id: u64,
    contacts: BTreeMap<String, LegacyBrowserContact>,
    seen: SeenIds,
    #[serde(default)]
    pending_links: Vec<(Secret, u64)>,
    #[serde(default)]
    linking: Option<Secret>,
    #[serde(default)]
    approving: Option<(u32, Secret)>,
}

/// A contact as the browser kept it: its verified list inside.
#[derive(Deserialize)]
struct LegacyBrowserContact {
    delivery_token: Option<Secret>,
    token_shared: bool,
    verified: bool,
    list: Option<CachedList>,
    messages: VecDeque<StoredMessage>,
}

impl LegacyBrowserRecord {
    fn into_record(self) -> Record {
        let mut contacts = BTreeMap::new();
        let mut lists = BTreeMap::new();
        for (handle, c) in self.contacts {
            if let Some(list) = c.list {
                lists.insert(handle.clone(), list);
            }
            contacts.insert(
                handle,
                Contact {
                    delivery_token: c.delivery_token,
                    token_shared: c.token_shared,
                    verified: c.verified,
                    messages: c.messages,
                    pending_master_key: None,
                    disappearing: None,
                },
            );
        }
        Record {
            server: String::new(),
            device_token: self.device_token,
            delivery_token: self.delivery_token,
            next_key_id: self.next_key_id,
            contacts,
            lists,
            seen: self.seen,
            pending_links: self
                .pending_links
                .into_iter()
                .map(|(secret, expires_ms)| PendingLink { secret, expires_ms })
                .collect(),
            held: VecDeque::new(),
            linking: self.linking,
            approving: self
                .approving
                .map(|(device, secret)| Approving { device, secret }),
            reported_unlisted: BTreeMap::new(),
            transcripts: VecDeque::new(),
            ..Record::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut record = Record {
            server: "http://127.0.0.1:1".into(),
            device_token: Secret::new(&[1; 32]),
            linking: Some(Secret::new(&[3; 16])),
            ..Record::default()
        };
        record.seen.insert([7; 16]);
        record.add_message(
            "bob@b.example",
            StoredMessage::new(true, 1, 5, "hi".into(), None),
        );
        let decoded = Record::decode(&record.encode()).expect("decodes");
        assert!(decoded.seen.contains(&[7; 16]));
        assert_eq!(decoded.device_token.0.as_slice(), &[1; 32]);
        assert_eq!(decoded.contacts["bob@b.example"].messages[0].body, "hi");
        assert_eq!(decoded.linking.expect("kept").0.as_slice(), &[3; 16]);
    }

    #[test]
    fn holding_refuses_new_envelopes_past_its_bounds_and_keeps_the_old_ones() {
        let mut record = Record::default();
        let id = |n: usize| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(n as u64).to_be_bytes());
            id
        };
        for n in 0..HELD_PER_SENDER {
            assert!(record.hold("mallory@evil.example", id(n), b"x"));
        }
        assert!(
            !record.hold("mallory@evil.example", id(99), b"x"),
            "per sender"
        );
        // Others of that domain: up to the domain's bound.
        for n in HELD_PER_SENDER..HELD_PER_DOMAIN {
            assert!(record.hold(&format!("m{n}@evil.example"), id(n), b"x"));
        }
        assert!(
            !record.hold("another@evil.example", id(100), b"x"),
            "per domain"
        );
        // Another domain is not crowded out, and nothing held was evicted.
        assert!(record.hold("bob@b.example", id(101), b"x"));
        assert_eq!(record.held.len(), HELD_PER_DOMAIN + 1);
        assert_eq!(record.held[0].id, id(0), "the first one is still there");
        let taken = record.take_held("mallory@evil.example");
        assert_eq!(taken.len(), HELD_PER_SENDER);
        assert!(taken.windows(2).all(|w| w[0].id < w[1].id), "in order");
    }
}
