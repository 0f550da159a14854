//! Every key layout of the sled backend (`store/sled/`), in one place: its on-disk format,
//! which existing data directories depend on. Other backends keep their own catalogue (a
//! JetStream one: subjects, headers and KV keys). Integers are big-endian so that sled's
//! lexicographic order is numeric order; handles never contain `0xff` (they are ASCII), so
//! `0xff` separates a handle from what follows.
//!
//! Tree `accounts`:
//!
//! ```text
//! userhandle_account     b'u' handle                     -> AccountRecord
//! userdevice_device      b'v' handle 0xff device:u32     -> DeviceRecord
//! userdevicekey_otk      b'o' handle 0xff device:u32 key_id:u64 -> one-time key (opaque)
//! userdevice_fallback    b'f' handle 0xff device:u32     -> FallbackKeyRecord
//! userdevicekey_kp       b'p' handle 0xff device:u32 key_id:u64 -> MLS KeyPackage (opaque)
//! userdevice_lastresort  b'g' handle 0xff device:u32     -> FallbackKeyRecord (MLS last resort)
//! user_devicelist        b'l' handle                     -> signed device list (opaque)
//! user_deliverytoken     b't' handle                     -> DeliveryTokenRecord
//! usercode_link          b'c' handle 0xff code_hash:[32] -> LinkCodeRecord
//! userdevice_push        b'w' handle 0xff device:u32     -> PushRecord (push subscription)
//! group_hub              b'G' group_id:[16..=32]         -> GroupRecord (at the group's hub)
//! ```
//!
//! Tree `queues` (one tree, so that a send's writes survive a crash as one ordered prefix). `H(handle)`
//! and `H(id)` are 16-byte keyed BLAKE3 hashes (`sled::keyring`), so the data file does not
//! list who has mail nor which envelope ids were seen; values marked *sealed* are
//! XChaCha20-Poly1305 under a key of the queue (destroyed once it drains: crypto-shredding),
//! marked *index-sealed* under a long-lived key of the keyring:
//!
//! ```text
//! userdevice_head        b'H' H(handle) device:u32            -> HeadRecord (a checkpoint)
//! user_closed            b'K' H(handle)                       -> empty: the heads are exact
//! userdeviceseq_envelope b'E' H(handle) device:u32 seq:u64    -> sealed EnvelopeRecord
//! user_lastsend          b'L' H(handle)                       -> LastSendRecord (queue ends, unpaged sends)
//! userpage_sends         b'P' H(handle) page:u64              -> PageRecord (sends: H(id), times, copies)
//! expiryuserpage         b'W' due_ms:u64 H(handle) page:u64   -> index-sealed handle
//! secondusernonce_sends  b'Z' due_ms:u64 H(handle) nonce:u64     -> index-sealed handle and H(id)* (none: a wake entry)
//! layout                 b'V'                                 -> layout:u8 (the newest that wrote here)
//! userid_dedup           b'D' H(handle) H(id)                  -> DedupRecord (layouts 2-4, read only)
//! expiryuserid           b'Y' expires_ms:u64 H(handle) H(id)   -> index-sealed handle (layout 3, read only)
//! expiryuserdeviceseq    b'X' expires_ms:u64 H(handle) device:u32 seq:u64 -> index-sealed handle (layout 2, read only)
//! slotgeneration_queue   b'A' slot:u32 generation:u64             -> prefix_len:u8 prefix adopted_ms:u64
//! ```
//!
//! The expiry index lets the sweep find what is due without scanning queues; its values name
//! the handle whose mailbox expires the entry.
//!
//! Layout 5 (this one) writes one new key per copy of a send, its envelope, and overwrites one
//! per user: `L`, written after the envelopes, names every queue's end. It commits the send
//! (a user's writer writes its sends one after another, so only the last can be torn: an
//! envelope at or past its queue's end in `L` is that send's, rolled back when the queues
//! open) and keeps queue ends exact when acknowledgements have emptied a queue. The writer
//! lists its sends in memory and stores them every `sled::inbox::INDEX_EVERY` sends, and when
//! it closes the queues, in one `P` page (numbered in order per user), indexed by one `W`
//! entry due when the page's first envelopes expire, then when its last send is forgotten.
//! Pages answer retries: the writer loads the recent ones when it opens the queues, and keeps
//! the ids of its sends in memory (`sled::inbox`). Until a page is stored a *wake* entry, a
//! `Z` entry listing no ids, is due no later than the first listed send: it brings the sweep
//! to the writer, or, after a crash (no `K`), to the opening of the queues, which lists again
//! the envelopes `L` names as not yet paged (`sled::recovery`).
//!
//! What older layouts wrote is still read: `D` (one dedup record per send, which layouts 2-4
//! wrote to commit it, answer retries and find its envelopes), `Z` entries listing the keyed
//! ids of sends due in one second (layout 4; `nonce` is random: entries never overwrite each
//! other), `Y` (layout 3, one per send) and `X` (layout 2, one per envelope). Nothing writes
//! them any more; a user whose `D` records remain is answered from them too, until they expire.
//! A build older than layout 5 must not open a directory this one has used: it would take every
//! envelope stored since for a torn send's and delete it. `V` names the newest layout that
//! wrote the directory; this build and later ones refuse a directory a newer layout wrote
//! (builds before layout 5 do not read it). A head is a checkpoint: stored every
//! `recovery::CHECKPOINT_EVERY` appends and when its writer closes the user's queues, which
//! then writes `K`; trims store none. Opening the queues takes `K` away; without it (a crash)
//! they are counted again and their ends taken from `L` (or, for a user with no send since
//! layout 4, from the dedup records: `sled::recovery`). A device queue's key prefix (`E`
//! H(handle) device) names it in the keyring.
//!
//! `A` names the queue that adopted one of the keyring's spare keys (`sled::keyring`): it is
//! written before the first record sealed under that key, so a record never survives a crash
//! without it. It is removed once the keyring file names the slot itself (or the key is gone);
//! an entry whose slot no longer holds that spare (rewritten since: another generation, or
//! named in the file) is stale, and opening the store removes it.
//!
//! Tree `outbox` (federation: envelopes waiting for a destination broker's acknowledgement):
//!
//! ```text
//! domainseq_outbox       b'Q' H(domain) seq:u64                -> sealed OutboxRecord
//! ```
//!
//! One key per envelope, written once and deleted once acknowledged, so every crash-surviving
//! prefix of outbox writes is consistent without an index. Sequence numbers grow per domain;
//! the next one is the last stored plus one. `Q` H(domain) names the outbox in the keyring.
//!
//! Layout 1 (before sealing; migrated on open, see `sled::migrate`) used the lower-case tags
//! `h e d x y q` with the plain handle (or domain) followed by `0xff`, and plain values; see
//! [`v1`].
//!
//! Integers in every key are big-endian.

use super::KeyKind;

pub(crate) const ACCOUNT: u8 = b'u';
pub(crate) const DEVICE: u8 = b'v';
pub(crate) const ONE_TIME_KEY: u8 = b'o';
pub(crate) const FALLBACK_KEY: u8 = b'f';
pub(crate) const KEY_PACKAGE: u8 = b'p';
pub(crate) const LAST_RESORT_KEY_PACKAGE: u8 = b'g';
pub(crate) const DEVICE_LIST: u8 = b'l';
pub(crate) const DELIVERY_TOKEN: u8 = b't';
pub(crate) const LINK_CODE: u8 = b'c';
pub(crate) const PUSH: u8 = b'w';
pub(crate) const GROUP: u8 = b'G';
pub(crate) const HEAD: u8 = b'H';
pub(crate) const ENVELOPE: u8 = b'E';
pub(crate) const DEDUP: u8 = b'D';
pub(crate) const CLOSED: u8 = b'K';
pub(crate) const EXPIRY_ENVELOPE: u8 = b'X';
pub(crate) const EXPIRY_DEDUP: u8 = b'Y';
pub(crate) const EXPIRY_SENDS: u8 = b'Z';
pub(crate) const LAST_SEND: u8 = b'L';
pub(crate) const PAGE: u8 = b'P';
pub(crate) const EXPIRY_PAGE: u8 = b'W';
pub(crate) const OUTBOX: u8 = b'Q';
pub(crate) const ADOPTION: u8 = b'A';
const SEP: u8 = 0xff;

fn key(tag: u8, user: &str, rest_len: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + user.len() + rest_len);
    k.push(tag);
    k.extend_from_slice(user.as_bytes());
    k
}

pub(crate) fn account(user: &str) -> Vec<u8> {
    key(ACCOUNT, user, 0)
}

pub(crate) fn device(user: &str, device: u32) -> Vec<u8> {
    let mut k = device_prefix(user);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

/// Prefix of all devices of `user`.
pub(crate) fn device_prefix(user: &str) -> Vec<u8> {
    let mut k = key(DEVICE, user, 5);
    k.push(SEP);
    k
}

/// Prefix of one device's one-time keys of a kind.
pub(crate) fn one_time_key_prefix(kind: KeyKind, user: &str, device: u32) -> Vec<u8> {
    let tag = match kind {
        KeyKind::Olm => ONE_TIME_KEY,
        KeyKind::Mls => KEY_PACKAGE,
    };
    let mut k = key(tag, user, 13);
    k.push(SEP);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

pub(crate) fn one_time_key(kind: KeyKind, user: &str, device: u32, key_id: u64) -> Vec<u8> {
    let mut k = one_time_key_prefix(kind, user, device);
    k.extend_from_slice(&key_id.to_be_bytes());
    k
}

pub(crate) fn fallback_key(kind: KeyKind, user: &str, device: u32) -> Vec<u8> {
    let tag = match kind {
        KeyKind::Olm => FALLBACK_KEY,
        KeyKind::Mls => LAST_RESORT_KEY_PACKAGE,
    };
    let mut k = key(tag, user, 5);
    k.push(SEP);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

pub(crate) fn device_list(user: &str) -> Vec<u8> {
    key(DEVICE_LIST, user, 0)
}

pub(crate) fn push(user: &str, device: u32) -> Vec<u8> {
    let mut k = key(PUSH, user, 5);
    k.push(SEP);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

pub(crate) fn delivery_token(user: &str) -> Vec<u8> {
    key(DELIVERY_TOKEN, user, 0)
}

pub(crate) fn link_code(user: &str, code_hash: &[u8; 32]) -> Vec<u8> {
    let mut k = key(LINK_CODE, user, 33);
    k.push(SEP);
    k.extend_from_slice(code_hash);
    k
}

pub(crate) fn group(group: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + group.len());
    k.push(GROUP);
    k.extend_from_slice(group);
    k
}

/// A keyed hash standing for a handle, an envelope id or a domain (see the top).
pub(crate) type Hashed = [u8; 16];

pub(crate) fn head(user: &Hashed, device: u32) -> Vec<u8> {
    let mut k = head_prefix(user);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

/// Prefix of all queue heads of a user.
pub(crate) fn head_prefix(user: &Hashed) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    k.push(HEAD);
    k.extend_from_slice(user);
    k
}

pub(crate) fn envelope(user: &Hashed, device: u32, seq: u64) -> Vec<u8> {
    let mut k = envelope_prefix(user, device);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The entry naming the queue that adopted the spare key `(slot, generation)`.
pub(crate) fn adoption(slot: u32, generation: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(ADOPTION);
    k.extend_from_slice(&slot.to_be_bytes());
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

/// Prefix of one device's queue (what names it in the keyring).
pub(crate) fn envelope_prefix(user: &Hashed, device: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(29);
    k.push(ENVELOPE);
    k.extend_from_slice(user);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

/// The sequence number at the end of an `envelope` (or `outbox`) key.
pub(crate) fn envelope_seq(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8).map(|at| &key[at..])?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

pub(crate) fn dedup(user: &Hashed, id: &Hashed) -> Vec<u8> {
    let mut k = dedup_prefix(user);
    k.extend_from_slice(id);
    k
}

/// Prefix of all dedup records of a user.
pub(crate) fn dedup_prefix(user: &Hashed) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(DEDUP);
    k.extend_from_slice(user);
    k
}

/// The marker that a user's queue heads were stored exact when their writer closed them.
pub(crate) fn closed(user: &Hashed) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(CLOSED);
    k.extend_from_slice(user);
    k
}

pub(crate) fn expiry_envelope(expires_ms: u64, user: &Hashed, device: u32, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(37);
    k.push(EXPIRY_ENVELOPE);
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(user);
    k.extend_from_slice(&device.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn expiry_dedup(expires_ms: u64, user: &Hashed, id: &Hashed) -> Vec<u8> {
    let mut k = Vec::with_capacity(41);
    k.push(EXPIRY_DEDUP);
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(user);
    k.extend_from_slice(id);
    k
}

/// An entry listing sends of `user` that fall due by `due_ms` (see the top).
pub(crate) fn expiry_sends(due_ms: u64, user: &Hashed, nonce: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(EXPIRY_SENDS);
    k.extend_from_slice(&due_ms.to_be_bytes());
    k.extend_from_slice(user);
    k.extend_from_slice(&nonce.to_be_bytes());
    k
}

/// The record naming a user's queue ends after its last committed send.
pub(crate) fn last_send(user: &Hashed) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(LAST_SEND);
    k.extend_from_slice(user);
    k
}

/// Prefix of all pages of a user.
pub(crate) fn page_prefix(user: &Hashed) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(PAGE);
    k.extend_from_slice(user);
    k
}

/// A page of a user's sends.
pub(crate) fn page(user: &Hashed, page: u64) -> Vec<u8> {
    let mut k = page_prefix(user);
    k.extend_from_slice(&page.to_be_bytes());
    k
}

/// The expiry index entry of a page, due at `due_ms`.
pub(crate) fn expiry_page(due_ms: u64, user: &Hashed, page: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(EXPIRY_PAGE);
    k.extend_from_slice(&due_ms.to_be_bytes());
    k.extend_from_slice(user);
    k.extend_from_slice(&page.to_be_bytes());
    k
}

/// The key naming the newest layout that wrote the data directory.
pub(crate) const LAYOUT: &[u8] = b"V";

/// Upper bound (exclusive) of the expiry index entries of `tag` due at or before `now_ms`.
pub(crate) fn expiry_until(tag: u8, now_ms: u64) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
    k
}

/// The `device:u32 seq:u64` that ends envelope and expiry keys (both layouts).
pub(crate) fn device_seq(rest: &[u8]) -> Option<(u32, u64)> {
    let device = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let seq = u64::from_be_bytes(rest.get(4..12)?.try_into().ok()?);
    Some((device, seq))
}

/// Splits an expiry key (after its tag and timestamp) into the expiry and the remainder
/// after the user's hash.
pub(crate) fn split_expiry(key: &[u8]) -> Option<(u64, &[u8])> {
    let ts = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    Some((ts, key.get(25..)?))
}

/// Prefix of one destination domain's outbox (what names it in the keyring).
pub(crate) fn outbox_prefix(domain: &Hashed) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(OUTBOX);
    k.extend_from_slice(domain);
    k
}

pub(crate) fn outbox(domain: &Hashed, seq: u64) -> Vec<u8> {
    let mut k = outbox_prefix(domain);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Layout 1, read only by the migration: lower-case tags, the plain handle (or domain), then
/// `0xff`, then what follows in layout 2.
pub(crate) mod v1 {
    pub(crate) const HEAD: u8 = b'h';
    pub(crate) const ENVELOPE: u8 = b'e';
    pub(crate) const DEDUP: u8 = b'd';
    pub(crate) const EXPIRY_ENVELOPE: u8 = b'x';
    pub(crate) const EXPIRY_DEDUP: u8 = b'y';
    pub(crate) const OUTBOX: u8 = b'q';

    /// Splits a layout-1 key `tag [expires_ms:u64] name 0xff rest` into (expires_ms, name,
    /// rest); `timed` for the expiry index tags.
    pub(crate) fn split(key: &[u8], timed: bool) -> Option<(u64, &str, &[u8])> {
        let (ts, rest) = if timed {
            (
                u64::from_be_bytes(key.get(1..9)?.try_into().ok()?),
                key.get(9..)?,
            )
        } else {
            (0, key.get(1..)?)
        };
        let sep = rest.iter().position(|b| *b == super::SEP)?;
        let name = std::str::from_utf8(&rest[..sep]).ok()?;
        Some((ts, name, &rest[sep + 1..]))
    }

    /// A layout-1 key, for tests that write an old data directory.
    #[cfg(test)]
    pub(crate) fn key(tag: u8, expires_ms: Option<u64>, name: &str, rest: &[u8]) -> Vec<u8> {
        let mut k = vec![tag];
        if let Some(ts) = expires_ms {
            k.extend_from_slice(&ts.to_be_bytes());
        }
        k.extend_from_slice(name.as_bytes());
        k.push(super::SEP);
        k.extend_from_slice(rest);
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_keys_sort_by_device_then_seq() {
        let u = [1; 16];
        let a = envelope(&u, 1, 2);
        let b = envelope(&u, 1, 256);
        let c = envelope(&u, 2, 0);
        assert!(a < b && b < c);
        assert!(a.starts_with(&envelope_prefix(&u, 1)));
        assert_eq!(envelope_seq(&b), Some(256));
        assert!(!envelope(&[2; 16], 1, 0).starts_with(&envelope_prefix(&u, 1)));
    }

    #[test]
    fn expiry_keys_round_trip() {
        let k = expiry_envelope(77, &[5; 16], 3, 9);
        let (ts, rest) = split_expiry(&k).unwrap();
        assert_eq!(ts, 77);
        assert_eq!(
            rest,
            [&3u32.to_be_bytes()[..], &9u64.to_be_bytes()].concat()
        );
        assert!(k < expiry_until(EXPIRY_ENVELOPE, 77));
        assert!(k >= expiry_until(EXPIRY_ENVELOPE, 76));
    }

    #[test]
    fn layout_1_keys_split() {
        let k = v1::key(v1::EXPIRY_DEDUP, Some(9), "a@x", &[7; 16]);
        assert_eq!(v1::split(&k, true), Some((9, "a@x", &[7u8; 16][..])));
        let k = v1::key(v1::HEAD, None, "a@x", &1u32.to_be_bytes());
        assert_eq!(v1::split(&k, false), Some((0, "a@x", &[0, 0, 0, 1][..])));
    }
}
