//! Every name the JetStream backend uses — streams, subjects, headers, KV buckets and keys — in
//! one place: its stored format, as [`crate::store::keys`] is sled's.
//!
//! No handle or domain appears in a name. `U` is a user's name in NATS: 32 hex digits of a
//! BLAKE3 hash of the handle keyed by a key derived from the broker's secret (`server.key`,
//! shared by every pod), so the server's subject list and KV keys do not list who has mail;
//! `D` is the same of a destination domain.
//!
//! Streams (replicas `nats_replicas`, file storage, direct get, per-message TTL):
//!
//! ```text
//! SEALPOST_INBOX_<p>   subjects sp.in.<p>.>     p = first byte of U (as a number) % partitions
//!   sp.in.<p>.<U>.<device>   one device queue, oldest first:
//!       envelope   payload: ciphertext; headers Sp-Seq, Sp-Id (hex), Sp-Class, Sp-Accepted,
//!                  Sp-Expires (ms); Nats-Msg-Id <id hex>.<device> (dedup); Nats-TTL (expiry)
//!       head       empty payload; header Sp-Head: the queue's next seq. Written when the queue
//!                  drains, so that its numbering goes on after its last envelope is deleted
//! SEALPOST_OUTBOX      subjects sp.out.>
//!   sp.out.<D>.<pod>         a pod's federation outbox to one domain: payload an OutboxRecord
//!                            (MessagePack), header Sp-Seq (the peer's sequence number)
//! ```
//!
//! KV buckets (same replicas):
//!
//! ```text
//! sealpost_directory
//!   a.<U>             AccountDoc: the account and its devices (one document: device ids
//!                     and the device limit change under one compare-and-set)
//!   k.<U>.<device>    KeysDoc: one-time keys and the fallback key (a claim is one CAS)
//!   kp.<U>.<device>   KeysDoc: MLS KeyPackages, one-time ones and the last-resort one
//!   g.<group hex>     GroupRecord: a group at its hub (a Commit takes an epoch: one CAS)
//!   l.<U>             the signed device list (opaque)
//!   t.<U>             DeliveryTokenRecord
//!   w.<U>.<device>    PushRecord: the device's push subscription
//! sealpost_link_codes (entries live at most an hour; a code is valid ten minutes)
//!   c.<U>.<code hash hex>   LinkCodeRecord
//! sealpost_tickets (entries live 2 min; a ticket is valid at most 60 s)
//!   n.<nonce hex>     a spent session ticket
//! sealpost_pods (entries live 30 s unless refreshed)
//!   p.<pod>           the pod is alive (refreshed every few seconds)
//!   c.<D>.<pod>       the name of the pod that is taking over that gone pod's outbox to D
//! ```
//!
//! Integers in headers are decimal ASCII.

use std::fmt::Write as _;

use crate::store::KeyKind;

/// Headers of stored messages.
pub(super) const SEQ: &str = "Sp-Seq";
pub(super) const ID: &str = "Sp-Id";
pub(super) const CLASS: &str = "Sp-Class";
pub(super) const ACCEPTED: &str = "Sp-Accepted";
pub(super) const EXPIRES: &str = "Sp-Expires";
pub(super) const HEAD: &str = "Sp-Head";

/// Stream and bucket names.
pub(super) const INBOX_STREAM: &str = "SEALPOST_INBOX";
pub(super) const OUTBOX_STREAM: &str = "SEALPOST_OUTBOX";
pub(super) const DIRECTORY_BUCKET: &str = "sealpost_directory";
pub(super) const LINK_CODE_BUCKET: &str = "sealpost_link_codes";
pub(super) const POD_BUCKET: &str = "sealpost_pods";
pub(super) const TICKET_BUCKET: &str = "sealpost_tickets";

/// BLAKE3 context of the key that hashes names.
const NAME_KEY_CONTEXT: &str = "sealpost 2026-12 nats names v1";

/// Hashes handles and domains into names.
#[derive(Clone)]
pub(super) struct Names {
    key: [u8; 32],
    partitions: u32,
}

impl Names {
    /// Names keyed by `secret` (the broker's), over `partitions` inbox streams.
    pub(super) fn new(secret: &[u8; 32], partitions: u32) -> Self {
        let mut material = Vec::with_capacity(32);
        material.extend_from_slice(secret);
        Names {
            key: blake3::derive_key(NAME_KEY_CONTEXT, &material),
            partitions: partitions.max(1),
        }
    }

    /// `U` (or `D`): 32 hex digits.
    pub(super) fn hashed(&self, name: &str) -> String {
        let hash = blake3::keyed_hash(&self.key, name.as_bytes());
        hex(&hash.as_bytes()[..16])
    }

    /// The inbox partition of a hashed user.
    pub(super) fn partition(&self, user: &str) -> u32 {
        let first = u32::from_str_radix(&user[..2], 16).unwrap_or(0);
        first % self.partitions
    }

    /// A device queue's subject.
    pub(super) fn queue(&self, user: &str, device: u32) -> String {
        format!("sp.in.{}.{user}.{device}", self.partition(user))
    }

    /// A pod's outbox subject for a hashed domain.
    pub(super) fn outbox(domain: &str, pod: &str) -> String {
        format!("sp.out.{domain}.{pod}")
    }
}

/// The name of inbox stream `p`.
pub(super) fn inbox_stream(p: u32) -> String {
    format!("{INBOX_STREAM}_{p}")
}

/// The subjects of inbox stream `p`.
pub(super) fn inbox_subjects(p: u32) -> String {
    format!("sp.in.{p}.>")
}

/// The subjects of the outbox stream.
pub(super) const OUTBOX_SUBJECTS: &str = "sp.out.>";

pub(super) fn account(user: &str) -> String {
    format!("a.{user}")
}

/// A group at its hub, by its (random, opaque) id.
pub(super) fn group(group: &[u8]) -> String {
    let mut key = String::with_capacity(2 + 2 * group.len());
    key.push_str("g.");
    for b in group {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// A device's published keys of one kind: one document (see `directory`).
pub(super) fn keys(user: &str, device: u32, kind: KeyKind) -> String {
    match kind {
        KeyKind::Olm => format!("k.{user}.{device}"),
        KeyKind::Mls => format!("kp.{user}.{device}"),
    }
}

/// A device's push subscription.
pub(super) fn push(user: &str, device: u32) -> String {
    format!("w.{user}.{device}")
}

pub(super) fn device_list(user: &str) -> String {
    format!("l.{user}")
}

pub(super) fn delivery_token(user: &str) -> String {
    format!("t.{user}")
}

pub(super) fn link_code(user: &str, code_hash: &[u8; 32]) -> String {
    format!("c.{user}.{}", hex(code_hash))
}

/// The dedup id of an envelope copy.
pub(super) fn msg_id(id: &[u8; 16], device: u32) -> String {
    format!("{}.{device}", hex(id))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses what [`hex`] wrote.
pub(super) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A name must be a valid NATS subject token: what the broker writes always is (hex, digits
/// and a pod name checked at start).
pub(super) fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_keyed_and_hide_the_handle() {
        let a = Names::new(&[1; 32], 4);
        let b = Names::new(&[2; 32], 4);
        let u = a.hashed("alice@example.com");
        assert_eq!(u.len(), 32);
        assert_eq!(u, a.hashed("alice@example.com"));
        assert_ne!(u, b.hashed("alice@example.com"), "keyed by the secret");
        assert!(!a.queue(&u, 3).contains("alice"));
        assert!(a.partition(&u) < 4);
        assert!(a.queue(&u, 3).ends_with(".3"));
        assert_eq!(unhex::<16>(&hex(&[7; 16])), Some([7; 16]));
        assert!(valid_token("sealpost-7f9c-1") && !valid_token("a.b") && !valid_token(""));
    }
}
