//! Proofs of a link code's secret part (device linking; the protocol is in the SDK's module
//! doc). The broker sees only the code's broker part; both the new device's request and the
//! existing device's grant carry a BLAKE3 keyed hash under a key derived from the secret, so
//! neither can be forged by someone who knows only the broker part.

use zeroize::Zeroizing;

/// Length of the link code's secret part.
pub const LINK_SECRET_BYTES: usize = 16;
/// BLAKE3 context for the proof key.
const LINK_CONTEXT: &str = "sealpost link code v1";

fn link_key(secret: &[u8]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(blake3::derive_key(LINK_CONTEXT, secret))
}

/// The proof for `label` (`b"request"` or `b"grant"`), binding the account, the new device's
/// id and `parts` (length-prefixed, so part boundaries count).
pub fn link_proof(
    secret: &[u8],
    label: &[u8],
    handle: &str,
    device: u32,
    parts: &[&[u8]],
) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(&link_key(secret));
    hasher.update(label);
    hasher.update(
        &u16::try_from(handle.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    hasher.update(handle.as_bytes());
    hasher.update(&device.to_be_bytes());
    for part in parts {
        hasher.update(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

/// Whether `proof` is the expected one (compared as BLAKE3 hashes: constant time).
pub fn proof_matches(proof: &[u8; 32], expected: &[u8; 32]) -> bool {
    blake3::Hash::from(*proof) == blake3::Hash::from(*expected)
}
