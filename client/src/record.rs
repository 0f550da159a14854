//! The SDK's persisted record, kept inside the encrypted state file
//! ([`ClientState::app_data`](crate::crypto::ClientState::app_data)) so that it is saved
//! atomically with the ratchets: credentials, delivery tokens, contacts, verified device lists,
//! recently handled envelope ids and conversations.
//!
//! MessagePack, structs as positional arrays; new fields go at the end with
//! `#[serde(default)]`. Secrets (`Secret`) are decoded straight into wiping buffers.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_bytes::ByteBuf;
use zeroize::Zeroizing;

use crate::crypto::{SeenIds, store::WipingWriter};

/// How many messages are kept per conversation.
pub(crate) const MESSAGES_PER_CONVERSATION: usize = 1000;
/// Held envelopes (see [`Record::hold`]): at most this many per sender, per sender domain,
/// in all, and in ciphertext bytes in all.
pub(crate) const HELD_PER_SENDER: usize = 32;
pub(crate) const HELD_PER_DOMAIN: usize = 64;
pub(crate) const HELD_ENVELOPES: usize = 256;
pub(crate) const HELD_BYTES: usize = 8 << 20;

/// Secret bytes: serialized as `bin`, held in a wiping buffer.
#[derive(Clone, Default)]
pub(crate) struct Secret(pub(crate) Zeroizing<Vec<u8>>);

impl Secret {
    pub(crate) fn new(bytes: &[u8]) -> Self {
        Self(Zeroizing::new(bytes.to_vec()))
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

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
}

/// A link code this device issued and has not yet seen used.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct PendingLink {
    /// The part of the code the broker never sees.
    pub(crate) secret: Secret,
    pub(crate) expires_ms: u64,
}

/// The SDK record.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The broker's base URL.
    pub(crate) server: String,
    /// This device's auth token.
    pub(crate) device_token: Secret,
    /// The account's delivery token.
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
}

/// An envelope kept, still sealed, until it can be read.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct HeldEnvelope {
    /// The claimed sender.
    pub(crate) from: String,
    #[serde(with = "serde_bytes")]
    pub(crate) id: [u8; 16],
    pub(crate) ciphertext: ByteBuf,
}

impl Record {
    /// Encodes into a wiping buffer.
    pub(crate) fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = WipingWriter(Zeroizing::new(Vec::with_capacity(4096)));
        rmp_serde::encode::write(&mut out, self).expect("the record always encodes");
        out.0
    }

    /// Decodes; `None` if malformed.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        rmp_serde::from_slice(bytes).ok()
    }

    /// Keeps an envelope of `from` to read later, unless that would pass a bound: per
    /// sender, per sender domain, in all, or in bytes. Envelopes held already are never
    /// evicted for a new one (the first of a sender may be the pre-key message the rest
    /// need, and senders are only claimed at this point). Returns whether it was kept.
    pub(crate) fn hold(&mut self, from: &str, id: [u8; 16], ciphertext: &[u8]) -> bool {
        let domain = |h: &str| h.rsplit_once('@').map(|(_, d)| d.to_owned());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut record = Record {
            server: "http://127.0.0.1:1".into(),
            device_token: Secret::new(&[1; 32]),
            ..Record::default()
        };
        record.seen.insert([7; 16]);
        record.add_message(
            "bob@b.example",
            StoredMessage {
                outgoing: true,
                device: 1,
                time_ms: 5,
                body: "hi".into(),
            },
        );
        let decoded = Record::decode(&record.encode()).expect("decodes");
        assert!(decoded.seen.contains(&[7; 16]));
        assert_eq!(decoded.device_token.0.as_slice(), &[1; 32]);
        assert_eq!(decoded.contacts["bob@b.example"].messages[0].body, "hi");
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
