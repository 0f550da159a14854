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
//! user_devicelist        b'l' handle                     -> signed device list (opaque)
//! user_deliverytoken     b't' handle                     -> DeliveryTokenRecord
//! usercode_link          b'c' handle 0xff code_hash:[32] -> LinkCodeRecord
//! ```
//!
//! Tree `queues` (one tree, so that a send's writes commit in one atomic batch):
//!
//! ```text
//! userdevice_head        b'h' handle 0xff device:u32             -> HeadRecord
//! userdeviceseq_envelope b'e' handle 0xff device:u32 seq:u64     -> EnvelopeRecord
//! userid_dedup           b'd' handle 0xff envelope_id:[16]       -> DedupRecord
//! expiryuserdeviceseq    b'x' expires_ms:u64 handle 0xff device:u32 seq:u64 -> ()
//! expiryuserid           b'y' expires_ms:u64 handle 0xff envelope_id:[16]   -> ()
//! ```
//!
//! The `x`/`y` indexes let the expiry sweep find what is due without scanning queues.
//!
//! Tree `outbox` (federation: envelopes waiting for a destination broker's acknowledgement):
//!
//! ```text
//! domainseq_outbox       b'q' domain 0xff seq:u64                -> OutboxRecord
//! ```
//!
//! One key per envelope, written once and deleted once acknowledged, so every crash-surviving
//! prefix of outbox writes is consistent without an index. Sequence numbers grow per domain;
//! the next one is the last stored plus one.

pub(crate) const ACCOUNT: u8 = b'u';
pub(crate) const DEVICE: u8 = b'v';
pub(crate) const ONE_TIME_KEY: u8 = b'o';
pub(crate) const FALLBACK_KEY: u8 = b'f';
pub(crate) const DEVICE_LIST: u8 = b'l';
pub(crate) const DELIVERY_TOKEN: u8 = b't';
pub(crate) const LINK_CODE: u8 = b'c';
pub(crate) const HEAD: u8 = b'h';
pub(crate) const ENVELOPE: u8 = b'e';
pub(crate) const DEDUP: u8 = b'd';
pub(crate) const EXPIRY_ENVELOPE: u8 = b'x';
pub(crate) const EXPIRY_DEDUP: u8 = b'y';
pub(crate) const OUTBOX: u8 = b'q';
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

/// Prefix of one device's one-time keys.
pub(crate) fn one_time_key_prefix(user: &str, device: u32) -> Vec<u8> {
    let mut k = key(ONE_TIME_KEY, user, 13);
    k.push(SEP);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

pub(crate) fn one_time_key(user: &str, device: u32, key_id: u64) -> Vec<u8> {
    let mut k = one_time_key_prefix(user, device);
    k.extend_from_slice(&key_id.to_be_bytes());
    k
}

pub(crate) fn fallback_key(user: &str, device: u32) -> Vec<u8> {
    let mut k = key(FALLBACK_KEY, user, 5);
    k.push(SEP);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

pub(crate) fn device_list(user: &str) -> Vec<u8> {
    key(DEVICE_LIST, user, 0)
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

pub(crate) fn head(user: &str, device: u32) -> Vec<u8> {
    let mut k = head_prefix(user);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

/// Prefix of all queue heads of `user`.
pub(crate) fn head_prefix(user: &str) -> Vec<u8> {
    let mut k = key(HEAD, user, 5);
    k.push(SEP);
    k
}

pub(crate) fn envelope(user: &str, device: u32, seq: u64) -> Vec<u8> {
    let mut k = envelope_prefix(user, device);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Prefix of one device's queue.
pub(crate) fn envelope_prefix(user: &str, device: u32) -> Vec<u8> {
    let mut k = key(ENVELOPE, user, 13);
    k.push(SEP);
    k.extend_from_slice(&device.to_be_bytes());
    k
}

/// The sequence number at the end of an `envelope` key.
pub(crate) fn envelope_seq(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8).map(|at| &key[at..])?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

pub(crate) fn dedup(user: &str, id: &[u8; 16]) -> Vec<u8> {
    let mut k = key(DEDUP, user, 17);
    k.push(SEP);
    k.extend_from_slice(id);
    k
}

pub(crate) fn expiry_envelope(expires_ms: u64, user: &str, device: u32, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(22 + user.len());
    k.push(EXPIRY_ENVELOPE);
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(user.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&device.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn expiry_dedup(expires_ms: u64, user: &str, id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(26 + user.len());
    k.push(EXPIRY_DEDUP);
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(user.as_bytes());
    k.push(SEP);
    k.extend_from_slice(id);
    k
}

/// Upper bound (exclusive) of the expiry index entries of `tag` due at or before `now_ms`.
pub(crate) fn expiry_until(tag: u8, now_ms: u64) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
    k
}

/// Splits an expiry key (after its tag and timestamp) into the handle and the remainder.
pub(crate) fn split_expiry(key: &[u8]) -> Option<(u64, &str, &[u8])> {
    let ts = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    let rest = key.get(9..)?;
    let sep = rest.iter().position(|b| *b == SEP)?;
    let user = std::str::from_utf8(&rest[..sep]).ok()?;
    Some((ts, user, &rest[sep + 1..]))
}

/// Prefix of one destination domain's outbox.
pub(crate) fn outbox_prefix(domain: &str) -> Vec<u8> {
    let mut k = key(OUTBOX, domain, 9);
    k.push(SEP);
    k
}

pub(crate) fn outbox(domain: &str, seq: u64) -> Vec<u8> {
    let mut k = outbox_prefix(domain);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_keys_sort_by_device_then_seq() {
        let a = envelope("a@x", 1, 2);
        let b = envelope("a@x", 1, 256);
        let c = envelope("a@x", 2, 0);
        assert!(a < b && b < c);
        assert!(a.starts_with(&envelope_prefix("a@x", 1)));
        assert_eq!(envelope_seq(&b), Some(256));
        // A handle that is a prefix of another does not share its key prefix.
        assert!(!envelope("ab@x", 1, 0).starts_with(&envelope_prefix("a@x", 1)));
    }

    #[test]
    fn expiry_keys_round_trip() {
        let k = expiry_envelope(77, "a@x", 3, 9);
        let (ts, user, rest) = split_expiry(&k).unwrap();
        assert_eq!((ts, user), (77, "a@x"));
        assert_eq!(
            rest,
            [&3u32.to_be_bytes()[..], &9u64.to_be_bytes()].concat()
        );
        assert!(k < expiry_until(EXPIRY_ENVELOPE, 77));
        assert!(k >= expiry_until(EXPIRY_ENVELOPE, 76));
    }
}
